"""Griffe extension: read the library's docstrings as its doctests and editors do, for mkdocstrings.

The code writes a docstring's doctests under `Example:` (one example, as Google's style guide and Sphinx's napoleon
accept); griffe's Google parser knows only `Examples:` and would show the section as prose, its `>>>` lines as a
quote. A few older docstrings also use Sphinx roles (:func:`corrupt`), which Markdown would show as they are. This
rewrites both while the site is built (`mkdocs.yml` names this file under the Python handler's `extensions`); the
source is not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_SECTION = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_SPHINX_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj):`~?([^`]+)`")


class ExampleSections(griffe.Extension):
    """Turns `Example:` sections into `Examples:` and Sphinx roles into code spans."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Every object, modules and packages included, as soon as it is loaded."""
        if obj.docstring is not None:
            text = _EXAMPLE_SECTION.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _SPHINX_ROLE.sub(r"`\1`", text)

    on_object = on_instance  # attribute docstrings are attached after the attribute is created

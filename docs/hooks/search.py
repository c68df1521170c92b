"""MkDocs hook: the full tables that the benchmarks write (`docs/benchmark-results/`, a link to `benchmarks/results/`)
rank below the pages written for readers in the site's search. Their long tables mention every option and method,
and would otherwise come first for a search such as `lr-decay`. The files themselves are left as the benchmarks
write them (no front matter), so the weight is set here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mkdocs.structure.pages import Page

GENERATED_BY_BENCHMARKS = "benchmark-results/"
BOOST = 0.2  # Material for MkDocs' search weight of a page (1 by default)


def on_page_markdown(markdown: str, page: Page, **kwargs: Any) -> str:
    """Lower the search weight of a results file."""
    if page.file.src_uri.startswith(GENERATED_BY_BENCHMARKS):
        page.meta.setdefault("search", {}).setdefault("boost", BOOST)
    return markdown

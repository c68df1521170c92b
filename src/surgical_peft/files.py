"""Writing directories all at once: a staging directory beside the target, moved into place only when complete, so a
failure never leaves a half-written one behind.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> target = Path(tempfile.mkdtemp()) / "out"
    >>> with staged_directory(target) as staging:
    ...     _ = (staging / "a.txt").write_text("done")
    >>> sorted(p.name for p in target.iterdir())
    ['a.txt']
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["staged_directory"]


@contextmanager
def staged_directory(target: Path, *, replace: bool = True) -> Iterator[Path]:
    """A fresh directory beside `target` that becomes `target` on success and disappears on failure.

    Args:
        target: the directory to write.
        replace: whether an existing `target` is replaced; with `False`, an existing one is kept (e.g. a cache entry
            another process wrote first) and the staging directory is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not replace:
        try:
            os.replace(staging, target)
        except OSError:  # the target exists: keep it
            shutil.rmtree(staging, ignore_errors=True)
        return
    previous = None
    if target.exists():
        previous = target.with_name(f".{target.name}.{os.getpid()}.previous")
        os.replace(target, previous)
    os.replace(staging, target)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)

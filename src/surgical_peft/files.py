"""Writing files so that a failure or a kill never leaves a half-written one behind.

- `staged_directory`: a whole new directory, written beside the target and moved into place when complete (a cache
  entry: an existing target is kept).
- `staging_inside` and `move_into_place`: files written into a private staging directory inside the target directory,
  then renamed one by one over their final names (`os.replace`, atomic on POSIX), each fsynced before its rename and
  the directory after it. Nothing else in the target directory is touched, and the staging directory of a killed
  earlier writer is removed by the next one.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> target = Path(tempfile.mkdtemp()) / "out"
    >>> with staged_directory(target) as staging:
    ...     _ = (staging / "a.txt").write_text("done")
    >>> sorted(p.name for p in target.iterdir())
    ['a.txt']
    >>> _ = (target / "mine.txt").write_text("kept")
    >>> with staging_inside(target) as staging:
    ...     _ = (staging / "a.txt").write_text("new")
    ...     move_into_place(target, [(staging / "a.txt", "a.txt")])
    >>> sorted(p.name for p in target.iterdir()), (target / "a.txt").read_text()
    (['a.txt', 'mine.txt'], 'new')
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

__all__ = ["fsync", "move_into_place", "staged_directory", "staging_inside"]

_STAGING_PREFIX = ".surgical-staging-"
_KILL_AT = "_SURGICAL_PEFT_KILL_AT"  # private test hook: the step at which the process kills itself (see `kill_point`)


def kill_point(step: str) -> None:
    """SIGKILL this process at `step` if the environment asks for it (tests of what a kill leaves behind)."""
    if os.environ.get(_KILL_AT) == step:
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A fresh directory beside `target` that becomes `target` on success unless `target` exists by then (e.g. a
    cache entry another process wrote first: it is kept); the staging directory disappears in every other case."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_staging(directory: Path) -> None:
    """Remove the staging directories in `directory` left by writers that no longer run (killed mid-write)."""
    for entry in directory.glob(f"{_STAGING_PREFIX}*"):
        pid = entry.name.removeprefix(_STAGING_PREFIX).split("-", 1)[0]
        if entry.is_dir() and pid.isdigit() and not _is_running(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def staging_inside(directory: Path) -> Iterator[Path]:
    """A private staging directory inside `directory` (created if needed), removed on exit whatever happens; on an
    error, the directories it created are removed too.

    It lives in `directory` itself so that `move_into_place` renames within one file system; its name records this
    process's id, so that a later writer can tell a killed writer's leftovers from a concurrent writer's files.
    """
    created = [path for path in (directory, *directory.parents) if not path.exists()]  # innermost first
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(directory)
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", dir=directory))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for path in created:  # a failed write leaves no directory it created (unless another writer filled it)
            try:
                path.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(staging, ignore_errors=True)


def fsync(path: Path) -> None:
    """Flush `path` (a file, or a directory's entries) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _check_free(directory: Path, names: list[str]) -> None:
    """An `InputError` before anything moves if a name to write is held by something a file cannot replace: a
    directory at its path, or a file where one of its parent directories must be."""
    for name in names:
        destination = directory / name
        blocked = [destination] if destination.is_dir() else []
        blocked += [parent for parent in destination.parents if parent.is_relative_to(directory) and parent.is_file()]
        if blocked:
            kind = "a directory" if blocked[0].is_dir() else "a file"
            raise InputError(
                f"Cannot write {destination}: {blocked[0]} is {kind} of yours in the way. Nothing was written; move "
                "it or choose another directory."
            )


def move_into_place(directory: Path, moves: list[tuple[Path, str]]) -> None:
    """Rename each staged file `(source, relative name)` over `directory / name`, in the order given: each file is
    fsynced before its rename and its directory after it, so that a crash leaves every name either old or new.
    Concurrent writers into one directory take turns (a lock on the directory), so their renames never interleave.
    A name held by a directory, or under a file, is refused before anything moves."""
    lock = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _check_free(directory, [name for _, name in moves])
        for source, name in moves:
            destination = directory / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            fsync(source)
            os.replace(source, destination)
            fsync(destination.parent)
            kill_point(f"after {name}")
    finally:
        os.close(lock)  # releases the lock

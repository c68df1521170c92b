"""Writing files so that a failure or a kill never leaves a half-written one behind.

- `staged_directory`: a whole new directory, written beside the target and moved into place when complete (a cache
  entry: an existing target is kept).
- `staging_inside` and `move_into_place`: files written into a private staging directory inside the target directory,
  then renamed one by one over their final names (`os.replace`, atomic on POSIX), each fsynced before its rename and
  the directory after it. Nothing else in the target directory is touched, and the staging directory of a killed
  earlier writer is removed by the next one.
- `reporting_full_disk`: a write that fails for lack of space is reported as such (`OSError` ENOSPC), naming the path,
  the space it needed and the space that was free, whatever error the writer raised.
- `write_file`: one file written that way (a temporary file in its directory, then a rename): a symlink at its name is
  replaced by the file, never written through, so the file it pointed to is left as it was.
- `locked_directory`: a directory only one process writes into at a time (an OS lock held for as long as it writes,
  released by the OS when the process exits or dies); another is refused at once, naming the holder's process id.

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
    >>> (target / "link.txt").symlink_to(target / "mine.txt")
    >>> _ = write_file(target / "link.txt", "ours")
    >>> (target / "link.txt").is_symlink(), (target / "mine.txt").read_text()
    (False, 'kept')
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

__all__ = [
    "fsync",
    "locked_directory",
    "move_into_place",
    "reporting_full_disk",
    "staged_directory",
    "staging_inside",
    "write_file",
]

_STAGING_PREFIX = ".surgical-staging-"
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")  # the OS's words, in errors of other types
LOCK_FILE = ".surgical-peft.lock"
"""The lock file `locked_directory` holds inside a directory (it records the holder's process id)."""
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
        _remove_empty(created)  # a failed write leaves no directory it created (unless another writer filled it)
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


def _free_bytes(path: Path) -> int:
    """The space free to this user on the file system that holds `path` (or, if it does not exist yet, its parent)."""
    existing = next(candidate for candidate in (path, *path.parents) if candidate.exists())
    return shutil.disk_usage(existing).free


def _says_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, reports a full disk (or quota)."""
    while error is not None:
        if getattr(error, "errno", None) in _FULL_ERRNOS or any(text in str(error) for text in _FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def _amount(count: int) -> str:
    """`count` bytes as a message says it, e.g. `83.5 kB`."""
    if count < 1000:
        return f"{count} bytes"
    exponent = min(len(str(count)) - 1, 9) // 3  # 1: kB, 2: MB, 3: GB
    return f"{count / 1000**exponent:.1f} {('kB', 'MB', 'GB')[exponent - 1]}"


@contextmanager
def reporting_full_disk(
    path: Path, what: str, needed: Callable[[], int] | None = None, then: str = ""
) -> Iterator[None]:
    """Report a write of `what` into `path` that fails for lack of space as `OSError(ENOSPC)`, with a message that
    names `path`, the space the write needs (`needed()`, an estimate in bytes, asked for only on failure; else "more
    than what was free") and the space that was free before it, followed by `then` (what the caller left behind).

    Writers report a full disk in their own ways: Python's as an `OSError` (ENOSPC), safetensors' as a
    `SafetensorError` holding the OS's words, PyTorch's zip writer (`torch.save`) as `RuntimeError: [enforce fail at
    inline_container.cc:...] . unexpected pos ...`, which names no cause; an error counts as a full disk where it or
    its cause says so, or where less than `needed()` is left free once it failed (a write that ran out of space
    leaves the file system full). Any other error passes through unchanged.

    Example:
        >>> import tempfile
        >>> with reporting_full_disk(Path(tempfile.gettempdir()), "the notes", then="Nothing was written."):
        ...     raise OSError(errno.ENOSPC, "No space left on device")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        OSError: [Errno 28] No space left on device: writing the notes into /... needs more than the ... free ...
    """
    free = _free_bytes(path)
    try:
        yield
    except Exception as error:
        estimate = needed() if needed is not None else None
        if not (_says_full(error) or (estimate is not None and _free_bytes(path) < estimate)):
            raise
        need = (
            f"about {_amount(estimate)}, and {_amount(free)} were"
            if estimate
            else f"more than the {_amount(free)} that were"
        )
        message = f"writing {what} into {path} needs {need} free on its file system. {then}".rstrip()
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {message}") from error


def write_file(path: str | os.PathLike[str], content: str | bytes) -> Path:
    """Write `content` (text is UTF-8) to `path` so that a failure or a kill never leaves it half-written: into a
    temporary file in the same directory, flushed, then renamed over `path` (`move_into_place`). A symlink at `path`
    is replaced by the file, not written through: the file it pointed to is not touched. Returns `path`.

    Raises:
        InputError: if `path` is a directory (nothing is written).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # (the umask applies, as for open())
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content.encode() if isinstance(content, str) else content)
        move_into_place(target.parent, [(staged, target.name)])
    finally:
        staged.unlink(missing_ok=True)  # (gone once renamed)
    return target


def _lock_holder(path: Path) -> str:
    """The process id a lock file records, as text (`unknown` while it is being written)."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _take_lock(directory: Path, purpose: str) -> int:
    """An open descriptor of `directory`'s lock file, locked by this process and recording its id; an `InputError`
    naming the holder's process id if another process holds it. (A lock file that a released holder removed after we
    opened it is opened again: the lock must be on the file that the name holds.)"""
    path = directory / LOCK_FILE
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise InputError(
                f"{directory} is in use: another process (id {_lock_holder(path)}) is {purpose} there. Wait for it "
                f"to finish, or pass another directory. (Its lock: {path}.)"
            ) from None
        if os.path.exists(path) and os.path.samestat(os.fstat(descriptor), os.stat(path)):
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            return descriptor
        os.close(descriptor)


@contextmanager
def locked_directory(directory: str | os.PathLike[str], purpose: str = "writing") -> Iterator[Path]:
    """Hold `directory` (created if needed) for this process: an exclusive `flock` on a lock file inside it, which
    records this process's id. Another process that asks for the same directory meanwhile gets an `InputError` at
    once, naming that id and `purpose` (what the holder is doing). On exit the lock file is removed (and the
    directories this call created, if nothing else was put in them); a process that dies holds nothing: the OS
    releases its lock, and the next holder takes over the file it left.

    Example:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp()) / "run"
        >>> with locked_directory(run, "training"):
        ...     (run / LOCK_FILE).read_text() == f"{os.getpid()}\\n"
        True
        >>> run.exists()  # created for the lock, and left empty
        False
    """
    target = Path(directory)
    created = [path for path in (target, *target.parents) if not path.exists()]  # innermost first
    target.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = _take_lock(target, purpose)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield target
    finally:
        (target / LOCK_FILE).unlink(missing_ok=True)  # while still held: the next holder locks a new file
        os.close(descriptor)
        _remove_empty(created)


def _remove_empty(directories: list[Path]) -> None:
    """Remove `directories` (innermost first) as long as they are empty."""
    for path in directories:
        try:
            path.rmdir()
        except OSError:
            break

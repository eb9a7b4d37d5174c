"""Crash-safe directories: atomic replacement, checksums, and a lock for the processes that write them.

A directory (a saved model, a pretrained encoder) is written into a *container* beside its destination,
``.<name>.<8 hex digits>.canal-tmp``, which holds a marker file and the new directory. Its files are flushed to disk
and the new directory then takes the destination's place in one step: an exchange rename (Linux's ``renameat2``
with ``RENAME_EXCHANGE``), or, where the platform or file system has none, two renames, between which the previous
directory waits in the container as ``retired``. Readers that find the destination missing load the retired copy
(:func:`readable_directory`); the next writer puts it back. Whatever the moment a writer dies, the destination holds
the complete previous directory or the complete new one.

Writers hold :func:`writer_lock`, an exclusive lock on ``.<name>.canal-lock`` beside the directory (the directory
itself is swapped). Taking it also clears what interrupted writers of the same directory left behind. Readers take
no lock. This module uses the standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

logger = logging.getLogger("scanpy_canal")

SUFFIX = ".canal-tmp"
MARKER = "scanpy-canal-staging"
NEW = "new"
RETIRED = "retired"
LOCK_SUFFIX = ".canal-lock"
#: Seconds between two attempts to take a lock held by another process.
POLL_INTERVAL = 0.2
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class DirectoryBusyError(OSError):
    """Another process holds the writer lock of a directory."""


# ---------------------------------------------------------------------------------------------------- the lock


@dataclass
class _Hold:
    fd: int
    owner: tuple[int, int]  # (process, thread): the lock is reentrant within one thread of one process
    depth: int = 1


_HOLDS: dict[Path, _Hold] = {}


def _owner() -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of the directory `path`: ``.<name>.canal-lock`` beside it."""
    target = Path(path).absolute()
    return target.parent.resolve() / f".{target.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike, *, wait: bool = False) -> Iterator[None]:
    """Hold the exclusive right to write the directory `path` (which need not exist yet).

    The lock is reentrant within a thread, released when the block ends or the process dies, and a lock left by a
    dead process is taken over. Taking it finishes what interrupted writers of `path` left: a retired copy is put back
    if `path` is missing, and their staging containers are removed.

    Parameters
    ----------
    path
        The directory to write.
    wait
        Wait (with a message) while another process holds the lock, instead of raising.

    Raises
    ------
    DirectoryBusyError
        If another process holds the lock and `wait` is false; the message names it.
    """
    lock = lock_path(path)
    hold = _HOLDS.get(lock)
    if hold is not None and hold.owner == _owner():
        hold.depth += 1
        try:
            yield
        finally:
            hold.depth -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    _HOLDS[lock] = _Hold(_acquire(lock, Path(path), wait=wait), _owner())
    try:
        tidy(Path(path))
        yield
    finally:
        _release(lock, _HOLDS.pop(lock).fd)


def _acquire(lock: Path, target: Path, *, wait: bool) -> int:
    """A descriptor of `lock`, locked; the holder's process, host and time are written into it."""
    announced = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        if _try_lock(fd):
            # A holder removes the file as it lets go (see _release): a lock on a removed file is no lock.
            if _same_file(fd, lock):
                _record_holder(fd, lock)
                return fd
            os.close(fd)
            continue
        holder = _holder(lock)
        os.close(fd)
        if not wait:
            raise DirectoryBusyError(
                f"{str(target)!r} is being written by {holder}; try again once it has finished (on the command "
                "line, --wait waits for it)."
            )
        if not announced:
            logger.warning("%r is being written by %s; waiting for it to finish.", str(target), holder)
            announced = True
        time.sleep(POLL_INTERVAL)


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # a lock on the first byte, which Windows also releases when the process ends
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _record_holder(fd: int, lock: Path) -> None:
    previous = _holder(lock, default="")
    if previous:
        logger.info("Took over the lock %r left by %s, which ended without releasing it.", str(lock), previous)
    note = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(note).encode())


def _holder(lock: Path, *, default: str = "another process") -> str:
    """Who holds `lock`, in words (Windows does not let others read a locked file)."""
    try:
        note = json.loads(lock.read_text())
        return f"process {note['pid']} on host {note['host']} (since {note['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return default


def _release(lock: Path, fd: int) -> None:
    if fcntl is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # while still holding it, so that a waiter can tell that the file it locked is gone
        os.close(fd)
        return
    os.ftruncate(fd, 0)  # no holder: the file may stay, see below
    os.lseek(fd, 0, os.SEEK_SET)
    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    os.close(fd)
    with contextlib.suppress(OSError):  # Windows removes no file another process has open; it stays, unlocked
        os.unlink(lock)


# ------------------------------------------------------------------------------------------ replacing a directory


@contextlib.contextmanager
def replace_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty directory to fill; when the block succeeds, it replaces `path` atomically.

    Hold :func:`writer_lock` on `path` around it. If the block fails, `path` is left as it was.
    """
    target = Path(path)
    container = _new_container(target)
    staging = container / NEW
    staging.mkdir()
    try:
        yield staging
        _sync_tree(staging)
        _swap_in(staging, target, container / RETIRED)
    finally:
        _settle(target, container)


def _new_container(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        container = target.parent / f".{target.name}.{secrets.token_hex(4)}{SUFFIX}"
        try:
            container.mkdir()
        except FileExistsError:
            continue
        note = {"directory": target.name, "pid": os.getpid(), "host": socket.gethostname()}
        (container / MARKER).write_text(json.dumps(note))
        return container


def _swap_in(staging: Path, target: Path, retired: Path) -> None:
    """Put `staging` at `target`; a previous `target` ends up in the container (at `staging`, or at `retired`)."""
    if not os.path.lexists(target):
        os.rename(staging, target)
    elif not _exchange(staging, target):
        # Until the second rename, readers load `retired`; if it fails, _settle puts `retired` back.
        os.rename(target, retired)
        os.rename(staging, target)
    _sync_directory(target.parent)  # the swap is on disk before the previous directory is removed


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step; False where the platform or the file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # a C library without it (glibc before 2.28)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _sync_tree(directory: Path) -> None:
    """Flush every file under `directory`, then the directories themselves, to disk."""
    for root, _, files in os.walk(directory, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_directory(Path(root))


def _sync_directory(directory: Path) -> None:
    if os.name == "nt":  # Windows cannot open a directory to flush it
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno != errno.EINVAL:  # some file systems do not flush directories
            raise
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------- what interrupted writers left


def tidy(target: Path) -> None:
    """Finish what interrupted writers of `target` left (hold :func:`writer_lock` on it)."""
    for container in _containers(target):
        _settle(target, container)


def _containers(target: Path) -> list[Path]:
    """The staging containers of `target`: named after it, holding the marker (or empty); never anything else."""
    pattern = re.compile(re.escape(f".{target.name}.") + "[0-9a-f]{8}" + re.escape(SUFFIX))
    if not target.parent.is_dir():
        return []
    return [
        entry
        for entry in target.parent.iterdir()
        if pattern.fullmatch(entry.name)
        and entry.is_dir()
        and not entry.is_symlink()
        and ((entry / MARKER).is_file() or not any(entry.iterdir()))
    ]


def _settle(target: Path, container: Path) -> None:
    """Put a retired directory back at a missing `target`, then remove `container`, its marker last."""
    retired = container / RETIRED
    if retired.is_dir() and not os.path.lexists(target):
        os.rename(retired, target)
        _sync_directory(target.parent)
        logger.warning("Put back %r, which an interrupted save had moved aside.", str(target))
    for entry in container.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (container / MARKER).unlink(missing_ok=True)
    container.rmdir()


def readable_directory(path: str | os.PathLike) -> Path:
    """`path`, or where a save interrupted between two renames left its previous content (with a warning).

    Only where the platform has no exchange rename can `path` be missing after an interrupted save; the next writer
    puts the retired copy back.
    """
    target = Path(path)
    if os.path.lexists(target):
        return target
    retired = [container / RETIRED for container in _containers(target) if (container / RETIRED).is_dir()]
    if not retired:
        return target
    chosen = max(retired, key=lambda directory: directory.stat().st_mtime)
    message = (
        "%r is missing: a save to it was interrupted. Reading the previous version, %r; the next save puts it back."
    )
    logger.warning(message, str(target), str(chosen))
    return chosen


# --------------------------------------------------------------------------------------------------- checksums


def file_checksums(directory: Path, *, exclude: str) -> dict[str, str]:
    """The SHA-256 digest of every file in `directory` but `exclude` (the file that records them)."""
    return {
        entry.name: _sha256(entry) for entry in sorted(directory.iterdir()) if entry.is_file() and entry.name != exclude
    }


def check_checksums(directory: Path, recorded: object, *, source: Path, error: type[Exception]) -> None:
    """Raise `error`, naming the file, if a file of `directory` differs from its digest recorded in `source`.

    `recorded` is `None` in directories written before checksums were recorded; they are not checked.
    """
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not all(isinstance(value, str) for value in recorded.values()):
        raise error(f"{str(source)!r} is damaged: its checksums are not a mapping of file names to digests.")
    for name, digest in recorded.items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise error(f"{str(path)!r} is missing; {str(source)!r} lists it.")
        if _sha256(path) != digest:
            raise error(
                f"{str(path)!r} does not match its checksum in {str(source)!r}: it was damaged or changed after it "
                "was saved."
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

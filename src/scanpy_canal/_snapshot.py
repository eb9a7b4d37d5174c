"""Reading a directory that a writer may swap meanwhile, and saying in one sentence why writing one failed.

A writer replaces a directory in one step (:mod:`scanpy_canal._directories`), but a reader opens its files one by
one: between two of them, a writer may have swapped in a new save. :func:`read_consistently` notes the directory's
identity (device, inode and change time) before and after reading; when it changed, the files may belong to two
saves, and the read starts again. An error is believed only when a second read, with no swap around it, fails too.
This module uses the standard library only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from scanpy_canal._directories import DirectoryBusyError, readable_directory

logger = logging.getLogger("scanpy_canal")
T = TypeVar("T")
#: Reads started again because a writer swapped the directory, at most; a writer saving without pause could
#: otherwise keep a reader waiting forever.
MAX_SWAPS = 50
_Identity = tuple[int, int, int] | None
_BUILTIN_OS_ERRORS = {PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError, OSError}


class DirectoryChangingError(OSError):
    """A directory was replaced during every one of :data:`MAX_SWAPS` reads."""


def _identity(path: Path) -> _Identity:
    """What tells one save at `path` from the next: a new directory has a new inode and change time."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino, status.st_ctime_ns


def read_consistently(path: str | os.PathLike, read: Callable[[Path], T]) -> T:
    """``read(directory)`` from files that all belong to one save of `path`, whatever writers do meanwhile.

    `directory` is `path`, or the copy an interrupted save retired (see
    :func:`~scanpy_canal._directories.readable_directory`). A read during which `path` was replaced starts again;
    an error raised by a read with no replacement around it is raised only if a second such read raises too (the
    second error).
    """
    target = Path(path)
    failures = 0
    for _ in range(MAX_SWAPS):
        before = _identity(target)
        try:
            result = read(readable_directory(target))
        except Exception:
            if _identity(target) != before:
                _read_again(target)
                continue
            failures += 1
            if failures == 2:
                raise
            continue
        if _identity(target) == before:
            return result
        _read_again(target)
    raise DirectoryChangingError(
        f"{str(target)!r} was replaced by another save during each of {MAX_SWAPS} attempts to read it; "
        "try again once the process saving to it has paused."
    )


def _read_again(target: Path) -> None:
    logger.debug("%r was replaced during the read; reading it again.", str(target))


# ------------------------------------------------------------------------------------------- failed writes


@contextlib.contextmanager
def said_write_errors(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn an OSError of writing the directory `path` into one sentence: the path, the cause and what is left.

    `what` names the content (e.g. ``"model"``). Refusals that already say what to do (an existing path, another
    writer) pass unchanged.
    """
    target = Path(path)
    existed = os.path.lexists(target)
    try:
        yield
    except (DirectoryBusyError, FileExistsError):
        raise
    except OSError as error:
        left = f"the {what} saved there before is unchanged" if existed else f"no {what} was saved there"
        said = (type(error) if type(error) in _BUILTIN_OS_ERRORS else OSError)(
            f"Could not save the {what} to {str(target)!r}: {_cause(error)}; {left}."
        )
        said.errno = error.errno
        raise said from error


def _cause(error: OSError) -> str:
    """The cause of `error` in words: the system's for its error number, else its first line."""
    if error.errno is not None:
        return os.strerror(error.errno).lower()
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

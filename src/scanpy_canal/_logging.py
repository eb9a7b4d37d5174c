"""The ``scanpy_canal`` logger, whose threshold follows ``scanpy.settings.verbosity``.

Every module logs through ``logging.getLogger("scanpy_canal")``. Unless the application gives that logger a level of
its own, a message is shown when scanpy's verbosity at the time of the call asks for its level: warnings at
verbosity 1 (``"warning"``, scanpy's default) and above, information at 2 (``"info"``), debugging at 4 (``"debug"``);
nothing but errors at 0. Scanpy is never imported for this: before it is, its default (warnings) applies.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

LOGGER_NAME = "scanpy_canal"
#: The logger's level while it follows scanpy's verbosity; a level set by the application replaces it.
FOLLOW_SCANPY = 1
#: Loggers whose information (devices found, a litlogger tip, why fitting stopped) says nothing a CANAL user acts on.
TRAINING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
_RUNNER_NOTICE = "Exception raised during training."
#: Warnings raised while training about what CANAL does on purpose, or what only the libraries' authors can change.
TRAINING_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # a PyTorch deprecation inside Lightning's own code
    r"The number of training batches .* logging interval",  # CANAL records metrics per epoch, not per step
    r"Last batch will have a small size",  # scvi-tools' advice; CANAL has no batch normalisation
    r"early_stopping was automatically disabled",  # scvi-tools' early stopping; CANAL's own works with DDP
    r".*does not have many workers",  # the cells are tokenised in the main process on purpose
)


def verbosity_level() -> int:
    """The logging level of ``scanpy.settings.verbosity``, or WARNING (scanpy's default) while scanpy is not loaded."""
    settings = getattr(sys.modules.get("scanpy"), "settings", None)
    verbosity = getattr(settings, "verbosity", None)
    return logging.WARNING if verbosity is None else int(verbosity.level)


class _FollowScanpy(logging.Filter):
    """Drop records below scanpy's verbosity while the logger has no level of the application's."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self._logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        return self._logger.level != FOLLOW_SCANPY or record.levelno >= verbosity_level()


class _LastResort(logging.StreamHandler):
    """Print to the current ``sys.stderr`` when no other handler would show the record.

    Python's own last resort shows warnings only; this one also shows the information scanpy's verbosity asks for.
    """

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self._logger = logger
        self.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))

    @property
    def stream(self):
        """Always the current ``sys.stderr`` (notebooks and test runners replace it)."""
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if not self._other_handlers():
            super().emit(record)

    def _other_handlers(self) -> bool:
        node: logging.Logger | None = self._logger
        while node is not None:
            if any(handler is not self for handler in node.handlers):
                return True
            node = node.parent if node.propagate else None
        return False


def configure_logger() -> logging.Logger:
    """Make the ``scanpy_canal`` logger follow scanpy's verbosity (idempotent); returns the logger."""
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level == logging.NOTSET:
        logger.setLevel(FOLLOW_SCANPY)
    if not any(isinstance(f, _FollowScanpy) for f in logger.filters):
        logger.addFilter(_FollowScanpy(logger))
    if not any(isinstance(h, _LastResort) for h in logger.handlers):
        logger.addHandler(_LastResort(logger))
    return logger


@contextlib.contextmanager
def quiet_training() -> Iterator[None]:
    """Hide Lightning's information and the warnings in :data:`TRAINING_WARNINGS` while a model trains.

    They return when scanpy's verbosity is ``"debug"`` (4) or more. Warnings and errors of Lightning are always shown.
    """
    if verbosity_level() <= logging.DEBUG:
        yield
        return
    loggers = [logging.getLogger(name) for name in TRAINING_LOGGERS]
    levels = [logger.level for logger in loggers]
    stdout = sys.stdout
    with warnings.catch_warnings():
        for pattern in TRAINING_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for logger in loggers:
            logger.setLevel(max(logger.level, logging.WARNING))
        sys.stdout = _WithoutRunnerNotice(stdout)
        try:
            yield
        finally:
            sys.stdout = stdout
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


class _WithoutRunnerNotice:
    """`stream` without the line scvi-tools' TrainRunner prints on any error of a fit, which it then re-raises.

    The line, ``Exception raised during training. <class 'NameError'> ...``, names no real error; on SIGTERM it was
    the only word of a run that then exited 0.
    """

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._dropping = False

    def write(self, text: str) -> int:
        if text == _RUNNER_NOTICE:  # print() writes its arguments one by one, then the end of the line
            self._dropping = True
        if self._dropping:
            self._dropping = "\n" not in text
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

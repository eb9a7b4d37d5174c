"""The ``scanpy_canal`` logger, whose threshold follows ``scanpy.settings.verbosity``.

Every module logs through ``logging.getLogger("scanpy_canal")``. Unless the application gives that logger a level of
its own, a message is shown when scanpy's verbosity at the time of the call asks for its level: warnings at
verbosity 1 (``"warning"``, scanpy's default) and above, information at 2 (``"info"``), debugging at 4 (``"debug"``);
nothing but errors at 0. Scanpy is never imported for this: before it is, its default (warnings) applies.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "scanpy_canal"
#: The logger's level while it follows scanpy's verbosity; a level set by the application replaces it.
FOLLOW_SCANPY = 1


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

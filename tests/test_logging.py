"""The ``scanpy_canal`` logger follows scanpy's verbosity unless the application sets its level."""

import logging

import pytest
import scanpy as sc

from scanpy_canal._logging import FOLLOW_SCANPY  # importing the package configures the logger

LOGGER = logging.getLogger("scanpy_canal")


def _log_all() -> None:
    LOGGER.debug("a debug message")
    LOGGER.info("an info message")
    LOGGER.warning("a warning message")


@pytest.mark.parametrize(
    ("verbosity", "shown"),
    [
        ("error", []),
        ("warning", ["WARNING"]),
        ("info", ["INFO", "WARNING"]),
        ("hint", ["INFO", "WARNING"]),
        ("debug", ["DEBUG", "INFO", "WARNING"]),
    ],
)
def test_messages_follow_scanpy_verbosity(caplog, verbosity, shown):
    with sc.settings.verbosity.override(verbosity):
        _log_all()
    assert [record.levelname for record in caplog.records] == shown


def test_verbosity_is_read_when_a_message_is_logged(caplog):
    with sc.settings.verbosity.override("warning"):
        LOGGER.info("hidden")
        with sc.settings.verbosity.override("info"):
            LOGGER.info("shown")
    assert caplog.messages == ["shown"]


def test_a_level_set_by_the_application_wins(caplog):
    with sc.settings.verbosity.override("error"), caplog.at_level(logging.INFO, logger="scanpy_canal"):
        _log_all()
    assert [record.levelname for record in caplog.records] == ["INFO", "WARNING"]
    assert LOGGER.level == FOLLOW_SCANPY  # restored: follows scanpy again


def test_printed_to_stderr_when_logging_is_not_configured(monkeypatch, capsys):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    with sc.settings.verbosity.override("info"):
        LOGGER.info("2 of 4 genes found")
    with sc.settings.verbosity.override("warning"):
        LOGGER.info("not shown")
    assert capsys.readouterr().err == "INFO: 2 of 4 genes found\n"


def test_not_printed_twice_when_the_application_has_a_handler(capsys):
    # pytest's capture handlers sit on the root logger: the last-resort handler stays silent.
    with sc.settings.verbosity.override("info"):
        LOGGER.warning("once")
    assert "once" not in capsys.readouterr().err

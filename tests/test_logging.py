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


TRAIN_TWICE = """
import sys

import scanpy as sc
import scanpy_canal as canal
from scanpy_canal.cli import main

stream = canal.datasets.synthetic_stream(n_stages=1, n_genes=20, types_per_stage=2, cells_per_type=10, seed=0)
stream.train[0].write_h5ad("cells.h5ad")
arch = {"dim": 8, "depth": 2, "heads": 2, "dim_head": 4}
for verbosity in ("warning", "debug"):
    sc.settings.verbosity = verbosity
    for stream_ in (sys.stdout, sys.stderr):
        print(f"--- verbosity {verbosity}", file=stream_, flush=True)
    canal.CANAL.setup_anndata(stream.train[0], labels_key="cell_type")
    canal.CANAL(stream.train[0], **arch).train(max_epochs=2, accelerator="cpu")
    canal.pretrain(stream.train[0], f"encoder_{verbosity}", max_epochs=2, accelerator="cpu", **arch)
    cli_arch = [f"--{key.replace('_', '-')}={value}" for key, value in arch.items()]
    train = ["train", "cells.h5ad", "--model-dir", f"model_{verbosity}", "--labels-key", "cell_type"]
    assert main([*train, *cli_arch, "--epochs", "2", "--accelerator", "cpu"]) == 0
"""
#: What Lightning and PyTorch print while training when nobody asks for it.
CHATTER = ["litlogger", "GPU available", "TPU available", "LeafSpec", "`Trainer.fit` stopped", "━"]


@pytest.mark.slow
def test_training_is_quiet_at_default_verbosity(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", TRAIN_TWICE], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=300
    )
    (quiet_out, debug_out), (quiet_err, debug_err) = (
        text.split("--- verbosity debug") for text in (result.stdout, result.stderr)
    )
    for text in CHATTER:
        assert text not in quiet_out + quiet_err, text
    assert "GPU available" in debug_err and "LeafSpec" in debug_err  # back at verbosity "debug"
    for bar in ("Stage 1: 100%", "Pretraining: 100%"):  # one progress-bar style, on stderr, for both kinds of run
        assert result.stderr.count(bar) >= 2
    assert quiet_err.count("Stage 1: 100%") >= 2  # the command line's stage too
    assert "Training:" not in result.stdout  # scvi-tools' own bar is not used
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == ["cells.h5ad", "encoder_debug", "encoder_warning", "model_debug", "model_warning"]  # no logs


def test_a_loaded_model_trains_its_next_stage_without_a_warning(two_stage_model_dir, small_stream, recwarn):
    """``scanpy-canal train`` loads the saved model for every stage after the first: no warning may come with that."""
    from conftest import QUIET, register

    from scanpy_canal import CANAL

    model = CANAL.load(two_stage_model_dir)
    model.train(register(small_stream.test[1]), max_epochs=1, **QUIET)  # cells the bank does not hold
    assert model.stage == 3
    assert [str(warning.message) for warning in recwarn] == []

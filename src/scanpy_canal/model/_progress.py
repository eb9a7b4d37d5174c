"""The one progress bar of every training run, stages and pretraining alike: a line per run, advanced per epoch."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from tqdm import tqdm


class EpochProgressBar(ProgressBar):
    """A tqdm bar on stderr over the run's epochs, showing the epoch's `metrics` (logged names to the names shown).

    One line whatever the number of batches, and plain text, so that it reads the same in a terminal, a notebook and
    a log file. Lightning turns it off in every process but the first.
    """

    def __init__(self, description: str, metrics: Mapping[str, str]):
        super().__init__()
        self.description = description
        self.metrics = dict(metrics)
        self._enabled = True
        self._bar: tqdm | None = None

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled:
            self._bar = tqdm(total=trainer.max_epochs, desc=self.description, unit="epoch", file=sys.stderr)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is None:
            return
        logged = trainer.callback_metrics
        shown = {label: f"{float(logged[name]):.3f}" for name, label in self.metrics.items() if name in logged}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Closed now, the bar ends its line before the error is told, not after it when the process exits.
        self.on_train_end(trainer, pl_module)


def progress_callbacks(trainer_kwargs: Mapping[str, Any], description: str, metrics: Mapping[str, str]) -> list:
    """``[EpochProgressBar(...)]``, or nothing when `trainer_kwargs` turn the progress bar off."""
    if not trainer_kwargs.get("enable_progress_bar", True):
        return []
    return [EpochProgressBar(description, metrics)]

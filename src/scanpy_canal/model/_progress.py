"""The one progress bar of every training run, stages and pretraining alike, and a stage's time estimate.

The bar is a line per run advanced per batch, so that it moves (and estimates) within the first epoch; the estimate is
said once, from the first batches, before a long stage runs on.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar
from tqdm import tqdm

logger = logging.getLogger("scanpy_canal")

#: Batches timed (after a first one that warms up) to estimate how long a stage takes.
TIMED_BATCHES = 3
#: A stage expected to take longer than this (seconds) is announced as a warning, not as information.
LONG_STAGE_S = 600


class EpochProgressBar(ProgressBar):
    """A tqdm bar on stderr over the run's batches, showing the epoch and its `metrics` (logged names to names shown).

    One line whatever the number of batches, and plain text, so that it reads the same in a terminal, a notebook and
    a log file. Lightning turns it off in every process but the first.
    """

    def __init__(self, description: str, metrics: Mapping[str, str]):
        super().__init__()
        self.description = description
        self.metrics = dict(metrics)
        self._enabled = True
        self._bar: tqdm | None = None
        self._per_batch = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        batches = trainer.num_training_batches
        self._per_batch = math.isfinite(batches) and batches > 0
        total = trainer.max_epochs * (batches if self._per_batch else 1)
        unit = "batch" if self._per_batch else "epoch"
        self._bar = tqdm(total=total, desc=self.description, unit=unit, file=sys.stderr)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._bar is not None and self._per_batch:
            self._bar.update()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is None:
            return
        logged = trainer.callback_metrics
        shown = {"epoch": f"{trainer.current_epoch + 1}/{trainer.max_epochs}"}
        shown |= {label: f"{float(logged[name]):.3f}" for name, label in self.metrics.items() if name in logged}
        self._bar.set_postfix(shown, refresh=not self._per_batch)
        if not self._per_batch:
            self._bar.update()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Closed now, the bar ends its line before the error is told, not after it when the process exits.
        self.on_train_end(trainer, pl_module)


class StageTimeEstimate(Callback):
    """Say once, from the first batches, how long a stage will take at most with this encoder on this device.

    The first batch warms up; the next :data:`TIMED_BATCHES` are timed, and their mean times every batch of up to
    ``max_epochs`` epochs (validation, a forward pass over a fifth of the cells, adds a little). Information, or a
    warning from :data:`LONG_STAGE_S` on, with what would make it faster.
    """

    def __init__(self, description: str):
        self.description = description
        self._started: float | None = None
        self._batches = 0
        self._said = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._said or not trainer.is_global_zero:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        if self._started is None:
            self._started = time.perf_counter()
            return
        self._batches += 1
        last_of_epoch = self._batches + 1 >= trainer.num_training_batches
        if self._batches >= TIMED_BATCHES or last_of_epoch:
            per_batch = (time.perf_counter() - self._started) / self._batches
            self._say(trainer, pl_module, per_batch)

    def _say(self, trainer: pl.Trainer, pl_module: pl.LightningModule, per_batch: float) -> None:
        self._said = True
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return
        seconds = per_batch * batches * trainer.max_epochs
        what = (
            f"{self.description}: about {duration(seconds)} for up to {trainer.max_epochs} epochs of {batches} batches"
        )
        announce(what, seconds, per_batch, pl_module.module.network.config, pl_module.device.type)


def announce(what: str, seconds: float, per_batch: float, config: Mapping[str, Any], device: str) -> None:
    """Log an expected duration: information, or from :data:`LONG_STAGE_S` on a warning with what would be faster."""
    encoder = f"dim {config['dim']}, {config['depth']} blocks, {config['max_seq_len']:,} tokens"
    message = f"{what} ({per_batch:.2f} s per batch measured on the {device}; encoder {encoder})."
    if seconds < LONG_STAGE_S:
        logger.info(message)
        return
    advice = "A GPU, or a smaller encoder (dim=64, depth=2, heads=4, dim_head=16; --dim 64 ... on the command line)"
    if device == "cuda":
        advice = "More GPUs (devices, strategy='ddp'), fewer epochs or a smaller encoder"
    logger.warning("%s %s would be faster.", message, advice)


class PassTimer:
    """Say once, from its first batches, how long a pass of `n_cells` cells in batches of `batch_size` will take."""

    def __init__(self, n_cells: int, batch_size: int, what: str, config: Mapping[str, Any]):
        self.n_batches = math.ceil(n_cells / batch_size)
        self.what, self.config, self.n_cells = what, config, n_cells
        self._started: float | None = None
        self._done = 0

    def batch_done(self, device: torch.device) -> None:
        if self._done > TIMED_BATCHES or self.n_batches <= TIMED_BATCHES + 1:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if self._started is None:  # the first batch warms up
            self._started = time.perf_counter()
        self._done += 1
        if self._done == TIMED_BATCHES + 1:
            per_batch = (time.perf_counter() - self._started) / TIMED_BATCHES
            seconds = per_batch * self.n_batches
            what = f"{self.what} for {self.n_cells:,} cells: about {duration(seconds)}"
            announce(what, seconds, per_batch, self.config, device.type)


def duration(seconds: float) -> str:
    """``"2 h 38 min"``, ``"11 min"``, ``"40 s"``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def progress_callbacks(trainer_kwargs: Mapping[str, Any], description: str, metrics: Mapping[str, str]) -> list:
    """``[EpochProgressBar(...)]``, or nothing when `trainer_kwargs` turn the progress bar off."""
    if not trainer_kwargs.get("enable_progress_bar", True):
        return []
    return [EpochProgressBar(description, metrics)]

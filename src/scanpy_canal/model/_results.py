"""The one channel through which a training run hands its results back to the process that started it.

A spawning strategy (``ddp_spawn``) returns only the weights and ``trainer.callback_metrics`` to the main process;
everything else stays in the workers. So every result a run must return (a stage's outcome, per-epoch tables) is
written into ``callback_metrics`` as a float64 tensor under :data:`PREFIX`, and read back with :func:`received`.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import numpy as np
import torch

PREFIX = "canal_result/"


def send(trainer: pl.Trainer, name: str, value: float | np.ndarray | torch.Tensor) -> None:
    """Make `value` reach the main process as ``received(...)[name]``."""
    trainer.callback_metrics[PREFIX + name] = torch.as_tensor(value, dtype=torch.float64)


def received(callback_metrics: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything :func:`send` put into `callback_metrics`, by name (on the CPU)."""
    return {key[len(PREFIX) :]: value.cpu() for key, value in callback_metrics.items() if key.startswith(PREFIX)}

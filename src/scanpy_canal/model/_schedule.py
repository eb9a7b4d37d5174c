"""CANAL's learning-rate schedule: cosine annealing with linear warm-up and growing warm restarts, per epoch."""

from __future__ import annotations

import math

#: Epochs of the schedule's first cycle (warm-up included), and of each cycle's warm-up.
FIRST_CYCLE = 15
WARMUP = 5
#: The schedule's lowest learning rate (the peak's, if it is lower).
MIN_LR = 1e-6


def cosine_warm_restarts(
    epoch: int,
    *,
    max_lr: float = 2e-4,
    min_lr: float = 1e-6,
    first_cycle: int = FIRST_CYCLE,
    cycle_mult: float = 2.0,
    warmup: int = WARMUP,
    gamma: float = 0.9,
) -> float:
    """Learning rate for a 0-based `epoch`.

    Each cycle warms up linearly from `min_lr` over `warmup` epochs, then follows a half cosine back to `min_lr`. The
    first cycle lasts `first_cycle` epochs; the part after the warm-up grows by `cycle_mult` each cycle (15, 25, 45, ...
    epochs with the defaults) and the peak shrinks by `gamma`. Epoch 0 trains at `min_lr`, epoch 5 at `max_lr`, and
    epoch 15 starts the second cycle at `min_lr`.
    """
    cycle, length = 0, first_cycle
    while epoch >= length:
        epoch -= length
        cycle += 1
        length = int((length - warmup) * cycle_mult) + warmup
    peak = max_lr * gamma**cycle
    if epoch < warmup:
        return min_lr + (peak - min_lr) * epoch / warmup
    progress = (epoch - warmup) / (length - warmup)
    return min_lr + (peak - min_lr) * (1 + math.cos(math.pi * progress)) / 2


def one_cycle(epochs: int) -> dict[str, int]:
    """The arguments of :func:`cosine_warm_restarts` for one cycle of `epochs`, whose last epochs train at low rates.

    Its warm-up is a third of the cycle, at most :data:`WARMUP` epochs: 15 epochs are the first cycle of the default
    schedule.

    Examples
    --------
    >>> one_cycle(15)
    {'first_cycle': 15, 'warmup': 5}
    >>> one_cycle(5)
    {'first_cycle': 5, 'warmup': 1}
    """
    return {"first_cycle": epochs, "warmup": min(WARMUP, epochs // 3)}


def stage_schedule(keep_epoch: str, max_epochs: int) -> dict[str, int]:
    """A stage's arguments of :func:`cosine_warm_restarts` beyond the rates.

    :func:`one_cycle` over every epoch when the last one is kept (``keep_epoch="last"``), the default cycles otherwise.
    """
    return one_cycle(max_epochs) if keep_epoch == "last" else {}


def rate(epoch: int, lr: float, **schedule: int) -> float:
    """The learning rate of a 0-based `epoch` with peak `lr`: :func:`cosine_warm_restarts` from :data:`MIN_LR`."""
    return cosine_warm_restarts(epoch, max_lr=lr, min_lr=min(MIN_LR, lr), **schedule)

"""CANAL's learning-rate schedule: cosine annealing with linear warm-up and growing warm restarts, per epoch."""

from __future__ import annotations

import math


def cosine_warm_restarts(
    epoch: int,
    *,
    max_lr: float = 2e-4,
    min_lr: float = 1e-6,
    first_cycle: int = 15,
    cycle_mult: float = 2.0,
    warmup: int = 5,
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

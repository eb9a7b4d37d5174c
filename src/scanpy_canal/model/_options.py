"""The settings of a stage and the options of a prediction: each one typed object, checked when it is made."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

Threshold = Literal["calibrated", "canal"] | float
Precision = Literal["32", "bf16"]
_Options = TypeVar("_Options")


def from_arguments(kind: type[_Options], arguments: Mapping[str, Any]) -> _Options:
    """A `kind` (a dataclass) made of the entries of `arguments` named like its fields, e.g. a method's ``locals()``."""
    return kind(**{f.name: arguments[f.name] for f in dataclasses.fields(kind) if f.name in arguments})


def check_precision(precision: str) -> str:
    """`precision` if it is ``"32"`` or ``"bf16"``; an error otherwise."""
    if precision not in ("32", "bf16"):
        raise ValueError(f"precision must be '32' or 'bf16', got {precision!r}.")
    return precision


@dataclass(frozen=True)
class StageSettings:
    """How one stage trains; each field is the :meth:`~scanpy_canal.CANAL.train` argument of the same name."""

    max_epochs: int
    batch_size: int
    lr: float
    rehearsal_size: int
    distill_weight: float
    label_smoothing: float
    early_stopping_patience: int | None
    validation_size: float
    cache_frozen: bool | None
    precision: Precision
    accelerator: str
    devices: int | list[int] | str
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_precision(self.precision)


@dataclass(frozen=True)
class PredictOptions:
    """How cells are predicted (see :meth:`~scanpy_canal.CANAL.predict` for each option).

    One object carries the options of :meth:`~scanpy_canal.CANAL.predict`, :func:`scanpy_canal.tl.annotate` and
    ``scanpy-canal predict``. Values are checked when it is made, so a bad option fails before any cell is read.
    """

    novel: bool = False
    temperature: float = 0.8
    threshold: Threshold = "calibrated"
    batch_size: int | None = None
    seed: int = 0
    precision: Precision = "32"
    chunk_size: int = 10_000

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of cells, got {self.chunk_size}.")
        number = isinstance(self.threshold, int | float) and not isinstance(self.threshold, bool)
        if not (self.threshold in ("calibrated", "canal") or (number and 0 <= self.threshold <= 1)):
            raise ValueError(f"threshold must be 'calibrated', 'canal' or a number in [0, 1], got {self.threshold!r}.")

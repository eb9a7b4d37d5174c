"""The settings of a stage and the options of a prediction: each one typed object, checked when it is made."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Literal, TypeVar, get_args

from scanpy_canal._choices import (
    ATTENTIONS,
    FUSIONS,
    KEEP_EPOCHS,
    PRECISIONS,
    SCORES,
    Attention,
    BalanceClasses,
    Fusion,
    KeepEpoch,
    Precision,
    RepeatedCells,
    Rule,
    Score,
    Threshold,
)

from ._relations import RELATION_THRESHOLD

_Options = TypeVar("_Options")


def from_arguments(kind: type[_Options], arguments: Mapping[str, Any], *, besides: Sequence[str] = ()) -> _Options:
    """A `kind` (a dataclass) made of `arguments`, e.g. a method's ``locals()``, but for the names in `besides`.

    Every other name must be a field of `kind` (a parameter renamed in a signature is an error, not an option silently
    left at its default); the fields not given take their defaults.
    """
    options = {name: value for name, value in arguments.items() if name not in besides}
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(kind) if f.init})
    if unknown:
        raise TypeError(f"{kind.__name__} has no option {', '.join(unknown)}.")
    return kind(**options)


def check_precision(precision: str) -> str:
    """`precision` if it is ``"auto"``, ``"32"`` or ``"bf16"``; an error otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto', '32' or 'bf16', got {precision!r}.")
    return precision


@dataclass(frozen=True)
class StageSettings:
    """How one stage trains; each field is the :meth:`~scanpy_canal.CANAL.train` argument of the same name.

    The fields that are `None` by default and have a default in :data:`~scanpy_canal.model._defaults.START_DEFAULTS`
    take the one of how the encoder started (pretrained or random) before a stage is made of them.
    """

    max_epochs: int | None = None
    batch_size: int = 16
    lr: float | None = None
    rehearsal_size: int = 1000
    distill_weight: float = 0.1
    label_smoothing: float = 0.1
    balance_classes: BalanceClasses | None = None
    early_stopping_patience: int | None = 10
    keep_epoch: KeepEpoch | None = None
    validation_size: float = 0.2
    split_bank: bool = True
    calibration_size: int = 2000
    cache_frozen: bool | None = None
    precision: Precision = "auto"
    accelerator: str = "auto"
    devices: int | list[int] | str = "auto"
    repeated_cells: RepeatedCells = "warn"
    parents: Mapping[str, str] | Literal["find"] = "find"
    relation_threshold: float = RELATION_THRESHOLD
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.repeated_cells not in get_args(RepeatedCells):
            raise ValueError(f"repeated_cells must be 'warn' or 'error', got {self.repeated_cells!r}.")
        if self.parents != "find" and not (
            isinstance(self.parents, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.parents.items())
        ):
            raise TypeError(
                f"parents must be 'find' or map cell-type names to their parents' names ({{}}: none), got {self.parents!r}."
            )
        if not (_is_number(self.relation_threshold) and 0.5 < self.relation_threshold <= 1):
            raise ValueError(f"relation_threshold must be a share in (0.5, 1], got {self.relation_threshold!r}.")
        if self.balance_classes not in (True, False, "auto"):
            raise ValueError(f"balance_classes must be True, False or 'auto', got {self.balance_classes!r}.")
        if self.keep_epoch not in KEEP_EPOCHS:
            raise ValueError(f"keep_epoch must be 'best' or 'last', got {self.keep_epoch!r}.")
        if not isinstance(self.calibration_size, int) or self.calibration_size < 0:
            raise ValueError(f"calibration_size must be a number of cells, 0 or more; got {self.calibration_size!r}.")


#: The documentation of each field of :class:`StageSettings`, filled into :meth:`~scanpy_canal.CANAL.train`'s docstring.
STAGE_DOCS: dict[str, str] = {
    "max_epochs": "Upper bound on epochs. Default: 100 with pretrained weights (the original's), 15 from a random start.",
    "batch_size": "Cells per minibatch.",
    "lr": (
        "Peak learning rate of the per-epoch cosine schedule with warm restarts (epoch 1 trains at 1e-6). Default:\n"
        "2e-4 with pretrained weights (the original's), 1e-3 from a random start."
    ),
    "rehearsal_size": "Capacity of the example bank kept after this stage and replayed in the next one (0 keeps none).",
    "distill_weight": "Weight of the embedding distillation loss before the ``C_old / C_new`` factor (0 disables it).",
    "label_smoothing": "Label smoothing of the cross-entropy.",
    "balance_classes": (
        "Weight each cell type's cross-entropy by the inverse of its number of training cells (scikit-learn's\n"
        '``class_weight="balanced"``): a type replayed from the bank with a few cells counts as much as a new one\n'
        'with hundreds. ``"auto"``: only at the stages whose replayed bank is a sample of the earlier stages\'\n'
        "training cells (the bank had to choose); not at the first stage, nor where the bank holds every earlier\n"
        "cell, where the types keep their own proportions. Each stage records what it did in ``stage_history_``.\n"
        "Default: off with pretrained weights (the original), on from a random start."
    ),
    "early_stopping_patience": (
        "Stop after more than this many epochs without a better validation accuracy (`None`: never); with\n"
        '``keep_epoch="best"`` only.'
    ),
    "keep_epoch": (
        '``"best"``: keep the weights of the epoch with the best validation accuracy (ties: the lower validation\n'
        'loss), and stop early. ``"last"``: train every one of `max_epochs` along one cycle of the schedule, which\n'
        "ends at its lowest rate, and keep the last weights; on a few validation cells the best epoch is a noisy\n"
        'choice. Default: ``"best"`` with pretrained weights (the original), ``"last"`` from a random start.'
    ),
    "validation_size": (
        "Fraction of each cell type held out, in ``(0, 1)``; every type keeps one cell to train on. The stage's own\n"
        'held-out cells become calibration cells: all of them with ``keep_epoch="last"``, two thirds with\n'
        '``"best"`` (the others choose the best epoch).'
    ),
    "split_bank": (
        "Hold out part of the bank for validation too, as the original. `False`: every bank cell trains (worth it\n"
        "for a few cells per type), but early stopping then sees only the stage's types."
    ),
    "calibration_size": (
        "Capacity of the calibration cells behind novel-cell p-values: held-out cells of every stage, never trained\n"
        "on nor replayed, at most ``calibration_size // C`` per type (spread over the stages); 0 keeps none. Their\n"
        "memory cost is in :attr:`stage_history_` (``calibration_bytes``)."
    ),
    "cache_frozen": (
        "Compute the hidden states of the frozen blocks before the first trainable one once per cell and stage\n"
        "(their random features are then not redrawn). `None` (default): when those of all training cells fit in\n"
        "4 GiB. `False`: recompute them at every step, as the original."
    ),
    "precision": (
        '``"auto"``: bfloat16 autocast (Lightning\'s ``"bf16-mixed"``) where the device computes it natively (GPUs,\n'
        'CPUs with AVX-512 BF16 or AMX), float32 elsewhere; or ``"32"`` or ``"bf16"``. Before a long stage, its\n'
        "expected duration on this device is logged, from its first batches."
    ),
    "accelerator, devices": (
        'Lightning\'s; ``accelerator="gpu", devices=-1, strategy="ddp_find_unused_parameters_true"`` trains on all\n'
        "GPUs (see :doc:`/multi_gpu`)."
    ),
    "repeated_cells": (
        "Cells the model has seen, with the same observation name and values as a cell it keeps from an earlier\n"
        "stage (its example bank or calibration cells), are trained on with a warning that gives their number\n"
        '(``"warn"``), or make the stage an error (``"error"``), e.g. to catch a stage\'s data given twice.'
    ),
    "parents": (
        'Relations this stage adds to the cell-type tree. ``"find"`` (default): found from the data, where the\n'
        "known types' held-out cells spread over two or more new types that the model calls them (see\n"
        ":doc:`/refinement`); none on pbmc68k's and the synthetic stream without refinements. Or told,\n"
        '``{child: parent}`` (e.g. ``{"CD4 T": "T cell"}``), between known types and the stage\'s; ``{}`` adds\n'
        "none. A cell labelled with a type that has children is supervised by the summed probability of the type\n"
        "and its descendants, also when replayed; the tree is :attr:`cell_type_tree`."
    ),
    "relation_threshold": (
        'With ``parents="find"``: the share of a new type\'s cells the model must call one known type before the\n'
        "stage (not novel) for the new type to refine it (become its child). A new type becomes the parent of known\n"
        "types when most of its cells are called them and their held-out cells are classified as it beside their\n"
        "own kept cells."
    ),
}

#: The novelty score of the conformal rule unless another is asked for: the input space's distance, which sees cells
#: unlike any reference cell. On the leave-types-out benchmark it had the best AUROC and unknown recall of every
#: score, and fusing it with the classifier's scores lowered both (``benchmarks/leave_types_out.py``; see the
#: "Annotation quality" page).
DEFAULT_SCORE: Score = "input"
#: The score used instead of :data:`DEFAULT_SCORE` by a model saved before there was an input space.
FALLBACK_SCORE: Score = "energy"
#: Smallest share of a type's subtree probability its most probable child must hold for a prediction to go down to it
#: (see :func:`~scanpy_canal.model._tree.decode`). On ``benchmarks/refinement.py`` (seed 0), 0.5 gave the best fine
#: accuracy, the fewest cells left at the coarse name and the fewest unrelated cells called it of 0.5 to 0.9.
REFINE_THRESHOLD = 0.5


@dataclass(frozen=True)
class PredictOptions:
    """How cells are predicted (see :meth:`~scanpy_canal.CANAL.predict` for each option).

    One object carries the options of :meth:`~scanpy_canal.CANAL.predict`, :func:`scanpy_canal.tl.annotate` and
    ``scanpy-canal predict``. Values are checked when it is made, so a bad option fails before any cell is read.
    """

    novel: bool = False
    temperature: float = 0.8
    threshold: Threshold = "conformal"
    alpha: float = 0.05
    #: `None`: :data:`DEFAULT_SCORE` for the conformal rule, ``"mix"`` for the others (their scale is the mix's).
    #: Several scores (conformal rule only) are fused through their p-values; one given in a sequence is that score.
    score: Score | Sequence[Score] | None = None
    fusion: Fusion = "bonferroni"
    batch_size: int | None = None
    seed: int = 0
    precision: Precision = "auto"
    chunk_size: int = 10_000
    gene_symbols: str | None = None
    min_gene_overlap: float = 0.1
    mod: str = "rna"
    attention: Attention = "favor"
    #: `None`: compiled on a GPU for queries of ``AUTO_COMPILE_CELLS`` cells or more.
    compile: bool | None = None
    #: `None`: in this process, on the model's device; else Lightning's devices (with `strategy`).
    devices: int | list[int] | str | None = None
    strategy: str = "auto"
    refine_threshold: float = REFINE_THRESHOLD
    #: Whether `score` was left to its default (a model without an input space then falls back on the energy).
    default_score: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be 'favor' or 'exact', got {self.attention!r}.")
        if self.compile not in (None, True, False):
            raise ValueError(f"compile must be True, False or None, got {self.compile!r}.")
        if not (_is_number(self.refine_threshold) and 0.5 <= self.refine_threshold <= 1):
            raise ValueError(f"refine_threshold must be a share in [0.5, 1], got {self.refine_threshold!r}.")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of cells, got {self.chunk_size}.")
        if not (_is_number(self.min_gene_overlap) and 0 <= self.min_gene_overlap <= 1):
            raise ValueError(f"min_gene_overlap must be a fraction in [0, 1], got {self.min_gene_overlap!r}.")
        if not (_is_number(self.alpha) and 0 < self.alpha < 1):
            raise ValueError(f"alpha must be a number strictly between 0 and 1, got {self.alpha!r}.")
        object.__setattr__(self, "default_score", self.score is None)
        object.__setattr__(self, "score", _checked_score(self.score, self.threshold))
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be 'scaled' or 'bonferroni', got {self.fusion!r}.")
        if _is_number(self.threshold):
            if not math.isfinite(self.threshold) or (self.score == "mix" and not 0 <= self.threshold <= 1):
                raise ValueError(
                    f"threshold must be a finite number, in [0, 1] for the 'mix' score; got {self.threshold!r}."
                )
        elif self.threshold not in get_args(Rule):
            raise ValueError(
                f"threshold must be 'conformal', 'calibrated', 'canal' or a number, got {self.threshold!r}."
            )
        elif self.threshold in ("calibrated", "canal") and self.score != "mix":
            raise ValueError(f"threshold={self.threshold!r} is a rule of the 'mix' score, not of {self.score!r}.")

    @property
    def scores(self) -> tuple[Score, ...]:
        """The novelty scores, one or several (fused)."""
        return (self.score,) if isinstance(self.score, str) else self.score


def _checked_score(score: Any, threshold: Threshold) -> Score | tuple[Score, ...]:
    """`score` as one name or a tuple of several; the default for `threshold` when `None`; an error if unknown."""
    if score is None:
        return DEFAULT_SCORE if threshold == "conformal" else "mix"
    names = (score,) if isinstance(score, str) else tuple(score) if isinstance(score, Sequence) else (score,)
    unknown = [name for name in names if name not in SCORES]
    if unknown or not names:
        raise ValueError(f"score must be one of {', '.join(map(repr, SCORES))}, or a sequence of them; got {score!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"score names a score twice: {score!r}.")
    if len(names) > 1 and threshold != "conformal":
        raise ValueError(
            f"Several scores are fused through conformal p-values: use threshold='conformal', not {threshold!r}."
        )
    return names[0] if len(names) == 1 else names


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)

"""The values an option may take: each a ``Literal`` type, written once, and the tuple of its values.

The model checks options against them, :mod:`scanpy_canal.tl` annotates with them and the command line offers them
as choices. Below every package and free of torch, so that ``scanpy-canal --help`` loads no model code.
"""

from __future__ import annotations

from typing import Literal, get_args

#: The novelty scores, computed in ``model._scores`` (a new score: its name here, its computation there).
Score = Literal["mix", "energy", "max_probability", "knn", "mahalanobis", "input"]
SCORES: tuple[str, ...] = get_args(Score)
#: The named rules of ``threshold``; a number is a threshold too.
Rule = Literal["conformal", "calibrated", "canal"]
Threshold = Rule | float
Precision = Literal["auto", "32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
#: How several novelty scores make one p-value.
Fusion = Literal["scaled", "bonferroni"]
FUSIONS: tuple[str, ...] = get_args(Fusion)
Attention = Literal["favor", "exact"]
ATTENTIONS: tuple[str, ...] = get_args(Attention)
#: How the ``"input"`` novelty score's space treats the genes (``model._input_space``).
InputSpace = Literal["centred", "standardised"]
INPUT_SPACES: tuple[str, ...] = get_args(InputSpace)
#: Which epoch's weights a stage keeps: the best on the validation cells, or the last of one cycle of the schedule.
KeepEpoch = Literal["best", "last"]
KEEP_EPOCHS: tuple[str, ...] = get_args(KeepEpoch)
#: Whether a stage weighs each cell type the same in its loss: always, never, or where the bank it replays is a sample
#: of the earlier stages' cells (``"auto"``).
BalanceClasses = bool | Literal["auto"]
#: What a stage does with cells the model has seen before.
RepeatedCells = Literal["warn", "error"]

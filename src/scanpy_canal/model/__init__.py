"""The CANAL model on scvi-tools: module, training plan, example bank, novel-cell detection and pretraining."""

from ._inference import UNASSIGNED
from ._model import CANAL
from ._module import CANALModule
from ._pretrain import PretrainingPlan, pretrain
from ._training_plan import BestEpochEarlyStopping, CANALTrainingPlan

__all__ = [
    "CANAL",
    "CANALModule",
    "CANALTrainingPlan",
    "BestEpochEarlyStopping",
    "PretrainingPlan",
    "UNASSIGNED",
    "pretrain",
]

"""The CANAL model on scvi-tools: module, training plan, example bank and novel-cell detection."""

from ._model import CANAL, UNASSIGNED
from ._module import CANALModule
from ._training_plan import BestEpochEarlyStopping, CANALTrainingPlan

__all__ = ["CANAL", "CANALModule", "CANALTrainingPlan", "BestEpochEarlyStopping", "UNASSIGNED"]

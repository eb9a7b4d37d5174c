"""The CANAL model on scvi-tools: module, training plan, example bank, novel-cell detection and pretraining."""

from ._data import highly_variable_genes, modality
from ._inference import UNASSIGNED, Outputs
from ._model import CANAL
from ._module import CANALModule, stage_loss
from ._options import PredictOptions, StageSettings, from_arguments
from ._pretrain import PretrainingPlan, pretrain
from ._training_plan import BestEpochEarlyStopping, CANALTrainingPlan

# The other names imported here are this package's interface to the layers above it (see docs/code_map.md);
# the user's API is `__all__`.
__all__ = [
    "CANAL",
    "CANALModule",
    "CANALTrainingPlan",
    "Outputs",
    "PredictOptions",
    "BestEpochEarlyStopping",
    "PretrainingPlan",
    "UNASSIGNED",
    "pretrain",
]

"""Pure-PyTorch building blocks: the scBERT Performer encoder, the CANAL head, tokens and checkpoint import."""

from ._checkpoint import CheckpointError, encoder_from_state_dict, load_scbert_checkpoint, read_state_dict
from ._head import CANALHead, set_trainable
from ._performer import SCBERT_CONFIG, PerformerLM
from ._tokenize import N_BINS, tokenize

__all__ = [
    "CANALHead",
    "CheckpointError",
    "N_BINS",
    "PerformerLM",
    "SCBERT_CONFIG",
    "encoder_from_state_dict",
    "load_scbert_checkpoint",
    "read_state_dict",
    "set_trainable",
    "tokenize",
]

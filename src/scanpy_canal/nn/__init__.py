"""Pure-PyTorch building blocks: the scBERT Performer encoder, the CANAL head, tokens and checkpoint import."""

from ._checkpoint import CheckpointError, load_scbert_checkpoint
from ._head import CANALHead, set_trainable
from ._performer import SCBERT_CONFIG, PerformerLM
from ._tokenize import N_BINS, tokenize

__all__ = [
    "CANALHead",
    "CheckpointError",
    "N_BINS",
    "PerformerLM",
    "SCBERT_CONFIG",
    "load_scbert_checkpoint",
    "set_trainable",
    "tokenize",
]

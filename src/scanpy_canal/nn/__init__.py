"""Pure-PyTorch building blocks: the scBERT Performer encoder, the CANAL head, tokens, masking and checkpoints."""

from ._attention import exact_attention, favor_kernel
from ._checkpoint import (
    CheckpointError,
    encoder_from_state_dict,
    infer_config,
    load_scbert_checkpoint,
    load_weights,
    read_state_dict,
)
from ._gene_embedding import coexpression_embedding
from ._head import CANALHead, frozen_prefix, set_trainable
from ._masking import IGNORE_INDEX, MASK_TOKEN, mask_tokens, masked_accuracy_counts, masked_lm_loss
from ._performer import SCBERT_CONFIG, PerformerLM, order_token_embedding
from ._pretrained import (
    GENES_FILE,
    check_destination,
    load_pretrained,
    read_json,
    read_vocabulary,
    save_pretrained,
    staged_directory,
    write_pretrained,
)
from ._tokenize import N_BINS, tokenize

# The other names imported here are this package's interface to the layers above it (see docs/code_map.md);
# the user's API is `__all__`.
__all__ = [
    "CANALHead",
    "CheckpointError",
    "IGNORE_INDEX",
    "MASK_TOKEN",
    "N_BINS",
    "PerformerLM",
    "SCBERT_CONFIG",
    "encoder_from_state_dict",
    "exact_attention",
    "favor_kernel",
    "frozen_prefix",
    "load_pretrained",
    "load_scbert_checkpoint",
    "mask_tokens",
    "masked_accuracy_counts",
    "masked_lm_loss",
    "order_token_embedding",
    "read_state_dict",
    "read_vocabulary",
    "save_pretrained",
    "set_trainable",
    "tokenize",
]

"""Reading scBERT checkpoints (``panglao_pretrain.pth``) without unpickling arbitrary objects."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ._performer import PerformerLM

_BLOCK = "performer.net.layers.{}"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, or its weights do not fit the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the model weights of a scBERT-format checkpoint with ``torch.load(weights_only=True)``.

    Accepts a dict with ``model_state_dict`` (scBERT's format; optimizer and scheduler entries are ignored) or a bare
    state dict. Floating tensors are cast to float32 (gene2vec tables are sometimes stored as float64).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist.")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"Could not read checkpoint {str(path)!r}: the file is truncated, is not a PyTorch checkpoint, or holds "
            f"objects other than tensors ({type(error).__name__}: {error})."
        ) from error
    state = content.get("model_state_dict", content) if isinstance(content, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"Checkpoint {str(path)!r} holds no state dict of tensors (no 'model_state_dict').")
    return {key: value.float() if value.is_floating_point() else value for key, value in state.items()}


def infer_config(state: dict[str, torch.Tensor], *, source: str = "state dict") -> dict[str, int]:
    """The `PerformerLM` architecture that produced `state`, read off the tensor shapes."""

    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"{source} has no key {key!r}; it is not a scBERT PerformerLM checkpoint.")
        return state[key]

    num_tokens, dim = get("token_emb.weight").shape
    projection = get(f"{_BLOCK.format(0)}.0.fn.fast_attention.projection_matrix")
    nb_features, dim_head = projection.shape
    inner_dim = get(f"{_BLOCK.format(0)}.0.fn.to_q.weight").shape[0]
    ff_hidden = get(f"{_BLOCK.format(0)}.1.fn.fn.w1.weight").shape[0]
    depth = 1 + max(int(key.split(".")[3]) for key in state if key.startswith("performer.net.layers."))
    return {
        "num_tokens": int(num_tokens),
        "max_seq_len": int(get("pos_emb.emb.weight").shape[0]),
        "dim": int(dim),
        "depth": depth,
        "heads": inner_dim // dim_head,
        "dim_head": int(dim_head),
        "nb_features": int(nb_features),
        "ff_mult": ff_hidden // dim,
    }


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict(strict=True)`` with errors that name the source and the offending key."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise CheckpointError(f"{source} is missing the key {key!r}.")
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(state[key].shape)}, the model expects {tuple(tensor.shape)}."
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source} has keys the model does not: {unexpected[:5]}.")
    model.load_state_dict(state, strict=True)


def select_gene_rows(state: dict[str, torch.Tensor], gene_indices: Sequence[int], *, source: str) -> None:
    """Keep the positional rows of `gene_indices` plus the appended token's zero row (in place)."""
    table = state["pos_emb.emb.weight"]
    n_genes = table.shape[0] - 1
    indices = np.asarray(gene_indices, dtype=np.int64)
    if indices.ndim != 1 or indices.size == 0:
        raise ValueError("gene_indices must be a non-empty one-dimensional sequence of integers.")
    if indices.min() < 0 or indices.max() >= n_genes:
        raise IndexError(f"gene_indices must lie in [0, {n_genes}) for {source}, which has {n_genes} genes.")
    state["pos_emb.emb.weight"] = table[torch.from_numpy(np.append(indices, n_genes))]


def encoder_from_state_dict(
    state: dict[str, torch.Tensor], gene_indices: Sequence[int] | None = None, *, source: str = "state dict"
) -> PerformerLM:
    """Build a `PerformerLM` from scBERT-format weights; see :func:`load_scbert_checkpoint`."""
    state = dict(state)
    config = infer_config(state, source=source)
    if gene_indices is not None:
        select_gene_rows(state, gene_indices, source=source)
        config["max_seq_len"] = state["pos_emb.emb.weight"].shape[0]
    model = PerformerLM(**config)
    load_weights(model, state, source=source)
    return model.eval()


def load_scbert_checkpoint(path: str | os.PathLike, gene_indices: Sequence[int] | None = None) -> PerformerLM:
    """Build a `PerformerLM` from a scBERT checkpoint such as ``panglao_pretrain.pth``.

    The architecture is read from the tensor shapes, the weights are loaded with ``strict=True`` and the file is read
    with ``torch.load(weights_only=True)``, so no code in it can run.

    Parameters
    ----------
    path
        The checkpoint: a dict with ``model_state_dict`` (scBERT's format) or a bare state dict.
    gene_indices
        Positions (rows of the gene table, i.e. indices into the checkpoint's gene list) to keep, in the order the
        model will see them. The appended token's zero row is added at the end, so the model's sequence length is
        ``len(gene_indices) + 1``. `None` keeps every gene.

    Returns
    -------
    The encoder in eval mode, with scBERT's per-token output head.

    Examples
    --------
    >>> lm = load_scbert_checkpoint("panglao_pretrain.pth", gene_indices=[5, 17, 230])  # doctest: +SKIP
    >>> lm.max_seq_len  # doctest: +SKIP
    4
    """
    return encoder_from_state_dict(read_state_dict(path), gene_indices, source=f"Checkpoint {str(path)!r}")

"""The CANAL classification head and the choice of trainable parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._performer import PerformerLM


class CANALHead(nn.Module):
    """Maps final hidden states to ``(manifold, embedding, logits)``.

    A shared linear map scores every token (``conv1``, kept as scBERT's 1 x dim convolution so CANAL checkpoints load),
    the ``seq_len`` scores go through ``fc1`` (the 128-d "manifold"), ``fc2`` (the 64-d non-negative "embedding") and
    ``fc3`` (one logit per cell type).

    Parameters
    ----------
    seq_len
        Sequence length including the appended token.
    dim
        Hidden width of the encoder.
    n_classes
        Number of cell types.
    manifold_dim
        Width of ``fc1``.
    embedding_dim
        Width of ``fc2``, the embedding used for distillation and the example bank.
    dropout
        Dropout after ``fc1`` and ``fc2`` (0 in CANAL).
    """

    def __init__(
        self,
        seq_len: int,
        dim: int,
        n_classes: int,
        *,
        manifold_dim: int = 128,
        embedding_dim: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, kernel_size=(1, dim))
        self.fc1 = nn.Linear(seq_len, manifold_dim)
        self.fc2 = nn.Linear(manifold_dim, embedding_dim)
        self.fc3 = nn.Linear(embedding_dim, n_classes)
        self.dropout = nn.Dropout(dropout)

    @property
    def n_classes(self) -> int:
        """Number of output rows (cell types)."""
        return self.fc3.out_features

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = F.relu(F.linear(hidden, self.conv1.weight.view(1, -1), self.conv1.bias)).squeeze(-1)
        manifold = self.dropout(F.relu(self.fc1(scores)))
        embedding, logits = self.classify(manifold)
        return manifold, embedding, logits

    def classify(self, manifold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding, logits)`` from manifold vectors."""
        embedding = self.dropout(F.relu(self.fc2(manifold)))
        return embedding, self.fc3(embedding)

    @torch.no_grad()
    def read_bins(self, token_weight: torch.Tensor) -> None:
        """Point the per-gene score along the ordered bins of `token_weight` (a ``token_init="ordinal"`` embedding).

        Its bins (every row but the last) lie along one direction; scoring along it, a gene scores higher the higher
        its expression bin from the start, rather than along a random direction of the normalised hidden state. The
        direction is that from the first bin to the last, centred as the final LayerNorm centres its input, with
        unit norm; the bias is zero.
        """
        direction = token_weight[-2] - token_weight[0]
        direction = direction - direction.mean()
        self.conv1.weight.copy_((direction / direction.norm()).view_as(self.conv1.weight))
        self.conv1.bias.zero_()

    @torch.no_grad()
    def add_classes(self, n_new: int) -> None:
        """Append `n_new` freshly initialised output rows; the existing rows keep their weights and order."""
        if n_new < 0:
            raise ValueError(f"n_new must be non-negative, got {n_new}.")
        old = self.fc3
        new = nn.Linear(old.in_features, old.out_features + n_new, device=old.weight.device, dtype=old.weight.dtype)
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
        new.requires_grad_(old.weight.requires_grad)
        self.fc3 = new


def set_trainable(
    model: PerformerLM, *, blocks: Sequence[int] = (-2,), norm: bool = True, head: bool = True
) -> list[str]:
    """Freeze `model` except the given blocks, the final LayerNorm and the output head.

    CANAL (after scBERT) trains the final LayerNorm, the block at index ``depth - 2`` and the head; the token embedding,
    the gene table and every other block stay frozen.

    Parameters
    ----------
    model
        The encoder, with its head installed as ``model.to_out``.
    blocks
        Indices into ``model.performer.net.layers`` to train (negative indices count from the end).
    norm
        Train the final LayerNorm.
    head
        Train ``model.to_out``.

    Returns
    -------
    The names of the trainable parameters.
    """
    layers = model.performer.net.layers
    model.requires_grad_(False)
    for index in blocks:
        if not -len(layers) <= index < len(layers):
            raise IndexError(f"block {index} does not exist: the model has {len(layers)} blocks.")
        layers[index].requires_grad_(True)
    model.norm.requires_grad_(norm)
    model.to_out.requires_grad_(head)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def frozen_prefix(model: PerformerLM) -> int:
    """Number of leading blocks that, like the embeddings before them, have no trainable parameter.

    Their output does not change while the model trains, so it can be computed once per cell
    (:meth:`PerformerLM.hidden_states`) and training can continue from it (:meth:`PerformerLM.forward_from`).
    """
    if any(parameter.requires_grad for parameter in model.token_emb.parameters()):
        return 0
    layers = model.performer.net.layers
    trainable = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
    return min(trainable, default=len(layers))

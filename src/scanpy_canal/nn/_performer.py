"""The scBERT encoder: Performer blocks (FAVOR+ attention, see ``_attention``) over binned expression tokens.

Module and attribute names follow scBERT's checkpoints (``performer.net.layers.{i}.0.fn.to_q.weight`` and so on), so a
published ``panglao_pretrain.pth`` loads with ``strict=True`` and no renaming.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import SelfAttention

#: The configuration of scBERT's published checkpoint (``panglao_pretrain.pth``).
SCBERT_CONFIG: dict[str, Any] = {
    "num_tokens": 7,
    "max_seq_len": 16907,
    "dim": 200,
    "depth": 6,
    "heads": 10,
    "dim_head": 64,
}


class FeedForward(nn.Module):
    """Position-wise ``w2(GELU(w1(x)))``."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, dim * mult)
        self.w2 = nn.Linear(dim * mult, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.dropout(F.gelu(self.w1(x))))


class SequenceChunks(nn.Module):
    """Apply a position-wise module to ``chunks`` slices of the sequence, bounding peak memory on long inputs."""

    def __init__(self, fn: nn.Module, chunks: int = 1):
        super().__init__()
        self.fn = fn
        self.chunks = chunks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunks == 1:
            return self.fn(x)
        return torch.cat([self.fn(part) for part in x.chunk(self.chunks, dim=1)], dim=1)


class PreLayerNorm(nn.Module):
    """``fn(LayerNorm(x))``."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class ResidualBlocks(nn.Module):
    """Blocks of ``x + attention(x)`` then ``x + feed_forward(x)``, runnable over a slice of the blocks."""

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for attention, feed_forward in self.layers[start:stop]:
            x = x + attention(x)
            x = x + feed_forward(x)
        return x


class Performer(nn.Module):
    """A stack of Performer blocks that redraws its random features every ``feature_redraw_interval`` training calls.

    The call counter is the buffer ``calls_since_last_redraw``, so it is saved and restored with the weights. In eval
    mode nothing is redrawn and outputs are deterministic. Blocks before ``redraw_from`` (0: none) keep their features,
    so that the hidden states of a frozen prefix of blocks can be computed once and reused.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        heads: int,
        dim_head: int,
        nb_features: int | None = None,
        feature_redraw_interval: int | None = 1000,
        local_attn_heads: int = 0,
        local_window_size: int = 256,
        ff_mult: int = 4,
        ff_chunks: int = 1,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        qkv_bias: bool = False,
    ):
        super().__init__()
        layers = nn.ModuleList()
        for _ in range(depth):
            attention = SelfAttention(
                dim,
                heads=heads,
                dim_head=dim_head,
                nb_features=nb_features,
                local_heads=local_attn_heads,
                local_window_size=local_window_size,
                dropout=attn_dropout,
                qkv_bias=qkv_bias,
            )
            feed_forward = SequenceChunks(FeedForward(dim, mult=ff_mult, dropout=ff_dropout), ff_chunks)
            layers.append(nn.ModuleList([PreLayerNorm(dim, attention), PreLayerNorm(dim, feed_forward)]))
        self.net = ResidualBlocks(layers)
        self.feature_redraw_interval = feature_redraw_interval
        self.redraw_from = 0
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    @torch.no_grad()
    def zero_residual_branches(self) -> None:
        """Zero the last projection of every branch: each block then starts as the identity."""
        for attention, feed_forward in self.net.layers:
            for last in (attention.fn.to_out, feed_forward.fn.fn.w2):
                last.weight.zero_()
                last.bias.zero_()

    def redraw_features(self) -> None:
        """Redraw the random features of the blocks from ``redraw_from`` on, frozen ones included (scBERT: all)."""
        for attention, _ in self.net.layers[self.redraw_from :]:
            attention.fn.fast_attention.redraw_projection_matrix()
        self.calls_since_last_redraw.zero_()

    def count_call(self) -> None:
        """Count one training call; redraw the features once ``feature_redraw_interval`` calls have passed."""
        if not self.training or self.feature_redraw_interval is None:
            return
        if self.calls_since_last_redraw.item() >= self.feature_redraw_interval:
            self.redraw_features()
        else:
            self.calls_since_last_redraw += 1

    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        self.count_call()
        return self.net(x, start, stop)


#: Distance between the embeddings of consecutive expression bins, per ``sqrt(dim)`` (a standard normal row's norm).
ORDINAL_STEP = 0.5
#: Weight of each bin's random start in its ordinal embedding.
ORDINAL_NOISE = 0.3


@torch.no_grad()
def order_token_embedding(weight: torch.Tensor, step: float = ORDINAL_STEP) -> None:
    """Space the expression-bin rows of a token embedding evenly along one direction, in place.

    Row ``k`` of the bins (every row but the last, the mask token) becomes ``k * step * sqrt(dim) * direction``
    (a unit direction) plus :data:`ORDINAL_NOISE` times its random start; `step` defaults to :data:`ORDINAL_STEP`. The direction is that from
    the first bin's random row to the last one's, so no random number is drawn and the layers built after the
    embedding get the same weights as with a standard normal start. With bins that are random vectors, as scBERT
    starts, a model trained from random weights on a few hundred cells has to learn the order of the bins first.
    """
    n_bins = weight.shape[0] - 1
    direction = weight[n_bins - 1] - weight[0]
    direction *= step * math.sqrt(weight.shape[1]) / direction.norm()
    steps = torch.arange(n_bins, dtype=weight.dtype, device=weight.device)[:, None]
    weight[:n_bins] = steps * direction + ORDINAL_NOISE * weight[:n_bins]


class GenePositionalEmbedding(nn.Module):
    """A frozen table with one vector per gene position (gene2vec in scBERT); the appended token's row is zero."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        self.emb.weight.requires_grad_(False)
        with torch.no_grad():
            self.emb.weight[-1].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.emb.weight[: tokens.shape[1]]


class PerformerLM(nn.Module):
    """The scBERT language model: token and gene embeddings, Performer blocks, final LayerNorm and an output head.

    Parameters
    ----------
    num_tokens
        Vocabulary size: expression bins plus the mask token (7 for scBERT: bins 0-5 and mask 6).
    max_seq_len
        Number of gene positions including the appended token (16907 for scBERT's panglao genes).
    dim
        Hidden width (200, the gene2vec dimension).
    depth
        Number of blocks.
    heads
        Attention heads per block.
    dim_head
        Width of one head; queries, keys and values project ``dim`` to ``heads * dim_head``.
    nb_features
        Random features per head; ``int(dim_head * ln(dim_head))`` when `None`.
    feature_redraw_interval
        Training calls between redraws of the random features; `None` never redraws.
    local_attn_heads
        Heads that use windowed local attention (the ``local-attention`` package) instead of FAVOR+.
    local_window_size
        Window of the local heads.
    ff_mult
        Feed-forward expansion factor.
    ff_chunks
        Evaluate the feed-forward in this many slices of the sequence to save memory.
    emb_dropout, ff_dropout, attn_dropout
        Dropout rates (all 0 in scBERT).
    qkv_bias
        Whether the query, key and value projections have a bias (scBERT: no).
    token_init
        Start of the token embedding. ``"ordinal"``: the expression bins (every token but the last, the mask) are
        spaced evenly along one direction, plus a little of their random start
        (:func:`~scanpy_canal.nn.order_token_embedding`), so that a model trained from random weights can read
        expression levels from the start. ``"normal"``: PyTorch's standard normal rows, as in scBERT. Either way,
        pretrained weights replace it.
    bin_step
        With ``token_init="ordinal"``: distance between consecutive bins, per ``sqrt(dim)``.
    residual_init
        ``"zero"``: the last projection of every attention and feed-forward branch starts at zero, so each block
        starts as the identity and a block that never trains stays one; ``"normal"``: PyTorch's default, as in
        scBERT. The state dict's keys and shapes are the same either way.

    Examples
    --------
    >>> import torch, scanpy_canal as canal
    >>> lm = canal.nn.PerformerLM(max_seq_len=11, dim=16, depth=2, heads=2, dim_head=8)
    >>> tokens = torch.randint(0, 6, (3, 11))
    >>> lm(tokens).shape, lm.encode(tokens).shape
    (torch.Size([3, 11, 7]), torch.Size([3, 11, 16]))
    """

    def __init__(
        self,
        *,
        num_tokens: int = 7,
        max_seq_len: int = 16907,
        dim: int = 200,
        depth: int = 6,
        heads: int = 10,
        dim_head: int = 64,
        nb_features: int | None = None,
        feature_redraw_interval: int | None = 1000,
        local_attn_heads: int = 0,
        local_window_size: int = 256,
        ff_mult: int = 4,
        ff_chunks: int = 1,
        emb_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        qkv_bias: bool = False,
        token_init: Literal["ordinal", "normal"] = "ordinal",
        bin_step: float = ORDINAL_STEP,
        residual_init: Literal["normal", "zero"] = "normal",
    ):
        super().__init__()
        if token_init not in ("ordinal", "normal"):
            raise ValueError(f"token_init must be 'ordinal' or 'normal', got {token_init!r}.")
        if residual_init not in ("normal", "zero"):
            raise ValueError(f"residual_init must be 'normal' or 'zero', got {residual_init!r}.")
        if not bin_step > 0:
            raise ValueError(f"bin_step must be positive, got {bin_step!r}.")
        self.config = {
            "num_tokens": num_tokens,
            "max_seq_len": max_seq_len,
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "dim_head": dim_head,
            "nb_features": nb_features or int(dim_head * math.log(dim_head)),
            "feature_redraw_interval": feature_redraw_interval,
            "local_attn_heads": local_attn_heads,
            "local_window_size": local_window_size,
            "ff_mult": ff_mult,
            "ff_chunks": ff_chunks,
            "emb_dropout": emb_dropout,
            "ff_dropout": ff_dropout,
            "attn_dropout": attn_dropout,
            "qkv_bias": qkv_bias,
            "token_init": token_init,
            "bin_step": bin_step,
            "residual_init": residual_init,
        }
        self.token_emb = nn.Embedding(num_tokens, dim)
        if token_init == "ordinal":
            order_token_embedding(self.token_emb.weight, bin_step)
        self.pos_emb = GenePositionalEmbedding(dim, max_seq_len)
        self.dropout = nn.Dropout(emb_dropout)
        self.performer = Performer(
            dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            nb_features=nb_features,
            feature_redraw_interval=feature_redraw_interval,
            local_attn_heads=local_attn_heads,
            local_window_size=local_window_size,
            ff_mult=ff_mult,
            ff_chunks=ff_chunks,
            ff_dropout=ff_dropout,
            attn_dropout=attn_dropout,
            qkv_bias=qkv_bias,
        )
        if residual_init == "zero":
            self.performer.zero_residual_branches()
        self.norm = nn.LayerNorm(dim)
        self.to_out: nn.Module = nn.Linear(dim, num_tokens)

    @property
    def max_seq_len(self) -> int:
        """Number of positions, including the appended token."""
        return self.pos_emb.emb.num_embeddings

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token plus positional embeddings, ``(batch, seq, dim)``."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}.")
        if tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"tokens have {tokens.shape[1]} positions but the model has only {self.max_seq_len}.")
        return self.dropout(self.token_emb(tokens) + self.pos_emb(tokens))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-LayerNorm hidden states, ``(batch, seq, dim)``."""
        return self.norm(self.performer(self.embed(tokens)))

    def hidden_states(self, tokens: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """The embeddings passed through the first `stop` blocks (all when `None`), before the final LayerNorm.

        Counts no training call, so it never redraws random features: use it for blocks that do not learn.
        """
        return self.performer.net(self.embed(tokens), 0, stop)

    def forward_from(self, hidden: torch.Tensor, start: int = 0) -> Any:
        """Continue from the hidden states before block `start` (see :meth:`hidden_states`) to the output head."""
        return self.to_out(self.norm(self.performer(hidden, start)))

    def forward(self, tokens: torch.Tensor) -> Any:
        """The output head on the hidden states: per-token logits ``(batch, seq, num_tokens)`` for the LM head."""
        return self.forward_from(self.embed(tokens))

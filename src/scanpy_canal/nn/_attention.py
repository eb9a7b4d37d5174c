"""FAVOR+ attention (Performer): orthogonal random features, the fused kernel, its reference, and the modules.

The key stabiliser's maximum is taken per sample, so a batch gives the same output as its cells one by one.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def orthogonal_random_features(
    n_features: int, dim_head: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw the FAVOR+ projection: stacked orthogonal blocks whose rows are scaled by chi-distributed norms.

    Parameters
    ----------
    n_features
        Number of random features (rows).
    dim_head
        Dimension of a query or key (columns).
    generator
        Source of randomness; the global generator when `None`.

    Returns
    -------
    A float32 tensor of shape ``(n_features, dim_head)`` on the CPU.
    """
    n_blocks = math.ceil(n_features / dim_head)
    blocks = []
    for _ in range(n_blocks):
        q, _ = torch.linalg.qr(torch.randn(dim_head, dim_head, generator=generator))
        blocks.append(q.T)
    matrix = torch.cat(blocks)[:n_features]
    norms = torch.randn(n_features, dim_head, generator=generator).norm(dim=1)
    return norms[:, None] * matrix


#: Feature-map elements per CPU attention chunk: a chunk's maps then stay in the last-level cache.
CPU_FEATURE_MAP_CHUNK = 4_000_000


def favor_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, *, eps: float = 1e-4
) -> torch.Tensor:
    """Non-causal FAVOR+ attention with positive random features, ``D^-1 phi(q) (phi(k)^T v)``.

    ``q``, ``k`` and ``v`` have shape ``(batch, heads, seq, dim_head)``; ``projection`` is ``(features, dim_head)``.
    With ``a = dim_head^-1/4`` and ``dash = (a x) projection^T``, the features are
    ``phi(x) = exp(dash - a^2 |x|^2 / 2 - max) + eps`` (scBERT's, up to a constant factor that cancels in ``D^-1``).
    The exponent is stabilised by its maximum: per query row for queries, and per sample (over heads, positions and
    features) for keys, so that a cell's output never depends on the other cells in its batch.

    The computation is arranged to touch the large ``(batch, heads, seq, features)`` maps as few times as possible:
    the maps are shifted and exponentiated in place, the ``+ eps`` is applied through the small products it enters,
    and the normaliser ``phi(q) . sum_n phi(k_n)`` rides along as an extra column of ``v``.
    """
    scale = q.shape[-1] ** -0.25
    projection = (projection * scale).to(q.dtype).T
    half_scale_sq = scale * scale / 2
    q_features = q @ projection
    shift = q_features.detach().amax(dim=-1, keepdim=True) + (q * q).sum(dim=-1, keepdim=True) * half_scale_sq
    q_features = q_features.sub_(shift).exp_()
    k_features = k @ projection
    shift = k_features.detach().amax(dim=(-3, -2, -1), keepdim=True) + (k * k).sum(dim=-1, keepdim=True) * half_scale_sq
    k_features = k_features.sub_(shift).exp_()
    v_and_ones = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    context = k_features.transpose(-2, -1) @ v_and_ones
    context = context + eps * v_and_ones.sum(dim=-2, keepdim=True)
    out = q_features @ context + eps * context.sum(dim=-2, keepdim=True)
    numerator, normaliser = out.split([v.shape[-1], 1], dim=-1)  # a split's backward is one concatenation
    return numerator / normaliser


def reference_favor_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, *, eps: float = 1e-4
) -> torch.Tensor:
    """:func:`favor_attention` computed step by step as scBERT writes it (spec section 1.2), key maximum per sample.

    Slower (more passes over the feature maps); the reference the fused version is tested against, and the
    attention of the original algorithm in ``benchmarks/prediction.py``.
    """
    scale, ratio = q.shape[-1] ** -0.25, projection.shape[0] ** -0.5

    def features(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        dash = (scale * x) @ projection.T.to(x.dtype)
        diag = (x**2).sum(dim=-1, keepdim=True) * scale**2 / 2
        return ratio * (torch.exp(dash - diag - dash.amax(dim=dims, keepdim=True).detach()) + eps)

    q_features, k_features = features(q, (-1,)), features(k, (-3, -2, -1))
    normaliser = q_features @ k_features.sum(dim=-2).unsqueeze(-1)
    return (q_features @ (k_features.transpose(-2, -1) @ v)) / normaliser


@torch.compiler.disable  # a compiled network asks once, eagerly, and calls the kernels as they are
@functools.cache
def triton_favor_attention(dim_head: int) -> Callable | None:
    """The Triton kernels' FAVOR+ (:mod:`._favor_kernel`) for heads of `dim_head`, or `None` where they cannot run.

    They need Triton (shipped with PyTorch's CUDA builds) and a power-of-two head of at least 16 (a tile's side).
    """
    if dim_head < 16 or dim_head & (dim_head - 1):
        return None
    try:
        from ._favor_kernel import kernel_favor_attention
    except ImportError:
        return None
    return torch.compiler.disable(kernel_favor_attention)


class FastAttention(nn.Module):
    """FAVOR+ attention with a softmax kernel and a fixed (redrawable) random projection.

    Without gradients on a GPU it runs in two Triton kernels (:func:`triton_favor_attention`) unless `use_kernel` is
    off (:func:`favor_kernel`); otherwise in PyTorch (:func:`favor_attention`).
    """

    def __init__(self, dim_head: int, nb_features: int | None = None):
        super().__init__()
        self.dim_head = dim_head
        self.nb_features = nb_features or int(dim_head * math.log(dim_head))
        self.register_buffer("projection_matrix", orthogonal_random_features(self.nb_features, dim_head))
        self.use_kernel = True

    @torch.no_grad()
    def redraw_projection_matrix(self) -> None:
        """Replace the random features with a fresh draw from the global generator."""
        fresh = orthogonal_random_features(self.nb_features, self.dim_head)
        self.projection_matrix.copy_(fresh)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        needs_grad = q.requires_grad or k.requires_grad or v.requires_grad
        kernel = triton_favor_attention(self.dim_head) if self.use_kernel and q.is_cuda and not needs_grad else None
        if kernel is not None:
            return kernel(q, k, v, self.projection_matrix)
        # On a CPU, a whole batch's feature maps outgrow the caches and the element-wise passes over them dominate;
        # chunks of cells keep them cache-resident. A GPU takes the whole batch at once.
        per_cell = q.shape[1] * q.shape[2] * self.nb_features
        chunk = max(1, CPU_FEATURE_MAP_CHUNK // per_cell) if q.device.type == "cpu" else q.shape[0]
        if chunk >= q.shape[0]:
            return favor_attention(q, k, v, self.projection_matrix)
        # split, not slices: the backward of a slice fills a zero tensor as large as the whole batch, per chunk
        chunks = zip(q.split(chunk), k.split(chunk), v.split(chunk), strict=True)
        return torch.cat([favor_attention(*qkv, self.projection_matrix) for qkv in chunks])


class SelfAttention(nn.Module):
    """Multi-head self-attention: global FAVOR+ heads, optionally some windowed local heads."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        nb_features: int | None = None,
        local_heads: int = 0,
        local_window_size: int = 256,
        dropout: float = 0.0,
        qkv_bias: bool = False,
    ):
        super().__init__()
        if not 0 <= local_heads <= heads:
            raise ValueError(f"local_attn_heads must be between 0 and heads={heads}, got {local_heads}.")
        inner_dim = heads * dim_head
        self.heads = heads
        self.global_heads = heads - local_heads
        self.fast_attention = FastAttention(dim_head, nb_features)
        self.local_attn = None
        if local_heads > 0:
            from local_attention import LocalAttention

            self.local_attn = LocalAttention(
                window_size=local_window_size, autopad=True, dropout=dropout, look_forward=1, dim=dim_head
            )
        self.to_q = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_out = nn.Linear(inner_dim, dim)
        self.dropout = nn.Dropout(dropout)
        #: Softmax attention (``scaled_dot_product_attention``) in the global heads instead of FAVOR+; see
        #: :func:`exact_attention`.
        self.exact = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            rearrange(proj(x), "b n (h d) -> b h n d", h=self.heads) for proj in (self.to_q, self.to_k, self.to_v)
        )
        g = self.global_heads
        attend = F.scaled_dot_product_attention if self.exact else self.fast_attention
        heads = [attend(q[:, :g], k[:, :g], v[:, :g])] if g > 0 else []
        if self.local_attn is not None:
            heads.append(self.local_attn(q[:, g:], k[:, g:], v[:, g:]))
        out = rearrange(torch.cat(heads, dim=1), "b h n d -> b n (h d)")
        return self.dropout(self.to_out(out))


@contextlib.contextmanager
def exact_attention(network: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, the global heads of `network` compute exact softmax attention instead of FAVOR+.

    FAVOR+ estimates softmax attention with random features; ``scaled_dot_product_attention`` (flash attention on
    GPUs) computes it exactly, in time quadratic in the sequence length. A network trained with FAVOR+ gives somewhat
    different outputs with exact attention: it is an option, measured in ``benchmarks/gpu_end_to_end.py``.
    """
    with _switched(network, SelfAttention, "exact", enabled):
        yield network


@contextlib.contextmanager
def favor_kernel(network: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, FAVOR+ in `network` uses the Triton kernels where it can (`enabled`, the default) or not.

    Off, a GPU computes FAVOR+ in PyTorch: the reference the kernels are measured against in
    ``benchmarks/gpu_end_to_end.py``.
    """
    with _switched(network, FastAttention, "use_kernel", enabled):
        yield network


@contextlib.contextmanager
def _switched(network: nn.Module, kind: type, attribute: str, value: bool) -> Iterator[None]:
    modules = [module for module in network.modules() if isinstance(module, kind)]
    previous = [getattr(module, attribute) for module in modules]
    for module in modules:
        setattr(module, attribute, value)
    try:
        yield
    finally:
        for module, old in zip(modules, previous, strict=True):
            setattr(module, attribute, old)

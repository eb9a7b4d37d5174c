"""FAVOR+ attention for inference in two Triton kernels that never write the ``(seq, features)`` feature maps.

:func:`~scanpy_canal.nn._attention.favor_attention` in PyTorch writes and re-reads each map several times, and on a
GPU those passes, not the products, bound its speed. Here the first kernel streams a head's keys through the random
features and accumulates ``phi(k)^T [v, 1]`` on chip; the second streams its queries, maps them and contracts them with
that context at once. Both stabilise the exponent online, as flash attention does with its softmax, and the result
equals :func:`favor_attention` (the key maximum per sample, the ``+ eps`` outside the stabiliser) up to rounding.

Used by :class:`~scanpy_canal.nn._attention.FastAttention` on CUDA tensors without gradients when Triton is installed
(it comes with PyTorch's CUDA builds); training and CPUs keep the PyTorch path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: Random features per step.
BLOCK_FEATURES = 64
#: Queries or keys per step and warps per program, tried once per shape on the GPU (Triton's interpreter takes one).
TILES = [
    triton.Config({"BLOCK_N": block}, num_warps=warps)
    for block in ((32, 64, 128) if not os.environ.get("TRITON_INTERPRET") else (64,))
    for warps in ((4, 8) if not os.environ.get("TRITON_INTERPRET") else (4,))
]


@triton.jit
def _dot(a, b, EXACT: tl.constexpr):
    if EXACT:  # float32 inputs: full precision, as PyTorch's float32 products, rather than TF32
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _rows(ptr, rows, row_stride, in_rows, DIM: tl.constexpr):
    """The `rows` (each `row_stride` apart, `DIM` contiguous values) of the tensor at `ptr`; zeros outside `in_rows`."""
    return tl.load(ptr + rows[:, None] * row_stride + tl.arange(0, DIM)[None, :], mask=in_rows[:, None], other=0.0)


@triton.jit
def _half_squared_norm(x, half_scale_sq):
    """``a^2 |x|^2 / 2`` of each row, in float32: the part of the exponent that depends on the row alone."""
    x32 = x.to(tl.float32)
    return tl.sum(x32 * x32, axis=1) * half_scale_sq


@triton.jit
def _online_features(dash, maximum, diag, AXIS: tl.constexpr):
    """``exp(dash - max - diag)``, the running maximum of `dash` along `AXIS` updated by this block.

    Keys take the maximum over positions, queries over features. Also returns the factor that rescales what was
    accumulated under the old maximum, and the new maximum.
    """
    new_maximum = tl.maximum(maximum, tl.max(dash, axis=AXIS))
    features = tl.exp(dash - tl.expand_dims(new_maximum, AXIS) - diag[:, None])
    return features, tl.exp(maximum - new_maximum), new_maximum


@triton.autotune(configs=TILES, key=["seq_len", "n_features", "DIM"])
@triton.jit
def _key_context_kernel(
    k_ptr, v_ptr, projection_ptr, context_ptr, key_sum_ptr, maximum_ptr,
    seq_len, n_features, heads,
    stride_b, stride_h, stride_n,
    half_scale_sq,
    DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, EXACT: tl.constexpr,
):  # fmt: skip
    """One (sample, head, feature block): ``sum_n exp(dash_nm - max_m - diag_n) [v_n, 1]`` with ``max_m = max_n dash_nm``.

    Columns past `n_features` read a zero projection and are not stored.
    """
    sample_head, feature_block = tl.program_id(0), tl.program_id(1)
    sample, head = sample_head // heads, sample_head % heads
    offs_m = feature_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DIM)
    in_features = offs_m < n_features
    projection = _rows(projection_ptr, offs_m, DIM, in_features, DIM)
    base = sample * stride_b + head * stride_h
    maximum = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    context = tl.zeros((BLOCK_M, DIM), dtype=tl.float32)
    key_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_seq = offs_n < seq_len
        k = _rows(k_ptr + base, offs_n, stride_n, in_seq, DIM)
        v = _rows(v_ptr + base, offs_n, stride_n, in_seq, DIM)
        dash = _dot(k, tl.trans(projection), EXACT)
        dash = tl.where(in_seq[:, None], dash, -float("inf"))
        features, rescale, maximum = _online_features(dash, maximum, _half_squared_norm(k, half_scale_sq), 0)
        context = context * rescale[:, None] + _dot(tl.trans(features.to(v.dtype)), v, EXACT)
        key_sum = key_sum * rescale + tl.sum(features, axis=0)
    out = sample_head * n_features + offs_m
    tl.store(context_ptr + out[:, None] * DIM + offs_d[None, :], context, mask=in_features[:, None])
    tl.store(key_sum_ptr + out, key_sum, mask=in_features)
    tl.store(maximum_ptr + out, maximum, mask=in_features)


@triton.autotune(configs=TILES, key=["seq_len", "n_features", "DIM"])
@triton.jit
def _query_kernel(
    q_ptr, projection_ptr, context_ptr, key_sum_ptr, eps_context_ptr, eps_key_sum_ptr, out_ptr,
    seq_len, n_features, heads,
    stride_b, stride_h, stride_n, out_stride_b, out_stride_h, out_stride_n,
    half_scale_sq,
    DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, EXACT: tl.constexpr,
):  # fmt: skip
    """One (sample, head, query block): ``(phi(q) context + eps colsum) / (phi(q) key_sum + eps colsum)``."""
    sample_head, query_block = tl.program_id(0), tl.program_id(1)
    sample, head = sample_head // heads, sample_head % heads
    offs_n = query_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DIM)
    in_seq = offs_n < seq_len
    q = _rows(q_ptr + sample * stride_b + head * stride_h, offs_n, stride_n, in_seq, DIM)
    diag = _half_squared_norm(q, half_scale_sq)
    maximum = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
    numerator = tl.zeros((BLOCK_N, DIM), dtype=tl.float32)
    normaliser = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, n_features, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        in_features = offs_m < n_features
        projection = _rows(projection_ptr, offs_m, DIM, in_features, DIM)
        context = _rows(context_ptr + sample_head * n_features * DIM, offs_m, DIM, in_features, DIM)
        key_sum = tl.load(key_sum_ptr + sample_head * n_features + offs_m, mask=in_features, other=0.0)
        dash = _dot(q, tl.trans(projection), EXACT)
        dash = tl.where(in_features[None, :], dash, -float("inf"))
        features, rescale, maximum = _online_features(dash, maximum, diag, 1)
        numerator = numerator * rescale[:, None] + _dot(features.to(context.dtype), context, EXACT)
        normaliser = normaliser * rescale + tl.sum(features * key_sum[None, :], axis=1)
    numerator += tl.load(eps_context_ptr + sample_head * DIM + offs_d)[None, :]
    normaliser += tl.load(eps_key_sum_ptr + sample_head)
    out = out_ptr + sample * out_stride_b + head * out_stride_h + offs_n[:, None] * out_stride_n + offs_d[None, :]
    tl.store(out, (numerator / normaliser[:, None]).to(out_ptr.dtype.element_ty), mask=in_seq[:, None])


def kernel_favor_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, *, eps: float = 1e-4
) -> torch.Tensor:
    """:func:`~scanpy_canal.nn._attention.favor_attention` computed by the two kernels (no gradient).

    ``q``, ``k`` and ``v`` have shape ``(batch, heads, seq, dim_head)`` and may be views whose last dimension is
    contiguous, as the heads of a linear layer's output are; the result has the same shape and dtype.
    """
    batch, heads, seq_len, dim = q.shape
    n_features = projection.shape[0]
    scale = dim**-0.25
    half_scale_sq = scale * scale / 2
    scaled_projection = (projection * scale).to(q.dtype).contiguous()
    if not q.stride() == k.stride() == v.stride() or q.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    exact = q.dtype == torch.float32
    context = torch.empty(batch, heads, n_features, dim, device=q.device, dtype=torch.float32)
    key_sum = torch.empty(batch, heads, n_features, device=q.device, dtype=torch.float32)
    maxima = torch.empty(batch, heads, n_features, device=q.device, dtype=torch.float32)
    strides = (q.stride(0), q.stride(1), q.stride(2))
    _key_context_kernel[(batch * heads, triton.cdiv(n_features, BLOCK_FEATURES))](
        k, v, scaled_projection, context, key_sum, maxima, seq_len, n_features, heads, *strides, half_scale_sq,
        DIM=dim, BLOCK_M=BLOCK_FEATURES, EXACT=exact,
    )  # fmt: skip
    # every feature rescaled to the sample's maximum over heads, positions and features, as the PyTorch path does
    rescale = (maxima - maxima.amax(dim=(1, 2), keepdim=True)).exp()
    v_sum = v.sum(dim=-2, dtype=torch.float32)
    context = context * rescale[..., None] + eps * v_sum[:, :, None]
    key_sum = key_sum * rescale + eps * seq_len
    eps_context = eps * context.sum(dim=-2)
    eps_key_sum = eps * key_sum.sum(dim=-1)
    out = torch.empty(batch, seq_len, heads, dim, device=q.device, dtype=q.dtype).transpose(1, 2)
    _query_kernel[lambda meta: (batch * heads, triton.cdiv(seq_len, meta["BLOCK_N"]))](
        q, scaled_projection, context.to(q.dtype), key_sum, eps_context, eps_key_sum, out,
        seq_len, n_features, heads, *strides, out.stride(0), out.stride(1), out.stride(2), half_scale_sq,
        DIM=dim, BLOCK_M=BLOCK_FEATURES, EXACT=exact,
    )  # fmt: skip
    return out

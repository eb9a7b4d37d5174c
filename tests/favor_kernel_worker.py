"""Runs the Triton FAVOR+ kernels in Triton's interpreter against the PyTorch path; used by test_favor_kernel.py.

    TRITON_INTERPRET=1 python favor_kernel_worker.py

The interpreter must be chosen before Triton is first imported, which a test process may already have done (PyTorch
imports it), hence a process of its own. Prints a JSON object: per case, the largest differences and the layout.
"""

import json

import torch
from einops import rearrange

from scanpy_canal.nn._attention import favor_attention, orthogonal_random_features
from scanpy_canal.nn._favor_kernel import kernel_favor_attention


def heads_of_a_linear_output(batch: int, heads: int, seq: int, dim: int) -> list[torch.Tensor]:
    """Queries, keys and values as the attention receives them: strided views into one projection's output."""
    x = torch.randn(batch, seq, 3 * heads * dim) * 2
    return [rearrange(part, "b n (h d) -> b h n d", h=heads) for part in x.chunk(3, dim=-1)]


def float32_case(seq: int, dim: int, features: int) -> dict:
    torch.manual_seed(0)
    q, k, v = heads_of_a_linear_output(2, 3, seq, dim)
    k[1] *= 3  # a sample with larger keys: its stabiliser must not reach the other sample
    projection = orthogonal_random_features(features, dim)
    expected = favor_attention(q.clone(), k.clone(), v.clone(), projection)
    out = kernel_favor_attention(q, k, v, projection)
    return {
        "same_shape": out.shape == expected.shape,
        "max_difference": float((out - expected).abs().max()),
        "heads_merge_without_copy": rearrange(out, "b h n d -> b n (h d)").is_contiguous(),
    }


def half_case() -> dict:
    torch.manual_seed(1)
    q, k, v = heads_of_a_linear_output(2, 2, 90, 16)
    projection = orthogonal_random_features(50, 16)
    exact = favor_attention(q.clone(), k.clone(), v.clone(), projection)
    half = [x.half() for x in (q, k, v)]
    out = kernel_favor_attention(*half, projection)
    pytorch = favor_attention(*(x.clone() for x in half), projection)
    return {
        "dtype": str(out.dtype),
        "kernel_difference": float((out.float() - exact).abs().max()),
        "pytorch_difference": float((pytorch.float() - exact).abs().max()),
    }


if __name__ == "__main__":
    cases = {
        f"{seq}-{dim}-{features}": float32_case(seq, dim, features)
        for seq, dim, features in [(70, 16, 40), (130, 32, 75)]
    }
    print(json.dumps({"float32": cases, "float16": half_case()}))

"""The Triton FAVOR+ kernels against the PyTorch path, run by Triton's interpreter on the CPU."""

import importlib

import pytest
import torch
from einops import rearrange

from scanpy_canal.nn import PerformerLM, favor_kernel
from scanpy_canal.nn._attention import FastAttention, favor_attention, orthogonal_random_features


@pytest.fixture(scope="module")
def kernel(request):
    pytest.importorskip("triton")
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")  # read when the kernels are defined
    request.addfinalizer(patch.undo)
    module = importlib.reload(importlib.import_module("scanpy_canal.nn._favor_kernel"))
    return module.kernel_favor_attention


def heads_of_a_linear_output(batch: int, heads: int, seq: int, dim: int, dtype=torch.float32):
    """Queries, keys and values as the attention receives them: strided views into one projection's output."""
    x = torch.randn(batch, seq, 3 * heads * dim) * 2
    return [rearrange(part, "b n (h d) -> b h n d", h=heads).to(dtype) for part in x.chunk(3, dim=-1)]


@pytest.mark.parametrize(("seq", "dim", "features"), [(70, 16, 40), (130, 32, 75)])
def test_kernel_equals_the_pytorch_path(kernel, seq, dim, features):
    torch.manual_seed(0)
    q, k, v = heads_of_a_linear_output(2, 3, seq, dim)
    k[1] *= 3  # a sample with larger keys: its stabiliser must not reach the other sample
    projection = orthogonal_random_features(features, dim)
    expected = favor_attention(q.clone(), k.clone(), v.clone(), projection)
    out = kernel(q, k, v, projection)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() <= 1e-5
    # written in the (batch, seq, heads, dim) layout, so merging the heads back costs no copy
    assert rearrange(out, "b h n d -> b n (h d)").is_contiguous()


def test_kernel_in_half_precision_is_within_rounding(kernel):
    torch.manual_seed(1)
    q, k, v = heads_of_a_linear_output(2, 2, 90, 16)
    projection = orthogonal_random_features(50, 16)
    exact = favor_attention(q.clone(), k.clone(), v.clone(), projection)
    half = [x.half() for x in (q, k, v)]
    out = kernel(*half, projection)
    pytorch_half = favor_attention(*(x.clone() for x in half), projection)
    assert out.dtype == torch.float16
    assert (out.float() - exact).abs().max() <= (pytorch_half.float() - exact).abs().max()


def test_the_kernel_switch_is_restored():
    network = PerformerLM(num_tokens=7, max_seq_len=17, dim=16, depth=2, heads=2, dim_head=8)
    attentions = [module for module in network.modules() if isinstance(module, FastAttention)]
    with favor_kernel(network, enabled=False):
        assert not any(module.use_kernel for module in attentions)
    assert all(module.use_kernel for module in attentions)

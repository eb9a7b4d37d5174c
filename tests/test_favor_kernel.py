"""The Triton FAVOR+ kernels against the PyTorch path, run by Triton's interpreter on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scanpy_canal.nn import PerformerLM, favor_kernel
from scanpy_canal.nn._attention import FastAttention


@pytest.fixture(scope="module")
def interpreted():
    """The worker's comparisons (its own process: the interpreter is chosen before Triton is imported)."""
    pytest.importorskip("triton")
    worker = Path(__file__).with_name("favor_kernel_worker.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", ["70-16-40", "130-32-75"])
def test_kernel_equals_the_pytorch_path(interpreted, case):
    """Sequences, heads and feature counts that do not fill the tiles; strided heads; one sample's larger keys."""
    result = interpreted["float32"][case]
    assert result["same_shape"] and result["max_difference"] <= 1e-5
    # written in the (batch, seq, heads, dim) layout, so merging the heads back costs no copy
    assert result["heads_merge_without_copy"]


def test_kernel_in_half_precision_is_within_rounding(interpreted):
    result = interpreted["float16"]
    assert result["dtype"] == "torch.float16"
    assert result["kernel_difference"] <= result["pytorch_difference"]


def test_the_kernel_switch_is_restored():
    network = PerformerLM(num_tokens=7, max_seq_len=17, dim=16, depth=2, heads=2, dim_head=8)
    attentions = [module for module in network.modules() if isinstance(module, FastAttention)]
    with favor_kernel(network, enabled=False):
        assert not any(module.use_kernel for module in attentions)
    assert all(module.use_kernel for module in attentions)

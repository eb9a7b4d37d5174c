"""``precision="auto"``: bfloat16 where the device computes it natively, float32 elsewhere; a warning for a slow choice."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Literal

import torch

#: CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic: AVX-512 BF16 and AMX.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: Measured on an AMD EPYC without them (AVX2 only), scBERT's encoder at 1,001 tokens: float32 over bfloat16 cells/s.
EMULATED_BF16_SLOWDOWN = 1.05 / 0.20


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The flags the processor reports (empty where ``/proc/cpuinfo`` cannot be read, e.g. off Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    return frozenset(
        word for line in text.splitlines() if line.startswith("flags") for word in line.split(":")[1].split()
    )


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX-512 BF16 or AMX."""
    kind = _device_type(device)
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> Literal["32", "bf16"]:
    """The precision `precision` means on `device`: ``"auto"`` picks bfloat16 where it is native, float32 elsewhere.

    An explicit ``"bf16"`` on a CPU without native bfloat16 is kept, with a warning of what it costs.
    """
    if precision == "auto":
        return "bf16" if native_bf16(device) else "32"
    if precision == "bf16" and _device_type(device) == "cpu" and not native_bf16(device):
        warnings.warn(
            "precision='bf16' on a CPU without native bfloat16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo) is "
            f"emulated: about {EMULATED_BF16_SLOWDOWN:.0f}x slower than float32 (measured with scBERT's encoder). "
            "Use precision='auto' or '32' here.",
            UserWarning,
            stacklevel=2,
        )
    return precision  # type: ignore[return-value]


def training_device(accelerator: str) -> str:
    """The kind of device Lightning's `accelerator` trains on (``"auto"``: a CUDA GPU if there is one)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if accelerator == "auto" else accelerator


def _device_type(device: torch.device | str) -> str:
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]

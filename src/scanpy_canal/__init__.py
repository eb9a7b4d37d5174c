"""Continual cell-type annotation with a pretrained Performer language model (CANAL)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._logging import configure_logger
from ._version import __version__

configure_logger()  # messages follow scanpy's verbosity

# Submodules and the model load on first use: torch and scvi-tools take seconds to import,
# and `import scanpy_canal` should stay instant (PEP 562).
_SUBMODULES = {"datasets", "model", "nn", "pl", "pp", "tl"}
_ATTRIBUTES = {"CANAL": "scanpy_canal.model", "pretrain": "scanpy_canal.model"}

__all__ = ["CANAL", "datasets", "model", "nn", "pl", "pp", "pretrain", "tl"]

if TYPE_CHECKING:
    from . import datasets, model, nn, pl, pp, tl
    from .model import CANAL, pretrain


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])

"""Saving and loading CANAL models without pickle: tensors, JSON and ``.h5ad``."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi.model.base import BaseModelClass

from scanpy_canal.nn import CheckpointError

if TYPE_CHECKING:
    from ._model import CANAL

FORMAT_VERSION = 1
METADATA = "model.json"
WEIGHTS = "weights.pt"
BANK = "example_bank.h5ad"
HISTORY = "history.csv"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray | pd.Index):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_model(model: CANAL, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write `model` to `dir_path` through a temporary sibling directory and an atomic rename."""
    from scanpy_canal import __version__

    target = Path(dir_path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} already exists; pass overwrite=True to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        metadata = {
            "format_version": FORMAT_VERSION,
            "scanpy_canal_version": __version__,
            "arch": model.arch_,
            "trainable_blocks": model.trainable_blocks_,
            "seed": model.seed_,
            "stage": model.stage_,
            "genes": model.genes_,
            "cell_types": model.cell_types_,
            "stage_history": model.stage_history_,
            "registry": model.registry_,
        }
        (staging / METADATA).write_text(json.dumps(_jsonable(metadata), indent=1))
        tensors = {"network": model.module.network.state_dict()}
        if model.calibration_ is not None:
            tensors["calibration"] = model.calibration_
        torch.save(tensors, staging / WEIGHTS)
        if model.example_bank_ is not None:
            model.example_bank_.write_h5ad(staging / BANK)
        model.history.to_csv(staging / HISTORY, index=False)
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(staging: Path, target: Path) -> None:
    """Move `staging` to `target`; an existing `target` is only removed once the new one is in place."""
    if not target.exists():
        staging.rename(target)
        return
    retired = target.with_name(f".{target.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired)


def _read_metadata(directory: Path) -> dict:
    path = directory / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a saved CANAL model: {METADATA} is missing.")
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is damaged: {error}.") from error
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if not isinstance(version, int):
        raise ValueError(f"{str(path)!r} has no valid format_version; it was not written by scanpy-canal.")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{str(directory)!r} was saved in format {version} by a newer scanpy-canal; this version reads format "
            f"{FORMAT_VERSION} at most. Upgrade scanpy-canal to load it."
        )
    if version < 1:
        raise ValueError(f"{str(path)!r} has an unknown format_version {version}.")
    return metadata


def _read_tensors(directory: Path) -> dict:
    path = directory / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is incomplete: {WEIGHTS} is missing.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated files and pickled objects raise many types
        raise CheckpointError(
            f"Could not read {str(path)!r}: it is truncated, damaged or holds objects other than tensors ({error})."
        ) from error


def load_model(cls: type[CANAL], dir_path: str | os.PathLike, *, adata: ad.AnnData | None = None) -> CANAL:
    """Rebuild a model saved by :func:`save_model`."""
    directory = Path(dir_path)
    metadata = _read_metadata(directory)
    tensors = _read_tensors(directory)
    model = cls.__new__(cls)
    BaseModelClass.__init__(model, None, registry=metadata["registry"])
    model._build(
        genes=metadata["genes"],
        cell_types=metadata["cell_types"],
        arch=metadata["arch"],
        trainable_blocks=metadata["trainable_blocks"],
        seed=metadata["seed"],
    )
    try:
        model.module.network.load_state_dict(tensors["network"])
    except (KeyError, RuntimeError) as error:
        raise CheckpointError(f"The weights in {str(directory)!r} do not match its model.json: {error}") from error
    model.module.eval()
    model.stage_ = metadata["stage"]
    model.stage_history_ = metadata["stage_history"]
    model.calibration_ = tensors.get("calibration")
    model.is_trained_ = model.stage_ > 0
    if (directory / BANK).is_file():
        model.example_bank_ = ad.read_h5ad(directory / BANK)
    if (directory / HISTORY).is_file() and (directory / HISTORY).stat().st_size > 1:
        model.training_log_ = pd.read_csv(directory / HISTORY)
    model.init_params_ = {"kwargs": {"genes": model.genes_, "seed": model.seed_, **model.arch_}}
    model._adata = adata
    model._update_summary()
    return model

"""Saving and loading CANAL models without pickle: tensors, JSON and ``.h5ad``."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi.model.base import BaseModelClass

from scanpy_canal._directories import check_checksums, file_checksums, readable_directory, writer_lock
from scanpy_canal.nn import CheckpointError
from scanpy_canal.nn._pretrained import read_json, staged_directory

if TYPE_CHECKING:
    from ._model import CANAL

FORMAT_VERSION = 1
METADATA = "model.json"
WEIGHTS = "weights.pt"
BANK = "example_bank.h5ad"
HISTORY = "history.csv"
_METADATA_KEYS = ("arch", "trainable_blocks", "seed", "stage", "genes", "cell_types", "stage_history", "registry")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray | pd.Index):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_model(model: CANAL, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write `model` to `dir_path` through a sibling directory swapped into place in one step, under the writer lock.

    ``model.json`` is written last and records the SHA-256 digest of each other file.
    """
    with writer_lock(dir_path):
        _save_model(model, Path(dir_path), overwrite=overwrite)


def _save_model(model: CANAL, target: Path, *, overwrite: bool) -> None:
    from scanpy_canal import __version__

    if target.exists():
        _check_replaceable(target, overwrite=overwrite)
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
    tensors = {"network": model.module.network.state_dict()}
    if model.calibration_ is not None:
        tensors["calibration"] = model.calibration_
    with staged_directory(target, overwrite=True) as staging:
        torch.save(tensors, staging / WEIGHTS)
        if model.example_bank_ is not None:
            model.example_bank_.write_h5ad(staging / BANK)
        model.history.to_csv(staging / HISTORY, index=False)
        metadata["sha256"] = file_checksums(staging, exclude=METADATA)
        (staging / METADATA).write_text(json.dumps(_jsonable(metadata), indent=1))


def _check_replaceable(target: Path, *, overwrite: bool) -> None:
    """Allow replacing `target` only when asked to and when it is a saved model or an empty directory."""
    if not overwrite:
        raise FileExistsError(f"{str(target)!r} already exists; pass overwrite=True to replace it.")
    empty_directory = target.is_dir() and not any(target.iterdir())
    if not (target / METADATA).is_file() and not empty_directory:
        raise FileExistsError(
            f"{str(target)!r} exists and is not a saved CANAL model; overwrite=True only replaces a model. "
            "Choose another path, or remove it yourself."
        )


def _read_metadata(directory: Path) -> dict:
    path = directory / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a saved CANAL model: {METADATA} is missing.")
    metadata = read_json(path, error=ValueError)
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
    missing = [key for key in _METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"{str(path)!r} is damaged: it lacks {', '.join(missing)}.")
    return metadata


def _read_tensors(directory: Path) -> dict:
    path = directory / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is incomplete: {WEIGHTS} is missing.")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{str(path)!r} holds objects other than tensors. scanpy-canal never writes such files and does not "
            "unpickle them, as that could run arbitrary code; load only models written by `CANAL.save`."
        ) from error
    except Exception as error:  # truncated and damaged files raise many types
        raise _damaged(path, error) from error
    if not isinstance(tensors, dict) or "network" not in tensors:
        raise CheckpointError(f"{str(path)!r} holds no network weights; it was not written by scanpy-canal.")
    return tensors


def _damaged(path: Path, error: Exception) -> CheckpointError:
    lines = str(error).strip().splitlines()
    detail = lines[0] if lines else type(error).__name__
    return CheckpointError(f"Could not read {str(path)!r}: it is truncated or damaged ({detail}).")


def _read_bank(path: Path, genes: list[str]) -> ad.AnnData:
    try:
        bank = ad.read_h5ad(path)
    except Exception as error:  # h5py and anndata raise many types for a damaged file
        raise _damaged(path, error) from error
    if bank.var_names.tolist() != genes or "cell_type" not in bank.obs:
        raise CheckpointError(f"{str(path)!r} does not match the gene panel of its model.json, or has no cell types.")
    return bank


def load_model(cls: type[CANAL], dir_path: str | os.PathLike, *, adata: ad.AnnData | None = None) -> CANAL:
    """Rebuild a model saved by :func:`save_model`; the checksums of its files (if recorded) are verified."""
    directory = readable_directory(dir_path)
    metadata = _read_metadata(directory)
    tensors = _read_tensors(directory)
    model = cls.__new__(cls)
    try:
        BaseModelClass.__init__(model, None, registry=metadata["registry"])
        model._build(
            genes=metadata["genes"],
            cell_types=metadata["cell_types"],
            arch=metadata["arch"],
            trainable_blocks=metadata["trainable_blocks"],
            seed=metadata["seed"],
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{str(directory / METADATA)!r} does not describe a valid CANAL model ({type(error).__name__}: {error}); "
            "it is damaged or was not written by scanpy-canal."
        ) from error
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
        model.example_bank_ = _read_bank(directory / BANK, model.genes_)
    if (directory / HISTORY).is_file() and (directory / HISTORY).stat().st_size > 1:
        model.training_log_ = pd.read_csv(directory / HISTORY)
    # Last, after the checks that say more about a damaged file (e.g. a pickle in weights.pt).
    check_checksums(directory, metadata.get("sha256"), source=directory / METADATA, error=CheckpointError)
    model.init_params_ = {"kwargs": {"genes": model.genes_, "seed": model.seed_, **model.arch_}}
    model._adata = adata
    model._update_summary()
    return model

"""Saving and loading CANAL models without pickle: tensors, JSON and ``.h5ad``."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import reprlib
from pathlib import Path
from typing import Any, Self, TypeVar

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi.model.base import BaseModelClass

from scanpy_canal._choices import INPUT_SPACES
from scanpy_canal._directories import check_checksums, file_checksums, writer_lock
from scanpy_canal._snapshot import read_consistently, said_write_errors
from scanpy_canal._version import __version__
from scanpy_canal.nn import CheckpointError, read_json, staged_directory

from ._input_space import InputReference
from ._tree import grow_tree

#: 2: the calibration cells of every stage in their own file (1: the last stage's manifold vectors in weights.pt).
FORMAT_VERSION = 2
METADATA = "model.json"
WEIGHTS = "weights.pt"
BANK = "example_bank.h5ad"
CALIBRATION = "calibration_cells.h5ad"
HISTORY = "history.csv"
#: The model class being loaded (:class:`~scanpy_canal.CANAL`), which the caller passes in.
Model = TypeVar("Model", bound=BaseModelClass)
logger = logging.getLogger("scanpy_canal")
#: The key of model.json that records the digest of the rest of model.json.
SELF_DIGEST = "metadata_sha256"
_METADATA_KEYS = ("arch", "trainable_blocks", "seed", "stage", "genes", "cell_types", "stage_history", "registry")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: What each entry of model.json must be (a model saved by an earlier version may lack the later ones).
_METADATA_TYPES = {
    "arch": ("a mapping of architecture options", lambda value: isinstance(value, dict)),
    "trainable_blocks": (
        "a list of block numbers",
        lambda value: isinstance(value, list) and all(map(_integer, value)),
    ),
    "seed": ("an integer", _integer),
    "start": ("'pretrained' or 'random'", lambda value: value in ("pretrained", "random")),
    "gene_embedding": ("null, 'coexpression' or 'random'", lambda value: value in (None, "coexpression", "random")),
    "input_space": ("'centred' or 'standardised'", lambda value: value in INPUT_SPACES),
    "stage": ("a number of stages", lambda value: _integer(value) and value >= 0),
    "genes": ("a list of gene names", _strings),
    "cell_types": ("a list of cell-type names", _strings),
    "stage_history": (
        "a list of stage records",
        lambda value: isinstance(value, list) and all(isinstance(item, dict) for item in value),
    ),
    "registry": ("a mapping", lambda value: isinstance(value, dict)),
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray | pd.Index):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_model(model: BaseModelClass, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write `model` to `dir_path` through a sibling directory swapped into place in one step, under the writer lock.

    ``model.json`` is written last and records the SHA-256 digest of each other file, and of itself.
    """
    if model.stage_ == 0:
        raise ValueError("The model has trained no stage, so there is nothing to save: train a stage first.")
    with said_write_errors(dir_path, "model"), writer_lock(dir_path):
        _save_model(model, Path(dir_path), overwrite=overwrite)


def _save_model(model: BaseModelClass, target: Path, *, overwrite: bool) -> None:
    if target.exists():
        _check_replaceable(target, overwrite=overwrite)
    metadata = {
        "format_version": FORMAT_VERSION,
        "scanpy_canal_version": __version__,
        "arch": model.arch_,
        "trainable_blocks": model.trainable_blocks_,
        "seed": model.seed_,
        "start": model.start_,
        "gene_embedding": model.gene_embedding_,
        "input_space": model.input_space_,
        "stage": model.stage_,
        "genes": model.genes_,
        "cell_types": model.cell_types_,
        "cell_type_parents": model.cell_type_parents_,
        "cell_type_terms": model.cell_type_terms_,
        "stage_history": model.stage_history_,
        "registry": model.registry_,
    }
    with staged_directory(target, overwrite=True) as staging:
        # Through memory: torch reports a full disk as a RuntimeError without the cause, a file write as an OSError.
        tensors = {"network": model.module.network.state_dict()}
        if model.input_reference_ is not None:
            tensors["input_reference"] = model.input_reference_.to_tensors()
        weights = io.BytesIO()
        torch.save(tensors, weights)
        (staging / WEIGHTS).write_bytes(weights.getbuffer())
        for cells, name in ((model.example_bank_, BANK), (model.calibration_cells_, CALIBRATION)):
            if cells is not None:
                cells.write_h5ad(staging / name)
        model.history.to_csv(staging / HISTORY, index=False)
        metadata["sha256"] = file_checksums(staging, exclude=METADATA)
        metadata = _jsonable(metadata)
        metadata[SELF_DIGEST] = _metadata_digest(metadata)
        (staging / METADATA).write_text(json.dumps(metadata, indent=1))


def _metadata_digest(metadata: dict) -> str:
    """The SHA-256 digest of `metadata` but its own digest, written canonically (a change of any value shows)."""
    content = {key: value for key, value in metadata.items() if key != SELF_DIGEST}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


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
    try:
        metadata = read_json(path, error=ValueError)
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is damaged: it is not text ({error}).") from error
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
    # After the version: a newer format may record its digest otherwise.
    if SELF_DIGEST in metadata and metadata[SELF_DIGEST] != _metadata_digest(metadata):
        raise CheckpointError(
            f"{str(path)!r} does not match its own checksum: it was damaged or changed after it was saved."
        )
    missing = [key for key in _METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"{str(path)!r} is damaged: it lacks {', '.join(missing)}.")
    for key, (expected, valid) in _METADATA_TYPES.items():
        if key in metadata and not valid(metadata[key]):
            raise ValueError(f"{str(path)!r} is damaged: its {key} is {reprlib.repr(metadata[key])}, not {expected}.")
    if len(metadata["stage_history"]) > metadata["stage"]:  # fewer: imported from the original tool
        raise ValueError(
            f"{str(path)!r} is damaged: its stage_history has more records than its {metadata['stage']} stages."
        )
    return metadata


def _read_tree(parents: Any, cell_types: list[str]) -> dict[str, str]:
    """The saved cell-type tree, checked like a new one (known types, one parent each, no cycles)."""
    if not isinstance(parents, dict):
        raise ValueError(f"cell_type_parents must be a mapping of cell types to their parents, got {parents!r}")
    return grow_tree({}, parents, cell_types)


def _read_terms(terms: Any, cell_types: list[str]) -> dict[str, str]:
    """The saved Cell Ontology ids of the cell types (none in models saved before them)."""
    if not isinstance(terms, dict) or not all(isinstance(v, str) and k in cell_types for k, v in terms.items()):
        raise ValueError(f"cell_type_terms must map cell types of the model to Cell Ontology ids, got {terms!r}")
    return dict(terms)


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


def _read_cells(path: Path, genes: list[str]) -> ad.AnnData:
    """The example bank or the calibration cells, checked against the model's panel."""
    try:
        cells = ad.read_h5ad(path)
    except Exception as error:  # h5py and anndata raise many types for a damaged file
        raise _damaged(path, error) from error
    if cells.var_names.tolist() != genes or "cell_type" not in cells.obs:
        raise CheckpointError(f"{str(path)!r} does not match the gene panel of its model.json, or has no cell types.")
    return cells


def load_model(cls: type[Model], dir_path: str | os.PathLike, *, adata: ad.AnnData | None = None) -> Model:
    """Rebuild a model of class `cls` saved by :func:`save_model`; its files' checksums (if recorded) are verified.

    The files read all belong to one save, also while another process saves to `dir_path` (see
    :func:`~scanpy_canal._snapshot.read_consistently`).
    """
    model = read_consistently(dir_path, lambda directory: _load_model(cls, directory))
    model._adata = adata
    return model


def _load_model(cls: type[Model], directory: Path) -> Model:
    metadata = _read_metadata(directory)
    tensors = _read_tensors(directory)
    try:
        model = cls._restored(
            registry=metadata["registry"],
            state={
                "stage_": metadata["stage"],
                "stage_history_": metadata["stage_history"],
                # Models saved before the cell-type tree load as a flat tree.
                "cell_type_parents_": _read_tree(metadata.get("cell_type_parents", {}), metadata["cell_types"]),
                "cell_type_terms_": _read_terms(metadata.get("cell_type_terms", {}), metadata["cell_types"]),
            },
            genes=metadata["genes"],
            cell_types=metadata["cell_types"],
            arch=metadata["arch"],
            trainable_blocks=metadata["trainable_blocks"],
            seed=metadata["seed"],
            # Files written before the defaults depended on the start keep the defaults they were trained with.
            start=metadata.get("start", "pretrained"),
            gene_embedding=metadata.get("gene_embedding"),
            input_space=metadata.get("input_space", "centred"),
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
    if "input_reference" in tensors:
        try:
            model.input_reference_ = InputReference.from_tensors(tensors["input_reference"], len(model.genes_))
        except (AttributeError, TypeError, ValueError) as error:
            raise CheckpointError(f"{str(directory / WEIGHTS)!r} is damaged: {error}.") from error
    if (directory / BANK).is_file():
        model.example_bank_ = _read_cells(directory / BANK, model.genes_)
    if (directory / CALIBRATION).is_file():
        model.calibration_cells_ = _read_cells(directory / CALIBRATION, model.genes_)
    elif metadata["format_version"] < 2 and model.stage_ > 0:
        logger.warning(
            "%r was saved by an earlier scanpy-canal without calibration cells: novel-cell detection needs "
            "threshold='canal' until the model has trained another stage.",
            str(directory),
        )
    if (directory / HISTORY).is_file() and (directory / HISTORY).stat().st_size > 1:
        model.training_log_ = _read_history(directory / HISTORY)
    # Last, after the checks that say more about a damaged file (e.g. a pickle in weights.pt).
    check_checksums(directory, metadata.get("sha256"), source=directory / METADATA, error=CheckpointError)
    return model


def _read_history(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except Exception as error:  # pandas raises parser, decoding and value errors for a damaged file
        raise _damaged(path, error) from error


class SaveLoadMixin:
    """``save`` and ``load`` of :class:`~scanpy_canal.CANAL`, without pickle (replaces scvi-tools' own)."""

    def save(self, dir_path: str | os.PathLike, overwrite: bool = False, **kwargs: Any) -> None:
        """Save to a directory of weights, metadata, example bank, calibration cells and training history.

        The files are ``weights.pt``, ``model.json``, ``example_bank.h5ad``, ``calibration_cells.h5ad`` and
        ``history.csv``; nothing is pickled. The directory is written beside its destination, flushed to disk and
        swapped into place in one step, so the path always holds a whole model, the old or the new (see
        :doc:`/reproducibility`). An existing `dir_path` is an error unless `overwrite`, and even then only a saved
        model or an empty directory is replaced, never other files. A second process saving to the same path is
        refused while this one writes. A save that fails (a full disk, a read-only directory, a missing permission)
        raises an OSError of one sentence, naming the path and the cause, and leaves nothing behind; a model that
        has trained no stage is an error (ValueError).
        """
        save_model(self, dir_path, overwrite=overwrite)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: ad.AnnData | None = None, **kwargs: Any) -> Self:
        """Load a model written by :meth:`save`; `adata` becomes the default data of :meth:`predict`.

        The files read belong to one save, also while another process saves to `dir_path`: a read that a save
        overlapped starts again, and a file is called damaged only when a second read finds it so too.
        """
        return load_model(cls, dir_path, adata=adata)

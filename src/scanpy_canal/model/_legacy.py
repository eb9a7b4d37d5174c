"""Stage checkpoints of the original CANAL tool (``{experiment}_finetune_dataset_{dataset}_CANAL.pth``)."""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse

from scanpy_canal.nn import CheckpointError, infer_config, load_weights
from scanpy_canal.pp import align_genes

from ._io import Model
from ._module import DEFAULT_ARCH
from ._panel import read_genes

logger = logging.getLogger("scanpy_canal")

# numpy's array constructor (under its numpy >= 2 and numpy 1.x names) and the dtypes of names and indices: the
# checkpoints hold numpy arrays (`annotation`, `highly_variable_idx`) that need no code beyond numpy's own to unpickle.
_RECONSTRUCT = np.array(0).__reduce__()[0]
_NUMPY_GLOBALS = [
    np.ndarray,
    np.dtype,
    (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
    (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    *{type(np.dtype(code)) for code in ("O", "U", "S", "?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8")},
]
_STAGE_DIRECTORY = re.compile(r"stage_(\d+)")


def read_legacy_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, Any]:
    """The content of an original CANAL checkpoint, unpickling Python objects only if `trust_pickle`.

    Without `trust_pickle` the file is read with ``torch.load(weights_only=True)``, which accepts tensors and numpy
    arrays (a final-stage checkpoint, which has no example bank) and refuses anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist.")
    try:
        if trust_pickle:
            content = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_NUMPY_GLOBALS):
                content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if trust_pickle:
            raise CheckpointError(f"Could not unpickle checkpoint {str(path)!r}: {error}") from error
        raise CheckpointError(
            f"Checkpoint {str(path)!r} holds pickled Python objects (in the original CANAL's checkpoints, the example "
            "bank is a pickled AnnData). Unpickling a file can run arbitrary code, so it is refused. Pass "
            "trust_pickle=True only for a file from a source you trust."
        ) from error
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"Could not read checkpoint {str(path)!r}: it is truncated or not a PyTorch checkpoint "
            f"({type(error).__name__}: {error})."
        ) from error
    if not isinstance(content, dict) or not isinstance(content.get("model_state_dict"), dict):
        raise CheckpointError(f"Checkpoint {str(path)!r} has no 'model_state_dict'; it is not a CANAL checkpoint.")
    if "annotation" not in content:
        raise CheckpointError(f"Checkpoint {str(path)!r} has no 'annotation' (the cell types); it is not CANAL's.")
    return content


def legacy_panel(
    genes: Sequence[str] | str | os.PathLike, highly_variable_idx: Any, n_positions: int, *, source: str
) -> list[str]:
    """The names of a checkpoint's `n_positions` gene positions.

    `genes` is either the panel itself (`n_positions` names) or the whole vocabulary the original run aligned its
    data to, from which ``highly_variable_idx`` picks the panel. The two cannot be confused: a vocabulary of exactly
    `n_positions` genes has ``highly_variable_idx = 0, 1, ...`` (ascending, distinct), so it is its own panel.
    """
    names = read_genes(genes)
    if len(names) == n_positions:
        return names
    if highly_variable_idx is None:
        raise ValueError(
            f"{source} has {n_positions} gene positions and no 'highly_variable_idx', but {len(names)} genes were "
            "given; give the panel's genes in sequence order."
        )
    positions = np.asarray(highly_variable_idx).astype(np.int64).ravel()
    if len(positions) != n_positions:
        raise CheckpointError(
            f"{source}: 'highly_variable_idx' has {len(positions)} entries but the model has {n_positions} gene "
            "positions."
        )
    if positions.min() < 0 or positions.max() >= len(names):
        raise ValueError(
            f"{source}: 'highly_variable_idx' points up to gene {positions.max()}, but only {len(names)} genes were "
            f"given. Give the panel ({n_positions} genes in sequence order) or the whole vocabulary the original run "
            "aligned its data to (e.g. the 16906 genes of panglao_10000.h5ad)."
        )
    return [names[i] for i in positions]


def legacy_bank(bank: Any, panel: list[str], cell_types: list[str], *, source: str) -> ad.AnnData | None:
    """The original bank (obs ``celltype``, ``rank``, ``stage``) in this package's form, on the model's panel."""
    if bank is None:
        return None
    if not isinstance(bank, ad.AnnData):
        raise CheckpointError(f"{source}: 'example_bank' is a {type(bank).__name__}, not an AnnData.")
    if set(panel) <= set(bank.var_names):
        x = align_genes(bank, panel).X
    elif bank.n_vars == len(panel):  # the original bank has the panel's columns, in order
        logger.warning(
            "%s: the example bank's gene names differ from the panel; its columns are taken in order.", source
        )
        x = sparse.csr_matrix(bank.X, dtype=np.float32)
    else:
        raise CheckpointError(f"{source}: the example bank has {bank.n_vars} genes, the model {len(panel)}.")
    label_column = "celltype" if "celltype" in bank.obs else "cell_type"
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(bank.obs[label_column].astype(str), categories=cell_types),
            "stage": bank.obs["stage"].to_numpy().astype(np.int64),
            "rank": bank.obs["rank"].to_numpy().astype(np.int64),
        },
        index=bank.obs_names.astype(str),
    )
    if obs["cell_type"].isna().any():
        raise CheckpointError(f"{source}: the example bank has cell types that are not in 'annotation'.")
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=pd.Index(panel)))


def _placeholder_registry(cls: type[Model], cell_types: list[str], n_genes: int) -> dict:
    """The scvi-tools registry of data with these cell types and genes (no data is kept)."""
    placeholder = ad.AnnData(
        sparse.csr_matrix((len(cell_types), n_genes), dtype=np.float32),
        obs=pd.DataFrame({"cell_type": pd.Categorical(cell_types)}, index=pd.RangeIndex(len(cell_types)).astype(str)),
    )
    with warnings.catch_warnings():  # one cell per type is all a registry needs
        warnings.filterwarnings("ignore", message=r".*fewer than 3 cells.*")
        cls.setup_anndata(placeholder, labels_key="cell_type")
    return cls._get_most_recent_anndata_manager(placeholder, required=True).registry


def load_legacy_model(
    cls: type[Model],
    path: str | os.PathLike,
    genes: Sequence[str] | str | os.PathLike,
    *,
    trust_pickle: bool = False,
    stage: int | None = None,
) -> Model:
    """Build a trained model of class `cls` from a checkpoint of the original tool.

    See :meth:`~scanpy_canal.CANAL.from_legacy_checkpoint`.
    """
    source = f"Checkpoint {str(path)!r}"
    content = read_legacy_checkpoint(path, trust_pickle=trust_pickle)
    state = {
        key: value.float() if value.is_floating_point() else value for key, value in content["model_state_dict"].items()
    }
    arch = {key: value for key, value in infer_config(state, source=source).items() if key != "max_seq_len"}
    n_positions = state["pos_emb.emb.weight"].shape[0] - 1
    panel = legacy_panel(genes, content.get("highly_variable_idx"), n_positions, source=source)
    cell_types = [str(name) for name in np.asarray(content["annotation"]).ravel()]
    if "to_out.fc3.bias" in state and len(cell_types) != state["to_out.fc3.bias"].shape[0]:
        raise CheckpointError(
            f"{source}: 'annotation' names {len(cell_types)} cell types but the head has "
            f"{state['to_out.fc3.bias'].shape[0]} outputs."
        )
    model = cls._restored(
        registry=_placeholder_registry(cls, cell_types, len(panel)),
        state={"stage_": stage if stage is not None else _stage_from_path(Path(path))},
        genes=panel,
        cell_types=cell_types,
        arch={**DEFAULT_ARCH, **arch},
        trainable_blocks=[-2],
        seed=0,
    )
    load_weights(model.module.network, state, source=source)
    model.module.eval()
    model.example_bank_ = legacy_bank(content.get("example_bank"), panel, cell_types, source=source)
    return model


def _stage_from_path(path: Path) -> int:
    """The stage of the original layout ``{ckpt_dir}{experiment}/stage_{t}/...``, else 1."""
    match = _STAGE_DIRECTORY.fullmatch(path.parent.name)
    return int(match.group(1)) if match else 1


class LegacyCheckpointMixin:
    """Importing stage checkpoints of the original CANAL tool into :class:`~scanpy_canal.CANAL`."""

    @classmethod
    def from_legacy_checkpoint(
        cls,
        path: str | os.PathLike,
        genes: Sequence[str] | str | os.PathLike,
        *,
        trust_pickle: bool = False,
        stage: int | None = None,
    ) -> Self:
        """Build a trained model from a stage checkpoint (``..._CANAL.pth``) of the original CANAL tool.

        The model predicts right away and can train further stages; novel-cell detection needs ``threshold="canal"``
        until it has trained a stage here (the file holds no calibration cells).

        Parameters
        ----------
        path
            The checkpoint.
        genes
            Names of the checkpoint's gene positions (a sequence, a text file with one per line, or an ``.h5ad`` file's
            ``var_names``): the panel in sequence order, or the whole gene list the original run aligned its data to
            (e.g. the 16906 genes of ``panglao_10000.h5ad``), from which the file's ``highly_variable_idx`` picks it.
        trust_pickle
            Unpickle the file's Python objects (its example bank, a pickled AnnData). Unpickling can run arbitrary
            code, so without this only tensors and numpy arrays are read; set it only for a file you trust.
        stage
            Number of stages the checkpoint has completed (default: ``t`` of its ``stage_{t}`` directory, else 1).

        Returns
        -------
        The model, in eval mode.

        Examples
        --------
        >>> model = canal.CANAL.from_legacy_checkpoint(
        ...     "ckpt/pancreas/stage_2/pancreas_finetune_dataset_Enge_CANAL.pth",
        ...     genes="panglao_genes.txt",
        ...     trust_pickle=True,
        ... )  # doctest: +SKIP
        >>> labels = model.predict(query)  # doctest: +SKIP
        """
        return load_legacy_model(cls, path, genes, trust_pickle=trust_pickle, stage=stage)

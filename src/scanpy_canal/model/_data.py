"""Checks and conversions of the data a CANAL model reads."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse
from scvi import REGISTRY_KEYS
from scvi.data._constants import _SCVI_UUID_KEY
from scvi.data.fields import CategoricalObsField, LayerField

from scanpy_canal._choices import BalanceClasses
from scanpy_canal.pp import gene_names, is_natural_log1p, panel_columns, scatter_columns

from ._ontology import read_terms

if TYPE_CHECKING:
    from mudata import MuData
    from scvi.model.base import BaseModelClass

#: The largest possible ``log2(1 + counts per 10k)`` (one gene holding all counts), with float32 rounding room.
MAX_LOG2_CP10K = float(np.log2(1 + 1e4)) + 1e-3
_NORMALIZE_FIRST = "run `canal.pp.normalize(adata)` first (on the command line: add --normalize)"


def refuse_view(adata: ad.AnnData) -> None:
    """Refuse a view: registration writes to `adata`, and scvi-tools ties a model to the registered object."""
    if adata.is_view:
        raise ValueError(
            "adata is a view of another AnnData (e.g. `adata[mask]`); make it an AnnData of its own first: "
            "`adata = adata[mask].copy()`, then `CANAL.setup_anndata(adata, ...)`."
        )


def setup_args(model_cls: type[BaseModelClass], adata: ad.AnnData) -> tuple[str | None, str | None]:
    """``(labels_key, layer)`` registered for `adata`, or for the AnnData it was copied or subset from."""
    args = _registered(model_cls, adata)
    return args.get("labels_key"), args.get("layer")


def registered_gene_symbols(model_cls: type[BaseModelClass], adata: ad.AnnData) -> str | None:
    """The ``gene_symbols`` registered for `adata` (see :func:`setup_args`), `None` if none or unregistered."""
    return _registered(model_cls, adata).get("gene_symbols")


def registered_ontology_key(model_cls: type[BaseModelClass], adata: ad.AnnData) -> str | None:
    """The ``ontology_key`` registered for `adata` (see :func:`setup_args`), `None` if none or unregistered."""
    return _registered(model_cls, adata).get("ontology_key")


def _registered(model_cls: type[BaseModelClass], adata: ad.AnnData) -> dict:
    # scvi's own lookup refuses copies; the setup arguments hold for them all the same.
    manager = model_cls._setup_adata_manager_store.get(adata.uns.get(_SCVI_UUID_KEY))
    return {} if manager is None else manager.registry["setup_args"]


def registration_fields(
    adata: ad.AnnData,
    labels_key: str | None,
    layer: str | None,
    gene_symbols: str | None = None,
    ontology_key: str | None = None,
) -> list:
    """The scvi-tools fields that register `adata` for CANAL: its values and, with a `labels_key`, its cell types.

    `gene_symbols` and `ontology_key` are only checked: the setup arguments record them.
    """
    refuse_view(adata)
    if adata.n_obs == 0:
        raise ValueError("adata has no cells.")
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not found; available layers: {list(adata.layers)}.")
    gene_names(adata, gene_symbols)  # an unknown column is an error now, not at training
    fields = [LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False, correct_data_format=False)]
    if labels_key is not None:
        labels = read_labels(adata, labels_key)
        fields.append(CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key))
        if ontology_key is not None:
            read_terms(adata.obs, labels, ontology_key)
    elif ontology_key is not None:
        raise ValueError("ontology_key names the Cell Ontology ids of the labels: give labels_key with it.")
    return fields


def modality(data: ad.AnnData | MuData | None, mod: str) -> ad.AnnData | None:
    """`data` itself, or for a MuData its modality `mod`."""
    if data is None or isinstance(data, ad.AnnData):
        return data
    from mudata import MuData

    if not isinstance(data, MuData):
        raise TypeError(f"Expected an AnnData or a MuData, got {type(data).__name__}.")
    if mod not in data.mod:
        raise KeyError(
            f"MuData has no modality {mod!r}; it has {list(data.mod)}. Choose one with mod=... (--mod on the command "
            "line)."
        )
    return data.mod[mod]


def layer_matrix(adata: ad.AnnData, layer: str | None):
    """``adata.X``, or the layer `layer`."""
    return adata.X if layer is None else adata.layers[layer]


def read_labels(adata: ad.AnnData, labels_key: str) -> np.ndarray:
    """The labels in ``adata.obs[labels_key]`` as strings; missing or empty labels are an error."""
    if labels_key not in adata.obs:
        raise KeyError(
            f"Labels key {labels_key!r} is not a column of adata.obs; available columns: {list(adata.obs.columns)}."
        )
    column = adata.obs[labels_key]
    missing = column.isna().to_numpy() | (column.astype(str).str.strip() == "").to_numpy()
    if missing.any():
        raise ValueError(
            f"adata.obs[{labels_key!r}] has {int(missing.sum())} missing or empty labels; every training cell needs "
            "a cell type. Drop those cells first, e.g. `adata = adata[adata.obs[key].notna()].copy()`."
        )
    return column.astype(str).to_numpy()


def query_panel(
    model_cls: type[BaseModelClass],
    adata: ad.AnnData,
    genes: Sequence[str],
    *,
    gene_symbols: str | None,
    min_overlap: float,
) -> tuple[str | None, np.ndarray, np.ndarray]:
    """Where a query's panel values are read: its registered layer and its columns of `genes`.

    Columns as :func:`~scanpy_canal.pp.panel_columns` finds them, by `gene_symbols` or else the registered column.
    """
    _, layer = setup_args(model_cls, adata)
    gene_symbols = gene_symbols or registered_gene_symbols(model_cls, adata)
    columns, found = panel_columns(adata, genes, gene_symbols=gene_symbols, min_overlap=min_overlap)
    return layer, columns, found


def panel_chunk(x, start: int, size: int, columns: np.ndarray, found: np.ndarray) -> sparse.csr_matrix:
    """Rows ``start:start + size`` of a query's matrix `x` in the panel (missing genes zero), checked."""
    chunk = scatter_columns(x[start : start + size][:, columns], found)
    check_expression(chunk, what="the query")
    return chunk


def check_expression(x: sparse.csr_matrix | np.ndarray, *, what: str = "adata") -> None:
    """Require ``log2(1 + counts per 10k)`` values: at least one cell; finite, non-negative, not all integers.

    Whole numbers everywhere mean counts (a normalised value is almost never a whole number), values above
    ``log2(1 + 10,000)`` cannot be counts per 10k (counts stored as floats, counts per million, scaled data), and
    values that fit the natural log rather than log2 (the test of :func:`scanpy_canal.pp.normalize`) are
    ``sc.pp.log1p``'s.
    """
    if x.shape[0] == 0:
        raise ValueError(f"{what} has no cells.")
    values = x.data if sparse.issparse(x) else np.asarray(x)
    if values.size == 0:
        return
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contains NaN or infinite values; CANAL needs log2(1 + counts per 10k).")
    if values.min() < 0:
        raise ValueError(
            f"{what} contains negative values (scaled or centred data?); CANAL needs log2(1 + counts per 10k). "
            "Pass counts or log-normalised values through `canal.pp.normalize` first."
        )
    largest = float(values.max())
    if largest > 0 and _whole_numbers(values):
        raise ValueError(f"{what} looks like raw counts (whole numbers up to {largest:g}); {_NORMALIZE_FIRST}.")
    if largest > MAX_LOG2_CP10K:
        raise ValueError(
            f"{what} has values up to {largest:g}, above log2(1 + 10,000) = {MAX_LOG2_CP10K:.2f}, so they are not "
            "log2(1 + counts per 10k) (counts per million? scaled data?). Pass counts or log1p-normalised values "
            f"and {_NORMALIZE_FIRST}."
        )
    if is_natural_log1p(x):
        raise ValueError(
            f"{what} holds log1p values in natural log (as `sc.pp.log1p` writes them), but CANAL bins "
            f"log2(1 + counts per 10k): taken as they are, the cells would fall into the wrong bins; {_NORMALIZE_FIRST}."
        )


def _whole_numbers(values: np.ndarray) -> bool:
    """Whether every value is a whole number; a sample decides first (normalised data fail it at once)."""
    sample = values[:1000]  # values of a sparse matrix, or rows of a dense one
    return bool(np.all(np.mod(sample, 1) == 0) and np.all(np.mod(values, 1) == 0))


def stratified_split(codes: np.ndarray, validation_size: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Split cell indices into training and validation, per class, keeping at least one cell of each class to train.

    When rounding holds out no cell at all (tiny classes), one cell of the largest class is held out.

    Returns
    -------
    Sorted training indices and sorted validation indices.

    Raises
    ------
    ValueError
        If `validation_size` is not in ``(0, 1)``, or if no class has two cells, so that none can be held out.
    """
    if not 0 < validation_size < 1:
        raise ValueError(f"validation_size must be in (0, 1), got {validation_size}.")
    validation, largest = [], np.zeros(0, dtype=np.int64)
    for code in np.unique(codes):
        members = rng.permutation(np.flatnonzero(codes == code))
        n_validation = min(int(round(validation_size * len(members))), len(members) - 1)
        validation.append(members[:n_validation])
        largest = members if len(members) > len(largest) else largest
    if not any(len(part) for part in validation):
        if len(largest) < 2:
            raise ValueError(
                f"No cell can be held out for validation: each of the {len(codes)} training cells is the only one of "
                "its cell type, and every type keeps a cell to train on. A stage needs at least two cells of one "
                "type (held-out cells calibrate novel-cell detection, and may pick the best epoch)."
            )
        validation.append(largest[:1])
    validation = np.sort(np.concatenate(validation)).astype(np.int64)
    training = np.setdiff1d(np.arange(len(codes)), validation)
    return training, validation


def split_stage(
    codes: np.ndarray, n_stage: int, validation_size: float, rng: np.random.Generator, *, split_bank: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices of a stage's cells (the first `n_stage` of `codes`) followed by bank cells.

    With `split_bank`, all cells are split together (:func:`stratified_split`), as the original does; otherwise only
    the stage's own cells are, and every bank cell trains: a bank of a few cells per type loses a fifth of its
    memory to validation otherwise.
    """
    if split_bank or n_stage == len(codes):
        return stratified_split(codes, validation_size, rng)
    training, validation = stratified_split(codes[:n_stage], validation_size, rng)
    return np.concatenate([training, np.arange(n_stage, len(codes))]), validation


def balanced_class_weights(codes: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's ``"balanced"`` weights, ``n / (k * n_c)`` over the `k` classes present; 0 for an absent class.

    Every class then carries the same total weight, and the weighted cells still sum to `n`.
    """
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = len(codes) / (present.sum() * counts[present])
    return weights


def balances_classes(balance_classes: BalanceClasses, history: Sequence[dict], *, replays: bool) -> bool:
    """Whether a stage weighs every type the same in its loss (see ``balance_classes``), after the stages `history`.

    ``"auto"``: where the stage `replays` a bank that is a sample of the earlier stages' training cells; the banks of
    models saved before stages recorded ``bank_kept_every_cell`` count as samples.
    """
    if balance_classes != "auto":
        return balance_classes
    return replays and not all(record.get("bank_kept_every_cell", False) for record in history)


def highly_variable_genes(x: sparse.csr_matrix | np.ndarray, var_names: Sequence[str], n_top_genes: int) -> list[str]:
    """The `n_top_genes` most variable genes (scanpy's 'seurat' flavour on log2 data), in their original order."""
    import scanpy as sc

    if n_top_genes > len(var_names):
        raise ValueError(f"n_top_genes={n_top_genes} exceeds the {len(var_names)} genes of the data.")
    scratch = ad.AnnData(x, var=pd.DataFrame(index=pd.Index(var_names, dtype=str)))
    scratch.uns["log1p"] = {"base": 2}
    sc.pp.highly_variable_genes(scratch, n_top_genes=n_top_genes, flavor="seurat")
    return list(scratch.var_names[scratch.var["highly_variable"].to_numpy()])


def h5ad_var_names(path: str | os.PathLike) -> list[str]:
    """The ``var_names`` of an ``.h5ad`` file, read without loading its matrix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Gene file {str(path)!r} does not exist.")
    backed = ad.read_h5ad(path, backed="r")
    try:
        return [str(name) for name in backed.var_names]
    finally:
        backed.file.close()


def cell_fingerprints(cells: ad.AnnData) -> set[bytes]:
    """A digest of each cell's observation name and values (X), the same for the same cell in any sparse layout."""
    x = sparse.csr_matrix(cells.X, dtype=np.float32, copy=True)
    x.sum_duplicates()  # sorted indices, each once
    x.eliminate_zeros()
    rows = zip(cells.obs_names, x.indptr[:-1], x.indptr[1:], strict=True)
    return {
        hashlib.blake2b(
            str(name).encode() + b"\0" + x.indices[start:end].astype(np.int64).tobytes() + x.data[start:end].tobytes(),
            digest_size=16,
        ).digest()
        for name, start, end in rows
    }

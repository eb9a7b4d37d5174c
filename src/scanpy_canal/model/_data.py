"""Checks and conversions of the data a CANAL model reads."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from scanpy_canal.nn import N_BINS


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


def check_expression(x: sparse.csr_matrix | np.ndarray, *, what: str = "adata") -> None:
    """Require finite, non-negative ``log2(1 + counts per 10k)`` values with at least one cell."""
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
    if values.max() > 2 * N_BINS and np.all(np.mod(values, 1) == 0):
        raise ValueError(
            f"{what} looks like raw counts (integers up to {values.max():g}); run `canal.pp.normalize(adata)` first."
        )


def stratified_split(codes: np.ndarray, validation_size: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Split cell indices into training and validation, per class, keeping at least one cell of each class to train.

    Returns
    -------
    Sorted training indices and sorted validation indices.
    """
    if not 0 <= validation_size < 1:
        raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
    validation = []
    for code in np.unique(codes):
        members = rng.permutation(np.flatnonzero(codes == code))
        n_validation = min(int(round(validation_size * len(members))), len(members) - 1)
        validation.append(members[:n_validation])
    validation = np.sort(np.concatenate(validation)).astype(np.int64)
    training = np.setdiff1d(np.arange(len(codes)), validation)
    return training, validation


def highly_variable_genes(x: sparse.csr_matrix | np.ndarray, var_names: Sequence[str], n_top_genes: int) -> list[str]:
    """The `n_top_genes` most variable genes (scanpy's 'seurat' flavour on log2 data), in their original order."""
    import scanpy as sc

    if n_top_genes > len(var_names):
        raise ValueError(f"n_top_genes={n_top_genes} exceeds the {len(var_names)} genes of the data.")
    scratch = ad.AnnData(x, var=pd.DataFrame(index=pd.Index(var_names, dtype=str)))
    scratch.uns["log1p"] = {"base": 2}
    sc.pp.highly_variable_genes(scratch, n_top_genes=n_top_genes, flavor="seurat")
    return list(scratch.var_names[scratch.var["highly_variable"].to_numpy()])

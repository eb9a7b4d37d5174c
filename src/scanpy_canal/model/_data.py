"""Checks and conversions of the data a CANAL model reads."""

from __future__ import annotations

import os
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

#: The largest possible ``log2(1 + counts per 10k)`` (one gene holding all counts), with float32 rounding room.
MAX_LOG2_CP10K = float(np.log2(1 + 1e4)) + 1e-3


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
    """Require ``log2(1 + counts per 10k)`` values: at least one cell; finite, non-negative, not all integers.

    Whole numbers everywhere mean counts (a normalised value is almost never a whole number), and values above
    ``log2(1 + 10,000)`` cannot be counts per 10k (counts stored as floats, counts per million, scaled data).
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
        raise ValueError(
            f"{what} looks like raw counts (whole numbers up to {largest:g}); run `canal.pp.normalize(adata)` first."
        )
    if largest > MAX_LOG2_CP10K:
        raise ValueError(
            f"{what} has values up to {largest:g}, above log2(1 + 10,000) = {MAX_LOG2_CP10K:.2f}, so they are not "
            "log2(1 + counts per 10k) (counts per million? scaled data?). Run `canal.pp.normalize(adata)` on counts "
            "or log1p-normalised values first."
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
                "type (validation picks the best epoch and calibrates novel-cell detection)."
            )
        validation.append(largest[:1])
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


def h5ad_var_names(path: str | os.PathLike) -> list[str]:
    """The ``var_names`` of an ``.h5ad`` file, read without loading its matrix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Gene file {str(path)!r} does not exist.")
    backed = ad.read_h5ad(path, backed="r")
    try:
        return [str(name) for name in backed.var_names]
    finally:
        backed.file.close()

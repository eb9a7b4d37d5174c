"""Detect what expression values are and bring them to ``log2(1 + counts per 10k)``, the scale CANAL tokenises."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

logger = logging.getLogger("scanpy_canal")

Detected = Literal["counts", "log1p", "log2"]

TARGET_SUM = 1e4
_BASES: dict[str, float] = {"log1p": np.e, "log2": 2.0}
_MAX_CHECK_CELLS = 2000  # base detection looks at a seeded random subset of at most this many cells
_MIN_PASS_FRACTION = 0.9  # of the values within a cell, and of the cells, that must fit a base
_TOTAL_TOLERANCE = 0.01  # relative spread of cell totals still read as "one total for every cell"
_MAX_RATIO = 100.0  # larger count ratios carry too little precision to tell a base apart


def normalize(
    adata: AnnData, *, layer: str | None = None, target_sum: float = TARGET_SUM, copy: bool = False
) -> AnnData | None:
    """Bring expression values to ``log2(1 + counts per 10k)``, detecting whether they are counts or log1p values.

    The values are recognised as one of

    - raw counts (all values are integers, whatever the dtype),
    - ``log1p`` of normalised counts in natural log (e.g. ``sc.pp.log1p`` after ``sc.pp.normalize_total``,
      or ``sc.datasets.pbmc68k_reduced().raw``),
    - ``log1p`` of normalised counts in base 2 (e.g. ``sc.pp.log1p(base=2)``, or the output of this function).

    Counts are scaled so that each cell sums to 10,000 over the genes present in `adata` (as the original CANAL
    pipeline does after aligning to its gene list), and ``log2(1 + x)`` is applied. For log1p values the log is
    undone first; if every cell then has the same total, the data hold all genes and each cell is rescaled to 10,000
    (whatever target was used before). If the totals differ, the data are a subset of the genes that were normalised
    (as ``pbmc68k_reduced().raw``, 765 of the genes of a 10,000-per-cell normalisation): renormalising over the subset
    would inflate every value, so the values are kept on their scale, taken to be counts per `target_sum`. Applying
    the function twice gives the same values. Cells without any expressed gene stay zero. Base detection relies on
    the smallest non-zero value of a cell being one count, which holds for droplet data.

    Parameters
    ----------
    adata
        Annotated data matrix, cells by genes.
    layer
        Read the values from ``adata.layers[layer]`` instead of ``adata.X``. The layer itself is left unchanged.
    target_sum
        The per-cell total that log1p values of a gene subset were normalised to (scanpy's usual 10,000).
    copy
        Return a normalised copy instead of writing to `adata`.

    Returns
    -------
    `None` if ``copy=False``, else a new :class:`~anndata.AnnData`. Writes

    ``adata.X``
        ``log2(1 + counts per 10k)`` as float32; CSR sparse if the input was sparse, dense otherwise.
    ``adata.uns["canal_normalize"]``
        ``{"detected": "counts" | "log1p" | "log2", "rescaled": "per cell" | "kept", "target_sum": 10000.0,
        "layer": layer}``; ``"kept"`` means log1p values of a gene subset were taken as counts per `target_sum`.

    Raises
    ------
    ValueError
        If the data are empty, contain NaN, infinite or negative values (scaled data), or are neither counts
        nor log1p-normalised counts.

    Examples
    --------
    >>> import scanpy as sc
    >>> import scanpy_canal as canal
    >>> adata = sc.datasets.pbmc68k_reduced().raw.to_adata()
    >>> canal.pp.normalize(adata)
    >>> adata.uns["canal_normalize"]["detected"]
    'log1p'
    """
    X = adata.X if layer is None else adata.layers[layer]
    _check_values(X)
    detected = _detect(X)
    logger.info("normalize: detected %s values, writing log2(1 + counts per 10k) to X", detected)
    result, rescaled = _to_log2_cp10k(X, detected, target_sum)
    if copy:
        adata = adata.copy()
    elif adata.is_view:
        adata._init_as_actual(adata.copy())  # as scanpy does: a view becomes its own AnnData before writing
    adata.X = result
    adata.uns["canal_normalize"] = {
        "detected": detected,
        "rescaled": rescaled,
        "target_sum": TARGET_SUM if rescaled == "per cell" else float(target_sum),
        "layer": layer,
    }
    return adata if copy else None


def _values(X) -> np.ndarray:
    """The stored values: the non-zero entries of a sparse matrix, or the whole dense array."""
    return X.data if sp.issparse(X) else np.asarray(X)


def _check_values(X) -> None:
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"The data are empty ({X.shape[0]} cells x {X.shape[1]} genes).")
    values = _values(X)
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
        raise ValueError(f"Expression values must be numeric, got dtype {values.dtype}.")
    n_bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if n_bad:
        raise ValueError(f"The data contain {n_bad} NaN or infinite values; remove or fix them before normalising.")
    n_negative = int(np.count_nonzero(values < 0))
    if n_negative:
        raise ValueError(
            f"The data contain {n_negative} negative values: they look scaled or centred "
            "(like `sc.datasets.pbmc68k_reduced().X`). Pass raw counts or log-normalised data instead, "
            'e.g. `adata.raw.to_adata()` or `layer="counts"`.'
        )


def _detect(X) -> Detected:
    values = _values(X)
    if values.dtype == bool or np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values)):
        return "counts"
    fractions = _base_fractions(X)
    logger.debug("normalize: fraction of cells fitting each log base: %s", fractions)
    if all(np.isnan(f) for f in fractions.values()):
        # Every cell has a single non-zero level: all bases give the same counts per 10k.
        return "log1p"
    best = max(fractions, key=lambda name: np.nan_to_num(fractions[name]))
    if not fractions[best] >= _MIN_PASS_FRACTION:
        raise ValueError(
            "The data are neither raw counts (non-integer values found) nor log1p of normalised counts in natural "
            f"or base-2 log (fraction of cells consistent with each: {fractions}). Pass raw counts, or the output "
            "of `sc.pp.normalize_total` followed by `sc.pp.log1p`, e.g. `adata.raw.to_adata()` or "
            '`layer="counts"`.'
        )
    return best


def is_natural_log1p(X) -> bool:
    """Whether non-integer values are ``log1p`` of normalised counts in natural log, as :func:`normalize` tells.

    False for log2 values and for values that fit neither base or cannot tell the bases apart.
    """
    fractions = _base_fractions(X)
    return fractions["log1p"] >= _MIN_PASS_FRACTION and not fractions["log2"] >= fractions["log1p"]


def _base_fractions(X) -> dict[str, float]:
    """For each log base, the fraction of (a sample of) cells whose values fit it; see :func:`_base_fit`."""
    subset = _check_subset(X)
    return {name: _base_fit(subset, base) for name, base in _BASES.items()}


def _check_subset(X) -> sp.csr_matrix:
    """A seeded random subset of at most `_MAX_CHECK_CELLS` cells, as float64 CSR without stored zeros."""
    n_obs = X.shape[0]
    if n_obs > _MAX_CHECK_CELLS:
        rows = np.sort(np.random.default_rng(0).choice(n_obs, _MAX_CHECK_CELLS, replace=False))
        X = X[rows]
    subset = sp.csr_matrix(X, dtype=np.float64, copy=True)
    subset.eliminate_zeros()
    return subset


def _base_fit(subset: sp.csr_matrix, base: float) -> float:
    """Fraction of cells whose values are ``log_base(1 + k * u)`` for integers ``k`` and one per-cell unit ``u``.

    ``u`` is taken from the smallest non-zero value of each cell (one count). Values consistent with one count
    say nothing about the base, so cells with no other value are left out; NaN if no cell is informative.
    """
    nnz = np.diff(subset.indptr)
    expressed = nnz > 0
    if not expressed.any():
        return float("nan")
    cell_min = np.minimum.reduceat(subset.data, subset.indptr[:-1][expressed])
    row = np.repeat(np.arange(expressed.sum()), nnz[expressed])
    ratio = np.expm1(subset.data * np.log(base)) / np.expm1(cell_min * np.log(base))[row]
    nearest = np.rint(ratio)
    # Absolute float32 error plus a relative part for values stored with few decimals (pbmc68k_reduced has 3).
    near_integer = np.abs(ratio - nearest) <= 0.02 + 1e-3 * ratio
    informative = (ratio <= _MAX_RATIO) & ~(near_integer & (nearest == 1))
    n_informative = np.bincount(row[informative], minlength=expressed.sum())
    n_fit = np.bincount(row[informative & near_integer], minlength=expressed.sum())
    has_info = n_informative > 0
    if not has_info.any():
        return float("nan")
    return float(np.mean(n_fit[has_info] >= _MIN_PASS_FRACTION * n_informative[has_info]))


def _to_counts_scale(values: np.ndarray, detected: Detected) -> np.ndarray:
    """Undo the log (in place where possible): values proportional to counts, as float64."""
    if detected == "counts":
        return values
    return np.expm1(values * np.log(_BASES[detected]), out=values)


def _constant_totals(row_sums: np.ndarray) -> bool:
    """Whether the expressed cells share one total (within storage precision): the data hold all genes."""
    totals = row_sums[row_sums > 0]
    if totals.size == 0:
        return True
    low, high = np.percentile(totals, [1, 99])
    return (high - low) <= _TOTAL_TOLERANCE * np.median(totals)


def _log2_scaled(values: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    values *= scale
    return (np.log1p(values) / np.log(2)).astype(np.float32)


def _to_log2_cp10k(X, detected: Detected, target_sum: float) -> tuple[np.ndarray | sp.csr_matrix, str]:
    """``log2(1 + counts per 10k)`` and how cells were scaled ("per cell" or "kept")."""
    if sp.issparse(X):
        out = sp.csr_matrix(X, dtype=np.float64, copy=True)
        out.data = _to_counts_scale(out.data, detected)
        row_sums = np.asarray(out.sum(axis=1)).ravel()
    else:
        out = _to_counts_scale(np.array(X, dtype=np.float64, copy=True), detected)
        row_sums = out.sum(axis=1)
    if detected == "counts" or _constant_totals(row_sums):
        with np.errstate(divide="ignore", invalid="ignore"):
            scale, rescaled = np.where(row_sums > 0, TARGET_SUM / row_sums, 0.0), "per cell"
    else:
        scale, rescaled = TARGET_SUM / target_sum, "kept"
        logger.info(
            "normalize: cell totals differ, so the values are taken as counts per %g of a gene subset", target_sum
        )
    if sp.issparse(out):
        out.data = _log2_scaled(out.data, np.repeat(scale, np.diff(out.indptr)) if np.ndim(scale) else scale)
        return out.astype(np.float32), rescaled
    return _log2_scaled(out, scale[:, None] if np.ndim(scale) else scale), rescaled

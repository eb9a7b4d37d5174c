"""A seeded synthetic continual stream of count data: new types per stage, one batch effect per stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scanpy_canal.pp import TARGET_SUM

from ._stream import Stream, check_test_size, set_labels, split_stratified

LABELS_KEY = "cell_type"
_BASELINE_SD = 1.5  # log-normal spread of the shared baseline: few genes dominate, most are low
_DISPERSION = 5.0  # negative binomial inverse dispersion (Gamma shape)
_LIBRARY_SIZE = (np.log(5000), 0.3)  # log-normal mean and sd of UMIs per cell, over the whole transcriptome
_PANEL_COUNTS_PER_GENE = 3.0  # mean UMIs per panel gene: the panel is a small part of each cell's transcriptome


def synthetic_stream(
    *,
    n_stages: int = 3,
    n_genes: int = 200,
    types_per_stage: int = 2,
    n_novel_types: int = 1,
    cells_per_type: int = 60,
    test_size: float = 0.3,
    batch_effect: float = 0.5,
    old_types_recur: bool = True,
    marker_fold: tuple[float, float] = (4.0, 16.0),
    seed: int = 0,
) -> Stream:
    """Seeded synthetic stream of negative binomial counts with cell-type programs and per-stage batch effects.

    Every type has a program: a set of marker genes raised `marker_fold` (4 to 16 fold by default) over a shared
    log-normal baseline.
    Each stage is a batch: the expected expression of every gene is multiplied by ``exp(N(0, batch_effect))``.
    Stage ``t`` brings `types_per_stage` new types (``cells_per_type`` cells each) and, if `old_types_recur`, also
    ``cells_per_type // 2`` cells of each earlier type under its own batch. Library sizes are log-normal around
    5000 UMIs
    over the whole transcriptome, of which the panel holds about 3 UMIs per gene; ``X`` is normalised by the whole
    library, as for a gene panel cut from real data. The `n_novel_types` types only occur in ``novel``, under a batch of their own. Each stage is split,
    stratified by type, into train and test.

    Parameters
    ----------
    n_stages
        Number of stages.
    n_genes
        Number of genes, named ``gene_0``, ``gene_1``, ...
    types_per_stage
        New types per stage; types are named ``type_0``, ``type_1``, ... in order of appearance.
    n_novel_types
        Types only in ``novel``; 0 gives ``novel=None``.
    cells_per_type
        Cells of each new type in its stage (and of each novel type).
    test_size
        Fraction of each stage's cells held out in ``test``.
    batch_effect
        Standard deviation of the log gene-wise batch shift.
    old_types_recur
        Whether later stages also contain cells of earlier types.
    marker_fold
        Range of the multiplicative rise of each marker gene (drawn uniformly); closer to 1 makes types harder to
        tell apart.
    seed
        Seed of everything; the same seed gives identical data.

    Returns
    -------
    A :class:`Stream`. Each AnnData has ``X`` = ``log2(1 + counts per 10k)`` (float32 CSR), ``layers["counts"]``
    (float32 CSR), ``obs["total_counts"]`` (the whole library), ``obs["cell_type"]`` (categorical), ``obs["stage"]`` (the stage; -1 in ``novel``),
    and ``var["marker_of"]`` (the type whose program contains the gene, or ``""``).

    Raises
    ------
    ValueError
        If a size is too small or `test_size` is not strictly between 0 and 1.

    Examples
    --------
    >>> import scanpy_canal as canal
    >>> stream = canal.datasets.synthetic_stream(n_stages=2, n_genes=100, seed=1)
    >>> [a.n_obs for a in stream.train], stream.novel_types
    ([84, 126], ['type_4'])
    """
    _check_arguments(n_stages, n_genes, types_per_stage, n_novel_types, cells_per_type, batch_effect)
    if not 1 < marker_fold[0] <= marker_fold[1]:
        raise ValueError(f"marker_fold must be a range (low, high) with 1 < low <= high, got {marker_fold}.")
    check_test_size(test_size)
    rng = np.random.default_rng(seed)
    n_known = n_stages * types_per_stage
    types = [f"type_{k}" for k in range(n_known + n_novel_types)]
    programs, markers = _programs(rng, n_genes, len(types), marker_fold)
    var = pd.DataFrame(
        {"marker_of": _marker_names(markers, types, n_genes)}, index=[f"gene_{g}" for g in range(n_genes)]
    )

    train, test = [], []
    for stage in range(n_stages):
        new = list(range(stage * types_per_stage, (stage + 1) * types_per_stage))
        old = list(range(stage * types_per_stage)) if old_types_recur else []
        n_cells = [max(cells_per_type // 2, 2)] * len(old) + [cells_per_type] * len(new)
        data = _draw(rng, programs, old + new, n_cells, batch_effect)
        adata = _to_anndata(*data, types, var, prefix=f"s{stage}", stage=stage)
        stage_train, stage_test = split_stratified(adata, LABELS_KEY, test_size=test_size, seed=seed + stage)
        train.append(stage_train)
        test.append(stage_test)

    novel = None
    if n_novel_types:
        novel_ids = list(range(n_known, len(types)))
        data = _draw(rng, programs, novel_ids, [cells_per_type] * n_novel_types, batch_effect)
        novel = _to_anndata(*data, types, var, prefix="novel", stage=-1)
    return Stream(train=train, test=test, novel=novel, labels_key=LABELS_KEY, novel_types=types[n_known:])


def _check_arguments(
    n_stages: int, n_genes: int, types_per_stage: int, n_novel_types: int, cells_per_type: int, batch_effect: float
) -> None:
    minimum = {"n_stages": (n_stages, 1), "n_genes": (n_genes, 10), "types_per_stage": (types_per_stage, 1)}
    minimum |= {"n_novel_types": (n_novel_types, 0), "cells_per_type": (cells_per_type, 4)}
    for name, (value, low) in minimum.items():
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}.")
    if batch_effect < 0:
        raise ValueError(f"batch_effect must be non-negative, got {batch_effect}.")


def _programs(
    rng: np.random.Generator, n_genes: int, n_types: int, marker_fold: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-type log expected expression (n_types, n_genes) and marker genes (n_types, n_markers)."""
    n_markers = max(3, n_genes // 20)
    baseline = rng.normal(0.0, _BASELINE_SD, n_genes)
    # Consecutive slices of one permutation: disjoint marker sets while the genes suffice, overlapping after.
    markers = rng.permutation(n_genes)[np.arange(n_types * n_markers).reshape(n_types, n_markers) % n_genes]
    programs = np.tile(baseline, (n_types, 1))
    rises = np.log(rng.uniform(*marker_fold, size=markers.shape))
    np.add.at(programs, (np.arange(n_types)[:, None], markers), rises)
    return programs, markers


def _marker_names(markers: np.ndarray, types: list[str], n_genes: int) -> np.ndarray:
    names = np.full(n_genes, "", dtype=object)
    for k, genes in enumerate(markers):
        names[genes] = types[k]  # with overlapping programs, the later type wins
    return names


def _draw(
    rng: np.random.Generator, programs: np.ndarray, type_ids: list[int], n_cells: list[int], batch_effect: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Negative binomial counts (as Gamma-Poisson) of `n_cells[i]` cells of each type, under one new batch."""
    batch = rng.normal(0.0, batch_effect, programs.shape[1])
    cell_type = np.repeat(type_ids, n_cells)
    proportions = np.exp(programs[cell_type] + batch)
    proportions /= proportions.sum(axis=1, keepdims=True)
    library = rng.lognormal(*_LIBRARY_SIZE, size=len(cell_type))
    panel_share = min(1.0, _PANEL_COUNTS_PER_GENE * programs.shape[1] / np.exp(_LIBRARY_SIZE[0]))
    means = proportions * (library * panel_share)[:, None]
    counts = rng.poisson(rng.gamma(_DISPERSION, means / _DISPERSION))
    return counts, cell_type, library


def _to_anndata(
    counts: np.ndarray,
    cell_type: np.ndarray,
    library: np.ndarray,
    types: list[str],
    var: pd.DataFrame,
    *,
    prefix: str,
    stage: int,
) -> AnnData:
    # Counts per 10k of the cell's whole library, as for a gene panel cut from real data.
    values = sp.csr_matrix(np.log2(1 + counts / library[:, None] * TARGET_SUM), dtype=np.float32)
    obs = pd.DataFrame({"total_counts": library}, index=[f"{prefix}_cell_{i}" for i in range(counts.shape[0])])
    adata = AnnData(X=values, obs=obs, var=var.copy(), layers={"counts": sp.csr_matrix(counts, dtype=np.float32)})
    set_labels(adata, np.asarray(types, dtype=object)[cell_type], types, LABELS_KEY, stage)
    return adata

"""A class-incremental stream from the PBMC data that ship with scanpy (no download)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from anndata import AnnData

from scanpy_canal.pp import normalize

from ._stream import Stream, check_test_size, set_labels, split_stratified

_SOURCE_LABELS = "bulk_labels"
LABELS_KEY = "cell_type"


def pbmc68k_stream(
    *,
    n_stages: int = 3,
    stages: Sequence[Sequence[str]] | None = None,
    novel_types: Sequence[str] = ("CD34+",),
    test_size: float = 0.3,
    seed: int = 0,
) -> Stream:
    """Class-incremental stream from :func:`scanpy.datasets.pbmc68k_reduced` (700 cells, 765 genes, 10 types).

    The types of ``obs["bulk_labels"]`` that are not in `novel_types` are sorted by abundance (largest first)
    and dealt round-robin to `n_stages` stages, so each stage brings new types, big and small; or `stages` names
    each stage's types, e.g. a lineage at a time, so that a stage brings the relatives of earlier types. Each stage's
    cells are split, stratified by type, into train and test. All cells of `novel_types` go to ``novel``.
    Values are the ``.raw`` log-normalised data brought to ``log2(1 + counts per 10k)`` by
    :func:`scanpy_canal.pp.normalize`.

    Parameters
    ----------
    n_stages
        Number of stages; at most the number of non-novel types. Ignored with `stages`.
    stages
        The types of each stage, in order: each type of ``obs["bulk_labels"]`` at most once, none of `novel_types`;
        types named nowhere are left out. Default: the types dealt by abundance.
    novel_types
        Types held out of every stage and put in ``novel``; may be empty.
    test_size
        Fraction of each stage's cells held out in ``test``.
    seed
        Seed of the train/test split.

    Returns
    -------
    A :class:`Stream` whose AnnData have ``obs["cell_type"]`` (categorical: the types present) and ``obs["stage"]``
    (the stage index; -1 in ``novel``), besides the original ``obs`` columns.

    Raises
    ------
    ValueError
        If `n_stages` is below 1 or above the number of non-novel types, if a novel type is unknown, if `stages`
        names an unknown type, a novel type or a type twice, or if `test_size` is not strictly between 0 and 1.

    Examples
    --------
    >>> import scanpy_canal as canal
    >>> stream = canal.datasets.pbmc68k_stream(n_stages=3)
    >>> stream.n_stages, stream.novel_types
    (3, ['CD34+'])
    >>> lineages = canal.datasets.pbmc68k_stream(stages=[["CD19+ B", "CD14+ Monocyte"], ["CD56+ NK", "Dendritic"]])
    >>> [sorted(stage.obs["cell_type"].unique()) for stage in lineages.train]
    [['CD14+ Monocyte', 'CD19+ B'], ['CD56+ NK', 'Dendritic']]
    """
    import scanpy as sc

    check_test_size(test_size)
    adata = _load_normalized(sc.datasets.pbmc68k_reduced())
    labels = adata.obs[_SOURCE_LABELS].astype(str)
    novel_types = _check_novel_types(novel_types, labels)
    if stages is None:
        groups = _deal_types(labels[~labels.isin(novel_types)], n_stages)
    else:
        groups = _check_stages(stages, labels, novel_types)
    order = [t for group in groups for t in group] + novel_types

    train, test = [], []
    for stage, types in enumerate(groups):
        stage_data = adata[labels.isin(types).to_numpy()].copy()
        set_labels(stage_data, labels[labels.isin(types)], order, LABELS_KEY, stage)
        stage_train, stage_test = split_stratified(stage_data, LABELS_KEY, test_size=test_size, seed=seed + stage)
        train.append(stage_train)
        test.append(stage_test)
    return Stream(train=train, test=test, novel=_novel(adata, labels, novel_types, order), novel_types=novel_types)


def _load_normalized(source: AnnData) -> AnnData:
    adata = AnnData(X=source.raw.X.copy(), obs=source.obs.copy(), var=pd.DataFrame(index=source.raw.var_names))
    normalize(adata)
    return adata


def _check_novel_types(novel_types: Sequence[str], labels: pd.Series) -> list[str]:
    if isinstance(novel_types, str):
        novel_types = [novel_types]
    available = labels.value_counts().index.tolist()
    unknown = [t for t in novel_types if t not in available]
    if unknown:
        raise ValueError(f"Unknown novel types {unknown}; available types: {available}.")
    return list(dict.fromkeys(novel_types))


def _check_stages(stages: Sequence[Sequence[str]], labels: pd.Series, novel_types: list[str]) -> list[list[str]]:
    """`stages` as lists of types (a string is a stage of one type), or a clear error."""
    groups = [[types] if isinstance(types, str) else list(types) for types in stages]
    if not groups:
        raise ValueError("stages must name at least one stage.")
    named = [t for group in groups for t in group]
    problems = {
        "unknown": sorted(set(named) - set(labels)),
        "novel": sorted(set(named) & set(novel_types)),
        "named twice": sorted({t for t in named if named.count(t) > 1}),
        "empty stages": [i + 1 for i, group in enumerate(groups) if not group],
    }
    found = "; ".join(f"{what}: {found}" for what, found in problems.items() if found)
    if found:
        raise ValueError(f"stages must name each stage's known, non-novel types, each once ({found}).")
    return groups


def _deal_types(labels: pd.Series, n_stages: int) -> list[list[str]]:
    """Types sorted by abundance (ties by name), dealt round-robin to `n_stages` groups."""
    counts = labels.value_counts()
    types = sorted(counts.index, key=lambda t: (-counts[t], t))
    if not 1 <= n_stages <= len(types):
        raise ValueError(
            f"n_stages must be between 1 and the number of non-novel types ({len(types)}), got {n_stages}."
        )
    return [types[stage::n_stages] for stage in range(n_stages)]


def _novel(adata: AnnData, labels: pd.Series, novel_types: list[str], order: list[str]) -> AnnData | None:
    if not novel_types:
        return None
    is_novel = labels.isin(novel_types)
    novel = adata[is_novel.to_numpy()].copy()
    set_labels(novel, labels[is_novel], order, LABELS_KEY, stage=-1)
    return novel

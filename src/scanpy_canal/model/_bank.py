"""The example bank: a class-balanced, fixed-size set of representative cells replayed in later stages."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd


def select_examples(
    embedding: np.ndarray, labels: Sequence[str], prototypes: np.ndarray, cell_types: Sequence[str], quota: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pick, for every cell type present, the `quota` cells most similar to the type's prototype.

    Similarity is the raw dot product between a cell's embedding and the output-weight row of its type, looked up
    **by name** in `cell_types` (the original tool used the type's position in the stage's own label list).

    Parameters
    ----------
    embedding
        ``(cells, embedding_dim)`` embeddings of the stage's cells.
    labels
        Cell type of each cell.
    prototypes
        ``(len(cell_types), embedding_dim)`` rows of the classifier's output weight.
    cell_types
        Names of the prototype rows, in row order.
    quota
        Maximum number of cells per type.

    Returns
    -------
    Indices of the chosen cells, and their rank within their type (1 = most similar).
    """
    labels = np.asarray(labels)
    row_of = {name: row for row, name in enumerate(cell_types)}
    chosen, ranks = [], []
    for name in pd.unique(labels):
        members = np.flatnonzero(labels == name)
        similarity = embedding[members] @ prototypes[row_of[name]]
        order = np.argsort(-similarity, kind="stable")[:quota]
        chosen.append(members[order])
        ranks.append(np.arange(1, len(order) + 1))
    if not chosen:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(chosen), np.concatenate(ranks)


def trim_to_quota(obs: pd.DataFrame, quota: int) -> np.ndarray:
    """Boolean mask of the rows to keep so that no cell type exceeds `quota` examples.

    For a type with ``n > quota`` rows, ``d = n - quota`` and ``r`` the ``d``-th largest rank, the rows with rank
    below ``r`` are kept: every stage keeps its best-ranked examples in about equal numbers (ties may drop a few
    more than ``d``, as in the original).
    """
    keep = np.ones(len(obs), dtype=bool)
    for _, rows in obs.groupby("cell_type", observed=True).indices.items():
        excess = len(rows) - quota
        if excess <= 0:
            continue
        ranks = obs["rank"].to_numpy()[rows]
        cutoff = np.sort(ranks)[::-1][excess - 1]
        keep[rows] = ranks < cutoff
    return keep


def update_bank(
    bank: ad.AnnData | None,
    stage_data: ad.AnnData,
    labels: Sequence[str],
    embedding: np.ndarray,
    prototypes: np.ndarray,
    cell_types: Sequence[str],
    *,
    stage: int,
    size: int,
) -> ad.AnnData:
    """Add the stage's best examples to the bank and trim every type to ``size // len(cell_types)`` cells.

    Parameters
    ----------
    bank
        The bank so far, or `None` before the first stage.
    stage_data
        The stage's cells in the model's gene panel.
    labels
        Their cell types.
    embedding, prototypes, cell_types
        As in :func:`select_examples`.
    stage
        Stage number recorded in ``obs["stage"]``.
    size
        The bank's capacity L.

    Returns
    -------
    The new bank: X in the model's gene panel, obs ``cell_type`` (categorical in `cell_types` order), ``stage`` and
    ``rank``.
    """
    quota = size // len(cell_types)
    chosen, ranks = select_examples(embedding, labels, prototypes, cell_types, quota)
    picks = stage_data[chosen].copy()
    picks.obs = pd.DataFrame(
        {"cell_type": np.asarray(labels)[chosen], "stage": stage, "rank": ranks}, index=picks.obs_names
    )
    parts = [part for part in (bank, picks) if part is not None and part.n_obs > 0]
    merged = ad.concat(parts, merge="first") if len(parts) > 1 else (parts[0] if parts else picks).copy()
    merged.obs["cell_type"] = merged.obs["cell_type"].astype(str)
    merged.obs[["stage", "rank"]] = merged.obs[["stage", "rank"]].astype(np.int64)
    merged = merged[trim_to_quota(merged.obs, quota)].copy()
    # Set after subsetting, which would drop the categories of types without examples.
    merged.obs["cell_type"] = pd.Categorical(merged.obs["cell_type"], categories=list(cell_types))
    merged.obs_names_make_unique()
    return merged

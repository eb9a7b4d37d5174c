"""Majority voting: every cell of a fine cluster takes the prediction most of the cluster's cells got."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

#: Leiden resolution of the over-clustering made when none is given: fine, so that a cluster rarely spans two types.
RESOLUTION = 5.0
#: Neighbours of each cell in the graph that over-clustering cuts.
N_NEIGHBORS = 15


def over_clusters(adata: AnnData, over_clustering: str | Sequence | None, embedding: np.ndarray) -> pd.Categorical:
    """The clusters to vote in: a column of ``adata.obs``, one label per cell, or Leiden clusters of `embedding`."""
    if over_clustering is None:
        return leiden_clusters(embedding)
    if isinstance(over_clustering, str):
        if over_clustering not in adata.obs:
            raise KeyError(
                f"over_clustering={over_clustering!r} is not a column of obs; available: {list(adata.obs.columns)}."
            )
        values = adata.obs[over_clustering].to_numpy()
    else:
        values = np.asarray(over_clustering)
        if values.shape != (adata.n_obs,):
            raise ValueError(f"over_clustering needs one cluster per cell ({adata.n_obs}); got shape {values.shape}.")
    if pd.isna(values).any():
        raise ValueError("over_clustering has cells without a cluster; give every cell one.")
    return pd.Categorical(values.astype(str))


def leiden_clusters(embedding: np.ndarray) -> pd.Categorical:
    """Leiden clusters at :data:`RESOLUTION` of the `N_NEIGHBORS`-nearest-neighbour graph of `embedding` (seeded).

    Fewer than three cells are a cluster each.
    """
    import scanpy as sc

    n_cells = len(embedding)
    if n_cells < 3:
        return pd.Categorical(np.arange(n_cells).astype(str))
    scratch = AnnData(obs=pd.DataFrame(index=pd.RangeIndex(n_cells).astype(str)))
    scratch.obsm["X"] = embedding
    sc.pp.neighbors(scratch, n_neighbors=min(N_NEIGHBORS, n_cells - 1), use_rep="X", random_state=0)
    sc.tl.leiden(scratch, resolution=RESOLUTION, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    return pd.Categorical(scratch.obs["leiden"].astype(str))


def majority_votes(predictions: pd.Categorical, clusters: pd.Categorical) -> pd.Categorical:
    """Each cell's cluster's most frequent prediction (a tie goes to the type first in the categories)."""
    counts = np.zeros((len(clusters.categories), len(predictions.categories)), dtype=np.int64)
    np.add.at(counts, (clusters.codes, predictions.codes), 1)
    winners = counts.argmax(axis=1)
    return pd.Categorical.from_codes(winners[clusters.codes], categories=predictions.categories)

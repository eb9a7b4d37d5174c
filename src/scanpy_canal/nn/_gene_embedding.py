"""A gene table computed from expression data, for encoders that start without scBERT's gene2vec table.

scBERT adds to every position a frozen gene2vec vector, learnt from gene co-expression; genes that vary together get
nearby vectors. A random table only tells the genes apart. :func:`coexpression_embedding` gives each gene its
coordinates on the leading principal axes of the standardised cells x genes matrix, so that co-varying genes get
nearby vectors too, scaled like the standard normal table it replaces.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse

#: Cells, at most, whose expression the table is computed from (a seeded random subset of larger data).
MAX_CELLS = 10_000


def coexpression_embedding(x: sparse.spmatrix | np.ndarray, dim: int, *, seed: int = 0) -> torch.Tensor:
    """One `dim`-dimensional vector per gene (column of `x`) from the genes' co-expression.

    Each gene is standardised over the cells (genes that never vary get zeros); the table holds the genes' loadings
    on the leading `dim` right singular vectors, weighted by their singular values, so that two genes' vectors are
    close when their standardised expression is. The table is scaled to unit mean square, like a standard normal one.
    Components beyond the rank of the data are zero.

    Parameters
    ----------
    x
        Cells x genes expression (e.g. ``log2(1 + counts per 10k)``); at most :data:`MAX_CELLS` random cells are used.
    dim
        Vector size (the encoder's ``dim``).
    seed
        Seed of the choice of cells.

    Returns
    -------
    ``(n_genes, dim)`` float32 table.
    """
    n_cells, n_genes = x.shape
    if n_cells > MAX_CELLS:
        x = x[np.sort(np.random.default_rng(seed).choice(n_cells, MAX_CELLS, replace=False))]
    values = x.toarray() if sparse.issparse(x) else np.asarray(x)
    values = values.astype(np.float64)
    spread = values.std(axis=0)
    standardised = np.divide(values - values.mean(axis=0), spread, out=np.zeros_like(values), where=spread > 0)
    from sklearn.utils.extmath import randomized_svd

    rank = min(dim, *standardised.shape)
    _, singular_values, components = randomized_svd(standardised, rank, n_iter=7, random_state=seed)
    table = np.zeros((n_genes, dim))
    table[:, :rank] = components[:rank].T * singular_values[:rank]
    scale = np.sqrt(np.mean(table**2))
    return torch.as_tensor(table / scale if scale > 0 else table, dtype=torch.float32)

"""Expression values to scBERT tokens."""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse

#: Number of expression bins: tokens 0..N_BINS (values at or above N_BINS share the top bin).
N_BINS = 5


def tokenize(x: np.ndarray | sparse.spmatrix | sparse.sparray | torch.Tensor, *, n_bins: int = N_BINS) -> torch.Tensor:
    """Bin a batch of ``log2(1 + counts per 10k)`` values into tokens and append the extra token 0.

    The token of a value ``v`` is ``min(floor(v), n_bins)`` (negative values give 0), so with the default five bins a
    gene below 1 count per 10k gets the same token as an unexpressed one, exactly as in scBERT and CANAL.

    Parameters
    ----------
    x
        A ``(cells, genes)`` batch: a scipy sparse matrix, a NumPy array or a torch tensor.
    n_bins
        The highest expression token.

    Returns
    -------
    A ``torch.long`` tensor of shape ``(cells, genes + 1)`` whose last column is 0; on the device of `x` when `x` is a
    tensor, on the CPU otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> from scanpy_canal.nn import tokenize
    >>> tokenize(np.array([[0.0, 0.9, 1.0, 2.5, 7.3]]))
    tensor([[0, 0, 1, 2, 5, 0]])
    """
    if isinstance(x, torch.Tensor):
        bins = x.floor().clamp_(0, n_bins).long()
        return torch.cat([bins, bins.new_zeros(bins.shape[0], 1)], dim=1)
    if sparse.issparse(x):
        x = sparse.csr_matrix(x)
        if not x.has_canonical_format:  # duplicate entries of a cell and gene mean their sum
            x = x.copy()
            x.sum_duplicates()
        return _tokenize_sparse(x, n_bins)
    x = np.asarray(x)
    tokens = np.zeros((x.shape[0], x.shape[1] + 1), dtype=np.int64)
    tokens[:, :-1] = np.clip(np.floor(x), 0, n_bins)
    return torch.from_numpy(tokens)


def _tokenize_sparse(x: sparse.csr_matrix, n_bins: int) -> torch.Tensor:
    tokens = np.zeros((x.shape[0], x.shape[1] + 1), dtype=np.int64)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    tokens[rows, x.indices] = np.clip(np.floor(x.data), 0, n_bins)
    return torch.from_numpy(tokens)

"""Put a dataset on a fixed gene panel: the model's genes, in the model's order."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

logger = logging.getLogger("scanpy_canal")

_N_EXAMPLES = 5


def align_genes(
    adata: AnnData,
    genes: Sequence[str] | pd.Index,
    *,
    gene_symbols: str | None = None,
    layer: str | None = None,
) -> AnnData:
    """Return a new AnnData whose genes are exactly `genes`, in that order.

    Genes of `genes` absent from `adata` become all-zero columns. If a gene name occurs more than once in
    `adata`, its first occurrence is used and a warning says how many duplicates were dropped. The overlap is
    logged at INFO level on the ``"scanpy_canal"`` logger. `adata` is never modified.

    Parameters
    ----------
    adata
        Annotated data matrix, cells by genes.
    genes
        The gene panel, e.g. ``model.genes``. Must not contain duplicates.
    gene_symbols
        Column of ``adata.var`` holding the gene names to match, for when ``var_names`` are e.g. Ensembl IDs.
        By default ``adata.var_names`` are matched.
    layer
        Take the values from ``adata.layers[layer]`` instead of ``adata.X``.

    Returns
    -------
    A new :class:`~anndata.AnnData` with

    ``X``
        The values of the panel genes, always a CSR sparse float32 matrix.
    ``obs``
        A copy of ``adata.obs``.
    ``var_names``
        `genes`, in order; ``var["canal_found"]`` says which genes were present in `adata`.
    ``uns["canal_align_genes"]``
        ``{"n_found": int, "n_genes": int}``.

    Raises
    ------
    ValueError
        If `genes` is empty or has duplicates, or if no gene of `genes` is found in `adata`.
    KeyError
        If `gene_symbols` is not a column of ``adata.var``.

    Examples
    --------
    >>> import scanpy as sc
    >>> import scanpy_canal as canal
    >>> adata = sc.datasets.pbmc68k_reduced().raw.to_adata()
    >>> panel = ["CD3E", "MS4A1", "NOT_A_GENE"]
    >>> aligned = canal.pp.align_genes(adata, panel)
    >>> aligned.var_names.tolist(), aligned.uns["canal_align_genes"]
    (['CD3E', 'MS4A1', 'NOT_A_GENE'], {'n_found': 2, 'n_genes': 3})
    """
    target = _target_genes(genes)
    columns, found = panel_columns(adata, target, gene_symbols=gene_symbols)
    X = adata.X if layer is None else adata.layers[layer]
    aligned = AnnData(
        X=scatter_columns(X[:, columns], found),
        obs=adata.obs.copy(),
        var=pd.DataFrame({"canal_found": found}, index=target),
    )
    aligned.uns["canal_align_genes"] = {"n_found": int(found.sum()), "n_genes": len(target)}
    return aligned


def panel_columns(
    adata: AnnData, genes: Sequence[str] | pd.Index, *, gene_symbols: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Where the panel's genes are in `adata`: its column of each found gene, and which genes were found.

    Reads only ``var``, so it is cheap on backed data; the overlap is logged. See :func:`align_genes` for the rules.
    """
    target = _target_genes(genes)
    names = _source_names(adata, gene_symbols)
    usable = _usable_columns(names)
    position = pd.Index(names[usable]).get_indexer(target)
    found = position >= 0
    n_found = int(found.sum())
    if n_found == 0:
        raise ValueError(_no_overlap_message(target, names, gene_symbols))
    logger.info("%d of %d genes found (%.1f%%)", n_found, len(target), 100 * n_found / len(target))
    return np.flatnonzero(usable)[position[found]], found


def _target_genes(genes: Sequence[str] | pd.Index) -> pd.Index:
    if isinstance(genes, str):
        raise TypeError("genes must be a sequence of gene names, not a single string.")
    target = pd.Index(np.asarray(genes, dtype=object).astype(str))
    if len(target) == 0:
        raise ValueError("genes is empty.")
    duplicated = target[target.duplicated()].unique()
    if len(duplicated):
        raise ValueError(
            f"genes contains {len(duplicated)} duplicated names, e.g. {_examples(duplicated)}; a panel must be unique."
        )
    return target


def _source_names(adata: AnnData, gene_symbols: str | None) -> pd.Index:
    if gene_symbols is None:
        return pd.Index(adata.var_names.astype(str))
    if gene_symbols not in adata.var.columns:
        raise KeyError(
            f"gene_symbols={gene_symbols!r} is not a column of adata.var; available: {list(adata.var.columns)}."
        )
    symbols = adata.var[gene_symbols]
    return pd.Index(symbols.astype(object).where(symbols.notna(), None).to_numpy(), dtype=object)


def _usable_columns(names: pd.Index) -> np.ndarray:
    """Columns whose name is set and seen for the first time; warns how many duplicates are dropped."""
    present = ~pd.isna(names)
    first = ~names.duplicated(keep="first")
    n_dropped = int(np.count_nonzero(present & ~first))
    if n_dropped:
        examples = _examples(names[present & ~first].unique())
        warnings.warn(
            f"{n_dropped} genes have a duplicated name in adata (e.g. {examples}); the first occurrence is kept.",
            stacklevel=3,
        )
    return present & first


def scatter_columns(values, found: np.ndarray) -> sp.csr_matrix:
    """A float32 CSR matrix over the whole panel: the columns of `values` where `found`, zeros elsewhere."""
    selected = sp.csr_matrix(values, dtype=np.float32)
    selected.sort_indices()
    out_columns = np.flatnonzero(found)
    return sp.csr_matrix(
        (selected.data, out_columns[selected.indices], selected.indptr), shape=(selected.shape[0], len(found))
    )


def _examples(names) -> str:
    return ", ".join(map(str, list(names)[:_N_EXAMPLES]))


def _no_overlap_message(target: pd.Index, names: pd.Index, gene_symbols: str | None) -> str:
    source = "adata.var_names" if gene_symbols is None else f"adata.var[{gene_symbols!r}]"
    message = (
        f"None of the {len(target)} requested genes is in {source}. "
        f"Requested: {_examples(target)}; {source}: {_examples(names[~pd.isna(names)])}."
    )
    if gene_symbols is None and names.str.startswith("ENS").mean() > 0.5:
        message += " The var_names look like Ensembl IDs: pass gene_symbols=<var column holding the gene symbols>."
    return message

"""Put a dataset on a fixed gene panel: the model's genes, in the model's order."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scanpy_canal._genes import first_occurrences, gene_positions

logger = logging.getLogger("scanpy_canal")

_N_EXAMPLES = 5
#: With less than this fraction of the panel found, alignment warns (the missing genes count as unexpressed).
WARN_OVERLAP = 0.5


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
    logged at INFO level on the ``"scanpy_canal"`` logger, and as a warning when less than half of `genes` is found.
    `adata` is never modified.

    Parameters
    ----------
    adata
        Annotated data matrix, cells by genes.
    genes
        The gene panel, e.g. ``model.genes``. Must not contain duplicates.
    gene_symbols
        Column of ``adata.var`` holding the gene names to match, for when ``var_names`` are e.g. Ensembl IDs.
        By default ``adata.var_names`` are matched. A gene whose entry is missing or blank matches nothing.
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
    adata: AnnData, genes: Sequence[str] | pd.Index, *, gene_symbols: str | None = None, min_overlap: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Where the panel's genes are in `adata`: its column of each found gene, and which genes were found.

    Reads only ``var``, so it is cheap on backed data. The overlap is logged (see :func:`align_genes`); less than
    `min_overlap` of the panel is an error. See :func:`align_genes` for the rules.
    """
    target = _target_genes(genes)
    names = gene_names(adata, gene_symbols)
    _warn_duplicates(names)
    position = gene_positions(names, target)
    found = position >= 0
    n_found = int(found.sum())
    if n_found == 0:
        raise ValueError(_no_overlap_message(target, names, gene_symbols))
    fraction = n_found / len(target)
    overlap = f"{n_found} of {len(target)} genes found ({fraction:.1%})"
    logger.info(overlap)
    if fraction < min_overlap:
        raise ValueError(
            f"Only {overlap} in {_source(gene_symbols)}, fewer than min_gene_overlap={min_overlap:g}: with the others "
            f"counted as unexpressed, the predictions would say little.{_symbols_hint(names, gene_symbols)} Lower "
            "min_gene_overlap (--min-gene-overlap) to predict anyway."
        )
    if fraction < WARN_OVERLAP:
        logger.warning(
            "Only %s in %s; the missing genes count as unexpressed, so the results may be unreliable.%s",
            overlap,
            _source(gene_symbols),
            _symbols_hint(names, gene_symbols),
        )
    return position[found], found


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


def gene_names(adata: AnnData, gene_symbols: str | None = None) -> pd.Index:
    """The names genes are matched by: ``var_names``, or the column `gene_symbols` of ``var`` (blank ones `None`)."""
    if gene_symbols is None:
        return pd.Index(adata.var_names.astype(str))
    if gene_symbols not in adata.var.columns:
        raise KeyError(
            f"gene_symbols={gene_symbols!r} is not a column of adata.var; available: {list(adata.var.columns)}."
        )
    symbols = adata.var[gene_symbols]
    named = symbols.notna() & (symbols.astype(str).str.strip() != "")
    return pd.Index(symbols.astype(object).where(named, None).to_numpy(), dtype=object)


def _warn_duplicates(names: pd.Index) -> None:
    """Warn how many genes are not matched because an earlier gene has their name."""
    dropped = ~pd.isna(names) & ~first_occurrences(names)
    if dropped.any():
        examples = _examples(names[dropped].unique())
        warnings.warn(
            f"{int(dropped.sum())} genes have a duplicated name in adata (e.g. {examples}); the first occurrence is "
            "kept.",
            stacklevel=3,
        )


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


def _source(gene_symbols: str | None) -> str:
    return "adata.var_names" if gene_symbols is None else f"adata.var[{gene_symbols!r}]"


def _symbols_hint(names: pd.Index, gene_symbols: str | None) -> str:
    """Advice to match gene symbols when the names matched look like Ensembl IDs; empty otherwise."""
    if gene_symbols is not None or not names.str.startswith("ENS").mean() > 0.5:
        return ""
    return (
        " The var_names look like Ensembl IDs: pass gene_symbols=<var column holding the gene symbols> "
        "(--gene-symbols on the command line)."
    )


def _no_overlap_message(target: pd.Index, names: pd.Index, gene_symbols: str | None) -> str:
    source = _source(gene_symbols)
    message = (
        f"None of the {len(target)} requested genes is in {source}. "
        f"Requested: {_examples(target)}; {source}: {_examples(names[~pd.isna(names)])}."
    )
    return message + _symbols_hint(names, gene_symbols)

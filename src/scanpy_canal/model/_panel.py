"""The gene panel of a new model, and the pretrained weights that start its encoder."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd

from scanpy_canal._directories import readable_directory
from scanpy_canal.nn import GENES_FILE, PerformerLM, load_pretrained, read_vocabulary
from scanpy_canal.pp import first_occurrences

from ._data import h5ad_var_names, highly_variable_genes

Vocabulary = Sequence[str] | str | os.PathLike


def initial_panel(
    x,
    names: pd.Index,
    *,
    genes: Sequence[str] | None,
    n_top_genes: int | None,
    pretrained: str | os.PathLike | None,
    pretrained_genes: Vocabulary | None,
) -> tuple[list[str], PerformerLM | None]:
    """The panel of a new model on stage-1 values `x`, and the pretrained encoder on it (`None` without one).

    `names` are the names of the columns of `x` (see :func:`scanpy_canal.pp.align_genes`); see
    :class:`~scanpy_canal.CANAL` for the other arguments. With pretrained weights and no fixed `genes`, the highly
    variable genes are chosen among those the weights know, so the panel keeps the size asked for; genes of the
    panel the weights lack are left out, with a warning.
    """
    vocabulary = None if pretrained is None or pretrained_genes is None else read_genes(pretrained_genes)
    candidates = None if pretrained is None or genes is not None else _vocabulary(pretrained, vocabulary)
    panel = choose_panel(x, names, genes, n_top_genes, candidates=candidates)
    if pretrained is None:
        return panel, None
    encoder, panel = load_pretrained(pretrained, vocabulary=vocabulary, genes=panel)
    return panel, encoder


def choose_panel(
    x, names: pd.Index, genes: Sequence[str] | None, n_top_genes: int | None, *, candidates: list[str] | None
) -> list[str]:
    """`genes`, or the `n_top_genes` most variable (or all) genes of the data among the `candidates`."""
    if genes is not None and n_top_genes is not None:
        raise ValueError("Give either `genes` or `n_top_genes`, not both.")
    if genes is not None:
        return [str(g) for g in genes]
    usable = first_occurrences(names)  # the columns `align_genes` takes
    if candidates is not None:  # choose among the genes the pretrained weights know, so the panel keeps its size
        usable &= names.isin(candidates)
        if not usable.any():
            raise ValueError("None of the data's genes is in the pretrained weights' vocabulary.")
    if not usable.all():
        x, names = x[:, usable], names[usable]
    names = pd.Index(names.astype(str))
    if n_top_genes is not None:
        return highly_variable_genes(x, names, n_top_genes)
    return list(names)


def read_genes(source: Vocabulary) -> list[str]:
    """A list of gene names given as names, a text file with one per line, or an ``.h5ad`` file's ``var_names``."""
    if isinstance(source, str | os.PathLike) and str(source).endswith(".h5ad"):
        return h5ad_var_names(source)
    return read_vocabulary(source)


def _vocabulary(path: str | os.PathLike, vocabulary: Vocabulary | None) -> list[str] | None:
    """The gene vocabulary of pretrained weights: a directory's own, or the one given (names or a text file)."""
    directory = readable_directory(path)  # a pretrained directory may be where an interrupted save retired it
    if directory.is_dir() and (directory / GENES_FILE).is_file():
        return read_vocabulary(directory / GENES_FILE)
    if vocabulary is None:
        return None  # loading the weights says what is missing
    return read_vocabulary(vocabulary)

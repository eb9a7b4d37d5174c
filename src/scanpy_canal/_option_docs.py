"""The documentation of every prediction option, written once and filled into each docstring that takes the option.

The options themselves (name, type, default) are the fields of ``model._options.PredictOptions``;
``tests/test_options.py`` checks that every field has its entry here and that every public signature taking an option
has the field's default and type. This module sits below every package, so that :mod:`scanpy_canal.tl` documents its
options without importing the model (and scvi-tools) on import. The stage options, which only
:meth:`~scanpy_canal.CANAL.train` takes, are documented beside their fields (``model._options.STAGE_DOCS``).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

from scanpy_canal._choices import SCORES

F = TypeVar("F", bound=Callable)
_SCORE_NAMES = ", ".join(f'``"{name}"``' for name in SCORES)

#: The options of :meth:`~scanpy_canal.CANAL.predict`, :meth:`~scanpy_canal.CANAL.get_novelty`,
#: :meth:`~scanpy_canal.CANAL.get_latent_representation` and :func:`scanpy_canal.tl.annotate`: an entry's name
#: names one option, or several documented together.
PREDICT_DOCS: dict[str, str] = {
    "novel": 'Call ``"Unassigned"`` the cells whose novelty `score` the `threshold` rule rejects.',
    "temperature": "Temperature of the energy score.",
    "threshold": (
        '``"conformal"`` (default): unassign the cells whose conformal p-value is at most `alpha`, so that a known\n'
        "cell is unassigned with probability at most `alpha`: the cell's score against those of calibration cells\n"
        "of every stage predicted as the same type (if 50 or more), or of all; a cell's call does not depend on the\n"
        'query. ``"calibrated"``: the ``"mix"`` score above the cut that best separates held-out cells from cells\n'
        'mixed between two types. ``"canal"``: the original, query-relative rule. Or the score above which a cell\n'
        "is unassigned."
    ),
    "alpha": 'Largest fraction of known cells the ``"conformal"`` rule may unassign, in ``(0, 1)``.',
    "score": (
        f"The novelty score, one of {_SCORE_NAMES}\n"
        '(see :doc:`/method`), or several fused (conformal rule). By default ``"input"``, the distance from the cell\'s expression to the\n'
        'reference cells in a PCA of the training cells, with the ``"conformal"`` rule (``"energy"`` for a model saved\n'
        'before it existed); ``"mix"`` (CANAL\'s) with the others.'
    ),
    "fusion": (
        'How several scores make one p-value, the guarantee kept: ``"bonferroni"``, ``m`` times the smallest of\n'
        "the ``m`` scores' p-values; ``\"scaled\"``, the largest score on the bank's scale, calibrated."
    ),
    "batch_size": "Cells per forward pass (default: sized by the model for its device).",
    "seed": 'Seed of the mixup partners and weights of the ``"calibrated"`` and ``"canal"`` rules.',
    "precision": (
        '``"auto"``: bfloat16 autocast where the device computes it natively (GPUs, CPUs with AVX-512 BF16 or AMX;\n'
        'faster, probabilities differ slightly), float32 elsewhere; or ``"32"`` or ``"bf16"``.'
    ),
    "chunk_size": (
        "Cells read, aligned and predicted at a time; a backed AnnData\n"
        '(``anndata.read_h5ad(path, backed="r")``) is read from disk chunk by chunk, in bounded memory.'
    ),
    "gene_symbols": (
        "Column of ``.var`` holding the gene names to match the panel with, for when ``var_names`` are e.g.\n"
        "Ensembl IDs (see :func:`scanpy_canal.pp.align_genes`). Default: the one the data were registered with."
    ),
    "min_gene_overlap": (
        "Smallest fraction of the panel's genes the query must have; with fewer it is an error (0 allows any). The\n"
        "overlap is logged at info level, and as a warning when less than half of the panel is found."
    ),
    "mod": "The modality to predict when the data are a MuData.",
    "attention, compile": (
        '``attention="exact"``: softmax attention instead of the FAVOR+ estimate the network was trained with (see\n'
        ":doc:`/multi_gpu`). `compile`: run the network through ``torch.compile`` (`None`: on a GPU, from 100,000\n"
        "cells)."
    ),
    "devices, strategy": (
        'Predict through Lightning on these devices (e.g. ``devices=4, strategy="ddp"``), each process a share of\n'
        "the chunks; `None`: in this process, on the model's device."
    ),
    "refine_threshold": (
        "With a cell-type tree (:attr:`~scanpy_canal.CANAL.cell_type_tree`): the call starts at the most probable\n"
        "type and goes up to its parent while it holds less than this share of the parent's subtree probability\n"
        "(its siblings are not told apart from it)."
    ),
}

_PLACEHOLDER = re.compile(r"^([ \t]*)\{options\}$", flags=re.MULTILINE)


def documented_names(docs: Mapping[str, str]) -> set[str]:
    """Every option an entry of `docs` documents."""
    return {name for entry in docs for name in entry.split(", ")}


def document_options(docs: Mapping[str, str]) -> Callable[[F], F]:
    """A decorator filling the line ``{options}`` of a docstring with the entries of `docs` its function takes.

    The entries come in the order of the signature; one that documents several options needs them all.
    """

    def decorate(function: F) -> F:
        parameters = inspect.signature(function).parameters
        positions = {name: index for index, name in enumerate(parameters)}
        entries = {entry: entry.split(", ") for entry in docs}
        taken = [entry for entry, names in entries.items() if any(name in parameters for name in names)]
        for entry in taken:
            if not all(name in parameters for name in entries[entry]):
                raise TypeError(f"{function.__qualname__} takes part of the options documented together: {entry}.")
        taken.sort(key=lambda entry: positions[entries[entry][0]])
        match = _PLACEHOLDER.search(function.__doc__ or "")
        if match is None:
            raise ValueError(f"The docstring of {function.__qualname__} has no line {{options}}.")
        indent = match.group(1)
        text = "\n".join(_entry(entry, docs[entry], indent) for entry in taken)
        function.__doc__ = function.__doc__[: match.start()] + text + function.__doc__[match.end() :]
        return function

    return decorate


def _entry(name: str, description: str, indent: str) -> str:
    """One numpydoc parameter entry, its description indented under its name."""
    lines = [f"{indent}{name}", *(f"{indent}    {line}" for line in description.splitlines())]
    return "\n".join(lines)

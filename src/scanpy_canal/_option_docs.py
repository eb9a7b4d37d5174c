"""The documentation of every option, written once and filled into each docstring that takes the option.

The options themselves (name, type, default) are the fields of ``model._options.PredictOptions`` and
``model._options.StageSettings``; ``tests/test_options.py`` checks that every field has its entry here and that every
public signature taking an option has the field's default and type. This module sits below every package, so that
:mod:`scanpy_canal.tl` documents its options without importing the model (and scvi-tools) on import.
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
        "With a cell-type tree (:attr:`~scanpy_canal.CANAL.cell_type_tree`): a call goes from a type down to its\n"
        "most probable child while that child's subtree holds at least this share of the type's subtree probability\n"
        "(and more than the type's own)."
    ),
}

#: The options of one stage, :meth:`~scanpy_canal.CANAL.train`'s.
STAGE_DOCS: dict[str, str] = {
    "max_epochs": "Upper bound on epochs. Default: 100 with pretrained weights (the original's), 15 from a random start.",
    "batch_size": "Cells per minibatch.",
    "lr": (
        "Peak learning rate of the per-epoch cosine schedule with warm restarts (epoch 1 trains at 1e-6). Default:\n"
        "2e-4 with pretrained weights (the original's), 1e-3 from a random start."
    ),
    "rehearsal_size": "Capacity of the example bank kept after this stage and replayed in the next one (0 keeps none).",
    "distill_weight": "Weight of the embedding distillation loss before the ``C_old / C_new`` factor (0 disables it).",
    "label_smoothing": "Label smoothing of the cross-entropy.",
    "balance_classes": (
        "Weight each cell type's cross-entropy by the inverse of its number of training cells (scikit-learn's\n"
        '``class_weight="balanced"``): a type replayed from the bank with a few cells counts as much as a new one\n'
        "with hundreds. Default: on from a random start, off with pretrained weights (the original)."
    ),
    "early_stopping_patience": "Stop after more than this many epochs without a better validation accuracy (`None`: never).",
    "validation_size": (
        "Fraction of each cell type held out, in ``(0, 1)``; every type keeps one cell to train on. Two thirds of\n"
        "the stage's own held-out cells become calibration cells, the others choose the best epoch."
    ),
    "split_bank": (
        "Hold out part of the bank for validation too, as the original. `False`: every bank cell trains (worth it\n"
        "for a few cells per type), but early stopping then sees only the stage's types."
    ),
    "calibration_size": (
        "Capacity of the calibration cells behind novel-cell p-values: held-out cells of every stage, never trained\n"
        "on nor replayed, at most ``calibration_size // C`` per type (spread over the stages); 0 keeps none. Their\n"
        "memory cost is in :attr:`stage_history_` (``calibration_bytes``)."
    ),
    "cache_frozen": (
        "Compute the hidden states of the frozen blocks before the first trainable one once per cell and stage\n"
        "(their random features are then not redrawn). `None` (default): when those of all training cells fit in\n"
        "4 GiB. `False`: recompute them at every step, as the original."
    ),
    "precision": (
        '``"auto"``: bfloat16 autocast (Lightning\'s ``"bf16-mixed"``) where the device computes it natively (GPUs,\n'
        'CPUs with AVX-512 BF16 or AMX), float32 elsewhere; or ``"32"`` or ``"bf16"``. Before a long stage, its\n'
        "expected duration on this device is logged, from its first batches."
    ),
    "accelerator, devices": (
        'Lightning\'s; ``accelerator="gpu", devices=-1, strategy="ddp_find_unused_parameters_true"`` trains on all\n'
        "GPUs (see :doc:`/multi_gpu`)."
    ),
    "repeated_cells": (
        "Cells the model has seen, with the same observation name and values as a cell it keeps from an earlier\n"
        "stage (its example bank or calibration cells), are trained on with a warning that gives their number\n"
        '(``"warn"``), or make the stage an error (``"error"``), e.g. to catch a stage\'s data given twice.'
    ),
    "parents": (
        'Relations this stage adds to the cell-type tree, ``{child: parent}`` (e.g. ``{"CD4 T": "T cell"}``),\n'
        'between known types and the stage\'s; `None` (default) or ``{}`` adds none. ``"find"``: found from the\n'
        "data (see :doc:`/refinement`); an option, as on pbmc68k's stream without refinements it relates types\n"
        "that are not (ACC 0.568 against 0.766). A cell labelled with a type that has children is supervised by\n"
        "the summed probability of the type and its descendants, also when replayed; the tree is\n"
        ":attr:`cell_type_tree`."
    ),
    "relation_threshold": (
        'With ``parents="find"``: the share of a new type\'s cells the model must call one known type before the\n'
        "stage (not novel) for the new type to become its child, or call two or more known types together for it\n"
        "to become their parent."
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

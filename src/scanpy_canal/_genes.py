"""Matching genes by name, the one rule every part of the package follows.

A gene is found by its exact name; where a name occurs more than once, its first occurrence wins; a missing name
(`None`) matches nothing. :func:`scanpy_canal.pp.align_genes` applies it to AnnData; the pretrained vocabularies of
:mod:`scanpy_canal.nn` apply it to lists of names, which is why it lives below both, in plain numpy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def first_occurrences(names: Sequence[str | None]) -> np.ndarray:
    """Which of `names` are matched: those set and seen for the first time (a boolean mask)."""
    seen: set[str] = set()
    matched = np.zeros(len(names), dtype=bool)
    for index, name in enumerate(names):
        if name is not None and name not in seen:
            seen.add(name)
            matched[index] = True
    return matched


def gene_positions(names: Sequence[str | None], genes: Iterable[str]) -> np.ndarray:
    """The position in `names` of each of `genes` (its first occurrence), -1 for those not in `names`."""
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        if name is not None:
            first.setdefault(name, index)
    return np.array([first.get(gene, -1) for gene in genes], dtype=np.int64)

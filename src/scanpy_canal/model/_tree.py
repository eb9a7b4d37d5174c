"""The cell-type tree: each known type has at most one parent; a later stage may refine a type or name a coarser one.

The tree is a plain ``{child: parent}`` dict over the model's cell types (a type without an entry is a root). A coarse
label supervises the summed probability of its subtree (:func:`subtree_matrix`); a prediction goes down the tree while
one child clearly holds its parent's probability (:func:`decode`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch


def ancestors(parents: Mapping[str, str], cell_type: str) -> list[str]:
    """The parent of `cell_type`, its parent, and so on up to the root."""
    chain, seen = [], {cell_type}
    while cell_type in parents:
        cell_type = parents[cell_type]
        if cell_type in seen:
            raise ValueError(f"The cell-type tree has a cycle through {cell_type!r}.")
        chain.append(cell_type)
        seen.add(cell_type)
    return chain


def grow_tree(parents: Mapping[str, str], relations: Mapping[str, str], cell_types: Sequence[str]) -> dict[str, str]:
    """`parents` with the new `relations` ``{child: parent}`` added; a clear error for a relation that cannot be.

    Both names of a relation must be known types; a type keeps the parent it has (one parent each); a type cannot be
    its own parent or that of one of its ancestors (no cycles).
    """
    known, tree = set(cell_types), dict(parents)
    for child, parent in relations.items():
        unknown = [name for name in (child, parent) if name not in known]
        if unknown:
            raise ValueError(
                f"parents: {', '.join(map(repr, unknown))} is not a cell type of the model or of this stage's data "
                f"(in {child!r} -> {parent!r}); known types: {sorted(known)}."
            )
        if tree.get(child, parent) != parent:
            raise ValueError(
                f"parents: {child!r} already has the parent {tree[child]!r}; a cell type has at most one parent."
            )
        if child == parent or child in ancestors(tree, parent):
            raise ValueError(
                f"parents: {parent!r} cannot be the parent of {child!r}: it is {child!r} itself or one of its "
                "descendants, which would make a cycle."
            )
        tree[child] = parent
    return tree


def subtree_matrix(parents: Mapping[str, str], cell_types: Sequence[str]) -> torch.Tensor:
    """``(C, C)`` float matrix whose row ``i`` marks type ``i`` and its descendants (columns in `cell_types` order)."""
    row = {name: i for i, name in enumerate(cell_types)}
    matrix = torch.eye(len(cell_types))
    for name in cell_types:
        for ancestor in ancestors(parents, name):
            matrix[row[ancestor], row[name]] = 1.0
    return matrix


def has_children(parents: Mapping[str, str]) -> bool:
    """Whether any type has a parent (otherwise the tree is flat and every type stands alone)."""
    return len(parents) > 0


def tree_frame(parents: Mapping[str, str], cell_types: Sequence[str]) -> pd.DataFrame:
    """One row per cell type (output-row order): ``parent`` (`None` for a root), ``depth`` (0 at a root), ``leaf``."""
    depth = [len(ancestors(parents, name)) for name in cell_types]
    with_children = set(parents.values())
    frame = pd.DataFrame(
        {
            "parent": [parents.get(name) for name in cell_types],
            "depth": np.asarray(depth, dtype=np.int64),
            "leaf": [name not in with_children for name in cell_types],
        },
        index=pd.Index(list(cell_types), name="cell_type"),
    )
    return frame


def decode(
    probabilities: np.ndarray, parents: Mapping[str, str], cell_types: Sequence[str], *, refine_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's call at the finest resolution it allows, and the call's depth in the tree.

    Start at the most probable type; while that type holds less than `refine_threshold` of its parent's subtree
    probability (it is not told apart from its siblings), call the parent instead. A flat tree gives the most
    probable type. Starting from the most probable type, not from the subtree holding the most, keeps a cell whose
    probability a parent's children share from being called that parent when another type is more probable than
    each of them (on ``benchmarks/refinement.py`` such cells were monocytes and dendritic cells called "T cell").
    """
    types = list(cell_types)
    mass = probabilities @ subtree_matrix(parents, types).numpy().T  # cells x types: each type's subtree
    parent_of = np.array([types.index(parents[name]) if name in parents else -1 for name in types], dtype=np.int64)
    rows = np.arange(probabilities.shape[0])
    calls = probabilities.argmax(axis=1)
    while True:
        parent = parent_of[calls]
        back = (parent >= 0) & (mass[rows, calls] < refine_threshold * mass[rows, np.maximum(parent, 0)])
        if not back.any():
            break
        calls = np.where(back, parent, calls)
    depth = np.array([len(ancestors(parents, name)) for name in types], dtype=np.int64)
    return np.asarray(types, dtype=object)[calls], depth[calls]


def among_children(
    probabilities: np.ndarray, parents: Mapping[str, str], cell_types: Sequence[str], calls: Sequence[str]
) -> np.ndarray:
    """Whether each cell is some kind of its call, which kind not told.

    The call has children, its subtree holds most of the cell's probability, and its children together more than its
    own output. With `calls` from :func:`decode`, no child then holds enough of the subtree to refine the call.
    """
    codes = pd.Index(list(cell_types)).get_indexer(list(calls))
    rows = np.where(codes >= 0, codes, 0)
    mass = np.einsum("ij,ij->i", probabilities, subtree_matrix(parents, cell_types).numpy()[rows])
    own = probabilities[np.arange(len(rows)), rows]
    is_parent = np.isin(np.asarray(calls, dtype=object), list(set(parents.values())))
    return is_parent & (mass > 0.5) & (mass - own > own)

"""Relations between a stage's new cell types and the known ones, found from how the model calls the new cells.

Before a stage trains, the model predicts the stage's cells (with novel-cell calls). A new type most of whose cells
are called one known type, and not novel, refines it: it becomes that type's child. A new type whose cells are called
two or more known types, together most of them, names a coarser type over them: it becomes their parent. Only a known
type the model tells apart can take part: one that it calls few held-out cells of the other known types (a model
that calls every cell one type relates nothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

#: Smallest share of a new type's cells the model must call one known type (child) or a few together (parent). Chosen
#: on ``benchmarks/refinement.py``: refined types score 0.8 or more, unrelated new types of the plain streams less.
RELATION_THRESHOLD = 0.8
#: Smallest share of a new type's cells a known type must take to be one of the children of a new coarse type.
MIN_CHILD_SHARE = 0.1


def false_call_shares(called: np.ndarray, labels: np.ndarray, known_types: Sequence[str]) -> dict[str, float]:
    """Per known type, the share of the cells labelled with another type that are `called` it."""
    called, labels = np.asarray(called), np.asarray(labels)
    return {
        name: float(np.mean(called[labels != name] == name)) if np.any(labels != name) else 0.0 for name in known_types
    }


def call_shares(called: np.ndarray, labels: np.ndarray, new_types: Sequence[str]) -> pd.DataFrame:
    """Rows: the new types; columns: the calls (known types, ``"Unassigned"``); values: shares of the row's cells."""
    table = pd.crosstab(pd.Series(labels, name="cell_type"), pd.Series(called, name="called"), normalize="index")
    return table.reindex(list(new_types)).fillna(0.0)


def find_relations(
    called: np.ndarray,
    labels: np.ndarray,
    known_types: Sequence[str],
    new_types: Sequence[str],
    parents: Mapping[str, str],
    *,
    threshold: float = RELATION_THRESHOLD,
    false_calls: Mapping[str, float] | None = None,
) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """The relations ``{child: parent}`` the calls support, and the evidence: each new type's shares per known type.

    Parameters
    ----------
    called
        The model's call for each of the stage's cells, before the stage (a known type or ``"Unassigned"``).
    labels
        The cells' labels.
    known_types
        The types the model knew before the stage.
    new_types
        The stage's new types.
    parents
        The tree so far: a known type with a parent is not put under a new coarse type.
    threshold
        Smallest share of a new type's cells called one known type (child), or two or more (parent).
    false_calls
        Per known type, the share of the held-out cells of the other known types the model calls it; a type above
        ``1 - threshold`` takes part in no relation. `None`: every known type may.
    """
    shares = call_shares(np.asarray(called), np.asarray(labels), new_types)
    specific = [name for name in known_types if false_calls is None or false_calls.get(name, 0.0) <= 1 - threshold]
    shares = shares.reindex(columns=list(known_types), fill_value=0.0)
    relations: dict[str, str] = {}
    evidence: dict[str, dict[str, float]] = {}
    for new_type, row in shares.iterrows():
        row = row[row > 0].sort_values(ascending=False)
        evidence[new_type] = {name: round(float(share), 4) for name, share in row.items()}
        row = row[row.index.isin(specific)]
        if len(row) and row.iloc[0] >= threshold:
            relations[new_type] = row.index[0]
            continue
        children = [name for name, share in row.items() if share >= MIN_CHILD_SHARE and name not in parents]
        taken = set(relations) | set(relations.values())
        if len(children) >= 2 and row[children].sum() >= threshold and not taken & set(children):
            relations.update(dict.fromkeys(children, new_type))
    return relations, evidence

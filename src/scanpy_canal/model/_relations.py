"""Relations between a stage's new cell types and the known ones, found from how the model calls the new cells.

Before a stage trains, the model predicts the stage's cells (with novel-cell calls). A new type most of whose cells
are called one known type, and not novel, refines it: it becomes that type's child. A new type whose cells are called
two or more known types, together most of them, names a coarser type over them: it becomes their parent. Only a known
type the model tells apart can take part: one that it calls few held-out cells of the other known types (a model
that calls every cell one type relates nothing).

The reverse check, as scHPL makes it: the known type's held-out cells are classified by the stage's labels (the
majority of their nearest stage cells in the stage's principal components, the input space, whatever the model has
learnt). A child must get at least :data:`REVERSE_MIN_SHARE` of its parent's cells; a new coarse type most of each
of its children's cells.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

#: Smallest share of a new type's cells the model must call one known type (child) or a few together (parent). On
#: ``benchmarks/refinement.py`` (seed 0) the refined types scored 0.82 and 0.88, the unrelated new types 0.22 at most.
RELATION_THRESHOLD = 0.8
#: Smallest share of a new type's cells a known type must take to be one of the children of a new coarse type.
MIN_CHILD_SHARE = 0.1
#: Smallest share of a known type's held-out cells the stage's labels must classify as a new type for it to be their
#: child (the reverse check). Refined types take 0.3 or more on the pbmc68k and synthetic refinement streams.
REVERSE_MIN_SHARE = 0.2


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
    reverse: pd.DataFrame | None = None,
) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """The relations ``{child: parent}`` the calls support, and their evidence.

    The evidence, per new type: ``called``, the shares of its cells called each known type, and with `reverse`
    ``reverse``, the shares of each known type's held-out cells classified as the new type.

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
    reverse
        The reverse check: rows, known types; columns, the stage's types; values, the shares of the known type's
        held-out cells that the stage's labels classify as each (see :func:`reverse_shares`). `None`: no check.
    """
    back = (lambda known, new: 1.0) if reverse is None else (lambda known, new: _lookup(reverse, known, new))
    shares = call_shares(np.asarray(called), np.asarray(labels), new_types)
    specific = [name for name in known_types if false_calls is None or false_calls.get(name, 0.0) <= 1 - threshold]
    shares = shares.reindex(columns=list(known_types), fill_value=0.0)
    relations: dict[str, str] = {}
    evidence: dict[str, dict[str, float]] = {}
    for new_type, row in shares.iterrows():
        row = row[row > 0].sort_values(ascending=False)
        evidence[new_type] = {"called": {name: round(float(share), 4) for name, share in row.items()}}
        if reverse is not None and new_type in reverse.columns:
            back_shares = reverse[new_type][reverse[new_type] > 0]
            evidence[new_type]["reverse"] = {name: round(float(share), 4) for name, share in back_shares.items()}
        row = row[row.index.isin(specific)]
        if len(row) and row.iloc[0] >= threshold:
            if back(row.index[0], new_type) >= REVERSE_MIN_SHARE:
                relations[new_type] = row.index[0]
            continue
        children = [name for name, share in row.items() if share >= MIN_CHILD_SHARE and name not in parents]
        taken = set(relations) | set(relations.values())
        covered = all(back(child, new_type) > 0.5 for child in children)
        if len(children) >= 2 and row[children].sum() >= threshold and not taken & set(children) and covered:
            relations.update(dict.fromkeys(children, new_type))
    return relations, evidence


def _lookup(table: pd.DataFrame, row: str, column: str) -> float:
    """``table.loc[row, column]``; 1 (no evidence against) when the row is missing, 0 when only the column is."""
    if row not in table.index:
        return 1.0
    return float(table.loc[row, column]) if column in table.columns else 0.0


def reverse_shares(
    stage_x, stage_labels: np.ndarray, known_x, known_labels: np.ndarray, *, n_components: int = 20, k: int = 15
) -> pd.DataFrame:
    """Per known type (rows), the shares of its cells that the stage's labels classify as each stage type (columns).

    A cell's class is the majority label of its `k` nearest stage cells in the stage's first `n_components`
    principal components (values centred on the stage's means).
    """
    from sklearn.decomposition import TruncatedSVD
    from sklearn.neighbors import KNeighborsClassifier

    stage_x, known_x = _dense(stage_x), _dense(known_x)
    mean = stage_x.mean(axis=0)
    n_components = max(1, min(n_components, stage_x.shape[0] - 1, stage_x.shape[1] - 1))
    pca = TruncatedSVD(n_components=n_components, random_state=0).fit(stage_x - mean)
    knn = KNeighborsClassifier(n_neighbors=min(k, stage_x.shape[0])).fit(pca.transform(stage_x - mean), stage_labels)
    called = knn.predict(pca.transform(known_x - mean))
    return pd.crosstab(pd.Series(known_labels, name="known"), pd.Series(called, name="called"), normalize="index")


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)

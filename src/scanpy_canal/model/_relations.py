"""Relations between a stage's new cell types and the known ones, found from how the model calls the new cells.

Before a stage trains, the model predicts the stage's cells (with novel-cell calls); and, as scHPL does, the known
types' held-out cells are classified by the stage's labels (the reverse check: the majority of their nearest stage
cells in the stage's principal components, the input space, whatever the model has learnt).

- **Refinement.** A known type is refined when the reverse check spreads its cells over two or more new types (each
  at least :data:`REVERSE_MIN_SHARE` of them, together most of them) and the model calls at least the threshold of
  one of these new types' cells the known type, and not novel. That new type becomes its child, and so does each
  other new type of the spread most of whose cells the model calls the known type: once a type is refined, its
  other children need only most of their cells (on ``benchmarks/refinement.py`` the stage-1 model called 0.88 of
  the CD4+ T cells and 0.79 of the CD8+ T cells "T cell"; with CD8+ T left out of the tree, the coarse cells pulled
  the CD8+ T cells towards CD4+ T). A single new type onto
  one known type is a rename or an overlap, not a refinement: on pbmc68k's stream without refinements the memory
  CD4+ T cells were called regulatory T (92%), the monocytes dendritic (99%), each the only new type there.
- **Coarse type.** A new type whose cells the model calls two or more known types (each at least
  :data:`MIN_CHILD_SHARE`, together most of them) becomes their parent, if the reverse check classifies most of each
  known type's cells as it, and no other new type has most of its cells called those known types (two new types onto
  the same known ones: siblings, not a coarser name). Here the reverse check classifies among the stage's labels and
  the known types' kept cells (the example bank) together: a coarse name's cells lie among its children's, so it
  takes most of their held-out cells even beside them, while a new type that is merely near two known types loses
  their cells to their own kept cells. Among the stage's labels alone, a stage of new types only offered nothing
  else: 16 of 54 models of ``benchmarks/leave_types_out.py`` found a coarse type that was none. With this check
  carrying the weight, the calls need only a majority, not the threshold: the stage-1 model of the coarse-after-fine
  stream of ``benchmarks/refinement.py`` called 0.75 to 0.81 of the "T cell" cells CD4+ T or CD8+ T (the others
  novel), and the leave-types-out models relate nothing more at a majority than at the threshold.

Without the reverse check (no held-out cells of the known types), no relation is found; a coarse type also needs
held-out cells beside the bank (the calibration cells).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

#: Smallest share of a new type's cells the model must call one known type for it to refine it (child). On
#: ``benchmarks/refinement.py`` (seed 0) the refined types scored 0.91 and 0.82, the unrelated new types 0.35 at most.
RELATION_THRESHOLD = 0.8
#: Smallest share of a new type's cells a known type must take to be one of the children of a new coarse type.
MIN_CHILD_SHARE = 0.1
#: Smallest share of a known type's held-out cells the stage's labels must classify as a new type for it to be their
#: child (the reverse check); two or more such new types, together most of the cells, refine the known type.
#: Refined types take 0.3 or more on the pbmc68k and synthetic refinement streams.
REVERSE_MIN_SHARE = 0.2


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
    reverse: pd.DataFrame | None = None,
    reverse_kept: pd.DataFrame | None = None,
) -> tuple[dict[str, str], dict[str, dict[str, dict[str, float]]]]:
    """The relations ``{child: parent}`` the calls and the reverse check support, and their evidence.

    The evidence, per new type: ``called``, the shares of its cells called each known type, and with `reverse`
    ``reverse``, the shares of each known type's held-out cells classified as the new type (with `reverse_kept`,
    ``reverse_kept``: the same beside the kept cells).

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
        Smallest share of a new type's cells called one known type, for it to refine it (child).
    reverse
        The reverse check: rows, known types; columns, the stage's types; values, the shares of the known type's
        held-out cells that the stage's labels classify as each (see :func:`reverse_shares`), for the refinements.
        `None`: no refinement.
    reverse_kept
        The same with the known types' kept cells among the classes (``reverse_shares(..., kept_x=...)``), for the
        coarse types. `None`: no coarse type.
    """
    shares = call_shares(np.asarray(called), np.asarray(labels), new_types)
    shares = shares.reindex(columns=list(known_types), fill_value=0.0)
    checks = {"reverse": reverse, "reverse_kept": reverse_kept}
    evidence = {new_type: _evidence(row, checks, new_type) for new_type, row in shares.iterrows()}
    relations = {} if reverse is None else _refinements(shares, _by_known_type(reverse, shares), threshold)
    if reverse_kept is not None:
        back = _by_known_type(reverse_kept, shares)
        relations.update(_coarse_types(shares, back, parents, taken=relations))
    return relations, evidence


def _by_known_type(reverse: pd.DataFrame, shares: pd.DataFrame) -> pd.DataFrame:
    """A reverse check's rows and columns as `shares`' columns (known types) and rows (new types)."""
    return reverse.reindex(index=shares.columns, columns=shares.index, fill_value=0.0)


def _evidence(row: pd.Series, checks: Mapping[str, pd.DataFrame | None], new_type: str) -> dict[str, dict[str, float]]:
    """The shares of `row` (a new type's calls) and, per reverse check, of the known cells classified as `new_type`."""
    row = row[row > 0].sort_values(ascending=False)
    record = {"called": {name: round(float(share), 4) for name, share in row.items()}}
    for name, check in checks.items():
        if check is not None and new_type in check.columns:
            back = check[new_type][check[new_type] > 0]
            record[name] = {known: round(float(share), 4) for known, share in back.items()}
    return record


def _refinements(shares: pd.DataFrame, back: pd.DataFrame, threshold: float) -> dict[str, str]:
    """New types that refine a known type: the reverse check spreads it over them, the model calls them it."""
    relations = {}
    for known, spread in back.iterrows():
        spread = spread[spread >= REVERSE_MIN_SHARE]
        if len(spread) < 2 or spread.sum() <= 0.5:
            continue
        called_it = shares.loc[spread.index, known][shares.loc[spread.index].idxmax(axis=1) == known]
        if (called_it >= threshold).any():
            relations.update(dict.fromkeys(called_it.index[called_it > 0.5], known))
    return relations


def _coarse_types(
    shares: pd.DataFrame, back: pd.DataFrame, parents: Mapping[str, str], taken: Mapping[str, str]
) -> dict[str, str]:
    """Known types a new type names coarsely: it is called them, they are classified as it, and no other new type."""
    relations: dict[str, str] = {}
    for new_type, row in shares.iterrows():
        if new_type in taken:
            continue
        row = row[row >= MIN_CHILD_SHARE]
        children = [name for name in row.index if name not in parents and name not in {*taken.values(), *relations}]
        others = shares.drop(index=new_type)[children].sum(axis=1)
        if (
            len(children) >= 2
            and row[children].sum() > 0.5
            and all(back.loc[child, new_type] > 0.5 for child in children)
            and not (others > 0.5).any()
        ):
            relations.update(dict.fromkeys(children, new_type))
    return relations


def reverse_shares(
    stage_x,
    stage_labels: np.ndarray,
    known_x,
    known_labels: np.ndarray,
    *,
    kept_x=None,
    kept_labels: np.ndarray | None = None,
    n_components: int = 20,
    k: int = 15,
) -> pd.DataFrame:
    """Per known type (rows), the shares of its cells that the stage's labels classify as each stage type (columns).

    A cell's class is the majority label of its `k` nearest stage cells in the stage's first `n_components`
    principal components (values centred on the stage's means). With `kept_x` (the known types' kept cells, labelled
    `kept_labels`), these cells join the stage's as classes, and the components are fitted on both: cells outside a
    fit lie nearer the centre than those in it, which would pull the held-out cells to the cells left out.
    """
    from sklearn.decomposition import TruncatedSVD
    from sklearn.neighbors import KNeighborsClassifier

    reference_x, reference_labels = _dense(stage_x), np.asarray(stage_labels)
    if kept_x is not None:
        reference_x = np.vstack([reference_x, _dense(kept_x)])
        reference_labels = np.concatenate([reference_labels, np.asarray(kept_labels)])
    known_x = _dense(known_x)
    mean = reference_x.mean(axis=0)
    n_components = max(1, min(n_components, reference_x.shape[0] - 1, reference_x.shape[1] - 1))
    pca = TruncatedSVD(n_components=n_components, random_state=0).fit(reference_x - mean)
    knn = KNeighborsClassifier(n_neighbors=min(k, reference_x.shape[0]))
    knn.fit(pca.transform(reference_x - mean), reference_labels)
    called = knn.predict(pca.transform(known_x - mean))
    return pd.crosstab(pd.Series(known_labels, name="known"), pd.Series(called, name="called"), normalize="index")


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)

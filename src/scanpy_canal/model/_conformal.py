"""Split-conformal novelty p-values, and the calibration cells they are computed from.

The calibration cells are held-out cells of known types from every stage: never trained on, never replayed. A known
query cell's novelty score is exchangeable with theirs, so its p-value ``(1 + #{i: s_i >= s}) / (n + 1)`` is at most
`alpha` with probability at most `alpha`: unassigning the cells whose p-value is at most `alpha` unassigns a known
cell with probability at most `alpha`, whatever the query holds. The scores compared are those of the calibration
cells predicted as the same type as the query cell when at least :data:`MONDRIAN_MIN_CELLS` are ("Mondrian", class
conditional: a hard or rare type is judged by its own cells); the types with fewer are judged together, by the
calibration cells predicted as any of them (:func:`mondrian_groups`). Judged by every calibration cell instead, the
rule would hold only on average over the types: a rare type whose scores run higher than the common types' would be
unassigned far more often than `alpha`. For the same reason, when the rare types hold calibration cells enough for
several groups, they are grouped with the types whose scores run alike: in the order of a scale per type that the
calibration cells do not choose (the median score of the type's bank cells), so each group's p-values stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse

#: Share of a stage's held-out cells that calibrate; the rest choose the best epoch. The p-values' resolution is
#: ``1 / (n + 1)`` for ``n`` calibration cells, while choosing among at most 15 epochs needs few cells.
CALIBRATION_SHARE = 2 / 3
#: Calibration cells a predicted type needs for its own p-values (the smallest p-value is 1 / (n + 1)).
MONDRIAN_MIN_CELLS = 50


def conformal_pvalues(
    scores: torch.Tensor,
    predicted: torch.Tensor,
    calibration_scores: torch.Tensor,
    calibration_predicted: torch.Tensor,
    n_types: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The p-value of each cell's novelty score (higher scores: more novel) among the calibration cells' scores.

    Parameters
    ----------
    scores, predicted
        The cells' scores and predicted type codes.
    calibration_scores, calibration_predicted
        The same for the calibration cells.
    n_types
        The number of known types (the codes run from 0 to ``n_types - 1``).
    scale
        ``(n_types,)`` the typical score of each type, from cells other than the calibration cells
        (:func:`type_scale`); it groups the rare types (:func:`mondrian_groups`).
    """
    pvalues = torch.ones(len(scores), dtype=torch.float64)
    for types in mondrian_groups(calibration_predicted, n_types, scale):
        rows = torch.isin(predicted, types)
        pvalues[rows] = _pvalues(scores[rows], calibration_scores[torch.isin(calibration_predicted, types)])
    return pvalues


def score_thresholds(
    calibration_scores: torch.Tensor,
    calibration_predicted: torch.Tensor,
    alpha: float,
    n_types: int,
    scale: torch.Tensor | None = None,
) -> tuple[float, dict[int, float]]:
    """The scores above which a cell is unassigned at `alpha`: for the types judged together, and for each other type.

    A cell scoring above the ``m``-th largest of ``n`` reference scores, ``m = floor(alpha (n + 1))``, has a p-value of
    at most `alpha`; with ``m = 0`` no cell is unassigned (threshold infinity). The first value is that of the types
    judged together when they form one group, NaN when every type has calibration cells enough of its own; when they
    form several groups, each of their types has its group's threshold among the others.
    """
    groups = mondrian_groups(calibration_predicted, n_types, scale)
    pooled_groups = [types for types in groups if not _has_own_cells(types, calibration_predicted)]
    pooled, per_type = float("nan"), {}
    for types in groups:
        threshold = _threshold(calibration_scores[torch.isin(calibration_predicted, types)], alpha)
        if len(pooled_groups) == 1 and types is pooled_groups[0]:
            pooled = threshold
        else:
            per_type.update(dict.fromkeys(types.tolist(), threshold))
    return pooled, per_type


def mondrian_groups(
    calibration_predicted: torch.Tensor, n_types: int, scale: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The type codes whose predicted cells share p-values.

    Each type with :data:`MONDRIAN_MIN_CELLS` calibration cells predicted as it is a group of its own. The types with
    fewer (or none) form one group, which the smallest of the others join, in order, until it holds as many (all the
    types when there are fewer calibration cells than that). With a `scale` per type, and calibration cells enough
    among them for two such groups, they form as many groups as they can instead: in the order of `scale`, each of
    :data:`MONDRIAN_MIN_CELLS` cells or more, so that types whose scores run alike are judged together.

    Examples
    --------
    >>> predicted = torch.repeat_interleave(torch.arange(5), torch.tensor([30, 30, 40, 40, 80]))
    >>> [group.tolist() for group in mondrian_groups(predicted, 5)]
    [[0, 1, 2, 3], [4]]
    >>> [group.tolist() for group in mondrian_groups(predicted, 5, scale=torch.tensor([1.0, 9.0, 2.0, 8.0, 5.0]))]
    [[0, 2], [3, 1], [4]]
    """
    counts = torch.bincount(calibration_predicted.long(), minlength=n_types)
    order = torch.argsort(counts, stable=True)
    n_pooled = int((counts < MONDRIAN_MIN_CELLS).sum())
    if scale is not None and int(counts[order[:n_pooled]].sum()) >= 2 * MONDRIAN_MIN_CELLS:
        rare = [code for code in torch.argsort(scale, stable=True).tolist() if counts[code] < MONDRIAN_MIN_CELLS]
        pooled = _consecutive_groups(rare, counts)
    else:
        while 0 < n_pooled < n_types and int(counts[order[:n_pooled]].sum()) < MONDRIAN_MIN_CELLS:
            n_pooled += 1
        pooled = [order[:n_pooled]] if n_pooled else []
    return pooled + [order[position : position + 1] for position in range(n_pooled, n_types)]


def type_scale(scores: torch.Tensor, codes: torch.Tensor, n_types: int) -> torch.Tensor:
    """The median of `scores` over each type's cells (`codes`); infinity for a type without any.

    :func:`mondrian_groups` orders the rare types by it; computed on cells that are not calibration cells (the bank's),
    it leaves the calibration cells' scores exchangeable with a known query cell's. A bank cell's input score counts the
    cell itself as its nearest neighbour, in every type the same way; only the order of the medians is used.
    """
    return torch.tensor(
        [scores[codes == code].median().item() if (codes == code).any() else float("inf") for code in range(n_types)]
    )


def _consecutive_groups(types: list[int], counts: torch.Tensor) -> list[torch.Tensor]:
    """`types` cut, in order, into runs of :data:`MONDRIAN_MIN_CELLS` calibration cells or more; the rest joins the last."""
    groups, current = [], []
    for code in types:
        current.append(code)
        if int(counts[current].sum()) >= MONDRIAN_MIN_CELLS:
            groups.append(current)
            current = []
    if current:
        groups[-1] += current
    return [torch.tensor(group) for group in groups]


def _has_own_cells(types: torch.Tensor, calibration_predicted: torch.Tensor) -> bool:
    return len(types) == 1 and int((calibration_predicted == types[0]).sum()) >= MONDRIAN_MIN_CELLS


def _pvalues(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    at_least = reference.numel() - torch.searchsorted(reference.sort().values, scores.contiguous(), right=False)
    return (1 + at_least).double() / (reference.numel() + 1)


def _threshold(reference: torch.Tensor, alpha: float) -> float:
    rank = int(np.floor(alpha * (reference.numel() + 1)))
    return float("inf") if rank < 1 else reference.sort(descending=True).values[rank - 1].item()


def split_held_out(
    codes: np.ndarray, held_out: np.ndarray, n_stage: int, rng: np.random.Generator, *, choose_epoch: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Split held-out rows into validation rows and calibration rows, which choose nothing.

    :data:`CALIBRATION_SHARE` of each type's held-out stage cells (the first `n_stage` rows), at random, calibrate;
    the others and any bank rows choose the best epoch, and a type keeps at least one for it. When no epoch is chosen
    (`choose_epoch` false: the last one is kept), every held-out stage row calibrates, and all still validate. Returns
    both, sorted.
    """
    stage_rows = held_out[held_out < n_stage]
    if not choose_epoch:
        return held_out, stage_rows
    calibration = [np.zeros(0, np.int64)]
    for code in np.unique(codes[stage_rows]):
        members = rng.permutation(stage_rows[codes[stage_rows] == code])
        calibration.append(members[: min(int(round(CALIBRATION_SHARE * len(members))), len(members) - 1)])
    calibration = np.sort(np.concatenate(calibration)).astype(np.int64)
    return np.setdiff1d(held_out, calibration), calibration


def update_calibration_cells(
    cells: ad.AnnData | None,
    new: ad.AnnData,
    labels: Sequence[str],
    cell_types: Sequence[str],
    *,
    stage: int,
    size: int,
    seed: int,
) -> ad.AnnData | None:
    """Add a stage's held-out cells to the calibration cells and keep at most ``size // len(cell_types)`` per type.

    A type over its quota keeps cells of every stage in turn (in a seeded random order within each stage), so the
    cells of early stages are not crowded out by later ones.

    Parameters
    ----------
    cells
        The calibration cells so far (obs ``cell_type``, ``stage``), or `None`.
    new
        The stage's held-out cells, in the model's gene panel.
    labels
        Their cell types.
    cell_types
        Every known type, in output-row order.
    stage
        The stage number, recorded in ``obs["stage"]``.
    size
        Capacity of the calibration set (0: none).
    seed
        Seed of the choice.

    Returns
    -------
    The calibration cells (X in the gene panel), or `None` when `size` is 0 or there are none.
    """
    if size == 0:
        return None
    new = new.copy()
    new.obs = pd.DataFrame({"cell_type": np.asarray(labels, dtype=str), "stage": stage}, index=new.obs_names)
    parts = [part for part in (cells, new) if part is not None and part.n_obs > 0]
    if not parts:
        return None
    merged = ad.concat(parts, merge="first") if len(parts) > 1 else parts[0].copy()
    merged.obs_names_make_unique()
    merged.obs["cell_type"] = merged.obs["cell_type"].astype(str)
    merged.obs["stage"] = merged.obs["stage"].astype(np.int64)
    turn = pd.Series(_turns(merged.obs, np.random.default_rng(seed)))
    rank_in_type = turn.groupby(merged.obs["cell_type"].to_numpy()).rank(method="first").to_numpy()
    kept = merged[rank_in_type <= size // len(cell_types)].copy()
    kept.obs["cell_type"] = pd.Categorical(kept.obs["cell_type"], categories=list(cell_types))
    return kept


def _turns(obs: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """Each cell's turn within its type: its place in a random order within its (type, stage) group, ties at random."""
    shuffled = rng.permutation(len(obs))
    within = obs.iloc[shuffled].groupby(["cell_type", "stage"], observed=True).cumcount().to_numpy()
    turn = np.empty(len(obs))
    turn[shuffled] = within + rng.random(len(obs))
    return turn


def calibration_footprint(cells: ad.AnnData | None) -> dict[str, int]:
    """How many calibration cells the model keeps and the bytes they take (expression and manifold vectors)."""
    if cells is None:
        return {"calibration_cells": 0, "calibration_bytes": 0}
    x = sparse.csr_matrix(cells.X)
    size = x.data.nbytes + x.indices.nbytes + x.indptr.nbytes + cells.obsm["manifold"].nbytes
    return {"calibration_cells": int(cells.n_obs), "calibration_bytes": int(size)}

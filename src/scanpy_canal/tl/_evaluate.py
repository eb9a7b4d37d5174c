"""Annotation metrics: closed-set and novel-type scores for one test set, and continual-learning summaries."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, f1_score


def _as_labels(values: Any, name: str) -> np.ndarray:
    """Labels as a 1-d array of strings; lists, arrays, Series and Categoricals are accepted."""
    array = np.asarray(values, dtype=object)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}.")
    if array.size and pd.isna(array).any():
        raise ValueError(f"{name} contains {int(pd.isna(array).sum())} missing labels.")
    return array.astype(str)


def _as_type_set(novel_types: Any) -> set[str]:
    """Novel type names as a set; a single string is one name (never its characters)."""
    if isinstance(novel_types, str):
        return {novel_types}
    if not isinstance(novel_types, Iterable):
        raise TypeError(f"novel_types must be a type name or a collection of names, got {type(novel_types).__name__}.")
    return {str(t) for t in novel_types}


def _mean_or_nan(mask: np.ndarray) -> float:
    return float(mask.mean()) if mask.size else float("nan")


def _h_score(known: float, unknown: float) -> float:
    """Harmonic mean of known and unknown accuracy: ``2KU / (K + U)``, 0 when both are 0."""
    if np.isnan(known) or np.isnan(unknown):
        return float("nan")
    total = known + unknown
    return 2 * known * unknown / total if total > 0 else 0.0


def _novel_scores(y_true: np.ndarray, y_pred: np.ndarray, unassigned: str) -> dict[str, float]:
    """Known, unknown accuracy and H-score for labels where novel cells are already marked `unassigned`."""
    is_novel = y_true == unassigned
    known = _mean_or_nan(y_pred[~is_novel] == y_true[~is_novel])
    unknown = _mean_or_nan(y_pred[is_novel] == unassigned)
    if not is_novel.any():
        warnings.warn("No cell of the novel types is present; unknown_accuracy and h_score are NaN.", stacklevel=3)
    if is_novel.all():
        warnings.warn("Every cell is of a novel type; known_accuracy and h_score are NaN.", stacklevel=3)
    return {"known_accuracy": known, "unknown_accuracy": unknown, "h_score": _h_score(known, unknown)}


def evaluate(
    y_true: Any,
    y_pred: Any,
    *,
    novel_types: Any = None,
    unassigned: str = "Unassigned",
) -> dict[str, float]:
    """Score predicted cell types against the truth, optionally with types the model has never seen.

    Parameters
    ----------
    y_true
        True labels, one per cell (list, array, :class:`pandas.Series` or :class:`pandas.Categorical`).
    y_pred
        Predicted labels, same length as `y_true`.
    novel_types
        Names of the types unseen in training: a collection of names, or a single name as a string. Their true
        labels are replaced by `unassigned` before scoring, so the right prediction for such a cell is `unassigned`.
    unassigned
        The label a model gives to cells it considers novel.

    Returns
    -------
    Plain floats: ``accuracy`` (over all cells), ``macro_f1`` (macro F1 over the union of true and predicted
    labels), ``ari`` (adjusted Rand index). With `novel_types` also ``known_accuracy`` (over cells of known types; an
    `unassigned` prediction counts as wrong), ``unknown_accuracy`` (fraction of novel cells predicted `unassigned`)
    and ``h_score`` (their harmonic mean, 0 when both are 0). When no cell is novel, ``unknown_accuracy`` and
    ``h_score`` are NaN (with a warning); likewise ``known_accuracy`` and ``h_score`` when every cell is novel.
    Labels are compared as strings, and a true label equal to `unassigned` counts as novel.

    Examples
    --------
    >>> import scanpy_canal as canal
    >>> canal.tl.evaluate(["a", "a", "b", "b"], ["a", "b", "b", "b"])["accuracy"]
    0.75
    >>> scores = canal.tl.evaluate(["a", "a", "c", "c"], ["a", "Unassigned", "Unassigned", "a"], novel_types="c")
    >>> scores["known_accuracy"], scores["unknown_accuracy"], scores["h_score"]
    (0.5, 0.5, 0.5)
    """
    true, pred = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {true.size} and {pred.size}.")
    if true.size == 0:
        raise ValueError("Cannot evaluate an empty set of labels.")
    if novel_types is not None:
        true = np.where(np.isin(true, list(_as_type_set(novel_types))), unassigned, true)
    scores = {
        "accuracy": float(np.mean(true == pred)),
        "macro_f1": float(f1_score(true, pred, average="macro", zero_division=0)),
        "ari": float(adjusted_rand_score(true, pred)),
    }
    if novel_types is not None:
        scores |= _novel_scores(true, pred, unassigned)
    return scores


def _as_stage_matrix(R: Any) -> np.ndarray:
    """``R`` as a float square matrix with finite entries on and below the diagonal."""
    matrix = R.to_numpy(dtype=float) if isinstance(R, pd.DataFrame) else np.asarray(R, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square (n_stages, n_stages) matrix, got shape {matrix.shape}.")
    lower = np.tril_indices_from(matrix)
    if not np.isfinite(matrix[lower]).all():
        raise ValueError("R must be finite on and below the diagonal (R[i, j] with j <= i).")
    return matrix


def continual_metrics(R: Any) -> dict[str, float]:
    """Summarise a continual stream: final average accuracy, backward transfer and forgetting.

    Parameters
    ----------
    R
        Square accuracy matrix (array or :class:`pandas.DataFrame`), ``R[i, j]`` = accuracy on the test set of stage
        ``j`` after training stage ``i``. Entries above the diagonal (test sets of stages not yet trained) are ignored
        and may be NaN.

    Returns
    -------
    Plain floats, with ``T`` stages: ``acc`` = mean of the last row; ``bwt`` = mean over ``j < T-1`` of
    ``R[T-1, j] - R[j, j]`` (negative when old stages are forgotten); ``forgetting`` = mean over ``j < T-1`` of
    ``max(R[j:T-1, j]) - R[T-1, j]``, the drop from the best earlier accuracy. Both are 0.0 for a single stage.

    Examples
    --------
    >>> import numpy as np, scanpy_canal as canal
    >>> R = np.array([[0.9, np.nan], [0.7, 0.8]])
    >>> {k: round(v, 3) for k, v in canal.tl.continual_metrics(R).items()}
    {'acc': 0.75, 'bwt': -0.2, 'forgetting': 0.2}
    """
    matrix = _as_stage_matrix(R)
    last = matrix[-1]
    if matrix.shape[0] == 1:
        return {"acc": float(last.mean()), "bwt": 0.0, "forgetting": 0.0}
    earlier = np.diag(matrix)[:-1]
    # best accuracy on test set j over stages i in [j, T-2]; entries above the diagonal are excluded
    before_last = np.where(np.tri(*matrix.shape, dtype=bool), matrix, -np.inf)[:-1, :-1]
    return {
        "acc": float(last.mean()),
        "bwt": float(np.mean(last[:-1] - earlier)),
        "forgetting": float(np.mean(before_last.max(axis=0) - last[:-1])),
    }

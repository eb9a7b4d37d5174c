"""Plots of how a model learned: metrics over the stages, and the example bank it replays."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._utils import finish, new_axes, plot_docstring, tick_fontsize

if TYPE_CHECKING:
    from scanpy_canal._demo import StreamResult
    from scanpy_canal.model import CANAL

#: History columns (validation, training) of each metric a model can plot.
_HISTORY_COLUMNS = {"accuracy": ("accuracy_validation", "accuracy_train"), "loss": ("validation_loss", "train_loss")}
#: Axis labels of the metrics; other names are shown with spaces for underscores.
_LABELS = {"macro_f1": "macro F1", "accuracy_novel": "accuracy (novel-cell detection)"}


@plot_docstring
def stage_metrics(
    model_or_result: CANAL | StreamResult,
    *,
    metric: Literal["accuracy", "loss", "macro_f1", "accuracy_novel"] = "accuracy",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Plot a metric over the stages of continual training.

    For a :class:`~scanpy_canal.CANAL` model: the per-epoch validation metric (solid) and training metric (dashed)
    from :attr:`~scanpy_canal.CANAL.history`, over the epochs of all stages one after the other. Shaded spans mark the
    stages and dots the epoch each stage kept (the best on its validation cells, or the last: ``keep_epoch``).

    For the result of a whole stream (the stage x test-set tables of ``StreamResult``): one line per test set,
    from the stage that introduced it to the last, so a falling line shows forgetting.

    Parameters
    ----------
    model_or_result
        A trained :class:`~scanpy_canal.CANAL`, or a ``StreamResult`` (its tables have the stage trained as rows, the
        test set as columns, and missing values above the diagonal).
    metric
        ``"accuracy"`` or ``"loss"`` for a model; for a stream result the name of one of its tables: ``"accuracy"``,
        ``"macro_f1"`` or ``"accuracy_novel"`` (with novel-cell detection).
    ax
        Axes to draw on; a new figure when `None`.
    {plot_parameters}

    {plot_returns}

    Examples
    --------
    >>> import scanpy_canal as canal
    >>> model.train(ref1)  # doctest: +SKIP
    >>> model.train(ref2)  # doctest: +SKIP
    >>> canal.pl.stage_metrics(model)  # doctest: +SKIP
    >>> from scanpy_canal._demo import run_stream
    >>> canal.pl.stage_metrics(run_stream(stream), metric="macro_f1")  # doctest: +SKIP
    """
    if isinstance(getattr(model_or_result, "accuracy", None), pd.DataFrame):
        tables = [name for name, value in vars(model_or_result).items() if isinstance(value, pd.DataFrame)]
        if metric not in tables:
            raise ValueError(f"metric must be one of {tables} for a stream result, not {metric!r}.")
        ax = new_axes(ax, (5.0, 3.5))
        _plot_stream(ax, getattr(model_or_result, metric), _LABELS.get(metric, metric.replace("_", " ")))
    elif hasattr(model_or_result, "history"):
        if metric not in _HISTORY_COLUMNS:
            raise ValueError(f"metric must be one of {list(_HISTORY_COLUMNS)} for a model, not {metric!r}.")
        history = model_or_result.history
        if history is None or len(history) == 0:
            raise ValueError("The model has no training history: train it first with `model.train(...)`.")
        missing = [column for column in ("stage", "epoch", *_HISTORY_COLUMNS[metric]) if column not in history]
        if missing:
            raise ValueError(f"The model's history has no column(s) {missing}.")
        ax = new_axes(ax, (6.0, 3.5))
        _plot_history(ax, history, *_HISTORY_COLUMNS[metric], metric)
    else:
        raise TypeError(f"Expected a CANAL model or a StreamResult, got {type(model_or_result).__name__}.")
    return finish(ax, show=show, save=save, return_fig=return_fig)


def _plot_history(ax: Axes, history: pd.DataFrame, validation: str, train: str, label: str) -> None:
    """Validation and training curves over the concatenated epochs of all stages, one shaded span per stage."""
    history = history.sort_values(["stage", "epoch"], kind="stable").reset_index(drop=True)
    x = np.arange(1, len(history) + 1)
    stages = history["stage"].to_numpy()
    starts = np.flatnonzero(np.r_[True, stages[1:] != stages[:-1]])
    ends = np.r_[starts[1:], len(stages)]
    for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
        ax.axvspan(start + 0.5, end + 0.5, color="0.5", alpha=0.12 if i % 2 == 0 else 0.04, linewidth=0)
        if i > 0:
            ax.axvline(start + 0.5, color="0.4", linestyle=":", linewidth=1)
        ax.text(
            (start + end + 1) / 2,
            1.01,
            f"stage {stages[start]}",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize="small",
        )
    (line,) = ax.plot(x, history[validation].to_numpy(dtype=float), label="validation")
    ax.plot(x, history[train].to_numpy(dtype=float), linestyle="--", color=line.get_color(), alpha=0.8, label="train")
    if "best" in history:
        best = history["best"].fillna(False).to_numpy(dtype=bool)
        if best.any():
            ax.plot(
                x[best],
                history.loc[best, validation].to_numpy(dtype=float),
                linestyle="none",
                marker="o",
                color="black",
                markersize=5,
                zorder=3,
                label="epoch kept",
            )
    ax.set_xlim(0.5, len(history) + 0.5)
    ax.set_xlabel("epoch (all stages)")
    ax.set_ylabel(label)
    ax.legend(loc="best", fontsize="small")


def _plot_stream(ax: Axes, table: pd.DataFrame, label: str) -> None:
    """One line per test set (column) over the stages (rows) from the first with a value."""
    x = np.arange(len(table.index))
    for test_set in table.columns:
        values = table[test_set].to_numpy(dtype=float)
        known = ~np.isnan(values)
        if known.any():
            first = int(np.argmax(known))
            ax.plot(x[first:], values[first:], marker="o", markersize=4, label=str(test_set))
    ax.set_xticks(x, [str(name) for name in table.index])
    ax.set_xlabel("after training")
    ax.set_ylabel(label)
    ax.legend(title="test set", loc="best", fontsize="small")


@plot_docstring
def example_bank(
    model: CANAL,
    *,
    quota: int | None = None,
    show_quota: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Plot the composition of the example bank: examples per cell type, stacked by the stage that added them.

    Parameters
    ----------
    model
        A trained :class:`~scanpy_canal.CANAL` (anything with an ``example_bank`` AnnData whose obs hold
        ``cell_type`` and ``stage``).
    quota
        Examples allowed per cell type, drawn as a dashed vertical line. By default it is inferred as
        ``rehearsal_size // len(model.cell_types)`` when the last entry of ``model.stage_history_`` records a
        ``rehearsal_size``; otherwise no line is drawn.
    show_quota
        Draw the quota line.
    ax
        Axes to draw on; a new figure when `None`.
    {plot_parameters}

    {plot_returns}

    Examples
    --------
    >>> import scanpy_canal as canal
    >>> model.train(ref1, rehearsal_size=1000)  # doctest: +SKIP
    >>> model.train(ref2, rehearsal_size=1000)  # doctest: +SKIP
    >>> canal.pl.example_bank(model)  # doctest: +SKIP
    """
    bank = getattr(model, "example_bank", None)
    if bank is None or bank.n_obs == 0:
        raise ValueError("The model has no example bank: train at least one stage with `rehearsal_size > 0` first.")
    missing = [column for column in ("cell_type", "stage") if column not in bank.obs]
    if missing:
        raise ValueError(f"The example bank's obs have no column(s) {missing}.")
    types = bank.obs["cell_type"]
    if not isinstance(types.dtype, pd.CategoricalDtype):
        types = pd.Categorical(types.astype(str), categories=sorted(types.astype(str).unique()))
    counts = pd.crosstab(pd.Categorical(types).remove_unused_categories(), bank.obs["stage"].to_numpy(), dropna=False)
    counts = counts.sort_index(axis=1)
    if quota is None:
        quota = _inferred_quota(model)

    n_types, n_stages = counts.shape
    ax = new_axes(ax, (5.0, max(2.5, 0.3 * n_types + 1.0)))
    colors = _stage_colors(n_stages)
    y = np.arange(n_types)
    left = np.zeros(n_types)
    handles = []
    for color, stage in zip(colors, counts.columns, strict=True):
        values = counts[stage].to_numpy(dtype=float)
        handles.append(ax.barh(y, values, left=left, color=color, label=f"stage {stage}"))
        left += values
    if show_quota and quota is not None and quota > 0:
        handles.append(ax.axvline(quota, color="black", linestyle="--", linewidth=1, label=f"quota ({quota})"))
    ax.set_yticks(y, [str(name) for name in counts.index], fontsize=tick_fontsize(n_types))
    ax.set_ylim(n_types - 0.5, -0.5)  # first type on top
    ax.set_xlabel("examples in the bank")
    ax.set_ylabel("cell type")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    return finish(ax, show=show, save=save, return_fig=return_fig)


def _inferred_quota(model: CANAL) -> int | None:
    """``rehearsal_size // len(cell_types)`` when the last stage recorded its bank capacity."""
    history = getattr(model, "stage_history_", None) or []
    size = history[-1].get("rehearsal_size") if history and isinstance(history[-1], dict) else None
    cell_types = getattr(model, "cell_types", None) or []
    if size is None or not cell_types:
        return None
    return int(size) // len(cell_types)


def _stage_colors(n: int) -> list:
    """Distinct colours for up to ten stages, a sequential map for more."""
    import matplotlib as mpl

    cmap = mpl.colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i) for i in range(n)] if n <= 10 else [cmap(v) for v in np.linspace(0, 1, n)]

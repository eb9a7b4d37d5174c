"""Plots of annotated cells: predictions against the truth, and where the model is unsure."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ._utils import finish, new_axes, plot_docstring, tick_fontsize

if TYPE_CHECKING:
    from anndata import AnnData

UNASSIGNED = "Unassigned"
#: Most cell types (rows or columns) whose values `confusion` writes into the cells by default.
MAX_ANNOTATED = 15


@plot_docstring
def confusion(
    adata: AnnData,
    truth: str,
    pred: str,
    *,
    normalize: bool = True,
    annotate: bool | None = None,
    cmap: str = "Blues",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Plot the confusion matrix of true against predicted cell types as a heatmap.

    Rows are the true types present, in the order of ``adata.obs[truth]``'s categories (sorted when it is not
    categorical). Columns are the predicted types present: first those that are also true types, in the row order
    (so that correct calls fall on the diagonal), then the others in the order of ``adata.obs[pred]``'s categories,
    and ``"Unassigned"`` last. Cells with a missing truth or prediction are left out.

    Parameters
    ----------
    adata
        Annotated cells.
    truth
        Obs column of the true cell types.
    pred
        Obs column of the predicted cell types, e.g. ``"canal_prediction"`` from :func:`~scanpy_canal.tl.annotate`.
    normalize
        Show each true type's fraction of cells per predicted type (rows sum to 1) instead of cell counts.
    annotate
        Write the non-zero values into the cells; by default only when there are at most 15 rows and columns.
    cmap
        Matplotlib colormap.
    ax
        Axes to draw on; a new figure sized to the number of types when `None`.
    {plot_parameters}

    {plot_returns}

    Examples
    --------
    >>> import scanpy_canal as canal
    >>> canal.tl.annotate(query, model, novel=True)  # doctest: +SKIP
    >>> canal.pl.confusion(query, "cell_type", "canal_prediction")  # doctest: +SKIP
    """
    for role, column in (("truth", truth), ("pred", pred)):
        if column not in adata.obs:
            raise ValueError(f"{role}={column!r} is not a column of adata.obs; it has {list(adata.obs.columns)}.")
    true, predicted = adata.obs[truth], adata.obs[pred]
    present = (true.notna() & predicted.notna()).to_numpy()
    if not present.any():
        raise ValueError(f"No cell has both a {truth!r} and a {pred!r} value.")
    true, predicted = true[present].astype(str), predicted[present].astype(str)
    rows = _ordered_labels(adata.obs[truth], set(true))
    columns = _ordered_labels(adata.obs[pred], set(predicted))
    columns = [c for c in rows if c in columns] + [c for c in columns if c not in rows and c != UNASSIGNED]
    columns += [UNASSIGNED] if UNASSIGNED in set(predicted) and UNASSIGNED not in rows else []
    counts = pd.crosstab(true.to_numpy(), predicted.to_numpy()).reindex(index=rows, columns=columns, fill_value=0)
    values = counts.to_numpy(dtype=float)
    if normalize:
        values = values / values.sum(axis=1, keepdims=True)

    n_rows, n_columns = values.shape
    n = max(n_rows, n_columns)
    ax = new_axes(ax, (max(4.0, 0.35 * n_columns + 2.5), max(3.5, 0.35 * n_rows + 1.5)))
    image = ax.imshow(values, cmap=cmap, vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    fontsize = tick_fontsize(n)
    ax.set_xticks(np.arange(n_columns), columns, rotation=45, ha="right", rotation_mode="anchor", fontsize=fontsize)
    ax.set_yticks(np.arange(n_rows), rows, fontsize=fontsize)
    ax.set_xlabel(f"predicted ({pred})")
    ax.set_ylabel(f"true ({truth})")
    colorbar = ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label("fraction of true type" if normalize else "cells")
    if annotate if annotate is not None else n <= MAX_ANNOTATED:
        high = np.nanmax(values) if values.size else 0.0
        for i, j in zip(*np.nonzero(values), strict=True):
            value = values[i, j]
            ax.text(
                j,
                i,
                f"{value:.2f}" if normalize else f"{int(value)}",
                ha="center",
                va="center",
                fontsize=fontsize * 0.8,
                color="white" if value > 0.6 * high else "black",
            )
    return finish(ax, show=show, save=save, return_fig=return_fig)


def _ordered_labels(column: pd.Series, present: set[str]) -> list[str]:
    """The `present` labels in the order of `column`'s categories, or sorted when it is not categorical."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        ordered = [str(c) for c in column.cat.categories]
        return [c for c in ordered if c in present] + sorted(present - set(ordered))
    return sorted(present)


@plot_docstring
def uncertainty(
    adata: AnnData,
    *,
    basis: str = "umap",
    key: str = "canal",
    value: Literal["score", "pvalue"] | str = "score",
    ring_color: str = "black",
    ring_size: float | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
    **kwargs: Any,
) -> Axes | Figure | None:
    """Plot CANAL's novel-cell scores on an embedding, with the unassigned cells ringed and the threshold marked.

    The cells are coloured by ``adata.obs[f"{key}_novelty_score"]`` (or with ``value="pvalue"`` by their conformal
    ``adata.obs[f"{key}_novelty_pvalue"]``) through :func:`scanpy.pl.embedding`; those predicted ``"Unassigned"`` in
    ``adata.obs[f"{key}_prediction"]`` get a ring (at the first two components of the basis). A line on the colour bar
    marks the threshold: the score above which a cell is unassigned (for the conformal rule that of the types judged
    together, none if every type has calibration cells enough of its own: such a type has its own), or the p-value
    `alpha` at or below which it is.

    Parameters
    ----------
    adata
        Cells annotated by :func:`~scanpy_canal.tl.annotate` with ``novel=True``, with an embedding.
    basis
        Embedding in ``adata.obsm`` (``"umap"`` reads ``X_umap``).
    key
        The `key_added` of :func:`~scanpy_canal.tl.annotate`.
    value
        Colour by the novelty score (``"score"``), by its p-value (``"pvalue"``), or by the p-value of one of
        the fused scores (its name, e.g. ``"input"``: a column of ``adata.obsm[f"{key}_novelty_pvalues"]``), to see
        which score flags which cells; the line then marks ``alpha / m`` for ``m`` fused scores. ``"uncertainty"``,
        the former name of ``"score"``, is deprecated; so is reading the former column ``{key}_uncertainty`` when
        ``{key}_novelty_score`` is missing (data annotated before it was renamed): both still work, with a
        :class:`FutureWarning`.
    ring_color
        Edge colour of the rings around the unassigned cells.
    ring_size
        Marker area of the rings in points²; 1.5 times scanpy's dot size by default.
    ax
        Axes to draw on; a new figure when `None`.
    {plot_parameters}
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (e.g. ``size``, ``cmap``, ``title``).

    {plot_returns}

    Examples
    --------
    >>> import scanpy as sc, scanpy_canal as canal
    >>> canal.tl.annotate(query, model, novel=True)  # doctest: +SKIP
    >>> sc.pp.neighbors(query, use_rep="X_canal")  # doctest: +SKIP
    >>> sc.tl.umap(query)  # doctest: +SKIP
    >>> canal.pl.uncertainty(query, basis="umap")  # doctest: +SKIP
    """
    import scanpy as sc

    per_score = adata.obsm.get(f"{key}_novelty_pvalues")
    scores = [] if per_score is None else list(pd.DataFrame(per_score).columns)
    value = _renamed_value(value)
    if value not in ("score", "pvalue", *scores):
        raise ValueError(
            f"value must be 'score', 'pvalue' or a score of adata.obsm[{f'{key}_novelty_pvalues'!r}] "
            f"({', '.join(map(repr, scores)) or 'none'}), got {value!r}."
        )
    columns = {"score": novelty_score_column(adata, key), "pvalue": f"{key}_novelty_pvalue"}
    color = columns.get(value, f"{key}_{value}_pvalue")
    prediction = f"{key}_prediction"
    for column in (prediction,) if value in scores else (color, prediction):
        if column not in adata.obs:
            raise ValueError(
                f"adata.obs has no {column!r}: run `canal.tl.annotate(adata, model, novel=True, key_added={key!r})` "
                "first (p-values need a rule other than threshold='canal')."
            )
    obsm_key = basis if basis in adata.obsm else f"X_{basis}"
    if obsm_key not in adata.obsm:
        raise ValueError(
            f"adata.obsm has no {basis!r} or {f'X_{basis}'!r} embedding: compute it first, e.g. "
            f'`sc.pp.neighbors(adata, use_rep="X_{key}")` and `sc.tl.umap(adata)`.'
        )
    ax = new_axes(ax, (4.5, 4.0))
    line, title = _threshold_mark(adata.uns.get(key), key, value, len(scores))
    if value in scores:  # a light copy holding the one score's p-values, so that `adata` is not written to
        import anndata

        obs = pd.DataFrame({color: np.asarray(pd.DataFrame(per_score)[value], dtype=float)}, index=adata.obs_names)
        adata = anndata.AnnData(
            obs=obs.assign(**{prediction: adata.obs[prediction]}), obsm={obsm_key: adata.obsm[obsm_key]}
        )
    if "title" not in kwargs and title is not None:
        kwargs["title"] = title
    if value != "score":
        kwargs.setdefault("cmap", "viridis_r")  # the cells most likely novel stand out
    sc.pl.embedding(adata, basis=basis, color=color, show=False, ax=ax, **kwargs)
    colorbars = [other for other in ax.figure.axes if other is not ax and other.get_label() == "<colorbar>"]
    if line is not None and colorbars and np.isfinite(line):
        colorbars[-1].axhline(line, color=ring_color, linewidth=1.5)

    unassigned = (adata.obs[prediction] == UNASSIGNED).to_numpy(dtype=bool)
    coordinates = np.asarray(adata.obsm[obsm_key])[unassigned, :2]
    if ring_size is None:
        ring_size = 1.5 * (kwargs.get("size") or 120_000 / max(adata.n_obs, 1))
    label = f"{UNASSIGNED} ({int(unassigned.sum())})"
    ax.scatter(
        coordinates[:, 0],
        coordinates[:, 1],
        s=ring_size,
        facecolors="none",
        edgecolors=ring_color,
        linewidths=0.6,
        label=label,
        zorder=3,
    )
    handle = Line2D([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor=ring_color)
    ax.legend(handles=[handle], labels=[label], loc="best", fontsize="small", frameon=False)
    return finish(ax, show=show, save=save, return_fig=return_fig)


def _threshold_mark(params: Any, key: str, value: str, n_scores: int) -> tuple[float | None, str | None]:
    """Where the colour bar gets its threshold line, and the title that says it."""
    if not isinstance(params, Mapping):
        return None, None
    alpha = params.get("params", {}).get("alpha")
    if value not in ("pvalue", "score"):
        level = None if alpha is None else alpha / max(n_scores, 1)
        return level, f"{key} {value} p-value" + ("" if level is None else f" (flags at p ≤ {level:.3g})")
    if value == "pvalue":
        return alpha, None if alpha is None else f"{key} novelty p-value (unassigned at p ≤ {alpha:g})"
    threshold = params.get("threshold")
    if threshold is None or not np.isfinite(threshold):
        return None, None
    return float(threshold), f"{key} novelty score (threshold {float(threshold):.2f})"


def novelty_score_column(adata: AnnData, key: str) -> str:
    """The column of ``adata.obs`` holding the novelty score: ``{key}_novelty_score``, or its former name.

    Data annotated before the rename have ``{key}_uncertainty``; it is read with a :class:`FutureWarning`.
    """
    column, former = f"{key}_novelty_score", f"{key}_uncertainty"
    if column not in adata.obs and former in adata.obs:
        warnings.warn(
            f"adata.obs[{former!r}] is the former name of {column!r}, read until the next release: annotate the "
            "data again (canal.tl.annotate), or rename the column.",
            FutureWarning,
            stacklevel=3,
        )
        return former
    return column


def _renamed_value(value: str) -> str:
    """`value` of :func:`uncertainty`, its former name ``"uncertainty"`` as ``"score"`` (with a FutureWarning)."""
    if value != "uncertainty":
        return value
    warnings.warn(
        'value="uncertainty" is now value="score"; the former name goes in the next release.',
        FutureWarning,
        stacklevel=3,
    )
    return "score"

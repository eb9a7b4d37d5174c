"""What every plot shares: where it draws, and how it saves, shows and returns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

_PLOT_PARAMETERS = """show
        Show the figure and return `None`; `None` follows ``scanpy.settings.autoshow``.
    save
        File to save the figure to (format from the extension).
    return_fig
        Return the figure instead of the axes."""
_PLOT_RETURNS = """Returns
    -------
    The axes, the figure when `return_fig`, or `None` when shown."""

F = TypeVar("F", bound=Callable)


def plot_docstring(function: F) -> F:
    """Fill ``{plot_parameters}`` and ``{plot_returns}`` in `function`'s docstring with what every plot shares."""
    doc = function.__doc__.replace("{plot_parameters}", _PLOT_PARAMETERS)
    function.__doc__ = doc.replace("{plot_returns}", _PLOT_RETURNS)
    return function


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    """`ax`, or the axes of a new figure of size `figsize`."""
    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize)
    return ax


def finish(ax: Axes, *, show: bool | None, save: str | Path | None, return_fig: bool) -> Axes | Figure | None:
    """Save the figure of `ax` if asked, then show it (returning `None`), or return the figure or the axes."""
    fig = ax.figure.figure  # the root figure, also when `ax` lies in a subfigure
    if save is not None:
        fig.savefig(save, bbox_inches="tight")
    if show is None:
        from scanpy import settings

        show = settings.autoshow
    if show:
        plt.show()
        return None
    return fig if return_fig else ax


def tick_fontsize(n: int) -> float:
    """Tick labels shrink from 10 pt (up to 18 labels) to 6 pt (30 and more)."""
    return float(np.clip(180 / max(n, 1), 6, 10))

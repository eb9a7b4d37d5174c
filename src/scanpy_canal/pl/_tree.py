"""The cell-type tree of a model, drawn as an indented outline: one row per type, children under their parent."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._utils import finish, new_axes, plot_docstring

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from scanpy_canal.model import CANAL


@plot_docstring
def cell_type_tree(
    model: CANAL,
    *,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Draw the model's cell-type tree: each type under its parent, with the stage that brought it.

    Parameters
    ----------
    model
        A :class:`~scanpy_canal.CANAL` (its :attr:`~scanpy_canal.CANAL.cell_type_tree` and ``stage_history_``).
    ax
        Axes to draw on; a new figure when `None`.
    {plot_parameters}

    {plot_returns}

    Examples
    --------
    >>> model.train(ref2)  # doctest: +SKIP
    >>> canal.pl.cell_type_tree(model)  # doctest: +SKIP
    """
    tree = model.cell_type_tree
    order = _outline(tree)
    stage_of = {name: record["stage"] for record in model.stage_history_ for name in record["new_cell_types"]}
    ax = new_axes(ax, (4 + tree["depth"].max(), 0.35 * len(order) + 0.6))
    row_of = {name: row for row, name in enumerate(order)}
    for name in order:
        depth, row, parent = tree.loc[name, "depth"], row_of[name], tree.loc[name, "parent"]
        stage = f"  (stage {stage_of[name]})" if name in stage_of else ""
        ax.text(
            depth, -row, f"{name}{stage}", va="center", fontsize=9, color="black" if tree.loc[name, "leaf"] else "C0"
        )
        if parent is not None:
            ax.plot([depth - 0.9, depth - 0.9, depth - 0.1], [-row_of[parent] - 0.3, -row, -row], color="0.6", lw=1)
    ax.set_xlim(-0.2, tree["depth"].max() + 3)
    ax.set_ylim(-len(order) + 0.5, 0.5)
    ax.set_axis_off()
    ax.set_title("Cell-type tree (blue: types with children)")
    return finish(ax, show=show, save=save, return_fig=return_fig)


def _outline(tree: pd.DataFrame) -> list[str]:
    """The types depth first: each root in output-row order, followed by its descendants."""
    children = {name: [c for c in tree.index if tree.loc[c, "parent"] == name] for name in tree.index}
    order: list[str] = []

    def visit(name: str) -> None:
        order.append(name)
        for child in children[name]:
            visit(child)

    for root in tree.index[tree["parent"].isna()]:
        visit(root)
    return order

"""Draw the CANAL stage diagram used in ``docs/method.md``.

Run from the repository root (the SVG is committed, so the docs build does not run this)::

    python docs/_static/make_stages_figure.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).with_name("canal_stages.svg")

DATA = "#dbe9f6"
MODEL = "#fde3c8"
BANK = "#d9f0d3"
TEACHER = "#eeeeee"
EDGE = "#444444"


def box(ax, x, y, w, h, text, color, **kwargs):
    """A rounded box of width `w` and height `h` centred on (`x`, `y`) with centred `text`."""
    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            fc=color,
            ec=EDGE,
            lw=1,
            **kwargs,
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5, linespacing=1.3)


def arrow(ax, start, end, text=None, style="-|>", ls="-", offset=(0, 0.12), **kwargs):
    """An arrow from `start` to `end`, with an optional italic label near its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=10, lw=1, color=EDGE, ls=ls, **kwargs))
    if text:
        x, y = (start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1]
        ax.text(x, y, text, ha="center", va="bottom", fontsize=7.5, color="#333333", style="italic")


def main():
    """Draw the figure and write it next to this script."""
    plt.rcParams["svg.fonttype"] = "none"  # keep text as text: a small, searchable SVG
    plt.rcParams["font.family"] = "DejaVu Sans"
    fig, ax = plt.subplots(figsize=(9.0, 3.9))
    ax.set_xlim(0, 9.0)
    ax.set_ylim(0, 3.9)
    ax.axis("off")

    xs = [1.3, 4.5, 7.7]
    stages = [
        ("Stage 1 data\ntypes A, B, C", "model 1\nhead: A B C"),
        ("Stage 2 data\ntypes B, D", "model 2\nhead: A B C | D"),
        ("Stage 3 data\ntypes A, E", "model 3\nhead: A B C D | E"),
    ]
    for t, (x, (data, model)) in enumerate(zip(xs, stages, strict=True), start=1):
        ax.text(x, 3.72, f"stage {t}", ha="center", va="center", fontsize=10, weight="bold")
        box(ax, x, 3.15, 1.7, 0.6, data, DATA)
        box(ax, x, 1.85, 1.7, 0.62, model, MODEL)
        arrow(ax, (x, 2.84), (x, 2.17), "fine-tune", offset=(0.45, -0.08))
    for t in range(2):
        x0, x1 = xs[t], xs[t + 1]
        # the bank chosen after stage t is replayed in stage t + 1
        box(ax, (x0 + x1) / 2, 0.55, 1.75, 0.6, f"example bank {t + 1}\n≤ L/C cells per type", BANK)
        arrow(ax, (x0 + 0.25, 1.53), ((x0 + x1) / 2 - 0.5, 0.86), "top-k by e·w", offset=(-0.55, -0.05))
        arrow(ax, ((x0 + x1) / 2 + 0.5, 0.86), (x1 - 0.25, 1.53), "replay", offset=(-0.45, -0.05))
        # the previous model is copied, frozen, and distilled into the new one
        arrow(ax, (x0 + 0.86, 1.85), (x1 - 0.86, 1.85), "init + frozen teacher", offset=(0, 0.06))
        ax.text(
            (x0 + x1) / 2,
            1.7,
            "distil embeddings\nweight 0.1·C_old/C_new",
            ha="center",
            va="top",
            fontsize=7.5,
            color="#333333",
        )
    fig.tight_layout(pad=0.2)
    fig.savefig(OUT, metadata={"Date": None})
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.1f} kB)")


if __name__ == "__main__":
    main()

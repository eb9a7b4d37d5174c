"""The tables and the figure of ``docs/continual_benchmark.md``, from ``benchmarks/results/continual_stream.json``.

Usage (the SVG is committed, so the docs build does not run this; the tables are printed as Markdown)::

    .venv/bin/python benchmarks/continual_stream_report.py

The figure has one row per stream. Left: the mean held-out accuracy after each stage (the mean of the stage's row
of the accuracy matrix, averaged over seeds). Right: the accuracy on the first stage's test cells after each
stage, where forgetting shows as a falling line.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results" / "continual_stream.json"
OUT = Path(__file__).resolve().parent.parent / "docs" / "_static" / "continual_stream.svg"
STYLE = {
    "canal": ("CANAL", "C0", "-"),
    "canal_no_bank": ("no bank", "C0", "--"),
    "canal_no_distill": ("no distillation", "C0", ":"),
    "naive_finetune": ("naive fine-tuning", "C3", "-"),
    "canal_random_bins": ("CANAL, random bins", "C4", "-."),
    "canal_unbalanced": ("CANAL, unweighted loss", "C6", "--"),
    "canal_block_minus2": ("CANAL, last but one block trains", "C7", "--"),
    "canal_head_bins": ("CANAL, head along the bins", "C8", "-."),
    "canal_head_normal": ("CANAL, PyTorch's head", "C9", "--"),
    "canal_reads_bins": ("CANAL, head along the bins, zero residuals, bin step 0.25", "C9", "-."),
    "canal_best_epoch": ("CANAL, best validation epoch kept", "C5", ":"),
    "canal_no_smoothing": ("CANAL, no label smoothing", "C6", ":"),
    "canal_30_epochs": ("CANAL, 30 epochs a stage", "C7", ":"),
    "canal_batch_32": ("CANAL, batch 32", "C8", ":"),
    "canal_every_block": ("CANAL, every block trains", "C9", ":"),
    "canal_zero_residual": ("CANAL, zero residual branches", "C6", "-."),
    "canal_bin_step_quarter": ("CANAL, bin step 0.25", "C7", "-."),
    "canal_head_dropout": ("CANAL, head dropout 0.5", "C8", "--"),
    "canal_head_dropout_02": ("CANAL, head dropout 0.2", "C9", "--"),
    "canal_pretrained": ("CANAL, pretrained on the stream's cells", "C1", "-."),
    "canal_round_before": ("CANAL, the settings before issue 16", "C3", ":"),
    "canal_auto_balance": ("CANAL, types weighed the same where the bank is a sample", "C1", "--"),
    "canal_joint": ("joint CANAL", "k", "-"),
    "lr_sequential": ("LR, last stage only", "C2", "--"),
    "lr_joint": ("LR, joint", "C2", "-"),
    "lr_bank": ("LR, same bank", "C2", ":"),
    "lr_balanced_bank": ("LR, same bank, balanced", "C2", "-."),
    "lr_bins_bank": ("LR on the bins, same bank", "C8", "--"),
    "celltypist_joint": ("CellTypist, joint", "C5", "-"),
    "celltypist_bank": ("CellTypist, same bank", "C5", ":"),
    "scanvi_scarches": ("scANVI + scArches", "C1", "-"),
    "mlp_bins_joint": ("MLP on the bins, joint", "C4", "-"),
    "mlp_bins_bank": ("MLP on the bins, same bank", "C4", ":"),
}


def stage_curves(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per stage, over seeds: the mean of the row of the accuracy matrix, and the accuracy on test set 1."""
    matrices = np.array(
        [[[np.nan if v is None else v for v in row] for row in run["accuracy"]["values"]] for run in runs]
    )
    return np.nanmean(matrices, axis=2).mean(axis=0), matrices[:, :, 0].mean(axis=0)


def print_tables(report: dict) -> None:
    """Per stream, as Markdown: the final metrics and the novel-cell scores of every method (mean ± sd over seeds),
    then the target checks."""
    for stream, methods in report["results"].items():
        print(f"\n### {stream}")
        print_table(methods, ["acc", "bwt", "forgetting", "macro_f1", "ari", "seconds"])
        print_table(
            {method: content for method, content in methods.items() if "h_score" in content["summary"]},
            ["known_accuracy", "unknown_accuracy", "h_score", "novel_auroc"],
        )
        print("\n| target | value | lowest allowed | met |\n|---|---|---|---|")
        for name, check in report["targets"][stream].items():
            target = "-" if check["target"] is None else f"{check['target']:+.3f}"
            met = "-" if check["met"] is None else ("yes" if check["met"] else "**no**")
            print(f"| {name} | {check['value']:+.3f} | {target} | {met} |")


def print_table(methods: dict, keys: list[str]) -> None:
    print("\n| method | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for method, content in methods.items():
        cells = [format_stat(content["summary"].get(key), digits=1 if key == "seconds" else 3) for key in keys]
        print(f"| {STYLE[method][0]} | " + " | ".join(cells) + " |")


def format_stat(stat: dict | None, digits: int) -> str:
    if stat is None:
        return "-"
    sd = "" if stat["sd"] is None else f" ± {stat['sd']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{sd}"


def main() -> None:
    report = json.loads(RESULTS.read_text())
    print_tables(report)
    streams = report["results"]
    fig, axes = plt.subplots(len(streams), 2, figsize=(9, 3.2 * len(streams)), squeeze=False, sharex=True)
    for (left, right), (stream, methods) in zip(axes, streams.items(), strict=True):
        for method, content in methods.items():
            label, color, line = STYLE[method]
            mean_row, first = stage_curves(content["runs"])
            stages = np.arange(1, len(mean_row) + 1)
            left.plot(stages, mean_row, line, color=color, marker="o", ms=3, label=label)
            right.plot(stages, first, line, color=color, marker="o", ms=3, label=label)
        left.set(title=f"{stream}: mean held-out accuracy", ylabel="accuracy", ylim=(0, 1.02), xticks=stages)
        right.set(title=f"{stream}: accuracy on stage 1's test cells", ylim=(0, 1.02))
    for ax in axes[-1]:
        ax.set_xlabel("after stage")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(OUT, metadata={"Date": None})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

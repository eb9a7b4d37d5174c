"""What novel-cell detection adds to the time of a prediction, with the default scores and with each alone.

Usage::

    .venv/bin/python benchmarks/novelty_cost.py            # -> benchmarks/results/novelty_cost.json
    .venv/bin/python benchmarks/novelty_cost.py --quick    # 1,000 cells, 1 repeat -> temp file

A CANAL model with the benchmarks' encoder (``DEMO_ARCH``) over a 1,000-gene panel trains one short stage on
synthetic cells (a 1,000-cell bank, 2,000 calibration cells at most); the weights do not matter for the time. It then
predicts ``--cells`` synthetic query cells (10,000) in one ``predict`` call each way: without novel-cell detection,
with the default score (``"input"``: one projection onto the input space's principal axes and one distance to each
reference cell), and with ``"energy"`` alone (the default before the input-space score, computed from the logits).
The ways are interleaved, ``--repeats`` times; the median and the fastest of each are reported with their ratio to
the prediction without novelty (target: at most 1.15 with the default score, judged on the fastest, which a busy
machine disturbs least). ``--device cuda`` predicts on a GPU. The ratios, measured in one run, are what to read.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import anndata as ad
import torch
from harness import machine_info, write_report

import scanpy_canal as canal
from scanpy_canal._demo import DEMO_ARCH

RESULTS = Path(__file__).resolve().parent / "results" / "novelty_cost.json"
WAYS = {"closed_set": {}, "default_scores": {"novel": True}, "energy_only": {"novel": True, "score": "energy"}}
TARGET = 1.15


def trained_model(n_genes: int) -> tuple[canal.CANAL, canal.datasets.Stream]:
    """A model trained one short stage on `n_genes` synthetic genes, and the stream it came from."""
    stream = canal.datasets.synthetic_stream(n_stages=1, n_genes=n_genes, cells_per_type=400, seed=0)
    data = stream.train[0].copy()
    canal.CANAL.setup_anndata(data, labels_key=stream.labels_key)
    model = canal.CANAL(data, seed=0, **DEMO_ARCH)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    return model, stream


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the model predicts: cpu, or cuda on a GPU machine")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.cells, args.repeats = 1000, 1
    args.output = args.output or (Path(tempfile.gettempdir()) / "novelty_cost_quick.json" if args.quick else RESULTS)
    torch.set_num_threads(args.threads)
    model, _ = trained_model(args.genes)
    model.to_device(args.device)
    fresh = canal.datasets.synthetic_stream(n_stages=1, n_genes=args.genes, cells_per_type=args.cells // 2 + 1, seed=1)
    query = ad.concat([fresh.train[0], fresh.test[0]])[: args.cells].copy()
    model.predict(query[:200], novel=True)  # warm-up
    seconds = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way, options in WAYS.items():
            start = time.perf_counter()
            model.predict(query, **options)
            seconds[way].append(time.perf_counter() - start)
    median = {way: statistics.median(values) for way, values in seconds.items()}
    fastest = {way: min(values) for way, values in seconds.items()}
    report = {
        "machine": machine_info(),
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "arch": DEMO_ARCH},
        "n_cells": query.n_obs,
        "bank_cells": model.example_bank.n_obs,
        "calibration_cells": model.calibration_cells_.n_obs,
        "seconds": seconds,
        "median_seconds": median,
        "ratio_to_closed_set": {way: median[way] / median["closed_set"] for way in WAYS},
        "fastest_seconds": fastest,
        "fastest_ratio_to_closed_set": {way: fastest[way] / fastest["closed_set"] for way in WAYS},
        "target_ratio": TARGET,
    }
    report["met"] = bool(report["fastest_ratio_to_closed_set"]["default_scores"] <= TARGET)
    write_report(report, args.output)
    print({way: f"{median[way]:.2f} s ({report['ratio_to_closed_set'][way]:.3f}x)" for way in WAYS})
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()

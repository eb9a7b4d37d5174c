"""Do the cached frozen blocks or bfloat16 training change accuracy? The pbmc68k stream trained three ways.

Usage::

    .venv/bin/python benchmarks/frozen_cache.py              # 3 seeds -> benchmarks/results/frozen_cache.json
    .venv/bin/python benchmarks/frozen_cache.py --quick      # 1 seed, 3 epochs -> temp directory

With the demo's encoder only block 0 of 2 exists before the trainable block, so nothing would be cached; this run
uses a 4-block encoder (dim 32, 4 heads of 16), whose blocks 0 and 1 are frozen and precede the trainable block 2.
``cache_frozen=True`` computes their hidden states once per stage (their random features then stay fixed during the
stage); ``cache_frozen=False`` recomputes them at every step and redraws all features every 1000 steps, as the
original CANAL. A third run trains with the cache in bfloat16 autocast (``precision="bf16"``; predictions stay
float32). All use the demo's stream and training settings. The speed of the cache and of bfloat16 at scBERT's size
is measured by ``network_throughput.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from harness import machine_info, write_report

from scanpy_canal._demo import run_stream
from scanpy_canal.datasets import pbmc68k_stream

RESULTS = Path(__file__).resolve().parent / "results" / "frozen_cache.json"
ARCH = {"dim": 32, "depth": 4, "heads": 4, "dim_head": 16}
TRAINING = {"n_top_genes": 300, "max_epochs": 30, "batch_size": 8, "lr": 1e-3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    args.training = dict(TRAINING)
    if args.quick:
        args.seeds, args.training["max_epochs"] = [0], 3
    args.output = args.output or (Path(tempfile.gettempdir()) / "frozen_cache_quick.json" if args.quick else RESULTS)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = {"machine": machine_info(), "settings": {"arch": ARCH, **args.training, "seeds": args.seeds}}
    variants = {
        "cached": {"cache_frozen": True},
        "recomputed": {"cache_frozen": False},
        "cached_bf16": {"cache_frozen": True, "precision": "bf16"},
    }
    runs = {name: [] for name in variants}
    for seed in args.seeds:
        stream = pbmc68k_stream(seed=seed)
        for name, variant in variants.items():
            result = run_stream(
                stream,
                arch=ARCH,
                seed=seed,
                **variant,
                accelerator="cpu",
                enable_progress_bar=False,
                enable_model_summary=False,
                log=lambda _: None,
                **args.training,
            )
            run = {"seed": seed, **result.final, "seconds": float(sum(result.seconds))}
            print(name, run, flush=True)
            runs[name].append(run)
    report["runs"] = runs
    report["summary"] = {
        name: {
            metric: {
                "mean": float(np.mean([r[metric] for r in values])),
                "std": float(np.std([r[metric] for r in values])),
            }
            for metric in ("acc", "bwt", "macro_f1", "h_score", "seconds")
        }
        for name, values in runs.items()
    }
    report["machine"]["load_average_end"] = list(os.getloadavg())
    write_report(report, args.output)
    print(report["summary"], f"wrote {args.output}", sep="\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

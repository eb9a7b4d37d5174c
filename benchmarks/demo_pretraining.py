"""Does the demo's pretraining pay? ``scanpy-canal demo`` with and without it, over seeds.

Usage::

    .venv/bin/python benchmarks/demo_pretraining.py           # -> benchmarks/results/demo_pretraining.json
    .venv/bin/python benchmarks/demo_pretraining.py --quick   # 1 seed, 2 epochs -> temp file

The demo pretrains its small encoder on the stream's training cells (scBERT's masked-bin objective, without labels,
``--pretrain-epochs`` 20) before the first stage. The only unlabelled cells available here that share gene names
with scanpy's PBMCs are those PBMCs (the Zeisel cells' genes are unnamed), so "every unlabelled cell available" is
the demo's own training cells. Each seed runs the demo twice, with 20 pretraining epochs and from random weights
(``--pretrain-epochs 0``, which also takes the random start's head), through the command line a user runs; the
report gives ACC, BWT, macro-F1, known accuracy, unknown recall and H of each, their mean and sd over seeds, and
each seed's difference. On 2 cores a pair of runs takes about 4 minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import machine_info, write_report
from novelty import summarise_values

RESULTS = Path(__file__).resolve().parent / "results" / "demo_pretraining.json"
METRICS = ("acc", "bwt", "macro_f1", "known_accuracy", "unknown_accuracy", "h_score", "novel_auroc")
WAYS = {"pretrained_20_epochs": 20, "random_start": 0}


def run_demo(seed: int, pretrain_epochs: int, epochs: int | None, folder: Path) -> dict:
    """One ``scanpy-canal demo`` run; its final metrics and seconds per stage."""
    output = folder / f"seed{seed}_pretrain{pretrain_epochs}.json"
    command = [sys.executable, "-m", "scanpy_canal.cli", "demo", "--quiet", "--seed", str(seed)]
    command += ["--pretrain-epochs", str(pretrain_epochs), "--json", str(output)]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    subprocess.run(command, check=True, capture_output=True)
    result = json.loads(output.read_text())
    return {"final": {key: result["final"].get(key) for key in METRICS}, "seconds": sum(result["seconds_per_stage"])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    epochs = 2 if args.quick else None
    seeds = args.seeds[:1] if args.quick else args.seeds
    output = args.output or (Path(tempfile.gettempdir()) / "demo_pretraining_quick.json" if args.quick else RESULTS)
    runs = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as folder:
        for seed in seeds:
            for way, pretrain_epochs in WAYS.items():
                runs[way].append({"seed": seed, **run_demo(seed, pretrain_epochs, epochs, Path(folder))})
                print(way, seed, runs[way][-1]["final"], flush=True)
    summary = {
        way: {key: summarise_values([run["final"][key] for run in done]) for key in METRICS}
        for way, done in runs.items()
    }
    difference = {
        key: [a["final"][key] - b["final"][key] for a, b in zip(*runs.values(), strict=True)] for key in METRICS
    }
    report = {
        "machine": machine_info(),
        "settings": {"seeds": seeds, "epochs": epochs, "ways": WAYS},
        "runs": runs,
        "summary": summary,
        "pretrained_minus_random_by_seed": difference,
    }
    write_report(report, output)
    for key in METRICS:
        cells = [f"{summary[way][key]['mean']:.3f} ± {summary[way][key]['sd'] or 0:.3f}" for way in WAYS]
        print(f"{key}: " + "  against  ".join(cells))
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()

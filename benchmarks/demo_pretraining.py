"""Does pretraining pay in the demo, and with which training settings? ``scanpy-canal demo`` every way, over seeds.

Usage::

    .venv/bin/python benchmarks/demo_pretraining.py           # -> benchmarks/results/demo_pretraining.json
    .venv/bin/python benchmarks/demo_pretraining.py --quick   # 1 seed, 2 epochs -> temp file

``--pretrain-epochs 20`` pretrains the demo's small encoder on the stream's training cells (scBERT's masked-bin
objective, without labels) before the first stage. The only unlabelled cells available here that share gene names
with scanpy's PBMCs are those PBMCs (the Zeisel cells' genes are unnamed), so "every unlabelled cell available" is
the demo's own training cells. Each seed runs the demo with 20 pretraining epochs and from random weights
(``--pretrain-epochs 0``, which also takes the random start's head), through the command line a user runs, each
with two sets of training settings (:data:`SETTINGS`): ``train()``'s defaults for how the encoder starts (what the
demo uses), and the demo's own settings before (30 epochs, batch 8, peak rate 1e-3 for both starts; the demo then
pretrained by default). The report gives ACC, BWT, macro-F1, known accuracy, unknown recall and H of each way, their
mean and sd over seeds, and each seed's difference between the starts. On 2 cores the four runs of a seed take
about 6 minutes.
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
#: Training settings on the command line: none (``train()``'s defaults), or the demo's before they were.
SETTINGS = {"defaults": [], "before": ["--epochs", "30", "--batch-size", "8", "--lr", "1e-3"]}
#: Each way: pretraining epochs (0: a random start) and training settings.
WAYS = {
    "pretrained_20_epochs": (20, "defaults"),
    "random_start": (0, "defaults"),
    "pretrained_20_epochs_before": (20, "before"),
    "random_start_before": (0, "before"),
}


def run_demo(seed: int, way: str, epochs: int | None, folder: Path) -> dict:
    """One ``scanpy-canal demo`` run of a way of :data:`WAYS`; its final metrics and seconds per stage."""
    pretrain_epochs, settings = WAYS[way]
    output = folder / f"seed{seed}_{way}.json"
    command = [sys.executable, "-m", "scanpy_canal.cli", "demo", "--quiet", "--seed", str(seed)]
    command += ["--pretrain-epochs", str(pretrain_epochs), *SETTINGS[settings], "--json", str(output)]
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
            for way in WAYS:
                runs[way].append({"seed": seed, **run_demo(seed, way, epochs, Path(folder))})
                print(way, seed, runs[way][-1]["final"], flush=True)
    summary = {
        way: {key: summarise_values([run["final"][key] for run in done]) for key in METRICS}
        for way, done in runs.items()
    }
    difference = {
        settings: {key: [a["final"][key] - b["final"][key] for a, b in zip(*pair, strict=True)] for key in METRICS}
        for settings, pair in paired_by_settings(runs).items()
    }
    report = {
        "machine": machine_info(),
        "settings": {"seeds": seeds, "epochs": epochs, "ways": WAYS, "settings": SETTINGS},
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


def paired_by_settings(runs: dict[str, list[dict]]) -> dict[str, tuple[list[dict], list[dict]]]:
    """Per training settings, the runs of the pretrained and of the random start (seed by seed)."""
    pairs = {}
    for way, (pretrain_epochs, settings) in WAYS.items():
        pair = pairs.setdefault(settings, [None, None])
        pair[pretrain_epochs == 0] = runs[way]
    return {settings: tuple(pair) for settings, pair in pairs.items()}


if __name__ == "__main__":
    main()

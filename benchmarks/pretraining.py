"""Does pretraining help? Masked-token accuracy over epochs, and a continual stream from a pretrained vs a random start.

Usage::

    .venv/bin/python benchmarks/pretraining.py       # -> benchmarks/results/pretraining.json (about 12 min, 2 CPUs)
    .venv/bin/python benchmarks/pretraining.py --seeds 0 --pretrain-epochs 1 --epochs 1 --output /tmp/smoke.json
    .venv/bin/python benchmarks/pretraining.py --stream zeisel_class   # -> results/pretraining_zeisel_class.json

Data: a stream of the continual benchmark (``--stream``, ``continual_stream.STREAMS``): by default the demo's,
scanpy's bundled pbmc68k_reduced (``canal.datasets.pbmc68k_stream``, 3 stages, CD34+ held out as novel, about 500
training cells), or a Zeisel stream (``benchmarks/zeisel.py``: 2,100 training cells of 4,000 genes, where
pretraining has several times more cells to learn from). Settings: the stream's panel (the most variable genes of
stage 1: 300 for pbmc68k, 1,000 for Zeisel) and bank size, the demo encoder (``DEMO_ARCH``), 30 epochs per stage,
batch 8, peak learning rate 1e-3, the same for both starts.

For every seed:

1. Pretraining (``canal.pretrain``) of the demo encoder on the training cells of all stages, without their labels
   (held-out and novel cells are never seen), over the stage-1 panel, with ``validation_size`` of the cells held out.
   Its history gives the masked-token accuracy per epoch on the held-out cells. Two baselines put it in context,
   both scored on every non-zero bin of the held-out cells (masked positions are a uniform sample of those):
   always the most frequent non-zero bin of the training cells, and each gene's most frequent non-zero bin.
2. The stream from that pretrained start, and from a random start with the same seed.

The stream's train/test split is fixed (seed 0); the seed changes the model's initial weights, the pretraining masks,
the validation splits and the order of the cells. Reported: ACC, BWT, forgetting, macro-F1, ARI and H-score per seed,
their means and standard deviations, and pretrained minus random.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from continual_stream import STREAMS, set_threads
from harness import machine_info, write_report

import scanpy_canal as canal
from scanpy_canal._demo import DEMO_ARCH, DEMO_PRETRAINING, run_stream
from scanpy_canal.model._data import highly_variable_genes
from scanpy_canal.model._pretrain import _split

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "pretraining.json"
METRICS = ("acc", "bwt", "forgetting", "macro_f1", "ari", "h_score")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model seeds (default: 0 1 2)")
    parser.add_argument("--pretrain-epochs", type=int, default=20, help="pretraining epochs (default: 20, the demo's)")
    parser.add_argument("--epochs", type=int, default=30, help="maximum epochs per stage (default: 30)")
    parser.add_argument("--stream", choices=list(STREAMS), default="pbmc68k", help="default: pbmc68k")
    parser.add_argument(
        "--genes", type=int, default=None, help="highly variable genes of stage 1 (default: the stream's)"
    )
    parser.add_argument("--validation-size", type=float, default=0.1, help="cells held out in pretraining")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default: cpu)")
    parser.add_argument(
        "--output", type=Path, default=None, help=f"JSON file (default {DEFAULT_OUTPUT}, or with the stream's name)"
    )
    args = parser.parse_args(argv)
    spec = STREAMS[args.stream]
    args.genes = args.genes or spec.n_top_genes
    suffix = "" if args.stream == "pbmc68k" else f"_{args.stream}"
    args.output = args.output or DEFAULT_OUTPUT.with_name(f"pretraining{suffix}.json")
    return args


def bin_baselines(tokens: torch.Tensor, train_idx: np.ndarray, validation_idx: np.ndarray) -> dict[str, float]:
    """Accuracy on the held-out cells' non-zero bins of the overall and the per-gene most frequent non-zero bin."""
    train, held_out = tokens[train_idx, :-1], tokens[validation_idx, :-1]  # without the appended token
    counts = torch.stack([(train == b).sum(dim=0) for b in range(1, 6)])  # (bins, genes)
    overall = int(counts.sum(dim=1).argmax()) + 1
    per_gene = counts.argmax(dim=0) + 1
    nonzero = held_out > 0
    return {
        "majority_bin": float((held_out[nonzero] == overall).float().mean()),
        "per_gene_majority_bin": float((held_out == per_gene)[nonzero].float().mean()),
        "n_scored_bins": int(nonzero.sum()),
    }


def pretrain_seed(stream, panel: list[str], path: Path, seed: int, args: argparse.Namespace) -> dict:
    cells = ad.concat(stream.train)
    start = time.perf_counter()
    history = canal.pretrain(
        cells,
        path,
        genes=panel,
        max_epochs=args.pretrain_epochs,
        validation_size=args.validation_size,
        seed=seed,
        accelerator=args.accelerator,
        trainer_kwargs={"enable_progress_bar": False, "enable_model_summary": False},
        **DEMO_PRETRAINING,
        **DEMO_ARCH,
    )
    seconds = time.perf_counter() - start
    train_idx, validation_idx = _split(cells.n_obs, args.validation_size, seed)
    tokens = canal.nn.tokenize(canal.pp.align_genes(cells, panel).X)
    return {
        "n_cells": cells.n_obs,
        "seconds": seconds,
        "history": history.to_dict(orient="list"),
        "baselines": bin_baselines(tokens, train_idx, validation_idx),
    }


def stream_run(stream, seed: int, args: argparse.Namespace, pretrained: Path | None) -> dict:
    result = run_stream(
        stream,
        rehearsal_size=STREAMS[args.stream].rehearsal_size,
        pretrained=None if pretrained is None else str(pretrained),
        n_top_genes=args.genes,
        seed=seed,
        max_epochs=args.epochs,
        batch_size=8,
        lr=1e-3,
        accelerator=args.accelerator,
        enable_progress_bar=False,
        enable_model_summary=False,
        log=lambda line: print(f"  {line}", flush=True),
    )
    return {"final": result.final, "seconds_per_stage": result.seconds}


def summarise(runs: dict[int, dict]) -> dict:
    """Mean and sample standard deviation of each final metric over seeds."""
    summary = {}
    for metric in METRICS:
        values = [run["final"][metric] for run in runs.values() if metric in run["final"]]
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[metric] = {"mean": statistics.fmean(values), "std": spread}
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(1)  # see continual_stream.THREADS_HELP
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    report["settings"] |= {"arch": DEMO_ARCH, "pretraining": DEMO_PRETRAINING, "batch_size": 8, "lr": 1e-3}
    report["machine"] = machine_info()
    start = time.perf_counter()
    stream = STREAMS[args.stream].build()
    first = stream.train[0]
    panel = highly_variable_genes(first.X, first.var_names, args.genes)
    pretraining, pretrained_runs, random_runs = {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            path = Path(scratch) / f"encoder_{seed}"
            print(f"seed {seed}: pretraining", flush=True)
            pretraining[seed] = pretrain_seed(stream, panel, path, seed, args)
            accuracy = pretraining[seed]["history"]["masked_accuracy_validation"][-1]
            print(f"  masked-token accuracy {accuracy:.3f}, baselines {pretraining[seed]['baselines']}", flush=True)
            print(f"seed {seed}: stream from the pretrained start", flush=True)
            pretrained_runs[seed] = stream_run(stream, seed, args, path)
            print(f"seed {seed}: stream from a random start", flush=True)
            random_runs[seed] = stream_run(stream, seed, args, None)
    summary = {"pretrained": summarise(pretrained_runs), "random": summarise(random_runs)}
    difference = {m: summary["pretrained"][m]["mean"] - summary["random"][m]["mean"] for m in summary["random"]}
    report |= {
        "pretraining": pretraining,
        "stream": {"pretrained": pretrained_runs, "random": random_runs},
        "summary": summary,
        "pretrained_minus_random": difference,
        "seconds": time.perf_counter() - start,
        "load_average_end": list(os.getloadavg()),
    }
    write_report(report, args.output)
    for metric in summary["random"]:
        pre, rand = summary["pretrained"][metric], summary["random"][metric]
        print(
            f"{metric:>10}: pretrained {pre['mean']:.3f} ± {pre['std']:.3f}, random {rand['mean']:.3f} ± "
            f"{rand['std']:.3f}, difference {difference[metric]:+.3f}"
        )
    print(f"wrote {args.output} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

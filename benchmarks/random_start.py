"""What makes CANAL good from a random start? A small grid of ``train()`` settings against the logistic-regression
and CellTypist peers, on pbmc68k, the synthetic stream and both Zeisel streams.

Usage::

    .venv/bin/python benchmarks/random_start.py           # -> benchmarks/results/random_start.json
    .venv/bin/python benchmarks/random_start.py --quick   # 1 seed, 2 epochs, 2 variants -> temp file

Everything goes through the public API: the constructor (``n_top_genes``, ``trainable_blocks``, ``gene_embedding``,
the encoder architecture) and ``train()``'s keyword arguments.
The streams, their gene panels and their bank sizes are those of ``continual_stream.py`` (``STREAMS``); every
CANAL run starts from random weights and predicts closed-set labels. The encoder (:data:`STUDY`) is the demo's
(dim 32, 2 blocks, 4 heads of 16, as in ``continual_stream.py``) and, on pbmc68k, also the issue's dim-64 2-block
encoder (``pbmc68k_dim64``; with 4 heads of 16: scBERT's 10 heads of 64 cost about 30 times more per token on this
CPU). Each variant is the original's settings (:data:`TRAIN_DEFAULTS`, still ``train()``'s defaults for pretrained
weights) with the changes in :data:`VARIANTS`:

- ``original``: lr 2e-4, at most 100 epochs, early stopping after 10 without improvement;
- ``lr*_e15`` (``_e30``): peak learning rate, and at most 15 (30) epochs: 15 is one cycle of the cosine schedule
  with warm restarts (5 epochs of warm-up from 1e-6, then down to 1e-6 at epoch 15), 30 goes half-way into the
  second, 25-epoch cycle; early stopping as by default;
- ``all_blocks``: every encoder block trains (``trainable_blocks=(0, 1)``) instead of the second to last only;
- ``coexpression``: ``CANAL(gene_embedding="coexpression")``, the frozen gene table from a truncated SVD of the
  standardised stage-1 cells x panel genes matrix instead of random normal rows.

Peers, on the same stream and seeds (``continual_stream.run_method``): ``lr_bank`` (the same bank size as CANAL's),
``lr_joint``, ``celltypist_bank``, ``celltypist_joint``. And, to see what the 6-bin tokenisation costs, logistic
regression on CANAL's gene panel (the stage-1 HVGs) on the values (``lr_*_panel``) and on the bins CANAL sees,
``min(floor(log2(1 + CP10k)), 5)`` (``lr_*_panel_bins``).

Reported per stream, variant and seed: the accuracy and macro-F1 matrices, ACC, BWT, forgetting, pooled macro-F1 and
ARI, seconds; per stream and variant the mean and sd over seeds, and CANAL minus ``lr_bank`` and ``lr_joint``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import anndata as ad
import peers
from continual_stream import STREAMS, THREADS_HELP, StreamSpec, closed_set, run_method, set_threads, summarise
from harness import machine_info, write_report

import scanpy_canal as canal
from scanpy_canal._demo import DEMO_ARCH, run_stages, run_stream

RESULTS = Path(__file__).resolve().parent / "results" / "random_start.json"
#: ``train()``'s defaults that the variants change (batch size 16, distillation 0.1 etc. stay as they are).
TRAIN_DEFAULTS = {"lr": 2e-4, "max_epochs": 100, "early_stopping_patience": 10}
#: Per variant: ``train()`` arguments, and ``trainable_blocks`` / ``gene_embedding`` for the constructor.
VARIANTS = {
    "original": {},
    "lr2e-4_e15": {"lr": 2e-4, "max_epochs": 15},
    "lr1e-3_e15": {"lr": 1e-3, "max_epochs": 15},
    "lr3e-3_e15": {"lr": 3e-3, "max_epochs": 15},
    "lr1e-3_e15_all_blocks": {"lr": 1e-3, "max_epochs": 15, "trainable_blocks": (0, 1)},
    "lr1e-3_e15_coexpression": {"lr": 1e-3, "max_epochs": 15, "gene_embedding": "coexpression"},
    "lr1e-3_e30_all_blocks": {"lr": 1e-3, "max_epochs": 30, "trainable_blocks": (0, 1)},
}
SMALL_GRID = ["original", "lr1e-3_e15", "lr3e-3_e15", "lr1e-3_e15_all_blocks", "lr1e-3_e15_coexpression"]
ZEISEL_GRID = ["lr1e-3_e15", "lr1e-3_e15_all_blocks", "lr1e-3_e30_all_blocks"]
#: Per study stream: the benchmark stream (``continual_stream.STREAMS``), the encoder and the variants. The demo
#: encoder everywhere (as in ``continual_stream.py``), and on pbmc68k also the issue's dim-64 2-block encoder with
#: 4 heads of 16 (scBERT's 10 heads of 64 cost about 30 times more per token on this CPU). A Zeisel run costs about
#: 6 times a pbmc68k run, so the Zeisel streams get the variants that decide the defaults.
STUDY = {
    "pbmc68k": ("pbmc68k", DEMO_ARCH, SMALL_GRID),
    "synthetic": ("synthetic", DEMO_ARCH, SMALL_GRID),
    "pbmc68k_dim64": ("pbmc68k", {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16}, ["original", "lr1e-3_e15"]),
    "zeisel_class": ("zeisel_class", DEMO_ARCH, ZEISEL_GRID),
    "zeisel_subclass": ("zeisel_subclass", DEMO_ARCH, ZEISEL_GRID),
}
PEERS = ["lr_bank", "lr_joint", "celltypist_bank", "celltypist_joint"]
PANEL_PEERS = ["lr_joint_panel", "lr_joint_panel_bins", "lr_bank_panel", "lr_bank_panel_bins"]
QUICK_VARIANTS = ["lr1e-3_e15", "lr1e-3_e15_coexpression"]
TRAINER = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--streams", nargs="+", choices=list(STUDY), default=list(STUDY))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: each stream's own list")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--resume", action="store_true", help="keep the complete results already in the output")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 2 variants, output to a temp file")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.variants = args.seeds[:1], args.variants or QUICK_VARIANTS
    args.output = args.output or (Path(tempfile.gettempdir()) / "random_start_quick.json" if args.quick else RESULTS)
    return args


def canal_run(stream: canal.datasets.Stream, spec: StreamSpec, arch: dict, variant: dict, seed: int, epochs) -> dict:
    """One CANAL stream run of a variant (closed-set labels); `epochs` (if not None) caps ``max_epochs``."""
    settings = {**TRAIN_DEFAULTS, **variant}
    model_kwargs = {
        "trainable_blocks": settings.pop("trainable_blocks", (-2,)),
        "gene_embedding": settings.pop("gene_embedding", "random"),
    }
    if epochs is not None:
        settings["max_epochs"] = min(settings["max_epochs"], epochs)
    result = run_stream(
        stream,
        arch=arch,
        n_top_genes=spec.n_top_genes,
        seed=seed,
        novel=False,
        model_kwargs=model_kwargs,
        rehearsal_size=spec.rehearsal_size,
        **settings,
        **TRAINER,
    )
    return closed_set(result)


def panel_rows(stream: canal.datasets.Stream, spec: StreamSpec, peer: str, seed: int):
    """Logistic regression on CANAL's stage-1 HVG panel, on the values or on the bins (``peer`` ends in ``_bins``)."""
    first = stream.train[0].copy()
    canal.CANAL.setup_anndata(first, labels_key=stream.labels_key)
    genes = canal.CANAL(first, n_top_genes=spec.n_top_genes, **DEMO_ARCH).genes

    def fit(data: ad.AnnData) -> peers.Predictor:
        predict = peers.fit_logistic(data[:, genes], stream.labels_key, seed, bins=peer.endswith("_bins"))
        return lambda adata: predict(adata[:, genes])

    memory = peer.split("_")[1]
    return peers.refit_rows(stream, fit, memory=memory, bank_size=spec.rehearsal_size, seed=seed)


def run_one(stream, spec: StreamSpec, arch: dict, method: str, seed: int, epochs: int | None) -> dict:
    if method in VARIANTS:
        return canal_run(stream, spec, arch, VARIANTS[method], seed, epochs)
    if method in PANEL_PEERS:
        return closed_set(run_stages(stream, panel_rows(stream, spec, method, seed)))
    return run_method(stream, spec, method, seed, epochs or 0, log=print)


def compare(results: dict, peer_results: dict) -> dict:
    """Per CANAL variant of `results`: mean ACC, macro-F1 and BWT minus those of ``lr_bank`` and ``lr_joint`` (from
    `peer_results`)."""
    mean = lambda content, key: content["summary"][key]["mean"]
    return {
        variant: {
            f"{key}_minus_{peer}": mean(results[variant], key) - mean(peer_results[peer], key)
            for peer in ("lr_bank", "lr_joint")
            if peer in peer_results
            for key in ("acc", "macro_f1", "bwt")
        }
        for variant in results
        if variant in VARIANTS
    }


def print_table(stream: str, results: dict) -> None:
    keys = ["acc", "macro_f1", "bwt", "seconds"]
    print(f"\n### {stream}\n\n| method | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for method, content in results.items():
        cells = []
        for key in keys:
            stat = content["summary"][key]
            sd = "" if stat["sd"] is None else f" ± {stat['sd']:.{1 if key == 'seconds' else 3}f}"
            cells.append(f"{stat['mean']:.{1 if key == 'seconds' else 3}f}{sd}")
        print(f"| {method} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    epochs = 2 if args.quick else None
    done = json.loads(args.output.read_text())["results"] if args.resume and args.output.exists() else {}
    report = {
        "machine": machine_info(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_defaults": TRAIN_DEFAULTS,
        "variants": VARIANTS,
        "study": {name: dict(zip(["stream", "arch", "variants"], STUDY[name], strict=True)) for name in args.streams},
        "streams": {STUDY[name][0]: STREAMS[STUDY[name][0]].settings() for name in args.streams},
        "results": {},
        "comparison": {},
    }
    start_all = time.perf_counter()
    peer_results = {}  # per benchmark stream: the peers run once, with the first study stream on it
    for name in args.streams:
        base, arch, variants = STUDY[name]
        spec = STREAMS[base]
        stream = spec.build()
        results = report["results"][name] = {}
        methods = [] if base in peer_results else [*PEERS, *PANEL_PEERS]
        peer_results.setdefault(base, results)
        for method in [*methods, *(args.variants or variants)]:
            previous = done.get(name, {}).get(method)
            if previous and [run["seed"] for run in previous["runs"]] == args.seeds:
                results[method] = previous
                continue
            runs = []
            for seed in args.seeds:
                start = time.perf_counter()
                run = run_one(stream, spec, arch, method, seed, epochs)
                run.update(seed=seed, seconds=time.perf_counter() - start)
                print(
                    f"[{name} {method} seed {seed}] acc {run['final']['acc']:.3f}, {run['seconds']:.1f} s", flush=True
                )
                runs.append(run)
            results[method] = {"runs": runs, "summary": summarise(runs)}
            write_report(report, args.output)  # partial results survive an interrupted run
        report["comparison"][name] = compare(results, peer_results[base])
        print_table(name, results)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["seconds_total"] = time.perf_counter() - start_all
    write_report(report, args.output)
    print(f"\nwrote {args.output} ({report['seconds_total'] / 60:.1f} min)")
    return report


if __name__ == "__main__":
    main()

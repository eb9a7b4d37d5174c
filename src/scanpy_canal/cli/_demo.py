"""``scanpy-canal demo``: a whole continual stream on scanpy's bundled PBMCs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import add_training_options, training_arguments


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command to `commands`."""
    demo = commands.add_parser(
        "demo",
        help="train a continual stream on scanpy's bundled pbmc68k_reduced and report accuracy and forgetting",
        description="Trains a small CANAL model stage by stage on scanpy's bundled pbmc68k_reduced (no downloads), "
        "predicts every stage's held-out cells after each stage with novel-cell detection, and prints the "
        "stage x test-set accuracy matrix, ACC, BWT, macro-F1 and H-score.",
    )
    demo.add_argument("--stages", type=int, default=3, help="number of stages (default: 3)")
    demo.add_argument(
        "--genes", type=int, default=300, help="highly variable genes in the panel, 0 for all (default: 300)"
    )
    add_training_options(demo)
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default: cpu)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    demo.add_argument(
        "--pretrain-epochs",
        type=int,
        default=0,
        help="without --pretrained: first pretrain the encoder for this many epochs on the stages' training cells, "
        "without labels (default: 0, random weights; here pretraining did not pay with train()'s defaults)",
    )
    demo.add_argument("--pretrained", type=Path, default=None, help="start from these weights (see `pretrain`)")
    demo.add_argument("--pretrained-genes", type=Path, default=None, help="gene list of a .pth checkpoint")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Run the stream and print (and with ``--json`` write) its results."""
    from scanpy_canal._demo import run_stream
    from scanpy_canal.datasets import pbmc68k_stream

    stream = pbmc68k_stream(n_stages=args.stages, seed=args.seed)
    print(
        f"pbmc68k_reduced stream: {stream.n_stages} stages, "
        + ", ".join(f"stage {t + 1}: {sorted(d.obs[stream.labels_key].unique())}" for t, d in enumerate(stream.train))
        + f"; novel (never trained): {stream.novel_types}"
    )
    result = run_stream(
        stream,
        n_top_genes=args.genes or None,
        seed=args.seed,
        **training_arguments(args),
        accelerator=args.accelerator,
        enable_progress_bar=not args.quiet,
        enable_model_summary=False,
        pretrained=None if args.pretrained is None else str(args.pretrained),
        pretrained_genes=None if args.pretrained_genes is None else str(args.pretrained_genes),
        pretrain_epochs=0 if args.pretrained is not None else args.pretrain_epochs,
    )
    print(result.report())
    if args.json is not None:
        settings = {key: value for key, value in vars(args).items() if key not in {"run", "command", "json"}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, **result.to_dict()}, indent=2, default=str))
        print(f"wrote {args.json}")

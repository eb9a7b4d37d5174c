"""``scanpy-canal pretrain``: masked-bin pretraining of an encoder on unlabelled cells."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (
    add_arch_options,
    add_lightning_options,
    add_mod_option,
    add_normalize_option,
    arch_arguments,
    check_data,
    existing_file,
    fraction,
    positive,
    read_values,
    writer_lock,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` command to `commands`."""
    pretrain = commands.add_parser(
        "pretrain",
        help="pretrain the encoder on unlabelled cells (.h5ad) by masked-bin prediction",
        description="Self-supervised pretraining as scBERT did it: in every cell 15% of the non-zero expression "
        "bins are hidden (90% of them behind the mask token) and the encoder learns to recover them. Writes a "
        "directory (config.json, genes.txt, weights.pt, history.csv) that `train --pretrained` and "
        "canal.CANAL(adata, pretrained=...) read; genes are matched by name. Many GPUs: --accelerator gpu "
        "--devices -1 --strategy ddp (and --num-nodes).",
    )
    pretrain.add_argument(
        "data", type=Path, help="unlabelled cells (.h5ad, or .h5mu with --mod), log2(1 + counts per 10k) values"
    )
    pretrain.add_argument("output", type=Path, help="directory to write")
    add_normalize_option(pretrain)
    add_mod_option(pretrain)
    pretrain.add_argument("--layer", default=None, help="layer to read instead of X")
    pretrain.add_argument(
        "--genes-file",
        type=Path,
        default=None,
        help="text file, one gene per line: the vocabulary in positional order (default: the data's var_names)",
    )
    pretrain.add_argument("--epochs", type=positive(int), default=20, help="passes over the cells (default: 20)")
    pretrain.add_argument(
        "--batch-size", type=positive(int), default=16, help="cells per batch and device (default: 16)"
    )
    pretrain.add_argument(
        "--accumulate-grad-batches",
        type=positive(int),
        default=1,
        help="batches per optimiser step (default: 1; scBERT: 60 batches of 3)",
    )
    pretrain.add_argument("--lr", type=positive(float), default=1e-4, help="Adam learning rate (default: 1e-4)")
    pretrain.add_argument(
        "--lr-schedule",
        choices=["constant", "warm_restarts"],
        default="constant",
        help="constant, or scBERT's per-epoch cosine warm restarts, for long runs (default: constant)",
    )
    pretrain.add_argument(
        "--mask-prob", type=fraction, default=0.15, help="fraction of non-zero bins to predict (default: 0.15)"
    )
    pretrain.add_argument(
        "--validation-size",
        type=fraction,
        default=0.05,
        help="fraction of cells held out to score masked-token accuracy (default: 0.05)",
    )
    pretrain.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    add_lightning_options(pretrain, strategy_example="ddp")
    pretrain.add_argument("--num-nodes", type=positive(int), default=1, help="machines (default: 1)")
    add_arch_options(pretrain)
    pretrain.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    pretrain.add_argument("--quiet", action="store_true", help="no progress bar")
    pretrain.add_argument(
        "--wait",
        action="store_true",
        help="if another run is writing the output, wait for it to finish (default: stop with an error)",
    )
    pretrain.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Pretrain and write the encoder directory, holding its writer lock."""
    # A mistake is told at once, before torch and scvi-tools take seconds to load.
    check_data(args)
    if args.genes_file is not None:
        existing_file(args.genes_file)
    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{str(args.output)!r} already exists; add --overwrite to replace it.")
    with writer_lock(args.output, wait=args.wait):  # a busy output is refused before the training, not after
        _pretrain_unlocked(args)


def _pretrain_unlocked(args: argparse.Namespace) -> None:
    from scanpy_canal._demo import final_masked_accuracy
    from scanpy_canal.model import pretrain
    from scanpy_canal.nn import check_destination, read_vocabulary

    check_destination(args.output, overwrite=args.overwrite)  # before hours of training, not after
    genes = None if args.genes_file is None else read_vocabulary(args.genes_file)
    adata, layer = read_values(args)
    history = pretrain(
        adata,
        args.output,
        genes=genes,
        layer=layer,
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        accumulate_grad_batches=args.accumulate_grad_batches,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        mask_prob=args.mask_prob,
        validation_size=args.validation_size,
        seed=args.seed,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        overwrite=args.overwrite,
        trainer_kwargs={"enable_progress_bar": not args.quiet, "enable_model_summary": False},
        **arch_arguments(args),
    )
    print(
        f"pretrained on {adata.n_obs} cells for {len(history)} epochs, masked-token accuracy "
        f"{final_masked_accuracy(history):.3f}; wrote {args.output}"
    )

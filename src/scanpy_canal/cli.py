"""The ``scanpy-canal`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

    from scanpy_canal.model import CANAL


def _demo(args: argparse.Namespace) -> None:
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
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
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


_ARCH_OPTIONS = ("dim", "depth", "heads", "dim_head")
_NEW_MODEL_OPTIONS = ("genes", "pretrained", "pretrained_genes", "seed", *_ARCH_OPTIONS)
_SCVI_REGISTRATION_KEYS = ("_scvi_uuid", "_scvi_manager_uuid")


def _read_h5ad(path: Path, *, backed: bool = False) -> AnnData:
    """Read an ``.h5ad`` file (with `backed`, X stays on disk), with errors that name it."""
    import anndata as ad

    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist or is not a file.")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except OSError as error:
        raise ValueError(f"cannot read {str(path)!r} as an .h5ad file ({error}).") from error


def _holds_model(directory: Path) -> bool:
    """Whether `directory` is a saved model; an error if it is anything else but missing or empty."""
    from scanpy_canal.model._io import METADATA

    if (directory / METADATA).is_file():
        return True
    if directory.exists() and not (directory.is_dir() and not any(directory.iterdir())):
        raise FileExistsError(f"--model-dir {str(directory)!r} exists and is not a saved CANAL model.")
    return False


def _new_model(adata: AnnData, args: argparse.Namespace) -> CANAL:
    from scanpy_canal.model import CANAL

    arch = {name: getattr(args, name) for name in _ARCH_OPTIONS if getattr(args, name) is not None}
    return CANAL(
        adata,
        n_top_genes=args.genes,
        pretrained=None if args.pretrained is None else str(args.pretrained),
        pretrained_genes=None if args.pretrained_genes is None else str(args.pretrained_genes),
        seed=0 if args.seed is None else args.seed,
        **arch,
    )


def _existing_model(args: argparse.Namespace) -> CANAL:
    from scanpy_canal.model import CANAL

    given = [f"--{name.replace('_', '-')}" for name in _NEW_MODEL_OPTIONS if getattr(args, name) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)}: options of a new model, but --model-dir {str(args.model_dir)!r} already holds one; "
            "drop them to train its next stage, or add --new --overwrite to replace it."
        )
    return CANAL.load(args.model_dir)


def _first_process() -> bool:
    """Whether this process writes the output: Lightning starts its other DDP processes by running the command again."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0


def _writer_lock(directory: Path, *, wait: bool) -> contextlib.AbstractContextManager:
    """The writer lock of `directory`, which the first process alone holds."""
    from scanpy_canal._directories import writer_lock

    return writer_lock(directory, wait=wait) if _first_process() else contextlib.nullcontext()


def _train(args: argparse.Namespace) -> None:
    with _writer_lock(args.model_dir, wait=args.wait):  # from loading to saving, so no other run's stage is lost
        _train_next_stage(args)


def _train_next_stage(args: argparse.Namespace) -> None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from scanpy_canal.model import CANAL

    holds_model = _holds_model(args.model_dir)
    if holds_model and args.new and not args.overwrite:
        raise FileExistsError(
            f"--model-dir {str(args.model_dir)!r} already holds a model: drop --new to train its next stage, "
            "or add --overwrite to replace it with a new model."
        )
    model = _existing_model(args) if holds_model and not args.new else None
    adata = _read_h5ad(args.data)
    CANAL.setup_anndata(adata, labels_key=args.labels_key, layer=args.layer)
    model = _new_model(adata, args) if model is None else model
    try:
        model.train(
            adata,
            stage=args.stage,
            max_epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            accelerator=args.accelerator,
            devices=args.devices,
            strategy=args.strategy,
            enable_progress_bar=not args.quiet,
            enable_model_summary=False,
        )
    except MisconfigurationException as error:  # e.g. --accelerator gpu without a GPU
        settings = f"--accelerator {args.accelerator} --devices {args.devices} --strategy {args.strategy}"
        raise ValueError(f"Lightning cannot train with {settings}: {error}") from error
    if _first_process():
        model.save(args.model_dir, overwrite=True)
    print(f"{_stage_summary(model)}; model saved to {args.model_dir}")


def _stage_summary(model: CANAL) -> str:
    stage = model.stage_history_[-1]
    accuracy = stage["best_validation_accuracy"]
    return (
        f"stage {model.stage} trained on {stage['n_cells']} cells (new cell types: "
        f"{', '.join(stage['new_cell_types']) or 'none'}; best validation accuracy "
        f"{'n/a' if accuracy is None else f'{accuracy:.3f}'} at epoch {stage['best_epoch']})"
    )


def _predict(args: argparse.Namespace) -> None:
    from scanpy_canal.model import CANAL

    if args.output.suffix not in {".h5ad", ".csv"}:
        raise ValueError(f"--output must end in .h5ad or .csv, got {str(args.output)!r}.")
    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{str(args.output)!r} already exists; add --overwrite to replace it.")
    model = CANAL.load(args.model_dir)
    adata = _read_h5ad(args.data, backed=args.output.suffix == ".csv")  # a table needs no copy of X in memory
    _annotate(adata, model, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.suffix == ".csv":
        _prediction_table(adata, args.key_added).to_csv(args.output, index_label="obs_names")
    else:
        adata.write_h5ad(args.output)
    predictions = adata.obs[f"{args.key_added}_prediction"]
    unassigned = f", {int((predictions == 'Unassigned').sum())} Unassigned" if args.novel else ""
    print(f"annotated {adata.n_obs} cells with the stage-{model.stage} model{unassigned}; wrote {args.output}")


def _annotate(adata: AnnData, model: CANAL, args: argparse.Namespace) -> None:
    """`tl.annotate`, reading `--layer`; the scvi-tools registration this needs is not left in ``adata.uns``."""
    from scanpy_canal import tl

    kept = {key: adata.uns[key] for key in _SCVI_REGISTRATION_KEYS if key in adata.uns}
    if args.layer is not None:
        type(model).setup_anndata(adata, layer=args.layer)
    tl.annotate(
        adata,
        model,
        novel=args.novel,
        key_added=args.key_added,
        batch_size=args.batch_size,
        precision=args.precision,
        chunk_size=args.chunk_size,
    )
    for key in _SCVI_REGISTRATION_KEYS:
        adata.uns.pop(key, None)
    adata.uns.update(kept)


def _prediction_table(adata: AnnData, key: str) -> pd.DataFrame:
    """Prediction, confidence and (with novel-cell detection) uncertainty of each cell."""
    columns = {f"{key}_{name}": name for name in ("prediction", "confidence", "uncertainty")}
    return adata.obs[[column for column in columns if column in adata.obs]].rename(columns=columns)


def _positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a positive `kind`."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _devices(text: str) -> int | list[int] | str:
    """An argparse type: Lightning's devices (``auto``, a count, ``-1`` for all, or indices like ``0,1``)."""
    try:
        return "auto" if text == "auto" else [int(i) for i in text.split(",")] if "," in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, a number or indices like 0,1, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``scanpy-canal``."""
    parser = argparse.ArgumentParser(prog="scanpy-canal", description="Continual cell-type annotation (CANAL).")
    commands = parser.add_subparsers(dest="command", required=True)
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
    demo.add_argument("--epochs", type=int, default=30, help="maximum epochs per stage (default: 30)")
    demo.add_argument("--batch-size", type=int, default=8, help="cells per minibatch (default: 8)")
    demo.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default: cpu)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    demo.add_argument(
        "--pretrain-epochs",
        type=int,
        default=20,
        help="without --pretrained: first pretrain the encoder for this many epochs on the stages' training cells, "
        "without labels; 0 starts from random weights (default: 20)",
    )
    demo.add_argument("--pretrained", type=Path, default=None, help="start from these weights (see `pretrain`)")
    demo.add_argument("--pretrained-genes", type=Path, default=None, help="gene list of a .pth checkpoint")
    demo.set_defaults(run=_demo)
    _add_train_parser(commands)
    _add_predict_parser(commands)
    _add_pretrain_parser(commands)
    return parser


def _add_train_parser(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train one stage of a model on labelled cells (.h5ad) and save it",
        description="Trains one stage. If --model-dir does not exist (or is empty), a new model is built from the "
        "data and trained as stage 1; if it holds a saved model, that model trains its next stage (new cell types, "
        "replay, distillation). Either way the model is then saved to --model-dir, replacing the one it was loaded "
        "from. --new insists on a new model: it is an error if --model-dir holds one, unless --overwrite is given "
        "too. A directory that is not a saved model is never replaced. Values must be log2(1 + counts per 10k) "
        "(see canal.pp.normalize).",
    )
    train.add_argument("data", type=Path, help="labelled cells (.h5ad)")
    train.add_argument("--model-dir", type=Path, required=True, help="directory of the model to continue or create")
    train.add_argument("--labels-key", required=True, help="column of obs holding the cell types")
    train.add_argument("--layer", default=None, help="layer to read instead of X")
    train.add_argument(
        "--new", action="store_true", help="build a new model; an error if --model-dir holds one, unless --overwrite"
    )
    train.add_argument("--overwrite", action="store_true", help="with --new: replace the model in --model-dir")
    train.add_argument("--stage", type=int, default=None, help="the stage expected, as a guard (default: the next)")
    train.add_argument("--epochs", type=_positive(int), default=100, help="maximum epochs (default: 100)")
    train.add_argument("--lr", type=_positive(float), default=2e-4, help="peak learning rate (default: 2e-4)")
    train.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default: auto)")
    train.add_argument(
        "--devices", type=_devices, default="auto", help="Lightning devices: auto, a count, -1 for all, or 0,1"
    )
    train.add_argument(
        "--strategy", default="auto", help="Lightning strategy, e.g. ddp_find_unused_parameters_true (default: auto)"
    )
    train.add_argument("--batch-size", type=_positive(int), default=16, help="cells per minibatch (default: 16)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument(
        "--wait",
        action="store_true",
        help="if another run is writing --model-dir, wait for it to finish, then train the next stage (default: stop "
        "with an error)",
    )
    new = train.add_argument_group("new model", "Only when a new model is built.")
    new.add_argument(
        "--genes", type=_positive(int), default=None, help="panel of this many highly variable genes (default: all)"
    )
    new.add_argument("--pretrained", type=Path, default=None, help="scBERT .pth checkpoint or pretrained directory")
    new.add_argument("--pretrained-genes", type=Path, default=None, help="gene list of a .pth checkpoint")
    new.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    for name in _ARCH_OPTIONS:
        flag = name.replace("_", "-")
        new.add_argument(f"--{flag}", type=_positive(int), default=None, help=f"encoder {flag} (default: scBERT's)")
    train.set_defaults(run=_train)


def _add_predict_parser(commands) -> None:
    predict = commands.add_parser(
        "predict",
        help="annotate cells (.h5ad) with a saved model",
        description="Predicts the cell type of every cell. An .h5ad output is the input with the keys of "
        "canal.tl.annotate added (obs <key>_prediction, <key>_confidence, <key>_uncertainty; obsm X_<key>, "
        "<key>_probabilities; uns <key>); a .csv output has one row per cell: obs_names, prediction, confidence and, "
        "with --novel, uncertainty. Cells are read, aligned to the model's genes and predicted --chunk-size at a time; "
        "for a .csv output the input's X is read from disk chunk by chunk, so memory stays bounded.",
    )
    predict.add_argument("data", type=Path, help="cells to annotate (.h5ad), log2(1 + counts per 10k) values")
    predict.add_argument("--model-dir", type=Path, required=True, help="directory of a saved model")
    predict.add_argument("--output", type=Path, required=True, help="output file, .h5ad or .csv")
    predict.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    predict.add_argument("--novel", action="store_true", help='call cells of never-seen types "Unassigned"')
    predict.add_argument("--layer", default=None, help="layer to read instead of X")
    predict.add_argument("--key-added", default="canal", help="prefix of the keys written (default: canal)")
    predict.add_argument(
        "--batch-size", type=_positive(int), default=None, help="cells per forward pass (default: sized by the model)"
    )
    predict.add_argument(
        "--chunk-size", type=_positive(int), default=10_000, help="cells read and predicted at a time (default: 10000)"
    )
    predict.add_argument(
        "--precision", choices=["32", "bf16"], default="32", help="float32, or bfloat16 autocast (default: 32)"
    )
    predict.set_defaults(run=_predict)


def _pretrain(args: argparse.Namespace) -> None:
    with _writer_lock(args.output, wait=args.wait):  # a busy output is refused before the training, not after
        _pretrain_unlocked(args)


def _pretrain_unlocked(args: argparse.Namespace) -> None:
    from scanpy_canal._demo import final_masked_accuracy
    from scanpy_canal.model import pretrain
    from scanpy_canal.nn import read_vocabulary
    from scanpy_canal.nn._pretrained import check_destination
    from scanpy_canal.pp import normalize

    check_destination(args.output, overwrite=args.overwrite)  # before hours of training, not after
    genes = None if args.genes_file is None else read_vocabulary(args.genes_file)
    adata = _read_h5ad(args.data)
    if args.normalize:
        normalize(adata, layer=args.layer)
    history = pretrain(
        adata,
        args.output,
        genes=genes,
        layer=None if args.normalize else args.layer,
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
        **{name: getattr(args, name) for name in _ARCH_OPTIONS if getattr(args, name) is not None},
    )
    print(
        f"pretrained on {adata.n_obs} cells for {len(history)} epochs, masked-token accuracy "
        f"{final_masked_accuracy(history):.3f}; wrote {args.output}"
    )


def _fraction(text: str) -> float:
    """An argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _add_pretrain_parser(commands) -> None:
    pretrain = commands.add_parser(
        "pretrain",
        help="pretrain the encoder on unlabelled cells (.h5ad) by masked-bin prediction",
        description="Self-supervised pretraining as scBERT did it: in every cell 15% of the non-zero expression "
        "bins are hidden (90% of them behind the mask token) and the encoder learns to recover them. Writes a "
        "directory (config.json, genes.txt, weights.pt, history.csv) that `train --pretrained` and "
        "canal.CANAL(adata, pretrained=...) read; genes are matched by name. Many GPUs: --accelerator gpu "
        "--devices -1 --strategy ddp (and --num-nodes).",
    )
    pretrain.add_argument("data", type=Path, help="unlabelled cells (.h5ad), log2(1 + counts per 10k) values")
    pretrain.add_argument("output", type=Path, help="directory to write")
    pretrain.add_argument(
        "--normalize",
        action="store_true",
        help="first bring counts or log1p values to log2(1 + counts per 10k) (canal.pp.normalize)",
    )
    pretrain.add_argument("--layer", default=None, help="layer to read instead of X")
    pretrain.add_argument(
        "--genes-file",
        type=Path,
        default=None,
        help="text file, one gene per line: the vocabulary in positional order (default: the data's var_names)",
    )
    pretrain.add_argument("--epochs", type=_positive(int), default=20, help="passes over the cells (default: 20)")
    pretrain.add_argument(
        "--batch-size", type=_positive(int), default=16, help="cells per batch and device (default: 16)"
    )
    pretrain.add_argument(
        "--accumulate-grad-batches",
        type=_positive(int),
        default=1,
        help="batches per optimiser step (default: 1; scBERT: 60 batches of 3)",
    )
    pretrain.add_argument("--lr", type=_positive(float), default=1e-4, help="Adam learning rate (default: 1e-4)")
    pretrain.add_argument(
        "--lr-schedule",
        choices=["constant", "warm_restarts"],
        default="constant",
        help="constant, or scBERT's per-epoch cosine warm restarts, for long runs (default: constant)",
    )
    pretrain.add_argument(
        "--mask-prob", type=_fraction, default=0.15, help="fraction of non-zero bins to predict (default: 0.15)"
    )
    pretrain.add_argument(
        "--validation-size",
        type=_fraction,
        default=0.05,
        help="fraction of cells held out to score masked-token accuracy (default: 0.05)",
    )
    pretrain.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    pretrain.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default: auto)")
    pretrain.add_argument(
        "--devices", type=_devices, default="auto", help="Lightning devices: auto, a count, -1 for all, or 0,1"
    )
    pretrain.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp (default: auto)")
    pretrain.add_argument("--num-nodes", type=_positive(int), default=1, help="machines (default: 1)")
    for name in _ARCH_OPTIONS:
        flag = name.replace("_", "-")
        pretrain.add_argument(
            f"--{flag}", type=_positive(int), default=None, help=f"encoder {flag} (default: scBERT's)"
        )
    pretrain.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    pretrain.add_argument("--quiet", action="store_true", help="no progress bar")
    pretrain.add_argument(
        "--wait",
        action="store_true",
        help="if another run is writing the output, wait for it to finish (default: stop with an error)",
    )
    pretrain.set_defaults(run=_pretrain)


def main(argv: list[str] | None = None) -> int:
    """Run ``scanpy-canal``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, KeyError, OSError) as error:
        # One line; a KeyError's message would be printed in quotes.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"scanpy-canal: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

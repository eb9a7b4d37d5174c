"""``scanpy-canal train``: one stage of a model on labelled cells, saved to its directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import (
    ARCH_OPTIONS,
    MODEL_FILE,
    add_arch_options,
    add_gene_symbols_option,
    add_lightning_options,
    add_mod_option,
    add_normalize_option,
    add_precision_option,
    add_training_options,
    arch_arguments,
    check_data,
    first_process,
    fraction,
    positive,
    read_values,
    training_arguments,
    writer_lock,
)

if TYPE_CHECKING:
    from anndata import AnnData

    from scanpy_canal.model import CANAL

_NEW_MODEL_OPTIONS = ("genes", "pretrained", "pretrained_genes", "seed", "head_dropout", *ARCH_OPTIONS)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``train`` command to `commands`."""
    train = commands.add_parser(
        "train",
        help="train one stage of a model on labelled cells (.h5ad) and save it",
        description="Trains one stage. If --model-dir does not exist (or is empty), a new model is built from the "
        "data and trained as stage 1; if it holds a saved model, that model trains its next stage (new cell types, "
        "replay, distillation). Either way the model is then saved to --model-dir, replacing the one it was loaded "
        "from. --new insists on a new model: it is an error if --model-dir holds one, unless --overwrite is given "
        "too. A directory that is not a saved model is never replaced. Values must be log2(1 + counts per 10k) "
        "(see canal.pp.normalize), or --normalize gets them there.",
    )
    train.add_argument("data", type=Path, help="labelled cells (.h5ad, or .h5mu with --mod)")
    train.add_argument("--model-dir", type=Path, required=True, help="directory of the model to continue or create")
    train.add_argument("--labels-key", required=True, help="column of obs holding the cell types")
    train.add_argument(
        "--ontology-key",
        default=None,
        help="column of obs holding each cell's Cell Ontology id (CL:...): with --parents find, the stage's relations "
        "come from the Cell Ontology (needs scanpy-canal[ontology])",
    )
    train.add_argument("--layer", default=None, help="layer to read instead of X")
    add_normalize_option(train)
    add_mod_option(train)
    add_gene_symbols_option(train)
    train.add_argument(
        "--new", action="store_true", help="build a new model; an error if --model-dir holds one, unless --overwrite"
    )
    train.add_argument("--overwrite", action="store_true", help="with --new: replace the model in --model-dir")
    train.add_argument("--stage", type=int, default=None, help="the stage expected, as a guard (default: the next)")
    train.add_argument(
        "--parents",
        default="find",
        help="relations this stage adds to the cell-type tree: 'find' (default), found from the data; or a JSON "
        "object {child: parent} ({} adds none) or a CSV file with a header row and two columns, child then parent",
    )
    add_training_options(train)
    add_lightning_options(train, strategy_example="ddp_find_unused_parameters_true")
    add_precision_option(train)
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument(
        "--wait",
        action="store_true",
        help="if another run is writing --model-dir, wait for it to finish, then train the next stage (default: stop "
        "with an error)",
    )
    new = train.add_argument_group("new model", "Only when a new model is built.")
    new.add_argument(
        "--genes", type=positive(int), default=None, help="panel of this many highly variable genes (default: all)"
    )
    new.add_argument("--pretrained", type=Path, default=None, help="scBERT .pth checkpoint or pretrained directory")
    new.add_argument("--pretrained-genes", type=Path, default=None, help="gene list of a .pth checkpoint")
    new.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    add_arch_options(new)
    new.add_argument(
        "--head-dropout",
        type=fraction,
        default=None,
        help="dropout in the classification head while training (default: 0, CANAL's; 0.2 to 0.5 helped streams of "
        "a few types with hundreds of cells each, see the Annotation quality page)",
    )
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Load or build the model, train its next stage and save it back, holding the directory's writer lock."""
    _continues_a_model(args)  # a mistake is told at once, before torch and scvi-tools take seconds to load
    with writer_lock(args.model_dir, wait=args.wait):  # from loading to saving, so no other run's stage is lost
        _train_next_stage(args)


def _continues_a_model(args: argparse.Namespace) -> bool:
    """Whether the command trains the next stage of the model in --model-dir; an error for arguments that conflict.

    Reads only the file system, so it answers at once; it is asked again once the directory is locked.
    """
    from scanpy_canal._directories import readable_directory

    check_data(args)
    if args.parents != "find" and not Path(args.parents).is_file():
        raise FileNotFoundError(f"--parents {str(args.parents)!r} does not exist.")
    for option in ("pretrained", "pretrained_genes"):
        path = getattr(args, option)
        if path is not None and not readable_directory(path).exists():  # a pretrained directory may be retired
            raise FileNotFoundError(f"--{option.replace('_', '-')} {str(path)!r} does not exist.")
    holds_model = _holds_model(args.model_dir)
    if holds_model and args.new and not args.overwrite:
        raise FileExistsError(
            f"--model-dir {str(args.model_dir)!r} already holds a model: drop --new to train its next stage, "
            "or add --overwrite to replace it with a new model."
        )
    given = [f"--{name.replace('_', '-')}" for name in _NEW_MODEL_OPTIONS if getattr(args, name) is not None]
    if holds_model and not args.new and given:
        raise ValueError(
            f"{', '.join(given)}: options of a new model, but --model-dir {str(args.model_dir)!r} already holds one; "
            "drop them to train its next stage, or add --new --overwrite to replace it."
        )
    return holds_model and not args.new


def _train_next_stage(args: argparse.Namespace) -> None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from scanpy_canal.model import CANAL

    model = CANAL.load(args.model_dir) if _continues_a_model(args) else None
    adata, layer = read_values(args)
    CANAL.setup_anndata(
        adata,
        labels_key=args.labels_key,
        layer=layer,
        gene_symbols=args.gene_symbols,
        ontology_key=args.ontology_key,
    )
    model = _new_model(adata, args) if model is None else model
    try:
        model.train(
            adata,
            stage=args.stage,
            **training_arguments(args),
            precision=args.precision,
            accelerator=args.accelerator,
            devices=args.devices,
            strategy=args.strategy,
            parents=args.parents if args.parents == "find" else read_parents(Path(args.parents)),
            enable_progress_bar=not args.quiet,
            enable_model_summary=False,
        )
    except MisconfigurationException as error:  # e.g. --accelerator gpu without a GPU
        settings = f"--accelerator {args.accelerator} --devices {args.devices} --strategy {args.strategy}"
        raise ValueError(f"Lightning cannot train with {settings}: {error}") from error
    if first_process():
        model.save(args.model_dir, overwrite=True)
    print(f"{_stage_summary(model)}; model saved to {args.model_dir}")


def read_parents(path: Path) -> dict[str, str]:
    """The ``{child: parent}`` relations in `path`: a JSON object, or a CSV file of two columns with a header row."""
    import json

    import pandas as pd

    if path.suffix.lower() == ".json":
        relations = json.loads(path.read_text())
        if not isinstance(relations, dict) or not all(isinstance(v, str) for v in relations.values()):
            raise ValueError(f"--parents {str(path)!r} must hold a JSON object of cell type -> parent names.")
        return relations
    table = pd.read_csv(path, dtype=str)
    if table.shape[1] != 2 or table.isna().any(axis=None):
        raise ValueError(
            f"--parents {str(path)!r} must have two filled columns (child, parent) and a header row; "
            f"it has the columns {list(table.columns)}."
        )
    return dict(zip(table.iloc[:, 0].str.strip(), table.iloc[:, 1].str.strip(), strict=True))


def _holds_model(directory: Path) -> bool:
    """Whether `directory` is a saved model; an error if it is anything else but missing or empty."""
    if (directory / MODEL_FILE).is_file():
        return True
    if directory.exists() and not (directory.is_dir() and not any(directory.iterdir())):
        raise FileExistsError(f"--model-dir {str(directory)!r} exists and is not a saved CANAL model.")
    return False


def _new_model(adata: AnnData, args: argparse.Namespace) -> CANAL:
    from scanpy_canal.model import CANAL

    return CANAL(
        adata,
        n_top_genes=args.genes,
        pretrained=None if args.pretrained is None else str(args.pretrained),
        pretrained_genes=None if args.pretrained_genes is None else str(args.pretrained_genes),
        seed=0 if args.seed is None else args.seed,
        **arch_arguments(args),
        **({} if args.head_dropout is None else {"head_dropout": args.head_dropout}),
    )


def _stage_summary(model: CANAL) -> str:
    stage = model.stage_history_[-1]
    accuracy = stage["best_validation_accuracy"]  # of the epoch kept: the best, or the last (keep_epoch)
    kept = "the best" if stage.get("keep_epoch", "best") == "best" else "the last"
    return (
        f"stage {model.stage} trained on {stage['n_cells']} cells (new cell types: "
        f"{', '.join(stage['new_cell_types']) or 'none'}; kept epoch {stage['best_epoch']}, {kept}, validation "
        f"accuracy {'n/a' if accuracy is None else f'{accuracy:.3f}'})"
    )

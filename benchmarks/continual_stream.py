"""CANAL against its ablations, joint training and a CellTypist-style logistic regression on continual streams.

Usage::

    .venv/bin/python benchmarks/continual_stream.py           # -> benchmarks/results/continual_stream.json
    .venv/bin/python benchmarks/continual_stream.py --quick   # 1 seed, 2 epochs -> temp file

Streams: ``pbmc68k`` (``canal.datasets.pbmc68k_stream(seed=0)``: 3 class-incremental stages, CD34+ cells novel)
and ``synthetic`` (``canal.datasets.synthetic_stream(n_stages=3, n_genes=300, batch_effect=1.0, marker_fold=(2, 4),
seed=0)``: a strong batch effect per stage, new types per stage, earlier types recurring under the new batch; with
weaker markers than the generator's default, so that it is not trivially separable: with the defaults, logistic
regression scores 1.000 everywhere, even refit on one stage). The streams are fixed; the seeds only change the
models (initialisation, validation split, batches).

Methods (all CANAL runs use the demo encoder ``DEMO_ARCH`` from random weights, 300 highly variable genes, batch
size 8, learning rate 1e-3, CPU, ``--epochs`` per stage with the default early stopping):

- ``canal``: :func:`scanpy_canal._demo.run_stream` with the default example bank and distillation;
- ``canal_no_bank``: the same with ``rehearsal_size=0``;
- ``canal_no_distill``: the same with ``distill_weight=0``;
- ``naive_finetune``: both off, plain sequential fine-tuning;
- ``canal_random_bins``: ``canal`` with scBERT's random bin embeddings (``token_init="normal"``), as before the
  ordinal start became the default;
- ``canal_joint`` (upper bound): after each stage ``t``, a new CANAL model trained in one stage on the training cells
  of stages 1 to ``t`` together (panel: 300 HVGs of those cells);
- ``lr_sequential``: a CellTypist-style classifier, ``StandardScaler`` then ``LogisticRegression(max_iter=1000)``
  on the stream's ``log2(1 + CP10k)`` values of all genes (CellTypist scales genes too; its clipping at 10 and
  feature selection are left out), refit at stage ``t`` on stage ``t``'s training cells only: it can only predict
  the types in that stage, so it forgets everything else (the floor);
- ``lr_joint``: the same classifier, after each stage ``t`` refit on the training cells of stages 1 to ``t``;
- ``scanvi_scarches``: scANVI (scvi-tools) updated stage by stage through scArches, the peer's continual approach.
  Stage 1 trains scVI (``SCANVI_SETTINGS["scvi_epochs"]``) and then scANVI from it (``scanvi_epochs``), the
  scvi-tools recipe; stage ``t > 1`` is ``SCANVI.load_query_data`` on the previous stage's model (scArches surgery:
  only the new batch's weights, the decoder's batch norm, the library encoder and the classifier train), trained
  on stage ``t``'s labelled cells (``query_epochs``, ``weight_decay=0``), and becomes the reference of the next
  stage. ``obs["stage"]`` is the batch. Latent size 10, scvi-tools' defaults otherwise (validation split 10%, batch
  size 128, fixed epochs, CPU).
  Input: all genes of the stream; the synthetic counts (``layers["counts"]``, zero-inflated negative binomial), and
  for pbmc68k, which has no counts (scanpy's ``pbmc68k_reduced`` keeps only log-normalised values), ``X`` with
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
report novel-cell detection (``h_score`` etc.) from ``run_stream``. Logistic regression (lbfgs) is deterministic, so
its spread over seeds is 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
from continual_stream_report import print_tables
from encoder_throughput import machine_info, write_report

import scanpy_canal as canal
from scanpy_canal._demo import DEMO_ARCH, StreamResult, run_stream

if TYPE_CHECKING:
    from scvi.model import SCANVI

RESULTS = Path(__file__).resolve().parent / "results" / "continual_stream.json"
N_TOP_GENES = 300
STREAMS = {
    "pbmc68k": lambda: canal.datasets.pbmc68k_stream(seed=0),
    "synthetic": lambda: canal.datasets.synthetic_stream(
        n_stages=3, n_genes=300, batch_effect=1.0, marker_fold=(2.0, 4.0), seed=0
    ),
}
#: Settings of each CANAL stream run beyond :func:`canal_train_kwargs`: ``model.train``'s, and ``arch`` updates
#: ``DEMO_ARCH``.
CANAL_VARIANTS = {
    "canal": {},
    "canal_no_bank": {"rehearsal_size": 0},
    "canal_no_distill": {"distill_weight": 0},
    "naive_finetune": {"rehearsal_size": 0, "distill_weight": 0},
    "canal_random_bins": {"arch": {"token_init": "normal"}},
}
METHODS = [*CANAL_VARIANTS, "canal_joint", "lr_sequential", "lr_joint", "scanvi_scarches"]
#: ``scanvi_scarches``: latent size, and the fixed epochs of the scVI and scANVI reference and of each query stage.
SCANVI_SETTINGS = {"n_latent": 10, "scvi_epochs": 400, "scanvi_epochs": 100, "query_epochs": 100}
SCVI_TRAIN = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}
SCANVI_LABELS, UNLABELED, PLACEHOLDER = "scanvi_label", "Unknown", "(no cell)"
#: Issue 6's targets: (name, CANAL's metric, the reference method and metric it is compared with, lowest value).
#: ``bwt_beyond_joint`` is the forgetting that is not class interference (see the module docstring).
TARGETS = [
    ("acc_minus_canal_joint", "acc", ("canal_joint", "acc"), -0.03),
    ("bwt", "bwt", None, -0.03),
    ("bwt_beyond_joint", "bwt", ("canal_joint", "bwt"), -0.03),
    ("h_score", "h_score", None, 0.75),
    ("acc_minus_naive_finetune", "acc", ("naive_finetune", "acc"), 0.0),
    ("acc_minus_lr_sequential", "acc", ("lr_sequential", "acc"), 0.0),
    ("acc_minus_lr_joint", "acc", ("lr_joint", "acc"), 0.0),
    ("acc_minus_scanvi_scarches", "acc", ("scanvi_scarches", "acc"), None),
]

Predictor = Callable[[ad.AnnData], np.ndarray]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="maximum epochs per CANAL stage")
    parser.add_argument("--streams", nargs="+", choices=list(STREAMS), default=list(STREAMS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, output to a temp file")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 2
    args.output = args.output or (
        Path(tempfile.gettempdir()) / "continual_stream_quick.json" if args.quick else RESULTS
    )
    return args


def canal_train_kwargs(epochs: int) -> dict:
    """``model.train`` settings shared by every CANAL run."""
    return {
        "max_epochs": epochs,
        "batch_size": 8,
        "lr": 1e-3,
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }


def evaluate_predictor(stream: canal.datasets.Stream, predict: Predictor, n_seen: int) -> dict:
    """Score `predict` on the held-out cells of the first `n_seen` stages.

    Parameters
    ----------
    stream
        The stream whose ``test`` sets are scored.
    predict
        Maps an AnnData to one predicted label per cell.
    n_seen
        Number of stages trained so far.

    Returns
    -------
    ``accuracy`` and ``macro_f1``: lists, one value per test set; ``pooled``: the scores of
    :func:`scanpy_canal.tl.evaluate` on all those test sets together.
    """
    tests = stream.test[:n_seen]
    predicted = np.asarray(predict(ad.concat(tests)), dtype=object)
    bounds = np.cumsum([0] + [test.n_obs for test in tests])
    per_set = [
        canal.tl.evaluate(test.obs[stream.labels_key], predicted[start:stop])
        for test, start, stop in zip(tests, bounds[:-1], bounds[1:], strict=True)
    ]
    truth = np.concatenate([test.obs[stream.labels_key].astype(str).to_numpy() for test in tests])
    return {
        "accuracy": [s["accuracy"] for s in per_set],
        "macro_f1": [s["macro_f1"] for s in per_set],
        "pooled": canal.tl.evaluate(truth, predicted),
    }


def run_stages(stream: canal.datasets.Stream, stages: list[tuple[str, int, Callable[[], Predictor]]]) -> dict:
    """Fit and score a model stage by stage.

    Parameters
    ----------
    stream
        The stream.
    stages
        ``(row name, stages seen, fit)`` per row of the matrices; ``fit()`` trains and returns the predictor.

    Returns
    -------
    The result in the layout of :meth:`scanpy_canal._demo.StreamResult.to_dict` (without ``accuracy_novel``).
    """
    columns = [f"stage {t + 1}" for t in range(stream.n_stages)]
    accuracy = pd.DataFrame(np.nan, index=[name for name, _, _ in stages], columns=columns)
    macro_f1, seconds = accuracy.copy(), []
    for row, (_, n_seen, fit) in enumerate(stages):
        start = time.perf_counter()
        predict = fit()
        seconds.append(time.perf_counter() - start)
        scores = evaluate_predictor(stream, predict, n_seen)
        accuracy.iloc[row, :n_seen], macro_f1.iloc[row, :n_seen] = scores["accuracy"], scores["macro_f1"]
    final = canal.tl.continual_metrics(accuracy.to_numpy())
    final.update(macro_f1=scores["pooled"]["macro_f1"], ari=scores["pooled"]["ari"])
    result = StreamResult(accuracy, macro_f1, accuracy * np.nan, final, seconds).to_dict()
    del result["accuracy_novel"]
    return result


def fit_logistic(data: ad.AnnData, labels_key: str, seed: int) -> Predictor:
    """CellTypist-style classifier: genes standardised, then multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    model.fit(dense(data.X), data.obs[labels_key].astype(str).to_numpy())
    return lambda adata: model.predict(dense(adata.X))


def fit_canal(data: ad.AnnData, labels_key: str, seed: int, epochs: int) -> Predictor:
    """One CANAL stage on `data` (demo encoder, its own 300 HVGs); predicts closed-set labels."""
    data = data.copy()
    data.obs[labels_key] = data.obs[labels_key].astype(str).astype("category")
    canal.CANAL.setup_anndata(data, labels_key=labels_key)
    model = canal.CANAL(data, n_top_genes=N_TOP_GENES, seed=seed, **DEMO_ARCH)
    model.train(**canal_train_kwargs(epochs))
    return lambda adata: model.predict(adata)


def scanvi_stages(stream: canal.datasets.Stream, seed: int) -> list[tuple[str, int, Callable[[], Predictor]]]:
    """The rows of ``scanvi_scarches`` for :func:`run_stages`: each stage's model is the next stage's reference."""
    space = [*dict.fromkeys(t for data in stream.train for t in data.obs[stream.labels_key].astype(str)), PLACEHOLDER]
    models = []

    def fit(t: int) -> Predictor:
        data = scanvi_input(stream.train[t], space, stream.labels_key)
        with quiet_scvi():
            models.append(fit_scanvi_reference(data, seed) if t == 0 else fit_scanvi_query(data, models[-1]))
        return lambda adata, model=models[-1]: predict_scanvi(model, scanvi_input(adata, space))

    return [(f"stage {t + 1}", t + 1, lambda t=t: fit(t)) for t in range(stream.n_stages)]


def scanvi_input(adata: ad.AnnData, space: list[str], labels_key: str | None = None) -> ad.AnnData:
    """A copy of `adata` with ``obs["stage"]`` as strings and ``obs[SCANVI_LABELS]``.

    Parameters
    ----------
    adata
        Cells of the stream.
    space
        The types; the labels are categorical over `space` and :data:`UNLABELED`.
    labels_key
        The column of the labels; `None` leaves every cell unlabelled.
    """
    data = adata.copy()
    data.obs["stage"] = data.obs["stage"].astype(str)
    labels = data.obs[labels_key].astype(str).to_numpy() if labels_key else [UNLABELED] * data.n_obs
    data.obs[SCANVI_LABELS] = pd.Categorical(labels, categories=[*space, UNLABELED])
    return data


def fit_scanvi_reference(data: ad.AnnData, seed: int) -> SCANVI:
    """Stage 1: scVI, then scANVI from it; on ``layers["counts"]`` (ZINB) if `data` has it, else on ``X`` (normal)."""
    import scvi

    scvi.settings.seed = seed
    counts = "counts" in data.layers
    scvi.model.SCVI.setup_anndata(data, layer="counts" if counts else None, batch_key="stage", labels_key=SCANVI_LABELS)
    vae = scvi.model.SCVI(data, n_latent=SCANVI_SETTINGS["n_latent"], gene_likelihood="zinb" if counts else "normal")
    vae.train(max_epochs=SCANVI_SETTINGS["scvi_epochs"], **SCVI_TRAIN)
    model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELED)
    model.train(max_epochs=SCANVI_SETTINGS["scanvi_epochs"], **SCVI_TRAIN)
    return model


def fit_scanvi_query(data: ad.AnnData, reference: SCANVI) -> SCANVI:
    """A later stage: scArches surgery on `reference`, trained on `data` with its labels (classifier unfrozen)."""
    import scvi

    model = scvi.model.SCANVI.load_query_data(data, reference, freeze_classifier=False, accelerator="cpu")
    model.train(max_epochs=SCANVI_SETTINGS["query_epochs"], plan_kwargs={"weight_decay": 0.0}, **SCVI_TRAIN)
    return model


def predict_scanvi(model: SCANVI, data: ad.AnnData) -> np.ndarray:
    """scANVI's labels of `data` (its classifier on the latent means)."""
    with quiet_scvi():
        return np.asarray(model.predict(data))


@contextmanager
def quiet_scvi() -> Iterator[None]:
    """Silence the info logs and warnings of scvi-tools and Lightning."""
    import scvi

    scvi.settings.verbosity = logging.ERROR
    for name in ["lightning", "lightning.fabric", "lightning.pytorch"]:
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)


def run_method(stream: canal.datasets.Stream, method: str, seed: int, epochs: int, log: Callable) -> dict:
    """One method on one stream with one seed: the matrices, final metrics and seconds per stage."""
    key = stream.labels_key
    if method in CANAL_VARIANTS:
        train_kwargs = {**canal_train_kwargs(epochs), **CANAL_VARIANTS[method]}
        arch = {**DEMO_ARCH, **train_kwargs.pop("arch", {})}
        result = run_stream(stream, arch=arch, n_top_genes=N_TOP_GENES, seed=seed, log=log, **train_kwargs)
        return result.to_dict()
    if method == "scanvi_scarches":
        return run_stages(stream, scanvi_stages(stream, seed))
    fit = {
        "canal_joint": lambda data: fit_canal(data, key, seed, epochs),
        "lr_joint": lambda data: fit_logistic(data, key, seed),
        "lr_sequential": lambda data: fit_logistic(data, key, seed),
    }[method]
    joint = method != "lr_sequential"
    training = [ad.concat(stream.train[: t + 1]) if joint else data for t, data in enumerate(stream.train)]
    return run_stages(stream, [(f"stage {t + 1}", t + 1, lambda d=d: fit(d)) for t, d in enumerate(training)])


def summarise(runs: list[dict]) -> dict:
    """Mean and sd (over seeds; None for one seed) of every final metric and of the wall time."""
    values = {key: [run["final"].get(key, np.nan) for run in runs] for key in runs[0]["final"]}
    values["seconds"] = [run["seconds"] for run in runs]
    return {
        key: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None}
        for key, v in values.items()
    }


def check_targets(results: dict) -> dict:
    """Issue 6's targets for ``canal`` on one stream, from the means over seeds.

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
        targets[name] = {"value": value, "target": lowest, "met": None if lowest is None else bool(value >= lowest)}
    return targets


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = {
        "machine": machine_info(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "canal_settings": {"arch": DEMO_ARCH, "n_top_genes": N_TOP_GENES, **canal_train_kwargs(args.epochs)},
        "scanvi_settings": SCANVI_SETTINGS,
        "results": {},
    }
    for stream_name in args.streams:
        stream = STREAMS[stream_name]()
        report["results"][stream_name] = {}
        for method in args.methods:
            runs = []
            for seed in args.seeds:
                prefix = f"[{stream_name} {method} seed {seed}]"
                start = time.perf_counter()
                run = run_method(stream, method, seed, args.epochs, log=lambda line, p=prefix: print(p, line))
                run.update(seed=seed, seconds=time.perf_counter() - start)
                print(f"{prefix} acc {run['final']['acc']:.3f}, {run['seconds']:.1f} s")
                runs.append(run)
            report["results"][stream_name][method] = {"runs": runs, "summary": summarise(runs)}
        report.setdefault("targets", {})[stream_name] = check_targets(report["results"][stream_name])
    report["machine"]["load_average_end"] = list(os.getloadavg())
    write_report(report, args.output)
    print_tables(report)
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main()

"""CANAL against its ablations, joint training and a CellTypist-style logistic regression on continual streams.

Usage::

    .venv/bin/python benchmarks/continual_stream.py           # -> benchmarks/results/continual_stream.json
    .venv/bin/python benchmarks/continual_stream.py --quick   # 1 seed, 2 epochs -> temp file

Streams: ``pbmc68k`` (``canal.datasets.pbmc68k_stream(seed=0)``: 3 class-incremental stages, CD34+ cells novel)
and ``synthetic`` (``canal.datasets.synthetic_stream(n_stages=3, n_genes=300, batch_effect=0.5, seed=0)``: a batch
effect per stage, new types per stage, earlier types recurring). The streams are fixed; the seeds only change the
models (initialisation, validation split, batches).

Methods (all CANAL runs use the demo encoder ``DEMO_ARCH`` from random weights, 300 highly variable genes, batch
size 8, learning rate 1e-3, CPU, ``--epochs`` per stage with the default early stopping):

- ``canal``: :func:`scanpy_canal._demo.run_stream` with the default example bank and distillation;
- ``canal_no_bank``: the same with ``rehearsal_size=0``;
- ``canal_no_distill``: the same with ``distill_weight=0``;
- ``naive_finetune``: both off, plain sequential fine-tuning;
- ``canal_joint`` (upper bound): one CANAL stage on the training cells of all stages together (panel: 300 HVGs of
  those cells);
- ``lr_sequential``: a CellTypist-style classifier, ``StandardScaler`` then ``LogisticRegression(max_iter=1000)``
  on the stream's ``log2(1 + CP10k)`` values of all genes (CellTypist scales genes too; its clipping at 10 and
  feature selection are left out), refit at stage ``t`` on stage ``t``'s training cells only: it can only predict
  the types in that stage, so it forgets everything else (the floor);
- ``lr_joint``: the same classifier fit once on all stages' training cells.

Every model is scored by :func:`evaluate_predictor`: accuracy and macro-F1 on each trained stage's held-out cells
(the accuracy matrix, stage trained x test set; ``acc``, ``bwt``, ``forgetting`` from
:func:`scanpy_canal.tl.continual_metrics`), and macro-F1 and ARI on all held-out cells pooled. Joint methods have a
single row, hence no ``bwt``/``forgetting``. The CANAL stream runs also report novel-cell detection (``h_score``
etc.) from ``run_stream``. Logistic regression (lbfgs) is deterministic, so its spread over seeds is 0.

Not yet included: scANVI fine-tuned through scArches (issue 6 asks for it; it is a later piece of work).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from encoder_throughput import machine_info, write_report

import scanpy_canal as canal
from scanpy_canal._demo import DEMO_ARCH, StreamResult, run_stream

RESULTS = Path(__file__).resolve().parent / "results" / "continual_stream.json"
N_TOP_GENES = 300
STREAMS = {
    "pbmc68k": lambda: canal.datasets.pbmc68k_stream(seed=0),
    "synthetic": lambda: canal.datasets.synthetic_stream(n_stages=3, n_genes=300, batch_effect=0.5, seed=0),
}
#: ``model.train`` settings of each CANAL stream run.
CANAL_VARIANTS = {
    "canal": {},
    "canal_no_bank": {"rehearsal_size": 0},
    "canal_no_distill": {"distill_weight": 0},
    "naive_finetune": {"rehearsal_size": 0, "distill_weight": 0},
}
METHODS = [*CANAL_VARIANTS, "canal_joint", "lr_sequential", "lr_joint"]
TABLE_KEYS = ["acc", "bwt", "forgetting", "macro_f1", "ari", "h_score"]

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
    square = len(stages) == stream.n_stages
    final = canal.tl.continual_metrics(accuracy.to_numpy()) if square else {"acc": float(accuracy.iloc[-1].mean())}
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


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)


def run_method(stream: canal.datasets.Stream, method: str, seed: int, epochs: int, log: Callable) -> dict:
    """One method on one stream with one seed: the matrices, final metrics and seconds per stage."""
    key = stream.labels_key
    if method in CANAL_VARIANTS:
        train_kwargs = {**canal_train_kwargs(epochs), **CANAL_VARIANTS[method]}
        result = run_stream(stream, arch=DEMO_ARCH, n_top_genes=N_TOP_GENES, seed=seed, log=log, **train_kwargs)
        return result.to_dict()
    if method == "lr_sequential":
        stages = [(f"stage {t + 1}", t + 1, lambda d=d: fit_logistic(d, key, seed)) for t, d in enumerate(stream.train)]
        return run_stages(stream, stages)
    joint = ad.concat(stream.train)
    fit = {
        "canal_joint": lambda: fit_canal(joint, key, seed, epochs),
        "lr_joint": lambda: fit_logistic(joint, key, seed),
    }[method]
    return run_stages(stream, [("joint", stream.n_stages, fit)])


def summarise(runs: list[dict]) -> dict:
    """Mean and sd (over seeds; None for one seed) of every final metric and of the wall time."""
    values = {key: [run["final"].get(key, np.nan) for run in runs] for key in runs[0]["final"]}
    values["seconds"] = [run["seconds"] for run in runs]
    return {
        key: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None}
        for key, v in values.items()
    }


def print_table(report: dict) -> None:
    print(f"\n{'stream':<10} {'method':<17}" + "".join(f"{key:>16}" for key in [*TABLE_KEYS, "seconds"]))
    for stream_name, methods in report["results"].items():
        for method, content in methods.items():
            cells = []
            for key in [*TABLE_KEYS, "seconds"]:
                stat = content["summary"].get(key)
                sd = "" if stat is None or stat["sd"] is None else f" ± {stat['sd']:.3f}"
                cells.append("-" if stat is None else f"{stat['mean']:.3f}{sd}")
            print(f"{stream_name:<10} {method:<17}" + "".join(f"{c:>16}" for c in cells))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = {
        "machine": machine_info(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "canal_settings": {"arch": DEMO_ARCH, "n_top_genes": N_TOP_GENES, **canal_train_kwargs(args.epochs)},
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
    report["machine"]["load_average_end"] = list(os.getloadavg())
    write_report(report, args.output)
    print_table(report)
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main()

"""Novel-cell detection on real and synthetic streams: every novelty score under every threshold rule.

Usage::

    .venv/bin/python benchmarks/continual_stream.py --methods canal   # trains, then writes results/novelty.json
    .venv/bin/python benchmarks/novelty.py    # the tables again from benchmarks/results/continual_stream.json

The models are those of the continual benchmark: after the last stage of each ``canal`` run
(``continual_stream.py``: random start, ``train()``'s defaults, each stream's bank size; ``calibration_size=2000``),
:func:`evaluate_model` annotates two queries:

- **known only**: the held-out cells of every stage (no novel cell at all); the share of them unassigned is the
  *known rejection*, which the conformal rule bounds by ``alpha`` (target: at most ``alpha + 0.02``);
- **known and novel**: the same plus every cell of the stream's novel type, scored with :func:`canal.tl.evaluate`:
  known accuracy (a known cell counts only if assigned to its right type), unknown recall (novel cells unassigned),
  their harmonic mean, the H-score (target: at least 0.80 on the real streams), and the AUROC of the score for novel
  against known cells, which does not depend on the threshold.

Scores: ``input`` (the default: the distance from the cell's expression to the bank in the input space), ``mix``,
``energy``, ``max_probability``, ``knn``, ``mahalanobis`` (``scanpy_canal.model._scores``). Rules:
``conformal`` at ``alpha`` 0.05 and 0.1 (one pass gives the p-values of both), and for ``mix`` the ``calibrated``
and the original, query-relative ``canal`` rules. This script summarises the runs of a continual benchmark JSON
(mean and sd over seeds), checks the targets and writes ``results/novelty.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
from continual_stream_report import format_stat
from harness import write_report
from sklearn.metrics import roc_auc_score

import scanpy_canal as canal

RESULTS = Path(__file__).resolve().parent / "results" / "novelty.json"
CONTINUAL = RESULTS.with_name("continual_stream.json")
ALPHAS = (0.05, 0.1)
SCORES = ("input", "mix", "energy", "max_probability", "knn", "mahalanobis")
MIX_RULES = ("calibrated", "canal")
#: The real streams, whose H-score target is 0.80.
REAL_STREAMS = ("pbmc68k", "zeisel_class", "zeisel_subclass")
REJECTION_MARGIN = 0.02
H_SCORE_TARGET = 0.80
#: Known cells a type needs in the query for its own rejection rate to count in ``worst_type_rejection``.
MIN_TYPE_CELLS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=CONTINUAL, help="a continual_stream.py results JSON")
    parser.add_argument("--quick", action="store_true", help="write to a temp file")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    args.output = args.output or (Path(tempfile.gettempdir()) / "novelty_quick.json" if args.quick else RESULTS)
    return args


def scored(truth: np.ndarray, labels: np.ndarray, is_novel: np.ndarray, n_known: int, scores: np.ndarray) -> dict:
    """The metrics of one rule: `labels` of the known-only query (first `n_known`) and of the mixed query.

    ``worst_type_rejection`` is the largest share of one known type's cells unassigned, among the types with
    :data:`MIN_TYPE_CELLS` known cells in the query: what a user of that type sees.
    """
    unassigned = labels == "Unassigned"
    metrics = canal.tl.evaluate(truth, labels, novel_types=sorted(set(truth[is_novel])))
    known_types, known_unassigned = truth[:n_known], unassigned[:n_known]
    per_type = [
        known_unassigned[known_types == name].mean()
        for name in np.unique(known_types)
        if (known_types == name).sum() >= MIN_TYPE_CELLS
    ]
    return {
        "known_rejection": float(known_unassigned.mean()),
        "worst_type_rejection": float(max(per_type, default=np.nan)),
        "unknown_recall": metrics["unknown_accuracy"],
        "known_accuracy": metrics["known_accuracy"],
        "h_score": metrics["h_score"],
        "auroc": float(roc_auc_score(is_novel, scores)),
    }


def evaluate_model(model: canal.CANAL, stream: canal.datasets.Stream) -> dict:
    """Every (score, rule) on the known-only and the mixed query (``rules``: one row of metrics each), the closed-set
    accuracy on the known cells and the size of the model's calibration set."""
    known = ad.concat(stream.test)
    query = ad.concat([known, stream.novel])
    truth = query.obs[stream.labels_key].astype(str).to_numpy()
    is_novel = np.isin(truth, stream.novel_types)
    closed = model.predict(query)
    rows = {}
    for score in SCORES:
        novelty = model.get_novelty(query, score=score)
        for alpha in ALPHAS:
            labels = np.where(novelty["pvalue"] <= alpha, "Unassigned", closed).astype(object)
            rows[f"{score}/conformal_{alpha:g}"] = scored(truth, labels, is_novel, known.n_obs, novelty["score"])
    for rule in MIX_RULES:
        # The "canal" rule is relative to its query: the known-only query gets its own call.
        known_labels = model.predict(known, novel=True, threshold=rule)
        labels = model.predict(query, novel=True, threshold=rule)
        labels = np.concatenate([known_labels, labels[known.n_obs :]]) if rule == "canal" else labels
        scores = model.get_novelty(query, score="mix")["score"]  # the ranking both rules threshold
        rows[f"mix/{rule}"] = scored(truth, labels, is_novel, known.n_obs, scores)
    return {
        "closed_set_accuracy": float((closed[: known.n_obs] == truth[: known.n_obs]).mean()),
        **{key: model.stage_history_[-1][key] for key in ("calibration_cells", "calibration_bytes")},
        "rules": rows,
    }


def summarise(runs: list[dict]) -> dict:
    """Mean and sd over seeds of every metric of every (score, rule)."""
    first = runs[0]["rules"]
    return {
        key: summarise_values([run[key] for run in runs])
        for key in ("closed_set_accuracy", "calibration_cells", "calibration_bytes")
    } | {
        "rules": {
            name: {metric: summarise_values([run["rules"][name][metric] for run in runs]) for metric in first[name]}
            for name in first
        }
    }


def check_targets(stream: str, summary: dict) -> dict:
    """Per (score, rule): is the known rejection within alpha + 0.02 (conformal), the H-score at least 0.80 (real)?"""
    checks = {}
    for name, metrics in summary["rules"].items():
        check = {}
        if "conformal" in name:
            alpha = float(name.rsplit("_", 1)[1])
            check["known_rejection"] = bool(metrics["known_rejection"]["mean"] <= alpha + REJECTION_MARGIN)
        if stream in REAL_STREAMS:
            check["h_score"] = bool(metrics["h_score"]["mean"] >= H_SCORE_TARGET)
        checks[name] = check
    return checks


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    continual = json.loads(args.input.read_text())
    report = {
        "source": str(args.input.name),
        "machine": continual["machine"],
        "canal_settings": continual["canal_settings"],
        "streams": continual["streams"],
        "results": {},
        "targets": {},
    }
    for name, methods in continual["results"].items():
        runs = [{"seed": run["seed"], **run["novelty"]} for run in methods.get("canal", {}).get("runs", [])]
        if not runs:
            continue
        summary = summarise(runs)
        report["results"][name] = {"runs": runs, "summary": summary}
        report["targets"][name] = check_targets(name, summary)
    report["ranking"] = rank_scores(report["results"])
    write_report(report, args.output)
    print_table(report)
    print(f"\nwrote {args.output}")
    return report


def print_table(report: dict) -> None:
    """Per stream, as Markdown: every (score, rule), mean ± sd over seeds."""
    columns = ["known_rejection", "worst_type_rejection", "unknown_recall", "known_accuracy", "h_score", "auroc"]
    for stream, content in report["results"].items():
        summary = content["summary"]
        print(f"\n### {stream} (closed-set accuracy {format_stat(summary['closed_set_accuracy'], 3)})\n")
        print("| score / rule | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
        for name, metrics in summary["rules"].items():
            print(f"| {name} | " + " | ".join(format_stat(metrics[c], 3) for c in columns) + " |")
    print("\n### every stream (mean of the streams' means), conformal at alpha 0.05\n")
    print("| score | h_score | auroc |\n|---|---|---|")
    for score, metrics in report["ranking"].items():
        print(f"| {score} | {metrics['h_score']:.3f} | {metrics['auroc']:.3f} |")


def rank_scores(results: dict) -> dict:
    """Per score, best first: the AUROC and the H-score of ``<score>/conformal_0.05`` averaged over the streams.

    The AUROC ranks: it is the score's own separation of novel from known cells, whatever the threshold; the H-score
    also depends on `alpha` and, on pbmc68k, on 13 novel cells."""
    mean = lambda score, metric: float(
        np.mean(
            [content["summary"]["rules"][f"{score}/conformal_0.05"][metric]["mean"] for content in results.values()]
        )
    )
    ranking = {score: {"h_score": mean(score, "h_score"), "auroc": mean(score, "auroc")} for score in SCORES}
    return dict(sorted(ranking.items(), key=lambda item: -item[1]["auroc"]))


def summarise_values(values: list[float]) -> dict:
    """Mean and sample sd (None for one value)."""
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None}


if __name__ == "__main__":
    main()

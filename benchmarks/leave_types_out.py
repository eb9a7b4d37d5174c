"""Novel-cell detection with every known type in turn withheld from training: the leave-types-out protocol.

Usage::

    .venv/bin/python benchmarks/leave_types_out.py            # -> benchmarks/results/leave_types_out.json
    .venv/bin/python benchmarks/leave_types_out.py --rescore  # the saved models scored again (no training)
    .venv/bin/python benchmarks/leave_types_out.py --quick    # 2 types, 1 seed, 2 epochs -> temp file

Each stream's single novel type (13 CD34+ cells on pbmc68k) makes the H-score swing by 0.4 between seeds. Here each
type of a stream is in turn the novel type: the stream is rebuilt without it (the same stages, splits and bank
rules as ``continual_stream.py``: ``pbmc68k_stream(novel_types=[type])``, ``zeisel_stream("class", novel=type)``),
CANAL is trained on it from random weights with ``train()``'s defaults (:func:`scanpy_canal._demo.run_stream`), and
the final model annotates the held-out cells of every stage plus every cell of the withheld type. ``synthetic`` has
one novel type of its own (it cannot be withheld: the generator makes it).

Every novelty score (``scanpy_canal.model._scores.SCORES``: their conformal p-values from one pass) and the fusions
of :data:`FUSIONS` under both fusion rules (``"scaled"``: the largest score on the bank's scale, calibrated;
``"bonferroni"``: ``m`` times the smallest p-value), as ``predict`` computes them. Per (score, rule): AUROC of the
score (of one minus the fused p-value),
unknown recall and known rejection at ``alpha`` 0.05 (the share of the withheld / the known cells unassigned),
known accuracy (a known cell counts if assigned its right type) and the H-score; then mean and sd over types and
seeds, for all types and apart for the **distant** and **close** types (:data:`CLOSE_TYPES`: a type is close when a
type of its own lineage is still trained on, fixed before any run).

The input score is also computed with other settings (:data:`INPUT_VARIANTS`) from each model's own input space, and
in the model's input space refitted with its genes centred or standardised (each of ``CANAL(input_space=...)``, to
choose it by measurement): ``fit_reference`` on the last stage's cells but its calibration cells and on the bank,
seeded, as the model fits it (the standardised refit is the model's own space, up to the calibration cells a full
quota dropped). Each run records the neighbour its model's input score uses (``input_neighbours``: it follows the
bank's smallest type) and the relations its model found (``relations_found``; these streams bring no coarser or
finer names, so none should be found), and each stream counts its ``runs_relating_types``.

Budget: on 2 shared cores a run takes 8 to 20 minutes (pbmc68k, and zeisel_class with :data:`ZEISEL_EPOCHS` epochs
per stage; ``train()`` allows 15, a Zeisel run then takes 10 to 15 minutes), so ``--seeds`` defaults to 0 and 1 on
pbmc68k and synthetic and zeisel_class runs the first seed only (about 50 minutes with ``--jobs 2``). On a GPU
machine (``CANAL_BENCHMARK_ACCELERATOR=gpu``, ``--jobs 6``) 32 runs took 4 minutes. The JSON records what ran. The
runs wait in a partial folder (``--resume``, ``--assemble``), and the models are kept under ``--models`` so that
``--rescore`` scores them again without training.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from continual_stream import CANAL_SETTINGS, STREAMS, canal_train_kwargs, set_threads
from harness import machine_info, worker_pool, write_report
from novelty import scored, summarise_values
from scipy import sparse
from zeisel import LEVELS, bank_shares, load_zeisel, zeisel_stream

import scanpy_canal as canal
from scanpy_canal._choices import INPUT_SPACES
from scanpy_canal._demo import run_stream
from scanpy_canal.model import PredictOptions
from scanpy_canal.model._conformal import conformal_pvalues, type_scale
from scanpy_canal.model._input_space import InputReference, fit_reference
from scanpy_canal.model._scores import SCORES

RESULTS = Path(__file__).resolve().parent / "results" / "leave_types_out.json"
ALPHA = 0.05
FUSIONS = (("input", "energy"), ("input", "mix"), ("input", "knn"), ("input", "mahalanobis"))
FUSION_RULES = ("scaled", "bonferroni")
#: Variants of the ``"input"`` score (principal components kept, neighbour whose distance is the score), computed
#: from each model's own input space and calibration cells, to choose the score's settings by measurement.
INPUT_VARIANTS = (
    *((components, k) for components in (10, 20, 30, 50) for k in (5, 15)),
    *((50, k) for k in (1, 3, 10, 30, 40)),
)
#: Epochs per stage and HVG panel on zeisel_class (the time budget: a Zeisel run of the continual benchmark, 1,000
#: genes and up to 15 epochs, takes 10 to 15 minutes alone); pbmc68k and synthetic keep train()'s default.
ZEISEL_EPOCHS = 5
ZEISEL_GENES = 300
#: Types that share a lineage with a type still trained on when withheld ("close"); the others are "distant".
CLOSE_TYPES = {
    "pbmc68k": [
        "CD4+/CD25 T Reg",
        "CD4+/CD45RA+/CD25- Naive T",
        "CD4+/CD45RO+ Memory",
        "CD8+ Cytotoxic T",
        "CD8+/CD45RA+ Naive Cytotoxic",
        "CD56+ NK",
        "CD14+ Monocyte",
        "Dendritic",
    ],
    "zeisel_class": ["interneurons", "pyramidal CA1", "pyramidal SS"],
    "synthetic": [],
}


def withheld_types(stream_name: str) -> list[str]:
    """Every type of the stream, each withheld in turn (synthetic: its own novel type)."""
    if stream_name == "pbmc68k":
        import scanpy as sc

        return sorted(sc.datasets.pbmc68k_reduced().obs["bulk_labels"].astype(str).unique())
    if stream_name == "zeisel_class":
        return sorted(load_zeisel().obs["class"].astype(str).unique())
    return STREAMS["synthetic"].build().novel_types


def build(stream_name: str, novel: str) -> tuple[canal.datasets.Stream, int]:
    """The stream without `novel` and its bank size (Zeisel: at most a third of the cells seen before a stage)."""
    if stream_name == "pbmc68k":
        return canal.datasets.pbmc68k_stream(novel_types=[novel], seed=0), STREAMS["pbmc68k"].rehearsal_size
    if stream_name == "zeisel_class":
        stream = zeisel_stream("class", novel=novel, rehearsal_size=1)
        largest = LEVELS["class"]["rehearsal_size"]
        shares = bank_shares(stream, 1)  # 1 / cells seen, per stage after the first
        return stream, min(largest, int(min(1 / share for share in shares) / 3))
    return STREAMS["synthetic"].build(), STREAMS["synthetic"].rehearsal_size


def score_model(model: canal.CANAL, stream: canal.datasets.Stream) -> dict:
    """Every single score and fusion at ``alpha`` 0.05 on the held-out cells plus the withheld type's cells."""
    known = ad.concat(stream.test)
    query = ad.concat([known, stream.novel])
    truth = query.obs[stream.labels_key].astype(str).to_numpy()
    is_novel = np.isin(truth, stream.novel_types)
    start = time.perf_counter()
    outputs = model.predict_outputs(query, PredictOptions(novel=True, score=SCORES, fusion="bonferroni"))
    seconds = time.perf_counter() - start
    closed = outputs.probabilities.idxmax(axis=1).to_numpy()
    rows = {}
    for name in SCORES:
        labels = np.where(outputs.pvalues[name] <= ALPHA, "Unassigned", closed).astype(object)
        rows[name] = scored(truth, labels, is_novel, known.n_obs, outputs.scores[name].to_numpy())
    for names in FUSIONS:
        for fusion in FUSION_RULES:
            fused = model.predict_outputs(query, PredictOptions(novel=True, score=names, fusion=fusion))
            labels = np.where(fused.pvalue <= ALPHA, "Unassigned", closed).astype(object)
            rows[f"{'+'.join(names)}/{fusion}"] = scored(truth, labels, is_novel, known.n_obs, fused.novelty_score)
    inputs = query_inputs(model, query, outputs.probabilities)
    variants = {f"input_pcs{c}_k{k}": value for (c, k), value in input_variants(model, *inputs).items()}
    for name, (scores, pvalues) in {**variants, **refitted_spaces(model, stream, *inputs)}.items():
        labels = np.where(pvalues <= ALPHA, "Unassigned", closed).astype(object)
        rows[name] = scored(truth, labels, is_novel, known.n_obs, scores)
    return {
        "closed_set_accuracy": float((closed[: known.n_obs] == truth[: known.n_obs]).mean()),
        "n_known": int(known.n_obs),
        "n_novel": int(is_novel.sum()),
        "calibration_cells": int(model.calibration_cells_.n_obs),
        "input_neighbours": model.input_reference_.neighbours,
        "seconds_scoring_all": seconds,
        "rules": rows,
    }


def query_inputs(
    model: canal.CANAL, query: ad.AnnData, probabilities: pd.DataFrame
) -> tuple[sparse.csr_matrix, sparse.csr_matrix, torch.Tensor, torch.Tensor]:
    """The query's and the calibration cells' panel values, and the types the model predicts for each."""
    calibration = model.calibration_cells_
    predicted = torch.as_tensor(probabilities.to_numpy().argmax(axis=1))
    calibration_probabilities = model.predict_outputs(calibration, PredictOptions()).probabilities
    calibration_predicted = torch.as_tensor(calibration_probabilities.to_numpy().argmax(axis=1))
    x = sparse.csr_matrix(canal.pp.align_genes(query, model.genes).X)
    return x, sparse.csr_matrix(calibration.X), predicted, calibration_predicted


def input_variants(
    model: canal.CANAL, x, calibration_x, predicted: torch.Tensor, calibration_predicted: torch.Tensor
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Each :data:`INPUT_VARIANTS`' scores of the query `x` and their conformal p-values (per predicted type, as
    ``predict``), from the first principal components of the model's input space (its axes are in decreasing order
    of variance, so the first ``c`` are the ``c``-component PCA)."""
    reference = model.input_reference_
    coordinates, calibration_coordinates = reference.project(x), reference.project(calibration_x)
    n, n_types = reference.components.shape[1], len(model.cell_types_)
    bank_codes = model._bank_cells(with_input=False)["codes"]

    def first(rows: torch.Tensor, components: int) -> torch.Tensor:
        """The first coordinates; standardised, with the distance to the smaller subspace as the last column."""
        if reference.scale is None:
            return rows[:, :components]
        residual = torch.sqrt(rows[:, n] ** 2 + (rows[:, components:n] ** 2).sum(dim=1))
        return torch.column_stack([rows[:, :components], residual])

    variants = {}
    for components, k in INPUT_VARIANTS:
        truncated = InputReference(
            reference.mean, reference.components[:, :components], first(reference.cells, components), reference.scale
        )
        scores, calibration_scores, bank_scores = (
            truncated.distance(first(rows, components), neighbours=k)
            for rows in (coordinates, calibration_coordinates, reference.cells)
        )
        scale = type_scale(bank_scores, bank_codes, n_types)  # as predict groups the rare types
        pvalues = conformal_pvalues(scores, predicted, calibration_scores, calibration_predicted, n_types, scale)
        variants[components, k] = (scores.numpy(), pvalues.numpy())
    return variants


def refitted_spaces(
    model: canal.CANAL,
    stream: canal.datasets.Stream,
    x,
    calibration_x,
    predicted: torch.Tensor,
    calibration_predicted: torch.Tensor,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The input score of the query `x` in each of ``INPUT_SPACES``, refitted, and its conformal p-values."""
    last_stage = stream.train[-1][~stream.train[-1].obs_names.isin(model.calibration_cells_.obs_names)]
    cells = sparse.csr_matrix(canal.pp.align_genes(last_stage, model.genes).X)
    types = last_stage.obs[stream.labels_key].astype(str).to_numpy()
    n_types, bank_codes = len(model.cell_types_), model._bank_cells(with_input=False)["codes"]
    spaces = {}
    for space in INPUT_SPACES:
        reference = fit_reference(
            cells, types, model.example_bank_, seed=model.seed_ + model.stage_, standardise=space == "standardised"
        )
        scores, calibration_scores = (reference.distance(reference.project(cells)) for cells in (x, calibration_x))
        scale = type_scale(reference.distance(reference.cells), bank_codes, n_types)  # the bank: the reference cells
        pvalues = conformal_pvalues(scores, predicted, calibration_scores, calibration_predicted, n_types, scale)
        spaces[f"input_refit_{space}"] = (scores.numpy(), pvalues.numpy())
    return spaces


def run_task(task: tuple[str, str, int], args: argparse.Namespace) -> dict:
    """Train (or with ``--rescore`` load) one model and score it; kept in the partial folder for ``--resume``."""
    stream_name, novel, seed = task
    set_threads(args.threads)
    stream, bank = build(stream_name, novel)
    directory = args.models / stream_name / f"{novel.replace('/', '_')}_seed{seed}"
    start = time.perf_counter()
    if args.rescore:
        model = canal.CANAL.load(directory)
    else:
        epochs = args.epochs or (ZEISEL_EPOCHS if stream_name == "zeisel_class" else None)
        kwargs = {**canal_train_kwargs(epochs), "rehearsal_size": bank}
        genes = args.zeisel_genes if stream_name == "zeisel_class" else STREAMS[stream_name].n_top_genes
        prefix = f"[{stream_name} without {novel} seed {seed}]"
        result = run_stream(
            stream, arch=CANAL_SETTINGS["arch"], n_top_genes=genes, seed=seed, novel=False,
            log=lambda line: print(prefix, line, flush=True), **kwargs,
        )  # fmt: skip
        model = result.model
        model.save(directory, overwrite=True)
    run = {"stream": stream_name, "novel": novel, "seed": seed, "rehearsal_size": bank, **score_model(model, stream)}
    run["relations_found"] = {
        child: parent for record in model.stage_history_ for child, parent in record["new_parents"].items()
    }
    run["seconds"] = time.perf_counter() - start
    fused = run["rules"][f"{'+'.join(FUSIONS[0])}/{FUSION_RULES[0]}"]
    print(f"[{stream_name} without {novel} seed {seed}] auroc {fused['auroc']:.3f} h {fused['h_score']:.3f}")
    partial = partial_dir(args.output) / stream_name / f"{novel.replace('/', '_')}_seed{seed}.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text(json.dumps(run))
    return run


def partial_dir(output: Path) -> Path:
    return Path(tempfile.gettempdir()) / f"{output.stem}_partial"


def summarise(runs: list[dict]) -> dict:
    """Mean and sd over runs (types and seeds) of every metric of every rule; all types, distant, close."""
    summary = {}
    for group in ("all", "distant", "close"):
        chosen = [
            run
            for run in runs
            if group == "all" or (run["novel"] in CLOSE_TYPES.get(run["stream"], [])) == (group == "close")
        ]
        if not chosen:
            continue
        rules = chosen[0]["rules"]
        summary[group] = {
            "runs": len(chosen),
            "types": sorted({run["novel"] for run in chosen}),
            "rules": {
                rule: {
                    metric: summarise_values([run["rules"][rule][metric] for run in chosen]) for metric in rules[rule]
                }
                for rule in rules
            },
        }
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", nargs="+", default=["zeisel_class", "pbmc68k", "synthetic"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--zeisel-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--types", nargs="+", default=None, help="withhold only these types (default: each type)")
    parser.add_argument("--zeisel-genes", type=int, default=ZEISEL_GENES, help="HVG panel on zeisel_class")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per stage for every stream")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="reuse the runs completed so far")
    parser.add_argument("--assemble", action="store_true", help="write the report from the runs completed so far")
    parser.add_argument("--rescore", action="store_true", help="score the saved models again, training nothing")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "leave_types_out_models")
    parser.add_argument("--quick", action="store_true", help="2 types of pbmc68k, 1 seed, 2 epochs, temp output")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.seeds, args.epochs = ["pbmc68k"], [0], 2
    args.output = args.output or (Path(tempfile.gettempdir()) / "leave_types_out_quick.json" if args.quick else RESULTS)
    return args


def tasks_of(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    tasks = []
    for name in args.streams:
        types = withheld_types(name)[:2] if args.quick else withheld_types(name)
        if args.types is not None:  # in the order given
            types = [novel for novel in args.types if novel in types]
        seeds = args.zeisel_seeds if name == "zeisel_class" else args.seeds
        tasks += [(name, novel, seed) for seed in seeds for novel in types]
    return tasks


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    tasks = tasks_of(args)
    runs = {}
    if args.resume or args.assemble:
        for task in tasks:
            path = partial_dir(args.output) / task[0] / f"{task[1].replace('/', '_')}_seed{task[2]}.json"
            if path.exists():
                runs[task] = json.loads(path.read_text())
    if not args.assemble:
        with worker_pool(args.jobs) as pool:
            futures = {task: pool.submit(run_task, task, args) for task in tasks if task not in runs}
            runs.update({task: future.result() for task, future in futures.items()})
    report = {
        "machine": machine_info(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "zeisel_epochs": args.epochs or ZEISEL_EPOCHS,
        "zeisel_genes": args.zeisel_genes,
        "canal_settings": CANAL_SETTINGS,
        "alpha": ALPHA,
        "close_types": CLOSE_TYPES,
        "results": {},
    }
    for name in args.streams:
        done = [runs[task] for task in tasks if task[0] == name and task in runs]
        if done:
            relating = sum(bool(run.get("relations_found")) for run in done)
            report["results"][name] = {"runs": done, "runs_relating_types": relating, "summary": summarise(done)}
    report["seconds_total"] = time.perf_counter() - start
    write_report(report, args.output)
    print_tables(report)
    print(f"\nwrote {args.output} ({report['seconds_total'] / 60:.1f} min)")
    return report


def print_tables(report: dict) -> None:
    """Per stream and group, as Markdown: every rule, mean ± sd over types and seeds."""
    columns = ["auroc", "unknown_recall", "known_rejection", "known_accuracy", "h_score"]
    for stream, content in report["results"].items():
        for group, summary in content["summary"].items():
            print(f"\n### {stream}, {group} types ({summary['runs']} runs: {', '.join(summary['types'])})\n")
            print("| score | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
            for rule, metrics in summary["rules"].items():
                cells = [f"{metrics[c]['mean']:.3f} ± {metrics[c]['sd'] or 0:.3f}" for c in columns]
                print(f"| {rule} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

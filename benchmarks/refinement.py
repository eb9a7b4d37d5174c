"""Labels that refine across stages: CANAL's cell-type tree against logistic regression, on pbmc68k.

Usage::

    .venv/bin/python benchmarks/refinement.py                 # -> benchmarks/results/refinement.json
    .venv/bin/python benchmarks/refinement.py --seeds 0 --epochs 2 --output /tmp/refinement.json   # a quick look

The refinement stream (:func:`refinement_stream`, fixed; the seeds change the models only): pbmc68k's cells
(``scanpy.datasets.pbmc68k_reduced``, CD34+ left out), 30% of each type held out for the test. The T cells are
named ``"CD4+ T"`` (pbmc68k's three CD4+ subsets) or ``"CD8+ T"`` (its two CD8+ subsets). Stage 1 trains on half of
the training T cells, all named ``"T cell"``, with the B and NK cells; stage 2 on the other half with their fine
names, with the monocytes and dendritic cells. The test has every type under its fine name.

Methods, scored on the test after stage 2:

- ``canal_tree``: CANAL at its defaults: relations found from the data (``parents="find"``);
- ``canal_ontology``: the same with the labels' Cell Ontology ids registered (``setup_anndata(...,
  ontology_key=...)``, :data:`CELL_ONTOLOGY`): the relations come from the Cell Ontology (needs
  ``scanpy-canal[ontology]``);
- ``canal_flat``: the same with ``parents={}``: every name its own class, as before the tree;
- ``lr_drop_coarse``: logistic regression on both stages' cells, the cells named ``"T cell"`` thrown away;
- ``lr_coarse_class``: logistic regression on both stages' cells, ``"T cell"`` a class of its own.

Reported: ``refined_accuracy`` (test CD4+/CD8+ T cells called their fine name), ``left_coarse`` (the share of them
called ``"T cell"``), ``unrelated_called_coarse`` (the share of the other test cells called ``"T cell"``) and
``accuracy`` (all test cells, fine names). For ``canal_tree`` also the relations found with their evidence (the
shares of each new type's cells the stage-1 model called each known type) and the scores at other
``refine_threshold`` values (from the same probabilities).

The coarse stream: the same two stages the other way round, so that the coarse name comes
after the fine ones (stage 1: CD4+ T, CD8+ T, monocytes, dendritic cells; stage 2: ``"T cell"``, B, NK), with
``coarse_tree`` (defaults: ``"T cell"`` should be found the parent of CD4+ T and CD8+ T) and ``coarse_flat``
(``parents={}``), scored the same way.

Streams without refinements (``plain_pbmc68k``, ``plain_synthetic``): the ``pbmc68k`` and ``synthetic`` streams of
``benchmarks/continual_stream.py`` (3 class-incremental stages each), CANAL at its defaults against ``parents={}``:
the relations found with their evidence, and the accuracy on every stage's test cells after the last stage (the
same model when no relation is found: finding leaves the random state as it was).

Every CANAL run starts from random weights: the demo's encoder (dim 32, 2 blocks), a panel of 300 HVGs of stage 1,
``train``'s defaults for a random start, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from continual_stream import STREAMS
from sklearn.linear_model import LogisticRegression

import scanpy_canal as canal
from scanpy_canal._demo import DEMO_ARCH
from scanpy_canal.datasets._pbmc import _load_normalized
from scanpy_canal.datasets._stream import split_stratified
from scanpy_canal.model._tree import decode

RESULTS = Path(__file__).resolve().parent / "results" / "refinement.json"
COARSE = "T cell"
FINE = {
    "CD4+/CD25 T Reg": "CD4+ T",
    "CD4+/CD45RA+/CD25- Naive T": "CD4+ T",
    "CD4+/CD45RO+ Memory": "CD4+ T",
    "CD8+ Cytotoxic T": "CD8+ T",
    "CD8+/CD45RA+ Naive Cytotoxic": "CD8+ T",
}
STAGE_1 = ("CD19+ B", "CD56+ NK")
STAGE_2 = ("CD14+ Monocyte", "Dendritic")
#: The Cell Ontology id of each name of the refinement stream (for ``canal_ontology``).
CELL_ONTOLOGY = {
    COARSE: "CL:0000084",
    "CD4+ T": "CL:0000624",
    "CD8+ T": "CL:0000625",
    "CD19+ B": "CL:0000236",
    "CD56+ NK": "CL:0000623",
    "CD14+ Monocyte": "CL:0001054",
    "Dendritic": "CL:0000451",
}
REFINE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
PLAIN_STREAMS = ("pbmc68k", "synthetic")


def refinement_stream() -> tuple[list[ad.AnnData], ad.AnnData]:
    """Two training stages (``obs["cell_type"]``; stage 1 names every T cell ``"T cell"``) and the test cells."""
    import scanpy as sc

    adata = _load_normalized(sc.datasets.pbmc68k_reduced())
    labels = adata.obs["bulk_labels"].astype(str)
    adata = adata[(labels != "CD34+").to_numpy()].copy()
    adata.obs["cell_type"] = pd.Categorical(adata.obs["bulk_labels"].astype(str).replace(FINE))
    train, test = split_stratified(adata, "cell_type", test_size=0.3, seed=0)
    is_t = train.obs["cell_type"].isin(set(FINE.values())).to_numpy()
    rng = np.random.default_rng(0)
    early_t = np.zeros(train.n_obs, dtype=bool)
    early_t[rng.choice(np.flatnonzero(is_t), size=is_t.sum() // 2, replace=False)] = True
    in_first = early_t | train.obs["cell_type"].isin(STAGE_1).to_numpy()
    in_second = (is_t & ~early_t) | train.obs["cell_type"].isin(STAGE_2).to_numpy()
    first, second = train[in_first].copy(), train[in_second].copy()
    names = first.obs["cell_type"].astype(str).to_numpy()
    names[early_t[in_first]] = COARSE
    first.obs["cell_type"] = pd.Categorical(names)
    second.obs["cell_type"] = pd.Categorical(second.obs["cell_type"].astype(str))
    return [first, second], test


def scores(truth: np.ndarray, called: np.ndarray) -> dict[str, float]:
    """The four scores of the module docstring."""
    refined = np.isin(truth, list(set(FINE.values())))
    return {
        "refined_accuracy": float(np.mean(called[refined] == truth[refined])),
        "left_coarse": float(np.mean(called[refined] == COARSE)),
        "unrelated_called_coarse": float(np.mean(called[~refined] == COARSE)),
        "accuracy": float(np.mean(called == truth)),
    }


def train_canal(
    stages: list[ad.AnnData], seed: int, epochs: int | None, *, ontology: bool = False, **train_kwargs
) -> canal.CANAL:
    """A CANAL model trained stage by stage on copies of `stages`; with `ontology`, the labels' Cell Ontology ids are
    registered (:data:`CELL_ONTOLOGY`)."""
    stages = [stage.copy() for stage in stages]
    ontology_key = "cell_type_ontology_term_id" if ontology else None
    for stage in stages:
        if ontology:
            stage.obs[ontology_key] = stage.obs["cell_type"].astype(str).map(CELL_ONTOLOGY)
        canal.CANAL.setup_anndata(stage, labels_key="cell_type", ontology_key=ontology_key)
    model = canal.CANAL(stages[0], n_top_genes=300, seed=seed, **DEMO_ARCH)
    quiet = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}
    for number, stage in enumerate(stages):
        model.train(None if number == 0 else stage, max_epochs=epochs, **quiet, **train_kwargs)
    return model


def canal_tree(stages, test, seed, epochs) -> dict:
    model = train_canal(stages, seed, epochs)
    truth = test.obs["cell_type"].astype(str).to_numpy()
    probabilities = model.predict(test, soft=True).to_numpy()
    by_threshold = {}
    for threshold in REFINE_THRESHOLDS:
        called, _ = decode(probabilities, model.cell_type_parents_, model.cell_types, refine_threshold=threshold)
        by_threshold[str(threshold)] = scores(truth, called)
    return {
        **scores(truth, model.predict(test)),
        "new_parents": model.stage_history_[-1]["new_parents"],
        "relation_evidence": model.stage_history_[-1]["relation_evidence"],
        "by_refine_threshold": by_threshold,
    }


def canal_ontology(stages, test, seed, epochs) -> dict:
    model = train_canal(stages, seed, epochs, ontology=True)
    return {
        **scores(test.obs["cell_type"].astype(str).to_numpy(), model.predict(test)),
        "new_parents": model.stage_history_[-1]["new_parents"],
    }


def canal_flat(stages, test, seed, epochs) -> dict:
    model = train_canal(stages, seed, epochs, parents={})
    return scores(test.obs["cell_type"].astype(str).to_numpy(), model.predict(test))


def logistic_regression(stages, test, *, drop_coarse: bool) -> dict:
    cells = ad.concat(stages)
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    keep = labels != COARSE if drop_coarse else np.ones(len(labels), dtype=bool)
    classifier = LogisticRegression(max_iter=1000).fit(cells.X[keep], labels[keep])
    return scores(test.obs["cell_type"].astype(str).to_numpy(), classifier.predict(test.X))


def plain_stream(name: str, seed: int, epochs: int | None) -> dict:
    """CANAL at its defaults and with ``parents={}`` on the class-incremental stream `name` of :data:`STREAMS`."""
    stream = STREAMS[name].build()
    test = ad.concat(stream.test)
    truth = test.obs["cell_type"].astype(str).to_numpy()
    found = train_canal(stream.train, seed, epochs)
    run = {
        "new_parents": [record["new_parents"] for record in found.stage_history_],
        "relation_evidence": [record["relation_evidence"] for record in found.stage_history_],
        "accuracy_defaults": float(np.mean(found.predict(test) == truth)),
    }
    if any(run["new_parents"]):  # otherwise parents={} trains the very same model
        flat = train_canal(stream.train, seed, epochs, parents={})
        run["accuracy_flat"] = float(np.mean(flat.predict(test) == truth))
    else:
        run["accuracy_flat"] = run["accuracy_defaults"]
    return run


def summarise(runs: list[dict]) -> dict:
    """Mean and sd over seeds of every numeric score."""
    keys = [key for key, value in runs[0].items() if isinstance(value, float)]
    return {
        key: {"mean": float(np.mean([r[key] for r in runs])), "sd": float(np.std([r[key] for r in runs]))}
        for key in keys
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="max_epochs (default: train's, 15 from random)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--part",
        choices=["all", "refinement", "coarse", "plain"],
        default="all",
        help="run only the refinement stream, the coarse stream or the streams without refinements",
    )
    args = parser.parse_args()
    stages, test = refinement_stream()
    streams = {"refinement": (stages, test), "coarse": (stages[::-1], test)}  # coarse: the coarse name comes after
    methods = {
        "refinement": (("canal_tree", canal_tree), ("canal_ontology", canal_ontology), ("canal_flat", canal_flat)),
        "coarse": (("coarse_tree", canal_tree), ("coarse_flat", canal_flat)),
    }
    report = {
        "settings": {"seeds": args.seeds, "epochs": args.epochs, "arch": DEMO_ARCH, "n_top_genes": 300},
        "stream": {
            "stage_cells": [stage.obs["cell_type"].value_counts().to_dict() for stage in stages],
            "test_cells": test.obs["cell_type"].value_counts().to_dict(),
        },
        "results": {
            "lr_drop_coarse": logistic_regression(stages, test, drop_coarse=True),
            "lr_coarse_class": logistic_regression(stages, test, drop_coarse=False),
        },
        "runs": {
            **{name: [] for part_methods in methods.values() for name, _ in part_methods},
            **{f"plain_{name}": [] for name in PLAIN_STREAMS},
        },
    }
    started = time.perf_counter()
    for seed in args.seeds:  # seed by seed, so that a report cut short holds whole seeds
        for part, part_methods in methods.items():
            for name, method in part_methods * (args.part in ("all", part)):
                report["runs"][name].append({"seed": seed, **method(*streams[part], seed, args.epochs)})
                report["results"][name] = summarise(report["runs"][name])
                write(report, args.output, started)
        if args.part not in ("all", "plain"):
            continue
        for name in PLAIN_STREAMS:
            report["runs"][f"plain_{name}"].append({"seed": seed, **plain_stream(name, seed, args.epochs)})
            report["results"][f"plain_{name}"] = summarise(report["runs"][f"plain_{name}"])
            write(report, args.output, started)


def write(report: dict, output: Path, started: float) -> None:
    """Write the report so far (each seed adds to it), with the minutes it has taken."""
    report["minutes"] = round((time.perf_counter() - started) / 60, 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    print(f"{report['minutes']} min: {json.dumps(report['results'])}", flush=True)


if __name__ == "__main__":
    main()

"""Run a whole continual stream: train stage by stage, test every stage's held-out cells after each stage."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from scanpy_canal.datasets import Stream
from scanpy_canal.tl import continual_metrics, evaluate

#: A small encoder that trains a stream on a laptop CPU in minutes.
DEMO_ARCH = {"dim": 32, "depth": 2, "heads": 4, "dim_head": 16}


@dataclass
class StreamResult:
    """Metric matrices (stage trained x test set) and the final metrics of a stream.

    ``accuracy`` and ``macro_f1`` score the closed-set labels; ``accuracy_novel`` scores the labels with novel-cell
    detection, where a known cell called ``"Unassigned"`` counts as wrong.
    """

    accuracy: pd.DataFrame
    macro_f1: pd.DataFrame
    accuracy_novel: pd.DataFrame
    final: dict[str, float]
    seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready content: the matrices as nested lists (None above the diagonal) and the final metrics."""

        def matrix(frame: pd.DataFrame) -> dict:
            values = [[None if np.isnan(v) else float(v) for v in row] for row in frame.to_numpy()]
            return {"rows": list(frame.index), "columns": list(frame.columns), "values": values}

        return {
            "accuracy": matrix(self.accuracy),
            "macro_f1": matrix(self.macro_f1),
            "accuracy_novel": matrix(self.accuracy_novel),
            "final": self.final,
            "seconds_per_stage": self.seconds,
        }

    def report(self) -> str:
        """A plain-text summary."""

        def table(frame: pd.DataFrame) -> str:
            return frame.to_string(float_format=lambda v: f"{v:.3f}", na_rep="-")

        return "\n".join(
            [
                "Accuracy after each stage (rows) on each stage's held-out cells (columns):",
                table(self.accuracy),
                "",
                "The same with novel-cell detection ('Unassigned' counts as wrong):",
                table(self.accuracy_novel),
                "",
                "Final: " + ", ".join(f"{key} {value:.4f}" for key, value in self.final.items()),
                "Seconds per stage: " + ", ".join(f"{s:.0f}" for s in self.seconds),
            ]
        )


def run_stream(
    stream: Stream,
    *,
    arch: dict[str, Any] | None = None,
    n_top_genes: int | None = None,
    seed: int = 0,
    novel: bool = True,
    log: Callable[[str], None] = print,
    **train_kwargs: Any,
) -> StreamResult:
    """Train a CANAL model on every stage of `stream` and evaluate it after each stage.

    Parameters
    ----------
    stream
        The stages, their held-out cells, and optionally cells of never-trained types.
    arch
        Encoder architecture (default :data:`DEMO_ARCH`).
    n_top_genes
        Gene panel: this many highly variable genes of the first stage (default: all genes).
    seed
        Model seed.
    novel
        Also predict with novel-cell detection, after every stage and on the final query with the novel cells.
    log
        Receives one line per stage.
    **train_kwargs
        Passed to :meth:`~scanpy_canal.CANAL.train`.

    Returns
    -------
    The metric matrices, and final ``acc``, ``bwt``, ``forgetting`` (from the closed-set accuracy matrix),
    ``macro_f1``, ``ari`` (closed set, all held-out cells) and, with `novel` and novel cells in the stream,
    ``known_accuracy``, ``unknown_accuracy``, ``h_score`` and ``total_accuracy`` (held-out plus novel cells).
    """
    from scanpy_canal.model import CANAL

    names = [f"stage {t + 1}" for t in range(stream.n_stages)]
    accuracy = pd.DataFrame(np.nan, index=names, columns=names)
    macro_f1, accuracy_novel = accuracy.copy(), accuracy.copy()
    seconds = []
    model = None
    for t, data in enumerate(stream.train):
        data = data.copy()
        CANAL.setup_anndata(data, labels_key=stream.labels_key)
        start = time.perf_counter()
        if model is None:
            model = CANAL(data, n_top_genes=n_top_genes, seed=seed, **(arch or DEMO_ARCH))
            model.train(**train_kwargs)
        else:
            model.train(data, **train_kwargs)
        seconds.append(time.perf_counter() - start)
        for j, test in enumerate(stream.test[: t + 1]):
            truth = test.obs[stream.labels_key]
            outputs = model._predict_outputs(test, novel=novel)  # one forward pass: closed-set and novel labels
            scores = evaluate(truth, outputs.probabilities.idxmax(axis=1))
            accuracy.iloc[t, j], macro_f1.iloc[t, j] = scores["accuracy"], scores["macro_f1"]
            if novel:
                accuracy_novel.iloc[t, j] = evaluate(truth, outputs.labels)["accuracy"]
        log(
            f"stage {t + 1}/{stream.n_stages}: {data.n_obs} cells, {len(model.cell_types)} types known, "
            f"{seconds[-1]:.0f} s, mean held-out accuracy {np.nanmean(accuracy.iloc[t]):.3f}"
        )
    final = continual_metrics(accuracy.to_numpy())
    held_out = ad.concat(stream.test)
    with_novel = novel and stream.novel is not None
    query = ad.concat([held_out, stream.novel]) if with_novel else held_out
    outputs = model._predict_outputs(query, novel=novel)
    closed = outputs.probabilities.idxmax(axis=1).to_numpy()[: held_out.n_obs]
    scores = evaluate(held_out.obs[stream.labels_key], closed)
    final.update(macro_f1=scores["macro_f1"], ari=scores["ari"])
    if with_novel:
        scores = evaluate(query.obs[stream.labels_key], outputs.labels, novel_types=stream.novel_types)
        final.update({key: scores[key] for key in ("known_accuracy", "unknown_accuracy", "h_score")})
        final["total_accuracy"] = scores["accuracy"]
    return StreamResult(
        accuracy=accuracy, macro_f1=macro_f1, accuracy_novel=accuracy_novel, final=final, seconds=seconds
    )

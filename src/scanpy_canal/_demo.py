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
    """Accuracy and macro-F1 matrices (stage trained x test set) and the final metrics of a stream."""

    accuracy: pd.DataFrame
    macro_f1: pd.DataFrame
    final: dict[str, float]
    seconds: list[float] = field(default_factory=list)

    def report(self) -> str:
        """A plain-text summary."""
        lines = [
            "Accuracy after each stage (rows) on each stage's held-out cells (columns):",
            self.accuracy.to_string(float_format=lambda v: f"{v:.3f}", na_rep="-"),
            "",
            "Final: " + ", ".join(f"{key} {value:.4f}" for key, value in self.final.items()),
            "Seconds per stage: " + ", ".join(f"{s:.0f}" for s in self.seconds),
        ]
        return "\n".join(lines)


def run_stream(
    stream: Stream,
    *,
    arch: dict[str, Any] | None = None,
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
    seed
        Model seed.
    novel
        Predict with novel-cell detection (an ``"Unassigned"`` call on a known cell counts as wrong).
    log
        Receives one line per stage.
    **train_kwargs
        Passed to :meth:`~scanpy_canal.CANAL.train`.

    Returns
    -------
    The accuracy and macro-F1 matrices, and final ``acc``, ``bwt``, ``forgetting``, ``macro_f1``, ``ari`` and, when
    the stream has novel cells, ``known_accuracy``, ``unknown_accuracy`` and ``h_score``.
    """
    from scanpy_canal.model import CANAL

    names = [f"stage {t + 1}" for t in range(stream.n_stages)]
    accuracy = pd.DataFrame(np.nan, index=names, columns=names)
    macro_f1 = accuracy.copy()
    seconds = []
    model = None
    for t, data in enumerate(stream.train):
        data = data.copy()
        CANAL.setup_anndata(data, labels_key=stream.labels_key)
        start = time.perf_counter()
        if model is None:
            model = CANAL(data, seed=seed, **(arch or DEMO_ARCH))
            model.train(**train_kwargs)
        else:
            model.train(data, **train_kwargs)
        seconds.append(time.perf_counter() - start)
        for j, test in enumerate(stream.test[: t + 1]):
            scores = evaluate(test.obs[stream.labels_key], model.predict(test, novel=novel))
            accuracy.iloc[t, j], macro_f1.iloc[t, j] = scores["accuracy"], scores["macro_f1"]
        log(
            f"stage {t + 1}/{stream.n_stages}: {data.n_obs} cells, {len(model.cell_types)} types known, "
            f"{seconds[-1]:.0f} s, mean held-out accuracy {np.nanmean(accuracy.iloc[t]):.3f}"
        )
    final = continual_metrics(accuracy.to_numpy())
    query = ad.concat([*stream.test, *([stream.novel] if stream.novel is not None else [])])
    predicted = model.predict(query, novel=novel)
    scores = evaluate(query.obs[stream.labels_key], predicted, novel_types=stream.novel_types or None)
    final.update({key: value for key, value in scores.items() if key != "accuracy"})
    final["total_accuracy"] = scores["accuracy"]
    return StreamResult(accuracy=accuracy, macro_f1=macro_f1, final=final, seconds=seconds)

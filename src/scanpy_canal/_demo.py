"""Run a whole continual stream: train stage by stage, test every stage's held-out cells after each stage."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd

from scanpy_canal.datasets import Stream
from scanpy_canal.tl import continual_metrics, evaluate

if TYPE_CHECKING:
    from scanpy_canal.model import CANAL, Outputs, PredictOptions

#: A small encoder that trains a stream on a laptop CPU in minutes.
DEMO_ARCH = {"dim": 32, "depth": 2, "heads": 4, "dim_head": 16}
#: Pretraining settings of the demo's small encoder (a larger rate than scBERT's 1e-4 suits its size and short run).
DEMO_PRETRAINING = {"lr": 1e-3, "batch_size": 16}


@dataclass
class StreamResult:
    """Metric matrices (stage trained x test set) and the final metrics of a stream.

    ``accuracy`` and ``macro_f1`` score the closed-set labels; ``accuracy_novel`` scores the labels with novel-cell
    detection, where a known cell called ``"Unassigned"`` counts as wrong. ``model`` is the model after the last
    stage (not part of :meth:`to_dict`).
    """

    accuracy: pd.DataFrame
    macro_f1: pd.DataFrame
    accuracy_novel: pd.DataFrame
    final: dict[str, float]
    seconds: list[float] = field(default_factory=list)
    pretraining: pd.DataFrame | None = None
    model: Any = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready content: the matrices as nested lists (None above the diagonal) and the final metrics."""

        def matrix(frame: pd.DataFrame) -> dict:
            values = [[None if np.isnan(v) else float(v) for v in row] for row in frame.to_numpy()]
            return {"rows": list(frame.index), "columns": list(frame.columns), "values": values}

        content = {
            "accuracy": matrix(self.accuracy),
            "macro_f1": matrix(self.macro_f1),
            "accuracy_novel": matrix(self.accuracy_novel),
            "final": self.final,
            "seconds_per_stage": self.seconds,
        }
        if self.pretraining is not None:
            content["pretraining"] = self.pretraining.to_dict(orient="list")
        return content

    def report(self) -> str:
        """A plain-text summary."""

        def table(frame: pd.DataFrame) -> str:
            return frame.to_string(float_format=lambda v: f"{v:.3f}", na_rep="-")

        lines = []
        if self.pretraining is not None:
            accuracy = final_masked_accuracy(self.pretraining)
            lines += [f"Pretraining: {len(self.pretraining)} epochs, masked-token accuracy {accuracy:.3f}", ""]
        return "\n".join(
            lines
            + [
                "Accuracy after each stage (rows) on each stage's held-out cells (columns):",
                table(self.accuracy),
                "",
                "The same with novel-cell detection ('Unassigned' counts as wrong):",
                table(self.accuracy_novel),
                "",
                "Final: " + ", ".join(f"{key} {value:.4f}" for key, value in self.final.items()),
                "Seconds per stage: " + ", ".join(f"{s:.0f}" for s in self.seconds),
                *self._novel_line(),
            ]
        )

    def _novel_line(self) -> list[str]:
        """The line that says how many never-seen cells were found, if the stream had some."""
        if "h_score" not in self.final:
            return []
        final = self.final
        return [
            f"Novel cells found: {final['unknown_accuracy']:.0%} of the never-seen cells unassigned, "
            f"{final['known_rejection']:.1%} of the known cells (at most alpha = 5% promised); "
            f"H-score {final['h_score']:.3f}"
        ]


#: What a fit returns: cells -> their closed-set labels, or (closed-set labels, labels with novel-cell detection).
Predictor = Callable[[ad.AnnData], "np.ndarray | tuple[np.ndarray, np.ndarray]"]
#: One row of a stream run: how many stages the fit has seen, and the fit, which trains and returns a predictor.
Row = tuple[int, Callable[[], Predictor]]


def run_stages(stream: Stream, rows: Sequence[Row], *, log: Callable[[str], None] | None = None) -> StreamResult:
    """Fit a model stage by stage and score it on the held-out cells of every stage it has seen.

    The one loop of every stream run: :func:`run_stream` (CANAL) and the benchmarks' peers.

    Parameters
    ----------
    stream
        The stream whose ``test`` sets are scored.
    rows
        ``(stages seen, fit)`` per row of the matrices; rows not given stay NaN, and so does what depends on them
        (e.g. BWT when only the last stage is fitted).
    log
        Receives one line per row.

    Returns
    -------
    The matrices (``accuracy_novel`` NaN where the predictor gives closed-set labels only), the seconds each fit took
    and the final ``acc``, ``bwt``, ``forgetting``, ``macro_f1`` and ``ari`` (of all held-out cells seen, pooled).
    """
    names = [f"stage {t + 1}" for t in range(stream.n_stages)]
    accuracy = pd.DataFrame(np.nan, index=names, columns=names)
    macro_f1, accuracy_novel, seconds = accuracy.copy(), accuracy.copy(), []
    for n_seen, fit in rows:
        start = time.perf_counter()
        predict = fit()
        seconds.append(time.perf_counter() - start)
        tests = stream.test[:n_seen]
        closed, novel = _labels(predict(ad.concat(tests)))
        bounds = np.cumsum([0] + [test.n_obs for test in tests])
        for j, test in enumerate(tests):
            truth, cells = test.obs[stream.labels_key], slice(bounds[j], bounds[j + 1])
            scores = evaluate(truth, closed[cells])
            accuracy.iloc[n_seen - 1, j], macro_f1.iloc[n_seen - 1, j] = scores["accuracy"], scores["macro_f1"]
            if novel is not None:
                accuracy_novel.iloc[n_seen - 1, j] = evaluate(truth, novel[cells])["accuracy"]
        if log is not None:
            mean = np.nanmean(accuracy.iloc[n_seen - 1])
            log(f"stage {n_seen}/{stream.n_stages}: {seconds[-1]:.0f} s, mean held-out accuracy {mean:.3f}")
    if len(rows) == stream.n_stages:
        final = continual_metrics(accuracy.to_numpy())
    else:  # fitted after the last stage only
        final = {"acc": float(accuracy.iloc[-1].mean()), "bwt": np.nan, "forgetting": np.nan}
    truth = np.concatenate([test.obs[stream.labels_key].astype(str).to_numpy() for test in tests])
    pooled = evaluate(truth, closed)
    final.update(macro_f1=pooled["macro_f1"], ari=pooled["ari"])
    return StreamResult(accuracy, macro_f1, accuracy_novel, final, seconds)


def _labels(predicted: np.ndarray | tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """A predictor's closed-set labels and, if it gives them, its labels with novel-cell detection."""
    closed, novel = predicted if isinstance(predicted, tuple) else (predicted, None)
    return np.asarray(closed, dtype=object), None if novel is None else np.asarray(novel, dtype=object)


def run_stream(
    stream: Stream,
    *,
    arch: dict[str, Any] | None = None,
    n_top_genes: int | None = None,
    seed: int = 0,
    novel: bool = True,
    pretrained: str | os.PathLike | None = None,
    pretrained_genes: Sequence[str] | str | os.PathLike | None = None,
    pretrain_epochs: int = 0,
    pretrain_kwargs: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    **train_kwargs: Any,
) -> StreamResult:
    """Train a CANAL model on every stage of `stream` and evaluate it after each stage (with :func:`run_stages`).

    Parameters
    ----------
    stream
        The stages, their held-out cells, and optionally cells of never-trained types.
    arch
        Encoder architecture (default: :data:`DEMO_ARCH`, or the pretrained encoder's).
    n_top_genes
        Gene panel: this many highly variable genes of the first stage (default: all genes).
    seed
        Model seed.
    novel
        Also predict with novel-cell detection, after every stage and on the final query with the novel cells.
    pretrained, pretrained_genes
        Weights that start the model (see :class:`~scanpy_canal.CANAL`).
    pretrain_epochs
        Without `pretrained`: pretrain the encoder for this many epochs (:func:`~scanpy_canal.pretrain`) on the
        training cells of every stage, without their labels (never on held-out or novel cells), over the gene panel;
        0 starts from random weights.
    pretrain_kwargs
        Further arguments of :func:`~scanpy_canal.pretrain` (default: :data:`DEMO_PRETRAINING`; accelerator and
        progress bar as in `train_kwargs`).
    model_kwargs
        Further arguments of :class:`~scanpy_canal.CANAL` (e.g. ``trainable_blocks``, ``gene_embedding``).
    log
        Receives one line per stage.
    **train_kwargs
        Passed to :meth:`~scanpy_canal.CANAL.train`.

    Returns
    -------
    The metric matrices, and final ``acc``, ``bwt``, ``forgetting`` (from the closed-set accuracy matrix),
    ``macro_f1``, ``ari`` (closed set, all held-out cells) and, with `novel` and novel cells in the stream,
    ``known_accuracy``, ``unknown_accuracy``, ``h_score``, ``total_accuracy`` (held-out plus novel cells) and
    ``novel_auroc`` (how well the novelty score ranks the novel cells above the held-out ones, whatever the threshold)
    and ``known_rejection`` (the share of held-out known cells unassigned).
    With pretraining, ``pretraining`` holds its per-epoch history.
    """
    from scanpy_canal.model import CANAL, PredictOptions

    options = PredictOptions(novel=novel)
    settings = {
        "n_top_genes": n_top_genes,
        "seed": seed,
        "pretrained": pretrained,
        "pretrained_genes": pretrained_genes,
        **(model_kwargs or {}),
    }
    progress = {"enable_progress_bar": train_kwargs.get("enable_progress_bar", True), "enable_model_summary": False}
    pretrain_kwargs = {
        **DEMO_PRETRAINING,
        "accelerator": train_kwargs.get("accelerator", "auto"),
        "trainer_kwargs": progress,
        **(pretrain_kwargs or {}),
    }
    model, pretraining = _initial_model(
        stream, settings, arch=arch, pretrain_epochs=pretrain_epochs, pretrain_kwargs=pretrain_kwargs, log=log
    )

    def fit(t: int) -> Predictor:
        data = None if t == 0 else stream.train[t].copy()
        if data is not None:
            CANAL.setup_anndata(data, labels_key=stream.labels_key)
        model.train(data, **train_kwargs)
        log(f"stage {t + 1}: {stream.train[t].n_obs} cells, {len(model.cell_types)} types known")
        return lambda cells: _closed_and_novel(model.predict_outputs(cells, options), novel)

    result = run_stages(stream, [(t + 1, lambda t=t: fit(t)) for t in range(stream.n_stages)], log=log)
    result.pretraining, result.model = pretraining, model
    if novel and stream.novel is not None:
        result.final.update(_novel_metrics(model, stream, options))
    return result


def _closed_and_novel(outputs: Outputs, novel: bool) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The closed-set labels of a model's outputs and, with `novel`, its labels with novel-cell detection."""
    closed = outputs.probabilities.idxmax(axis=1).to_numpy()
    return (closed, outputs.labels) if novel else closed


def _novel_metrics(model: CANAL, stream: Stream, options: PredictOptions) -> dict[str, float]:
    """How the final model finds the stream's novel cells among all held-out ones (see :func:`run_stream`)."""
    from sklearn.metrics import roc_auc_score

    held_out = ad.concat(stream.test)
    query = ad.concat([held_out, stream.novel])
    outputs = model.predict_outputs(query, options)
    scores = evaluate(query.obs[stream.labels_key], outputs.labels, novel_types=stream.novel_types)
    metrics = {key: scores[key] for key in ("known_accuracy", "unknown_accuracy", "h_score")}
    metrics["known_rejection"] = float(np.mean(outputs.labels[: held_out.n_obs] == "Unassigned"))
    metrics["total_accuracy"] = scores["accuracy"]
    is_novel = query.obs[stream.labels_key].isin(stream.novel_types).to_numpy()
    metrics["novel_auroc"] = float(roc_auc_score(is_novel, outputs.novelty_score))
    return metrics


def _initial_model(
    stream: Stream,
    settings: dict[str, Any],
    *,
    arch: dict[str, Any] | None,
    pretrain_epochs: int,
    pretrain_kwargs: dict[str, Any],
    log: Callable[[str], None],
):
    """The untrained model on the first stage's cells, started from given, freshly pretrained or random weights."""
    from scanpy_canal.model import CANAL, highly_variable_genes, pretrain

    if pretrain_epochs < 0:
        raise ValueError(f"pretrain_epochs must be 0 or more, got {pretrain_epochs}.")
    if settings["pretrained"] is not None and pretrain_epochs > 0:
        raise ValueError("Give either pretrained weights or pretrain_epochs, not both.")
    first = stream.train[0].copy()
    CANAL.setup_anndata(first, labels_key=stream.labels_key)
    if pretrain_epochs == 0:
        default = {} if settings["pretrained"] is not None else DEMO_ARCH  # a pretrained encoder has its own
        return CANAL(first, **settings, **(default if arch is None else arch)), None
    arch = arch or DEMO_ARCH
    n_top_genes = settings["n_top_genes"]
    panel = highly_variable_genes(first.X, first.var_names, n_top_genes) if n_top_genes else list(first.var_names)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        history = pretrain(
            ad.concat(stream.train),
            os.path.join(scratch, "encoder"),
            genes=panel,
            max_epochs=pretrain_epochs,
            seed=settings["seed"],
            **pretrain_kwargs,
            **arch,
        )
        # The panel the encoder learnt: HVG selection may have returned fewer genes than `n_top_genes`.
        encoder = {"pretrained": os.path.join(scratch, "encoder"), "genes": panel, "n_top_genes": None}
        model = CANAL(first, **{**settings, **encoder}, **arch)
    log(
        f"pretraining: {pretrain_epochs} epochs on {sum(d.n_obs for d in stream.train)} unlabelled training cells, "
        f"{time.perf_counter() - start:.0f} s, masked-token accuracy {final_masked_accuracy(history):.3f}"
    )
    return model, history


def final_masked_accuracy(history: pd.DataFrame) -> float:
    """The last epoch's masked-token accuracy of a pretraining history: on held-out cells where there are some."""
    column = "masked_accuracy_validation" if "masked_accuracy_validation" in history else "masked_accuracy_train"
    return float(history[column].iloc[-1])

"""How much of the expression level an untrained CANAL model's head can read, with random or ordinal bin embeddings.

Usage::

    .venv/bin/python benchmarks/bin_readout.py   # -> benchmarks/results/bin_readout.json

On the first stage of the benchmark's synthetic stream (2 types, 84 training and 36 test cells), logistic regression
(genes standardised) is fit on the training cells and scored on the test cells, on:

- ``tokens``: the expression bins themselves, the information the model receives;
- ``head_scores``: the per-gene scores of the head (its shared linear map over each token's final hidden state,
  then ReLU), the only way the expression of a gene reaches the classifier;
- ``manifold``: the head's 128-d manifold.

Each for a model from random weights (demo encoder, seeds 0-4) with ``token_init="normal"`` (scBERT's random bin
vectors) and ``"ordinal"`` (the default). The token embedding stays frozen during fine-tuning, so what the head can
read before training is what the few trainable layers start from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from harness import machine_info, write_report
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import scanpy_canal as canal
from scanpy_canal._demo import DEMO_ARCH
from scanpy_canal.nn import tokenize

RESULTS = Path(__file__).resolve().parent / "results" / "bin_readout.json"
SEEDS = [0, 1, 2, 3, 4]


def representations(model: canal.CANAL, adata) -> dict[str, np.ndarray]:
    """The tokens, the head's per-gene scores and the manifold of every cell of `adata`."""
    network, head = model.module.network.eval(), model.module.head
    tokens = tokenize(adata[:, model.genes].X)
    with torch.inference_mode():
        hidden = network.encode(tokens)
        scores = F.relu(F.linear(hidden, head.conv1.weight.view(1, -1), head.conv1.bias)).squeeze(-1)
        manifold = network(tokens)[0]
    return {"tokens": tokens.float().numpy(), "head_scores": scores.numpy(), "manifold": manifold.numpy()}


def readout_accuracy(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> float:
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(train, y_train)
    return float((classifier.predict(test) == y_test).mean())


def main() -> dict:
    stream = canal.datasets.synthetic_stream(n_stages=3, n_genes=300, batch_effect=1.0, marker_fold=(2.0, 4.0), seed=0)
    train, test = stream.train[0].copy(), stream.test[0]
    canal.CANAL.setup_anndata(train, labels_key=stream.labels_key)
    y_train, y_test = (a.obs[stream.labels_key].astype(str).to_numpy() for a in (train, test))
    results = {}
    for token_init in ["normal", "ordinal"]:
        runs = []
        for seed in SEEDS:
            model = canal.CANAL(train, seed=seed, token_init=token_init, **DEMO_ARCH)
            fit, score = representations(model, train), representations(model, test)
            runs.append({key: readout_accuracy(fit[key], y_train, score[key], y_test) for key in fit})
        results[token_init] = {
            key: {"mean": float(np.mean([r[key] for r in runs])), "runs": [r[key] for r in runs]} for key in runs[0]
        }
        print(token_init, {key: round(value["mean"], 3) for key, value in results[token_init].items()})
    report = {"machine": machine_info(), "seeds": SEEDS, "results": results}
    write_report(report, RESULTS)
    return report


if __name__ == "__main__":
    main()

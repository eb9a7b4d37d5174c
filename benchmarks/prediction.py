"""Prediction throughput of `CANAL.predict` against the original algorithm's one-cell-at-a-time loop, on this CPU.

Usage::

    .venv/bin/python benchmarks/prediction.py            # -> benchmarks/results/prediction.json
    .venv/bin/python benchmarks/prediction.py --quick    # smoke test with a small model -> temp directory

A CANAL model with scBERT's encoder over 1,000 genes (1,001 tokens) trains one short stage on synthetic cells; then
the same model predicts a query of synthetic cells in two ways:

- **baseline**, the original CANAL's ``predict`` (spec section 5) written out: for each cell, densify its row, make its
  tokens and run one forward pass; with novel-cell detection also a second forward pass for a random partner cell and
  128 mixes of the two manifolds through the head. Measured twice: with the attention computed step by step as the
  original code does (``nn._attention.reference_favor_attention``, "original attention"), and with our fused
  attention (``favor_attention``, the same model as ours, one cell at a time).
- **ours**, ``model.predict(query)`` and ``model.predict(query, novel=True)``: batched, one forward pass for both the
  labels and the novelty scores; in float32 and in bfloat16 autocast (``precision="bf16"``).

It also reports the encoder's achieved FLOP/s in the batched float32 pass against a float32 matmul of the query
projection's shape measured in the same run, and where the time goes: a ``torch.profiler`` table of one batched
prediction, grouped into matrix products, element-wise work and the rest. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
from encoder_throughput import matmul_flops_per_cell
from harness import machine_info, matmul_reference, time_calls, write_report

import scanpy_canal as canal
from scanpy_canal.model._module import DEFAULT_ARCH
from scanpy_canal.nn import _attention, tokenize

RESULTS = Path(__file__).resolve().parent / "results" / "prediction.json"
MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}
ELEMENTWISE_OPS = {
    "aten::exp_",
    "aten::sub_",
    "aten::mul",
    "aten::add",
    "aten::div",
    "aten::gelu",
    "aten::native_layer_norm",
    "aten::sum",
    "aten::amax",
    "aten::relu",
    "aten::pow",
    "aten::cat",
    "aten::copy_",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: a small model, few cells")
    parser.add_argument("--n-query", type=int, default=96, help="cells predicted by `model.predict`")
    parser.add_argument("--n-baseline", type=int, default=24, help="cells predicted one at a time")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    args.arch = {"dim": 16, "depth": 2, "heads": 2, "dim_head": 8} if args.quick else dict(DEFAULT_ARCH)
    if args.quick:
        args.n_query, args.n_baseline = 16, 4
    args.output = args.output or (Path(tempfile.gettempdir()) / "prediction_quick.json" if args.quick else RESULTS)
    return args


def trained_model(arch: dict) -> tuple[canal.CANAL, object]:
    """A model over 1,000 genes after one short stage, and a query of cells from the same types."""
    stream = canal.datasets.synthetic_stream(n_stages=1, n_genes=1000, types_per_stage=4, cells_per_type=60, seed=0)
    data = stream.train[0].copy()
    canal.CANAL.setup_anndata(data, labels_key=stream.labels_key)
    model = canal.CANAL(data, seed=0, **arch)
    model.train(max_epochs=1, batch_size=16, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    return model, stream.test[0]


@torch.inference_mode()
def original_predict(model: canal.CANAL, x, *, novel: bool, seed: int = 0) -> np.ndarray:
    """The original algorithm: one forward pass per cell (two with novel-cell detection) and 128 mixes per cell."""
    network = model.module.network.eval()
    rng = np.random.default_rng(seed)
    beta = torch.distributions.Beta(1.0, 1.0)
    labels, mix_scores = [], []
    for i in range(x.shape[0]):
        manifold, _, logits = network(tokenize(x[i].toarray()))
        labels.append(int(logits.softmax(dim=-1).argmax()))
        if novel:
            partner = network(tokenize(x[int(rng.integers(x.shape[0]))].toarray()))[0]
            weights = beta.sample((128, 1))
            _, mixed = model.module.head.classify(weights * manifold + (1 - weights) * partner)
            confidence, energy = mixed.softmax(dim=-1).amax(dim=-1), -0.8 * torch.logsumexp(mixed / 0.8, dim=-1)
            mix_scores.append((confidence.mean(), energy))
    return np.asarray(model.cell_types, dtype=object)[labels]


@contextmanager
def original_attention():
    """Compute the attention step by step as the original code does, for the duration of the block."""
    fused = _attention.FastAttention.forward
    _attention.FastAttention.forward = lambda self, q, k, v: _attention.reference_favor_attention(
        q, k, v, self.projection_matrix
    )
    try:
        yield
    finally:
        _attention.FastAttention.forward = fused


def cells_per_second(fn, n_cells: int) -> float:
    """Cells per second of one call of `fn` on `n_cells` cells, after a warm-up call."""
    return n_cells / time_calls(fn, max_reps=1)[0]


def profile_prediction(model: canal.CANAL, query) -> dict:
    """Self CPU time of one batched prediction, by operator and by kind."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        model.predict(query)
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    by_op = sorted(((event.key, event.self_cpu_time_total / total) for event in events), key=lambda kv: -kv[1])
    kinds = {"matrix products": 0.0, "element-wise": 0.0, "other": 0.0}
    for name, share in by_op:
        kind = "matrix products" if name in MATMUL_OPS else "element-wise" if name in ELEMENTWISE_OPS else "other"
        kinds[kind] += share
    return {"by_kind": kinds, "top_ops": dict(by_op[:12])}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = {"machine": machine_info(), "settings": {"arch": args.arch, "n_query": args.n_query}}
    model, test = trained_model(args.arch)
    query = test[np.resize(np.arange(test.n_obs), args.n_query)].copy()
    x = canal.pp.align_genes(query, model.genes).X
    baseline_cells = x[: args.n_baseline]
    config = model.module.network.config
    report["settings"] |= {
        "seq_len": config["max_seq_len"],
        "inference_batch_size": model.module.inference_batch_size(torch.device("cpu")),
    }

    model.predict(query[:8], novel=True)  # warm-up: the first call's one-off costs would land on the first way timed
    results = {}
    for novel in (False, True):
        mode = "novel" if novel else "closed"
        one_at_a_time = partial(original_predict, model, baseline_cells, novel=novel)
        with original_attention():
            original = cells_per_second(one_at_a_time, args.n_baseline)
        baseline = cells_per_second(one_at_a_time, args.n_baseline)
        results[f"baseline_original_attention_{mode}"], results[f"baseline_{mode}"] = original, baseline
        for precision in ("32", "bf16"):
            ours = cells_per_second(partial(model.predict, query, novel=novel, precision=precision), args.n_query)
            results[f"ours_{mode}_{precision}"] = ours
            results[f"speedup_{mode}_{precision}"] = ours / baseline
            results[f"speedup_vs_original_attention_{mode}_{precision}"] = ours / original
            print(
                f"{mode:>6} {precision:>4}: baseline {original:.2f} (original attention) / {baseline:.2f} cells/s,"
                f" ours {ours:.2f} cells/s",
                flush=True,
            )
    report["cells_per_s"] = results

    full, reduced = model.predict(query, soft=True, precision="32"), model.predict(query, soft=True, precision="bf16")
    report["bf16_vs_fp32"] = {
        "label_agreement": float((full.idxmax(axis=1) == reduced.idxmax(axis=1)).mean()),
        "max_probability_difference": float(np.abs(full.to_numpy() - reduced.to_numpy()).max()),
    }
    flops = sum(matmul_flops_per_cell(config["max_seq_len"], config).values())
    achieved = flops * results["ours_closed_32"] / 1e9
    rows = report["settings"]["inference_batch_size"] * config["max_seq_len"]
    reference = matmul_reference(rows, config)["gflops"]
    report["efficiency"] = {
        "encoder_gflop_per_cell": flops / 1e9,
        "achieved_gflops": achieved,
        "matmul_gflops": reference,
        "fraction_of_matmul": achieved / reference,
    }
    report["profile"] = profile_prediction(model, query)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    write_report(report, args.output)
    print(report["bf16_vs_fp32"], report["efficiency"], report["profile"]["by_kind"], sep="\n")
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

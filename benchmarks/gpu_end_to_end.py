"""CANAL end to end on a GPU: annotation from a backed .h5ad, a training stage, exact against FAVOR+ attention.

Usage::

    python3 benchmarks/gpu_end_to_end.py                       # the lent GPU, scBERT size, 1,001 tokens
    .venv/bin/python benchmarks/gpu_end_to_end.py --tiny       # a check on a CPU (minutes) -> temp directory

One run measures, on a seeded synthetic stream of ``--genes`` genes (so ``--genes + 1`` tokens) and scBERT's
architecture:

- **training**: a stage of ``--epochs`` epochs with the frozen-block cache, in float32 and in bfloat16; cells/s is
  training cells per second of an epoch after the first (validation included), and of the whole stage;
- **annotation end to end**: ``canal.tl.annotate`` on a backed ``.h5ad`` written here (``--cells`` cells, the test
  cells repeated), read chunk by chunk, tokens, forward passes, results written into the AnnData. In bfloat16 with
  the defaults on a GPU (``precision="auto"``, compiled from 100,000 cells) over all cells, and in float32 compiled
  over ``--fp32-cells``; ``torch.compile``'s one-time cost is measured apart, on a small file;
- **agreement**: labels and probabilities of those paths against the eager float32 path on ``--reference-cells``;
- **kernels**: the Triton FAVOR+ kernels against FAVOR+ in PyTorch on one batch of random heads of scBERT's shape,
  float32 and bfloat16 (largest difference);
- **attention**: the network alone over the reference cells, ``--network-batch-size`` cells per pass: FAVOR+ in
  PyTorch (float32, bfloat16, compiled bfloat16), FAVOR+ in the Triton kernels (the same three) and exact softmax
  attention (``scaled_dot_product_attention``, eager and compiled) in bfloat16, cells/s and agreement with the
  annotation's float32 FAVOR+ in PyTorch.

The JSON is written after every step, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from harness import machine_info, write_report
from lightning.pytorch.callbacks import Callback
from scipy import sparse

import scanpy_canal as canal
from scanpy_canal.model._streaming import ForwardSettings, forward_chunks
from scanpy_canal.nn import favor_kernel
from scanpy_canal.nn._attention import favor_attention, orthogonal_random_features, triton_favor_attention

RESULTS = Path(__file__).resolve().parent / "results"
TINY = {"dim": 16, "depth": 3, "heads": 2, "dim_head": 8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny encoder and few cells: a check on a CPU")
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--types", type=int, default=5)
    parser.add_argument("--cells-per-type", type=int, default=4000, help="of the training stage")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--fp32-cells", type=int, default=50_000)
    parser.add_argument("--reference-cells", type=int, default=10_000)
    parser.add_argument("--network-batch-size", type=int, default=256, help="of the network-only comparisons")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.genes, args.cells_per_type, args.epochs = 100, 60, 2
        args.network_batch_size = 64
        args.cells, args.fp32_cells, args.reference_cells = 3000, 1500, 600
    tiny = Path(tempfile.gettempdir()) / "gpu_end_to_end_tiny.json"
    args.output = args.output or (tiny if args.tiny else RESULTS / "gpu_end_to_end.json")
    return args


class EpochTimes(Callback):
    """Wall time of every training epoch (its validation included)."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        self.times.append(time.perf_counter() - self._start)


def train_stage(stream, arch: dict, precision: str, args) -> tuple[canal.CANAL, dict]:
    data = stream.train[0].copy()
    canal.CANAL.setup_anndata(data, labels_key=stream.labels_key)
    model = canal.CANAL(data, seed=0, **arch)
    timer = EpochTimes()
    start = time.perf_counter()
    model.train(
        max_epochs=args.epochs,
        batch_size=args.train_batch_size,
        cache_frozen=True,
        precision=precision,
        early_stopping_patience=None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    wall = time.perf_counter() - start
    n_train = round(data.n_obs * 0.8)  # validation_size 0.2
    steady = timer.times[1:] or timer.times
    return model, {
        "precision": precision,
        "training_cells": n_train,
        "epochs": args.epochs,
        "epoch_s": timer.times,
        "cells_per_s_epoch": n_train / float(np.median(steady)),
        "stage_wall_s": wall,
        "cells_per_s_stage": n_train * args.epochs / wall,
        "best_validation_accuracy": model.stage_history_[-1]["best_validation_accuracy"],
    }


def write_query(test: ad.AnnData, n_cells: int, path: Path) -> Path:
    """`n_cells` cells, the test cells repeated, written to `path` as a sparse .h5ad."""
    repeats = math.ceil(n_cells / test.n_obs)
    x = sparse.vstack([sparse.csr_matrix(test.X)] * repeats, format="csr")[:n_cells]
    query = ad.AnnData(x.astype(np.float32), var=test.var[[]].copy())
    query.obs_names = [f"cell{i}" for i in range(n_cells)]
    query.write_h5ad(path)
    return path


def annotate_file(model, path: Path, **options) -> tuple[float, ad.AnnData]:
    query = ad.read_h5ad(path, backed="r")
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    canal.tl.annotate(query, model, **options)
    seconds = time.perf_counter() - start
    return seconds, query


def agreement(labels: np.ndarray, reference: np.ndarray, probs: np.ndarray, reference_probs: np.ndarray) -> dict:
    return {
        "cells": int(len(reference)),
        "same_label": float((labels == reference).mean()),
        "max_abs_probability_difference": float(np.abs(probs - reference_probs).max()),
    }


def network_speed(model, x, settings: ForwardSettings, kernel: bool) -> tuple[float, dict]:
    network = model.module.network
    with favor_kernel(network, kernel):
        forward_chunks(network, [x[: settings.batch_size * 2]], settings)  # warm-up (and compilation)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        start = time.perf_counter()
        outputs = forward_chunks(network, [x], settings)
    return x.shape[0] / (time.perf_counter() - start), outputs


def kernel_against_pytorch(batch: int = 64, heads: int = 10, seq: int = 1001, dim: int = 64) -> dict:
    """Largest difference between the Triton kernels and FAVOR+ in PyTorch on random heads, per dtype."""
    kernel = triton_favor_attention(dim)
    if kernel is None or not torch.cuda.is_available():
        return {"available": False}
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=generator).cuda() for _ in range(3))
    projection = orthogonal_random_features(int(dim * math.log(dim)), dim, generator=generator).cuda()
    exact = favor_attention(q.double(), k.double(), v.double(), projection.double())
    result = {"available": True}
    for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        inputs = [x.to(dtype) for x in (q, k, v)]
        with torch.no_grad():
            ours, theirs = kernel(*inputs, projection), favor_attention(*(x.clone() for x in inputs), projection)
        result[name] = {
            "kernel_max_abs_difference_to_float64": float((ours.double() - exact).abs().max()),
            "pytorch_max_abs_difference_to_float64": float((theirs.double() - exact).abs().max()),
        }
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report: dict = {"machine": machine_info(), "settings": {k: str(v) for k, v in vars(args).items()}, "errors": {}}
    out = Path(os.environ.get("OUT", args.output.parent))

    def save() -> None:
        for path in {args.output, out / args.output.name}:
            write_report(report, path)

    def step(name, function):
        start = time.perf_counter()
        try:
            value = function()
        except Exception:  # noqa: BLE001 (one failed measurement must not lose the others)
            report["errors"][name] = traceback.format_exc()[-3000:]
            print(report["errors"][name], file=sys.stderr)
            value = None
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        save()
        return value

    arch = TINY if args.tiny else {}  # {}: scBERT's architecture (canal.nn.SCBERT_CONFIG)
    stream = canal.datasets.synthetic_stream(
        n_stages=1, n_genes=args.genes, types_per_stage=args.types, n_novel_types=0,
        cells_per_type=args.cells_per_type, seed=0,
    )  # fmt: skip
    report["model"] = {"arch": arch or "scBERT", "tokens": args.genes + 1}
    report["kernel_against_pytorch"] = step("kernel_against_pytorch", kernel_against_pytorch)
    trained = {}
    for precision in ("32", "bf16"):
        result = step(f"train_{precision}", lambda p=precision: train_stage(stream, arch, p, args))
        if result is not None:
            trained[precision], report[f"training_{precision}"] = result
    model = trained.get("32") or trained.get("bf16")
    if model is None:
        return report
    model.module.to("cuda" if torch.cuda.is_available() else "cpu")
    test = stream.test[0]
    with tempfile.TemporaryDirectory() as directory:
        files = {
            name: write_query(test, n, Path(directory) / f"{name}.h5ad")
            for name, n in [
                ("warm", 2000),
                ("all", args.cells),
                ("fp32", args.fp32_cells),
                ("ref", args.reference_cells),
            ]
        }
        with favor_kernel(model.module.network, enabled=False):
            reference = model.predict(ad.read_h5ad(files["ref"]), soft=True, precision="32", compile=False)
        reference_labels = reference.idxmax(axis=1).to_numpy()
        n_ref = args.reference_cells

        def end_to_end(precision: str, file: str) -> dict:
            compile_s, _ = annotate_file(model, files["warm"], precision=precision, compile=True)
            seconds, query = annotate_file(model, files[file], precision=precision, compile=True)
            labels = query.obs["canal_prediction"].to_numpy()[:n_ref].astype(str)
            probs = query.obsm["canal_probabilities"][:n_ref]
            return {
                "cells": int(query.n_obs),
                "seconds": seconds,
                "cells_per_s": query.n_obs / seconds,
                "compile_and_warm_s_2000_cells": compile_s,
                "agreement_with_eager_fp32": agreement(labels, reference_labels, probs, reference.to_numpy()),
            }

        report["annotate_bf16"] = step("annotate_bf16", lambda: end_to_end("bf16", "all"))
        report["annotate_fp32"] = step("annotate_fp32", lambda: end_to_end("32", "fp32"))

        x = sparse.csr_matrix(ad.read_h5ad(files["ref"]).X)
        attention = {}
        batch = args.network_batch_size
        for name, settings, kernel in [
            ("favor_pytorch_fp32", ForwardSettings(batch, "32", "favor", False), False),
            ("favor_pytorch_bf16", ForwardSettings(batch, "bf16", "favor", False), False),
            ("favor_pytorch_compiled_bf16", ForwardSettings(batch, "bf16", "favor", True), False),
            ("favor_kernel_fp32", ForwardSettings(batch, "32", "favor", False), True),
            ("favor_kernel_bf16", ForwardSettings(batch, "bf16", "favor", False), True),
            ("favor_kernel_compiled_bf16", ForwardSettings(batch, "bf16", "favor", True), True),
            ("exact_sdpa_bf16", ForwardSettings(batch, "bf16", "exact", False), True),
            ("exact_sdpa_compiled_bf16", ForwardSettings(batch, "bf16", "exact", True), True),
        ]:

            def measure(settings=settings, kernel=kernel) -> dict:
                rate, outputs = network_speed(model, x, settings, kernel)
                probs = outputs["logits"].softmax(dim=-1).numpy()
                labels = np.asarray(model.cell_types)[probs.argmax(axis=1)]
                return {"cells_per_s": rate, **agreement(labels, reference_labels, probs, reference.to_numpy())}

            attention[name] = step(f"network_{name}", measure)
            report["network_over_reference_cells"] = attention
    save()
    return report


if __name__ == "__main__":
    main()

"""Inference throughput of the scBERT encoder (`PerformerLM.encode`) on this machine, in cells/s and FLOP/s.

Usage::

    .venv/bin/python benchmarks/encoder_throughput.py            # full run -> benchmarks/results/encoder_throughput.json
    .venv/bin/python benchmarks/encoder_throughput.py --quick    # smoke test -> a file in the temp directory

For each (sequence length, batch size) the model runs in eval mode under `torch.inference_mode()`: one warm-up call,
then timed calls until `--budget` seconds have passed or `--max-reps` calls were made (at least one); the median
seconds per batch is reported. Run it on a quiet machine: other processes distort the timings. At S = 16907 a cell
costs about 300 GFLOP, so batch sizes 1 to 16 (warm-up plus one timed call each) take several minutes on two cores.

FLOPs per cell (analytic, a multiply-add counts as 2 FLOPs). With S positions, width d, h heads of width e (inner
width h*e), m random features, feed-forward width f = ff_mult * d and L blocks, each block costs per cell:

    q, k, v projections          3 * 2 * S * d * (h*e)
    attention output projection  2 * S * (h*e) * d
    feature maps q P^T, k P^T    2 * 2 * h * S * e * m
    k^T v                        2 * h * m * S * e
    q (k^T v)                    2 * h * S * m * e
    normaliser q (sum_n k_n)     2 * h * S * m
    feed-forward w1, w2          2 * 2 * S * d * f

and the total is L times that. These are exactly the matrix products, which is what
`torch.utils.flop_counter.FlopCounterMode` counts, so the two figures should agree. Element-wise work (embedding add,
LayerNorms, biases, GELU, the exp of the feature maps, residual adds) is estimated separately at one FLOP per
element-wise operation (about 1.6% of the matmul FLOPs for scBERT) and is not included in the achieved FLOP/s.

The reference is a plain float32 `torch.matmul` of shape (B*S, d) @ (d, h*e), the query projection at the batch size
with the highest throughput; "fraction of matmul" is the encoder's achieved FLOP/s divided by that matmul's FLOP/s.

Memory: the feature maps hold about five (B, h, S, m) float32 tensors at the peak (about 0.84 GB per cell at
S = 16907, measured), so points whose estimate exceeds 90% of the available memory are skipped, not run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from harness import available_bytes, machine_info, matmul_reference, time_calls, write_report
from torch.utils.flop_counter import FlopCounterMode

from scanpy_canal.nn import PerformerLM

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "encoder_throughput.json"
QUICK_OUTPUT = Path(tempfile.gettempdir()) / "encoder_throughput_quick.json"
PEAK_TENSORS = 5  # (B, h, S, m) float32 tensors alive at the peak of the feature maps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: seq 1001, batch 1 and 8, short budget")
    parser.add_argument("--output", type=Path, default=None, help=f"JSON file (default {DEFAULT_OUTPUT})")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1001, 16907])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed calls per point")
    parser.add_argument("--max-reps", type=int, default=20, help="most timed calls per point")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_lens, args.batch_sizes, args.budget, args.max_reps = [1001], [1, 8], 0.5, 3
    if args.output is None:
        args.output = QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT
    return args


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def matmul_flops_per_cell(seq_len: int, config: dict) -> dict[str, int]:
    """Analytic matmul FLOPs of one cell's `encode`, by component (see the module docstring)."""
    S, d, L = seq_len, config["dim"], config["depth"]
    h, e, m = config["heads"], config["dim_head"], config["nb_features"]
    f = config["ff_mult"] * d
    per_block = {
        "qkv_projections": 3 * 2 * S * d * h * e,
        "out_projection": 2 * S * h * e * d,
        "feature_maps": 2 * 2 * h * S * e * m,
        "kT_v": 2 * h * m * S * e,
        "q_kTv": 2 * h * S * m * e,
        "normaliser": 2 * h * S * m,
        "feed_forward": 2 * 2 * S * d * f,
    }
    return {name: L * flops for name, flops in per_block.items()}


def elementwise_flops_per_cell(seq_len: int, config: dict) -> int:
    """Rough element-wise FLOPs of one cell's `encode`, one FLOP per element-wise operation (exp and erf included)."""
    d, h, e, m = config["dim"], config["heads"], config["dim_head"], config["nb_features"]
    f = config["ff_mult"] * d
    layer_norms = 2 * 8 * d  # mean, variance, normalise, scale, shift
    biases_residuals = 2 * d + f + 2 * d
    gelu = 5 * f
    # per head, for q and for k: scale, squared norm (2e), dash - diag - max, exp, + eps, * ratio, the max itself
    feature_maps = 2 * h * (3 * e + 6 * m + 1)
    normalise = h * m + h * e  # sum of k over positions, division of the output
    per_token = layer_norms + biases_residuals + gelu + feature_maps + normalise
    return seq_len * (config["depth"] * per_token + d + 8 * d)  # + embedding add and final LayerNorm


def counted_flops_per_cell(model: PerformerLM, seq_len: int) -> int:
    """FLOPs of one batch-1 `encode`, as counted by `FlopCounterMode` (matrix products only)."""
    tokens = torch.randint(0, 6, (1, seq_len))
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.encode(tokens)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------------------
# timing


def estimated_peak_bytes(seq_len: int, batch_size: int, config: dict) -> int:
    """Peak activation memory of one `encode` call, dominated by the (B, h, S, m) feature-map tensors."""
    return 4 * PEAK_TENSORS * batch_size * seq_len * config["heads"] * config["nb_features"]


def measure_encoder(model: PerformerLM, seq_len: int, batch_size: int, args: argparse.Namespace) -> dict:
    """Seconds per batch and cells/s of `model.encode` on random tokens of shape ``(batch_size, seq_len)``."""
    tokens = torch.randint(0, 6, (batch_size, seq_len))
    with torch.inference_mode():
        seconds, reps = time_calls(lambda: model.encode(tokens), max_reps=args.max_reps, budget=args.budget)
    return {"seconds_per_batch": seconds, "n_reps": reps, "cells_per_s": batch_size / seconds}


# ---------------------------------------------------------------------------------------------------------------
# the run


def flops_summary(model: PerformerLM, seq_len: int) -> dict:
    """Analytic and counted FLOPs per cell for one sequence length."""
    breakdown = matmul_flops_per_cell(seq_len, model.config)
    analytic, counted = sum(breakdown.values()), counted_flops_per_cell(model, seq_len)
    return {
        "analytic_matmul": analytic,
        "counter": counted,
        "relative_difference": (counted - analytic) / analytic,
        "elementwise_estimate": elementwise_flops_per_cell(seq_len, model.config),
        "breakdown": breakdown,
    }


def skip_reason(seq_len: int, batch_size: int, config: dict) -> str | None:
    """Why a point is not run (not enough memory), or `None`."""
    need, have = estimated_peak_bytes(seq_len, batch_size, config), available_bytes()
    if have is not None and need > 0.9 * have:
        return f"estimated peak memory {need / 1e9:.1f} GB exceeds 90% of the {have / 1e9:.1f} GB available"
    return None


def benchmark_seq_len(seq_len: int, args: argparse.Namespace, report: dict) -> None:
    """Measure every batch size at one sequence length, then the matmul reference; fills `report` as it goes."""
    torch.manual_seed(0)
    model = PerformerLM(max_seq_len=seq_len).eval()
    flops = flops_summary(model, seq_len)
    report["flops_per_cell"][str(seq_len)] = flops
    points = []
    for batch_size in args.batch_sizes:
        point = {"seq_len": seq_len, "batch_size": batch_size}
        reason = skip_reason(seq_len, batch_size, model.config)
        if reason:
            point["skipped"] = reason
        else:
            point |= measure_encoder(model, seq_len, batch_size, args)
            point["achieved_gflops"] = flops["analytic_matmul"] * point["cells_per_s"] / 1e9
        print_point(point)
        points.append(point)
        report["results"].append(point)
        write_report(report, args.output)
    measured = [p for p in points if "skipped" not in p]
    if not measured:
        return
    best = max(measured, key=lambda p: p["cells_per_s"])
    cfg = model.config
    rows = best["batch_size"] * seq_len
    reference = matmul_reference(rows, cfg, budget=args.budget, max_reps=args.max_reps)
    report["matmul_reference"][str(seq_len)] = reference | {"batch_size": best["batch_size"]}
    for point in measured:
        point["fraction_of_matmul"] = point["achieved_gflops"] / reference["gflops"]


def print_point(point: dict) -> None:
    if "skipped" in point:
        print(f"{point['seq_len']:>7} {point['batch_size']:>5}  skipped: {point['skipped']}", flush=True)
        return
    print(
        f"{point['seq_len']:>7} {point['batch_size']:>5} {point['seconds_per_batch']:>12.4f} {point['n_reps']:>5}"
        f" {point['cells_per_s']:>10.2f} {point['achieved_gflops']:>10.1f}",
        flush=True,
    )


def print_summary(report: dict) -> None:
    print("\nFLOPs per cell (matmuls; multiply-add = 2)")
    for seq_len, flops in report["flops_per_cell"].items():
        print(
            f"  S={seq_len:>6}: analytic {flops['analytic_matmul'] / 1e9:.3f} GFLOP, counter {flops['counter'] / 1e9:.3f}"
            f" GFLOP, element-wise (not counted) ~{flops['elementwise_estimate'] / 1e9:.3f} GFLOP"
        )
    print("\nmatmul reference (float32, query-projection shape at the best batch size)")
    for seq_len, ref in report["matmul_reference"].items():
        rows, inner, outer = ref["shape"]
        print(f"  S={seq_len:>6}: ({rows}, {inner}) @ ({inner}, {outer}): {ref['gflops']:.1f} GFLOP/s")
    print(f"\n{'seq':>7} {'batch':>5} {'cells/s':>10} {'GFLOP/s':>10} {'of matmul':>10}")
    for p in report["results"]:
        if "fraction_of_matmul" in p:
            print(
                f"{p['seq_len']:>7} {p['batch_size']:>5} {p['cells_per_s']:>10.2f} {p['achieved_gflops']:>10.1f} {p['fraction_of_matmul']:>10.1%}"
            )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = {
        "machine": machine_info(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model_config": {**PerformerLM(max_seq_len=2).config, "max_seq_len": "seq_len of each point"},
        "flops_per_cell": {},
        "matmul_reference": {},
        "results": [],
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    print(f"{'seq':>7} {'batch':>5} {'s/batch':>12} {'reps':>5} {'cells/s':>10} {'GFLOP/s':>10}")
    for seq_len in args.seq_lens:
        benchmark_seq_len(seq_len, args, report)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    write_report(report, args.output)
    print_summary(report)
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

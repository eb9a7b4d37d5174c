"""Prediction and training throughput of the CANAL network (scBERT encoder + CANAL head), on a CPU or a GPU.

Usage::

    .venv/bin/python benchmarks/network_throughput.py                      # CPU, 1,001 tokens
    python3 benchmarks/network_throughput.py --device cuda --seq-lens 1001 16907

Pure PyTorch (only ``scanpy_canal.nn``), so it runs wherever torch does. Each point is measured in float32 and in
bfloat16 autocast, on random tokens (80% zeros, like a sparse expression profile):

- **prediction**: the network's forward pass in eval mode under ``torch.inference_mode()``; one cell per forward pass
  (the original CANAL's ``predict``) against batches of ``--batch-size`` cells.
- **training**: steps of a later stage (with distillation): forward, label-smoothed cross-entropy plus 0.1 x the
  embedding MSE to the teacher, backward and an Adam (AMSGrad) step, with CANAL's trainable parameters (block
  ``depth - 2``, the final LayerNorm and the head). "recompute" is the original: every step runs the whole student
  and the whole teacher. "cached" is ours: once per stage, the hidden states after the frozen prefix of blocks and
  the teacher's embeddings are computed for every cell (reported as ``one_time_s``), and each step runs only the
  blocks from the first trainable one on. ``cells_per_s_over_epochs`` counts the one-time work spread over
  ``--epochs`` epochs of ``--n-cells`` cells.

Timings are medians over calls after a warm-up (CUDA is synchronised around each call).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from encoder_throughput import matmul_flops_per_cell
from harness import machine_info, matmul_reference, time_calls, write_report

from scanpy_canal.model import stage_loss
from scanpy_canal.nn import SCBERT_CONFIG, CANALHead, PerformerLM, frozen_prefix, set_trainable

RESULTS = Path(__file__).resolve().parent / "results"
N_CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1001])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on a CPU, 64 on a GPU")
    parser.add_argument("--train-batch-size", type=int, default=16)
    parser.add_argument("--n-cells", type=int, default=None, help="cells per measurement (default: 2 batches)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs over which the one-time cost is spread")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per point")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (16 if args.device == "cpu" else 64)
    args.n_cells = args.n_cells or 2 * args.batch_size
    args.output = args.output or RESULTS / f"network_throughput_{args.device}.json"
    return args


def timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of `fn` over `reps` calls after one warm-up call (see :func:`harness.time_calls`)."""
    return time_calls(fn, max_reps=reps, device=device)[0]


def build_network(seq_len: int, device: torch.device) -> PerformerLM:
    torch.manual_seed(0)
    network = PerformerLM(**{**SCBERT_CONFIG, "max_seq_len": seq_len})
    network.to_out = CANALHead(seq_len, network.config["dim"], N_CLASSES)
    set_trainable(network)
    return network.to(device)


def random_tokens(n: int, seq_len: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 6, (n, seq_len), generator=generator)
    tokens[torch.rand(n, seq_len, generator=generator) < 0.8] = 0
    tokens[:, -1] = 0
    return tokens.to(device)


def measure_prediction(network: PerformerLM, tokens: torch.Tensor, args, precision: str) -> dict:
    device = tokens.device
    network.eval()

    @torch.inference_mode()
    def run(cells: torch.Tensor, batch_size: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for start in range(0, len(cells), batch_size):
                network(cells[start : start + batch_size])

    single = tokens[: min(len(tokens), 8)]
    per_cell = len(single) / timed(lambda: run(single, 1), device, args.reps)
    batched = len(tokens) / timed(lambda: run(tokens, args.batch_size), device, args.reps)
    flops = sum(matmul_flops_per_cell(tokens.shape[1], network.config).values())
    return {
        "per_cell_cells_per_s": per_cell,
        "batched_cells_per_s": batched,
        "speedup": batched / per_cell,
        "batched_encoder_gflops": flops * batched / 1e9,
    }


def measure_training(network: PerformerLM, tokens: torch.Tensor, args, precision: str) -> dict:
    device = tokens.device
    labels = torch.randint(0, N_CLASSES, (len(tokens),), device=device)
    teacher = copy.deepcopy(network).requires_grad_(False).eval()
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=1e-4, amsgrad=True)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    batch = args.train_batch_size
    stop = frozen_prefix(network)

    def step(outputs_fn, target_fn, start: int) -> None:
        rows = slice(start, start + batch)
        with autocast():
            _, embedding, logits = outputs_fn(rows)
            loss, _, _ = stage_loss(
                logits,
                labels[rows],
                label_smoothing=0.1,
                embedding=embedding,
                teacher_embedding=target_fn(rows),
                distill_weight=0.1,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def epoch(outputs_fn, target_fn) -> None:
        network.train()
        for start in range(0, len(tokens), batch):
            step(outputs_fn, target_fn, start)

    def teacher_target(rows):
        with torch.no_grad():
            return teacher(tokens[rows])[1]

    recompute = len(tokens) / timed(lambda: epoch(lambda r: network(tokens[r]), teacher_target), device, args.reps)

    cache = {}

    @torch.no_grad()  # not inference mode: the cache enters autograd-tracked steps
    def prepare() -> None:
        network.eval()
        hidden = torch.cat([network.hidden_states(tokens[i : i + batch], stop) for i in range(0, len(tokens), batch)])
        cache["hidden"] = hidden.clone()
        cache["teacher"] = torch.cat(
            [teacher.forward_from(hidden[i : i + batch], stop)[1] for i in range(0, len(tokens), batch)]
        ).clone()

    one_time = timed(prepare, device, 1)
    network.performer.redraw_from = stop
    cached_outputs = lambda rows: network.forward_from(cache["hidden"][rows], stop)
    cached = len(tokens) / timed(lambda: epoch(cached_outputs, lambda rows: cache["teacher"][rows]), device, args.reps)
    network.performer.redraw_from = 0
    total_cells = args.epochs * len(tokens)
    over_epochs = total_cells / (one_time + total_cells / cached)
    return {
        "frozen_prefix_blocks": stop,
        "recompute_cells_per_s": recompute,
        "cached_cells_per_s": cached,
        "one_time_s": one_time,
        "cached_cells_per_s_over_epochs": over_epochs,
        "speedup": cached / recompute,
        "speedup_over_epochs": over_epochs / recompute,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    report = {
        "machine": machine_info(device),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": [],
    }
    for seq_len in args.seq_lens:
        network = build_network(seq_len, device)
        tokens = random_tokens(args.n_cells, seq_len, device)
        for precision in ("32", "bf16"):
            point = {"seq_len": seq_len, "precision": precision}
            point["prediction"] = measure_prediction(network, tokens, args, precision)
            rows = args.batch_size * seq_len
            reference = matmul_reference(
                rows, network.config, device=device, precision=precision, max_reps=max(args.reps, 10)
            )
            matmul = reference["gflops"]
            point["prediction"] |= {
                "matmul_gflops": matmul,
                "fraction_of_matmul": point["prediction"]["batched_encoder_gflops"] / matmul,
            }
            point["training"] = measure_training(build_network(seq_len, device), tokens, args, precision)
            print(point, flush=True)
            report["results"].append(point)
            write_report(report, args.output)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

"""What every benchmark shares: the machine description, timing, the matmul reference and writing a report.

Stream runs (train stage by stage, score each stage's held-out cells) are :func:`scanpy_canal._demo.run_stream` for
CANAL and :func:`scanpy_canal._demo.run_stages` for any model; the demo runs the same code.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch


def machine_info(device: torch.device | None = None) -> dict:
    """What the numbers depend on: CPU, threads, GPU, library versions, and how busy the machine is."""
    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_available_gb": (available_bytes() or 0) / 1e9,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": list(os.getloadavg()),
    }
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return info | {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def _cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    return names[0] if names else platform.processor()


def available_bytes() -> int | None:
    """`MemAvailable` from /proc/meminfo, or `None` where there is no such file."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def time_calls(
    fn: Callable[[], object], *, max_reps: int, budget: float = math.inf, device: torch.device | None = None
) -> tuple[float, int]:
    """Median seconds of `fn` after one warm-up call, over calls until `budget` seconds or `max_reps` calls.

    On a GPU `device`, each call is timed to the end of its kernels.
    """

    def once() -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    once()
    times: list[float] = []
    while not times or (sum(times) < budget and len(times) < max_reps):
        times.append(once())
    return statistics.median(times), len(times)


def synchronize(device: torch.device | None) -> None:
    """Wait for the kernels queued on `device` when it is a GPU."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_reference(
    rows: int,
    config: dict,
    *,
    device: torch.device | None = None,
    precision: str = "32",
    max_reps: int = 10,
    budget: float = math.inf,
) -> dict:
    """GFLOP/s of the encoder's query projection alone: a ``(rows, dim) @ (dim, heads * dim_head)`` product.

    The reference an encoder's achieved FLOP/s is divided by (``fraction_of_matmul`` in the reports).
    """
    device = device or torch.device("cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    inner, outer = config["dim"], config["heads"] * config["dim_head"]
    a = torch.randn(rows, inner, device=device, dtype=dtype)
    b = torch.randn(inner, outer, device=device, dtype=dtype)
    with torch.inference_mode():
        seconds, reps = time_calls(lambda: a @ b, max_reps=max_reps, budget=budget, device=device)
    return {
        "shape": [rows, inner, outer],
        "seconds": seconds,
        "n_reps": reps,
        "gflops": 2 * rows * inner * outer / seconds / 1e9,
    }


def write_report(report: dict, path: Path) -> None:
    """`report` as indented JSON at `path` (its folder made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """`jobs` worker processes, spawned (each imports torch afresh), that end when the benchmark's process ends.

    A benchmark killed from outside (``kill``, a lost terminal) runs no cleanup, and its workers would go on training
    for up to an hour beside whatever runs next, slowing it unseen.
    """
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(jobs, mp_context=context, initializer=_end_with_parent, initargs=(os.getpid(),))


def _end_with_parent(parent: int, poll_seconds: float = 2.0) -> None:
    """In a worker: end the process once `parent`, the process that started it, has ended (it is then re-parented)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()

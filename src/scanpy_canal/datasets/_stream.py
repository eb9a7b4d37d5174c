"""The input of a continual-learning run: labelled data arriving in stages, plus held-out and novel cells."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from anndata import AnnData


@dataclass
class Stream:
    """A continual cell-type annotation stream.

    Every AnnData has ``X`` = ``log2(1 + counts per 10k)`` (float32 CSR), unique ``obs_names`` across the whole
    stream, the same ``var_names``, and ``obs[labels_key]`` (categorical) and ``obs["stage"]`` (int).

    Attributes
    ----------
    train
        Labelled training data, one AnnData per stage, in stage order.
    test
        Held-out cells of the data of each stage (same types as ``train[t]``), in stage order.
    novel
        Held-out cells of types that no stage trains on (for novel-cell detection), or `None`.
    labels_key
        The ``obs`` column holding the cell types.
    novel_types
        The types in `novel`.

    Examples
    --------
    >>> import scanpy_canal as canal
    >>> stream = canal.datasets.synthetic_stream(n_stages=2)
    >>> stream.n_stages, stream.train[0].obs["cell_type"].cat.categories.tolist()
    (2, ['type_0', 'type_1'])
    """

    train: list[AnnData]
    test: list[AnnData]
    novel: AnnData | None
    labels_key: str = "cell_type"
    novel_types: list[str] = field(default_factory=list)

    @property
    def n_stages(self) -> int:
        """Number of training stages."""
        return len(self.train)


def check_test_size(test_size: float) -> None:
    """Raise if `test_size` is not a fraction strictly between 0 and 1."""
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be a fraction strictly between 0 and 1, got {test_size}.")


def split_stratified(adata: AnnData, labels_key: str, *, test_size: float, seed: int) -> tuple[AnnData, AnnData]:
    """Seeded train/test split of `adata` keeping the proportion of each type in ``obs[labels_key]``."""
    from sklearn.model_selection import train_test_split

    labels = adata.obs[labels_key].to_numpy()
    try:
        train_idx, test_idx = train_test_split(
            np.arange(adata.n_obs), test_size=test_size, stratify=labels, random_state=seed
        )
    except ValueError as error:
        counts = pd.Series(labels).value_counts().to_dict()
        raise ValueError(
            f"Cannot split {adata.n_obs} cells into train and test with test_size={test_size} keeping every type "
            f"on both sides (cells per type: {counts}): {error}"
        ) from error
    return adata[np.sort(train_idx)].copy(), adata[np.sort(test_idx)].copy()


def set_labels(adata: AnnData, labels, order: list[str], labels_key: str, stage: int) -> None:
    """Write categorical ``obs[labels_key]`` (categories: the types present, in `order`) and ``obs["stage"]``."""
    labels = np.asarray(labels, dtype=object)
    present = set(labels)
    adata.obs[labels_key] = pd.Categorical(labels, categories=[t for t in order if t in present])
    adata.obs["stage"] = np.full(adata.n_obs, stage, dtype=np.int64)

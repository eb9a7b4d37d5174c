"""The peers of CANAL in the continual benchmarks: logistic regression (with and without a replay bank), CellTypist
and scANVI through scArches, each as a list of stage rows for ``continual_stream.run_stages``.

A *row* is ``(name, stages seen, fit)``: ``fit()`` trains on what the method may use after that many stages and
returns a predictor (AnnData -> one label per cell). Rows are fitted in order, so a row may build on the previous
one (the bank, scArches' reference).

- **Logistic regression** (:func:`fit_logistic`): genes standardised, then multinomial ``LogisticRegression``
  (lbfgs, ``max_iter=1000``) on ``log2(1 + CP10k)``; deterministic. ``lr_sequential`` refits on the newest stage
  only, ``lr_joint`` on all stages so far, ``lr_bank`` on the newest stage plus a replay bank (:class:`RandomBank`);
  ``lr_balanced_bank`` as ``lr_bank`` with the types weighted equally (``class_weight="balanced"``), as CANAL's loss
  is from a random start.
- **Replay bank** (:class:`RandomBank`): the memory-bounded peer of CANAL's example bank, with the same capacity
  and the same quotas: after each stage, ``floor(L / types seen)`` cells per type, so old types shrink as new ones
  arrive. CANAL ranks a stage's cells by similarity to their type's prototype; the peer ranks them at random
  (seeded), then keeps, per type, the best-ranked cells of every stage in about equal numbers, as CANAL does.
- **CellTypist** (:func:`fit_celltypist`): the real ``celltypist.train`` / ``celltypist.annotate``, on natural-log
  ``log1p`` CP10k (``X * ln 2``), ``check_expression=False`` (a stream's gene set may be a subset, whose CP10k do
  not sum to 10k). ``celltypist_joint`` and ``celltypist_bank`` as for logistic regression. CellTypist 1.7.1's
  default solver passes ``multi_class`` to ``LogisticRegression``, which scikit-learn 1.8 removed, so it runs its
  documented SGD logistic regression (``use_SGD=True``), as CellTypist recommends for large data; the settings are in
  :data:`CELLTYPIST_SETTINGS` and each stream's ``feature_selection`` in the benchmark's stream table.
- **scANVI + scArches** (:func:`scanvi_rows`): see ``continual_stream``'s docstring.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from scvi.model import SCANVI

    import scanpy_canal as canal

Predictor = Callable[[ad.AnnData], np.ndarray]
#: ``(stages seen, fit)``: a row of :func:`scanpy_canal._demo.run_stages`.
Row = tuple[int, Callable[[], Predictor]]
#: ``celltypist.train`` settings beyond the data and the per-stream ``feature_selection``.
CELLTYPIST_SETTINGS = {"use_SGD": True, "check_expression": False, "max_iter": 1000}
#: ``scanvi_scarches``: latent size, and the fixed epochs of the scVI and scANVI reference and of each query stage.
SCANVI_SETTINGS = {"n_latent": 10, "scvi_epochs": 400, "scanvi_epochs": 100, "query_epochs": 100}
SCVI_TRAIN = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}
SCANVI_LABELS, UNLABELED, PLACEHOLDER = "scanvi_label", "Unknown", "(no cell)"


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)


def binned(matrix) -> np.ndarray:
    """What CANAL's tokens keep of ``log2(1 + CP10k)``: ``min(floor(x), 5)``."""
    return np.minimum(np.floor(dense(matrix)), 5.0)


def fit_logistic(
    data: ad.AnnData, labels_key: str, seed: int, *, bins: bool = False, balanced: bool = False
) -> Predictor:
    """Genes standardised, then multinomial logistic regression; on CANAL's bins instead of the values if `bins`, with
    scikit-learn's ``class_weight="balanced"`` (as CANAL's random-start loss) if `balanced`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    values = binned if bins else dense
    weight = "balanced" if balanced else None
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed, class_weight=weight))
    model.fit(values(data.X), data.obs[labels_key].astype(str).to_numpy())
    return lambda adata: model.predict(values(adata.X))


def fit_mlp_on_bins(data: ad.AnnData, labels_key: str, seed: int) -> Predictor:
    """A multilayer perceptron on CANAL's bins (one hidden layer of 256, standardised inputs, early stopping on 10% of
    the cells): what a small non-linear network reads from the same tokens without the transformer."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    network = MLPClassifier(hidden_layer_sizes=(256,), early_stopping=True, max_iter=300, random_state=seed)
    model = make_pipeline(StandardScaler(), network)
    model.fit(binned(data.X), data.obs[labels_key].astype(str).to_numpy())
    return lambda adata: model.predict(binned(adata.X))


def fit_celltypist(data: ad.AnnData, labels_key: str, seed: int, *, feature_selection: bool) -> Predictor:
    """``celltypist.train`` on `data` (as natural-log log1p CP10k); predicts with ``celltypist.annotate``."""
    import celltypist

    with quiet_celltypist():
        model = celltypist.train(
            as_log1p(data),
            labels=data.obs[labels_key].astype(str).to_numpy(),
            feature_selection=feature_selection,
            random_state=seed,
            **CELLTYPIST_SETTINGS,
        )

    def predict(adata: ad.AnnData) -> np.ndarray:
        with quiet_celltypist():
            result = celltypist.annotate(as_log1p(adata), model=model, majority_voting=False)
        return result.predicted_labels["predicted_labels"].astype(str).to_numpy()

    return predict


def as_log1p(adata: ad.AnnData) -> ad.AnnData:
    """A bare AnnData of ``ln(1 + CP10k)`` from the stream's ``log2(1 + CP10k)``, as CellTypist expects."""
    return ad.AnnData(X=adata.X * np.log(2.0), obs=pd.DataFrame(index=adata.obs_names), var=adata.var[[]])


@contextmanager
def quiet_celltypist() -> Iterator[None]:
    logger = logging.getLogger("celltypist")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class RandomBank:
    """A class-balanced random replay bank of at most `size` cells (see the module docstring).

    Parameters
    ----------
    size
        The capacity L; after a stage every type seen keeps at most ``L // types seen`` cells.
    labels_key
        The ``obs`` column of the types.
    seed
        Seed of the random ranks.
    """

    def __init__(self, size: int, labels_key: str, seed: int):
        self.size, self.labels_key = size, labels_key
        self.rng = np.random.default_rng(seed)
        self.cells: ad.AnnData | None = None
        self.known: list[str] = []

    def with_stage(self, data: ad.AnnData) -> ad.AnnData:
        """The stage's cells followed by the bank's."""
        return data if self.cells is None else ad.concat([data, self.cells], merge="same")

    def update(self, data: ad.AnnData) -> None:
        """Add `data`'s cells with random ranks, then keep the best-ranked cells of each type up to its quota."""
        labels = data.obs[self.labels_key].astype(str).to_numpy()
        self.known = list(dict.fromkeys([*self.known, *labels]))
        quota = self.size // len(self.known)
        ranks = np.zeros(len(labels), dtype=np.int64)
        for name in np.unique(labels):
            members = np.flatnonzero(labels == name)
            ranks[members] = self.rng.permutation(len(members)) + 1
        picks = data.copy()
        picks.obs = pd.DataFrame({self.labels_key: labels, "rank": ranks}, index=data.obs_names)
        merged = picks if self.cells is None else ad.concat([self.cells, picks], merge="same")
        # Per type, a stable sort by rank interleaves the stages: rank 1 of each, then rank 2, ...
        order = merged.obs.sort_values("rank", kind="stable")
        keep = order.groupby(self.labels_key, observed=True).head(quota).index
        self.cells = merged[merged.obs_names.isin(keep)].copy()


def refit_rows(
    stream: canal.datasets.Stream, fit: Callable[[ad.AnnData], Predictor], *, memory: str, bank_size: int = 0, seed=0
) -> list[Row]:
    """Rows of a method that refits from scratch after every stage on what its `memory` holds.

    `memory`: ``"joint"`` (every stage so far), ``"last"`` (the newest stage) or ``"bank"`` (the newest stage plus a
    :class:`RandomBank` of `bank_size` cells, updated with each stage after fitting on it).
    """
    bank = RandomBank(bank_size, stream.labels_key, seed)

    def training(t: int) -> ad.AnnData:
        if memory == "joint":
            return ad.concat(stream.train[: t + 1])
        if memory == "last":
            return stream.train[t]
        data = bank.with_stage(stream.train[t])
        bank.update(stream.train[t])
        return data

    return [(t + 1, lambda t=t: fit(training(t))) for t in range(stream.n_stages)]


def scanvi_rows(stream: canal.datasets.Stream, seed: int) -> list[Row]:
    """The rows of ``scanvi_scarches``: each stage's model is the next stage's reference."""
    space = [*dict.fromkeys(t for data in stream.train for t in data.obs[stream.labels_key].astype(str)), PLACEHOLDER]
    models = []

    def fit(t: int) -> Predictor:
        data = scanvi_input(stream.train[t], space, stream.labels_key)
        with quiet_scvi():
            models.append(fit_scanvi_reference(data, seed) if t == 0 else fit_scanvi_query(data, models[-1]))
        return lambda adata, model=models[-1]: predict_scanvi(model, scanvi_input(adata, space))

    return [(t + 1, lambda t=t: fit(t)) for t in range(stream.n_stages)]


def scanvi_input(adata: ad.AnnData, space: list[str], labels_key: str | None = None) -> ad.AnnData:
    """A copy of `adata` with ``obs["stage"]`` as strings and ``obs[SCANVI_LABELS]``.

    Parameters
    ----------
    adata
        Cells of the stream.
    space
        The types; the labels are categorical over `space` and :data:`UNLABELED`.
    labels_key
        The column of the labels; `None` leaves every cell unlabelled.
    """
    data = adata.copy()
    data.obs["stage"] = data.obs["stage"].astype(str)
    labels = data.obs[labels_key].astype(str).to_numpy() if labels_key else [UNLABELED] * data.n_obs
    data.obs[SCANVI_LABELS] = pd.Categorical(labels, categories=[*space, UNLABELED])
    return data


def fit_scanvi_reference(data: ad.AnnData, seed: int) -> SCANVI:
    """Stage 1: scVI, then scANVI from it; on ``layers["counts"]`` (ZINB) if `data` has it, else on ``X`` (normal)."""
    import scvi

    scvi.settings.seed = seed
    counts = "counts" in data.layers
    scvi.model.SCVI.setup_anndata(data, layer="counts" if counts else None, batch_key="stage", labels_key=SCANVI_LABELS)
    vae = scvi.model.SCVI(data, n_latent=SCANVI_SETTINGS["n_latent"], gene_likelihood="zinb" if counts else "normal")
    vae.train(max_epochs=SCANVI_SETTINGS["scvi_epochs"], **SCVI_TRAIN)
    model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELED)
    model.train(max_epochs=SCANVI_SETTINGS["scanvi_epochs"], **SCVI_TRAIN)
    return model


def fit_scanvi_query(data: ad.AnnData, reference: SCANVI) -> SCANVI:
    """A later stage: scArches surgery on `reference`, trained on `data` with its labels (classifier unfrozen)."""
    import scvi

    model = scvi.model.SCANVI.load_query_data(data, reference, freeze_classifier=False, accelerator="cpu")
    model.train(max_epochs=SCANVI_SETTINGS["query_epochs"], plan_kwargs={"weight_decay": 0.0}, **SCVI_TRAIN)
    return model


def predict_scanvi(model: SCANVI, data: ad.AnnData) -> np.ndarray:
    """scANVI's labels of `data` (its classifier on the latent means)."""
    with quiet_scvi():
        return np.asarray(model.predict(data))


@contextmanager
def quiet_scvi() -> Iterator[None]:
    """Silence the info logs and warnings of scvi-tools and Lightning."""
    import scvi

    scvi.settings.verbosity = logging.ERROR
    for name in ["lightning", "lightning.fabric", "lightning.pytorch"]:
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield

"""Write CANAL's predictions into an AnnData or MuData."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from scanpy_canal._choices import Attention, Fusion, Precision, Score, Threshold
from scanpy_canal._option_docs import PREDICT_DOCS, document_options

from ._majority import majority_votes, over_clusters

if TYPE_CHECKING:
    from mudata import MuData

    from scanpy_canal.model import CANAL, PredictOptions


_NOVELTY_PARAMS = ("novel", "temperature", "threshold", "alpha", "score", "fusion", "seed")
#: The parameters of :func:`annotate` that are not options of a prediction.
_OWN_PARAMETERS = ("data", "model", "majority_voting", "over_clustering", "key_added", "copy")


@document_options(PREDICT_DOCS)
def annotate(
    data: AnnData | MuData,
    model: CANAL | str | os.PathLike,
    *,
    novel: bool = False,
    majority_voting: bool = False,
    over_clustering: str | Sequence | None = None,
    key_added: str = "canal",
    mod: str = "rna",
    batch_size: int | None = None,
    temperature: float = 0.8,
    threshold: Threshold = "conformal",
    alpha: float = 0.05,
    score: Score | Sequence[Score] | None = None,
    fusion: Fusion = "bonferroni",
    seed: int = 0,
    precision: Precision = "auto",
    chunk_size: int = 10_000,
    gene_symbols: str | None = None,
    min_gene_overlap: float = 0.1,
    attention: Attention = "favor",
    compile: bool | None = None,
    devices: int | list[int] | str | None = None,
    strategy: str = "auto",
    refine_threshold: float = 0.5,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Annotate cell types with a trained CANAL model.

    Genes are matched to the model's panel by name; a layer registered with :meth:`~scanpy_canal.CANAL.setup_anndata`
    is used, X otherwise. All outputs come from one forward pass.

    Parameters
    ----------
    data
        Cells with ``log2(1 + counts per 10k)`` values, or a MuData whose modality `mod` holds them.
    model
        A trained :class:`~scanpy_canal.CANAL`, or the directory of a saved one (as ``CANAL.load`` reads it).
    majority_voting
        Also give every cell the prediction that most cells of its cluster in `over_clustering` got (a tie goes to the
        type the model learnt first), as CellTypist does: within a fine cluster, the odd call out is usually noise.
        A cluster whose majority is ``"Unassigned"`` is unassigned as a whole.
    over_clustering
        The clusters of majority voting: a column of ``.obs``, or one label per cell. Default: Leiden clusters at
        resolution 5 of the 15-nearest-neighbour graph of the CANAL embedding.
    key_added
        Prefix of every key written.
    {options}
    copy
        Return an annotated copy instead of writing into `data`.

    Returns
    -------
    `None`, or the annotated copy when `copy`. Writes, for ``key = key_added``:

    ``.obs[f"{key}_prediction"]``
        Categorical cell type, categories in the model's label order (plus ``"Unassigned"`` when `novel`).
    ``.obs[f"{key}_confidence"]``
        Largest class probability.
    ``.obs[f"{key}_depth"]``
        Only when the model's cell-type tree has relations: the depth of the call in the tree (0 for a type without
        a parent, 1 for its children, ...; -1 for ``"Unassigned"``). A call stops at a parent when its children
        cannot be told apart for the cell.
    ``.obs[f"{key}_majority_voting"]``, ``.obs[f"{key}_over_clustering"]``
        Only with `majority_voting`: the majority vote of the cell's cluster (categories as for the prediction), and
        the clusters voted in.
    ``.obs[f"{key}_novelty_score"]``
        The novelty score, higher for cells less like any known type (only when `novel`; in ``[0, 1]`` for the
        ``"mix"`` score). Above ``.uns[key]["threshold"]`` (for the conformal rule: above the cell's type's threshold
        in ``.uns[key]["type_thresholds"]`` if it has one) means unassigned.
    ``.obs[f"{key}_novelty_pvalue"]``
        The conformal p-value of that score (only when `novel`, except with the query-relative ``"canal"`` rule):
        a known cell's is at most ``a`` with probability at most ``a``, so :func:`unassign` can apply another
        `alpha` without running the model again. No other annotation tool we know of gives one.
    ``.obsm[f"{key}_novelty_pvalues"]``, ``.obs[f"{key}_unassigned_by"]``
        Why a cell is unassigned (only when `novel`, except with the ``"canal"`` rule): a DataFrame of each score's
        own conformal p-value (one column per score; several are fused into ``{key}_novelty_pvalue``), and for each
        unassigned cell the score with the smallest p-value (empty for the others).
    ``.obsm[f"{key}_probabilities"]``
        Class probabilities, columns in the order of ``.uns[key]["cell_types"]``.
    ``.obsm[f"X_{key}"]``
        The 64-d embedding, for ``sc.pp.neighbors(adata, use_rep=f"X_{key}")``.
    ``.uns[key]``
        ``params`` (the novel-cell settings and ``majority_voting``), ``stage``, ``cell_types``, ``threshold`` and
        ``type_thresholds`` (per cell type; NaN for the types with too few calibration cells of their own, judged
        together by `threshold`; when those form several groups, each has its group's, and `threshold` is NaN).

    For a MuData these go into ``data.mod[mod]``, and the obs columns also into ``data.obs`` as ``f"{mod}:{name}"``.

    Examples
    --------
    >>> import scanpy as sc, scanpy_canal as canal
    >>> canal.tl.annotate(query, model, novel=True)  # doctest: +SKIP
    >>> canal.tl.annotate(query, "models/pbmc", majority_voting=True)  # doctest: +SKIP
    >>> sc.pp.neighbors(query, use_rep="X_canal")  # doctest: +SKIP
    >>> sc.tl.umap(query)  # doctest: +SKIP
    >>> sc.pl.umap(query, color=["canal_prediction", "canal_novelty_score"])  # doctest: +SKIP
    """
    arguments = dict(locals())  # before the import below binds other names here
    from scanpy_canal.model import CANAL, PredictOptions, from_arguments

    options = from_arguments(PredictOptions, arguments, besides=_OWN_PARAMETERS)  # checked before a cell is read
    if over_clustering is not None and not majority_voting:
        raise ValueError("over_clustering names the clusters of majority voting: pass majority_voting=True too.")
    model = model if isinstance(model, CANAL) else CANAL.load(model)
    data = data.copy() if copy else data
    voting = {"majority_voting": majority_voting, "over_clustering": over_clustering}
    write_annotation(data, model, options, key_added=key_added, **voting)
    return data if copy else None


def write_annotation(
    data: AnnData | MuData,
    model: CANAL,
    options: PredictOptions,
    *,
    key_added: str = "canal",
    majority_voting: bool = False,
    over_clustering: str | Sequence | None = None,
) -> None:
    """Predict `data` with `options` and write the keys :func:`annotate` documents, in place."""
    from scanpy_canal.model import modality

    adata, mod = modality(data, options.mod), options.mod
    outputs = model.predict_outputs(adata, options)
    categories = model.cell_types + (["Unassigned"] if options.novel else [])
    predictions = pd.Categorical(outputs.labels, categories=categories)
    columns = {
        f"{key_added}_prediction": predictions,
        f"{key_added}_confidence": outputs.probabilities.to_numpy().max(axis=1).astype(np.float32),
    }
    if model.cell_type_tree["depth"].any():
        columns[f"{key_added}_depth"] = outputs.depth
    if options.novel:
        columns[f"{key_added}_novelty_score"] = outputs.novelty_score.astype(np.float32)
        if outputs.pvalue is not None:
            columns[f"{key_added}_novelty_pvalue"] = outputs.pvalue.astype(np.float32)
            columns[f"{key_added}_unassigned_by"] = _unassigned_by(outputs.pvalues, outputs.labels)
    if majority_voting:
        clusters = over_clusters(adata, over_clustering, outputs.embedding)
        columns[f"{key_added}_over_clustering"] = clusters
        columns[f"{key_added}_majority_voting"] = majority_votes(predictions, clusters)
    for name, values in columns.items():
        adata.obs[name] = values
    if adata is not data:
        mirror_obs(data, adata, mod, columns)
    if options.novel and outputs.pvalues is not None:
        adata.obsm[f"{key_added}_novelty_pvalues"] = outputs.pvalues.astype(np.float32).set_axis(adata.obs_names)
    adata.obsm[f"{key_added}_probabilities"] = outputs.probabilities.to_numpy().astype(np.float32)
    adata.obsm[f"X_{key_added}"] = outputs.embedding.astype(np.float32)
    adata.uns[key_added] = {
        "params": {name: _storable(getattr(options, name)) for name in _NOVELTY_PARAMS}
        | {"majority_voting": majority_voting},
        "stage": model.stage,
        "cell_types": list(model.cell_types),
        "threshold": outputs.threshold,
        "type_thresholds": np.array([outputs.type_thresholds.get(t, np.nan) for t in model.cell_types]),
    }


def _storable(value):
    """`value`, with a tuple (several novelty scores) as a list, which ``.h5ad`` files store."""
    return list(value) if isinstance(value, tuple) else value


def _unassigned_by(pvalues: pd.DataFrame, labels: np.ndarray) -> pd.Categorical:
    """Per cell, the score with the smallest p-value if the cell is unassigned, else empty."""
    flagged = np.where(labels == "Unassigned", pvalues.columns.to_numpy()[pvalues.to_numpy().argmin(axis=1)], "")
    return pd.Categorical(flagged, categories=["", *pvalues.columns])


def mirror_obs(data: MuData, adata: AnnData, mod: str, names: Iterable[str]) -> None:
    """Copy the columns `names` of ``adata.obs``, the modality `mod` of `data`, to ``data.obs[f"{mod}:{name}"]``."""
    for name in names:
        data.obs[f"{mod}:{name}"] = adata.obs[name].reindex(data.obs_names)


def unassign(adata: AnnData, *, alpha: float, key: str = "canal") -> None:
    """Call ``"Unassigned"`` again, at another `alpha`, from the p-values :func:`annotate` wrote.

    Every cell gets its most probable type from ``.obsm[f"{key}_probabilities"]``, or ``"Unassigned"`` when its
    ``.obs[f"{key}_novelty_pvalue"]`` is at most `alpha`; no model is needed.

    Parameters
    ----------
    adata
        Cells annotated by :func:`annotate` with ``novel=True``.
    alpha
        Largest fraction of known cells to unassign, in ``(0, 1)``.
    key
        The `key_added` of :func:`annotate`.

    Returns
    -------
    `None`; rewrites ``.obs[f"{key}_prediction"]``, ``.obs[f"{key}_unassigned_by"]``, ``.uns[key]["params"]["alpha"]`` and, after majority voting,
    ``.obs[f"{key}_majority_voting"]`` (in the same clusters).

    Examples
    --------
    >>> canal.tl.annotate(query, model, novel=True)  # doctest: +SKIP
    >>> canal.tl.unassign(query, alpha=0.01)  # doctest: +SKIP
    """
    from scanpy_canal.model import PredictOptions

    PredictOptions(alpha=alpha)  # checks it
    pvalue = f"{key}_novelty_pvalue"
    if pvalue not in adata.obs or key not in adata.uns:
        raise ValueError(f"adata.obs has no {pvalue!r}: run `canal.tl.annotate(adata, model, novel=True)` first.")
    cell_types = list(adata.uns[key]["cell_types"])
    best = np.asarray(cell_types, dtype=object)[np.asarray(adata.obsm[f"{key}_probabilities"]).argmax(axis=1)]
    labels = np.where(adata.obs[pvalue].to_numpy() <= alpha, "Unassigned", best)
    predictions = pd.Categorical(labels, categories=[*cell_types, "Unassigned"])
    adata.obs[f"{key}_prediction"] = predictions
    if f"{key}_novelty_pvalues" in adata.obsm:
        adata.obs[f"{key}_unassigned_by"] = _unassigned_by(pd.DataFrame(adata.obsm[f"{key}_novelty_pvalues"]), labels)
    if f"{key}_majority_voting" in adata.obs:
        clusters = pd.Categorical(adata.obs[f"{key}_over_clustering"].astype(str))
        adata.obs[f"{key}_majority_voting"] = majority_votes(predictions, clusters)
    adata.uns[key]["params"]["alpha"] = alpha

"""Write CANAL's predictions into an AnnData or MuData."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

if TYPE_CHECKING:
    from mudata import MuData

    from scanpy_canal.model import CANAL
    from scanpy_canal.model._options import PredictOptions


_NOVELTY_PARAMS = ("novel", "temperature", "threshold", "alpha", "score", "seed")


def annotate(
    data: AnnData | MuData,
    model: CANAL,
    *,
    novel: bool = False,
    key_added: str = "canal",
    mod: str = "rna",
    batch_size: int | None = None,
    temperature: float = 0.8,
    threshold: Literal["conformal", "calibrated", "canal"] | float = "conformal",
    alpha: float = 0.05,
    score: Literal["mix", "energy", "max_probability", "knn", "mahalanobis"] | None = None,
    seed: int = 0,
    precision: Literal["32", "bf16"] = "32",
    chunk_size: int = 10_000,
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
        A trained :class:`~scanpy_canal.CANAL`.
    novel
        Call cells of never-seen types ``"Unassigned"`` and write their novelty score and p-value.
    key_added
        Prefix of every key written.
    mod
        Modality of a MuData to annotate.
    batch_size
        Cells per forward pass.
    temperature, threshold, alpha, score, seed
        Novel-cell detection settings, see :meth:`~scanpy_canal.CANAL.predict`: by default a cell is unassigned when
        its conformal p-value is at most `alpha`, so at most that fraction of known cells is (in expectation).
    precision
        ``"32"`` or ``"bf16"`` (bfloat16 autocast), see :meth:`~scanpy_canal.CANAL.predict`.
    chunk_size
        Cells read and predicted at a time; a backed AnnData (``anndata.read_h5ad(path, backed="r")``) is read from
        disk chunk by chunk, so memory stays bounded.
    copy
        Return an annotated copy instead of writing into `data`.

    Returns
    -------
    `None`, or the annotated copy when `copy`. Writes, for ``key = key_added``:

    ``.obs[f"{key}_prediction"]``
        Categorical cell type, categories in the model's label order (plus ``"Unassigned"`` when `novel`).
    ``.obs[f"{key}_confidence"]``
        Largest class probability.
    ``.obs[f"{key}_uncertainty"]``
        The novelty score, higher for cells less like any known type (only when `novel`; in ``[0, 1]`` for the
        ``"mix"`` score). Above ``.uns[key]["threshold"]`` (for the conformal rule: above the cell's type's threshold
        in ``.uns[key]["type_thresholds"]`` if it has one) means unassigned.
    ``.obs[f"{key}_novelty_pvalue"]``
        The conformal p-value of that score (only when `novel`, except with the query-relative ``"canal"`` rule):
        a known cell's is at most ``a`` with probability at most ``a``, so :func:`unassign` can apply another
        `alpha` without running the model again. No other annotation tool we know of gives one.
    ``.obsm[f"{key}_probabilities"]``
        Class probabilities, columns in the order of ``.uns[key]["cell_types"]``.
    ``.obsm[f"X_{key}"]``
        The 64-d embedding, for ``sc.pp.neighbors(adata, use_rep=f"X_{key}")``.
    ``.uns[key]``
        ``params``, ``stage``, ``cell_types``, ``threshold`` and ``type_thresholds`` (per cell type, NaN for the types
        judged by the pooled `threshold`).

    For a MuData these go into ``data.mod[mod]``, and the obs columns also into ``data.obs`` as ``f"{mod}:{name}"``.

    Examples
    --------
    >>> import scanpy as sc, scanpy_canal as canal
    >>> canal.tl.annotate(query, model, novel=True)  # doctest: +SKIP
    >>> sc.pp.neighbors(query, use_rep="X_canal")  # doctest: +SKIP
    >>> sc.tl.umap(query)  # doctest: +SKIP
    >>> sc.pl.umap(query, color=["canal_prediction", "canal_uncertainty"])  # doctest: +SKIP
    """
    from scanpy_canal.model._options import PredictOptions, from_arguments

    data = data.copy() if copy else data
    write_annotation(data, model, from_arguments(PredictOptions, locals()), key_added=key_added, mod=mod)
    return data if copy else None


def write_annotation(
    data: AnnData | MuData, model: CANAL, options: PredictOptions, *, key_added: str = "canal", mod: str = "rna"
) -> None:
    """Predict `data` with `options` and write the keys :func:`annotate` documents, in place."""
    adata = data if isinstance(data, AnnData) else _modality(data, mod)
    outputs = model._predict_outputs(adata, options)
    categories = model.cell_types + (["Unassigned"] if options.novel else [])
    columns = {
        f"{key_added}_prediction": pd.Categorical(outputs.labels, categories=categories),
        f"{key_added}_confidence": outputs.probabilities.to_numpy().max(axis=1).astype(np.float32),
    }
    if options.novel:
        columns[f"{key_added}_uncertainty"] = outputs.uncertainty.astype(np.float32)
        if outputs.pvalue is not None:
            columns[f"{key_added}_novelty_pvalue"] = outputs.pvalue.astype(np.float32)
    for name, values in columns.items():
        adata.obs[name] = values
        if adata is not data:
            data.obs[f"{mod}:{name}"] = pd.Series(values, index=adata.obs_names).reindex(data.obs_names)
    adata.obsm[f"{key_added}_probabilities"] = outputs.probabilities.to_numpy().astype(np.float32)
    adata.obsm[f"X_{key_added}"] = outputs.embedding.astype(np.float32)
    adata.uns[key_added] = {
        "params": {name: getattr(options, name) for name in _NOVELTY_PARAMS},
        "stage": model.stage,
        "cell_types": list(model.cell_types),
        "threshold": outputs.threshold,
        "type_thresholds": np.array([outputs.type_thresholds.get(t, np.nan) for t in model.cell_types]),
    }


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
    `None`; rewrites ``.obs[f"{key}_prediction"]`` and ``.uns[key]["params"]["alpha"]``.

    Examples
    --------
    >>> canal.tl.annotate(query, model, novel=True)  # doctest: +SKIP
    >>> canal.tl.unassign(query, alpha=0.01)  # doctest: +SKIP
    """
    from scanpy_canal.model._options import PredictOptions

    PredictOptions(alpha=alpha)  # checks it
    pvalue = f"{key}_novelty_pvalue"
    if pvalue not in adata.obs or key not in adata.uns:
        raise ValueError(f"adata.obs has no {pvalue!r}: run `canal.tl.annotate(adata, model, novel=True)` first.")
    cell_types = list(adata.uns[key]["cell_types"])
    best = np.asarray(cell_types, dtype=object)[np.asarray(adata.obsm[f"{key}_probabilities"]).argmax(axis=1)]
    labels = np.where(adata.obs[pvalue].to_numpy() <= alpha, "Unassigned", best)
    adata.obs[f"{key}_prediction"] = pd.Categorical(labels, categories=[*cell_types, "Unassigned"])
    adata.uns[key]["params"]["alpha"] = alpha


def _modality(data: MuData, mod: str) -> AnnData:
    if mod not in data.mod:
        raise KeyError(f"MuData has no modality {mod!r}; it has {list(data.mod)}.")
    return data.mod[mod]

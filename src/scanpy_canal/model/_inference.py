"""Prediction: batched forward passes over a query read in chunks, and novel-cell calls from the same pass."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse

from scanpy_canal._choices import Fusion, Precision, Score
from scanpy_canal._option_docs import PREDICT_DOCS, document_options
from scanpy_canal.nn import PerformerLM

from ._conformal import conformal_pvalues, score_thresholds, type_scale
from ._data import layer_matrix, modality, panel_chunk, query_panel
from ._novelty import calibrated_reference, mixup_reference
from ._options import FALLBACK_SCORE, PredictOptions, check_precision, from_arguments
from ._scores import BANK_SCORES, ScoreReference, fuse_pvalues, scaled_maximum
from ._streaming import ForwardSettings, forward_chunks, forward_settings
from ._tree import among_children, decode, has_children

if TYPE_CHECKING:
    from mudata import MuData

UNASSIGNED = "Unassigned"
logger = logging.getLogger("scanpy_canal")


@dataclass
class Outputs:
    """Everything one forward pass over a query gives (see :meth:`~scanpy_canal.CANAL.predict`).

    With novel-cell detection also: each cell's novelty score (`novelty_score`; with several scores fused, one minus
    the fused p-value) and, except with the query-relative ``"canal"`` rule, its conformal p-value (fused from
    those of each score, in the columns of `scores` and `pvalues`); the score above which a cell is unassigned
    (`threshold`; for the conformal rule that of the types with too few calibration cells of their own, judged
    together, NaN if there are none or they form several groups, and those of the others in `type_thresholds`; with
    fused scores ``1 - alpha``, reached or passed). With a cell-type tree, `labels` are as fine as each cell allows
    and `depth` is the depth of each call in the tree (0 at a root, -1 for ``"Unassigned"``).
    """

    labels: np.ndarray
    probabilities: pd.DataFrame
    embedding: np.ndarray
    novelty_score: np.ndarray | None = None
    pvalue: np.ndarray | None = None
    threshold: float | None = None
    type_thresholds: dict[str, float] = field(default_factory=dict)
    depth: np.ndarray | None = None
    scores: pd.DataFrame | None = None
    pvalues: pd.DataFrame | None = None

    def novelty_frame(self) -> pd.DataFrame:
        """What :meth:`~scanpy_canal.CANAL.get_novelty` returns: prediction, score, p-value, then each score's."""
        columns = {"prediction": self.probabilities.idxmax(axis=1), "score": self.novelty_score, "pvalue": self.pvalue}
        for name in self.scores.columns:
            columns[f"{name}_score"] = self.scores[name].to_numpy()
            columns[f"{name}_pvalue"] = self.pvalues[name].to_numpy()
        return pd.DataFrame(columns, index=self.probabilities.index)


def forward_in_batches(
    network: PerformerLM, x: sparse.csr_matrix | np.ndarray, batch_size: int, precision: Precision = "32"
) -> dict[str, torch.Tensor]:
    """Manifold, embedding and logits (float32, on the CPU) of every row of `x`; `network` is put in eval mode."""
    return forward_chunks(network, [x], ForwardSettings(batch_size, check_precision(precision)))


class InferenceMixin:
    """Forward passes of a CANAL model over a query and novel-cell calls; for :class:`~scanpy_canal.CANAL`.

    Reads the model's ``module``, ``genes_``, ``cell_types_``, ``example_bank_`` and ``calibration_cells_``.
    """

    def _forward(
        self, x: sparse.csr_matrix | np.ndarray, batch_size: int | None = None, precision: Precision = "32"
    ) -> dict[str, torch.Tensor]:
        """Manifold, embedding and logits (float32, on the CPU) of every row of `x`, in batches."""
        network = self.module.network
        batch_size = batch_size or self.module.inference_batch_size(next(network.parameters()).device)
        return forward_in_batches(network, x, batch_size, precision)

    @document_options(PREDICT_DOCS)
    def get_latent_representation(
        self,
        adata: ad.AnnData | MuData | None = None,
        *,
        batch_size: int | None = None,
        precision: Precision = "auto",
        chunk_size: int = 10_000,
        gene_symbols: str | None = None,
        min_gene_overlap: float = 0.1,
        mod: str = "rna",
    ) -> np.ndarray:
        """The 64-d embedding of each cell (the head's ``fc2`` output), shape ``(n_obs, 64)``.

        Parameters
        ----------
        adata
            The cells, as for :meth:`predict`; default: the stage-1 data.
        {options}
        """
        options = from_arguments(PredictOptions, locals(), besides=("self", "adata"))
        return self.predict_outputs(adata, options).embedding

    @document_options(PREDICT_DOCS)
    def get_novelty(
        self,
        adata: ad.AnnData | MuData | None = None,
        *,
        score: Score | Sequence[Score] | None = None,
        fusion: Fusion = "bonferroni",
        temperature: float = 0.8,
        batch_size: int | None = None,
        precision: Precision = "auto",
        chunk_size: int = 10_000,
        gene_symbols: str | None = None,
        min_gene_overlap: float = 0.1,
        mod: str = "rna",
    ) -> pd.DataFrame:
        """Each cell's closed-set prediction, novelty scores and conformal p-values, to unassign at any `alpha` later.

        A known cell's p-value is at most `alpha` with probability at most `alpha`; ``predict(novel=True, alpha=a)``
        unassigns the cells whose p-value is at most ``a``.

        Parameters
        ----------
        adata
            The cells, as for :meth:`predict`; default: the stage-1 data.
        {options}

        Returns
        -------
        A DataFrame indexed by ``obs_names``: ``prediction`` (the most probable type), ``score`` (with several
        scores, one minus the fused p-value), ``pvalue`` (fused), then ``{name}_score`` and ``{name}_pvalue`` for
        each score (the smallest p-value says which score flags the cell).

        Examples
        --------
        >>> novelty = model.get_novelty(query)  # doctest: +SKIP
        >>> labels = novelty["prediction"].where(novelty["pvalue"] > 0.01, "Unassigned")  # doctest: +SKIP
        """
        options = from_arguments(PredictOptions, {**locals(), "novel": True}, besides=("self", "adata"))
        outputs = self.predict_outputs(adata, options)
        return outputs.novelty_frame()

    def _forward_query(self, adata: ad.AnnData, options: PredictOptions, project: bool) -> dict[str, torch.Tensor]:
        """Manifold, embedding and logits of every cell of `adata`, here or on the `devices` of `options`.

        With `project`, also the cells' input-space coordinates (``"input"``), from the chunks the network reads.
        """
        if options.devices is not None:
            from ._distributed import distributed_forward

            forward = distributed_forward(self, adata, options)
            if project:  # the ranks read their own shares of the query: its coordinates are made here
                chunks = self._query_chunks(adata, options)
                forward["input"] = torch.cat([self.input_reference_.project(chunk) for chunk in chunks])
            return forward
        projections: list[torch.Tensor] = []
        chunks = self._query_chunks(adata, options)
        if project:
            chunks = _projected(chunks, self.input_reference_, projections)
        network = self.module.network
        device = next(network.parameters()).device
        settings = forward_settings(options, self.module.inference_batch_size(device), device, adata.n_obs)
        forward = forward_chunks(network, chunks, settings)
        if project:
            forward["input"] = torch.cat(projections)
        return forward

    def _query_chunks(self, adata: ad.AnnData, options: PredictOptions) -> Iterator[sparse.csr_matrix]:
        """The query's values in the gene panel, ``options.chunk_size`` cells at a time (from disk when backed)."""
        layer, columns, found = query_panel(
            type(self), adata, self.genes_, gene_symbols=options.gene_symbols, min_overlap=options.min_gene_overlap
        )
        x = layer_matrix(adata, layer)
        for start in range(0, adata.n_obs, options.chunk_size):
            yield panel_chunk(x, start, options.chunk_size, columns, found)

    def predict_outputs(
        self, adata: ad.AnnData | MuData | None = None, options: PredictOptions | None = None
    ) -> Outputs:
        """Everything :meth:`predict` knows about each cell, from one forward pass: for tools built on the model.

        Parameters
        ----------
        adata
            The cells, as for :meth:`predict`; default: the stage-1 data.
        options
            The options of :meth:`predict` (default: its defaults), e.g.
            ``PredictOptions(novel=True, alpha=0.01)``.

        Returns
        -------
        The labels (``"Unassigned"`` for novel cells when ``options.novel``), the class probabilities, the embedding
        and, with ``options.novel``, each cell's novelty score, p-value and the thresholds used.

        Examples
        --------
        >>> from scanpy_canal.model import PredictOptions
        >>> outputs = model.predict_outputs(query, PredictOptions(novel=True))  # doctest: +SKIP
        >>> closed_set = outputs.probabilities.idxmax(axis=1)  # doctest: +SKIP
        """
        if self.stage_ == 0:
            raise ValueError(
                "The model has trained no stage: its outputs would come from untrained weights. Train a stage first "
                "(`model.train()`)."
            )
        options = PredictOptions() if options is None else options
        adata = modality(self.adata if adata is None else adata, options.mod)
        if adata is None:
            raise ValueError("Pass the cells to annotate.")
        if adata.n_obs == 0:
            raise ValueError("The query has no cells.")
        scores = self._usable_scores(options) if options.novel and options.threshold != "canal" else ()
        forward = self._forward_query(adata, options, project="input" in scores)
        probabilities = forward["logits"].softmax(dim=-1)
        labels = np.asarray(self.cell_types_, dtype=object)[probabilities.argmax(dim=-1).numpy()]
        depth = np.zeros(len(labels), dtype=np.int64)
        if has_children(self.cell_type_parents_):
            labels, depth = decode(
                probabilities.numpy(),
                self.cell_type_parents_,
                self.cell_types_,
                refine_threshold=options.refine_threshold,
            )
        outputs = Outputs(
            labels=labels,
            probabilities=pd.DataFrame(probabilities.numpy(), index=adata.obs_names, columns=self.cell_types_),
            embedding=forward["embedding"].numpy(),
            depth=depth,
        )
        if options.novel:
            with torch.inference_mode():
                self._call_novel(outputs, forward, options, scores)
            kept = among_children(probabilities.numpy(), self.cell_type_parents_, self.cell_types_, labels)
            outputs.labels = np.where((outputs.labels == UNASSIGNED) & kept, labels, outputs.labels)  # a new kind of it
            outputs.depth = np.where(outputs.labels == UNASSIGNED, -1, outputs.depth)
        return outputs

    def _usable_scores(self, options: PredictOptions) -> tuple[str, ...]:
        """The scores of `options` this model can compute.

        Without an input-space reference (a model saved before there was one), the default goes on with
        :data:`FALLBACK_SCORE` and fused scores without ``"input"``, said once per model; ``"input"`` asked for alone
        is an error.
        """
        scores = options.scores
        if "input" not in scores or self.input_reference_ is not None:
            return scores
        if options.default_score:
            scores = (*scores, FALLBACK_SCORE)
        elif len(scores) == 1:
            raise ValueError(
                "This model has no input-space reference for the 'input' novelty score: it was saved by an earlier "
                "scanpy-canal. Train another stage to make one, or choose another score."
            )
        if not getattr(self, "_warned_no_input_reference", False):
            logger.warning(
                "This model was saved by an earlier scanpy-canal without an input-space reference: novel cells are "
                "called from %s alone until it trains another stage.",
                ", ".join(score for score in scores if score != "input"),
            )
            self._warned_no_input_reference = True
        return tuple(score for score in scores if score != "input")

    def _call_novel(
        self, outputs: Outputs, forward: dict[str, torch.Tensor], options: PredictOptions, kinds: tuple[str, ...]
    ) -> None:
        """Score every cell's novelty and unassign those the threshold rule rejects, in `outputs`."""
        logits, temperature = forward["logits"], options.temperature
        if options.threshold == "canal":
            generator = torch.Generator().manual_seed(options.seed)
            rule = mixup_reference(
                forward["manifold"], logits, self._classify, temperature=temperature, generator=generator
            )
            scores, outputs.threshold = rule.uncertainty(logits, temperature), rule.threshold
            unassigned = scores > rule.threshold
        else:
            calibration = self._calibration_outputs(with_input="input" in kinds)
            has_bank = self.example_bank_ is not None and self.example_bank_.n_obs > 0
            on_bank_scores = bool(set(kinds) & set(BANK_SCORES))
            bank_cells = self._bank_cells("input" in kinds) if has_bank or on_bank_scores else {}
            bank = (bank_cells["embedding"], bank_cells["codes"]) if on_bank_scores else (None, None)
            reference = ScoreReference.build(calibration["logits"], temperature, *bank, self.input_reference_)
            score = lambda kind, cells: reference.score(
                kind, cells["logits"], cells["embedding"], temperature, cells.get("input")
            )
            predicted, calibration_predicted = logits.argmax(dim=-1), calibration["logits"].argmax(dim=-1)
            n_types = logits.shape[-1]
            # The bank's scores: the scale of fusion, and each type's typical score, which groups the rare types.
            on_bank, scales = {}, dict.fromkeys(kinds)
            if has_bank:
                on_bank = {kind: score(kind, bank_cells) for kind in kinds}
                scales = {kind: type_scale(on_bank[kind], bank_cells["codes"], n_types) for kind in kinds}
            per_score, per_pvalue, on_calibration = {}, {}, {}
            for kind in kinds:
                per_score[kind], on_calibration[kind] = score(kind, forward), score(kind, calibration)
                per_pvalue[kind] = conformal_pvalues(
                    per_score[kind], predicted, on_calibration[kind], calibration_predicted, n_types, scales[kind]
                )
            calibration_scores = on_calibration[kinds[0]]
            if len(kinds) == 1:
                pvalues = per_pvalue[kinds[0]]
            elif options.fusion == "scaled" and on_bank:
                pvalues = conformal_pvalues(
                    scaled_maximum(per_score, on_bank),
                    predicted,
                    scaled_maximum(on_calibration, on_bank),
                    calibration_predicted,
                    n_types,
                    type_scale(scaled_maximum(on_bank, on_bank), bank_cells["codes"], n_types),
                )
            else:
                pvalues = fuse_pvalues(per_pvalue.values())
            index = outputs.probabilities.index
            outputs.scores = pd.DataFrame({k: v.numpy() for k, v in per_score.items()}, index=index)
            outputs.pvalues = pd.DataFrame({k: v.numpy() for k, v in per_pvalue.items()}, index=index)
            outputs.pvalue = pvalues.numpy()
            scores = per_score[kinds[0]] if len(kinds) == 1 else 1 - pvalues.float()
            if options.threshold == "conformal":
                unassigned = pvalues <= options.alpha
                if len(kinds) == 1:
                    outputs.threshold, per_type = score_thresholds(
                        calibration_scores, calibration_predicted, options.alpha, n_types, scales[kinds[0]]
                    )
                    outputs.type_thresholds = {self.cell_types_[code]: value for code, value in per_type.items()}
                else:  # one minus the fused p-value: unassigned at or above 1 - alpha
                    outputs.threshold = 1 - options.alpha
            else:
                outputs.threshold = self._fixed_threshold(calibration, options)
                unassigned = scores > outputs.threshold
        outputs.novelty_score = scores.numpy()
        outputs.labels = np.where(unassigned.numpy(), UNASSIGNED, outputs.labels).astype(object)

    def _fixed_threshold(self, calibration: dict[str, torch.Tensor], options: PredictOptions) -> float:
        """The threshold of the ``"calibrated"`` rule, or the number given."""
        if options.threshold != "calibrated":
            return float(options.threshold)
        generator = torch.Generator().manual_seed(options.seed)
        rule = calibrated_reference(
            calibration["manifold"],
            calibration["logits"],
            self._classify,
            temperature=options.temperature,
            generator=generator,
        )
        return rule.threshold

    def _classify(self, manifold: torch.Tensor) -> torch.Tensor:
        """Logits of manifold vectors (the head's last layers)."""
        return self.module.head.classify(manifold.to(self.device))[1].float().cpu()

    def _calibration_outputs(self, with_input: bool = False) -> dict[str, torch.Tensor]:
        """Manifold vectors, embeddings, logits and (`with_input`) input-space coordinates of the calibration cells."""
        if self.calibration_cells_ is None:
            raise ValueError(
                "The model has no calibration cells for novel-cell detection: train a stage first (with "
                "calibration_size > 0), or use threshold='canal'."
            )
        manifold = torch.as_tensor(self.calibration_cells_.obsm["manifold"])
        embedding, logits = self.module.head.classify(manifold.to(self.device))
        outputs = {"manifold": manifold, "embedding": embedding.float().cpu(), "logits": logits.float().cpu()}
        if with_input:
            outputs["input"] = self.input_reference_.project(sparse.csr_matrix(self.calibration_cells_.X))
        return outputs

    def _bank_cells(self, with_input: bool) -> dict[str, torch.Tensor]:
        """Embeddings, logits, type codes and (`with_input`) input-space coordinates of the bank's cells."""
        bank = self.example_bank_
        if bank is None or bank.n_obs == 0:
            raise ValueError("The 'knn' and 'mahalanobis' novelty scores need an example bank; this model keeps none.")
        if "manifold" not in bank.obsm:  # e.g. a bank imported from the original tool: computed once
            bank.obsm["manifold"] = self._forward(bank.X)["manifold"].numpy()
        embedding, logits = self.module.head.classify(torch.as_tensor(bank.obsm["manifold"]).to(self.device))
        codes = pd.Categorical(bank.obs["cell_type"].astype(str), categories=self.cell_types_).codes
        cells = {
            "embedding": embedding.float().cpu(),
            "logits": logits.float().cpu(),
            "codes": torch.tensor(codes, dtype=torch.long),
        }
        if with_input:
            cells["input"] = self.input_reference_.project(sparse.csr_matrix(bank.X))
        return cells


def _projected(chunks: Iterator[sparse.csr_matrix], reference, projections: list[torch.Tensor]):
    """`chunks`, unchanged, after appending each one's input-space coordinates under `reference` to `projections`."""
    for chunk in chunks:
        projections.append(reference.project(chunk))
        yield chunk

"""Prediction: batched forward passes over a query read in chunks, and novel-cell calls from the same pass."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse

from scanpy_canal.nn import PerformerLM, tokenize
from scanpy_canal.pp._align import panel_columns, scatter_columns

from ._data import check_expression, layer_matrix, setup_args
from ._novelty import NoveltyReference, calibrated_reference, mixup_reference
from ._options import Precision, PredictOptions, check_precision

UNASSIGNED = "Unassigned"


@dataclass
class Outputs:
    """Everything one forward pass over a query gives (see :meth:`~scanpy_canal.CANAL.predict`)."""

    labels: np.ndarray
    probabilities: pd.DataFrame
    embedding: np.ndarray
    uncertainty: np.ndarray | None = None
    threshold: float | None = None


@torch.inference_mode()
def forward_in_batches(
    network: PerformerLM, x: sparse.csr_matrix | np.ndarray, batch_size: int, precision: Precision = "32"
) -> dict[str, torch.Tensor]:
    """Manifold, embedding and logits (float32, on the CPU) of every row of `x`; `network` is put in eval mode."""
    network.eval()
    device = next(network.parameters()).device
    outputs: dict[str, list[torch.Tensor]] = {"manifold": [], "embedding": [], "logits": []}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=check_precision(precision) == "bf16"):
        for start in range(0, x.shape[0], batch_size):
            tokens = tokenize(x[start : start + batch_size])
            if device.type == "cuda":  # page-locked memory lets the copy overlap the previous batch's work
                tokens = tokens.pin_memory()
            tokens = tokens.to(device, non_blocking=True)
            for key, value in zip(outputs, network(tokens), strict=True):
                outputs[key].append(value.float().cpu())
    return {key: torch.cat(values) for key, values in outputs.items()}


class InferenceMixin:
    """Forward passes of a CANAL model over a query and novel-cell calls; for :class:`~scanpy_canal.CANAL`.

    Reads the model's ``module``, ``genes_``, ``cell_types_`` and ``calibration_``.
    """

    def _forward(
        self, x: sparse.csr_matrix | np.ndarray, batch_size: int | None = None, precision: Precision = "32"
    ) -> dict[str, torch.Tensor]:
        """Manifold, embedding and logits (float32, on the CPU) of every row of `x`, in batches."""
        network = self.module.network
        batch_size = batch_size or self.module.inference_batch_size(next(network.parameters()).device)
        return forward_in_batches(network, x, batch_size, precision)

    def _query_chunks(self, adata: ad.AnnData, chunk_size: int) -> Iterator[sparse.csr_matrix]:
        """The query's values in the gene panel, `chunk_size` cells at a time (from disk when `adata` is backed)."""
        _, layer = setup_args(type(self), adata)
        columns, found = panel_columns(adata, self.genes_)
        x = layer_matrix(adata, layer)
        for start in range(0, adata.n_obs, chunk_size):
            chunk = scatter_columns(x[start : start + chunk_size][:, columns], found)
            check_expression(chunk, what="the query")
            yield chunk

    def _predict_outputs(self, adata: ad.AnnData | None, options: PredictOptions) -> Outputs:
        """Labels, probabilities and embedding of every cell of `adata` (default: the model's data) in one pass."""
        if adata is None:
            adata = self.adata
        if adata is None:
            raise ValueError("Pass the cells to annotate.")
        if adata.n_obs == 0:
            raise ValueError("The query has no cells.")
        chunks = [
            self._forward(chunk, options.batch_size, options.precision)
            for chunk in self._query_chunks(adata, options.chunk_size)
        ]
        forward = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
        probabilities = forward["logits"].softmax(dim=-1)
        labels = np.asarray(self.cell_types_, dtype=object)[probabilities.argmax(dim=-1).numpy()]
        outputs = Outputs(
            labels=labels,
            probabilities=pd.DataFrame(probabilities.numpy(), index=adata.obs_names, columns=self.cell_types_),
            embedding=forward["embedding"].numpy(),
        )
        if options.novel:
            with torch.inference_mode():
                reference = self._novelty_reference(forward["manifold"], forward["logits"], options)
            uncertainty = reference.uncertainty(forward["logits"], options.temperature).numpy()
            outputs.labels = np.where(uncertainty > reference.threshold, UNASSIGNED, labels).astype(object)
            outputs.uncertainty, outputs.threshold = uncertainty, reference.threshold
        return outputs

    def _novelty_reference(
        self, manifold: torch.Tensor, logits: torch.Tensor, options: PredictOptions
    ) -> NoveltyReference:
        """The energy range and uncertainty threshold that ``options.threshold`` asks for."""
        generator = torch.Generator().manual_seed(options.seed)
        classify = lambda m: self.module.head.classify(m.to(self.device))[1]
        if options.threshold == "canal":
            return mixup_reference(manifold, logits, classify, temperature=options.temperature, generator=generator)
        if self.calibration_ is None:
            raise ValueError("The model has no calibration cells yet: train a stage first, or use threshold='canal'.")
        calibration_logits = classify(self.calibration_).float().cpu()
        reference = calibrated_reference(
            self.calibration_, calibration_logits, classify, temperature=options.temperature, generator=generator
        )
        if options.threshold == "calibrated":
            return reference
        return NoveltyReference(reference.energy_min, reference.energy_max, float(options.threshold))

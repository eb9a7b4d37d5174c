"""Finding, before a stage trains, how its new cell types relate to the known ones; for the stage procedure."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ._options import PredictOptions
from ._relations import find_relations, reverse_shares

logger = logging.getLogger("scanpy_canal")


class RelationFindingMixin:
    """The relations of a stage's new types, from the model's calls of the stage's cells (see :mod:`._relations`).

    Reads the model's ``cell_types_``, ``cell_type_parents_``, ``calibration_cells_``, ``example_bank_`` and
    ``stage_``; predicts through :class:`InferenceMixin`.
    """

    def _find_relations(
        self, data: ad.AnnData, labels: np.ndarray, new_types: list[str], threshold: float
    ) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
        """The relations of the new types to the known ones, from the model's calls of the stage's cells before it."""
        if self.stage_ == 0 or not new_types:
            return {}, {}
        with torch.random.fork_rng(devices=[]):  # the stage trains from the same random state as without it
            outputs = self.predict_outputs(data, PredictOptions(novel=self.calibration_cells_ is not None))
        if self.calibration_cells_ is None:
            logger.info("No calibration cells: relations are found from closed-set calls, without novel-cell calls.")
        relations, evidence = find_relations(
            outputs.labels,
            labels,
            self.cell_types_,
            new_types,
            self.cell_type_parents_,
            threshold=threshold,
            reverse=self._reverse_shares(data, labels),
        )
        for child, parent in relations.items():
            logger.info("Cell-type tree: %r is found to be a child of %r.", child, parent)
        return relations, evidence

    def _reverse_shares(self, data: ad.AnnData, labels: np.ndarray) -> pd.DataFrame | None:
        """The reverse check of the relations: the known types' held-out cells classified by the stage's labels."""
        reference = self.calibration_cells_ if self.calibration_cells_ is not None else self.example_bank_
        if reference is None or reference.n_obs == 0 or len(set(labels)) < 2:
            return None
        return reverse_shares(data.X, labels, reference.X, reference.obs["cell_type"].astype(str).to_numpy())

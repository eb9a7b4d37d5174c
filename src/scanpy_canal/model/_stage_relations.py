"""How a stage's new cell types relate to the known ones, found before it trains or told; for the stage procedure."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ._data import registered_ontology_key
from ._ontology import cell_ontology, ontology_relations, read_terms
from ._options import PredictOptions, StageSettings
from ._relations import find_relations, reverse_shares

logger = logging.getLogger("scanpy_canal")


class RelationFindingMixin:
    """The relations of a stage's new types, from the model's calls of the stage's cells (see :mod:`._relations`).

    Reads the model's ``cell_types_``, ``cell_type_parents_``, ``cell_type_terms_``, ``calibration_cells_``,
    ``example_bank_`` and ``stage_``; predicts through :class:`InferenceMixin`.
    """

    def _stage_relations(
        self, data: ad.AnnData, labels: np.ndarray, new_types: list[str], settings: StageSettings, *, ontology: bool
    ) -> tuple[dict[str, str], dict[str, dict]]:
        """The relations ``{child: parent}`` a stage adds, with their evidence.

        Told (``settings.parents``), from the Cell Ontology (`ontology`: the stage's types carry ids), or found.
        """
        if settings.parents != "find":
            return dict(settings.parents), {}
        if ontology:
            return ontology_relations(self.cell_type_terms_, new_types, self.cell_type_parents_, cell_ontology())
        return self._find_relations(data, labels, new_types, settings.relation_threshold)

    def _stage_terms(self, adata: ad.AnnData | None, labels: np.ndarray) -> dict[str, str]:
        """The Cell Ontology id of each of the stage's types, from the registered ``ontology_key`` ({} without)."""
        adata = self.adata if adata is None else adata
        ontology_key = registered_ontology_key(type(self), adata)
        return {} if ontology_key is None else read_terms(adata.obs, labels, ontology_key)

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
            reverse_kept=self._reverse_shares(data, labels, with_kept_cells=True),
        )
        for child, parent in relations.items():
            logger.info("Cell-type tree: %r is found to be a child of %r.", child, parent)
        return relations, evidence

    def _reverse_shares(
        self, data: ad.AnnData, labels: np.ndarray, *, with_kept_cells: bool = False
    ) -> pd.DataFrame | None:
        """The reverse check of the relations: the known types' held-out cells classified by the stage's labels.

        Held out: the calibration cells, or without them the bank. `with_kept_cells`: the bank's cells join the
        classes under their own types (the coarse types' check; `None` without calibration cells).
        """
        held_out = self.calibration_cells_ if self.calibration_cells_ is not None else self.example_bank_
        kept = self.example_bank_ if with_kept_cells and self.calibration_cells_ is not None else None
        if held_out is None or held_out.n_obs == 0 or (with_kept_cells and (kept is None or kept.n_obs == 0)):
            return None
        if kept is None:
            return None if len(set(labels)) < 2 else reverse_shares(data.X, labels, held_out.X, _types(held_out))
        return reverse_shares(data.X, labels, held_out.X, _types(held_out), kept_x=kept.X, kept_labels=_types(kept))


def _types(cells: ad.AnnData) -> np.ndarray:
    return cells.obs["cell_type"].astype(str).to_numpy()

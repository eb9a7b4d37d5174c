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
        reverse, reverse_kept = self._reverse_checks(data, labels)
        relations, evidence = find_relations(
            outputs.labels,
            labels,
            self.cell_types_,
            new_types,
            self.cell_type_parents_,
            threshold=threshold,
            reverse=reverse,
            reverse_kept=reverse_kept,
        )
        for child, parent in relations.items():
            logger.info("Cell-type tree: %r is found to be a child of %r.", child, parent)
        return relations, evidence

    def _reverse_checks(self, data: ad.AnnData, labels: np.ndarray) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
        """The reverse checks: held-out known cells classified by the stage's labels, alone and beside kept cells.

        Alone: for the refinements. Beside the bank's kept cells, under their own types: for the coarse types. Held
        out: the calibration cells, or without them the bank, which then cannot also be kept (no coarse types).
        """
        held_out = self.calibration_cells_ if self.calibration_cells_ is not None else self.example_bank_
        if held_out is None or held_out.n_obs == 0:
            return None, None
        held_out_cells = (data.X, labels, held_out.X, _types(held_out))
        alone = reverse_shares(*held_out_cells) if len(set(labels)) >= 2 else None
        kept = self.example_bank_ if self.calibration_cells_ is not None else None
        if kept is None or kept.n_obs == 0:
            return alone, None
        return alone, reverse_shares(*held_out_cells, kept_x=kept.X, kept_labels=_types(kept))


def _types(cells: ad.AnnData) -> np.ndarray:
    return cells.obs["cell_type"].astype(str).to_numpy()

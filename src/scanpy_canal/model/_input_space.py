"""The input-space novelty reference: a PCA of the panel's expression values and the reference cells in it.

A network trained on a few hundred cells per type maps a cell of a type it never saw onto the nearest known type,
often with confidence; the cell's expression, though, is far from every reference cell. The ``"input"`` score is the
distance, in the first principal components of the stage's training cells plus the bank (refitted every stage), from
a cell to its :data:`INPUT_NEIGHBOURS`-th nearest reference cell: the bank's cells, or when the model keeps no bank
a sample of the last stage's training cells. Scoring a cell costs one ``genes x components`` product and one
distance to each reference cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from sklearn.utils.extmath import randomized_svd

#: Principal components of the input space (fewer when the fit has fewer cells or genes).
INPUT_COMPONENTS = 50
#: The ``"input"`` score is the distance to this nearest reference cell.
INPUT_NEIGHBOURS = 5
#: Cells the PCA is fitted on at most (a seeded sample beyond it), to bound its memory with large panels.
MAX_FIT_CELLS = 5_000
#: Reference cells kept when the model keeps no bank (a seeded sample of the stage's training cells).
MAX_REFERENCE_CELLS = 1_000


@dataclass(frozen=True)
class InputReference:
    """The PCA of the input space and the reference cells' coordinates in it.

    Attributes
    ----------
    mean
        ``(genes,)`` mean expression of the cells the PCA was fitted on.
    components
        ``(genes, n_components)`` principal axes.
    cells
        ``(n_reference, n_components)`` coordinates of the reference cells.
    """

    mean: torch.Tensor
    components: torch.Tensor
    cells: torch.Tensor

    @classmethod
    def fit(
        cls, fit_cells: sparse.spmatrix | np.ndarray, reference_cells: sparse.spmatrix | np.ndarray, *, seed: int
    ) -> InputReference:
        """Fit the PCA on `fit_cells` (cells x panel genes) and place `reference_cells` in it."""
        rng = np.random.default_rng(seed)
        if fit_cells.shape[0] > MAX_FIT_CELLS:
            fit_cells = fit_cells[np.sort(rng.choice(fit_cells.shape[0], MAX_FIT_CELLS, replace=False))]
        dense = fit_cells.toarray() if sparse.issparse(fit_cells) else np.asarray(fit_cells)
        dense = dense.astype(np.float64)
        mean = dense.mean(axis=0)
        n_components = max(1, min(INPUT_COMPONENTS, dense.shape[0] - 1, dense.shape[1]))
        _, _, vt = randomized_svd(dense - mean, n_components, random_state=int(rng.integers(2**31)))
        reference = cls(
            torch.as_tensor(mean, dtype=torch.float32),
            torch.as_tensor(vt.T.copy(), dtype=torch.float32),
            torch.zeros(0, n_components),
        )
        return cls(reference.mean, reference.components, reference.project(reference_cells))

    def project(self, x: sparse.spmatrix | np.ndarray) -> torch.Tensor:
        """``(cells, n_components)`` coordinates of the rows of `x` (cells x panel genes), float32."""
        components = self.components.numpy()
        product = x @ components if sparse.issparse(x) else np.asarray(x, dtype=np.float32) @ components
        offset = self.mean.numpy() @ components
        return torch.as_tensor(np.asarray(product, dtype=np.float32) - offset)

    def distance(
        self, coordinates: torch.Tensor, chunk_size: int = 4096, neighbours: int = INPUT_NEIGHBOURS
    ) -> torch.Tensor:
        """Distance from each row of `coordinates` to its `neighbours`-th nearest reference cell."""
        k = min(neighbours, self.cells.shape[0])
        return torch.cat(
            [
                torch.cdist(rows, self.cells).topk(k, dim=1, largest=False).values[:, -1]
                for rows in coordinates.split(chunk_size)
            ]
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors saved with the model (in ``weights.pt``, loaded with ``weights_only=True``)."""
        return {"mean": self.mean, "components": self.components, "cells": self.cells}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], n_genes: int) -> InputReference:
        """The reference saved by :meth:`to_tensors`; an error if its shapes do not fit a panel of `n_genes`."""
        mean, components, cells = (tensors.get(name) for name in ("mean", "components", "cells"))
        if any(value is None for value in (mean, components, cells)):
            raise ValueError("the input-space reference lacks one of mean, components, cells")
        if mean.shape != (n_genes,) or components.shape[0] != n_genes or cells.shape[1:] != components.shape[1:]:
            raise ValueError(
                f"the input-space reference has shapes mean {tuple(mean.shape)}, components "
                f"{tuple(components.shape)}, cells {tuple(cells.shape)} for a panel of {n_genes} genes"
            )
        return cls(mean.float(), components.float(), cells.float())

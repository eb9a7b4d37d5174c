"""The input-space novelty reference: a PCA of the panel's expression values and the reference cells in it.

A network trained on a few hundred cells per type maps a cell of a type it never saw onto the nearest known type,
often with confidence; the cell's expression, though, is far from every reference cell. The ``"input"`` score is the
distance, in the first principal components of the stage's cells but its calibration cells plus the new bank
(refitted every stage), from a cell to its ``k``-th nearest reference cell: the bank's cells, or when the model keeps
no bank a sample of those stage cells. ``k`` follows the reference (:func:`reference_neighbours`): three quarters of
the cells of its smallest type, so that a known cell's ``k``-th neighbour still lies within its type, between
:data:`INPUT_NEIGHBOURS` and :data:`MAX_INPUT_NEIGHBOURS`. Scoring a cell costs one ``genes x components`` product
and one distance to each reference cell.

With ``CANAL(input_space="standardised")`` each gene is also divided by its standard deviation in the fitted cells
(clipped at :data:`CLIP`, as ``scanpy.pp.scale``), so that a gene the reference hardly varies in weighs most when a
cell expresses it, and the score adds the cell's distance to the PCA's subspace (what its components leave out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import anndata as ad
import numpy as np
import torch
from scipy import sparse
from sklearn.utils.extmath import randomized_svd

#: Principal components of the input space (fewer when the fit has fewer cells or genes).
INPUT_COMPONENTS = 50
#: The ``"input"`` score is the distance to at least this nearest reference cell (the one models saved before the
#: neighbour followed the reference use).
INPUT_NEIGHBOURS = 5
#: ... and at most this one. leave_types_out.py (docs, "Novel cells"): on zeisel_class, 41 bank cells per type, the
#: 30th neighbour finds more withheld distant types than the 5th (recall 0.800 against 0.701) or the 40th (0.755).
MAX_INPUT_NEIGHBOURS = 30
#: The share of the smallest reference type's cells that the neighbour number is.
NEIGHBOUR_SHARE = 0.75
#: Cells the PCA is fitted on at most (a seeded sample beyond it), to bound its memory with large panels.
MAX_FIT_CELLS = 5_000
#: Reference cells kept when the model keeps no bank (a seeded sample of the stage's cells).
MAX_REFERENCE_CELLS = 1_000
#: Standardised values are clipped to this many standard deviations.
CLIP = 10.0
#: Genes varying less than this in the fitted cells keep their centred values when the genes are standardised.
MIN_SCALE = 1e-3
#: Cells standardised at once (dense rows of the panel).
STANDARDISE_ROWS = 1024


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
        ``(n_reference, n_components)`` coordinates of the reference cells (standardised: one more column, the
        distance to the subspace).
    scale
        ``(genes,)`` divisors of the centred genes when they are standardised; `None` when they are only centred.
    neighbours
        The ``"input"`` score is the distance to this nearest reference cell (:func:`reference_neighbours`).
    """

    mean: torch.Tensor
    components: torch.Tensor
    cells: torch.Tensor
    scale: torch.Tensor | None = None
    neighbours: int = INPUT_NEIGHBOURS

    @classmethod
    def fit(
        cls,
        fit_cells: sparse.spmatrix | np.ndarray,
        reference_cells: sparse.spmatrix | np.ndarray,
        *,
        seed: int,
        standardise: bool = False,
        neighbours: int = INPUT_NEIGHBOURS,
    ) -> InputReference:
        """Fit the PCA on `fit_cells` (cells x panel genes) and place `reference_cells` in it.

        The genes are centred, and scaled when `standardise`; the ``"input"`` score will be the distance to the
        `neighbours`-th nearest reference cell.
        """
        rng = np.random.default_rng(seed)
        if fit_cells.shape[0] > MAX_FIT_CELLS:
            fit_cells = fit_cells[np.sort(rng.choice(fit_cells.shape[0], MAX_FIT_CELLS, replace=False))]
        dense = fit_cells.toarray() if sparse.issparse(fit_cells) else np.asarray(fit_cells)
        dense = dense.astype(np.float64)
        mean = dense.mean(axis=0)
        scale = None
        if standardise:
            deviation = dense.std(axis=0)
            scale = np.where(deviation > MIN_SCALE, deviation, 1.0)
        values = _centred(dense, mean, scale)
        scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32)
        n_components = max(1, min(INPUT_COMPONENTS, dense.shape[0] - 1, dense.shape[1]))
        _, _, vt = randomized_svd(values, n_components, random_state=int(rng.integers(2**31)))
        mean, components = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(vt.T.copy(), dtype=torch.float32)
        fitted = cls(mean, components, torch.zeros(0, n_components), scale, neighbours)
        return replace(fitted, cells=fitted.project(reference_cells))

    def project(self, x: sparse.spmatrix | np.ndarray) -> torch.Tensor:
        """``(cells, n_components)`` coordinates of the rows of `x` (cells x panel genes), float32.

        Standardised: the genes' values are scaled and clipped first, and a last column holds each cell's distance to
        the subspace.
        """
        components = self.components.numpy()
        if self.scale is not None:
            starts = range(0, max(x.shape[0], 1), STANDARDISE_ROWS)  # one (empty) block for no cells
            return torch.cat([self._standardised(x[start : start + STANDARDISE_ROWS]) for start in starts])
        product = x @ components if sparse.issparse(x) else np.asarray(x, dtype=np.float32) @ components
        offset = self.mean.numpy() @ components
        return torch.as_tensor(np.asarray(product, dtype=np.float32) - offset)

    def _standardised(self, rows: sparse.spmatrix | np.ndarray) -> torch.Tensor:
        dense = rows.toarray() if sparse.issparse(rows) else np.asarray(rows)
        values = _centred(dense.astype(np.float32), self.mean.numpy(), self.scale.numpy())
        coordinates = values @ self.components.numpy()
        residual = np.sqrt(np.maximum((values**2).sum(axis=1) - (coordinates**2).sum(axis=1), 0.0))
        return torch.as_tensor(np.column_stack([coordinates, residual]), dtype=torch.float32)

    def distance(
        self, coordinates: torch.Tensor, chunk_size: int = 4096, neighbours: int | None = None
    ) -> torch.Tensor:
        """Distance from each row of `coordinates` to its `neighbours`-th (default: :attr:`neighbours`-th) nearest.

        Standardised: the distance in the components, with the row's distance to the subspace added in quadrature.
        """
        k = min(self.neighbours if neighbours is None else neighbours, self.cells.shape[0])
        n = self.components.shape[1]
        distances = torch.cat(
            [
                torch.cdist(rows[:, :n], self.cells[:, :n]).topk(k, dim=1, largest=False).values[:, -1]
                for rows in coordinates.split(chunk_size)
            ]
        )
        return distances if self.scale is None else torch.sqrt(distances**2 + coordinates[:, n] ** 2)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors saved with the model (in ``weights.pt``, loaded with ``weights_only=True``)."""
        tensors = {
            "mean": self.mean,
            "components": self.components,
            "cells": self.cells,
            "neighbours": torch.tensor(self.neighbours),
        }
        return tensors if self.scale is None else {**tensors, "scale": self.scale}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], n_genes: int) -> InputReference:
        """The reference saved by :meth:`to_tensors`; an error if its shapes do not fit a panel of `n_genes`.

        A reference saved before the neighbour followed the reference scores with :data:`INPUT_NEIGHBOURS`.
        """
        mean, components, cells, scale = (tensors.get(name) for name in ("mean", "components", "cells", "scale"))
        if any(value is None for value in (mean, components, cells)):
            raise ValueError("the input-space reference lacks one of mean, components, cells")
        width = components.shape[1] + (scale is not None)
        if (
            mean.shape != (n_genes,)
            or components.shape[0] != n_genes
            or cells.shape[1:] != (width,)
            or (scale is not None and scale.shape != (n_genes,))
        ):
            raise ValueError(
                f"the input-space reference has shapes mean {tuple(mean.shape)}, components "
                f"{tuple(components.shape)}, cells {tuple(cells.shape)} for a panel of {n_genes} genes"
            )
        neighbours = int(tensors.get("neighbours", INPUT_NEIGHBOURS))
        if neighbours < 1:
            raise ValueError(f"the input-space reference's neighbour number is {neighbours}, not a positive number")
        return cls(
            mean.float(), components.float(), cells.float(), None if scale is None else scale.float(), neighbours
        )


def fit_reference(
    stage_cells: sparse.spmatrix,
    stage_types: np.ndarray,
    bank: ad.AnnData | None,
    *,
    seed: int,
    standardise: bool,
) -> InputReference:
    """A stage's input space, fitted on `stage_cells` (of types `stage_types`) and the `bank`, the reference cells.

    Without a bank, a seeded sample of at most :data:`MAX_REFERENCE_CELLS` stage cells is the reference.
    """
    if bank is not None and bank.n_obs > 0:
        reference = sparse.csr_matrix(bank.X)
        reference_types = bank.obs["cell_type"].astype(str).to_numpy()
        fit_cells = sparse.vstack([stage_cells, reference], format="csr")
    else:
        sample = np.sort(np.random.default_rng(seed).permutation(stage_cells.shape[0])[:MAX_REFERENCE_CELLS])
        reference, reference_types, fit_cells = stage_cells[sample], stage_types[sample], stage_cells
    return InputReference.fit(
        fit_cells, reference, seed=seed, standardise=standardise, neighbours=reference_neighbours(reference_types)
    )


def reference_neighbours(reference_types: Sequence[str] | np.ndarray) -> int:
    """The neighbour whose distance is the ``"input"`` score, for reference cells of types `reference_types`.

    :data:`NEIGHBOUR_SHARE` of the cells of the smallest type, between :data:`INPUT_NEIGHBOURS` and
    :data:`MAX_INPUT_NEIGHBOURS`: a farther neighbour smooths the distance where every type keeps many reference cells,
    and stays within a known cell's own type.

    Examples
    --------
    >>> reference_neighbours(["B"] * 41 + ["T"] * 60)
    30
    >>> reference_neighbours(["B"] * 5 + ["T"] * 300)
    5
    """
    _, counts = np.unique(np.asarray(reference_types), return_counts=True)
    if counts.size == 0:
        return INPUT_NEIGHBOURS
    return int(np.clip(round(NEIGHBOUR_SHARE * counts.min()), INPUT_NEIGHBOURS, MAX_INPUT_NEIGHBOURS))


def _centred(values: np.ndarray, mean: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """`values` centred on `mean` and, with a `scale`, divided by it and clipped at :data:`CLIP`."""
    centred = values - mean
    return centred if scale is None else np.clip(centred / scale, -CLIP, CLIP)

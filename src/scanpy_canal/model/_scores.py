"""Novelty scores: how unlike every known cell type a cell looks; higher means more likely novel.

- ``"mix"``: CANAL's ``(normalised energy + 1 - confidence) / 2``, the energy normalised by the range of the
  calibration cells' energies.
- ``"energy"``: the free energy ``-T log sum_c exp(z_c / T)`` of the logits.
- ``"max_probability"``: one minus the largest class probability.
- ``"knn"``: the distance, between unit-length 64-d embeddings, to the ``k``-th nearest example-bank cell ("deep
  nearest neighbours").
- ``"mahalanobis"``: the smallest Mahalanobis distance to the mean embedding of a known type's bank cells, with one
  covariance shared by all types.
- ``"input"``: the distance from the cell's expression to the reference cells, in a PCA of the panel fitted on the
  training cells (``_input_space``): the one score that does not come from the classifier.

Several scores are combined under the conformal guarantee: into one statistic on the bank's scale, whose p-value is
then computed (:func:`scaled_maximum`, ``fusion="scaled"``), or through their p-values (:func:`fuse_pvalues`,
``fusion="bonferroni"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from scanpy_canal._choices import SCORES, Score

from ._input_space import InputReference

#: Scores that compare a cell with the example bank's embeddings.
BANK_SCORES = ("knn", "mahalanobis")
#: Neighbours of the ``"knn"`` score.
KNN_NEIGHBOURS = 10
#: Ridge added to the shared covariance of ``"mahalanobis"``, relative to its mean variance.
COVARIANCE_RIDGE = 1e-2


def energy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Free energy ``-T log sum_c exp(z_c / T)``; higher means less familiar."""
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """Largest softmax probability."""
    return logits.softmax(dim=-1).amax(dim=-1)


def mix_score(logits: torch.Tensor, temperature: float, energy_min: float, energy_max: float) -> torch.Tensor:
    """CANAL's uncertainty in ``[0, 1]``: the energy scaled to ``[energy_min, energy_max]``, averaged with 1 - confidence."""
    span = max(energy_max - energy_min, torch.finfo(torch.float32).eps)
    normalised = ((energy(logits, temperature) - energy_min) / span).clamp(0, 1)
    return (normalised + 1 - confidence(logits)) / 2


@dataclass(frozen=True)
class ScoreReference:
    """What the scores compare a cell with.

    Attributes
    ----------
    energy_min, energy_max
        The range of the calibration cells' energies (``"mix"``).
    bank_directions
        Unit-length embeddings of the example bank (``"knn"``).
    class_means
        Mean bank embedding of each known type with bank cells (``"mahalanobis"``).
    precision
        Inverse of the shared within-type covariance of the bank embeddings (``"mahalanobis"``).
    input_reference
        The input-space PCA and its reference cells (``"input"``).
    """

    energy_min: float
    energy_max: float
    bank_directions: torch.Tensor | None = None
    class_means: torch.Tensor | None = None
    precision: torch.Tensor | None = None
    input_reference: InputReference | None = None

    @classmethod
    def build(
        cls,
        calibration_logits: torch.Tensor,
        temperature: float,
        bank_embedding: torch.Tensor | None = None,
        bank_labels: torch.Tensor | None = None,
        input_reference: InputReference | None = None,
    ) -> ScoreReference:
        """The reference of the calibration cells' logits, the bank's embeddings and codes, and the input space."""
        energies = energy(calibration_logits, temperature)
        if bank_embedding is None or bank_embedding.shape[0] == 0:
            return cls(energies.min().item(), energies.max().item(), input_reference=input_reference)
        bank_embedding = bank_embedding.double()
        types = torch.unique(bank_labels)
        means = torch.stack([bank_embedding[bank_labels == t].mean(dim=0) for t in types])
        centred = bank_embedding - means[torch.searchsorted(types, bank_labels)]
        covariance = centred.T @ centred / max(len(centred) - len(types), 1)
        ridge = COVARIANCE_RIDGE * covariance.diagonal().mean().clamp_min(1e-12)
        precision = torch.linalg.inv(covariance + ridge * torch.eye(covariance.shape[0], dtype=covariance.dtype))
        directions = _directions(bank_embedding).float()
        return cls(energies.min().item(), energies.max().item(), directions, means, precision, input_reference)

    def score(
        self,
        kind: Score,
        logits: torch.Tensor,
        embedding: torch.Tensor,
        temperature: float,
        coordinates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score `kind` of cells with these `logits`, `embedding` and input-space `coordinates` (higher: more novel)."""
        if kind in BANK_SCORES and self.bank_directions is None:
            raise ValueError(f"The {kind!r} novelty score needs an example bank; this model keeps none.")
        if kind == "input":
            if self.input_reference is None or coordinates is None:
                raise ValueError("The 'input' novelty score needs the model's input-space reference; it has none.")
            return self.input_reference.distance(coordinates)
        if kind == "mix":
            return mix_score(logits, temperature, self.energy_min, self.energy_max)
        if kind == "energy":
            return energy(logits, temperature)
        if kind == "max_probability":
            return 1 - confidence(logits)
        if kind == "knn":
            return _kth_distance(_directions(embedding.float()), self.bank_directions, KNN_NEIGHBOURS)
        if kind == "mahalanobis":
            difference = embedding.double()[:, None, :] - self.class_means[None]
            distances = torch.einsum("ncd,de,nce->nc", difference, self.precision, difference)
            return distances.amin(dim=1).float()
        raise ValueError(f"score must be one of {', '.join(map(repr, SCORES))}; got {kind!r}.")


def _directions(embedding: torch.Tensor) -> torch.Tensor:
    return embedding / embedding.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _kth_distance(directions: torch.Tensor, reference: torch.Tensor, k: int, chunk_size: int = 4096) -> torch.Tensor:
    """Distance from each row of `directions` to its `k`-th nearest row of `reference`, in chunks of rows."""
    k = min(k, reference.shape[0])
    return torch.cat(
        [
            torch.cdist(rows, reference).topk(k, dim=1, largest=False).values[:, -1]
            for rows in directions.split(chunk_size)
        ]
    )


def scaled_maximum(scores: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per cell, the largest of its scores, each put on the scale of `reference`'s: one statistic of several scores.

    Each score is centred on the median of `reference`'s same score and divided by their interquartile range. With `reference` the scores of cells that are neither calibration nor query cells (the bank's), this is a fixed
    function of a cell's scores, so its conformal p-value keeps the guarantee (``"scaled"`` fusion).
    """
    scaled = []
    for kind, values in scores.items():
        quartiles = torch.quantile(reference[kind].double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        spread = (quartiles[2] - quartiles[0]).clamp_min(1e-12)
        scaled.append((values.double() - quartiles[1]) / spread)
    return torch.stack(scaled).amax(dim=0)


def fuse_pvalues(pvalues: Iterable[torch.Tensor]) -> torch.Tensor:
    """One p-value from the conformal p-values of several scores: ``m`` times the smallest of ``m``, at most 1.

    A known cell's p-value of each score is at most ``a / m`` with probability at most ``a / m``, so the smallest of
    ``m`` is with probability at most ``a`` (Bonferroni): the guarantee holds whatever the dependence of the scores.
    """
    stacked = torch.stack(list(pvalues))
    return (stacked.shape[0] * stacked.amin(dim=0)).clamp(max=1.0)

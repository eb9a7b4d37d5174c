"""The mixup thresholds of CANAL's ``"mix"`` score (spec section 5); the default, conformal one is in ``_conformal``.

A cell's uncertainty is ``(normalised energy + 1 - confidence) / 2``; above a threshold, it is unassigned. Virtual
cells made by mixing the 128-d manifold vectors of pairs of cells stand in for cells of unknown types.

- ``"canal"``, the original rule: energies are normalised over the query itself, and the threshold is the mean
  *certainty* ``(1 - normalised energy + confidence) / 2`` of 128 Beta(1, 1) mixes per query cell. A cell's call
  depends on the rest of the query.
- ``"calibrated"``: everything comes from held-out training cells of known types, so a cell gets the same answer alone
  or in any batch. Each is mixed with partners of another predicted type (weights in [0.25, 0.75], i.e. cells between
  two types), and the threshold maximises the harmonic mean of the fraction of held-out cells kept and the fraction of
  virtual cells rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._scores import confidence, energy, mix_score

N_MIXES = 128


@dataclass(frozen=True)
class NoveltyReference:
    """The energy range used to normalise a cell's energy, and the threshold on the uncertainty score."""

    energy_min: float
    energy_max: float
    threshold: float

    def uncertainty(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Per-cell uncertainty in ``[0, 1]``; a cell is unassigned when it exceeds :attr:`threshold`."""
        return mix_score(logits, temperature, self.energy_min, self.energy_max)


def mixup_reference(
    manifold: torch.Tensor,
    logits: torch.Tensor,
    classify: Callable[[torch.Tensor], torch.Tensor],
    *,
    temperature: float,
    generator: torch.Generator,
    n_mixes: int = N_MIXES,
    chunk_size: int = 512,
) -> NoveltyReference:
    """Build a :class:`NoveltyReference` from a set of cells.

    Every cell is paired with a random partner from the same set and mixed with it at `n_mixes` weights drawn from
    Beta(1, 1) (one scalar per virtual cell), in chunks so that memory stays bounded.

    Parameters
    ----------
    manifold
        ``(cells, manifold_dim)`` manifold vectors from the forward pass that produced `logits`.
    logits
        ``(cells, classes)`` logits of the same cells.
    classify
        Maps manifold vectors to logits (the head's ``fc2``/``fc3``).
    temperature
        Energy temperature.
    generator
        Source of the partners and mixing weights (on the CPU).
    n_mixes
        Virtual cells per cell.
    chunk_size
        Cells mixed at a time.
    """
    n_cells = manifold.shape[0]
    if n_cells < 2:
        raise ValueError("Novel-cell detection with the 'canal' rule needs at least 2 cells; use 'calibrated'.")
    partners = torch.randint(n_cells, (n_cells,), generator=generator)
    weights = torch.rand(n_cells, n_mixes, 1, generator=generator)
    total_energy, total_confidence = 0.0, 0.0
    lowest, highest = float("inf"), float("-inf")
    for start in range(0, n_cells, chunk_size):
        rows = slice(start, start + chunk_size)
        own = manifold[rows, None, :]
        other = manifold[partners[rows].to(manifold.device), None, :]
        lam = weights[rows].to(manifold.device, manifold.dtype)
        mixed_logits = classify(lam * own + (1 - lam) * other).float()
        mixed_energy = energy(mixed_logits, temperature)
        total_energy += mixed_energy.sum().item()
        total_confidence += confidence(mixed_logits).sum().item()
        lowest, highest = min(lowest, mixed_energy.min().item()), max(highest, mixed_energy.max().item())
    n_virtual = n_cells * n_mixes
    span = max(highest - lowest, torch.finfo(torch.float32).eps)
    mean_certainty_energy = 1 - (total_energy / n_virtual - lowest) / span
    cell_energy = energy(logits.float(), temperature)
    return NoveltyReference(
        energy_min=cell_energy.min().item(),
        energy_max=cell_energy.max().item(),
        threshold=(mean_certainty_energy + total_confidence / n_virtual) / 2,
    )


def calibrated_reference(
    manifold: torch.Tensor,
    logits: torch.Tensor,
    classify: Callable[[torch.Tensor], torch.Tensor],
    *,
    temperature: float,
    generator: torch.Generator,
    n_mixes: int = N_MIXES,
) -> NoveltyReference:
    """Build a :class:`NoveltyReference` from held-out cells of known types (the ``"calibrated"`` rule).

    Parameters are as for :func:`mixup_reference`; `manifold` and `logits` belong to the held-out cells. When all of
    them are predicted as one type there is nothing to mix between, and the original rule is used.
    """
    cell_energy = energy(logits.float(), temperature)
    base = NoveltyReference(cell_energy.min().item(), cell_energy.max().item(), threshold=1.0)
    n_cells = manifold.shape[0]
    predicted = logits.argmax(dim=-1)
    partners = torch.randint(n_cells, (n_cells,), generator=generator)
    between = predicted[partners] != predicted
    if not between.any():
        return mixup_reference(manifold, logits, classify, temperature=temperature, generator=generator)
    own, other = manifold[between, None, :], manifold[partners[between], None, :]
    lam = (0.25 + 0.5 * torch.rand(own.shape[0], n_mixes, 1, generator=generator)).to(manifold.device, manifold.dtype)
    virtual_logits = classify(lam * own + (1 - lam) * other).float().cpu().flatten(0, 1)
    known = base.uncertainty(logits.float(), temperature)
    virtual = base.uncertainty(virtual_logits, temperature)
    return NoveltyReference(base.energy_min, base.energy_max, _balanced_threshold(known, virtual))


def _balanced_threshold(known: torch.Tensor, virtual: torch.Tensor) -> float:
    """The uncertainty cut maximising the harmonic mean of known cells kept and virtual cells rejected."""
    candidates = torch.unique(torch.cat([known, virtual]))
    kept = torch.searchsorted(known.sort().values, candidates, right=True) / known.numel()
    rejected = 1 - torch.searchsorted(virtual.sort().values, candidates, right=True) / virtual.numel()
    harmonic = 2 * kept * rejected / (kept + rejected).clamp_min(1e-12)
    return candidates[harmonic.argmax()].item()

"""scBERT's masked-bin objective: which tokens are hidden, the loss on them and the accuracy of their recovery."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._tokenize import N_BINS

#: The mask (and padding) token: one past the highest expression bin (scBERT: 6).
MASK_TOKEN = N_BINS + 1
#: Label of every position that is not masked; the loss and the accuracy skip it.
IGNORE_INDEX = -100
# Guards the ceiling against products such as 0.15 * 20 = 3.0000000000000004 in floating point.
_CEIL_TOLERANCE = 1e-9


def mask_tokens(
    tokens: torch.Tensor,
    *,
    mask_prob: float = 0.15,
    replace_prob: float = 0.9,
    mask_token: int = MASK_TOKEN,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose tokens to predict, as scBERT's pretraining does, and hide most of them behind the mask token.

    In each cell, only non-zero bins can be chosen (tokens 0 and `mask_token` never are). Exactly
    ``ceil(mask_prob * n)`` of the cell's ``n`` maskable tokens are chosen, uniformly at random. Each chosen token is
    replaced by `mask_token` with probability `replace_prob` and otherwise left as it is; tokens are never replaced by
    random ones.

    Parameters
    ----------
    tokens
        ``(cells, positions)`` tokens, e.g. from :func:`~scanpy_canal.nn.tokenize`.
    mask_prob
        Fraction of each cell's non-zero bins to predict.
    replace_prob
        Probability that a chosen token is replaced by `mask_token`.
    mask_token
        The mask token.
    generator
        Source of randomness; the global generator of the tokens' device when `None`. Random numbers are drawn on
        the generator's device and moved to the tokens' device.

    Returns
    -------
    The model input (`tokens` with the replacements) and the labels: the original token at chosen positions and
    :data:`IGNORE_INDEX` elsewhere.

    Examples
    --------
    >>> import torch
    >>> from scanpy_canal.nn import IGNORE_INDEX, mask_tokens
    >>> tokens = torch.tensor([[0, 3, 1, 0, 5, 2, 0]])
    >>> inputs, labels = mask_tokens(tokens, generator=torch.Generator().manual_seed(0))
    >>> int((labels != IGNORE_INDEX).sum())  # ceil(0.15 * 4 non-zero bins)
    1
    """
    if not 0 <= mask_prob <= 1 or not 0 <= replace_prob <= 1:
        raise ValueError(f"mask_prob and replace_prob must lie in [0, 1], got {mask_prob} and {replace_prob}.")
    device = tokens.device if generator is None else generator.device
    maskable = (tokens != 0) & (tokens != mask_token)
    n_chosen = torch.ceil(maskable.sum(dim=1, dtype=torch.float64) * mask_prob - _CEIL_TOLERANCE).clamp_(min=0).long()
    chosen = torch.zeros_like(maskable)
    k = int(n_chosen.max()) if tokens.shape[0] > 0 else 0
    if k > 0:
        scores = torch.rand(tokens.shape, generator=generator, device=device).to(tokens.device)
        scores.masked_fill_(~maskable, -1.0)  # below every uniform score: never among a cell's first n_chosen
        top = scores.topk(k, dim=1).indices
        rank = torch.arange(k, device=tokens.device).expand_as(top)
        chosen.scatter_(1, top, rank < n_chosen[:, None])
    replace = torch.rand(tokens.shape, generator=generator, device=device).to(tokens.device) < replace_prob
    inputs = tokens.masked_fill(chosen & replace, mask_token)
    labels = tokens.masked_fill(~chosen, IGNORE_INDEX)
    return inputs, labels


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the masked positions of ``(cells, positions, tokens)`` logits; 0 when none is masked."""
    total = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def masked_accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, *, n_bins: int = N_BINS) -> torch.Tensor:
    """Correct and total masked predictions, ``tensor([correct, total])``.

    As in scBERT, the prediction is the most likely expression bin among ``1..n_bins`` (the masked tokens are non-zero
    bins, so token 0 and the mask token are never predicted).
    """
    masked = labels != IGNORE_INDEX
    predicted = logits[..., 1 : n_bins + 1].argmax(dim=-1) + 1
    correct = (predicted == labels) & masked
    return torch.stack([correct.sum(), masked.sum()])

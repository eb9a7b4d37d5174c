"""The CANAL module: the Performer encoder with the CANAL head, an optional frozen teacher, and the stage loss."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data

from scanpy_canal.nn import SCBERT_CONFIG, CANALHead, PerformerLM, frozen_prefix, set_trainable, tokenize

from ._progress import PassTimer

#: The encoder architecture when none is given: scBERT's (the sequence length follows the gene panel).
DEFAULT_ARCH = {key: value for key, value in SCBERT_CONFIG.items() if key != "max_seq_len"}
#: Registry key of the row index of each training cell, which looks up the per-stage caches.
ROW_KEY = "row"
#: Activation elements per cell batch on a CPU, for batches whose widest activations stay within about 64 MB.
CPU_ACTIVATION_BUDGET = 16_000_000


#: Keys of the ``arch`` of :class:`CANALModule` that set the head rather than the encoder.
HEAD_ARCH = ("head_init", "head_dropout")


class CANALModule(BaseModuleClass):
    """Encoder plus head, trained with label-smoothed cross-entropy and embedding distillation from a teacher.

    Parameters
    ----------
    n_genes
        Size of the gene panel; the sequence has one more position (the appended token).
    n_classes
        Number of cell types.
    arch
        Keyword arguments of :class:`~scanpy_canal.nn.PerformerLM` (``max_seq_len`` is set from `n_genes`), and
        ``head_init``: ``"bins"`` points the head's per-gene score along the direction of the ordered expression bins
        (:meth:`~scanpy_canal.nn.CANALHead.read_bins`; needs ``token_init="ordinal"``), ``"normal"`` (default)
        leaves PyTorch's start; ``head_dropout``: the head's dropout while training (default 0, CANAL's).
    trainable_blocks
        Encoder blocks that learn; the final LayerNorm and the head always learn.
    """

    def __init__(self, *, n_genes: int, n_classes: int, arch: dict[str, Any], trainable_blocks: Sequence[int] = (-2,)):
        super().__init__()
        encoder_arch = {key: value for key, value in arch.items() if key not in HEAD_ARCH}
        self.network = PerformerLM(**{**encoder_arch, "max_seq_len": n_genes + 1})
        dropout = arch.get("head_dropout", 0.0)
        if not 0 <= dropout < 1:
            raise ValueError(f"head_dropout must be in [0, 1), got {dropout!r}.")
        self.network.to_out = CANALHead(n_genes + 1, self.network.config["dim"], n_classes, dropout=dropout)
        head_init = arch.get("head_init", "normal")
        if head_init == "bins":
            self.head.read_bins(self.network.token_emb.weight)
        elif head_init != "normal":
            raise ValueError(f"head_init must be 'normal' or 'bins', got {head_init!r}.")
        set_trainable(self.network, blocks=trainable_blocks)
        self.teacher: PerformerLM | None = None
        self.teacher_embedding: torch.Tensor | None = None
        self.frozen_cache: torch.Tensor | None = None

    @property
    def head(self) -> CANALHead:
        """The classification head."""
        return self.network.to_out

    def load_encoder(self, encoder: PerformerLM) -> None:
        """Take every weight of a pretrained `encoder` on the same panel but its output head."""
        state = self.network.state_dict()
        state.update({k: v for k, v in encoder.state_dict().items() if not k.startswith("to_out.")})
        self.network.load_state_dict(state)

    @torch.no_grad()
    def set_gene_table(self, table: torch.Tensor) -> None:
        """Put `table` (one row per panel gene) in the frozen gene embedding; the appended token's row stays zero."""
        self.network.pos_emb.emb.weight[:-1] = table.to(self.network.pos_emb.emb.weight)

    def train(self, mode: bool = True) -> CANALModule:
        """Set training mode; the teacher always stays in eval mode so its random features never change."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def attach_teacher(self) -> None:
        """Freeze a copy of the current network as the distillation teacher."""
        self.teacher = copy.deepcopy(self.network).requires_grad_(False).eval()

    def inference_batch_size(self, device: torch.device) -> int:
        """Cells per forward pass when none is given: 64 on a GPU, up to 1024 on a CPU.

        On a CPU, a batch holds as many cells as keep the widest activations within about 64 MB. A CPU gains nothing from batches whose activations outgrow its caches (the attention already works through
        large batches in cache-sized chunks), while small models need large batches to amortise per-call overhead:
        scBERT's encoder takes 20 cells at a time at 1,001 tokens and 1 at 16,907, a 16-wide model over 200 genes 1024.
        """
        if device.type != "cpu":
            return 64
        config = self.network.config
        widest = max(config["dim"] * config["ff_mult"], config["heads"] * config["dim_head"])
        return int(min(max(CPU_ACTIVATION_BUDGET // (config["max_seq_len"] * widest), 1), 1024))

    def finish_stage(self) -> None:
        """Drop the teacher and the per-stage caches (only needed while a stage trains)."""
        self.teacher = self.teacher_embedding = self.frozen_cache = None
        self.network.performer.redraw_from = 0

    @property
    def cached_blocks(self) -> int:
        """Blocks whose output is read from :attr:`frozen_cache` instead of being computed (0 without a cache)."""
        return 0 if self.frozen_cache is None else self.network.performer.redraw_from

    @torch.no_grad()
    def prepare_stage(self, x, *, cache_frozen: bool, batch_size: int) -> None:
        """Compute once per training cell what cannot change while the stage trains.

        The teacher's embeddings: it is frozen, in eval mode, with fixed random features. With `cache_frozen`, also the
        hidden states after the frozen prefix of blocks (:func:`~scanpy_canal.nn.frozen_prefix`); the features of those
        blocks are then no longer redrawn during the stage. The teacher starts from the same prefix: its frozen blocks
        are a copy of the student's.

        Parameters
        ----------
        x
            The stage's training matrix (cells in the order of the ``row`` field), in the gene panel.
        cache_frozen
            Keep the frozen blocks' hidden states (the frozen-block cache), on the module's device.
        batch_size
            Cells per forward pass.
        """
        stop = frozen_prefix(self.network) if cache_frozen else 0
        self.network.performer.redraw_from = stop
        if not cache_frozen and self.teacher is None:
            return  # nothing is fixed for the whole stage: stage 1 without the cache
        frozen, teacher = [], []
        was_training = self.network.training
        self.network.eval()
        timer = PassTimer(x.shape[0], batch_size, "Computing the frozen blocks once per stage", self.network.config)
        for start in range(0, x.shape[0], batch_size):
            hidden = self.network.hidden_states(tokenize(x[start : start + batch_size]).to(self.device), stop)
            if cache_frozen:
                frozen.append(hidden)
            if self.teacher is not None:
                teacher.append(self.teacher.forward_from(hidden, stop)[1])
            timer.batch_done(self.device)
        self.network.train(was_training)
        self.teacher = None
        self.teacher_embedding = torch.cat(teacher) if teacher else None
        self.frozen_cache = torch.cat(frozen) if cache_frozen else None

    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor | None]:
        return {"x": tensors[REGISTRY_KEYS.X_KEY], "rows": tensors.get(ROW_KEY)}

    @auto_move_data
    def inference(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Manifold, embedding and logits of a batch of training cells (and the teacher's embedding).

        `rows` are the cells' positions in the matrix given to :meth:`prepare_stage`; they look up the cached prefix
        hidden states and teacher embeddings.
        """
        if rows is not None:
            rows = rows.view(-1).long()
        if self.frozen_cache is not None:
            hidden = self.frozen_cache[rows]
        else:
            hidden = self.network.embed(tokenize(x))
        manifold, embedding, logits = self.network.forward_from(hidden, self.cached_blocks)
        outputs = {"manifold": manifold, "embedding": embedding, "logits": logits}
        if self.teacher_embedding is not None:
            outputs["teacher_embedding"] = self.teacher_embedding[rows]
        return outputs

    def _get_generative_input(self, tensors, inference_outputs, **kwargs) -> dict:
        return {}

    def generative(self, **kwargs) -> dict:
        """CANAL is not generative."""
        return {}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict,
        label_smoothing: float = 0.1,
        distill_weight: float = 0.0,
        class_weight: torch.Tensor | None = None,
        subtrees: torch.Tensor | None = None,
    ) -> LossOutput:
        """Cross-entropy with label smoothing plus ``distill_weight`` times the embedding MSE to the teacher.

        In training, the cross-entropy is weighted per class by `class_weight` (when given). `subtrees` (a ``(C, C)``
        0/1 matrix, row ``i`` marking type ``i`` and its descendants; see :func:`coarse_cross_entropy`) supervises a
        cell labelled with a coarse type by the summed probability of its subtree; `None` when no type has children.
        """
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        logits = inference_outputs["logits"]
        # The loss inputs are made on the CPU with the stage; the batch may be on a GPU.
        if subtrees is not None:
            subtrees = subtrees.to(logits.device)
        if class_weight is not None:
            class_weight = class_weight.to(logits.device)
        loss, classification, distillation = stage_loss(
            logits,
            labels,
            label_smoothing=label_smoothing,
            class_weight=class_weight if self.training else None,  # validation scores the plain loss (tie-break)
            subtrees=subtrees,
            embedding=inference_outputs["embedding"],
            teacher_embedding=inference_outputs.get("teacher_embedding"),
            distill_weight=distill_weight,
        )
        if subtrees is None:
            correct = logits.argmax(dim=-1) == labels
        else:  # a finer call inside the label's subtree is right
            correct = subtrees[labels, logits.argmax(dim=-1)] > 0
        metrics = {"accuracy": correct.float().mean(), "classification_loss": classification.detach()}
        if distillation is not None:
            metrics["distillation_loss"] = distillation.detach()
        return LossOutput(
            loss=loss,
            classification_loss=classification,
            logits=logits,
            true_labels=labels,
            n_obs_minibatch=labels.shape[0],
            extra_metrics=metrics,
        )


def stage_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float,
    class_weight: torch.Tensor | None = None,
    subtrees: torch.Tensor | None = None,
    embedding: torch.Tensor | None = None,
    teacher_embedding: torch.Tensor | None = None,
    distill_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A stage's training loss, its cross-entropy and, with a `teacher_embedding`, its distillation term.

    The cross-entropy with label smoothing (weighted per class by `class_weight`; with `subtrees`, the coarse one of
    :func:`coarse_cross_entropy`) plus ``distill_weight`` times the MSE of `embedding` to `teacher_embedding`.
    """
    if subtrees is None:
        classification = F.cross_entropy(logits, labels, weight=class_weight, label_smoothing=label_smoothing)
    else:
        classification = coarse_cross_entropy(logits, labels, subtrees, class_weight, label_smoothing)
    if teacher_embedding is None:
        return classification, classification, None
    distillation = F.mse_loss(embedding, teacher_embedding)
    return classification + distill_weight * distillation, classification, distillation


def coarse_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    subtrees: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy where a label stands for its whole subtree: ``-log`` of the summed probability of its rows.

    Label smoothing and class weights follow :func:`torch.nn.functional.cross_entropy` term for term, so a label
    without descendants gives exactly its loss: the mean over cells of ``w[y] (1 - e) (-log P(subtree(y)))`` plus
    ``e / C`` times the (weighted) sum of ``-log p`` over the classes, divided by the mean of ``w[y]``.
    """
    log_p = logits.float().log_softmax(dim=-1)
    member = subtrees.to(log_p.device)[labels] > 0
    nll = -torch.logsumexp(log_p.masked_fill(~member, float("-inf")), dim=-1)
    n_classes = logits.shape[-1]
    if weight is None:
        cell_weight = torch.ones_like(nll)
        smooth = -log_p.sum(dim=-1)
    else:
        weight = weight.to(log_p.device)
        cell_weight = weight[labels]
        smooth = -(log_p * weight).sum(dim=-1)
    total = (1 - label_smoothing) * (cell_weight * nll).sum() + label_smoothing / n_classes * smooth.sum()
    return (total / cell_weight.sum()).to(logits.dtype)

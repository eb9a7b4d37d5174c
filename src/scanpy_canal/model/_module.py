"""The CANAL module: the Performer encoder with the CANAL head, an optional frozen teacher, and the stage loss."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data

from scanpy_canal.nn import CANALHead, PerformerLM, set_trainable, tokenize


class CANALModule(BaseModuleClass):
    """Encoder plus head, trained with label-smoothed cross-entropy and embedding distillation from a teacher.

    Parameters
    ----------
    n_genes
        Size of the gene panel; the sequence has one more position (the appended token).
    n_classes
        Number of cell types.
    arch
        Keyword arguments of :class:`~scanpy_canal.nn.PerformerLM` (``max_seq_len`` is set from `n_genes`).
    trainable_blocks
        Encoder blocks that learn; the final LayerNorm and the head always learn.
    """

    def __init__(self, *, n_genes: int, n_classes: int, arch: dict[str, Any], trainable_blocks: Sequence[int] = (-2,)):
        super().__init__()
        self.network = PerformerLM(**{**arch, "max_seq_len": n_genes + 1})
        self.network.to_out = CANALHead(n_genes + 1, self.network.config["dim"], n_classes)
        set_trainable(self.network, blocks=trainable_blocks)
        self.teacher: PerformerLM | None = None

    @property
    def head(self) -> CANALHead:
        """The classification head."""
        return self.network.to_out

    def train(self, mode: bool = True) -> CANALModule:
        """Set training mode; the teacher always stays in eval mode so its random features never change."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def attach_teacher(self) -> None:
        """Freeze a copy of the current network as the distillation teacher."""
        self.teacher = copy.deepcopy(self.network).requires_grad_(False).eval()

    def detach_teacher(self) -> None:
        """Drop the teacher (it is only needed while a stage trains)."""
        self.teacher = None

    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        return {"x": tensors[REGISTRY_KEYS.X_KEY]}

    @auto_move_data
    def inference(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Manifold, embedding and logits of a batch of expression values (and the teacher's embedding)."""
        tokens = tokenize(x)
        manifold, embedding, logits = self.network(tokens)
        outputs = {"manifold": manifold, "embedding": embedding, "logits": logits}
        if self.teacher is not None:
            with torch.no_grad():
                outputs["teacher_embedding"] = self.teacher(tokens)[1]
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
    ) -> LossOutput:
        """Cross-entropy with label smoothing plus ``distill_weight`` times the embedding MSE to the teacher."""
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        logits = inference_outputs["logits"]
        classification = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        metrics = {
            "accuracy": (logits.argmax(dim=-1) == labels).float().mean(),
            "classification_loss": classification.detach(),
        }
        loss = classification
        if "teacher_embedding" in inference_outputs:
            distillation = F.mse_loss(inference_outputs["embedding"], inference_outputs["teacher_embedding"])
            loss = loss + distill_weight * distillation
            metrics["distillation_loss"] = distillation.detach()
        return LossOutput(
            loss=loss,
            classification_loss=classification,
            logits=logits,
            true_labels=labels,
            n_obs_minibatch=labels.shape[0],
            extra_metrics=metrics,
        )

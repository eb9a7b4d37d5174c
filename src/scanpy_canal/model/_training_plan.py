"""How one CANAL stage trains: Adam with AMSGrad, the per-epoch warm-restart schedule, and the epoch kept."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from scvi.train import TrainingPlan

from scanpy_canal._choices import KeepEpoch

from . import _results
from ._schedule import rate

_SUMMARY = ("epochs", "best_epoch", "best_score")
_HISTORY = "history/"


def stage_outcome(callback_metrics: dict) -> tuple[dict[str, float], pd.DataFrame]:
    """The stage's summary (``epochs``, ``best_epoch``, ``best_score``) and per-epoch metrics (rows: epochs from 0)."""
    results = _results.received(callback_metrics)
    summary = {name: float(results[name]) for name in _SUMMARY if name in results}
    columns = {
        name[len(_HISTORY) :]: pd.Series(value[:, 1].numpy(), index=value[:, 0].numpy().astype(int))
        for name, value in results.items()
        if name.startswith(_HISTORY)
    }
    return summary, pd.DataFrame(columns).sort_index()


class CANALTrainingPlan(TrainingPlan):
    """scvi-tools training plan with CANAL's optimiser and schedule, logging only classification metrics.

    Parameters
    ----------
    module
        A :class:`~scanpy_canal.model.CANALModule`.
    cells
        The stage's training matrix, from which the module's per-stage caches are computed when fitting starts (on
        the training device, in every process).
    cache_frozen
        Cache the hidden states of the frozen blocks (see :meth:`CANALModule.prepare_stage`).
    lr
        Peak learning rate of the schedule.
    schedule
        Arguments of :func:`~scanpy_canal.model._schedule.cosine_warm_restarts` beyond the rates (default: none).
    **loss_kwargs
        Passed to the module's ``loss`` (``label_smoothing``, ``distill_weight``, ``class_weight``, ``subtrees``): every
        input of the loss comes through here, none is set on the module; the loss moves its tensors to the batch's
        device.
    """

    def __init__(
        self,
        module,
        *,
        cells,
        cache_frozen: bool = True,
        lr: float = 2e-4,
        schedule: dict[str, int] | None = None,
        **loss_kwargs,
    ):
        super().__init__(module, lr=lr, **loss_kwargs)
        self.cells = cells
        self.cache_frozen = cache_frozen
        self.schedule = schedule or {}

    def on_fit_start(self) -> None:
        """Compute the teacher embeddings and the frozen-block cache on the device the stage trains on."""
        batch_size = self.module.inference_batch_size(self.device)
        self.module.prepare_stage(self.cells, cache_frozen=self.cache_frozen, batch_size=batch_size)

    def on_fit_end(self) -> None:
        """Free the per-stage caches, and record the per-epoch metrics where the main process can read them."""
        self.module.finish_stage()
        if not self.trainer.is_global_zero:  # only rank 0 logs, and only its results reach the main process
            return
        for name, frame in (getattr(self.trainer.logger, "history", None) or {}).items():
            if isinstance(frame, pd.DataFrame) and not frame.empty:
                epochs_and_values = np.column_stack([frame.index.to_numpy(), frame.iloc[:, 0].to_numpy()])
                _results.send(self.trainer, _HISTORY + name, epochs_and_values.astype(float))

    def configure_optimizers(self):
        """Adam (AMSGrad) over the trainable parameters, with the LR set per epoch by the warm-restart schedule."""
        parameters = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(parameters, lr=self.lr, amsgrad=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: rate(epoch, self.lr, **self.schedule) / self.lr
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    def compute_and_log_metrics(self, loss_output, metrics, mode: str) -> None:
        """Log each extra metric as an epoch mean weighted by batch size (e.g. ``accuracy_validation``)."""
        for name, value in loss_output.extra_metrics.items():
            self.log(
                f"{name}_{mode}",
                value,
                on_step=False,
                on_epoch=True,
                batch_size=loss_output.n_obs_minibatch,
                sync_dist=self.use_sync_dist,
            )


class BestEpochEarlyStopping(pl.Callback):
    """Stop after more than `patience` epochs without a better `monitor`, and restore the best epoch's weights.

    An epoch is better when its `monitor` (validation accuracy) is strictly higher, or equal with a strictly lower
    `tie_break` (validation loss): on small validation sets the accuracy saturates early, and the first saturated
    epoch is rarely the best-fitted one. The best weights (random features included) are put back when fitting ends,
    whether it ended by early stopping or by reaching ``max_epochs``. With ``keep="last"`` nothing stops early and
    the last epoch is the one kept (and reported as the best).
    """

    def __init__(
        self,
        monitor: str = "accuracy_validation",
        patience: int | None = 10,
        tie_break: str | None = "validation_loss",
        keep: KeepEpoch = "best",
    ):
        super().__init__()
        self.monitor = monitor
        self.patience = None if keep == "last" else patience
        self.tie_break = tie_break
        self.keep = keep
        self.best_score = float("-inf")
        self.best_loss = float("inf")
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.wait = 0

    def _improves(self, score: float, loss: float) -> bool:
        return self.keep == "last" or score > self.best_score or (score == self.best_score and loss < self.best_loss)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or self.monitor not in metrics:
            return
        score = float(metrics[self.monitor])
        loss = float(metrics[self.tie_break]) if self.tie_break in metrics else float("inf")
        if self._improves(score, loss):
            self.best_score, self.best_loss, self.best_epoch, self.wait = score, loss, trainer.current_epoch, 0
            if self.keep == "best":
                self.best_state = copy.deepcopy(pl_module.module.network.state_dict())
        else:
            self.wait += 1
        stop = self.patience is not None and self.wait > self.patience
        trainer.should_stop = trainer.should_stop or trainer.strategy.reduce_boolean_decision(stop, all=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.best_state is not None:
            pl_module.module.network.load_state_dict(self.best_state)
        best_epoch = -1 if self.best_epoch is None else self.best_epoch
        for name, value in zip(_SUMMARY, (trainer.current_epoch, best_epoch, self.best_score), strict=True):
            _results.send(trainer, name, value)

"""Self-supervised pretraining of the encoder with scBERT's masked-bin objective, trained through Lightning."""

from __future__ import annotations

import inspect
import logging
import os
import signal
from collections.abc import Sequence
from typing import Any, Literal

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from scipy import sparse
from torch.utils.data import DataLoader, Dataset

from scanpy_canal._logging import quiet_training
from scanpy_canal._snapshot import said_write_errors
from scanpy_canal.nn import (
    PerformerLM,
    check_destination,
    mask_tokens,
    masked_accuracy_counts,
    masked_lm_loss,
    staged_directory,
    tokenize,
    write_pretrained,
)
from scanpy_canal.pp import align_genes

from . import _results
from ._data import check_expression
from ._module import DEFAULT_ARCH
from ._progress import progress_callbacks
from ._schedule import rate

logger = logging.getLogger("scanpy_canal")

HISTORY_FILE = "history.csv"
#: The name under which the per-epoch table is returned to the main process (see :mod:`._results`).
HISTORY_RESULT = "pretraining_history"
HISTORY_COLUMNS = [
    "epoch",
    "lr",
    "loss_train",
    "masked_accuracy_train",
    "loss_validation",
    "masked_accuracy_validation",
]
LRSchedule = Literal["constant", "warm_restarts"]


class CellTokens(Dataset):
    """Cells of a CSR matrix, batched into tokens by :meth:`collate` (one vectorised step per batch)."""

    def __init__(self, x: sparse.csr_matrix):
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> torch.Tensor:
        """The tokens of the cells `indices`, ``(len(indices), genes + 1)``."""
        return tokenize(self.x[np.asarray(indices)])


class PretrainingPlan(pl.LightningModule):
    """Masked-bin pretraining of a :class:`~scanpy_canal.nn.PerformerLM` with its per-token output head.

    Every batch hides ``ceil(mask_prob * n)`` of each cell's ``n`` non-zero bins (see
    :func:`~scanpy_canal.nn.mask_tokens`); the loss is the cross-entropy on the hidden positions. Per epoch, the loss
    and the masked-token accuracy (the most likely bin among 1..5, as scBERT reports it) are summed over all devices
    and kept in ``records`` and, as a table, in ``trainer.callback_metrics`` (see :func:`pretraining_history`).
    Validation masks are drawn from a generator seeded with `seed` at every validation epoch, so each epoch is scored
    on the same hidden tokens.

    Parameters
    ----------
    encoder
        The encoder with its token head (``to_out`` maps hidden states to token logits).
    lr
        Adam's learning rate (the peak, with the warm-restart schedule).
    lr_schedule
        ``"constant"``, or ``"warm_restarts"``: scBERT's per-epoch cosine schedule with warm restarts, whose first
        epoch trains at 1e-6 and which reaches `lr` at epoch 6.
    mask_prob, replace_prob
        See :func:`~scanpy_canal.nn.mask_tokens`.
    seed
        Seed of the validation masks.
    """

    def __init__(
        self,
        encoder: PerformerLM,
        *,
        lr: float = 1e-4,
        lr_schedule: LRSchedule = "constant",
        mask_prob: float = 0.15,
        replace_prob: float = 0.9,
        seed: int = 0,
    ):
        super().__init__()
        if lr_schedule not in ("constant", "warm_restarts"):
            raise ValueError(f"lr_schedule must be 'constant' or 'warm_restarts', got {lr_schedule!r}.")
        if not 0 <= mask_prob <= 1 or not 0 <= replace_prob <= 1:
            raise ValueError(f"mask_prob and replace_prob must lie in [0, 1], got {mask_prob} and {replace_prob}.")
        self.encoder = encoder
        self.lr, self.lr_schedule = lr, lr_schedule
        self.mask_prob, self.replace_prob = mask_prob, replace_prob
        self.seed = seed
        self.records: dict[int, dict[str, float]] = {}
        self._totals: dict[str, torch.Tensor] = {}
        self._validation_generator: torch.Generator | None = None

    def _masked_step(self, tokens: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
        inputs, labels = mask_tokens(
            tokens, mask_prob=self.mask_prob, replace_prob=self.replace_prob, generator=generator
        )
        logits = self.encoder(inputs)
        loss = masked_lm_loss(logits, labels)
        correct, total = masked_accuracy_counts(logits.detach(), labels).double()
        sums = torch.stack([loss.detach().double() * total, correct, total])  # loss sum, correct, masked tokens
        self._totals[mode] = self._totals.get(mode, 0) + sums
        return loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Loss on one batch of tokens."""
        loss = self._masked_step(batch, "train")
        self.log("loss", loss, prog_bar=True, batch_size=batch.shape[0])
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        """Score one batch of held-out cells."""
        self._masked_step(batch, "validation", self._validation_generator)

    def on_train_epoch_start(self) -> None:
        self._totals.pop("train", None)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.records.setdefault(self.current_epoch + 1, {"epoch": self.current_epoch + 1})["lr"] = lr

    def on_validation_epoch_start(self) -> None:
        self._totals.pop("validation", None)
        self._validation_generator = torch.Generator().manual_seed(self.seed)

    def on_train_epoch_end(self) -> None:
        self._close_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._close_epoch("validation")

    def _close_epoch(self, mode: str) -> None:
        """Sum the epoch's counts over devices, log them and record them."""
        if self.trainer.sanity_checking or mode not in self._totals:
            return
        loss_sum, correct, total = self.trainer.strategy.reduce(self._totals.pop(mode), reduce_op="sum").tolist()
        metrics = {f"loss_{mode}": loss_sum / max(total, 1), f"masked_accuracy_{mode}": correct / max(total, 1)}
        self.log_dict(metrics, prog_bar=True, sync_dist=True)  # equal on every device: syncing changes nothing
        self.records.setdefault(self.current_epoch + 1, {"epoch": self.current_epoch + 1}).update(metrics)
        table = [
            [self.records[epoch].get(column, np.nan) for column in HISTORY_COLUMNS] for epoch in sorted(self.records)
        ]
        _results.send(self.trainer, HISTORY_RESULT, table)

    def configure_optimizers(self):
        """Adam over the trainable parameters (the gene table stays frozen), per epoch scheduled if asked."""
        optimizer = torch.optim.Adam([p for p in self.encoder.parameters() if p.requires_grad], lr=self.lr)
        if self.lr_schedule == "constant":
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: rate(epoch, self.lr) / self.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


def pretraining_history(callback_metrics: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One row per epoch: ``epoch``, ``lr``, ``loss_train``, ``masked_accuracy_train`` and the validation pair."""
    table = _results.received(callback_metrics).get(HISTORY_RESULT, torch.zeros(0, len(HISTORY_COLUMNS)))
    frame = pd.DataFrame(table.numpy(), columns=HISTORY_COLUMNS).astype({"epoch": int})
    return frame.dropna(axis=1, how="all")


def _split(n_cells: int, validation_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 <= validation_size < 1:
        raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
    order = np.random.default_rng(seed).permutation(n_cells)
    n_validation = int(round(validation_size * n_cells))
    if n_cells - n_validation < 1:
        raise ValueError(f"Pretraining needs at least one training cell; got {n_cells} cells.")
    return np.sort(order[n_validation:]), np.sort(order[:n_validation])


def _check_arch(arch: dict[str, Any]) -> None:
    if "max_seq_len" in arch:
        raise ValueError("The sequence length follows the genes: leave `max_seq_len` out.")
    unknown = sorted(set(arch) - set(inspect.signature(PerformerLM).parameters))
    if unknown:
        raise TypeError(
            f"pretrain() got unexpected keyword arguments {unknown}: its keywords beyond its own are the encoder's "
            "(PerformerLM); pass Lightning Trainer options in `trainer_kwargs`, e.g. trainer_kwargs={'precision': "
            "'bf16-mixed'}."
        )


def _loader(x: sparse.csr_matrix, batch_size: int, *, shuffle: bool) -> DataLoader:
    """Batches of tokens, shuffled by the global generator (seeded by `pretrain`).

    A `torch.Generator` given to the loader could not travel to spawned processes (``ddp_spawn``).
    """
    cells = CellTokens(x)
    return DataLoader(cells, batch_size=batch_size, shuffle=shuffle, collate_fn=cells.collate)


def pretrain(
    adata: ad.AnnData,
    save_path: str | os.PathLike,
    *,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    max_epochs: int = 20,
    batch_size: int = 16,
    accumulate_grad_batches: int = 1,
    lr: float = 1e-4,
    lr_schedule: LRSchedule = "constant",
    mask_prob: float = 0.15,
    replace_prob: float = 0.9,
    validation_size: float = 0.05,
    seed: int = 0,
    accelerator: str = "auto",
    devices: int | list[int] | str = "auto",
    strategy: str = "auto",
    num_nodes: int = 1,
    overwrite: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
    **arch: Any,
) -> pd.DataFrame:
    """Pretrain an encoder on unlabelled cells with scBERT's masked-bin objective and save it with its genes.

    Each cell's tokens (:func:`~scanpy_canal.nn.tokenize`) have ``ceil(mask_prob * n)`` of their ``n`` non-zero
    bins chosen at random; 90% of those (`replace_prob`) are replaced by the mask token, and the model learns to
    recover the chosen bins (cross-entropy on them only). The gene table (scBERT's frozen gene2vec) starts random
    and stays frozen, so it only tells the genes apart. Training runs on Lightning: ``accelerator="gpu",
    devices=4, strategy="ddp", num_nodes=2`` trains on 8 GPUs with a distributed sampler. Gradients are clipped at
    norm 100, as in scBERT.

    The directory written to `save_path` is what ``CANAL(adata, pretrained=save_path)`` and
    :func:`scanpy_canal.nn.load_pretrained` read: ``config.json``, ``genes.txt``, ``weights.pt`` (see
    :func:`scanpy_canal.nn.save_pretrained`) and ``history.csv`` (the returned table). It is written by the first
    process only, next to `save_path`, and swapped into place in one step when training has finished (see
    :func:`scanpy_canal.nn.save_pretrained`); if another process is writing `save_path` then, it waits for it.

    Parameters
    ----------
    adata
        Unlabelled cells with ``log2(1 + counts per 10k)`` values (see :func:`scanpy_canal.pp.normalize`).
    save_path
        The directory to create.
    genes
        The vocabulary, in positional order (default: ``adata.var_names``); genes absent from `adata` are
        unexpressed.
    layer
        Read this layer instead of X.
    max_epochs
        Passes over the training cells (scBERT: 100, over about a million cells).
    batch_size
        Cells per batch on each device (scBERT: 3 per GPU at 16,907 positions).
    accumulate_grad_batches
        Batches whose gradients add up to one optimiser step (scBERT: 60).
    lr
        Adam's learning rate (scBERT: 1e-4).
    lr_schedule
        ``"constant"``, or ``"warm_restarts"``: scBERT's per-epoch cosine schedule with warm restarts (15, 25,
        45, ... epochs), whose first epoch trains at 1e-6; it suits long runs only.
    mask_prob
        Fraction of each cell's non-zero bins to predict.
    replace_prob
        Fraction of those replaced by the mask token (the others are left as they are).
    validation_size
        Fraction of the cells held out to measure the masked-token accuracy every epoch (scBERT: 5%); 0 for none.
    seed
        Seed of the weights, the split, the order of the cells and the masks.
    accelerator, devices, strategy, num_nodes
        Lightning's.
    overwrite
        Replace an existing `save_path`; otherwise an existing directory is an error, raised before training.
    trainer_kwargs
        Other :class:`lightning.pytorch.Trainer` arguments (e.g. ``precision``, ``enable_progress_bar``).
    **arch
        Encoder architecture (see :class:`~scanpy_canal.nn.PerformerLM`), scBERT's by default; the sequence length
        follows the genes. Other keywords are an error (Trainer options go in `trainer_kwargs`).

    Returns
    -------
    One row per epoch: ``epoch``, ``lr``, ``loss_train``, ``masked_accuracy_train`` and, with validation cells,
    ``loss_validation`` and ``masked_accuracy_validation``.

    Examples
    --------
    >>> import scanpy_canal as canal
    >>> stream = canal.datasets.pbmc68k_stream()
    >>> history = canal.pretrain(
    ...     stream.train[0], "pbmc_encoder", max_epochs=2, dim=32, depth=2, heads=4, dim_head=16
    ... )  # doctest: +SKIP
    >>> canal.CANAL.setup_anndata(stream.train[0], labels_key="cell_type")  # doctest: +SKIP
    >>> model = canal.CANAL(stream.train[0], pretrained="pbmc_encoder", n_top_genes=300)  # doctest: +SKIP
    """
    check_destination(save_path, overwrite=overwrite)
    _check_arch(arch)
    genes = [str(gene) for gene in (adata.var_names if genes is None else genes)]
    x = align_genes(adata, genes, layer=layer).X
    check_expression(x, what="the pretraining data")
    train_idx, validation_idx = _split(x.shape[0], validation_size, seed)
    settings = {
        "n_cells": len(train_idx),
        "n_validation_cells": len(validation_idx),
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "accumulate_grad_batches": accumulate_grad_batches,
        "lr": lr,
        "lr_schedule": lr_schedule,
        "mask_prob": mask_prob,
        "replace_prob": replace_prob,
        "seed": seed,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = PerformerLM(**{**DEFAULT_ARCH, **arch, "max_seq_len": len(genes) + 1})
        plan = PretrainingPlan(
            encoder, lr=lr, lr_schedule=lr_schedule, mask_prob=mask_prob, replace_prob=replace_prob, seed=seed
        )
        options = {
            "max_epochs": max_epochs,
            "accelerator": accelerator,
            "devices": devices,
            "strategy": strategy,
            "num_nodes": num_nodes,
            "accumulate_grad_batches": accumulate_grad_batches,
            "gradient_clip_val": 100.0,
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            **(trainer_kwargs or {}),
        }
        shown = {"masked_accuracy_validation": "validation masked accuracy"}
        options["callbacks"] = [*options.get("callbacks", []), *progress_callbacks(options, "Pretraining", shown)]
        validation = _loader(x[validation_idx], batch_size, shuffle=False) if len(validation_idx) else None
        with quiet_training():  # Lightning's chatter only at "debug" verbosity
            trainer = pl.Trainer(**options)
            try:
                trainer.fit(plan, _loader(x[train_idx], batch_size, shuffle=True), validation)
            except SIGTERMException as error:  # Lightning's answer to SIGTERM: a SystemExit with status 0
                raise SystemExit(128 + signal.SIGTERM) from error
    history = pretraining_history(trainer.callback_metrics)
    if trainer.is_global_zero:
        # Waits for another writer of save_path rather than discard the training; config.json (written last by
        # write_pretrained) records the checksum of history.csv too.
        with (
            said_write_errors(save_path, "encoder"),
            staged_directory(save_path, overwrite=overwrite, wait=True) as staging,
        ):
            history.to_csv(staging / HISTORY_FILE, index=False)
            write_pretrained(staging, encoder.cpu().eval(), genes, info={"pretraining": settings})
        logger.info("Pretrained encoder written to %s.", save_path)
    return history

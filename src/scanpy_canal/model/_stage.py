"""One continual-learning stage, the procedure behind :meth:`~scanpy_canal.CANAL.train`.

Assemble the stage's cells and the example bank, fit, refresh the bank and the calibration cells, record the stage.
:meth:`StageTrainingMixin._train_stage` is the whole procedure, step by step; :meth:`~scanpy_canal.CANAL.train` only
gathers its settings into a :class:`StageSettings`.
"""

from __future__ import annotations

import copy
import logging
import signal
import warnings
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from scipy import sparse
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import LayerField, NumericalObsField
from scvi.dataloaders import DataSplitter
from scvi.model._utils import use_distributed_sampler
from scvi.train import TrainRunner
from scvi.train._logger import SimpleLogger

from scanpy_canal._logging import quiet_training
from scanpy_canal.pp import align_genes

from ._bank import update_bank
from ._conformal import calibration_footprint, split_held_out, update_calibration_cells
from ._data import (
    balanced_class_weights,
    balances_classes,
    cell_fingerprints,
    check_expression,
    read_labels,
    registered_gene_symbols,
    setup_args,
    split_stage,
)
from ._input_space import InputReference, fit_reference
from ._module import ROW_KEY
from ._ontology import merge_terms
from ._options import StageSettings
from ._precision import resolve_precision, training_device
from ._progress import StageTimeEstimate, progress_callbacks
from ._schedule import rate, stage_schedule
from ._stage_relations import RelationFindingMixin
from ._training_plan import BestEpochEarlyStopping, stage_outcome
from ._tree import grow_tree, has_children, subtree_matrix

logger = logging.getLogger("scanpy_canal")

#: Largest frozen-block cache that ``cache_frozen=None`` keeps (hidden states of every training cell).
FROZEN_CACHE_BUDGET = 4 * 2**30
#: What a failed stage puts back, besides the network.
_ROLLED_BACK = (
    "cell_types_",
    "cell_type_parents_",
    "cell_type_terms_",
    "stage_",
    "example_bank_",
    "calibration_cells_",
    "input_reference_",
)
_LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed"}
_LABEL_COLUMN = "_canal_label"
_ROW_COLUMN = "_canal_row"


@dataclass(frozen=True)
class _StageCells:
    """The cells one stage trains on: the stage's own, then the replayed bank, in the model's panel."""

    data: ad.AnnData  # the stage's own cells
    labels: np.ndarray  # their cell types
    training: ad.AnnData  # the stage's cells, then the bank's; obs: label codes in `cell_types` order, row numbers
    cell_types: list[str]  # the known types, then the stage's new ones
    new_types: list[str]
    new_parents: dict[str, str]  # relations {child: parent} this stage adds to the cell-type tree
    relation_evidence: dict[str, dict]  # per new type: the shares of its cells called each known type, or its terms


@dataclass(frozen=True)
class _Fit:
    """What fitting a stage gave besides the weights."""

    validation: np.ndarray  # rows of the training cells held out for validation (and the best epoch)
    calibration: np.ndarray  # rows of the stage's cells held out for novel-cell calibration: used to choose nothing
    distill_weight: float
    balance_classes: bool  # whether the types weighed the same in the loss
    summary: dict[str, float]  # epochs, best_epoch (from 0; -1 for none), best_score
    epochs: pd.DataFrame  # per-epoch metrics


class StageTrainingMixin(RelationFindingMixin):
    """The stage procedure of :class:`~scanpy_canal.CANAL`.

    Reads and updates the model's ``module``, ``cell_types_``, ``example_bank_``, ``calibration_cells_``, ``stage_``,
    ``stage_history_`` and ``training_log_``; runs the network through ``_forward`` (:class:`InferenceMixin`).
    """

    def _train_stage(self, adata: ad.AnnData | None, *, stage: int | None, settings: StageSettings) -> None:
        """Train the next stage on `adata`; if anything fails (Ctrl+C included), the model is left as it was."""
        number = self._next_stage(adata, stage)
        data, labels = self._stage_data(adata, number)
        terms = self._stage_terms(adata, labels)
        self._check_repeated_cells(data, number, settings.repeated_cells)
        snapshot = copy.deepcopy({name: getattr(self, name) for name in _ROLLED_BACK})
        network = copy.deepcopy(self.module.network)
        try:
            with torch.random.fork_rng(devices=[]), quiet_training():  # Lightning's chatter only at "debug" verbosity
                torch.manual_seed(self.seed_ + number)
                self.cell_type_terms_ = merge_terms(self.cell_type_terms_, terms)
                cells = self._assemble(data, labels, settings, ontology=bool(terms))
                self.cell_type_parents_ = grow_tree(self.cell_type_parents_, cells.new_parents, cells.cell_types)
                fit = self._fit(cells, number, settings)
            self.cell_types_, self.stage_ = cells.cell_types, number
            bank_kept_all = self._refresh_bank_and_calibration(cells, fit, number, settings)
        except BaseException as error:
            self.module.network = network
            for name, value in snapshot.items():
                setattr(self, name, value)
            self.module.finish_stage()
            self.module.eval()
            if isinstance(error, SIGTERMException):  # Lightning's answer to SIGTERM: a SystemExit with status 0
                raise SystemExit(128 + signal.SIGTERM) from error
            if isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt):
                # Lightning answers Ctrl+C with exit(1) and ignores SIGINT from then on; give the user theirs back.
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt from error
            raise
        self._record(cells, fit, number, settings, bank_kept_all)
        self._update_summary()

    # ------------------------------------------------------------------------------------------------- inputs
    def _next_stage(self, adata: ad.AnnData | None, stage: int | None) -> int:
        next_stage = self.stage_ + 1
        if stage is not None and stage != next_stage:
            raise ValueError(
                f"The model has completed {self.stage_} stage(s); the next stage is {next_stage}, not {stage}."
            )
        if adata is None and (self.stage_ > 0 or self.adata is None):
            raise ValueError(f"Stage {next_stage} needs new labelled data: `model.train(adata)`.")
        return next_stage

    def _stage_data(self, adata: ad.AnnData | None, stage: int) -> tuple[ad.AnnData, np.ndarray]:
        """The stage's cells in the gene panel (a new AnnData, values checked) and their cell types."""
        adata = self.adata if adata is None else adata
        labels_key, layer = setup_args(type(self), adata)
        if labels_key is None:
            raise ValueError("Register the stage's data first: `CANAL.setup_anndata(adata, labels_key=...)`.")
        labels = read_labels(adata, labels_key)
        data = align_genes(adata, self.genes_, layer=layer, gene_symbols=registered_gene_symbols(type(self), adata))
        check_expression(data.X, what=f"the stage-{stage} data")
        if len(set(self.cell_types_) | set(labels)) == 1:
            logger.warning(
                "The model knows a single cell type, %r: it predicts it for every cell until a stage adds others.",
                labels[0],
            )
        return data, labels

    def _check_repeated_cells(self, data: ad.AnnData, stage: int, action: str) -> None:
        """Warn about (or, with `action` ``"error"``, refuse) stage cells the model has already seen.

        A cell was seen if one of its example bank (trained on) or calibration cells (held out) has the same
        observation name and values; these are all the model keeps of earlier stages.
        """
        kept = [cells for cells in (self.example_bank_, self.calibration_cells_) if cells is not None]
        if not kept:
            return
        seen = set().union(*(cell_fingerprints(cells) for cells in kept))
        repeated = sum(fingerprint in seen for fingerprint in cell_fingerprints(data))
        if repeated == 0:
            return
        message = (
            f"{repeated} of the {data.n_obs} cells of stage {stage} have the same observation name and values as "
            "cells of earlier stages that the model keeps (example bank or calibration cells): is this data trained "
            "again?"
        )
        if action == "error":
            raise ValueError(f"{message} Pass repeated_cells='warn' to train on it anyway.")
        logger.warning("%s Training on it anyway (repeated_cells='error' refuses such a stage).", message)

    def _assemble(
        self, data: ad.AnnData, labels: np.ndarray, settings: StageSettings, *, ontology: bool
    ) -> _StageCells:
        """The stage's cells plus the replayed bank, with label codes over the known and the new cell types."""
        new_types = sorted(set(labels) - set(self.cell_types_))
        new_parents, evidence = self._stage_relations(data, labels, new_types, settings, ontology=ontology)
        cell_types = self.cell_types_ + new_types
        matrices, names = [data.X], [labels]
        if self.example_bank_ is not None and self.example_bank_.n_obs > 0:
            matrices.append(sparse.csr_matrix(self.example_bank_.X))
            names.append(self.example_bank_.obs["cell_type"].astype(str).to_numpy())
        codes = pd.Categorical(np.concatenate(names), categories=cell_types).codes
        obs = pd.DataFrame(
            {_LABEL_COLUMN: codes.astype(np.float32), _ROW_COLUMN: np.arange(len(codes), dtype=np.float32)},
            index=pd.RangeIndex(len(codes)).astype(str),
        )
        training = ad.AnnData(sparse.vstack(matrices, format="csr", dtype=np.float32), obs=obs)
        return _StageCells(data, labels, training, cell_types, new_types, new_parents, evidence)

    # ------------------------------------------------------------------------------------------------- fitting
    def _fit(self, cells: _StageCells, stage: int, settings: StageSettings) -> _Fit:
        """Grow the head for the new types and train the network in place (keeping the epoch `keep_epoch` says)."""
        n_old = len(self.cell_types_)
        self.module.head.add_classes(len(cells.new_types))
        codes = cells.training.obs[_LABEL_COLUMN].to_numpy().astype(np.int64)
        rng = np.random.default_rng(self.seed_ + stage)
        train_idx, val_idx = split_stage(
            codes, cells.data.n_obs, settings.validation_size, rng, split_bank=settings.split_bank
        )
        # Cells that chose the best epoch would make the conformal p-values optimistic: calibrate on the others.
        choose_epoch = settings.keep_epoch == "best"
        val_idx, calibration_idx = split_held_out(codes, val_idx, cells.data.n_obs, rng, choose_epoch=choose_epoch)
        loss_inputs = {}
        balanced = balances_classes(
            settings.balance_classes, self.stage_history_, replays=len(codes) > cells.data.n_obs
        )
        if balanced:
            weights = balanced_class_weights(codes[train_idx], len(cells.cell_types))
            loss_inputs["class_weight"] = torch.as_tensor(weights, dtype=torch.float32)
        if has_children(self.cell_type_parents_):
            loss_inputs["subtrees"] = subtree_matrix(self.cell_type_parents_, cells.cell_types)
        distill_weight = settings.distill_weight * n_old / len(cells.cell_types) if stage > 1 else 0.0
        if distill_weight > 0:
            self.module.attach_teacher()
        manager = AnnDataManager(
            fields=[
                LayerField(REGISTRY_KEYS.X_KEY, None, is_count_data=False),
                NumericalObsField(REGISTRY_KEYS.LABELS_KEY, _LABEL_COLUMN),
                NumericalObsField(ROW_KEY, _ROW_COLUMN),
            ]
        )
        manager.register_fields(cells.training)
        plan = self._training_plan_cls(
            self.module,
            cells=cells.training.X,
            cache_frozen=self._cache_frozen(settings.cache_frozen, cells.training.n_obs),
            lr=settings.lr,
            schedule=stage_schedule(settings.keep_epoch, settings.max_epochs),
            label_smoothing=settings.label_smoothing,
            distill_weight=distill_weight,
            **loss_inputs,
        )
        # scvi-tools' logger keeps the epochs in memory (read by the plan); by default it writes to disk under DDP.
        trainer_kwargs = {"logger": SimpleLogger(), "simple_progress_bar": False, **settings.trainer_kwargs}
        splitter = DataSplitter(
            manager,
            external_indexing=[train_idx, val_idx, np.setdiff1d(calibration_idx, val_idx)],  # "test": never read
            batch_size=settings.batch_size,
            distributed_sampler=use_distributed_sampler(trainer_kwargs.get("strategy")),
        )
        callbacks = [
            *trainer_kwargs.pop("callbacks", []),
            BestEpochEarlyStopping(patience=settings.early_stopping_patience, keep=settings.keep_epoch),
            StageTimeEstimate(f"Stage {stage}"),
            *progress_callbacks(trainer_kwargs, f"Stage {stage}", {"accuracy_validation": "validation accuracy"}),
        ]
        runner = TrainRunner(
            self,
            training_plan=plan,
            data_splitter=splitter,
            max_epochs=settings.max_epochs,
            accelerator=settings.accelerator,
            devices=settings.devices,
            precision=_LIGHTNING_PRECISION[
                resolve_precision(settings.precision, training_device(settings.accelerator))
            ],
            check_val_every_n_epoch=1,
            callbacks=callbacks,
            **trainer_kwargs,
        )
        self.module.train()
        with warnings.catch_warnings():
            # The teacher is in eval mode on purpose; Lightning would warn about it at every stage.
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
            runner()
        self.module.finish_stage()
        self.module.eval()
        summary, epochs = stage_outcome(runner.trainer.callback_metrics)
        return _Fit(val_idx, calibration_idx, distill_weight, balanced, summary, epochs)

    def _cache_frozen(self, cache_frozen: bool | None, n_cells: int) -> bool:
        """Whether the stage keeps the frozen-block cache: `cache_frozen`, or if `None` whether it fits the budget."""
        if cache_frozen is not None:
            return cache_frozen
        config = self.module.network.config
        size = n_cells * config["max_seq_len"] * config["dim"] * 4
        if size > FROZEN_CACHE_BUDGET:
            logger.info(
                "Recomputing the frozen blocks at every step: caching them for %d cells would take %.1f GiB.",
                n_cells,
                size / 2**30,
            )
        return size <= FROZEN_CACHE_BUDGET

    # ------------------------------------------------------------------------------------------ after fitting
    def _refresh_bank_and_calibration(self, cells: _StageCells, fit: _Fit, stage: int, settings: StageSettings) -> bool:
        """Choose the bank, the calibration cells and the input-space reference anew, under the new network.

        Bank and calibration cells carry their manifold vectors; the input space is fitted on the stage's cells but
        its calibration cells, and on the new bank. The stage's held-out cells never join the bank, and those that did
        not choose the best epoch (all of them when the last epoch is kept) become calibration cells; the bank takes,
        per type, the stage's training cells closest to the type's prototype, as the original does. Returns whether
        the new bank holds every cell it was offered (the old bank's and the stage's training cells).
        """
        calibration = self.calibration_cells_
        n_cells, n_training = cells.data.n_obs, cells.training.n_obs
        matrices = [cells.training.X] + ([] if calibration is None else [calibration.X])
        forward = self._forward(sparse.vstack(matrices, format="csr"))
        manifold = forward["manifold"].numpy()
        stage_cells = ad.AnnData(cells.data.X, obs=pd.DataFrame(index=cells.data.obs_names), var=cells.data.var)
        stage_cells.obsm["manifold"] = manifold[:n_cells]
        held_out = np.isin(np.arange(n_cells), np.concatenate([fit.validation, fit.calibration]))
        calibrating = np.isin(np.arange(n_cells), fit.calibration)
        if self.example_bank_ is not None:
            self.example_bank_.obsm["manifold"] = manifold[n_cells:n_training]
        if calibration is not None:
            calibration.obsm["manifold"] = manifold[n_training:]
        offered = (0 if self.example_bank_ is None else self.example_bank_.n_obs) + int((~held_out).sum())
        if settings.rehearsal_size == 0:
            self.example_bank_ = None
        else:
            self.example_bank_ = update_bank(
                self.example_bank_,
                stage_cells[~held_out],
                cells.labels[~held_out],
                forward["embedding"].numpy()[:n_cells][~held_out],
                self.module.head.fc3.weight.detach().cpu().numpy(),
                self.cell_types_,
                stage=stage,
                size=settings.rehearsal_size,
            )
        self.input_reference_ = self._input_reference(cells, fit, stage)
        self.calibration_cells_ = update_calibration_cells(
            calibration,
            stage_cells[calibrating],
            cells.labels[calibrating],
            self.cell_types_,
            stage=stage,
            size=settings.calibration_size,
            seed=self.seed_ + stage,
        )
        return self.example_bank_ is not None and self.example_bank_.n_obs == offered

    def _input_reference(self, cells: _StageCells, fit: _Fit, stage: int) -> InputReference:
        """The input space of the new bank and the stage's cells but its calibration cells (kept exchangeable)."""
        kept = np.setdiff1d(np.arange(cells.data.n_obs), fit.calibration)
        return fit_reference(
            cells.data.X[kept],
            cells.labels[kept],
            self.example_bank_,
            seed=self.seed_ + stage,
            standardise=self.input_space_ == "standardised",
        )

    def _record(self, cells: _StageCells, fit: _Fit, stage: int, settings: StageSettings, bank_kept_all: bool) -> None:
        """Append the stage to ``stage_history_`` and its epochs to ``training_log_``."""
        best_epoch = None if fit.summary["best_epoch"] < 0 else int(fit.summary["best_epoch"])
        if not fit.epochs.empty:
            log = fit.epochs.reset_index(drop=True)
            log.insert(0, "epoch", np.arange(1, len(log) + 1))
            log.insert(0, "stage", stage)
            schedule = stage_schedule(settings.keep_epoch, settings.max_epochs)
            log["lr"] = [rate(e, settings.lr, **schedule) for e in range(len(log))]
            log["best"] = log["epoch"] == (-1 if best_epoch is None else best_epoch + 1)
            self.training_log_ = pd.concat([self.training_log_, log], ignore_index=True)
        footprint = calibration_footprint(self.calibration_cells_)
        logger.info(
            "Stage %d: %d calibration cells kept for novel-cell p-values (%.1f MB).",
            stage,
            footprint["calibration_cells"],
            footprint["calibration_bytes"] / 1e6,
        )
        self.stage_history_.append(
            {
                "stage": stage,
                "n_cells": int(cells.data.n_obs),
                "n_replayed": int(cells.training.n_obs - cells.data.n_obs),
                "new_cell_types": cells.new_types if stage > 1 else sorted(set(cells.labels)),  # stage 1: all
                "new_parents": cells.new_parents,
                "relation_evidence": cells.relation_evidence,
                "epochs": int(fit.summary["epochs"]),
                "best_epoch": None if best_epoch is None else best_epoch + 1,
                "best_validation_accuracy": None if best_epoch is None else fit.summary["best_score"],
                "distill_weight": fit.distill_weight,
                "rehearsal_size": settings.rehearsal_size,
                "balance_classes": fit.balance_classes,
                "bank_kept_every_cell": bank_kept_all,
                "split_bank": settings.split_bank,
                "keep_epoch": settings.keep_epoch,
                **footprint,
            }
        )

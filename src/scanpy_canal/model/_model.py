"""The CANAL model: a pretrained Performer fine-tuned stage by stage with replay and distillation."""

from __future__ import annotations

import copy
import logging
import os
import signal
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data._constants import _SCVI_UUID_KEY
from scvi.data.fields import CategoricalObsField, LayerField, NumericalObsField
from scvi.dataloaders import DataSplitter
from scvi.model._utils import use_distributed_sampler
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner

from scanpy_canal.nn import SCBERT_CONFIG, load_pretrained, tokenize
from scanpy_canal.pp import align_genes
from scanpy_canal.pp._align import panel_columns, scatter_columns

from ._bank import update_bank
from ._data import check_expression, h5ad_var_names, highly_variable_genes, read_labels, stratified_split
from ._module import ROW_KEY, CANALModule
from ._novelty import NoveltyReference, calibrated_reference, mixup_reference
from ._schedule import cosine_warm_restarts
from ._training_plan import MIN_LR, BestEpochEarlyStopping, CANALTrainingPlan, stage_outcome

logger = logging.getLogger("scanpy_canal")

UNASSIGNED = "Unassigned"
#: The encoder architecture when none is given: scBERT's (the sequence length follows the gene panel).
DEFAULT_ARCH = {key: value for key, value in SCBERT_CONFIG.items() if key != "max_seq_len"}
#: Held-out cells kept per stage to calibrate the novel-cell threshold.
N_CALIBRATION_CELLS = 2000
_LABEL_COLUMN = "_canal_label"
_ROW_COLUMN = "_canal_row"
#: Largest frozen-prefix cache that ``cache_frozen=None`` keeps (hidden states of every training cell).
PREFIX_CACHE_BUDGET = 4 * 2**30

Threshold = Literal["calibrated", "canal"] | float
Precision = Literal["32", "bf16"]


@dataclass
class Outputs:
    """Everything one forward pass over a query gives (see :meth:`CANAL.predict`)."""

    labels: np.ndarray
    probabilities: pd.DataFrame
    embedding: np.ndarray
    uncertainty: np.ndarray | None = None
    threshold: float | None = None


class CANAL(BaseModelClass):
    """Continual cell-type annotation with a pretrained Performer (scBERT) language model.

    Each call of :meth:`train` is one stage: stage 1 fine-tunes on the data given here; later stages take new labelled
    data, which may bring new cell types, replay the example bank and distil the previous model's embeddings.

    Parameters
    ----------
    adata
        Stage-1 data, registered with :meth:`setup_anndata` (with a ``labels_key``), holding
        ``log2(1 + counts per 10k)`` values (see :func:`scanpy_canal.pp.normalize`).
    registry
        Only used by scvi-tools internals; leave it `None`.
    pretrained
        Weights that start the encoder: a directory written by :func:`scanpy_canal.pretrain` or
        :func:`scanpy_canal.nn.save_pretrained` (it carries its gene vocabulary), or a scBERT checkpoint (``.pth``,
        e.g. ``panglao_pretrain.pth``, which needs `pretrained_genes`). The panel's genes are matched to the
        vocabulary by name and take their positional rows; genes the vocabulary lacks are left out of the panel,
        with a warning.
    pretrained_genes
        The checkpoint's gene vocabulary in positional order: a sequence of names, a text file with one per line,
        or an ``.h5ad`` file whose ``var_names`` are the vocabulary. Its length must match the checkpoint.
    genes
        The gene panel. Default: the `n_top_genes` highly variable genes of `adata`, or all its genes.
    n_top_genes
        Choose this many highly variable genes of `adata` as the panel.
    seed
        Seed of the initial weights, the data splits, the training order and the novel-cell mixes.
    trainable_blocks
        Encoder blocks that learn (CANAL: the second to last); the final LayerNorm and the head always learn.
    **arch
        Encoder architecture (see :class:`~scanpy_canal.nn.PerformerLM`), scBERT's by default.

    Examples
    --------
    >>> import scanpy_canal as canal
    >>> stream = canal.datasets.pbmc68k_stream()
    >>> first, second = stream.train[0], stream.train[1]
    >>> canal.CANAL.setup_anndata(first, labels_key="cell_type")
    >>> model = canal.CANAL(first, dim=32, depth=2, heads=2, dim_head=16)
    >>> model.train(max_epochs=2, accelerator="cpu", enable_progress_bar=False)
    >>> canal.CANAL.setup_anndata(second, labels_key="cell_type")
    >>> model.train(second, max_epochs=2, accelerator="cpu", enable_progress_bar=False)
    >>> labels = model.predict(stream.test[0], novel=True)
    """

    _module_cls = CANALModule
    _training_plan_cls = CANALTrainingPlan

    def __init__(
        self,
        adata: ad.AnnData | None = None,
        registry: dict | None = None,
        *,
        pretrained: str | os.PathLike | None = None,
        pretrained_genes: Sequence[str] | str | os.PathLike | None = None,
        genes: Sequence[str] | None = None,
        n_top_genes: int | None = None,
        seed: int = 0,
        trainable_blocks: Sequence[int] = (-2,),
        **arch: Any,
    ):
        if adata is None:
            raise ValueError("CANAL needs stage-1 data; use `CANAL.load` to restore a saved model.")
        _refuse_view(adata)
        super().__init__(adata, registry)
        labels_key, layer = self._setup_args(adata)
        if labels_key is None:
            raise ValueError("CANAL trains on labelled data: call `CANAL.setup_anndata(adata, labels_key=...)` first.")
        x = self._layer(adata, layer)
        check_expression(x, what="the stage-1 data")
        vocabulary = pretrained_genes
        if isinstance(vocabulary, str | os.PathLike) and str(vocabulary).endswith(".h5ad"):
            vocabulary = h5ad_var_names(vocabulary)
        candidates = None if pretrained is None or genes is not None else _vocabulary(pretrained, vocabulary)
        panel = _choose_panel(x, adata.var_names, genes, n_top_genes, candidates=candidates)
        checkpoint = None
        if pretrained is not None:
            checkpoint, panel = load_pretrained(pretrained, vocabulary=vocabulary, genes=panel)
            arch = {key: value for key, value in checkpoint.config.items() if key != "max_seq_len"} | arch
        self._build(
            genes=panel,
            cell_types=sorted(set(read_labels(adata, labels_key))),
            arch={**DEFAULT_ARCH, **arch},
            trainable_blocks=trainable_blocks,
            seed=seed,
        )
        if checkpoint is not None:
            state = self.module.network.state_dict()
            state.update({k: v for k, v in checkpoint.state_dict().items() if not k.startswith("to_out.")})
            self.module.network.load_state_dict(state)
        self.init_params_ = self._get_init_params(locals())

    def _build(
        self, *, genes: Sequence[str], cell_types: Sequence[str], arch: dict, trainable_blocks: Sequence[int], seed: int
    ) -> None:
        if len(set(genes)) != len(genes):
            raise ValueError("The gene panel has duplicated names.")
        self.genes_ = list(genes)
        self.cell_types_ = list(cell_types)
        self.arch_ = dict(arch)
        self.trainable_blocks_ = list(trainable_blocks)
        self.seed_ = seed
        self.stage_ = 0
        self.stage_history_: list[dict] = []
        self.example_bank_: ad.AnnData | None = None
        self.calibration_: torch.Tensor | None = None
        self.training_log_ = pd.DataFrame()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = self._module_cls(
                n_genes=len(genes), n_classes=len(cell_types), arch=self.arch_, trainable_blocks=trainable_blocks
            )
        self._update_summary()

    def _update_summary(self) -> None:
        """Refresh the one-line description that scvi-tools prints for the model."""
        self._model_summary_string = (
            f"CANAL model: {len(self.genes_)} genes, {len(self.cell_types_)} cell types, stage {self.stage_}, "
            f"encoder dim {self.arch_['dim']} depth {self.arch_['depth']}"
        )

    # ----------------------------------------------------------------------------------------------------- state
    @property
    def stage(self) -> int:
        """Number of completed stages."""
        return self.stage_

    @property
    def cell_types(self) -> list[str]:
        """Cell types the model knows, in output-row order (older stages first)."""
        return list(self.cell_types_)

    @property
    def genes(self) -> list[str]:
        """The gene panel, in sequence order."""
        return list(self.genes_)

    @property
    def example_bank(self) -> ad.AnnData | None:
        """The replay examples (X in the gene panel; obs ``cell_type``, ``stage`` and ``rank``), `None` before stage 1."""
        return self.example_bank_

    @property
    def history(self) -> pd.DataFrame:
        """Per-epoch training metrics, one block of rows per stage (column ``stage``)."""
        return self.training_log_

    # ------------------------------------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(cls, adata: ad.AnnData, labels_key: str | None = None, layer: str | None = None, **kwargs):
        """Register `adata` for CANAL.

        Parameters
        ----------
        adata
            Cells with ``log2(1 + counts per 10k)`` values in X or `layer`.
        labels_key
            Column of ``adata.obs`` holding cell types (needed to train; every cell must have one).
        layer
            Layer to read instead of X.
        **kwargs
            Passed to scvi-tools' field registration.

        Notes
        -----
        Like every scvi-tools model, registration writes ``adata.uns["_scvi_uuid"]`` and
        ``adata.uns["_scvi_manager_uuid"]``, and with a `labels_key` the label codes in ``adata.obs["_scvi_labels"]``.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        _refuse_view(adata)
        if adata.n_obs == 0:
            raise ValueError("adata has no cells.")
        if layer is not None and layer not in adata.layers:
            raise KeyError(f"Layer {layer!r} not found; available layers: {list(adata.layers)}.")
        fields = [LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False, correct_data_format=False)]
        if labels_key is not None:
            read_labels(adata, labels_key)
            fields.append(CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key))
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    def _setup_args(self, adata: ad.AnnData) -> tuple[str | None, str | None]:
        """``(labels_key, layer)`` registered for `adata`, or for the AnnData it was copied or subset from."""
        # scvi's own lookup refuses copies; the setup arguments hold for them all the same.
        manager = type(self)._setup_adata_manager_store.get(adata.uns.get(_SCVI_UUID_KEY))
        if manager is None:
            return None, None
        args = manager.registry["setup_args"]
        return args.get("labels_key"), args.get("layer")

    @staticmethod
    def _layer(adata: ad.AnnData, layer: str | None):
        return adata.X if layer is None else adata.layers[layer]

    def _aligned(self, adata: ad.AnnData, *, what: str) -> ad.AnnData:
        """`adata` in the model's gene panel (a new AnnData), with its values checked."""
        _, layer = self._setup_args(adata)
        aligned = align_genes(adata, self.genes_, layer=layer)
        check_expression(aligned.X, what=what)
        return aligned

    # ------------------------------------------------------------------------------------------------ training
    def train(
        self,
        adata: ad.AnnData | None = None,
        *,
        stage: int | None = None,
        max_epochs: int = 100,
        batch_size: int = 16,
        lr: float = 2e-4,
        rehearsal_size: int = 1000,
        distill_weight: float = 0.1,
        label_smoothing: float = 0.1,
        early_stopping_patience: int | None = 10,
        validation_size: float = 0.2,
        cache_frozen: bool | None = None,
        precision: Precision = "32",
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        **trainer_kwargs: Any,
    ) -> None:
        """Train one stage.

        Stage 1 uses the data given to the constructor; every later stage needs new labelled data (registered with
        :meth:`setup_anndata`). New cell types get new output rows after the known ones. From stage 2 on, the example
        bank is replayed with the new cells and the embeddings of a frozen copy of the previous model are distilled
        with weight ``distill_weight * C_old / C_new``. The epoch with the best validation accuracy is kept, also when
        ``max_epochs`` is reached. If training is interrupted (e.g. KeyboardInterrupt) the model is left as it was.

        A stage may bring only cell types the model knows (it refines them) or a single cell type (a model that knows
        only one type predicts it for every cell, and a warning says so). It needs two cells of at least one type,
        so that a cell can be held out for validation; a single cell is an error.

        Parameters
        ----------
        adata
            The stage's labelled cells; `None` for stage 1 means the constructor's data.
        stage
            The stage number, to guard against running stages out of order (default: the next one).
        max_epochs
            Upper bound on epochs.
        batch_size
            Cells per minibatch.
        lr
            Peak learning rate of the per-epoch cosine schedule with warm restarts (epoch 1 trains at 1e-6).
        rehearsal_size
            Capacity of the example bank kept after this stage and replayed in the next one (0 keeps none).
        distill_weight
            Weight of the embedding distillation loss before the ``C_old / C_new`` factor (0 disables it).
        label_smoothing
            Label smoothing of the cross-entropy.
        early_stopping_patience
            Stop after more than this many epochs without a better validation accuracy (`None`: never).
        validation_size
            Fraction of each cell type held out for validation, early stopping and threshold calibration, in
            ``(0, 1)``; every type keeps at least one cell to train on.
        cache_frozen
            Compute the hidden states of the frozen blocks before the first trainable one once per cell and stage, and
            train from them, instead of recomputing them at every step; the random features of those blocks are then
            not redrawn during the stage. `None` (default): cache when the hidden states of all training cells fit in
            4 GiB. `False`: recompute at every step, as the original CANAL. The frozen teacher's embeddings are always
            computed once per cell.
        precision
            ``"32"`` (float32) or ``"bf16"`` (bfloat16 autocast through Lightning's ``"bf16-mixed"``, on CPU or GPU).
        accelerator, devices
            Lightning's; ``accelerator="gpu", devices=-1, strategy="ddp_find_unused_parameters_true"`` trains on all
            GPUs (see :doc:`/multi_gpu`).
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``strategy``, ``enable_progress_bar``).
        """
        next_stage = self.stage_ + 1
        if stage is not None and stage != next_stage:
            raise ValueError(
                f"The model has completed {self.stage_} stage(s); the next stage is {next_stage}, not {stage}."
            )
        if adata is None:
            if self.stage_ > 0 or self.adata is None:
                raise ValueError(f"Stage {next_stage} needs new labelled data: `model.train(adata)`.")
            adata = self.adata
        labels_key, _ = self._setup_args(adata)
        if labels_key is None:
            raise ValueError("Register the stage's data first: `CANAL.setup_anndata(adata, labels_key=...)`.")
        labels = read_labels(adata, labels_key)
        data = self._aligned(adata, what=f"the stage-{next_stage} data")
        if len(set(self.cell_types_) | set(labels)) == 1:
            logger.warning(
                "The model knows a single cell type, %r: it predicts it for every cell until a stage adds others.",
                labels[0],
            )
        snapshot = copy.deepcopy((self.module.network, self.cell_types_, self.example_bank_, self.calibration_))
        try:
            self._train_stage(
                data,
                labels,
                stage=next_stage,
                max_epochs=max_epochs,
                batch_size=batch_size,
                lr=lr,
                rehearsal_size=rehearsal_size,
                distill_weight=distill_weight,
                label_smoothing=label_smoothing,
                early_stopping_patience=early_stopping_patience,
                validation_size=validation_size,
                cache_frozen=cache_frozen,
                accelerator=accelerator,
                devices=devices,
                precision=_lightning_precision(precision),
                **trainer_kwargs,
            )
        except BaseException as error:
            self.module.network, self.cell_types_, self.example_bank_, self.calibration_ = snapshot
            self.module.finish_stage()
            self.module.eval()
            if isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt):
                # Lightning answers Ctrl+C with exit(1) and ignores SIGINT from then on; give the user theirs back.
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt from error
            raise

    def _train_stage(
        self,
        data: ad.AnnData,
        labels: np.ndarray,
        *,
        stage: int,
        max_epochs: int,
        batch_size: int,
        lr: float,
        rehearsal_size: int,
        distill_weight: float,
        label_smoothing: float,
        early_stopping_patience: int | None,
        validation_size: float,
        cache_frozen: bool | None,
        accelerator: str,
        devices: int | list[int] | str,
        **trainer_kwargs: Any,
    ) -> None:
        n_old = len(self.cell_types_)
        new_types = sorted(set(labels) - set(self.cell_types_))
        cell_types = self.cell_types_ + new_types
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed_ + stage)
            self.module.head.add_classes(len(new_types))
            training = self._training_data(data, labels, cell_types)
            codes = training.obs[_LABEL_COLUMN].to_numpy().astype(np.int64)
            train_idx, val_idx = stratified_split(codes, validation_size, np.random.default_rng(self.seed_ + stage))
            teacher_weight = distill_weight * n_old / len(cell_types) if stage > 1 else 0.0
            if teacher_weight > 0:
                self.module.attach_teacher()
            manager = AnnDataManager(
                fields=[
                    LayerField(REGISTRY_KEYS.X_KEY, None, is_count_data=False),
                    NumericalObsField(REGISTRY_KEYS.LABELS_KEY, _LABEL_COLUMN),
                    NumericalObsField(ROW_KEY, _ROW_COLUMN),
                ]
            )
            manager.register_fields(training)
            plan = self._training_plan_cls(
                self.module,
                cells=training.X,
                cache_prefix=self._use_prefix_cache(cache_frozen, training.n_obs),
                lr=lr,
                label_smoothing=label_smoothing,
                distill_weight=teacher_weight,
            )
            splitter = DataSplitter(
                manager,
                external_indexing=[train_idx, val_idx, np.zeros(0, np.int64)],
                batch_size=batch_size,
                distributed_sampler=use_distributed_sampler(trainer_kwargs.get("strategy")),
            )
            stopper = BestEpochEarlyStopping(patience=early_stopping_patience)
            callbacks = [*trainer_kwargs.pop("callbacks", []), stopper]
            runner = TrainRunner(
                self,
                training_plan=plan,
                data_splitter=splitter,
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
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
        self.cell_types_ = cell_types
        self.stage_ = stage
        self._after_stage(data, labels, training, val_idx, stage=stage, rehearsal_size=rehearsal_size)
        summary, epochs = stage_outcome(runner.trainer.callback_metrics)
        best_epoch = None if summary["best_epoch"] < 0 else int(summary["best_epoch"])
        self._log_stage(epochs, best_epoch, stage=stage, lr=lr)
        self.stage_history_.append(
            {
                "stage": stage,
                "n_cells": int(data.n_obs),
                "n_replayed": int(training.n_obs - data.n_obs),
                "new_cell_types": new_types,
                "epochs": int(summary["epochs"]),
                "best_epoch": None if best_epoch is None else best_epoch + 1,
                "best_validation_accuracy": None if best_epoch is None else summary["best_score"],
                "distill_weight": teacher_weight,
                "rehearsal_size": rehearsal_size,
            }
        )
        self._update_summary()

    def _use_prefix_cache(self, cache_frozen: bool | None, n_cells: int) -> bool:
        if cache_frozen is not None:
            return cache_frozen
        config = self.module.network.config
        size = n_cells * config["max_seq_len"] * config["dim"] * 4
        if size > PREFIX_CACHE_BUDGET:
            logger.info(
                "Recomputing the frozen blocks at every step: caching them for %d cells would take %.1f GiB.",
                n_cells,
                size / 2**30,
            )
        return size <= PREFIX_CACHE_BUDGET

    def _training_data(self, data: ad.AnnData, labels: np.ndarray, cell_types: list[str]) -> ad.AnnData:
        """The stage's cells plus the replayed bank, with label codes in `cell_types` order."""
        matrices, names = [data.X], [labels]
        if self.example_bank_ is not None and self.example_bank_.n_obs > 0:
            matrices.append(sparse.csr_matrix(self.example_bank_.X))
            names.append(self.example_bank_.obs["cell_type"].astype(str).to_numpy())
        codes = pd.Categorical(np.concatenate(names), categories=cell_types).codes
        obs = pd.DataFrame(
            {_LABEL_COLUMN: codes.astype(np.float32), _ROW_COLUMN: np.arange(len(codes), dtype=np.float32)},
            index=pd.RangeIndex(len(codes)).astype(str),
        )
        return ad.AnnData(sparse.vstack(matrices, format="csr", dtype=np.float32), obs=obs)

    def _after_stage(
        self,
        data: ad.AnnData,
        labels: np.ndarray,
        training: ad.AnnData,
        val_idx: np.ndarray,
        *,
        stage: int,
        rehearsal_size: int,
    ) -> None:
        """Refresh the example bank and the cells that calibrate the novel-cell threshold."""
        if rehearsal_size == 0:
            self.example_bank_ = None
        else:
            embedding = self._forward(data.X)["embedding"].numpy()
            prototypes = self.module.head.fc3.weight.detach().cpu().numpy()
            panel = ad.AnnData(data.X, obs=pd.DataFrame(index=data.obs_names), var=pd.DataFrame(index=data.var_names))
            self.example_bank_ = update_bank(
                self.example_bank_,
                panel,
                labels,
                embedding,
                prototypes,
                self.cell_types_,
                stage=stage,
                size=rehearsal_size,
            )
        held_out = val_idx if len(val_idx) > 0 else np.arange(training.n_obs)
        rng = np.random.default_rng(self.seed_ + stage)
        held_out = np.sort(rng.permutation(held_out)[:N_CALIBRATION_CELLS])
        self.calibration_ = self._forward(training.X[held_out])["manifold"]

    def _log_stage(self, epochs: pd.DataFrame, best_epoch: int | None, *, stage: int, lr: float) -> None:
        if epochs.empty:
            return
        log = epochs.reset_index(drop=True)
        log.insert(0, "epoch", np.arange(1, len(log) + 1))
        log.insert(0, "stage", stage)
        log["lr"] = [cosine_warm_restarts(e, max_lr=lr, min_lr=min(MIN_LR, lr)) for e in range(len(log))]
        log["best"] = log["epoch"] == (-1 if best_epoch is None else best_epoch + 1)
        self.training_log_ = pd.concat([self.training_log_, log], ignore_index=True)

    # ---------------------------------------------------------------------------------------------- inference
    @torch.inference_mode()
    def _forward(
        self, x: sparse.csr_matrix | np.ndarray, batch_size: int | None = None, precision: Precision = "32"
    ) -> dict[str, torch.Tensor]:
        """Manifold, embedding and logits (float32, on the CPU) of every row of `x`, in batches."""
        network = self.module.network.eval()
        device = next(network.parameters()).device
        batch_size = batch_size or self.module.inference_batch_size(device)
        outputs: dict[str, list[torch.Tensor]] = {"manifold": [], "embedding": [], "logits": []}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_check_precision(precision) == "bf16"):
            for start in range(0, x.shape[0], batch_size):
                tokens = tokenize(x[start : start + batch_size])
                if device.type == "cuda":  # page-locked memory lets the copy overlap the previous batch's work
                    tokens = tokens.pin_memory()
                tokens = tokens.to(device, non_blocking=True)
                for key, value in zip(outputs, network(tokens), strict=True):
                    outputs[key].append(value.float().cpu())
        return {key: torch.cat(values) for key, values in outputs.items()}

    def _query_chunks(self, adata: ad.AnnData, chunk_size: int) -> Iterator[sparse.csr_matrix]:
        """The query's values in the gene panel, `chunk_size` cells at a time (read from disk when `adata` is backed)."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of cells, got {chunk_size}.")
        _, layer = self._setup_args(adata)
        columns, found = panel_columns(adata, self.genes_)
        x = self._layer(adata, layer)
        for start in range(0, adata.n_obs, chunk_size):
            chunk = scatter_columns(x[start : start + chunk_size][:, columns], found)
            check_expression(chunk, what="the query")
            yield chunk

    def _novelty_reference(
        self, manifold: torch.Tensor, logits: torch.Tensor, *, threshold: Threshold, temperature: float, seed: int
    ) -> NoveltyReference:
        generator = torch.Generator().manual_seed(seed)
        classify = lambda m: self.module.head.classify(m.to(self.device))[1]
        if threshold == "canal":
            return mixup_reference(manifold, logits, classify, temperature=temperature, generator=generator)
        if self.calibration_ is None:
            raise ValueError("The model has no calibration cells yet: train a stage first, or use threshold='canal'.")
        with torch.inference_mode():
            calibration_logits = classify(self.calibration_).float().cpu()
            reference = calibrated_reference(
                self.calibration_, calibration_logits, classify, temperature=temperature, generator=generator
            )
        if threshold == "calibrated":
            return reference
        if isinstance(threshold, int | float) and not isinstance(threshold, bool) and 0 <= threshold <= 1:
            return NoveltyReference(reference.energy_min, reference.energy_max, float(threshold))
        raise ValueError(f"threshold must be 'calibrated', 'canal' or a number in [0, 1], got {threshold!r}.")

    def _predict_outputs(
        self,
        adata: ad.AnnData | None = None,
        *,
        novel: bool = False,
        temperature: float = 0.8,
        threshold: Threshold = "calibrated",
        batch_size: int | None = None,
        seed: int = 0,
        precision: Precision = "32",
        chunk_size: int = 10_000,
    ) -> Outputs:
        if adata is None:
            adata = self.adata
        if adata is None:
            raise ValueError("Pass the cells to annotate.")
        if adata.n_obs == 0:
            raise ValueError("The query has no cells.")
        chunks = [self._forward(chunk, batch_size, precision) for chunk in self._query_chunks(adata, chunk_size)]
        forward = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
        probabilities = forward["logits"].softmax(dim=-1)
        labels = np.asarray(self.cell_types_, dtype=object)[probabilities.argmax(dim=-1).numpy()]
        outputs = Outputs(
            labels=labels,
            probabilities=pd.DataFrame(probabilities.numpy(), index=adata.obs_names, columns=self.cell_types_),
            embedding=forward["embedding"].numpy(),
        )
        if novel:
            with torch.inference_mode():
                reference = self._novelty_reference(
                    forward["manifold"], forward["logits"], threshold=threshold, temperature=temperature, seed=seed
                )
            uncertainty = reference.uncertainty(forward["logits"], temperature).numpy()
            outputs.labels = np.where(uncertainty > reference.threshold, UNASSIGNED, labels).astype(object)
            outputs.uncertainty, outputs.threshold = uncertainty, reference.threshold
        return outputs

    def predict(
        self,
        adata: ad.AnnData | None = None,
        *,
        novel: bool = False,
        temperature: float = 0.8,
        soft: bool = False,
        batch_size: int | None = None,
        seed: int = 0,
        threshold: Threshold = "calibrated",
        precision: Precision = "32",
        chunk_size: int = 10_000,
    ) -> np.ndarray | pd.DataFrame:
        """Predict cell types, calling cells of never-seen types ``"Unassigned"`` when `novel`.

        Genes are matched to the model's panel by name (missing genes count as unexpressed).

        Parameters
        ----------
        adata
            Cells with ``log2(1 + counts per 10k)`` values (a registered layer is used); default: the stage-1 data.
        novel
            Flag cells whose uncertainty ``(normalised energy + 1 - confidence) / 2`` exceeds the threshold.
        temperature
            Energy temperature.
        soft
            Return the class probabilities instead of labels.
        batch_size
            Cells per forward pass.
        seed
            Seed of the mixup partners and weights behind the threshold.
        threshold
            ``"calibrated"`` (default): energy range and threshold from held-out training cells of the last stage,
            the threshold best separating them from virtual cells mixed between two types; every cell gets the same
            answer whatever else is in the query. ``"canal"``: the original rule, relative to this query (needs at
            least 2 cells). Or a number in ``[0, 1]`` used as the threshold itself.
        precision
            ``"32"`` (float32) or ``"bf16"`` (bfloat16 autocast: faster on GPUs and on CPUs with bfloat16 instructions,
            with slightly different probabilities; see the performance benchmarks).
        chunk_size
            Cells read, aligned to the panel and predicted at a time. A backed AnnData
            (``anndata.read_h5ad(path, backed="r")``) is read from disk chunk by chunk, so memory stays bounded.

        Returns
        -------
        An array of cell-type names, or with `soft` a DataFrame of probabilities (cells x cell types).
        """
        outputs = self._predict_outputs(
            adata,
            novel=novel,
            temperature=temperature,
            threshold=threshold,
            batch_size=batch_size,
            seed=seed,
            precision=precision,
            chunk_size=chunk_size,
        )
        return outputs.probabilities if soft else outputs.labels

    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        *,
        batch_size: int | None = None,
        precision: Precision = "32",
        chunk_size: int = 10_000,
    ) -> np.ndarray:
        """The 64-d embedding of each cell (the head's ``fc2`` output), shape ``(n_obs, 64)``.

        The options are those of :meth:`predict`.
        """
        outputs = self._predict_outputs(adata, batch_size=batch_size, precision=precision, chunk_size=chunk_size)
        return outputs.embedding

    # ----------------------------------------------------------------------------------------------- save/load
    def save(self, dir_path: str, overwrite: bool = False, **kwargs: Any) -> None:
        """Save to a directory: weights (``weights.pt``), metadata (``model.json``) and the bank (``.h5ad``).

        Nothing is pickled. The directory is written next to its destination and renamed into place, so an
        interrupted save never damages an earlier model at the same path. An existing `dir_path` is an error unless
        `overwrite`, and even then only a saved model or an empty directory is replaced, never other files.
        """
        from ._io import save_model

        save_model(self, dir_path, overwrite=overwrite)

    @classmethod
    def load(cls, dir_path: str, adata: ad.AnnData | None = None, **kwargs: Any) -> CANAL:
        """Load a model written by :meth:`save`; `adata` becomes the default data of :meth:`predict`."""
        from ._io import load_model

        return load_model(cls, dir_path, adata=adata)

    @classmethod
    def from_legacy_checkpoint(
        cls,
        path: str | os.PathLike,
        genes: Sequence[str] | str | os.PathLike,
        *,
        trust_pickle: bool = False,
        stage: int | None = None,
    ) -> CANAL:
        """Build a trained model from a stage checkpoint of the original CANAL tool.

        The file (``{experiment}_finetune_dataset_{dataset}_CANAL.pth``) holds the network's weights
        (``model_state_dict``), the cell types in output-row order (``annotation``), the panel's positions in the
        gene list of the original run (``highly_variable_idx``) and, except at the final stage, the example bank as a
        pickled AnnData (``example_bank``). The model predicts right away and can train further stages; novel-cell
        detection needs ``threshold="canal"`` until it has trained a stage here (the calibration cells are not in
        the file).

        Parameters
        ----------
        path
            The checkpoint.
        genes
            Names for the checkpoint's gene positions, as a sequence, a text file with one per line, or an ``.h5ad``
            file whose ``var_names`` are used. Either the panel itself, in sequence order (as many genes as positions,
            e.g. the ``var_names`` of the original run's preprocessed data), or the whole gene list the original run
            aligned its data to (e.g. the 16906 genes of ``panglao_10000.h5ad``), from which ``highly_variable_idx``
            picks the panel.
        trust_pickle
            Unpickle Python objects in the file. Unpickling can run arbitrary code, so without this only tensors and
            numpy arrays are read and a file with an example bank is refused. Only set it for a file from a source you
            trust.
        stage
            Number of stages the checkpoint has completed (default: ``t`` of its ``stage_{t}`` directory, else 1).

        Returns
        -------
        The model, in eval mode.

        Examples
        --------
        >>> model = canal.CANAL.from_legacy_checkpoint(
        ...     "ckpt/pancreas/stage_2/pancreas_finetune_dataset_Enge_CANAL.pth",
        ...     genes="panglao_genes.txt",
        ...     trust_pickle=True,
        ... )  # doctest: +SKIP
        >>> labels = model.predict(query)  # doctest: +SKIP
        """
        from ._legacy import load_legacy_model

        return load_legacy_model(cls, path, genes, trust_pickle=trust_pickle, stage=stage)


def _refuse_view(adata: ad.AnnData) -> None:
    """Refuse a view: registration writes to `adata`, and scvi-tools ties a model to the registered object."""
    if adata.is_view:
        raise ValueError(
            "adata is a view of another AnnData (e.g. `adata[mask]`); make it an AnnData of its own first: "
            "`adata = adata[mask].copy()`, then `CANAL.setup_anndata(adata, ...)`."
        )


def _choose_panel(
    x, var_names: pd.Index, genes: Sequence[str] | None, n_top_genes: int | None, *, candidates: list[str] | None
) -> list[str]:
    """`genes`, or the `n_top_genes` most variable (or all) genes of the data among the `candidates`."""
    if genes is not None and n_top_genes is not None:
        raise ValueError("Give either `genes` or `n_top_genes`, not both.")
    if genes is not None:
        return [str(g) for g in genes]
    names = pd.Index(var_names.astype(str))
    usable = ~names.duplicated()  # a duplicated name counts once, with its first column, as in `align_genes`
    if candidates is not None:  # choose among the genes the pretrained weights know, so the panel keeps its size
        usable &= names.isin(candidates)
        if not usable.any():
            raise ValueError("None of the data's genes is in the pretrained weights' vocabulary.")
    if not usable.all():
        x, names = x[:, usable], names[usable]
    if n_top_genes is not None:
        return highly_variable_genes(x, names, n_top_genes)
    return list(names)


def _vocabulary(path: str | os.PathLike, vocabulary: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
    """The gene vocabulary of pretrained weights: a directory's own, or the one given (names or a text file)."""
    from scanpy_canal.nn import read_vocabulary
    from scanpy_canal.nn._pretrained import GENES_FILE

    if Path(path).is_dir() and (Path(path) / GENES_FILE).is_file():
        return read_vocabulary(Path(path) / GENES_FILE)
    if vocabulary is None:
        return None  # loading the weights says what is missing
    return read_vocabulary(vocabulary)


def _check_precision(precision: str) -> str:
    if precision not in ("32", "bf16"):
        raise ValueError(f"precision must be '32' or 'bf16', got {precision!r}.")
    return precision


def _lightning_precision(precision: str) -> str:
    return {"32": "32-true", "bf16": "bf16-mixed"}[_check_precision(precision)]

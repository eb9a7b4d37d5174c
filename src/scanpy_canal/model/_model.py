"""The CANAL model: a pretrained Performer fine-tuned stage by stage with replay and distillation."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
from scvi.data import AnnDataManager
from scvi.model.base import BaseModelClass

from scanpy_canal.nn import coexpression_embedding
from scanpy_canal.pp import align_genes, gene_names

from ._data import (
    check_expression,
    layer_matrix,
    read_labels,
    refuse_view,
    registered_gene_symbols,
    registration_fields,
    setup_args,
)
from ._defaults import check_gene_embedding, start_default, with_start_defaults
from ._inference import InferenceMixin
from ._io import SaveLoadMixin
from ._legacy import LegacyCheckpointMixin
from ._module import DEFAULT_ARCH, CANALModule
from ._options import (
    REFINE_THRESHOLD,
    Fusion,
    Precision,
    PredictOptions,
    StageSettings,
    Threshold,
    from_arguments,
)
from ._panel import initial_panel
from ._relations import RELATION_THRESHOLD
from ._scores import Score
from ._stage import StageTrainingMixin
from ._state import ModelStateMixin
from ._training_plan import CANALTrainingPlan

if TYPE_CHECKING:
    from mudata import MuData


class CANAL(ModelStateMixin, StageTrainingMixin, InferenceMixin, SaveLoadMixin, LegacyCheckpointMixin, BaseModelClass):
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
        Encoder blocks that learn; the final LayerNorm and the head always learn. Default: with pretrained weights
        the last but one (CANAL's); from random weights, see :mod:`the start defaults <scanpy_canal.model._defaults>`.
    gene_embedding
        The frozen gene vectors added at each position (scBERT's gene2vec) of a random start: ``"coexpression"``,
        each gene's loadings on the leading components of the standardised stage-1 data (co-expressed genes get
        nearby vectors), or ``"random"``, standard normal ones. An error with pretrained weights (they bring theirs).
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
        trainable_blocks: Sequence[int] | None = None,
        gene_embedding: Literal["coexpression", "random"] | None = None,
        **arch: Any,
    ):
        if adata is None:
            raise ValueError("CANAL needs stage-1 data; use `CANAL.load` to restore a saved model.")
        refuse_view(adata)
        super().__init__(adata, registry)
        labels_key, layer = setup_args(type(self), adata)
        gene_symbols = registered_gene_symbols(type(self), adata)
        if labels_key is None:
            raise ValueError("CANAL trains on labelled data: call `CANAL.setup_anndata(adata, labels_key=...)` first.")
        x = layer_matrix(adata, layer)
        check_expression(x, what="the stage-1 data")
        panel, encoder = initial_panel(
            x,
            gene_names(adata, gene_symbols),
            genes=genes,
            n_top_genes=n_top_genes,
            pretrained=pretrained,
            pretrained_genes=pretrained_genes,
        )
        start = "random" if encoder is None else "pretrained"
        gene_embedding = check_gene_embedding(start, gene_embedding)
        if encoder is not None:
            arch = {key: value for key, value in encoder.config.items() if key != "max_seq_len"} | arch
        self._build(
            genes=panel,
            cell_types=sorted(set(read_labels(adata, labels_key))),
            arch={**DEFAULT_ARCH, **arch},
            trainable_blocks=start_default(start, "trainable_blocks", trainable_blocks),
            seed=seed,
            start=start,
            gene_embedding=gene_embedding,
        )
        if encoder is not None:
            self.module.load_encoder(encoder)
        elif gene_embedding == "coexpression":
            panel_values = align_genes(adata, panel, layer=layer, gene_symbols=gene_symbols).X
            self.module.set_gene_table(coexpression_embedding(panel_values, self.arch_["dim"], seed=seed))
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: ad.AnnData,
        labels_key: str | None = None,
        layer: str | None = None,
        gene_symbols: str | None = None,
        **kwargs,
    ):
        """Register `adata` for CANAL.

        Parameters
        ----------
        adata
            Cells with ``log2(1 + counts per 10k)`` values in X or `layer`.
        labels_key
            Column of ``adata.obs`` holding cell types (needed to train; every cell must have one).
        layer
            Layer to read instead of X.
        gene_symbols
            Column of ``adata.var`` holding the gene names, for when ``var_names`` are e.g. Ensembl IDs (see
            :func:`scanpy_canal.pp.align_genes`). Given here, as the layer is, because it says how to read this data
            wherever the model reads it: choosing a new model's panel, training a stage, predicting these cells.
            Cells that are not registered take it as an argument of :meth:`predict`.
        **kwargs
            Passed to scvi-tools' field registration.

        Notes
        -----
        As for every scvi-tools model, registration writes ``uns["_scvi_uuid"]``, ``uns["_scvi_manager_uuid"]`` and,
        with a `labels_key`, the label codes in ``obs["_scvi_labels"]``.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        manager = AnnDataManager(
            fields=registration_fields(adata, labels_key, layer, gene_symbols), setup_method_args=setup_method_args
        )
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    # ------------------------------------------------------------------------------------------------ training
    def train(
        self,
        adata: ad.AnnData | None = None,
        *,
        stage: int | None = None,
        max_epochs: int | None = None,
        batch_size: int = 16,
        lr: float | None = None,
        rehearsal_size: int = 1000,
        distill_weight: float = 0.1,
        label_smoothing: float = 0.1,
        balance_classes: bool | None = None,
        early_stopping_patience: int | None = 10,
        validation_size: float = 0.2,
        split_bank: bool = True,
        calibration_size: int = 2000,
        cache_frozen: bool | None = None,
        precision: Precision = "auto",
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        repeated_cells: Literal["warn", "error"] = "warn",
        parents: Mapping[str, str] | Literal["find"] = "find",
        relation_threshold: float = RELATION_THRESHOLD,
        **trainer_kwargs: Any,
    ) -> None:
        """Train one stage.

        Stage 1 uses the data given to the constructor; every later stage needs new labelled data (registered with
        :meth:`setup_anndata`). New cell types get new output rows after the known ones. From stage 2 on, the example
        bank is replayed with the new cells and the embeddings of a frozen copy of the previous model are distilled
        with weight ``distill_weight * C_old / C_new``. The epoch with the best validation accuracy is kept, also when
        ``max_epochs`` is reached. If training is interrupted (e.g. KeyboardInterrupt) the model is left as it was.
        Where a default depends on how the encoder started, it was chosen by measurement for a random start (the
        "Annotation quality" page) and is the original's for pretrained weights.

        A stage may bring only known cell types (it refines them) or a single one (a model that knows one type predicts
        it for every cell, with a warning). It needs two cells of one type, so that a cell is held out for validation.

        Parameters
        ----------
        adata
            The stage's labelled cells; `None` for stage 1 means the constructor's data.
        stage
            The stage number, to guard against running stages out of order (default: the next one).
        max_epochs
            Upper bound on epochs. Default: 100 with pretrained weights (the original's), 15 from a random start.
        batch_size
            Cells per minibatch.
        lr
            Peak learning rate of the per-epoch cosine schedule with warm restarts (epoch 1 trains at 1e-6). Default:
            2e-4 with pretrained weights (the original's), 1e-3 from a random start.
        rehearsal_size
            Capacity of the example bank kept after this stage and replayed in the next one (0 keeps none).
        distill_weight
            Weight of the embedding distillation loss before the ``C_old / C_new`` factor (0 disables it).
        label_smoothing
            Label smoothing of the cross-entropy.
        balance_classes
            Weight each cell type's cross-entropy by the inverse of its number of training cells (scikit-learn's
            ``class_weight="balanced"``): a type replayed from the bank with a few cells counts as much as a new one
            with hundreds. Default: on from a random start, off with pretrained weights (the original).
        early_stopping_patience
            Stop after more than this many epochs without a better validation accuracy (`None`: never).
        validation_size
            Fraction of each cell type held out, in ``(0, 1)``; every type keeps one cell to train on. Two thirds of
            the stage's own held-out cells become calibration cells, the others choose the best epoch.
        split_bank
            Hold out part of the bank for validation too, as the original. `False`: every bank cell trains (worth it
            for a few cells per type), but early stopping then sees only the stage's types.
        calibration_size
            Capacity of the calibration cells behind novel-cell p-values: held-out cells of every stage, never trained
            on nor replayed, at most ``calibration_size // C`` per type (spread over the stages); 0 keeps none. Their
            memory cost is in :attr:`stage_history_` (``calibration_bytes``).
        cache_frozen
            Compute the hidden states of the frozen blocks before the first trainable one once per cell and stage
            (their random features are then not redrawn). `None` (default): when those of all training cells fit in
            4 GiB. `False`: recompute them at every step, as the original.
        precision
            ``"auto"``: bfloat16 autocast (Lightning's ``"bf16-mixed"``) where the device computes it natively (GPUs,
            CPUs with AVX-512 BF16 or AMX), float32 elsewhere; or ``"32"`` or ``"bf16"``. Before a long stage, its
            expected duration on this device is logged, from its first batches.
        accelerator, devices
            Lightning's; ``accelerator="gpu", devices=-1, strategy="ddp_find_unused_parameters_true"`` trains on all
            GPUs (see :doc:`/multi_gpu`).
        repeated_cells
            Cells the model has seen, with the same observation name and values as a cell it keeps from an earlier
            stage (its example bank or calibration cells), are trained on with a warning that gives their number
            (``"warn"``), or make the stage an error (``"error"``), e.g. to catch a stage's data given twice.
        parents
            Relations this stage adds to the cell-type tree. ``"find"`` (default): found from the data, where the
            known types' held-out cells spread over two or more new types that the model calls them (see
            :doc:`/refinement`); none on pbmc68k's and the synthetic stream without refinements. Or told,
            ``{child: parent}`` (e.g. ``{"CD4 T": "T cell"}``), between known types and the stage's; ``{}`` adds
            none. A cell labelled with a type that has children is supervised by the summed probability of the type
            and its descendants, also when replayed; the tree is :attr:`cell_type_tree`.
        relation_threshold
            With ``parents="find"``: the share of a new type's cells the model must call one known type before the stage
            (not novel) for the new type to become its child, or call two or more known types together for it to
            become their parent.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``strategy``, ``enable_progress_bar``).
        """
        settings = from_arguments(StageSettings, with_start_defaults(self.start_, locals()))
        self._train_stage(adata, stage=stage, settings=settings)

    # ---------------------------------------------------------------------------------------------- inference
    def predict(
        self,
        adata: ad.AnnData | MuData | None = None,
        *,
        novel: bool = False,
        temperature: float = 0.8,
        soft: bool = False,
        batch_size: int | None = None,
        seed: int = 0,
        threshold: Threshold = "conformal",
        alpha: float = 0.05,
        score: Score | Sequence[Score] | None = None,
        fusion: Fusion = "bonferroni",
        precision: Precision = "auto",
        chunk_size: int = 10_000,
        gene_symbols: str | None = None,
        min_gene_overlap: float = 0.1,
        mod: str = "rna",
        attention: Literal["favor", "exact"] = "favor",
        compile: bool | None = None,
        devices: int | list[int] | str | None = None,
        strategy: str = "auto",
        refine_threshold: float = REFINE_THRESHOLD,
    ) -> np.ndarray | pd.DataFrame:
        """Predict cell types, calling cells of never-seen types ``"Unassigned"`` when `novel`.

        Genes are matched to the panel by name (missing ones count as unexpressed); the overlap is logged.

        Parameters
        ----------
        adata
            Cells with ``log2(1 + counts per 10k)`` values (a registered layer is used), or a MuData whose modality
            `mod` holds them; default: the stage-1 data.
        novel
            Call ``"Unassigned"`` the cells whose novelty `score` the `threshold` rule rejects.
        temperature, batch_size
            Energy temperature; cells per forward pass.
        soft
            Return the class probabilities instead of labels.
        seed
            Seed of the mixup partners and weights of the ``"calibrated"`` and ``"canal"`` rules.
        threshold
            ``"conformal"`` (default): unassign the cells whose conformal p-value is at most `alpha`, so that a known
            cell is unassigned with probability at most `alpha`: the cell's score against those of calibration cells
            of every stage predicted as the same type (if 50 or more), or of all; a cell's call does not depend on the
            query. ``"calibrated"``: the ``"mix"`` score above the cut that best separates held-out cells from cells
            mixed between two types. ``"canal"``: the original, query-relative rule. Or the score above which a cell
            is unassigned.
        alpha
            Largest fraction of known cells the ``"conformal"`` rule may unassign, in ``(0, 1)``.
        score
            The novelty score, or several fused (conformal rule): by default ``"input"`` with the ``"conformal"``
            rule (``"energy"`` for a model saved before it existed), ``"mix"`` with the others. ``"input"``: distance from the cell's expression to the
            reference cells in a PCA of the training cells; ``"energy"``, ``"mix"`` (CANAL's), ``"max_probability"``;
            ``"knn"``, ``"mahalanobis"``: distances to the bank in the embedding. See :doc:`/method`.
        fusion
            How several scores make one p-value, the guarantee kept: ``"bonferroni"``, ``m`` times the smallest of
            the ``m`` scores' p-values; ``"scaled"``, the largest score on the bank's scale, calibrated.
        precision
            ``"auto"``: bfloat16 autocast where the device computes it natively (GPUs, CPUs with AVX-512 BF16 or AMX;
            faster, probabilities differ slightly), float32 elsewhere; or ``"32"`` or ``"bf16"``.
        chunk_size
            Cells read, aligned and predicted at a time; a backed AnnData is read chunk by chunk, in bounded memory.
        gene_symbols
            Column of ``adata.var`` holding the gene names to match the panel with, for when ``var_names`` are e.g.
            Ensembl IDs (see :func:`scanpy_canal.pp.align_genes`). Default: the one `adata` was registered with.
        min_gene_overlap
            Smallest fraction of the panel's genes the query must have; with fewer it is an error (0 allows any).
        mod
            The modality to predict when `adata` is a MuData.
        attention, compile
            ``attention="exact"``: softmax attention instead of the FAVOR+ estimate the network was trained with (see
            :doc:`/multi_gpu`). `compile`: run the network through ``torch.compile`` (`None`: on a GPU, from 100,000
            cells).
        devices, strategy
            Predict through Lightning on these devices (e.g. ``devices=4, strategy="ddp"``), each process a share of
            the chunks; `None`: in this process, on the model's device.
        refine_threshold
            With a :attr:`cell_type_tree`: a call goes from a type down to its most probable child while that child's
            subtree holds at least this share of the type's subtree probability (and more than the type's own).

        Returns
        -------
        An array of cell-type names (with a cell-type tree, each as fine as the cell allows), or with `soft` a
        DataFrame of probabilities (cells x cell types).
        """
        options = from_arguments(PredictOptions, locals())
        outputs = self.predict_outputs(adata, options)
        return outputs.probabilities if soft else outputs.labels

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

from scanpy_canal._choices import (
    INPUT_SPACES,
    Attention,
    BalanceClasses,
    Fusion,
    InputSpace,
    KeepEpoch,
    Precision,
    RepeatedCells,
    Score,
    Threshold,
)
from scanpy_canal._option_docs import PREDICT_DOCS, document_options
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
from ._defaults import check_gene_embedding, check_head, start_default, with_start_defaults
from ._inference import InferenceMixin
from ._io import SaveLoadMixin
from ._legacy import LegacyCheckpointMixin
from ._module import DEFAULT_ARCH, CANALModule
from ._options import REFINE_THRESHOLD, STAGE_DOCS, PredictOptions, StageSettings, from_arguments
from ._panel import initial_panel
from ._relations import RELATION_THRESHOLD
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
    input_space
        How the ``"input"`` novelty score's space, refitted at every stage, treats the panel's genes:
        ``"standardised"`` (the default), each gene centred and divided by its standard deviation (as
        ``scanpy.pp.scale``, clipped at 10), so that a gene the reference hardly expresses weighs most, with the
        cell's distance to the PCA's subspace added to the score; or ``"centred"``, a PCA of the centred values (the
        only space of models saved before this option). Chosen on ``benchmarks/leave_types_out.py`` (see the
        "Continual benchmark" page).
    **arch
        Encoder architecture (see :class:`~scanpy_canal.nn.PerformerLM`), scBERT's by default, and the head's:
        ``head_init`` (``"bins"``: the head scores each gene along the ordered expression bins; ``"normal"``:
        PyTorch's start) and ``head_dropout`` (the dropout after the head's two hidden layers while training).
        Default: with pretrained weights CANAL's (``"normal"``, 0); from random weights, see :mod:`the start
        defaults <scanpy_canal.model._defaults>`.

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
        input_space: InputSpace = "standardised",
        **arch: Any,
    ):
        if adata is None:
            raise ValueError("CANAL needs stage-1 data; use `CANAL.load` to restore a saved model.")
        if input_space not in INPUT_SPACES:
            raise ValueError(f"input_space must be one of {INPUT_SPACES}, got {input_space!r}.")
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
            arch=check_head(start, {**DEFAULT_ARCH, **arch}),
            trainable_blocks=start_default(start, "trainable_blocks", trainable_blocks),
            seed=seed,
            start=start,
            gene_embedding=gene_embedding,
            input_space=input_space,
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
        ontology_key: str | None = None,
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
        ontology_key
            Column of ``adata.obs`` holding each cell's Cell Ontology term id (``"CL:0000624"``; one per cell type).
            With it, ``train(parents="find")`` takes the stage's relations from the Cell Ontology instead of the data:
            each new type goes under its nearest ontology ancestor among the model's types, and a known type
            without a parent under its nearest ancestor among the new types. The ontology ships, offline, with the
            optional ``cellxgene-ontology-guide`` package (``pip install "scanpy-canal[ontology]"``).
        **kwargs
            Passed to scvi-tools' field registration.

        Notes
        -----
        As for every scvi-tools model, registration writes ``uns["_scvi_uuid"]``, ``uns["_scvi_manager_uuid"]`` and,
        with a `labels_key`, the label codes in ``obs["_scvi_labels"]``.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        manager = AnnDataManager(
            fields=registration_fields(adata, labels_key, layer, gene_symbols, ontology_key),
            setup_method_args=setup_method_args,
        )
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    # ------------------------------------------------------------------------------------------------ training
    @document_options(STAGE_DOCS)
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
        balance_classes: BalanceClasses | None = None,
        early_stopping_patience: int | None = 10,
        keep_epoch: KeepEpoch | None = None,
        validation_size: float = 0.2,
        split_bank: bool = True,
        calibration_size: int = 2000,
        cache_frozen: bool | None = None,
        precision: Precision = "auto",
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        repeated_cells: RepeatedCells = "warn",
        parents: Mapping[str, str] | Literal["find"] = "find",
        relation_threshold: float = RELATION_THRESHOLD,
        **trainer_kwargs: Any,
    ) -> None:
        """Train one stage.

        Stage 1 uses the data given to the constructor; every later stage needs new labelled data (registered with
        :meth:`setup_anndata`). New cell types get new output rows after the known ones. From stage 2 on, the example
        bank is replayed with the new cells and the embeddings of a frozen copy of the previous model are distilled
        with weight ``distill_weight * C_old / C_new``. The weights kept are those of the epoch with the best
        validation accuracy, or of the last epoch (``keep_epoch``). If training is interrupted (e.g.
        KeyboardInterrupt) the model is left as it was. Where a default depends on how the encoder started, it was
        chosen by measurement for a random start (the "Annotation quality" page) and is the original's for pretrained
        weights.

        A stage may bring only known cell types (it refines them) or a single one (a model that knows one type predicts
        it for every cell, with a warning). It needs two cells of one type, so that a cell is held out for validation.

        Parameters
        ----------
        adata
            The stage's labelled cells; `None` for stage 1 means the constructor's data.
        stage
            The stage number, to guard against running stages out of order (default: the next one).
        {options}
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``strategy``, ``enable_progress_bar``).
        """
        arguments = with_start_defaults(self.start_, locals())
        settings = from_arguments(StageSettings, arguments, besides=("self", "adata", "stage"))
        self._train_stage(adata, stage=stage, settings=settings)

    # ---------------------------------------------------------------------------------------------- inference
    @document_options(PREDICT_DOCS)
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
        attention: Attention = "favor",
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
        soft
            Return the class probabilities instead of labels.
        {options}

        Returns
        -------
        An array of cell-type names (with a cell-type tree, each as fine as the cell allows), or with `soft` a
        DataFrame of probabilities (cells x cell types).
        """
        options = from_arguments(PredictOptions, locals(), besides=("self", "adata", "soft"))
        outputs = self.predict_outputs(adata, options)
        return outputs.probabilities if soft else outputs.labels

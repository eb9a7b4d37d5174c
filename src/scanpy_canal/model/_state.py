"""What a CANAL model holds between stages, and how that state is made new or restored from a file."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import pandas as pd
import torch
from scvi.model.base import BaseModelClass

from ._defaults import Start
from ._input_space import InputReference
from ._tree import tree_frame


class ModelStateMixin:
    """The state of :class:`~scanpy_canal.CANAL`; every attribute ending in ``_`` is saved by scvi-tools' conventions.

    ``genes_`` (the panel), ``cell_types_`` (output-row order), ``arch_``, ``trainable_blocks_``, ``seed_``, ``start_``
    (``"pretrained"`` or ``"random"``, which sets the defaults of ``train``), ``gene_embedding_``, ``input_space_``,
    ``cell_type_parents_`` (the cell-type tree, ``{child: parent}``), ``cell_type_terms_`` (the Cell Ontology id of
    each type that came with one), ``stage_`` (completed stages),
    ``stage_history_`` (one record per stage), ``example_bank_``,
    ``calibration_cells_`` (held-out cells of every stage, for novel-cell p-values), ``input_reference_`` (the
    input-space PCA of the ``"input"`` novelty score, refitted every stage) and ``training_log_`` (per-epoch
    metrics), besides ``module``. The bank and the calibration cells carry their manifold vectors under the current
    network in ``obsm["manifold"]``.
    """

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

    @property
    def cell_type_tree(self) -> pd.DataFrame:
        """The cell-type tree, one row per known type (output-row order).

        Columns: ``parent`` (`None` at a root), ``depth`` (0 at a root) and ``leaf``. Save and load keep it; each
        stage's additions are in :attr:`stage_history_` (``new_parents``).
        """
        return tree_frame(self.cell_type_parents_, self.cell_types_)

    def _build(
        self,
        *,
        genes: Sequence[str],
        cell_types: Sequence[str],
        arch: dict,
        trainable_blocks: Sequence[int],
        seed: int,
        start: Start = "pretrained",
        gene_embedding: str | None = None,
        input_space: str = "centred",
    ) -> None:
        """Start the state of an untrained model and build its module, with initial weights drawn from `seed`.

        `start` (``"pretrained"`` or ``"random"``) sets the defaults of :meth:`train`; `gene_embedding` records how a
        random start's gene table was made.
        """
        if len(set(genes)) != len(genes):
            raise ValueError("The gene panel has duplicated names.")
        self.genes_ = list(genes)
        self.cell_types_ = list(cell_types)
        self.cell_type_parents_: dict[str, str] = {}
        self.cell_type_terms_: dict[str, str] = {}
        self.arch_ = dict(arch)
        self.trainable_blocks_ = list(trainable_blocks)
        self.seed_ = seed
        self.start_ = start
        self.gene_embedding_ = gene_embedding
        self.input_space_ = input_space
        self.stage_ = 0
        self.stage_history_: list[dict] = []
        self.example_bank_: ad.AnnData | None = None
        self.calibration_cells_: ad.AnnData | None = None
        self.input_reference_: InputReference | None = None
        self.training_log_ = pd.DataFrame()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = self._module_cls(
                n_genes=len(genes), n_classes=len(cell_types), arch=self.arch_, trainable_blocks=trainable_blocks
            )
        self._update_summary()

    @classmethod
    def _restored(cls, *, registry: dict, state: dict, **build):
        """A model of this class, without data, from a saved `registry`, its `state` attributes and `_build`'s `build`.

        The caller loads the module's weights; `state` may set ``stage_``, ``stage_history_``, ``cell_type_parents_``,
        ``cell_type_terms_``,
        ``example_bank_``, ``calibration_cells_``, ``input_reference_`` and ``training_log_``.
        """
        model = cls.__new__(cls)
        BaseModelClass.__init__(model, None, registry=registry)
        model._build(**build)
        for name, value in state.items():
            setattr(model, name, value)
        model.is_trained_ = model.stage_ > 0
        # scvi-tools' per-run history (CANAL's is ``training_log_``): a dict, as after training, so that the next
        # stage adds to it instead of warning "Training history cannot be updated".
        model.history_ = {}
        model.init_params_ = {"kwargs": {"genes": model.genes_, "seed": model.seed_, **model.arch_}}
        model._update_summary()
        return model

    def _update_summary(self) -> None:
        """Refresh the one-line description that scvi-tools prints for the model."""
        self._model_summary_string = (
            f"CANAL model: {len(self.genes_)} genes, {len(self.cell_types_)} cell types, stage {self.stage_}, "
            f"encoder dim {self.arch_['dim']} depth {self.arch_['depth']}"
        )

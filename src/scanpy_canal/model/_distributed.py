"""Prediction on several devices through Lightning: each process predicts its share of the query's chunks.

Every process gets all the outputs back, in the cells' order. A spawning strategy (``ddp_spawn``) returns nothing
but weights and metrics to the process that started it, so the outputs come back through a file.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from scanpy_canal._logging import quiet_training

from ._data import layer_matrix, panel_chunk, query_panel
from ._streaming import forward_chunks, forward_settings

if TYPE_CHECKING:
    from ._options import PredictOptions


def distributed_forward(model: Any, adata: ad.AnnData, options: PredictOptions) -> dict[str, torch.Tensor]:
    """Manifold, embedding and logits (float32, on the CPU) of every cell of `adata`, on ``options.devices``.

    `model` is a trained :class:`~scanpy_canal.CANAL`; its network is back on its device afterwards.
    """
    layer, columns, found = query_panel(
        type(model), adata, model.genes_, gene_symbols=options.gene_symbols, min_overlap=options.min_gene_overlap
    )
    chunks = QueryChunks(adata, layer, columns, found, options.chunk_size)
    loader = DataLoader(chunks, batch_size=1, shuffle=False, collate_fn=_only)
    network = model.module.network
    device = next(network.parameters()).device
    with tempfile.TemporaryDirectory() as directory, quiet_training():
        predictor = ChunkPredictor(model.module, options, adata.n_obs, directory)
        trainer = pl.Trainer(
            accelerator="auto",
            devices=options.devices,
            strategy=options.strategy,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.predict(predictor, loader, return_predictions=False)
        outputs = torch.load(Path(directory) / f"rank{trainer.global_rank}.pt", weights_only=True)
    network.to(device)
    return outputs


class QueryChunks(Dataset):
    """Chunk `i` of a query: its cells' values in the model's panel (read from disk when `adata` is backed)."""

    def __init__(self, adata: ad.AnnData, layer: str | None, columns: np.ndarray, found: np.ndarray, size: int):
        self.path = adata.filename if adata.isbacked else None
        self.adata = None if adata.isbacked else adata
        self.layer, self.columns, self.found, self.size = layer, columns, found, size
        self.n_obs = adata.n_obs

    def __len__(self) -> int:
        return math.ceil(self.n_obs / self.size)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        if self.adata is None:  # a backed file is opened anew in every process
            self.adata = ad.read_h5ad(self.path, backed="r")
        x = layer_matrix(self.adata, self.layer)
        return index, panel_chunk(x, index * self.size, self.size, self.columns, self.found)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path is not None:
            state["adata"] = None  # an open HDF5 file does not travel to another process
        return state


class ChunkPredictor(pl.LightningModule):
    """Forward passes over the chunks a process is given; at the end every process writes all the outputs."""

    def __init__(self, module: Any, options: PredictOptions, n_cells: int, directory: str):
        super().__init__()
        self.network = module.network
        self.batch_sizes = {kind: module.inference_batch_size(torch.device(kind)) for kind in ("cpu", "cuda")}
        self.options, self.n_cells, self.directory = options, n_cells, directory
        self.parts: list[tuple[int, dict[str, torch.Tensor]]] = []

    def predict_step(self, batch: tuple[int, Any], batch_idx: int) -> None:
        index, chunk = batch
        batch_size = self.batch_sizes.get(self.device.type, self.batch_sizes["cuda"])
        settings = forward_settings(self.options, batch_size, self.device, self.n_cells)
        self.parts.append((index, forward_chunks(self.network, [chunk], settings)))

    def on_predict_epoch_end(self) -> None:
        parts = self.parts
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, parts)
            parts = [part for shard in gathered for part in shard]
        parts.sort(key=lambda part: part[0])
        outputs = {key: torch.cat([part[1][key] for part in parts]) for key in parts[0][1]}
        torch.save(outputs, Path(self.directory) / f"rank{self.global_rank}.pt")
        self.parts = []


def _only(batch: list[Any]) -> Any:
    return batch[0]

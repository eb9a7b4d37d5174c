"""The forward pass over a query, chunk by chunk: reading ahead, small pinned copies, outputs gathered per chunk.

A thread reads, aligns and tokenises the next chunk (into page-locked memory on a GPU, one byte per token) while the
device computes the current one; its copy to the device runs on a side stream, and the current chunk's outputs come
back to the host only once the next chunk's work is queued, so the GPU is not left waiting on the host.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse

from scanpy_canal._choices import Attention
from scanpy_canal.nn import PerformerLM, exact_attention, tokenize

from ._precision import resolve_precision

_OUTPUTS = ("manifold", "embedding", "logits")
#: Queries from this many cells on are predicted by a compiled network on a GPU, unless `compile` says otherwise: on an
#: H200 compiling took 19 s and raised bfloat16 prediction from 1,728 to 3,950 cells/s, a gain from about 60,000 cells.
AUTO_COMPILE_CELLS = 100_000
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ForwardSettings:
    """How the network runs over a query: cells per pass, precision, attention and whether it is compiled."""

    batch_size: int
    precision: str = "32"
    attention: Attention = "favor"
    compile: bool = False


def forward_settings(options: Any, batch_size: int, device: torch.device, n_cells: int) -> ForwardSettings:
    """The settings of :func:`forward_chunks` on `device` from a query's `options` (`batch_size` when they give none).

    ``options.compile=None`` compiles on a GPU for queries of :data:`AUTO_COMPILE_CELLS` cells or more.
    """
    compile_ = device.type == "cuda" and n_cells >= AUTO_COMPILE_CELLS if options.compile is None else options.compile
    return ForwardSettings(options.batch_size or batch_size, options.precision, options.attention, compile_)


@torch.inference_mode()
def forward_chunks(
    network: PerformerLM, chunks: Iterable[sparse.csr_matrix | np.ndarray], settings: ForwardSettings
) -> dict[str, torch.Tensor]:
    """Manifold, embedding and logits (float32, on the CPU) of every row of every chunk, in order.

    `network` is put in eval mode; it runs on the device its parameters are on.
    """
    network.eval()
    device = next(network.parameters()).device
    precision = resolve_precision(settings.precision, device)
    run = compiled(network) if settings.compile else network
    done: list[dict[str, torch.Tensor]] = []
    pending = None
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    attention = exact_attention(network) if settings.attention == "exact" else contextlib.nullcontext()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with attention, autocast:
        for tokens in read_ahead(chunks, lambda chunk: host_tokens(chunk, pin=side is not None)):
            current = _launch(run, _to_device(tokens, device, side), settings)
            if pending is not None:
                done.append({key: value.cpu() for key, value in pending.items()})
            pending = current
    if pending is not None:
        done.append({key: value.cpu() for key, value in pending.items()})
    if not done:
        return {key: torch.zeros(0) for key in _OUTPUTS}
    return {key: torch.cat([part[key] for part in done]) for key in _OUTPUTS}


def host_tokens(chunk: sparse.csr_matrix | np.ndarray, *, pin: bool) -> torch.Tensor:
    """The chunk's tokens as bytes (bins fit in one), page-locked when `pin` so that their copy can run asynchronously."""
    tokens = tokenize(chunk).to(torch.uint8)
    return tokens.pin_memory() if pin else tokens


def _to_device(tokens: torch.Tensor, device: torch.device, side: torch.cuda.Stream | None) -> torch.Tensor:
    if side is None:
        return tokens.to(device).long()
    with torch.cuda.stream(side):  # the copy overlaps the work already queued on the compute stream
        copied = tokens.to(device, non_blocking=True)
    torch.cuda.current_stream(device).wait_stream(side)
    copied.record_stream(torch.cuda.current_stream(device))
    return copied.long()


def _launch(run: Callable, tokens: torch.Tensor, settings: ForwardSettings) -> dict[str, torch.Tensor]:
    """Queue the forward passes of one chunk, `batch_size` cells at a time; the outputs stay on the device."""
    outputs: dict[str, list[torch.Tensor]] = {key: [] for key in _OUTPUTS}
    for batch in tokens.split(settings.batch_size):
        n = batch.shape[0]
        if settings.compile and n < settings.batch_size:  # one shape: the compiled graph is never rebuilt
            batch = F.pad(batch, (0, 0, 0, settings.batch_size - n))
        for key, value in zip(_OUTPUTS, run(batch), strict=True):
            outputs[key].append(value[:n].float())
    return {key: torch.cat(values) for key, values in outputs.items()}


def compiled(network: PerformerLM) -> Callable:
    """`network` compiled with ``torch.compile`` (once per network; it shares the network's weights)."""
    if network not in _COMPILED:
        _COMPILED[network] = torch.compile(network, dynamic=False)
    return _COMPILED[network]


def read_ahead(items: Iterable[Any], prepare: Callable[[Any], Any], depth: int = 1) -> Iterator[Any]:
    """``prepare(item)`` for every item, computed in a thread up to `depth` items ahead of the consumer."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                ready.put((prepare(item), None))
        except BaseException as error:  # noqa: BLE001 (handed to the consumer, which raises it)
            ready.put((None, error))
            return
        ready.put((end, None))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            value, error = ready.get()
            if error is not None:
                raise error
            if value is end:
                return
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting to put, until it sees `stop`
            with contextlib.suppress(queue.Empty):
                ready.get_nowait()
            thread.join(timeout=0.01)

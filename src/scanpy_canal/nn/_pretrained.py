"""Pretrained encoders on disk: a directory with the architecture, the gene vocabulary and the weights, no pickle."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from scanpy_canal._directories import (
    check_checksums,
    file_checksums,
    replace_directory,
    writer_lock,
)
from scanpy_canal._genes import gene_positions
from scanpy_canal._snapshot import read_consistently, said_write_errors
from scanpy_canal._version import __version__

from ._checkpoint import CheckpointError, infer_config, load_weights, read_state_dict, select_gene_rows
from ._masking import MASK_TOKEN
from ._performer import PerformerLM
from ._tokenize import N_BINS

logger = logging.getLogger("scanpy_canal")

FORMAT = "scanpy-canal pretrained encoder"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
GENES_FILE = "genes.txt"
WEIGHTS_FILE = "weights.pt"
#: How expression values become tokens, recorded with every pretrained encoder.
TOKENS = {
    "values": "log2(1 + counts per 10k)",
    "n_bins": N_BINS,
    "token": "min(floor(value), n_bins)",
    "mask_token": MASK_TOKEN,
    "appended_token": 0,
}
_N_EXAMPLES = 5


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, *, overwrite: bool = False, wait: bool = False) -> Iterator[Path]:
    """Yield an empty directory to write into; it replaces `path` atomically only if the block succeeds.

    The writer lock of `path` is held throughout (`wait`: wait for another writer instead of raising), and an
    existing `path` is refused unless `overwrite` (see :mod:`scanpy_canal._directories`).
    """
    with writer_lock(path, wait=wait):
        check_destination(path, overwrite=overwrite)
        with replace_directory(path) as staging:
            yield staging


def check_destination(path: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse an existing `path` unless `overwrite` (and a file at `path` in any case)."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} already exists; pass overwrite=True to replace it.")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{str(target)!r} is a file, not a directory; choose another path.")


def write_pretrained(
    directory: Path, encoder: PerformerLM, genes: Sequence[str], *, info: dict[str, Any] | None = None
) -> None:
    """Write the three files of a pretrained encoder into an existing `directory`.

    ``config.json``, written last, records the SHA-256 digest of every other file then in `directory`.
    """
    genes = check_vocabulary(genes)
    if len(genes) != encoder.max_seq_len - 1:
        raise ValueError(
            f"The encoder has {encoder.max_seq_len - 1} gene positions (plus the appended token) but {len(genes)} "
            "genes were given."
        )
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "scanpy_canal_version": __version__,
        "arch": encoder.config,
        "n_genes": len(genes),
        "tokens": TOKENS,
        **({"info": info} if info else {}),
    }
    (directory / GENES_FILE).write_text("".join(f"{gene}\n" for gene in genes))
    state = {key: value.detach().cpu() for key, value in encoder.state_dict().items()}
    weights = io.BytesIO()  # through memory: torch would report a full disk without the cause
    torch.save({"model_state_dict": state}, weights)
    (directory / WEIGHTS_FILE).write_bytes(weights.getbuffer())
    config["sha256"] = file_checksums(directory, exclude=CONFIG_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))


def save_pretrained(
    encoder: PerformerLM,
    path: str | os.PathLike,
    genes: Sequence[str],
    *,
    overwrite: bool = False,
    info: dict[str, Any] | None = None,
) -> Path:
    """Save a pretrained encoder with its gene vocabulary, so that models can take its weights gene by gene.

    The directory holds ``config.json`` (the architecture, the token scheme and a format version),
    ``genes.txt`` (one gene per line, in positional order) and ``weights.pt`` (the state dict in scBERT's checkpoint
    layout, ``{"model_state_dict": ...}``, readable with ``torch.load(weights_only=True)``); ``config.json`` also
    records a checksum of each other file, which loading verifies. It is written next to `path`, flushed to disk
    and swapped into place in one step, so that `path` holds the complete previous or new encoder whenever the
    process is interrupted; another process writing `path` at the same time makes this an error (OSError).

    Parameters
    ----------
    encoder
        The encoder; its sequence has one position per gene plus the appended token.
    path
        The directory to create.
    genes
        The gene of each position, in order (``encoder.max_seq_len - 1`` unique names).
    overwrite
        Replace an existing directory.
    info
        JSON-serialisable notes stored in ``config.json`` under ``"info"`` (e.g. the pretraining settings).

    Returns
    -------
    The directory.

    Examples
    --------
    >>> import scanpy_canal as canal
    >>> encoder = canal.nn.PerformerLM(max_seq_len=4, dim=16, depth=1, heads=2, dim_head=8)
    >>> canal.nn.save_pretrained(encoder, "my_encoder", ["CD3E", "MS4A1", "LYZ"])  # doctest: +SKIP
    >>> encoder, genes = canal.nn.load_pretrained("my_encoder", genes=["LYZ", "CD3E"])  # doctest: +SKIP
    """
    with said_write_errors(path, "encoder"), staged_directory(path, overwrite=overwrite) as staging:
        write_pretrained(staging, encoder, genes, info=info)
    return Path(path)


def check_vocabulary(genes: Sequence[str]) -> list[str]:
    """`genes` as a list of unique, non-empty names without line breaks."""
    if isinstance(genes, str):
        raise TypeError("genes must be a sequence of gene names, not a single string.")
    names = [str(gene) for gene in genes]
    bad = [name for name in names if not name.strip() or "\n" in name or "\r" in name]
    if bad:
        raise ValueError(f"Gene names must be non-empty and on one line; got {bad[:_N_EXAMPLES]}.")
    if len(set(names)) != len(names):
        duplicated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"The gene vocabulary has duplicated names: {duplicated[:_N_EXAMPLES]}.")
    return names


def read_vocabulary(source: Sequence[str] | str | os.PathLike) -> list[str]:
    """A vocabulary given as gene names or as a text file with one name per line (blank lines are skipped)."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Gene vocabulary file {str(path)!r} does not exist.")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [str(gene) for gene in source]


def read_json(path: Path, *, error: type[Exception]) -> Any:
    """The content of a JSON file; damaged JSON raises `error` naming the file."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as problem:
        raise error(f"{str(path)!r} is damaged: {problem}.") from problem


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    for name in (CONFIG_FILE, GENES_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{str(directory)!r} is not a pretrained encoder directory: {name} is missing.")
    config = read_json(path, error=CheckpointError)
    version = config.get("format_version") if isinstance(config, dict) else None
    if config.get("format") != FORMAT or not isinstance(version, int) or not isinstance(config.get("arch"), dict):
        raise CheckpointError(f"{str(path)!r} was not written by scanpy-canal's save_pretrained.")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(directory)!r} has format version {version}; this scanpy-canal reads version {FORMAT_VERSION} at "
            "most. Upgrade scanpy-canal to load it."
        )
    return config


def _read_source(
    path: Path, vocabulary: Sequence[str] | str | os.PathLike | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """Weights, architecture and vocabulary of a pretrained directory or an scBERT-format file."""
    if path.is_dir():
        config = _read_config(path)
        genes = read_vocabulary(path / GENES_FILE)
        if vocabulary is not None and read_vocabulary(vocabulary) != genes:
            raise ValueError(
                f"The given gene vocabulary differs from {str(path / GENES_FILE)!r}; a pretrained directory carries "
                "its own vocabulary, so leave the vocabulary (`pretrained_genes`) out."
            )
        state = read_state_dict(path / WEIGHTS_FILE)
        return state, config["arch"], genes
    if vocabulary is None:
        raise ValueError(
            f"Checkpoint {str(path)!r} needs its gene vocabulary (`pretrained_genes`): the gene of each positional "
            "row, in order, e.g. the 16906 genes of scBERT's panglao_pretrain.pth."
        )
    state = read_state_dict(path)
    return state, infer_config(state, source=f"Checkpoint {str(path)!r}"), read_vocabulary(vocabulary)


def _positions(vocabulary: list[str], genes: Sequence[str], source: str) -> tuple[list[int], list[str]]:
    """Positional rows of the `genes` found in `vocabulary` (first occurrence), and those genes."""
    genes = [str(gene) for gene in genes]
    rows = gene_positions(vocabulary, genes)
    kept = [gene for gene, row in zip(genes, rows, strict=True) if row >= 0]
    missing = [gene for gene, row in zip(genes, rows, strict=True) if row < 0]
    if not kept:
        raise ValueError(f"None of the {len(genes)} genes is in the vocabulary of {source}.")
    if missing:
        logger.warning(
            "%d of %d genes are not in the vocabulary of %s and are left out, e.g. %s.",
            len(missing),
            len(genes),
            source,
            ", ".join(missing[:_N_EXAMPLES]),
        )
    return [int(row) for row in rows if row >= 0], kept


def load_pretrained(
    path: str | os.PathLike,
    *,
    vocabulary: Sequence[str] | str | os.PathLike | None = None,
    genes: Sequence[str] | None = None,
) -> tuple[PerformerLM, list[str]]:
    """Load a pretrained encoder, optionally keeping only the positional rows of some genes, matched by name.

    Parameters
    ----------
    path
        A directory written by :func:`save_pretrained` or :func:`scanpy_canal.pretrain`, or an scBERT-format
        checkpoint file such as ``panglao_pretrain.pth`` (read with ``torch.load(weights_only=True)``).
    vocabulary
        The gene of each positional row of a checkpoint file, in order: names, or a text file with one per line.
        A directory carries its own (``genes.txt``); a different one given here is an error.
    genes
        The genes the new model will see, in its order. Those in the vocabulary keep their pretrained rows, in this
        order; the others are left out, with a warning that names a few of them. `None` keeps the whole vocabulary.

    Returns
    -------
    The encoder (eval mode; sequence length = number of genes kept + 1) and the genes of its positions.

    Raises
    ------
    ValueError
        If the vocabulary length does not match the checkpoint's gene table, if a checkpoint file comes without a
        vocabulary, or if no gene is in the vocabulary.

    Examples
    --------
    >>> import scanpy_canal as canal
    >>> encoder, kept = canal.nn.load_pretrained(
    ...     "panglao_pretrain.pth", vocabulary="panglao_genes.txt", genes=["CD3E", "MS4A1", "NOT_A_GENE"]
    ... )  # doctest: +SKIP
    >>> kept, encoder.max_seq_len  # doctest: +SKIP
    (['CD3E', 'MS4A1'], 3)
    """
    # The files read all belong to one save, also while another process saves to `path`.
    return read_consistently(path, lambda source: _load_pretrained(source, vocabulary, genes))


def _load_pretrained(
    path: Path, vocabulary: Sequence[str] | str | os.PathLike | None, genes: Sequence[str] | None
) -> tuple[PerformerLM, list[str]]:
    if not path.exists():
        raise FileNotFoundError(f"Pretrained weights {str(path)!r} do not exist.")
    source = f"pretrained weights {str(path)!r}"
    state, arch, vocab = _read_source(path, vocabulary)
    n_rows = state["pos_emb.emb.weight"].shape[0] if "pos_emb.emb.weight" in state else None
    if n_rows != len(vocab) + 1:
        raise ValueError(
            f"The vocabulary has {len(vocab)} genes but {source} has a gene table of {n_rows} rows (one per gene "
            "plus the appended token)."
        )
    if genes is None:
        positions, kept = list(range(len(vocab))), vocab
    else:
        positions, kept = _positions(vocab, genes, source)
        select_gene_rows(state, positions, source=source)
    encoder = PerformerLM(**{**arch, "max_seq_len": len(kept) + 1})
    load_weights(encoder, state, source=source[0].upper() + source[1:])
    if path.is_dir():  # after the checks that say more about a damaged file
        config = path / CONFIG_FILE
        check_checksums(path, _read_config(path).get("sha256"), source=config, error=CheckpointError)
    return encoder.eval(), kept

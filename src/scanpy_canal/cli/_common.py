"""What the commands share: argument types, the encoder options and reading ``.h5ad`` and ``.h5mu`` files."""

from __future__ import annotations

import argparse
import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from scanpy_canal._choices import KEEP_EPOCHS, PRECISIONS

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

#: Encoder options of ``train`` and ``pretrain`` (scBERT's architecture by default).
ARCH_OPTIONS = ("dim", "depth", "heads", "dim_head")
#: The file that makes a directory a saved model (``model._io.METADATA``), named here so that checking a directory
#: loads no model code.
MODEL_FILE = "model.json"
#: The modality of an ``.h5mu`` input read without ``--mod``, as in ``canal.tl.annotate``.
DEFAULT_MOD = "rna"


def add_arch_options(group: argparse._ActionsContainer) -> None:
    """Add ``--dim``, ``--depth``, ``--heads`` and ``--dim-head`` to `group`."""
    for name in ARCH_OPTIONS:
        flag = name.replace("_", "-")
        group.add_argument(f"--{flag}", type=positive(int), default=None, help=f"encoder {flag} (default: scBERT's)")


def arch_arguments(args: argparse.Namespace) -> dict[str, int]:
    """The encoder options given on the command line."""
    return {name: getattr(args, name) for name in ARCH_OPTIONS if getattr(args, name) is not None}


def add_normalize_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--normalize`` to `parser`."""
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="first bring counts or ln/log2 log1p values (of X, or of --layer) to log2(1 + counts per 10k), as "
        "canal.pp.normalize does",
    )


def add_gene_symbols_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--gene-symbols`` to `parser`."""
    parser.add_argument(
        "--gene-symbols",
        default=None,
        metavar="COLUMN",
        help="column of var holding the gene names to use, for when var_names are e.g. Ensembl IDs",
    )


def add_mod_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--mod`` to `parser`."""
    parser.add_argument(
        "--mod",
        default=None,
        metavar="MODALITY",
        help=f"with an .h5mu input (MuData): the modality that holds the cells (default: {DEFAULT_MOD})",
    )


def is_mudata_file(path: Path) -> bool:
    """Whether `path` names an ``.h5mu`` file, which MuData reads."""
    return path.suffix == ".h5mu"


def check_data(args: argparse.Namespace) -> None:
    """Refuse an ``args.data`` that is not an existing file, and ``--mod`` without an ``.h5mu`` file."""
    existing_file(args.data)
    if args.mod is not None and not is_mudata_file(args.data):
        raise ValueError(f"--mod names a modality of an .h5mu file; {str(args.data)!r} is not one.")


def read_values(args: argparse.Namespace) -> tuple[AnnData, str | None]:
    """``args.data`` read into memory and, with ``--normalize``, normalised into X; and the layer that holds the values.

    For an ``.h5mu`` file, the AnnData of its modality ``--mod``.
    """
    _, adata = read_cells(args)
    if not args.normalize:
        return adata, args.layer
    from scanpy_canal.pp import normalize

    normalize(adata, layer=args.layer)
    return adata, None


@contextlib.contextmanager
def mudata_quietly() -> Iterator[None]:
    """Hide MuData's notice, at every read and write, that ``update()`` will change in its version 0.4."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"From 0\.4 \.update\(\) will not pull", category=FutureWarning)
        yield


def read_cells(args: argparse.Namespace, *, backed: bool = False) -> tuple[AnnData | MuData, AnnData]:
    """``args.data`` as read, and the AnnData of its cells: the file itself, or the modality ``--mod`` of a MuData.

    With `backed`, the X of an ``.h5ad`` stays on disk; an ``.h5mu`` is read into memory.
    """
    import anndata as ad

    existing_file(args.data)
    kind = ".h5mu" if is_mudata_file(args.data) else ".h5ad"
    try:
        if kind == ".h5ad":
            data = ad.read_h5ad(args.data, backed="r" if backed else None)
            return data, data
        import mudata as md

        with mudata_quietly():
            data = md.read_h5mu(args.data)
    except Exception as error:  # h5py and anndata raise many types for a damaged file
        raise ValueError(f"cannot read {str(args.data)!r} as an {kind} file: {_first_line(error)}.") from error
    from scanpy_canal.model import modality

    return data, modality(data, args.mod or DEFAULT_MOD)


@contextlib.contextmanager
def reading_backed(path: Path) -> Iterator[None]:
    """Name `path` in the errors of reading it lazily (backed): h5py's own name no file."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        raise ValueError(f"cannot read {str(path)!r}: it is truncated or damaged ({_first_line(error)}).") from error


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def existing_file(path: Path) -> None:
    """Refuse a `path` that is not an existing file."""
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist or is not a file.")


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a positive `kind`."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def devices(text: str) -> int | list[int] | str:
    """An argparse type: Lightning's devices (``auto``, a count, ``-1`` for all, or indices like ``0,1``)."""
    try:
        return "auto" if text == "auto" else [int(i) for i in text.split(",")] if "," in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, a number or indices like 0,1, got {text!r}") from None


def add_lightning_options(parser: argparse.ArgumentParser, *, strategy_example: str) -> None:
    """Add ``--accelerator``, ``--devices`` and ``--strategy`` (Lightning's) to `parser`."""
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default: auto)")
    parser.add_argument(
        "--devices", type=devices, default="auto", help="Lightning devices: auto, a count, -1 for all, or 0,1"
    )
    parser.add_argument(
        "--strategy", default="auto", help=f"Lightning strategy, e.g. {strategy_example} (default: auto)"
    )


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--precision`` to `parser`."""
    helps = "float32, or bfloat16 autocast (default: auto, bfloat16 where the device computes it natively)"
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=helps)


#: ``--balance-classes``: its choices and the ``balance_classes`` each gives ``CANAL.train``.
BALANCE_CLASSES = {"true": True, "false": False, "auto": "auto"}


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--epochs``, ``--lr``, ``--batch-size``, ``--keep-epoch`` and ``--balance-classes`` to `parser`.

    They are ``CANAL.train``'s ``max_epochs``, ``lr``, ``batch_size``, ``keep_epoch`` and ``balance_classes``, with
    ``train()``'s defaults for how the encoder starts (see :func:`training_arguments`).
    """
    parser.add_argument(
        "--epochs",
        type=positive(int),
        default=None,
        help="maximum epochs per stage (default: 100 with pretrained weights, as the original; 15 from a random start)",
    )
    parser.add_argument(
        "--lr",
        type=positive(float),
        default=None,
        help="peak learning rate (default: 2e-4 with pretrained weights, as the original; 1e-3 from a random start)",
    )
    parser.add_argument("--batch-size", type=positive(int), default=16, help="cells per minibatch (default: 16)")
    helps = (
        "the weights a stage keeps: the epoch with the best validation accuracy (stopping early), or the last of one "
        "cycle of the schedule (default: best with pretrained weights, as the original; last from a random start)"
    )
    parser.add_argument("--keep-epoch", choices=KEEP_EPOCHS, default=None, help=helps)
    helps = (
        "weigh the cell types the same in the loss: at every stage, at none, or auto: only where the bank replayed is "
        "a sample of the earlier cells (default: false with pretrained weights, as the original; true from a random "
        "start; on a stream whose bank keeps every cell, false or auto can be better)"
    )
    parser.add_argument("--balance-classes", choices=list(BALANCE_CLASSES), default=None, help=helps)


def training_arguments(args: argparse.Namespace) -> dict:
    """``CANAL.train``'s arguments from the options of :func:`add_training_options` (`None`: the start's default)."""
    balance = None if args.balance_classes is None else BALANCE_CLASSES[args.balance_classes]
    return {
        "max_epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "keep_epoch": args.keep_epoch,
        "balance_classes": balance,
    }


def first_process() -> bool:
    """Whether this process writes the output: Lightning starts its other DDP processes by running the command again."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0


def writer_lock(directory: Path, *, wait: bool) -> contextlib.AbstractContextManager:
    """The writer lock of `directory`, which the first process alone holds."""
    from scanpy_canal._directories import writer_lock

    return writer_lock(directory, wait=wait) if first_process() else contextlib.nullcontext()

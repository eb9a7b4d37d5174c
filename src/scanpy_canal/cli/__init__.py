"""The ``scanpy-canal`` command line: one module per command, each with its parser and its body.

Commands import torch, scvi-tools and the model only once their arguments are parsed, so ``--help`` and argument
errors answer at once.
"""

from __future__ import annotations

import argparse
import sys

from . import _demo, _predict, _pretrain, _train
from ._signals import interrupting_signals, interruption

_COMMANDS = (_demo, _train, _predict, _pretrain)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``scanpy-canal``."""
    parser = argparse.ArgumentParser(prog="scanpy-canal", description="Continual cell-type annotation (CANAL).")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``scanpy-canal``; returns the exit status (128 + the signal's number when SIGTERM or SIGINT stopped it)."""
    args = build_parser().parse_args(argv)
    try:
        with interrupting_signals() as received:
            args.run(args)
    except BaseException as error:
        if received:  # whatever the signal became on its way out
            print(interruption(args, received[0]), file=sys.stderr)
            return 128 + received[0]
        if not isinstance(error, ValueError | KeyError | OSError):
            raise
        # One line; a KeyError's message would be printed in quotes.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"scanpy-canal: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 1
    return 0

"""A run stopped by SIGTERM or SIGINT (``kill``, a scheduler's time limit, Ctrl+C) ends with a non-zero status.

Lightning answers SIGTERM by stopping the fit with an exit status of 0, and Ctrl+C with a traceback: a script that
runs ``train && predict`` would carry on. Here either signal interrupts the run at once; the model rolls the stage
back, the lock and the staging directory are released on the way out, and :func:`interruption` says what happened.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_ACTIONS = {"train": "training", "pretrain": "pretraining", "predict": "predicting", "demo": "demo"}


@contextlib.contextmanager
def interrupting_signals() -> Iterator[list[int]]:
    """While the block runs, the first SIGTERM or SIGINT raises KeyboardInterrupt and is noted in the list yielded.

    Later signals are ignored, so that the rollback they interrupt can finish. Outside the main thread (where
    Python delivers no signals) nothing changes.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum: int, frame: object) -> None:
        if received:
            return
        received.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interruption(args: argparse.Namespace, signum: int) -> str:
    """One line: which command the signal interrupted, and that what it writes is unchanged."""
    action = _ACTIONS.get(args.command, args.command)
    name = signal.Signals(signum).name
    what, path = ("encoder", args.output) if args.command == "pretrain" else ("model", getattr(args, "model_dir", None))
    if path is None:
        kept = "nothing was saved"
    elif os.path.lexists(path):
        kept = f"the {what} in {str(path)!r} is unchanged"
    else:
        kept = f"no {what} was saved to {str(path)!r}"
    return f"scanpy-canal: {action} interrupted by {name}; {kept}."

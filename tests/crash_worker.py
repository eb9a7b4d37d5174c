"""Saves a model again and again, each time in a forked child that dies part way; used by test_crash_safety.py.

    python crash_worker.py OLD_MODEL_DIR WORK_DIR N_KILLS SEED

Forking from one process that has imported the model stack (scvi-tools, torch, anndata) once makes each trial cost
a fraction of a second. Two kinds of trial, each checked by loading the path in this process:

- steps: the child exits just before its k-th file-system step (an exchange, rename, removal, directory creation,
  a file opened or written), for every k in turn, with and without the exchange rename;
- kills: the child is sent SIGKILL after a random delay, the models saved alternating, and what earlier children
  left (a stale lock, a staging container) stays for the next save to clear.

Prints a JSON object with one record per trial.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import anndata as ad
import torch

from scanpy_canal import CANAL, _directories

EXIT_STATUS = 17
#: Audit events that change the file system (see https://docs.python.org/3/library/audit_events.html).
CHANGES = {
    "os.rename",
    "os.replace",
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "shutil.rmtree",
    "os.truncate",
    "exchange",
    "write",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def is_step(event: str, args: tuple) -> bool:
    if event == "open":
        _, mode, flags = args
        return bool(set(mode) & set("wax+")) if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
    return event in CHANGES


def audit_steps(exit_before: int | None, log: list[str]):
    """An audit hook that records each step and ends the process just before step `exit_before` (1-based)."""

    def hook(event: str, args: tuple) -> None:
        if not is_step(event, args):
            return
        log.append(f"{event} {args[0]!s:.80}")
        if len(log) == exit_before:
            os._exit(EXIT_STATUS)

    return hook


def audited(event: str, function):
    """`function`, announcing each call as an audit event with its second argument (the path written)."""

    def announced(*args, **kwargs):
        sys.audit(event, str(args[1]))
        return function(*args, **kwargs)

    return announced


def save_in_child(model: CANAL, target: Path, *, exit_before: int | None = None, log_to: Path | None = None) -> int:
    """Fork a child that saves `model` at `target`; returns the child's pid."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        log: list[str] = []
        sys.addaudithook(audit_steps(exit_before, log))
        model.save(target, overwrite=True)
        if log_to is not None:
            log_to.write_text(json.dumps(log))
        status = 0
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        os._exit(status)


def wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def fingerprint(model: CANAL) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.module.network.state_dict().items()):
        digest.update(key.encode() + value.numpy().tobytes())
    bank = model.example_bank
    digest.update(str((model.stage, model.cell_types, bank.obs.to_csv(), bank.X.toarray().tobytes())).encode())
    digest.update(model.history.to_csv().encode())
    return digest.hexdigest()


def found(target: Path, prints: dict[str, str]) -> str:
    """Which model `target` loads as ('old', 'new'), or the error loading it gives."""
    try:
        loaded = fingerprint(CANAL.load(target))
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # the record says what went wrong
        return f"error: {type(error).__name__}: {error}"
    return next((name for name, value in prints.items() if value == loaded), "a third model")


def containers(root: Path) -> list[str]:
    return sorted(entry.name for entry in root.iterdir() if entry.name.endswith(_directories.SUFFIX))


def step_trials(models: dict[str, CANAL], prints: dict[str, str], old_dir: Path, root: Path) -> list[dict]:
    target = root / "model"

    def reset() -> None:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        shutil.copytree(old_dir, target)

    reset()
    events_file = root.parent / "events.json"
    assert wait(save_in_child(models["new"], target, log_to=events_file)) == 0
    events = json.loads(events_file.read_text())
    records = []
    for step, event in enumerate(events, start=1):
        reset()
        status = wait(save_in_child(models["new"], target, exit_before=step))
        missing = not target.exists()
        records.append(
            {"step": step, "before": event, "status": status, "missing": missing, "found": found(target, prints)}
        )
    return records


def kill_trials(models: dict[str, CANAL], prints: dict[str, str], old_dir: Path, root: Path, n: int, seed: int):
    target = root / "model"
    root.mkdir(parents=True)
    shutil.copytree(old_dir, target)
    start = time.perf_counter()
    assert wait(save_in_child(models["new"], target)) == 0
    duration = time.perf_counter() - start
    rng, current, records = random.Random(seed), "new", []
    for _ in range(n):
        other = "old" if current == "new" else "new"
        delay = rng.uniform(0, duration)
        pid = save_in_child(models[other], target)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        status = wait(pid)
        now = found(target, prints)
        records.append({"delay": delay, "status": status, "saving": other, "found": now, "left": containers(root)})
        current = now if now in prints else current
    models["old"].save(target, overwrite=True)
    return records, duration, sorted(entry.name for entry in root.iterdir()), found(target, prints)


def main(old_dir: str, work: str, n_kills: str, seed: str) -> None:
    torch.set_num_threads(1)
    old_dir, work = Path(old_dir), Path(work)
    models = {"old": CANAL.load(old_dir), "new": CANAL.load(old_dir)}
    with torch.no_grad():
        for parameter in models["new"].module.network.parameters():
            parameter.add_(0.5)
    prints = {name: fingerprint(model) for name, model in models.items()}
    # torch and h5py write through C code, which raises no audit events of its own.
    torch.save = audited("write", torch.save)
    ad.AnnData.write_h5ad = audited("write", ad.AnnData.write_h5ad)
    original = _directories._exchange
    _directories._exchange = audited("exchange", original)
    results = {"steps_exchange": step_trials(models, prints, old_dir, work / "exchange")}
    _directories._exchange = lambda first, second: False
    results["steps_fallback"] = step_trials(models, prints, old_dir, work / "fallback")
    _directories._exchange = original
    kills, duration, listing, final = kill_trials(models, prints, old_dir, work / "kills", int(n_kills), int(seed))
    results.update(kills=kills, save_seconds=duration, listing_after_clean_save=listing, final=final)
    print(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])

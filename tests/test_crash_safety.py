"""Model directories survive a writer killed at any moment, its debris, and a second writer (issue #18)."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import QUIET, TINY_ARCH, make_model

import scanpy_canal as canal
from scanpy_canal import _directories
from scanpy_canal._directories import DirectoryBusyError, writer_lock
from scanpy_canal.cli import main
from scanpy_canal.nn import CheckpointError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork, SIGKILL and removing an open lock file")

WORKER = Path(__file__).with_name("crash_worker.py")
N_KILLS = 20
#: Holds the writer lock of the directory argv[1] until its standard input closes (or, with argv[2], dies holding it).
HOLDER = """
import os, sys
from scanpy_canal._directories import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    os._exit(0) if len(sys.argv) > 2 else sys.stdin.read()
"""


def hold_lock(directory: Path, *, die: bool = False) -> subprocess.Popen:
    """Another process that holds the writer lock of `directory`; closing its stdin releases it."""
    command = [sys.executable, "-c", HOLDER, str(directory), *(["die"] if die else [])]
    holder = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0


def files_of(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def stream():
    from scanpy_canal.datasets import synthetic_stream

    return synthetic_stream(n_stages=2, n_genes=30, types_per_stage=2, cells_per_type=20, seed=1)


@pytest.fixture(scope="module")
def stage1_dir(stream, tmp_path_factory):
    """A tiny model trained for one epoch on stage 1, saved (copy it before writing there)."""
    model = make_model(stream)
    model.train(max_epochs=1, batch_size=8, rehearsal_size=20, **QUIET)
    path = tmp_path_factory.mktemp("stage1") / "model"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def worker(stage1_dir, tmp_path_factory):
    """The records of crash_worker.py: saves killed before each step in turn, and at random moments."""
    work = tmp_path_factory.mktemp("worker")
    command = [sys.executable, str(WORKER), str(stage1_dir), str(work), str(N_KILLS), "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------------------ killed while saving


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_a_save_killed_before_any_step_leaves_the_old_or_the_new_model(worker, mode):
    records = worker[f"steps_{mode}"]
    steps = " | ".join(record["before"] for record in records)
    for needed in ("weights.pt", "example_bank.h5ad", "history.csv", "model.json", ".canal-lock"):
        assert needed in steps
    assert all(record["status"] == 17 for record in records), "every child died at its step"
    found = [record["found"] for record in records]
    assert set(found) == {"old", "new"}, found
    assert found == sorted(found, reverse=True), "old until the swap, new from then on"
    if mode == "exchange":
        assert "exchange" in steps and not any(record["missing"] for record in records)
    else:  # between the two renames the path is missing, and loading reads the previous model
        assert [record["found"] for record in records if record["missing"]] == ["old"]


def test_sigkill_at_random_moments_leaves_the_old_or_the_new_model(worker):
    kills = worker["kills"]
    assert len(kills) == N_KILLS
    for kill in kills:
        assert kill["status"] in (0, -9)  # finished, or killed: never stopped by a lock left by an earlier kill
        assert kill["found"] in ("old", "new"), kill
        assert kill["status"] == -9 or kill["found"] == kill["saving"]
        assert len(kill["left"]) <= 1, "each save removes what the killed one before it left"
    assert any(kill["status"] == -9 and kill["found"] != kill["saving"] for kill in kills)
    assert worker["listing_after_clean_save"] == ["model"] and worker["final"] == "old"


# -------------------------------------------------------------------------------------------------------- debris


def test_the_next_save_removes_our_debris_and_nothing_else(tmp_path):
    encoder = canal.nn.PerformerLM(max_seq_len=4, **TINY_ARCH)
    path = canal.nn.save_pretrained(encoder, tmp_path / "enc", ["a", "b", "c"])
    ours = [tmp_path / ".enc.0123abcd.canal-tmp", tmp_path / ".enc.89abcdef.canal-tmp"]
    (ours[0] / "new" / "deep").mkdir(parents=True)
    (ours[0] / "new" / "deep" / "weights.pt").write_bytes(b"partial")
    (ours[0] / _directories.MARKER).write_text("")
    ours[1].mkdir()  # a writer killed before it wrote its marker
    others = {  # name: (a file inside, its content)
        ".enc.0123abcd.canal-tmp.bak": (_directories.MARKER, "a name that is not ours"),
        ".enc.fedcba98.canal-tmp": ("weights.pt", "our name, but no marker"),
        ".enc.x.01234567.canal-tmp": (_directories.MARKER, "the staging of another model, 'enc.x'"),
        ".enc.old.k2j4": ("weights.pt", "a retired directory of an older version"),
        "results": ("notes.txt", "keep me"),
    }
    for name, (file, text) in others.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text(text)
    (tmp_path / ".enc.canal-lock").write_text(json.dumps({"pid": 2**22 + 1, "host": "gone", "since": "then"}))

    canal.nn.save_pretrained(encoder, path, ["x", "y", "z"], overwrite=True)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == sorted(["enc", *others])
    for name, (file, text) in others.items():
        assert files_of(tmp_path / name) == {file: text.encode()}
    assert canal.nn.load_pretrained(path)[1] == ["x", "y", "z"]


def test_a_missing_path_loads_the_retired_copy_and_the_next_writer_puts_it_back(tmp_path, caplog):
    encoder = canal.nn.PerformerLM(max_seq_len=4, **TINY_ARCH)
    path = canal.nn.save_pretrained(encoder, tmp_path / "enc", ["a", "b", "c"])
    content = files_of(path)
    container = tmp_path / ".enc.0123abcd.canal-tmp"  # as left by a save killed between its two renames
    container.mkdir()
    (container / _directories.MARKER).write_text("{}")
    path.rename(container / _directories.RETIRED)
    with caplog.at_level(logging.WARNING, logger="scanpy_canal"):
        assert canal.nn.load_pretrained(path)[1] == ["a", "b", "c"]
    assert "is missing: a save to it was interrupted" in caplog.text
    with writer_lock(path):
        assert files_of(path) == content
    assert [entry.name for entry in tmp_path.iterdir()] == ["enc"]


def test_a_failed_second_rename_puts_the_previous_directory_back(tmp_path, monkeypatch):
    encoder = canal.nn.PerformerLM(max_seq_len=4, **TINY_ARCH)
    path = canal.nn.save_pretrained(encoder, tmp_path / "enc", ["a", "b", "c"])
    content, rename, renamed = files_of(path), os.rename, []

    def second_rename_fails(source, destination):
        renamed.append(destination)
        if len(renamed) == 2:
            raise OSError(errno.EIO, "the disk is gone")
        rename(source, destination)

    monkeypatch.setattr(_directories, "_exchange", lambda first, second: False)
    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="input/output error; the encoder saved there before is unchanged"):
        canal.nn.save_pretrained(encoder, path, ["x", "y", "z"], overwrite=True)
    assert files_of(path) == content and [entry.name for entry in tmp_path.iterdir()] == ["enc"]


# ---------------------------------------------------------------------------------------------------------- lock


def test_the_lock_is_reentrant_in_its_thread_only(tmp_path):
    encoder = canal.nn.PerformerLM(max_seq_len=4, **TINY_ARCH)
    errors = []

    def other_thread() -> None:
        try:
            with writer_lock(tmp_path / "enc"):
                pass
        except DirectoryBusyError as error:
            errors.append(str(error))

    with writer_lock(tmp_path / "enc"), writer_lock(tmp_path / "enc"):
        canal.nn.save_pretrained(encoder, tmp_path / "enc", ["a", "b", "c"])  # takes it once more
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert (tmp_path / ".enc.canal-lock").is_file()
    assert len(errors) == 1 and f"process {os.getpid()}" in errors[0]
    assert [entry.name for entry in tmp_path.iterdir()] == ["enc"]


def test_a_second_writer_is_refused_or_waits(stage1_dir, stream, tmp_path, capsys, caplog):
    path = tmp_path / "model"
    shutil.copytree(stage1_dir, path)
    before = files_of(path)
    model = canal.CANAL.load(path)
    holder = hold_lock(path)
    message = f"is being written by process {holder.pid} on host"
    with pytest.raises(DirectoryBusyError, match=message):
        model.save(path, overwrite=True)
    with pytest.raises(DirectoryBusyError, match=message):
        canal.nn.save_pretrained(canal.nn.PerformerLM(max_seq_len=4, **TINY_ARCH), path, ["a", "b", "c"])
    data = tmp_path / "stage2.h5ad"
    stream.train[1].write_h5ad(data)
    assert main(["train", str(data), "--model-dir", str(path), "--labels-key", "cell_type"]) == 1
    error = capsys.readouterr().err
    assert message in error and "--wait" in error
    assert main(["pretrain", str(data), str(path), "--overwrite"]) == 1
    assert message in capsys.readouterr().err
    assert files_of(path) == before, "nothing was written"

    timer = threading.Timer(1.0, release, [holder])
    start = time.monotonic()
    timer.start()
    with caplog.at_level(logging.WARNING, logger="scanpy_canal"), writer_lock(path, wait=True):
        assert time.monotonic() - start >= 1.0, "taken only once the holder had let go"
    timer.join()
    assert f"{message}" in caplog.text and "waiting for it to finish" in caplog.text


def test_a_lock_left_by_a_dead_process_is_taken_over(stage1_dir, tmp_path, caplog):
    path = tmp_path / "model"
    shutil.copytree(stage1_dir, path)
    holder = hold_lock(path, die=True)
    assert holder.wait(timeout=30) == 0
    note = json.loads((tmp_path / ".model.canal-lock").read_text())
    assert note["pid"] == holder.pid
    with caplog.at_level(logging.INFO, logger="scanpy_canal"):
        canal.CANAL.load(path).save(path, overwrite=True)
    assert f"left by process {holder.pid}" in caplog.text
    assert [entry.name for entry in tmp_path.iterdir()] == ["model"]


def test_two_train_runs_on_one_model_lose_no_stage(stage1_dir, stream, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(stage1_dir, path)
    data = [tmp_path / "stage1.h5ad", tmp_path / "stage2.h5ad"]
    for stage, file in zip(stream.train, data, strict=True):
        stage.write_h5ad(file)
    holder = hold_lock(path)  # so that both runs are sure to meet at the lock
    logs = [tmp_path / "run1.txt", tmp_path / "run2.txt"]
    runs = []
    for file, log in zip(data[::-1], logs, strict=True):
        arguments = ["train", str(file), "--model-dir", str(path), "--labels-key", "cell_type", "--wait"]
        arguments += ["--epochs", "1", "--accelerator", "cpu", "--quiet"]
        with log.open("w") as output:
            runs.append(
                subprocess.Popen([sys.executable, "-m", "scanpy_canal.cli", *arguments], stdout=output, stderr=output)
            )
    try:
        for run, log in zip(runs, logs, strict=True):
            while "waiting for it to finish" not in log.read_text():
                assert run.poll() is None, log.read_text()
                time.sleep(0.2)
    finally:
        release(holder)
    assert [run.wait(timeout=300) for run in runs] == [0, 0], [log.read_text() for log in logs]
    model = canal.CANAL.load(path)
    assert model.stage == 3 and [record["stage"] for record in model.stage_history_] == [1, 2, 3]
    reports = " ".join(log.read_text() for log in logs)
    assert "stage 2 trained" in reports and "stage 3 trained" in reports


# ----------------------------------------------------------------------------------------------------- checksums


def test_a_file_that_differs_from_its_checksum_is_refused(stage1_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(stage1_dir, path)
    metadata = json.loads((path / "model.json").read_text())
    assert set(metadata["sha256"]) == {"weights.pt", "example_bank.h5ad", "calibration_cells.h5ad", "history.csv"}
    tensors = torch.load(path / "weights.pt", weights_only=True)
    tensors["network"] = {key: value + 1 for key, value in tensors["network"].items()}  # readable, but not saved so
    torch.save(tensors, path / "weights.pt")
    with pytest.raises(CheckpointError, match=r"weights.pt' does not match its checksum in .*model.json"):
        canal.CANAL.load(path)
    shutil.copy(stage1_dir / "weights.pt", path / "weights.pt")
    with (path / "history.csv").open("a") as history:
        history.write("\n")
    with pytest.raises(CheckpointError, match=r"history.csv' does not match its checksum"):
        canal.CANAL.load(path)
    # a model saved before checksums were recorded loads as before
    unchecked = {key: value for key, value in metadata.items() if key not in ("sha256", "metadata_sha256")}
    (path / "model.json").write_text(json.dumps(unchecked))
    assert canal.CANAL.load(path).stage == 1


def test_a_pretrained_file_that_differs_from_its_checksum_is_refused(tmp_path):
    encoder = canal.nn.PerformerLM(max_seq_len=4, **TINY_ARCH)
    path = canal.nn.save_pretrained(encoder, tmp_path / "enc", ["a", "b", "c"])
    (path / "genes.txt").write_text("b\na\nc\n")  # the same genes in another order: nothing else would notice
    with pytest.raises(CheckpointError, match=r"genes.txt' does not match its checksum in .*config.json"):
        canal.nn.load_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({key: value for key, value in config.items() if key != "sha256"}))
    assert canal.nn.load_pretrained(path)[1] == ["b", "a", "c"]

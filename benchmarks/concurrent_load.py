"""Loading a model while another process saves to its path: false reports of damage, with and without re-reading.

One process saves two tiny models to one path alternately for `--seconds`; this one loads the path meanwhile, taking
turns between ``CANAL.load`` (which reads again when a save swapped the directory during the read) and a single
read of the same files (what ``CANAL.load`` did before issue #29). Each load is classed: the first or the second
model, a mix of the two (loaded, but neither), or refused (an error, e.g. a false "does not match its checksum").
"""

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "concurrent_load.json"
WRITER = """
import sys, time
from scanpy_canal import CANAL
target, models, seconds = sys.argv[1], [CANAL.load(path) for path in sys.argv[2:4]], float(sys.argv[4])
print("ready", flush=True)
saves, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    models[saves % 2].save(target, overwrite=True)
    saves += 1
print(saves, flush=True)
"""


def fingerprint(model) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.module.network.state_dict().items()):
        digest.update(key.encode() + value.numpy().tobytes())
    digest.update(",".join(model.example_bank.obs_names).encode() + model.history.to_csv().encode())
    return digest.hexdigest()


def two_saves(root: Path) -> tuple[Path, Path]:
    """A tiny model trained for one epoch, and a copy with other weights, bank and history."""
    from scanpy_canal import CANAL
    from scanpy_canal.datasets import synthetic_stream

    stream = synthetic_stream(n_stages=1, n_genes=30, types_per_stage=2, cells_per_type=20, seed=1)
    data = stream.train[0].copy()
    CANAL.setup_anndata(data, labels_key="cell_type")
    model = CANAL(data, dim=16, depth=2, heads=2, dim_head=8)
    model.train(max_epochs=1, batch_size=8, rehearsal_size=20, accelerator="cpu", enable_progress_bar=False)
    model.save(root / "first")
    other = CANAL.load(root / "first")
    for parameter in other.module.network.parameters():
        parameter.data += 1
    other.example_bank_ = other.example_bank_[1:].copy()
    other.training_log_ = other.training_log_.iloc[:0]
    other.save(root / "second")
    return root / "first", root / "second"


class Counting(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "was replaced during the read" in record.getMessage()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    from scanpy_canal import CANAL
    from scanpy_canal._directories import readable_directory
    from scanpy_canal.model._io import _load_model

    loaders = {
        "CANAL.load": lambda path: CANAL.load(path),
        "single read (before #29)": lambda path: _load_model(CANAL, readable_directory(path)),
    }
    counting = Counting()
    logger = logging.getLogger("scanpy_canal")
    logger.addHandler(counting)
    logger.setLevel(logging.DEBUG)
    with tempfile.TemporaryDirectory() as scratch:
        first, second = two_saves(Path(scratch))
        prints = {fingerprint(CANAL.load(first)): "first", fingerprint(CANAL.load(second)): "second"}
        path = Path(scratch) / "model"
        CANAL.load(first).save(path)
        command = [sys.executable, "-c", WRITER, str(path), str(first), str(second), str(args.seconds)]
        writer = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline() == "ready\n"
        outcomes = {name: Counter() for name in loaders}
        errors: dict[str, list[str]] = {name: [] for name in loaders}
        turn = 0
        while writer.poll() is None:
            name = list(loaders)[turn % 2]
            turn += 1
            try:
                outcomes[name][prints.get(fingerprint(loaders[name](path)), "a mix")] += 1
            except Exception as error:  # noqa: BLE001 (what the loader reports is the measurement)
                outcomes[name]["refused"] += 1
                errors[name].append(f"{type(error).__name__}: {str(error).replace(scratch, '...')}")
        saves = int(writer.stdout.read())
    result = {
        "what": "one process saves two tiny models (16-dim, 2 blocks, 30 genes) alternately to one path; this one "
        "loads it meanwhile, taking turns between CANAL.load and a single read of the files",
        "seconds": args.seconds,
        "cpus": os.cpu_count(),
        "saves": saves,
        "reads_again_after_a_swap": counting.count,
        "loads": {
            name: {
                "total": sum(counts.values()),
                **dict(counts),
                "false_reports": counts["refused"] + counts["a mix"],
                "errors": errors[name][:5],
            }
            for name, counts in outcomes.items()
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

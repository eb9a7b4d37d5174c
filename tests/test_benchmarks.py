"""The benchmark scripts agree with each other (read as text: they import heavy peers)."""

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def dict_keys(path: Path, name: str) -> set[str]:
    """The string keys of the dict literal assigned to `name` at the top of `path`."""
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(target, ast.Name) and target.id == name for target in targets):
            return {key.value for key in node.value.keys if isinstance(key, ast.Constant)}
    raise LookupError(f"{name} is not assigned in {path.name}")


def test_every_continual_method_has_a_style_in_the_report():
    """The report prints each method of a run by its style; a method without one stopped it after the JSON."""
    variants = dict_keys(BENCHMARKS / "continual_stream.py", "CANAL_VARIANTS")
    assert variants <= dict_keys(BENCHMARKS / "continual_stream_report.py", "STYLE")


def test_a_killed_benchmark_leaves_no_worker_behind(tmp_path):
    """``harness.worker_pool``'s workers end once the process that started them is killed (no cleanup runs then)."""
    import signal
    import subprocess
    import sys
    import time

    script = f"""
import os, sys
sys.path.insert(0, {str(BENCHMARKS)!r})
from harness import worker_pool
pool = worker_pool(1)
print(pool.submit(os.getpid).result(), flush=True)
os.kill(os.getpid(), 9)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == -signal.SIGKILL, done.stderr
    worker = int(done.stdout.split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.5)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not yet reaped, counts as ended)."""
    from pathlib import Path

    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()

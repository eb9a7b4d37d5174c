"""Run the tutorials with their full budget and save them with their outputs, which the documentation shows.

The documentation builds without running code (``nb_execution_mode = "off"`` in ``conf.py``), so every tutorial page
shows the tables and figures of a real run, and building stays fast. After changing a notebook, run

    python docs/execute_notebooks.py                  # all of them
    python docs/execute_notebooks.py novel_cells      # one

and commit the result. Each saved notebook records a digest of its code cells; ``tests/test_notebooks.py`` checks
that the outputs belong to the code as it is, and runs every notebook again with a tiny budget.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
#: Where a saved notebook records the digest of the code its outputs came from.
METADATA_KEY = "scanpy_canal"


def code_digest(notebook: nbformat.NotebookNode) -> str:
    """The SHA-256 of the notebook's code cells, in order."""
    code = "\0".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    return hashlib.sha256(code.encode()).hexdigest()


def execute(path: Path) -> None:
    """Run the notebook at `path` from a fresh kernel in a temporary folder, and save it with its outputs."""
    import nbclient

    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as workdir:
        client = nbclient.NotebookClient(
            notebook,
            kernel_name="python3",
            timeout=3600,
            record_timing=False,
            resources={"metadata": {"path": workdir}},
        )
        client.execute()
    notebook.metadata[METADATA_KEY] = {"code_sha256": code_digest(notebook)}
    nbformat.write(notebook, path)


def main(names: list[str]) -> None:
    """Execute the named notebooks (all by default)."""
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend puts the figures into the outputs
    paths = [NOTEBOOKS / f"{name}.ipynb" for name in names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        start = time.perf_counter()
        execute(path)
        print(f"{path.name}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])

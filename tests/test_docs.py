"""The documentation builds without a single warning (as on Read the Docs, with fail_on_warning)."""

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

DOCS = Path(__file__).parent.parent / "docs"


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    html = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(html)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (html / "api.html").is_file()

    # Every tutorial page shows the figures of its saved run, as files the page links to.
    for path in sorted((DOCS / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
        n_figures = sum("image/png" in output.get("data", {}) for output in outputs)
        page = (html / "notebooks" / f"{path.stem}.html").read_text()
        images = re.findall(r'<img [^>]*src="\.\./(_images/[^"]+\.png)"', page)
        assert n_figures >= 1 and len(images) == n_figures, path.name
        assert all((html / image).is_file() for image in images)

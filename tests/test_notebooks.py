"""Run the documentation notebooks end to end, with a tiny training budget."""

import ast
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"

#: Per notebook: the tiny budget that replaces its ``parameters`` cell, code run after its last cell to check the
#: state it leaves behind, and text it must print. Every notebook in ``notebooks/`` needs an entry.
RUNS = {
    "quickstart.ipynb": {
        "budget": {"MAX_EPOCHS": 2},
        "checks": """
assert "X_canal" in query.obsm and "X_umap" in query.obsm
assert {"canal_prediction", "canal_confidence", "canal_uncertainty"} <= set(query.obs)
assert restored.stage == model.stage == 2 and restored.cell_types == model.cell_types
assert {"accuracy", "macro_f1", "ari", "known_accuracy", "unknown_accuracy", "h_score"} <= set(scores)
""",
        "printed": ["stages trained: 2"],
    },
    "novel_cells.ipynb": {
        "budget": {"MAX_EPOCHS": 1},
        "checks": """
assert model.stage == 2 and "X_umap" in query.obsm
assert {"canal_prediction", "canal_uncertainty"} <= set(query.obs)
assert list(rows) == ["calibrated", "canal", "fixed at 0.5"] and rows["fixed at 0.5"]["threshold"] == 0.5
assert all("h_score" in row for row in rows.values())
""",
        "printed": ["'calibrated': 100.0% of the known cells keep their call", "needs at least 2 cells"],
    },
    "pretraining.ipynb": {
        "budget": {"PRETRAIN_EPOCHS": 1, "MAX_EPOCHS": 1},
        "checks": """
assert len(history) == 1 and (encoder_dir / "history.csv").is_file()
assert models["pretrained"].stage == models["random"].stage == 2
assert models["pretrained"].genes == models["random"].genes
""",
        "printed": ["history.csv"],
    },
    "scbert_checkpoint.ipynb": {
        "budget": {"MAX_EPOCHS": 1},
        "checks": """
assert len(model.genes) == 300 and set(model.genes) <= set(vocabulary)
assert model.stage == 1 and "canal_prediction" in query.obs
assert len(kept) == 3 and not set(unknown) & set(kept)
""",
        "printed": ["all in the vocabulary: True", "same values: True"],
    },
}


def _parameters_cell(notebook):
    """The code cell tagged ``parameters`` (papermill's convention), which sets the training budget."""
    tagged = [cell for cell in notebook.cells if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    assert tagged[0].cell_type == "code"
    return tagged[0]


def _assigned_names(source: str) -> set[str]:
    return {target.id for node in ast.parse(source).body for target in getattr(node, "targets", [])}


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda path: path.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    assert path.name in RUNS, f"give {path.name} a tiny budget in RUNS"
    run = RUNS[path.name]
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "commit the notebook without outputs"

    parameters = _parameters_cell(notebook)
    assert _assigned_names(parameters.source) == set(run["budget"]), "the budget must set every parameter"
    parameters.source = "\n".join(f"{name} = {value!r}" for name, value in run["budget"].items())
    notebook.cells.append(nbformat.v4.new_code_cell(run["checks"].strip()))

    monkeypatch.setenv("MPLBACKEND", "agg")  # the kernel inherits the environment
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    for text in run["printed"]:
        assert text in printed

"""The documentation notebooks: their saved outputs come from their code, and they still run (tiny budget)."""

import ast
import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parent.parent
NOTEBOOKS = ROOT / "notebooks"

#: Per notebook: the tiny budget that replaces its ``parameters`` cell, code run after its last cell to check the
#: state it leaves behind, text it must print, and how many figures its saved outputs show. Every notebook in
#: ``notebooks/`` needs an entry.
RUNS = {
    "quickstart.ipynb": {
        "budget": {"MAX_EPOCHS": 2},
        "checks": """
assert "X_canal" in query.obsm and "X_umap" in query.obsm
assert {"canal_prediction", "canal_confidence", "canal_novelty_pvalue"} <= set(query.obs)
assert assigned >= 0.8 * known.n_obs  # a query of known types: almost every cell is assigned
assert restored.stage == model.stage == 2 and restored.cell_types == model.cell_types
assert {"accuracy", "macro_f1", "ari", "known_accuracy", "unknown_accuracy", "h_score"} <= set(scores)
""",
        "printed": ["stages trained: 2", "cells of known types assigned", "same calls for 100% of cells"],
        "figures": 3,  # the stages, the UMAP, the unassigned cells
    },
    "novel_cells.ipynb": {
        "budget": {"MAX_EPOCHS": 1},
        "checks": """
assert model.stage == 2 and "X_umap" in query.obsm
assert {"canal_prediction", "canal_novelty_pvalue"} <= set(query.obs)
assert list(rows) == ["conformal", "calibrated", "canal", "fixed at 0.5"]
assert rows["fixed at 0.5"]["threshold"] == 0.5 and all("h_score" in row for row in rows.values())
assert query.uns["canal"]["params"]["alpha"] == 0.01
assert (shares["alpha = 0.01"] <= shares["alpha = 0.05"]).all()  # a smaller alpha unassigns fewer cells
""",
        "printed": ["'conformal': 100.0% of the known cells keep their call", "needs at least 2 cells"],
        "figures": 3,  # the p-value histogram, the UMAP, the p-values on it
    },
    "pretraining.ipynb": {
        "budget": {"PRETRAIN_EPOCHS": 1, "MAX_EPOCHS": 1},
        "checks": """
assert len(history) == 1 and (encoder_dir / "history.csv").is_file()
assert models["pretrained"].stage == models["random"].stage == 2
assert models["pretrained"].genes == models["random"].genes
""",
        "printed": ["history.csv"],
        "figures": 2,  # the pretraining history, the two starts' stages
    },
    "scbert_checkpoint.ipynb": {
        "budget": {"MAX_EPOCHS": 1},
        "checks": """
assert len(model.genes) == 300 and set(model.genes) <= set(vocabulary)
assert model.stage == 1 and "canal_prediction" in query.obs
assert len(kept) == 3 and not set(unknown) & set(kept)
""",
        "printed": ["all in the vocabulary: True", "same values: True"],
        "figures": 1,  # the confusion matrix of the fine-tuned model
    },
}
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


def _executor():
    """``docs/execute_notebooks.py``, which saves the notebooks with the outputs of a full run."""
    spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "docs" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def figures(notebook) -> int:
    """How many images the notebook's outputs hold."""
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    return sum("image/png" in output.get("data", {}) for output in outputs)


def _parameters_cell(notebook):
    """The code cell tagged ``parameters`` (papermill's convention), which sets the training budget."""
    tagged = [cell for cell in notebook.cells if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    assert tagged[0].cell_type == "code"
    return tagged[0]


def _assigned_names(source: str) -> set[str]:
    return {target.id for node in ast.parse(source).body for target in getattr(node, "targets", [])}


@pytest.mark.parametrize("path", PATHS, ids=lambda path: path.stem)
def test_saved_outputs_come_from_the_code(path):
    """The documentation shows the saved outputs: they must be those of a whole run of the code as it is."""
    executor = _executor()
    notebook = nbformat.read(path, as_version=4)
    rerun = f"run `python docs/execute_notebooks.py {path.stem}` and commit the notebook"
    assert notebook.metadata.get(executor.METADATA_KEY, {}).get("code_sha256") == executor.code_digest(notebook), (
        f"the code changed since the outputs were saved: {rerun}"
    )
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), rerun
    assert not [output for cell in code for output in cell.outputs if output.output_type == "error"]
    assert figures(notebook) == RUNS[path.name]["figures"]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=lambda path: path.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    assert path.name in RUNS, f"give {path.name} a tiny budget in RUNS"
    run = RUNS[path.name]
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":  # run from scratch, without the saved outputs
            cell.outputs, cell.execution_count = [], None

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

"""Run the documentation notebooks end to end, with a tiny training budget."""

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def _parameters_cell(notebook):
    """The code cell tagged ``parameters`` (papermill's convention), which sets the training budget."""
    tagged = [cell for cell in notebook.cells if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    assert tagged[0].cell_type == "code"
    return tagged[0]


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    notebook = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "commit the notebook without outputs"

    parameters = _parameters_cell(notebook)
    assert "MAX_EPOCHS" in parameters.source
    parameters.source = "MAX_EPOCHS = 2"
    notebook.cells.append(  # check the state the notebook leaves behind
        nbformat.v4.new_code_cell(
            'assert "X_canal" in query.obsm and "X_umap" in query.obsm\n'
            'assert {"canal_prediction", "canal_confidence", "canal_uncertainty"} <= set(query.obs)\n'
            "assert restored.stage == model.stage == 2 and restored.cell_types == model.cell_types\n"
            'assert {"accuracy", "macro_f1", "ari", "known_accuracy", "unknown_accuracy", "h_score"} <= set(scores)'
        )
    )

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
    assert "stages trained: 2" in printed

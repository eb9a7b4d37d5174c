"""`scanpy-canal train` and `scanpy-canal predict` on small .h5ad files."""

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_ARCH

from scanpy_canal import CANAL
from scanpy_canal.cli import main
from scanpy_canal.cli._common import MODEL_FILE
from scanpy_canal.cli._train import _stage_summary

#: A new model with the tiny encoder, trained briefly on the CPU without progress bars.
TINY = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_ARCH.items()]
QUICK = ["--epochs", "2", "--lr", "3e-3", "--accelerator", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two labelled stages and a query (with a never-trained type) as .h5ad files."""
    from scanpy_canal.datasets import synthetic_stream

    stream = synthetic_stream(n_stages=2, n_genes=30, types_per_stage=2, cells_per_type=20, seed=1)
    folder = tmp_path_factory.mktemp("cli")
    paths = {"stage1": folder / "stage1.h5ad", "stage2": folder / "stage2.h5ad", "query": folder / "query.h5ad"}
    stream.train[0].write_h5ad(paths["stage1"])
    stream.train[1].write_h5ad(paths["stage2"])
    ad.concat([*stream.test, stream.novel]).write_h5ad(paths["query"])
    return paths


@pytest.fixture(scope="module")
def stage1_dir(files, tmp_path_factory):
    """A model directory after `scanpy-canal train` on stage 1 (copy it before training on)."""
    directory = tmp_path_factory.mktemp("models") / "stage1"
    assert (
        main(["train", str(files["stage1"]), "--model-dir", str(directory), "--labels-key", "cell_type"] + TINY + QUICK)
        == 0
    )
    return directory


def _train(data, model_dir, *extra):
    return main(["train", str(data), "--model-dir", str(model_dir), "--labels-key", "cell_type", *extra])


def _error(capsys) -> str:
    """The one-line error the last command printed."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("scanpy-canal: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert {"demo", "train", "predict"} <= set(capsys.readouterr().out.replace(",", " ").replace("{", " ").split())
    for command in ("train", "predict"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--model-dir" in capsys.readouterr().out


def test_demo_trains_with_train_defaults():
    """The demo shows what ``train()`` does: its training options default as the train command's do."""
    from scanpy_canal.cli import build_parser

    parser = build_parser()
    demo, train = (
        parser.parse_args(["demo"]),
        parser.parse_args(["train", "x.h5ad", "--model-dir", "m", "--labels-key", "y"]),
    )
    names = ("epochs", "lr", "batch_size", "keep_epoch", "balance_classes")
    expected = [None, None, 16, None, None]
    assert [getattr(demo, name) for name in names] == [getattr(train, name) for name in names] == expected


def test_train_creates_then_continues_a_model(files, stage1_dir, tmp_path, capsys):
    first = CANAL.load(stage1_dir)
    assert first.stage == 1 and first.arch_["dim"] == TINY_ARCH["dim"] and first.seed_ == 0
    assert first.stage_history_[0]["new_cell_types"] == first.cell_types  # at stage 1, every type is new
    assert f"new cell types: {', '.join(first.cell_types)}; kept epoch 2, the last," in _stage_summary(first)
    model_dir = tmp_path / "model"
    shutil.copytree(stage1_dir, model_dir)
    options = ("--keep-epoch", "best", "--balance-classes", "false")
    assert _train(files["stage2"], model_dir, "--stage", "2", *options, *QUICK) == 0
    assert "stage 2 trained on" in capsys.readouterr().out
    second = CANAL.load(model_dir)
    assert second.stage == 2 and second.cell_types[:2] == first.cell_types and len(second.cell_types) == 4
    assert [entry["keep_epoch"] for entry in second.stage_history_] == ["last", "best"]  # a random start's, then told
    assert [entry["balance_classes"] for entry in second.stage_history_] == [True, False]
    assert ", the best, validation accuracy " in _stage_summary(second)
    assert second.example_bank is not None and set(second.example_bank.obs["stage"]) == {1, 2}


def test_train_sets_the_head_dropout_of_a_new_model(files, stage1_dir, tmp_path, capsys):
    assert _train(files["stage1"], tmp_path / "new", "--head-dropout", "0.3", *TINY, *QUICK) == 0
    assert CANAL.load(tmp_path / "new").arch_["head_dropout"] == 0.3
    model_dir = tmp_path / "model"
    shutil.copytree(stage1_dir, model_dir)
    assert _train(files["stage2"], model_dir, "--head-dropout", "0.3", *QUICK) == 1
    assert "--head-dropout: options of a new model" in _error(capsys)


def test_train_never_loses_a_model(files, stage1_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(stage1_dir, model_dir)
    weights = (model_dir / "weights.pt").read_bytes()

    assert _train(files["stage2"], model_dir, "--new", *TINY, *QUICK) == 1
    message = _error(capsys)
    assert "already holds a model" in message and "--overwrite" in message
    assert _train(files["stage2"], model_dir, "--dim", "8", *QUICK) == 1
    assert "--dim: options of a new model" in _error(capsys)
    assert _train(files["stage2"], model_dir, "--stage", "3", *QUICK) == 1
    assert "the next stage is 2, not 3" in _error(capsys)
    assert (model_dir / "weights.pt").read_bytes() == weights

    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for extra in ([], ["--new", "--overwrite"]):
        assert _train(files["stage1"], other, *extra, *TINY, *QUICK) == 1
        assert "is not a saved CANAL model" in _error(capsys)
    assert (other / "notes.txt").read_text() == "keep me"

    assert _train(files["stage2"], model_dir, "--new", "--overwrite", *TINY, *QUICK) == 0
    replaced = CANAL.load(model_dir)
    assert replaced.stage == 1 and replaced.cell_types == sorted(
        ad.read_h5ad(files["stage2"]).obs["cell_type"].unique()
    )


def test_predict_writes_h5ad_and_csv(files, stage1_dir, tmp_path, capsys):
    query = ad.read_h5ad(files["query"])
    out_h5ad, out_csv = tmp_path / "annotated.h5ad", tmp_path / "predictions.csv"
    assert main(["predict", str(files["query"]), "--model-dir", str(stage1_dir), "--output", str(out_h5ad)]) == 0
    annotated = ad.read_h5ad(out_h5ad)
    assert {"canal_prediction", "canal_confidence"} <= set(annotated.obs) and "canal_novelty_score" not in annotated.obs
    assert {"X_canal", "canal_probabilities"} <= set(annotated.obsm) and set(annotated.uns) == {"canal"}
    assert (annotated.X != query.X).nnz == 0 and annotated.obs_names.equals(query.obs_names)

    arguments = ["predict", str(files["query"]), "--model-dir", str(stage1_dir), "--output", str(out_csv), "--novel"]
    assert main([*arguments, "--key-added", "ref", "--batch-size", "7"]) == 0
    assert "Unassigned" in capsys.readouterr().out
    table = pd.read_csv(out_csv, index_col=0)
    assert table.index.name == "obs_names" and table.index.equals(query.obs_names)
    assert list(table.columns) == ["prediction", "confidence", "novelty_score", "novelty_pvalue"]
    assert table["novelty_pvalue"].between(0, 1).all()
    model = CANAL.load(stage1_dir)
    np.testing.assert_array_equal(table["prediction"], model.predict(query, novel=True))

    assert main(arguments) == 1
    assert "already exists; add --overwrite" in _error(capsys)
    assert main([*arguments, "--overwrite", "--chunk-size", "5", "--precision", "bf16"]) == 0  # read from disk
    streamed = pd.read_csv(out_csv, index_col=0)
    assert streamed.index.equals(table.index) and (streamed["prediction"] == table["prediction"]).mean() > 0.9


def test_predict_layer(files, stage1_dir, tmp_path):
    query = ad.read_h5ad(files["query"])
    query.layers["lognorm"] = query.X.copy()
    query.X = query.X * 0
    query.write_h5ad(tmp_path / "layered.h5ad")
    out = tmp_path / "out.csv"
    arguments = ["predict", str(tmp_path / "layered.h5ad"), "--model-dir", str(stage1_dir), "--output", str(out)]
    assert main([*arguments, "--layer", "lognorm"]) == 0
    np.testing.assert_array_equal(
        pd.read_csv(out)["prediction"], CANAL.load(stage1_dir).predict(ad.read_h5ad(files["query"]))
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["predict", "{query}", "--output", "{tmp}/out.txt"], "--output must end in .h5ad or .csv"),
        (["predict", "{tmp}/missing.h5ad", "--output", "{tmp}/out.csv"], "does not exist"),
        (["predict", "{csv}", "--output", "{tmp}/out.csv"], "cannot read"),
        (["predict", "{query}", "--output", "{tmp}/out.csv", "--layer", "spliced"], "Layer 'spliced' not found"),
        (["predict", "{query}", "--output", "{tmp}/out.csv", "--layer", "counts"], "looks like raw counts"),
        (["train", "{query}", "--labels-key", "celltype"], "Labels key 'celltype' is not a column"),
        (["train", "{query}", "--labels-key", "cell_type", "--accelerator", "nonsense"], "invalid accelerator name"),
        pytest.param(
            ["train", "{query}", "--labels-key", "cell_type", "--accelerator", "gpu"],
            "Lightning cannot train with --accelerator gpu --devices auto --strategy auto: No supported gpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU"),
        ),
    ],
)
def test_errors_are_one_line(files, stage1_dir, tmp_path, capsys, arguments, message):
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    model_dir = tmp_path / "model"
    shutil.copytree(stage1_dir, model_dir)
    fill = {"query": files["query"], "tmp": tmp_path, "csv": tmp_path / "table.csv"}
    assert main([arguments[0], "--model-dir", str(model_dir), *(a.format(**fill) for a in arguments[1:])]) == 1
    assert message in _error(capsys)


@pytest.mark.parametrize(
    "bad", [["--epochs", "0"], ["--lr", "-1"], ["--devices", "x"], ["--batch-size", "two"], ["--head-dropout", "1"]]
)
def test_bad_option_values_are_usage_errors(files, tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exit_:
        _train(files["stage1"], tmp_path / "model", *bad)
    assert exit_.value.code == 2 and "error: argument" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


MISTAKES = """
import sys
from pathlib import Path

from scanpy_canal.cli import main

Path("models/pbmc").mkdir(parents=True)
Path("models/pbmc/model.json").write_text("{}")
Path("cells.h5ad").write_text("")
commands = [
    ["train", "missing.h5ad", "--model-dir", "models/new", "--labels-key", "cell_type"],
    ["train", "cells.h5ad", "--model-dir", "models/new", "--labels-key", "cell_type", "--pretrained", "nope.pth"],
    ["train", "cells.h5ad", "--model-dir", "models/pbmc", "--labels-key", "cell_type", "--new"],
    ["train", "cells.h5ad", "--model-dir", "models/pbmc", "--labels-key", "cell_type", "--dim", "8"],
    ["predict", "missing.h5ad", "--model-dir", "models/pbmc", "--output", "cells.csv"],
    ["predict", "cells.h5ad", "--model-dir", "models/other", "--output", "cells.csv"],
    ["predict", "cells.h5ad", "--model-dir", "models/pbmc", "--output", "cells.csv", "--mod", "rna"],
    ["pretrain", "missing.h5ad", "encoder"],
    ["pretrain", "cells.h5ad", "models", "--genes-file", "genes.txt"],
]
print([main(command) for command in commands], sorted({"torch", "scvi", "lightning"} & set(sys.modules)))
"""


def test_mistakes_are_told_before_torch_loads(tmp_path):
    """Checking arguments and paths takes no seconds of importing torch, Lightning and scvi-tools."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", MISTAKES], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[1, 1, 1, 1, 1, 1, 1, 1, 1] []"
    errors = result.stderr.splitlines()
    assert len(errors) == 9 and all(line.startswith("scanpy-canal: error: ") for line in errors)
    for line, message in zip(
        errors,
        [
            "'missing.h5ad' does not exist",
            "--pretrained 'nope.pth' does not exist",
            "already holds a model: drop --new",
            "--dim: options of a new model",
            "'missing.h5ad' does not exist",
            "--model-dir 'models/other' does not exist",
            "--mod names a modality of an .h5mu file",
            "'missing.h5ad' does not exist",
            "'genes.txt' does not exist",
        ],
        strict=True,
    ):
        assert message in line


def test_model_file_is_the_models_own():
    from scanpy_canal.model._io import METADATA

    assert MODEL_FILE == METADATA


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_train_takes_the_cell_type_tree_from_a_file(files, stage1_dir, tmp_path, capsys, kind):
    model_dir = tmp_path / "model"
    shutil.copytree(stage1_dir, model_dir)
    known = CANAL.load(model_dir).cell_types
    stage2 = ad.read_h5ad(files["stage2"])
    new = sorted(set(stage2.obs["cell_type"].astype(str)) - set(known))
    parents = tmp_path / f"parents.{kind}"
    if kind == "json":
        parents.write_text(f'{{"{new[0]}": "{known[0]}"}}')
    else:
        parents.write_text(f"child,parent\n{new[0]},{known[0]}\n")
    assert _train(files["stage2"], model_dir, "--parents", str(parents), *QUICK) == 0
    assert CANAL.load(model_dir).cell_type_parents_ == {new[0]: known[0]}
    parents.write_text('{"type_9": "nowhere"}' if kind == "json" else "child\ntype_9\n")
    assert _train(files["stage2"], model_dir, "--parents", str(parents), *QUICK) == 1
    assert ("not a cell type" if kind == "json" else "two filled columns") in _error(capsys)

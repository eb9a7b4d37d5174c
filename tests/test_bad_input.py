"""Bad input, through the Python API and the command line.

Each case either works correctly or stops with one clear error naming the problem and the fix, and the user's
AnnData is left as it was, apart from what scvi-tools registration documents writing.
"""

import json
import logging
import pathlib
import pickle
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from conftest import QUIET, TINY_ARCH, make_model, register, saved
from scipy import sparse

import scanpy_canal as canal
from scanpy_canal.cli import main

ONE_EPOCH = {"max_epochs": 1, **QUIET}
TINY = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_ARCH.items()]
CLI_QUICK = [*TINY, "--epochs", "1", "--accelerator", "cpu", "--quiet"]
#: What `CANAL.setup_anndata` documents writing.
REGISTRATION_UNS = {"_scvi_uuid", "_scvi_manager_uuid"}
REGISTRATION_OBS = ["_scvi_labels"]


@pytest.fixture(scope="module")
def model(small_stream):
    """A briefly trained two-stage model (shared: do not modify)."""
    model = make_model(small_stream)
    model.train(max_epochs=3, lr=3e-3, **QUIET)
    model.train(register(small_stream.train[1]), max_epochs=3, lr=3e-3, **QUIET)
    return model


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    return saved(model, tmp_path_factory)


@pytest.fixture
def query(small_stream):
    return ad.concat(small_stream.test)


def _dense(adata: ad.AnnData) -> np.ndarray:
    return adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)


def assert_unchanged(adata: ad.AnnData, before: ad.AnnData) -> None:
    """X, obs, var and the uns keys as in `before` (a copy taken earlier), apart from registration keys."""
    assert adata.X.dtype == before.X.dtype and sparse.issparse(adata.X) == sparse.issparse(before.X)
    np.testing.assert_array_equal(_dense(adata), _dense(before))
    drop = {"columns": REGISTRATION_OBS, "errors": "ignore"}
    pd.testing.assert_frame_equal(adata.obs.drop(**drop), before.obs.drop(**drop))
    pd.testing.assert_frame_equal(adata.var, before.var)
    assert set(adata.uns) - REGISTRATION_UNS == set(before.uns) - REGISTRATION_UNS


def cli(capsys, *arguments) -> tuple[int, str]:
    """Run the command line; its exit status and the last line it wrote to stderr."""
    status = main([str(argument) for argument in arguments])
    lines = capsys.readouterr().err.strip().splitlines()
    return status, lines[-1] if lines else ""


def cli_error(capsys, *arguments) -> str:
    status, message = cli(capsys, *arguments)
    assert status == 1 and message.startswith("scanpy-canal: error: "), message
    return message


def cli_train(path, model_dir, *extra):
    return ("train", path, "--model-dir", model_dir, "--labels-key", "cell_type", *CLI_QUICK, *extra)


def cli_predict(path, model_dir, output, *extra):
    return ("predict", path, "--model-dir", model_dir, "--output", output, *extra)


def _predictions(path) -> np.ndarray:
    return pd.read_csv(path)["prediction"].to_numpy()


# -------------------------------------------------------------------------------------------------- expression values
def _with_x(adata: ad.AnnData, x) -> ad.AnnData:
    adata = adata.copy()
    adata.X = x
    return adata


def _set_first(value: float):
    def corrupt(adata: ad.AnnData) -> ad.AnnData:
        x = _dense(adata)
        x[0, 0] = value
        return _with_x(adata, x)

    return corrupt


BAD_VALUES = {
    "nan": (_set_first(np.nan), "NaN or infinite values"),
    "inf": (_set_first(np.inf), "NaN or infinite values"),
    "negative": (_set_first(-0.5), "negative values"),
    "scaled": (lambda adata: sc.pp.scale(adata, copy=True), "negative values"),
    "counts_int": (lambda adata: _with_x(adata, adata.layers["counts"].astype(np.int32)), "looks like raw counts"),
    "counts_float": (lambda adata: _with_x(adata, adata.layers["counts"].toarray()), "looks like raw counts"),
    "per_million": (lambda adata: _with_x(adata, np.log2(1 + (np.exp2(_dense(adata)) - 1) * 100)), "above log2"),
}


@pytest.mark.parametrize(("corrupt", "message"), BAD_VALUES.values(), ids=BAD_VALUES)
def test_bad_values_are_refused(small_stream, model, model_dir, tmp_path, capsys, corrupt, message):
    bad = register(corrupt(small_stream.train[1]))
    before = bad.copy()
    fresh = make_model(small_stream)
    calls = [
        lambda: canal.CANAL(bad, n_top_genes=10, **TINY_ARCH),  # used to fail inside scanpy's HVG (KeyError)
        lambda: fresh.train(bad, **ONE_EPOCH),
        lambda: model.predict(bad),
        lambda: canal.tl.annotate(bad, model),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()
    assert_unchanged(bad, before)
    assert fresh.stage == 0

    path = tmp_path / "bad.h5ad"
    bad.write_h5ad(path)
    assert message in cli_error(capsys, *cli_predict(path, model_dir, tmp_path / "out.csv"))
    assert message in cli_error(capsys, *cli_train(path, tmp_path / "new"))
    assert not (tmp_path / "new").exists() and not (tmp_path / "out.csv").exists()


def test_natural_log_values_are_refused_until_normalised(tmp_path, capsys):
    """``pbmc68k_reduced().raw`` holds ln(1 + counts per 10k): binned as log2 values, every cell lands too low."""
    raw = sc.datasets.pbmc68k_reduced().raw.to_adata()
    raw.obs["cell_type"] = raw.obs["bulk_labels"]
    normalised = canal.pp.normalize(raw, copy=True)
    model = canal.CANAL(register(normalised), **TINY_ARCH)
    model.train(**ONE_EPOCH)  # an untrained model refuses to predict before it reads the data
    before = raw.copy()
    calls = [
        lambda: canal.CANAL(register(raw), **TINY_ARCH),
        lambda: model.train(register(raw), **ONE_EPOCH),
        lambda: model.predict(raw),
        lambda: model.get_latent_representation(raw),
        lambda: canal.tl.annotate(raw, model),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"natural log .*canal\.pp\.normalize\(adata\)"):
            call()
    assert_unchanged(raw, before)
    assert model.stage == 1

    raw.write_h5ad(tmp_path / "raw.h5ad")
    model_dir, out = tmp_path / "model", tmp_path / "annotated.h5ad"
    assert "add --normalize" in cli_error(capsys, *cli_train(tmp_path / "raw.h5ad", model_dir))
    assert cli(capsys, *cli_train(tmp_path / "raw.h5ad", model_dir, "--normalize"))[0] == 0
    assert "add --normalize" in cli_error(capsys, *cli_predict(tmp_path / "raw.h5ad", model_dir, out))
    assert cli(capsys, *cli_predict(tmp_path / "raw.h5ad", model_dir, out, "--normalize"))[0] == 0
    annotated = ad.read_h5ad(out)
    np.testing.assert_array_equal(annotated.obs["canal_prediction"], canal.CANAL.load(model_dir).predict(normalised))
    np.testing.assert_array_equal(_dense(annotated), _dense(raw))  # the output keeps the input's values


def test_counts_of_any_dtype_give_the_same_predictions_once_normalised(
    small_stream, model, model_dir, tmp_path, capsys
):
    counts = small_stream.test[0].layers["counts"]
    variants = {
        "int32_dense": counts.toarray().astype(np.int32),
        "int64_csr": sparse.csr_matrix(counts, dtype=np.int64),
        "float64_dense": counts.toarray().astype(np.float64),
        "float32_csc": sparse.csc_matrix(counts),
    }
    results = []
    for name, x in variants.items():
        adata = _with_x(small_stream.test[0], x)
        canal.pp.normalize(adata)
        results.append(model.predict(adata))
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
        assert cli(capsys, *cli_predict(tmp_path / f"{name}.h5ad", model_dir, tmp_path / f"{name}.csv"))[0] == 0
        np.testing.assert_array_equal(_predictions(tmp_path / f"{name}.csv"), results[0])
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_dense_sparse_float32_float64_give_the_same_predictions(query, model, model_dir, tmp_path, capsys):
    expected = model.predict(query, soft=True)
    dense = _dense(query)
    for x in (dense, dense.astype(np.float64), sparse.csr_matrix(dense, dtype=np.float64), sparse.csc_matrix(dense)):
        adata = _with_x(query, x)
        pd.testing.assert_frame_equal(model.predict(adata, soft=True), expected, rtol=1e-5)
    _with_x(query, dense.astype(np.float64)).write_h5ad(tmp_path / "dense.h5ad")
    assert cli(capsys, *cli_predict(tmp_path / "dense.h5ad", model_dir, tmp_path / "dense.csv"))[0] == 0
    np.testing.assert_array_equal(_predictions(tmp_path / "dense.csv"), expected.idxmax(axis=1))


# ------------------------------------------------------------------------------------------------------------- labels
BAD_LABELS = {
    "missing_key": (lambda obs: obs.drop(columns="cell_type"), KeyError, "Labels key 'cell_type' is not a column"),
    "nan": (lambda obs: obs.assign(cell_type=obs["cell_type"].where(np.arange(len(obs)) > 2)), ValueError, "3 missing"),
    "empty": (
        lambda obs: obs.assign(cell_type=np.where(np.arange(len(obs)) < 2, "", obs["cell_type"].astype(str))),
        ValueError,
        "2 missing or empty labels",
    ),
}


@pytest.mark.parametrize(("change", "error", "message"), BAD_LABELS.values(), ids=BAD_LABELS)
def test_bad_labels_are_refused(small_stream, tmp_path, capsys, change, error, message):
    adata = small_stream.train[0].copy()
    adata.obs = change(adata.obs)
    before = adata.copy()
    with pytest.raises(error, match=message):
        canal.CANAL.setup_anndata(adata, labels_key="cell_type")
    assert_unchanged(adata, before)
    assert not REGISTRATION_UNS & set(adata.uns)

    adata.write_h5ad(tmp_path / "stage.h5ad")
    assert message in cli_error(capsys, *cli_train(tmp_path / "stage.h5ad", tmp_path / "model"))
    assert not (tmp_path / "model").exists()


# -------------------------------------------------------------------------------------------------------- data shapes
def test_empty_data_is_refused(small_stream, model, model_dir, tmp_path, capsys):
    empty = small_stream.train[0][:0].copy()
    with pytest.raises(ValueError, match="adata has no cells"):
        canal.CANAL.setup_anndata(empty, labels_key="cell_type")  # used to fail inside scvi-tools
    with pytest.raises(ValueError, match="query has no cells"):
        model.predict(empty)
    empty.write_h5ad(tmp_path / "empty.h5ad")
    assert "has no cells" in cli_error(capsys, *cli_train(tmp_path / "empty.h5ad", tmp_path / "model"))
    assert "has no cells" in cli_error(capsys, *cli_predict(tmp_path / "empty.h5ad", model_dir, tmp_path / "o.csv"))


def test_a_single_cell_cannot_be_a_stage(small_stream, tmp_path, capsys):
    one = register(small_stream.train[0][:1])
    model = canal.CANAL(one, **TINY_ARCH)
    with pytest.raises(ValueError, match="No cell can be held out for validation"):
        model.train(**ONE_EPOCH)  # used to fail inside Lightning (no validation data loader)
    assert model.stage == 0 and model.example_bank is None
    small_stream.train[0][:1].write_h5ad(tmp_path / "one.h5ad")
    assert "No cell can be held out" in cli_error(capsys, *cli_train(tmp_path / "one.h5ad", tmp_path / "model"))
    assert not (tmp_path / "model").exists()


def test_two_cells_of_one_type_are_enough(small_stream):
    data = small_stream.train[0]
    two = register(data[data.obs["cell_type"] == data.obs["cell_type"].iloc[0]][:2])
    model = canal.CANAL(two, **TINY_ARCH)
    model.train(**ONE_EPOCH)
    assert model.stage == 1 and model.stage_history_[-1]["best_epoch"] == 1


def test_a_single_cell_type_trains_with_a_warning(small_stream, query, tmp_path, capsys, caplog):
    data = small_stream.train[0]
    first_type = data.obs["cell_type"].iloc[0]
    single = register(data[data.obs["cell_type"] == first_type])
    model = canal.CANAL(single, **TINY_ARCH)
    with caplog.at_level(logging.WARNING, logger="scanpy_canal"):
        model.train(**ONE_EPOCH)
    assert "single cell type" in caplog.text
    assert set(model.predict(query)) == {first_type}
    assert set(model.predict(query, novel=True)) <= {first_type, "Unassigned"}

    single.write_h5ad(tmp_path / "single.h5ad")
    assert cli(capsys, *cli_train(tmp_path / "single.h5ad", tmp_path / "model"))[0] == 0
    assert canal.CANAL.load(tmp_path / "model").cell_types == [first_type]


def test_no_shared_genes(query, model, model_dir, tmp_path, capsys):
    foreign = query.copy()
    foreign.var_names = [f"other_{i}" for i in range(foreign.n_vars)]
    with pytest.raises(ValueError, match="None of the 60 requested genes"):
        model.predict(foreign)
    foreign.write_h5ad(tmp_path / "foreign.h5ad")
    assert "None of the 60 requested genes" in cli_error(
        capsys, *cli_predict(tmp_path / "foreign.h5ad", model_dir, tmp_path / "o.csv")
    )


# --------------------------------------------------------------------------------------------------------------- names
def test_duplicated_obs_names(small_stream, query, model, model_dir, tmp_path, capsys):
    expected = model.predict(query)
    duplicated = query.copy()
    duplicated.obs_names = ["cell"] * duplicated.n_obs
    before = duplicated.copy()
    np.testing.assert_array_equal(model.predict(duplicated), expected)
    assert_unchanged(duplicated, before)
    duplicated.write_h5ad(tmp_path / "duplicated.h5ad")
    assert cli(capsys, *cli_predict(tmp_path / "duplicated.h5ad", model_dir, tmp_path / "out.csv"))[0] == 0
    np.testing.assert_array_equal(_predictions(tmp_path / "out.csv"), expected)

    stage = small_stream.train[0].copy()
    stage.obs_names = ["cell"] * stage.n_obs
    trained = canal.CANAL(register(stage), **TINY_ARCH)
    trained.train(**ONE_EPOCH)
    assert trained.example_bank.obs_names.is_unique


def test_duplicated_gene_names_use_the_first_column(small_stream, query, model, model_dir, tmp_path, capsys):
    expected = model.predict(query)
    extra = query[:, :3].copy()
    extra.X = sparse.csr_matrix(np.full(extra.shape, 3.0, dtype=np.float32))  # other values under the same names
    duplicated = ad.concat([query, extra], axis=1, merge="first")
    with pytest.warns(UserWarning, match="3 genes have a duplicated name"):
        np.testing.assert_array_equal(model.predict(duplicated), expected)
    duplicated.write_h5ad(tmp_path / "duplicated.h5ad")
    assert cli(capsys, *cli_predict(tmp_path / "duplicated.h5ad", model_dir, tmp_path / "out.csv"))[0] == 0
    np.testing.assert_array_equal(_predictions(tmp_path / "out.csv"), expected)

    stage = ad.concat([small_stream.train[0], small_stream.train[0][:, :3]], axis=1, merge="first")
    assert canal.CANAL(register(stage), **TINY_ARCH).genes == list(small_stream.train[0].var_names)


def test_genes_in_another_order(small_stream, query, model, model_dir, tmp_path, capsys):
    order = np.random.default_rng(1).permutation(query.n_vars)
    query[:, order].copy().write_h5ad(tmp_path / "shuffled.h5ad")
    assert cli(capsys, *cli_predict(tmp_path / "shuffled.h5ad", model_dir, tmp_path / "out.csv"))[0] == 0
    np.testing.assert_array_equal(_predictions(tmp_path / "out.csv"), model.predict(query))

    states = []
    for stage in (small_stream.train[1], small_stream.train[1][:, order]):
        trained = make_model(small_stream)
        trained.train(**ONE_EPOCH)
        trained.train(register(stage), **ONE_EPOCH)
        states.append(trained.module.network.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


# --------------------------------------------------------------------------------------------------------------- views
def test_views(small_stream, query, model):
    parent = query.copy()
    before = parent.copy()
    view = parent[:20]
    np.testing.assert_array_equal(model.predict(view), model.predict(query)[:20])
    assert view.is_view
    assert_unchanged(parent, before)

    canal.tl.annotate(view, model)  # documented writes land in the view (now its own AnnData), not in its parent
    assert "canal_prediction" in view.obs and "X_canal" in view.obsm
    assert_unchanged(parent, before)

    stage = small_stream.train[0].copy()
    with pytest.raises(ValueError, match=r"view of another AnnData.*adata\[mask\].copy\(\)"):
        canal.CANAL.setup_anndata(stage[:50], labels_key="cell_type")  # used to be scvi-tools' terse message
    canal.CANAL.setup_anndata(stage, labels_key="cell_type")
    with pytest.raises(ValueError, match="view of another AnnData"):
        canal.CANAL(stage[:80], **TINY_ARCH)  # used to be scvi-tools' "Did you make a copy?"
    before = stage.copy()
    trained = canal.CANAL(stage, **TINY_ARCH)
    trained.train(stage[:80], **ONE_EPOCH)  # a view of registered data trains like a copy of it
    assert trained.stage == 1
    assert_unchanged(stage, before)


# -------------------------------------------------------------------------------------------------------------- stages
def test_stage_out_of_order_leaves_the_model_as_it_was(small_stream, model):
    state = {key: value.clone() for key, value in model.module.network.state_dict().items()}
    for stage in (1, 2, 4):
        with pytest.raises(ValueError, match=f"the next stage is 3, not {stage}"):
            model.train(register(small_stream.train[1]), stage=stage, **ONE_EPOCH)
    assert model.stage == 2
    for key, value in model.module.network.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_stage_of_known_types_only(small_stream):
    model = make_model(small_stream)
    model.train(**ONE_EPOCH)
    types, rows = model.cell_types, model.module.head.n_classes
    model.train(register(small_stream.train[0]), **ONE_EPOCH)
    assert model.stage == 2 and model.cell_types == types and model.module.head.n_classes == rows
    assert model.stage_history_[-1]["new_cell_types"] == []
    assert model.stage_history_[-1]["distill_weight"] == pytest.approx(0.1)  # C_old / C_new = 1


def test_a_query_of_never_seen_types(small_stream, model, model_dir, tmp_path, capsys):
    novel = register(small_stream.novel)  # labelled with a type the model never saw: the labels are not used
    before = novel.copy()
    assert set(model.predict(novel)) <= set(model.cell_types)
    assert set(model.predict(novel, novel=True)) <= {*model.cell_types, "Unassigned"}
    assert_unchanged(novel, before)
    small_stream.novel.write_h5ad(tmp_path / "novel.h5ad")
    assert cli(capsys, *cli_predict(tmp_path / "novel.h5ad", model_dir, tmp_path / "out.csv", "--novel"))[0] == 0
    assert set(_predictions(tmp_path / "out.csv")) <= {*model.cell_types, "Unassigned"}


# -------------------------------------------------------------------------------------------------------- saved files
class _TouchOnUnpickle:
    """Unpickling this creates `path`: what a malicious weights file could do with `torch.load(weights_only=False)`."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def _tampered_copy(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    directory = tmp_path / "model"
    shutil.copytree(model_dir, directory)
    return directory


@pytest.mark.parametrize("how", ["pickle", "torch_save"])
def test_pickled_payload_in_weights_is_refused(model_dir, tmp_path, capsys, how):
    directory, marker = _tampered_copy(model_dir, tmp_path), tmp_path / "pwned"
    payload = {"network": _TouchOnUnpickle(marker)}
    if how == "pickle":
        (directory / "weights.pt").write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, directory / "weights.pt")
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        canal.CANAL.load(directory)
    (tmp_path / "query.h5ad").touch()  # the model is read after the paths are checked
    message = cli_error(capsys, *cli_predict(tmp_path / "query.h5ad", directory, tmp_path / "out.csv"))
    assert "holds objects other than tensors" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda meta: {key: value for key, value in meta.items() if key != "genes"}, "lacks genes"),
        (lambda meta: {**meta, "arch": {**meta["arch"], "dim": "wide"}}, "does not describe a valid CANAL model"),
        (lambda meta: {**meta, "genes": meta["genes"][:-1]}, "do not match its model.json"),
    ],
    ids=["missing_key", "wrong_type", "wrong_genes"],
)
def test_tampered_model_json_is_refused(model_dir, query, tmp_path, capsys, tamper, message):
    directory = _tampered_copy(model_dir, tmp_path)
    metadata = json.loads((directory / "model.json").read_text())
    del metadata["metadata_sha256"]  # edited by hand: the content's checks, not the digest, are under test
    (directory / "model.json").write_text(json.dumps(tamper(metadata)))
    with pytest.raises(ValueError, match=message):
        canal.CANAL.load(directory)
    query.write_h5ad(tmp_path / "query.h5ad")
    assert message in cli_error(capsys, *cli_predict(tmp_path / "query.h5ad", directory, tmp_path / "o.csv"))


def test_tampered_example_bank_is_refused(model, model_dir, tmp_path):
    directory = _tampered_copy(model_dir, tmp_path)
    (directory / "example_bank.h5ad").write_bytes(b"not an HDF5 file")
    with pytest.raises(ValueError, match="Could not read .*example_bank.h5ad"):
        canal.CANAL.load(directory)
    model.example_bank[:, :10].copy().write_h5ad(directory / "example_bank.h5ad")
    with pytest.raises(ValueError, match="does not match the gene panel"):
        canal.CANAL.load(directory)


def test_save_never_replaces_other_files(model, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "figure.png").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="is not a saved CANAL model"):
        model.save(results, overwrite=True)
    assert (results / "figure.png").read_bytes() == b"precious" and len(list(tmp_path.iterdir())) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    model.save(empty, overwrite=True)
    assert canal.CANAL.load(empty).stage == model.stage

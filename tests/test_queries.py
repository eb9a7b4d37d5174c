"""Queries as users bring them: Ensembl IDs with a symbol column, few of the panel's genes, a MuData (``.h5mu``).

Each case through the Python API and, where it applies, the command line.
"""

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from conftest import QUIET, TINY_ARCH, register

import scanpy_canal as canal
from scanpy_canal.cli import main

CLI_QUICK = [*(f"--{key.replace('_', '-')}={value}" for key, value in TINY_ARCH.items())]
CLI_QUICK += ["--epochs", "1", "--accelerator", "cpu", "--quiet"]


def _ensembl(adata: ad.AnnData) -> ad.AnnData:
    """`adata` with made-up Ensembl IDs as var_names and the gene symbols in ``var["symbol"]``."""
    adata = adata.copy()
    adata.var["symbol"] = adata.var_names.to_numpy()
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    return adata


def _cli(capsys, *arguments) -> tuple[int, str]:
    """Run the command line; its exit status and what it wrote to stderr."""
    status = main([str(argument) for argument in arguments])
    return status, capsys.readouterr().err


def test_gene_symbols(two_stage_model, small_stream, stream_query, two_stage_model_dir, tmp_path, capsys):
    model, ensembl = two_stage_model, _ensembl(stream_query)
    with pytest.raises(ValueError, match=r"look like Ensembl IDs: pass gene_symbols="):
        model.predict(ensembl)
    expected = model.predict(stream_query, novel=True)
    np.testing.assert_array_equal(model.predict(ensembl, novel=True, gene_symbols="symbol"), expected)
    np.testing.assert_allclose(
        model.get_latent_representation(ensembl, gene_symbols="symbol"), model.get_latent_representation(stream_query)
    )
    canal.tl.annotate(ensembl, model, gene_symbols="symbol")
    np.testing.assert_array_equal(ensembl.obs["canal_prediction"], model.predict(stream_query))
    with pytest.raises(KeyError, match="'gene_name' is not a column"):
        model.predict(ensembl, gene_symbols="gene_name")

    _ensembl(stream_query).write_h5ad(tmp_path / "query.h5ad")
    predict = ["predict", tmp_path / "query.h5ad", "--model-dir", two_stage_model_dir, "--output", tmp_path / "out.csv"]
    status, err = _cli(capsys, *predict)
    assert status == 1 and "(--gene-symbols on the command line)" in err
    assert _cli(capsys, *predict, "--gene-symbols", "symbol", "--novel")[0] == 0
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "out.csv")["prediction"], expected)

    stage = _ensembl(small_stream.train[0])
    stage.var.loc[stage.var_names[0], "symbol"] = np.nan  # a gene without a symbol is left out
    stage.write_h5ad(tmp_path / "stage.h5ad")
    train = ["train", tmp_path / "stage.h5ad", "--model-dir", tmp_path / "new", "--labels-key", "cell_type"]
    assert _cli(capsys, *train, *CLI_QUICK, "--gene-symbols", "symbol")[0] == 0
    assert canal.CANAL.load(tmp_path / "new").genes == list(small_stream.train[0].var_names[1:])


def test_gene_overlap_is_reported(two_stage_model, stream_query, two_stage_model_dir, tmp_path, capsys, caplog):
    model = two_stage_model
    with caplog.at_level(logging.INFO, logger="scanpy_canal"):
        model.predict(stream_query)
    assert "60 of 60 genes found (100.0%)" in caplog.messages

    # a third of the panel: predicted, with a warning at scanpy's default verbosity
    twenty = stream_query[:, :20].copy()
    caplog.clear()
    with sc.settings.verbosity.override("warning"):
        labels = model.predict(twenty)
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert "Only 20 of 60 genes found (33.3%)" in caplog.text and len(labels) == stream_query.n_obs

    five = stream_query[:, :5].copy()  # 8% of the panel: an error, unless the floor is lowered
    for call in (lambda **kw: model.predict(five, **kw), lambda **kw: canal.tl.annotate(five, model, **kw)):
        with pytest.raises(ValueError, match=r"Only 5 of 60 genes found \(8\.3%\).*fewer than min_gene_overlap=0\.1"):
            call()
        call(min_gene_overlap=0.05)
    with pytest.raises(ValueError, match=r"min_gene_overlap must be a fraction in \[0, 1\]"):
        model.predict(stream_query, min_gene_overlap=10)

    five.write_h5ad(tmp_path / "five.h5ad")
    predict = ["predict", tmp_path / "five.h5ad", "--model-dir", two_stage_model_dir, "--output", tmp_path / "out.csv"]
    status, err = _cli(capsys, *predict)
    assert status == 1 and "Lower min_gene_overlap (--min-gene-overlap)" in err
    assert _cli(capsys, *predict, "--min-gene-overlap", "0.05")[0] == 0


def test_predict_a_mudata(two_stage_model, stream_query):
    import mudata as md

    model = two_stage_model
    mdata = md.MuData(
        {"rna": stream_query.copy(), "protein": ad.AnnData(np.ones((stream_query.n_obs, 2)), obs=stream_query.obs[[]])}
    )
    np.testing.assert_array_equal(model.predict(mdata, novel=True), model.predict(stream_query, novel=True))
    pd.testing.assert_frame_equal(model.predict(mdata, soft=True), model.predict(stream_query, soft=True))
    assert model.get_latent_representation(mdata).shape == (stream_query.n_obs, 64)
    assert model.get_novelty(mdata).index.equals(stream_query.obs_names)
    with pytest.raises(KeyError, match="MuData has no modality 'atac'; it has \\['rna', 'protein'\\]"):
        model.predict(mdata, mod="atac")
    rna_as_other = md.MuData({"gex": stream_query.copy()})
    np.testing.assert_array_equal(model.predict(rna_as_other, mod="gex"), model.predict(stream_query))


def test_mudata_files_on_the_command_line(
    two_stage_model, small_stream, stream_query, two_stage_model_dir, tmp_path, capsys
):
    import mudata as md

    protein = ad.AnnData(np.ones((stream_query.n_obs, 2)), obs=stream_query.obs[[]])
    md.MuData({"gex": stream_query.copy(), "protein": protein}).write_h5mu(tmp_path / "query.h5mu")
    predict = ["predict", tmp_path / "query.h5mu", "--model-dir", two_stage_model_dir, "--novel"]
    status, err = _cli(capsys, *predict, "--output", tmp_path / "out.csv")
    assert status == 1 and "MuData has no modality 'rna'; it has ['gex', 'protein']" in err and "--mod" in err
    expected = canal.tl.annotate(stream_query, two_stage_model, novel=True, copy=True).obs

    assert _cli(capsys, *predict, "--mod", "gex", "--output", tmp_path / "out.csv")[0] == 0
    table = pd.read_csv(tmp_path / "out.csv", index_col="obs_names")
    np.testing.assert_array_equal(table["prediction"], expected["canal_prediction"])
    assert _cli(capsys, *predict, "--mod", "gex", "--output", tmp_path / "out.h5mu")[0] == 0
    annotated = md.read_h5mu(tmp_path / "out.h5mu")
    np.testing.assert_array_equal(annotated["gex"].obs["canal_prediction"], expected["canal_prediction"])
    np.testing.assert_array_equal(annotated.obs["gex:canal_novelty_pvalue"], expected["canal_novelty_pvalue"])
    assert "X_canal" in annotated["gex"].obsm and annotated["protein"].n_vars == 2

    status, err = _cli(capsys, *predict, "--mod", "gex", "--output", tmp_path / "out.h5ad")
    assert status == 1 and "--output must end in .h5mu or .csv for an .h5mu input" in err
    stream_query.write_h5ad(tmp_path / "query.h5ad")
    status, err = _cli(
        capsys,
        "predict",
        tmp_path / "query.h5ad",
        "--model-dir",
        two_stage_model_dir,
        "--mod",
        "gex",
        "--output",
        tmp_path / "other.csv",
    )
    assert status == 1 and "--mod names a modality of an .h5mu file" in err

    md.MuData({"rna": register(small_stream.train[0])}).write_h5mu(tmp_path / "stage.h5mu")
    train = ["train", tmp_path / "stage.h5mu", "--model-dir", tmp_path / "new", "--labels-key", "cell_type"]
    assert _cli(capsys, *train, *CLI_QUICK)[0] == 0
    assert canal.CANAL.load(tmp_path / "new").cell_types == sorted(set(small_stream.train[0].obs["cell_type"]))


def test_a_stage_with_few_panel_genes_warns(small_stream, caplog):
    model = canal.CANAL(register(small_stream.train[0]), **TINY_ARCH)
    model.train(max_epochs=1, **QUIET)
    with sc.settings.verbosity.override("warning"):
        model.train(register(small_stream.train[1][:, :25]), max_epochs=1, **QUIET)
    assert "Only 25 of 60 genes found (41.7%)" in caplog.text


def test_gene_symbols_at_training(small_stream, stream_query):
    """Registered with ``gene_symbols``, Ensembl-named data trains the model the symbol-named data trains."""
    by_symbol = canal.CANAL(register(small_stream.train[0]), seed=3, **TINY_ARCH)
    stages = [_ensembl(data) for data in small_stream.train]
    for data in stages:
        canal.CANAL.setup_anndata(data, labels_key="cell_type", gene_symbols="symbol")
    by_id = canal.CANAL(stages[0], seed=3, **TINY_ARCH)
    assert by_id.genes == by_symbol.genes == list(small_stream.train[0].var_names)
    for model, data in [(by_symbol, register(small_stream.train[1])), (by_id, stages[1])]:
        model.train(max_epochs=1, **QUIET)
        model.train(data, max_epochs=1, **QUIET)
    np.testing.assert_array_equal(
        by_id.predict(_ensembl(stream_query), gene_symbols="symbol"), by_symbol.predict(stream_query)
    )
    np.testing.assert_array_equal(by_id.predict(), by_symbol.predict())  # the stage-1 data, read as registered
    with pytest.raises(KeyError, match="'gene_name' is not a column"):
        canal.CANAL.setup_anndata(stages[0], labels_key="cell_type", gene_symbols="gene_name")

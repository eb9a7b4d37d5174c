"""CellTypist habits: `tl.annotate` with a saved model's path, and majority voting over clusters."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scanpy_canal as canal
from scanpy_canal.cli import main


def _assert_votes(obs: pd.DataFrame, clusters: str, key: str = "canal") -> None:
    """Every cell carries its cluster's most frequent prediction."""
    for _, cells in obs.groupby(clusters, observed=True):
        assert cells[f"{key}_majority_voting"].nunique() == 1
        counts = cells[f"{key}_prediction"].value_counts()
        assert counts[cells[f"{key}_majority_voting"].iloc[0]] == counts.max()


def test_annotate_takes_a_saved_models_path(two_stage_model, stream_query, two_stage_model_dir):
    expected = canal.tl.annotate(stream_query, two_stage_model, novel=True, copy=True)
    for model in (two_stage_model_dir, str(two_stage_model_dir)):
        annotated = canal.tl.annotate(stream_query, model, novel=True, copy=True)
        pd.testing.assert_frame_equal(annotated.obs, expected.obs)
    with pytest.raises(FileNotFoundError, match="is not a saved CANAL model"):
        canal.tl.annotate(stream_query, two_stage_model_dir.parent)


def test_majority_voting_on_leiden_clusters_of_the_embedding(two_stage_model, stream_query):
    canal.tl.annotate(stream_query, two_stage_model, novel=True, majority_voting=True)
    obs = stream_query.obs
    assert obs["canal_majority_voting"].cat.categories.equals(obs["canal_prediction"].cat.categories)
    assert 1 < obs["canal_over_clustering"].nunique() < stream_query.n_obs
    _assert_votes(obs, "canal_over_clustering")
    assert stream_query.uns["canal"]["params"]["majority_voting"]
    assert (obs["canal_majority_voting"] == obs["canal_prediction"]).mean() > 0.5

    unassigned = (obs["canal_prediction"] == "Unassigned").sum()
    canal.tl.unassign(stream_query, alpha=0.5)  # the votes follow the new calls, in the same clusters
    _assert_votes(stream_query.obs, "canal_over_clustering")
    assert (stream_query.obs["canal_prediction"] == "Unassigned").sum() > unassigned


def test_majority_voting_on_given_clusters(two_stage_model, stream_query):
    annotated = canal.tl.annotate(
        stream_query, two_stage_model, majority_voting=True, over_clustering="cell_type", copy=True
    )
    _assert_votes(annotated.obs, "cell_type")
    assert (annotated.obs["canal_over_clustering"] == stream_query.obs["cell_type"].astype(str)).all()
    halves = np.where(np.arange(stream_query.n_obs) < stream_query.n_obs // 2, "first", "second")
    annotated = canal.tl.annotate(
        stream_query, two_stage_model, majority_voting=True, over_clustering=halves, copy=True
    )
    assert annotated.obs["canal_majority_voting"].nunique() <= 2

    with pytest.raises(ValueError, match="pass majority_voting=True too"):
        canal.tl.annotate(stream_query, two_stage_model, over_clustering="cell_type")
    with pytest.raises(KeyError, match="'leiden' is not a column of obs"):
        canal.tl.annotate(stream_query, two_stage_model, majority_voting=True, over_clustering="leiden")
    with pytest.raises(ValueError, match="one cluster per cell"):
        canal.tl.annotate(stream_query, two_stage_model, majority_voting=True, over_clustering=halves[:3])


def test_majority_voting_in_a_mudata(two_stage_model, stream_query):
    import mudata as md

    mdata = md.MuData({"rna": stream_query.copy()})
    canal.tl.annotate(mdata, two_stage_model, majority_voting=True)
    assert {"rna:canal_majority_voting", "rna:canal_over_clustering"} <= set(mdata.obs)
    _assert_votes(mdata.mod["rna"].obs, "canal_over_clustering")


def test_majority_voting_on_the_command_line(stream_query, two_stage_model_dir, tmp_path, capsys):
    stream_query.write_h5ad(tmp_path / "query.h5ad")
    predict = ["predict", str(tmp_path / "query.h5ad"), "--model-dir", str(two_stage_model_dir), "--overwrite"]
    table = tmp_path / "cells.csv"
    assert main([*predict, "--output", str(table), "--majority-voting", "--over-clustering", "cell_type"]) == 0
    cells = pd.read_csv(table, index_col=0)
    assert list(cells.columns) == ["prediction", "confidence", "majority_voting", "over_clustering"]
    _assert_votes(cells.add_prefix("canal_"), "canal_over_clustering")

    assert main([*predict, "--output", str(tmp_path / "annotated.h5ad"), "--majority-voting", "--novel"]) == 0
    annotated = ad.read_h5ad(tmp_path / "annotated.h5ad")
    _assert_votes(annotated.obs, "canal_over_clustering")

    assert main([*predict, "--output", str(table), "--over-clustering", "cell_type"]) == 1
    assert "add --majority-voting" in capsys.readouterr().err

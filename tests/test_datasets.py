import numpy as np
import pytest
from scipy import sparse

from scanpy_canal.datasets import Stream, pbmc68k_stream, synthetic_stream

PBMC_TYPES = {
    "Dendritic",
    "CD14+ Monocyte",
    "CD19+ B",
    "CD4+/CD25 T Reg",
    "CD8+ Cytotoxic T",
    "CD8+/CD45RA+ Naive Cytotoxic",
    "CD56+ NK",
    "CD4+/CD45RO+ Memory",
    "CD34+",
    "CD4+/CD45RA+/CD25- Naive T",
}


def types(adata):
    return set(adata.obs["cell_type"].unique())


def all_data(stream):
    return [*stream.train, *stream.test, *([stream.novel] if stream.novel is not None else [])]


def check_common(stream: Stream):
    data = all_data(stream)
    names = np.concatenate([a.obs_names.to_numpy() for a in data])
    assert len(names) == len(set(names))
    for adata in data:
        assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
        assert adata.var_names.equals(data[0].var_names)
        assert adata.obs["cell_type"].dtype == "category"
        assert set(adata.obs["cell_type"].cat.categories) == types(adata)
        assert (np.exp2(adata.X.toarray().astype(np.float64)) - 1).sum(axis=1).max() <= 1e4 * (1 + 1e-5)
    for t, (train, test) in enumerate(zip(stream.train, stream.test, strict=True)):
        assert types(train) == types(test)
        assert (train.obs["stage"] == t).all() and (test.obs["stage"] == t).all()
        assert not types(train) & set(stream.novel_types)
    if stream.novel is not None:
        assert types(stream.novel) == set(stream.novel_types)
        assert (stream.novel.obs["stage"] == -1).all()


@pytest.fixture(scope="module")
def pbmc():
    return pbmc68k_stream()


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_stream()


# --- pbmc68k_stream ----------------------------------------------------------------------------------------------


def test_pbmc_stream(pbmc):
    check_common(pbmc)
    assert pbmc.n_stages == 3 and pbmc.novel_types == ["CD34+"]
    stage_types = [types(a) for a in pbmc.train]
    assert set().union(*stage_types) == PBMC_TYPES - {"CD34+"}
    assert sum(len(s) for s in stage_types) == 9  # disjoint: each stage brings new types
    assert stage_types[0] == {"Dendritic", "CD4+/CD25 T Reg", "CD56+ NK"}
    assert pbmc.novel.n_obs == 13 and pbmc.novel.n_vars == 765
    assert sum(a.n_obs for a in all_data(pbmc)) == 700
    for train, test in zip(pbmc.train, pbmc.test, strict=True):
        assert test.n_obs / (train.n_obs + test.n_obs) == pytest.approx(0.3, abs=0.02)


def test_pbmc_stream_seed():
    a, b, c = pbmc68k_stream(seed=1), pbmc68k_stream(seed=1), pbmc68k_stream(seed=2, novel_types=())
    assert a.test[0].obs_names.equals(b.test[0].obs_names)
    assert not a.test[0].obs_names.equals(c.test[0].obs_names)
    assert c.novel is None and sum(len(types(t)) for t in c.train) == 10


def test_pbmc_stream_takes_each_stages_types_in_order():
    stream = pbmc68k_stream(stages=[["CD19+ B", "CD14+ Monocyte"], "CD56+ NK"])
    assert [types(a) for a in stream.train] == [{"CD19+ B", "CD14+ Monocyte"}, {"CD56+ NK"}]
    assert [types(a) for a in stream.test] == [{"CD19+ B", "CD14+ Monocyte"}, {"CD56+ NK"}]
    assert types(stream.novel) == {"CD34+"}
    assert sum(a.n_obs for a in all_data(stream)) == 95 + 129 + 31 + 13  # the types named nowhere are left out


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([], "at least one stage"),
        ([["CD19+ B"], []], r"empty stages: \[2\]"),
        ([["B cell"]], r"unknown: \['B cell'\]"),
        ([["CD34+"]], r"novel: \['CD34\+'\]"),
        ([["CD19+ B"], ["CD19+ B", "Dendritic"]], r"named twice: \['CD19\+ B'\]"),
    ],
)
def test_pbmc_stream_stages_errors(stages, match):
    with pytest.raises(ValueError, match=match):
        pbmc68k_stream(stages=stages)


def test_pbmc_stream_errors():
    with pytest.raises(ValueError, match="n_stages must be between 1 and"):
        pbmc68k_stream(n_stages=0)
    with pytest.raises(ValueError, match=r"number of non-novel types \(9\)"):
        pbmc68k_stream(n_stages=10)
    with pytest.raises(ValueError, match=r"Unknown novel types \['T cell'\].*Dendritic"):
        pbmc68k_stream(novel_types=["T cell"])
    with pytest.raises(ValueError, match="test_size"):
        pbmc68k_stream(test_size=1.0)


# --- synthetic_stream --------------------------------------------------------------------------------------------


def test_synthetic_stream(synthetic):
    check_common(synthetic)
    assert synthetic.n_stages == 3 and synthetic.novel_types == ["type_6"]
    assert [types(a) for a in synthetic.train] == [
        {"type_0", "type_1"},
        {"type_0", "type_1", "type_2", "type_3"},
        {f"type_{k}" for k in range(6)},
    ]
    assert [a.n_obs + b.n_obs for a, b in zip(synthetic.train, synthetic.test, strict=True)] == [120, 180, 240]
    assert synthetic.novel.n_obs == 60
    assert synthetic.train[0].var_names[:2].tolist() == ["gene_0", "gene_1"]
    assert synthetic.train[0].n_vars == 200


def test_synthetic_counts_and_markers(synthetic):
    for adata in all_data(synthetic):
        counts = adata.layers["counts"].toarray()
        np.testing.assert_array_equal(counts, np.round(counts))
        expected = np.log2(1 + counts / adata.obs["total_counts"].to_numpy()[:, None] * 1e4)
        np.testing.assert_allclose(adata.X.toarray(), expected, atol=1e-5)
    last = synthetic.train[-1]
    X = last.X.toarray()
    for cell_type in types(last):
        in_type = (last.obs["cell_type"] == cell_type).to_numpy()
        markers = (last.var["marker_of"] == cell_type).to_numpy()
        assert X[in_type][:, markers].mean() >= 3
        assert X[in_type][:, markers].mean() > X[~in_type][:, markers].mean() + 1


def test_synthetic_marker_fold():
    def marker_contrast(stream):
        data = stream.train[0]
        X, cell_type = data.X.toarray(), data.obs["cell_type"].to_numpy()
        markers = (data.var["marker_of"] == "type_0").to_numpy()
        return X[cell_type == "type_0"][:, markers].mean() - X[cell_type != "type_0"][:, markers].mean()

    weak, strong = synthetic_stream(marker_fold=(1.5, 2.0)), synthetic_stream(marker_fold=(10.0, 20.0))
    assert 0 < marker_contrast(weak) < 1.5 < marker_contrast(strong)


def test_synthetic_stream_seed(synthetic):
    again = synthetic_stream()
    other = synthetic_stream(seed=1)
    assert (synthetic.train[1].X != again.train[1].X).nnz == 0
    assert synthetic.test[2].obs_names.equals(again.test[2].obs_names)
    assert (synthetic.train[1].X != other.train[1].X).nnz > 0


def test_synthetic_stream_options():
    stream = synthetic_stream(
        n_stages=2, n_genes=50, types_per_stage=3, n_novel_types=0, cells_per_type=10, old_types_recur=False
    )
    check_common(stream)
    assert stream.novel is None and stream.novel_types == []
    assert [types(a) for a in stream.train] == [{"type_0", "type_1", "type_2"}, {"type_3", "type_4", "type_5"}]
    assert [a.n_obs for a in stream.test] == [9, 9]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_stages": 0}, "n_stages must be at least 1"),
        ({"n_genes": 5}, "n_genes must be at least 10"),
        ({"types_per_stage": 0}, "types_per_stage"),
        ({"n_novel_types": -1}, "n_novel_types"),
        ({"cells_per_type": 1}, "cells_per_type"),
        ({"batch_effect": -0.1}, "batch_effect"),
        ({"marker_fold": (1.0, 2.0)}, "marker_fold"),
        ({"marker_fold": (3.0, 2.0)}, "marker_fold"),
        ({"test_size": 0}, "test_size"),
    ],
)
def test_synthetic_stream_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_stream(**kwargs)

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

from scanpy_canal.pp import align_genes, normalize


@pytest.fixture
def counts():
    rng = np.random.default_rng(0)
    means = rng.lognormal(0.0, 1.5, size=300) * rng.lognormal(0.0, 0.3, size=(60, 1))
    counts = rng.poisson(means)
    counts[5] = 0  # an empty cell must stay zero
    return counts


def log2_cp10k(counts):
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.log2(1 + np.divide(counts * 1e4, totals, out=np.zeros_like(counts), where=totals > 0))


def dense(X):
    return X.toarray() if sparse.issparse(X) else np.asarray(X)


@pytest.fixture(scope="module")
def pbmc_raw():
    return sc.datasets.pbmc68k_reduced().raw.to_adata()


# --- normalize ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda c: c.astype(np.int64),
        lambda c: c.astype(np.float32),
        lambda c: sparse.csr_matrix(c, dtype=np.float64),
        lambda c: sparse.csr_matrix(c, dtype=np.int32),
        lambda c: sparse.csc_matrix(c, dtype=np.float32),
    ],
    ids=["dense-int", "dense-float", "csr-float", "csr-int", "csc-float"],
)
def test_normalize_counts(counts, make):
    X = make(counts)
    adata = ad.AnnData(X)
    assert normalize(adata) is None
    assert adata.uns["canal_normalize"] == {
        "detected": "counts",
        "rescaled": "per cell",
        "target_sum": 10000.0,
        "layer": None,
    }
    assert adata.X.dtype == np.float32
    assert sparse.issparse(adata.X) == sparse.issparse(X)
    if sparse.issparse(X):
        assert adata.X.format == "csr"
    np.testing.assert_allclose(dense(adata.X), log2_cp10k(counts), rtol=1e-6, atol=1e-5)
    assert not dense(adata.X)[5].any()


@pytest.mark.filterwarnings("ignore:Some cells have zero counts")
@pytest.mark.parametrize(
    ("base", "target_sum", "detected"),
    [(None, 1e4, "log1p"), (2, 1e4, "log2"), (None, 1e6, "log1p"), (2, None, "log2")],
)
@pytest.mark.parametrize("as_sparse", [True, False])
def test_normalize_detects_log1p_base(counts, base, target_sum, detected, as_sparse):
    adata = ad.AnnData(sparse.csr_matrix(counts, dtype=np.float32) if as_sparse else counts.astype(np.float32))
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata, base=base)
    normalize(adata)
    assert adata.uns["canal_normalize"]["detected"] == detected
    np.testing.assert_allclose(dense(adata.X), log2_cp10k(counts), atol=1e-4)


def test_normalize_pbmc68k_reduced_raw_is_natural_log(pbmc_raw):
    adata = normalize(pbmc_raw, copy=True)
    assert adata.uns["canal_normalize"]["detected"] == "log1p"
    assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    # .raw holds 765 genes of a 10,000-per-cell normalisation: values keep their scale, only the base changes.
    assert adata.uns["canal_normalize"]["rescaled"] == "kept"
    expected = np.log2(1 + np.expm1(dense(pbmc_raw.X).astype(np.float64)))
    np.testing.assert_allclose(dense(adata.X), expected, atol=1e-5)
    rescaled = normalize(pbmc_raw, target_sum=1e6, copy=True)
    np.testing.assert_allclose(dense(rescaled.X), np.log2(1 + np.expm1(dense(pbmc_raw.X)) / 100), atol=1e-5)
    again = normalize(adata, copy=True)
    np.testing.assert_allclose(dense(again.X), dense(adata.X), atol=1e-5)


def test_normalize_pbmc68k_reduced_scaled_x_is_refused():
    with pytest.raises(ValueError, match=r"negative values.*scaled or centred.*raw\.to_adata"):
        normalize(sc.datasets.pbmc68k_reduced())


def test_normalize_twice_is_a_no_op(counts):
    adata = ad.AnnData(sparse.csr_matrix(counts))
    normalize(adata)
    once = adata.X.copy()
    normalize(adata)
    assert adata.uns["canal_normalize"]["detected"] == "log2"
    np.testing.assert_allclose(dense(adata.X), dense(once), atol=1e-5)


def test_normalize_detects_on_a_subset_of_many_cells():
    rng = np.random.default_rng(1)
    adata = ad.AnnData(sparse.csr_matrix(rng.poisson(1.0, size=(2500, 20)), dtype=np.float32))
    expected = log2_cp10k(adata.X.toarray())
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    normalize(adata)
    assert adata.uns["canal_normalize"]["detected"] == "log1p"
    np.testing.assert_allclose(adata.X.toarray(), expected, atol=1e-4)


def test_normalize_copy_leaves_input_unchanged(counts):
    adata = ad.AnnData(counts.astype(np.float32))
    result = normalize(adata, copy=True)
    np.testing.assert_array_equal(adata.X, counts)
    assert "canal_normalize" not in adata.uns
    assert result.uns["canal_normalize"]["detected"] == "counts"
    np.testing.assert_allclose(result.X, log2_cp10k(counts), atol=1e-5)


def test_normalize_layer(counts):
    adata = ad.AnnData(-np.ones(counts.shape, dtype=np.float32), layers={"counts": sparse.csr_matrix(counts)})
    normalize(adata, layer="counts")
    assert adata.uns["canal_normalize"] == {
        "detected": "counts",
        "rescaled": "per cell",
        "target_sum": 10000.0,
        "layer": "counts",
    }
    np.testing.assert_allclose(dense(adata.X), log2_cp10k(counts), atol=1e-5)
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), counts)


def test_normalize_view(counts):
    parent = ad.AnnData(counts.astype(np.float32))
    view = parent[10:20]
    normalize(view)
    assert not view.is_view
    np.testing.assert_allclose(view.X, log2_cp10k(counts[10:20]), atol=1e-5)
    np.testing.assert_array_equal(parent.X, counts)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_normalize_empty(shape):
    with pytest.raises(ValueError, match="empty"):
        normalize(ad.AnnData(np.zeros(shape, dtype=np.float32)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_normalize_non_finite(counts, bad):
    X = counts.astype(np.float32)
    X[0, :3] = bad
    with pytest.raises(ValueError, match="3 NaN or infinite"):
        normalize(ad.AnnData(X))


def test_normalize_neither_counts_nor_log1p():
    X = np.random.default_rng(0).uniform(0.1, 5.0, size=(30, 40)).astype(np.float32)
    with pytest.raises(ValueError, match="neither raw counts"):
        normalize(ad.AnnData(X))


# --- align_genes -------------------------------------------------------------------------------------------------


@pytest.fixture
def small():
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    obs = pd.DataFrame({"cell_type": ["a", "b", "a"]}, index=["c0", "c1", "c2"])
    var = pd.DataFrame({"symbol": ["A", "B", "C", "D"]}, index=["ENSG0", "ENSG1", "ENSG2", "ENSG3"])
    return ad.AnnData(sparse.csr_matrix(X), obs=obs, var=var)


def expected_columns(small, columns):
    X = small.X.toarray()
    return np.column_stack([X[:, c] if c is not None else np.zeros(small.n_obs) for c in columns])


@pytest.mark.parametrize("as_sparse", [True, False])
def test_align_genes_order_and_missing(small, as_sparse, caplog):
    adata = ad.AnnData(small.X if as_sparse else small.X.toarray(), obs=small.obs, var=small.var)
    adata.var_names = ["A", "B", "C", "D"]
    before = adata.copy()
    with caplog.at_level(logging.INFO, logger="scanpy_canal"):
        aligned = align_genes(adata, ["D", "X", "A", "Y"])
    assert aligned.var_names.tolist() == ["D", "X", "A", "Y"]
    assert sparse.isspmatrix_csr(aligned.X) and aligned.X.dtype == np.float32
    np.testing.assert_array_equal(aligned.X.toarray(), expected_columns(small, [3, None, 0, None]))
    assert aligned.var["canal_found"].tolist() == [True, False, True, False]
    assert aligned.uns["canal_align_genes"] == {"n_found": 2, "n_genes": 4}
    assert "2 of 4 genes found (50.0%)" in caplog.text
    pd.testing.assert_frame_equal(aligned.obs, adata.obs)
    aligned.obs["cell_type"] = "z"
    aligned.X.data[:] = -1
    np.testing.assert_array_equal(dense(adata.X), dense(before.X))
    pd.testing.assert_frame_equal(adata.obs, before.obs)


def test_align_genes_layer(small):
    small.layers["counts"] = small.X * 2
    aligned = align_genes(small, ["C"], gene_symbols="symbol", layer="counts")
    np.testing.assert_array_equal(aligned.X.toarray(), 2 * expected_columns(small, [2]))


def test_align_genes_gene_symbols(small):
    small.var.loc["ENSG1", "symbol"] = np.nan
    aligned = align_genes(small, ["B", "C", "A"], gene_symbols="symbol")
    np.testing.assert_array_equal(aligned.X.toarray(), expected_columns(small, [None, 2, 0]))
    with pytest.raises(KeyError, match="'gene_name' is not a column"):
        align_genes(small, ["A"], gene_symbols="gene_name")


def test_align_genes_duplicated_input_names(small):
    small.var["symbol"] = ["A", "B", "A", "B"]
    with pytest.warns(UserWarning, match="2 genes have a duplicated name"):
        aligned = align_genes(small, ["B", "A"], gene_symbols="symbol")
    np.testing.assert_array_equal(aligned.X.toarray(), expected_columns(small, [1, 0]))


def test_align_genes_duplicated_panel(small):
    with pytest.raises(ValueError, match="1 duplicated names, e.g. A"):
        align_genes(small, ["A", "B", "A"], gene_symbols="symbol")


def test_align_genes_no_overlap(small):
    with pytest.raises(ValueError, match=r"None of the 2.*Requested: X, Y.*ENSG0, ENSG1.*gene_symbols"):
        align_genes(small, ["X", "Y"])


def test_align_genes_empty_panel(small):
    with pytest.raises(ValueError, match="empty"):
        align_genes(small, [])


def test_one_gene_matcher_first_occurrence_wins_and_missing_names_match_nothing():
    from scanpy_canal.pp import first_occurrences, gene_positions

    names = ["A", None, "B", "A", "C"]
    np.testing.assert_array_equal(first_occurrences(names), [True, False, True, False, True])
    np.testing.assert_array_equal(gene_positions(names, ["C", "A", "Z", "B"]), [4, 0, -1, 2])


def test_align_genes_blank_symbols_match_nothing(small):
    small.var["symbol"] = ["A", " ", "", "D"]
    aligned = align_genes(small, ["A", "D", ""], gene_symbols="symbol")
    assert aligned.var["canal_found"].tolist() == [True, True, False]
    np.testing.assert_array_equal(aligned.X.toarray()[:, 2], 0)

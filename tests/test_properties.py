"""Property-based tests (hypothesis) for tokenize, align_genes and the example bank."""

import math
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import sparse

from scanpy_canal.model._bank import trim_to_quota, update_bank
from scanpy_canal.nn import tokenize
from scanpy_canal.pp import align_genes

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------------------------------
# tokenize
# ---------------------------------------------------------------------------------------------------------------------

#: Non-negative values up to ~20 with many exact integers and values just below or above an integer.
expression = st.one_of(
    st.just(0.0),
    st.integers(0, 20).map(float),
    st.integers(1, 20).map(lambda k: k - 1e-6),
    st.integers(1, 20).map(lambda k: float(np.nextafter(k, 0))),
    st.integers(0, 20).map(lambda k: float(np.nextafter(k, 21))),
    st.floats(0, 20, allow_nan=False, allow_infinity=False),
)

matrices = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=6),
    elements=expression,
)


def expected_tokens(x: np.ndarray, n_bins: int) -> np.ndarray:
    tokens = np.zeros((x.shape[0], x.shape[1] + 1), dtype=np.int64)
    for (i, j), v in np.ndenumerate(x):
        tokens[i, j] = min(max(math.floor(v), 0), n_bins)
    return tokens


@SETTINGS
@given(x=matrices, n_bins=st.one_of(st.just(None), st.integers(1, 8)))
def test_tokenize_bins_every_value(x, n_bins):
    kwargs = {} if n_bins is None else {"n_bins": n_bins}
    bins = 5 if n_bins is None else n_bins
    tokens = tokenize(x, **kwargs)
    assert tokens.dtype == torch.long
    assert tuple(tokens.shape) == (x.shape[0], x.shape[1] + 1)
    out = tokens.numpy()
    assert (out[:, -1] == 0).all()
    assert ((out >= 0) & (out <= bins)).all()
    np.testing.assert_array_equal(out, expected_tokens(x, bins))


@SETTINGS
@given(x=matrices, n_bins=st.integers(1, 8))
def test_tokenize_same_tokens_for_every_input_type(x, n_bins):
    reference = tokenize(x, n_bins=n_bins)
    inputs = {
        "csr_matrix": sparse.csr_matrix(x),
        "csc_matrix": sparse.csc_matrix(x),
        "csr_array": sparse.csr_array(x),
        "csc_array": sparse.csc_array(x),
        "tensor_float64": torch.from_numpy(x.copy()),
    }
    for name, value in inputs.items():
        tokens = tokenize(value, n_bins=n_bins)
        assert tokens.dtype == torch.long, name
        assert tokens.device.type == "cpu", name
        assert torch.equal(tokens, reference), name


@SETTINGS
@given(
    x=matrices.filter(lambda a: a.size > 0),
    zero_mask_seed=st.integers(0, 2**32 - 1),
    fmt=st.sampled_from(["csr", "csc"]),
)
def test_tokenize_sparse_with_explicit_zeros_matches_dense(x, zero_mask_seed, fmt):
    rng = np.random.default_rng(zero_mask_seed)
    stored = (x != 0) | (rng.random(x.shape) < 0.5)
    rows, cols = np.nonzero(stored)
    coo = sparse.coo_matrix((x[rows, cols], (rows, cols)), shape=x.shape)
    matrix = coo.tocsr() if fmt == "csr" else coo.tocsc()
    assert matrix.nnz == stored.sum()  # explicit zeros really are stored
    assert torch.equal(tokenize(matrix), tokenize(x))


@SETTINGS
@example(values=[0.6, 0.6])
@given(values=st.lists(st.floats(0, 3, allow_nan=False), min_size=2, max_size=4))
def test_tokenize_non_canonical_csr_matches_dense(values):
    # All entries are stored at position (0, 0) of a 1 x 2 CSR matrix: scipy treats them as a sum.
    matrix = sparse.csr_matrix(
        (np.asarray(values), np.zeros(len(values), dtype=np.int32), np.array([0, len(values)])), shape=(1, 2)
    )
    assert not matrix.has_canonical_format
    assert torch.equal(tokenize(matrix), tokenize(matrix.toarray()))


# ---------------------------------------------------------------------------------------------------------------------
# align_genes
# ---------------------------------------------------------------------------------------------------------------------

SOURCE_POOL = [f"g{i}" for i in range(8)]
MISSING_POOL = [f"m{i}" for i in range(4)]
#: Values exactly representable in float32, with plenty of zeros.
cell_values = st.sampled_from([0.0, 0.0, 0.0, 1.0, 2.5, 3.0, 7.25, 100.0])


def _as_format(values: np.ndarray, fmt: str):
    return {"dense": values, "csr": sparse.csr_matrix(values), "csc": sparse.csc_matrix(values)}[fmt]


def _dense(x) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


@st.composite
def alignment_cases(draw):
    names = draw(st.lists(st.sampled_from(SOURCE_POOL), min_size=1, max_size=8))
    target = draw(st.lists(st.sampled_from(SOURCE_POOL + MISSING_POOL), unique=True, min_size=1, max_size=8))
    if not set(target) & set(names):  # guarantee some overlap
        target.insert(draw(st.integers(0, len(target))), draw(st.sampled_from(names)))
        target = list(dict.fromkeys(target))
    n_obs = draw(st.integers(0, 5))
    values = draw(hnp.arrays(np.float64, (n_obs, len(names)), elements=cell_values))
    fmt = draw(st.sampled_from(["dense", "csr", "csc"]))
    use_symbols = draw(st.booleans())
    use_layer = draw(st.booleans())
    return names, target, values, fmt, use_symbols, use_layer


def _make_source(names, values, fmt, use_symbols, use_layer) -> ad.AnnData:
    obs = pd.DataFrame(
        {"batch": [f"b{i % 2}" for i in range(values.shape[0])]}, index=[f"cell{i}" for i in range(values.shape[0])]
    )
    if use_symbols:
        var = pd.DataFrame({"symbol": names}, index=[f"ENSG{j:03d}" for j in range(len(names))])
    else:
        var = pd.DataFrame(index=names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-unique var_names
        if use_layer:
            adata = ad.AnnData(X=_as_format(values * 10 + 1, fmt), obs=obs, var=var)
            adata.layers["counts"] = _as_format(values, fmt)
        else:
            adata = ad.AnnData(X=_as_format(values, fmt), obs=obs, var=var)
    return adata


@SETTINGS
@given(case=alignment_cases())
def test_align_genes_properties(case):
    names, target, values, fmt, use_symbols, use_layer = case
    adata = _make_source(names, values, fmt, use_symbols, use_layer)
    before_x, before_layers = _dense(adata.X).copy(), {k: _dense(v).copy() for k, v in adata.layers.items()}
    before_var_names, before_obs, before_var = adata.var_names.copy(), adata.obs.copy(), adata.var.copy()
    x_type = type(adata.X)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aligned = align_genes(
            adata, target, gene_symbols="symbol" if use_symbols else None, layer="counts" if use_layer else None
        )
    has_duplicates = len(set(names)) < len(names)
    warned = any("duplicated name" in str(w.message) for w in caught)
    assert warned == has_duplicates

    # Shape, names and obs.
    assert aligned.var_names.tolist() == target
    assert aligned.n_obs == adata.n_obs
    assert aligned.obs_names.tolist() == adata.obs_names.tolist()
    pd.testing.assert_frame_equal(aligned.obs, before_obs)

    # CSR float32.
    assert sparse.issparse(aligned.X) and aligned.X.format == "csr"
    assert aligned.X.dtype == np.float32

    # Columns: first occurrence of each found gene, zeros for the missing ones.
    out = aligned.X.toarray()
    source = values.astype(np.float32)
    found = []
    for j, gene in enumerate(target):
        if gene in names:
            found.append(True)
            np.testing.assert_array_equal(out[:, j], source[:, names.index(gene)])
        else:
            found.append(False)
            assert not out[:, j].any()
    assert aligned.var["canal_found"].tolist() == found
    assert aligned.uns["canal_align_genes"] == {"n_found": sum(found), "n_genes": len(target)}

    # The input is untouched.
    assert type(adata.X) is x_type
    np.testing.assert_array_equal(_dense(adata.X), before_x)
    for key, layer in before_layers.items():
        np.testing.assert_array_equal(_dense(adata.layers[key]), layer)
    assert adata.var_names.equals(before_var_names)
    pd.testing.assert_frame_equal(adata.obs, before_obs)
    pd.testing.assert_frame_equal(adata.var, before_var)


@SETTINGS
@given(
    names=st.lists(st.sampled_from(SOURCE_POOL), min_size=1, max_size=6),
    target=st.lists(st.sampled_from(MISSING_POOL), unique=True, min_size=1, max_size=4),
    use_symbols=st.booleans(),
)
def test_align_genes_without_overlap_raises(names, target, use_symbols):
    adata = _make_source(names, np.ones((2, len(names))), "csr", use_symbols, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="None of the"):
            align_genes(adata, target, gene_symbols="symbol" if use_symbols else None)


@SETTINGS
@given(
    names=st.lists(st.sampled_from(SOURCE_POOL), min_size=1, max_size=6),
    target=st.lists(st.sampled_from(SOURCE_POOL + MISSING_POOL), min_size=1, max_size=6),
    data=st.data(),
)
def test_align_genes_duplicated_panel_raises(names, target, data):
    duplicate = data.draw(st.sampled_from(target))
    target = target.copy()
    target.insert(data.draw(st.integers(0, len(target))), duplicate)
    adata = _make_source(names, np.ones((2, len(names))), "dense", False, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="duplicated"):
            align_genes(adata, target)


# ---------------------------------------------------------------------------------------------------------------------
# example bank
# ---------------------------------------------------------------------------------------------------------------------

EMBEDDING_DIM = 4
N_GENES = 3
finite = st.floats(-5, 5, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def bank_streams(draw, min_cells: int = 0):
    """1-3 stages: per stage its cell types (growing), labels, embeddings, prototypes, X and bank size."""
    n_stages = draw(st.integers(1, 3))
    cell_types: list[str] = []
    stages = []
    for t in range(n_stages):
        n_new = draw(st.integers(1 if t == 0 else 0, 3))
        cell_types = cell_types + [f"T{len(cell_types) + k}" for k in range(n_new)]
        n = draw(st.integers(min_cells, 12))
        labels = draw(st.lists(st.sampled_from(cell_types), min_size=n, max_size=n))
        embedding = draw(hnp.arrays(np.float64, (n, EMBEDDING_DIM), elements=finite))
        prototypes = draw(hnp.arrays(np.float64, (len(cell_types), EMBEDDING_DIM), elements=finite))
        X = draw(hnp.arrays(np.float32, (n, N_GENES), elements=st.integers(0, 9).map(float)))
        size = draw(st.integers(1, 60))
        stages.append(
            {"cell_types": list(cell_types), "labels": labels, "embedding": embedding, "prototypes": prototypes}
            | {"X": X, "size": size}
        )
    return stages


def _stage_data(t: int, X: np.ndarray) -> ad.AnnData:
    return ad.AnnData(X=X.copy(), obs=pd.DataFrame(index=[f"s{t}_c{i}" for i in range(X.shape[0])]))


def _run_bank(stages):
    """Yield (t, stage, old bank, new bank, stage data) for every stage."""
    bank = None
    for t, stage in enumerate(stages):
        data = _stage_data(t, stage["X"])
        new = update_bank(
            bank,
            data,
            stage["labels"],
            stage["embedding"],
            stage["prototypes"],
            stage["cell_types"],
            stage=t,
            size=stage["size"],
        )
        yield t, stage, bank, new, data
        bank = new


@SETTINGS
@given(stages=bank_streams())
def test_update_bank_properties(stages):
    rows = {}  # obs name -> X row, over all stages
    for t, stage, old, bank, data in _run_bank(stages):
        cell_types, labels, size = stage["cell_types"], np.asarray(stage["labels"], dtype=object), stage["size"]
        rows.update(zip(data.obs_names, stage["X"], strict=True))
        quota = size // len(cell_types)
        obs = bank.obs

        # Capacity: every type within its quota, hence the bank within L.
        counts = obs["cell_type"].astype(str).value_counts()
        assert (counts <= quota).all()
        assert bank.n_obs <= quota * len(cell_types) <= size
        if quota == 0:
            assert bank.n_obs == 0

        # Names, labels, stages, ranks.
        assert bank.obs_names.is_unique
        old_names = set() if old is None else set(old.obs_names)
        assert set(bank.obs_names) <= old_names | set(data.obs_names)
        assert set(obs["cell_type"].astype(str)) <= set(cell_types)
        assert isinstance(obs["cell_type"].dtype, pd.CategoricalDtype)
        categories = list(obs["cell_type"].cat.categories)
        assert categories == [c for c in cell_types if c in categories]  # in cell_types order
        assert obs["rank"].dtype == np.int64 and obs["stage"].dtype == np.int64
        assert (obs["rank"] >= 1).all()
        assert (obs["stage"] <= t).all() and (obs["stage"] >= 0).all()
        assert (obs["stage"].to_numpy() == t).tolist() == [name.startswith(f"s{t}_") for name in bank.obs_names]
        assert bank.n_vars == N_GENES
        for name, row in zip(bank.obs_names, _dense(bank.X), strict=True):
            np.testing.assert_array_equal(row, rows[name])
        # Cells kept from an older bank keep their annotations.
        if old is not None:
            kept = [name for name in bank.obs_names if name in old_names]
            pd.testing.assert_frame_equal(
                obs.loc[kept, ["stage", "rank"]], old.obs.loc[kept, ["stage", "rank"]], check_dtype=False
            )
            assert (obs.loc[kept, "cell_type"].astype(str) == old.obs.loc[kept, "cell_type"].astype(str)).all()

        # The stage's examples of each type: its best-matching cells by dot product with the type's prototype.
        old_types = set() if old is None else set(old.obs["cell_type"].astype(str))
        current = obs[obs["stage"] == t]
        position = {name: i for i, name in enumerate(data.obs_names)}
        for cell_type in pd.unique(labels):
            members = np.flatnonzero(labels == cell_type)
            similarity = stage["embedding"][members] @ stage["prototypes"][cell_types.index(cell_type)]
            mine = current[current["cell_type"].astype(str) == cell_type]
            chosen = np.isin(members, [position[name] for name in mine.index])
            assert (mine["stage"] == t).all()
            if cell_type not in old_types:
                assert chosen.sum() == min(quota, len(members))
            # Top-k, robust to ties: no unchosen cell is more similar than a chosen one.
            if chosen.any() and not chosen.all():
                assert similarity[chosen].min() >= similarity[~chosen].max()
            if len(np.unique(similarity)) == len(similarity):
                top = set(members[np.argsort(-similarity)[: chosen.sum()]])
                assert top == {position[name] for name in mine.index}
                # Ranks follow the similarity order and start at 1.
                by_rank = mine.sort_values("rank")
                assert by_rank["rank"].tolist() == list(range(1, len(mine) + 1))
                sims = [similarity[np.flatnonzero(members == position[name])[0]] for name in by_rank.index]
                assert sims == sorted(sims, reverse=True)


@SETTINGS
@example(
    stages=[
        {
            "cell_types": ["T0", "T1"],
            "labels": ["T0"],
            "embedding": np.zeros((1, EMBEDDING_DIM)),
            "prototypes": np.zeros((2, EMBEDDING_DIM)),
            "X": np.zeros((1, N_GENES), dtype=np.float32),
            "size": 2,
        }
    ]
)
@given(stages=bank_streams())
def test_update_bank_categories_are_all_cell_types(stages):
    for _, stage, _, bank, _ in _run_bank(stages):
        assert list(bank.obs["cell_type"].cat.categories) == stage["cell_types"]


@SETTINGS
@given(
    ranks_per_type=st.lists(st.lists(st.integers(1, 8), min_size=0, max_size=10), min_size=1, max_size=4),
    quota=st.integers(0, 8),
)
def test_trim_to_quota(ranks_per_type, quota):
    cell_type = [f"T{i}" for i, ranks in enumerate(ranks_per_type) for _ in ranks]
    ranks = [r for ranks in ranks_per_type for r in ranks]
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(cell_type, categories=[f"T{i}" for i in range(len(ranks_per_type))])}
        | {"rank": np.asarray(ranks, dtype=np.int64)}
    )
    keep = trim_to_quota(obs, quota)
    assert keep.dtype == bool and keep.shape == (len(obs),)
    for name, group in obs.groupby("cell_type", observed=True):
        mask = keep[obs["cell_type"].to_numpy() == name]
        group_ranks = group["rank"].to_numpy()
        if len(group) <= quota:
            assert mask.all()  # types within the quota are untouched
            continue
        assert mask.sum() <= quota
        # Kept rows are the best-ranked: every kept rank is below every dropped rank.
        if mask.any():
            assert group_ranks[mask].max() < group_ranks[~mask].min()
        # Only ties at the cutoff can drop more than the excess.
        excess = len(group) - quota
        cutoff = np.sort(group_ranks)[::-1][excess - 1]
        assert mask.sum() == (group_ranks < cutoff).sum()

"""Novel-cell detection: conformal p-values, the calibration cells behind them, and the novelty scores."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import QUIET, make_model, register
from scipy import sparse, stats

import scanpy_canal as canal
from scanpy_canal.model._conformal import (
    MONDRIAN_MIN_CELLS,
    conformal_pvalues,
    mondrian_groups,
    score_thresholds,
    update_calibration_cells,
)
from scanpy_canal.model._input_space import InputReference
from scanpy_canal.model._scores import SCORES, ScoreReference


def test_conformal_rejection_of_known_cells_is_at_most_alpha():
    """Known cells exchangeable with the calibration cells are rejected at rate alpha or less, per group of types too.

    A rare type whose scores run above the common types' is judged with the next smallest type, not by every
    calibration cell: judged by all of them it would be rejected nearly wholesale (about 9% of the known cells
    unassigned at alpha 0.05 here). Repeated over fresh calibration sets, the rejection rate's spread is that of the
    binomial draw of the known cells plus that of the calibration set's own quantile.
    """
    rng = np.random.default_rng(0)
    n_repeats, n_calibration, n_known, alpha = 100, 600, 600, 0.05
    shares, shifts = [0.5, 0.3, 0.05, 0.15], np.array([0.0, 3.0, 6.0, 1.0])  # common, hard, rare (high), medium

    def cells(n):
        predicted = rng.choice(4, size=n, p=shares)
        return torch.as_tensor(rng.normal(size=n) + shifts[predicted]), torch.as_tensor(predicted)

    rejected, pooled_types, hard = [], [], []
    for _ in range(n_repeats):
        calibration, (scores, predicted) = cells(n_calibration), cells(n_known)
        unassigned = (conformal_pvalues(scores, predicted, *calibration, n_types=4) <= alpha).numpy()
        pooled, per_type = score_thresholds(*calibration, alpha, n_types=4)
        threshold = torch.tensor([per_type.get(int(c), pooled) for c in predicted])
        np.testing.assert_array_equal(unassigned, (scores > threshold).numpy())
        rejected.append(unassigned)
        pooled_types.append(unassigned[np.isin(predicted.numpy(), [2, 3])])
        hard.append(unassigned[predicted.numpy() == 1])
    assert set(per_type) == {0, 1} and per_type[1] > per_type[0] + 2  # the hard type has its own threshold
    smallest_group = 0.2 * n_calibration
    spread = np.sqrt(alpha * (1 - alpha) * (1 / (n_repeats * n_known) + 1 / (n_repeats * smallest_group)))
    rate = np.concatenate(rejected).mean()
    assert alpha - 0.01 <= rate <= alpha + 3 * spread
    assert np.concatenate(pooled_types).mean() <= alpha + 3 * spread / np.sqrt(0.2)  # the rare type's group too
    assert np.concatenate(hard).mean() <= alpha + 3 * spread / np.sqrt(0.3)  # not rejected wholesale


@pytest.mark.parametrize(
    ("counts", "groups"),
    [
        ([120, 10, 0, 60, 45], [[1, 2, 4], [0], [3]]),  # the small types together: 55 cells
        ([120, 10, 60], [[1, 2], [0]]),  # 10 cells alone are too few: the next smallest joins
        ([120, 80], [[0], [1]]),  # every type its own
        ([20, 10], [[0, 1]]),  # too few calibration cells: one group
    ],
)
def test_mondrian_groups_pool_the_types_with_few_calibration_cells(counts, groups):
    predicted = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    found = [sorted(group.tolist()) for group in mondrian_groups(predicted, len(counts))]
    assert sorted(found) == sorted(groups)


def test_rare_types_are_grouped_by_their_scale_when_they_can_form_several_groups():
    """Eight rare types, half of them scoring higher: judged in one group the high ones lose far more than `alpha`
    of their cells; grouped by a scale that the calibration cells do not choose, each type stays near `alpha`."""
    rng = np.random.default_rng(2)
    n_types, n_repeats, alpha = 8, 200, 0.05
    shifts = np.repeat([0.0, 3.0], 4)
    scale = torch.as_tensor(shifts + rng.normal(scale=0.1, size=n_types))  # e.g. the median score of the bank's cells

    def cells(per_type):
        predicted = np.repeat(np.arange(n_types), per_type)
        return torch.as_tensor(rng.normal(size=len(predicted)) + shifts[predicted]), torch.as_tensor(predicted)

    by_scale, pooled = np.zeros(n_types), np.zeros(n_types)
    for _ in range(n_repeats):
        calibration, (scores, predicted) = cells(30), cells(100)  # 30 calibration cells a type: all rare
        for rejected, type_scale in ((by_scale, scale), (pooled, None)):
            unassigned = conformal_pvalues(scores, predicted, *calibration, n_types, type_scale) <= alpha
            rejected += np.bincount(predicted.numpy()[unassigned.numpy()], minlength=n_types) / 100 / n_repeats
    groups = mondrian_groups(cells(30)[1], n_types, scale)
    assert sorted(len(group) for group in groups) == [2, 2, 2, 2]
    assert all(set(group.tolist()) <= {0, 1, 2, 3} or set(group.tolist()) <= {4, 5, 6, 7} for group in groups)
    spread = np.sqrt(alpha * (1 - alpha) * (1 / (n_repeats * 100) + 1 / (n_repeats * 60)))
    assert by_scale.max() <= alpha + 4 * spread
    assert pooled[4:].min() > 1.5 * alpha and pooled[:4].max() < alpha / 2  # one group: the high types pay twice


def test_pvalues_are_uniform_on_calibration_like_cells_and_in_unit_interval():
    rng = np.random.default_rng(1)
    calibration = torch.as_tensor(rng.gamma(2.0, size=MONDRIAN_MIN_CELLS * 20))
    fresh = torch.as_tensor(rng.gamma(2.0, size=5000))
    pvalues = conformal_pvalues(fresh, torch.zeros(5000), calibration, torch.zeros(len(calibration)), 1).numpy()
    assert pvalues.min() > 0 and pvalues.max() <= 1
    assert stats.kstest(pvalues, "uniform").pvalue > 0.001
    novel = conformal_pvalues(fresh + 10, torch.zeros(5000), calibration, torch.zeros(len(calibration)), 1).numpy()
    assert np.allclose(novel, 1 / (len(calibration) + 1))


def test_calibration_cells_are_class_balanced_across_stages():
    genes = [f"g{i}" for i in range(3)]
    make = lambda n, stage: ad.AnnData(
        sparse.csr_matrix(np.full((n, 3), stage, dtype=np.float32)),
        obs=pd.DataFrame(index=[f"s{stage}_{i}" for i in range(n)]),
        var=pd.DataFrame(index=genes),
    )
    first = update_calibration_cells(None, make(30, 1), ["a"] * 20 + ["b"] * 10, ["a", "b"], stage=1, size=40, seed=0)
    assert first.obs["cell_type"].value_counts().to_dict() == {"a": 20, "b": 10}
    second = update_calibration_cells(
        first, make(30, 2), ["a"] * 30, ["a", "b", "c"], stage=2, size=30, seed=0
    )  # quota 10 per type
    counts = second.obs.groupby(["cell_type", "stage"], observed=True).size().to_dict()
    assert counts == {("a", 1): 5, ("a", 2): 5, ("b", 1): 10}
    assert list(second.obs["cell_type"].cat.categories) == ["a", "b", "c"]
    assert update_calibration_cells(first, make(3, 2), ["a"] * 3, ["a", "b"], stage=2, size=0, seed=0) is None


@pytest.mark.parametrize("kind", SCORES)
def test_every_score_ranks_shifted_cells_as_more_novel(kind):
    generator = torch.Generator().manual_seed(0)
    bank = torch.rand(200, 8, generator=generator) + torch.arange(2).repeat(100)[:, None] * 3
    codes = torch.arange(2).repeat(100)
    logits = torch.randn(50, 2, generator=generator) * 0.1 + torch.tensor([6.0, 0.0])
    expression = bank.numpy() * 0.5  # the input space: here, cells of 8 genes
    space = InputReference.fit(expression, expression, seed=0)
    reference = ScoreReference.build(logits, 0.8, bank, codes, space)
    known = reference.score(kind, logits, bank[:100:2], 0.8, space.project(expression[1:100:2]))
    elsewhere = torch.zeros(50, 8)
    elsewhere[:, 0] = 5.0  # a direction no bank cell has
    unsure = reference.score(kind, logits * 0.05, elsewhere, 0.8, space.project(elsewhere.numpy()))
    assert known.shape == (50,) and unsure.shape == (50,) and torch.isfinite(known).all()
    assert unsure.mean() > known.mean()


def test_stage_keeps_calibration_cells_apart_from_training_and_bank(two_stage_model, small_stream):
    calibration, bank = two_stage_model.calibration_cells_, two_stage_model.example_bank
    assert calibration is not None and calibration.var_names.tolist() == two_stage_model.genes
    assert not set(calibration.obs_names) & set(bank.obs_names)
    assert sorted(calibration.obs["stage"].unique()) == [1, 2]  # every stage, not only the last
    assert set(calibration.obs["cell_type"].astype(str)) == set(two_stage_model.cell_types)
    assert calibration.obsm["manifold"].shape == (calibration.n_obs, 128)
    record = two_stage_model.stage_history_[-1]
    assert record["calibration_cells"] == calibration.n_obs and record["calibration_bytes"] > 0


@pytest.mark.parametrize("keep_epoch", ["best", "last"])
def test_calibration_cells_are_never_trained_on(small_stream, keep_epoch):
    model = make_model(small_stream)
    model.train(max_epochs=2, keep_epoch=keep_epoch, **QUIET)
    stage_cells = small_stream.train[0].obs_names
    validation = set(stage_cells[model.validation_indices[model.validation_indices < len(stage_cells)]])
    calibration = set(model.calibration_cells_.obs_names)
    if keep_epoch == "best":  # the validation cells chose the best epoch: the others calibrate
        assert calibration <= set(stage_cells[model.test_indices]) and not calibration & validation
        assert validation and len(calibration) >= len(validation)
    else:  # nothing is chosen on the held-out cells: every one calibrates
        assert calibration == validation and len(model.test_indices) == 0
    first = model.input_reference_
    model.train(register(small_stream.train[1]), max_epochs=2, keep_epoch=keep_epoch, **QUIET)
    n_stage = small_stream.train[1].n_obs
    trained = [small_stream.train[1].obs_names[i] for i in model.train_indices if i < n_stage]
    assert not set(model.calibration_cells_.obs_names) & set(trained)
    # The input space is refitted with the stage, and its reference cells are the new bank's.
    space = model.input_reference_
    assert not torch.equal(space.mean, first.mean) and space.cells.shape[0] == model.example_bank.n_obs
    torch.testing.assert_close(space.cells, space.project(model.example_bank.X))
    manifold = model._forward(model.calibration_cells_.X)["manifold"].numpy()
    np.testing.assert_allclose(model.calibration_cells_.obsm["manifold"], manifold, atol=1e-5)  # current network


def test_conformal_predictions_and_pvalues(two_stage_model, small_stream):
    known = ad.concat(small_stream.test)
    query = ad.concat([known, small_stream.novel])
    novelty = two_stage_model.get_novelty(query)
    columns = ["prediction", "score", "pvalue", "input_score", "input_pvalue"]  # the default: the input score
    assert list(novelty.columns) == columns and novelty.index.equals(query.obs_names)
    np.testing.assert_array_equal(novelty["pvalue"], novelty["input_pvalue"])
    fused = two_stage_model.get_novelty(query, score=("input", "energy"))
    np.testing.assert_allclose(
        fused["pvalue"], np.minimum(1, 2 * fused[["input_pvalue", "energy_pvalue"]].min(axis=1)), rtol=1e-6
    )
    assert novelty["pvalue"].between(0, 1).all()
    for alpha in (0.05, 0.2):
        labels = two_stage_model.predict(query, novel=True, alpha=alpha)
        np.testing.assert_array_equal(labels == "Unassigned", novelty["pvalue"].to_numpy() <= alpha)
    is_novel = query.obs["cell_type"].isin(small_stream.novel_types).to_numpy()
    assert novelty["pvalue"][is_novel].median() < novelty["pvalue"][~is_novel].median()
    alone = np.concatenate([two_stage_model.predict(query[i : i + 1], novel=True) for i in range(0, query.n_obs, 9)])
    np.testing.assert_array_equal(alone, two_stage_model.predict(query, novel=True)[::9])


def test_every_score_and_rule_runs(two_stage_model, small_stream):
    query = ad.concat([*small_stream.test, small_stream.novel])
    for score in SCORES:
        labels = two_stage_model.predict(query, novel=True, score=score)
        assert set(labels) <= {*two_stage_model.cell_types, "Unassigned"}
    for threshold in ("calibrated", "canal", 0.5):
        assert len(two_stage_model.predict(query, novel=True, threshold=threshold)) == query.n_obs
    with pytest.raises(ValueError, match="rule of the 'mix' score"):
        two_stage_model.predict(query, novel=True, threshold="calibrated", score="knn")
    with pytest.raises(ValueError, match="score must be one of"):
        two_stage_model.predict(query, novel=True, score="entropy")


def test_the_default_score_follows_the_rule(two_stage_model, small_stream):
    query = ad.concat([*small_stream.test, small_stream.novel])
    canal.tl.annotate(query, two_stage_model, novel=True)
    assert query.uns["canal"]["params"]["score"] == "input"
    np.testing.assert_allclose(
        query.obs["canal_novelty_score"], two_stage_model.get_novelty(query, score="input")["score"], rtol=1e-6
    )
    canal.tl.annotate(query, two_stage_model, novel=True, score=["input", "energy"])
    assert list(query.uns["canal"]["params"]["score"]) == ["input", "energy"]
    fused = two_stage_model.get_novelty(query, score=["input", "energy"])
    np.testing.assert_allclose(query.obs["canal_novelty_score"], 1 - fused["pvalue"], rtol=1e-6)
    # The other rules keep the score whose scale they were made for.
    canal.tl.annotate(query, two_stage_model, novel=True, threshold="calibrated")
    assert query.uns["canal"]["params"]["score"] == "mix"
    assert query.obs["canal_novelty_score"].between(0, 1).all()


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, "0.05", True, float("nan"), None])
def test_bad_alpha_is_a_clear_error(two_stage_model, small_stream, alpha):
    with pytest.raises(ValueError, match="alpha must be a number strictly between 0 and 1"):
        two_stage_model.predict(small_stream.test[0], novel=True, alpha=alpha)


def test_annotate_writes_pvalues_and_unassign_applies_another_alpha(two_stage_model, small_stream, tmp_path):
    query = ad.concat([*small_stream.test, small_stream.novel])
    canal.tl.annotate(query, two_stage_model, novel=True)
    pvalues = query.obs["canal_novelty_pvalue"].to_numpy()
    assert ((pvalues > 0) & (pvalues <= 1)).all()
    assert query.uns["canal"]["params"]["alpha"] == 0.05 and len(query.uns["canal"]["type_thresholds"]) == len(
        two_stage_model.cell_types
    )
    query.write_h5ad(tmp_path / "annotated.h5ad")  # every key written is storable (type names with slashes too)
    canal.tl.unassign(query, alpha=0.2)
    np.testing.assert_array_equal(query.obs["canal_prediction"].to_numpy() == "Unassigned", pvalues <= 0.2)
    np.testing.assert_array_equal(
        query.obs["canal_prediction"].astype(str), two_stage_model.predict(query, novel=True, alpha=0.2)
    )
    with pytest.raises(ValueError, match="alpha must be"):
        canal.tl.unassign(query, alpha=1.0)


def test_calibration_cells_survive_save_and_load(two_stage_model, small_stream, tmp_path):
    two_stage_model.save(tmp_path / "model")
    loaded = canal.CANAL.load(tmp_path / "model")
    original = two_stage_model.calibration_cells_
    assert loaded.calibration_cells_.obs.equals(original.obs)
    assert (loaded.calibration_cells_.X != original.X).nnz == 0
    np.testing.assert_array_equal(loaded.calibration_cells_.obsm["manifold"], original.obsm["manifold"])
    query = ad.concat([*small_stream.test, small_stream.novel])
    np.testing.assert_array_equal(
        loaded.get_novelty(query, score="knn")["pvalue"], two_stage_model.get_novelty(query, score="knn")["pvalue"]
    )

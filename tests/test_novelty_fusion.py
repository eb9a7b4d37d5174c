"""The input-space novelty score, fused conformal p-values, and the calibration cells that chose nothing."""

import json
import logging

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import QUIET, make_model, register
from scipy import stats

import scanpy_canal as canal
from scanpy_canal._directories import file_checksums
from scanpy_canal.model._conformal import CALIBRATION_SHARE, conformal_pvalues, split_held_out
from scanpy_canal.model._input_space import (
    INPUT_NEIGHBOURS,
    MAX_INPUT_NEIGHBOURS,
    InputReference,
    reference_neighbours,
)
from scanpy_canal.model._scores import fuse_pvalues


def test_fused_rule_rejects_known_cells_at_most_alpha():
    """Two dependent scores, each exchangeable between calibration and known cells: the fused rule's rejection rate
    stays within a binomial bound of alpha (Bonferroni is conservative, so well below it here)."""
    rng = np.random.default_rng(0)
    n_repeats, n_calibration, n_known, alpha = 60, 400, 400, 0.05

    def cells(n):
        shared = rng.normal(size=n)  # the two scores are correlated, as the energy and the input distance are
        scores = [torch.as_tensor(shared + rng.normal(size=n)), torch.as_tensor(rng.gamma(2.0, size=n) + shared)]
        return scores, torch.as_tensor(rng.choice(2, size=n))

    rejected = []
    for _ in range(n_repeats):
        (calibration, calibration_predicted), (known, predicted) = cells(n_calibration), cells(n_known)
        pvalues = [
            conformal_pvalues(score, predicted, reference, calibration_predicted, n_types=2)
            for score, reference in zip(known, calibration, strict=True)
        ]
        fused = fuse_pvalues(pvalues)
        assert torch.all(fused <= 1) and torch.all(fused >= torch.minimum(*pvalues))
        rejected.append((fused <= alpha).numpy())
    rate, n = np.concatenate(rejected).mean(), n_repeats * n_known
    assert rate <= stats.binom.ppf(0.999, n, alpha) / n
    assert rate >= alpha / 2 - 0.01  # not a rule that rejects nothing


def test_split_held_out_calibrates_on_cells_that_choose_nothing():
    codes = np.array([0] * 30 + [1] * 6 + [2] * 1 + [0] * 10)  # 37 stage cells, then 10 bank cells
    held_out = np.array([*range(0, 30, 3), 30, 31, 32, 36, 40, 41])
    early, calibration = split_held_out(codes, held_out, 37, np.random.default_rng(0))
    assert not set(early) & set(calibration) and set(early) | set(calibration) == set(held_out)
    assert {40, 41} <= set(early) and set(calibration) < set(range(37))  # bank rows only choose the epoch
    assert np.sum(codes[calibration] == 0) == round(CALIBRATION_SHARE * 10)
    assert 36 in early  # a type with one held-out cell keeps it for early stopping


def test_a_cell_gets_the_same_call_alone_in_a_batch_and_from_a_backed_file(two_stage_model, small_stream, tmp_path):
    query = ad.concat([*small_stream.test, small_stream.novel])
    batch = two_stage_model.get_novelty(query)
    alone = [two_stage_model.get_novelty(query[i : i + 1]) for i in range(0, query.n_obs, 7)]
    np.testing.assert_allclose(
        np.concatenate([frame["pvalue"] for frame in alone]), batch["pvalue"].to_numpy()[::7], rtol=1e-6
    )
    query.write_h5ad(tmp_path / "query.h5ad")
    backed = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    labels = two_stage_model.predict(backed, novel=True, chunk_size=16)
    np.testing.assert_array_equal(labels, two_stage_model.predict(query, novel=True))
    assert (labels == "Unassigned").any()


def test_input_reference_survives_save_and_load(two_stage_model, two_stage_model_dir, small_stream):
    loaded = canal.CANAL.load(two_stage_model_dir)
    for name, value in two_stage_model.input_reference_.to_tensors().items():
        torch.testing.assert_close(loaded.input_reference_.to_tensors()[name], value, rtol=0, atol=0)
    query = ad.concat([*small_stream.test, small_stream.novel])
    np.testing.assert_array_equal(
        loaded.get_novelty(query, score="input")["pvalue"], two_stage_model.get_novelty(query, score="input")["pvalue"]
    )


def test_a_model_saved_without_input_reference_predicts_and_says_so_once(
    two_stage_model, small_stream, tmp_path, caplog
):
    two_stage_model.save(tmp_path / "old")
    weights = torch.load(tmp_path / "old" / "weights.pt", weights_only=True)
    torch.save({"network": weights["network"]}, tmp_path / "old" / "weights.pt")  # as saved before this change
    metadata = json.loads((tmp_path / "old" / "model.json").read_text())
    metadata["sha256"] = file_checksums(tmp_path / "old", exclude="model.json")
    del metadata["metadata_sha256"]  # older models have no digest of their model.json
    (tmp_path / "old" / "model.json").write_text(json.dumps(metadata))
    old = canal.CANAL.load(tmp_path / "old")
    assert old.input_reference_ is None
    query = ad.concat([*small_stream.test, small_stream.novel])
    with caplog.at_level(logging.WARNING, logger="scanpy_canal"):
        labels = old.predict(query, novel=True)
        old.predict(query, novel=True)
    said = [record.getMessage() for record in caplog.records if "input-space reference" in record.getMessage()]
    assert len(said) == 1 and "energy alone" in said[0]
    np.testing.assert_array_equal(labels, two_stage_model.predict(query, novel=True, score="energy"))
    with pytest.raises(ValueError, match="no input-space reference"):
        old.predict(query, novel=True, score="input")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"score": ("input", "input")}, "names a score twice"),
        ({"score": ("input", "entropy")}, "score must be one of"),
        ({"score": ()}, "score must be one of"),
        ({"score": ["input", "mix"], "threshold": "calibrated"}, "fused through conformal p-values"),
        ({"score": ("input", "energy"), "threshold": 0.5}, "fused through conformal p-values"),
    ],
)
def test_bad_score_options_are_clear_errors(two_stage_model, small_stream, options, message):
    with pytest.raises(ValueError, match=message):
        two_stage_model.predict(small_stream.test[0], novel=True, **options)


def test_input_reference_rejects_a_damaged_file():
    space = InputReference.fit(np.random.default_rng(0).random((30, 6)), np.ones((4, 6)), seed=0)
    tensors = space.to_tensors()
    with pytest.raises(ValueError, match="panel of 7 genes"):
        InputReference.from_tensors(tensors, 7)
    with pytest.raises(ValueError, match="lacks"):
        InputReference.from_tensors({"mean": tensors["mean"]}, 6)


@pytest.mark.parametrize(
    ("smallest", "neighbours"),
    [(1, INPUT_NEIGHBOURS), (5, INPUT_NEIGHBOURS), (20, 15), (41, MAX_INPUT_NEIGHBOURS), (400, MAX_INPUT_NEIGHBOURS)],
)
def test_the_input_neighbour_is_three_quarters_of_the_smallest_reference_type(smallest, neighbours):
    assert reference_neighbours(["rare"] * smallest + ["common"] * 500) == neighbours


def test_the_input_score_is_the_distance_to_the_saved_neighbour():
    rng = np.random.default_rng(0)
    cells = rng.normal(size=(60, 8))
    far = InputReference.fit(cells, cells, seed=0, standardise=True, neighbours=20)
    near = InputReference.fit(cells, cells, seed=0, standardise=True)
    query = far.project(rng.normal(size=(10, 8)))
    assert near.neighbours == INPUT_NEIGHBOURS
    torch.testing.assert_close(far.distance(query), near.distance(query, neighbours=20))
    assert torch.all(far.distance(query) > near.distance(query))
    assert InputReference.from_tensors(far.to_tensors(), 8).neighbours == 20
    saved_before = {name: value for name, value in far.to_tensors().items() if name != "neighbours"}
    assert InputReference.from_tensors(saved_before, 8).neighbours == INPUT_NEIGHBOURS


@pytest.mark.parametrize("bank_size", [40, 0])
def test_a_stage_takes_the_input_neighbour_from_its_reference_cells(small_stream, bank_size):
    """With a bank its types' cells set the neighbour; without one, the types of the sampled training cells do."""
    model = make_model(small_stream)
    model.train(max_epochs=1, rehearsal_size=bank_size, **QUIET)
    if bank_size:
        reference_types = model.example_bank.obs["cell_type"].astype(str)
    else:  # every stage cell but the calibration cells is a reference cell here (fewer than MAX_REFERENCE_CELLS)
        stage = small_stream.train[0]
        reference_types = stage.obs["cell_type"][~stage.obs_names.isin(model.calibration_cells_.obs_names)]
        assert model.input_reference_.cells.shape[0] == len(reference_types)
    assert model.input_reference_.neighbours == reference_neighbours(reference_types.astype(str))
    assert INPUT_NEIGHBOURS < model.input_reference_.neighbours <= MAX_INPUT_NEIGHBOURS


def test_every_stage_refits_the_input_reference_on_its_cells_and_bank(small_stream):
    """The input space is fitted anew at every stage and its reference cells are the bank's, so a type first seen in
    stage 2 is near the reference after stage 2 and far from it after stage 1."""
    model = make_model(small_stream)
    settings = {"max_epochs": 1, "rehearsal_size": 40, **QUIET}
    model.train(**settings)
    first = model.input_reference_
    second_stage = register(small_stream.train[1])
    new_types = sorted(set(second_stage.obs["cell_type"]) - set(model.cell_types))
    new_cells = second_stage[second_stage.obs["cell_type"].isin(new_types)]
    before = model.get_novelty(new_cells, score="input")["pvalue"].median()
    model.train(second_stage, **settings)
    second = model.input_reference_
    assert not torch.equal(first.components, second.components)
    assert second.cells.shape[0] == model.example_bank.n_obs
    assert model.get_novelty(new_cells, score="input")["pvalue"].median() > before


def test_standardised_genes_weigh_a_gene_the_reference_does_not_express():
    """A cell expressing a gene silent in the reference: far in the standardised space, near in the centred one."""
    rng = np.random.default_rng(0)
    reference = rng.normal(2.0, 1.0, size=(200, 12)).clip(0)
    reference[:, 0] = rng.random(200) < 0.02  # a marker the reference hardly expresses (a few cells, value 1)
    typical, marked = reference[:1].copy(), reference[:1].copy()
    marked[0, 0] = 3.0
    ratios = {}
    for standardise in (False, True):
        space = InputReference.fit(reference, reference, seed=0, standardise=standardise)
        typical_score, marked_score = space.distance(space.project(np.vstack([typical, marked])))
        ratios[standardise] = float(marked_score / typical_score)
    assert ratios[True] > 2.5 > 2 > ratios[False]  # measured: 2.6 and 1.6
    # the coordinates carry the distance to the subspace; the scale is saved and restored
    space = InputReference.fit(reference, reference[:50], seed=0, standardise=True)
    assert space.cells.shape == (50, space.components.shape[1] + 1)
    restored = InputReference.from_tensors(space.to_tensors(), 12)
    torch.testing.assert_close(restored.distance(restored.project(marked)), space.distance(space.project(marked)))


def test_a_model_with_standardised_genes_keeps_them_through_stages_and_save(small_stream, tmp_path):
    model = make_model(small_stream, input_space="standardised")
    model.train(max_epochs=1, rehearsal_size=40, **QUIET)
    assert model.input_reference_.scale is not None
    novelty = model.get_novelty(register(small_stream.test[0]), score="input")
    model.save(tmp_path / "model")
    loaded = canal.CANAL.load(tmp_path / "model")
    assert loaded.input_space_ == "standardised"
    np.testing.assert_allclose(
        loaded.get_novelty(register(small_stream.test[0]), score="input")["score"], novelty["score"]
    )
    with pytest.raises(ValueError, match="input_space must be one of"):
        make_model(small_stream, input_space="scaled")

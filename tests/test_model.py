import copy

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import QUIET, TINY_ARCH, make_model, register

import scanpy_canal as canal
from scanpy_canal.model._bank import trim_to_quota, update_bank
from scanpy_canal.model._data import balanced_class_weights, balances_classes, split_stage, stratified_split
from scanpy_canal.model._schedule import cosine_warm_restarts
from scanpy_canal.nn import tokenize


@pytest.mark.parametrize(
    ("epoch", "lr"),
    [(1, 1e-6), (2, 4.08e-5), (3, 8.06e-5), (6, 2e-4), (10, 1.31e-4), (15, 5.9e-6), (16, 1e-6), (21, 1.8e-4)]
    + [(41, 1e-6), (46, 1.62e-4), (86, 1e-6), (91, 1.458e-4)],
)
def test_schedule_matches_original_per_epoch_values(epoch, lr):
    assert cosine_warm_restarts(epoch - 1) == pytest.approx(lr, rel=1e-2)  # the spec rounds to 2-4 figures


def test_stratified_split_keeps_every_class_in_training():
    codes = np.array([0] * 10 + [1] * 5 + [2])
    train, val = stratified_split(codes, 0.2, np.random.default_rng(0))
    assert np.intersect1d(train, val).size == 0 and len(train) + len(val) == 16
    assert np.bincount(codes[val], minlength=3).tolist() == [2, 1, 0]
    assert set(codes[train]) == {0, 1, 2}


def test_bank_cells_train_unless_the_bank_is_split():
    codes = np.array([0] * 10 + [1] * 10 + [0] * 3 + [2] * 3)  # 20 stage cells, then 6 bank cells
    train, val = split_stage(codes, 20, 0.2, np.random.default_rng(0), split_bank=False)
    assert np.all(np.isin(np.arange(20, 26), train)) and np.all(val < 20)
    assert np.bincount(codes[val], minlength=3).tolist() == [2, 2, 0]
    train, val = split_stage(codes, 20, 0.2, np.random.default_rng(0), split_bank=True)  # the original's split
    expected = stratified_split(codes, 0.2, np.random.default_rng(0))
    assert np.array_equal(train, expected[0]) and np.array_equal(val, expected[1])
    assert np.any(val >= 20)


def test_balanced_class_weights_give_every_type_the_same_total():
    codes = np.array([0] * 12 + [1] * 3 + [3] * 1)  # type 2 has no cell
    weights = balanced_class_weights(codes, 4)
    totals = weights * np.bincount(codes, minlength=4)
    assert totals[[0, 1, 3]] == pytest.approx([16 / 3] * 3) and weights[2] == 0
    assert totals.sum() == pytest.approx(len(codes))


def stage_two_weights(stream, balance_classes, rehearsal_size=6):
    """The class weights of stage 2's training loss (`None` for none; every bank cell training), its cells per type
    from the bank and from the stage, all it trains on, and the model."""
    model = make_model(stream)
    model.train(max_epochs=1, rehearsal_size=rehearsal_size, balance_classes=balance_classes, **QUIET)
    bank = model.example_bank.obs["cell_type"].astype(str).value_counts()
    second = register(stream.train[1])
    stage = second.obs["cell_type"].astype(str).value_counts()
    held_out = stage.map(lambda n: min(round(0.2 * n), n - 1))  # validation: stage cells only, never the bank
    training = stage.sub(held_out).add(bank, fill_value=0)
    seen = []
    original = type(model.module).loss

    def record(module, *args, **kwargs):
        if module.training:
            seen.append(kwargs.get("class_weight"))
        return original(module, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model.module), "loss", record)
        model.train(second, max_epochs=1, split_bank=False, balance_classes=balance_classes, **QUIET)
    assert not hasattr(model.module, "class_weight")  # a loss input of the stage's training plan, not module state
    assert not model.stage_history_[-1]["split_bank"]
    weights = None if seen[0] is None else pd.Series(seen[0].numpy(), index=model.cell_types)
    return weights, bank, stage, training.reindex(model.cell_types), model


def test_balanced_loss_weights_the_replayed_types(small_stream):
    """Stage 2 with a bank: every type carries the same total weight in the training loss, whatever its cell count."""
    weights, bank, stage, training, model = stage_two_weights(small_stream, True)
    totals = weights * training
    assert totals.to_numpy() == pytest.approx([training.sum() / len(training)] * len(training), rel=1e-5)
    assert bank.min() < stage.min() and weights[bank.idxmin()] > weights[stage.idxmax()]
    assert [record["balance_classes"] for record in model.stage_history_] == [True, True]


@pytest.mark.parametrize(("rehearsal_size", "balanced"), [(6, True), (10_000, False)])
def test_auto_balances_the_stages_whose_bank_is_a_sample(small_stream, rehearsal_size, balanced):
    """``"auto"``: never at stage 1; at stage 2 where the bank had to choose among stage 1's cells (6 of them), not
    where it holds every one."""
    weights, _, _, training, model = stage_two_weights(small_stream, "auto", rehearsal_size)
    assert [record["balance_classes"] for record in model.stage_history_] == [False, balanced]
    assert model.stage_history_[0]["bank_kept_every_cell"] is not balanced
    assert (weights is not None) is balanced
    if balanced:
        assert (weights * training).to_numpy() == pytest.approx([training.sum() / len(training)] * len(training))


def test_auto_balances_after_a_bank_that_once_chose():
    """A bank that had to choose once stays a sample, and a model saved before stages recorded it counts as one."""
    history = [{"stage": 1, "bank_kept_every_cell": True}]
    assert not balances_classes("auto", [], replays=False)  # nothing replayed: the types' own proportions
    assert not balances_classes("auto", history, replays=True)
    assert balances_classes("auto", [*history, {"stage": 2, "bank_kept_every_cell": False}], replays=True)
    assert balances_classes("auto", [{"stage": 1}], replays=True)
    assert balances_classes(True, [], replays=False) and not balances_classes(False, history, replays=True)


def test_balance_classes_takes_true_false_or_auto(small_stream):
    model = make_model(small_stream)
    with pytest.raises(ValueError, match="balance_classes must be True, False or 'auto', got 'types'"):
        model.train(max_epochs=1, balance_classes="types", **QUIET)
    assert model.stage == 0


def test_loss_inputs_follow_the_batch_to_its_device():
    """Class weights and the subtree matrix are made on the CPU with the stage; on a GPU the batch is elsewhere (the
    meta device stands in for it: mixing devices fails there as it does on CUDA)."""
    from scvi import REGISTRY_KEYS

    from scanpy_canal.model._module import CANALModule

    module = CANALModule(n_genes=5, n_classes=3, arch=TINY_ARCH).train()
    tensors = {REGISTRY_KEYS.LABELS_KEY: torch.tensor([0, 1, 2, 1], device="meta")}
    outputs = {"logits": torch.randn(4, 3, device="meta"), "embedding": torch.randn(4, 16, device="meta")}
    for subtrees in (None, torch.eye(3)):
        loss = module.loss(tensors, outputs, {}, class_weight=torch.ones(3), subtrees=subtrees)
        assert loss.loss.device.type == "meta"


def test_bank_uses_prototype_row_of_the_type_by_name():
    # The stage brings only type "b", which is row 1 of the model's types; the original scored it against row 0.
    embedding = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    prototypes = np.array([[1.0, 0.0], [0.0, 1.0]])
    data = ad.AnnData(np.zeros((3, 2), np.float32), obs=pd.DataFrame(index=["x", "y", "z"]))
    bank = update_bank(None, data, ["b", "b", "b"], embedding, prototypes, ["a", "b"], stage=2, size=4)
    assert bank.obs_names.tolist() == ["y", "z"]
    assert bank.obs["rank"].tolist() == [1, 2] and bank.obs["stage"].tolist() == [2, 2]


def test_bank_trim_keeps_best_ranks_of_each_stage():
    obs = pd.DataFrame({"cell_type": ["a"] * 8, "rank": [1, 2, 3, 4, 1, 2, 3, 4]})
    assert trim_to_quota(obs, 4).tolist() == [True, True, False, False] * 2
    obs = pd.DataFrame({"cell_type": ["a"] * 7, "rank": [1, 2, 3, 4, 1, 2, 3]})
    assert trim_to_quota(obs, 4).sum() == 4  # d = 3, third largest rank is 3: ranks 1 and 2 of both stages stay


def test_head_rows_copied_and_new_types_appended(small_stream):
    model = make_model(small_stream)
    model.train(max_epochs=2, **QUIET)
    old_types = model.cell_types
    old_weight = model.module.head.fc3.weight.detach().clone()
    seen = {}

    class Peek(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["weight"] = pl_module.module.head.fc3.weight.detach().clone()

    model.train(register(small_stream.train[1]), max_epochs=1, callbacks=[Peek()], **QUIET)
    new_types = sorted(set(small_stream.train[1].obs["cell_type"]) - set(old_types))
    assert model.cell_types == old_types + new_types
    assert model.module.head.n_classes == len(old_types) + len(new_types)
    torch.testing.assert_close(seen["weight"][: len(old_types)], old_weight)


def test_bank_sizes_and_quotas_after_each_stage(small_stream):
    model = make_model(small_stream)
    size = 30
    model.train(max_epochs=1, rehearsal_size=size, **QUIET)
    bank = model.example_bank
    quota = size // len(model.cell_types)
    counts = bank.obs["cell_type"].value_counts()
    assert (counts == quota).all() and set(counts.index) == set(model.cell_types)
    assert bank.var_names.tolist() == model.genes and set(bank.obs["stage"]) == {1}

    model.train(register(small_stream.train[1]), max_epochs=1, rehearsal_size=size, **QUIET)
    bank = model.example_bank
    quota = size // len(model.cell_types)
    assert bank.n_obs <= size
    assert (bank.obs["cell_type"].value_counts() <= quota).all()
    assert not bank.obs_names.duplicated().any()
    assert set(bank.obs["cell_type"]) == set(model.cell_types)
    assert set(bank.obs["stage"]) == {1, 2}
    assert list(bank.obs["cell_type"].cat.categories) == model.cell_types

    model.train(register(small_stream.train[1]), max_epochs=1, rehearsal_size=0, **QUIET)
    assert model.example_bank is None  # capacity 0 keeps no bank, so a next stage replays nothing


def test_distillation_targets_are_the_previous_models_fixed_embeddings(small_stream):
    model = make_model(small_stream)
    model.train(max_epochs=1, **QUIET)
    previous = copy.deepcopy(model.module.network).eval()
    n_old = len(model.cell_types)
    record = {}

    class Watch(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            record["weight"] = pl_module.loss_kwargs["distill_weight"]
            record["cells"] = pl_module.cells
            record["before"] = pl_module.module.teacher_embedding.clone()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            record.setdefault("student_training", set()).add(pl_module.module.network.training)

        def on_train_end(self, trainer, pl_module):
            record["after"] = pl_module.module.teacher_embedding.clone()

    model.train(register(small_stream.train[1]), max_epochs=3, distill_weight=0.1, callbacks=[Watch()], **QUIET)
    n_new = len(model.cell_types)
    assert record["weight"] == pytest.approx(0.1 * n_old / n_new)
    assert model.stage_history_[-1]["distill_weight"] == pytest.approx(0.1 * n_old / n_new)
    assert record["student_training"] == {True}
    with torch.no_grad():
        expected = previous(tokenize(record["cells"]))[1]
    assert torch.allclose(record["before"], expected, atol=1e-5)
    assert torch.equal(record["before"], record["after"])
    assert model.module.teacher is None and model.module.teacher_embedding is None
    assert "distillation_loss_train" in model.history.columns


def test_cached_frozen_prefix_trains_like_recomputing_it(small_stream):
    # depth 3, block 1 learns: block 0 is the frozen prefix; no redraws, so caching changes nothing but the speed
    arch = {**TINY_ARCH, "depth": 3, "feature_redraw_interval": None}
    states, prefixes = [], []

    class Watch(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            prefixes.append(pl_module.module.cached_blocks)

    for cache in (True, False):
        model = make_model(small_stream, trainable_blocks=(1,), **arch)
        model.train(max_epochs=2, lr=1e-2, cache_frozen=cache, callbacks=[Watch()], **QUIET)
        model.train(register(small_stream.train[1]), max_epochs=2, lr=1e-2, cache_frozen=cache, **QUIET)
        states.append(model.module.network.state_dict())
        assert model.module.frozen_cache is None and model.module.network.performer.redraw_from == 0
    assert prefixes == [1, 0]
    for key, value in states[0].items():
        assert torch.allclose(value, states[1][key], atol=1e-5), key


def test_bfloat16_training_and_prediction(small_stream):
    model = make_model(small_stream)
    model.train(max_epochs=10, lr=1e-2, precision="bf16", **QUIET)
    assert model.history["accuracy_validation"].max() > 0.8
    test = small_stream.test[0]
    full, reduced = model.predict(test, soft=True, precision="32"), model.predict(test, soft=True, precision="bf16")
    assert (full.to_numpy() - reduced.to_numpy()).max() < 0.05
    assert (full.idxmax(axis=1) == reduced.idxmax(axis=1)).mean() > 0.9
    with pytest.raises(ValueError, match="precision"):
        model.predict(test, precision="fp16")


def test_cached_prefix_keeps_its_random_features(small_stream):
    model = make_model(small_stream, **{**TINY_ARCH, "depth": 3, "feature_redraw_interval": 1})
    layers = model.module.network.performer.net.layers
    features = lambda: [layer[0].fn.fast_attention.projection_matrix.clone() for layer in layers]
    before = features()
    model.train(max_epochs=1, cache_frozen=True, **QUIET)
    after = features()
    assert torch.equal(before[0], after[0])  # the cached block
    assert not torch.equal(before[2], after[2])  # the frozen block after the trainable one is redrawn as in scBERT


def test_early_stopping_restores_best_epoch(small_stream):
    model = make_model(small_stream)
    states, scores = [], []

    class Record(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            states.append(copy.deepcopy(pl_module.module.network.state_dict()))
            metrics = trainer.callback_metrics
            scores.append((float(metrics["accuracy_validation"]), -float(metrics["validation_loss"])))

    model.train(max_epochs=6, lr=1e-2, early_stopping_patience=None, keep_epoch="best", callbacks=[Record()], **QUIET)
    best = max(range(len(scores)), key=lambda epoch: scores[epoch])  # highest accuracy, then lowest loss
    assert model.stage_history_[-1]["best_epoch"] == best + 1
    for key, value in model.module.network.state_dict().items():
        assert torch.equal(value, states[best][key]), key
    assert model.history["best"].sum() == 1 and model.history.loc[model.history["best"], "epoch"].item() == best + 1


def test_early_stopping_stops_after_patience(small_stream):
    model = make_model(small_stream)
    model.train(max_epochs=50, lr=1e-2, early_stopping_patience=2, keep_epoch="best", **QUIET)
    entry = model.stage_history_[-1]
    assert entry["epochs"] - entry["best_epoch"] == 3  # stops after more than `patience` epochs without improvement
    assert entry["epochs"] < 50


def test_keep_last_epoch_trains_every_epoch_along_one_cycle(small_stream):
    model = make_model(small_stream)
    states = []

    class Record(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            states.append(copy.deepcopy(pl_module.module.network.state_dict()))

    model.train(max_epochs=6, lr=1e-2, early_stopping_patience=0, keep_epoch="last", callbacks=[Record()], **QUIET)
    entry = model.stage_history_[-1]
    assert entry["epochs"] == entry["best_epoch"] == len(states) == 6  # no early stop, whatever the patience
    for key, value in model.module.network.state_dict().items():
        assert torch.equal(value, states[-1][key]), key
    lrs = model.history["lr"].to_numpy()
    expected = [cosine_warm_restarts(e, max_lr=1e-2, min_lr=1e-6, first_cycle=6, warmup=2) for e in range(6)]
    np.testing.assert_allclose(lrs, expected)
    assert lrs.argmax() == 2 and lrs[-1] < 0.2 * lrs.max()  # one cycle: warm-up, then down to low rates
    assert model.history["best"].to_numpy().tolist() == [False] * 5 + [True]
    with pytest.raises(ValueError, match="keep_epoch must be 'best' or 'last'"):
        model.train(small_stream.train[1], keep_epoch="first", **QUIET)


def test_stage_order_and_data_errors_leave_adata_unchanged(small_stream):
    model = make_model(small_stream)
    with pytest.raises(ValueError, match="next stage is 1, not 2"):
        model.train(stage=2, max_epochs=1, **QUIET)
    model.train(stage=1, max_epochs=1, **QUIET)
    with pytest.raises(ValueError, match="needs new labelled data"):
        model.train(max_epochs=1, **QUIET)

    unlabelled = register(small_stream.train[1])
    unlabelled.obs.loc[unlabelled.obs_names[:3], "cell_type"] = np.nan
    snapshot = unlabelled.copy()
    with pytest.raises(ValueError, match="3 missing or empty labels"):
        model.train(unlabelled, max_epochs=1, **QUIET)

    unregistered = small_stream.train[1].copy()
    unregistered.obs["cell_type"] = unregistered.obs["cell_type"].astype(str)
    unregistered.obs.iloc[:2, unregistered.obs.columns.get_loc("cell_type")] = ""
    with pytest.raises(ValueError, match="2 missing or empty labels"):
        canal.CANAL.setup_anndata(unregistered, labels_key="cell_type")
    assert "_scvi_uuid" not in unregistered.uns

    foreign = register(small_stream.train[1])
    foreign.var_names = [f"other_{i}" for i in range(foreign.n_vars)]
    before = foreign.copy()
    with pytest.raises(ValueError, match="None of the 60 requested genes"):
        model.train(foreign, max_epochs=1, **QUIET)
    with pytest.raises(ValueError, match="None of the 60 requested genes"):
        model.predict(foreign)
    for adata, reference in ((foreign, before), (unlabelled, snapshot)):
        assert adata.obs.equals(reference.obs) and (adata.X != reference.X).nnz == 0
    assert model.stage == 1


def test_interrupted_stage_leaves_model_as_before(small_stream):
    model = make_model(small_stream)
    model.train(max_epochs=2, **QUIET)
    state = copy.deepcopy(model.module.network.state_dict())
    types, bank = model.cell_types, model.example_bank.copy()

    class Interrupt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.train(register(small_stream.train[1]), max_epochs=3, callbacks=[Interrupt()], **QUIET)
    assert model.stage == 1 and model.cell_types == types and model.module.teacher is None
    assert model.example_bank.obs.equals(bank.obs)
    for key, value in model.module.network.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_predictions_accurate_and_gene_order_independent(two_stage_model, small_stream):
    test = ad.concat(small_stream.test)
    predicted = two_stage_model.predict(test)
    assert np.mean(predicted == test.obs["cell_type"].astype(str).to_numpy()) >= 0.85
    shuffled = test[:, np.random.default_rng(0).permutation(test.n_vars)].copy()
    np.testing.assert_array_equal(two_stage_model.predict(shuffled), predicted)
    probabilities = two_stage_model.predict(test, soft=True)
    assert list(probabilities.columns) == two_stage_model.cell_types
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    assert two_stage_model.get_latent_representation(test).shape == (test.n_obs, 64)
    subset = register(test)[:10].copy()  # a copy of registered data keeps the registration's setup arguments
    np.testing.assert_array_equal(two_stage_model.predict(subset), predicted[:10])


def test_novel_cells_are_unassigned_with_a_good_h_score(two_stage_model, small_stream):
    query = ad.concat([*small_stream.test, small_stream.novel])
    truth = query.obs["cell_type"].astype(str)
    # The original, query-relative rule unassigns more known cells of a confident model: 0.749 here since a third of
    # the held-out cells choose the best epoch and two thirds calibrate (0.79 when all of them did both).
    for threshold, lowest in (("calibrated", 0.8), ("canal", 0.74)):
        scores = canal.tl.evaluate(
            truth, two_stage_model.predict(query, novel=True, threshold=threshold), novel_types=small_stream.novel_types
        )
        assert scores["h_score"] >= lowest, (threshold, scores)


def test_calibrated_call_does_not_depend_on_the_rest_of_the_query(two_stage_model, small_stream):
    query = ad.concat([*small_stream.test, small_stream.novel])
    together = two_stage_model.predict(query, novel=True)
    alone = np.concatenate([two_stage_model.predict(query[i : i + 1], novel=True) for i in range(0, query.n_obs, 7)])
    np.testing.assert_array_equal(alone, together[::7])
    np.testing.assert_array_equal(two_stage_model.predict(query, novel=True, seed=0), together)
    with pytest.raises(ValueError, match="at least 2 cells"):
        two_stage_model.predict(query[:1], novel=True, threshold="canal")
    with pytest.raises(ValueError, match="threshold must be"):
        two_stage_model.predict(query, novel=True, threshold="loose")


@pytest.mark.parametrize("dense", [False, True])
def test_backed_query_is_read_in_chunks(two_stage_model, small_stream, tmp_path, dense):
    query = small_stream.test[0].copy()
    if dense:
        query.X = query.X.toarray()
    query.write_h5ad(tmp_path / "query.h5ad")
    backed = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    expected = two_stage_model.predict(query, soft=True)
    streamed = two_stage_model.predict(backed, soft=True, chunk_size=7)
    pd.testing.assert_frame_equal(streamed, expected, atol=1e-6)
    canal.tl.annotate(backed, two_stage_model, novel=True, chunk_size=7)
    assert backed.isbacked and backed.obsm["X_canal"].shape == (query.n_obs, 64)
    with pytest.raises(ValueError, match="chunk_size"):
        two_stage_model.predict(backed, chunk_size=0)


def test_save_load_round_trip(two_stage_model, small_stream, tmp_path):
    query = ad.concat([*small_stream.test, small_stream.novel])
    path = tmp_path / "model"
    two_stage_model.save(path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        two_stage_model.save(path)
    two_stage_model.save(path, overwrite=True)
    loaded = canal.CANAL.load(path)
    assert (
        loaded.stage == 2 and loaded.cell_types == two_stage_model.cell_types and loaded.genes == two_stage_model.genes
    )
    pd.testing.assert_frame_equal(loaded.predict(query, soft=True), two_stage_model.predict(query, soft=True))
    np.testing.assert_array_equal(loaded.predict(query, novel=True), two_stage_model.predict(query, novel=True))
    assert loaded.example_bank.obs.equals(two_stage_model.example_bank.obs)
    assert len(loaded.history) == len(two_stage_model.history)
    assert loaded._model_summary_string == two_stage_model._model_summary_string
    assert "stage 2" in loaded._model_summary_string
    assert not any(p.suffix in {".pkl", ".pickle"} for p in path.iterdir())


def test_interrupted_save_leaves_the_previous_model(two_stage_model, small_stream, tmp_path, monkeypatch):
    path = tmp_path / "model"
    two_stage_model.save(path)
    before = sorted((p.name, p.read_bytes()) for p in path.iterdir())

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ad.AnnData, "write_h5ad", interrupt)  # stops the save after the weights are written
    with pytest.raises(KeyboardInterrupt):
        two_stage_model.save(path, overwrite=True)
    monkeypatch.undo()
    assert sorted((p.name, p.read_bytes()) for p in path.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging directory left behind
    assert canal.CANAL.load(path).predict(small_stream.test[0]).shape == (small_stream.test[0].n_obs,)


def test_load_refuses_newer_format_and_damaged_files(two_stage_model, tmp_path):
    import json

    path = tmp_path / "model"
    two_stage_model.save(path)
    metadata = json.loads((path / "model.json").read_text())
    (path / "model.json").write_text(json.dumps({**metadata, "format_version": 99}))
    with pytest.raises(ValueError, match="newer scanpy-canal"):
        canal.CANAL.load(path)
    (path / "model.json").write_text(json.dumps({**metadata, "format_version": "x"}))
    with pytest.raises(ValueError, match="format_version"):
        canal.CANAL.load(path)
    (path / "model.json").write_text(json.dumps(metadata))
    weights = (path / "weights.pt").read_bytes()
    (path / "weights.pt").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="weights.pt"):
        canal.CANAL.load(path)


def test_same_seed_same_model(small_stream):
    states = []
    for _ in range(2):
        model = make_model(small_stream, seed=3)
        model.train(max_epochs=2, **QUIET)
        states.append(model.module.network.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_annotate_writes_documented_keys(two_stage_model, small_stream):
    query = ad.concat([small_stream.test[0], small_stream.novel])
    before = query.copy()
    annotated = canal.tl.annotate(query, two_stage_model, novel=True, copy=True)
    assert query.obs.equals(before.obs) and not query.obsm
    obs = annotated.obs
    assert list(obs["canal_prediction"].cat.categories) == [*two_stage_model.cell_types, "Unassigned"]
    assert obs["canal_confidence"].between(0, 1).all() and np.isfinite(obs["canal_novelty_score"]).all()
    assert obs["canal_novelty_pvalue"].between(0, 1, inclusive="right").all()
    assert annotated.uns["canal"]["params"]["score"] == "input"  # the conformal rule's default score
    fused = canal.tl.annotate(query, two_stage_model, novel=True, score=("input", "energy"), copy=True)
    pvalues = fused.obsm["canal_novelty_pvalues"]
    assert list(pvalues.columns) == ["input", "energy"] and pvalues.index.equals(query.obs_names)
    by = fused.obs["canal_unassigned_by"].astype(str).to_numpy()
    unassigned = (fused.obs["canal_prediction"] == "Unassigned").to_numpy()
    assert set(by[unassigned]) <= {"input", "energy"} and set(by[~unassigned]) <= {""}
    mix = canal.tl.annotate(query, two_stage_model, novel=True, score="mix", copy=True)
    assert mix.obs["canal_novelty_score"].between(0, 1).all()  # the mix score alone is in [0, 1]
    assert annotated.obsm["canal_probabilities"].shape == (query.n_obs, len(two_stage_model.cell_types))
    assert annotated.obsm["X_canal"].shape == (query.n_obs, 64)
    assert annotated.uns["canal"]["cell_types"] == two_stage_model.cell_types and annotated.uns["canal"]["stage"] == 2

    canal.tl.annotate(query, two_stage_model, key_added="ref")
    assert "ref_prediction" in query.obs and "ref_novelty_score" not in query.obs
    assert list(query.obs["ref_prediction"].cat.categories) == two_stage_model.cell_types


def test_annotate_mudata(two_stage_model, small_stream, tmp_path):
    import mudata as md

    rna = small_stream.test[0].copy()
    mdata = md.MuData({"rna": rna})
    canal.tl.annotate(mdata, two_stage_model, novel=True)
    assert "canal_prediction" in mdata.mod["rna"].obs and "rna:canal_prediction" in mdata.obs
    assert "X_canal" in mdata.mod["rna"].obsm
    mdata.write(tmp_path / "annotated.h5mu")
    with pytest.raises(KeyError, match="modality 'atac'"):
        canal.tl.annotate(mdata, two_stage_model, mod="atac")


def test_construction_errors(small_stream):
    data = small_stream.train[0].copy()
    canal.CANAL.setup_anndata(data)
    with pytest.raises(ValueError, match="labels_key"):
        canal.CANAL(data, **TINY_ARCH)
    with pytest.raises(KeyError, match="not a column"):
        canal.CANAL.setup_anndata(data, labels_key="celltype")
    labelled = register(small_stream.train[0])
    with pytest.raises(ValueError, match="either `genes` or `n_top_genes`"):
        canal.CANAL(labelled, genes=["gene_0"], n_top_genes=5, **TINY_ARCH)
    model = canal.CANAL(labelled, n_top_genes=20, **TINY_ARCH)
    assert len(model.genes) == 20 and model.module.network.max_seq_len == 21


def test_pretrained_scbert_checkpoint_by_gene_name(small_stream, tmp_path):
    source = canal.nn.PerformerLM(max_seq_len=101, **TINY_ARCH)
    path = tmp_path / "pretrain.pth"
    torch.save({"model_state_dict": source.state_dict()}, path)
    vocabulary = [f"gene_{i}" for i in reversed(range(30))] + [f"other_{i}" for i in range(70)]
    data = register(small_stream.train[0])
    model = canal.CANAL(data, pretrained=str(path), pretrained_genes=vocabulary)
    assert model.genes == [f"gene_{i}" for i in range(30)]  # genes outside the vocabulary are left out
    rows = model.module.network.pos_emb.emb.weight
    torch.testing.assert_close(rows[0], source.pos_emb.emb.weight[29])  # gene_0 is the vocabulary's 30th entry
    torch.testing.assert_close(
        model.module.network.performer.net.layers[1][0].fn.to_q.weight,
        source.performer.net.layers[1][0].fn.to_q.weight,
    )
    with pytest.raises(ValueError, match="vocabulary has 99 genes"):
        canal.CANAL(data, pretrained=str(path), pretrained_genes=vocabulary[:-1])
    # highly variable genes are chosen among those the weights know, so the panel has the size asked for
    known = {f"gene_{i}" for i in range(10)}
    partial = [gene if gene in known else f"unknown_{k}" for k, gene in enumerate(vocabulary)]
    chosen = canal.CANAL(data, pretrained=str(path), pretrained_genes=partial, n_top_genes=8)
    assert len(chosen.genes) == 8 and set(chosen.genes) <= known


def test_balanced_threshold_separates_known_from_virtual_cells():
    from scanpy_canal.model._novelty import _balanced_threshold

    known, virtual = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.6, 0.7, 0.2])
    threshold = _balanced_threshold(known, virtual)
    assert threshold == pytest.approx(0.3)  # keeps every known cell, rejects 2 of 3 virtual ones

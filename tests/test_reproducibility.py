"""Same seed, same data: the same weights, example bank and predictions on the CPU, also after save and load."""

import anndata as ad
import numpy as np
import pandas as pd
import torch
from conftest import QUIET, make_model, register

from scanpy_canal import CANAL


def _two_stages(stream, seed: int) -> CANAL:
    model = make_model(stream, seed=seed)
    settings = {"max_epochs": 2, "lr": 3e-3, "batch_size": 8, **QUIET}
    model.train(**settings)
    model.train(register(stream.train[1]), **settings)
    return model


def _assert_same_weights(first: CANAL, second: CANAL) -> None:
    state = second.module.network.state_dict()
    for key, value in first.module.network.state_dict().items():
        assert torch.equal(value, state[key]), key


def _assert_same_predictions(first: CANAL, second: CANAL, query: ad.AnnData) -> None:
    pd.testing.assert_frame_equal(first.predict(query, soft=True), second.predict(query, soft=True), check_exact=True)
    np.testing.assert_array_equal(first.get_latent_representation(query), second.get_latent_representation(query))
    for threshold in ("calibrated", "canal"):
        np.testing.assert_array_equal(
            first.predict(query, novel=True, threshold=threshold, seed=3),
            second.predict(query, novel=True, threshold=threshold, seed=3),
        )


def test_same_seed_same_model_bank_and_predictions(small_stream, tmp_path):
    global_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    first = _two_stages(small_stream, seed=7)
    assert torch.equal(torch.random.get_rng_state(), global_state[0])  # the global random state is left alone
    np.testing.assert_array_equal(np.random.get_state()[1], global_state[1])
    torch.manual_seed(123)  # nor does it matter
    np.random.seed(123)
    second = _two_stages(small_stream, seed=7)
    _assert_same_weights(first, second)
    assert any(key.endswith("projection_matrix") for key in first.module.network.state_dict())
    assert (first.example_bank.X != second.example_bank.X).nnz == 0
    pd.testing.assert_frame_equal(first.example_bank.obs, second.example_bank.obs)
    pd.testing.assert_frame_equal(first.history, second.history)
    query = ad.concat([*small_stream.test, small_stream.novel])
    _assert_same_predictions(first, second, query)

    first.save(tmp_path / "model")
    loaded = CANAL.load(tmp_path / "model")  # the random-feature projections are saved with the weights
    _assert_same_weights(first, loaded)
    _assert_same_predictions(first, loaded, query)


def test_another_seed_another_model(small_stream):
    first, second = (make_model(small_stream, seed=seed).module.network.state_dict() for seed in (1, 2))
    for key in ("token_emb.weight", "performer.net.layers.0.0.fn.fast_attention.projection_matrix"):
        assert not torch.equal(first[key], second[key]), key

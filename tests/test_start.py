"""How a model starts: pretrained or random weights, the gene table of a random start, and the defaults of each."""

import json

import numpy as np
import pytest
import torch
from conftest import QUIET, TINY_ARCH, make_model

import scanpy_canal as canal
from scanpy_canal.model._defaults import START_DEFAULTS
from scanpy_canal.model._io import SELF_DIGEST, _metadata_digest
from scanpy_canal.nn._gene_embedding import coexpression_embedding


def test_coexpression_table_puts_co_expressed_genes_together():
    rng = np.random.default_rng(0)
    programs = rng.normal(size=(400, 3))
    x = np.abs(np.repeat(programs, 4, axis=1) + 0.3 * rng.normal(size=(400, 12)))  # 3 programs of 4 genes each
    table = coexpression_embedding(x, 8)
    assert table.shape == (12, 8) and torch.isclose((table**2).mean(), torch.tensor(1.0))
    similarity = torch.nn.functional.normalize(table, dim=1) @ torch.nn.functional.normalize(table, dim=1).T
    same = torch.block_diag(*[torch.ones(4, 4)] * 3).bool()
    assert similarity[same].min() > 0.5 > similarity[~same].max()
    constant = np.hstack([x, np.ones((400, 1))])  # a gene that never varies gets a zero vector
    assert coexpression_embedding(constant, 8)[-1].abs().max() == 0


def test_random_start_with_a_coexpression_table(small_stream, tmp_path):
    model = make_model(small_stream, gene_embedding="coexpression")
    table = model.module.network.pos_emb.emb.weight
    assert model.start_ == "random" and model.gene_embedding_ == "coexpression" and not table.requires_grad
    assert table[-1].abs().max() == 0  # the appended token
    data = small_stream.train[0]
    expected = coexpression_embedding(data[:, model.genes].X, TINY_ARCH["dim"], seed=0)
    torch.testing.assert_close(table[:-1], expected)
    model.train(max_epochs=1, **QUIET)
    model.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "model.json").read_text())["gene_embedding"] == "coexpression"
    loaded = canal.CANAL.load(tmp_path / "model")
    torch.testing.assert_close(loaded.module.network.pos_emb.emb.weight, table)
    assert loaded.start_ == "random"
    with pytest.raises(ValueError, match="gene_embedding must be 'coexpression' or 'random'"):
        make_model(small_stream, gene_embedding="pca")


def test_pretrained_weights_bring_their_own_gene_table(small_stream, tmp_path):
    encoder = canal.nn.PerformerLM(max_seq_len=small_stream.train[0].n_vars + 1, **TINY_ARCH)
    path = canal.nn.save_pretrained(encoder, tmp_path / "encoder", list(small_stream.train[0].var_names))
    model = make_model(small_stream, pretrained=str(path))
    assert model.start_ == "pretrained" and model.gene_embedding_ is None
    torch.testing.assert_close(model.module.network.pos_emb.emb.weight, encoder.pos_emb.emb.weight)
    with pytest.raises(ValueError, match="pretrained weights bring their own gene table"):
        make_model(small_stream, pretrained=str(path), gene_embedding="coexpression")
    assert model.arch_["head_init"] == "normal"
    with pytest.raises(ValueError, match="pretrained weights bring their own bins"):
        make_model(small_stream, pretrained=str(path), head_init="bins")


def test_random_start_reads_the_bins_from_the_head(small_stream, tmp_path):
    model = make_model(small_stream)
    bins = model.module.network.token_emb.weight.detach()
    direction = bins[-2] - bins[0]
    direction -= direction.mean()
    weight = model.module.head.conv1.weight.detach().flatten()
    torch.testing.assert_close(weight, direction / direction.norm())
    model.train(max_epochs=1, **QUIET)
    model.save(tmp_path / "model")
    assert canal.CANAL.load(tmp_path / "model").arch_["head_init"] == "bins"
    assert make_model(small_stream, head_init="normal").arch_["head_init"] == "normal"


def test_head_dropout_acts_in_training_only_and_is_saved(small_stream, tmp_path):
    model = make_model(small_stream, head_dropout=0.3)
    head = model.module.head
    manifold = torch.rand(64, head.fc2.in_features) + 0.1
    head.train()
    assert not torch.equal(head.classify(manifold)[1], head.classify(manifold)[1])
    head.eval()
    torch.testing.assert_close(head.classify(manifold)[1], head.classify(manifold)[1])
    model.train(max_epochs=1, **QUIET)
    model.save(tmp_path / "model")
    assert canal.CANAL.load(tmp_path / "model").module.head.dropout.p == 0.3
    # A model saved before the option trained without dropout, and keeps doing so.
    metadata = json.loads((tmp_path / "model" / "model.json").read_text())
    del metadata["arch"]["head_dropout"]
    metadata[SELF_DIGEST] = _metadata_digest(metadata)
    (tmp_path / "model" / "model.json").write_text(json.dumps(metadata))
    assert canal.CANAL.load(tmp_path / "model").module.head.dropout.p == 0.0
    with pytest.raises(ValueError, match=r"head_dropout must be in \[0, 1\)"):
        make_model(small_stream, head_dropout=1.0)


@pytest.mark.parametrize("start", ["random", "pretrained"])
def test_train_defaults_follow_the_start(small_stream, tmp_path, start, monkeypatch):
    defaults = START_DEFAULTS[start]
    kwargs = {}
    if start == "pretrained":
        encoder = canal.nn.PerformerLM(max_seq_len=small_stream.train[0].n_vars + 1, **TINY_ARCH)
        genes = list(small_stream.train[0].var_names)
        kwargs["pretrained"] = str(canal.nn.save_pretrained(encoder, tmp_path / "encoder", genes))
    model = make_model(small_stream, **kwargs)
    layers = model.module.network.performer.net.layers
    trainable = [i for i, block in enumerate(layers) if any(p.requires_grad for p in block.parameters())]
    expected = sorted(i % TINY_ARCH["depth"] for i in defaults["trainable_blocks"])
    assert trainable == expected
    assert model.module.head.dropout.p == defaults["head_dropout"] == model.arch_["head_dropout"]
    seen = {}
    monkeypatch.setattr(type(model), "_train_stage", lambda self, adata, *, stage, settings: seen.update(s=settings))
    model.train(**QUIET)
    assert seen["s"].lr == defaults["lr"] and seen["s"].max_epochs == defaults["max_epochs"]
    assert seen["s"].balance_classes == defaults["balance_classes"] and seen["s"].split_bank
    assert seen["s"].keep_epoch == defaults["keep_epoch"]
    model.train(**QUIET, lr=0.5, balance_classes=not defaults["balance_classes"], split_bank=False)  # given: kept
    assert seen["s"].lr == 0.5 and seen["s"].balance_classes != defaults["balance_classes"] and not seen["s"].split_bank

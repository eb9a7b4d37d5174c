import numpy as np
import pytest
import torch
from scipy import sparse

from scanpy_canal.nn import (
    SCBERT_CONFIG,
    CANALHead,
    CheckpointError,
    PerformerLM,
    load_scbert_checkpoint,
    set_trainable,
    tokenize,
)
from scanpy_canal.nn import _attention as attention_module
from scanpy_canal.nn._attention import favor_attention, orthogonal_random_features, reference_favor_attention
from scanpy_canal.nn._performer import ORDINAL_NOISE, ORDINAL_STEP

TINY = {"dim": 16, "depth": 3, "heads": 2, "dim_head": 8, "max_seq_len": 33}


@pytest.fixture(scope="module")
def scbert():
    return PerformerLM(**SCBERT_CONFIG)


def test_scbert_state_dict_matches_checkpoint_layout(scbert):
    state = scbert.state_dict()
    assert len(state) == 91
    assert sum(p.numel() for p in scbert.parameters()) == 8_388_607
    expected = {
        "token_emb.weight": (7, 200),
        "pos_emb.emb.weight": (16907, 200),
        "performer.calls_since_last_redraw": (),
        "norm.weight": (200,),
        "to_out.weight": (7, 200),
        "to_out.bias": (7,),
    }
    block = {
        "0.norm.weight": (200,),
        "0.norm.bias": (200,),
        "0.fn.fast_attention.projection_matrix": (266, 64),
        "0.fn.to_q.weight": (640, 200),
        "0.fn.to_k.weight": (640, 200),
        "0.fn.to_v.weight": (640, 200),
        "0.fn.to_out.weight": (200, 640),
        "0.fn.to_out.bias": (200,),
        "1.norm.weight": (200,),
        "1.norm.bias": (200,),
        "1.fn.fn.w1.weight": (800, 200),
        "1.fn.fn.w1.bias": (800,),
        "1.fn.fn.w2.weight": (200, 800),
        "1.fn.fn.w2.bias": (200,),
    }
    for i in range(6):
        expected.update({f"performer.net.layers.{i}.{k}": v for k, v in block.items()})
    expected["norm.bias"] = (200,)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert state["performer.calls_since_last_redraw"].dtype == torch.int64
    assert not scbert.pos_emb.emb.weight.requires_grad
    assert torch.all(scbert.pos_emb.emb.weight[-1] == 0)


def test_batch_equals_cells_one_at_a_time():
    torch.manual_seed(0)
    lm = PerformerLM(**TINY).eval()
    tokens = torch.randint(0, 6, (6, 33))
    tokens[0] = 5  # a cell with very different key magnitudes must not shift the others
    with torch.no_grad():
        batched = lm.encode(tokens)
        single = torch.cat([lm.encode(tokens[i : i + 1]) for i in range(6)])
    assert (batched - single).abs().max() <= 1e-5


def test_fused_attention_equals_the_scbert_formula():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 40, 8, dtype=torch.float64) * 2 for _ in range(3))
    projection = orthogonal_random_features(20, 8).double()
    fused = favor_attention(q, k, v, projection)
    assert torch.allclose(fused, reference_favor_attention(q, k, v, projection), rtol=1e-10, atol=1e-12)


def test_cpu_attention_chunks_give_the_whole_batch_result(monkeypatch):
    torch.manual_seed(0)
    lm = PerformerLM(**TINY).eval()
    tokens = torch.randint(0, 6, (5, 33))
    with torch.no_grad():
        whole = lm.encode(tokens)
        monkeypatch.setattr(attention_module, "CPU_FEATURE_MAP_CHUNK", 2 * 33 * lm.config["nb_features"])
        chunked = lm.encode(tokens)  # one cell per chunk
    assert (whole - chunked).abs().max() <= 1e-6


def test_forward_and_encode_shapes():
    lm = PerformerLM(**TINY)
    tokens = torch.randint(0, 7, (4, 20))
    assert lm(tokens).shape == (4, 20, 7)
    assert lm.encode(tokens).shape == (4, 20, 16)
    with pytest.raises(ValueError, match="positions"):
        lm(torch.zeros(1, 34, dtype=torch.long))


def test_features_redrawn_only_in_training_every_interval():
    torch.manual_seed(0)
    lm = PerformerLM(**TINY, feature_redraw_interval=3)
    tokens = torch.randint(0, 6, (2, 33))
    projections = lambda: [m.projection_matrix.clone() for m in lm.modules() if hasattr(m, "projection_matrix")]
    before = projections()
    lm.train()
    for expected_count in (1, 2, 3):
        lm(tokens)
        assert lm.performer.calls_since_last_redraw.item() == expected_count
        assert all(torch.equal(a, b) for a, b in zip(before, projections(), strict=True))
    lm(tokens)  # the fourth call redraws every layer, frozen or not, and resets the counter
    assert lm.performer.calls_since_last_redraw.item() == 0
    assert not any(torch.equal(a, b) for a, b in zip(before, projections(), strict=True))

    lm.eval()
    counter = lm.performer.calls_since_last_redraw.item()
    with torch.no_grad():
        outputs = [lm(tokens) for _ in range(5)]
    assert lm.performer.calls_since_last_redraw.item() == counter
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])


def test_local_attention_heads():
    lm = PerformerLM(**TINY, local_attn_heads=1, local_window_size=8).eval()
    tokens = torch.randint(0, 6, (2, 33))
    assert lm.encode(tokens).shape == (2, 33, 16)
    with pytest.raises(ValueError, match="local_attn_heads"):
        PerformerLM(**TINY, local_attn_heads=3)


def test_tokenize_sparse_dense_and_tensor_agree():
    rng = np.random.default_rng(0)
    values = rng.exponential(2.0, size=(7, 12)) * (rng.random((7, 12)) < 0.4)
    expected = np.minimum(np.floor(values), 5).astype(np.int64)
    for x in (values, sparse.csr_matrix(values), sparse.csc_matrix(values), torch.from_numpy(values)):
        tokens = tokenize(x)
        assert tokens.dtype == torch.long
        assert tokens.shape == (7, 13)
        np.testing.assert_array_equal(tokens[:, :-1].numpy(), expected)
        assert torch.all(tokens[:, -1] == 0)


def test_tokenize_bins_follow_counts_per_10k():
    cp10k = np.array([[0.0, 0.5, 1.0, 2.9, 3.0, 7.0, 15.0, 31.0, 1e4]])
    assert tokenize(np.log2(1 + cp10k)).tolist() == [[0, 0, 1, 1, 2, 3, 4, 5, 5, 0]]


def test_head_outputs_and_class_expansion():
    torch.manual_seed(0)
    head = CANALHead(seq_len=33, dim=16, n_classes=3)
    hidden = torch.randn(5, 33, 16)
    manifold, embedding, logits = head(hidden)
    assert manifold.shape == (5, 128) and embedding.shape == (5, 64) and logits.shape == (5, 3)
    assert torch.all(embedding >= 0)
    old_weight, old_bias = head.fc3.weight.clone(), head.fc3.bias.clone()
    head.add_classes(2)
    assert head.n_classes == 5
    assert torch.equal(head.fc3.weight[:3], old_weight) and torch.equal(head.fc3.bias[:3], old_bias)
    torch.testing.assert_close(head(hidden)[2][:, :3], logits, rtol=0, atol=1e-6)


def test_set_trainable_matches_canal_count():
    lm = PerformerLM(**{**SCBERT_CONFIG, "max_seq_len": 1001})
    lm.to_out = CANALHead(seq_len=1001, dim=200, n_classes=7)
    names = set_trainable(lm)
    assert sum(p.numel() for p in lm.parameters() if p.requires_grad) == 971_568
    assert all(n.startswith(("performer.net.layers.4.", "norm.", "to_out.")) for n in names)
    set_trainable(lm, blocks=(-1, -2), norm=False)
    assert lm.performer.net.layers[5][0].norm.weight.requires_grad and not lm.norm.weight.requires_grad
    with pytest.raises(IndexError, match="6 blocks"):
        set_trainable(lm, blocks=(6,))


def _write_checkpoint(path, model, **extra):
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(), "losses": [1.0], **extra}, path)


def test_load_scbert_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    source = PerformerLM(**TINY)
    path = tmp_path / "panglao_pretrain.pth"
    _write_checkpoint(path, source, optimizer_state_dict={"state": {}, "param_groups": []})
    loaded = load_scbert_checkpoint(path)
    assert loaded.config == source.config
    tokens = torch.randint(0, 6, (3, 33))
    source.eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens), source(tokens))


def test_load_scbert_checkpoint_selects_gene_rows(tmp_path):
    source = PerformerLM(**TINY)
    path = tmp_path / "ckpt.pth"
    _write_checkpoint(path, source)
    genes = [7, 2, 30]
    loaded = load_scbert_checkpoint(path, gene_indices=genes)
    table = loaded.pos_emb.emb.weight
    assert loaded.max_seq_len == 4
    assert torch.equal(table[:3], source.pos_emb.emb.weight[genes])
    assert torch.all(table[3] == 0)
    with pytest.raises(IndexError, match="32 genes"):
        load_scbert_checkpoint(path, gene_indices=[32])


def test_full_scbert_checkpoint_loads_strictly(tmp_path, scbert):
    path = tmp_path / "panglao_pretrain.pth"
    state = scbert.state_dict()
    state["pos_emb.emb.weight"] = state["pos_emb.emb.weight"].double()  # gene2vec is sometimes stored as float64
    torch.save({"model_state_dict": state}, path)
    loaded = load_scbert_checkpoint(path, gene_indices=np.arange(1000))
    assert loaded.config["max_seq_len"] == 1001 and loaded.config["nb_features"] == 266
    assert loaded.pos_emb.emb.weight.dtype == torch.float32


def test_checkpoint_errors_name_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_scbert_checkpoint(tmp_path / "missing.pth")

    source = PerformerLM(**TINY)
    good = tmp_path / "good.pth"
    _write_checkpoint(good, source)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_scbert_checkpoint(truncated)

    state = source.state_dict()
    del state["performer.net.layers.1.0.fn.to_k.weight"]
    missing = tmp_path / "missing_key.pth"
    torch.save({"model_state_dict": state}, missing)
    with pytest.raises(CheckpointError, match=r"missing_key.pth.*layers\.1\.0\.fn\.to_k\.weight"):
        load_scbert_checkpoint(missing)

    state = source.state_dict()
    state["norm.weight"] = torch.zeros(5)
    wrong = tmp_path / "wrong_shape.pth"
    torch.save({"model_state_dict": state}, wrong)
    with pytest.raises(CheckpointError, match=r"wrong_shape.pth.*'norm.weight'.*\(5,\)"):
        load_scbert_checkpoint(wrong)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_pickled_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "hostile.pth"
    torch.save({"model_state_dict": {}, "extra": _Payload()}, path)
    with pytest.raises(CheckpointError, match="hostile.pth"):
        load_scbert_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


def test_ordinal_token_embedding():
    small = {"max_seq_len": 11, "dim": 16, "depth": 2, "heads": 2, "dim_head": 8}
    torch.manual_seed(0)
    ordinal = PerformerLM(**small)
    torch.manual_seed(0)
    normal = PerformerLM(**small, token_init="normal")
    assert ordinal.config["token_init"] == "ordinal" and normal.config["token_init"] == "normal"
    # No random number is drawn for the order, so every other weight starts as with the standard normal rows.
    normal_state = normal.state_dict()
    for key, value in ordinal.state_dict().items():
        if key != "token_emb.weight":
            assert torch.equal(value, normal_state[key]), key
    bins, start = ordinal.token_emb.weight.detach(), normal.token_emb.weight.detach()
    torch.testing.assert_close(bins[-1], start[-1])  # the mask token keeps its row
    steps = (bins[:-1] - ORDINAL_NOISE * start[:-1]).diff(dim=0)
    torch.testing.assert_close(steps, steps[:1].expand_as(steps))
    assert steps[0].norm().item() == pytest.approx(ORDINAL_STEP * 16**0.5, rel=1e-5)
    assert (torch.diff(bins[:-1] @ steps[0]) > 0).all()  # the bins are ordered along the step
    with pytest.raises(ValueError, match="token_init"):
        PerformerLM(**small, token_init="uniform")


def test_encoder_start_options_keep_the_checkpoint_layout():
    """A smaller bin step, zero residual branches and the head along the bins change the start, not the state dict:
    a scBERT-shaped state dict loads into each with ``strict=True``."""
    small = {"max_seq_len": 11, "dim": 16, "depth": 2, "heads": 2, "dim_head": 8}
    reference = PerformerLM(**small, token_init="normal").state_dict()
    stepped = PerformerLM(**small, bin_step=0.25)
    identity = PerformerLM(**small, residual_init="zero")
    tokens = torch.randint(0, 6, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(identity.encode(tokens), identity.norm(identity.embed(tokens)))
    for model in (stepped, identity):
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.items()}
        model.load_state_dict(reference, strict=True)
    for option in ({"residual_init": "ones"}, {"bin_step": 0}):
        with pytest.raises(ValueError, match=next(iter(option))):
            PerformerLM(**small, **option)


def test_bin_step_sets_the_distance_between_bins():
    small = {"max_seq_len": 11, "dim": 16, "depth": 1, "heads": 2, "dim_head": 8}
    torch.manual_seed(0)
    start = PerformerLM(**small, token_init="normal").token_emb.weight.detach()
    torch.manual_seed(0)
    bins = PerformerLM(**small, bin_step=0.25).token_emb.weight.detach()
    steps = (bins[:-1] - ORDINAL_NOISE * start[:-1]).diff(dim=0)
    assert steps[0].norm().item() == pytest.approx(0.25 * 16**0.5, rel=1e-5)


def test_head_along_the_bins_scores_genes_by_their_bin():
    """With identity blocks and no gene table, the head's per-gene score rises with the expression bin."""
    from scanpy_canal.model._module import CANALModule

    arch = {"dim": 16, "depth": 2, "heads": 2, "dim_head": 8, "residual_init": "zero", "head_init": "bins"}
    module = CANALModule(n_genes=6, n_classes=2, arch=arch)
    with torch.no_grad():
        module.network.pos_emb.emb.weight.zero_()
        hidden = module.network.encode(torch.tensor([[0, 1, 2, 3, 4, 5, 0]]))
        head = module.head
        scores = torch.nn.functional.linear(hidden, head.conv1.weight.view(1, -1), head.conv1.bias)[0, :6, 0]
    assert (scores.diff() > 0).all()
    with pytest.raises(ValueError, match="head_init"):
        CANALModule(n_genes=6, n_classes=2, arch={**arch, "head_init": "uniform"})

"""Speed paths: precision by device, the compiled and exact forward passes, prediction on two processes, the stage
time estimate and the per-batch progress bar."""

import logging
import warnings

import numpy as np
import pytest
import torch
from conftest import QUIET, TINY_ARCH, make_model

from scanpy_canal.model import _precision
from scanpy_canal.model._precision import resolve_precision
from scanpy_canal.model._streaming import read_ahead
from scanpy_canal.nn import PerformerLM, exact_attention


@pytest.fixture
def trained(small_stream):
    model = make_model(small_stream)
    model.train(max_epochs=3, batch_size=16, **QUIET)
    return model


@pytest.mark.parametrize(
    ("flags", "cuda", "device", "expected"),
    [
        ({"avx2"}, False, "cpu", "32"),
        ({"avx2", "avx512_bf16"}, False, "cpu", "bf16"),
        ({"avx2", "amx_bf16"}, False, "cpu", "bf16"),
        ({"avx2"}, True, "cuda", "bf16"),
        ({"avx2"}, False, "mps", "32"),
    ],
)
def test_auto_precision_follows_the_device(monkeypatch, flags, cuda, device, expected):
    monkeypatch.setattr(_precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("auto", device) == expected
        assert resolve_precision("32", device) == "32"


def test_bf16_on_a_cpu_without_it_warns_what_it_costs(monkeypatch):
    monkeypatch.setattr(_precision, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.warns(UserWarning, match=r"emulated: about 5x slower than float32"):
        assert resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(_precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_precision("bf16", "cpu")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real reader, not conftest's stand-in
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
    assert {"avx2", "avx512_bf16"} <= _precision.cpu_flags(str(cpuinfo))
    assert _precision.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_compiled_network_equals_eager():
    torch.manual_seed(0)
    network = PerformerLM(max_seq_len=33, **TINY_ARCH).eval()
    tokens = torch.randint(0, 6, (5, 33))
    with torch.inference_mode():
        eager = network(tokens)
        compiled = torch.compile(network, dynamic=False)(tokens)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_compiled_prediction_equals_eager(trained, stream_query):
    eager = trained.predict(stream_query, soft=True, precision="32", compile=False)
    compiled = trained.predict(stream_query, soft=True, precision="32", compile=True, batch_size=32)
    np.testing.assert_allclose(compiled.to_numpy(), eager.to_numpy(), rtol=1e-4, atol=1e-5)


def test_exact_attention_is_softmax_attention_and_only_within_its_block():
    torch.manual_seed(0)
    network = PerformerLM(max_seq_len=17, **TINY_ARCH).eval()
    attention = network.performer.net.layers[0][0].fn
    x = torch.randn(3, 17, TINY_ARCH["dim"])
    q, k, v = (proj(x).view(3, 17, 2, 8).transpose(1, 2) for proj in (attention.to_q, attention.to_k, attention.to_v))
    softmax = ((q @ k.transpose(-2, -1)) / 8**0.5).softmax(dim=-1) @ v
    expected = attention.to_out(softmax.transpose(1, 2).reshape(3, 17, 16))
    with torch.no_grad(), exact_attention(network):
        torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-5)
    assert not attention.exact
    with torch.no_grad():
        assert not torch.allclose(attention(x), expected, atol=1e-3)  # FAVOR+ again


def test_read_ahead_keeps_order_and_raises_errors():
    assert list(read_ahead(range(5), lambda i: i * i)) == [0, 1, 4, 9, 16]

    def fail(i):
        if i == 3:
            raise KeyError("bad chunk")
        return i

    with pytest.raises(KeyError, match="bad chunk"):
        list(read_ahead(range(5), fail))
    first = next(iter(read_ahead(range(100), lambda i: i)))  # a consumer that stops early leaves no thread behind
    assert first == 0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_process_annotation_equals_one_process_in_order(trained, stream_query, tmp_path, monkeypatch):
    from scanpy_canal import tl

    monkeypatch.chdir(tmp_path)
    expected = tl.annotate(stream_query, trained, novel=True, precision="32", copy=True)
    # two spawned processes on the CPU (gloo), the cells in uneven chunks shared unevenly between them
    distributed = tl.annotate(
        stream_query, trained, novel=True, precision="32", devices=2, strategy="ddp_spawn", chunk_size=17, copy=True
    )
    assert list(distributed.obs_names) == list(stream_query.obs_names)
    np.testing.assert_allclose(distributed.obsm["canal_probabilities"], expected.obsm["canal_probabilities"], atol=1e-6)
    np.testing.assert_allclose(distributed.obsm["X_canal"], expected.obsm["X_canal"], atol=1e-5)
    assert (distributed.obs["canal_prediction"] == expected.obs["canal_prediction"]).all()
    assert next(trained.module.parameters()).device.type == "cpu" and not list(tmp_path.iterdir())


def test_stage_time_is_estimated_once_from_the_first_batches(small_stream, monkeypatch, caplog):
    from scanpy_canal.model import _progress

    monkeypatch.setattr(_progress, "LONG_STAGE_S", 0)  # every stage counts as long
    model = make_model(small_stream)
    with caplog.at_level(logging.INFO, logger="scanpy_canal"):
        model.train(max_epochs=3, batch_size=8, **QUIET)
    said = [r for r in caplog.records if "Stage 1: about" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "for up to 3 epochs of" in said[0].getMessage() and "a smaller encoder" in said[0].getMessage()


def test_progress_bar_moves_every_batch(small_stream, capsys):
    model = make_model(small_stream)
    model.train(max_epochs=2, batch_size=8, **{**QUIET, "enable_progress_bar": True})
    err = capsys.readouterr().err
    assert "batch" in err and "Stage 1: 100%" in err
    total = int(err.split("Stage 1: 100%|")[1].split("/")[1].split(" ")[0])
    assert total > 2  # batches, not epochs


def test_a_long_pass_is_announced_once_from_its_first_batches(monkeypatch, caplog):
    from scanpy_canal.model import _progress

    monkeypatch.setattr(_progress, "LONG_STAGE_S", 0)
    timer = _progress.PassTimer(100, 10, "Computing the frozen blocks", {"dim": 200, "depth": 6, "max_seq_len": 1001})
    with caplog.at_level(logging.INFO, logger="scanpy_canal"):
        for _ in range(10):
            timer.batch_done(torch.device("cpu"))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("Computing the frozen blocks for 100 cells: about")
    assert "dim 200, 6 blocks, 1,001 tokens" in said[0] and "a smaller encoder" in said[0]

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import QUIET, TINY_ARCH, make_model, register

import scanpy_canal as canal
from scanpy_canal.nn import IGNORE_INDEX, MASK_TOKEN, CheckpointError, mask_tokens

TRAINER = {"enable_progress_bar": False, "enable_model_summary": False}


def exact_ceil(n: torch.Tensor, percent: int = 15) -> torch.Tensor:
    """ceil(percent / 100 * n) in integers, free of floating-point error."""
    return -((-percent * n) // 100)


def random_tokens(n_cells: int, n_positions: int, seed: int = 0) -> torch.Tensor:
    """Tokens with many zeros, some mask/pad tokens and the appended zero, like real tokenised cells."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 6, (n_cells, n_positions), generator=generator)
    tokens[torch.rand(n_cells, n_positions, generator=generator) < 0.6] = 0
    tokens[torch.rand(n_cells, n_positions, generator=generator) < 0.05] = MASK_TOKEN
    tokens[:, -1] = 0
    return tokens


# ---------------------------------------------------------------------------------------------------- masking


def test_mask_chooses_exactly_ceil_15_percent_of_nonzero_bins():
    tokens = random_tokens(500, 80)
    tokens[0] = 0  # a cell without expressed genes: nothing to mask
    tokens[1, :20], tokens[1, 20:] = 1, 0  # 20 bins: 0.15 * 20 is 3.0000000000000004 in floating point
    inputs, labels = mask_tokens(tokens, generator=torch.Generator().manual_seed(1))
    chosen = labels != IGNORE_INDEX
    maskable = (tokens != 0) & (tokens != MASK_TOKEN)
    assert chosen.sum(dim=1).tolist() == exact_ceil(maskable.sum(dim=1)).tolist()
    assert chosen[0].sum() == 0 and chosen[1].sum() == 3
    assert not (chosen & ~maskable).any()  # never a zero bin, the appended token or a mask/pad token
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])  # everything else is untouched
    replaced = inputs[chosen] == MASK_TOKEN
    assert ((inputs[chosen] == tokens[chosen]) | replaced).all()  # kept or masked, never a random token


def test_mask_replaces_about_90_percent_and_chooses_positions_uniformly():
    tokens = random_tokens(4000, 60, seed=2)
    inputs, labels = mask_tokens(tokens, generator=torch.Generator().manual_seed(3))
    chosen = labels != IGNORE_INDEX
    fraction = (inputs[chosen] == MASK_TOKEN).float().mean().item()
    assert fraction == pytest.approx(0.9, abs=0.01)  # about 20,000 chosen tokens: standard error 0.002

    cell = torch.tensor([[3, 0, 1, 2, 0, 5, 4, 1, 1, 2, 0, 0]])  # 8 bins, 2 chosen per draw
    inputs, labels = mask_tokens(cell.repeat(8000, 1), generator=torch.Generator().manual_seed(4))
    frequency = (labels != IGNORE_INDEX).float().mean(dim=0)
    nonzero = cell[0] != 0
    assert torch.allclose(frequency[nonzero], torch.full((8,), 2 / 8), atol=0.02)
    assert (frequency[~nonzero] == 0).all()


def test_mask_settings_and_errors():
    tokens = random_tokens(50, 30)
    inputs, labels = mask_tokens(tokens, mask_prob=0.0)
    assert (labels == IGNORE_INDEX).all() and torch.equal(inputs, tokens)
    inputs, labels = mask_tokens(tokens, replace_prob=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(inputs, tokens) and (labels != IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(tokens, mask_prob=1.5)


def test_masked_loss_and_accuracy_count_only_masked_positions():
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 5]])
    logits = torch.zeros(1, 4, 7)
    logits[0, 1, 2] = logits[0, 3, 1] = 10.0  # right at position 1, wrong at position 3
    logits[0, 0, 4] = 10.0  # an unmasked position never counts
    assert canal.nn.masked_accuracy_counts(logits, labels).tolist() == [1, 2]
    expected = (torch.nn.functional.cross_entropy(logits[0, [1, 3]], torch.tensor([2, 5]))).item()
    assert canal.nn.masked_lm_loss(logits, labels).item() == pytest.approx(expected)
    none_masked = torch.full((1, 4), IGNORE_INDEX)
    assert canal.nn.masked_lm_loss(logits, none_masked).item() == 0.0


def test_loss_falls_over_a_few_steps_on_a_tiny_model():
    torch.manual_seed(0)
    encoder = canal.nn.PerformerLM(max_seq_len=41, **TINY_ARCH)
    # Each gene has its own bin when expressed, so its positional row predicts a masked bin.
    tokens = torch.where(random_tokens(32, 41, seed=5) > 0, torch.arange(41) % 5 + 1, 0)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        inputs, labels = mask_tokens(tokens, generator=torch.Generator().manual_seed(step))
        loss = canal.nn.masked_lm_loss(encoder(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


# ------------------------------------------------------------------------------------------- pretrain round trip


@pytest.fixture(scope="module")
def pretrained_dir(small_stream, tmp_path_factory):
    """A tiny encoder pretrained over 40 genes in reversed order; returns (directory, history, vocabulary)."""
    vocabulary = [f"gene_{i}" for i in reversed(range(40))]
    path = tmp_path_factory.mktemp("pretrain") / "encoder"
    cells = ad.concat(small_stream.train)
    history = canal.pretrain(
        cells, path, genes=vocabulary, max_epochs=3, lr=3e-3, accelerator="cpu", trainer_kwargs=TRAINER, **TINY_ARCH
    )
    return path, history, vocabulary


def test_pretrain_writes_weights_vocabulary_architecture_and_history(pretrained_dir):
    path, history, vocabulary = pretrained_dir
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "genes.txt", "history.csv", "weights.pt"]
    assert (path / "genes.txt").read_text().splitlines() == vocabulary
    config = json.loads((path / "config.json").read_text())
    assert config["format_version"] == 1 and config["n_genes"] == 40
    assert config["arch"]["max_seq_len"] == 41 and config["arch"]["dim"] == TINY_ARCH["dim"]
    assert config["tokens"]["mask_token"] == MASK_TOKEN and config["info"]["pretraining"]["max_epochs"] == 3
    weights = torch.load(path / "weights.pt", weights_only=True)["model_state_dict"]
    assert weights["pos_emb.emb.weight"].shape == (41, TINY_ARCH["dim"])
    assert history["epoch"].tolist() == [1, 2, 3]
    assert {"loss_train", "masked_accuracy_train", "masked_accuracy_validation"} <= set(history.columns)
    assert history["masked_accuracy_train"].between(0, 1).all()
    assert history["loss_train"].iloc[-1] < history["loss_train"].iloc[0]
    pd.testing.assert_frame_equal(pd.read_csv(path / "history.csv"), history, check_dtype=False)
    encoder, genes = canal.nn.load_pretrained(path)
    assert genes == vocabulary and encoder.max_seq_len == 41


def test_pretrained_directory_loads_into_canal_by_gene_name(pretrained_dir, small_stream):
    path, _, vocabulary = pretrained_dir
    source = torch.load(path / "weights.pt", weights_only=True)["model_state_dict"]
    panel = ["gene_3", "gene_50", "gene_0", "gene_39", "gene_55", "gene_17"]  # gene_50, gene_55: not in vocabulary
    model = canal.CANAL(register(small_stream.train[0]), pretrained=path, genes=panel)
    assert model.genes == ["gene_3", "gene_0", "gene_39", "gene_17"]
    rows = model.module.network.pos_emb.emb.weight
    for position, gene in enumerate(model.genes):
        torch.testing.assert_close(rows[position], source["pos_emb.emb.weight"][vocabulary.index(gene)])
    assert torch.all(rows[-1] == 0)  # the appended token
    network = model.module.network.state_dict()
    for key in ("token_emb.weight", "performer.net.layers.1.0.fn.to_q.weight", "norm.weight"):
        torch.testing.assert_close(network[key], source[key])
    model.train(max_epochs=1, **QUIET)
    assert len(model.predict(small_stream.test[0])) == small_stream.test[0].n_obs

    same = canal.CANAL(register(small_stream.train[0]), pretrained=path, pretrained_genes=vocabulary, genes=panel)
    assert same.genes == model.genes
    with pytest.raises(ValueError, match="differs from"):
        canal.CANAL(register(small_stream.train[0]), pretrained=path, pretrained_genes=vocabulary[::-1])


def test_pretrain_refuses_existing_directory_before_training(pretrained_dir, small_stream):
    path, _, _ = pretrained_dir
    with pytest.raises(FileExistsError, match="overwrite=True"):
        canal.pretrain(small_stream.train[0], path, max_epochs=50, **TINY_ARCH)
    with pytest.raises(ValueError, match="max_seq_len"):
        canal.pretrain(small_stream.train[0], path.parent / "other", max_seq_len=7, **TINY_ARCH)
    with pytest.raises(TypeError, match="trainer_kwargs"):
        canal.pretrain(small_stream.train[0], path.parent / "other", precision="bf16-mixed", **TINY_ARCH)
    with pytest.raises(ValueError, match="mask_prob"):
        canal.pretrain(small_stream.train[0], path.parent / "other", mask_prob=1.5, **TINY_ARCH)
    assert not (path.parent / "other").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pretrain_on_two_spawned_processes_returns_weights_and_history(small_stream, tmp_path):
    history = canal.pretrain(
        small_stream.train[0],
        tmp_path / "encoder",
        max_epochs=2,
        lr=3e-3,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        trainer_kwargs=TRAINER,
        **TINY_ARCH,
    )
    assert history["epoch"].tolist() == [1, 2] and history["masked_accuracy_train"].between(0, 1).all()
    encoder, _ = canal.nn.load_pretrained(tmp_path / "encoder")
    torch.manual_seed(0)  # pretrain's seed: the initial weights
    initial = canal.nn.PerformerLM(max_seq_len=encoder.max_seq_len, **TINY_ARCH)
    assert not torch.equal(encoder.token_emb.weight, initial.token_emb.weight)  # trained in the workers
    torch.testing.assert_close(encoder.pos_emb.emb.weight, initial.pos_emb.emb.weight)  # the gene table is frozen


def test_save_pretrained_overwrite_and_bad_vocabularies(tmp_path):
    encoder = canal.nn.PerformerLM(max_seq_len=4, **TINY_ARCH)
    path = canal.nn.save_pretrained(encoder, tmp_path / "enc", ["a", "b", "c"])
    with pytest.raises(FileExistsError):
        canal.nn.save_pretrained(encoder, path, ["a", "b", "c"])
    canal.nn.save_pretrained(encoder, path, ["x", "y", "z"], overwrite=True)
    assert canal.nn.load_pretrained(path)[1] == ["x", "y", "z"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]  # no staging or retired directories left
    with pytest.raises(ValueError, match="3 gene positions"):
        canal.nn.save_pretrained(encoder, tmp_path / "short", ["a", "b"])
    with pytest.raises(ValueError, match="duplicated"):
        canal.nn.save_pretrained(encoder, tmp_path / "dup", ["a", "b", "a"])
    assert not (tmp_path / "short").exists() and not (tmp_path / "dup").exists()


def test_vocabulary_length_mismatch_is_an_error(pretrained_dir, tmp_path, small_stream):
    path, _, vocabulary = pretrained_dir
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "weights.pt"):
        (damaged / name).write_bytes((path / name).read_bytes())
    (damaged / "genes.txt").write_text("\n".join(vocabulary[:-1]) + "\n")
    with pytest.raises(ValueError, match="vocabulary has 39 genes .* gene table of 41 rows"):
        canal.CANAL(register(small_stream.train[0]), pretrained=damaged)


# ------------------------------------------------------------------------------------------------ scBERT format


@pytest.fixture(scope="module")
def scbert_file(tmp_path_factory):
    """A checkpoint in scBERT's layout with random weights over a 100-gene vocabulary (panel genes shuffled in)."""
    torch.manual_seed(1)
    source = canal.nn.PerformerLM(max_seq_len=101, **TINY_ARCH)
    vocabulary = [f"other_{i}" for i in range(60)] + [f"gene_{i}" for i in range(40)]
    vocabulary = [vocabulary[i] for i in np.random.default_rng(0).permutation(100)]
    path = tmp_path_factory.mktemp("scbert") / "panglao_pretrain.pth"
    content = {"epoch": 3, "model_state_dict": source.state_dict(), "optimizer_state_dict": {}, "losses": 1.0}
    torch.save(content, path)
    return path, source, vocabulary


@pytest.mark.parametrize("form", ["list", "txt", "h5ad"])
def test_scbert_checkpoint_loads_by_gene_names(scbert_file, small_stream, tmp_path, form):
    path, source, vocabulary = scbert_file
    if form == "list":
        genes = vocabulary
    elif form == "txt":
        genes = tmp_path / "genes.txt"
        genes.write_text("\n".join(vocabulary) + "\n")
    else:
        genes = tmp_path / "genes.h5ad"
        ad.AnnData(np.zeros((1, 100), np.float32), var=pd.DataFrame(index=vocabulary)).write_h5ad(genes)
    data = register(small_stream.train[0])
    model = canal.CANAL(data, pretrained=path, pretrained_genes=genes)
    assert model.genes == [f"gene_{i}" for i in range(40)]  # gene_40..59 are not in the vocabulary
    rows = model.module.network.pos_emb.emb.weight
    for position, gene in enumerate(model.genes):
        torch.testing.assert_close(rows[position], source.pos_emb.emb.weight[vocabulary.index(gene)])
    torch.testing.assert_close(
        model.module.network.performer.net.layers[0][1].fn.fn.w1.weight,
        source.performer.net.layers[0][1].fn.fn.w1.weight,
    )


def test_scbert_checkpoint_errors(scbert_file, small_stream):
    path, _, vocabulary = scbert_file
    data = register(small_stream.train[0])
    with pytest.raises(ValueError, match="vocabulary has 101 genes"):
        canal.CANAL(data, pretrained=path, pretrained_genes=[*vocabulary, "extra"])
    with pytest.raises(ValueError, match="needs its gene vocabulary"):
        canal.CANAL(data, pretrained=path)
    with pytest.raises(ValueError, match="None of the"):
        canal.CANAL(data, pretrained=path, pretrained_genes=[f"x{i}" for i in range(100)])


# ------------------------------------------------------------------------------------------- legacy checkpoints


@pytest.fixture(scope="module")
def legacy(small_stream, tmp_path_factory):
    """A stage-1 model, and a checkpoint in the original tool's layout written from it."""
    model = make_model(small_stream)
    model.train(max_epochs=1, rehearsal_size=20, **QUIET)
    # The original's vocabulary holds the panel genes in panel order, among others (highly_variable_idx ascending).
    is_panel = np.random.default_rng(0).permutation([True] * len(model.genes) + [False] * 25)
    panel, others = iter(model.genes), iter(f"other_{i}" for i in range(25))
    vocabulary = [next(panel) if flag else next(others) for flag in is_panel]
    bank = model.example_bank.copy()
    bank.obs = pd.DataFrame(
        {"celltype": bank.obs["cell_type"].astype(str), "rank": bank.obs["rank"], "stage": bank.obs["stage"]},
        index=bank.obs_names,
    )
    content = {
        "model_state_dict": model.module.network.state_dict(),
        "annotation": np.array(model.cell_types, dtype=object),
        "highly_variable_idx": np.flatnonzero(is_panel),
        "example_bank": bank,
    }
    directory = tmp_path_factory.mktemp("legacy") / "exp" / "stage_1"
    directory.mkdir(parents=True)
    path = directory / "exp_finetune_dataset_first_CANAL.pth"
    torch.save(content, path)
    final = directory / "exp_finetune_dataset_final_CANAL.pth"
    torch.save({key: value for key, value in content.items() if key != "example_bank"}, final)
    return {"path": path, "final": final, "vocabulary": vocabulary, "panel": model.genes, "source": model}


def test_legacy_checkpoint_with_pickled_bank_is_refused_without_trust(legacy):
    with pytest.raises(CheckpointError, match="arbitrary code.*trust_pickle=True"):
        canal.CANAL.from_legacy_checkpoint(legacy["path"], legacy["vocabulary"])


def test_legacy_checkpoint_loads_with_trust_and_predicts(legacy, small_stream):
    model = canal.CANAL.from_legacy_checkpoint(legacy["path"], legacy["vocabulary"], trust_pickle=True)
    source = legacy["source"]
    assert model.genes == legacy["panel"] and model.cell_types == source.cell_types
    assert model.stage == 1  # from the stage_1 directory
    bank = model.example_bank
    assert bank.var_names.tolist() == legacy["panel"] and bank.obs["cell_type"].notna().all()
    assert {"cell_type", "stage", "rank"} <= set(bank.obs.columns)
    test = small_stream.test[0]
    np.testing.assert_array_equal(model.predict(test), source.predict(test))
    novel = model.predict(test, novel=True, threshold="canal")
    assert len(novel) == test.n_obs
    model.train(register(small_stream.train[1]), max_epochs=1, **QUIET)  # continues with the next stage
    assert model.stage == 2 and len(model.cell_types) > len(source.cell_types)


def test_legacy_final_checkpoint_loads_without_pickle_and_accepts_the_panel(legacy, small_stream, tmp_path):
    genes = tmp_path / "panel.txt"
    genes.write_text("\n".join(legacy["panel"]))
    model = canal.CANAL.from_legacy_checkpoint(legacy["final"], genes, stage=3)
    assert model.example_bank is None and model.stage == 3 and model.genes == legacy["panel"]
    test = small_stream.test[0]
    np.testing.assert_array_equal(model.predict(test), legacy["source"].predict(test))
    with pytest.raises(ValueError, match="highly_variable_idx"):
        canal.CANAL.from_legacy_checkpoint(legacy["final"], legacy["vocabulary"][:30])


def test_legacy_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        canal.CANAL.from_legacy_checkpoint(tmp_path / "missing.pth", ["a"])
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated"):
        canal.CANAL.from_legacy_checkpoint(truncated, ["a"])
    not_canal = tmp_path / "weights.pth"
    torch.save({"weights": torch.zeros(2)}, not_canal)
    with pytest.raises(CheckpointError, match="model_state_dict"):
        canal.CANAL.from_legacy_checkpoint(not_canal, ["a"])


# ------------------------------------------------------------------------------------------------------ the CLI


def test_cli_pretrain_writes_a_directory_and_reports_errors(small_stream, tmp_path, capsys):
    from scanpy_canal.cli import main

    data = tmp_path / "cells.h5ad"
    cells = small_stream.train[0].copy()
    cells.obs = cells.obs[[]]
    cells.write_h5ad(data)
    output = tmp_path / "encoder"
    arguments = ["pretrain", str(data), str(output), "--epochs", "1", "--accelerator", "cpu", "--quiet"]
    arch = ["--dim", "16", "--depth", "2", "--heads", "2", "--dim-head", "8"]
    assert main([*arguments, *arch]) == 0
    assert "masked-token accuracy" in capsys.readouterr().out
    encoder, genes = canal.nn.load_pretrained(output)
    assert genes == list(cells.var_names) and encoder.config["dim"] == 16

    assert main([*arguments, *arch]) == 1  # the output exists
    assert "already exists" in capsys.readouterr().err
    assert main(["pretrain", str(tmp_path / "missing.h5ad"), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("scanpy-canal: error:") and "does not exist" in error and error.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["pretrain", str(data), str(tmp_path / "out"), "--mask-prob", "2"])
    assert "expected a number in [0, 1)" in capsys.readouterr().err

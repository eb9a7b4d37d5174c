import subprocess
import sys
from dataclasses import MISSING, fields
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import scanpy_canal as canal
from scanpy_canal._demo import StreamResult
from scanpy_canal.pl import confusion, example_bank, stage_metrics, uncertainty


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def annotated(two_stage_model, small_stream):
    """Held-out and novel cells annotated with novel-cell detection, with a UMAP of the CANAL embedding."""
    import scanpy as sc

    query = ad.concat([*small_stream.test, small_stream.novel])
    query.obs_names_make_unique()
    canal.tl.annotate(query, two_stage_model, novel=True)
    sc.pp.neighbors(query, use_rep="X_canal")
    sc.tl.umap(query)
    return query


@pytest.fixture
def stream_result():
    names = ["stage 1", "stage 2", "stage 3"]
    accuracy = pd.DataFrame([[0.9, np.nan, np.nan], [0.8, 0.95, np.nan], [0.7, 0.9, 0.85]], index=names, columns=names)
    tables = {"accuracy": accuracy, "macro_f1": accuracy * 0.9}
    # Any further required table of StreamResult (e.g. accuracy with novel-cell detection) gets the accuracy.
    required = [f.name for f in fields(StreamResult) if f.default is MISSING and f.default_factory is MISSING]
    tables.update({name: accuracy * 0.8 for name in required if name not in tables and name != "final"})
    return StreamResult(**tables, final={"acc": 0.82})


def test_import_needs_no_torch():
    code = "import sys, scanpy_canal.pl; print(','.join(sorted({'torch', 'scvi', 'lightning'} & set(sys.modules))))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def saved(path):
    return path.is_file() and path.stat().st_size > 0


def legend_texts(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


def tick_texts(labels):
    return [label.get_text() for label in labels]


# ----------------------------------------------------------------------------------------------- stage_metrics
def test_stage_metrics_from_model(two_stage_model, tmp_path):
    history = two_stage_model.history
    ax = stage_metrics(two_stage_model, show=False, save=tmp_path / "stages.png")
    assert isinstance(ax, Axes) and saved(tmp_path / "stages.png")
    assert len(ax.figure.axes) == 1
    assert ax.get_xlabel() == "epoch (all stages)" and ax.get_ylabel() == "accuracy"
    assert legend_texts(ax) == ["validation", "train", "epoch kept"]
    boundary, validation, train, best = ax.lines  # one boundary between the two stages, then the curves
    assert len(validation.get_xdata()) == len(history) and train.get_linestyle() == "--"
    np.testing.assert_allclose(validation.get_ydata(), history["accuracy_validation"].to_numpy(dtype=float))
    assert len(best.get_xdata()) == history["best"].sum() == 2
    assert boundary.get_xdata()[0] == pytest.approx((history["stage"] == 1).sum() + 0.5)
    assert len(ax.patches) == 2  # one shaded span per stage
    assert [text.get_text() for text in ax.texts] == ["stage 1", "stage 2"]


def test_stage_metrics_loss_and_bad_metric(two_stage_model):
    ax = stage_metrics(two_stage_model, metric="loss", show=False)
    assert ax.get_ylabel() == "loss"
    train = next(line for line in ax.lines if line.get_label() == "train")
    np.testing.assert_allclose(train.get_ydata(), two_stage_model.history["train_loss"].to_numpy(dtype=float))
    with pytest.raises(ValueError, match="for a model"):
        stage_metrics(two_stage_model, metric="macro_f1", show=False)


def test_stage_metrics_from_stream_result(stream_result, tmp_path):
    ax = stage_metrics(stream_result, show=False, save=tmp_path / "stream.png")
    assert saved(tmp_path / "stream.png")
    assert ax.get_xlabel() == "after training" and ax.get_ylabel() == "accuracy"
    assert legend_texts(ax) == ["stage 1", "stage 2", "stage 3"]
    assert ax.get_legend().get_title().get_text() == "test set"
    assert [len(line.get_xdata()) for line in ax.lines] == [3, 2, 1]  # each test set from its own stage on
    assert list(ax.lines[0].get_ydata()) == [0.9, 0.8, 0.7]  # forgetting: a falling line
    assert tick_texts(ax.get_xticklabels()) == ["stage 1", "stage 2", "stage 3"]

    ax = stage_metrics(stream_result, metric="macro_f1", show=False)
    assert ax.get_ylabel() == "macro F1"
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.95 * 0.9, 0.9 * 0.9])
    with pytest.raises(ValueError, match="stream result"):
        stage_metrics(stream_result, metric="loss", show=False)


def test_stage_metrics_errors():
    with pytest.raises(ValueError, match="no training history"):
        stage_metrics(SimpleNamespace(history=pd.DataFrame()), show=False)
    with pytest.raises(TypeError, match="CANAL model or a StreamResult"):
        stage_metrics(pd.DataFrame(), show=False)


# ----------------------------------------------------------------------- ax / show / save / return_fig conventions
def test_return_fig_and_given_axes(stream_result):
    fig = stage_metrics(stream_result, show=False, return_fig=True)
    assert isinstance(fig, Figure) and len(fig.axes) == 1

    fig, (left, right) = plt.subplots(1, 2)
    assert stage_metrics(stream_result, ax=right, show=False) is right
    assert len(right.lines) == 3 and len(left.lines) == 0
    assert stage_metrics(stream_result, ax=left, show=False, return_fig=True) is fig


def test_show(stream_result, monkeypatch):
    import scanpy as sc

    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(True))
    assert stage_metrics(stream_result, show=True) is None and shown == [True]
    autoshow = sc.settings.autoshow
    try:
        sc.settings.autoshow = False
        assert isinstance(stage_metrics(stream_result), Axes) and shown == [True]
        sc.settings.autoshow = True
        assert stage_metrics(stream_result, return_fig=True) is None and shown == [True, True]
    finally:
        sc.settings.autoshow = autoshow


# --------------------------------------------------------------------------------------------------- confusion
def test_confusion_of_annotated_cells(annotated, tmp_path):
    ax = confusion(annotated, "cell_type", "canal_prediction", show=False, save=tmp_path / "confusion.png")
    assert saved(tmp_path / "confusion.png")
    truth = annotated.obs["cell_type"].astype(str)
    predicted = annotated.obs["canal_prediction"].astype(str)
    assert (predicted == "Unassigned").any()

    assert len(ax.figure.axes) == 2  # heatmap and colorbar
    (image,) = ax.images
    values = np.asarray(image.get_array())
    assert values.shape == (truth.nunique(), predicted.nunique())
    np.testing.assert_allclose(values.sum(axis=1), 1.0)
    rows, columns = tick_texts(ax.get_yticklabels()), tick_texts(ax.get_xticklabels())
    assert rows == sorted(truth.unique())  # the categories of cell_type, which are sorted
    assert columns[-1] == "Unassigned" and set(columns) == set(predicted)
    assert columns[:2] == ["type_0", "type_1"]  # true types first, in the row order
    assert ax.get_xlabel() == "predicted (canal_prediction)" and ax.get_ylabel() == "true (cell_type)"
    assert ax.get_xticklabels()[0].get_rotation() == 45
    assert len(ax.texts) == np.count_nonzero(values)  # few types: values written into the cells
    i, j = rows.index("type_4"), columns.index("Unassigned")
    assert values[i, j] == pytest.approx(
        ((truth == "type_4") & (predicted == "Unassigned")).sum() / (truth == "type_4").sum()
    )

    ax = confusion(annotated, "cell_type", "canal_prediction", normalize=False, annotate=False, show=False)
    counts = np.asarray(ax.images[0].get_array())
    assert counts.sum() == annotated.n_obs and len(ax.texts) == 0
    assert ax.figure.axes[1].get_ylabel() == "cells"


def test_confusion_many_types_keeps_category_order():
    rng = np.random.default_rng(0)
    types = [f"t{i:02d}" for i in range(20)][::-1]  # categories not in sorted order
    truth = pd.Categorical(rng.choice(types, 400), categories=types + ["absent"])
    pred = pd.Categorical(np.where(rng.random(400) < 0.8, truth.astype(str), "Unassigned"))
    adata = ad.AnnData(obs=pd.DataFrame({"truth": truth, "pred": pred}, index=[str(i) for i in range(400)]))

    ax = confusion(adata, "truth", "pred", show=False)
    assert np.asarray(ax.images[0].get_array()).shape == (20, 21)
    assert tick_texts(ax.get_yticklabels()) == types  # unused categories dropped
    assert tick_texts(ax.get_xticklabels()) == [*types, "Unassigned"]
    assert len(ax.texts) == 0  # more than 15 types: no values in the cells
    assert ax.get_yticklabels()[0].get_fontsize() < 10
    fig = confusion(adata, "truth", "pred", show=False, return_fig=True)
    assert isinstance(fig, Figure) and len(fig.axes) == 2


def test_confusion_missing_key(annotated):
    with pytest.raises(ValueError, match="pred='nope' is not a column"):
        confusion(annotated, "cell_type", "nope", show=False)


# ------------------------------------------------------------------------------------------------- uncertainty
def test_uncertainty_rings_unassigned_cells(annotated, tmp_path):
    ax = uncertainty(annotated, show=False, save=tmp_path / "uncertainty.png")
    assert isinstance(ax, Axes) and saved(tmp_path / "uncertainty.png")
    assert len(ax.figure.axes) == 2  # embedding and scanpy's colorbar
    n_unassigned = int((annotated.obs["canal_prediction"] == "Unassigned").sum())
    assert legend_texts(ax) == [f"Unassigned ({n_unassigned})"]
    rings = ax.collections[-1]
    assert len(rings.get_offsets()) == n_unassigned and len(rings.get_facecolors()) == 0
    np.testing.assert_allclose(
        rings.get_offsets(), annotated.obsm["X_umap"][(annotated.obs["canal_prediction"] == "Unassigned").to_numpy()]
    )
    assert ax.get_title().startswith("canal novelty score (threshold")

    fig, given = plt.subplots()
    assert uncertainty(annotated, ax=given, show=False, title="mine") is given and given.get_title() == "mine"
    assert isinstance(uncertainty(annotated, show=False, return_fig=True), Figure)


def test_uncertainty_shows_the_pvalues_and_the_threshold(annotated):
    ax = uncertainty(annotated, value="pvalue", show=False)
    assert ax.get_title() == "canal novelty p-value (unassigned at p ≤ 0.05)"
    colorbar = ax.figure.axes[1]
    assert [line.get_ydata()[0] for line in colorbar.get_lines()] == [0.05]
    ax = uncertainty(annotated, show=False)
    threshold = annotated.uns["canal"]["threshold"]
    assert [line.get_ydata()[0] for line in ax.figure.axes[1].get_lines()] == [threshold]
    every_type_own = annotated.copy()  # every type has calibration cells enough of its own: no shared threshold
    every_type_own.uns["canal"] = {**annotated.uns["canal"], "threshold": float("nan")}
    ax = uncertainty(every_type_own, show=False)
    assert ax.figure.axes[1].get_lines() == [] and ax.get_title() == "canal_novelty_score"
    with pytest.raises(ValueError, match="value must be"):
        uncertainty(annotated, value="energy", show=False)  # one score's p-values need several fused


def test_uncertainty_reads_the_former_names_with_a_warning(annotated):
    former = annotated.copy()
    former.obs = former.obs.rename(columns={"canal_novelty_score": "canal_uncertainty"})
    with pytest.warns(FutureWarning, match="former name of 'canal_novelty_score'"):
        ax = uncertainty(former, show=False)
    assert ax.get_title().startswith("canal novelty score (threshold")
    with pytest.warns(FutureWarning, match='value="score"'):
        uncertainty(annotated, value="uncertainty", show=False)


def test_uncertainty_shows_which_score_flags_a_cell(annotated, two_stage_model):
    import scanpy_canal as canal

    fused = canal.tl.annotate(annotated, two_stage_model, novel=True, score=("input", "energy"), copy=True)
    ax = uncertainty(fused, value="input", show=False)
    assert ax.get_title() == "canal input p-value (flags at p ≤ 0.025)"  # alpha over the 2 fused scores
    assert [line.get_ydata()[0] for line in ax.figure.axes[1].get_lines()] == [0.025]
    assert "canal_input_pvalue" not in fused.obs  # drawn from a light copy
    with pytest.raises(ValueError, match="'input', 'energy'"):
        uncertainty(fused, value="knn", show=False)


def test_uncertainty_errors(annotated):
    with pytest.raises(ValueError, match="no 'tsne'"):
        uncertainty(annotated, basis="tsne", show=False)
    with pytest.raises(ValueError, match=r"novel=True"):
        uncertainty(annotated, key="other", show=False)
    plain = annotated.copy()
    del plain.obs["canal_novelty_score"]
    with pytest.raises(ValueError, match=r"canal\.tl\.annotate"):
        uncertainty(plain, show=False)


# ------------------------------------------------------------------------------------------------ example_bank
def test_example_bank_of_model(two_stage_model, tmp_path):
    bank = two_stage_model.example_bank
    ax = example_bank(two_stage_model, show=False, save=tmp_path / "bank.png")
    assert saved(tmp_path / "bank.png") and len(ax.figure.axes) == 1
    n_types, stages = len(two_stage_model.cell_types), sorted(bank.obs["stage"].unique())
    assert len(ax.patches) == n_types * len(stages)
    assert tick_texts(ax.get_yticklabels()) == two_stage_model.cell_types
    quota = 40 // len(two_stage_model.cell_types)  # the fixture trains with rehearsal_size=40
    assert legend_texts(ax) == [*(f"stage {s}" for s in stages), f"quota ({quota})"]
    assert ax.get_xlabel() == "examples in the bank" and ax.get_ylabel() == "cell type"
    widths = np.array([patch.get_width() for patch in ax.patches]).reshape(len(stages), n_types).sum(axis=0)
    expected = bank.obs["cell_type"].value_counts().reindex(two_stage_model.cell_types).to_numpy()
    np.testing.assert_array_equal(widths, expected)

    ax = example_bank(two_stage_model, quota=10, show=False)
    assert legend_texts(ax)[-1] == "quota (10)" and ax.lines[-1].get_xdata()[0] == 10
    assert len(example_bank(two_stage_model, quota=10, show_quota=False, show=False).lines) == 0


def test_example_bank_infers_quota_and_needs_a_bank(two_stage_model):
    recorded = SimpleNamespace(
        example_bank=two_stage_model.example_bank,
        cell_types=two_stage_model.cell_types,
        stage_history_=[{"stage": 1}, {"stage": 2, "rehearsal_size": 40}],
    )
    ax = example_bank(recorded, show=False)
    assert legend_texts(ax)[-1] == "quota (10)"  # 40 // 4 types
    recorded.stage_history_ = [{"stage": 1}]
    assert len(example_bank(recorded, show=False).lines) == 0  # capacity unknown: no line
    with pytest.raises(ValueError, match="no example bank"):
        example_bank(SimpleNamespace(example_bank=None), show=False)

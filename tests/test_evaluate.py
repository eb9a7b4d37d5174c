import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from scanpy_canal.tl import continual_metrics, evaluate

# ---------------------------------------------------------------------------------------------------------------
# evaluate: closed set


def test_closed_set_hand_computed():
    truth = ["a", "a", "b", "b"]
    pred = ["a", "b", "b", "b"]
    scores = evaluate(truth, pred)
    assert set(scores) == {"accuracy", "macro_f1", "ari"}
    assert scores["accuracy"] == pytest.approx(0.75)
    # F1(a) = 2*1*0.5/1.5 = 2/3; F1(b) = 2*(2/3)*1/(5/3) = 0.8
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert all(type(v) is float for v in scores.values())


def test_perfect_and_permuted_labels():
    truth = ["a", "a", "b", "b", "c"]
    assert evaluate(truth, truth) == {"accuracy": 1.0, "macro_f1": 1.0, "ari": 1.0}
    renamed = ["x", "x", "y", "y", "z"]
    scores = evaluate(truth, renamed)
    assert scores["accuracy"] == 0.0
    assert scores["ari"] == pytest.approx(1.0)


def test_macro_f1_uses_union_of_labels():
    # a predicted label never seen in truth is a class with F1 = 0 that drags the macro mean down
    scores = evaluate(["a", "a"], ["a", "z"])
    # F1(a) = 2*1*0.5/1.5 = 2/3, F1(z) = 0
    assert scores["macro_f1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "convert",
    [list, np.array, pd.Series, pd.Categorical, lambda x: pd.Series(x, index=[10, 3, 7, 1], dtype="category")],
)
def test_accepts_array_likes(convert):
    scores = evaluate(convert(["a", "a", "b", "b"]), convert(["a", "b", "b", "b"]))
    assert scores["accuracy"] == pytest.approx(0.75)


def test_categorical_with_different_categories():
    truth = pd.Categorical(["a", "b"], categories=["a", "b", "c"])
    pred = pd.Categorical(["a", "b"], categories=["b", "a"])
    assert evaluate(truth, pred)["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("truth", "pred", "match"),
    [
        (["a", "b"], ["a"], "same length"),
        ([], [], "empty"),
        ([["a"], ["b"]], [["a"], ["b"]], "one-dimensional"),
        (pd.Series(["a", None]), ["a", "b"], "missing"),
    ],
)
def test_bad_input(truth, pred, match):
    with pytest.raises(ValueError, match=match):
        evaluate(truth, pred)


# ---------------------------------------------------------------------------------------------------------------
# evaluate: novel types


def test_novel_hand_computed():
    truth = ["a", "a", "b", "b", "c", "c", "c", "c"]
    pred = ["a", "Unassigned", "b", "b", "Unassigned", "Unassigned", "Unassigned", "a"]
    scores = evaluate(truth, pred, novel_types=["c"])
    assert scores["known_accuracy"] == pytest.approx(3 / 4)  # "Unassigned" for a known cell is wrong
    assert scores["unknown_accuracy"] == pytest.approx(3 / 4)
    assert scores["h_score"] == pytest.approx(0.75)
    assert scores["accuracy"] == pytest.approx(6 / 8)  # novel truth counts as "Unassigned"
    assert all(type(v) is float for v in scores.values())


def test_h_score_harmonic_mean():
    truth = ["a", "a", "c", "c"]
    pred = ["a", "a", "Unassigned", "a"]  # K = 1, U = 0.5
    assert evaluate(truth, pred, novel_types={"c"})["h_score"] == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_h_score_zero_when_both_zero():
    scores = evaluate(["a", "c"], ["Unassigned", "a"], novel_types=["c"])
    assert scores["known_accuracy"] == 0.0
    assert scores["unknown_accuracy"] == 0.0
    assert scores["h_score"] == 0.0


def test_string_novel_type_is_one_name_not_characters():
    # the original code tested `label in "alpha"`, so "a" and "ph" would have counted as novel
    truth = ["a", "ph", "alpha"]
    pred = ["a", "ph", "Unassigned"]
    scores = evaluate(truth, pred, novel_types="alpha")
    assert scores["known_accuracy"] == 1.0
    assert scores["unknown_accuracy"] == 1.0
    assert evaluate(truth, pred, novel_types=["alpha"]) == scores


@pytest.mark.parametrize("convert", [list, set, tuple, np.array, pd.Series, pd.Index])
def test_novel_types_collections(convert):
    truth = ["a", "b", "c"]
    pred = ["a", "Unassigned", "Unassigned"]
    scores = evaluate(truth, pred, novel_types=convert(["b", "c"]))
    assert scores["known_accuracy"] == 1.0
    assert scores["unknown_accuracy"] == 1.0


def test_custom_unassigned_label():
    scores = evaluate(["a", "c"], ["a", "unknown"], novel_types=["c"], unassigned="unknown")
    assert scores["unknown_accuracy"] == 1.0
    assert scores["accuracy"] == 1.0


def test_novel_type_absent_gives_nan_with_warning():
    with pytest.warns(UserWarning, match="No cell of the novel types"):
        scores = evaluate(["a", "b"], ["a", "b"], novel_types=["z"])
    assert scores["known_accuracy"] == 1.0
    assert np.isnan(scores["unknown_accuracy"])
    assert np.isnan(scores["h_score"])


def test_all_novel_gives_nan_known_accuracy_with_warning():
    with pytest.warns(UserWarning, match="Every cell"):
        scores = evaluate(["z", "z"], ["Unassigned", "a"], novel_types=["z"])
    assert np.isnan(scores["known_accuracy"])
    assert scores["unknown_accuracy"] == 0.5
    assert np.isnan(scores["h_score"])


def test_novel_types_bad_type():
    with pytest.raises(TypeError, match="novel_types"):
        evaluate(["a"], ["a"], novel_types=3)


def test_inputs_not_modified():
    truth = pd.Series(["a", "c"])
    pred = np.array(["a", "Unassigned"])
    evaluate(truth, pred, novel_types=["c"])
    assert truth.tolist() == ["a", "c"]
    assert pred.tolist() == ["a", "Unassigned"]


def test_evaluate_does_not_import_torch():
    code = "import sys, scanpy_canal.tl; assert 'torch' not in sys.modules and 'scvi' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------------
# continual_metrics


def test_continual_three_stages_hand_computed():
    nan = np.nan
    R = np.array(
        [
            [0.90, nan, nan],
            [0.80, 0.85, nan],
            [0.70, 0.75, 0.95],
        ]
    )
    m = continual_metrics(R)
    assert m["acc"] == pytest.approx((0.70 + 0.75 + 0.95) / 3)
    # bwt: (0.70 - 0.90 + 0.75 - 0.85) / 2 = -0.15
    assert m["bwt"] == pytest.approx(-0.15)
    # forgetting: j=0: max(0.90, 0.80) - 0.70 = 0.20; j=1: 0.85 - 0.75 = 0.10
    assert m["forgetting"] == pytest.approx(0.15)
    assert all(type(v) is float for v in m.values())


def test_forgetting_uses_best_earlier_not_first():
    R = np.array(
        [
            [0.5, 0.0, 0.0],
            [0.9, 0.6, 0.0],  # stage 0 improves after stage 1 (positive transfer)
            [0.7, 0.6, 0.8],
        ]
    )
    m = continual_metrics(R)
    # bwt: (0.7 - 0.5 + 0.6 - 0.6) / 2 = 0.1; forgetting: (0.9 - 0.7 + 0.6 - 0.6) / 2 = 0.1
    assert m["bwt"] == pytest.approx(0.1)
    assert m["forgetting"] == pytest.approx(0.1)
    assert m["acc"] == pytest.approx(0.7)


def test_upper_triangle_ignored():
    R = np.array([[0.9, 0.1], [0.7, 0.8]])
    assert continual_metrics(R) == pytest.approx(continual_metrics(np.array([[0.9, np.nan], [0.7, 0.8]])))


def test_single_stage():
    assert continual_metrics([[0.8]]) == {"acc": 0.8, "bwt": 0.0, "forgetting": 0.0}


def test_dataframe_input():
    df = pd.DataFrame([[0.9, np.nan], [0.7, 0.8]], index=["s1", "s2"], columns=["t1", "t2"])
    m = continual_metrics(df)
    assert m == pytest.approx({"acc": 0.75, "bwt": -0.2, "forgetting": 0.2})


@pytest.mark.parametrize(
    ("R", "match"),
    [
        (np.zeros((2, 3)), "square"),
        (np.zeros(3), "square"),
        (np.zeros((0, 0)), "square"),
        (np.array([[0.9, np.nan], [np.nan, 0.8]]), "finite"),
        (np.array([[np.nan, np.nan], [0.7, 0.8]]), "finite"),
    ],
)
def test_continual_bad_input(R, match):
    with pytest.raises(ValueError, match=match):
        continual_metrics(R)

"""Clip-level metrics against cases computed by hand."""

import math

import numpy as np
import pytest

from fl.errors import DataError
from fl.metrics import AUC_EPS, clip_metrics, dprime_from_auc

# 3 clips x 2 classes.
Y_TRUE = np.array([[1, 0], [0, 1], [1, 1]])
Y_SCORE = np.array([[0.9, 0.2], [0.8, 0.7], [0.3, 0.6]])
# Class 0: ranked 0.9(+) 0.8(-) 0.3(+): precisions at positives 1/1, 2/3 -> AP = 5/6.
# Class 1: ranked 0.7(+) 0.6(+) 0.2(-): precisions 1/1, 2/2 -> AP = 1.  mAP = 11/12.
# AUC class 0: pairs (0.9>0.8 yes, 0.3>0.8 no) -> 0.5; class 1: 1.0; mean 0.75.
# lwlrap, per (clip, positive label): clip 0 label 0 is ranked 1st -> 1; clip 1 label 1 is ranked 2nd below
#   a negative -> 1/2; clip 2 both labels positive -> 1 and 1. Mean over the 4 pairs = 3.5/4 = 0.875
#   (the unweighted LRAP would be (1 + 0.5 + 1)/3 = 0.833).
# micro PR-AUC, all 6 pairs: 0.9(+) 0.8(-) 0.7(+) 0.6(+) 0.3(+) 0.2(-):
#   precisions at positives 1, 2/3, 3/4, 4/5 -> (1 + 2/3 + 3/4 + 4/5)/4 = 193/240.


def test_hand_computed_case():
    m = clip_metrics(Y_TRUE, Y_SCORE, labels=["bark", "meow"])
    assert m["per_class_ap"] == pytest.approx({"bark": 5 / 6, "meow": 1.0})
    assert m["mAP"] == pytest.approx(11 / 12)
    assert m["mean_auc"] == pytest.approx(0.75)
    assert m["dprime"] == pytest.approx(math.sqrt(2) * 0.6744897501960817)
    assert m["lwlrap"] == pytest.approx(0.875)
    assert m["micro_pr_auc"] == pytest.approx(193 / 240)
    assert m["n_clips"] == 3
    assert m["n_classes_scored"] == 2


def test_class_without_positives_is_excluded():
    y_true = np.hstack([Y_TRUE, np.zeros((3, 1), dtype=int)])
    y_score = np.hstack([Y_SCORE, np.zeros((3, 1))])  # ranked below everything: lwlrap and micro unchanged
    m = clip_metrics(y_true, y_score, labels=["bark", "meow", "siren"])
    reference = clip_metrics(Y_TRUE, Y_SCORE)
    assert m["per_class_ap"]["siren"] is None
    assert m["n_classes_scored"] == 2
    for key in ("mAP", "mean_auc", "dprime", "lwlrap", "micro_pr_auc"):
        assert m[key] == pytest.approx(reference[key]), key


def test_lwlrap_matches_per_pair_definition():
    rng = np.random.default_rng(3)
    y_true = (rng.random((40, 6)) < 0.3).astype(int)
    y_score = rng.random((40, 6))
    precisions = []
    for truth, score in zip(y_true, y_score, strict=True):
        for label in np.flatnonzero(truth):
            above = score >= score[label]
            precisions.append(truth[above].sum() / above.sum())
    assert clip_metrics(y_true, y_score)["lwlrap"] == pytest.approx(np.mean(precisions))


def test_dprime_chance_and_perfect():
    assert dprime_from_auc(0.5) == 0.0
    ties = clip_metrics(np.array([[1], [0]]), np.array([[0.5], [0.5]]))
    assert ties["mean_auc"] == 0.5 and ties["dprime"] == 0.0
    perfect = clip_metrics(Y_TRUE, np.where(Y_TRUE == 1, 0.9, 0.1))
    assert perfect["mAP"] == 1.0 and perfect["mean_auc"] == 1.0
    assert perfect["dprime"] == pytest.approx(dprime_from_auc(1.0 - AUC_EPS))
    assert math.isfinite(perfect["dprime"]) and perfect["dprime"] > 6
    assert dprime_from_auc(0.0) == pytest.approx(-perfect["dprime"])


def test_no_positives_gives_nan_without_crashing():
    m = clip_metrics(np.zeros((4, 3), dtype=int), np.full((4, 3), 0.2))
    for key in ("mAP", "mean_auc", "dprime", "lwlrap", "micro_pr_auc"):
        assert math.isnan(m[key]), key
    assert m["n_classes_scored"] == 0
    assert all(ap is None for ap in m["per_class_ap"].values())


def test_bad_inputs_raise_clear_errors():
    nan_score = Y_SCORE.copy()
    nan_score[1, 0] = np.nan
    with pytest.raises(DataError, match="y_score contains 1 NaN"):
        clip_metrics(Y_TRUE, nan_score)
    with pytest.raises(DataError, match="shape mismatch"):
        clip_metrics(Y_TRUE, Y_SCORE[:2])
    with pytest.raises(DataError, match="2-D"):
        clip_metrics(Y_TRUE[:, 0], Y_SCORE[:, 0])
    with pytest.raises(DataError, match="multi-hot"):
        clip_metrics(Y_TRUE * 2, Y_SCORE)
    with pytest.raises(DataError, match="labels has 1 names"):
        clip_metrics(Y_TRUE, Y_SCORE, labels=["bark"])

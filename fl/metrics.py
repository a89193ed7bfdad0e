"""Clip-level multi-label metrics for FSD50K-style evaluation.

Definitions (FSD50K paper, fsd50k-pytorch, DCASE 2019 task 2, fsd_fed):

- ``mAP``: macro mean of per-class average precision over the classes with at least one positive clip.
  Classes without positives have no defined AP; they are left out and reported as ``None``.
- ``mean_auc``: mean ROC AUC over the classes that have both positive and negative clips.
- ``dprime``: ``sqrt(2) * Phi^-1(mean_auc)``. ``mean_auc`` is first clipped to ``[AUC_EPS, 1 - AUC_EPS]`` so a
  perfect (or perfectly inverted) ranking gives a large finite d' (about +/-6.72) instead of +/-inf, which
  keeps the value JSON-serialisable and comparable across rounds.
- ``lwlrap``: label-weighted label-ranking average precision. Every (clip, positive label) pair counts
  equally, which is sklearn's LRAP with each clip weighted by its number of positive labels. Clips without
  positives get weight 0. Tied scores are ranked pessimistically (sklearn's ``rankdata(..., "max")``).
- ``micro_pr_auc``: average precision of all (clip, class) pairs pooled together (sklearn's
  ``average="micro"``), the metric fsd_fed reported.

When a metric is undefined (no clip, no positive label, or no class with both positives and negatives) it is
``nan``; the function never raises for a degenerate but well-formed input.
Scores may be any finite numbers (all metrics are rank-based); probabilities are the usual input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from fl.errors import DataError

AUC_EPS = 1e-6


def _validate(y_true: np.ndarray, y_score: np.ndarray, labels: Sequence[str] | None) -> tuple:
    """Return (y_true as int8, y_score as float64, label names), raising DataError on malformed input."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 2 or y_score.ndim != 2:
        raise DataError(
            f"y_true and y_score must be 2-D [clips, classes], got shapes {y_true.shape} and {y_score.shape}"
        )
    if y_true.shape != y_score.shape:
        raise DataError(f"shape mismatch: y_true {y_true.shape} vs y_score {y_score.shape}")
    if y_true.size and not np.isin(y_true, (0, 1)).all():
        raise DataError("y_true must be multi-hot with values in {0, 1}")
    n_nan = int(np.isnan(y_score).sum())
    if n_nan:
        raise DataError(f"y_score contains {n_nan} NaN value(s)")
    if not np.isfinite(y_score).all():
        raise DataError("y_score contains infinite value(s)")
    n_classes = y_true.shape[1]
    if labels is None:
        names = [str(c) for c in range(n_classes)]
    else:
        names = [str(name) for name in labels]
        if len(names) != n_classes:
            raise DataError(f"labels has {len(names)} names but y_true has {n_classes} classes")
    return y_true.astype(np.int8), y_score, names


def dprime_from_auc(auc: float) -> float:
    """d' = sqrt(2) * Phi^-1(auc), with auc clipped to [AUC_EPS, 1 - AUC_EPS]; nan stays nan."""
    if math.isnan(auc):
        return math.nan
    return float(math.sqrt(2.0) * NormalDist().inv_cdf(min(max(auc, AUC_EPS), 1.0 - AUC_EPS)))


def clip_metrics(y_true: np.ndarray, y_score: np.ndarray, labels: Sequence[str] | None = None) -> dict:
    """Clip-level metrics of multi-hot targets ``y_true`` [N, C] against scores ``y_score`` [N, C].

    Returns a dict with ``mAP``, ``dprime``, ``lwlrap``, ``micro_pr_auc``, ``mean_auc`` (floats, nan when
    undefined), ``n_clips``, ``n_classes_scored`` (classes with at least one positive, i.e. those in mAP) and
    ``per_class_ap`` ({label: AP, or None for a class without positives}). ``labels`` names the classes
    (default: their indices as strings). Raises DataError on NaN/inf scores, non-binary targets or shape
    mismatch.
    """
    from sklearn.metrics import average_precision_score, label_ranking_average_precision_score, roc_auc_score

    y_true, y_score, names = _validate(y_true, y_score, labels)
    n_clips = y_true.shape[0]
    positives = y_true.sum(axis=0)
    has_pos = positives > 0
    has_both = has_pos & (positives < n_clips)

    per_class_ap: dict[str, float | None] = {}
    for c, name in enumerate(names):
        per_class_ap[name] = (
            float(average_precision_score(y_true[:, c], y_score[:, c])) if has_pos[c] else None
        )
    aps = [ap for ap in per_class_ap.values() if ap is not None]
    mean_ap = float(np.mean(aps)) if aps else math.nan

    aucs = [float(roc_auc_score(y_true[:, c], y_score[:, c])) for c in np.flatnonzero(has_both)]
    mean_auc = float(np.mean(aucs)) if aucs else math.nan

    pos_per_clip = y_true.sum(axis=1)
    if pos_per_clip.sum() > 0:
        lwlrap = label_ranking_average_precision_score(y_true, y_score, sample_weight=pos_per_clip)
        micro_pr_auc = float(average_precision_score(y_true.ravel(), y_score.ravel()))
    else:
        lwlrap = math.nan
        micro_pr_auc = math.nan

    return {
        "mAP": mean_ap,
        "dprime": dprime_from_auc(mean_auc),
        "lwlrap": float(lwlrap),
        "micro_pr_auc": micro_pr_auc,
        "mean_auc": mean_auc,
        "n_clips": int(n_clips),
        "n_classes_scored": int(has_pos.sum()),
        "per_class_ap": per_class_ap,
    }

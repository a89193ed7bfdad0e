"""Event-level detection metrics: onset matching within a collar, precision, recall, F1, false triggers per hour
with their confidence interval.

A detected event matches a reference event of the same label when their onsets differ by at most the collar
(100 ms by default; offsets are not evaluated: a trigger is judged by when it fires). Matching is one-to-one
and maximal (a maximum bipartite matching per label), so two detections near one reference give one true
positive and one false positive, and one detection between two references matches only one of them. This is
sed_eval's onset-only event-based evaluation, implemented here without depending on sed_eval (which, like
sed_scores_eval, pulls in dcase_util and its audio stack).

Events are sequences whose first two items are ``(label, onset_s)``; further items (offsets) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.stats import chi2

COLLAR_S = 0.1
OVERALL = "overall"


@dataclass(frozen=True)
class EventCounts:
    """True positives, false positives and false negatives of one label (or all labels)."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        """TP / (TP + FP); 1.0 when nothing was detected."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        """TP / (TP + FN); 1.0 when there was nothing to detect."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall (0.0 when both are 0)."""
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def __add__(self, other: EventCounts) -> EventCounts:
        return EventCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def to_dict(self) -> dict[str, Any]:
        """Counts and rates as plain numbers."""
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision,
                "recall": self.recall, "f1": self.f1}


def _onsets(events: Iterable[Sequence[Any]], label: str) -> np.ndarray:
    return np.sort(np.array([float(e[1]) for e in events if e[0] == label], dtype=np.float64))


def match_onsets(reference: np.ndarray, detected: np.ndarray, collar_s: float = COLLAR_S) -> int:
    """Size of the largest one-to-one matching of detected to reference onsets within ``collar_s``."""
    if collar_s < 0:
        raise ValueError(f"collar_s must be non-negative, got {collar_s}")
    reference, detected = np.sort(np.asarray(reference, float)), np.sort(np.asarray(detected, float))
    if not len(reference) or not len(detected):
        return 0
    eps = 1e-9  # onsets exactly one collar apart match despite float rounding
    lo = np.searchsorted(detected, reference - collar_s - eps, side="left")
    hi = np.searchsorted(detected, reference + collar_s + eps, side="right")
    counts = hi - lo
    if not counts.sum():
        return 0
    rows = np.repeat(np.arange(len(reference)), counts)
    cols = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi, strict=True)])
    graph = csr_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(reference), len(detected)))
    return int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())


def event_counts(reference: Iterable[Sequence[Any]], detected: Iterable[Sequence[Any]],
                 collar_s: float = COLLAR_S, labels: Sequence[str] | None = None) -> dict[str, EventCounts]:
    """Per-label counts (every label of ``labels``, reference and detections) plus ``"overall"`` (summed)."""
    reference, detected = list(reference), list(detected)
    names = list(labels or []) + sorted({e[0] for e in reference + detected} - set(labels or []))
    if OVERALL in names:
        raise ValueError(f"{OVERALL!r} is reserved for the sum over labels")
    result: dict[str, EventCounts] = {}
    total = EventCounts(0, 0, 0)
    for label in names:
        ref, det = _onsets(reference, label), _onsets(detected, label)
        tp = match_onsets(ref, det, collar_s)
        result[label] = EventCounts(tp, len(det) - tp, len(ref) - tp)
        total = total + result[label]
    result[OVERALL] = total
    return result


def false_triggers_per_hour(n_triggers: int, seconds: float) -> float:
    """Detections per hour of audio that holds no event to detect."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    return n_triggers * 3600.0 / seconds


def false_trigger_interval(n_triggers: int, seconds: float, level: float = 0.95) -> tuple[float, float]:
    """The exact (Garwood) ``level`` confidence interval of a false-trigger rate per hour, given ``n_triggers`` in
    ``seconds``: how low or high the rate of a detector that triggered so may be. None in an hour still allows up to
    3.7 an hour; showing a rate of at most 0.3 an hour takes more than 12 hours without one."""
    per_hour = false_triggers_per_hour(1, seconds)  # refuses seconds <= 0
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    tail = (1.0 - level) / 2.0
    low = chi2.ppf(tail, 2 * n_triggers) / 2.0 if n_triggers > 0 else 0.0
    high = chi2.ppf(1.0 - tail, 2 * n_triggers + 2) / 2.0
    return float(low * per_hour), float(high * per_hour)

"""Operating points of personal detectors: recall and false triggers per hour at other thresholds and holds.

``fedsound bench personalize`` saves, for each synthetic user and example count, the personal model's
per-frame probabilities over the user's test stream and aggressor-only audio (``user-U/probabilities-N.npz``,
:func:`save_probabilities`). Rerunning only the streaming post-processing (:class:`EventTracker`) over them
takes seconds, so the benchmark also reports, per sound and pooled over the users, how recall, precision and
false triggers trade against each other (:func:`tradeoff`): at the on-thresholds personalization picked and at
fixed ones (off = on x the picked off/on ratio), each at the picked minimum duration (hold) and at longer ones.
:func:`plot_tradeoff` draws recall against false triggers per hour, one curve per sound and hold.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clients.detector.event_metrics import COLLAR_S, EventCounts, event_counts, false_triggers_per_hour
from clients.detector.postprocess import EventTracker, level_history_frames, rise_levels
from fl.config import Config, DetectorConfig, apply, to_dict
from fl.errors import DataError, FedsoundError

ON_THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
EXTRA_HOLD_MS = (0.0, 50.0, 100.0)  # added to each user's picked hold
FAST_HOLDS_MS = (30.0, 60.0, 100.0, 150.0)  # shorter holds, the same for every user: faster, and less sure
REGION_GAP_FRAMES = 50  # frames below every threshold that separate independent stretches (> refractory time)


@dataclass
class SavedProbabilities:
    """A personal detector's probabilities over one user's test stream and aggressor-only audio."""

    labels: list[str]
    detector: DetectorConfig
    frame_s: float
    test: np.ndarray  # [n, n_labels]
    reference: list[tuple[str, float]]  # (label, onset_s) of the test stream's sounds
    aggressor: list[np.ndarray]  # one [n_i, n_labels] array per aggressor-only chunk
    test_levels: np.ndarray  # [n]: the frames' levels in dB (the detector's onset check)
    aggressor_levels: list[np.ndarray]  # one [n_i] array per aggressor-only chunk
    delay_s: float = 0.0  # the frontend's delay: a frame's line is written this long after the frame's time

    @property
    def aggressor_seconds(self) -> float:
        """Length of the aggressor-only audio."""
        return sum(len(chunk) for chunk in self.aggressor) * self.frame_s


def save_probabilities(path: Path, saved: SavedProbabilities) -> Path:
    """Write ``saved`` to ``path`` (.npz; float32, so a rerun at the picked settings reproduces the bench)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(
        tmp, labels=np.array(saved.labels), detector=json.dumps(to_dict(saved.detector)),
        frame_s=saved.frame_s, test=saved.test.astype(np.float32),
        reference_labels=np.array([label for label, _ in saved.reference]),
        reference_onsets=np.array([onset for _, onset in saved.reference], dtype=np.float64),
        aggressor=np.concatenate(saved.aggressor).astype(np.float32),
        aggressor_ends=np.cumsum([len(chunk) for chunk in saved.aggressor]),
        test_levels=saved.test_levels.astype(np.float32),
        aggressor_levels=np.concatenate(saved.aggressor_levels).astype(np.float32), delay_s=saved.delay_s)
    tmp.replace(path)
    return path


def load_probabilities(path: Path) -> SavedProbabilities:
    """Read a file written by :func:`save_probabilities`; a DataError naming it if it is damaged."""
    try:
        with np.load(Path(path)) as data:
            detector = apply(Config(), {"detector": json.loads(str(data["detector"]))}, str(path)).detector
            ends = data["aggressor_ends"][:-1]
            reference = list(zip(data["reference_labels"].tolist(), data["reference_onsets"].tolist(), strict=True))
            return SavedProbabilities(data["labels"].tolist(), detector, float(data["frame_s"]), data["test"],
                                      reference, np.split(data["aggressor"], ends), data["test_levels"],
                                      np.split(data["aggressor_levels"], ends), float(data["delay_s"]))
    except FedsoundError:
        raise
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable probabilities file ({type(exc).__name__}: {exc})") from exc


def _onsets(p: np.ndarray, levels: np.ndarray, label: str, on: float, off: float, hold_ms: float,
            base: DetectorConfig, frame_s: float) -> list[float]:
    """Onset times of one label's events over its probability track ``p`` (1-D) and the frames' ``levels``
    (:func:`_events`)."""
    return [onset for onset, _ in _events(p, levels, label, on, off, hold_ms, base, frame_s)]


def _events(p: np.ndarray, levels: np.ndarray, label: str, on: float, off: float, hold_ms: float,
            base: DetectorConfig, frame_s: float, delay_s: float = 0.0) -> list[tuple[float, float]]:
    """``(onset_s, emitted_s)`` of one label's events over its probability track ``p`` (1-D) and the frames'
    ``levels``; ``emitted_s`` is when streaming writes the line (the confirming frame's time plus ``delay_s``).

    Only the stretches that reach the off threshold (or the rise level that dates onsets, where that is lower)
    are run through the tracker; they are separated by more frames below it than REGION_GAP_FRAMES, the
    refractory time and the onset check's level history, so each starts from an idle tracker that has seen that
    history, exactly as in one pass over the whole track.
    """
    settings = dataclasses.replace(base, class_thresholds={label: [on, off]}, class_min_duration_ms={label: hold_ms})
    near = np.flatnonzero(p >= rise_levels([label], settings)[0])
    if not len(near):
        return []
    history = level_history_frames(settings, frame_s)
    breaks = np.flatnonzero(np.diff(near) > max(REGION_GAP_FRAMES, history + 1))
    found = []
    for first, last in zip(np.r_[near[0], near[breaks + 1]], np.r_[near[breaks], near[-1]], strict=True):
        start = max(0, int(first) - 1 - history)  # idle frames before it, as the tracker saw them
        end = int(last) + 2
        tracker = EventTracker([label], settings, frame_s)
        stamps = np.arange(start, start + len(p[start:end])) * frame_s + delay_s
        events = tracker.update(p[start:end, None], stamps, levels[start:end])
        found += [(start * frame_s + e.onset_s, e.emitted_s) for e in events if e.type == "onset"]
    return found


@dataclass(frozen=True)
class OperatingPoint:
    """Pooled figures of one sound at one setting."""

    counts: EventCounts
    false_triggers: int
    hours: float
    latencies_ms: tuple[float, ...] = ()  # of the detected test events: emitted minus true onset

    def to_dict(self) -> dict[str, Any]:
        """Recall, precision, false triggers (count and per hour), median detection latency (ms)."""
        return {"recall": self.counts.recall, "precision": self.counts.precision,
                "false_triggers": self.false_triggers,
                "false_triggers_per_hour": false_triggers_per_hour(self.false_triggers, 3600.0 * self.hours),
                "median_latency_ms": float(np.median(self.latencies_ms)) if self.latencies_ms else float("nan")}


def operating_point(runs: Sequence[SavedProbabilities], label: str, on: float | None, extra_hold_ms: float,
                    hold_ms: float | None = None) -> OperatingPoint:
    """Pooled counts of ``label`` over ``runs`` at on-threshold ``on`` (None: each run's picked one) and each
    run's picked hold plus ``extra_hold_ms`` (or ``hold_ms`` for every run)."""
    counts, triggers, seconds, latencies = EventCounts(0, 0, 0), 0, 0.0, []
    for run in runs:
        k = run.labels.index(label)
        picked_on, picked_off = run.detector.class_thresholds.get(
            label, [run.detector.on_threshold, run.detector.off_threshold])
        # the picked off/on ratio at another on; off may equal on, and the division must not lift it above
        threshold, off = (picked_on, picked_off) if on is None else (on, min(on, on * picked_off / picked_on))
        hold = (run.detector.class_min_duration_ms.get(label, run.detector.min_duration_ms) + extra_hold_ms
                if hold_ms is None else hold_ms)
        found = _events(run.test[:, k], run.test_levels, label, threshold, off, hold, run.detector, run.frame_s,
                        run.delay_s)
        detect = [(label, onset) for onset, _ in found]
        reference = [event for event in run.reference if event[0] == label]
        counts = counts + event_counts(reference, detect, COLLAR_S, [label])[label]
        for _, true_onset in reference:
            emitted = [e for onset, e in found if abs(onset - true_onset) <= COLLAR_S + 1e-9]
            if emitted:
                latencies.append(1000.0 * (min(emitted) - true_onset))
        triggers += sum(len(_onsets(chunk[:, k], levels, label, threshold, off, hold, run.detector, run.frame_s))
                        for chunk, levels in zip(run.aggressor, run.aggressor_levels, strict=True))
        seconds += run.aggressor_seconds
    return OperatingPoint(counts, triggers, seconds / 3600.0, tuple(latencies))


def tradeoff(runs: Sequence[SavedProbabilities]) -> dict[str, Any]:
    """Per sound, per hold (the picked one plus each of EXTRA_HOLD_MS, then each of FAST_HOLDS_MS for every
    user): the pooled operating point at the picked thresholds and at ON_THRESHOLDS."""
    labels = runs[0].labels
    table: dict[str, Any] = {}
    holds = [(f"+{extra:g}ms", extra, None) for extra in EXTRA_HOLD_MS]
    holds += [(f"{hold:g}ms", 0.0, hold) for hold in FAST_HOLDS_MS]
    for label in labels:
        table[label] = {}
        for name, extra, hold in holds:
            row = {"picked": operating_point(runs, label, None, extra, hold).to_dict()}
            row.update({f"{on:g}": operating_point(runs, label, on, extra, hold).to_dict() for on in ON_THRESHOLDS})
            table[label][name] = row
    return table


def format_tradeoff(table: dict[str, Any]) -> str:
    """The tradeoff table as text: recall/precision/false triggers per sound, hold and on-threshold."""
    columns = ["picked", *(f"{on:g}" for on in ON_THRESHOLDS)]
    lines = ["operating points, pooled over the users (recall/precision/false triggers/median latency ms); hold = "
             "the picked minimum duration plus +N ms, or N ms for every user",
             f"{'sound':<8} {'hold':>7} " + " ".join(f"{c:>18}" for c in columns)]
    for label, holds in table.items():
        for hold, row in holds.items():
            cells = [f"{row[c]['recall']:.2f}/{row[c]['precision']:.2f}/{row[c]['false_triggers']}/"
                     f"{row[c]['median_latency_ms']:.0f}" for c in columns]
            lines.append(f"{label:<8} {hold:>7} " + " ".join(f"{cell:>18}" for cell in cells))
    return "\n".join(lines)


def plot_tradeoff(table: dict[str, Any], out_png: Path, title: str, target: tuple[float, float]) -> Path:
    """Recall against false triggers per hour, one panel per sound, one curve (over the on-thresholds) per hold;
    the picked setting is circled and the target region (at most ``target[0]`` per hour, recall at least
    ``target[1]``) shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(table), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(table), sharey=True, squeeze=False)[0]
    for ax, (label, holds) in zip(axes, table.items(), strict=True):
        ax.fill_between([0.0, target[0]], target[1], 1.01, color="tab:green", alpha=0.15, lw=0)
        for hold, row in holds.items():
            points = [row[f"{on:g}"] for on in ON_THRESHOLDS]
            line, = ax.plot([p["false_triggers_per_hour"] for p in points], [p["recall"] for p in points], "o-",
                            ms=3, label=f"hold {hold}")
            picked = row["picked"]
            ax.plot(picked["false_triggers_per_hour"], picked["recall"], "o", mfc="none", ms=9,
                    color=line.get_color())
        ax.set_xscale("symlog", linthresh=0.3)
        ax.set_title(label)
        ax.set_xlabel("false triggers per hour")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png

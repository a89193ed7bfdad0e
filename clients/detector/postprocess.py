"""Per-frame class probabilities -> sound events: hysteresis, minimum duration, refractory time.

For each class independently (frame ``t`` lies at ``t * frame_s`` seconds, the centre of its window):

* A candidate starts at the first frame whose probability reaches the class's **on** threshold, unless the
  class is in its refractory time. Its onset is that frame's time or, with ``onset_at_rise``, the time of the
  first frame of the run of frames at or above the **rise level** that led up to it: the **off** threshold,
  or ``rise_threshold`` where that is lower (the double threshold of Kong et al. applied to the onset: a
  probability that climbs slowly, as for a sound that only becomes recognisable after a while, still dates the
  event from where it began to rise; only the reported onset time changes, not when the event is confirmed).
  The run never reaches back into the class's refractory time (it starts at the end of it at the earliest),
  nor more than ``max_rise_ms`` (rounded to whole frames) before the frame that reached on: a class that idles
  above the rise level, as a fresh head near 0.5 or a hum output over speech, dates the next onset at most that
  early.
* The candidate lasts while the probability stays at or above the **off** threshold (hysteresis). Once it has
  lasted ``min_duration_ms`` from the frame that reached on (or the class's own ``class_min_duration_ms``;
  counted in frames: rounded to the nearest whole number of frames, at least one), it is confirmed and an
  ``onset`` event is emitted at once: the detector does not wait for the sound to end. A candidate that falls
  below the off threshold before that is dropped without an event.
* With ``min_onset_rise_db`` above 0, a candidate is confirmed only if the frames' level (their summed mel
  power in dB, :meth:`fl.frontend.Frontend.levels_db`) rose by at least that much from just before its onset
  (the mean over the frames 80 to 20 ms before it, ``BASE_MS``) to its loudest frame from then until it is
  confirmed. A candidate that fails it is suppressed: no events, until its probability falls below off. A
  steady fan that the model takes for a pop, or a second detection inside a sound already under way, has no
  such rise; a sound made in a quiet stretch or over a steady noise has (a stream's first frames, without that
  much history, are not checked).
* The first frame below the off threshold ends a confirmed event: an ``offset`` event is emitted with the
  event's ``offset_s`` (that frame's time) and its peak ``score``. No new candidate of that class may start
  within ``refractory_ms`` (also rounded to whole frames) after the offset.

So every detected sound gives two JSON lines: ``"type": "onset"`` (the trigger, lowest latency; its
``offset_s`` is null) and ``"type": "offset"`` (the same event completed). Both carry ``label``,
``onset_s``, ``score`` and ``latency_ms``, the detection latency: the audio time at which the onset event
was emitted minus ``onset_s``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fl.config import DetectorConfig
from fl.errors import ConfigError
from fl.jsonfile import dumps, finite

_IDLE, _PENDING, _ACTIVE, _SUPPRESSED = 0, 1, 2, 3
BASE_MS = (80.0, 20.0)  # the onset check's reference level: the frames from this long before the onset to this


@dataclass(frozen=True)
class Event:
    """One event line. ``type`` is "onset" (emitted when confirmed) or "offset" (emitted when it ended)."""

    type: str
    label: str
    onset_s: float
    offset_s: float | None
    score: float
    latency_ms: float
    emitted_s: float  # audio time at which this line was emitted

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with times rounded to 0.1 ms and the score to 4 decimals; a non-finite number becomes None."""
        data = finite(asdict(self))
        for key, digits in (("onset_s", 4), ("offset_s", 4), ("emitted_s", 4), ("score", 4), ("latency_ms", 1)):
            if data[key] is not None:
                data[key] = round(data[key], digits)
        return data

    def to_json(self) -> str:
        """The event as one line of strict JSON (no NaN or Infinity; no newline)."""
        return dumps(self.to_dict())


def _known_labels(labels: Sequence[str], overrides: dict[str, Any], key: str) -> dict[str, int]:
    """Index of each label; a label in ``overrides`` that is not one of ``labels`` is a ConfigError."""
    index = {label: i for i, label in enumerate(labels)}
    for label in overrides:
        if label not in index:
            raise ConfigError(f"detector.{key}: unknown label {label!r} (labels: {', '.join(labels)})")
    return index


def class_thresholds(labels: Sequence[str], settings: DetectorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (on, off) threshold arrays: the defaults of ``settings`` with its ``class-thresholds``.

    A label in ``class-thresholds`` that is not one of ``labels`` is a :class:`ConfigError`.
    """
    on = np.full(len(labels), settings.on_threshold, dtype=np.float32)
    off = np.full(len(labels), settings.off_threshold, dtype=np.float32)
    index = _known_labels(labels, settings.class_thresholds, "class-thresholds")
    for label, (on_value, off_value) in settings.class_thresholds.items():
        on[index[label]], off[index[label]] = on_value, off_value
    return on, off


def rise_levels(labels: Sequence[str], settings: DetectorConfig) -> np.ndarray:
    """Per-class level whose run dates an onset: the off threshold, or ``rise-threshold`` where that is lower
    (with ``onset-at-rise``; without it, the off threshold). Below it a class is idle."""
    _, off = class_thresholds(labels, settings)
    return np.minimum(off, np.float32(settings.rise_threshold)) if settings.onset_at_rise else off


def to_frames(ms: float, frame_s: float) -> int:
    """A duration in whole frames, rounded to the nearest (half up)."""
    return math.floor(ms / (1000.0 * frame_s) + 0.5)


def min_duration_frames(min_duration_ms: float, frame_s: float) -> int:
    """Frames a candidate needs before it is confirmed: the minimum duration in frames, at least 1."""
    return max(1, to_frames(min_duration_ms, frame_s))


def class_confirm_frames(labels: Sequence[str], settings: DetectorConfig, frame_s: float) -> np.ndarray:
    """Per-class frames to confirm a candidate: ``min-duration-ms`` or the label's ``class-min-duration-ms``.

    A label in ``class-min-duration-ms`` that is not one of ``labels`` is a :class:`ConfigError`.
    """
    frames = np.full(len(labels), min_duration_frames(settings.min_duration_ms, frame_s), dtype=np.int64)
    index = _known_labels(labels, settings.class_min_duration_ms, "class-min-duration-ms")
    for label, ms in settings.class_min_duration_ms.items():
        frames[index[label]] = min_duration_frames(ms, frame_s)
    return frames


def level_history_frames(settings: DetectorConfig, frame_s: float) -> int:
    """Frames of level history the onset check reaches back from the current frame: the longest dating of an
    onset (``max-rise-ms``), the reference level's span before it (``BASE_MS``) and one."""
    return to_frames(settings.max_rise_ms, frame_s) + to_frames(BASE_MS[0], frame_s) + 1


class EventTracker:
    """Streaming post-processing of per-frame probabilities ``[n_frames, n_classes]`` into events."""

    def __init__(self, labels: Sequence[str], settings: DetectorConfig, frame_s: float) -> None:
        if frame_s <= 0:
            raise ValueError(f"frame_s must be positive, got {frame_s}")
        self.labels = list(labels)
        self.settings = settings
        self.frame_s = frame_s
        self.on, self.off = class_thresholds(self.labels, settings)
        self.rise_level = rise_levels(self.labels, settings)
        self.confirm_frames = class_confirm_frames(self.labels, settings, frame_s)
        self.refractory_frames = to_frames(settings.refractory_ms, frame_s)
        self.max_rise_frames = to_frames(settings.max_rise_ms, frame_s)
        self.base_frames = (to_frames(BASE_MS[0], frame_s), to_frames(BASE_MS[1], frame_s))
        self.checks_rise = settings.min_onset_rise_db > 0
        self.history_frames = level_history_frames(settings, frame_s)
        self._levels = np.zeros(self.history_frames + 1, dtype=np.float64)  # ring buffer, frame t at t % size
        n = len(self.labels)
        self._state = np.full(n, _IDLE, dtype=np.int8)
        self._onset = np.zeros(n, dtype=np.int64)  # reported onset frame
        self._start = np.zeros(n, dtype=np.int64)  # frame the candidate reached on; the minimum duration counts from it
        self._peak = np.zeros(n, dtype=np.float32)
        self._latency_ms = np.zeros(n, dtype=np.float64)
        self._blocked_until = np.zeros(n, dtype=np.int64)  # first frame at which a candidate may start
        self._rise = np.zeros(n, dtype=np.int64)  # first frame of the current run at or above the rise level
        self._base_level = np.zeros(n, dtype=np.float64)  # the candidate's level before its onset (dB)
        self._loudest = np.zeros(n, dtype=np.float64)  # its loudest frame since then (dB)
        self._n_running = 0  # classes pending or active
        self.n_frames = 0

    @property
    def algorithmic_delay_ms(self) -> float:
        """Post-processing delay of an onset event after the onset frame: ``(confirm frames - 1)`` frames (the
        longest over the classes when their minimum durations differ)."""
        return float(self.confirm_frames.max() - 1) * self.frame_s * 1000.0

    def update(self, probs: np.ndarray, emitted_s: float | np.ndarray, levels: np.ndarray | None = None
               ) -> list[Event]:
        """Consume the next frames' probabilities (and their levels in dB, which the onset check needs); events
        are stamped as emitted at ``emitted_s``: one time for all the frames, or one per frame (the time its
        line would be written when streaming)."""
        probs = np.asarray(probs, dtype=np.float32)
        stamps = np.broadcast_to(np.asarray(emitted_s, dtype=np.float64), (len(probs),))
        if probs.ndim != 2 or probs.shape[1] != len(self.labels):
            raise ValueError(f"probabilities must be [n_frames, {len(self.labels)}], got {probs.shape}")
        if levels is None:
            if self.checks_rise:
                raise ValueError("min-onset-rise-db is set: the tracker needs the frames' levels")
            levels = np.zeros(len(probs))
        levels = np.asarray(levels, dtype=np.float64)
        if levels.shape != (len(probs),):
            raise ValueError(f"levels must be [{len(probs)}], one per frame, got {levels.shape}")
        events: list[Event] = []
        starts = np.flatnonzero((probs >= self.on).any(axis=1))  # frames where a candidate may start
        i = 0
        while i < len(probs):
            if self._n_running == 0:  # idle until the next frame at or above an on-threshold
                j = starts[np.searchsorted(starts, i)] if starts.size and starts[-1] >= i else len(probs)
                if j > i:
                    self._skip_idle(probs[i:j], levels[i:j])
                    i = j
                    continue
            events.extend(self._step(probs[i], levels[i], float(stamps[i])))
            i += 1
        return events

    def close(self, emitted_s: float) -> list[Event]:
        """End of stream: confirmed events still active end at the time after the last frame."""
        events = []
        end_s = self.n_frames * self.frame_s
        for c in np.flatnonzero(self._state == _ACTIVE):
            events.append(self._event("offset", int(c), end_s, emitted_s))
        self._state[:] = _IDLE
        self._n_running = 0
        return events

    def _event(self, kind: str, c: int, offset_s: float | None, emitted_s: float) -> Event:
        return Event(type=kind, label=self.labels[c], onset_s=float(self._onset[c] * self.frame_s),
                     offset_s=offset_s, score=float(self._peak[c]), latency_ms=float(self._latency_ms[c]),
                     emitted_s=emitted_s)

    def _level_span(self, first: int, last: int) -> np.ndarray:
        """Levels of the frames ``first..last - 1`` (clipped to the stream's first frame)."""
        frames = np.arange(max(0, first), last)
        return self._levels[frames % len(self._levels)]

    def _start_check(self, c: int, t: int) -> None:
        """The onset check's reference level and loudest frame so far for a candidate of class ``c`` starting
        at frame ``t`` (its onset already dated)."""
        onset = int(self._onset[c])
        base = self._level_span(onset - self.base_frames[0], onset - self.base_frames[1])
        self._base_level[c] = base.mean() if len(base) == self.base_frames[0] - self.base_frames[1] else -np.inf
        self._loudest[c] = self._level_span(onset - self.base_frames[1], t + 1).max()

    def _skip_idle(self, probs: np.ndarray, levels: np.ndarray) -> None:
        """Frames during which every class stays idle (none running, none at or above its on-threshold): only
        the level history and the start of the runs above the rise level move, as :meth:`_step` would move them."""
        t0, n = self.n_frames, len(probs)
        self.n_frames += n
        keep = min(n, len(self._levels))
        self._levels[(t0 + np.arange(n - keep, n)) % len(self._levels)] = levels[n - keep :]
        if self.settings.onset_at_rise:
            below = probs < self.rise_level
            last = n - 1 - np.argmax(below[::-1], axis=0)  # per class, the last frame below the rise level
            self._rise = np.where(below.any(axis=0), t0 + last + 1, self._rise)
            np.maximum(self._rise, self._blocked_until, out=self._rise)

    def _step(self, p: np.ndarray, level: float, emitted_s: float) -> list[Event]:
        t = self.n_frames
        self.n_frames += 1
        self._levels[t % len(self._levels)] = level
        above_on = p >= self.on
        if self.settings.onset_at_rise:
            self._rise[p < self.rise_level] = t + 1  # a run at or above it can start at the next frame at the earliest
            np.maximum(self._rise, self._blocked_until, out=self._rise)
        state = self._state
        events: list[Event] = []
        running = state != _IDLE

        ending = running & (p < self.off)  # active: the event ends; pending: too short, dropped
        if ending.any():
            for c in np.flatnonzero(ending):
                if state[c] == _ACTIVE:
                    events.append(self._event("offset", int(c), t * self.frame_s, emitted_s))
                    self._blocked_until[c] = t + self.refractory_frames
                state[c] = _IDLE
            running &= ~ending

        start = above_on & ~running & (self._blocked_until <= t)
        if start.any():
            self._start[start] = t
            if self.settings.onset_at_rise:  # where the run began, at most max-rise frames back
                self._onset[start] = np.maximum(self._rise[start], t - self.max_rise_frames)
            else:
                self._onset[start] = t
            self._peak[start] = 0.0
            state[start] = _PENDING
            running |= start
            if self.checks_rise:
                for c in np.flatnonzero(start):
                    self._start_check(int(c), t)
        if self.checks_rise:
            np.maximum(self._loudest, level, out=self._loudest, where=state == _PENDING)

        np.maximum(self._peak, p, out=self._peak, where=running)
        confirm = (state == _PENDING) & (self._start <= t + 1 - self.confirm_frames)
        if confirm.any():
            for c in np.flatnonzero(confirm):
                if self.checks_rise and self._loudest[c] - self._base_level[c] < self.settings.min_onset_rise_db:
                    state[c] = _SUPPRESSED
                    continue
                self._latency_ms[c] = (emitted_s - self._onset[c] * self.frame_s) * 1000.0
                events.append(self._event("onset", int(c), None, emitted_s))
                state[c] = _ACTIVE
        self._n_running = int(np.count_nonzero(running))
        return events

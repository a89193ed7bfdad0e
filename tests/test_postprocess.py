"""Post-processing: hysteresis, minimum duration, refractory time and per-class thresholds on hand-made
probability sequences (frames of 10 ms)."""

import dataclasses
import json

import numpy as np
import pytest

from clients.detector.postprocess import EventTracker, class_confirm_frames, class_thresholds, min_duration_frames
from fl.config import Config, DetectorConfig, apply
from fl.errors import ConfigError

FRAME_S = 0.01
LABELS = ["pop", "click"]


def run(sequence_a, settings, sequence_b=None, chunk=1):
    """Feed per-frame probabilities of two classes; each chunk is 'emitted' at the time after its last frame."""
    b = np.zeros(len(sequence_a)) if sequence_b is None else np.asarray(sequence_b)
    probs = np.stack([np.asarray(sequence_a, dtype=np.float32), b.astype(np.float32)], axis=1)
    tracker = EventTracker(LABELS, settings, FRAME_S)
    events = []
    for start in range(0, len(probs), chunk):
        block = probs[start : start + chunk]
        events += tracker.update(block, (start + len(block)) * FRAME_S)
    return events + tracker.close(len(probs) * FRAME_S)


def onsets(events):
    return [e for e in events if e.type == "onset"]


def test_hysteresis_starts_at_on_and_ends_below_off():
    settings = DetectorConfig(on_threshold=0.5, off_threshold=0.3, min_duration_ms=0, refractory_ms=0)
    seq = [0.1, 0.45, 0.6, 0.4, 0.35, 0.3, 0.2, 0.1]
    events = run(seq, settings)
    assert [(e.type, e.label) for e in events] == [("onset", "pop"), ("offset", "pop")]
    onset, offset = events
    assert onset.onset_s == pytest.approx(0.02)  # 0.45 is below on: the event starts at 0.6
    assert onset.offset_s is None
    assert offset.onset_s == pytest.approx(0.02)
    assert offset.offset_s == pytest.approx(0.06)  # 0.4, 0.35 and 0.3 keep it going (>= off); 0.2 ends it
    assert offset.score == pytest.approx(0.6)


def test_values_between_off_and_on_never_start_an_event():
    settings = DetectorConfig(on_threshold=0.5, off_threshold=0.3, min_duration_ms=0, refractory_ms=0)
    assert run([0.49, 0.45, 0.31, 0.49] * 5, settings) == []


def test_minimum_duration_drops_short_runs_and_delays_the_onset_event():
    settings = DetectorConfig(min_duration_ms=30, refractory_ms=0)
    assert min_duration_frames(30, FRAME_S) == 3
    short = [0.0, 0.9, 0.9, 0.1, 0.0]  # two frames: dropped
    assert run(short, settings) == []
    long = [0.0, 0.9, 0.4, 0.9, 0.9, 0.1, 0.0]  # 0.4 >= off keeps the candidate alive
    events = run(long, settings)
    assert [e.type for e in events] == ["onset", "offset"]
    onset = events[0]
    assert onset.onset_s == pytest.approx(0.01)
    # confirmed on its third frame (index 3), emitted at the end of that frame's chunk
    assert onset.emitted_s == pytest.approx(0.04)
    assert onset.latency_ms == pytest.approx(30.0)
    assert events[1].latency_ms == pytest.approx(30.0)


def test_one_update_with_a_time_per_frame_stamps_each_event_as_frame_by_frame_streaming_would():
    settings = DetectorConfig(min_duration_ms=30, refractory_ms=0)
    probs = np.array([0.0, 0.9, 0.9, 0.9, 0.1, 0.0, 0.8, 0.9, 0.95, 0.9, 0.0], np.float32)[:, None]
    stamps = 0.015 + FRAME_S * np.arange(len(probs))
    tracker = EventTracker(["x"], settings, FRAME_S)
    streamed = [e for t, row in enumerate(probs) for e in tracker.update(row[None], stamps[t])]
    at_once = EventTracker(["x"], settings, FRAME_S).update(probs, stamps)
    assert at_once == streamed and [e.type for e in at_once] == ["onset", "offset", "onset", "offset"]
    assert [e.emitted_s for e in at_once if e.type == "onset"] == pytest.approx([0.045, 0.095])
    with pytest.raises(ValueError):
        EventTracker(["x"], settings, FRAME_S).update(probs, stamps[:-1])


def test_refractory_time_blocks_a_second_event_after_the_offset():
    settings = DetectorConfig(min_duration_ms=0, refractory_ms=100)
    burst, gap = [0.9, 0.9], [0.0]
    close = burst + gap * 5 + burst + gap * 3  # second burst 5 frames after the offset: blocked
    far = burst + gap * 10 + burst + gap * 3  # 10 frames (100 ms) after: allowed
    assert len(onsets(run(close, settings))) == 1
    events = onsets(run(far, settings))
    assert [e.onset_s for e in events] == pytest.approx([0.0, 0.12])


def test_per_class_thresholds_replace_the_defaults_for_their_label():
    settings = DetectorConfig(min_duration_ms=0, refractory_ms=0, class_thresholds={"click": [0.8, 0.7]})
    on, off = class_thresholds(LABELS, settings)
    assert on.tolist() == pytest.approx([0.5, 0.8]) and off.tolist() == pytest.approx([0.3, 0.7])
    seq = [0.0, 0.6, 0.6, 0.0, 0.9, 0.75, 0.65, 0.0]
    events = onsets(run(seq, settings, sequence_b=seq))
    assert [(e.label, e.onset_s) for e in events] == [("pop", pytest.approx(0.01)), ("pop", pytest.approx(0.04)),
                                                      ("click", pytest.approx(0.04))]
    ends = [e for e in run(seq, settings, sequence_b=seq) if e.type == "offset" and e.label == "click"]
    assert ends[0].offset_s == pytest.approx(0.06)  # 0.65 < 0.7 ends the click


def test_unknown_label_in_class_thresholds_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown label 'snap'"):
        EventTracker(LABELS, DetectorConfig(class_thresholds={"snap": [0.6, 0.4]}), FRAME_S)


def test_per_class_minimum_duration_replaces_the_default_for_its_label():
    settings = DetectorConfig(min_duration_ms=20, refractory_ms=0, class_min_duration_ms={"click": 50})
    assert class_confirm_frames(LABELS, settings, FRAME_S).tolist() == [2, 5]
    four = [0.0, 0.9, 0.9, 0.9, 0.9, 0.0]  # four frames: a pop (2 needed), not a click (5 needed)
    events = onsets(run(four, settings, sequence_b=four))
    assert [(e.label, e.latency_ms) for e in events] == [("pop", pytest.approx(20.0))]
    five = [0.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.0]
    events = onsets(run(five, settings, sequence_b=five))
    assert [(e.label, e.latency_ms) for e in events] == [("pop", pytest.approx(20.0)), ("click", pytest.approx(50.0))]
    assert EventTracker(LABELS, settings, FRAME_S).algorithmic_delay_ms == pytest.approx(40.0)  # the slowest class


def test_bad_per_class_minimum_duration_is_a_config_error():
    with pytest.raises(ConfigError, match="class-min-duration-ms: unknown label 'snap'"):
        EventTracker(LABELS, DetectorConfig(class_min_duration_ms={"snap": 40.0}), FRAME_S)
    with pytest.raises(ValueError, match="class-min-duration-ms.'pop'"):
        DetectorConfig(class_min_duration_ms={"pop": -5.0})


def test_chunking_does_not_change_the_events():
    rng = np.random.default_rng(0)
    seq = np.clip(np.repeat(rng.random(40), 3) * 1.2 - 0.1, 0, 1)
    settings = DetectorConfig(min_duration_ms=20, refractory_ms=50)
    by_frame = [(e.type, e.label, e.onset_s, e.offset_s, e.score) for e in run(seq, settings, seq[::-1])]
    by_chunk = [(e.type, e.label, e.onset_s, e.offset_s, e.score) for e in run(seq, settings, seq[::-1], 7)]
    assert by_frame == by_chunk and len(by_frame) > 4


def test_events_active_at_the_end_are_closed_and_serialise_as_json():
    settings = DetectorConfig(min_duration_ms=0)
    events = run([0.0, 0.8, 0.9], settings)
    assert [e.type for e in events] == ["onset", "offset"]
    assert events[1].offset_s == pytest.approx(0.03)
    line = json.loads(events[0].to_json())
    assert {"label", "onset_s", "score", "latency_ms", "offset_s", "type", "emitted_s"} <= set(line)
    assert line["label"] == "pop" and line["offset_s"] is None and line["score"] == pytest.approx(0.8)


def test_rise_threshold_dates_the_onset_from_the_run_above_it_when_lower_than_off():
    seq = [0.0, 0.1, 0.25, 0.25, 0.35, 0.9, 0.9, 0.9, 0.1, 0.0]
    settings = DetectorConfig(min_duration_ms=20, refractory_ms=0, onset_at_rise=True)
    at_off, low = (onsets(run(seq, dataclasses.replace(settings, rise_threshold=level)))[0] for level in (1.0, 0.2))
    assert at_off.onset_s == pytest.approx(0.04)  # 1.0: the run at or above off (0.3) starts at 0.35
    assert low.onset_s == pytest.approx(0.02)  # 0.2: the run at or above 0.2 starts at the first 0.25
    assert low.emitted_s == at_off.emitted_s == pytest.approx(0.07)  # dating moves, confirmation does not
    # a class whose own off threshold is below the rise threshold is dated from its run above that off
    low_off = DetectorConfig(min_duration_ms=20, refractory_ms=0, onset_at_rise=True, rise_threshold=0.2,
                             class_thresholds={"pop": [0.5, 0.15]})
    assert onsets(run([0.0, 0.17, 0.25, 0.9, 0.9, 0.9, 0.0], low_off))[0].onset_s == pytest.approx(0.01)


def test_max_rise_ms_bounds_how_early_a_long_idle_run_dates_the_onset():
    seq = [0.0] + [0.25] * 50 + [0.9] * 5 + [0.0]  # 0.5 s above the rise level, then on at frame 51
    settings = DetectorConfig(min_duration_ms=20, refractory_ms=0, onset_at_rise=True, rise_threshold=0.2)
    assert onsets(run(seq, dataclasses.replace(settings, max_rise_ms=1000.0)))[0].onset_s == pytest.approx(0.01)
    capped = onsets(run(seq, settings))[0]  # default 300 ms: 30 frames before frame 51
    assert capped.onset_s == pytest.approx(0.21) and capped.latency_ms == pytest.approx(320.0)
    assert onsets(run(seq, dataclasses.replace(settings, max_rise_ms=0.0)))[0].onset_s == pytest.approx(0.51)
    # a rise of exactly the cap keeps its start; one frame longer is capped
    for frames, expected in [(30, 0.01), (31, 0.02)]:
        seq = [0.0] + [0.25] * frames + [0.9] * 5 + [0.0]
        assert onsets(run(seq, settings))[0].onset_s == pytest.approx(expected)
    # the refractory time still bounds a rise the cap would allow
    blocked = dataclasses.replace(settings, refractory_ms=100.0, min_duration_ms=0.0)
    after = [0.9, 0.0] + [0.25] * 20 + [0.9, 0.0]  # offset at frame 1: blocked until frame 11
    assert [e.onset_s for e in onsets(run(after, blocked))] == pytest.approx([0.0, 0.11])
    with pytest.raises(ConfigError, match=r"my\.toml.*max-rise-ms: must be non-negative"):
        apply(Config(), {"detector": {"max-rise-ms": -1.0}}, "my.toml")


@pytest.mark.parametrize("level", [0.0, 1.5])
def test_rise_threshold_outside_zero_one_is_refused(level):
    with pytest.raises(ConfigError, match=r"my\.toml.*rise-threshold: must be in \(0, 1\]"):
        apply(Config(), {"detector": {"rise-threshold": level}}, "my.toml")


def test_bad_probability_shape_is_refused():
    tracker = EventTracker(LABELS, DetectorConfig(), FRAME_S)
    with pytest.raises(ValueError, match="probabilities must be"):
        tracker.update(np.zeros((3, 5)), 0.0)


def test_onset_at_rise_dates_the_event_from_its_run_above_off():
    seq = [0.0, 0.35, 0.4, 0.45, 0.9, 0.9, 0.9, 0.1, 0.0]
    plain = DetectorConfig(min_duration_ms=20, refractory_ms=0)
    rise = DetectorConfig(min_duration_ms=20, refractory_ms=0, onset_at_rise=True)
    (a,) = onsets(run(seq, plain))
    (b,) = onsets(run(seq, rise))
    assert a.onset_s == pytest.approx(0.04) and b.onset_s == pytest.approx(0.01)  # 0.35 >= off starts the rise
    assert a.emitted_s == b.emitted_s == pytest.approx(0.06)  # confirmed on the second frame at or above on
    assert b.latency_ms == pytest.approx(50.0)
    # a run broken by a frame below off starts again; the refractory time bounds the rise too
    broken = [0.4, 0.2, 0.4, 0.9, 0.9, 0.0]
    assert onsets(run(broken, rise))[0].onset_s == pytest.approx(0.02)
    blocked = DetectorConfig(min_duration_ms=0, refractory_ms=50, onset_at_rise=True)
    after = [0.9, 0.0, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.9, 0.0]  # offset at frame 1: blocked until frame 6
    assert [e.onset_s for e in onsets(run(after, blocked))] == pytest.approx([0.0, 0.06])


def _checked_onsets(probs, levels, settings, chunk=1):
    tracker = EventTracker(["pop"], settings, FRAME_S)
    probs = np.asarray(probs, dtype=np.float32)[:, None]
    events = []
    for start in range(0, len(probs), chunk):
        events += tracker.update(probs[start : start + chunk], 0.0, levels[start : start + chunk])
    return events + tracker.close(0.0)


def test_onset_check_lets_through_only_events_whose_level_rose_into_them():
    settings = DetectorConfig(on_threshold=0.5, off_threshold=0.3, min_duration_ms=30, refractory_ms=0,
                              min_onset_rise_db=6.0)
    probs, levels = np.zeros(200), np.full(200, -50.0)
    probs[[*range(3, 15), *range(40, 60), *range(100, 140), *range(160, 180)]] = 0.9
    levels[40:60] += 10.0  # a sound 10 dB over the floor: triggers
    levels[100:140] = -45.0  # a steady noise from frame 100 that the model takes for a pop ...
    levels[120:140] = -35.0  # ... stays suppressed, even when it gets louder, until the probability falls below off
    levels[160:180] += 5.0  # 5 dB is not enough
    for chunk in (1, 7, 200):
        events = _checked_onsets(probs, levels, settings, chunk)
        # frame 3 has no 80 ms of history before it: not checked
        assert [(e.type, round(e.onset_s, 2)) for e in events] == [
            ("onset", 0.03), ("offset", 0.03), ("onset", 0.40), ("offset", 0.40)]
    unchecked = _checked_onsets(probs, levels, dataclasses.replace(settings, min_onset_rise_db=0.0))
    assert [round(e.onset_s, 2) for e in onsets(unchecked)] == [0.03, 0.40, 1.00, 1.60]


def test_onset_check_compares_with_the_level_before_the_dated_onset():
    settings = DetectorConfig(on_threshold=0.5, off_threshold=0.3, min_duration_ms=30, refractory_ms=0,
                              onset_at_rise=True, rise_threshold=0.2, min_onset_rise_db=6.0)
    probs, levels = np.zeros(100), np.full(100, -50.0)
    probs[40:50], probs[50:70] = 0.25, 0.9  # the probability climbs from frame 40, reaches on at 50
    levels[42:70] = -40.0  # the sound began at frame 42: the rise is measured from before 40, not before 50
    assert [round(e.onset_s, 2) for e in onsets(_checked_onsets(probs, levels, settings))] == [0.40]
    at_off = dataclasses.replace(settings, onset_at_rise=False)
    assert onsets(_checked_onsets(probs, levels, at_off)) == []


def test_onset_check_needs_the_levels_and_a_sane_setting():
    tracker = EventTracker(["pop"], DetectorConfig(min_onset_rise_db=6.0), FRAME_S)
    with pytest.raises(ValueError, match="needs the frames' levels"):
        tracker.update(np.zeros((3, 1)), 0.0)
    with pytest.raises(ValueError, match=r"levels must be \[3\]"):
        tracker.update(np.zeros((3, 1)), 0.0, np.zeros(4))
    with pytest.raises(ConfigError, match="min-onset-rise-db"):
        apply(Config(), {"detector": {"min-onset-rise-db": -1.0}}, "test.toml")


@pytest.mark.parametrize("settings", [
    DetectorConfig(on_threshold=0.6, off_threshold=0.4, min_duration_ms=30, refractory_ms=40),
    DetectorConfig(on_threshold=0.6, off_threshold=0.4, min_duration_ms=20, refractory_ms=0, onset_at_rise=True,
                   rise_threshold=0.2, max_rise_ms=60, min_onset_rise_db=4.0,
                   class_thresholds={"click": [0.8, 0.8]}),
])
def test_skipping_idle_frames_gives_the_events_of_stepping_every_frame(settings):
    rng = np.random.default_rng(3)
    probs = np.clip(np.repeat(rng.random((150, 2)), rng.integers(1, 9, 150), axis=0) ** 2 * 1.1, 0, 1)
    levels = np.repeat(rng.normal(-50, 8, len(probs) // 4 + 1), 4)[: len(probs)]
    stepped = EventTracker(LABELS, settings, FRAME_S)
    expected = [e for row, level in zip(probs.astype(np.float32), levels, strict=True)
                for e in stepped._step(row, level, 0.0)]
    for chunk in (1, 13, len(probs)):
        tracker = EventTracker(LABELS, settings, FRAME_S)
        events = [e for start in range(0, len(probs), chunk)
                  for e in tracker.update(probs[start : start + chunk], 0.0, levels[start : start + chunk])]
        assert events == expected and tracker.n_frames == len(probs)
    assert len(onsets(expected)) > 10

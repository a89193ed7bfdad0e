"""Operating points from saved probabilities: the fast rerun equals the tracker's, pooling, save/load, figure."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmarks.personalize.tradeoff import (
    EXTRA_HOLD_MS,
    FAST_HOLDS_MS,
    ON_THRESHOLDS,
    REGION_GAP_FRAMES,
    SavedProbabilities,
    _onsets,
    format_tradeoff,
    load_probabilities,
    operating_point,
    plot_tradeoff,
    save_probabilities,
    tradeoff,
)
from clients.detector.postprocess import EventTracker
from fl.config import DetectorConfig
from fl.errors import DataError

FRAME_S = 0.01
LABELS = ["pop", "hum"]


def _detector(**overrides) -> DetectorConfig:
    settings = {"class_thresholds": {"pop": [0.6, 0.48], "hum": [0.5, 0.4]},
                "class_min_duration_ms": {"pop": 100.0, "hum": 200.0}, "onset_at_rise": True,
                "refractory_ms": 300.0, **overrides}
    return DetectorConfig(**settings)


def _bursts(n: int, bursts: list[tuple[int, int, float]], floor: float = 0.05) -> np.ndarray:
    """A probability track at ``floor`` with rectangular bursts (start frame, length, height)."""
    p = np.full(n, floor, dtype=np.float32)
    for start, length, height in bursts:
        p[start : start + length] = height
    return p


@pytest.mark.parametrize(("onset_at_rise", "rise_threshold", "max_rise_ms", "floor_sd", "min_onset_rise_db"),
                         [(True, 1.0, 300.0, 0.1, 0.0), (True, 0.2, 300.0, 0.03, 0.0), (True, 0.2, 50.0, 0.03, 0.0),
                          (False, 1.0, 300.0, 0.1, 0.0), (True, 0.2, 300.0, 0.03, 6.0), (False, 1.0, 300.0, 0.1, 6.0)])
def test_fast_rerun_finds_the_same_onsets_as_one_pass_of_the_tracker(onset_at_rise, rise_threshold, max_rise_ms,
                                                                     floor_sd, min_onset_rise_db):
    rng = np.random.default_rng(0)
    p = np.clip(rng.normal(0.08, floor_sd, 6000), 0, 1).astype(np.float32)
    levels = rng.normal(-50.0, 1.0, 6000)  # a steady floor; every other burst comes with a 15 dB louder sound
    for i, start in enumerate(rng.integers(20, 5900, 40)):  # bursts of varied height and length, some close ...
        ramp = int(rng.integers(0, 15))  # ... together, some climbing through 0.2-0.3 first
        length = int(rng.integers(3, 60))
        p[start - ramp : start] = np.linspace(0.2, 0.3, ramp)
        p[start : start + length] = rng.uniform(0.3, 1.0)
        if i % 2:
            levels[start - ramp : start + length] += 15.0
    base = _detector(onset_at_rise=onset_at_rise, rise_threshold=rise_threshold, max_rise_ms=max_rise_ms,
                     min_onset_rise_db=min_onset_rise_db)
    if rise_threshold < 1.0:  # the rise level splits the track into many regions, not one
        assert np.count_nonzero(np.diff(np.flatnonzero(p >= rise_threshold)) > REGION_GAP_FRAMES) > 5
    for on, hold in [(0.5, 100.0), (0.7, 150.0), (0.3, 30.0)]:
        settings = dataclasses.replace(base, class_thresholds={"pop": [on, on * 0.8]},
                                       class_min_duration_ms={"pop": hold})
        tracker = EventTracker(["pop"], settings, FRAME_S)
        expected = [e.onset_s for e in tracker.update(p[:, None], 0.0, levels) if e.type == "onset"]
        assert len(expected) > 5
        assert _onsets(p, levels, "pop", on, on * 0.8, hold, base, FRAME_S) == pytest.approx(expected)
        if min_onset_rise_db:  # the onset check drops the bursts over the steady floor
            unchecked = _onsets(p, levels, "pop", on, on * 0.8, hold,
                                dataclasses.replace(base, min_onset_rise_db=0.0), FRAME_S)
            assert len(unchecked) > len(expected)
        if rise_threshold < 1.0 and on > 0.3 and not min_onset_rise_db:  # it dates onsets earlier than off would
            at_off = _onsets(p, levels, "pop", on, on * 0.8, hold, dataclasses.replace(base, rise_threshold=1.0),
                             FRAME_S)
            assert len(at_off) == len(expected) and any(a < b for a, b in zip(expected, at_off, strict=True))
        if max_rise_ms < 150.0 and on > 0.3:  # a cap shorter than the longest ramps dates some onsets later
            uncapped = _onsets(p, levels, "pop", on, on * 0.8, hold, dataclasses.replace(base, max_rise_ms=300.0),
                               FRAME_S)
            assert len(uncapped) == len(expected) and any(a > b for a, b in zip(expected, uncapped, strict=True))


def _run(test_bursts: list[tuple[int, int, float]], aggressor_bursts: list[tuple[int, int, float]]
         ) -> SavedProbabilities:
    test = np.stack([_bursts(1000, test_bursts), _bursts(1000, [])], axis=1)
    aggressor = np.stack([_bursts(3600 * 50, aggressor_bursts), _bursts(3600 * 50, [])], axis=1)
    reference = [("pop", start * FRAME_S) for start, _, _ in test_bursts]
    levels = np.zeros(len(aggressor))
    return SavedProbabilities(LABELS, _detector(), FRAME_S, test, reference, [aggressor[:100000], aggressor[100000:]],
                              np.zeros(len(test)), [levels[:100000], levels[100000:]], delay_s=0.015)


def test_operating_points_pool_counts_and_hours_over_users():
    # user A: two pops of 120 ms (one found only at low thresholds), one false trigger of 0.65 lasting 120 ms
    a = _run([(100, 12, 0.93), (500, 12, 0.55)], [(5000, 12, 0.65)])
    # user B: one pop found, a long false trigger of 0.95 that no threshold removes
    b = _run([(300, 30, 0.97)], [(150000, 40, 0.95)])
    picked = operating_point([a, b], "pop", None, 0.0)  # pop picked on 0.6: misses A's 0.55 pop
    assert (picked.counts.tp, picked.counts.fn, picked.false_triggers) == (2, 1, 2)
    assert picked.hours == pytest.approx(1.0)  # two half hours
    low = operating_point([a, b], "pop", 0.5, 0.0)
    assert (low.counts.tp, low.counts.fn, low.false_triggers) == (3, 0, 2)
    high = operating_point([a, b], "pop", 0.9, 0.0)
    assert (high.counts.tp, high.counts.fn, high.false_triggers) == (2, 1, 1)
    longer = operating_point([a, b], "pop", 0.5, 50.0)  # hold 150 ms: A's 120 ms pops and trigger are dropped
    assert (longer.counts.tp, longer.false_triggers) == (1, 1)
    assert longer.to_dict()["false_triggers_per_hour"] == pytest.approx(1.0)
    # latency: confirmed on the hold's last frame, written the frontend's delay later
    assert picked.to_dict()["median_latency_ms"] == pytest.approx(90.0 + 15.0)
    assert longer.to_dict()["median_latency_ms"] == pytest.approx(140.0 + 15.0)
    fast = operating_point([a, b], "pop", 0.5, 0.0, hold_ms=30.0)  # the same short hold for every user
    assert fast.to_dict()["median_latency_ms"] == pytest.approx(20.0 + 15.0)
    assert (fast.counts.tp, fast.false_triggers) == (3, 2)
    assert np.isnan(operating_point([a], "pop", 0.99, 0.0).to_dict()["median_latency_ms"])  # nothing found


def test_a_picked_off_equal_to_on_stays_at_on_at_every_other_threshold():
    # off = on is a valid pick (a sound whose takes stay high while they hold), and 0.95 * 0.527 / 0.527 is
    # 0.9500000000000001 in floating point: an off above on, which the detector settings refuse
    assert 0.95 * 0.527 / 0.527 > 0.95
    run = dataclasses.replace(_run([(100, 30, 0.97)], [(5000, 30, 0.96)]),
                              detector=_detector(class_thresholds={"pop": [0.527, 0.527], "hum": [0.5, 0.4]}))
    at = operating_point([run], "pop", 0.95, 0.0)
    assert (at.counts.tp, at.counts.fn, at.false_triggers) == (1, 0, 1)
    assert set(tradeoff([run])["pop"]["+0ms"]) == {"picked", *(f"{on:g}" for on in ON_THRESHOLDS)}


def test_saved_probabilities_round_trip_and_the_table_and_figure(tmp_path):
    run = _run([(100, 20, 0.9)], [(5000, 12, 0.65), (120000, 30, 0.8)])
    path = save_probabilities(tmp_path / "probabilities-10.npz", run)
    back = load_probabilities(path)
    assert back.labels == LABELS and back.detector == run.detector and back.frame_s == FRAME_S
    assert back.reference == run.reference
    assert [len(c) for c in back.aggressor] == [len(c) for c in run.aggressor]
    np.testing.assert_array_equal(back.test, run.test)
    np.testing.assert_array_equal(back.test_levels, run.test_levels)
    assert [len(c) for c in back.aggressor_levels] == [len(c) for c in run.aggressor]
    table = tradeoff([back])
    assert set(table) == set(LABELS)
    assert back.delay_s == run.delay_s == 0.015
    assert list(table["pop"]) == [f"+{extra:g}ms" for extra in EXTRA_HOLD_MS] + [f"{h:g}ms" for h in FAST_HOLDS_MS]
    assert set(table["pop"]["+0ms"]) == {"picked", *(f"{on:g}" for on in ON_THRESHOLDS)}
    assert table["pop"]["+0ms"]["0.7"]["false_triggers"] == 1 and table["pop"]["+0ms"]["0.5"]["false_triggers"] == 2
    assert "pop" in format_tradeoff(table)
    png = plot_tradeoff(table, tmp_path / "tradeoff.png", "test", target=(0.3, 0.95))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_damaged_probabilities_file_is_named_in_one_line(tmp_path):
    path = save_probabilities(tmp_path / "probabilities-10.npz", _run([(100, 20, 0.9)], [(5000, 12, 0.65)]))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{path}: not a readable probabilities file") as caught:
        load_probabilities(path)
    assert "\n" not in str(caught.value)

"""Event-level metrics: onset collar, one-to-one maximal matching, precision/recall/F1, false triggers/hour."""

import pytest

from clients.detector.event_metrics import (
    EventCounts,
    event_counts,
    false_trigger_interval,
    false_triggers_per_hour,
    match_onsets,
)


def test_collar_is_inclusive_at_100_ms():
    assert match_onsets([1.0], [1.1]) == 1
    assert match_onsets([1.0], [0.9]) == 1
    assert match_onsets([1.0], [1.1011]) == 0
    assert match_onsets([1.0], [1.05], collar_s=0.02) == 0


def test_matching_is_one_to_one():
    counts = event_counts([("pop", 1.0)], [("pop", 0.98), ("pop", 1.03)])
    assert (counts["pop"].tp, counts["pop"].fp, counts["pop"].fn) == (1, 1, 0)
    counts = event_counts([("pop", 1.0), ("pop", 1.15)], [("pop", 1.08)])
    assert (counts["pop"].tp, counts["pop"].fp, counts["pop"].fn) == (1, 0, 1)


def test_matching_is_maximal_where_nearest_first_is_not():
    # The nearest detection of the reference at 0.25 is 0.18; taking it would leave 0.10 unmatched.
    assert match_onsets([0.10, 0.25], [0.18, 0.34]) == 2


def test_labels_must_agree_and_overall_sums():
    reference = [("pop", 1.0, 1.05), ("hiss", 2.0, 2.5), ("hiss", 4.0, 4.6)]
    detected = [("click", 1.01), ("hiss", 2.03), ("hiss", 7.0)]
    counts = event_counts(reference, detected, labels=["pop", "click", "hiss", "hum"])
    assert counts["pop"] == EventCounts(0, 0, 1)
    assert counts["click"] == EventCounts(0, 1, 0)
    assert counts["hiss"] == EventCounts(1, 1, 1)
    assert counts["hum"] == EventCounts(0, 0, 0)
    assert counts["overall"] == EventCounts(1, 2, 2)
    assert list(counts) == ["pop", "click", "hiss", "hum", "overall"]


def test_rates():
    counts = EventCounts(tp=8, fp=2, fn=8)
    assert counts.precision == pytest.approx(0.8)
    assert counts.recall == pytest.approx(0.5)
    assert counts.f1 == pytest.approx(2 * 0.8 * 0.5 / 1.3)
    assert EventCounts(0, 0, 0).precision == 1.0 and EventCounts(0, 0, 0).recall == 1.0
    assert EventCounts(0, 3, 2).f1 == 0.0
    assert counts.to_dict()["tp"] == 8


def test_false_triggers_per_hour():
    assert false_triggers_per_hour(3, 1800.0) == pytest.approx(6.0)
    assert false_triggers_per_hour(0, 60.0) == 0.0
    with pytest.raises(ValueError, match="seconds"):
        false_triggers_per_hour(1, 0.0)
    with pytest.raises(ValueError, match="collar"):
        match_onsets([1.0], [1.0], collar_s=-0.1)


def test_the_false_trigger_interval_is_the_exact_poisson_one():
    # none in an hour: from 0 up to -ln(0.025) = 3.689 an hour; three in an hour: 0.619 to 8.767 (Garwood's tables)
    assert false_trigger_interval(0, 3600.0) == pytest.approx((0.0, 3.6889), abs=1e-4)
    assert false_trigger_interval(3, 3600.0) == pytest.approx((0.6187, 8.7673), abs=1e-4)
    # the same count in half the time: twice the rate and twice the bounds
    assert false_trigger_interval(3, 1800.0) == pytest.approx((1.2375, 17.5346), abs=1e-3)
    low, high = false_trigger_interval(29, 9000.0, level=0.5)
    assert low < false_triggers_per_hour(29, 9000.0) < high and high - low < 4.0
    assert false_trigger_interval(0, 12 * 3600.0)[1] > 0.3 > false_trigger_interval(0, 12.5 * 3600.0)[1]
    with pytest.raises(ValueError, match="seconds"):
        false_trigger_interval(1, 0.0)
    with pytest.raises(ValueError, match="level must be between 0 and 1, got 95"):
        false_trigger_interval(1, 3600.0, level=95)

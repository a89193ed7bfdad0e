"""Synthetic mouth sounds and aggressor streams: seeded, varied, with correct ground truth."""

import numpy as np
import pytest

from clients.detector.enroll import frame_energy_db
from data_prep.mouth_sounds import (
    SOUNDS,
    background_take,
    corpus_take,
    enrollment_take,
    make_aggressor_stream,
    make_test_stream,
    make_voice,
    mouth_sound,
    noise_bed,
    speech_like,
)

RATE = 16000
LENGTHS_S = {"pop": (0.05, 0.1), "click": (0.03, 0.06), "hiss": (0.3, 0.9), "hum": (0.3, 1.0),
             "whistle": (0.25, 1.0)}


def _centroid(wave: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    freqs = np.fft.rfftfreq(len(wave), 1 / RATE)
    return float((spectrum * freqs).sum() / spectrum.sum())


@pytest.mark.parametrize("kind", SOUNDS)
def test_each_sound_is_seeded_bounded_and_varies(kind):
    voice = make_voice(3)
    takes = [mouth_sound(kind, voice, seed) for seed in range(6)]
    assert np.array_equal(takes[0], mouth_sound(kind, voice, 0))
    low, high = LENGTHS_S[kind]
    for take in takes:
        assert np.all(np.isfinite(take))
        assert np.max(np.abs(take)) == pytest.approx(1.0)
        assert low * RATE - 1 <= len(take) <= high * RATE + 1
    centroids = [_centroid(t) for t in takes]
    assert np.std(centroids) > 0.005 * np.mean(centroids)  # timbre / pitch varies from take to take
    if kind in ("hiss", "hum", "whistle"):
        assert len({len(t) for t in takes}) > 1  # and so does the length


def test_sounds_differ_in_spectrum():
    voice = make_voice(5)
    centroid = {kind: np.mean([_centroid(mouth_sound(kind, voice, s)) for s in range(3)]) for kind in SOUNDS}
    assert centroid["hum"] < 1000 < centroid["hiss"]
    assert centroid["pop"] < centroid["click"]


def test_voices_differ_and_unknown_kinds_are_refused():
    assert make_voice(1) != make_voice(2)
    assert make_voice(1) == make_voice(1)
    with pytest.raises(ValueError, match="unknown mouth sound"):
        mouth_sound("sneeze", make_voice(0), 0)
    with pytest.raises(ValueError, match="unknown noise bed"):
        noise_bed("rain", 100, 0)


def test_aggressors_are_finite_and_speech_has_pauses():
    voice = make_voice(0)
    speech = speech_like(voice, 2.0, 1)
    assert np.all(np.isfinite(speech)) and np.max(np.abs(speech)) == pytest.approx(1.0)
    energy = frame_energy_db(speech, RATE)
    assert energy.max() - np.percentile(energy, 10) > 20  # syllables and pauses
    for kind in ("room", "fan", "traffic", "babble"):
        bed = noise_bed(kind, RATE, 2)
        assert len(bed) == RATE and np.std(bed) == pytest.approx(1.0, rel=0.05)


def test_enrollment_take_places_the_sound_at_its_onset():
    take = enrollment_take("whistle", make_voice(4), 9)
    (label, onset, offset), = take.events
    assert label == "whistle" and 0.4 <= onset < offset <= 1.8
    energy = frame_energy_db(take.wave, RATE)
    before, during = energy[: int(onset * 100) - 2].max(), energy[int(onset * 100) + 3 : int(offset * 100) - 3]
    assert during.min() > before + 10


def test_corpus_takes_are_half_over_a_louder_room_floor():
    voice = make_voice(5)
    floors = []
    for seed in range(40):
        take = corpus_take("click", voice, seed)
        (label, onset, _), = take.events
        assert label == "click" and 0.4 <= onset
        floors.append(np.median(frame_energy_db(take.wave[: int((onset - 0.05) * RATE)], RATE)))
        assert np.array_equal(take.wave, corpus_take("click", voice, seed).wave)
    quiet_room = np.median([np.median(frame_energy_db(enrollment_take("click", voice, s).wave[: int(0.35 * RATE)],
                                                      RATE)) for s in range(40)])
    louder = np.mean(np.array(floors) > quiet_room + 6)
    assert 0.25 <= louder <= 0.75  # about half the takes (LOUD_ROOM_FRACTION) over a louder floor


def test_test_stream_ground_truth():
    voice = make_voice(6)
    stream = make_test_stream(voice, 2, 11, sounds=("pop", "hum"))
    again = make_test_stream(voice, 2, 11, sounds=("pop", "hum"))
    assert np.array_equal(stream.wave, again.wave)
    assert sorted(e[0] for e in stream.events) == ["hum", "hum", "pop", "pop"]
    assert len(stream.aggressors) == 4
    spans = sorted([(a, b) for _, a, b in stream.events + stream.aggressors])
    assert all(b1 + 0.39 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:], strict=False))  # no overlap
    energy = frame_energy_db(stream.wave, RATE)
    for _, onset, offset in stream.events:
        t = int(round(onset * 100))
        assert energy[t + 1 : int(offset * 100) + 1].max() > energy[t - 20 : t - 2].max() + 6


def test_aggressor_stream_and_background_hold_no_mouth_sound():
    voice = make_voice(8)
    stream = make_aggressor_stream(voice, 6.0, 2)
    assert stream.events == [] and stream.seconds == pytest.approx(6.0)
    assert stream.aggressors and all(0 <= a < b <= 6.0 + 1e-9 for _, a, b in stream.aggressors)
    take = background_take(voice, 3, seconds=5.0)
    assert take.events == [] and take.seconds == pytest.approx(5.0) and take.aggressors
    assert np.max(np.abs(take.wave)) < 1.0

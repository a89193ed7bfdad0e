"""Enrollment: energy labels, take checks (silent, clipped), profile permissions, recording guidance."""

import json
import os
import stat
import sys

import numpy as np
import pytest
import soundfile as sf

from clients.detector.audio_input import MicSource
from clients.detector.enroll import (
    MIN_EXAMPLES,
    EnrollError,
    TakeRejected,
    check_take,
    energy_segments,
    enroll,
    segments_from_energy,
)
from clients.detector.profile import Profile, ProfileError
from data_prep.mouth_sounds import enrollment_take, make_voice

RATE = 16000


def _quiet(seconds: float, seed: int = 0, level: float = 1e-3) -> np.ndarray:
    return level * np.random.default_rng(seed).standard_normal(int(seconds * RATE))


def _burst(wave: np.ndarray, start_s: float, length_s: float, freq: float = 1000.0, amp: float = 0.3) -> None:
    n = int(length_s * RATE)
    start = int(start_s * RATE)
    wave[start : start + n] += amp * np.sin(2 * np.pi * freq * np.arange(n) / RATE)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_segments_from_energy_rules():
    energy = np.zeros(100)
    energy[10:12] = 30  # 20 ms: too short
    energy[30:33] = 30  # 30 ms: kept
    energy[60:70] = 30
    energy[72:80] = 30  # a 20 ms dip inside a sound is bridged
    energy[83:90] = 30  # a 30 ms gap separates two sounds
    assert segments_from_energy(energy) == [(30, 33), (60, 80), (83, 90)]


def test_energy_labels_of_hand_made_takes():
    wave = _quiet(1.5)
    _burst(wave, 0.40, 0.10)
    ((onset, offset),) = energy_segments(wave, RATE)
    assert onset == pytest.approx(0.40, abs=0.025) and offset == pytest.approx(0.50, abs=0.025)
    two = _quiet(2.0, seed=1)
    _burst(two, 0.30, 0.20, freq=300)
    _burst(two, 1.20, 0.05, freq=3000)
    segments = energy_segments(two, RATE)
    assert [round(a, 1) for a, _ in segments] == [0.3, 1.2]
    # Mean + 1 std: a take that is half sound at one level labels only its louder frames.
    ramp = _quiet(1.0, seed=2)
    _burst(ramp, 0.2, 0.3, amp=0.05)
    _burst(ramp, 0.6, 0.1, amp=0.5)
    ((onset, _),) = energy_segments(ramp, RATE)
    assert onset == pytest.approx(0.6, abs=0.02)


def test_synthetic_takes_are_labelled_at_their_onset():
    voice = make_voice(2)
    for i, kind in enumerate(("pop", "click", "hiss", "hum", "whistle")):
        take = enrollment_take(kind, voice, [5, i])
        segments = check_take(take.wave, RATE, "take")
        assert abs(segments[0][0] - take.events[0][1]) <= 0.05


def test_silent_and_clipped_takes_are_rejected():
    with pytest.raises(TakeRejected, match=r"a\.wav: rejected: silent \(peak -6\d dBFS\)"):
        check_take(_quiet(1.0, level=1e-4), RATE, "a.wav")
    noise_only = _quiet(1.0, level=0.05)
    with pytest.raises(TakeRejected, match="silent: no sound stands out"):
        check_take(noise_only, RATE, "b.wav")
    clipped = _quiet(1.0)
    _burst(clipped, 0.4, 0.1, amp=1.5)
    with pytest.raises(TakeRejected, match=r"c\.wav: rejected: clipped \(\d+ samples at full scale\)"):
        check_take(np.clip(clipped, -1, 1), RATE, "c.wav")
    with pytest.raises(TakeRejected, match="all samples are zero"):
        check_take(np.zeros(RATE), RATE, "d.wav", background=True)
    assert check_take(_quiet(1.0), RATE, "room.wav", background=True) == []


def _write(path, wave):
    sf.write(path, wave, RATE, subtype="PCM_16")
    return path


def test_enroll_from_files_private_profile(tmp_path):
    voice = make_voice(1)
    files = [_write(tmp_path / f"pop{i}.wav", enrollment_take("pop", voice, i).wave) for i in range(3)]
    profile = tmp_path / "me"
    summary = enroll(profile, sound="pop", from_files=files, progress=False)
    assert summary["added"] == 3 and summary["examples"] == 3 and summary["needed"] == MIN_EXAMPLES - 3
    summary = enroll(profile, sound="pop", from_files=files[:1], progress=False)
    assert summary["examples"] == 4
    room = _write(tmp_path / "room.wav", _quiet(3.0))
    assert enroll(profile, background=True, from_files=[room], progress=False)["background_seconds"] == 3.0

    loaded = Profile.load(profile)
    assert loaded.counts() == {"pop": 4}
    assert [e.file for e in loaded.sounds["pop"]] == [f"sounds/pop/000{i}.wav" for i in range(1, 5)]
    assert all(len(e.segments) >= 1 and e.source.startswith("pop") for e in loaded.sounds["pop"])
    wave, rate = loaded.read(loaded.sounds["pop"][0])
    assert rate == RATE and len(wave) == 2 * RATE
    for root, _dirs, names in os.walk(profile):
        assert _mode(root) == 0o700
        for name in names:
            assert _mode(os.path.join(root, name)) == 0o600, name


def test_rejected_file_stores_nothing(tmp_path):
    good = _write(tmp_path / "good.wav", enrollment_take("click", make_voice(0), 0).wave)
    loud = _quiet(1.0)
    _burst(loud, 0.3, 0.2, amp=2.0)
    bad = _write(tmp_path / "loud.wav", np.clip(loud, -1, 1))
    profile = tmp_path / "me"
    with pytest.raises(EnrollError, match=r"loud\.wav: rejected: clipped"):
        enroll(profile, sound="click", from_files=[good, bad], progress=False)
    assert not profile.exists()
    enroll(profile, sound="click", from_files=[good], progress=False)
    before = (profile / "profile.json").read_text()
    with pytest.raises(EnrollError, match=r"silent\.wav: rejected: silent"):
        enroll(profile, sound="click", from_files=[_write(tmp_path / "silent.wav", _quiet(1.0, level=1e-5))],
               progress=False)
    assert (profile / "profile.json").read_text() == before


def test_bad_arguments_and_names(tmp_path):
    with pytest.raises(EnrollError, match="either --sound NAME or --background"):
        enroll(tmp_path / "p", sound="pop", background=True, from_files=[tmp_path / "x.wav"])
    with pytest.raises(EnrollError, match="either --record N or --from-files"):
        enroll(tmp_path / "p", sound="pop")
    with pytest.raises(ProfileError, match="sound name 'a b'"):
        enroll(tmp_path / "p", sound="a b", from_files=[tmp_path / "x.wav"])
    with pytest.raises(ProfileError, match="reserved"):
        enroll(tmp_path / "p", sound="background", from_files=[tmp_path / "x.wav"])
    with pytest.raises(EnrollError, match="missing.wav: audio file missing"):
        enroll(tmp_path / "p", sound="pop", from_files=[tmp_path / "missing.wav"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(ProfileError, match="not a fedsound profile; refusing"):
        enroll(tmp_path / "notes", sound="pop", from_files=[_write(tmp_path / "ok.wav", enrollment_take(
            "pop", make_voice(0), 0).wave)])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "profile.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ProfileError, match="not a fedsound profile index"):
        Profile.load(tmp_path / "broken")


class MemoryStream:
    """An in-memory stand-in for sounddevice.InputStream (the microphone is the only thing simulated)."""

    def __init__(self, audio: np.ndarray) -> None:
        self.audio = audio.astype(np.float32)
        self.position = 0
        self.started = self.closed = False

    def start(self) -> None:
        self.started = True

    def read(self, frames: int):
        block = self.audio[self.position : self.position + frames]
        self.position += len(block)
        return block[:, None], False

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        self.closed = True


def test_recording_guides_and_retries_a_silent_take(tmp_path, capsys):
    voice = make_voice(3)
    takes = [_quiet(2.0, level=1e-5), enrollment_take("hum", voice, 1).wave, enrollment_take("hum", voice, 2).wave]
    opened = []

    def open_stream(rate, block):
        assert rate == RATE
        stream = MemoryStream(takes[len(opened) - 1] if opened else np.zeros(0))  # the first one is a probe
        opened.append(stream)
        return MicSource(stream, rate, block)

    summary = enroll(tmp_path / "me", sound="hum", record=2, open_stream=open_stream, countdown_s=0,
                     progress=True, out=sys.stderr)
    err = capsys.readouterr().err
    assert summary["added"] == 2 and summary["rejected"] == []
    assert "take 1 of 2" in err and "attempt 2 of 3" in err and "rejected: silent" in err and "dBFS" in err
    assert all(s.closed for s in opened)
    assert Profile.load(tmp_path / "me").counts() == {"hum": 2}


def test_recording_without_sounddevice_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # as if the optional package were not installed
    with pytest.raises(EnrollError, match=r"needs the optional package sounddevice.*--from-files") as info:
        enroll(tmp_path / "me", sound="pop", record=3, countdown_s=0)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "me").exists()


@pytest.mark.parametrize("background", [False, True])
def test_a_file_that_is_not_audio_is_refused_and_nothing_is_stored(tmp_path, background):
    """NaN or absurd samples are named as such, for sounds and background alike (not 'silent', not a click)."""
    take = enrollment_take("click", make_voice(2), 0).wave.astype(np.float32)
    take[len(take) // 3] = np.nan
    nan_file = tmp_path / "nan.wav"
    sf.write(nan_file, take, RATE, subtype="FLOAT")
    huge_file = tmp_path / "huge.wav"
    sf.write(huge_file, np.nan_to_num(take) * 1e30, RATE, subtype="FLOAT")
    profile = tmp_path / "me"
    kind = {"background": True} if background else {"sound": "click"}
    for bad, reason in ((nan_file, "NaN or inf samples"), (huge_file, "far beyond full scale")):
        with pytest.raises(EnrollError) as info:
            enroll(profile, from_files=[bad], progress=False, **kind)
        assert str(info.value).startswith(f"{bad}: ") and reason in str(info.value)
        assert "silent" not in str(info.value)
    assert not profile.exists()


def test_a_recorded_take_that_is_not_audio_is_rejected_and_asked_again(tmp_path, capsys):
    voice = make_voice(3)
    broken = enrollment_take("hum", voice, 1).wave.copy()
    broken[1000:1010] = np.nan
    takes = [broken, enrollment_take("hum", voice, 2).wave]
    opened = []

    def open_stream(rate, block):
        stream = MemoryStream(takes[len(opened) - 1] if opened else np.zeros(0))
        opened.append(stream)
        return MicSource(stream, rate, block)

    summary = enroll(tmp_path / "me", sound="hum", record=1, open_stream=open_stream, countdown_s=0,
                     progress=True, out=sys.stderr)
    err = capsys.readouterr().err
    assert summary["added"] == 1 and "rejected: 10 samples were NaN" in err and "attempt 2 of 3" in err


def test_recording_from_a_device_at_its_own_rate_stores_the_take_at_the_recording_rate(tmp_path):
    """A 48 kHz microphone is read at 48 kHz and resampled on the fly: the stored take is the 16 kHz sound."""
    from scipy.signal import resample_poly

    take = enrollment_take("pop", make_voice(4), 0).wave
    native = resample_poly(take, 3, 1).astype(np.float32)  # what a 48 kHz device hears
    streams = []

    def open_stream(rate, block):
        streams.append(MemoryStream(native if streams else np.zeros(0)))
        return MicSource(streams[-1], rate, block, device_rate=48000)

    enroll(tmp_path / "me", sound="pop", record=1, open_stream=open_stream, countdown_s=0, progress=False)
    stored, rate = Profile.load(tmp_path / "me").read(Profile.load(tmp_path / "me").sounds["pop"][0])
    assert rate == RATE and len(stored) == len(take)
    assert np.max(np.abs(stored - take)) < 0.02  # resampled twice, stored as 16-bit PCM

"""``listen``: a real exported bundle (a small TCN trained on a synthetic stream) on a real WAV file, the
microphone path through the same code with an in-memory input stream, --exec, Ctrl-C and bad input."""

import json
import shlex
import sys
import types

import numpy as np
import pytest
import soundfile as sf
from conftest import EVENT_FRONTEND
from scipy.signal import resample_poly

from benchmarks.stream.bench import LABELS, match_events, synthetic_event_stream
from clients.detector import listen as listen_module
from clients.detector.audio_input import ArraySource, AudioInputError, FileSource, MicSource, open_microphone
from clients.detector.bundle import export_bundle, load_bundle
from clients.detector.listen import (
    ListenError,
    detector_settings,
    listen,
    parse_exec_map,
    run_detector,
)
from clients.detector.torch_stream import torch_detector
from fedsound.cli import main as cli_main
from fl.config import Config, DetectorConfig

FRONTEND = EVENT_FRONTEND
FILE_RATE = 32000  # the WAV is written at twice the rate: listen resamples it once


class MemoryInputStream:
    """An in-memory stand-in for sounddevice.InputStream: reads return the next samples, then nothing."""

    def __init__(self, samples: np.ndarray, interrupt_after: int | None = None) -> None:
        self.samples = samples
        self.position = 0
        self.reads = 0
        self.interrupt_after = interrupt_after
        self.started = self.stopped = self.closed = False

    def start(self) -> None:
        self.started = True

    def read(self, frames: int) -> tuple[np.ndarray, bool]:
        if self.interrupt_after is not None and self.reads == self.interrupt_after:
            raise KeyboardInterrupt
        self.reads += 1
        chunk = self.samples[self.position : self.position + frames]
        self.position += len(chunk)
        return chunk.reshape(-1, 1), False

    def stop(self) -> None:
        self.stopped = True

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def setup(event_model, tmp_path_factory):
    """A bundle of the event model (``conftest.event_model``) and a test WAV at twice the model's rate."""
    root = tmp_path_factory.mktemp("listen")
    bundle = export_bundle(event_model, root / "bundle", Config())
    test = synthetic_event_stream(8.0, FRONTEND.sample_rate, np.random.default_rng(7))
    wav = root / "test.wav"
    sf.write(wav, resample_poly(test.wave, FILE_RATE // FRONTEND.sample_rate, 1), FILE_RATE, subtype="PCM_16")
    return bundle, wav, test


def json_events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def detector_for(bundle_path, settings=None):
    bundle = load_bundle(bundle_path)
    return torch_detector(bundle.model, bundle.frontend(), bundle.labels, settings or bundle.detector)


def test_listen_on_a_file_emits_the_expected_events_and_runs_exec(setup, tmp_path, capsys):
    bundle, wav, test = setup
    marks = tmp_path / "marks.txt"
    code = "import os, sys; open(sys.argv[1], 'a').write(os.environ['FEDSOUND_LABEL'] + '\\n')"
    command = shlex.join([sys.executable, "-c", code, str(marks)])
    assert listen(bundle, Config(), input_=str(wav), as_json=True, exec_map=[f"click={command}"]) == 0
    captured = capsys.readouterr()
    lines = json_events(captured.out)
    onsets = [e for e in lines if e["type"] == "onset"]
    assert all({"label", "onset_s", "offset_s", "score", "latency_ms"} <= set(e) for e in lines)
    # each true event detected once, with its label, soon after its true onset; nothing else
    assert [e["label"] for e in onsets] == [label for label, _, _ in test.events]
    for event, (_, onset, _) in zip(onsets, test.events, strict=True):
        assert abs(event["onset_s"] - onset) < 0.03
        assert 0 <= event["emitted_s"] - onset < 0.1
        assert event["score"] >= 0.5
    assert sum(e["type"] == "offset" for e in lines) == len(onsets)
    n_clicks = sum(label == "click" for label, _, _ in test.events)
    assert marks.read_text().splitlines() == ["click"] * n_clicks
    assert f"{len(onsets)} events (click {n_clicks}, whistle {len(onsets) - n_clicks})" in captured.err
    assert "real-time factor" in captured.err


def test_file_and_microphone_paths_give_the_same_events(setup, capsys, monkeypatch):
    bundle_path, wav, test = setup
    samples = FileSource(wav, FRONTEND.sample_rate, 160).samples
    from_file = run_detector(detector_for(bundle_path), ArraySource(samples, FRONTEND.sample_rate, 160))
    stream = MemoryInputStream(samples)
    mic = MicSource(stream, FRONTEND.sample_rate, 160)
    from_mic = run_detector(detector_for(bundle_path), mic)
    assert stream.started and stream.stopped and stream.closed
    assert [e.to_dict() for e in from_mic.events] == [e.to_dict() for e in from_file.events]
    assert len(from_file.events) == 2 * len(test.events)
    # and `listen --input mic` itself, with the microphone replaced by the in-memory stream
    monkeypatch.setattr(listen_module, "open_microphone",
                        lambda rate, block, device=None: MicSource(MemoryInputStream(samples), rate, block))
    assert listen(bundle_path, Config(), input_="mic", as_json=True) == 0
    assert json_events(capsys.readouterr().out) == [e.to_dict() for e in from_file.events]


def test_ctrl_c_stops_cleanly_with_a_summary(setup, capsys, monkeypatch):
    bundle_path, wav, test = setup
    samples = FileSource(wav, FRONTEND.sample_rate, 160).samples
    stream = MemoryInputStream(samples, interrupt_after=300)  # 300 blocks = 3 s
    summary = run_detector(detector_for(bundle_path), MicSource(stream, FRONTEND.sample_rate, 160))
    assert summary.interrupted and stream.closed
    assert summary.audio_s == pytest.approx(300 * 160 / FRONTEND.sample_rate)
    expected = sum(onset < 2.9 for _, onset, _ in test.events)
    assert sum(summary.onsets_per_label.values()) == expected
    assert all(e.onset_s < 3.0 for e in summary.events)
    monkeypatch.setattr(listen_module, "open_microphone",
                        lambda rate, block, device=None: MicSource(MemoryInputStream(samples, 300), rate, block))
    assert listen(bundle_path, Config(), input_="mic") == 0
    assert "interrupted: " in capsys.readouterr().err


def test_realtime_pacing_delivers_the_same_blocks():
    samples = np.arange(1000, dtype=np.float32)
    paced = list(ArraySource(samples, 20000, 160, realtime=True).blocks())  # 50 ms of audio
    assert [len(b) for b in paced] == [160] * 6 + [40]
    np.testing.assert_array_equal(np.concatenate(paced), samples)


def test_microphone_without_sounddevice_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails as if not installed
    with pytest.raises(AudioInputError, match=r"pip install 'fedsound\[mic\]'") as info:
        open_microphone(16000, 160)
    assert "\n" not in str(info.value)


def test_bad_inputs_and_exec_mappings_are_clear_errors(setup, tmp_path):
    bundle, _, _ = setup
    with pytest.raises(AudioInputError, match="missing.wav: audio file missing"):
        listen(bundle, Config(), input_=str(tmp_path / "missing.wav"))
    junk = tmp_path / "junk.wav"
    junk.write_text("not audio")
    with pytest.raises(AudioInputError, match="junk.wav: unreadable audio"):
        listen(bundle, Config(), input_=str(junk))
    with pytest.raises(ListenError, match="expected LABEL=COMMAND"):
        parse_exec_map(["click"], LABELS)
    with pytest.raises(ListenError, match="unknown label 'snap'"):
        parse_exec_map(["snap=true"], LABELS)
    with pytest.raises(ListenError, match="command 'no-such-command-xyz' not found"):
        parse_exec_map(["click=no-such-command-xyz --flag"], LABELS)
    assert parse_exec_map(["click=echo 'a b'", "click=true"], LABELS) == {"click": [["echo", "a b"], ["true"]]}


def test_run_configuration_overrides_only_the_detector_keys_it_changes():
    bundle_settings = DetectorConfig(on_threshold=0.7, off_threshold=0.5, refractory_ms=100)
    merged = detector_settings(bundle_settings, DetectorConfig(min_duration_ms=50, block_size=400))
    assert merged == DetectorConfig(on_threshold=0.7, off_threshold=0.5, refractory_ms=100, min_duration_ms=50,
                                    block_size=400)
    assert detector_settings(bundle_settings, DetectorConfig()) == bundle_settings


def test_a_stricter_threshold_from_the_run_configuration_silences_events(setup, capsys):
    bundle, wav, _ = setup
    listen(bundle, Config(detector=DetectorConfig(on_threshold=0.9999, off_threshold=0.9)), input_=str(wav),
           as_json=True)
    assert sum(e["type"] == "onset" for e in json_events(capsys.readouterr().out)) == 0


def test_detection_matching_helper_counts_hits_and_false_onsets(setup):
    bundle_path, wav, test = setup
    source = FileSource(wav, FRONTEND.sample_rate, 160)
    summary = run_detector(detector_for(bundle_path), source)
    records, false_onsets = match_events(test.events, summary.events)
    assert false_onsets == 0 and all(r["latency_ms"] is not None for r in records)


@pytest.mark.parametrize(("fill", "reason"), [
    ("one-nan", "NaN or inf samples"), ("all-nan", "NaN or inf samples"), ("inf", "NaN or inf samples"),
    ("huge", "far beyond full scale"),
])
def test_a_file_that_is_not_audio_is_refused_in_one_line(setup, tmp_path, capsys, fill, reason):
    """Float WAVs with NaN, infinite or absurd samples: a one-line error naming the file, no events."""
    bundle, wav, _ = setup
    samples, rate = sf.read(wav, dtype="float32")
    if fill == "one-nan":
        samples[len(samples) // 2] = np.nan
    elif fill == "all-nan":
        samples[:] = np.nan
    elif fill == "inf":
        samples[100] = -np.inf
    else:
        samples *= 1e30
    bad = tmp_path / f"{fill}.wav"
    sf.write(bad, samples, rate, subtype="FLOAT")
    with pytest.raises(AudioInputError) as info:
        listen(bundle, Config(), input_=str(bad), as_json=True)
    assert str(bad) in str(info.value) and reason in str(info.value) and "\n" not in str(info.value)
    assert capsys.readouterr().out == ""


def test_non_finite_live_input_is_repaired_and_counted_and_json_stays_valid(setup, capsys, monkeypatch):
    bundle_path, wav, test = setup
    samples = FileSource(wav, FRONTEND.sample_rate, 160).samples.copy()
    clean = [e.to_dict() for e in run_detector(detector_for(bundle_path),
                                               ArraySource(samples, FRONTEND.sample_rate, 160)).events]
    quiet = np.flatnonzero(np.abs(samples) < 1e-3)[:5]  # a few near-silent samples become garbage
    samples[quiet[:3]] = np.nan
    samples[quiet[3]] = np.inf
    samples[quiet[4]] = 1e30
    sources = []

    def broken_microphone(rate, block, device=None):
        sources.append(MicSource(MemoryInputStream(samples), rate, block))
        return sources[-1]

    monkeypatch.setattr(listen_module, "open_microphone", broken_microphone)
    assert listen(bundle_path, Config(), input_="mic", as_json=True) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line, parse_constant=lambda name: pytest.fail(f"invalid JSON constant {name}"))
             for line in captured.out.splitlines()]
    assert sources[0].repaired == 5
    assert "5 microphone samples were NaN, infinite or far beyond full scale" in captured.err
    assert [e["label"] for e in lines] == [e["label"] for e in clean]


def test_an_event_with_a_non_finite_score_is_still_valid_json():
    from clients.detector.postprocess import Event

    line = Event("onset", "click", 1.0, None, float("nan"), float("inf"), 1.1).to_json()
    assert json.loads(line, parse_constant=lambda name: pytest.fail(name)) == {
        "type": "onset", "label": "click", "onset_s": 1.0, "offset_s": None, "score": None, "latency_ms": None,
        "emitted_s": 1.1}


class FakeSoundDevice(types.ModuleType):
    """A stand-in for the sounddevice module: two inputs at their own native rates, which refuse any other rate
    (as ALSA hardware devices do), and an output; each input 'hears' ``heard[rate]``."""

    class PortAudioError(Exception):
        pass

    def __init__(self, heard: dict[int, np.ndarray]) -> None:
        super().__init__("sounddevice")
        self.heard = heard
        self.devices = [
            {"name": "Built-in mic (hw:0,0)", "hostapi": 0, "max_input_channels": 2, "default_samplerate": 44100.0},
            {"name": "USB mic (hw:1,0)", "hostapi": 0, "max_input_channels": 1, "default_samplerate": 48000.0},
            {"name": "speakers", "hostapi": 0, "max_input_channels": 0, "default_samplerate": 48000.0},
        ]
        self.default = types.SimpleNamespace(device=[1, 2])
        self.opened: list[int] = []

    def query_hostapis(self):
        return [{"name": "ALSA"}]

    def query_devices(self, device=None, kind=None):
        if kind is None:
            return self.devices
        index = self.default.device[0] if device is None else device
        if not isinstance(index, int) or not 0 <= index < len(self.devices):
            raise ValueError(f"No input device matching {device!r}")
        return self.devices[index]

    def check_input_settings(self, device=None, channels=1, dtype="float32", samplerate=None):
        native = self.query_devices(device, "input")["default_samplerate"]
        if samplerate != native:
            raise self.PortAudioError(f"Invalid sample rate [PaErrorCode -9997] ({samplerate} Hz)")

    def InputStream(self, samplerate, blocksize, device, channels, dtype):  # noqa: N802 (sounddevice's name)
        self.opened.append(samplerate)
        return MemoryInputStream(self.heard[samplerate])


def test_list_devices_shows_inputs_with_their_native_rates(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSoundDevice({}))
    assert cli_main(["listen", "--list-devices"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["    0  Built-in mic (hw:0,0)  (ALSA, 2 ch, 44100 Hz)",
                     "*   1  USB mic (hw:1,0)  (ALSA, 1 ch, 48000 Hz)"]


@pytest.mark.parametrize(("device", "rate"), [(0, 44100), (1, 48000), (None, 48000)])
def test_a_microphone_at_its_native_rate_gives_the_files_events(setup, monkeypatch, capsys, device, rate):
    """The device is opened at its own rate (it refuses the model's 16 kHz) and resampled on the fly; the events
    equal those of the same audio read from a file at that rate and resampled offline."""
    bundle_path, wav, test = setup
    samples, file_rate = sf.read(wav, dtype="float32")
    native = resample_poly(samples, rate // 100, file_rate // 100).astype(np.float32)
    fake = FakeSoundDevice({rate: native})
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    assert listen(bundle_path, Config(), input_="mic", as_json=True, device=device) == 0
    from_mic = json_events(capsys.readouterr().out)
    assert fake.opened == [rate]
    at_rate = wav.with_name(f"test-{rate}.wav")
    sf.write(at_rate, native, rate, subtype="FLOAT")
    assert listen(bundle_path, Config(), input_=str(at_rate), as_json=True) == 0
    from_file = json_events(capsys.readouterr().out)
    assert [(e["type"], e["label"], e["onset_s"]) for e in from_mic] == [
        (e["type"], e["label"], e["onset_s"]) for e in from_file]
    assert [e["score"] for e in from_mic] == pytest.approx([e["score"] for e in from_file], abs=1e-3)
    assert len([e for e in from_mic if e["type"] == "onset"]) == len(test.events)


def test_an_unknown_device_is_a_one_line_error(setup, monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSoundDevice({}))
    with pytest.raises(AudioInputError, match="no such input device 7") as info:
        listen(setup[0], Config(), input_="mic", device=7)
    assert "\n" not in str(info.value)

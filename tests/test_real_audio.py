"""Real recordings from Debian packages: unpacked from .deb files the test builds with dpkg-deb, split by speaker,
resumed, read back as stretches, mixed into the mouth-sound corpus's background class and cut into the global
bundle's background patches."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from clients.detector.bundle import load_bundle
from data_prep.mouth_corpus import real_background_patches, synthesize_mouth_corpus
from data_prep.real_audio import MANIFEST, Package, RealAudio, fetch_real_audio
from fedsound.cli import main
from fl.config import CONFIG_DIR, load_config
from fl.errors import DataError
from fl.frontend import band_centres_hz

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian or Ubuntu)")

RATE = 8000
PACKAGES = {
    "fake-speech-en": Package("speech", "train"),
    "fake-speech-es": Package("speech", "test"),
    "fake-music": Package("music", tracks={"song-a": "train", "song-b": "test"}),
    "fake-soundtrack": Package("music", "tune"),
    "fake-orchestra": Package("music", "bank"),
}
SOUNDTRACK_RATE = 44100


def _tone(freq: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _deb(folder: Path, name: str, files: dict[str, np.ndarray | bytes | Path]) -> Path:
    """A .deb named ``NAME_1.0_all.deb`` holding ``files`` under usr/share: path -> samples (8 kHz; an .ogg
    file stereo at 44.1 kHz, a .wav of samples beyond 1 as float), raw bytes, or a Path: a symbolic link to it."""
    root = folder / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: test <test@example.org>\nDescription: test recordings\n")
    for relative, content in files.items():
        path = root / "usr" / "share" / "asterisk" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            path.symlink_to(content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif path.suffix == ".ogg":
            sf.write(path, np.stack([content, content], axis=1), SOUNDTRACK_RATE, format="OGG", subtype="VORBIS")
        elif np.abs(content).max() > 1.0:
            sf.write(path, content, RATE, subtype="FLOAT")
        elif path.suffix == ".gsm":
            sf.write(path, content, RATE, format="RAW", subtype="GSM610")
        else:
            sf.write(path, content, RATE, subtype="PCM_16")
    deb = folder / f"{name}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    shutil.rmtree(root)
    return deb


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("debs")
    _deb(folder, "fake-speech-en", {"sounds/en/hello.wav": _tone(300, 1.0), "sounds/en/digits/1.wav": _tone(350, 0.5),
                                    "sounds/en/empty.wav": b"", "sounds/en/bye.gsm": _tone(400, 0.8)})
    _deb(folder, "fake-speech-es", {"sounds/es/hola.wav": _tone(500, 1.2)})
    _deb(folder, "fake-orchestra", {"music/overture.wav": _tone(900, 3.0)})
    _deb(folder, "fake-music", {"moh/song-a.wav": _tone(200, 3.0), "moh/song-b.wav": _tone(600, 2.0),
                                "moh/song-c.wav": _tone(700, 1.0)})
    theme = np.sin(2 * np.pi * 440 * np.arange(2 * SOUNDTRACK_RATE) / SOUNDTRACK_RATE).astype(np.float32) * 0.5
    _deb(folder, "fake-soundtrack", {"music/theme.ogg": theme, "music/de/theme.ogg": Path("../theme.ogg"),
                                     "music/loud.wav": _tone(300, 1.0) * 5.0})
    return folder


@pytest.fixture(scope="module")
def real(debs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real")
    fetch_real_audio(out, debs=debs, packages=PACKAGES, progress=False)
    return out


def test_each_package_is_unpacked_into_its_split_and_the_empty_prompt_listed(real):
    manifest = json.loads((real / MANIFEST).read_text())["packages"]
    assert set(manifest) == set(PACKAGES)
    english = manifest["fake-speech-en"]
    assert sorted(f["path"] for f in english["files"]) == [
        "train/fake-speech-en/usr/share/asterisk/sounds/en/bye.wav",
        "train/fake-speech-en/usr/share/asterisk/sounds/en/digits/1.wav",
        "train/fake-speech-en/usr/share/asterisk/sounds/en/hello.wav"]
    assert [s["path"] for s in english["skipped"]] == ["usr/share/asterisk/sounds/en/empty.wav"]
    assert sum(f["seconds"] for f in english["files"]) == pytest.approx(2.3, abs=0.01)
    music = {Path(f["path"]).stem: f["split"] for f in manifest["fake-music"]["files"]}
    assert music == {"song-a": "train", "song-b": "test"}  # song-c belongs to no split: left out
    audio = RealAudio(real)
    assert audio.sources("train", "speech") == ["fake-speech-en"] and audio.sources("test", "speech") == [
        "fake-speech-es"]
    assert [p.name for p in (real / "tune").iterdir()] == ["fake-soundtrack"]
    hello, rate = sf.read(real / "train/fake-speech-en/usr/share/asterisk/sounds/en/hello.wav", dtype="float32")
    assert rate == RATE and np.allclose(hello, _tone(300, 1.0), atol=1e-4)


def test_a_soundtrack_is_written_once_as_mono_at_the_detectors_rate_and_peak_at_most_one(real):
    """A 44.1 kHz stereo OGG becomes 16 kHz mono WAV; its link under another folder (a translated copy) is not a
    second recording; a file louder than full scale is scaled down to peak 1, not clipped."""
    files = {Path(f["path"]).relative_to("tune/fake-soundtrack/usr/share/asterisk/music").as_posix(): f
             for f in json.loads((real / MANIFEST).read_text())["packages"]["fake-soundtrack"]["files"]}
    assert sorted(files) == ["loud.wav", "theme.wav"]
    theme, rate = sf.read(real / "tune/fake-soundtrack/usr/share/asterisk/music/theme.wav", dtype="float32")
    assert rate == files["theme.wav"]["rate"] == 16000 and theme.ndim == 1
    assert files["theme.wav"]["seconds"] == pytest.approx(2.0, abs=0.01)
    assert abs(np.argmax(np.abs(np.fft.rfft(theme[:16000]))) - 440) <= 2
    loud, rate = sf.read(real / "tune/fake-soundtrack/usr/share/asterisk/music/loud.wav", dtype="float32")
    assert rate == RATE and np.max(np.abs(loud)) == pytest.approx(1.0, abs=1e-3)
    assert np.allclose(loud, _tone(300, 1.0) / 0.3, atol=1e-3)  # the same waveform, not clipped
    assert RealAudio(real).sources("tune", "music") == ["fake-soundtrack"]


def test_stretches_are_seeded_resampled_and_stay_in_their_split(real):
    audio = RealAudio(real)
    one = audio.stretch("test", "speech", 3.0, [1, 2], 16000)
    assert one.shape == (48000,) and np.max(np.abs(one)) == pytest.approx(1.0)
    assert np.array_equal(one, audio.stretch("test", "speech", 3.0, [1, 2], 16000))
    spectrum = np.abs(np.fft.rfft(one[:16000]))
    assert abs(np.argmax(spectrum) - 500) <= 2  # the test speaker's 500 Hz, not the train speaker's tones
    music = audio.stretch("train", "music", 2.0, 7, 16000)
    assert abs(np.argmax(np.abs(np.fft.rfft(music[:16000]))) - 200) <= 2
    with pytest.raises(DataError, match="no speech recordings in the tune split"):
        audio.stretch("tune", "speech", 1.0, 0, 16000)


def test_a_fetch_resumes_from_the_packages_written_and_names_a_missing_one(debs, tmp_path):
    out = tmp_path / "real"
    only = {"fake-speech-es": PACKAGES["fake-speech-es"]}
    fetch_real_audio(out, debs=debs, packages=only, progress=False)
    written = (out / "fake-speech-es.json").read_text()
    empty = tmp_path / "no-debs"
    empty.mkdir()
    fetch_real_audio(out, debs=empty, packages=only, progress=False)  # done already: no .deb needed
    assert (out / "fake-speech-es.json").read_text() == written
    with pytest.raises(DataError, match=r"no-debs: no fake-speech-en_\*\.deb file"):
        fetch_real_audio(out, debs=empty, packages=PACKAGES, progress=False)
    # a package whose split has changed since it was written is unpacked again, into its new split only, and no
    # manifest names its files while it is
    moved = {"fake-speech-es": Package("speech", "tune")}

    def interrupted(*args):
        assert not (out / MANIFEST).exists()
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr("data_prep.real_audio._fetch_package", interrupted)
        fetch_real_audio(out, debs=debs, packages=moved, progress=False)
    with pytest.raises(DataError, match="no manifest.json"):
        RealAudio(out)
    fetch_real_audio(out, debs=debs, packages=moved, progress=False)
    assert RealAudio(out).sources("tune", "speech") == ["fake-speech-es"] and not RealAudio(out).sources(
        "test", "speech")
    assert not (out / "test" / "fake-speech-es").exists() and (out / "tune" / "fake-speech-es").is_dir()
    with pytest.raises(DataError, match="no manifest.json; fetch the recordings"):
        RealAudio(empty)


def test_the_cli_fetches_from_debs_and_lists_the_splits(debs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("data_prep.real_audio.PACKAGES", PACKAGES)
    assert main(["data", "real-audio", str(tmp_path / "real"), "--debs", str(debs), "-q"]) == 0
    out = capsys.readouterr().out
    assert " test speech     1 files from fake-speech-es" in out and "train music      1 files" in out


def test_half_the_corpus_background_becomes_real_recordings_and_the_rest_stays(real, tmp_path):
    synthetic = synthesize_mouth_corpus(tmp_path / "synthetic", n_voices=10, takes_per_sound=1,
                                        background_clips=4, progress=False)
    mixed = synthesize_mouth_corpus(tmp_path / "mixed", n_voices=10, takes_per_sound=1, background_clips=4,
                                    progress=False, real_audio=real)
    per_voice = 5 + 4  # five takes, then background clips 0-3
    same, changed, peaks_hz = [], [], []
    for fname in range(1, 10 * per_voice + 1):
        a = sf.read(synthetic / "FSD50K.dev_audio" / f"{fname}.wav")[0] if (
            synthetic / "FSD50K.dev_audio" / f"{fname}.wav").is_file() else sf.read(
            synthetic / "FSD50K.eval_audio" / f"{fname}.wav")[0]
        part = "FSD50K.dev_audio" if (mixed / "FSD50K.dev_audio" / f"{fname}.wav").is_file() else "FSD50K.eval_audio"
        b = sf.read(mixed / part / f"{fname}.wav")[0]
        (same if np.array_equal(a, b) else changed).append((fname - 1) % per_voice)
        if not np.array_equal(a, b):
            peaks_hz.append(np.argmax(np.abs(np.fft.rfft(b))) * 44100 / len(b))
    assert set(same) == {0, 1, 2, 3, 4, 5, 6} and set(changed) == {7, 8}  # clips 2 and 3 of each voice
    # train speech (300-400 Hz) and music (200 Hz) only: never the bank's music (900 Hz), nor tune or test
    assert all(190 < hz < 410 for hz in peaks_hz), peaks_hz


def test_the_bench_plays_the_test_split_in_the_users_room_and_counts_each_source_apart(real):
    from benchmarks.personalize.bench import Quality, real_chunks
    from clients.detector.event_metrics import EventCounts

    chunks = list(real_chunks(RealAudio(real), {"real_speech_s": 150.0, "real_music_s": 30.0}, 0, 3))
    assert [(c.aggressors[0][0], c.seconds) for c in chunks] == [
        ("real speech", 60.0), ("real speech", 60.0), ("real speech", 30.0), ("real music", 30.0)]
    with pytest.raises(DataError, match="no speech recordings in the tune split"):  # tuning users hear that one
        next(real_chunks(RealAudio(real), {"real_speech_s": 60.0, "real_music_s": 0.0}, 0, 3, split="tune"))
    spectrum = np.abs(np.fft.rfft(chunks[0].wave))
    assert abs(np.argmax(spectrum) / 60.0 - 500) <= 2  # the test split's speaker, over the room's floor
    quality = Quality({"pop": EventCounts(1, 0, 0)}, {"pop": [90.0]},
                      {"pop": {"real speech": 2, "speech": 1}, "hum": {"real music": 1, "floor": 3}}, 9000.0,
                      {"real speech": 3600.0, "real music": 1800.0})
    rates = quality.rates_by_source()
    assert rates["real speech"] == {"false_triggers": 2, "hours": 1.0, "false_triggers_per_hour": 2.0,
                                    "interval_per_hour": pytest.approx([0.2422, 7.2247], abs=1e-4)}
    assert rates["real music"]["false_triggers_per_hour"] == 2.0
    assert rates["real music"]["interval_per_hour"] == pytest.approx([0.0506, 11.1433], abs=1e-4)  # 1 in half an hour
    assert rates["synthetic"] == {"false_triggers": 4, "hours": 1.0, "false_triggers_per_hour": 4.0,
                                  "interval_per_hour": pytest.approx([1.0899, 10.2416], abs=1e-4)}
    pooled = (quality + quality).figures()["by_source"]
    assert pooled["real speech"]["hours"] == 2.0 and pooled["synthetic"]["false_triggers"] == 8


def test_the_bundles_real_background_is_train_speech_train_music_and_bank_music_in_turn_played_in_a_room(real):
    frontend = load_config(CONFIG_DIR / "features" / "lea16k.toml").frontend
    recordings = RealAudio(real)
    patches = real_background_patches(recordings, frontend, 4, seed=3, progress=False)
    assert patches.shape == (4, frontend.patch_frames, frontend.n_mels) and np.isfinite(patches).all()
    np.testing.assert_array_equal(patches, real_background_patches(recordings, frontend, 4, seed=3, progress=False))
    assert not np.array_equal(patches, real_background_patches(recordings, frontend, 4, seed=4, progress=False))
    # the loudest band: the train speech's tones (300-400 Hz) in patches 0 and 2, the train music's (200 Hz) in 1,
    # the bank music's (900 Hz) in 3; nothing of the test or tune splits (500, 600, 440 Hz)
    loudest = band_centres_hz(frontend)[patches.mean(axis=1).argmax(axis=1)]
    assert all(270 < loudest[k] < 430 for k in (0, 2)) and 170 < loudest[1] < 240 and 820 < loudest[3] < 980, loudest


def test_bench_global_ships_corpus_patches_then_its_share_of_real_recordings(real, tmp_path):
    from benchmarks.personalize import global_model

    report = global_model.build_global_model(tmp_path / "global", quick=True, progress=False, real_audio=real)
    bundle = load_bundle(tmp_path / "global" / "global-bundle")
    patches, labels = bundle.background()
    real_count = int(global_model.BUNDLE_BACKGROUND_PATCHES * global_model.REAL_BACKGROUND_SHARE)
    assert len(patches) == global_model.BUNDLE_BACKGROUND_PATCHES and labels[:, bundle.labels.index("background")].all()
    expected = real_background_patches(RealAudio(real), bundle.frontend_config, real_count, progress=False)
    np.testing.assert_array_equal(patches[-real_count:], expected.astype(np.float16).astype(np.float32))
    provenance = bundle.manifest["provenance"]
    assert provenance["extra_background"]["real_audio_manifest_sha256"] == RealAudio(real).manifest_sha256
    assert provenance["background"]["excluded_labels"] == ["pop", "click", "hiss", "hum", "whistle"]
    assert report["manifest_sha256"] == bundle.manifest["manifest_sha256"]

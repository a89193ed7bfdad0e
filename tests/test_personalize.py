"""Personalization: settings, labels, enough-examples check, fine-tuning gain, personal bundle, no network."""

import dataclasses
import json
import os
import shutil
import signal
import socket
import stat

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import fedsound, stop_when

from clients.detector import bundle as bundle_module
from clients.detector.bundle import load_bundle, write_bundle
from clients.detector.checkpoint import CHECKPOINT_NAME, FineTuneCheckpoint, training_key
from clients.detector.enroll import enroll
from clients.detector.listen import listen
from clients.detector.personalize import (
    THRESHOLD_GRID,
    PersonalData,
    PersonalizeConfig,
    PersonalizeError,
    ValidationStream,
    detector_settings,
    fine_tune,
    format_report,
    held_runs_ms,
    label_take,
    load_personalize_config,
    make_batch,
    min_durations,
    new_head_model,
    off_thresholds,
    on_ceilings,
    personalize,
    pick_thresholds,
    prepare_data,
    shorten_holds,
    sound_model,
    threshold_f1,
    warp_bands,
)
from clients.detector.profile import Profile
from data_prep.mouth_sounds import background_take, enrollment_take, make_aggressor_stream, make_test_stream, make_voice
from fl.config import CONFIG_DIR, Config, DetectorConfig, FrontendConfig, apply_flat, load_config
from fl.errors import ConfigError
from fl.frontend import Frontend, band_centres_hz
from fl.models import TCN, ModelConfig
from fl.store import FeatureStore

RATE = 16000
SOUNDS = ("click", "whistle")
SMALL = PersonalizeConfig(steps=120, head_warmup_steps=30, batch_size=8, sequence_frames=200, lr=3e-3,
                          min_duration_ms=60.0)


def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test that forbids it")

    monkeypatch.setattr(socket.socket, "__init__", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _write(path, wave):
    sf.write(path, wave, RATE, subtype="PCM_16")
    return path


def _global_bundle(path):
    """A small random-init TCN with the Lea et al. frontend and background patches of aggressor audio."""
    frontend = load_config(CONFIG_DIR / "features" / "lea16k.toml").frontend
    frames = Frontend(frontend).frames(make_aggressor_stream(make_voice(99), 9.0, 1).wave, RATE)
    patches = np.stack([frames[i : i + 101] for i in range(0, len(frames) - 101, 101)])
    torch.manual_seed(0)
    model = TCN(ModelConfig(channels=16, dropout=0.0), frontend.n_mels, 3)
    return write_bundle(path, model, frontend, ["a", "b", "c"], ["/m/a", "/m/b", "/m/c"], DetectorConfig(),
                        background=(patches, np.zeros((len(patches), 3), np.uint8)), portable=True)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """Enroll -> personalize -> listen, all with sockets refused."""
    root = tmp_path_factory.mktemp("personal")
    voice = make_voice(21)
    bundle = _global_bundle(root / "global")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _block_network(monkeypatch)
        with pytest.raises(OSError, match="network access attempted"):
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        profile = root / "profile"
        for k, sound in enumerate(SOUNDS):
            files = [_write(root / f"{sound}{i}.wav", enrollment_take(sound, voice, [k, i]).wave) for i in range(5)]
            enroll(profile, sound=sound, from_files=files, progress=False)
        background = [_write(root / f"bg{i}.wav", background_take(voice, [7, i], seconds=8.0).wave)
                      for i in range(2)]
        enroll(profile, background=True, from_files=background, progress=False)
        report = personalize(profile, bundle, Config(seed=0), progress=False, settings=SMALL)
        stream = make_test_stream(voice, 2, 5, sounds=SOUNDS, aggressors_per_event=0.5)
        audio = _write(root / "stream.wav", stream.wave)
        listened = listen(profile, Config(), input_=str(audio), as_json=True)
    return {"root": root, "profile": profile, "bundle": bundle, "report": report, "listened": listened,
            "stream": audio}


def test_a_portable_global_bundle_gives_a_portable_personal_one(offline_run):
    """The personal detector runs on numpy and onnxruntime too, with the torch engine's probabilities."""
    from clients.detector.listen import make_detector

    assert load_bundle(offline_run["profile"]).manifest["portable"]["step"] == "step.onnx"
    wave, rate = sf.read(offline_run["stream"], dtype="float32")
    frames = Frontend(load_bundle(offline_run["profile"]).frontend_config).frames(wave, rate)
    probabilities = {engine: make_detector(offline_run["profile"], Config(), engine)[0].engine.probabilities(frames)
                     for engine in ("torch", "onnx")}
    assert probabilities["torch"].shape == (len(frames), len(SOUNDS))
    np.testing.assert_allclose(probabilities["onnx"], probabilities["torch"], atol=1e-5)


def test_offline_enroll_personalize_listen(offline_run, capsys):
    report = offline_run["report"]
    assert offline_run["listened"] == 0
    assert set(report["sounds"]) == set(SOUNDS)
    assert report["f1"] > report["untuned_f1"]
    for row in report["sounds"].values():
        assert row["examples"] == 5 and row["held_out"] == 2 and row["train"] == 3
        assert 0 < row["off_threshold"] <= row["on_threshold"] < 1


def test_every_latency_choice_is_calibrated_kept_in_the_bundle_and_listen_switches(offline_run):
    from clients.detector.listen import make_detector
    from clients.detector.manifest import BundleError, read_manifest

    report, profile = offline_run["report"], offline_run["profile"]
    detectors = report["latency_detectors"]
    assert report["latency"] == "safe" and list(detectors) == ["safe", "balanced", "fast"]
    safe_holds = detectors["safe"].class_min_duration_ms
    assert safe_holds == {name: row["min_duration_ms"] for name, row in report["sounds"].items()}
    for choice, cap in zip(("balanced", "fast"), SMALL.latency_holds_ms, strict=True):
        assert detectors[choice].class_min_duration_ms == {name: min(hold, cap) for name, hold in safe_holds.items()}
    manifest = read_manifest(profile)
    assert manifest.detector == detectors["safe"]  # the configured choice is the bundle's own
    for choice in ("safe", "fast"):
        detector = make_detector(profile, Config(), "onnx", latency=choice)[0]
        assert detector.tracker.settings == detectors[choice]
    with pytest.raises(BundleError, match="no detector settings for latency 'fast' \\(personalize it first\\)"):
        make_detector(offline_run["bundle"], Config(), "onnx", latency="fast")


def test_personal_bundle_is_private_and_found_by_listen(offline_run):
    profile = offline_run["profile"]
    bundle = load_bundle(profile)
    assert bundle.path == profile / "personal"
    assert bundle.labels == sorted(SOUNDS) and bundle.model.n_classes == 2
    assert set(bundle.detector.class_thresholds) == set(SOUNDS)
    assert bundle.detector.min_duration_ms == SMALL.min_duration_ms
    provenance = bundle.manifest["provenance"]
    assert provenance["base_bundle"] == str(offline_run["bundle"].resolve())
    for root, _dirs, names in os.walk(profile):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
        for name in names:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o600, name
    # A second run without --bundle reuses the global bundle recorded in the personal one.
    again = personalize(profile, None, Config(seed=0), progress=False, settings=dataclasses.replace(SMALL, steps=1))
    assert again["base_bundle"] == str(offline_run["bundle"].resolve())


def test_labels_are_inflated_by_the_receptive_field_less_one_by_default(offline_run):
    base = load_bundle(offline_run["bundle"])
    profile = Profile.load(offline_run["profile"])
    default = prepare_data(profile, base, SMALL, 0)
    assert SMALL.inflate_frames == -1 and default.inflate == base.receptive_field - 1
    short = prepare_data(profile, base, dataclasses.replace(SMALL, inflate_frames=2), 0)
    assert short.inflate == 2
    positives = [sum(int((take.classes > 0).sum()) for take in data.train) for data in (default, short)]
    assert positives[0] > positives[1]


def test_adapt_modes_change_only_their_layers(offline_run):
    base = load_bundle(offline_run["bundle"])
    data = prepare_data(Profile.load(offline_run["profile"]), base, SMALL, 0)
    changed = {}
    for adapt in ("head", "last-block", "all"):
        model = new_head_model(base, len(data.sounds), 0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        fine_tune(model, data, dataclasses.replace(SMALL, steps=3, adapt=adapt), 0)
        changed[adapt] = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "")
                          for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed["head"] == {"head"}
    assert changed["last-block"] == {"head", "out_norm", "blocks.2"}  # blocks 0..2: dilations 1, 2, 3
    assert "input_proj" in changed["all"] and "blocks.0" in changed["all"]


def test_head_warmup_trains_the_head_alone_before_the_adapted_layers(offline_run):
    base = load_bundle(offline_run["bundle"])
    data = prepare_data(Profile.load(offline_run["profile"]), base, SMALL, 0)
    heads = {}
    for warmup in (0, 3):
        model = new_head_model(base, len(data.sounds), 0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        fine_tune(model, data, dataclasses.replace(SMALL, steps=1, adapt="last-block", head_warmup_steps=warmup), 0)
        after = model.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in after if k.startswith(("input_", "blocks.0", "blocks.1")))
        heads[warmup] = after["head.weight"].clone()
    assert not torch.equal(heads[0], heads[3])


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, saves: int) -> list[tuple[str, int]]:
    """Make every FineTuneCheckpoint raise KeyboardInterrupt right after its ``saves``-th save (a kill)."""
    done: list[tuple[str, int]] = []
    save = FineTuneCheckpoint.save

    def save_then_stop(self: FineTuneCheckpoint, phase: str, step: int, *args: object) -> None:
        save(self, phase, step, *args)
        done.append((phase, step))
        if len(done) == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(FineTuneCheckpoint, "save", save_then_stop)
    return done


@pytest.mark.parametrize("saves, where", [(1, ("head", 5)), (2, ("head", 10)), (4, ("adapt", 10))])
def test_an_interrupted_fine_tune_resumes_to_the_same_model(offline_run, tmp_path, monkeypatch, saves, where):
    base = load_bundle(offline_run["bundle"])
    data = prepare_data(Profile.load(offline_run["profile"]), base, SMALL, 0)
    settings = dataclasses.replace(SMALL, steps=40, head_warmup_steps=10)

    def dropout_model():  # dropout draws from torch's generator, which the checkpoint must carry too
        fresh = new_head_model(base, len(data.sounds), 0)
        model = TCN(dataclasses.replace(fresh.config, dropout=0.3), fresh.n_mels, fresh.n_classes)
        model.load_state_dict(fresh.state_dict())
        return model

    whole = dropout_model()
    whole_loss = fine_tune(whole, data, settings, 0)
    path = tmp_path / "checkpoint.pt"
    with monkeypatch.context() as patch:
        done = _interrupt_after(patch, saves)
        with pytest.raises(KeyboardInterrupt):
            fine_tune(dropout_model(), data, settings, 0, checkpoint=FineTuneCheckpoint(path, "key", every=5))
    assert done[-1] == where and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    checkpoint = FineTuneCheckpoint(path, "key", every=5)
    resumed = dropout_model()
    assert fine_tune(resumed, data, settings, 0, checkpoint=checkpoint) == whole_loss
    assert (checkpoint.resumed.phase, checkpoint.resumed.step) == where and checkpoint.discarded is None
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_a_checkpoint_of_other_inputs_damaged_or_not_fitting_is_deleted_and_the_fine_tune_starts_over(
        offline_run, tmp_path, monkeypatch):
    base = load_bundle(offline_run["bundle"])
    data = prepare_data(Profile.load(offline_run["profile"]), base, SMALL, 0)
    settings = dataclasses.replace(SMALL, steps=6, head_warmup_steps=2)
    path = tmp_path / "checkpoint.pt"

    def interrupted(model: TCN, settings: PersonalizeConfig, saves: int = 2) -> None:
        path.unlink(missing_ok=True)  # the last run's finished checkpoint: this one starts afresh
        with monkeypatch.context() as patch:
            _interrupt_after(patch, saves)
            with pytest.raises(KeyboardInterrupt):
                fine_tune(model, data, settings, 0, checkpoint=FineTuneCheckpoint(path, "key", every=2))

    def misfit(checkpoint: FineTuneCheckpoint, model: TCN, settings: PersonalizeConfig) -> str:
        """Why ``checkpoint`` was deleted; the fine-tune it was given to gave the uninterrupted result."""
        whole = new_head_model(base, len(data.sounds), 0)
        assert fine_tune(model, data, settings, 0, checkpoint=checkpoint) == fine_tune(whole, data, settings, 0)
        assert all(torch.equal(v, whole.state_dict()[k]) for k, v in model.state_dict().items())
        assert checkpoint.resumed is None
        return checkpoint.discarded

    interrupted(new_head_model(base, len(data.sounds), 0), settings)
    assert misfit(FineTuneCheckpoint(path, "other key"), new_head_model(base, len(data.sounds), 0), settings) == (
        f"{path}: made from other takes, global bundle, training settings, seed or code")
    interrupted(new_head_model(base, len(data.sounds), 0), settings)
    stale = FineTuneCheckpoint(path, "other key")
    assert stale.load(new_head_model(base, len(data.sounds), 0), {"head": 2, "adapt": 6}) is None
    assert stale.discarded is not None and not path.exists()  # deleted, not left to linger
    interrupted(new_head_model(base, len(data.sounds), 0), settings)
    path.write_bytes(path.read_bytes()[:200])
    why = misfit(FineTuneCheckpoint(path, "key"), new_head_model(base, len(data.sounds), 0), settings)
    assert why.startswith(f"not a fedsound fine-tune checkpoint: {path}") and "truncated" in why
    narrow = new_head_model(base, len(data.sounds), 0)  # a body of 8 channels, then the bundle's 16
    interrupted(TCN(dataclasses.replace(narrow.config, channels=8), narrow.n_mels, narrow.n_classes), settings)
    assert misfit(FineTuneCheckpoint(path, "key"), new_head_model(base, len(data.sounds), 0), settings) == (
        f"{path}: weight input_proj.weight has shape (8, 64, 5), the model config needs (16, 64, 5)")
    interrupted(new_head_model(base, len(data.sounds), 0), settings, 1)  # a head-phase point, then no head phase
    assert misfit(FineTuneCheckpoint(path, "key"), new_head_model(base, len(data.sounds), 0),
                  dataclasses.replace(settings, head_warmup_steps=0)) == (
        f"{path}: phase 'head' and step 2 are not a point of this fine-tune")


def test_the_key_keeps_a_checkpoint_across_calibration_settings_only(offline_run):
    profile = Profile.load(offline_run["profile"])
    key = training_key(profile, "sha", SMALL, 0)
    assert training_key(profile, "sha", dataclasses.replace(SMALL, latency="fast", off_ratio=0.8), 0) == key
    for other in (training_key(profile, "sha", dataclasses.replace(SMALL, lr=1e-3), 0),
                  training_key(profile, "sha", SMALL, 1), training_key(profile, "other sha", SMALL, 0)):
        assert other != key


def test_personalize_resumes_after_a_kill_and_removes_its_checkpoint(offline_run, tmp_path, monkeypatch):
    """A killed `fedsound personalize` leaves a private checkpoint; run again, it resumes to the same bundle."""
    runs = {}
    for name in ("whole", "killed"):
        profile = tmp_path / name
        shutil.copytree(offline_run["profile"], profile)
        shutil.rmtree(profile / "personal")
        runs[name] = profile
    personalize(runs["whole"], offline_run["bundle"], Config(seed=0), progress=False, settings=SMALL)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)  # saves: the head phase's end (step 30), then adapt step 100
        with pytest.raises(KeyboardInterrupt):
            personalize(runs["killed"], offline_run["bundle"], Config(seed=0), progress=False, settings=SMALL)
    assert (runs["killed"] / CHECKPOINT_NAME).is_file() and not (runs["killed"] / "personal").exists()
    report = personalize(runs["killed"], offline_run["bundle"], Config(seed=0), progress=False, settings=SMALL)
    assert report["resumed"] == {"phase": "adapt", "step": 100} and report["checkpoint_discarded"] is None
    assert "resumed an interrupted fine-tune at step 100 of its adapt phase" in format_report(report)
    assert not (runs["killed"] / CHECKPOINT_NAME).exists()
    weights = [torch.load(runs[name] / "personal" / "weights.pt", weights_only=True) for name in ("whole", "killed")]
    assert all(torch.equal(v, weights[0][k]) for k, v in weights[1].items())


def test_sigterm_stops_fedsound_personalize_and_a_second_run_resumes_it(offline_run, tmp_path):
    """As a user would meet it: the laptop's personalization is stopped between checkpoints, then run again."""
    config = tmp_path / "small.toml"
    config.write_text("[personalize]\nsteps = 200\nhead-warmup-steps = 30\nbatch-size = 8\nsequence-frames = 200\n"
                      "lr = 3e-3\nmin-duration-ms = 60.0\n")
    profiles = {}
    for name in ("whole", "stopped"):
        profiles[name] = tmp_path / name
        shutil.copytree(offline_run["profile"], profiles[name])
        shutil.rmtree(profiles[name] / "personal")
    checkpoint = profiles["stopped"] / CHECKPOINT_NAME

    def args(name: str) -> list[str]:
        return ["personalize", str(profiles[name]), "--bundle", str(offline_run["bundle"]), "--config", str(config),
                "--workdir", str(tmp_path / "w"), "-q"]

    def saved_phase() -> str | None:
        return torch.load(checkpoint, weights_only=True)["phase"] if checkpoint.exists() else None

    assert fedsound(*args("whole"), timeout=600).returncode == 0
    # killed within the adapt phase, after its first save (step 100 of 200)
    returncode, stderr = stop_when(args("stopped"), lambda: saved_phase() == "adapt", signal.SIGTERM, 600)
    assert returncode == 128 + signal.SIGTERM and "terminated" in stderr and "Traceback" not in stderr
    assert not (profiles["stopped"] / "personal").exists()
    step = torch.load(checkpoint, weights_only=True)["step"]
    again = fedsound(*args("stopped"), timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resumed an interrupted fine-tune at step {step} of its adapt phase" in again.stdout
    assert not checkpoint.exists()
    weights = [torch.load(profiles[name] / "personal" / "weights.pt", weights_only=True) for name in profiles]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(v, weights[0][k]) for k, v in weights[1].items())


def test_distillation_keeps_the_global_heads_outputs(offline_run):
    base = load_bundle(offline_run["bundle"])
    data = prepare_data(Profile.load(offline_run["profile"]), base, SMALL, 0)
    x, _, _ = make_batch(np.random.default_rng(5), data, SMALL)
    with torch.no_grad():
        wanted = torch.sigmoid(base.model(x))
    drift = {}
    for weight in (0.0, 50.0):
        model = new_head_model(base, len(data.sounds), 0)
        teacher = load_bundle(offline_run["bundle"]).model.train()
        fine_tune(model, data, dataclasses.replace(SMALL, steps=20, lr=1e-2, distill_weight=weight), 0,
                  teacher=teacher)
        assert teacher.training and all(w.requires_grad for w in teacher.parameters())  # left as it was given
        with torch.no_grad():
            drift[weight] = (torch.sigmoid(base.model.head(model.features(x))) - wanted).abs().mean().item()
    assert drift[50.0] < drift[0.0]
    with pytest.raises(ValueError, match="teacher"):
        fine_tune(new_head_model(base, len(data.sounds), 0), data, dataclasses.replace(SMALL, distill_weight=1.0), 0)


def test_exported_model_drops_the_background_output(offline_run):
    base = load_bundle(offline_run["bundle"])
    model = new_head_model(base, 2, 0).eval()
    x = torch.randn(1, 30, base.model.n_mels)
    with torch.no_grad():
        assert torch.allclose(sound_model(model)(x), model(x)[..., 1:])


def test_not_enough_examples_says_how_many_more(tmp_path, monkeypatch):
    voice = make_voice(4)
    profile = tmp_path / "me"
    for sound, count in (("click", 3), ("hum", 5)):
        files = [_write(tmp_path / f"{sound}{i}.wav", enrollment_take(sound, voice, i).wave) for i in range(count)]
        enroll(profile, sound=sound, from_files=files, progress=False)
    bundle = _global_bundle(tmp_path / "global")
    with pytest.raises(PersonalizeError, match=r"not enough examples \(5 per sound\): click has 3 and needs 2 more"):
        personalize(profile, bundle, Config(), progress=False, settings=SMALL)
    monkeypatch.setattr(bundle_module, "SHIPPED_BUNDLE", tmp_path / "not-built")
    with pytest.raises(PersonalizeError, match="no global model: pass --bundle"):
        personalize(profile, None, Config(), progress=False, settings=SMALL)
    monkeypatch.setattr(bundle_module, "SHIPPED_BUNDLE", bundle)  # without --bundle, the shipped one is used
    with pytest.raises(PersonalizeError, match=r"not enough examples"):
        personalize(profile, None, Config(), progress=False, settings=SMALL)
    empty = tmp_path / "empty"
    Profile.open(empty)
    with pytest.raises(PersonalizeError, match="no sounds enrolled"):
        personalize(empty, bundle, Config(), progress=False, settings=SMALL)


def test_label_take_inflates_offsets_and_masks_pre_onset():
    frames = np.zeros((50, 4), np.float32)
    take = label_take(frames, [[0.10, 0.15], [0.40, 0.42]], sound=1, frame_s=0.01, inflate=4)
    assert take.onsets == [10, 40]
    assert np.flatnonzero(take.classes == 2).tolist() == list(range(10, 19)) + list(range(40, 46))
    assert np.flatnonzero(~take.mask).tolist() == [6, 7, 8, 9, 36, 37, 38, 39]


def test_aggressor_overlay_mixes_a_second_piece_over_each_aggressor_piece():
    n_mels = 4
    take = label_take(np.full((60, n_mels), 5.0, np.float32), [[0.2, 0.3]], sound=0, frame_s=0.01, inflate=3)
    data = PersonalData(["pop"], [take], [], [np.zeros((500, n_mels), np.float32)],
                        [np.full((101, n_mels), -2.0, np.float32)] * 3, [], 0.01, 3, np.arange(1.0, n_mels + 1),
                        FrontendConfig())
    plain = dataclasses.replace(SMALL, gain_db=0.0, warp_percent=0.0, mix_probability=0.0,
                                aggressor_gain_db=(0.0, 0.0), aggressor_tilt_db_per_octave=0.0)

    def aggressor_values(overlay: float) -> np.ndarray:
        x, _, _ = make_batch(np.random.default_rng(0), data, dataclasses.replace(
            plain, aggressor_overlay_probability=overlay))
        values = x.numpy()[..., 0].ravel()
        return values[values != 5.0]  # the sound take's frames are all 5.0

    assert set(np.unique(aggressor_values(0.0))) == {-2.0, 0.0}  # user (0) and bundle (-2) material as it is
    overlaid = aggressor_values(1.0)
    assert len(overlaid) and not np.isin(overlaid, [-2.0, 0.0]).any()  # log(e^a + e^b) exceeds a and b
    with pytest.raises(ValueError, match="aggressor-overlay-probability"):
        PersonalizeConfig(aggressor_overlay_probability=1.5)


def test_warp_bands_moves_energy_to_the_scaled_frequency():
    config = FrontendConfig(sample_rate=16000, n_fft=400, hop_length=160, n_mels=64)  # lea16k's bands
    hz = band_centres_hz(config)
    assert len(hz) == 64 and np.all(np.diff(hz) > 0) and hz[-1] < 8000
    frames = np.zeros((3, 64), np.float32)
    frames[:, 20] = 1.0
    assert np.array_equal(warp_bands(frames, hz, 1.0), frames)
    for factor in (0.9, 1.1):
        warped = warp_bands(frames, hz, factor)
        centre = float((warped[0] * hz).sum() / warped[0].sum())
        assert centre == pytest.approx(hz[20] * factor, rel=0.02)
        assert warped.dtype == np.float32 and warped.shape == frames.shape
    peaks = Frontend(config).filterbank.argmax(0).numpy() * 8000.0 / 200  # the frequency bin of each band's peak
    assert np.abs(peaks - hz).max() <= 40.0  # within a frequency bin


def test_warped_sound_pieces_move_in_frequency_and_aggressors_do_not():
    n_mels = 16
    sound = np.zeros((60, n_mels), np.float32)
    sound[20:30, 8] = 5.0  # a tone in band 8
    take = label_take(sound, [[0.2, 0.3]], sound=0, frame_s=0.01, inflate=3)
    room = np.tile(-1.0 - np.arange(n_mels, dtype=np.float32) / n_mels, (500, 1))  # falls across the bands
    data = PersonalData(["pop"], [take], [], [room], [], [], 0.01, 3, np.geomspace(100.0, 6000.0, n_mels),
                        FrontendConfig())
    plain = dataclasses.replace(SMALL, gain_db=0.0, mix_probability=0.0, aggressor_gain_db=(0.0, 0.0),
                                aggressor_overlay_probability=0.0, aggressor_tilt_db_per_octave=0.0)

    def tone_bands(warp: float) -> set[int]:
        x, target, _ = make_batch(np.random.default_rng(0), data, dataclasses.replace(plain, warp_percent=warp))
        frames = x.numpy()[target.numpy()[..., 1] > 0]
        return set(np.flatnonzero((frames > 0.5).any(0)).tolist())

    assert tone_bands(0.0) == {8}
    assert len(tone_bands(30.0)) > 1  # the tone lands on neighbouring bands too
    x, target, _ = make_batch(np.random.default_rng(0), data, dataclasses.replace(plain, warp_percent=30.0))
    aggressor = x.numpy()[(target.numpy()[..., 1] == 0) & (x.numpy().max(-1) < 0)]
    assert len(aggressor) and (aggressor == room[0]).all()  # the user's background as it was enrolled


def test_aggressor_pieces_are_tilted_about_1khz_and_sound_pieces_are_not():
    n_mels = 16
    band_hz = np.geomspace(125.0, 8000.0, n_mels)  # six octaves: 1 kHz is band 7.5
    take = label_take(np.full((60, n_mels), 5.0, np.float32), [[0.2, 0.3]], sound=0, frame_s=0.01, inflate=3)
    data = PersonalData(["pop"], [take], [], [np.zeros((500, n_mels), np.float32)], [], [], 0.01, 3, band_hz,
                        FrontendConfig())
    plain = dataclasses.replace(SMALL, gain_db=0.0, warp_percent=0.0, mix_probability=0.0,
                                aggressor_gain_db=(0.0, 0.0), aggressor_overlay_probability=0.0,
                                aggressor_tilt_db_per_octave=0.0)
    x, target, _ = make_batch(np.random.default_rng(0), data, dataclasses.replace(
        plain, aggressor_tilt_db_per_octave=6.0))
    frames = x.numpy().reshape(-1, n_mels)
    aggressor = frames[target.numpy().reshape(-1, 2)[:, 1] == 0]
    aggressor = aggressor[~(aggressor == 5.0).all(1)]  # the sound take's silence around its sound
    octaves = np.log2(band_hz / 1000.0)
    db_per_octave = np.array([np.polyfit(octaves, row, 1)[0] for row in aggressor]) * 10.0 / np.log(10.0)
    assert np.allclose(aggressor[:, 0] * octaves[-1], aggressor[:, -1] * octaves[0], atol=1e-4)  # 0 at 1 kHz
    assert np.abs(db_per_octave).max() <= 6.0 and np.ptp(db_per_octave) > 3.0  # a random slope per piece
    assert (frames[target.numpy().reshape(-1, 2)[:, 1] == 1] == 5.0).all()  # sound frames untouched
    x, _, _ = make_batch(np.random.default_rng(0), data, plain)
    assert set(np.unique(x.numpy())) == {0.0, 5.0}  # off: the room as enrolled
    with pytest.raises(ValueError, match="aggressor-tilt-db-per-octave"):
        PersonalizeConfig(aggressor_tilt_db_per_octave=13.0)


def test_sustained_sounds_hold_a_share_of_their_enrolled_length_and_transients_the_floor():
    settings = PersonalizeConfig(min_duration_ms=150, min_duration_fraction=0.75, max_min_duration_ms=300)
    lengths = {"click": [0.04] * 10, "hum": [0.25, 0.28, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0],
               "hiss": [0.9] * 10}
    durations = min_durations(lengths, settings)
    assert durations["click"] == 150.0  # 30 ms of a 40 ms click is under the floor
    assert durations["hum"] == pytest.approx(0.75 * 1000 * np.percentile(lengths["hum"], 20), abs=0.1)
    assert 150 < durations["hum"] < 300
    assert durations["hiss"] == 300.0  # capped
    with pytest.raises(ValueError, match="max-min-duration-ms"):
        PersonalizeConfig(min_duration_ms=200, max_min_duration_ms=100)


def test_settings_file(tmp_path):
    assert load_personalize_config() == PersonalizeConfig()  # configs/detector/personalize.toml = the defaults
    path = tmp_path / "p.toml"
    path.write_text('[personalize]\nadapt = "head"\nsteps = 10\nmix-gain-db = [-10, 0]\n')
    loaded = load_personalize_config(path)
    assert (loaded.adapt, loaded.steps, loaded.mix_gain_db) == ("head", 10, (-10.0, 0.0))
    for body, message in (("adapt = \"some\"", "personalize.adapt: must be one of"),
                          ("stepz = 3", "personalize.stepz: unknown key"),
                          ("steps = 1.5", "personalize.steps: expected an integer"),
                          ("lr = true", "personalize.lr: expected a number"),
                          ("head-warmup-steps = -1", "personalize.head-warmup-steps: must be non-negative"),
                          ("distill-weight = -0.5", "personalize.distill-weight: must be non-negative"),
                          ("off-ratio = 1.5", r"personalize.off-ratio: must be in \(0, 1\]"),
                          ("warp-percent = 60", r"personalize.warp-percent: must be in \[0, 50\]"),
                          ("rise-threshold = 0", r"personalize.rise-threshold: must be in \(0, 1\]"),
                          ("brief-sound-max-on = 0", r"personalize.brief-sound-max-on: must be in \(0, 1\]"),
                          ("min-on-threshold = 0.5", "personalize.min-on-threshold: unknown key"),
                          ('latency = "instant"', "personalize.latency: must be one of safe, balanced, fast"),
                          ("latency-holds-ms = [80.0, 160.0]", r"personalize.latency-holds-ms: must be \[balanced, "
                                                               r"fast\] with 0 < fast <= balanced")):
        path.write_text(f"[personalize]\n{body}\n")
        with pytest.raises(ConfigError, match=f"{path}: {message}"):
            load_personalize_config(path)
    path.write_text("[detector]\non-threshold = 0.5\n")
    assert load_personalize_config(path) == PersonalizeConfig()  # other sections leave the defaults
    assert json.loads(json.dumps(dataclasses.asdict(PersonalizeConfig())))  # plain data


def test_personal_detector_takes_thresholds_holds_and_onset_dating_from_the_settings():
    settings = PersonalizeConfig(off_ratio=0.5, rise_threshold=0.3, refractory_ms=250.0)
    detector = detector_settings(["pop", "hum"], [0.8, 0.6], settings, DetectorConfig(min_duration_ms=30.0),
                                 {"pop": 150.0, "hum": 400.0})
    assert detector.class_thresholds == {"pop": [0.8, 0.4], "hum": [0.6, 0.3]}
    assert detector.class_min_duration_ms == {"pop": 150.0, "hum": 400.0}
    assert (detector.onset_at_rise, detector.rise_threshold, detector.refractory_ms) == (True, 0.3, 250.0)


def test_off_thresholds_are_on_times_the_ratio():
    settings = PersonalizeConfig(off_ratio=0.9)
    on = [0.9, 0.5, 0.01]
    assert off_thresholds(on, settings) == [0.81, 0.45, 0.01]  # never below 0.01
    detector = detector_settings(["pop", "click", "hum"], on, settings, DetectorConfig(),
                                 {"pop": 150.0, "click": 150.0, "hum": 400.0})
    assert detector.class_thresholds == {"pop": [0.9, 0.81], "click": [0.5, 0.45], "hum": [0.01, 0.01]}


def test_a_brief_sound_is_picked_no_higher_than_its_ceiling():
    frame_s = 0.01
    probs = np.full((700, 2), 0.01, np.float32)
    probs[100:150, 0] = 0.99  # a click take at 1 s and a pop take at 4 s, both near 1 while they hold
    probs[400:450, 1] = 0.99
    stream = ValidationStream(np.zeros((700, 64), np.float32), [("click", 1.0), ("pop", 4.0)], [], np.zeros(700))
    sounds, durations = ["click", "pop"], {"click": 250.0, "pop": 250.0}
    settings = PersonalizeConfig(min_duration_ms=250.0, brief_sound_max_on=0.8, min_onset_rise_db=0.0)
    f1 = threshold_f1(probs, stream, sounds, settings, DetectorConfig(), frame_s, durations)
    assert pick_thresholds(f1) == [0.98, 0.98]  # the quiet takes lose nothing up to the grid's top
    holds = {"click": 230.0, "pop": 250.0}  # the click's hold was cut (shorten_holds), the pop's was not
    ceilings = on_ceilings(sounds, durations, holds, settings)
    assert ceilings == [0.8, 1.0]
    assert on_ceilings(sounds, durations, durations, settings) == [1.0, 1.0]
    assert pick_thresholds(f1, ceilings) == [0.8, 0.98]
    probs[300:330, 0] = 0.85  # a click-like burst between the takes, above the ceiling: the ceiling still holds
    f1 = threshold_f1(probs, stream, sounds, settings, DetectorConfig(), frame_s, durations)
    assert pick_thresholds(f1, ceilings)[0] == 0.8


def test_the_highest_threshold_with_the_best_held_out_f1_is_picked():
    frame_s = 0.01
    probs = np.full((700, 1), 0.01, np.float32)
    probs[100:150, 0] = 0.99  # one held-out click near 1 while it holds ...
    probs[400:450, 0] = 0.3  # ... the other never above 0.3: only a threshold at or below 0.3 catches both
    stream = ValidationStream(np.zeros((700, 64), np.float32), [("click", 1.0), ("click", 4.0)], [], np.zeros(700))
    durations = {"click": 250.0}
    settings = PersonalizeConfig(min_duration_ms=250.0, min_onset_rise_db=0.0)
    f1 = threshold_f1(probs, stream, ["click"], settings, DetectorConfig(), frame_s, durations)
    grid = np.array(THRESHOLD_GRID)
    assert np.all(f1[0, grid <= 0.3] == 1.0) and np.allclose(f1[0, grid > 0.3], 2 / 3)
    assert pick_thresholds(f1) == [0.3]  # the highest that catches both takes
    probs[400:450, 0] = 0.01  # the second take is lost at every threshold: all tie, the highest is taken
    f1 = threshold_f1(probs, stream, ["click"], settings, DetectorConfig(), frame_s, durations)
    assert pick_thresholds(f1) == [0.98]
    assert pick_thresholds(f1, [0.75]) == [0.75]


def test_holds_end_a_margin_before_the_held_out_takes_fall_below_off():
    frame_s = 0.01
    probs = np.full((900, 3), 0.05, np.float32)
    probs[102:130, 0] = 0.99  # click takes at 1, 3 and 5 s: 28, 26 and 24 frames at or above off from on
    probs[303:329, 0] = 0.99
    probs[501:525, 0] = 0.99
    probs[100:102, 0] = 0.85  # rising: above off but below on, not counted
    probs[510, 0] = 0.9  # a dip that stays at or above off does not end the run
    probs[702:735, 1] = 0.99  # pop take at 7 s: 33 frames
    probs[780:800, 2] = 0.99  # hum take at 7.2 s reaches on too late (after ON_SEARCH_S)
    stream = ValidationStream(np.zeros((900, 64), np.float32),
                              [("click", 1.0), ("click", 3.0), ("click", 5.0), ("pop", 7.0), ("hum", 7.0)], [],
                              np.zeros(900))
    sounds, on, off = ["click", "pop", "hum"], [0.98, 0.98, 0.98], [0.8, 0.8, 0.8]
    runs = held_runs_ms(probs, stream, sounds, on, off, frame_s)
    assert runs == [pytest.approx([280.0, 260.0, 240.0]), pytest.approx([330.0]), []]
    settings = PersonalizeConfig(min_duration_ms=250.0, run_margin_ms=50.0, shortest_min_duration_ms=200.0)
    holds = {"click": 250.0, "pop": 250.0, "hum": 500.0}
    assert shorten_holds(holds, sounds, runs, settings) == {"click": 210.0, "pop": 250.0, "hum": 500.0}
    floor = dataclasses.replace(settings, shortest_min_duration_ms=230.0)
    assert shorten_holds(holds, sounds, runs, floor)["click"] == 230.0
    assert shorten_holds(holds, sounds, [[100.0], [], []], settings)["click"] == 200.0  # never below the floor
    assert shorten_holds({**holds, "click": 150.0}, sounds, runs, settings)["click"] == 150.0  # nor lengthened
    sustained = shorten_holds(holds, sounds, [[], [], [300.0, 320.0]], settings)
    assert sustained["hum"] == 500.0  # a sustained sound's hold, set by its enrolled length, is not cut
    for bad in ({"run_margin_ms": -1.0}, {"shortest_min_duration_ms": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad)).replace("_", "-")):
            PersonalizeConfig(**bad)


def test_bench_pools_users_by_summing_counts_and_hours():
    from benchmarks.personalize.bench import Quality
    from clients.detector.event_metrics import EventCounts

    first = Quality({"pop": EventCounts(9, 1, 1), "hum": EventCounts(10, 0, 0)}, {"pop": [100.0], "hum": [400.0]},
                    {"hum": {"speech": 2}}, 3600.0)
    second = Quality({"pop": EventCounts(5, 5, 5), "hum": EventCounts(8, 0, 2)}, {"pop": [140.0, 160.0], "hum": []},
                     {"pop": {"fan": 1}, "hum": {"speech": 1, "floor": 1}}, 1800.0)
    pooled = (first + second).figures()
    assert pooled["precision"] == pytest.approx(32 / 38) and pooled["recall"] == pytest.approx(32 / 40)
    assert pooled["per_sound"]["pop"]["tp"] == 14 and pooled["per_sound"]["hum"]["fn"] == 2
    assert pooled["false_triggers"] == 5 and pooled["false_triggers_by_sound"] == {"hum": 4, "pop": 1}
    assert pooled["false_triggers_by_aggressor"] == {"hum": {"speech": 3, "floor": 1}, "pop": {"fan": 1}}
    assert pooled["false_triggers_per_hour"] == pytest.approx(5 / 1.5) and pooled["aggressor_hours"] == 1.5
    assert pooled["median_latency_ms"] == 150.0 and pooled["median_latency_ms_by_sound"]["pop"] == 140.0
    assert first.figures()["false_triggers_per_hour"] == 2.0  # pooling made a new Quality
    assert first.triggers == {"hum": {"speech": 2}}


def test_each_ablation_switches_off_one_calibration_rule_and_nothing_else():
    from benchmarks.personalize.bench import ABLATIONS, ablations

    settings = PersonalizeConfig()
    variants = ablations(settings)
    assert list(variants) == list(ABLATIONS)
    for name, variant in variants.items():
        changed = {f.name for f in dataclasses.fields(settings)
                   if getattr(variant, f.name) != getattr(settings, f.name)}
        assert changed == set(ABLATIONS[name]), name
    assert variants["no-hold-cut"].shortest_min_duration_ms == settings.min_duration_ms
    holds = {"click": 250.0, "hum": 500.0}
    assert shorten_holds(holds, ["click", "hum"], [[200.0], []], variants["no-hold-cut"]) == holds
    assert min_durations({"hum": [0.6, 0.7]}, variants["no-sustained-hold"]) == {"hum": settings.min_duration_ms}


def test_the_targets_are_checked_on_the_real_recordings_and_per_sound_latency():
    from benchmarks.personalize.bench import target_checks

    row = {"precision": 1.0, "recall": 0.96, "false_triggers_per_hour": 2.0,
           "by_source": {"synthetic": {"false_triggers_per_hour": 2.0}, "real speech": {"false_triggers_per_hour": 0.2},
                         "real music": {"false_triggers_per_hour": 0.5}},
           "median_latency_ms_by_sound": {"pop": 110.0, "click": 130.0, "hiss": 190.0, "hum": 250.0,
                                          "whistle": float("nan")}}
    checks = dict(target_checks(row))
    assert checks["precision >= 0.95"] and checks["recall >= 0.95"]
    assert checks["real speech <= 0.3/h"] and not checks["real music <= 0.3/h"]
    assert "synthetic <= 0.3/h" not in checks  # the target is about real speech and music
    assert checks["pop latency <= 120 ms"] and not checks["click latency <= 120 ms"]
    assert checks["hiss latency <= 200 ms"] and not checks["hum latency <= 200 ms"]
    assert not checks["whistle latency <= 200 ms"]  # nothing detected: not met
    del row["by_source"]
    assert not dict(target_checks(row))["aggressors <= 0.3/h"]  # without recordings: all the aggressor audio


def test_a_false_trigger_belongs_to_the_aggressor_clip_under_it():
    from benchmarks.personalize.bench import aggressor_under

    clips = [("speech", 1.0, 2.0), ("fan", 2.2, 4.0), ("babble", 6.0, 7.0)]
    assert aggressor_under(1.5, clips) == "speech"
    assert aggressor_under(0.96, clips) == "speech"  # frame centring: just before the clip starts
    assert aggressor_under(2.1, clips) == "speech"  # the clip that just ended
    assert aggressor_under(2.2, clips) == "fan"  # under a clip beats one that just ended
    assert aggressor_under(4.25, clips) == "fan"
    assert aggressor_under(5.0, clips) == "floor" and aggressor_under(0.5, clips) == "floor"


def test_bench_enrolls_the_first_takes_of_each_sound_whatever_the_other_counts(tmp_path):
    from benchmarks.personalize.bench import _sizes, enroll_user
    from clients.detector.profile import Profile

    both = enroll_user(tmp_path / "both", _sizes(True), 0, 11, (10, 5))
    alone = enroll_user(tmp_path / "alone", _sizes(True), 0, 11, (5,))
    assert sorted(both) == [5, 10] and list(alone) == [5]
    profiles = {name: Profile.load(p) for name, p in (("both", both[5]), ("alone", alone[5]), ("ten", both[10]))}
    for sound, examples in profiles["alone"].sounds.items():
        assert len(examples) == 5 and len(profiles["ten"].sounds[sound]) == 10
        for mine, theirs in zip(examples, profiles["both"].sounds[sound], strict=True):
            assert np.array_equal(profiles["alone"].read(mine)[0], profiles["both"].read(theirs)[0])


@pytest.mark.slow
def test_personalize_bench_quick_reports_each_user_and_the_pool_and_resumes(tmp_path, capsys, monkeypatch):
    from benchmarks.personalize import bench as bench_personalize
    from benchmarks.personalize.bench import run_personalize_bench

    report = run_personalize_bench(tmp_path, quick=True, progress=False, user_seeds=(11, 12), aggressor_hours=0.05,
                                   examples=(10,), ablate=True)
    assert list(report["users"]) == ["11"]  # quick runs the first user only
    assert [r["aggressor_hours"] for r in report["results"].values()] == pytest.approx(
        [0.05] * (3 + len(bench_personalize.ABLATIONS)), rel=1e-3)
    # each latency choice and each ablation is a calibration of the same fine-tuned model: a row each, the
    # configured latency choice's plain
    variants = ["", "_balanced", "_fast", *(f"_{name}" for name in bench_personalize.ABLATIONS)]
    assert sorted(report["results"]) == sorted(f"10_examples{v}" for v in variants)
    assert [report["results"][f"10_examples{k}"]["variant"] for k in ("", "_balanced", "_fast")] == [
        "safe", "balanced", "fast"]
    # the global model's corpus WAVs are gone once prepared; the feature store it was trained on stays
    # the global model comes out of a federation of the corpus's voices, partitioned by uploader (one per voice)
    built = tmp_path / "global"
    assert not (built / "mouth-corpus").exists() and (built / "store" / "store.h5").is_file()
    assert json.loads((built / "global.json").read_text())["settings"]["partition"]["by"] == "uploader"
    assert (built / "federated-run" / "model.pt").is_file() and not (built / "central-run").exists()
    written = json.loads((tmp_path / "personalize.json").read_text())["results"]
    assert {k: v["per_sound"] for k, v in written.items()} == {k: v["per_sound"] for k, v in report["results"].items()}
    (seed, user), = report["users"].items()
    pooled, own = report["results"]["10_examples"], user["10_examples"]
    assert pooled["per_sound"] == own["per_sound"] and pooled["false_triggers"] == own["false_triggers"]
    assert sum(row["tp"] + row["fn"] for row in own["per_sound"].values()) == user["test_stream"]["events"]
    assert 0.0 <= own["untuned_held_out_f1"] <= 1.0 and own["fine_tune_seconds"] > 0
    table = capsys.readouterr().out
    assert f"per user (precision/recall/false triggers): {seed} " in table and "targets: precision >= 0.95" in table
    synthetic = pooled["by_source"]["synthetic"]
    low, high = synthetic["interval_per_hour"]
    assert low <= synthetic["false_triggers_per_hour"] < high
    assert (f"false triggers per hour by source (95% interval): synthetic {synthetic['false_triggers_per_hour']:.2f} "
            f"({synthetic['false_triggers']} in 0.05 h; {low:.2g}-{high:.2g})") in table
    # the operating points rerun the post-processing over saved probabilities: at the picked settings they
    # reproduce the bench's own figures
    ten = user["10_examples"]
    for label, holds in report["tradeoff"]["sounds"].items():
        picked = holds["+0ms"]["picked"]
        assert picked["recall"] == ten["per_sound"][label]["recall"]
        assert picked["precision"] == ten["per_sound"][label]["precision"]
        assert picked["false_triggers"] == ten["false_triggers_by_sound"].get(label, 0)
    assert (tmp_path / "personalize-tradeoff.png").stat().st_size > 0 and "operating points" in table
    assert "ablations (each calibration rule off" in table and "      10 no-onset-check" in table

    # a rerun resumes each user measured with the same code, settings and global model; any other is measured
    # again, and its saved figures are removed before its probabilities are overwritten
    result = tmp_path / f"user-{seed}" / "result.json"
    saved = result.read_text()
    assert json.loads(saved)["key"]["global_model_sha256"] == report["global_model_sha256"]

    def measure_again(*args, **kwargs):
        raise RuntimeError("measured again")

    monkeypatch.setattr(bench_personalize, "bench_user", measure_again)
    again = run_personalize_bench(tmp_path, quick=True, progress=False, user_seeds=(11, 12), aggressor_hours=0.05,
                                  examples=(10,), ablate=True)
    for part in ("users", "results", "tradeoff", "global_model_sha256"):
        assert json.dumps(again[part]) == json.dumps(report[part])  # NaN latencies where nothing was detected
    other_settings = dataclasses.replace(bench_personalize.load_personalize_config(), refractory_ms=400.0)
    same_code = json.loads(saved)["key"]["code_sha256"]
    for code, other in ((same_code, {"settings": other_settings}), (same_code, {"aggressor_hours": 0.06}),
                        (same_code, {"ablate": False}),
                        (same_code, {"examples": (5,)}), ("0" * 64, {})):
        result.write_text(saved)
        monkeypatch.setattr(bench_personalize, "code_sha256", lambda code=code: code)
        with pytest.raises(RuntimeError, match="measured again"):
            run_personalize_bench(tmp_path, quick=True, progress=False, user_seeds=(11, 12),
                                  **{"aggressor_hours": 0.05, "examples": (10,), "ablate": True, **other})
        assert not result.exists()
    # bench global again, with the central comparison and shipping: the store and federated run are kept
    from benchmarks.personalize import global_model

    rounds = (built / "federated-run" / "metrics.jsonl").read_text()
    monkeypatch.setattr(global_model, "SHIPPED_BUNDLE", tmp_path / "shipped")
    shipped = global_model.build_global_model(built, quick=True, progress=False, central=True, ship=True)
    assert (built / "federated-run" / "metrics.jsonl").read_text() == rounds
    assert shipped["gap"] == pytest.approx(shipped["central_eval_mAP"] - shipped["federated_eval_mAP"])
    labels = FeatureStore(built / "store" / "store.h5").labels
    assert list(shipped["federated_eval_ap"]) == list(shipped["central_eval_ap"]) == list(labels)
    assert f"eval AP per class        {labels[0]} " in capsys.readouterr().out
    assert load_bundle(tmp_path / "shipped").manifest["manifest_sha256"] == shipped["manifest_sha256"]
    assert load_bundle(tmp_path / "shipped").manifest["portable"]["step"] == "step.onnx"
    # a central run left from another recipe is refused, not reported as this one's
    saved_config = built / "central-run" / "config.json"
    recorded = json.loads(saved_config.read_text())
    recorded["train"]["epochs"] += 1
    saved_config.write_text(json.dumps(recorded))
    with pytest.raises(ConfigError, match=r"central-run: trained with other settings \(train.epochs: 2 -> 1\)"):
        global_model.build_global_model(built, quick=True, progress=False, central=True)


LOG_MEAN_EXP = {"federated.rounds": 30, "federated.max-pooling-rounds": 0}  # log-mean-exp pooling throughout


@pytest.mark.parametrize(("lever", "changes"), [
    ("logmeanexp", LOG_MEAN_EXP),
    ("fedavgm", {**LOG_MEAN_EXP, "federated.strategy": "fedavgm", "federated.server-momentum": 0.9}),
    ("fedadam", {**LOG_MEAN_EXP, "federated.strategy": "fedadam", "federated.server-lr": 0.01}),
    ("localsteps", {**LOG_MEAN_EXP, "train.batch-size": 16, "federated.local-epochs": 4}),
    ("maxpool", {**LOG_MEAN_EXP, "model.pooling": "max"}),
    ("context650", {"model.dilations": [1, 2, 4, 8]})])
def test_each_federation_lever_is_the_global_models_federation_with_its_one_change(lever, changes):
    """The lever configs BENCHMARKS reports differ from the global model's settings in the keys they name only (its
    federation with log-mean-exp pooling throughout and each lever's one change to that, or the shipped federation
    and one change); they set no frontend, so simulate takes the store's (the global model's lea16k)."""
    from benchmarks.personalize.global_model import global_config

    lever_config = load_config(CONFIG_DIR.parent / "benchmarks" / "personalize" / "federation" / f"{lever}.toml")
    expected = apply_flat(global_config(0, quick=False), changes, "test")
    assert lever_config.frontend == FrontendConfig()
    for part in ("model", "partition", "federated"):
        assert getattr(lever_config, part) == getattr(expected, part), part
    assert dataclasses.replace(lever_config.train, epochs=expected.train.epochs) == expected.train

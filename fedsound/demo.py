"""``fedsound demo``: the whole path on the built-in synthetic corpus, end to end, in a few minutes.

synth -> prep -> partition -> central baseline -> Flower simulation -> evaluation on the eval split
-> export -> streaming detection on an eval clip (-> a tiny Ray Tune grid with ``--sweep``).
"""

from __future__ import annotations

import time
from pathlib import Path

from fl.config import CONFIG_DIR, load_config


def _stage(name: str) -> None:
    print(f"\n=== {name} ===", flush=True)


def _eval_stream(corpus: Path, out: Path, seed: int, n_clips: int = 4, gap_s: float = 0.7):
    """Concatenate a few eval clips with silent gaps into one WAV; returns (path, [(onset, offset, labels)])."""
    import numpy as np
    import pandas as pd
    import soundfile as sf

    table = pd.read_csv(corpus / "FSD50K.ground_truth" / "eval.csv", dtype=str)
    rng = np.random.default_rng(seed)
    picks = table.iloc[rng.choice(len(table), size=min(n_clips, len(table)), replace=False)]
    pieces, truth, cursor, rate = [], [], gap_s, 44100
    for row in picks.itertuples():
        wave, rate = sf.read(corpus / "FSD50K.eval_audio" / f"{row.fname}.wav", dtype="float32")
        wave = wave[: int(4 * rate)]
        pieces += [np.zeros(int(gap_s * rate), np.float32), wave]
        truth.append((cursor, cursor + len(wave) / rate, row.labels))
        cursor += len(wave) / rate + gap_s
    sf.write(out, np.concatenate(pieces + [np.zeros(int(gap_s * rate), np.float32)]), rate, subtype="PCM_16")
    return out, truth


def _listen(bundle: Path, wav: Path, config):
    """Run the streaming detector over a file; returns (onset events, algorithmic latency in ms)."""
    from clients.detector.audio_input import FileSource
    from clients.detector.bundle import load_bundle
    from clients.detector.listen import detector_settings, run_detector
    from clients.detector.torch_stream import torch_detector

    loaded = load_bundle(bundle)
    settings = detector_settings(loaded.detector, config.detector)
    frontend = loaded.frontend()
    detector = torch_detector(loaded.model, frontend, loaded.labels, settings)
    summary = run_detector(detector, FileSource(wav, frontend.config.sample_rate, settings.block_size))
    return [e for e in summary.events if e.type == "onset"], detector.algorithmic_latency_ms


DEMO_SOUNDS = ("pop", "click", "hiss")
DEMO_USER = 7


def _personalize_user(workdir: Path, bundle: Path, config, seed: int, progress: bool):
    """A synthetic user enrolls 10 takes of each demo sound and a minute of background, then personalizes."""
    import soundfile as sf

    from clients.detector.enroll import enroll
    from clients.detector.personalize import personalize
    from data_prep.mouth_sounds import background_take, enrollment_take, make_voice

    profile = workdir / "profile"
    if not (profile / "personal" / "bundle.json").exists():
        voice = make_voice([seed, DEMO_USER])
        takes = workdir / "takes"
        takes.mkdir(parents=True, exist_ok=True)
        for k, sound in enumerate(DEMO_SOUNDS):
            files = []
            for i in range(10):
                take = enrollment_take(sound, voice, [seed, DEMO_USER, 1, k, i])
                files.append(takes / f"{sound}-{i:02d}.wav")
                sf.write(files[-1], take.wave, take.sample_rate, subtype="PCM_16")
            enroll(profile, sound=sound, from_files=files, progress=False)
        files = []
        for i in range(2):
            take = background_take(voice, [seed, DEMO_USER, 2, i], seconds=30.0)
            files.append(takes / f"background-{i}.wav")
            sf.write(files[-1], take.wave, take.sample_rate, subtype="PCM_16")
        enroll(profile, background=True, from_files=files, progress=False)
    report = personalize(profile, bundle, config, progress=progress)
    return profile, report


def _listen_test_stream(profile: Path, out: Path, config, seed: int):
    """Stream a held-out test stream (the user's sounds between speech-like and noise aggressors) through the
    personal detector; returns (precision, recall, median latency in ms, onset events)."""
    import numpy as np
    import soundfile as sf

    from clients.detector.event_metrics import COLLAR_S, event_counts
    from data_prep.mouth_sounds import make_test_stream, make_voice

    stream = make_test_stream(make_voice([seed, DEMO_USER]), 4, [seed, DEMO_USER, 3], sounds=DEMO_SOUNDS)
    sf.write(out, stream.wave, stream.sample_rate, subtype="PCM_16")
    events, _ = _listen(profile, out, config)
    detected = [(e.label, e.onset_s, e.emitted_s) for e in events]
    counts = event_counts(stream.events, detected, COLLAR_S, list(DEMO_SOUNDS))["overall"]
    latencies = [1000 * (e.emitted_s - onset) for label, onset, _ in stream.events for e in events
                 if e.label == label and abs(e.onset_s - onset) <= COLLAR_S]
    return counts.precision, counts.recall, float(np.median(latencies)) if latencies else float("nan"), events


def run_demo(workdir: Path, seed: int = 0, sweep: bool = False, progress: bool = True) -> int:
    """Run every stage into ``workdir`` and print a summary of what was made and where."""
    from data_prep.prep import prep
    from data_prep.synth import synthesize_corpus
    from fedsound.simulate import simulate
    from fl.partition import build_partition, format_summary
    from fl.train import evaluate_model_file, train_central

    started = time.perf_counter()
    workdir = Path(workdir)
    config = load_config(CONFIG_DIR / "demo.toml", overrides={"seed": seed})
    corpus, store = workdir / "FSD50K-synth", workdir / "store" / "store.h5"
    made: list[tuple[str, Path]] = []

    _stage("1. synthetic FSD50K-format corpus")
    if not (corpus / "FSD50K.ground_truth" / "vocabulary.csv").exists():
        summary = synthesize_corpus(corpus, seed=seed, progress=progress)
        print(f"{summary.n_dev} dev + {summary.n_eval} eval clips, {len(summary.classes)} classes, "
              f"{summary.audio_seconds / 60:.1f} min of audio")
    else:
        print(f"reusing {corpus}")
    made.append(("corpus", corpus))

    _stage("2. log-mel feature store")
    if not store.exists():
        print("\n".join(prep(corpus, store, config.frontend, workers=2, progress=progress).lines()))
    else:
        print(f"reusing {store}")
    made.append(("feature store", store))

    _stage("3. partition by uploader")
    plan, summary, plot = build_partition(store, config)
    print(format_summary(summary))
    made.append(("partition plot", plot))

    _stage("4. central baseline (TCN)")
    central = workdir / "runs" / "central"
    if not (central / "model.pt").exists():
        result = train_central(store, config, central, resume=(central / "checkpoint.pt").exists(),
                               progress=progress)
        print(f"central best val mAP {result['best_mAP']:.4f} (epoch {result['best_epoch']})")
    made.append(("central run", central))

    _stage("5. federated training: Flower simulation on Ray")
    federated = workdir / "runs" / "federated"
    if not (federated / "model.pt").exists():
        simulate(store, config, federated, resume=(federated / "checkpoint.pt").exists(), progress=progress,
                 central=central)
    made.append(("federated run", federated))

    _stage("6. evaluation on the eval split (uploaders unseen in training)")
    scores = {}
    for name, run in (("central", central), ("federated", federated)):
        metrics = evaluate_model_file(run / "model.pt", store, "eval", progress=False)
        scores[name] = metrics
        print(f"{name:9s}  mAP {metrics['mAP']:.4f}  d' {metrics['dprime']:.3f}  lwlrap {metrics['lwlrap']:.4f}")

    _stage("7. export the global model to a detector bundle")
    from clients.detector.bundle import export_bundle

    bundle = export_bundle(federated / "model.pt", workdir / "bundle", config, store=store)
    print(f"bundle: {bundle}")
    made.append(("detector bundle", bundle))

    _stage("8. streaming detection on a stream of eval clips (file fed block by block)")
    stream_wav, truth = _eval_stream(corpus, workdir / "stream.wav", seed)
    events, latency_ms = _listen(bundle, stream_wav, config)
    for onset, offset, labels in truth:
        print(f"  truth  {onset:6.2f}-{offset:6.2f} s  {labels}")
    for event in events:
        print(f"  event  {event.onset_s:6.2f} s  {event.label:28s} score {event.score:.2f}  "
              f"latency {event.latency_ms:.0f} ms")
    print(f"algorithmic latency {latency_ms:.1f} ms; {len(events)} events")
    made.append(("test stream", stream_wav))

    _stage("9. private personalization: enroll a user's mouth sounds, fine-tune on the laptop, listen")
    profile, report = _personalize_user(workdir, bundle, config, seed, progress)
    from clients.detector.personalize import format_report

    print(format_report(report))
    precision, recall, latency, events = _listen_test_stream(profile, workdir / "mouth-test.wav", config, seed)
    for event in events[:8]:
        print(f"  event  {event.onset_s:6.2f} s  {event.label:8s} score {event.score:.2f}  "
              f"latency {event.latency_ms:.0f} ms")
    print(f"held-out test stream: precision {precision:.2f}, recall {recall:.2f}, median detection latency "
          f"{latency:.0f} ms ({len(events)} events)")
    made.append(("user profile", profile))

    if sweep:
        _stage("10. a tiny Ray Tune grid over the federated parameters")
        from fedsound.sweep import run_sweep

        sweep_dir = workdir / "sweeps" / "tiny"
        grid = load_config(CONFIG_DIR / "demo.toml", CONFIG_DIR / "sweep" / "tiny.toml", overrides={"seed": seed})
        best = run_sweep(store, grid, sweep_dir, resume=(sweep_dir / "sweep.json").exists(), progress=progress)
        print(f"best trial {best['trial']} {best['params']}: final val mAP {best['metrics']['final_mAP']:.4f}")
        made.append(("sweep", sweep_dir))

    _stage("summary")
    for label, path in made:
        print(f"  {label:15s} {path}")
    print(f"  eval mAP: central {scores['central']['mAP']:.4f}, federated {scores['federated']['mAP']:.4f}")
    print(f"  demo took {time.perf_counter() - started:.0f} s")
    return 0

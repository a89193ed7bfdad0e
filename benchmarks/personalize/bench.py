"""``fedsound bench personalize``: detection quality after private fine-tuning, and the fine-tuning time.

1. Global model: ``WORKDIR/global-bundle`` when it exists (``WORKDIR`` is ``bench/personalize`` under the CLI's
   ``--workdir``), else the global bundle fedsound ships, else (and with ``quick``) one built by the federation of
   :mod:`benchmarks.personalize.global_model`.
2. Synthetic users (:data:`PROTOCOL`: the ``test`` users by default, ``--users tuning`` or seeds; their voices
   are not in the global model's corpus): each enrolls 10 takes of each of the five mouth sounds and three
   minutes of background (six 30 s takes of their room with its noises, sometimes a television, and their own
   speech) through :func:`clients.detector.enroll.enroll` from WAV files; a second profile holds the first 5
   takes of each sound and the same background (``EXAMPLES``; ``--examples`` chooses the counts).
3. :func:`clients.detector.personalize.personalize` fine-tunes each profile (timed).
4. Each personal bundle runs (frontend, TCN, the streaming post-processing) over its user's held-out test
   stream (mouth sounds at known onsets between speech-like and noise aggressors) and over the user's
   aggressor-only audio: ``AGGRESSOR_HOURS`` of synthetic aggressors (``--aggressor-hours``) and, with
   ``--real-audio DIR``, ``REAL_SPEECH_HOURS`` of real speech and ``REAL_MUSIC_HOURS`` of real music from the
   recordings' ``test`` split for the test users, their ``tune`` split for any other (:mod:`data_prep.real_audio`:
   speakers the global model never heard), played in the user's room. Figures, pooled over the users (summed
   event counts, all false triggers over all the aggressor hours) and per user, for each latency choice
   (``safe``, ``balanced``, ``fast``: calibrations of the same fine-tuned model): event-level precision and
   recall with a 100 ms onset collar, false triggers per hour on each source of aggressor audio, median
   detection latency per sound (onset event emitted, frontend delay included, minus the true onset),
   fine-tuning time. Over the ten test users, no false trigger bounds the rate (95%) below 0.3 per hour in the
   10 h of synthetic aggressors, 0.6 in the 5 h of real speech and 1.2 in the 2.5 h of music.
5. Operating points (:mod:`benchmarks.personalize.tradeoff`): each personal model's probabilities over its
   user's audio are saved (``user-U/probabilities-N.npz``); for the largest count of examples the
   post-processing is rerun over them at other on-thresholds and holds, pooled over the users: a table, and a
   figure beside the JSON (``NAME-tradeoff.png``).
6. Resume: each user's figures are saved (``user-U/result.json``) as soon as they are measured, keyed by
   everything they depend on (:func:`user_key`: the code, settings, sizes, seeds, examples, global model and
   recordings); a rerun takes a user whose key matches from there instead of measuring it again.

Targets (:data:`TARGETS`), with 10 examples per sound: precision and recall at least 0.95, at most 0.3 false
triggers per hour on real speech and music, median latency at most 120 ms for brief sounds and 200 ms for
sustained ones. ``quick`` shrinks every size, takes one user and fine-tunes 200 steps only, after at most 40 of
the head alone (smoke test; its figures mean little).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
import tomllib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from benchmarks.common import machine_info, write_json
from benchmarks.personalize.global_model import build_global_model
from benchmarks.personalize.tradeoff import (
    SavedProbabilities,
    format_tradeoff,
    load_probabilities,
    plot_tradeoff,
    save_probabilities,
    tradeoff,
)
from clients.detector.bundle import Bundle, load_bundle, shipped_bundle
from clients.detector.enroll import enroll
from clients.detector.event_metrics import (
    COLLAR_S,
    EventCounts,
    event_counts,
    false_trigger_interval,
    false_triggers_per_hour,
)
from clients.detector.personalize import PersonalizeConfig, load_personalize_config, personalize
from clients.detector.postprocess import EventTracker
from clients.detector.torch_stream import frame_probabilities
from data_prep.mouth_sounds import (
    SAMPLE_RATE,
    SOUNDS,
    Stream,
    background_take,
    enrollment_take,
    make_aggressor_stream,
    make_test_stream,
    make_voice,
    recorded_in_room,
)
from data_prep.real_audio import RealAudio
from fl.config import Config, DetectorConfig, to_dict
from fl.errors import ConfigError

TARGETS = {"precision": 0.95, "recall": 0.95, "false_triggers_per_hour": 0.3}
LATENCY_TARGETS_MS = {"pop": 120.0, "click": 120.0, "hiss": 200.0, "hum": 200.0, "whistle": 200.0}
EXAMPLES = (10, 5)  # enrollment examples per sound: one profile per count, the takes of the smaller ones a prefix
AGGRESSOR_HOURS = 1.0  # synthetic aggressor-only audio per user
AGGRESSOR_CHUNK_S = 300.0
REAL_SPEECH_HOURS, REAL_MUSIC_HOURS = 0.5, 0.25  # per user, of the real recordings' test or tune split
REAL_CHUNK_S = 60.0
# --ablate: each calibration rule of clients/detector/personalize.py switched off in turn, on the same fine-tuned
# models (rules of training, such as the augmentations, would need a fine-tuning each)
ABLATIONS = {
    "no-brief-ceiling": {"brief_sound_max_on": 1.0},
    "no-hold-cut": {"shortest_min_duration_ms": None},  # None: min-duration-ms, so no hold is cut
    "no-sustained-hold": {"min_duration_fraction": 0.0},  # every sound holds min-duration-ms
    "no-onset-check": {"min_onset_rise_db": 0.0},
    "no-onset-dating": {"onset_at_rise": False},
}
PROTOCOL = Path(__file__).with_name("protocol.toml")  # the tuning and test users, fixed before any tuning
USER_SETS = ("tuning", "test")
BACKGROUND_TAKE_S = 30.0
# A false trigger belongs to the aggressor clip under its onset, from 50 ms before the clip starts (frame
# centring) to 300 ms after it ends (the clip still fills most of the receptive field); otherwise to the floor.
ATTRIBUTION_S = (0.05, 0.3)
FLOOR = "floor"
SYNTHETIC = "synthetic"  # the synthetic aggressor audio (speech-like, babble, fan, traffic)
REAL_KINDS = {"speech": "real speech", "music": "real music"}  # recordings of data_prep.real_audio -> aggressor kind
REAL_KINDS_BY_NAME = set(REAL_KINDS.values())
USER_RESULT = "result.json"  # a user's figures, saved as soon as they are measured (resume)


def protocol_users(which: str) -> list[int]:
    """The ``tuning`` or ``test`` users of :data:`PROTOCOL`."""
    if which not in USER_SETS:
        raise ConfigError(f"users: expected {' or '.join(USER_SETS)} or seeds, got {which!r}")
    with PROTOCOL.open("rb") as handle:
        return list(tomllib.load(handle)[f"{which}-users"])


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"events_per_sound": 6, "aggressor_s": 120.0, "background_takes": 2, "steps": 200, "users": 1,
                "real_speech_s": 60.0, "real_music_s": 30.0}
    return {"events_per_sound": 40, "aggressor_s": 3600.0 * AGGRESSOR_HOURS, "background_takes": 6,
            "steps": None, "users": None, "real_speech_s": 3600.0 * REAL_SPEECH_HOURS,
            "real_music_s": 3600.0 * REAL_MUSIC_HOURS}


def global_bundle(workdir: Path, quick: bool, seed: int, progress: bool, real_audio: Path | None
                  ) -> tuple[Path, str, str]:
    """The global detector bundle, its manifest SHA-256 and where it came from: ``WORKDIR/global-bundle`` if it
    exists, else the bundle fedsound ships (not with ``quick``), else one built here by the federation of
    :mod:`benchmarks.personalize.global_model` (in ``WORKDIR/global``)."""
    for bundle, what in ((workdir / "global-bundle", "existing bundle"),
                         (None if quick else shipped_bundle(), "the shipped global bundle")):
        if bundle is not None and (bundle / "bundle.json").is_file():
            sha = load_bundle(bundle).manifest["manifest_sha256"]
            return bundle, sha, f"{what} {bundle} (manifest sha256 {sha})"
    report = build_global_model(workdir / "global", quick=quick, progress=progress, seed=seed, real_audio=real_audio)
    origin = (f"federated TCN over {report['sizes']['n_voices']} voices (benchmarks/personalize/global_model.py; "
              f"eval mAP {report['federated_eval_mAP']:.3f}), background "
              + ("half real recordings" if real_audio else "synthetic only"))
    return Path(report["bundle"]), report["manifest_sha256"], origin


def _write_takes(folder: Path, waves: list[np.ndarray], rate: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, wave in enumerate(waves):
        path = folder / f"{i:02d}.wav"
        sf.write(path, wave, rate, subtype="PCM_16")
        paths.append(path)
    return paths


def enroll_user(workdir: Path, sizes: dict[str, Any], seed: int, user_seed: int, examples: Sequence[int]
                ) -> dict[int, Path]:
    """Synthesize a user's takes, enroll them into one profile per example count (the first ``count`` takes of
    each sound, whatever the other counts); returns count -> profile."""
    voice = make_voice([seed, user_seed])
    takes_dir = workdir / "takes"
    shutil.rmtree(takes_dir, ignore_errors=True)
    files = {}
    for k, sound in enumerate(SOUNDS):
        takes = [enrollment_take(sound, voice, [seed, user_seed, 1, k, i]) for i in range(max(examples))]
        files[sound] = _write_takes(takes_dir / sound, [t.wave for t in takes], takes[0].sample_rate)
    background = [background_take(voice, [seed, user_seed, 2, i], seconds=BACKGROUND_TAKE_S)
                  for i in range(sizes["background_takes"])]
    background_files = _write_takes(takes_dir / "background", [t.wave for t in background], background[0].sample_rate)
    profiles = {}
    for count in examples:
        profile = workdir / "profiles" / f"{count}-examples"
        shutil.rmtree(profile, ignore_errors=True)
        for sound in SOUNDS:
            enroll(profile, sound=sound, from_files=files[sound][:count], progress=False)
        enroll(profile, background=True, from_files=background_files, progress=False)
        profiles[count] = profile
    return profiles


def detect(bundle: Bundle, probs: np.ndarray, levels: np.ndarray, detector: DetectorConfig | None = None
           ) -> list[tuple[str, float, float]]:
    """Onset events ``(label, onset_s, emitted_s)`` of a bundle's post-processing (or ``detector``'s) over its
    probabilities and the frames' levels.

    ``emitted_s`` is when a streaming detector emits the event: its confirming frame plus the frontend delay.
    """
    frame_s, delay_s = bundle.frontend_config.frame_s, bundle.frontend_config.delay_s
    tracker = EventTracker(bundle.labels, detector or bundle.detector, frame_s)
    stamps = np.arange(len(probs)) * frame_s + delay_s
    return [(event.label, event.onset_s, event.emitted_s) for event in tracker.update(probs, stamps, levels)
            if event.type == "onset"]


def _latencies(reference: list[tuple[str, float, float]], detected: list[tuple[str, float, float]]
               ) -> dict[str, list[float]]:
    """Per sound, for each of its reference events: emitted time minus true onset of the first same-label
    detection within the collar (ms)."""
    out: dict[str, list[float]] = {name: [] for name in SOUNDS}
    for label, onset, _ in reference:
        emitted = [e for lab, on, e in detected if lab == label and abs(on - onset) <= COLLAR_S + 1e-9]
        if emitted:
            out[label].append(1000.0 * (min(emitted) - onset))
    return out


def aggressor_under(onset_s: float, clips: list[tuple[str, float, float]]) -> str:
    """The kind of the aggressor clip ``(kind, start_s, end_s)`` a false trigger at ``onset_s`` belongs to
    (``ATTRIBUTION_S``): the clip under it, else the last one that ended shortly before it, else ``FLOOR``."""
    before, after = ATTRIBUTION_S
    under = [kind for kind, start, end in clips if start - before <= onset_s <= end]
    if under:
        return under[0]
    trailing = [kind for kind, _, end in clips if end < onset_s <= end + after]
    return trailing[-1] if trailing else FLOOR


@dataclass
class Quality:
    """Raw figures of one user, or of several pooled (``+``): per-sound event counts on the test streams,
    detection latencies (ms), false triggers on the aggressor-only audio (sound -> aggressor kind under them
    -> count) and its length."""

    counts: dict[str, EventCounts]
    latencies: dict[str, list[float]]
    triggers: dict[str, dict[str, int]]
    seconds: float
    real_seconds: dict[str, float] = field(default_factory=dict)  # of those seconds, the real recordings' by kind

    def __add__(self, other: Quality) -> Quality:
        return Quality({name: self.counts[name] + other.counts[name] for name in self.counts},
                       {name: self.latencies[name] + other.latencies[name] for name in self.latencies},
                       {name: dict(Counter(self.triggers.get(name, {})) + Counter(other.triggers.get(name, {})))
                        for name in {*self.triggers, *other.triggers}},
                       self.seconds + other.seconds,
                       dict(Counter(self.real_seconds) + Counter(other.real_seconds)))

    def to_dict(self) -> dict[str, Any]:
        """The raw figures as plain JSON values (counts as ``[tp, fp, fn]``); :meth:`from_dict` reads them back."""
        return {"counts": {name: [c.tp, c.fp, c.fn] for name, c in self.counts.items()},
                "latencies": self.latencies, "triggers": self.triggers, "seconds": self.seconds,
                "real_seconds": self.real_seconds}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Quality:
        """The figures :meth:`to_dict` wrote."""
        return cls({name: EventCounts(*c) for name, c in data["counts"].items()}, data["latencies"],
                   data["triggers"], data["seconds"], data.get("real_seconds", {}))

    def rates_by_source(self) -> dict[str, dict[str, Any]]:
        """False triggers, hours and triggers per hour (with its 95% interval) on the synthetic aggressor audio and
        on each kind of real recording (:data:`REAL_KINDS`)."""
        triggers = Counter()
        for kinds in self.triggers.values():
            for kind, n in kinds.items():
                triggers[kind if kind in REAL_KINDS_BY_NAME else SYNTHETIC] += n
        seconds = {SYNTHETIC: self.seconds - sum(self.real_seconds.values()), **self.real_seconds}
        return {source: {"false_triggers": triggers[source], "hours": s / 3600.0,
                         "false_triggers_per_hour": false_triggers_per_hour(triggers[source], s),
                         "interval_per_hour": list(false_trigger_interval(triggers[source], s))}
                for source, s in seconds.items() if s > 0}

    def figures(self) -> dict[str, Any]:
        """Precision, recall, F1, latencies, false triggers (per hour and by sound) as plain numbers."""
        overall = sum(self.counts.values(), EventCounts(0, 0, 0))
        every = [ms for values in self.latencies.values() for ms in values]
        by_sound = {name: sum(kinds.values()) for name, kinds in sorted(self.triggers.items())}
        total = sum(by_sound.values())
        return {
            "per_sound": {name: counts.to_dict() for name, counts in self.counts.items()},
            "precision": overall.precision,
            "recall": overall.recall,
            "f1": overall.f1,
            "median_latency_ms": float(np.median(every)) if every else float("nan"),
            "median_latency_ms_by_sound": {name: float(np.median(v)) if v else float("nan")
                                           for name, v in self.latencies.items()},
            "false_triggers": total,
            "false_triggers_by_sound": by_sound,
            "false_triggers_by_aggressor": {name: dict(sorted(kinds.items(), key=lambda item: -item[1]))
                                            for name, kinds in sorted(self.triggers.items())},
            "aggressor_hours": self.seconds / 3600.0,
            "false_triggers_per_hour": false_triggers_per_hour(total, self.seconds),
            "by_source": self.rates_by_source(),
        }


def evaluate_bundles(sources: Mapping[int, Path], test_wave: np.ndarray, reference: list[tuple[str, float, float]],
                     aggressor_chunks: Iterable[Stream],
                     detectors: Mapping[int, Mapping[str, DetectorConfig]] | None = None
                     ) -> dict[int, tuple[dict[str, Quality], SavedProbabilities]]:
    """For each bundle and each of its detector settings (``detectors[key]``: latency choice -> settings; default
    the bundle's own, as ``safe``): event counts and latencies on the test stream, false triggers on the
    aggressor-only audio (with the aggressor kind under each), and the probabilities they came from (offline =
    streaming, the same for every setting). The aggressor audio is made once for all, one chunk at a time."""
    bundles = {key: load_bundle(source) for key, source in sources.items()}
    frontends = {key: bundle.frontend() for key, bundle in bundles.items()}
    settings = {key: dict((detectors or {}).get(key) or {"safe": bundle.detector}) for key, bundle in bundles.items()}

    def outputs(key: int, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        frames = frontends[key].frames(wave, frontends[key].config.sample_rate)
        return frame_probabilities(bundles[key].model, frames), frontends[key].levels_db(frames)

    aggressor: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {key: [] for key in bundles}
    triggers = {key: {choice: {} for choice in settings[key]} for key in bundles}
    real_seconds: Counter = Counter()
    for chunk in aggressor_chunks:
        if len(chunk.aggressors) == 1 and chunk.aggressors[0][0] in REAL_KINDS_BY_NAME:
            real_seconds[chunk.aggressors[0][0]] += chunk.seconds
        for key, bundle in bundles.items():
            aggressor[key].append(outputs(key, chunk.wave))
            for choice, detector in settings[key].items():
                for label, onset, _ in detect(bundle, *aggressor[key][-1], detector):
                    kinds = triggers[key][choice].setdefault(label, {})
                    kind = aggressor_under(onset, chunk.aggressors)
                    kinds[kind] = kinds.get(kind, 0) + 1
    results = {}
    for key, bundle in bundles.items():
        test, test_levels = outputs(key, test_wave)
        saved = SavedProbabilities(bundle.labels, bundle.detector, bundle.frontend_config.frame_s, test,
                                   [(label, onset) for label, onset, _ in reference],
                                   [probs for probs, _ in aggressor[key]], test_levels,
                                   [levels for _, levels in aggressor[key]], bundle.frontend_config.delay_s)
        qualities = {}
        for choice, detector in settings[key].items():
            detected = detect(bundle, test, test_levels, detector)
            counts = event_counts(reference, detected, COLLAR_S, list(SOUNDS))
            qualities[choice] = Quality({name: counts[name] for name in SOUNDS}, _latencies(reference, detected),
                                        triggers[key][choice], saved.aggressor_seconds, dict(real_seconds))
        results[key] = (qualities, saved)
    return results


def ablations(settings: PersonalizeConfig) -> dict[str, PersonalizeConfig]:
    """:data:`ABLATIONS` as settings: ``settings`` with one rule switched off each."""
    out = {}
    for name, changes in ABLATIONS.items():
        values = {key: settings.min_duration_ms if value is None else value for key, value in changes.items()}
        out[name] = replace(settings, **values)
    return out


def real_chunks(real: RealAudio, sizes: Mapping[str, Any], seed: int, user_seed: int, split: str = "test"
                ) -> Iterator[Stream]:
    """The user's real aggressor audio: ``sizes["real_speech_s"]`` of ``split``'s speech and
    ``sizes["real_music_s"]`` of its music, played in the user's room, a minute at a time (a level each)."""
    for k, (kind, name) in enumerate(REAL_KINDS.items()):
        total = sizes[f"real_{kind}_s"]
        for i in range(int(np.ceil(total / REAL_CHUNK_S))):
            seconds = min(REAL_CHUNK_S, total - i * REAL_CHUNK_S)
            recording = real.stretch(split, kind, seconds, [seed, user_seed, 5, k, i], SAMPLE_RATE)
            yield recorded_in_room(recording, name, [seed, user_seed, 6, k, i], SAMPLE_RATE,
                                   (-34.0, -8.0) if kind == "music" else (-28.0, -6.0))


def bench_user(workdir: Path, bundle: Path, sizes: dict[str, Any], seed: int, user_seed: int,
               settings: PersonalizeConfig, progress: bool, examples: Sequence[int], real: RealAudio | None = None,
               ablate: bool = False) -> tuple[dict[int, dict[str, Quality]], dict[int, dict[str, Any]], dict[str, Any]]:
    """One synthetic user: enroll (one profile per count in ``examples``), personalize each profile, evaluate
    each latency choice and, with ``ablate``, each of :func:`ablations` (on real recordings too when ``real`` is
    given); returns (count -> choice -> quality,
    count -> facts of the fine-tuning, the test stream's size)."""
    profiles = enroll_user(workdir, sizes, seed, user_seed, examples)
    voice = make_voice([seed, user_seed])
    test = make_test_stream(voice, sizes["events_per_sound"], [seed, user_seed, 3])
    n_chunks = max(1, int(round(sizes["aggressor_s"] / AGGRESSOR_CHUNK_S)))
    chunk_s = sizes["aggressor_s"] / n_chunks
    facts, detectors = {}, {}
    for count, profile in profiles.items():
        report = personalize(profile, bundle, Config(seed=seed), progress=progress, settings=settings,
                             also_calibrate=ablations(settings) if ablate else None)
        detectors[count] = {**report["latency_detectors"], **report["other_detectors"]}
        facts[count] = {
            "fine_tune_seconds": report["train_seconds"],
            "personalize_seconds": report["seconds"],
            "held_out_f1": report["f1"],
            "untuned_held_out_f1": report["untuned_f1"],
            "thresholds": {name: [row["on_threshold"], row["off_threshold"]]
                           for name, row in report["sounds"].items()},
        }
    chunks = (make_aggressor_stream(voice, chunk_s, [seed, user_seed, 4, i])
              for i in tqdm(range(n_chunks), disable=not progress, desc=f"user {user_seed}: aggressor audio",
                            leave=False))
    if real is not None:
        chunks = itertools.chain(chunks, real_chunks(real, sizes, seed, user_seed, sizes["real_split"]))
    evaluated = evaluate_bundles(profiles, test.wave, test.events, chunks, detectors)
    for count, (_, saved) in evaluated.items():
        save_probabilities(workdir / f"probabilities-{count}.npz", saved)
    quality = {count: q for count, (q, _) in evaluated.items()}
    stream = {"seconds": test.seconds, "events": len(test.events), "aggressor_clips": len(test.aggressors)}
    return quality, facts, stream


def code_sha256() -> str:
    """SHA-256 over the project's Python sources (``clients``, ``fl``, ``data_prep``, this benchmark): figures
    that other code measured are never resumed."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    folders = ("clients", "fl", "data_prep", "benchmarks/personalize")
    for path in sorted(p for folder in folders for p in (root / folder).rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def user_key(code: str, global_sha256: str, sizes: Mapping[str, Any], seed: int, user_seed: int,
             settings: PersonalizeConfig, examples: Sequence[int]) -> dict[str, Any]:
    """Everything a user's figures depend on (``code``: :func:`code_sha256`), as plain JSON values: a saved result
    is resumed only when its key is the same."""
    key = {"code_sha256": code, "global_model_sha256": global_sha256, "sizes": dict(sizes), "seed": seed,
           "user": user_seed, "examples": list(examples), "settings": to_dict(settings)}
    return json.loads(json.dumps(key))  # tuples as lists, as they come back from the file


def row_key(count: int, choice: str, settings: PersonalizeConfig) -> str:
    """The key of a row of figures: ``10_examples`` for the configured latency choice, ``10_examples_fast`` for
    another, ``10_examples_no-onset-check`` for an ablation."""
    return f"{count}_examples" + ("" if choice == settings.latency else f"_{choice}")


def saved_user(folder: Path, key: Mapping[str, Any]
               ) -> tuple[dict[int, dict[str, Quality]], dict[int, dict[str, Any]], dict[str, Any]] | None:
    """What :func:`bench_user` returned for ``folder``'s user in an earlier run with the same ``key`` (its
    ``USER_RESULT`` and the probabilities of each count in ``key["examples"]`` are there), else None."""
    path = folder / USER_RESULT
    if not path.is_file() or not all((folder / f"probabilities-{n}.npz").is_file() for n in key["examples"]):
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # written atomically, so only an edit by hand gets here: measure again
    if not isinstance(saved, dict) or saved.get("key") != key:
        return None
    return ({int(n): {choice: Quality.from_dict(q) for choice, q in by_choice.items()}
             for n, by_choice in saved["quality"].items()},
            {int(n): facts for n, facts in saved["facts"].items()}, saved["stream"])


def run_personalize_bench(workdir: Path, quick: bool = False, out_json: Path | None = None, progress: bool = True,
                          seed: int = 0, settings: PersonalizeConfig | None = None,
                          user_seeds: Sequence[int] | str | None = None, aggressor_hours: float | None = None,
                          examples: Sequence[int] | None = None, real_audio: Path | None = None,
                          ablate: bool = False) -> dict[str, Any]:
    """Run the benchmark (module docstring); print a table and write JSON (``out_json`` or
    ``WORKDIR/personalize.json``). ``user_seeds``: the synthetic users, ``"test"`` (default) or ``"tuning"``
    (:data:`PROTOCOL`) or seeds; ``quick`` takes the first only. ``real_audio``: the folder of ``fedsound data
    real-audio``, whose speech and music are added to each user's aggressor audio (the test split for the
    test users, the tune split for any other).
    ``aggressor_hours``: hours of synthetic aggressor-only audio per user (default ``AGGRESSOR_HOURS``, or two
    minutes with ``quick``); the first
    hour is the same audio whatever the length. ``examples``: enrollment examples per sound, one profile per
    count (default ``EXAMPLES``); the operating points are those of the largest. ``ablate``: also a row per
    calibration rule switched off (:data:`ABLATIONS`)."""
    sizes = _sizes(quick)
    if aggressor_hours is not None:
        if not 0 < aggressor_hours <= 1000:
            raise ConfigError(f"aggressor-hours: must be in (0, 1000], got {aggressor_hours}")
        sizes["aggressor_s"] = 3600.0 * aggressor_hours
    if user_seeds is None or isinstance(user_seeds, str):
        user_seeds = protocol_users(user_seeds or "test")
    user_seeds = list(user_seeds)[: sizes["users"]]
    # the recordings' test split is heard by the test users only; any other run is tuning, on the tune split
    sizes["real_split"] = "test" if set(user_seeds) <= set(protocol_users("test")) else "tune"
    if not user_seeds or len(set(user_seeds)) != len(user_seeds):
        raise ConfigError(f"users: need one or more distinct user seeds, got {user_seeds}")
    settings = settings or load_personalize_config()
    examples = list(EXAMPLES if examples is None else examples)
    if not examples or len(set(examples)) != len(examples) or min(examples) < settings.min_examples:
        raise ConfigError(f"examples: need one or more distinct counts of at least min-examples "
                          f"({settings.min_examples}), got {examples}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if sizes["steps"] is not None:
        settings = replace(settings, steps=min(settings.steps, sizes["steps"]),
                           head_warmup_steps=min(settings.head_warmup_steps, sizes["steps"] // 5))
    started = time.perf_counter()
    real = RealAudio(real_audio) if real_audio is not None else None
    if real is None:
        sizes["real_speech_s"] = sizes["real_music_s"] = 0.0
    bundle, global_sha256, origin = global_bundle(workdir, quick, seed, progress, real_audio)
    setup_s = time.perf_counter() - started

    pooled: dict[tuple[int, str], Quality] = {}
    users: dict[str, Any] = {}
    code = code_sha256()
    for user_seed in user_seeds:
        folder = workdir / f"user-{user_seed}"
        key = user_key(code, global_sha256, sizes, seed, user_seed, settings, examples)
        key["real_audio_sha256"] = real.manifest_sha256 if real is not None else None
        key["ablations"] = ABLATIONS if ablate else None
        resumed = saved_user(folder, key)
        if resumed is None:
            (folder / USER_RESULT).unlink(missing_ok=True)  # its probabilities are about to be overwritten
            quality, facts, stream = bench_user(folder, bundle, sizes, seed, user_seed, settings, progress, examples,
                                                real, ablate)
            write_json(folder / USER_RESULT, {"key": key, "facts": facts, "stream": stream, "quality": {
                n: {choice: q.to_dict() for choice, q in by_choice.items()} for n, by_choice in quality.items()}})
        else:
            quality, facts, stream = resumed
            if progress:
                print(f"user {user_seed}: figures of an earlier run with the same code and settings "
                      f"({folder / USER_RESULT})")
        users[str(user_seed)] = {"test_stream": stream}
        for count, by_choice in quality.items():
            for choice, q in by_choice.items():
                pooled[count, choice] = pooled[count, choice] + q if (count, choice) in pooled else q
                users[str(user_seed)][row_key(count, choice, settings)] = {
                    "examples_per_sound": count, "variant": choice, **facts[count], **q.figures()}
    results = {}
    for (count, choice), q in pooled.items():
        runs = [user[row_key(count, choice, settings)] for user in users.values()]
        results[row_key(count, choice, settings)] = {
            "examples_per_sound": count, "variant": choice,
            "fine_tune_seconds": float(np.mean([r["fine_tune_seconds"] for r in runs])), **q.figures()}
    report = {
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "quick": quick,
        "global_model": origin,
        "global_model_sha256": global_sha256,
        "global_model_setup_s": setup_s,
        "settings": to_dict(settings),
        "users": users,
        "results": results,
        "targets": TARGETS,
    }
    out_json = Path(out_json) if out_json is not None else workdir / "personalize.json"
    count = max(examples)
    runs = [load_probabilities(workdir / f"user-{user_seed}" / f"probabilities-{count}.npz")
            for user_seed in user_seeds]
    report["tradeoff"] = {"examples_per_sound": count, "sounds": tradeoff(runs)}
    plot = plot_tradeoff(report["tradeoff"]["sounds"], out_json.with_name(out_json.stem + "-tradeoff.png"),
                         f"fedsound bench personalize: {len(runs)} users, {count} examples per sound, "
                         f"{sum(r.aggressor_seconds for r in runs) / 3600:.1f} h of aggressors",
                         target=(TARGETS["false_triggers_per_hour"], TARGETS["recall"]))
    print(format_table(report))
    print(format_tradeoff(report["tradeoff"]["sounds"]))
    print(f"figure: {plot}")
    write_json(out_json, report)
    return report


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _interval(rates: Mapping[str, Any]) -> str:
    low, high = rates["interval_per_hour"]
    return f"; {low:.2g}-{high:.2g}"


def format_table(report: dict[str, Any]) -> str:
    """The benchmark's figures as text: pooled over the users, then each user's."""
    streams = [user["test_stream"] for user in report["users"].values()]
    lines = [f"global model: {report['global_model']}",
             f"{len(streams)} synthetic user(s); test streams {sum(s['seconds'] for s in streams) / 60:.1f} min in "
             f"all, {sum(s['events'] for s in streams)} mouth sounds, {sum(s['aggressor_clips'] for s in streams)} "
             f"aggressor clips; adapt {report['settings']['adapt']}, {report['settings']['steps']} steps",
             f"{'examples':>8} {'variant':>8} {'precision':>9} {'recall':>6} {'FT/hour':>8} {'(FT in h)':>11} "
             f"{'latency':>8} {'fine-tune':>9}"]
    ablated = {key: row for key, row in report["results"].items() if row["variant"] in ABLATIONS}
    for key, row in report["results"].items():
        if key in ablated:
            continue
        lines.append(f"{row['examples_per_sound']:>8} {row['variant']:>8} {row['precision']:>9.3f} "
                     f"{row['recall']:>6.3f} {row['false_triggers_per_hour']:>8.2f} {row['false_triggers']:>4} in "
                     f"{row['aggressor_hours']:.2f} {row['median_latency_ms']:>6.0f}ms "
                     f"{row['fine_tune_seconds']:>8.1f}s")
        latency = row["median_latency_ms_by_sound"]
        per_sound = ", ".join(f"{name} {v['precision']:.2f}/{v['recall']:.2f}/{latency[name]:.0f}"
                              for name, v in row["per_sound"].items())
        lines.append(f"{'':>8} per sound (precision/recall/latency ms): {per_sound}")
        by_source = ", ".join(f"{source} {v['false_triggers_per_hour']:.2f} ({v['false_triggers']} in "
                              f"{v['hours']:.2f} h{_interval(v)})" for source, v in row.get("by_source", {}).items())
        lines.append(f"{'':>8} false triggers per hour by source (95% interval): {by_source}")
        by_user = ", ".join(f"{seed} {user[key]['precision']:.2f}/{user[key]['recall']:.2f}/"
                            f"{user[key]['false_triggers']}" for seed, user in report["users"].items())
        lines.append(f"{'':>8} per user (precision/recall/false triggers): {by_user}")
        if row["false_triggers"]:
            under = "; ".join(f"{name} " + ", ".join(f"{kind} {n}" for kind, n in kinds.items())
                              for name, kinds in row["false_triggers_by_aggressor"].items())
            lines.append(f"{'':>8} false triggers by the aggressor under them: {under}")
        if row["examples_per_sound"] == 10:
            lines.append(f"{'':>8} targets: " + ", ".join(f"{what} {_mark(ok)}" for what, ok in target_checks(row)))
    if ablated:
        lines.append("ablations (each calibration rule off, the same fine-tuned models): precision/recall, false "
                     "triggers per hour by source, median latency; per-user recall range")
    for key, row in ablated.items():
        rates = ", ".join(f"{source} {v['false_triggers_per_hour']:.2f}" for source, v in row["by_source"].items())
        recalls = [user[key]["recall"] for user in report["users"].values()]
        lines.append(f"{row['examples_per_sound']:>8} {row['variant']:<18} {row['precision']:.3f}/{row['recall']:.3f}"
                     f"  {rates}  {row['median_latency_ms']:.0f} ms  recall {min(recalls):.2f}-{max(recalls):.2f}")
    return "\n".join(lines)


def target_checks(row: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """Each target of :data:`TARGETS` and :data:`LATENCY_TARGETS_MS` against one row of figures: false triggers
    on the real recordings when they were measured, else on all the aggressor audio."""
    real = {source: v for source, v in row.get("by_source", {}).items() if source in REAL_KINDS_BY_NAME}
    rates = {source: v["false_triggers_per_hour"] for source, v in real.items()} or {
        "aggressors": row["false_triggers_per_hour"]}
    limit = TARGETS["false_triggers_per_hour"]
    checks = [(f"precision >= {TARGETS['precision']}", row["precision"] >= TARGETS["precision"]),
              (f"recall >= {TARGETS['recall']}", row["recall"] >= TARGETS["recall"])]
    checks += [(f"{source} <= {limit}/h", rate <= limit) for source, rate in rates.items()]
    latency = row["median_latency_ms_by_sound"]
    checks += [(f"{name} latency <= {ms:.0f} ms", bool(latency.get(name, np.nan) <= ms))
               for name, ms in LATENCY_TARGETS_MS.items()]
    return checks

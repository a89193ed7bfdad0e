"""``fedsound bench global``: the global mouth-sound detector, trained by a federation of many voices.

What every personal detector starts from, and the bundle fedsound ships (``clients/detector/global_bundle``):

1. A corpus of :data:`data_prep.mouth_corpus.VOICES` synthetic voices (:mod:`data_prep.mouth_corpus`), each with
   takes of the five mouth sounds and clips of its background; with ``--real-audio DIR`` (``fedsound data
   real-audio DIR``) half of those background clips are real speech and music of the recordings' ``train``
   split, so no speaker of the tuning or test splits is heard. Voices are split whole between train, val and eval.
2. A feature store with Lea et al.'s frontend (``configs/features/lea16k.toml``).
3. ``fedsound simulate`` over the train voices partitioned by uploader, one client per voice (as FSD50K's
   uploaders), with :data:`FEDERATED`; with ``--central``, also a central run with the same model over as many
   passes of the data (:data:`CENTRAL_EPOCHS`), and the gap between the two on the eval voices.
4. ``export`` of the federated model with :data:`BUNDLE_BACKGROUND_PATCHES` background patches, the negatives of
   every personalization: with ``--real-audio``, a sixth of them from the train voices' background (the mouth
   sounds excluded) and five sixths real recordings, half speech and half music, of the recordings' ``train``
   split and the ``bank`` split's music (:func:`data_prep.mouth_corpus.real_background_patches`), since a user's
   own few minutes of background hold neither music nor other people's voices; without, all from the train
   voices. ``WORKDIR/global-bundle``;
   ``--ship`` copies it into the package and prints its manifest's SHA-256.

Each step is skipped when its output exists, and the federated run resumes where it stopped; a run directory
trained with other settings is refused, not reused.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_json
from clients.detector.bundle import SHIPPED_BUNDLE, ExtraBackground, export_bundle, load_bundle
from data_prep.mouth_corpus import (
    BACKGROUND,
    BACKGROUND_CLIPS,
    REAL_NEGATIVES,
    TAKES_PER_SOUND,
    VOICES,
    real_background_patches,
    synthesize_mouth_corpus,
)
from data_prep.mouth_sounds import SOUNDS
from data_prep.real_audio import RealAudio
from fedsound.simulate import simulate
from fl.config import CONFIG_DIR, LENGTH_KEYS, RUNTIME_KEYS, Config, load_config, to_dict
from fl.errors import ConfigError
from fl.rundir import RunDir
from fl.train import evaluate_model_file, train_central

BUNDLE_BACKGROUND_PATCHES = 320  # about 4 MB of float16 patches in the bundle
REAL_BACKGROUND_SHARE = 5 / 6  # of them real speech and music, with --real-audio
FEDERATED = {"partition.by": "uploader", "partition.min-clips": 1, "federated.rounds": 45,
             "federated.max-pooling-rounds": 30, "federated.fraction": 0.1, "federated.local-epochs": 2,
             "train.lr": 2e-3, "train.patience": 0}
CENTRAL_EPOCHS = 9  # rounds x fraction x local epochs: the passes over the data a federated client makes on average


def global_config(seed: int, quick: bool) -> Config:
    """The global model's settings: the lea16k frontend and :data:`FEDERATED` (a few rounds with ``quick``)."""
    overrides: dict[str, Any] = {"seed": seed, **FEDERATED, "train.epochs": CENTRAL_EPOCHS}
    if quick:
        overrides.update({"federated.rounds": 2, "federated.max-pooling-rounds": 1, "federated.fraction": 0.5,
                          "federated.local-epochs": 1, "train.epochs": 1, "model.channels": 16})
    return load_config(CONFIG_DIR / "features" / "lea16k.toml", overrides=overrides)


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"n_voices": 10, "takes_per_sound": 1, "background_clips": 4}
    return {"n_voices": VOICES, "takes_per_sound": TAKES_PER_SOUND, "background_clips": BACKGROUND_CLIPS}


def build_store(workdir: Path, config: Config, quick: bool, real_audio: Path | None, progress: bool) -> Path:
    """The corpus's feature store (made if missing; the corpus's WAV files are deleted once stored)."""
    from data_prep.prep import prep

    store = workdir / "store" / "store.h5"
    if store.is_file():
        return store
    corpus = workdir / "mouth-corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    synthesize_mouth_corpus(corpus, seed=config.seed, progress=progress, real_audio=real_audio, **_sizes(quick))
    prep(corpus, store, config.frontend, workers=2, progress=progress)
    shutil.rmtree(corpus)  # gigabytes of WAV; the feature store holds what training reads
    return store


def _check_reused(run: Path, config: Config, ignore: tuple[str, ...]) -> None:
    """Refuse to reuse a run directory trained with other settings (a workdir left from another recipe)."""
    changed = RunDir(run).config_changes(config, RUNTIME_KEYS + ignore)
    if changed:
        raise ConfigError(f"{run}: trained with other settings ({'; '.join(changed)}); delete it to rebuild")


def _real_background(real_audio: Path, config: Config, progress: bool) -> ExtraBackground:
    """The bundle's patches of real speech and music (:data:`REAL_BACKGROUND_SHARE` of its background)."""
    count = int(BUNDLE_BACKGROUND_PATCHES * REAL_BACKGROUND_SHARE)
    real = RealAudio(real_audio)
    patches = real_background_patches(real, config.frontend, count, config.seed, progress)
    provenance = {"real_audio_manifest_sha256": real.manifest_sha256,
                  "sources": [f"{split} {kind}" for split, kind in REAL_NEGATIVES], "seed": config.seed}
    return ExtraBackground(patches, BACKGROUND, provenance)


def _federated(store: Path, config: Config, run: Path, progress: bool) -> Path:
    """The federated run's model, running or resuming it unless it finished."""
    _check_reused(run, config, LENGTH_KEYS)
    records = RunDir(run).records() if run.is_dir() else []
    if not (records and records[-1]["round"] >= config.federated.rounds and (run / "model.pt").is_file()):
        simulate(store, config, run, resume=bool(records), progress=progress)
    return run / "model.pt"


def build_global_model(workdir: Path, quick: bool = False, out_json: Path | None = None, progress: bool = True,
                       seed: int = 0, real_audio: Path | None = None, central: bool = False,
                       ship: bool = False) -> dict[str, Any]:
    """Build the global bundle (module docstring) into ``workdir/global-bundle``; print and write the figures
    (``out_json`` or ``WORKDIR/global.json``); ``ship``: also copy the bundle into the package."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = global_config(seed, quick)
    started = time.perf_counter()
    store = build_store(workdir, config, quick, Path(real_audio) if real_audio else None, progress)
    model = _federated(store, config, workdir / "federated-run", progress)
    federated = evaluate_model_file(model, store, "eval", progress)
    figures: dict[str, Any] = {"federated_eval_mAP": federated["mAP"], "federated_eval_ap": federated["per_class_ap"]}
    if central:
        central_run = workdir / "central-run"
        if (central_run / "model.pt").is_file():
            _check_reused(central_run, config, ())
        else:
            shutil.rmtree(central_run, ignore_errors=True)
            train_central(store, config, central_run, progress=progress)
        central_figures = evaluate_model_file(central_run / "model.pt", store, "eval", progress)
        figures.update({"central_eval_mAP": central_figures["mAP"], "central_eval_ap": central_figures["per_class_ap"]})
        figures["gap"] = figures["central_eval_mAP"] - figures["federated_eval_mAP"]
    bundle = workdir / "global-bundle"
    extra = _real_background(Path(real_audio), config, progress) if real_audio else None
    export_bundle(model, bundle, config, store=store,
                  background_patches=BUNDLE_BACKGROUND_PATCHES - (len(extra.patches) if extra else 0),
                  exclude_labels=SOUNDS, portable=True, extra_background=extra)
    sha = load_bundle(bundle).manifest["manifest_sha256"]
    if ship:
        shutil.rmtree(SHIPPED_BUNDLE, ignore_errors=True)
        shutil.copytree(bundle, SHIPPED_BUNDLE)
    report = {"machine": machine_info(), "quick": quick, "seed": seed, "sizes": _sizes(quick),
              "real_audio": str(real_audio) if real_audio else None, "settings": to_dict(config),
              "seconds": time.perf_counter() - started, "bundle": str(bundle), "manifest_sha256": sha,
              "shipped": str(SHIPPED_BUNDLE.relative_to(SHIPPED_BUNDLE.parents[2])) if ship else None, **figures}
    print(format_report(report))
    write_json(Path(out_json) if out_json else workdir / "global.json", report)
    return report


def _ap(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_report(report: dict[str, Any]) -> str:
    """The figures as text."""
    lines = [f"global mouth-sound model: {report['sizes']['n_voices']} voices, background "
             + ("half real recordings" if report["real_audio"] else "synthetic only"),
             f"  federated eval mAP       {report['federated_eval_mAP']:.4f}"]
    if "central_eval_mAP" in report:
        lines.append(f"  central eval mAP         {report['central_eval_mAP']:.4f} (gap {report['gap']:+.4f})")
    central_ap = report.get("central_eval_ap", {})
    lines.append("  eval AP per class        " + ", ".join(
        f"{label} {_ap(ap)}" + (f"/{_ap(central_ap[label])}" if label in central_ap else "")
        for label, ap in report["federated_eval_ap"].items()) + (" (federated/central)" if central_ap else ""))
    lines.append(f"  bundle                   {report['bundle']} (manifest sha256 {report['manifest_sha256']})")
    if report["shipped"]:
        lines.append(f"  shipped                  {report['shipped']}")
    return "\n".join(lines)

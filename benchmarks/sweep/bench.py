"""Sweep benchmark: a small grid through ``fedsound sweep`` against the same trials run one after another with
``fedsound simulate``.

Both sides run the same configurations (configs/sweep/tiny.toml as the base, C in {0.3, 0.7} x E in {1, 2},
2 rounds; quick: C in {0.3, 0.7}, E = 1, 1 round) on a synthetic corpus kept in ``workdir`` and reused by later
runs. The sweep runs ``min(trials, CPUs // 2)`` trials at a time, each reserving 1 CPU for itself plus CPUs
for its client actors (see fedsound/sweep.py); every sequential run is a fresh ``fedsound simulate`` process whose
Ray takes all the CPUs. Wall times include every start-up (Ray, Tune, Flower, the trials' processes). Since
sampling and training are seeded per round and client and aggregation is in partition order, each trial's
final val mAP must be the same on both sides: the largest difference is reported as a check.

Run: ``fedsound bench sweep [--workdir DIR] [--quick] [--out bench.json]``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_json
from data_prep.prep import prep
from data_prep.synth import synthesize_corpus
from fedsound.sweep import expand_grid, run_sweep
from fl.config import CONFIG_DIR, FrontendConfig, apply_flat, load_config
from fl.errors import DataError
from fl.runtime import configure_environment

SEED = 0
BASE_CONFIG = CONFIG_DIR / "sweep" / "tiny.toml"


@dataclass(frozen=True)
class Sizes:
    """How big the benchmark is."""

    clips: int
    uploaders: int
    classes: int
    rounds: int
    fractions: tuple[float, ...]
    local_epochs: tuple[int, ...]


FULL = Sizes(clips=120, uploaders=12, classes=5, rounds=2, fractions=(0.3, 0.7), local_epochs=(1, 2))
QUICK = Sizes(clips=60, uploaders=10, classes=5, rounds=1, fractions=(0.3, 0.7), local_epochs=(1,))


def _store(workdir: Path, sizes: Sizes) -> Path:
    """The synthetic corpus and its feature store for these sizes, made once and reused."""
    tag = f"{sizes.clips}-{sizes.uploaders}-{sizes.classes}-{SEED}"
    corpus, store = workdir / f"corpus-{tag}", workdir / f"store-{tag}.h5"
    if not store.exists():
        if corpus.exists() and not (corpus / "FSD50K.ground_truth" / "dev.csv").exists():
            shutil.rmtree(corpus)  # an interrupted synthesis of ours
        if not corpus.exists():
            synthesize_corpus(corpus, n_clips=sizes.clips, n_uploaders=sizes.uploaders, n_classes=sizes.classes,
                              seed=SEED, progress=False)
        prep(corpus, store, FrontendConfig(), workers=0, progress=False)
    return store


def _fresh(path: Path) -> Path:
    """An empty output folder of this benchmark (the previous run's is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def run_sweep_bench(workdir: Path, quick: bool = False, out_json: Path | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Time the grid through :func:`fedsound.sweep.run_sweep` and as sequential ``fedsound simulate`` runs; print a
    table, write ``out_json`` when given and return the figures."""
    workdir = Path(workdir).resolve()
    configure_environment(workdir)
    sizes = QUICK if quick else FULL
    store = _store(workdir, sizes)
    cpus = os.cpu_count() or 1
    n_trials = len(sizes.fractions) * len(sizes.local_epochs)
    max_concurrent = max(1, min(n_trials, cpus // 2))
    config = apply_flat(load_config(BASE_CONFIG), {
        "seed": SEED, "federated.rounds": sizes.rounds, "sweep.max-concurrent": max_concurrent,
        "sweep.grid": {"federated.fraction": list(sizes.fractions), "federated.local-epochs": list(sizes.local_epochs)},
    }, "bench sweep")
    trials = expand_grid(config)

    started = time.perf_counter()
    run_sweep(store, config, _fresh(workdir / "sweep"), progress=progress)
    sweep_seconds = time.perf_counter() - started
    sweep_runs = workdir / "sweep" / "trials"
    trial_json = json.loads((sweep_runs / trials[0].name / "trial.json").read_text())

    sequential_dir = _fresh(workdir / "sequential")
    per_trial = []
    for trial in trials:
        fed = trial.config.federated
        command = [sys.executable, "-m", "fedsound.cli", "simulate", str(store), "--config", str(BASE_CONFIG),
                   "--seed", str(SEED), "--rounds", str(fed.rounds), "--fraction", str(fed.fraction),
                   "--local-epochs", str(fed.local_epochs), "--workdir", str(workdir),
                   "--out", str(sequential_dir / trial.name), "-q"]
        log = sequential_dir / f"{trial.name}.log"
        started = time.perf_counter()
        with open(log, "wb") as fh:
            code = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - started
        if code != 0:
            raise DataError(f"{log}: fedsound simulate exited with code {code}")
        final = [json.loads(line) for line in (sequential_dir / trial.name / "metrics.jsonl").read_text().splitlines()]
        swept = [json.loads(line) for line in (sweep_runs / trial.name / "metrics.jsonl").read_text().splitlines()]
        per_trial.append({"trial": trial.name, "params": trial.params, "sequential_seconds": round(seconds, 2),
                          "final_mAP_sequential": final[-1]["mAP"], "final_mAP_sweep": swept[-1]["mAP"]})
    sequential_seconds = sum(t["sequential_seconds"] for t in per_trial)

    figures = {
        "machine": machine_info(),
        "grid": {k: list(v) for k, v in config.sweep.grid.items()}, "trials": n_trials, "rounds": sizes.rounds,
        "corpus_clips": sizes.clips,
        "sweep": {"seconds": round(sweep_seconds, 2), "max_concurrent": max_concurrent,
                  "trial_cpus": 1 + trial_json["num_cpus"], "client_actors_per_trial": trial_json["num_cpus"]},
        "sequential": {"seconds": round(sequential_seconds, 2), "client_actors_per_run": cpus},
        "speedup": round(sequential_seconds / sweep_seconds, 3),
        "max_abs_final_mAP_difference": max(abs(t["final_mAP_sweep"] - t["final_mAP_sequential"])
                                            for t in per_trial),
        "per_trial": per_trial,
    }
    print(f"sweep bench: {n_trials} trials x {sizes.rounds} round(s) on {cpus} CPUs")
    print(f"  sweep ({max_concurrent} at a time, {figures['sweep']['trial_cpus']:g} CPUs per trial): "
          f"{sweep_seconds:7.1f} s")
    print(f"  sequential fedsound simulate:                  {sequential_seconds:7.1f} s  "
          f"(speed-up of the sweep {figures['speedup']:.2f}x)")
    print(f"  largest final val mAP difference between the two: {figures['max_abs_final_mAP_difference']:.2e}")
    if out_json:
        write_json(out_json, figures)
    return figures

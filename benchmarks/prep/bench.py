"""Feature-preparation benchmark: prep throughput, store size per audio hour, random patch reads.

Synthesises an FSD50K-format corpus (kept in ``workdir`` and reused by later runs), runs ``prep`` with two
worker processes, and measures:

- prep speed in audio seconds per wall second (x real time), wall time of the whole ``prep`` call
  (process-pool start, feature extraction, store assembly, manifests); beside it the same figure from CPU
  time (audio seconds / (CPU seconds of prep and its workers / workers)), what two idle cores would give if
  the work divided evenly: on a busy machine the wall figure only says how busy the machine was;
- store bytes per hour of audio (MB/h);
- random-batch reads: shuffled batches of 64 patches from the train split with :func:`fl.store.iter_batches`
  (what training does), on one torch thread, in patches per second, after one warm-up pass (the store is then
  in the page cache, as it is during training on a machine whose memory holds it).

Run: ``fedsound bench prep [--workdir DIR] [--quick] [--out bench.json]``.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine_info, write_json
from data_prep.prep import prep
from data_prep.synth import synthesize_corpus
from fl.config import FrontendConfig
from fl.store import FeatureStore, iter_batches

TARGETS = {"x_real_time": 1000.0, "mb_per_audio_hour": 80.0, "patches_per_s": 20_000.0}
WORKERS = 2
BATCH = 64
SIZES = {  # quick: a smoke run; full: enough audio that the pool's start-up is a small part of the wall time
    True: {"n_clips": 60, "n_uploaders": 12, "read_seconds": 0.5},
    False: {"n_clips": 1600, "n_uploaders": 120, "read_seconds": 3.0},
}


def _corpus(workdir: Path, n_clips: int, n_uploaders: int, seed: int, progress: bool) -> Path:
    """The synthetic corpus for these sizes, synthesised once and reused."""
    root = workdir / f"corpus-{n_clips}-{n_uploaders}-{seed}"
    if not (root / "FSD50K.ground_truth" / "dev.csv").exists():
        if root.exists():
            shutil.rmtree(root)
        synthesize_corpus(root, n_clips=n_clips, n_uploaders=n_uploaders, seed=seed, progress=progress)
    return root


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children (prep's worker pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _read_rate(store: FeatureStore, min_seconds: float, seed: int) -> tuple[float, int]:
    """Patches per second over shuffled epochs of 64-patch batches on one torch thread (as in a DataLoader
    worker or a Ray client actor); returns (rate, patches read)."""
    rng = np.random.default_rng(seed)
    index = store.patch_index("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in iter_batches(store, "train", index, BATCH, rng):  # warm-up: page cache, table cache
            pass
        read, started = 0, time.perf_counter()
        while time.perf_counter() - started < min_seconds:
            for x, _, _ in iter_batches(store, "train", index, BATCH, rng):
                read += len(x)
        return read / (time.perf_counter() - started), read
    finally:
        torch.set_num_threads(threads)


def run_prep_bench(workdir: Path, quick: bool = False, out_json: Path | None = None, seed: int = 0,
                   progress: bool = False) -> dict:
    """Synthesise a corpus, prep it with two workers, time random batch reads; print a table, return it."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = SIZES[quick]
    root = _corpus(workdir, sizes["n_clips"], sizes["n_uploaders"], seed, progress)

    store_path = workdir / "store" / "store.h5"
    if store_path.parent.exists():
        shutil.rmtree(store_path.parent)
    load_before = os.getloadavg()[0]
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    summary = prep(root, store_path, FrontendConfig(), workers=WORKERS, progress=False)
    prep_seconds = time.perf_counter() - started
    prep_cpu_seconds = _cpu_seconds() - cpu_before
    audio_seconds = summary.audio_hours * 3600
    store_bytes = store_path.stat().st_size

    store = FeatureStore(store_path)
    patches_per_s, patches_read = _read_rate(store, sizes["read_seconds"], seed)
    figures = {
        "x_real_time": audio_seconds / prep_seconds,
        "x_real_time_idle_estimate": audio_seconds / (prep_cpu_seconds / WORKERS),
        "mb_per_audio_hour": store_bytes / 1e6 / summary.audio_hours,
        "patches_per_s": patches_per_s,
    }
    result: dict[str, Any] = {
        "bench": "prep",
        "quick": quick,
        "workers": WORKERS,
        "clips": sum(summary.clips.values()),
        "audio_seconds": audio_seconds,
        "prep_seconds": prep_seconds,
        "prep_cpu_seconds": prep_cpu_seconds,
        "store_bytes": store_bytes,
        "train_patches": int(summary.patches["train"]),
        "patches_read": patches_read,
        "batch_size": BATCH,
        **figures,
        "targets": TARGETS,
        "met": {
            "x_real_time": figures["x_real_time"] >= TARGETS["x_real_time"],
            "mb_per_audio_hour": figures["mb_per_audio_hour"] <= TARGETS["mb_per_audio_hour"],
            "patches_per_s": figures["patches_per_s"] >= TARGETS["patches_per_s"],
        },
        "machine": {**machine_info(), "load_avg_1m_before": load_before},
    }
    print(format_table(result))
    if out_json is not None:
        write_json(out_json, result)
    return result


def format_table(result: dict) -> str:
    """The benchmark's figures beside their targets, one row each."""
    rows = [
        ("prep speed (x real time)", f"{result['x_real_time']:,.0f}", f">= {TARGETS['x_real_time']:,.0f}",
         result["met"]["x_real_time"]),
        ("  same, from CPU time (idle cores)", f"{result['x_real_time_idle_estimate']:,.0f}", "", None),
        ("store size (MB / audio hour)", f"{result['mb_per_audio_hour']:.1f}",
         f"<= {TARGETS['mb_per_audio_hour']:.0f}", result["met"]["mb_per_audio_hour"]),
        (f"random batch reads (patches/s, batch {result['batch_size']})", f"{result['patches_per_s']:,.0f}",
         f">= {TARGETS['patches_per_s']:,.0f}", result["met"]["patches_per_s"]),
    ]
    width = max(len(r[0]) for r in rows)
    machine = result["machine"]
    lines = [f"prep bench: {result['clips']} clips, {result['audio_seconds'] / 3600:.2f} h of audio, "
             f"{result['workers']} workers, prep {result['prep_seconds']:.1f} s "
             f"(load average {machine['load_avg_1m_before']:.1f} on {machine['cpus']} CPUs)",
             f"{'figure':{width}s}  {'measured':>10s}  {'target':>10s}  met"]
    lines += [f"{name:{width}s}  {value:>10s}  {target:>10s}  {'' if met is None else 'yes' if met else 'NO'}"
              for name, value, target, met in rows]
    return "\n".join(lines)

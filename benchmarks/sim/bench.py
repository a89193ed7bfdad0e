"""Federated simulation benchmark: framework overhead of a round, and memory at 1,000 supernodes.

Both parts run ``fedsound simulate`` (Flower's Simulation Engine on a local Ray) in this process, on a synthetic
corpus kept in ``workdir`` and reused by later runs, with iid partitions so that every client holds the same
number of patches.

1. Overhead. A federation of 50 clients (one supernode each); rounds of 10 and of 50 sampled clients. The
   number of local epochs is calibrated in this process (one thread, as a client) so that a client trains for
   about a second. Each client measures its own local training (``train_seconds`` in its reply); with ``slots``
   client actors running at once (CPUs / CPUs per client), a round whose only cost was local training would
   last ``sum(train_seconds) / slots``. The overhead is the rest, as a fraction of the round's wall time:
   ``1 - sum(train_seconds) / (slots * seconds)``. ``framework`` leaves out the server's own evaluation on
   the val split (``eval_seconds``), which is project work rather than Flower and Ray; ``round`` keeps it.
   Round 1 (actors importing torch, opening the store) is reported apart; the figures are over later rounds.
2. Scale. 1,000 supernodes (1,000 iid clients), 20 sampled per round, 2 rounds. Peak memory is the sum of the
   resident set sizes (and of the proportional set sizes, which count shared pages once) of this process and
   all its descendants (Ray's GCS, raylet, agents, client actors), sampled every 0.25 s from ``/proc``.

Run: ``fedsound bench sim [--workdir DIR] [--quick] [--out bench.json]``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info, write_json
from data_prep.prep import prep
from data_prep.synth import synthesize_corpus
from fl.config import Config, FrontendConfig, load_config
from fl.rundir import RunDir
from fl.runtime import configure_environment
from fl.store import FeatureStore
from fl.train import new_model, train_epochs

OVERHEAD_TARGET = 0.15
MEMORY_TARGET_GB = 6.0
SAMPLE_INTERVAL_S = 0.25
SEED = 0


@dataclass(frozen=True)
class Sizes:
    """How big each part of the benchmark is."""

    clips: int  # synthetic corpus (the train split gets about 72% of the clips)
    uploaders: int
    classes: int
    federation: int  # clients (= supernodes) of the overhead part
    per_round: tuple[int, ...]  # clients sampled per round in the overhead part
    rounds: int
    client_seconds: float  # local training time per client the epochs are calibrated for
    supernodes: int  # scale part
    sampled: int
    scale_rounds: int


FULL = Sizes(clips=1500, uploaders=150, classes=10, federation=50, per_round=(10, 50), rounds=3,
             client_seconds=1.0, supernodes=1000, sampled=20, scale_rounds=2)
QUICK = Sizes(clips=200, uploaders=20, classes=5, federation=10, per_round=(4, 10), rounds=2,
              client_seconds=0.25, supernodes=100, sampled=10, scale_rounds=1)


def bench_store(workdir: Path, sizes: Sizes, progress: bool = False) -> Path:
    """The synthetic corpus and its feature store for these sizes, made once and reused."""
    tag = f"{sizes.clips}-{sizes.uploaders}-{sizes.classes}-{SEED}"
    corpus, store = workdir / f"corpus-{tag}", workdir / f"store-{tag}.h5"
    if not store.exists():
        if not (corpus / "FSD50K.ground_truth" / "dev.csv").exists():
            if corpus.exists():
                shutil.rmtree(corpus)
            synthesize_corpus(corpus, n_clips=sizes.clips, n_uploaders=sizes.uploaders, n_classes=sizes.classes,
                              seed=SEED, progress=progress)
        prep(corpus, store, FrontendConfig(), workers=min(2, os.cpu_count() or 1), progress=progress)
    return store


def calibrate_epochs(store_path: Path, config: Config, patches_per_client: int, target_seconds: float) -> tuple[
        int, float]:
    """Local epochs that make one client train for about ``target_seconds`` on one thread, and the seconds of
    one epoch (the faster of two, after a warm-up epoch)."""
    store = FeatureStore(store_path)
    patches = store.patch_index("train")[:patches_per_client]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = new_model(config, store)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            train_epochs(model, store, "train", patches, config.train, 1, [SEED], torch.device("cpu"))
            times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    epoch_seconds = min(times[1:])
    return max(1, round(target_seconds / epoch_seconds)), epoch_seconds


def _process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent ids in ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def _kib(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class TreeMemory:
    """Samples the summed RSS and PSS of this process and its descendants in a background thread."""

    def __init__(self, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.interval = interval
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.peak_processes = 0
        self.peak_by_name: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """Take one sample and keep it when it is the highest so far."""
        rss, pss, processes, by_name = 0, 0, 0, Counter()
        for pid in _process_tree(os.getpid()):
            proc = Path("/proc", str(pid))
            try:
                name = (proc / "comm").read_text().strip()
                resident = _kib(proc / "status", "VmRSS:")
                proportional = _kib(proc / "smaps_rollup", "Pss:")
            except OSError:  # ended, or not readable
                continue
            rss, pss, processes = rss + resident, pss + proportional, processes + 1
            by_name[name] += resident
        if rss > self.peak_rss_kib:
            self.peak_rss_kib, self.peak_by_name, self.peak_processes = rss, dict(by_name), processes
        self.peak_pss_kib = max(self.peak_pss_kib, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _simulate(store: Path, config: Config, out: Path) -> list[dict]:
    """A fresh federated run in ``out`` (the benchmark's own folder); returns its round records."""
    from fedsound.simulate import simulate

    if out.exists():
        shutil.rmtree(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        simulate(store, config, out, progress=False)
    return RunDir(out).records()


def _overhead(records: list[dict], slots: int) -> dict[str, float]:
    train = sum(r["train_seconds"] for r in records)
    wall = sum(r["seconds"] for r in records)
    evaluation = sum(r["eval_seconds"] for r in records)
    clients = sum(len(r["clients_sampled"]) for r in records)
    return {
        "round_seconds": wall / len(records),
        "eval_seconds": evaluation / len(records),
        "client_train_seconds": train / clients,
        "framework_overhead": 1.0 - train / (slots * (wall - evaluation)),
        "round_overhead": 1.0 - train / (slots * wall),
        "overhead_seconds_per_client": (slots * (wall - evaluation) - train) / clients,
    }


def sim_config(clients: int, per_round: int, rounds: int, local_epochs: int = 1) -> Config:
    """FedAvg over ``clients`` iid clients (one supernode each), ``per_round`` of them sampled per round."""
    return load_config(overrides={
        "seed": SEED, "train.device": "cpu", "partition.by": "iid", "partition.clients": clients,
        "federated.strategy": "fedavg", "federated.rounds": rounds, "federated.client-cpus": 1.0,
        "federated.local-epochs": local_epochs, "federated.fraction": per_round / clients,
        "federated.min-clients": per_round,
    })


def run_overhead(store: Path, workdir: Path, sizes: Sizes) -> dict[str, Any]:
    """Part 1: rounds of ``sizes.per_round`` clients out of a federation of ``sizes.federation``."""
    patches_per_client = len(FeatureStore(store).patch_index("train")) // sizes.federation
    epochs, epoch_seconds = calibrate_epochs(store, sim_config(sizes.federation, 1, 1), patches_per_client,
                                             sizes.client_seconds)
    rows = []
    for per_round in sizes.per_round:
        config = sim_config(sizes.federation, per_round, sizes.rounds, epochs)
        print(f"overhead: {per_round} clients per round, {sizes.rounds} rounds ...", flush=True)
        started = time.perf_counter()
        records = _simulate(store, config, workdir / f"overhead-{per_round}")
        slots = min(per_round, int((os.cpu_count() or 1) // config.federated.client_cpus))
        later = records[1:] or records
        rows.append({"clients_per_round": per_round, "slots": slots, "rounds_measured": len(later),
                     **_overhead(later, slots), "first_round": _overhead(records[:1], slots),
                     "simulate_seconds": time.perf_counter() - started})
    return {"federation": sizes.federation, "patches_per_client": patches_per_client, "local_epochs": epochs,
            "calibrated_epoch_seconds": epoch_seconds, "target": OVERHEAD_TARGET, "rows": rows}


def run_scale(store: Path, workdir: Path, sizes: Sizes) -> dict[str, Any]:
    """Part 2: peak memory of all processes while simulating ``sizes.supernodes`` supernodes."""
    config = sim_config(sizes.supernodes, sizes.sampled, sizes.scale_rounds)
    print(f"scale: {sizes.supernodes} supernodes, {sizes.sampled} sampled per round ...", flush=True)
    started = time.perf_counter()
    with TreeMemory() as memory:
        records = _simulate(store, config, workdir / "scale")
    wall = time.perf_counter() - started
    top = sorted(memory.peak_by_name.items(), key=lambda item: -item[1])
    return {
        "supernodes": sizes.supernodes, "sampled_per_round": sizes.sampled, "rounds": len(records),
        "peak_rss_gb": memory.peak_rss_kib / 2**20, "peak_pss_gb": memory.peak_pss_kib / 2**20,
        "processes_at_peak": memory.peak_processes,
        "rss_gb_at_peak_by_process": {name: kib / 2**20 for name, kib in top},
        "simulate_seconds": wall, "round_seconds": [r["seconds"] for r in records],
        "setup_seconds": wall - sum(r["seconds"] for r in records),
        "target_gb": MEMORY_TARGET_GB,
    }


def run_sim_bench(workdir: Path, quick: bool = False, out_json: Path | None = None, progress: bool = False
                  ) -> dict[str, Any]:
    """Run both parts (module docstring); print a table, write JSON to ``out_json`` when given."""
    sizes = QUICK if quick else FULL
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    configure_environment(workdir)
    store = bench_store(workdir, sizes, progress)
    report = {
        "machine": machine_info(),  # its load average: other work on the machine skews every figure
        "sizes": asdict(sizes), "store": str(store),
        "scale": run_scale(store, workdir, sizes),  # first, while this process holds no earlier simulation
        "overhead": run_overhead(store, workdir, sizes),
    }
    print(format_table(report))
    if out_json is not None:
        write_json(out_json, report)
    return report


def format_table(report: dict[str, Any]) -> str:
    """A small text table of :func:`run_sim_bench`'s results."""
    over, scale = report["overhead"], report["scale"]
    lines = [
        f"federation of {over['federation']} clients, {over['patches_per_client']} patches each, "
        f"{over['local_epochs']} local epoch(s); {report['machine']['cpus']} CPUs, load average "
        f"{report['machine']['load_avg_1m']:.1f} at start",
        f"{'clients/round':>13} {'slots':>5} {'round s':>8} {'train s/client':>14} {'eval s':>7} "
        f"{'framework':>9} {'round':>7} {'target':>7}",
    ]
    for row in over["rows"]:
        lines.append(f"{row['clients_per_round']:>13} {row['slots']:>5} {row['round_seconds']:>8.2f} "
                     f"{row['client_train_seconds']:>14.2f} {row['eval_seconds']:>7.2f} "
                     f"{row['framework_overhead']:>9.1%} {row['round_overhead']:>7.1%} {over['target']:>7.0%}")
    lines += [
        "",
        f"{scale['supernodes']} supernodes, {scale['sampled_per_round']} sampled per round: peak RSS sum "
        f"{scale['peak_rss_gb']:.2f} GB (PSS {scale['peak_pss_gb']:.2f} GB, {scale['processes_at_peak']} "
        f"processes), target < {scale['target_gb']:.0f} GB; {scale['simulate_seconds']:.0f} s "
        f"({scale['setup_seconds']:.0f} s outside rounds)",
        "  at peak: " + ", ".join(f"{name} {gb:.2f}" for name, gb in
                                  list(scale["rss_gb_at_peak_by_process"].items())[:6]),
    ]
    return "\n".join(lines)

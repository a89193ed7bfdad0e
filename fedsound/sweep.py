"""``fedsound sweep``: a Ray Tune grid over federated parameters, each trial a real Flower simulation.

Design: one child process per trial, with its own Ray.
    Flower's Ray backend reuses whatever Ray connection its process has and calls ``ray.shutdown()`` when the
    simulation ends. Inside a Tune trial that connection is the trial's, so Flower would place its client
    actors in the sweep's cluster outside the trial's reservation and then cut the trial off from Ray. The
    alternative, a placement group with one bundle per client actor, needs Flower's pool sizing and its
    final shutdown patched. Here the Tune function of a trial instead starts ``python -m fedsound.sweep SPEC``, which
    runs :func:`fedsound.simulate.simulate` on a private local Ray; the trial tails the run directory's
    ``metrics.jsonl`` and calls ``tune.report`` once per round with a Tune checkpoint of the run directory.
    Flower's start-up and shutdown happen in the child and never touch the trial or the sweep.

Resources are reserved honestly.
    A trial reserves, in one bundle (one node), 1 CPU for itself and the child's ServerApp plus
    ``actors * federated.client-cpus`` CPUs (and ``actors * client-gpus`` GPUs) for the client actors. The
    child's Ray gets exactly ``actors * client-cpus`` CPUs, so Flower's pool has ``actors`` actors, and Ray
    confines the child to the trial's GPUs (``CUDA_VISIBLE_DEVICES``). ``actors`` is what one trial's share
    of the cluster (total CPUs / ``sweep.max-concurrent``, at most one node) holds, at least 1, and never
    more than the clients the trial samples per round. The server's evaluation and the clients' training
    alternate, so the child's own torch threads may use all the trial's CPUs. A second Ray instance on the
    node sees the whole machine, but it only ever schedules what the trial reserved. The price is memory:
    one extra Ray head (object store capped at 512 MiB) per running trial.

Resume.
    Each trial's run directory (``OUT/trials/<trial>``) is a normal resumable simulation run, and every Tune
    checkpoint is a copy of its resumable files. A restarted trial restores the run directory from its Tune
    checkpoint when that is newer (another node), continues the simulation with ``resume`` and reports only
    rounds Tune has not seen. ``--resume`` restores the Tune experiment: finished trials are kept as they
    are, unfinished and errored ones continue from their last checkpoint.

Clusters.
    ``federated.ray-address`` joins an existing Ray cluster; the sweep directory and the feature store must
    then be on storage that every node sees under the same path, and fedsound installed on every node.

Outputs in the sweep directory: ``results.csv`` (one row per trial), ``best.json``, ``heatmap.png`` (final
val metric over the first two grid keys), ``curves.png`` (learning curves of all trials), ``sweep.json`` (the
resolved configuration), ``trials/`` (run directories) and ``tune/`` (Tune's experiment state).
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedsound.cluster import check_ray_address
from fl import jsonfile as strict_json
from fl.config import RUNTIME_KEYS, Config, apply, apply_flat, config_differences, recorded_config, to_dict
from fl.errors import ConfigError, DataError, FedsoundError
from fl.locks import exclusive

log = logging.getLogger("fedsound.sweep")

MAXIMISED = ("mAP", "dprime", "lwlrap", "micro_pr_auc")
MINIMISED = ("train_loss",)
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "config.json", "settings.json", "partition.json")
REPORTED_NAME = "reported.json"  # in a Tune checkpoint: the last round reported to Tune
ATTEMPTS_NAME = "attempts.jsonl"  # in a run directory: one line per start of the trial's simulation (and its node)
CHILD_LOG = "child.log"
CHILD_OBJECT_STORE_BYTES = 512 * 1024**2
POLL_S = 0.5
LOCK_WAIT_S = 120.0
CHILD_ENV_DROP = ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_RAYLET_PID", "RAY_CLIENT_MODE", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class SweepTrial:
    """One point of the grid: its position, a readable name, the grid values and the resolved config."""

    index: int
    name: str
    params: dict[str, Any]
    config: Config


def _flatten_grid(grid: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"federated": {"fraction": [..]}}`` and ``{"federated.fraction": [..]}`` -> dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in grid.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten_grid(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _param_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _trial_name(index: int, params: dict[str, Any]) -> str:
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in params.items()]
    return re.sub(r"[^A-Za-z0-9.=+_-]", "-", f"t{index:02d}_" + "_".join(parts))


def metric_mode(metric: str) -> str:
    """``max`` for the clip-level validation metrics, ``min`` for the training loss."""
    if metric in MAXIMISED:
        return "max"
    if metric in MINIMISED:
        return "min"
    raise ConfigError(f"sweep.metric: {metric!r} is not reported per round "
                      f"(choose one of {', '.join(MAXIMISED + MINIMISED)})")


def expand_grid(config: Config) -> list[SweepTrial]:
    """Check ``config.sweep.grid`` and list its trials in grid order (first key slowest).

    Every key must be a simulate parameter (``section.key``) and every value a valid setting: all
    combinations are applied to ``config`` up front, so a bad grid is a one-line ConfigError before Ray starts.
    """
    grid = _flatten_grid(dict(config.sweep.grid))
    if not grid:
        raise ConfigError("sweep.grid: no parameters to sweep (e.g. \"federated.fraction\" = [0.1, 0.3]; "
                          "see configs/sweep/fsd_fed_grid.toml)")
    metric_mode(config.sweep.metric)
    for key, values in grid.items():
        where = f"sweep.grid.{key}"
        if key.startswith("sweep.") or key == "federated.ray-address":
            raise ConfigError(f"{where}: not a simulate parameter (cannot be swept)")
        if not isinstance(values, list):
            raise ConfigError(f"{where}: expected a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"{where}: empty list of values")
        if len({json.dumps(v) for v in values}) < len(values):
            raise ConfigError(f"{where}: repeated value in {values!r}")
        for value in values:
            apply_flat(config, {key: value}, where)
    trials = []
    for index, combo in enumerate(itertools.product(*grid.values())):
        params = dict(zip(grid, combo, strict=True))
        trial_config = apply_flat(config, params, f"sweep.grid {_param_key(params)}")
        trials.append(SweepTrial(index, _trial_name(index, params), params, trial_config))
    return trials


# --- resources ------------------------------------------------------------------------------------------------


def _clients_per_round(store: Path, config: Config, cache: dict[tuple, int]) -> int:
    """How many clients a trial samples per round (its partition is built here, exactly as simulate does)."""
    from fl.partition import make_partition
    from fl.store import FeatureStore

    p = config.partition
    key = (p.by, p.min_clips, p.clients, p.alpha, config.seed)
    if key not in cache:
        table = FeatureStore(store).table("train")
        plan = make_partition(table.clips, table.labels, by=p.by, min_clips=p.min_clips, n_clients=p.clients,
                              alpha=p.alpha, seed=config.seed)
        cache[key] = plan.n_clients
    n = cache[key]
    fed = config.federated
    return min(n, max(fed.min_clients, round(fed.fraction * n)))


def _cluster_capacity() -> tuple[float, float, float, float]:
    """(total CPUs, total GPUs, CPUs of the largest node, GPUs of the largest node) of the connected Ray."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = [float(r.get("CPU", 0)) for r in nodes] or [0.0]
    gpus = [float(r.get("GPU", 0)) for r in nodes] or [0.0]
    return sum(cpus), sum(gpus), max(cpus), max(gpus)


def trial_resources(config: Config, sampled: int, capacity: tuple[float, float, float, float],
                    max_concurrent: int) -> dict[str, float]:
    """The trial's reservation: ``actors`` client actors plus 1 CPU for the trial and the child's server."""
    fed = config.federated
    total_cpus, total_gpus, node_cpus, node_gpus = capacity
    share_cpus = min(total_cpus / max_concurrent, node_cpus)
    actors = math.floor((share_cpus - 1) / fed.client_cpus + 1e-9)
    if fed.client_gpus > 0:
        share_gpus = min(total_gpus / max_concurrent, node_gpus)
        actors = min(actors, math.floor(share_gpus / fed.client_gpus + 1e-9))
    actors = max(1, min(actors, sampled))
    return {"actors": actors, "CPU": 1 + actors * fed.client_cpus, "GPU": actors * fed.client_gpus}


# --- inside a trial -----------------------------------------------------------------------------------------


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Complete lines of a metrics.jsonl that may be being appended to."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")[:-1]  # a last line without its newline is still being written
    return [json.loads(line) for line in lines if line.strip()]


def _checkpoint_round(path: Path) -> int:
    """Round of a simulation checkpoint, 0 when there is none."""
    import torch

    if not path.exists():
        return 0
    return int(torch.load(path, weights_only=True, map_location="cpu")["round"])


def _tune_metrics(record: dict[str, Any], best: float) -> dict[str, Any]:
    def number(value: Any) -> float:
        return float("nan") if value is None else float(value)

    metrics = {"round": int(record["round"]), **{k: number(record.get(k)) for k in MAXIMISED + MINIMISED}}
    metrics.update(clients=len(record.get("clients_sampled", [])),
                   clients_rejected=len(record.get("clients_rejected", [])),
                   clients_failed=int(record.get("clients_failed", 0)), round_seconds=number(record.get("seconds")),
                   best=best)
    return metrics


def _restore_from_tune(run: Path) -> int:
    """Bring the run directory up to the trial's last Tune checkpoint; return the last round Tune saw."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        reported = json.loads((folder / REPORTED_NAME).read_text())
        if _checkpoint_round(run / "checkpoint.pt") < reported["checkpoint_round"]:
            run.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                if (folder / name).exists():
                    shutil.copy2(folder / name, run / name)
    return int(reported["round"])


def _report_new(run: Path, reported: int, best: float, metric: str, mode: str) -> tuple[int, float, int]:
    """``tune.report`` the rounds after ``reported`` that the run has checkpointed, the last one with a Tune
    checkpoint holding the run directory's resumable files. Returns (last reported round, best, count)."""
    from ray import tune

    pending = any(r["round"] > reported for r in _read_records(run / "metrics.jsonl"))
    if not pending or not (run / "checkpoint.pt").exists():
        return reported, best, 0
    with tempfile.TemporaryDirectory(prefix="ckpt-", dir=run) as tmp:
        folder = Path(tmp)
        shutil.copy2(run / "checkpoint.pt", folder / "checkpoint.pt")  # replaced atomically by the child
        saved = _checkpoint_round(folder / "checkpoint.pt")
        for name in RUN_FILES[1:]:  # copied after the checkpoint: they hold at least its rounds
            if (run / name).exists():
                shutil.copy2(run / name, folder / name)
        new = [r for r in _read_records(folder / "metrics.jsonl") if reported < r["round"] <= saved]
        if new:
            (folder / REPORTED_NAME).write_text(json.dumps({"round": new[-1]["round"], "checkpoint_round": saved}))
        for i, record in enumerate(new):
            value = record.get(metric)
            if value is not None and (math.isnan(best) or (value > best if mode == "max" else value < best)):
                best = float(value)
            last = i == len(new) - 1
            tune.report(_tune_metrics(record, best),
                        checkpoint=tune.Checkpoint.from_directory(folder) if last else None)
    return (new[-1]["round"] if new else reported), best, len(new)


def _child_env() -> dict[str, str]:
    """The trial's environment without what would tie the child's Ray to the sweep's cluster."""
    return {k: v for k, v in os.environ.items() if k not in CHILD_ENV_DROP}


def _start_child(name: str, run: Path, config: Config, setup: dict[str, Any], saved: int) -> subprocess.Popen:
    """Start ``python -m fedsound.sweep run/trial.json``; its output goes to ``run/child.log``."""
    run.mkdir(parents=True, exist_ok=True)
    resources = setup["resources"][name]
    local = apply_flat(config, {"federated.ray-address": ""}, name)  # the child's Ray is its own
    spec = {"store": setup["store"], "config": to_dict(local), "out": str(run),
            "num_cpus": resources["actors"] * config.federated.client_cpus,
            "num_gpus": resources["actors"] * config.federated.client_gpus,
            "threads": max(1, math.floor(resources["CPU"])), "parent": os.getpid()}
    (run / "trial.json").write_text(json.dumps(spec, indent=2) + "\n")
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    with open(run / ATTEMPTS_NAME, "a") as fh:
        fh.write(json.dumps({"started": time.time(), "from_round": saved, "pid": os.getpid(), "node": node}) + "\n")
    with open(run / CHILD_LOG, "ab") as child_log:
        return subprocess.Popen([sys.executable, "-m", "fedsound.sweep", str(run / "trial.json")], stdout=child_log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_child_env(),
                                cwd=setup["cwd"] if Path(setup["cwd"]).is_dir() else None)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(empty log)"


class TrialError(RuntimeError):
    """A trial's simulation failed; the message names the trial, the last log line and the log file."""


def _trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """Tune function of one trial: run its simulation in a child process and report every round."""
    from ray import tune

    name = setup["names"][_param_key(params)]
    run = Path(setup["runs"]) / name
    config = apply_flat(apply(Config(), setup["config"], "sweep.json"), params, name)
    rounds, metric = config.federated.rounds, config.sweep.metric
    mode = metric_mode(metric)
    reported = _restore_from_tune(run)
    saved = _checkpoint_round(run / "checkpoint.pt")
    values = [r[metric] for r in _read_records(run / "metrics.jsonl")
              if r["round"] <= reported and r.get(metric) is not None]
    best = (max if mode == "max" else min)(values, default=float("nan"))
    process = None
    if saved < rounds or not (run / "model.pt").exists():
        process = _start_child(name, run, config, setup, saved)
    sent = 0
    try:
        while True:
            finished = process is None or process.poll() is not None
            reported, best, count = _report_new(run, reported, best, metric, mode)
            sent += count
            if finished:
                break
            time.sleep(POLL_S)
    finally:
        if process is not None:
            _stop(process)
    if process is not None and process.returncode != 0:
        raise TrialError(f"{name}: simulation exited with code {process.returncode}: "
                         f"{_tail_line(run / CHILD_LOG)} (log: {run / CHILD_LOG})")
    records = _read_records(run / "metrics.jsonl")
    if reported < rounds or not records:
        raise TrialError(f"{name}: simulation stopped after round {reported} of {rounds} (log: {run / CHILD_LOG})")
    if not sent:  # restored after its last round had been reported: Tune still needs a result
        tune.report(_tune_metrics(records[-1], best))


def _die_with_parent(parent: int) -> None:
    """Linux: get SIGTERM when the trial that started this process dies (its Ray worker may be killed)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        sys.exit(f"trial process {parent} is gone")


def _lock_run(run: Path) -> Any:
    """Hold ``run/trial.lock`` while this process writes the run (a killed attempt's child may linger)."""
    handle = open(run / "trial.lock", "w")  # held until this process exits
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise DataError(f"{run}: another simulation has been writing this run for over "
                                f"{LOCK_WAIT_S:.0f} s") from None
            time.sleep(POLL_S)


def _child_main(spec_path: Path) -> int:
    """``python -m fedsound.sweep SPEC``: one trial's simulation on a private local Ray sized to the reservation."""
    spec = json.loads(spec_path.read_text())
    _die_with_parent(int(spec["parent"]))
    run = Path(spec["out"])
    try:
        lock = _lock_run(run)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    resume = (run / "checkpoint.pt").exists()
    if not resume and (run / "metrics.jsonl").exists():
        (run / "metrics.jsonl").unlink()  # rounds of an attempt that died before its first checkpoint
    from fl.runtime import configure_logging

    configure_logging(0)
    import ray
    import torch

    from fedsound.simulate import simulate

    torch.set_num_threads(int(spec["threads"]))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # client actors import fedsound
    config = apply(Config(), spec["config"], str(spec_path))
    ray.init(address="local", num_cpus=spec["num_cpus"], num_gpus=spec["num_gpus"], include_dashboard=False,
             object_store_memory=CHILD_OBJECT_STORE_BYTES)
    try:
        result = simulate(Path(spec["store"]), config, run, resume=resume, progress=False)
    except FedsoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
        lock.close()
    log.info("trial finished: round %d, val mAP %.4f", result["rounds"], result["mAP"])
    return 0


# --- the sweep --------------------------------------------------------------------------------------------


def _check_resume(out: Path, store: Path, config: Config) -> None:
    state = json.loads((out / "sweep.json").read_text())
    if state["store"] != str(store):
        raise ConfigError(f"{out}: the sweep being resumed used the store {state['store']}, not {store}")
    changed = config_differences(recorded_config(state["config"], str(out / "sweep.json")), to_dict(config),
                                 RUNTIME_KEYS)
    if changed:
        raise ConfigError(f"{out}: the sweep being resumed had another config ({'; '.join(changed)}); "
                          "resume it with the same config")


class _RoundProgress:
    """A tqdm bar over all rounds of all trials, fed by polling the trials' run directories."""

    def __init__(self, trials: list[SweepTrial], runs: Path, enabled: bool) -> None:
        from tqdm import tqdm

        self.trials, self.runs = trials, runs
        self.bar = tqdm(total=sum(t.config.federated.rounds for t in trials), desc="sweep", unit="round",
                        disable=not enabled)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stopped.wait(1.0):
            self.refresh()

    def refresh(self) -> None:
        """Set the bar to the rounds written so far."""
        done = sum(len(_read_records(self.runs / t.name / "metrics.jsonl")) for t in self.trials)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> _RoundProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
        self.refresh()
        self.bar.close()


def _scheduler(config: Config, trials: list[SweepTrial]) -> Any:
    if config.sweep.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = max(t.config.federated.rounds for t in trials)
    return ASHAScheduler(time_attr="round", max_t=max_t, grace_period=max(1, max_t // 4), reduction_factor=3)


def _run_tune(store: Path, config: Config, out: Path, trials: list[SweepTrial], resume: bool,
              progress: bool) -> Any:
    """Start or restore the Tune experiment and wait for it; returns Tune's ResultGrid."""
    from ray import tune

    capacity = _cluster_capacity()
    cache: dict[tuple, int] = {}
    resources = {t.name: trial_resources(t.config, _clients_per_round(store, t.config, cache), capacity,
                                         config.sweep.max_concurrent) for t in trials}
    too_big = [n for n, r in resources.items() if r["CPU"] > capacity[2] or r["GPU"] > capacity[3]]
    if too_big:
        raise ConfigError(f"federated.client-cpus/client-gpus: trial {too_big[0]} needs "
                          f"{resources[too_big[0]]['CPU']:g} CPUs and {resources[too_big[0]]['GPU']:g} GPUs, "
                          f"more than any Ray node has ({capacity[2]:g} CPUs, {capacity[3]:g} GPUs)")
    names = {_param_key(t.params): t.name for t in trials}
    setup = {"store": str(store), "config": to_dict(config), "runs": str(out / "trials"), "names": names,
             "resources": resources, "cwd": os.getcwd()}  # the child starts where the sweep was started

    def bundle(params: dict[str, Any]) -> Any:
        need = resources[names[_param_key(params)]]
        return tune.PlacementGroupFactory([{"CPU": need["CPU"], "GPU": need["GPU"]}])

    trainable = tune.with_resources(tune.with_parameters(_trial, setup=setup), bundle)
    first = next(iter(resources.values()))
    log.info("%d trials; each reserves %g CPUs (%d client actors), at most %d at a time", len(trials),
             first["CPU"], first["actors"], config.sweep.max_concurrent)
    experiment = out / "tune"
    if resume and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
    else:
        grid = _flatten_grid(dict(config.sweep.grid))
        mode = metric_mode(config.sweep.metric)
        tuner = tune.Tuner(
            trainable,
            param_space={key: tune.grid_search(values) for key, values in grid.items()},
            tune_config=tune.TuneConfig(
                metric=config.sweep.metric, mode=mode, max_concurrent_trials=config.sweep.max_concurrent,
                scheduler=_scheduler(config, trials), reuse_actors=False,
                trial_name_creator=lambda trial: names[_param_key(trial.config)],
                trial_dirname_creator=lambda trial: names[_param_key(trial.config)]),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(out), verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=0)))
    with _RoundProgress(trials, out / "trials", progress):
        return tuner.fit()


def _trial_summary(trial: SweepTrial, run: Path, metric: str, mode: str, tune_result: Any,
                   interrupted: bool) -> dict[str, Any]:
    records = _read_records(run / "metrics.jsonl")
    rounds = trial.config.federated.rounds
    row: dict[str, Any] = {"trial": trial.name, **trial.params}
    done = len(records)
    error = tune_result.error if tune_result is not None else None
    row["status"] = ("error" if error is not None else "done" if done >= rounds
                     else "unfinished" if interrupted or tune_result is None else "stopped")
    row["rounds"] = done
    for key in MAXIMISED + MINIMISED:
        values = [r[key] for r in records if r.get(key) is not None]
        pick = min if key in MINIMISED else max
        row[f"best_{key}"] = pick(values) if values else float("nan")
        row[f"final_{key}"] = records[-1][key] if records and records[-1].get(key) is not None else float("nan")
    values = [(r[metric], r["round"]) for r in records if r.get(metric) is not None]
    row[f"best_{metric}_round"] = ((max if mode == "max" else min)(values)[1] if values else 0)
    row["round_seconds"] = sum(float(r.get("seconds") or 0.0) for r in records)
    metrics = (tune_result.metrics if tune_result is not None else None) or {}
    row["seconds"] = float(metrics.get("time_total_s", float("nan")))
    row["error"] = str(error).strip().splitlines()[-1][:300] if error is not None else ""
    row["run"] = str(run)
    return row


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_heatmap(results: pd.DataFrame, keys: list[str], metric: str, out_png: Path) -> None:
    """Final val ``metric`` over the first two grid keys (best over any further keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row_key = keys[0]
    col_key = keys[1] if len(keys) > 1 else None
    rows = list(dict.fromkeys(results[row_key]))
    cols = list(dict.fromkeys(results[col_key])) if col_key else [""]
    grid = np.full((len(rows), len(cols)), np.nan)
    for _, r in results.iterrows():
        value = r[f"final_{metric}"]
        i, j = rows.index(r[row_key]), cols.index(r[col_key]) if col_key else 0
        if np.isfinite(value) and not (np.isfinite(grid[i, j]) and grid[i, j] >= value):
            grid[i, j] = value
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.4 + 0.8 * len(rows)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    for i, j in itertools.product(range(len(rows)), range(len(cols))):
        ax.text(j, i, "-" if np.isnan(grid[i, j]) else f"{grid[i, j]:.3f}", ha="center", va="center",
                color="white" if np.isnan(grid[i, j]) or grid[i, j] < np.nanmean(grid) else "black")
    ax.set_yticks(range(len(rows)), [str(v) for v in rows])
    ax.set_ylabel(row_key)
    ax.set_xticks(range(len(cols)), [str(v) for v in cols])
    ax.set_xlabel(col_key or "")
    fig.colorbar(image, ax=ax, label=f"final val {metric}")
    extra = " (best over the other grid keys)" if len(keys) > 2 else ""
    ax.set_title(f"final val {metric}{extra}", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, out_png)


def plot_trial_curves(trials: list[SweepTrial], runs: Path, metric: str, out_png: Path) -> None:
    """Val ``metric`` and train loss per round of every trial, in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for trial in trials:
        records = _read_records(runs / trial.name / "metrics.jsonl")
        if not records:
            continue
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in trial.params.items())
        steps = [r["round"] for r in records]
        line, = ax_metric.plot(steps, [r.get(metric) if r.get(metric) is not None else np.nan for r in records],
                               marker=".", label=label)
        ax_loss.plot(steps, [r.get("train_loss") if r.get("train_loss") is not None else np.nan for r in records],
                     marker=".", color=line.get_color())
    for ax, ylabel in ((ax_metric, f"val {metric} (clip level)"), (ax_loss, "train loss (BCE)")):
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.legend(loc="center left", bbox_to_anchor=(0.8, 0.5), fontsize=7, frameon=False)
    _save_figure(fig, out_png)


def write_outputs(out: Path, trials: list[SweepTrial], config: Config, tune_results: dict[str, Any],
                  interrupted: bool = False) -> dict | None:
    """results.csv, best.json, heatmap.png and curves.png of a sweep; returns the best trial's summary (None
    when no trial has a result yet). Trials short of their rounds are ``stopped`` (early-stopping scheduler)
    or, when ``interrupted``, ``unfinished``."""
    metric, mode = config.sweep.metric, metric_mode(config.sweep.metric)
    runs = out / "trials"
    rows = [_trial_summary(t, runs / t.name, metric, mode, tune_results.get(t.name), interrupted) for t in trials]
    results = pd.DataFrame(rows)
    tmp = out / "results.csv.tmp"
    results.to_csv(tmp, index=False)
    os.replace(tmp, out / "results.csv")
    keys = list(trials[0].params)
    plot_heatmap(results, keys, metric, out / "heatmap.png")
    plot_trial_curves(trials, runs, metric, out / "curves.png")
    finished = [r for r in rows if r["rounds"] and np.isfinite(r[f"final_{metric}"])]
    if not finished:
        return None
    best = (max if mode == "max" else min)(finished, key=lambda r: r[f"final_{metric}"])
    summary = {"trial": best["trial"], "params": {k: best[k] for k in keys}, "metric": metric, "mode": mode,
               "selected_by": f"final_{metric}", "rounds": best["rounds"], "run": best["run"],
               "metrics": {k: best[k] for k in best if k.startswith(("best_", "final_"))},
               "trials": len(rows), "errors": sum(1 for r in rows if r["status"] == "error")}
    tmp = out / "best.json.tmp"
    tmp.write_text(strict_json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "best.json")
    return summary


def run_sweep(store: Path, config: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Run (or with ``resume`` continue) the grid ``config.sweep.grid`` as Ray Tune trials, one Flower simulation
    each; write results.csv, best.json, heatmap.png and curves.png into ``out``; return the best trial's params
    and metrics (chosen by the final value of ``config.sweep.metric``). The sweep directory is locked meanwhile,
    and the store verified against its checksums before Ray starts."""
    trials = expand_grid(config)
    store, out = Path(store).resolve(), Path(out).resolve()
    from fl.store import FeatureStore

    FeatureStore(store).verify(progress=progress)  # a missing, unreadable or corrupt store fails before Ray starts
    if config.federated.ray_address:
        check_ray_address(config.federated.ray_address, config.federated.ray_timeout_s)
    with exclusive(out, "sweep directory"):
        return _run_sweep(store, config, out, trials, resume, progress)


def _run_sweep(store: Path, config: Config, out: Path, trials: list[SweepTrial], resume: bool,
               progress: bool) -> dict:
    if resume:
        if not (out / "sweep.json").exists():
            raise DataError(f"{out}: nothing to resume (no sweep.json)")
        _check_resume(out, store, config)
    elif (out / "sweep.json").exists():
        raise DataError(f"{out}: a sweep is already here; use --resume or another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        tmp = out / "sweep.json.tmp"
        tmp.write_text(json.dumps({"store": str(store), "config": to_dict(config),
                                   "trials": [{"name": t.name, "params": t.params} for t in trials]},
                                  indent=2) + "\n")
        os.replace(tmp, out / "sweep.json")

    import ray

    # Every round is checkpointed, so Tune snapshots its state often; that is wanted here, not worth a warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started_ray = not ray.is_initialized()
    if started_ray:
        address = config.federated.ray_address or "local"
        ray.init(address=address, include_dashboard=False if address == "local" else None,
                 log_to_driver=False)
    try:
        result_grid = _run_tune(store, config, out, trials, resume, progress)
    finally:
        if started_ray:
            ray.shutdown()
    by_name = {Path(result.path).name: result for result in result_grid}
    interrupted = result_grid.num_terminated + result_grid.num_errors < len(result_grid)
    best = write_outputs(out, trials, config, by_name, interrupted)
    if interrupted:  # Tune catches Ctrl+C, saves its state and returns
        log.warning("sweep interrupted; partial results in %s; continue it with --resume", out / "results.csv")
        raise KeyboardInterrupt
    if best is None:
        first = next((r.error for r in result_grid if r.error), None)
        reason = str(first).strip().splitlines()[-1][:300] if first else "no trial completed a round"
        raise DataError(f"{out}: no trial of the sweep produced a result ({reason})")
    log.info("sweep %s: best %s with final val %s %.4f", out, best["trial"], best["metric"],
             best["metrics"][f"final_{best['metric']}"])
    return best


if __name__ == "__main__":
    sys.exit(_child_main(Path(sys.argv[1])))

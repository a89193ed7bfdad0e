"""Ray Tune sweeps over federated parameters (fedsound/sweep.py) on the tiny synthetic store.

Each trial is a real Flower simulation in its own process and Ray (15-30 s on two cores), so the module runs
one sweep of the 2 x 1 grid of one-round trials in configs/sweep/tiny.toml: its driver runs the first trial to
the end and is killed while the second starts; ``resume`` then finishes it, and the results of the whole grid
are checked. Bad grids fail before Ray.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
from conftest import REPO

from fedsound.sweep import ATTEMPTS_NAME, expand_grid, run_sweep
from fl.config import CONFIG_DIR, Config, apply_flat, load_config
from fl.errors import ConfigError, DataError
from fl.runtime import configure_environment

TINY = CONFIG_DIR / "sweep" / "tiny.toml"
GRID_KEYS = ["federated.fraction", "federated.local-epochs"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sweep-work")
    configure_environment(path)
    return path


@pytest.fixture(scope="module")
def sweep_config() -> Config:
    return load_config(TINY, overrides={"seed": 0, "train.batch-size": 32, "train.device": "cpu"})


def attempts(run: Path) -> int:
    path = run / ATTEMPTS_NAME
    return len(path.read_text().splitlines()) if path.exists() else 0


def check_results(out: Path, config: Config) -> pd.DataFrame:
    """results.csv has one finished row per trial with its parameters and finite metrics; the other outputs
    exist and best.json names the row with the highest final val mAP."""
    results = pd.read_csv(out / "results.csv")
    trials = expand_grid(config)
    assert list(results["trial"]) == [t.name for t in trials]
    assert results[GRID_KEYS].to_dict("records") == [t.params for t in trials]
    assert (results["status"] == "done").all() and (results["rounds"] == 1).all()
    for column in ("final_mAP", "best_mAP", "final_dprime", "final_lwlrap", "final_train_loss", "seconds"):
        assert results[column].map(math.isfinite).all(), column
    assert results["final_mAP"].between(0, 1).all()
    best = json.loads((out / "best.json").read_text())
    assert best["metrics"]["final_mAP"] == results["final_mAP"].max()
    assert best["params"] == results.loc[results["trial"] == best["trial"], GRID_KEYS].iloc[0].to_dict()
    for name in ("heatmap.png", "curves.png"):
        assert (out / name).stat().st_size > 0
    return results


@pytest.mark.parametrize(("grid", "message"), [
    ({"federated.fraktion": [0.1]}, "fraktion"),
    ({"federated.fraction": []}, "sweep.grid.federated.fraction: empty list"),
    ({"federated.fraction": [0.3, 1.5]}, "fraction"),
    ({"federated.local-epochs": 3}, "expected a list"),
    ({}, "no parameters"),
])
def test_bad_grid_is_a_one_line_error_before_ray(tmp_path: Path, tiny_store: Path, sweep_config: Config,
                                                 grid: dict, message: str) -> None:
    config = apply_flat(sweep_config, {"sweep.grid": grid}, "test")
    with pytest.raises(ConfigError) as info:
        run_sweep(tiny_store, config, tmp_path / "sweep", progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not ray.is_initialized() and not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials_and_writes_results(
        workdir: Path, tiny_store: Path, sweep_config: Config) -> None:
    out = workdir / "killed"
    runs = [out / "trials" / t.name for t in expand_grid(sweep_config)]
    script = ("import sys; from pathlib import Path; from fl.config import load_config; from fedsound.sweep import "
              "run_sweep; run_sweep(Path(sys.argv[1]), load_config(Path(sys.argv[2]), overrides={'seed': 0, "
              "'train.batch-size': 32, 'train.device': 'cpu'}), Path(sys.argv[3]), progress=False)")
    driver = subprocess.Popen([sys.executable, "-c", script, str(tiny_store), str(TINY), str(out)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 150
        while not all(attempts(run) for run in runs):  # one at a time: the first has finished when the second starts
            assert driver.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "the second trial never started"
            time.sleep(0.2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    first, second = sorted(runs, key=lambda run: not (run / "model.pt").exists())
    assert (first / "model.pt").exists() and not (second / "model.pt").exists()
    first_records = (first / "metrics.jsonl").read_text()

    best = run_sweep(tiny_store, sweep_config, out, resume=True, progress=False)
    results = check_results(out, sweep_config)
    assert best["trial"] in set(results["trial"])
    assert attempts(first) == 1, "the finished trial was run again"
    assert (first / "metrics.jsonl").read_text() == first_records
    assert attempts(second) == 2 and (second / "model.pt").exists()
    for name in results["trial"]:
        assert list((out / "tune" / name).glob("checkpoint_*")), "no Tune checkpoint for the reported round"
    assert not ray.is_initialized()
    with pytest.raises(DataError, match="already here"):  # a finished sweep is not started over ...
        run_sweep(tiny_store, sweep_config, out, progress=False)
    changed = apply_flat(sweep_config, {"federated.rounds": 2}, "test")
    with pytest.raises(ConfigError, match="federated.rounds: 1 -> 2"):  # ... nor resumed with other settings
        run_sweep(tiny_store, changed, out, resume=True, progress=False)

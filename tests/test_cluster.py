"""A real two-node Ray cluster on this machine (``ray start --head`` plus ``ray start --address``, two CPUs each):
a Flower simulation and a two-trial sweep joined to it by address place their client actors and their trials on
both nodes, and give the weights of a single-machine run with the same seed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

from fedsound.simulate import simulate
from fedsound.sweep import ATTEMPTS_NAME, expand_grid, run_sweep
from fl.config import CONFIG_DIR, apply_flat, load_config
from fl.runtime import configure_environment

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).parent / "ray"
CPUS_PER_NODE = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray(*argv: str, env: dict) -> None:
    result = subprocess.run([str(RAY), *argv], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``ray start --head`` and a second node joined to it; yields the head's address, then ``ray stop``."""
    configure_environment(tmp_path_factory.mktemp("cluster-work"))
    temp = tempfile.mkdtemp(prefix="fsray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    try:
        _ray("start", "--head", f"--port={port}", f"--num-cpus={CPUS_PER_NODE}", "--num-gpus=0",
             "--include-dashboard=false", f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", env=env)
        _ray("start", f"--address={address}", f"--num-cpus={CPUS_PER_NODE}", "--num-gpus=0",
             "--node-ip-address=127.0.0.1", env=env)
        yield address
    finally:
        _stop_cluster(temp, address)


def _stop_cluster(temp: str, address: str) -> None:
    """End this cluster's processes only (``ray stop`` would end every Ray on the machine): those whose command
    line names its temporary folder or its address."""
    ours = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and int(entry.name) != os.getpid() and (temp in command or address in command):
            ours.append(int(entry.name))
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + 5
        while signum == signal.SIGTERM and time.monotonic() < deadline and any(_alive(pid) for pid in ours):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _actor_nodes(address: str, class_name: str) -> set[str]:
    """The nodes that ran actors of ``class_name`` in the cluster (dead ones included)."""
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2, "the cluster lost a node"
        return {a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                if a["ActorClassName"] == class_name}
    finally:
        ray.shutdown()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def sweep_config():
    return load_config(CONFIG_DIR / "sweep" / "tiny.toml",
                       overrides={"seed": 0, "train.batch-size": 32, "train.device": "cpu",
                                  "federated.client-cpus": 1, "sweep.max-concurrent": 2})


@pytest.fixture(scope="module")
def local_reference(tiny_store: Path, sweep_config, tmp_path_factory) -> Path:
    """The first trial's simulation, on this machine alone."""
    out = tmp_path_factory.mktemp("local") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        simulate(tiny_store, expand_grid(sweep_config)[0].config, out, progress=False)
    return out


def test_a_simulation_on_the_cluster_uses_both_nodes_and_equals_a_local_run(cluster, tiny_store, sweep_config,
                                                                           local_reference, tmp_path) -> None:
    config = apply_flat(expand_grid(sweep_config)[0].config, {"federated.ray-address": cluster}, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        simulate(tiny_store, config, tmp_path / "run", progress=False)
    assert len(_actor_nodes(cluster, "ClientAppActor")) == 2
    _assert_same_weights(tmp_path / "run", local_reference)


def test_a_sweep_on_the_cluster_places_trials_on_both_nodes(cluster, tiny_store, sweep_config, local_reference,
                                                            tmp_path) -> None:
    config = apply_flat(sweep_config, {"federated.ray-address": cluster}, "test")
    trials = expand_grid(config)
    assert len(trials) == 2
    run_sweep(tiny_store, config, tmp_path / "sweep", progress=False)
    nodes = {json.loads(line)["node"] for trial in trials
             for line in (tmp_path / "sweep" / "trials" / trial.name / ATTEMPTS_NAME).read_text().splitlines()}
    assert len(nodes) == 2 and None not in nodes  # each trial ran on its own node of the cluster
    _assert_same_weights(tmp_path / "sweep" / "trials" / trials[0].name, local_reference)
    assert (tmp_path / "sweep" / "trials" / trials[1].name / "model.pt").exists()

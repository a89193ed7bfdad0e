"""``fedsound bench deploy``: a real federation on this machine, through TLS and SuperNode authentication.

On 127.0.0.1 only: ``fedsound server``'s SuperLink (TLS with a fresh CA, SuperNode authentication) and N laptops
(``NODES``, each its own SuperNode process, each with a synthetic profile of a different voice: pops, clicks and
hisses, and its room), which opt in and join. Then:

* a SuperNode whose key was never registered, and one that speaks plaintext, try to join: both must be refused;
* the federation trains ``ROUNDS`` rounds with central DP (client-side fixed clipping), ``min-clients`` 2; as
  soon as round 1 is recorded, one of the two nodes sampled for round 2 is killed (SIGKILL): round 2 must still
  complete (its update counted as failed, the DP round not aggregated), and round 3 runs on the nodes left.

Figures written: ``rounds_completed``, ``tls``, ``unauthenticated_refused``, ``plaintext_refused``,
``node_killed_round_completed``, ``bytes_per_update`` (the float32 weights a node sends), ``seconds_per_round``
and ``epsilon`` (at delta 1e-5 after the run).

Run: ``fedsound bench deploy [--workdir DIR] [--quick] [--out bench.json]``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import soundfile as sf
import torch

from benchmarks.common import machine_info, write_json
from clients.detector.enroll import enroll
from data_prep.mouth_sounds import background_take, enrollment_take, make_voice
from fedsound.deploy import Server, _bin, _flower_env, join, make_certs, node_keys
from fl.config import CONFIG_DIR, ModelConfig, load_config, to_dict
from fl.model_io import save_model
from fl.models import TCN
from server.strategy import sample_nodes

NODES = 3
ROUNDS = 3
SOUNDS = ("pop", "click", "hiss")
LABELS = ("pop", "click", "hiss", "hum", "whistle", "background")
REFUSAL_WAIT_S = 30.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _profile(folder: Path, user: int, takes: int) -> Path:
    """A synthetic user's profile: ``takes`` of each sound and 8 s of their room."""
    voice = make_voice([700, user])
    audio = folder / "takes"
    audio.mkdir(parents=True, exist_ok=True)
    for k, sound in enumerate(SOUNDS):
        files = []
        for i in range(takes):
            take = enrollment_take(sound, voice, [700, user, k, i])
            files.append(audio / f"{sound}-{i}.wav")
            sf.write(files[-1], take.wave, take.sample_rate, subtype="PCM_16")
        enroll(folder / "profile", sound=sound, from_files=files, progress=False)
    room = background_take(voice, [700, user, 9], seconds=8.0)
    sf.write(audio / "room.wav", room.wave, room.sample_rate, subtype="PCM_16")
    enroll(folder / "profile", background=True, from_files=[audio / "room.wav"], progress=False)
    return folder / "profile"


def _initial_model(path: Path, channels: int) -> Path:
    frontend = load_config(CONFIG_DIR / "features" / "lea16k.toml").frontend
    torch.manual_seed(0)
    model = TCN(ModelConfig(channels=channels, dropout=0.0), frontend.n_mels, len(LABELS))
    save_model(path, model, {"labels": list(LABELS), "mids": list(LABELS), "frontend": to_dict(frontend)})
    return path


def _start_attempts(attempts: dict[str, list[str]], workdir: Path) -> dict[str, subprocess.Popen]:
    """Start each named SuperNode command line (side by side), each giving up after a few seconds."""
    processes = {}
    for name, args in attempts.items():
        with open(workdir / f"{name}.log", "wb") as handle:
            processes[name] = subprocess.Popen([_bin("flower-supernode"), *args, "--max-wait-time", "8"],
                                               env=_flower_env(workdir), stdout=handle, stderr=subprocess.STDOUT,
                                               start_new_session=True)
    return processes


def _refused(processes: dict[str, subprocess.Popen], workdir: Path) -> dict[str, bool]:
    """For each attempt, whether it gave up without ever connecting."""
    refused = {}
    for name, process in processes.items():
        try:
            process.wait(timeout=REFUSAL_WAIT_S)
            refused[name] = "SuperNode ID" not in (workdir / f"{name}.log").read_text(errors="replace")
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            refused[name] = False
    return refused


def run_deploy_bench(workdir: Path, quick: bool = False, out_json: Path | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Run the scenario of the module docstring; print the figures and write JSON (``out_json`` or
    ``workdir/deploy.json``)."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # a round takes 15-20 s on two cores (Flower starts a ClientApp process per message); the round timeout leaves
    # twice that before a late node counts as failed
    takes, channels, timeout = (3, 8, 40) if quick else (5, 32, 60)
    profiles = [_profile(workdir / f"laptop-{u}", u, takes) if not (workdir / f"laptop-{u}" / "profile").exists()
                else workdir / f"laptop-{u}" / "profile" for u in range(NODES + 1)]
    initial = _initial_model(workdir / "initial.pt", channels)
    certs = make_certs(workdir / "certs")
    config = load_config(overrides={
        "seed": 0, "train.batch-size": 16, "federated.rounds": ROUNDS, "federated.min-clients": 2,
        "federated.local-epochs": 1, "federated.round-timeout-s": timeout, "federated.node-wait-s": 120,
        "federated.dp": "client-fixed", "federated.dp-noise-multiplier": 1.0, "federated.dp-clipping-norm": 1.0})
    run_dir = workdir / "run"
    for stale in ("metrics.jsonl", "checkpoint.pt", "config.json", "model.pt"):
        (run_dir / stale).unlink(missing_ok=True)
    nodes: dict[int, subprocess.Popen] = {}
    started = time.perf_counter()
    with Server(certs, workdir / "server", port=_free_port()) as server:
        ids = []
        for profile in profiles[:NODES]:
            node_id = int(server.register(node_keys(profile)[1]))
            ids.append(node_id)
            nodes[node_id] = join(profile, server.address, certs / "ca.crt", profile.parent / "join", opt_in=True)
        stranger, _ = node_keys(profiles[NODES])  # its key is never registered
        attempts = _start_attempts({
            "unauthenticated": ["--superlink", server.address, "--root-certificates", str(certs / "ca.crt"),
                                "--auth-supernode-private-key", str(stranger), "--port", str(_free_port())],
            "plaintext": ["--superlink", server.address, "--insecure", "--port", str(_free_port())]}, workdir)
        victim = sample_nodes(ids, config.federated.min_clients, config.seed, 2)[0]
        killed_at: list[float] = []

        def kill_in_round_two() -> None:
            metrics = run_dir / "metrics.jsonl"
            while not (metrics.exists() and metrics.read_text().strip()):
                if time.perf_counter() - started > 900:
                    return
                time.sleep(0.1)
            os.killpg(nodes[victim].pid, signal.SIGKILL)
            killed_at.append(time.perf_counter() - started)

        killer = threading.Thread(target=kill_in_round_two, daemon=True)
        killer.start()
        result = server.run(config, initial, run_dir, timeout=1200)
        (workdir / "run.log").write_text(result.stdout + result.stderr)
        refused = _refused(attempts, workdir)
        killer.join(timeout=5)
        for process in nodes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    second = next((r for r in records if r["round"] == 2), None)
    state = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    report = {
        "machine": machine_info(), "quick": quick, "nodes": NODES, "rounds": ROUNDS,
        "rounds_completed": len(records), "tls": True,
        "unauthenticated_refused": refused["unauthenticated"], "plaintext_refused": refused["plaintext"],
        "node_killed": str(victim), "node_killed_at_s": killed_at[0] if killed_at else None,
        "node_killed_round_completed": bool(killed_at) and second is not None and second["clients_failed"] >= 1,
        "bytes_per_update": int(sum(t.numel() * t.element_size() for t in state.values())),
        "seconds_per_round": sum(r["seconds"] for r in records) / max(1, len(records)),
        "epsilon": records[-1].get("epsilon") if records else None, "delta": config.federated.dp_delta,
        "records": records, "seconds": time.perf_counter() - started,
    }
    print(format_report(report))
    write_json(Path(out_json) if out_json is not None else workdir / "deploy.json", report)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The figures, one per line."""
    keys = ("rounds_completed", "tls", "unauthenticated_refused", "plaintext_refused", "node_killed_round_completed",
            "bytes_per_update", "seconds_per_round", "epsilon")
    lines = [f"deploy bench{' (quick)' if report['quick'] else ''}: {report['nodes']} laptops on 127.0.0.1, "
             f"{report['rounds']} rounds"]
    lines += [f"  {key:<28} {report[key]:.3g}" if isinstance(report[key], float) else f"  {key:<28} {report[key]}"
              for key in keys]
    return "\n".join(lines)

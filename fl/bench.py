"""``fedsound bench WHAT``: dispatch to the benchmark of one stage. Each prints a table and can write JSON."""

from __future__ import annotations

import importlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from fl.errors import ConfigError

# stage -> (module, function); every function takes (workdir, quick, out_json, progress) and returns a dict of
# figures; run_personalize_bench also takes settings (from --config), user_seeds (from --users),
# aggressor_hours (from --aggressor-hours) and examples (from --examples).
BENCHES = {
    "prep": ("fl.bench_prep", "run_prep_bench"),
    "train": ("fl.bench_train", "run_train_bench"),
    "sim": ("fl.bench_sim", "run_sim_bench"),
    "sweep": ("fl.bench_sweep", "run_sweep_bench"),
    "stream": ("clients.bench_stream", "run_stream_bench"),
    "personalize": ("clients.bench_personalize", "run_personalize_bench"),
}
# Options only bench personalize takes, and why the others refuse each.
PERSONALIZE_ONLY = {
    "--users": "has no synthetic users; only bench personalize takes them",
    "--aggressor-hours": "has no aggressor audio; only bench personalize takes it",
    "--examples": "enrolls nobody; only bench personalize takes a number of examples",
    "--config": "has fixed settings; only bench personalize reads a config (its [personalize] table)",
}


def run_bench(what: str, workdir: Path, quick: bool = False, out: Path | None = None, config: Path | None = None,
              progress: bool = True, users: list[int] | None = None, aggressor_hours: float | None = None,
              examples: list[int] | None = None) -> int:
    """Run one benchmark into ``workdir/bench/WHAT``. ``config``: a TOML file whose ``[personalize]`` table
    bench personalize fine-tunes with; ``users``: the synthetic users' seeds bench personalize runs (default
    its own four); ``aggressor_hours``: hours of aggressor-only audio per user (default 5); ``examples``: the
    enrollment examples per sound it personalizes with (default 10 and 5); the other benchmarks have fixed
    settings and refuse all four. ``progress``: progress bars on the long steps."""
    module_name, function = BENCHES[what]
    given = {"--users": users, "--aggressor-hours": aggressor_hours, "--examples": examples, "--config": config}
    if what != "personalize":
        for flag, value in given.items():
            if value is not None:
                raise ConfigError(f"{flag}: bench {what} {PERSONALIZE_ONLY[flag]}")
    options: dict = {}
    if users is not None:
        options["user_seeds"] = users
    if aggressor_hours is not None:
        options["aggressor_hours"] = aggressor_hours
    if examples is not None:
        options["examples"] = examples
    if config is not None:
        from clients.personalize import load_personalize_config

        options["settings"] = load_personalize_config(config)
    module = importlib.import_module(module_name)
    getattr(module, function)(workdir=Path(workdir) / "bench" / what, quick=quick, out_json=out, progress=progress,
                              **options)
    return 0


def write_json(path: Path, figures: dict) -> None:
    """Write a benchmark's figures atomically (a temporary file, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(figures, indent=2) + "\n")
    tmp.replace(path)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what :mod:`platform` knows (often only "x86_64")."""
    try:
        lines = Path(cpuinfo).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []  # not Linux: platform's answer below
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What a benchmark ran on, for its JSON: CPU model and count, OS, Python, torch, the GPU if one is visible,
    and the 1-minute load average (other work on the machine skews every timing)."""
    import torch

    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg_1m": os.getloadavg()[0]}

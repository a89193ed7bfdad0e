"""What every benchmark shares: where it writes its figures and what it records of the machine."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


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

"""Process-wide settings: where Flower and Ray write, telemetry off, logging, device choice."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedsound")


def configure_environment(workdir: Path) -> None:
    """Keep Flower and Ray out of the home folder, turn Flower's telemetry and auto-installs off, and keep Ray from
    showing actors without a GPU the GPUs.

    Ray's socket paths must stay under ~100 characters, so its temporary folder is the workdir's ``ray``
    folder when that path is short, else a per-user folder in the system temp dir.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_HOME", str(workdir / ".flwr"))
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    ray_tmp = workdir / "ray"
    if len(str(ray_tmp)) > 40:
        ray_tmp = Path(tempfile.gettempdir()) / f"fedsound-ray-{os.getuid()}"
    ray_tmp.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_TMPDIR", str(ray_tmp))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's C++ failure signal handler takes SIGTERM as a crash: it dumps a stack and tears the driver's Ray
    # connection down before Python's handler can stop the command cleanly. Set to 0 to keep it.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    # A client actor given no GPU (federated.client-gpus = 0) must see none, or "auto" would put every actor on
    # the one GPU: keep Ray's override of CUDA_VISIBLE_DEVICES, which it announces it will drop by default.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)


def configure_logging(verbosity: int) -> None:
    """-q -> warnings only, default -> info, -v -> debug."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedsound").setLevel(level)
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler


def pick_device(setting: str = "auto") -> torch.device:
    """``auto`` uses a GPU when one is present; ``cuda`` without a GPU is a clear error."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        from fl.errors import ConfigError

        raise ConfigError("train.device: 'cuda' asked for but no GPU is available")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")

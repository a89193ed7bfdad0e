"""What the ServerApp, the ClientApps and the ``simulate`` driver share about a federated run.

A run's settings reach the ServerApp either from ``fedsound simulate`` (the ``FEDSOUND_RUN`` environment
variable names the run's ``settings.json``) or from ``flwr run .`` (``context.run_config``: the same dotted
kebab-case keys as our TOML files, plus ``store``, ``out`` and, for a federation of laptops, ``federation =
"profiles"`` and ``initial``). The server forwards the resolved configuration to every client inside each train
message, so one key means one thing on every path; a client trains with that round's (:func:`round_config`).

Two kinds of federation: ``store`` (simulations: each node holds a partition of one feature store) and
``profiles`` (real laptops joined with ``fedsound join``: each node trains on its own profile; the server starts
from the ``initial`` model file and evaluates on ``store`` when one is given).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl.config import Config, apply, apply_flat, to_dict
from fl.errors import ConfigError
from fl.store import FeatureStore

RUN_ENV = "FEDSOUND_RUN"
CONFIG_KEY = "fedsound-config"  # JSON of the resolved Config inside a ConfigRecord
PLAN_NAME = "partition.json"
SETTINGS_NAME = "settings.json"
PATH_KEYS = ("store", "out", "central", "resume", "federation", "initial")
FEDERATIONS = ("store", "profiles")
# Every update carries this weight (1) beside its patch count: a DP average weighs all clients alike.
UNIFORM_WEIGHT_KEY = "client-weight"


@dataclass
class RunSettings:
    """Everything the ServerApp needs to run one federated experiment."""

    config: Config
    store: Path | None
    out: Path
    resume: bool = False
    central: Path | None = None
    federation: str = "store"
    initial: Path | None = None

    @property
    def plan(self) -> Path:
        """The partition plan of the run (written by ``simulate`` before the run starts)."""
        return self.out / PLAN_NAME

    def save(self) -> Path:
        """Write ``settings.json`` into the run directory."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / SETTINGS_NAME
        path.write_text(json.dumps({"config": to_dict(self.config), "store": str(self.store or ""),
                                    "out": str(self.out), "resume": self.resume, "central": str(self.central or ""),
                                    "federation": self.federation, "initial": str(self.initial or "")}, indent=2))
        return path


def settings_from_run_config(run_config: Mapping[str, Any]) -> RunSettings:
    """Settings from ``$FEDSOUND_RUN`` when set, else from Flower's run config (``flwr run .``)."""
    if os.environ.get(RUN_ENV):
        data = json.loads(Path(os.environ[RUN_ENV]).read_text())
        config = apply(Config(), data["config"], os.environ[RUN_ENV])
        return RunSettings(config, Path(data["store"]) if data["store"] else None, Path(data["out"]),
                           bool(data["resume"]), Path(data["central"]) if data["central"] else None,
                           data.get("federation", "store"), Path(data["initial"]) if data.get("initial") else None)
    flat = {k: v for k, v in run_config.items() if k not in PATH_KEYS}
    federation = str(run_config.get("federation", "store"))
    if federation not in FEDERATIONS:
        raise ConfigError(f"run config: 'federation' must be one of {', '.join(FEDERATIONS)}, got {federation!r}")
    if federation == "store" and "store" not in run_config:
        raise ConfigError("run config: 'store' (path of the feature store) is required")
    if federation == "profiles" and not run_config.get("initial"):
        raise ConfigError("run config: 'initial' (the model file a federation of profiles starts from) is required")
    config = apply_flat(Config(), flat, "run config")
    out = Path(str(run_config.get("out", "work/runs/flwr")))
    return RunSettings(config, Path(str(run_config["store"])) if run_config.get("store") else None, out,
                       bool(run_config.get("resume", False)),
                       Path(str(run_config["central"])) if run_config.get("central") else None, federation,
                       Path(str(run_config["initial"])) if run_config.get("initial") else None)


def round_config(config: Config, server_round: int) -> Config:
    """The configuration a client trains with in ``server_round``: ``model.pooling`` is ``"max"`` in the first
    ``federated.max-pooling-rounds`` rounds, the configured pooling after them."""
    if server_round > config.federated.max_pooling_rounds:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, pooling="max"))


@lru_cache(maxsize=4)
def open_store(path: str) -> FeatureStore:
    """One FeatureStore per process (Ray actors keep it between rounds)."""
    return FeatureStore(path)


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A model's state dict as numpy arrays (CPU copies)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def update_problem(global_arrays: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray],
                   max_norm: float) -> str | None:
    """Why a client update must be rejected (None when it is acceptable).

    Checks: the same keys and shapes as the global model, only finite values, and an L2 distance to the
    global model of at most ``max_norm``.
    """
    if set(update) != set(global_arrays):
        missing, extra = set(global_arrays) - set(update), set(update) - set(global_arrays)
        return f"wrong keys (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    for key, ref in global_arrays.items():
        if update[key].shape != ref.shape:
            return f"wrong shape for {key}: {update[key].shape} != {ref.shape}"
    squared = 0.0
    for key, ref in global_arrays.items():
        value = update[key]
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"non-finite values in {key}"
        squared += float(np.sum((value.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = squared ** 0.5
    if norm > max_norm:
        return f"update norm {norm:.3g} exceeds max-update-norm {max_norm:.3g}"
    return None

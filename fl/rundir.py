"""Run directories shared by central and federated training.

A run directory holds ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one JSON object per
epoch or round), ``checkpoint.pt`` (the latest resumable state), ``model.pt`` (the final model) and
``curves.png``. Central and federated runs use the same format, so they compare directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fl import jsonfile
from fl.config import (
    LENGTH_KEYS,
    RUNTIME_KEYS,
    Config,
    config_differences,
    recorded_config,
    to_dict,
    write_resolved,
)
from fl.errors import ConfigError, DataError
from fl.model_io import read_archive


class RunDir:
    """One training run's folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoint_path = self.path / "checkpoint.pt"
        self.model_path = self.path / "model.pt"
        self.plot_path = self.path / "curves.png"

    def start(self, config: Config, resume: bool, allow_config_change: bool = False) -> None:
        """Create the folder and record the configuration; refuse to overwrite a finished or started run unless
        resuming. A resume checks the checkpoint (:meth:`load_checkpoint`) and that the configuration is the
        run's own, except where it runs and how long (:data:`fl.config.RUNTIME_KEYS`, ``LENGTH_KEYS``);
        ``allow_config_change`` resumes with other settings anyway. A resume leaves ``config.json`` as it is:
        :meth:`record_config` replaces it once the checkpoint has been restored."""
        if resume:
            if not self.checkpoint_path.exists():
                raise DataError(f"{self.path}: nothing to resume (no checkpoint.pt)")
            self.load_checkpoint()
            if not allow_config_change:
                changed = self.config_changes(config, RUNTIME_KEYS + LENGTH_KEYS,
                                              unreadable_hint="; resume with --allow-config-change")
                if changed:
                    raise ConfigError(f"{self.path}: the run being resumed had another config ({'; '.join(changed)})"
                                      "; resume with the same settings, or pass --allow-config-change")
            return
        if self.metrics_path.exists() and self.metrics_path.stat().st_size:
            raise DataError(f"{self.path}: a run is already here; use --resume or another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        self.record_config(config)

    def config_changes(self, config: Config, ignore: tuple[str, ...], unreadable_hint: str = "") -> list[str]:
        """The keys (``"key: old -> new"``) in which ``config`` differs from the recorded ``config.json``, leaving
        out ``ignore``; a key the record lacks counts as its default; none when nothing is recorded."""
        saved = self.path / "config.json"
        if not saved.exists():
            return []
        try:
            recorded = json.loads(saved.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{saved}: unreadable ({exc}){unreadable_hint}") from None
        return config_differences(recorded_config(recorded, str(saved)), to_dict(config), ignore)

    def record_config(self, config: Config) -> None:
        """Write the resolved configuration (``config.json``)."""
        write_resolved(config, self.path / "config.json")

    def append(self, record: dict[str, Any]) -> None:
        """Append one epoch/round record (non-finite floats written as null)."""
        with open(self.metrics_path, "a") as fh:
            fh.write(jsonfile.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def records(self) -> list[dict[str, Any]]:
        """All records written so far."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate(self, last_step: int, key: str) -> None:
        """Drop records after ``last_step`` (written after the last checkpoint of a killed run)."""
        kept = [r for r in self.records() if r[key] <= last_step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.metrics_path)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Atomically replace the checkpoint (tensors and plain types only: loads with weights_only)."""
        tmp = self.checkpoint_path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.checkpoint_path)

    def restore(self, module: Any, state: dict[str, Any], what: str = "model") -> None:
        """``module.load_state_dict(state)`` from this run's checkpoint; a state that does not fit (another
        architecture) is a one-line DataError."""
        try:
            module.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{self.checkpoint_path}: the checkpoint's {what} does not fit the configured one "
                            f"({first})") from None

    def load_checkpoint(self) -> dict[str, Any]:
        """The latest checkpoint, its archive checked member by member (:func:`fl.model_io.read_archive`)."""
        state = read_archive(self.checkpoint_path, "checkpoint")
        if not isinstance(state, dict):
            raise DataError(f"not a fedsound checkpoint: {self.checkpoint_path} (not a table)")
        return state


def plot_curves(records: list[dict], out_png: Path, step_key: str, title: str,
                baseline: list[dict] | None = None) -> None:
    """Validation mAP and train loss against epoch/round; a central baseline's best mAP as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r[step_key] for r in records]
    fig, (ax_map, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_map.plot(steps, [r.get("mAP") if r.get("mAP") is not None else float("nan") for r in records],
                marker="o", label="val mAP")
    if baseline:
        best = max((r.get("mAP") or 0.0) for r in baseline)
        ax_map.axhline(best, color="gray", linestyle="--", label=f"central best {best:.3f}")
    ax_map.set_xlabel(step_key)
    ax_map.set_ylabel("val mAP (clip level)")
    ax_map.legend()
    ax_map.grid(alpha=0.3)
    ax_loss.plot(steps, [r.get("train_loss") if r.get("train_loss") is not None else float("nan")
                         for r in records], marker="o", color="tab:red")
    ax_loss.set_xlabel(step_key)
    ax_loss.set_ylabel("train loss (BCE)")
    ax_loss.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)

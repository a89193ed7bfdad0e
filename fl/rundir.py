"""Run directories shared by central and federated training.

A run directory holds ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one JSON object per
epoch or round), ``checkpoint.pt`` (the latest resumable state), ``model.pt`` (the final model) and
``curves.png``. Central and federated runs use the same format, so they compare directly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from fl.config import Config, write_resolved
from fl.errors import DataError


class RunDir:
    """One training run's folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoint_path = self.path / "checkpoint.pt"
        self.model_path = self.path / "model.pt"
        self.plot_path = self.path / "curves.png"

    def start(self, config: Config, resume: bool) -> None:
        """Create the folder; refuse to overwrite a finished or started run unless resuming."""
        if resume:
            if not self.checkpoint_path.exists():
                raise DataError(f"{self.path}: nothing to resume (no checkpoint.pt)")
        elif self.metrics_path.exists() and self.metrics_path.stat().st_size:
            raise DataError(f"{self.path}: a run is already here; use --resume or another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        write_resolved(config, self.path / "config.json")

    def append(self, record: dict[str, Any]) -> None:
        """Append one epoch/round record (non-finite floats written as null)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
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
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self) -> dict[str, Any]:
        """Load the latest checkpoint."""
        try:
            return torch.load(self.checkpoint_path, weights_only=True, map_location="cpu")
        except (RuntimeError, EOFError, OSError) as exc:
            raise DataError(f"{self.checkpoint_path}: unreadable checkpoint: {exc}") from None


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

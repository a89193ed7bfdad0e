"""Resumable on-device fine-tuning: the progress of ``fedsound personalize`` in ``PROFILE/personalize-checkpoint.pt``.

The fine-tune saves its state (weights, optimizer and schedule, both random generators, the step and the losses so
far) every ``every`` steps and at the end of each phase (the head warm-up, then the adapted weights). A later run
over the same profile index, global bundle, settings and seed continues from it to the same personal model as an
uninterrupted run; a checkpoint made from other inputs, or one that cannot be read, is set aside and the fine-tune
starts over. The file is private (0600) like the rest of the profile, written atomically, and removed once the
personal bundle is written.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.detector.profile import INDEX, Profile, write_private
from fl.config import PersonalizeConfig, to_dict
from fl.model_io import ModelFileError, read_archive

CHECKPOINT_NAME = "personalize-checkpoint.pt"
CHECKPOINT_EVERY = 100  # fine-tune steps between saves (a few seconds of work on a laptop)
PHASES = ("head", "adapt")


@dataclass(frozen=True)
class Progress:
    """A saved point of the fine-tune: ``phase`` ("head" or "adapt") and the steps of it already taken."""

    phase: str
    step: int
    state: dict[str, Any]


class FineTuneCheckpoint:
    """Where a fine-tune saves its progress (``path``) and the ``key`` that progress must carry to be resumed."""

    def __init__(self, path: Path, key: str, every: int = CHECKPOINT_EVERY) -> None:
        if every < 1:
            raise ValueError(f"checkpoint every: must be at least 1 step, got {every}")
        self.path = Path(path)
        self.key = key
        self.every = every
        self.discarded: str | None = None  # why a checkpoint found at load() was not resumed
        self.resumed: Progress | None = None  # what load() found to resume

    @classmethod
    def for_profile(cls, profile: Profile, base_manifest_sha256: str, settings: PersonalizeConfig, seed: int,
                    every: int = CHECKPOINT_EVERY) -> FineTuneCheckpoint:
        """The checkpoint of ``profile``'s fine-tune, keyed by its index (the takes), the global bundle, the
        settings and the seed."""
        inputs = {"profile_index_sha256": hashlib.sha256((profile.path / INDEX).read_bytes()).hexdigest(),
                  "base_manifest_sha256": base_manifest_sha256, "settings": to_dict(settings), "seed": seed}
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        return cls(profile.path / CHECKPOINT_NAME, key, every)

    def due(self, step: int, steps: int) -> bool:
        """Whether to save after ``step`` of a phase's ``steps``."""
        return step % self.every == 0 or step == steps

    def save(self, phase: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             schedule: torch.optim.lr_scheduler.LRScheduler | None, rng: np.random.Generator,
             losses: list[float]) -> None:
        """Replace the checkpoint with the state after ``step`` steps of ``phase``."""
        state = {"key": self.key, "phase": phase, "step": step, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict() if schedule else None,
                 "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "losses": losses}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_private(self.path, buffer.getvalue())

    def load(self) -> Progress | None:
        """The saved progress (also kept as ``resumed``), or None: no checkpoint, or one set aside (``discarded``
        says why)."""
        if not self.path.exists():
            return None
        try:
            state = read_archive(self.path, "fine-tune checkpoint")
        except ModelFileError as exc:
            self.discarded = str(exc)
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            self.discarded = f"{self.path}: made from other takes, global bundle, settings or seed"
            return None
        if state.get("phase") not in PHASES or not isinstance(state.get("step"), int):
            self.discarded = f"{self.path}: no phase and step"
            return None
        self.resumed = Progress(state["phase"], state["step"], state)
        return self.resumed

    def clear(self) -> None:
        """Remove the checkpoint (the personal bundle it led to is written)."""
        self.path.unlink(missing_ok=True)

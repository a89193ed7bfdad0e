"""Resumable on-device fine-tuning: the progress of ``fedsound personalize`` in ``PROFILE/personalize-checkpoint.pt``.

The fine-tune saves its state (weights, optimizer and schedule, both random generators, the step and the losses so
far) every ``every`` steps and at the end of each phase (the head warm-up, then the adapted weights). A later run
over the same profile index, global bundle, training settings, seed and training code continues from it to the
same personal model as an uninterrupted run. A checkpoint made from other inputs, one that cannot be read and one
that does not fit the model is deleted and the fine-tune starts over (``discarded`` says why). The file is private
(0600) like the rest of the profile, written atomically, and deleted once the personal bundle is written.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fl.frontend
import fl.models
from clients.detector.profile import INDEX, Profile, write_private
from fl.config import PersonalizeConfig, to_dict
from fl.model_io import ModelFileError, check_state_dict, read_archive

CHECKPOINT_NAME = "personalize-checkpoint.pt"
CHECKPOINT_EVERY = 100  # fine-tune steps between saves (a few seconds of work on a laptop)
PHASES = ("head", "adapt")
# [personalize] keys that only calibrate the fine-tuned model: changing them between a kill and the next run
# keeps the checkpoint (every other key, present or future, is part of its key).
CALIBRATION_KEYS = ("off-ratio", "brief-sound-max-on", "min-duration-ms", "min-duration-fraction",
                    "max-min-duration-ms", "run-margin-ms", "shortest-min-duration-ms", "onset-at-rise",
                    "rise-threshold", "refractory-ms", "min-onset-rise-db", "latency", "latency-holds-ms")
# The sources a fine-tune's result depends on: personalization (beside this file), the model, the frontend.
TRAINING_CODE = (Path(__file__).with_name("personalize.py"), Path(__file__), Path(fl.models.__file__),
                 Path(fl.frontend.__file__))


@dataclass(frozen=True)
class Progress:
    """A saved point of the fine-tune: ``phase`` ("head" or "adapt"), the steps of it already taken, and the
    saved ``state`` (the file's table) to restore."""

    phase: str
    step: int
    state: dict[str, Any]


def training_key(profile: Profile, base_manifest_sha256: str, settings: PersonalizeConfig, seed: int) -> str:
    """SHA-256 over everything a fine-tune's result depends on: the profile index, the global bundle, the
    training settings (not :data:`CALIBRATION_KEYS`), the seed and the training code."""
    code = hashlib.sha256()
    for path in TRAINING_CODE:
        code.update(path.read_bytes())
    inputs = {"profile_index_sha256": hashlib.sha256((profile.path / INDEX).read_bytes()).hexdigest(),
              "base_manifest_sha256": base_manifest_sha256, "seed": seed, "code_sha256": code.hexdigest(),
              "settings": {k: v for k, v in to_dict(settings).items() if k not in CALIBRATION_KEYS}}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


class FineTuneCheckpoint:
    """Where a fine-tune saves its progress (``path``) and the ``key`` that progress must carry to be resumed."""

    def __init__(self, path: Path, key: str, every: int = CHECKPOINT_EVERY) -> None:
        if every < 1:
            raise ValueError(f"checkpoint every: must be at least 1 step, got {every}")
        self.path = Path(path)
        self.key = key
        self.every = every
        self.discarded: str | None = None  # why a checkpoint found by load() was deleted instead of resumed
        self.resumed: Progress | None = None  # what load() found to resume

    @classmethod
    def for_profile(cls, profile: Profile, base_manifest_sha256: str, settings: PersonalizeConfig, seed: int,
                    every: int = CHECKPOINT_EVERY) -> FineTuneCheckpoint:
        """``PROFILE/personalize-checkpoint.pt`` with the :func:`training_key` of this fine-tune."""
        return cls(profile.path / CHECKPOINT_NAME, training_key(profile, base_manifest_sha256, settings, seed),
                   every)

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

    def load(self, model: torch.nn.Module, steps: Mapping[str, int]) -> Progress | None:
        """The saved progress for ``model`` (also kept as ``resumed``), whose phases take ``steps``; or None: no
        checkpoint, or one deleted because it belongs to other inputs or does not fit (``discarded`` says why)."""
        if not self.path.exists():
            return None
        try:
            state = read_archive(self.path, "fine-tune checkpoint")
            problem = self._misfit(state, model, steps)
        except ModelFileError as exc:
            problem = str(exc)
        if problem is not None:
            self.discarded = problem
            self.clear()
            return None
        self.resumed = Progress(state["phase"], state["step"], state)
        return self.resumed

    def _misfit(self, state: Any, model: torch.nn.Module, steps: Mapping[str, int]) -> str | None:
        """Why ``state`` cannot be resumed for ``model``, or None; weights that do not fit raise ModelFileError."""
        if not isinstance(state, dict) or state.get("key") != self.key:
            return f"{self.path}: made from other takes, global bundle, training settings, seed or code"
        phase, step, losses = state.get("phase"), state.get("step"), state.get("losses")
        if phase not in steps or type(step) is not int or not 0 < step <= steps[phase]:
            return f"{self.path}: phase {phase!r} and step {step!r} are not a point of this fine-tune"
        if not isinstance(losses, list) or len(losses) != step:
            return f"{self.path}: {step} steps but not as many losses"
        if not isinstance(state.get("model"), dict):
            return f"{self.path}: no weights"
        check_state_dict(self.path, model, state["model"])
        if not (isinstance(state.get("optimizer"), dict) and isinstance(state.get("numpy_rng"), dict)
                and isinstance(state.get("torch_rng"), torch.Tensor)
                and isinstance(state.get("schedule"), dict) == (phase == "adapt")):
            return f"{self.path}: optimizer, schedule or generator state missing"
        return None

    def clear(self) -> None:
        """Delete the checkpoint and any save a kill left half-written."""
        self.path.unlink(missing_ok=True)
        for partial in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            partial.unlink(missing_ok=True)

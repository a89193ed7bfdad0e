"""Model files: ``torch.save`` of plain types and tensors, loadable with ``torch.load(weights_only=True)``.

Layout (format ``fedsound-model``, version 1)::

    {"format": "fedsound-model", "version": 1,
     "config": {kebab-case ModelConfig}, "n_mels": int, "n_classes": int,
     "state_dict": {name: tensor}, "extra": {...}}   # extra: labels, frontend config, ... (plain types)
"""

from __future__ import annotations

import io
import numbers
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fl.config import model_from_dict, to_dict
from fl.errors import ConfigError, DataError
from fl.models import ModelConfig, build_model

FORMAT = "fedsound-model"
VERSION = 1
# Fields that change the weights or the meaning of the outputs; dropout is a training setting only.
ARCHITECTURE_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.name != "dropout")


class ModelFileError(DataError):
    """A model file is missing, not a fedsound model, or does not fit the expected architecture."""


def _plain(value: Any, where: str) -> Any:
    """Copy of ``value`` in builtin types only (numpy scalars become int/float/str), so that
    ``torch.load(weights_only=True)`` can read it back; anything else raises naming ``where``."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None or isinstance(value, bool | np.bool_):
        return None if value is None else bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise ModelFileError(f"{where}: key {key!r} is not a string")
        return {str(key): _plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, list | tuple):
        items = [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise ModelFileError(f"{where}: type {type(value).__name__} cannot be stored (plain types, tensors)")


def save_model(path: Path, model: nn.Module, extra: dict | None = None) -> None:
    """Write ``model`` (a fedsound model with ``config``, ``n_mels``, ``n_classes``) to ``path`` atomically.

    The file is first written beside ``path`` and then renamed over it, so an existing file is never left
    half-written.
    """
    path = Path(path)
    extra = _plain(dict(extra or {}), f"cannot save {path}: extra")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": to_dict(model.config),
        "n_mels": int(model.n_mels),
        "n_classes": int(model.n_classes),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_archive(path: Path, kind: str = "model file", map_location: str | torch.device = "cpu") -> Any:
    """The content of a ``torch.save`` file of plain types and tensors (a model file or a checkpoint), after
    checking every member's CRC (``torch.load`` does not); every problem is a one-line :class:`ModelFileError`
    naming ``kind`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{kind} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read {kind} {path}: {exc.strerror or exc}") from None
    try:
        bad_member = zipfile.ZipFile(io.BytesIO(data)).testzip()
    except (zipfile.BadZipFile, RuntimeError, ValueError, EOFError, OSError):
        raise ModelFileError(
            f"not a fedsound {kind}: {path} (not a torch.save archive, or truncated)"
        ) from None
    if bad_member is not None:
        raise ModelFileError(f"not a fedsound {kind}: {path} (corrupt: checksum error in {bad_member})")
    try:  # parsing from memory: any error below is about the content, not about the disk
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ModelFileError(
            f"not a fedsound {kind}: {path} (holds objects other than plain data and tensors)"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as exc:
        raise ModelFileError(f"not a fedsound {kind}: {path} (unreadable: {type(exc).__name__})") from None


def _read_payload(path: Path, map_location: str | torch.device) -> dict:
    payload = read_archive(path, "model file", map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"not a fedsound model file: {path} (no '{FORMAT}' format tag)")
    if payload.get("version") != VERSION:
        raise ModelFileError(
            f"{path}: unsupported fedsound model version {payload.get('version')!r} "
            f"(this build reads version {VERSION})"
        )
    for key in ("config", "state_dict", "extra"):
        if not isinstance(payload.get(key), dict):
            raise ModelFileError(f"{path}: '{key}' is missing or not a table")
    for key in ("n_mels", "n_classes"):
        value = payload.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelFileError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    return payload


def check_state_dict(path: Path, model: nn.Module, state: dict) -> None:
    """Raise :class:`ModelFileError` naming ``path`` unless ``state`` has exactly ``model``'s weights and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFileError(
            f"{path}: weights do not match the model config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelFileError(f"{path}: weight {key} is a {type(tensor).__name__}, not a tensor")
        if tensor.shape != expected[key].shape:
            raise ModelFileError(
                f"{path}: weight {key} has shape {tuple(tensor.shape)}, "
                f"the model config needs {tuple(expected[key].shape)}"
            )


def load_model(
    path: Path, expect: ModelConfig | None = None, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Load a model file written by :func:`save_model`; returns (model in eval mode, extra).

    ``expect`` checks the architecture (every ModelConfig field except dropout) and names the first field
    that differs. Every problem raises :class:`ModelFileError` naming the file.
    """
    path = Path(path)
    payload = _read_payload(path, map_location)
    try:
        config = model_from_dict(payload["config"], source=str(path))
    except ConfigError as exc:
        raise ModelFileError(str(exc)) from None
    if expect is not None:
        for name in ARCHITECTURE_FIELDS:
            found, wanted = getattr(config, name), getattr(expect, name)
            if found != wanted:
                key = name.replace("_", "-")
                raise ModelFileError(
                    f"{path}: architecture mismatch: model.{key} is {found!r} in the file, "
                    f"{wanted!r} expected"
                )
    model = build_model(config, payload["n_mels"], payload["n_classes"])
    check_state_dict(path, model, payload["state_dict"])
    model.load_state_dict(payload["state_dict"])
    model.to(map_location)
    return model.eval(), payload["extra"]

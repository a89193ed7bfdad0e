"""Detector bundles: a directory with everything the on-device detector needs, and nothing pickled.

Layout (format ``fedsound-bundle``, version ``VERSION``)::

    bundle.json              manifest (:mod:`clients.detector.manifest`)
    weights.pt               torch.save of {name: tensor} only, read with torch.load(weights_only=True)
    background.npy           float16 [n, patch_frames, n_mels] log-mel patches (training store, other recordings)
    background-labels.npy    uint8 [n, n_classes] their multi-hot labels   (both only with background patches)
    step.onnx, frontend.npz  the portable detector's step and frontend arrays (only with ``portable``)

:func:`load_bundle` checks the format, the version and every checksum before it reads anything else.

The background patches are a seeded random sample of training patches, optionally leaving out clips that carry
given labels, followed by any patches made from other recordings (:class:`ExtraBackground`), at most
``MAX_BACKGROUND_BYTES`` in all; on-device fine-tuning uses them as negatives.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import pickle
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.detector.manifest import (
    BACKGROUND,
    BACKGROUND_LABELS,
    FORMAT,
    MANIFEST,
    PORTABLE_FRONTEND,
    PORTABLE_STEP,
    VERSION,
    WEIGHTS,
    BundleError,
    file_sha256,
    manifest_digest,
    read_manifest,
)
from clients.detector.postprocess import class_confirm_frames, class_thresholds
from fl.config import (
    Config,
    DetectorConfig,
    FrontendConfig,
    frontend_from_dict,
    model_from_dict,
    to_dict,
)
from fl.errors import ConfigError
from fl.frontend import Frontend
from fl.model_io import load_model
from fl.models import TCN, build_model

DEFAULT_BACKGROUND_PATCHES = 128
MAX_BACKGROUND_BYTES = 4 * 1024 * 1024
# The global mouth-sound detector shipped as package data (``fedsound bench global --ship`` rebuilds it).
SHIPPED_BUNDLE = Path(str(importlib.resources.files("clients.detector") / "global_bundle"))


def shipped_bundle() -> Path | None:
    """The shipped global bundle's folder, or None in a checkout where it has not been built."""
    return SHIPPED_BUNDLE if (SHIPPED_BUNDLE / MANIFEST).is_file() else None


@dataclass(frozen=True)
class ExtraBackground:
    """Background patches ``[n, patch_frames, n_mels]`` made outside the training store, all labelled ``label``;
    ``provenance`` (plain JSON data) says where they came from."""

    patches: np.ndarray
    label: str
    provenance: dict[str, Any]


@dataclass
class Bundle:
    """A loaded, verified detector bundle."""

    path: Path
    model: TCN
    frontend_config: FrontendConfig
    labels: list[str]
    mids: list[str]
    detector: DetectorConfig
    manifest: dict[str, Any]

    @property
    def receptive_field(self) -> int:
        """Frames of input one output frame depends on."""
        return self.model.receptive_field

    def frontend(self) -> Frontend:
        """A :class:`Frontend` for this bundle's configuration."""
        return Frontend(self.frontend_config)

    def background(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Background patches ``[n, T, n_mels]`` (float32) and their labels ``[n, n_classes]``, if carried."""
        if self.manifest.get("background") is None:
            return None
        patches = _load_npy(self.path / BACKGROUND)
        labels = _load_npy(self.path / BACKGROUND_LABELS)
        return patches.astype(np.float32), labels


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable array ({exc})") from None


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` directory to ``target``; an older bundle there is replaced at the end."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old)


def write_bundle(
    path: Path,
    model: TCN,
    frontend: FrontendConfig,
    labels: Sequence[str],
    mids: Sequence[str],
    detector: DetectorConfig,
    background: tuple[np.ndarray, np.ndarray] | None = None,
    provenance: dict[str, Any] | None = None,
    portable: bool = False,
) -> Path:
    """Write a bundle directory atomically (built beside ``path``, then renamed over it); returns ``path``.

    ``background`` is (patches ``[n, T, n_mels]``, multi-hot labels ``[n, n_classes]``), stored as float16
    and uint8. ``provenance`` (plain JSON data: where the weights and patches came from) is recorded as is.
    ``portable`` also writes the ONNX step and the frontend's arrays (:mod:`clients.detector.onnx_export`; needs
    the ``onnx`` package). An existing bundle at ``path`` is replaced; any other existing file or non-empty
    directory is refused.
    """
    path = Path(path)
    if not isinstance(model, TCN):
        raise BundleError(f"{path}: only TCN models can be exported (they have a streaming step)")
    if len(labels) != model.n_classes or len(mids) != model.n_classes:
        raise BundleError(f"{path}: {len(labels)} labels and {len(mids)} mids for {model.n_classes} classes")
    if frontend.n_mels != model.n_mels:
        raise BundleError(f"{path}: frontend has {frontend.n_mels} mel bands, the model {model.n_mels}")
    if path.exists() and not (path / MANIFEST).is_file() and (path.is_file() or any(path.iterdir())):
        raise BundleError(f"{path}: exists and is not a detector bundle; refusing to overwrite it")
    class_thresholds(labels, detector)  # per-class settings must name known labels
    frame_s = frontend.frame_s
    confirm_frames = int(class_confirm_frames(labels, detector, frame_s).max())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, tmp / WEIGHTS)
        background_info = None
        if background is not None:
            patches, patch_labels = background
            np.save(tmp / BACKGROUND, np.asarray(patches, dtype=np.float16), allow_pickle=False)
            np.save(tmp / BACKGROUND_LABELS, np.asarray(patch_labels, dtype=np.uint8), allow_pickle=False)
            background_info = {"patches": int(len(patches)), "patch_frames": int(patches.shape[1]),
                               "dtype": "float16"}
        portable_info = _write_portable(tmp, model, frontend) if portable else None
        frame_ms = 1000.0 * frame_s
        frontend_delay_ms = 1000.0 * frontend.delay_s
        postprocess_ms = (confirm_frames - 1) * frame_ms  # the slowest class
        files = sorted(p.name for p in tmp.iterdir())
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "model": {"config": to_dict(model.config), "n_mels": int(model.n_mels),
                      "n_classes": int(model.n_classes)},
            "frontend": to_dict(frontend),
            "labels": list(labels),
            "mids": list(mids),
            "detector": to_dict(detector),
            "receptive_field": {"frames": model.receptive_field, "ms": model.receptive_field * frame_ms},
            "latency_ms": {"frontend_delay": frontend_delay_ms, "postprocess": postprocess_ms,
                           "algorithmic": frontend_delay_ms + postprocess_ms},
            "background": background_info,
            "portable": portable_info,
            "provenance": provenance or {},
            "files": {name: file_sha256(tmp / name) for name in files},
        }
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write_portable(folder: Path, model: TCN, frontend: FrontendConfig) -> dict[str, Any]:
    """Write ``step.onnx`` and ``frontend.npz`` into ``folder``; returns the manifest's ``portable`` entry."""
    try:
        from clients.detector.onnx_export import OPSET, cache_shapes, frontend_arrays, step_onnx
    except ImportError:
        raise BundleError("the portable files need the onnx package: pip install onnx") from None
    (folder / PORTABLE_STEP).write_bytes(step_onnx(model))
    (folder / PORTABLE_FRONTEND).write_bytes(frontend_arrays(Frontend(frontend)))
    return {"step": PORTABLE_STEP, "frontend": PORTABLE_FRONTEND, "opset": OPSET, "caches": cache_shapes(model)}


def _sample_background(store_path: Path, frontend: FrontendConfig, labels: Sequence[str], count: int,
                       exclude_labels: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """A seeded random sample of train patches whose clips carry none of ``exclude_labels``."""
    from fl.store import FeatureStore

    store = FeatureStore(store_path)
    if store.frontend != frontend:
        raise BundleError(f"{store_path}: the store's frontend differs from the model's; "
                          "export with the store the model was trained on")
    if list(store.labels) != list(labels):
        raise BundleError(f"{store_path}: the store's vocabulary differs from the model's labels")
    unknown = sorted(set(exclude_labels) - set(labels))
    if unknown:
        raise BundleError(f"{store_path}: labels to exclude are not in the vocabulary: {unknown}")
    table = store.table("train")
    excluded = [list(labels).index(label) for label in exclude_labels]
    keep = np.flatnonzero(~table.labels[:, excluded].any(axis=1))
    rows = store.patch_index("train", keep)
    bytes_per_patch = frontend.patch_frames * frontend.n_mels * 2
    count = min(count, len(rows), MAX_BACKGROUND_BYTES // bytes_per_patch)
    rng = np.random.default_rng(seed)
    chosen = rows[np.sort(rng.choice(len(rows), size=count, replace=False))]
    patches = store.read_patches("train", chosen)
    info = {"store": str(store_path), "split": "train", "seed": seed, "excluded_labels": list(exclude_labels)}
    return patches, table.labels[chosen[:, 0]], info


def _with_extra(background: tuple[np.ndarray, np.ndarray] | None, extra: ExtraBackground,
                frontend: FrontendConfig, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``background`` (patches, labels) followed by ``extra``'s patches, within ``MAX_BACKGROUND_BYTES``."""
    shape = (frontend.patch_frames, frontend.n_mels)
    if extra.patches.ndim != 3 or extra.patches.shape[1:] != shape:
        raise BundleError(f"extra background: patches of shape {extra.patches.shape} do not match the frontend's "
                          f"[n, {shape[0]}, {shape[1]}]")
    if extra.label not in labels:
        raise BundleError(f"extra background: label {extra.label!r} is not in the vocabulary")
    extra_labels = np.zeros((len(extra.patches), len(labels)), dtype=np.uint8)
    extra_labels[:, list(labels).index(extra.label)] = 1
    if background is None:
        patches, patch_labels = extra.patches, extra_labels
    else:
        patches = np.concatenate([background[0], extra.patches])
        patch_labels = np.concatenate([background[1], extra_labels])
    if patches.size * 2 > MAX_BACKGROUND_BYTES:  # stored as float16
        raise BundleError(f"extra background: {len(patches)} patches exceed the bundle's "
                          f"{MAX_BACKGROUND_BYTES // 2**20} MiB of background")
    return patches, patch_labels


def export_bundle(
    model_path: Path,
    bundle: Path,
    config: Config,
    store: Path | None = None,
    background_patches: int = DEFAULT_BACKGROUND_PATCHES,
    exclude_labels: Sequence[str] = (),
    portable: bool = False,
    extra_background: ExtraBackground | None = None,
) -> Path:
    """Model file -> detector bundle at ``bundle`` (see the module docstring); returns the bundle path.

    Frontend and labels come from the model file's ``extra``; ``config.detector`` gives the post-processing
    settings. With ``store``, up to ``background_patches`` train patches (``config.seed``) are carried, then the
    patches of ``extra_background``; with ``portable``, the ONNX step and the frontend's arrays.
    """
    model_path = Path(model_path)
    model, extra = load_model(model_path)
    if not isinstance(model, TCN):
        raise BundleError(f"{model_path}: a {model.config.name!r} model has no streaming step; "
                          "only TCN models can be exported to a detector bundle")
    missing = [key for key in ("labels", "mids", "frontend") if key not in extra]
    if missing:
        raise BundleError(f"{model_path}: model file lacks {', '.join(missing)} (needed for a bundle)")
    frontend = frontend_from_dict(extra["frontend"], str(model_path))
    labels, mids = list(extra["labels"]), list(extra["mids"])
    background = None
    provenance: dict[str, Any] = {"model_file": str(model_path)}
    if store is not None:
        patches, patch_labels, info = _sample_background(Path(store), frontend, labels, background_patches,
                                                         exclude_labels, config.seed)
        background = (patches, patch_labels)
        provenance["background"] = info
    if extra_background is not None:
        background = _with_extra(background, extra_background, frontend, labels)
        provenance["extra_background"] = extra_background.provenance
    return write_bundle(bundle, model, frontend, labels, mids, config.detector, background, provenance, portable)


def load_bundle(source: Path) -> Bundle:
    """Load and verify a bundle (``source``: a bundle, or a profile with ``personal/``; see
    :func:`clients.detector.manifest.read_manifest`); every problem is a BundleError."""
    manifest = read_manifest(source)
    path, manifest_path = manifest.path, manifest.path / MANIFEST
    try:
        model_info = manifest.data["model"]
        model = build_model(model_from_dict(model_info["config"], str(manifest_path)),
                            model_info["n_mels"], model_info["n_classes"])
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise BundleError(str(exc)) from None
        raise BundleError(f"{manifest_path}: malformed manifest ({type(exc).__name__}: {exc})") from None
    if not isinstance(model, TCN):
        raise BundleError(f"{manifest_path}: the bundle's model is not a TCN")
    try:
        state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path / WEIGHTS}: weights unreadable or not matching the manifest ({first_line})"
                          ) from None
    return Bundle(path=path, model=model.eval(), frontend_config=manifest.frontend_config,
                  labels=manifest.labels, mids=manifest.mids, detector=manifest.detector, manifest=manifest.data)

"""Detector bundle manifests, read and verified without torch (the portable detector needs no more).

A bundle is a folder: ``bundle.json`` (this manifest) and the files it lists with their SHA-256. The manifest
holds the format tag and version, the model architecture, the frontend configuration, the label names and
AudioSet mids, the post-processing settings, the receptive field, the algorithmic latency, a description of the
background patches, the portable files (``portable``: an ONNX streaming step and the frontend's arrays), the
SHA-256 of every other file (``files``) and ``manifest_sha256``, the SHA-256 of the manifest itself (canonical
JSON without that key). :func:`read_manifest` checks the format, the version and every checksum before anything
else is read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl.config import Config, DetectorConfig, FrontendConfig, apply, frontend_from_dict
from fl.errors import ConfigError, DataError

FORMAT = "fedsound-bundle"
VERSION = 1
MANIFEST = "bundle.json"
WEIGHTS = "weights.pt"
BACKGROUND = "background.npy"
BACKGROUND_LABELS = "background-labels.npy"
PORTABLE_STEP = "step.onnx"
PORTABLE_FRONTEND = "frontend.npz"


class BundleError(DataError):
    """A detector bundle is missing, tampered with, of another format version, or cannot be exported."""


@dataclass
class Manifest:
    """A verified manifest: where the bundle is and what it says."""

    path: Path
    data: dict[str, Any]
    frontend_config: FrontendConfig
    labels: list[str]
    mids: list[str]
    detector: DetectorConfig

    @property
    def portable(self) -> dict[str, Any] | None:
        """The portable files' description (``None`` when the bundle was exported without them)."""
        return self.data.get("portable")

    def latency_detector(self, choice: str) -> DetectorConfig:
        """The detector settings personalization calibrated for latency ``choice`` (``safe``, ``balanced`` or
        ``fast``); BundleError when this bundle has none (a global bundle, or one personalized before the
        choice existed)."""
        choices = (self.data.get("provenance") or {}).get("latency", {}).get("detectors", {})
        if choice not in choices:
            have = f"it has {', '.join(sorted(choices))}" if choices else "personalize it first"
            raise BundleError(f"{self.path}: no detector settings for latency {choice!r} ({have})")
        return apply(Config(), {"detector": choices[choice]}, str(self.path / MANIFEST)).detector


def file_sha256(path: Path) -> str:
    """SHA-256 hex of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of a manifest without its own ``manifest_sha256`` key (sorted-key JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def resolve_bundle(source: Path) -> Path:
    """The bundle directory for ``source``: a bundle itself, or a profile holding ``personal/bundle.json``."""
    source = Path(source)
    for candidate in (source, source / "personal"):
        if (candidate / MANIFEST).is_file():
            return candidate
    raise BundleError(f"{source}: no detector bundle here (expected {MANIFEST} or personal/{MANIFEST})")


def read_manifest(source: Path) -> Manifest:
    """Read and verify a bundle's manifest and the checksum of every file it lists; every problem is a
    BundleError naming the file."""
    path = resolve_bundle(source)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc}); the bundle is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not a fedsound detector bundle (no '{FORMAT}' format tag)")
    if manifest.get("version") != VERSION:
        raise BundleError(f"{path}: detector bundle format version {manifest.get('version')!r} is not "
                          f"supported (this build reads version {VERSION}); export the bundle again")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise BundleError(f"{manifest_path}: checksum mismatch: the manifest was modified")
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise BundleError(f"{manifest_path}: no checksum list for the bundle's files")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: missing from the bundle")
        if file_sha256(file) != digest:
            raise BundleError(f"{file}: checksum mismatch: the bundle was modified or damaged")
    try:
        frontend = frontend_from_dict(manifest["frontend"], str(manifest_path))
        detector = apply(Config(), {"detector": manifest["detector"]}, str(manifest_path)).detector
        labels, mids = list(manifest["labels"]), list(manifest["mids"])
        n_classes = manifest["model"]["n_classes"]
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise BundleError(str(exc)) from None
        raise BundleError(f"{manifest_path}: malformed manifest ({type(exc).__name__}: {exc})") from None
    if len(labels) != n_classes:
        raise BundleError(f"{manifest_path}: {len(labels)} labels for {n_classes} classes")
    portable = manifest.get("portable")
    if portable is not None and not (isinstance(portable, dict)
                                     and {portable.get("step"), portable.get("frontend")} <= set(files)):
        raise BundleError(f"{manifest_path}: 'portable' names files the bundle does not list")
    return Manifest(path, manifest, frontend, labels, mids, detector)

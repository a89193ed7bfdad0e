"""Real recordings of people and music from Debian packages, split by speaker and by piece between training, a
bank of negatives, tuning and test.

The mouth-sound detector must stay silent on the speech and music around a user. Synthesis alone does not say
whether it will: :data:`PACKAGES` are Debian packages of recorded telephone prompts (each one speaker, 8 kHz) and
of music (each track one piece: telephone music on hold, three games' soundtracks and a rhythm game's rock songs).
Their split is fixed here, before any tuning, and keeps every speaker in one split (packages of one language share a
split, in case two of them share a voice) and every piece of music in one split (a soundtrack, one composer, in one
split):

- ``train``: the background class of the global mouth-sound model (:mod:`data_prep.mouth_corpus`), and with
  ``bank`` the real negatives every personal detector trains against (the global bundle's background patches);
- ``bank``: only those negatives, never the global model's corpus: music unlike ``train``'s, so that a personal
  detector hears more than one genre without changing what the global model learns;
- ``tune``: what benchmark settings may be chosen on;
- ``test``: the aggressor audio whose false triggers the personalization benchmark reports.

``fedsound data real-audio OUT`` fetches the packages with ``apt-get download`` (no root needed), unpacks each
with ``dpkg-deb -x`` and writes its recordings as 16-bit mono WAV of at most :data:`MAX_RATE` Hz (peak at most 1)
under ``OUT/SPLIT/PACKAGE/`` with ``OUT/PACKAGE.json`` (files and seconds; the few empty or unreadable prompts some
packages hold are listed there as skipped; a symbolic link, another name for a recording, is not read), then
``OUT/manifest.json``. A package whose JSON exists with the same layout (its entry in :data:`PACKAGES`) is
skipped, so an interrupted fetch resumes; one of another layout, or of none, is unpacked again, and the manifest is
removed first, so that no manifest names files being rewritten. ``--debs DIR`` takes already-downloaded ``.deb``
files instead. :class:`RealAudio` reads the result.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from data_prep.mouth_sounds import SAMPLE_RATE
from fl.audio import AudioFileError, read_audio, to_mono
from fl.dsp import resample
from fl.errors import DataError
from fl.jsonfile import write_json_atomic

SPLITS = ("train", "bank", "tune", "test")
KINDS = ("speech", "music")
MANIFEST = "manifest.json"
AUDIO_SUFFIXES = (".wav", ".gsm", ".ogg", ".mp3")
MAX_RATE = SAMPLE_RATE  # the detector's rate: recordings above it are resampled to it


@dataclass(frozen=True)
class Package:
    """A Debian package of recordings: what it holds (``speech`` or ``music``) and the split of each file
    (``split``, or per file stem in ``tracks``)."""

    kind: str
    split: str = ""
    tracks: Mapping[str, str] | None = None

    def split_of(self, stem: str) -> str | None:
        """The split of the file named ``stem``; None for a file the package should not hold."""
        return self.tracks.get(stem) if self.tracks is not None else self.split

    def layout(self) -> dict:
        """What the package holds and where, as its record keeps it (a record of another layout is refetched)."""
        return {"kind": self.kind, "split": self.split, "tracks": dict(self.tracks) if self.tracks else None}


PACKAGES: dict[str, Package] = {
    "asterisk-core-sounds-en-wav": Package("speech", "train"),
    "asterisk-core-sounds-ru-wav": Package("speech", "train"),
    "asterisk-core-sounds-it-wav": Package("speech", "train"),
    "asterisk-prompt-it-menardi-wav": Package("speech", "train"),
    "asterisk-core-sounds-fr-wav": Package("speech", "tune"),
    "asterisk-prompt-fr-armelle": Package("speech", "tune"),
    "asterisk-core-sounds-es-wav": Package("speech", "test"),
    "asterisk-prompt-es-co": Package("speech", "test"),
    "asterisk-moh-opsound-wav": Package("music", tracks={
        "macroform-robot_dity": "train", "macroform-cold_day": "train", "macroform-the_simplicity": "train",
        "reno_project-system": "tune", "manolo_camp-morning_coffee": "tune"}),
    "asc-music": Package("music", "tune"),  # three tracks, 18 minutes
    "fretsonfire-songs-muldjord": Package("music", "tune"),  # four metal songs, backing and lead guitar apart
    "fretsonfire-songs-sectoid": Package("music", "tune"),  # four rock songs, backing and lead guitar apart
    "drascula-music": Package("music", "test"),  # 31 tracks, 47 minutes
    "wesnoth-1.16-music": Package("music", "bank"),  # 41 orchestral tracks, 2.1 hours
}


def _run(command: Sequence[str], what: str, cwd: Path | None = None) -> None:
    try:
        result = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DataError(f"{what}: {command[0]} not found (a Debian or Ubuntu system is needed, or --debs DIR "
                        "with the .deb files)") from None
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise DataError(f"{what}: {' '.join(command[:2])} failed ({detail})")


def _download(name: str, folder: Path) -> None:
    """``apt-get download NAME`` into ``folder``, through a temporary folder so that a partial download is never
    taken for a finished one."""
    folder.mkdir(exist_ok=True)
    if list(folder.glob(f"{name}_*.deb")):
        return
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        _run(["apt-get", "download", name], name, cwd=Path(tmp))
        for fetched in Path(tmp).glob("*.deb"):
            fetched.replace(folder / fetched.name)


def _deb_file(package: str, debs: Path) -> Path:
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise DataError(f"{debs}: no {package}_*.deb file")
    return found[-1]


def _fetch_package(name: str, package: Package, out: Path, debs: Path) -> dict:
    """Unpack one package's .deb and write its recordings; returns the package's record."""
    deb = _deb_file(name, debs)
    files: list[dict] = []
    skipped: list[dict] = []
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], name)
        sources = sorted(p for p in Path(tmp).rglob("*")
                         if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file() and not p.is_symlink())
        for source in sources:
            split = package.split_of(source.stem)
            if split is None:
                continue
            try:
                wave, rate = read_audio(source)
            except AudioFileError as exc:  # a few prompts in these packages are empty: listed, not used
                skipped.append({"path": str(source.relative_to(tmp)), "reason": str(exc).rsplit(": ", 1)[-1]})
                continue
            relative = Path(split) / name / source.relative_to(tmp).with_suffix(".wav")
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            mono = to_mono(wave)
            if rate > MAX_RATE:
                mono, rate = resample(mono, rate, MAX_RATE), MAX_RATE
            peak = float(np.max(np.abs(mono)))
            sf.write(target, mono / peak if peak > 1.0 else mono, rate, subtype="PCM_16")
            files.append({"path": str(relative), "split": split, "seconds": len(mono) / rate, "rate": rate})
    if not files:
        raise DataError(f"{deb}: holds no recordings ({', '.join(AUDIO_SUFFIXES)} files)")
    return {"package": name, "kind": package.kind, "layout": package.layout(), "deb": deb.name,
            "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest(), "files": files, "skipped": skipped}


def fetch_real_audio(out: Path, debs: Path | None = None, packages: Mapping[str, Package] | None = None,
                     progress: bool = True) -> Path:
    """Fetch and unpack the recordings of ``packages`` (default :data:`PACKAGES`) into ``out``; returns the
    manifest's path. ``debs``: a folder of ``PACKAGE_VERSION_all.deb`` files to use instead of downloading.
    Packages already written (their ``out/PACKAGE.json``) with the same layout are kept (another is unpacked
    again, after ``out/manifest.json`` is removed); DataError names a package that fails."""
    packages = dict(PACKAGES if packages is None else packages)
    for name, package in packages.items():
        if package.kind not in KINDS or any(s not in SPLITS for s in (
                [package.split] if package.tracks is None else package.tracks.values())):
            raise DataError(f"{name}: kind must be one of {KINDS} and splits among {SPLITS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    download = out / "debs"
    records = {}
    for name, package in tqdm(packages.items(), desc="real audio", unit="package", disable=not progress):
        record_path = out / f"{name}.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if record.get("layout") == package.layout():
                records[name] = record
                continue
        (out / MANIFEST).unlink(missing_ok=True)  # written again once every package is
        if debs is None:
            _download(name, download)
        for stale in (out / split / name for split in SPLITS):
            shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted unpack
        records[name] = _fetch_package(name, package, out, Path(debs) if debs is not None else download)
        write_json_atomic(record_path, records[name])
    manifest = out / MANIFEST
    write_json_atomic(manifest, {"packages": records})
    return manifest


class RealAudio:
    """The recordings :func:`fetch_real_audio` wrote under ``root``: their files by split and kind, and stretches
    of them at any sample rate."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise DataError(f"{self.root}: no {MANIFEST}; fetch the recordings with `fedsound data real-audio "
                            f"{self.root}`")
        self.manifest_sha256 = hashlib.sha256(manifest.read_bytes()).hexdigest()
        try:
            packages = json.loads(manifest.read_text(encoding="utf-8"))["packages"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{manifest}: not a real-audio manifest ({exc})") from None
        self.files: dict[tuple[str, str], dict[str, list[Path]]] = {}
        for name, record in sorted(packages.items()):
            for entry in record["files"]:
                by_source = self.files.setdefault((entry["split"], record["kind"]), {})
                by_source.setdefault(name, []).append(self.root / entry["path"])
        self._waves: dict[Path, tuple[np.ndarray, int]] = {}

    def sources(self, split: str, kind: str) -> list[str]:
        """The packages (speakers, or music) holding recordings of ``kind`` in ``split``."""
        return sorted(self.files.get((split, kind), {}))

    def _wave(self, path: Path) -> tuple[np.ndarray, int]:
        if path not in self._waves:
            wave, rate = read_audio(path)
            self._waves[path] = (to_mono(wave).copy(), rate)
        return self._waves[path]

    def stretch(self, split: str, kind: str, seconds: float, seed: int | Sequence[int],
                sample_rate: int) -> np.ndarray:
        """``seconds`` of ``kind`` recordings of ``split`` at ``sample_rate``, peak 1: speech is one speaker's
        prompts drawn at random, end to end with pauses of 0.1-0.8 s; music a stretch of a track from a random
        point (continuing into the next track). DataError if the split holds no such recording."""
        by_source = self.files.get((split, kind))
        if not by_source:
            raise DataError(f"{self.root}: no {kind} recordings in the {split} split "
                            f"(fedsound data real-audio {self.root} fetches every split)")
        rng = np.random.default_rng(seed)
        files = by_source[self.sources(split, kind)[rng.integers(len(by_source))]]
        pieces, rate, total = [], None, 0
        need = int(seconds * 8000) + 1
        first = True
        while total < need:
            wave, rate_here = self._wave(files[rng.integers(len(files))])
            rate = rate or rate_here
            if rate_here != rate:
                wave = resample(wave, rate_here, rate)
            if kind == "music":
                wave = wave[int(rng.uniform(0, 0.9) * len(wave)):] if first else wave
            else:
                wave = np.concatenate((wave, np.zeros(int(rng.uniform(0.1, 0.8) * rate), np.float32)))
            first = False
            pieces.append(wave)
            total += int(len(wave) * 8000 / rate)
        out = resample(np.concatenate(pieces), rate, sample_rate)[: int(seconds * sample_rate)]
        peak = float(np.max(np.abs(out))) if len(out) else 0.0
        return (out / peak if peak > 0 else out).astype(np.float32)

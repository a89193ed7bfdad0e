"""A user's private profile folder: enrolled examples of their sounds, background material, personal model.

Layout (format ``fedsound-profile``, version ``VERSION``)::

    PROFILE/                      0700
      profile.json                0600  index (below)
      sounds/<sound>/0001.wav     0600  one take per file (PCM 16-bit, mono, at the rate it was recorded)
      background/0001.wav         0600  background material: room noise, the user's own speech
      personal/                   0700  the personal detector bundle written by ``fedsound personalize``
      personalize-checkpoint.pt   0600  an unfinished fine-tune (clients/detector/checkpoint.py)

``profile.json``: ``{"format", "version", "sounds": {sound: [example, ...]}, "background": [example, ...]}``
where an example is ``{"file" (relative), "sample_rate", "seconds", "segments" ([[onset_s, offset_s], ...],
the frames that carry the sound; empty for background), "source" ("microphone" or the imported file's name),
"added" (UTC ISO time)}``.

Every folder is created 0700 and every file 0600 (whatever the umask); files are written beside their
target and renamed into place, and the index is rewritten atomically after the audio it lists, so an
interrupted enrollment never loses or corrupts what was enrolled before. Nothing here opens a network
connection, and nothing of a profile is sent anywhere.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from clients.detector.audio_input import AudioInputError, read_mono
from fl.errors import DataError

FORMAT = "fedsound-profile"
VERSION = 1
INDEX = "profile.json"
SOUNDS_DIR = "sounds"
BACKGROUND_DIR = "background"
PERSONAL_DIR = "personal"
DIR_MODE = 0o700
FILE_MODE = 0o600
RESERVED_NAMES = ("background",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")


class ProfileError(DataError):
    """A profile folder is unusable: not a profile, damaged index, bad sound name, missing audio."""


@dataclass
class Example:
    """One enrolled take (a sound example or background material)."""

    file: str
    sample_rate: int
    seconds: float
    segments: list[list[float]] = field(default_factory=list)
    source: str = "microphone"
    added: str = ""


@dataclass
class Take:
    """Audio to enroll: mono float samples, their rate, the sound's segments (seconds) and where it came from."""

    wave: np.ndarray
    sample_rate: int
    segments: list[tuple[float, float]]
    source: str


def check_sound_name(name: str) -> str:
    """``name`` if usable as a label and folder name (letters, digits, ``-``, ``_``; up to 32), else an error."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ProfileError(f"sound name {name!r}: use letters, digits, '-' and '_' (up to 32, starting with a "
                           "letter or digit)")
    if name.lower() in RESERVED_NAMES:
        raise ProfileError(f"sound name {name!r} is reserved (use --background for background material)")
    return name


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents inside it) with mode 0700; an existing one is set to 0700."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (a temporary file beside it, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_private_tree(root: Path) -> None:
    """Set every folder under ``root`` (itself included) to 0700 and every file to 0600."""
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(Path(dirpath) / name, DIR_MODE)
        for name in filenames:
            os.chmod(Path(dirpath) / name, FILE_MODE)


def _wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(wave, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


class Profile:
    """An open profile folder (see the module docstring)."""

    def __init__(self, path: Path, sounds: dict[str, list[Example]], background: list[Example]) -> None:
        self.path = path
        self.sounds = sounds
        self.background = background

    @classmethod
    def load(cls, path: Path) -> Profile:
        """Open an existing profile; a missing or damaged one is a ProfileError naming the file."""
        path = Path(path)
        index = path / INDEX
        if not index.is_file():
            raise ProfileError(f"{path}: not a fedsound profile (no {INDEX}); enroll sounds first with "
                               f"`fedsound enroll {path} --sound NAME ...`")
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"{index}: damaged profile index ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"{index}: not a fedsound profile index (no '{FORMAT}' format tag)")
        if data.get("version") != VERSION:
            raise ProfileError(f"{index}: profile version {data.get('version')!r} is not supported "
                               f"(this build reads version {VERSION})")
        try:
            sounds = {check_sound_name(name): [Example(**e) for e in examples]
                      for name, examples in data["sounds"].items()}
            background = [Example(**e) for e in data["background"]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ProfileError(f"{index}: malformed profile index ({type(exc).__name__}: {exc})") from None
        return cls(path, sounds, background)

    @classmethod
    def open(cls, path: Path) -> Profile:
        """Open a profile for writing, creating it (0700) when ``path`` does not exist or is an empty folder."""
        path = Path(path)
        if (path / INDEX).is_file():
            profile = cls.load(path)
            make_private_dir(path)
            return profile
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ProfileError(f"{path}: exists and is not a fedsound profile; refusing to use it")
        make_private_dir(path)
        profile = cls(path, {}, [])
        profile.save_index()
        return profile

    @property
    def personal_dir(self) -> Path:
        """Where the personal detector bundle lives."""
        return self.path / PERSONAL_DIR

    def counts(self) -> dict[str, int]:
        """Examples enrolled per sound."""
        return {name: len(examples) for name, examples in self.sounds.items()}

    @property
    def background_seconds(self) -> float:
        """Seconds of background material enrolled."""
        return float(sum(e.seconds for e in self.background))

    def save_index(self) -> None:
        """Rewrite ``profile.json`` atomically."""
        data = {"format": FORMAT, "version": VERSION,
                "sounds": {name: [asdict(e) for e in examples] for name, examples in sorted(self.sounds.items())},
                "background": [asdict(e) for e in self.background]}
        write_private(self.path / INDEX, (json.dumps(data, indent=2) + "\n").encode("utf-8"))

    def add(self, sound: str | None, takes: Sequence[Take]) -> list[Example]:
        """Store ``takes`` as examples of ``sound`` (``None``: background material); returns the new examples.

        The audio files are written first, then the index, so the profile never lists a missing file.
        """
        if sound is not None:
            check_sound_name(sound)
        folder = self.path / (BACKGROUND_DIR if sound is None else f"{SOUNDS_DIR}/{sound}")
        make_private_dir(self.path / (BACKGROUND_DIR if sound is None else SOUNDS_DIR))
        make_private_dir(folder)
        existing = self.background if sound is None else self.sounds.get(sound, [])
        numbers = [int(Path(e.file).stem) for e in existing if Path(e.file).stem.isdigit()]
        numbers += [int(p.stem) for p in folder.glob("*.wav") if p.stem.isdigit()]
        next_number = max(numbers, default=0) + 1
        added = []
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        for k, take in enumerate(takes):
            wave = np.asarray(take.wave, dtype=np.float32)
            if wave.ndim != 1 or not len(wave):
                raise ProfileError(f"take from {take.source}: expected non-empty mono audio, got shape {wave.shape}")
            target = folder / f"{next_number + k:04d}.wav"
            write_private(target, _wav_bytes(wave, take.sample_rate))
            added.append(Example(file=str(target.relative_to(self.path)), sample_rate=int(take.sample_rate),
                                 seconds=round(len(wave) / take.sample_rate, 4),
                                 segments=[[round(a, 4), round(b, 4)] for a, b in take.segments],
                                 source=take.source, added=now))
        if sound is None:
            self.background.extend(added)
        else:
            self.sounds.setdefault(sound, []).extend(added)
        self.save_index()
        return added

    def read(self, example: Example) -> tuple[np.ndarray, int]:
        """The audio of an example: mono float32 samples and their rate."""
        path = self.path / example.file
        if not path.is_file():
            raise ProfileError(f"{path}: listed in {self.path / INDEX} but missing")
        try:
            return read_mono(path)
        except AudioInputError as exc:
            raise ProfileError(str(exc)) from None


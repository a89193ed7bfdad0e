"""Builds tiny FSD50K-format trees for tests: audio, ground truth, vocabulary and clips_info with uploaders.

A tree is described by a list of :class:`TreeClip`; :func:`write_fsd_tree` writes it in the release layout
(``FSD50K.dev_audio/``, ``FSD50K.eval_audio/``, ``FSD50K.ground_truth/{dev,eval,vocabulary}.csv``,
``FSD50K.metadata/{dev,eval}_clips_info_FSD50K.json``). Helpers damage files afterwards (garbage bytes,
truncation) so tests can make each kind of bad input.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 44100
VOCABULARY = (
    ("Bark", "/m/05tny_"),
    ("Clapping", "/m/0l15bq"),
    ("Meow", "/m/07qrkrw"),
    ("Whistling", "/m/07pggtn"),
)
AUDIO_DIRS = {"dev": "FSD50K.dev_audio", "eval": "FSD50K.eval_audio"}


@dataclass
class TreeClip:
    """One clip of a test tree.

    ``wave`` is ``[n]`` (mono) or ``[n, channels]``; None writes no audio file. ``listed=False`` leaves the
    clip out of the ground-truth CSV (an audio file without a row). ``uploader=""`` writes a clips_info entry
    without an uploader.
    """

    fname: str
    split: str  # train | val | eval
    uploader: str
    labels: tuple[str, ...]
    wave: np.ndarray | None
    rate: int = RATE
    subtype: str = "PCM_16"
    listed: bool = True

    @property
    def part(self) -> str:
        """``dev`` or ``eval``: the release folder the clip lives in."""
        return "eval" if self.split == "eval" else "dev"


def tone(seconds: float, rate: int = RATE, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """A deterministic test signal: a decaying sine plus a little noise, float32 in [-1, 1]."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    noise = np.random.default_rng(seed).standard_normal(n)
    wave = 0.4 * np.sin(2 * np.pi * freq * t) * np.exp(-t) + 0.05 * noise
    return wave.astype(np.float32)


def audio_path(root: Path, clip: TreeClip) -> Path:
    """Where ``clip``'s WAV lives in the tree at ``root``."""
    return Path(root) / AUDIO_DIRS[clip.part] / f"{clip.fname}.wav"


def make_clips(
    n_clips: int,
    n_uploaders: int,
    seed: int,
    seconds: tuple[float, float] = (0.3, 1.5),
    eval_fraction: float = 0.25,
) -> list[TreeClip]:
    """``n_clips`` good clips spread over uploaders; eval uploaders are disjoint from dev uploaders."""
    rng = np.random.default_rng(seed)
    n_eval_uploaders = max(1, int(round(n_uploaders * eval_fraction)))
    clips = []
    for i in range(n_clips):
        uploader = int(rng.integers(n_uploaders))
        split = "eval" if uploader < n_eval_uploaders else ("val" if rng.random() < 0.2 else "train")
        n_labels = 1 + int(rng.random() < 0.3)
        labels = tuple(sorted(rng.choice([v[0] for v in VOCABULARY], size=n_labels, replace=False)))
        duration = float(rng.uniform(*seconds))
        wave = tone(duration, freq=float(rng.uniform(200, 4000)), seed=seed * 100_003 + i)
        clips.append(TreeClip(f"{100 + i}", split, f"user{uploader:03d}", labels, wave))
    return clips


def _write_csv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def write_fsd_tree(
    root: Path, clips: list[TreeClip], vocabulary: tuple[tuple[str, str], ...] = VOCABULARY
) -> Path:
    """Write ``clips`` as an FSD50K release tree under ``root`` (created) and return ``root``."""
    root = Path(root)
    truth, meta = root / "FSD50K.ground_truth", root / "FSD50K.metadata"
    for folder in (truth, meta, *(root / d for d in AUDIO_DIRS.values())):
        folder.mkdir(parents=True, exist_ok=True)
    mids = dict(vocabulary)
    vocab_rows = [[str(k), label, mid] for k, (label, mid) in enumerate(vocabulary)]
    _write_csv(truth / "vocabulary.csv", None, vocab_rows)
    rows: dict[str, list[list[str]]] = {"dev": [], "eval": []}
    infos: dict[str, dict[str, dict]] = {"dev": {}, "eval": {}}
    for clip in clips:
        if clip.wave is not None:
            sf.write(audio_path(root, clip), clip.wave, clip.rate, subtype=clip.subtype, format="WAV")
        if clip.listed:
            clip_mids = ",".join(mids.get(lab, "/m/unknown") for lab in clip.labels)
            row = [clip.fname, ",".join(clip.labels), clip_mids]
            rows[clip.part].append(row + ([clip.split] if clip.part == "dev" else []))
        entry = {"title": f"{clip.fname}.wav", "tags": ["test"], "license": "CC0"}
        if clip.uploader:
            entry["uploader"] = clip.uploader
        infos[clip.part][clip.fname] = entry
    _write_csv(truth / "dev.csv", ["fname", "labels", "mids", "split"], rows["dev"])
    _write_csv(truth / "eval.csv", ["fname", "labels", "mids"], rows["eval"])
    for part, info in infos.items():
        (meta / f"{part}_clips_info_FSD50K.json").write_text(json.dumps(info, indent=1))
    return root


def write_garbage(path: Path, n_bytes: int = 2000, seed: int = 0) -> None:
    """Overwrite ``path`` with random bytes (an unreadable audio file)."""
    Path(path).write_bytes(np.random.default_rng(seed).bytes(n_bytes))


def truncate(path: Path, n_bytes: int) -> None:
    """Cut ``n_bytes`` off the end of ``path``, leaving the header's sample count unchanged."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) - n_bytes])

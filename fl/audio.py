"""Reading audio files, and checking samples, the same way for prep, enrollment and listening.

A file is refused (:class:`AudioFileError`, with a short ``reason``) when it is missing, unreadable, empty,
truncated (its WAV header declares more data than the file holds: libsndfile would silently read less), or when
its samples are not audio: NaN or infinite, or far beyond full scale (a peak over :data:`MAX_PEAK`, where full
scale is 1). Live input cannot be refused sample by sample, so :func:`repair_samples` replaces such samples and
counts them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from fl.errors import DataError

# Full scale is 1.0; float files may exceed it a little, but a peak this far beyond it is not audio.
MAX_PEAK = 1000.0


class AudioFileError(DataError):
    """An audio file that cannot be used; ``reason`` says why without the path."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _wav_data_end(path: Path) -> int | None:
    """File offset where a RIFF/WAVE header says the sample data ends; None if unstated or not RIFF/WAVE."""
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        position = 12
        while True:
            fh.seek(position)
            chunk = fh.read(8)
            if len(chunk) < 8:
                return None
            size = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                return None if size in (0, 0xFFFFFFFF) else position + 8 + size  # 0 / ~0: length left open
            position += 8 + size + (size & 1)


def sample_problem(samples: np.ndarray) -> str | None:
    """Why ``samples`` are not audio (non-finite, or a peak over :data:`MAX_PEAK`), or None."""
    if not np.isfinite(samples).all():
        return "NaN or inf samples"
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak > MAX_PEAK:
        return f"samples up to {peak:.3g}, far beyond full scale (1.0)"
    return None


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """A file's samples as float32 ``[frames, channels]`` and its sample rate; :class:`AudioFileError` if the
    file cannot be used (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(path, "audio file missing")
    try:
        wave, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioFileError(path, f"unreadable audio: {str(exc).splitlines()[0]}") from None
    if len(wave) == 0:
        raise AudioFileError(path, "empty audio")
    data_end, file_size = _wav_data_end(path), path.stat().st_size
    if data_end is not None and data_end > file_size:
        missing = data_end - file_size
        raise AudioFileError(path, f"truncated audio: header declares {missing} bytes beyond the end of the file")
    problem = sample_problem(wave)
    if problem:
        raise AudioFileError(path, problem)
    return wave, int(rate)


def to_mono(wave: np.ndarray) -> np.ndarray:
    """``[frames, channels]`` -> ``[frames]``: the mean of the channels (a view for one channel)."""
    return wave[:, 0] if wave.shape[1] == 1 else wave.mean(axis=1)


def repair_samples(samples: np.ndarray) -> tuple[np.ndarray, int]:
    """Live input: samples that are NaN, infinite or beyond +-:data:`MAX_PEAK` become silence (0). Returns
    (samples, how many were replaced); the input array is returned unchanged when nothing was."""
    with np.errstate(invalid="ignore"):
        wild = ~(np.abs(samples) <= MAX_PEAK)  # NaN compares False: caught with the infinite and the absurd
    count = int(wild.sum())
    if not count:
        return samples, 0
    return np.where(wild, 0.0, samples).astype(samples.dtype), count

"""Audio inputs of the on-device detector: mono float32 blocks at the model's sample rate.

* :class:`ArraySource`: samples in memory, as fast as possible or paced in real time (each block delivered
  when its last sample would have been recorded).
* :class:`FileSource`: an audio file (any rate or channel count soundfile reads), mixed to mono and
  resampled to the frontend's rate once, offline, then streamed like an :class:`ArraySource`.
* :class:`MicSource`: any stream with sounddevice's ``InputStream`` interface (``start``, ``read(frames) ->
  (data [frames, channels], overflowed)``, ``stop``, ``close``); :func:`open_microphone` opens the real one
  (sounddevice is the optional extra ``fedsound[mic]``). A stream whose ``read`` returns no samples has ended.

Listening, enrollment and the profile read audio only through this module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fl.audio import AudioFileError, read_audio, repair_samples, to_mono
from fl.errors import FedsoundError
from fl.frontend import Frontend


class AudioInputError(FedsoundError):
    """An audio input cannot be used: a missing, unreadable or non-audio file, no microphone."""


class AudioSource(Protocol):
    """Yields mono float32 blocks at ``sample_rate``."""

    sample_rate: int

    def blocks(self) -> Iterator[np.ndarray]: ...


class ArraySource:
    """Samples in memory, in blocks of ``block_size``; ``realtime`` paces them at the sample rate."""

    def __init__(
        self, samples: np.ndarray, sample_rate: int, block_size: int, realtime: bool = False
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.samples = np.asarray(samples, dtype=np.float32)
        self.sample_rate = sample_rate
        self.block_size = block_size
        self.realtime = realtime

    def blocks(self) -> Iterator[np.ndarray]:
        """The blocks in order (the last one may be shorter)."""
        start_time = time.monotonic()
        for start in range(0, len(self.samples), self.block_size):
            block = self.samples[start : start + self.block_size]
            if self.realtime:
                due = start_time + (start + len(block)) / self.sample_rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            yield block


def read_mono(path: Path) -> tuple[np.ndarray, int]:
    """A file's samples mixed to mono (float32) and its rate; a file :func:`fl.audio.read_audio` refuses
    (missing, unreadable, empty, truncated, NaN or absurd samples) is an AudioInputError naming it."""
    try:
        wave, rate = read_audio(path)
    except AudioFileError as exc:
        raise AudioInputError(str(exc)) from None
    return to_mono(wave), rate


class FileSource(ArraySource):
    """An audio file, mixed to mono and resampled to the frontend's rate, streamed in blocks."""

    def __init__(self, path: Path, frontend: Frontend, block_size: int, realtime: bool = False) -> None:
        path = Path(path)
        wave, rate = read_mono(path)
        mono = torch.from_numpy(np.ascontiguousarray(wave))
        samples = frontend.resample(mono, rate).numpy()
        super().__init__(samples, frontend.config.sample_rate, block_size, realtime)
        self.path = path


class InputStreamLike(Protocol):
    """The part of ``sounddevice.InputStream`` that :class:`MicSource` uses."""

    def start(self) -> None: ...

    def read(self, frames: int) -> tuple[np.ndarray, bool]: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


class MicSource:
    """Blocks read from an input stream (the microphone, or any stream with the same interface). Samples that are
    not audio (NaN, infinite, far beyond full scale) are repaired (:func:`fl.audio.repair_samples`) and counted in
    ``repaired``; buffer overflows are counted in ``overflows``."""

    def __init__(self, stream: InputStreamLike, sample_rate: int, block_size: int) -> None:
        self.stream = stream
        self.sample_rate = sample_rate
        self.block_size = block_size
        self.overflows = 0
        self.repaired = 0

    def blocks(self) -> Iterator[np.ndarray]:
        """Read until the stream ends (an empty read) or the consumer stops; the stream is always closed."""
        self.stream.start()
        try:
            while True:
                data, overflowed = self.stream.read(self.block_size)
                self.overflows += int(bool(overflowed))
                data = np.asarray(data, dtype=np.float32)
                if data.size == 0:
                    return
                block, repaired = repair_samples(data.reshape(len(data), -1).mean(axis=1))
                self.repaired += repaired
                yield block
        finally:
            self.stream.stop()
            self.stream.close()


def open_input_stream(sample_rate: int, block_size: int, device: int | str | None = None,
                      alternative: str = "listen to a file with --input FILE") -> InputStreamLike:
    """A sounddevice input stream (mono float32); a one-line AudioInputError naming ``alternative`` if none."""
    try:
        import sounddevice
    except ImportError:
        raise AudioInputError("microphone input needs the optional package sounddevice: "
                          f"pip install 'fedsound[mic]' (or {alternative})") from None
    except OSError as exc:  # sounddevice raises this when the PortAudio library is missing
        raise AudioInputError(f"microphone input unavailable: {exc} ({alternative})") from None
    try:
        sounddevice.check_input_settings(device=device, channels=1, dtype="float32", samplerate=sample_rate)
        return sounddevice.InputStream(samplerate=sample_rate, blocksize=block_size, device=device,
                                       channels=1, dtype="float32")
    except (sounddevice.PortAudioError, ValueError) as exc:
        raise AudioInputError(f"no usable microphone at {sample_rate} Hz: {exc}") from None


def open_microphone(sample_rate: int, block_size: int, device: int | str | None = None) -> MicSource:
    """The default (or given) input device at ``sample_rate`` as a block source."""
    return MicSource(open_input_stream(sample_rate, block_size, device), sample_rate, block_size)

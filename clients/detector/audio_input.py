"""Audio inputs of the on-device detector: mono float32 blocks at the model's sample rate.

* :class:`ArraySource`: samples in memory, as fast as possible or paced in real time (each block delivered
  when its last sample would have been recorded).
* :class:`FileSource`: an audio file (any rate or channel count soundfile reads), mixed to mono and
  resampled to the model's rate once, then streamed like an :class:`ArraySource`.
* :class:`MicSource`: any stream with sounddevice's ``InputStream`` interface (``start``, ``read(frames) ->
  (data [frames, channels], overflowed)``, ``stop``, ``close``); :func:`open_microphone` opens the real one
  (sounddevice is the optional extra ``fedsound[mic]``). A stream whose ``read`` returns no samples has ended.

Listening, enrollment and the profile read audio only through this module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from fl.audio import AudioFileError, read_audio, repair_samples, to_mono
from fl.dsp import StreamingResampler, resample
from fl.errors import FedsoundError


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
    """An audio file, mixed to mono and resampled to ``sample_rate`` (:func:`fl.dsp.resample`), streamed in
    blocks."""

    def __init__(self, path: Path, sample_rate: int, block_size: int, realtime: bool = False) -> None:
        path = Path(path)
        wave, rate = read_mono(path)
        super().__init__(resample(wave, rate, sample_rate), sample_rate, block_size, realtime)
        self.path = path


class InputStreamLike(Protocol):
    """The part of ``sounddevice.InputStream`` that :class:`MicSource` uses."""

    def start(self) -> None: ...

    def read(self, frames: int) -> tuple[np.ndarray, bool]: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


class MicSource:
    """Blocks read from an input stream (the microphone, or any stream with the same interface) at the device's
    own rate ``device_rate``, resampled on the fly to ``sample_rate`` (:class:`fl.dsp.StreamingResampler`:
    the same numbers as resampling the whole recording offline). Samples that are not audio (NaN, infinite, far
    beyond full scale) are replaced with silence (:func:`fl.audio.repair_samples`) and counted in ``repaired``;
    buffer overflows are counted in ``overflows``. ``block_size`` is in samples at ``sample_rate``."""

    def __init__(self, stream: InputStreamLike, sample_rate: int, block_size: int,
                 device_rate: int | None = None) -> None:
        self.stream = stream
        self.sample_rate = sample_rate
        self.device_rate = device_rate or sample_rate
        self.block_size = block_size
        self.read_size = max(1, round(block_size * self.device_rate / sample_rate))
        self.resampler = (StreamingResampler(self.device_rate, sample_rate) if self.device_rate != sample_rate
                          else None)
        self.overflows = 0
        self.repaired = 0

    def blocks(self) -> Iterator[np.ndarray]:
        """Read until the stream ends (an empty read) or the consumer stops; the stream is always closed."""
        self.stream.start()
        try:
            while True:
                data, overflowed = self.stream.read(self.read_size)
                self.overflows += int(bool(overflowed))
                data = np.asarray(data, dtype=np.float32)
                if data.size == 0:
                    break
                block, repaired = repair_samples(data.reshape(len(data), -1).mean(axis=1))
                self.repaired += repaired
                if self.resampler is not None:
                    block = self.resampler.process(block)
                if len(block):
                    yield block
            if self.resampler is not None:
                tail = self.resampler.flush()
                if len(tail):
                    yield tail
        finally:
            self.stream.stop()
            self.stream.close()


@dataclass(frozen=True)
class InputDevice:
    """An audio input device as the operating system reports it."""

    index: int
    name: str
    host_api: str
    channels: int
    native_rate: int
    default: bool


def _sounddevice(alternative: str):
    try:
        import sounddevice
    except ImportError:
        raise AudioInputError("microphone input needs the optional package sounddevice: "
                              f"pip install 'fedsound[mic]' (or {alternative})") from None
    except OSError as exc:  # sounddevice raises this when the PortAudio library is missing
        raise AudioInputError(f"microphone input unavailable: {exc} ({alternative})") from None
    return sounddevice


def list_input_devices(alternative: str = "listen to a file with --input FILE") -> list[InputDevice]:
    """The devices that can record, with their native sample rates (the default input marked)."""
    sounddevice = _sounddevice(alternative)
    try:
        devices = sounddevice.query_devices()
        apis = sounddevice.query_hostapis()
        default_input = sounddevice.default.device[0]
    except sounddevice.PortAudioError as exc:
        raise AudioInputError(f"cannot list audio devices: {exc}") from None
    return [InputDevice(index, str(d["name"]), str(apis[d["hostapi"]]["name"]), int(d["max_input_channels"]),
                        int(round(d["default_samplerate"])), index == default_input)
            for index, d in enumerate(devices) if d["max_input_channels"] > 0]


def format_devices(devices: list[InputDevice]) -> str:
    """One line per input device: index, name, host API, channels, native rate; ``*`` marks the default."""
    if not devices:
        return "no audio input devices"
    return "\n".join(f"{'*' if d.default else ' '} {d.index:3d}  {d.name}  ({d.host_api}, {d.channels} ch, "
                     f"{d.native_rate} Hz)" for d in devices)


def _device_rate(sounddevice, device: int | str | None) -> int:
    try:
        info = sounddevice.query_devices(device, "input")
    except (sounddevice.PortAudioError, ValueError) as exc:
        raise AudioInputError(f"no such input device {device!r}: {exc} (see --list-devices)") from None
    return int(round(info["default_samplerate"]))


def open_input_stream(block_s: float, device: int | str | None = None, sample_rate: int | None = None,
                      alternative: str = "listen to a file with --input FILE") -> tuple[InputStreamLike, int]:
    """A sounddevice input stream (mono float32, blocks of ``block_s`` seconds) of ``device`` (default: the
    system's default input) and the rate it runs at: ``sample_rate`` when given, else the device's native rate
    (devices may refuse other rates, and the operating system's resampler is not the one the model was trained
    with). A one-line AudioInputError naming ``alternative`` if there is none."""
    sounddevice = _sounddevice(alternative)
    rate = sample_rate or _device_rate(sounddevice, device)
    try:
        sounddevice.check_input_settings(device=device, channels=1, dtype="float32", samplerate=rate)
        return sounddevice.InputStream(samplerate=rate, blocksize=max(1, round(block_s * rate)), device=device,
                                       channels=1, dtype="float32"), rate
    except (sounddevice.PortAudioError, ValueError) as exc:
        raise AudioInputError(f"no usable microphone at {rate} Hz: {exc}") from None


def open_microphone(sample_rate: int, block_size: int, device: int | str | None = None) -> MicSource:
    """The default (or given) input device at its native rate, resampled to ``sample_rate``, as a block source."""
    stream, rate = open_input_stream(block_size / sample_rate, device)
    return MicSource(stream, sample_rate, block_size, device_rate=rate)

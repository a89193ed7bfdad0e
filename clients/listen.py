"""``fedsound listen``: streaming detection from the microphone or a file; events as JSON lines.

Every input is an *audio source* yielding mono float32 blocks at the bundle's sample rate; the detector loop
(:func:`run_detector`) is the same for all of them:

* :class:`ArraySource`: samples in memory, as fast as possible or paced in real time (each block delivered
  when its last sample would have been recorded).
* :class:`FileSource`: an audio file (any rate or channel count soundfile reads), mixed to mono and
  resampled to the bundle's rate once, offline, then streamed like an :class:`ArraySource`.
* :class:`MicSource`: any stream with sounddevice's ``InputStream`` interface (``start``, ``read(frames) ->
  (data [frames, channels], overflowed)``, ``stop``, ``close``); :func:`open_microphone` opens the real one
  at the bundle's rate (sounddevice is the optional extra ``fedsound[mic]``). A stream whose ``read``
  returns no samples has ended.

Events are printed to stdout (``--json``: one JSON object per line, see :mod:`clients.postprocess`); the
summary (events per label, audio seconds, compute seconds, real-time factor) goes to stderr, also after
Ctrl-C.

``--exec LABEL=COMMAND`` (repeatable, off by default) runs COMMAND on each onset event of LABEL: split with
``shlex.split``, run without a shell, not waited for while listening (listen waits up to
``EXEC_WAIT_S`` seconds for them at the end). The command's environment has ``FEDSOUND_LABEL``,
``FEDSOUND_ONSET_S`` and ``FEDSOUND_SCORE``; its output goes to stderr, so stdout stays event lines.
Listening also stops cleanly when stdout is closed (``fedsound listen ... | head``).

Post-processing settings come from the bundle; a ``[detector]`` key of the run's configuration that differs
from its default overrides the bundle's value (``block-size`` sets the block size of file input).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import soundfile as sf
import torch

from clients.bundle import load_bundle
from clients.postprocess import Event
from clients.stream import StreamingDetector, single_thread
from fl.config import Config, DetectorConfig
from fl.errors import FedsoundError
from fl.frontend import Frontend

EXEC_WAIT_S = 10.0


class ListenError(FedsoundError):
    """Listening cannot start: bad input file, no microphone, bad ``--exec`` mapping."""


class StopListening(Exception):
    """Raised by an event callback to end the session cleanly (like Ctrl-C)."""


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
    """A file's samples mixed to mono (float32) and its rate; a missing or unreadable file is a ListenError."""
    path = Path(path)
    if not path.is_file():
        raise ListenError(f"audio file not found: {path}")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except sf.SoundFileError as exc:
        raise ListenError(f"cannot read audio file {path}: {exc}") from None
    if data.shape[0] == 0:
        raise ListenError(f"audio file {path} has no samples")
    return data.mean(axis=1), int(rate)


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
    """Blocks read from an input stream (the microphone, or any stream with the same interface)."""

    def __init__(self, stream: InputStreamLike, sample_rate: int, block_size: int) -> None:
        self.stream = stream
        self.sample_rate = sample_rate
        self.block_size = block_size
        self.overflows = 0

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
                yield data.reshape(len(data), -1).mean(axis=1)
        finally:
            self.stream.stop()
            self.stream.close()


def open_input_stream(sample_rate: int, block_size: int, device: int | str | None = None,
                      alternative: str = "listen to a file with --input FILE") -> InputStreamLike:
    """A sounddevice input stream (mono float32); a one-line ListenError naming ``alternative`` if none."""
    try:
        import sounddevice
    except ImportError:
        raise ListenError("microphone input needs the optional package sounddevice: "
                          f"pip install 'fedsound[mic]' (or {alternative})") from None
    except OSError as exc:  # sounddevice raises this when the PortAudio library is missing
        raise ListenError(f"microphone input unavailable: {exc} ({alternative})") from None
    try:
        sounddevice.check_input_settings(device=device, channels=1, dtype="float32", samplerate=sample_rate)
        return sounddevice.InputStream(samplerate=sample_rate, blocksize=block_size, device=device,
                                       channels=1, dtype="float32")
    except (sounddevice.PortAudioError, ValueError) as exc:
        raise ListenError(f"no usable microphone at {sample_rate} Hz: {exc}") from None


def open_microphone(sample_rate: int, block_size: int, device: int | str | None = None) -> MicSource:
    """The default (or given) input device at ``sample_rate`` as a block source."""
    return MicSource(open_input_stream(sample_rate, block_size, device), sample_rate, block_size)


def parse_exec_map(items: Sequence[str], labels: Sequence[str]) -> dict[str, list[list[str]]]:
    """``["LABEL=COMMAND", ...]`` -> label -> list of argv lists; unknown labels or commands are errors."""
    commands: dict[str, list[list[str]]] = {}
    for item in items:
        label, sep, command = item.partition("=")
        label = label.strip()
        if not sep or not label or not command.strip():
            raise ListenError(f"--exec {item!r}: expected LABEL=COMMAND")
        if label not in labels:
            raise ListenError(f"--exec {item!r}: unknown label {label!r} (labels: {', '.join(labels)})")
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ListenError(f"--exec {item!r}: {exc}") from None
        if shutil.which(argv[0]) is None:
            raise ListenError(f"--exec {item!r}: command {argv[0]!r} not found")
        commands.setdefault(label, []).append(argv)
    return commands


class CommandRunner:
    """Starts the ``--exec`` commands of onset events; never blocks the audio loop."""

    def __init__(self, commands: dict[str, list[list[str]]]) -> None:
        self.commands = commands
        self.running: list[subprocess.Popen] = []
        self.started = 0

    def __call__(self, event: Event) -> None:
        if event.type != "onset":
            return
        self.running = [p for p in self.running if p.poll() is None]
        env = {**os.environ, "FEDSOUND_LABEL": event.label, "FEDSOUND_ONSET_S": f"{event.onset_s:.4f}",
               "FEDSOUND_SCORE": f"{event.score:.4f}"}
        for argv in self.commands.get(event.label, []):
            try:
                self.running.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=2))
                self.started += 1
            except OSError as exc:
                print(f"warning: --exec {shlex.join(argv)} failed: {exc}", file=sys.stderr)

    def wait(self, timeout_s: float = EXEC_WAIT_S) -> int:
        """Wait for started commands (up to ``timeout_s`` in all); return how many are still running."""
        deadline = time.monotonic() + timeout_s
        for process in self.running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return sum(p.poll() is None for p in self.running)


@dataclass
class ListenSummary:
    """What one listening session did."""

    audio_s: float = 0.0
    compute_s: float = 0.0
    wall_s: float = 0.0
    interrupted: bool = False
    events: list[Event] = field(default_factory=list)

    @property
    def onsets_per_label(self) -> dict[str, int]:
        """Number of detected events (onsets) per label."""
        return dict(Counter(e.label for e in self.events if e.type == "onset"))

    @property
    def real_time_factor(self) -> float:
        """Compute seconds per audio second (below 1: faster than real time)."""
        return self.compute_s / self.audio_s if self.audio_s > 0 else 0.0

    def text(self) -> str:
        """One line for the user."""
        counts = self.onsets_per_label
        per_label = ", ".join(f"{label} {n}" for label, n in sorted(counts.items())) or "none"
        head = "interrupted: " if self.interrupted else ""
        return (f"{head}{sum(counts.values())} events ({per_label}) in {self.audio_s:.2f} s of audio; "
                f"compute {self.compute_s:.2f} s, real-time factor {self.real_time_factor:.3f}")


def run_detector(detector: StreamingDetector, source: AudioSource,
                 on_event: Callable[[Event], None] | None = None) -> ListenSummary:
    """Feed ``source`` to ``detector`` until it ends or Ctrl-C; every event goes to ``on_event``.

    Runs torch on one thread (see :mod:`clients.stream`). On KeyboardInterrupt the stream is ended without
    flushing the audio (events still active are closed at the last processed frame) and the summary says so;
    :class:`StopListening` raised by ``on_event`` ends it the same way.
    """
    if source.sample_rate != detector.sample_rate:
        raise ListenError(
            f"audio source at {source.sample_rate} Hz, the detector needs {detector.sample_rate} Hz"
        )
    summary = ListenSummary()

    def emit(events: list[Event]) -> None:
        for event in events:
            summary.events.append(event)
            if on_event is not None:
                on_event(event)

    wall_start = time.perf_counter()
    blocks = source.blocks()
    with single_thread():
        try:
            for block in blocks:
                start = time.perf_counter()
                events = detector.feed(block)
                summary.compute_s += time.perf_counter() - start
                emit(events)
            start = time.perf_counter()
            events = detector.finish()
            summary.compute_s += time.perf_counter() - start
            emit(events)
        except KeyboardInterrupt:
            summary.interrupted = True
            emit(detector.finish(flush_audio=False))
        except StopListening:  # the consumer is gone: the closing events are only recorded
            summary.interrupted = True
            summary.events.extend(detector.finish(flush_audio=False))
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:  # a generator: release its input (e.g. stop the microphone) now
                close()
    summary.audio_s = detector.audio_seconds
    summary.wall_s = time.perf_counter() - wall_start
    return summary


def detector_settings(bundle_settings: DetectorConfig, run_settings: DetectorConfig) -> DetectorConfig:
    """The bundle's settings, with each field of ``run_settings`` that differs from its default on top."""
    defaults = DetectorConfig()
    changed = {f.name: getattr(run_settings, f.name) for f in dataclasses.fields(DetectorConfig)
               if getattr(run_settings, f.name) != getattr(defaults, f.name)}
    return dataclasses.replace(bundle_settings, **changed)


def _print_event(event: Event, as_json: bool) -> None:
    if as_json:
        print(event.to_json(), flush=True)
        return
    if event.type == "onset":
        print(f"{event.onset_s:9.3f} s  {event.label}  score {event.score:.2f}  "
              f"latency {event.latency_ms:.0f} ms", flush=True)
    else:
        print(f"{event.offset_s:9.3f} s  {event.label} ended (peak {event.score:.2f})", flush=True)


def listen(source: Path, config: Config, input_: str = "mic", realtime: bool = False, as_json: bool = False,
           exec_map: Sequence[str] = ()) -> int:
    """``fedsound listen``: load the bundle (or ``PROFILE/personal``), stream ``input_`` ("mic" or a file)."""
    bundle = load_bundle(Path(source))
    settings = detector_settings(bundle.detector, config.detector)
    commands = parse_exec_map(exec_map, bundle.labels)
    frontend = bundle.frontend()
    detector = StreamingDetector(bundle.model, frontend, bundle.labels, settings)
    audio: AudioSource
    if input_ == "mic":
        audio = open_microphone(frontend.config.sample_rate, settings.block_size)
    else:
        audio = FileSource(Path(input_), frontend, settings.block_size, realtime=realtime)
    runner = CommandRunner(commands)

    def on_event(event: Event) -> None:
        try:
            _print_event(event, as_json)
        except BrokenPipeError:  # the reader went away (`| head`): stop, and silence stdout for the exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise StopListening from None
        runner(event)

    if not as_json:
        print(f"listening to {'the microphone' if input_ == 'mic' else input_} with {bundle.path} "
              f"({len(bundle.labels)} labels, algorithmic latency {detector.algorithmic_latency_ms:.0f} ms)",
              file=sys.stderr)
    summary = run_detector(detector, audio, on_event)
    still_running = runner.wait()
    print(summary.text(), file=sys.stderr)
    if isinstance(audio, MicSource) and audio.overflows:
        print(f"warning: {audio.overflows} microphone buffer overflows (audio was lost)", file=sys.stderr)
    if still_running:
        print(f"warning: {still_running} --exec commands still running", file=sys.stderr)
    return 0

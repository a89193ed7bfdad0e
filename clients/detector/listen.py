"""``fedsound listen``: streaming detection from the microphone or a file; events as JSON lines.

Every input is an audio source of :mod:`clients.detector.audio_input`; the detector loop
(:func:`run_detector`) is the same for all of them.

Events are printed to stdout (``--json``: one JSON object per line, see :mod:`clients.detector.postprocess`); the
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
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clients.detector.audio_input import AudioSource, FileSource, MicSource, open_microphone
from clients.detector.manifest import Manifest, read_manifest
from clients.detector.portable import portable_parts
from clients.detector.postprocess import Event
from clients.detector.stream import StreamingDetector
from fl.config import Config, DetectorConfig
from fl.errors import FedsoundError

EXEC_WAIT_S = 10.0
ENGINES = ("auto", "torch", "onnx")


class ListenError(FedsoundError):
    """Listening cannot start: a bad ``--exec`` mapping, an input at the wrong rate."""


class StopListening(Exception):
    """Raised by an event callback to end the session cleanly (like Ctrl-C)."""


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

    Runs the engine's compute on one thread (:meth:`clients.detector.stream.StepEngine.threads`). On
    KeyboardInterrupt the stream is ended without flushing the audio (events still active are closed at the last
    processed frame) and the summary says so; :class:`StopListening` raised by ``on_event`` ends it the same way.
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
    with detector.engine.threads():
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


def make_detector(source: Path, config: Config, engine: str = "auto", latency: str | None = None
                  ) -> tuple[StreamingDetector, Manifest, str]:
    """The streaming detector of a bundle (or ``PROFILE/personal``) on ``engine``: ``torch`` (the training
    frontend and ``TCN.step``), ``onnx`` (the portable files: numpy and onnxruntime only) or ``auto`` (torch when it
    is installed). ``latency``: another latency choice of a personal bundle than the one it was personalized
    with. Returns (detector, verified manifest, engine used)."""
    if engine not in ENGINES:
        raise ListenError(f"--engine: must be one of {', '.join(ENGINES)}, got {engine!r}")
    manifest = read_manifest(Path(source))
    if latency is not None:
        manifest = dataclasses.replace(manifest, detector=manifest.latency_detector(latency))
    settings = detector_settings(manifest.detector, config.detector)
    if engine == "auto":
        engine = "torch" if importlib.util.find_spec("torch") is not None else "onnx"
    if engine == "onnx":
        frames, step = portable_parts(manifest)
        return StreamingDetector(step, frames, manifest.labels, settings), manifest, engine
    from clients.detector.bundle import load_bundle
    from clients.detector.torch_stream import torch_detector

    bundle = load_bundle(manifest.path)
    return torch_detector(bundle.model, bundle.frontend(), bundle.labels, settings), manifest, engine


def listen(source: Path, config: Config, input_: str = "mic", realtime: bool = False, as_json: bool = False,
           exec_map: Sequence[str] = (), device: int | str | None = None, engine: str = "auto",
           latency: str | None = None) -> int:
    """``fedsound listen``: load the bundle (or ``PROFILE/personal``), stream ``input_`` ("mic" or a file).
    ``device``: the input device (index or name, see :func:`clients.detector.audio_input.list_input_devices`;
    default: the system's default input), opened at its native rate. ``engine`` and ``latency``: see
    :func:`make_detector`."""
    detector, manifest, engine = make_detector(Path(source), config, engine, latency)
    commands = parse_exec_map(exec_map, manifest.labels)
    block_size = detector_settings(manifest.detector, config.detector).block_size
    audio: AudioSource
    if input_ == "mic":
        audio = open_microphone(detector.sample_rate, block_size, device)
    else:
        audio = FileSource(Path(input_), detector.sample_rate, block_size, realtime=realtime)
    runner = CommandRunner(commands)

    def on_event(event: Event) -> None:
        try:
            _print_event(event, as_json)
        except BrokenPipeError:  # the reader went away (`| head`): stop, and silence stdout for the exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise StopListening from None
        runner(event)

    if not as_json:
        heard = input_ if input_ != "mic" else (f"the microphone at {audio.device_rate} Hz" +
                                                 (f", resampled to {audio.sample_rate} Hz"
                                                  if audio.device_rate != audio.sample_rate else ""))
        print(f"listening to {heard} with {manifest.path} ({len(manifest.labels)} labels, {engine} engine, "
              f"algorithmic latency {detector.algorithmic_latency_ms:.0f} ms)", file=sys.stderr)
    summary = run_detector(detector, audio, on_event)
    still_running = runner.wait()
    print(summary.text(), file=sys.stderr)
    if isinstance(audio, MicSource) and audio.overflows:
        print(f"warning: {audio.overflows} microphone buffer overflows (audio was lost)", file=sys.stderr)
    if isinstance(audio, MicSource) and audio.repaired:
        print(f"warning: {audio.repaired} microphone samples were NaN, infinite or far beyond full scale and were "
              "replaced with silence", file=sys.stderr)
    if still_running:
        print(f"warning: {still_running} --exec commands still running", file=sys.stderr)
    return 0

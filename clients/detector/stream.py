"""Streaming detection: audio blocks -> log-mel frames -> one model step per frame -> probabilities -> events.

The pieces are engine-agnostic: a *frame maker* (:class:`FrameMaker`: ``n_fft`` segments -> frames, and their
levels) and a *step engine* (:class:`StepEngine`: frames -> per-frame probabilities, caches carried on). The
torch engine (:mod:`clients.detector.torch_stream`) runs the training frontend and ``TCN.step``; the portable
engine (:mod:`clients.detector.portable`) runs a numpy frontend and the step exported to ONNX. Both give the
same frames and probabilities within float rounding.

Equality with offline processing
    :class:`StreamingFrontend` cuts, from blocks of any size, the same ``n_fft`` segments as the offline
    frontend (torchaudio's MelSpectrogram, ``center=True``, reflect padding). Frame ``t`` is the window of
    ``n_fft`` samples centred on sample ``t * hop``; before the first sample the signal is its reflection
    (``x[pad], ..., x[1]`` with ``pad = n_fft // 2``), and :meth:`StreamingFrontend.flush` reflects the end the
    same way, so the stream yields exactly the offline frames (``1 + (n + 2 * pad - n_fft) // hop`` of them).

Delay (fixed, documented)
    Frame ``t`` is produced as soon as sample ``t * hop + n_fft - pad - 1`` has arrived, i.e.
    ``n_fft - pad`` samples (``n_fft / 2``: 330 samples = 15 ms at 22.05 kHz) after the sample it is centred
    on; frame 0 also needs ``pad + 1`` samples for its reflection. The post-processing adds
    ``min-duration`` less one frame (an event is confirmed on its k-th frame, k = min-duration in whole
    frames, at least 1). The algorithmic latency of an onset event is the sum of both (15 + 20 = 35 ms with
    the defaults); a live input adds up to one block of buffering (a block is processed when its last sample
    arrives).

A stream shorter than ``pad + 1`` samples gives no frame (the offline frontend refuses such input).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np

from clients.detector.postprocess import Event, EventTracker
from fl.config import DetectorConfig, FrontendConfig


class FrameMaker(Protocol):
    """Computes frames from signal samples, as the training frontend does."""

    config: FrontendConfig

    def frames_of(self, span: np.ndarray, count: int) -> np.ndarray:
        """The ``count`` frames whose ``n_fft`` windows start every ``hop`` samples from ``span[0]``."""
        ...

    def levels_db(self, frames: np.ndarray) -> np.ndarray:
        """Each frame's level in dB."""
        ...


class StepEngine(Protocol):
    """Frames -> per-frame class probabilities, one step per frame, its caches carried from call to call."""

    n_classes: int

    def reset(self) -> None:
        """Clear the caches: the next frame starts a new stream."""
        ...

    def probabilities(self, frames: np.ndarray) -> np.ndarray:
        """Probabilities ``[k, n_classes]`` of the next frames ``[k, n_mels]``."""
        ...

    def threads(self) -> AbstractContextManager:
        """A context to stream in: the engine's compute on one thread (extra threads only add jitter)."""
        ...


class StreamingFrontend:
    """Blocks of mono samples at the frontend's rate -> the offline frontend's frames, once ready."""

    def __init__(self, maker: FrameMaker) -> None:
        config = maker.config
        self.maker = maker
        self.n_fft = config.n_fft
        self.hop = config.hop_length
        self.pad = config.n_fft // 2
        self.reset()

    @property
    def delay_samples(self) -> int:
        """Samples between the one a frame is centred on and the last one it needs (the frontend delay)."""
        return self.maker.config.delay_samples

    @property
    def n_samples(self) -> int:
        """Samples received so far."""
        return self._n_samples

    @property
    def n_frames(self) -> int:
        """Frames produced so far."""
        return self._n_frames

    def reset(self) -> None:
        """Forget the stream: the next block starts a new one."""
        # Until pad + 1 samples have arrived the start reflection cannot be written: raw samples are kept.
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # index of _buffer[0] in the padded signal (once started)
        self._started = False
        self._n_samples = 0
        self._n_frames = 0
        self._flushed = False

    def push(self, block: np.ndarray) -> np.ndarray:
        """Add samples; return the frames ``[k, n_mels]`` (float32) completed by them (possibly none)."""
        if self._flushed:
            raise RuntimeError("stream already flushed: call reset() to start a new one")
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 1:
            raise ValueError(f"expected a mono block (1-D), got shape {block.shape}")
        self._n_samples += block.size
        self._buffer = np.concatenate((self._buffer, block))
        if not self._started:
            if self._n_samples < self.maker.config.min_samples:  # too few to reflect the start
                return self._empty()
            self._buffer = np.concatenate((self._buffer[self.pad : 0 : -1], self._buffer))
            self._started = True
        return self._emit_ready()

    def flush(self) -> np.ndarray:
        """End of stream: reflect the end (like the offline padding) and return the remaining frames."""
        if self._flushed:
            raise RuntimeError("stream already flushed: call reset() to start a new one")
        self._flushed = True
        if not self._started:
            return self._empty()
        n = self._n_samples
        # The end reflection is x[n-2], ..., x[n-1-pad]; x[i] sits at padded index i + pad.
        lo = n - 1 - self.pad + self.pad - self._buffer_start
        hi = n - 1 + self.pad - self._buffer_start
        tail = self._buffer[lo:hi][::-1]
        self._buffer = np.concatenate((self._buffer, tail))
        return self._emit_ready()

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.maker.config.n_mels), dtype=np.float32)

    def _emit_ready(self) -> np.ndarray:
        end = self._buffer_start + self._buffer.size  # padded samples available
        ready = 0 if end < self.n_fft else (end - self.n_fft) // self.hop + 1 - self._n_frames
        frames = self._empty() if ready <= 0 else self._compute(ready)
        self._n_frames += max(ready, 0)
        # Keep what the next frame needs, and the last pad + 1 samples for the end reflection.
        keep_from = min(self._n_frames * self.hop, self._n_samples - 1)
        if keep_from > self._buffer_start:
            self._buffer = self._buffer[keep_from - self._buffer_start :]
            self._buffer_start = keep_from
        return frames

    def _compute(self, count: int) -> np.ndarray:
        first = self._n_frames * self.hop - self._buffer_start
        return self.maker.frames_of(self._buffer[first : first + (count - 1) * self.hop + self.n_fft], count)


class StreamingDetector:
    """Audio blocks -> events: a :class:`StreamingFrontend`, a :class:`StepEngine` and an :class:`EventTracker`.

    Events are stamped with the audio time at the end of the block that completed them (``emitted_s``).
    """

    def __init__(self, engine: StepEngine, maker: FrameMaker, labels: Sequence[str], settings: DetectorConfig
                 ) -> None:
        if len(labels) != engine.n_classes:
            raise ValueError(f"{len(labels)} labels for a model with {engine.n_classes} classes")
        self.engine = engine
        self.maker = maker
        self.frontend = StreamingFrontend(maker)
        self.sample_rate = maker.config.sample_rate
        self.tracker = EventTracker(labels, settings, maker.config.frame_s)

    @property
    def audio_seconds(self) -> float:
        """Audio received so far, in seconds."""
        return self.frontend.n_samples / self.sample_rate

    @property
    def frontend_delay_ms(self) -> float:
        """Frontend delay (:attr:`fl.config.FrontendConfig.delay_samples`)."""
        return self.frontend.delay_samples / self.sample_rate * 1000.0

    @property
    def algorithmic_latency_ms(self) -> float:
        """Frontend delay plus post-processing delay (minimum duration less one frame), without blocks."""
        return self.frontend_delay_ms + self.tracker.algorithmic_delay_ms

    def feed(self, block: np.ndarray) -> list[Event]:
        """Process one block of samples; return the events it completed."""
        return self._track(self.frontend.push(block))

    def finish(self, flush_audio: bool = True) -> list[Event]:
        """End of stream: the last frames (when ``flush_audio``), then the still active events are closed."""
        events = self._track(self.frontend.flush()) if flush_audio else []
        return events + self.tracker.close(self.audio_seconds)

    def _track(self, frames: np.ndarray) -> list[Event]:
        """The events completed by the next frames (their probabilities and levels)."""
        return self.tracker.update(self.engine.probabilities(frames), self.audio_seconds,
                                   self.maker.levels_db(frames))

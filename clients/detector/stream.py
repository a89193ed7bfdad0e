"""Streaming detection: audio blocks -> log-mel frames -> TCN ``step`` -> probabilities -> events.

Equality with offline processing
    :class:`StreamingFrontend` computes the frames of :class:`fl.frontend.Frontend` (torchaudio's
    MelSpectrogram, ``center=True``, reflect padding) from blocks of any size: it cuts the same ``n_fft``
    segments as the offline path and hands them to the same :meth:`Frontend.segment_frames` (window, FFT,
    power, mel filterbank, compression). Frame ``t`` is the window of ``n_fft`` samples centred on sample
    ``t * hop``; before the first sample the signal is its reflection (``x[pad], ..., x[1]`` with
    ``pad = n_fft // 2``), and :meth:`StreamingFrontend.flush` reflects the end the same way, so the stream
    yields exactly the offline frames (``1 + (n + 2 * pad - n_fft) // hop`` of them; equal up to float
    rounding, about 1e-6).
    :class:`StreamEngine` feeds them to ``TCN.step``, which equals the offline ``forward``, so the per-frame
    probabilities equal ``sigmoid(model(frames))`` within 1e-4.

Delay (fixed, documented)
    Frame ``t`` is produced as soon as sample ``t * hop + n_fft - pad - 1`` has arrived, i.e.
    ``n_fft - pad`` samples (``n_fft / 2``: 330 samples = 15 ms at 22.05 kHz) after the sample it is centred
    on; frame 0 also needs ``pad + 1`` samples for its reflection. The post-processing adds
    ``min-duration`` less one frame (an event is confirmed on its k-th frame, k = min-duration in whole
    frames, at least 1). The algorithmic latency of an onset event is the sum of both (15 + 20 = 35 ms with
    the defaults); a live input adds up to one block of buffering (a block is processed when its last sample
    arrives).

A stream shorter than ``pad + 1`` samples gives no frame (the offline frontend refuses such input).

Threads
    The per-hop work is tiny (one FFT, a few small matrix-vector products): run it on one thread
    (:func:`single_thread`), as ``listen`` and ``benchmarks/stream/bench.py`` do. Extra intra-op threads only
    add wake-up jitter, and on a busy machine they make streaming many times slower.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from clients.detector.postprocess import Event, EventTracker
from fl.config import DetectorConfig
from fl.frontend import Frontend
from fl.models import TCN


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block; the previous setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class StreamingFrontend:
    """Blocks of mono samples at the frontend's rate -> the offline frontend's frames, once ready."""

    def __init__(self, frontend: Frontend) -> None:
        config = frontend.config
        self.frontend = frontend
        self.n_fft = config.n_fft
        self.hop = config.hop_length
        self.pad = config.n_fft // 2
        self.reset()

    @property
    def delay_samples(self) -> int:
        """Samples between the one a frame is centred on and the last one it needs (the frontend delay)."""
        return self.frontend.config.delay_samples

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
            if self._n_samples < self.frontend.config.min_samples:  # too few to reflect the start
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
        return np.zeros((0, self.frontend.config.n_mels), dtype=np.float32)

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

    @torch.inference_mode()
    def _compute(self, count: int) -> np.ndarray:
        first = self._n_frames * self.hop - self._buffer_start
        span = self._buffer[first : first + (count - 1) * self.hop + self.n_fft]
        segments = torch.from_numpy(span).unfold(0, self.n_fft, self.hop)  # [count, n_fft], a view
        return self.frontend.segment_frames(segments).numpy()


class StreamEngine:
    """Audio blocks -> per-frame class probabilities ``[k, n_classes]``, equal to offline processing."""

    def __init__(self, model: TCN, frontend: Frontend) -> None:
        if not isinstance(model, TCN):
            raise TypeError(f"streaming needs a TCN (it has a step function), got {type(model).__name__}")
        if model.n_mels != frontend.config.n_mels:
            raise ValueError(
                f"model expects {model.n_mels} mel bands, the frontend gives {frontend.config.n_mels}"
            )
        self.model = model.eval()
        self.frontend = StreamingFrontend(frontend)
        self.reset()

    def reset(self) -> None:
        """Start a new stream (frontend buffer and model caches cleared)."""
        self.frontend.reset()
        self._state = self.model.init_state(1)

    def push(self, block: np.ndarray) -> np.ndarray:
        """Add samples; return the probabilities of the frames they completed."""
        return self.probabilities(self.frontend.push(block))

    def flush(self) -> np.ndarray:
        """End of stream: probabilities of the remaining frames."""
        return self.probabilities(self.frontend.flush())

    @torch.inference_mode()
    def probabilities(self, frames: np.ndarray) -> np.ndarray:
        """Probabilities of the next frames ``[k, n_mels]`` of this stream (the model's caches carry on)."""
        frames_t = torch.from_numpy(frames)
        probs = np.empty((len(frames), self.model.n_classes), dtype=np.float32)
        for i in range(len(frames)):
            logits, self._state = self.model.step(frames_t[i : i + 1], self._state)
            probs[i] = torch.sigmoid(logits).numpy()[0]
        return probs


class StreamingDetector:
    """Audio blocks -> events: :class:`StreamEngine` followed by :class:`EventTracker`.

    Events are stamped with the audio time at the end of the block that completed them (``emitted_s``).
    """

    def __init__(
        self, model: TCN, frontend: Frontend, labels: Sequence[str], settings: DetectorConfig
    ) -> None:
        if len(labels) != model.n_classes:
            raise ValueError(f"{len(labels)} labels for a model with {model.n_classes} classes")
        self.engine = StreamEngine(model, frontend)
        self.frontend = frontend
        self.sample_rate = frontend.config.sample_rate
        self.tracker = EventTracker(labels, settings, frontend.config.frame_s)

    @property
    def audio_seconds(self) -> float:
        """Audio received so far, in seconds."""
        return self.engine.frontend.n_samples / self.sample_rate

    @property
    def frontend_delay_ms(self) -> float:
        """Frontend delay (:attr:`fl.config.FrontendConfig.delay_samples`)."""
        return self.engine.frontend.delay_samples / self.sample_rate * 1000.0

    @property
    def algorithmic_latency_ms(self) -> float:
        """Frontend delay plus post-processing delay (minimum duration less one frame), without blocks."""
        return self.frontend_delay_ms + self.tracker.algorithmic_delay_ms

    def feed(self, block: np.ndarray) -> list[Event]:
        """Process one block of samples; return the events it completed."""
        return self._track(self.engine.frontend.push(block))

    def finish(self, flush_audio: bool = True) -> list[Event]:
        """End of stream: the last frames (when ``flush_audio``), then the still active events are closed."""
        events = self._track(self.engine.frontend.flush()) if flush_audio else []
        return events + self.tracker.close(self.audio_seconds)

    def _track(self, frames: np.ndarray) -> list[Event]:
        """The events completed by the next frames (their probabilities and levels)."""
        return self.tracker.update(self.engine.probabilities(frames), self.audio_seconds,
                                   self.frontend.levels_db(frames))


@torch.inference_mode()
def frame_probabilities(model: TCN, frames: np.ndarray) -> np.ndarray:
    """Per-frame sigmoid probabilities ``[n, n_classes]`` of a whole frame sequence (``forward``; equal to
    streaming within 1e-4)."""
    return torch.sigmoid(model.eval()(torch.from_numpy(frames).unsqueeze(0)))[0].numpy()


def offline_probabilities(model: TCN, frontend: Frontend, wave: np.ndarray) -> np.ndarray:
    """Reference: per-frame probabilities of a whole waveform (``Frontend.frames`` + ``forward``)."""
    return frame_probabilities(model, frontend.frames(wave, frontend.config.sample_rate))

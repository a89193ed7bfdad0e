"""The torch engine of the streaming detector: the training frontend (:class:`fl.frontend.Frontend`) and the
TCN's own ``step``, which equals its offline ``forward``; per-frame probabilities equal
``sigmoid(model(frames))`` within 1e-4.

Threads
    The per-hop work is tiny (one FFT, a few small matrix-vector products): run it on one thread
    (:func:`single_thread`), as ``listen`` and ``benchmarks/stream/bench.py`` do. Extra intra-op threads only
    add wake-up jitter, and on a busy machine they make streaming many times slower.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import numpy as np
import torch

from clients.detector.stream import StreamingDetector, StreamingFrontend
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


class TorchFrames:
    """The training frontend as a :class:`clients.detector.stream.FrameMaker`."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.config = frontend.config

    @torch.inference_mode()
    def frames_of(self, span: np.ndarray, count: int) -> np.ndarray:
        """``count`` frames of ``span`` (windows every hop samples from its start)."""
        segments = torch.from_numpy(span).unfold(0, self.config.n_fft, self.config.hop_length)[:count]
        return self.frontend.segment_frames(segments).numpy()

    def levels_db(self, frames: np.ndarray) -> np.ndarray:
        """Each frame's level in dB."""
        return self.frontend.levels_db(frames)


class StreamEngine:
    """``TCN.step`` as a :class:`clients.detector.stream.StepEngine`; with its own :class:`StreamingFrontend`,
    also audio blocks -> per-frame probabilities ``[k, n_classes]`` (:meth:`push`, :meth:`flush`)."""

    def __init__(self, model: TCN, frontend: Frontend) -> None:
        if not isinstance(model, TCN):
            raise TypeError(f"streaming needs a TCN (it has a step function), got {type(model).__name__}")
        if model.n_mels != frontend.config.n_mels:
            raise ValueError(
                f"model expects {model.n_mels} mel bands, the frontend gives {frontend.config.n_mels}"
            )
        self.model = model.eval()
        self.n_classes = model.n_classes
        self.frontend = StreamingFrontend(TorchFrames(frontend))
        self.reset()

    def threads(self) -> AbstractContextManager:
        """Torch on one intra-op thread (:func:`single_thread`)."""
        return single_thread()

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


def torch_detector(model: TCN, frontend: Frontend, labels: Sequence[str], settings: DetectorConfig
                   ) -> StreamingDetector:
    """A streaming detector that runs ``model``'s step and ``frontend`` in torch."""
    return StreamingDetector(StreamEngine(model, frontend), TorchFrames(frontend), labels, settings)


@torch.inference_mode()
def frame_probabilities(model: TCN, frames: np.ndarray) -> np.ndarray:
    """Per-frame sigmoid probabilities ``[n, n_classes]`` of a whole frame sequence (``forward``; equal to
    streaming within 1e-4)."""
    return torch.sigmoid(model.eval()(torch.from_numpy(frames).unsqueeze(0)))[0].numpy()


def offline_probabilities(model: TCN, frontend: Frontend, wave: np.ndarray) -> np.ndarray:
    """Reference: per-frame probabilities of a whole waveform (``Frontend.frames`` + ``forward``)."""
    return frame_probabilities(model, frontend.frames(wave, frontend.config.sample_rate))

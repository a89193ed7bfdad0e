"""The portable streaming detector: numpy and onnxruntime only (no torch, no Flower, no Ray).

It runs a bundle exported with ``fedsound export --onnx`` (or a personal bundle made from one):

* :class:`NumpyFrames`: the training frontend's frames in numpy, from the bundle's ``frontend.npz`` (the same
  window and mel filterbank): window, real FFT, power, filterbank, log, exactly as
  :meth:`fl.frontend.Frontend.segment_frames` computes them (tested equal within float rounding);
* :class:`OnnxStep`: the TCN's streaming step from ``step.onnx`` (:mod:`clients.detector.onnx_export`), its
  caches held here between frames, on one onnxruntime thread.

:func:`portable_detector` puts them in a :class:`clients.detector.stream.StreamingDetector` with the bundle's
post-processing, so ``fedsound listen --engine onnx`` gives the torch engine's events.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import numpy as np

from clients.detector.manifest import BundleError, Manifest, read_manifest
from clients.detector.stream import StreamingDetector
from fl.config import DetectorConfig, FrontendConfig
from fl.dsp import levels_db


class NumpyFrames:
    """Frames of the training frontend computed in numpy (a :class:`clients.detector.stream.FrameMaker`)."""

    def __init__(self, config: FrontendConfig, window: np.ndarray, filterbank: np.ndarray) -> None:
        if window.shape != (config.n_fft,) or filterbank.shape != (config.n_fft // 2 + 1, config.n_mels):
            raise ValueError(f"window {window.shape} / filterbank {filterbank.shape} do not fit the frontend")
        self.config = config
        self.window = window.astype(np.float32)
        self.filterbank = filterbank.astype(np.float32)

    def frames_of(self, span: np.ndarray, count: int) -> np.ndarray:
        """``count`` frames of ``span`` (windows every hop samples from its start)."""
        segments = np.lib.stride_tricks.sliding_window_view(span, self.config.n_fft)[:: self.config.hop_length]
        spectrum = np.fft.rfft(segments[:count] * self.window, axis=1)
        power = spectrum.real**2 + spectrum.imag**2
        if self.config.power != 2.0:
            power = power ** (self.config.power / 2)
        mel = power.astype(np.float32) @ self.filterbank
        if self.config.scale == "log":
            return np.log(np.maximum(mel, self.config.log_floor)).astype(np.float32)
        return mel.astype(np.float32)

    def levels_db(self, frames: np.ndarray) -> np.ndarray:
        """Each frame's level in dB."""
        return levels_db(frames, self.config.scale == "log", self.config.log_floor)


class OnnxStep:
    """The exported step in onnxruntime (a :class:`clients.detector.stream.StepEngine`)."""

    def __init__(self, model_bytes: bytes, n_classes: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        self.session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.cache_inputs = [i for i in self.session.get_inputs() if i.name.startswith("cache_")]
        self.outputs = ["probabilities", *(f"new_{i.name}" for i in self.cache_inputs)]
        self.n_classes = n_classes
        self.reset()

    def reset(self) -> None:
        """Zero caches: the next frame starts a new stream."""
        self.caches = {i.name: np.zeros(i.shape, dtype=np.float32) for i in self.cache_inputs}

    def threads(self) -> AbstractContextManager:
        """The session already runs on one thread."""
        return nullcontext()

    def probabilities(self, frames: np.ndarray) -> np.ndarray:
        """Probabilities ``[k, n_classes]`` of the next frames."""
        probs = np.empty((len(frames), self.n_classes), dtype=np.float32)
        names = list(self.caches)
        for i in range(len(frames)):
            result = self.session.run(self.outputs, {"frame": frames[i : i + 1], **self.caches})
            probs[i] = result[0][0]
            self.caches = dict(zip(names, result[1:], strict=True))
        return probs


def portable_parts(manifest: Manifest) -> tuple[NumpyFrames, OnnxStep]:
    """The numpy frontend and the ONNX step of a verified bundle; a BundleError if it has no portable files or
    onnxruntime is missing."""
    portable = manifest.portable
    if portable is None:
        raise BundleError(f"{manifest.path}: the bundle has no portable files; export it with "
                          "`fedsound export MODEL BUNDLE --onnx`")
    try:
        import onnxruntime  # noqa: F401 (only checked here: OnnxStep imports it)
    except ImportError:
        raise BundleError("the portable detector needs onnxruntime: pip install onnxruntime") from None
    with np.load(manifest.path / portable["frontend"], allow_pickle=False) as arrays:
        frames = NumpyFrames(manifest.frontend_config, arrays["window"], arrays["filterbank"])
    step = OnnxStep((manifest.path / portable["step"]).read_bytes(), len(manifest.labels))
    return frames, step


def portable_detector(source, settings: DetectorConfig | None = None) -> tuple[StreamingDetector, Manifest]:
    """A streaming detector on a bundle's portable files (``source``: a bundle or a profile), with the bundle's
    post-processing unless ``settings`` are given."""
    manifest = read_manifest(source)
    frames, step = portable_parts(manifest)
    return StreamingDetector(step, frames, manifest.labels, settings or manifest.detector), manifest

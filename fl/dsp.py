"""Signal processing in numpy alone, shared by the torch frontend (:mod:`fl.frontend`) and the portable detector.

* :func:`sinc_resample_kernel`: torchaudio's ``Resample`` filter bank (windowed sinc, Hann window, its default
  width and rolloff), computed in numpy with torchaudio's own arithmetic (tested equal to torchaudio's kernel).
* :class:`StreamingResampler`: that resampling on a stream arriving in blocks of any size, equal to resampling
  the whole signal offline.
* :func:`levels_db`: a frame's sound level from its log-mel (or mel power) values.
"""

from __future__ import annotations

import math

import numpy as np

LOWPASS_FILTER_WIDTH = 6  # torchaudio's defaults
ROLLOFF = 0.99


def sinc_resample_kernel(orig_freq: int, new_freq: int) -> tuple[np.ndarray, int, int, int]:
    """torchaudio's resampling filters from ``orig_freq`` to ``new_freq`` Hz: ``(kernel [new, taps] float32,
    width, orig, new)`` with the rates divided by their gcd. Output group ``j`` (``new`` samples) is
    ``kernel @ padded[j * orig : j * orig + taps]`` where ``padded`` is the signal with ``width`` zeros before it
    and ``width + orig`` after it."""
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    base_freq = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / base_freq)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None] / orig
    # torchaudio divides the integer output positions in float32 (torch's default dtype), then adds in float64
    t = (np.arange(0, -new, -1).astype(np.float32) / np.float32(new))[:, None].astype(np.float64) + idx
    t = np.clip(t * base_freq, -LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = np.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, 1.0, np.sin(t) / t)
    kernel = kernel * (window * (base_freq / orig))
    return kernel.astype(np.float32), width, orig, new


class StreamingResampler:
    """Resampling of a stream that arrives in blocks of any size: :meth:`process` returns each output sample as soon
    as the input it needs has arrived, :meth:`flush` the rest at the end; the concatenated output equals
    torchaudio's ``Resample`` of the whole signal up to float rounding. The stream keeps the padded input not yet
    consumed and computes every complete output group of a block in one matrix product."""

    def __init__(self, orig_freq: int, new_freq: int) -> None:
        self.kernel, self.width, self.orig, self.new = sinc_resample_kernel(orig_freq, new_freq)
        self.taps = self.kernel.shape[1]
        self.pending = np.zeros(self.width, dtype=np.float32)  # padded input from the next group's first sample
        self.received = self.emitted = 0

    def _groups(self) -> np.ndarray:
        count = (len(self.pending) - self.taps) // self.orig + 1 if len(self.pending) >= self.taps else 0
        if count <= 0:
            return np.zeros(0, dtype=np.float32)
        used = self.pending[: (count - 1) * self.orig + self.taps]
        windows = np.lib.stride_tricks.sliding_window_view(used, self.taps)[:: self.orig]  # [count, taps]
        out = (windows @ self.kernel.T).reshape(-1)  # [count * new]
        self.pending = self.pending[count * self.orig :]
        return out.astype(np.float32, copy=False)

    def process(self, block: np.ndarray) -> np.ndarray:
        """The resampled samples that ``block`` (mono float) completes."""
        block = np.asarray(block, dtype=np.float32)
        self.received += len(block)
        self.pending = np.concatenate((self.pending, block))
        out = self._groups()
        self.emitted += len(out)
        return out

    def flush(self) -> np.ndarray:
        """The remaining samples, after the stream's end (the same zero padding as the offline path)."""
        self.pending = np.concatenate((self.pending, np.zeros(self.width + self.orig, dtype=np.float32)))
        out = self._groups()
        total = math.ceil(self.new * self.received / self.orig)
        keep = max(0, total - self.emitted)
        self.emitted += min(keep, len(out))
        return out[:keep]


def resample(wave: np.ndarray, orig_freq: int, new_freq: int) -> np.ndarray:
    """A whole mono signal resampled from ``orig_freq`` to ``new_freq`` Hz (torchaudio's numbers)."""
    if orig_freq == new_freq:
        return np.asarray(wave, dtype=np.float32)
    stream = StreamingResampler(orig_freq, new_freq)
    return np.concatenate((stream.process(wave), stream.flush()))


def levels_db(frames: np.ndarray, log_scale: bool, floor: float) -> np.ndarray:
    """Frames ``[n, n_mels]`` -> each frame's level in dB (10 log10 of its summed mel power); ``log_scale``: the
    frames hold log mel power (else mel power itself); ``floor`` keeps silence finite."""
    power = np.asarray(frames, dtype=np.float64)
    if log_scale:
        power = np.exp(power)
    return (10.0 * np.log10(power.sum(axis=1) + floor)).astype(np.float32)

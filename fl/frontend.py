"""The one audio frontend: waveform -> (log-)mel frames, and the patch rules of fsd_fed.

Feature preparation, training-time reading, export and the streaming detector all use this module, so the
features a model sees on the laptop are computed exactly as those it was trained on.

The numbers are torchaudio's: ``Resample`` (sinc interpolation, its default width and rolloff) followed by
``MelSpectrogram`` (Hann window, ``center=True`` with reflect padding, htk mel scale, no norm). They are
computed here from the same kernel, window and filterbank in a form that is cheaper on a CPU: whole-factor
decimation (FSD50K's 44.1 kHz to 22.05 kHz) runs polyphase in fixed-size blocks, and the STFT is an ``unfold``
of the padded signal into frames followed by one real FFT, which is also how the streaming detector computes
its frames.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchaudio

from fl.config import FrontendConfig
from fl.dsp import levels_db


class DecimatingResampler:
    """torchaudio's ``Resample(orig, new)`` for ``orig`` a whole multiple of ``new`` (44.1 kHz -> 22.05 kHz),
    computed polyphase in fixed-size blocks.

    torchaudio convolves the padded signal with one filter of length ``K`` at stride ``factor = orig / new``.
    Splitting the signal into its ``factor`` phases turns that into a stride-1 convolution over ``factor``
    input channels with taps ``ceil(K / factor)`` long, and running it on blocks of a fixed number of outputs
    keeps one convolution shape for every clip length (the CPU backend otherwise prepares a new kernel for
    each length it meets). Equal to torchaudio's output up to float rounding.
    """

    BLOCK = 8192  # outputs per convolution call

    def __init__(self, orig_freq: int, new_freq: int) -> None:
        if orig_freq % new_freq:
            raise ValueError(f"{orig_freq} Hz is not a whole multiple of {new_freq} Hz")
        reference = torchaudio.transforms.Resample(orig_freq, new_freq)
        self.factor, self.width = orig_freq // new_freq, reference.width
        kernel = reference.kernel[0, 0].to(torch.float32)  # [K]
        self.taps = -(-kernel.numel() // self.factor)
        padded = torch.nn.functional.pad(kernel, (0, self.taps * self.factor - kernel.numel()))
        self.kernel = padded.view(self.taps, self.factor).T.contiguous()[None]  # [1, factor, taps]

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        """Resample a 1-D float waveform."""
        n_out = math.ceil(wave.shape[-1] / self.factor)
        n_blocks = -(-n_out // self.BLOCK)
        columns = n_blocks * self.BLOCK + self.taps - 1
        padded = torch.nn.functional.pad(wave, (self.width, columns * self.factor - wave.shape[-1] - self.width))
        phases = padded.view(columns, self.factor).T  # phase r holds x[j * factor + r]
        out = torch.empty(n_blocks * self.BLOCK)
        for start in range(0, n_blocks * self.BLOCK, self.BLOCK):
            block = phases[None, :, start : start + self.BLOCK + self.taps - 1]
            out[start : start + self.BLOCK] = torch.nn.functional.conv1d(block, self.kernel)[0, 0]
        return out[:n_out]


def _top_hz(config: FrontendConfig) -> float:
    """The filterbank's upper edge: ``f-max``, or half the sample rate where it is 0."""
    return config.f_max or float(config.sample_rate // 2)


def band_centres_hz(config: FrontendConfig) -> np.ndarray:
    """Centre frequencies (Hz) of the mel bands of :class:`Frontend`'s filterbank (HTK mel scale)."""
    low, high = (2595.0 * np.log10(1.0 + f / 700.0) for f in (config.f_min, _top_hz(config)))
    mels = np.linspace(low, high, config.n_mels + 2)[1:-1]
    return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)


class Frontend:
    """Waveform -> mel frames ``[n_frames, n_mels]``, equal to torchaudio's ``MelSpectrogram``.

    With ``scale = "log"`` the output is ``log(max(mel, log_floor))``; with ``"linear"`` it is the mel power
    itself, which reproduces fsd_fed's numbers.
    """

    def __init__(self, config: FrontendConfig) -> None:
        self.config = config
        win_length = config.win_length or config.n_fft
        left = (config.n_fft - win_length) // 2  # torch.stft centres a shorter window in n_fft
        self.window = torch.zeros(config.n_fft)
        self.window[left : left + win_length] = torch.hann_window(win_length)
        self.filterbank = torchaudio.functional.melscale_fbanks(  # [n_fft // 2 + 1, n_mels]
            config.n_fft // 2 + 1,
            f_min=config.f_min,
            f_max=_top_hz(config),
            n_mels=config.n_mels,
            sample_rate=config.sample_rate,
            norm=None,
            mel_scale="htk",
        )
        self._resamplers: dict[int, DecimatingResampler | torchaudio.transforms.Resample] = {}

    def n_frames(self, n_samples: int) -> int:
        """Number of frames produced for ``n_samples`` samples at the frontend's rate (centered STFT)."""
        return 1 + n_samples // self.config.hop_length

    def resample(self, wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Resample a mono waveform to the frontend's rate (no-op when it already matches)."""
        if sample_rate == self.config.sample_rate:
            return wave
        if sample_rate not in self._resamplers:
            rate = self.config.sample_rate
            self._resamplers[sample_rate] = (DecimatingResampler(sample_rate, rate) if sample_rate % rate == 0
                                             else torchaudio.transforms.Resample(sample_rate, rate))
        return self._resamplers[sample_rate](wave)

    def compress(self, mel: torch.Tensor) -> torch.Tensor:
        """Apply the configured amplitude scale to mel power values."""
        if self.config.scale == "log":
            return torch.log(torch.clamp(mel, min=self.config.log_floor))
        return mel

    def levels_db(self, frames: np.ndarray) -> np.ndarray:
        """Frames ``[n, n_mels]`` of this frontend -> each frame's level in dB (10 log10 of its summed mel power)."""
        return levels_db(frames, self.config.scale == "log", self.config.log_floor)

    def segment_frames(self, segments: torch.Tensor) -> torch.Tensor:
        """Signal segments ``[count, n_fft]`` (one per frame, unwindowed) -> frames ``[count, n_mels]``."""
        spectrum = torch.fft.rfft(segments * self.window)
        power = (spectrum * spectrum.conj()).real  # |X|^2, the fastest form on a CPU
        if self.config.power != 2.0:
            power = power.pow(self.config.power / 2)
        return self.compress(torch.matmul(power, self.filterbank))

    @torch.inference_mode()
    def frames(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono float waveform at ``sample_rate`` -> float32 frames ``[n_frames, n_mels]``."""
        if wave.ndim != 1:
            raise ValueError(f"expected a mono waveform, got shape {wave.shape}")
        signal = self.resample(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), sample_rate)
        if signal.shape[0] < self.config.min_samples:
            raise ValueError(f"a waveform of {signal.shape[0]} samples at {self.config.sample_rate} Hz is too "
                             f"short: the centred STFT needs at least {self.config.min_samples}")
        pad = self.config.n_fft // 2
        padded = torch.nn.functional.pad(signal[None], (pad, pad), mode="reflect")[0]
        return self.segment_frames(padded.unfold(0, self.config.n_fft, self.config.hop_length)).numpy()


def n_segments(n_frames: int, config: FrontendConfig) -> int:
    """Patches cut from a clip of ``n_frames`` frames: ``int(n_frames / hop) - 1``, at least 1 (fsd_fed)."""
    return max(1, n_frames // config.patch_hop - 1)


def patch_frame_indices(
    offsets: np.ndarray, n_frames: np.ndarray, segments: np.ndarray, config: FrontendConfig
) -> np.ndarray:
    """Frame indices ``[n, patch_frames]`` into a store's frame array for a batch of patches.

    Patch ``s`` of a clip starts at frame ``s * patch_hop``. A clip shorter than ``patch_frames`` is repeated
    (concatenated with itself) up to ``patch_frames``; a patch that runs past the clip's end (at most one frame
    for fsd_fed's counts) is completed by repeating the clip's last frame.
    """
    offsets = np.asarray(offsets, dtype=np.int64)[:, None]
    n_frames = np.asarray(n_frames, dtype=np.int64)[:, None]
    segments = np.asarray(segments, dtype=np.int64)[:, None]
    j = np.arange(config.patch_frames, dtype=np.int64)[None, :]
    short = n_frames < config.patch_frames
    within = np.where(short, j % n_frames, np.minimum(segments * config.patch_hop + j, n_frames - 1))
    return offsets + within


def cut_patches(frames: np.ndarray, config: FrontendConfig) -> np.ndarray:
    """All patches of one clip's frames: ``[n_segments, patch_frames, n_mels]`` (float32)."""
    n = len(frames)
    count = n_segments(n, config)
    idx = patch_frame_indices(np.zeros(count), np.full(count, n), np.arange(count), config)
    return frames[idx].astype(np.float32)

"""The one audio frontend: waveform -> (log-)mel frames, and the patch rules of fsd_fed.

Feature preparation, training-time reading, export and the streaming detector all use this module, so the
features a model sees on the laptop are computed exactly as those it was trained on.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio

from fl.config import FrontendConfig


class Frontend:
    """Waveform -> mel frames ``[n_frames, n_mels]`` with torchaudio's MelSpectrogram (center, reflect, htk).

    With ``scale = "log"`` the output is ``log(max(mel, log_floor))``; with ``"linear"`` it is the mel power
    itself, which reproduces fsd_fed's numbers.
    """

    def __init__(self, config: FrontendConfig) -> None:
        self.config = config
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate,
            n_fft=config.n_fft,
            win_length=config.win_length or None,
            hop_length=config.hop_length,
            f_min=config.f_min,
            f_max=config.f_max or None,
            n_mels=config.n_mels,
            power=config.power,
        )
        self._resamplers: dict[int, torchaudio.transforms.Resample] = {}

    def n_frames(self, n_samples: int) -> int:
        """Number of frames produced for ``n_samples`` samples at the frontend's rate (centered STFT)."""
        return 1 + n_samples // self.config.hop_length

    def resample(self, wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Resample a mono waveform to the frontend's rate (no-op when it already matches)."""
        if sample_rate == self.config.sample_rate:
            return wave
        if sample_rate not in self._resamplers:
            self._resamplers[sample_rate] = torchaudio.transforms.Resample(sample_rate, self.config.sample_rate)
        return self._resamplers[sample_rate](wave)

    def compress(self, mel: torch.Tensor) -> torch.Tensor:
        """Apply the configured amplitude scale to mel power values."""
        if self.config.scale == "log":
            return torch.log(torch.clamp(mel, min=self.config.log_floor))
        return mel

    @torch.inference_mode()
    def frames(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono float waveform at ``sample_rate`` -> float32 frames ``[n_frames, n_mels]``."""
        if wave.ndim != 1:
            raise ValueError(f"expected a mono waveform, got shape {wave.shape}")
        signal = self.resample(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), sample_rate)
        mel = self.mel(signal)  # [n_mels, n_frames]
        return self.compress(mel).T.contiguous().numpy()


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

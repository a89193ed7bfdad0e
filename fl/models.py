"""Sound event models on log-mel frames ``x`` of shape [batch, time, bands] (float32).

* :class:`TCN`: a causal temporal convolutional network after Lea, Jain et al. (ICASSP 2022): an input
  projection (1-D convolution over time with the mel bands as channels), dilated causal residual blocks
  (kernel 5), a per-frame linear head. ``forward`` gives per-frame logits (streaming detection),
  ``clip_logits`` pools them over time (FSD50K tagging) with the same head. Normalisation is a LayerNorm over
  the channels of each frame, so training, streaming and every federated client see the same function (no
  batch statistics). ``step`` runs one frame at a time with cached past inputs and equals the offline
  ``forward`` on the same frames.
* :class:`VGGLike`: the small VGG-like baseline of the FSD50K paper, for 1-s patches of 101 frames.

Importable without Flower or Ray (torch only); :class:`fl.config.ModelConfig` describes the architecture.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fl.config import POOLINGS, ModelConfig


def pool_frames(frame_logits: Tensor, pooling: str) -> Tensor:
    """Pool per-frame logits [B, T, C] over time into clip logits [B, C] ("mean", "max" or "lse")."""
    if pooling == "mean":
        return frame_logits.mean(dim=1)
    if pooling == "max":
        return frame_logits.amax(dim=1)
    if pooling == "lse":  # log-mean-exp: smooth maximum, equal to the logit when all frames agree
        return torch.logsumexp(frame_logits, dim=1) - math.log(frame_logits.shape[1])
    raise ValueError(f"pooling: must be one of {', '.join(POOLINGS)}, got {pooling!r}")


class CausalConv1d(nn.Conv1d):
    """1-D convolution over time that sees only the current and past frames.

    Offline (``forward``, [B, C_in, T] -> [B, C_out, T]) the input is left-padded with
    ``(kernel_size - 1) * dilation`` zeros. Streaming (``step``) keeps exactly that many past input frames
    as its cache; a zero cache is the same left padding, so both paths give the same outputs.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.context = (kernel_size - 1) * dilation
        self.tap_stride = dilation

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.context, 0)))

    def init_cache(self, batch: int) -> Tensor:
        """Zero cache of past inputs, [batch, C_in, context]."""
        return self.weight.new_zeros(batch, self.in_channels, self.context)

    def step(self, x_t: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        """One frame [B, C_in] -> ([B, C_out], new cache)."""
        window = torch.cat((cache, x_t.unsqueeze(-1)), dim=-1)  # [B, C_in, context + 1]
        taps = window[:, :, :: self.tap_stride].reshape(x_t.shape[0], -1)  # [B, C_in * kernel]
        y = F.linear(taps, self.weight.reshape(self.out_channels, -1), self.bias)
        return y, window[:, :, 1:]


class FrameLinear(nn.Conv1d):
    """Kernel-1 convolution: one linear map per frame ([B, C_in, T] offline, [B, C_in] in ``step``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1)

    def step(self, x_t: Tensor) -> Tensor:
        return F.linear(x_t, self.weight[:, :, 0], self.bias)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each frame: [B, C, T] offline, [B, C] in ``step``."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)

    def step(self, x_t: Tensor) -> Tensor:
        return super().forward(x_t)


class ResidualBlock(nn.Module):
    """x + pointwise(dropout(relu(norm(dilated causal conv(x))))); streaming state = the conv's cache."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.conv = CausalConv1d(channels, channels, kernel_size, dilation)
        self.norm = ChannelLayerNorm(channels)
        self.dropout = nn.Dropout(dropout)
        self.pointwise = FrameLinear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pointwise(self.dropout(F.relu(self.norm(self.conv(x)))))

    def init_cache(self, batch: int) -> Tensor:
        return self.conv.init_cache(batch)

    def step(self, x_t: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        h, cache = self.conv.step(x_t, cache)
        return x_t + self.pointwise.step(F.relu(self.norm.step(h))), cache


class TCN(nn.Module):
    """Causal dilated TCN with a per-frame head (after Lea, Jain et al., ICASSP 2022).

    input projection (causal conv, kernel ``kernel_size``, mel bands -> ``channels``) -> LayerNorm -> ReLU
    -> one residual block per dilation -> LayerNorm -> ReLU -> linear head per frame.
    """

    def __init__(self, config: ModelConfig, n_mels: int, n_classes: int) -> None:
        super().__init__()
        self.config = config
        self.n_mels = n_mels
        self.n_classes = n_classes
        c = config.channels
        self.input_proj = CausalConv1d(n_mels, c, config.kernel_size)
        self.input_norm = ChannelLayerNorm(c)
        self.blocks = nn.ModuleList(
            ResidualBlock(c, config.kernel_size, d, config.dropout) for d in config.dilations
        )
        self.out_norm = ChannelLayerNorm(c)
        self.head = nn.Linear(c, n_classes)

    @property
    def receptive_field(self) -> int:
        """Frames of input that one output frame depends on (the current one included)."""
        return 1 + self.input_proj.context + sum(block.conv.context for block in self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        """Per-frame logits: [B, T, bands] -> [B, T, n_classes]."""
        return self.head(self.features(x))

    def features(self, x: Tensor) -> Tensor:
        """What the head reads, per frame: [B, T, bands] -> [B, T, channels]."""
        h = F.relu(self.input_norm(self.input_proj(x.transpose(1, 2))))
        for block in self.blocks:
            h = block(h)
        return F.relu(self.out_norm(h)).transpose(1, 2)

    def clip_logits(self, x: Tensor) -> Tensor:
        """Clip logits [B, n_classes]: the per-frame logits pooled over time (``config.pooling``)."""
        return pool_frames(self.forward(x), self.config.pooling)

    def init_state(self, batch: int = 1) -> list[Tensor]:
        """Streaming state before the first frame: zero caches (= the causal left padding)."""
        return [self.input_proj.init_cache(batch), *(block.init_cache(batch) for block in self.blocks)]

    @torch.inference_mode()
    def step(self, frame: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One frame [B, bands] -> (logits [B, n_classes], new state). Inference only (no dropout).

        Feeding frames 0..T-1 one by one from ``init_state`` gives ``forward`` of those frames.
        """
        if len(state) != 1 + len(self.blocks):
            raise ValueError(
                f"state: expected {1 + len(self.blocks)} caches from init_state, got {len(state)}"
            )
        h, proj_cache = self.input_proj.step(frame, state[0])
        h = F.relu(self.input_norm.step(h))
        new_state = [proj_cache]
        for block, cache in zip(self.blocks, state[1:], strict=True):
            h, cache = block.step(h, cache)
            new_state.append(cache)
        return self.head(F.relu(self.out_norm.step(h))), new_state


class VGGLike(nn.Module):
    """The FSD50K paper's VGG-like baseline (Fonseca et al., TASLP 2022, arXiv 2010.00475, Sec. VII).

    From the paper: 1-s patches of 101 frames x 96 log-mel bands, about 0.27 M weights, clip mAP 0.434. The
    layout follows the usual reading of its description (also that of the unofficial fsd50k-pytorch port):
    blocks of 3x3 convolutions each followed by BatchNorm and ReLU, 2x2 max-pooling after each block, global
    pooling over time and frequency, one dense output layer. Here: three blocks of (conv3x3-BN-ReLU) x 2 with
    32, 64 and 128 filters, mean over frequency then max + mean over time, dropout, linear. Convolutions have no
    bias (BatchNorm follows). With 200 classes this is 312,680 parameters, 16% above the paper's 0.27 M (the
    fsd50k-pytorch port, with a third 32-filter conv and avg||max pooling, has 348 K).

    BatchNorm is kept as in the paper: this is the centralised baseline. It is a poor fit for non-IID
    federated clients (running statistics differ per client); the TCN avoids it.
    """

    widths = (32, 64, 128)

    def __init__(self, config: ModelConfig, n_mels: int, n_classes: int) -> None:
        super().__init__()
        self.config = config
        self.n_mels = n_mels
        self.n_classes = n_classes
        layers: list[nn.Module] = []
        in_ch = 1
        for width in self.widths:
            for _ in range(2):
                conv = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
                layers += [conv, nn.BatchNorm2d(width), nn.ReLU()]
                in_ch = width
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(in_ch, n_classes)

    def clip_logits(self, x: Tensor) -> Tensor:
        """Clip logits: [B, T, bands] -> [B, n_classes]."""
        h = self.features(x.unsqueeze(1)).mean(dim=3)  # [B, 128, T']
        h = h.amax(dim=2) + h.mean(dim=2)
        return self.classifier(self.dropout(h))

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`clip_logits` (this model has no per-frame output)."""
        return self.clip_logits(x)


def build_model(cfg: ModelConfig, n_mels: int, n_classes: int) -> nn.Module:
    """The model named by ``cfg.name`` for ``n_mels`` input bands and ``n_classes`` outputs."""
    for key, value in (("n-mels", n_mels), ("n-classes", n_classes)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{key}: must be a positive integer, got {value!r}")
    if cfg.name == "tcn":
        return TCN(cfg, n_mels, n_classes)
    return VGGLike(cfg, n_mels, n_classes)

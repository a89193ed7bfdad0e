"""Typed configuration loaded from TOML.

One key means one thing on every path: TOML files under ``configs/``, command-line flags and Flower's
``[tool.flwr.app.config]`` (flattened as ``section.key``) all use the same kebab-case names, which map to the
snake_case fields of the dataclasses below. Unknown keys, wrong types and out-of-range values raise a
:class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from fl.errors import ConfigError

# The configs shipped as package data (the ``configs`` package): a folder on disk in every supported install.
CONFIG_DIR = Path(str(resources.files("configs")))


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{key}: {message}")


MODEL_NAMES = ("tcn", "vgg")
POOLINGS = ("mean", "max", "lse")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the model (TOML table ``[model]``, kebab-case keys).

    The TCN uses every field. The VGG-like baseline has a fixed architecture (the paper's) and uses only
    ``dropout`` (before its classifier); its clip pooling is its own global pooling.
    """

    name: str = "tcn"  # "tcn" | "vgg"
    channels: int = 64  # TCN width (paper-sized variant: 256)
    kernel_size: int = 5
    # One residual block per dilation. With the kernel-5 input projection the receptive field is
    # 1 + 4 + 4 * (1 + 2 + 3) = 29 frames (290 ms), close to Lea et al.'s ~26 frames / 300 ms.
    dilations: tuple[int, ...] = (1, 2, 3)
    dropout: float = 0.1
    # Per-frame logits -> clip logits. "lse" (log-mean-exp) lies between mean and max: a clip label is
    # carried by the frames where the sound is, which also keeps the per-frame logits usable for detection.
    pooling: str = "lse"

    def __post_init__(self) -> None:
        if isinstance(self.dilations, list):  # TOML and JSON give lists
            object.__setattr__(self, "dilations", tuple(self.dilations))
        _check(self.name in MODEL_NAMES, "name",
               f"must be one of {', '.join(MODEL_NAMES)}, got {self.name!r}")
        _check(_is_int(self.channels) and self.channels >= 1, "channels",
               f"must be a positive integer, got {self.channels!r}")
        _check(_is_int(self.kernel_size) and self.kernel_size >= 1, "kernel-size",
               f"must be a positive integer, got {self.kernel_size!r}")
        _check(isinstance(self.dilations, tuple) and len(self.dilations) >= 1
               and all(_is_int(d) and d >= 1 for d in self.dilations), "dilations",
               f"must be a non-empty list of positive integers, got {self.dilations!r}")
        _check(isinstance(self.dropout, int | float) and not isinstance(self.dropout, bool)
               and 0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        _check(self.pooling in POOLINGS, "pooling",
               f"must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")


@dataclass(frozen=True)
class FrontendConfig:
    """Audio -> log-mel frames. Defaults follow fsd_fed / the FSD50K paper (22.05 kHz, 96 bands, 10 ms hop)."""

    sample_rate: int = 22050
    n_fft: int = 660
    win_length: int = 0  # 0 means n_fft
    hop_length: int = 220
    n_mels: int = 96
    f_min: float = 0.0
    f_max: float = 0.0  # 0 means sample_rate / 2
    power: float = 2.0
    scale: str = "log"  # "log" | "linear" (linear reproduces fsd_fed's numbers)
    log_floor: float = 1e-10
    patch_frames: int = 101
    patch_hop: int = 50
    store_dtype: str = "float16"

    def __post_init__(self) -> None:
        _check(self.sample_rate >= 4000, "sample-rate", "must be at least 4000")
        _check(self.n_fft >= 16, "n-fft", "must be at least 16")
        _check(0 <= self.win_length <= self.n_fft, "win-length", "must be between 0 and n-fft")
        _check(self.hop_length >= 1, "hop-length", "must be at least 1")
        _check(1 <= self.n_mels <= self.n_fft // 2 + 1, "n-mels", "must be between 1 and n-fft/2+1")
        _check(self.f_max == 0 or self.f_min < self.f_max <= self.sample_rate / 2, "f-max",
               "must be 0 or between f-min and sample-rate/2")
        _check(self.power > 0, "power", "must be positive")
        _check(self.scale in ("log", "linear"), "scale", "must be 'log' or 'linear'")
        _check(self.log_floor > 0, "log-floor", "must be positive")
        _check(self.patch_frames >= 1, "patch-frames", "must be at least 1")
        _check(1 <= self.patch_hop, "patch-hop", "must be at least 1")
        _check(self.store_dtype in ("float16", "float32"), "store-dtype", "must be 'float16' or 'float32'")
        _check(self.scale == "log" or self.store_dtype == "float32", "store-dtype",
               "must be 'float32' with scale = 'linear' (mel power overflows float16)")

    @property
    def frame_s(self) -> float:
        """Seconds between frames (the hop)."""
        return self.hop_length / self.sample_rate

    @property
    def delay_samples(self) -> int:
        """Samples from the one a frame is centred on to the last one it needs (the centred STFT's
        lookahead): ``n_fft - n_fft // 2``."""
        return self.n_fft - self.n_fft // 2

    @property
    def min_samples(self) -> int:
        """The shortest waveform (at ``sample_rate``) the centred STFT takes: it reflects ``n_fft // 2`` samples
        at each end, which needs more than that many."""
        return self.n_fft // 2 + 1

    @property
    def delay_s(self) -> float:
        """The frontend delay in seconds (:attr:`delay_samples`)."""
        return self.delay_samples / self.sample_rate


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by central training, federated clients and fine-tuning."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    optimizer: str = "adam"  # "adam" | "sgd"
    weight_decay: float = 0.0
    patience: int = 5  # early stopping on val mAP; 0 disables
    num_workers: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", "must be at least 1")
        _check(self.batch_size >= 1, "batch-size", "must be at least 1")
        _check(0 < self.lr < 10, "lr", "must be in (0, 10)")
        _check(self.optimizer in ("adam", "sgd"), "optimizer", "must be 'adam' or 'sgd'")
        _check(self.weight_decay >= 0, "weight-decay", "must be non-negative")
        _check(self.patience >= 0, "patience", "must be non-negative")
        _check(self.num_workers >= 0, "num-workers", "must be non-negative")
        _check(self.device in ("auto", "cpu", "cuda"), "device", "must be 'auto', 'cpu' or 'cuda'")


@dataclass(frozen=True)
class PartitionConfig:
    """How the train split is divided into simulated clients."""

    by: str = "uploader"  # "uploader" | "iid" | "dirichlet"
    min_clips: int = 1
    clients: int = 10  # for iid / dirichlet
    alpha: float = 0.5  # Dirichlet concentration

    def __post_init__(self) -> None:
        _check(self.by in ("uploader", "iid", "dirichlet"), "by", "must be 'uploader', 'iid' or 'dirichlet'")
        _check(self.min_clips >= 1, "min-clips", "must be at least 1")
        _check(self.clients >= 1, "clients", "must be at least 1")
        _check(self.alpha > 0, "alpha", "must be positive")


STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian",
              "fedtrimmedavg", "krum")


DP_MODES = ("off", "server-fixed", "client-fixed", "server-adaptive")
DP_STRATEGIES = ("fedavg", "fedprox")  # the DP wrappers' noise is calibrated to a plain average of clipped updates


@dataclass(frozen=True)
class FederatedConfig:
    """Flower simulation settings (fsd_fed: C = fraction, E = local-epochs)."""

    rounds: int = 5
    fraction: float = 0.3
    min_clients: int = 2
    local_epochs: int = 1
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # FedProx
    server_lr: float = 0.01  # FedAdam / FedYogi / FedAdagrad eta
    server_momentum: float = 0.9  # FedAvgM
    tau: float = 1e-3  # adaptive strategies
    beta_1: float = 0.9
    beta_2: float = 0.99
    trim_beta: float = 0.2  # FedTrimmedAvg
    num_malicious: int = 0  # Krum
    max_update_norm: float = 1e3  # updates whose L2 distance to the global model exceeds this are rejected
    # the first this many rounds train with max pooling of the TCN's frame logits (model.pooling after them, and in
    # every evaluation and export, so val mAP is low until they end: an ASHA sweep should not stop trials before);
    # the highest-scoring frame takes a patch's whole gradient, which singles out brief sounds in the few local
    # steps of a round; 0: model.pooling throughout, rounds or more: every round
    max_pooling_rounds: int = 0
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    ray_address: str = ""  # "" starts a local Ray; "auto" or host:port joins a cluster
    ray_timeout_s: float = 30.0  # joining a cluster by address fails after this long
    supernodes: int = 0  # 0 means one supernode per client of the partition
    # updates not back this long after a round's train messages went out count as failed (the round goes on)
    round_timeout_s: float = 600.0
    # how long the server waits for nodes: every partition's (simulations) or min-clients connected ones (laptops)
    node_wait_s: float = 600.0
    # central differential privacy with Flower's wrappers: "off", "server-fixed" / "client-fixed" (clipping by the
    # server, or by each client's clipping mod, at dp-clipping-norm) or "server-adaptive" (the norm follows the
    # dp-clipped-quantile of the updates' norms); Gaussian noise of dp-noise-multiplier x the norm per sampled
    # client; epsilon at dp-delta accounted per round (client-level, no amplification by sampling)
    dp: str = "off"
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    dp_clipped_quantile: float = 0.5
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "rounds", "must be at least 1")
        _check(0 < self.fraction <= 1, "fraction", "must be in (0, 1]")
        _check(self.min_clients >= 1, "min-clients", "must be at least 1")
        _check(self.local_epochs >= 1, "local-epochs", "must be at least 1")
        _check(self.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}")
        _check(self.proximal_mu >= 0, "proximal-mu", "must be non-negative")
        _check(self.server_lr > 0, "server-lr", "must be positive")
        _check(0 <= self.server_momentum < 1, "server-momentum", "must be in [0, 1)")
        _check(self.tau > 0, "tau", "must be positive")
        _check(0 <= self.beta_1 < 1 and 0 <= self.beta_2 < 1, "beta-1", "betas must be in [0, 1)")
        _check(0 <= self.trim_beta < 0.5, "trim-beta", "must be in [0, 0.5)")
        _check(self.num_malicious >= 0, "num-malicious", "must be non-negative")
        _check(self.max_update_norm > 0, "max-update-norm", "must be positive")
        _check(_is_int(self.max_pooling_rounds) and self.max_pooling_rounds >= 0, "max-pooling-rounds",
               f"must be a non-negative integer, got {self.max_pooling_rounds!r}")
        _check(0 < self.client_cpus <= 64, "client-cpus", "must be in (0, 64]")
        _check(0 <= self.client_gpus <= 8, "client-gpus", "must be in [0, 8]")
        _check(self.supernodes >= 0, "supernodes", "must be non-negative")
        _check(0 < self.ray_timeout_s <= 3600, "ray-timeout-s", "must be in (0, 3600]")
        _check(self.round_timeout_s > 0, "round-timeout-s", "must be positive")
        _check(self.node_wait_s > 0, "node-wait-s", "must be positive")
        _check(self.dp in DP_MODES, "dp", f"must be one of {', '.join(DP_MODES)}")
        _check(self.dp_noise_multiplier > 0, "dp-noise-multiplier", "must be positive")
        _check(self.dp_clipping_norm > 0, "dp-clipping-norm", "must be positive")
        _check(0 < self.dp_clipped_quantile < 1, "dp-clipped-quantile", "must be in (0, 1)")
        _check(0 < self.dp_delta < 1, "dp-delta", "must be in (0, 1)")
        _check(self.dp == "off" or self.strategy in DP_STRATEGIES, "dp",
               f"needs a strategy that averages updates uniformly ({', '.join(DP_STRATEGIES)}), not {self.strategy!r}")


@dataclass(frozen=True)
class SweepConfig:
    """Ray Tune grid over federated parameters: ``grid`` maps a dotted key (``federated.fraction``) to values."""

    grid: dict[str, list[Any]] = field(default_factory=dict)
    max_concurrent: int = 1
    metric: str = "mAP"
    scheduler: str = "none"  # "none" | "asha"

    def __post_init__(self) -> None:
        _check(self.max_concurrent >= 1, "max-concurrent", "must be at least 1")
        _check(self.scheduler in ("none", "asha"), "scheduler", "must be 'none' or 'asha'")


@dataclass(frozen=True)
class DetectorConfig:
    """Streaming post-processing: hysteresis thresholds, minimum duration, refractory time."""

    on_threshold: float = 0.5
    off_threshold: float = 0.3
    min_duration_ms: float = 30.0
    refractory_ms: float = 200.0
    block_size: int = 160
    # label -> [on, off]: per-class thresholds replacing on-threshold / off-threshold for that label
    class_thresholds: dict[str, list[float]] = field(default_factory=dict)
    # an event's onset is where its run above the rise level (below) began, not where it reached on-threshold
    onset_at_rise: bool = False
    # with onset-at-rise, the run that dates the onset is the one at or above this level or the class's
    # off-threshold, whichever is lower (1.0: off-threshold)
    rise_threshold: float = 1.0
    # with onset-at-rise, the onset lies at most this long before the frame that reached on-threshold: a class
    # that idles above the rise level (a hum output over speech) cannot date the next onset far too early
    max_rise_ms: float = 300.0
    # label -> minimum duration in ms, replacing min-duration-ms for that label
    class_min_duration_ms: dict[str, float] = field(default_factory=dict)
    # an event triggers only if the frames' level rose by at least this many dB from just before its onset to
    # its loudest frame by the time it is confirmed (clients/detector/postprocess.py); 0 = no check
    min_onset_rise_db: float = 0.0

    def __post_init__(self) -> None:
        _check(0 < self.on_threshold < 1, "on-threshold", "must be in (0, 1)")
        _check(0 < self.off_threshold <= self.on_threshold, "off-threshold", "must be in (0, on-threshold]")
        _check(self.min_duration_ms >= 0, "min-duration-ms", "must be non-negative")
        _check(0 < self.rise_threshold <= 1, "rise-threshold", "must be in (0, 1]")
        _check(self.max_rise_ms >= 0, "max-rise-ms", "must be non-negative")
        _check(self.refractory_ms >= 0, "refractory-ms", "must be non-negative")
        _check(self.block_size >= 1, "block-size", "must be at least 1")
        _check(0 <= self.min_onset_rise_db <= 60, "min-onset-rise-db", "must be in [0, 60]")
        for label, pair in self.class_thresholds.items():
            key = f"class-thresholds.{label!r}"
            _check(isinstance(pair, list | tuple) and len(pair) == 2
                   and all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair),
                   key, f"must be a list [on, off] of two numbers, got {pair!r}")
            _check(0 < pair[1] <= pair[0] < 1, key, f"needs 0 < off <= on < 1, got {list(pair)!r}")
        for label, ms in self.class_min_duration_ms.items():
            _check(isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0,
                   f"class-min-duration-ms.{label!r}", f"must be a non-negative number, got {ms!r}")


LATENCY_CHOICES = ("safe", "balanced", "fast")  # personalize.latency: slowest and surest first
ADAPT_MODES = ("head", "last-block", "all")


@dataclass(frozen=True)
class PersonalizeConfig:
    """Settings of on-device fine-tuning (TOML table ``[personalize]``, kebab-case keys)."""

    adapt: str = "all"  # "head" | "last-block" | "all"
    steps: int = 3000
    head_warmup_steps: int = 300  # steps that train the new head alone before the ``adapt`` weights (LP-FT)
    # weight of a Learning-without-Forgetting term: the global model's own head, kept frozen on the adapted body,
    # should still give the frozen global model's outputs on the training batches (0: off)
    distill_weight: float = 0.0
    batch_size: int = 16
    sequence_frames: int = 400
    lr: float = 2e-3
    inflate_frames: int = -1  # -1: the receptive field less one frame (while the sound is inside it)
    positive_weight: float = 2.0  # BCE weight of sound frames (they are rarer than background frames)
    gain_db: float = 6.0  # random gain of each sound piece, +-
    warp_percent: float = 10.0  # each sound piece's frequencies scaled by a factor up to 1 +- this percent (0: off)
    aggressor_gain_db: tuple[float, ...] = (-6.0, 20.0)  # random gain of each aggressor piece: rooms get louder
    # random spectral tilt of each aggressor piece, up to this many dB per octave either way (0: off)
    aggressor_tilt_db_per_octave: float = 3.0
    mix_probability: float = 0.5
    mix_gain_db: tuple[float, ...] = (-20.0, 0.0)  # gain of the background mixed under a sound piece
    aggressor_overlay_probability: float = 1.0  # an aggressor piece gets a second one mixed over it
    bundle_share: float = 0.5  # share of aggressor frames taken from the bundle's patches (rest: the user's)
    min_examples: int = 5  # enrollment examples needed per sound
    holdout_fraction: float = 0.3
    off_ratio: float = 0.9  # off-threshold = on x this: a candidate must stay near on while it holds
    # a brief sound's (one whose hold run-margin-ms cut: a click, not a pop) on-threshold is no higher than this:
    # its quiet held-out takes lose nothing up to the grid's top, while the same click over a loud room stays below
    brief_sound_max_on: float = 0.75
    min_duration_ms: float = 250.0  # a sound must hold this long: speech's nasals and fricatives do not
    # a sustained sound must hold this multiple of its short enrolled examples' length (their 20th percentile;
    # the inflated labels keep a true sound high for about the receptive field past its end) ...
    min_duration_fraction: float = 1.25
    max_min_duration_ms: float = 500.0  # ... but never longer than this
    # a short sound's hold (min-duration-ms) ends at least this long before its held-out takes' probability (their
    # median run from on) falls below off: a click's stays up for about the receptive field, a little longer ...
    run_margin_ms: float = 50.0
    shortest_min_duration_ms: float = 220.0  # ... but is never shorter than this
    onset_at_rise: bool = True  # the detector's onset-at-rise (clients/detector/postprocess.py)
    rise_threshold: float = 0.2  # the detector's rise-threshold: the onset is dated from the run above it
    refractory_ms: float = 300.0
    min_onset_rise_db: float = 6.0  # the detector's min-onset-rise-db: a fan or a sound already under way
    # cannot trigger
    # detection latency against false triggers, the user's choice: "safe" keeps the holds above; "balanced" and
    # "fast" cap every sound's hold at latency-holds-ms [balanced, fast] (each choice is calibrated and kept in
    # the personal bundle, so listen can switch)
    latency: str = "safe"
    latency_holds_ms: tuple[float, ...] = (160.0, 80.0)

    def __post_init__(self) -> None:
        checks = [
            (self.adapt in ADAPT_MODES, "adapt", f"must be one of {', '.join(ADAPT_MODES)}"),
            (self.latency in LATENCY_CHOICES, "latency", f"must be one of {', '.join(LATENCY_CHOICES)}"),
            (len(self.latency_holds_ms) == 2 and 0 < self.latency_holds_ms[1] <= self.latency_holds_ms[0],
             "latency-holds-ms", "must be [balanced, fast] with 0 < fast <= balanced"),
            (self.steps >= 1, "steps", "must be at least 1"),
            (self.head_warmup_steps >= 0, "head-warmup-steps", "must be non-negative"),
            (self.distill_weight >= 0, "distill-weight", "must be non-negative"),
            (self.batch_size >= 1, "batch-size", "must be at least 1"),
            (self.sequence_frames >= 50, "sequence-frames", "must be at least 50"),
            (0 < self.lr < 1, "lr", "must be in (0, 1)"),
            (self.inflate_frames >= -1, "inflate-frames", "must be -1 (the receptive field less one) or >= 0"),
            (self.positive_weight > 0, "positive-weight", "must be positive"),
            (self.gain_db >= 0, "gain-db", "must be non-negative"),
            (0 <= self.warp_percent <= 50, "warp-percent", "must be in [0, 50]"),
            (0 <= self.aggressor_tilt_db_per_octave <= 12, "aggressor-tilt-db-per-octave", "must be in [0, 12]"),
            (len(self.aggressor_gain_db) == 2 and self.aggressor_gain_db[0] <= self.aggressor_gain_db[1],
             "aggressor-gain-db", "must be [low, high] with low <= high"),
            (0 <= self.mix_probability <= 1, "mix-probability", "must be in [0, 1]"),
            (0 <= self.bundle_share <= 1, "bundle-share", "must be in [0, 1]"),
            (0 <= self.aggressor_overlay_probability <= 1, "aggressor-overlay-probability", "must be in [0, 1]"),
            (len(self.mix_gain_db) == 2 and self.mix_gain_db[0] <= self.mix_gain_db[1], "mix-gain-db",
             "must be [low, high] with low <= high"),
            (self.min_examples >= 2, "min-examples", "must be at least 2 (one to train, one held out)"),
            (0 < self.holdout_fraction < 1, "holdout-fraction", "must be in (0, 1)"),
            (0 < self.off_ratio <= 1, "off-ratio", "must be in (0, 1]"),
            (0 < self.brief_sound_max_on <= 1, "brief-sound-max-on", "must be in (0, 1]"),
            (self.min_duration_ms >= 0, "min-duration-ms", "must be non-negative"),
            (0 <= self.min_duration_fraction <= 2, "min-duration-fraction", "must be in [0, 2]"),
            (self.max_min_duration_ms >= self.min_duration_ms, "max-min-duration-ms",
             "must be at least min-duration-ms"),
            (self.run_margin_ms >= 0, "run-margin-ms", "must be non-negative"),
            (self.shortest_min_duration_ms >= 0, "shortest-min-duration-ms", "must be non-negative"),
            (0 < self.rise_threshold <= 1, "rise-threshold", "must be in (0, 1]"),
            (self.refractory_ms >= 0, "refractory-ms", "must be non-negative"),
            (0 <= self.min_onset_rise_db <= 60, "min-onset-rise-db", "must be in [0, 60]"),
        ]
        for ok, key, message in checks:
            _check(ok, key, message)


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a run."""

    seed: int = 0
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)

    def __post_init__(self) -> None:
        _check(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed", "must be a non-negative integer")
        _check(self.federated.dp == "off" or self.model.name == "tcn", "federated.dp",
               "needs the TCN (clipping and noise apply to float weights; the VGG-like model has counters)")
        _check(self.federated.max_pooling_rounds == 0 or self.model.name == "tcn", "federated.max-pooling-rounds",
               "needs the TCN (the VGG-like model pools with its own global pooling)")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` and return it converted (lists -> tuples, ints -> floats)."""
    origin = typing.get_origin(hint)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ValueError(f"{key}: expected {hint.__name__}, got {value!r}")
        return value
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item, key) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a table, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _build(cls: type, data: Mapping[str, Any], base: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from kebab-case ``data`` over the values of ``base``."""
    hints = typing.get_type_hints(cls)
    by_key = {_kebab(f.name): f for f in fields(cls)}
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in by_key:
            raise ValueError(f"{dotted}: unknown key (known: {', '.join(sorted(by_key))})")
        f = by_key[key]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ValueError(f"{dotted}: expected a table [{dotted}]")
            values[f.name] = _build(hint, value, getattr(base, f.name), f"{dotted}.")
        else:
            values[f.name] = _coerce(value, hint, dotted)
    try:
        return dataclasses.replace(base, **values)
    except ValueError as exc:
        raise ValueError(f"{prefix}{exc}") from None


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1}`` -> ``{"train": {"lr": 1}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key}: conflicts with a value set for {part}")
        node[parts[-1]] = value
    return nested


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a missing file, a folder, unreadable or non-UTF-8 bytes and syntax errors are one-line
    ConfigErrors naming the file."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file (give a .toml file)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def apply(config: Config, data: Mapping[str, Any], source: str) -> Config:
    """Return ``config`` updated with nested kebab-case ``data``; errors name ``source`` and the key."""
    try:
        return _build(Config, data, config, "")
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def apply_flat(config: Config, flat: Mapping[str, Any], source: str) -> Config:
    """Like :func:`apply` with dotted keys (``federated.rounds``), as Flower's run config and flags use."""
    try:
        nested = _unflatten(flat)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return apply(config, nested, source)


def load_config(*paths: Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then each TOML file in order, then dotted ``overrides`` (from command-line flags)."""
    config = Config()
    for path in paths:
        if path is not None:
            config = apply(config, read_toml(Path(path)), str(path))
    if overrides:
        config = apply_flat(config, {k: v for k, v in overrides.items() if v is not None}, "command line")
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """Nested kebab-case dict of a config dataclass, as written to TOML/JSON (tuples become lists)."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {_kebab(f.name): convert(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, tuple | list):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)


def frontend_from_dict(data: Mapping[str, Any], source: str = "store") -> FrontendConfig:
    """Rebuild a FrontendConfig from its kebab-case dict (as stored in a feature store or bundle)."""
    try:
        return _build(FrontendConfig, data, FrontendConfig(), "frontend.")
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def model_from_dict(data: Mapping[str, Any], source: str = "model file") -> ModelConfig:
    """Rebuild a ModelConfig from its kebab-case dict."""
    try:
        return _build(ModelConfig, data, ModelConfig(), "model.")
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


# Keys that say where a run runs, not what it computes: they may change when a run or a sweep resumes.
RUNTIME_KEYS = ("train.device", "train.num-workers", "federated.ray-address", "federated.ray-timeout-s",
                "federated.client-cpus", "federated.client-gpus", "sweep.max-concurrent")
# Keys that say how long a run goes on: a resumed run may be extended (or stop earlier).
LENGTH_KEYS = ("train.epochs", "federated.rounds")


def recorded_config(saved: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A configuration recorded by a run (a :func:`to_dict` of it), resolved again over today's defaults: a key
    the record lacks counts as its default value."""
    return to_dict(apply(Config(), saved, source))


def config_differences(saved: Mapping[str, Any], given: Mapping[str, Any], ignore: Sequence[str] = (),
                       prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two :func:`to_dict` configs, as ``"key: old -> new"``, leaving
    out the keys in ``ignore``."""
    found = []
    for key in sorted(set(saved) | set(given)):
        dotted = f"{prefix}{key}"
        if dotted in ignore:
            continue
        old, new = saved.get(key), given.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping) and dotted.count(".") == 0:
            found += config_differences(old, new, ignore, f"{dotted}.")
        elif old != new:
            found.append(f"{dotted}: {old!r} -> {new!r}")
    return found


def write_resolved(config: Config, path: Path) -> None:
    """Record the fully resolved configuration of a run (JSON, kebab-case keys)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)

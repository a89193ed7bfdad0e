"""``fedsound personalize``: private fine-tuning of the global detector on a user's enrolled sounds.

Model: the TCN of a detector bundle (the global model) with its head replaced by a new one, one output per
enrolled sound plus one for background, trained with a per-frame binary cross-entropy at the frame rate (100 Hz
with the Lea et al. frontend). The exported personal model keeps the sound outputs only (the background output
is a training target, not an event), so the streaming detector's sigmoid probabilities are exactly what was
trained. ``adapt`` chooses which weights change: ``head``, ``last-block`` (the last residual block, the output
norm and the head) or ``all``; ``head-warmup-steps`` first trains the new head alone (LP-FT), so that the body
moves less from the global model.

Training sequences (Lea et al.): each holds ``sequence-frames`` frames, half from the user's sound takes and
half from aggressors (the user's background material and, for a ``bundle-share`` of it, the bundle's
background patches), cut into pieces and concatenated in random order. Sound pieces keep some silence around
the sound; with probability ``mix-probability`` background is added under them (in the power domain). Sound
pieces get a random gain of +-``gain-db`` and all their frequencies scaled by a random factor (pitch and
resonances together, across the mel bands; between 1 / 1.1 and 1.1 for ``warp-percent`` 10), so that a few
takes of a sound stand for the takes a user will make on other days; aggressor pieces are not warped. Aggressor
pieces get a gain in ``aggressor-gain-db``, mostly louder, because a few minutes of enrolled background cannot
show every level a room will reach, and a random spectral tilt (up to ``aggressor-tilt-db-per-octave`` either
way about 1 kHz), because they cannot show every colour of noise and voice either (another talker's speech
among them). With probability ``aggressor-overlay-probability`` a second aggressor piece is mixed over an
aggressor piece (-10 to 0 dB under it): a few minutes of material then give many more combinations (the user
talking over the television, a fan under someone else's voice), so fewer aggressors met at test time are unlike
anything seen in training. Frame targets come from the enrollment energy labels with the segment boundaries
inflated (``inflate-frames``; default: the receptive field less one frame): the label is extended past the
offset for as long as the sound is still inside the causal receptive field, and the frames before the onset,
which a causal model cannot tell from silence, are left out of the loss. A true sound's probability then stays
high for about the receptive field, long enough for the detector to ask for a longer hold (``min-duration-ms``)
than aggressors that resemble a sound for a moment keep.

Thresholds: a part of each sound's takes (``holdout-fraction``, at least one) and of the background is held
out. They are laid out as one validation stream (takes between stretches of background), the fine-tuned model
runs over it, and for each sound the on-threshold (a grid from 0.05 to 0.98; off = on times ``off-ratio``, 0.9:
a candidate must stay near on while it holds its minimum duration, and aggressors that only brush on, as a
plosive in babble, dip below that before they have held) is the highest with the best event-level F1 with the
detector's own post-processing (onset collar 100 ms; detections on background count as false positives). The
held-out material is small (three takes of a sound, a minute or two of background): it shows whether a
threshold loses a take but cannot measure false triggers at a rate of one an hour, so of the thresholds that
lose nothing the highest is taken. The report gives each sound's held-out precision and recall at that
threshold, the false triggers per hour on the held-out background, the same F1 for the untuned head, and the
time taken. Each rule below was kept because switching it off (``fedsound bench personalize --ablate``) cost
every tuning user recall, precision or false triggers (docs/personalization.md, Calibration); the on-threshold
rule above is the base the others adjust.

Post-processing: the personal detector keeps the global bundle's settings except the per-sound thresholds, the
per-sound minimum durations, ``onset-at-rise``, ``rise-threshold``, ``refractory-ms`` and ``min-onset-rise-db`` (6
dB: an event must rise that much in level into it, which a steady fan that the model takes for a pop does not). A
sound holds ``min-duration-ms`` (250 ms lets the detector wait until a speech plosive or click-like transient has
gone on into the next phoneme; the inflated labels keep a true click or pop high for about the receptive field);
a sustained sound must also hold ``min-duration-fraction`` (1.25) times its short enrolled examples (their 20th
percentile; it stays high for about the receptive field past its end), up to ``max-min-duration-ms``: a hum
enrolled at 0.3-0.9 s waits 0.5 s, longer than most runs of voiced speech that the model takes for a hum (a
nasal, 50-140 ms, into a vowel). A short sound's hold (``min-duration-ms``) is then cut to end ``run-margin-ms``
(50) before its held-out takes fell below off (their median, at the picked thresholds), but to no less than
``shortest-min-duration-ms`` (220): a click's probability stays up for about the receptive field from reaching
on, so a hold close to that length would drop the clicks whose probability rises a little late or falls a
little early. A sustained sound's hold is not cut: with few held-out takes, one that falls back early would
shorten it enough to let speech through. A brief sound, one whose hold was cut (a click), then has its
thresholds picked again among on-thresholds up to ``brief-sound-max-on`` (0.75): its quiet held-out takes lose
nothing up to the grid's top (0.98), but the same click over a loud room peaks lower, and the ceiling keeps it
detectable there. Other sounds (pops, whose probability stays up) keep the whole grid, since a lower
on-threshold would let more aggressors through. With ``onset-at-rise`` an event's onset is where its
probability began to rise (above ``rise-threshold``, 0.2, or the off threshold where that is lower; at most the
detector's ``max-rise-ms``, 300 ms, before it reached on), so a sound recognised only after a while is still
dated from its start (a hiss or hum whose probability takes 150 ms to climb from 0.2 to the off threshold would
otherwise be dated outside the 100 ms onset collar); the trigger comes when the event is confirmed (the
detection latency).

Latency (``latency``: ``safe``, ``balanced``, ``fast``): the hold is most of the detection latency, so the
faster choices cap every sound's hold at ``latency-holds-ms`` and pick their thresholds again at those holds
(:func:`calibrate`); each choice's detector settings are kept in the bundle's provenance, the configured one is
the bundle's own, and ``fedsound listen --latency`` switches between them.

The global bundle is ``bundle``, else the one the profile was last personalized from, else the one fedsound
ships (:func:`clients.detector.bundle.shipped_bundle`). The personal bundle is written to ``PROFILE/personal/``
with :func:`clients.detector.bundle.write_bundle` and made private (0700 folders, 0600 files). Nothing here opens
a network connection.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from clients.detector.bundle import Bundle, load_bundle, shipped_bundle, write_bundle
from clients.detector.checkpoint import FineTuneCheckpoint, Progress
from clients.detector.event_metrics import COLLAR_S, EventCounts, event_counts, false_triggers_per_hour
from clients.detector.postprocess import EventTracker, to_frames
from clients.detector.profile import Profile, make_private_tree
from clients.detector.torch_stream import frame_probabilities
from fl.config import (
    CONFIG_DIR,
    LATENCY_CHOICES,
    Config,
    DetectorConfig,
    FrontendConfig,
    PersonalizeConfig,
    load_config,
    to_dict,
)
from fl.errors import FedsoundError
from fl.frontend import Frontend, band_centres_hz
from fl.locks import exclusive
from fl.models import TCN

DEFAULT_SETTINGS = CONFIG_DIR / "detector" / "personalize.toml"
# On-thresholds tried: 0.05 to 0.95 in steps of 0.05, then 0.98 (held-out takes can pass a threshold nearer 1
# that other takes of the sound miss).
THRESHOLD_GRID = (*(round(0.05 * k, 2) for k in range(1, 20)), 0.98)
VALIDATION_GAP_S = (1.0, 2.5)  # background between held-out takes in the validation stream
ON_SEARCH_S = 0.6  # a held-out take counts towards its sound's off threshold if it reaches on this soon


class PersonalizeError(FedsoundError):
    """Personalization cannot run: too few examples, no background material, no global model."""


def load_personalize_config(path: Path | None = None) -> PersonalizeConfig:
    """The ``[personalize]`` settings of a config file (default ``configs/detector/personalize.toml``)."""
    return load_config(Path(path) if path else DEFAULT_SETTINGS).personalize


# ----------------------------------------------------------------------------------------------------------
# Data


@dataclass
class LabelledTake:
    """Frames of one take with per-frame targets: class (0 background, k >= 1 sound k-1) and loss mask."""

    frames: np.ndarray  # [n, n_mels] float32
    classes: np.ndarray  # [n] int64
    mask: np.ndarray  # [n] bool
    onsets: list[int]  # onset frames of the sound segments (energy labels, not inflated)
    sound: int  # -1 for background


@dataclass
class PersonalData:
    """Everything fine-tuning and threshold picking need, already through the bundle's frontend."""

    sounds: list[str]
    train: list[LabelledTake]
    held_out: list[LabelledTake]
    user_background: list[np.ndarray]  # frame arrays of the user's background material (training part)
    bundle_background: list[np.ndarray]  # the bundle's background patches (training part)
    background_held_out: list[np.ndarray]
    frame_s: float
    inflate: int
    band_hz: np.ndarray  # centre frequency of each mel band (for ``warp-percent``)
    frontend_config: FrontendConfig  # the bundle's (frame levels for the detector's onset check)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    segment_s: dict[str, list[float]] = field(default_factory=dict)  # energy-labelled sound lengths per sound


def check_examples(profile: Profile, min_examples: int) -> list[str]:
    """The profile's sounds, or a PersonalizeError saying how many more examples each sound needs."""
    counts = profile.counts()
    if not counts:
        raise PersonalizeError(f"{profile.path}: no sounds enrolled; enroll at least {min_examples} examples of "
                               f"each sound with `fedsound enroll {profile.path} --sound NAME ...`")
    short = {name: min_examples - n for name, n in counts.items() if n < min_examples}
    if short:
        detail = ", ".join(f"{name} has {counts[name]} and needs {more} more" for name, more in sorted(short.items()))
        raise PersonalizeError(f"{profile.path}: not enough examples ({min_examples} per sound): {detail}")
    return sorted(counts)


def label_take(frames: np.ndarray, segments: Sequence[Sequence[float]], sound: int, frame_s: float, inflate: int
               ) -> LabelledTake:
    """Per-frame targets of a sound take: segments inflated past their offset, pre-onset frames masked."""
    n = len(frames)
    classes = np.zeros(n, dtype=np.int64)
    mask = np.ones(n, dtype=bool)
    onsets = []
    for onset_s, _ in segments:
        on = min(n - 1, int(round(onset_s / frame_s)))
        mask[max(0, on - inflate) : on] = False
        onsets.append(on)
    for onset_s, offset_s in segments:  # positives win over the masks of neighbouring segments
        on = min(n - 1, int(round(onset_s / frame_s)))
        off = max(on + 1, int(round(offset_s / frame_s)))
        classes[on : min(n, off + inflate)] = sound + 1
        mask[on : min(n, off + inflate)] = True
    return LabelledTake(frames, classes, mask, onsets, sound)


def prepare_data(profile: Profile, bundle: Bundle, settings: PersonalizeConfig, seed: int) -> PersonalData:
    """Frames and targets of the profile's takes (split into train and held-out) and of the aggressors."""
    sounds = check_examples(profile, settings.min_examples)
    frontend = bundle.frontend()
    frame_s = bundle.frontend_config.frame_s
    inflate = bundle.receptive_field - 1 if settings.inflate_frames < 0 else settings.inflate_frames
    rng = np.random.default_rng([seed, 1])
    train, held_out, counts, segment_s = [], [], {}, {}
    for k, name in enumerate(sounds):
        examples = profile.sounds[name]
        segment_s[name] = [float(off - on) for example in examples for on, off in example.segments]
        order = rng.permutation(len(examples))
        n_held = max(1, int(round(settings.holdout_fraction * len(examples))))
        for rank, i in enumerate(order):
            wave, rate = profile.read(examples[i])
            take = label_take(frontend.frames(wave, rate), examples[i].segments, k, frame_s, inflate)
            (held_out if rank < n_held else train).append(take)
        counts[name] = {"examples": len(examples), "train": len(examples) - n_held, "held_out": n_held}
    user_background, bundle_background, background_held_out = [], [], []
    for example in profile.background:
        wave, rate = profile.read(example)
        frames = frontend.frames(wave, rate)
        cut = int((1.0 - settings.holdout_fraction) * len(frames))
        user_background.append(frames[:cut])
        background_held_out.append(frames[cut:])
    patches = bundle.background()
    if patches is not None:
        order = rng.permutation(len(patches[0]))
        cut = int((1.0 - settings.holdout_fraction) * len(order))
        bundle_background += list(patches[0][order[:cut]])
        background_held_out += list(patches[0][order[cut:]])
    if not user_background and not bundle_background:
        raise PersonalizeError(f"{profile.path}: no background material: enroll some with "
                               f"`fedsound enroll {profile.path} --background ...` (the bundle carries none)")
    return PersonalData(sounds, train, held_out, user_background, bundle_background, background_held_out, frame_s,
                        inflate, band_centres_hz(bundle.frontend_config), bundle.frontend_config, counts, segment_s)


# ----------------------------------------------------------------------------------------------------------
# Training


def _gain(rng: np.random.Generator, low_db: float, high_db: float) -> float:
    """Log-mel offset of a random gain in [low_db, high_db] dB (log of power: 10 dB = ln 10), as a Python float
    so that float32 frames stay float32."""
    return float(rng.uniform(low_db, high_db) * np.log(10.0) / 10.0)


def _crop(rng: np.random.Generator, frames: np.ndarray, length: int) -> np.ndarray:
    if len(frames) <= length:
        return frames
    start = int(rng.integers(len(frames) - length + 1))
    return frames[start : start + length]


def warp_bands(frames: np.ndarray, band_hz: np.ndarray, factor: float) -> np.ndarray:
    """Log-mel frames of the same sound with every frequency scaled by ``factor`` (pitch and resonances
    together), by linear interpolation across the bands; bands beyond the edges repeat the edge band."""
    source = np.interp(band_hz / factor, band_hz, np.arange(len(band_hz), dtype=np.float64))
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, len(band_hz) - 1)
    weight = (source - low).astype(np.float32)
    return frames[:, low] * (1.0 - weight) + frames[:, high] * weight


def tilt_bands(frames: np.ndarray, band_hz: np.ndarray, db_per_octave: float) -> np.ndarray:
    """Log-mel frames with a spectral tilt of ``db_per_octave`` about 1 kHz (another microphone, room or
    equaliser): each band raised by that many dB per octave above 1 kHz, lowered below it."""
    slope = db_per_octave * np.log(10.0) / 10.0  # dB of power -> natural log
    return frames + (slope * np.log2(band_hz / 1000.0)).astype(np.float32)


def _log_uniform(rng: np.random.Generator, percent: float) -> float:
    """A factor between 1 / (1 + percent / 100) and 1 + percent / 100, uniform on a log scale."""
    span = np.log1p(percent / 100.0)
    return float(np.exp(rng.uniform(-span, span)))


def _background_piece(rng: np.random.Generator, data: PersonalData, settings: PersonalizeConfig, length: int
                      ) -> np.ndarray:
    """``length`` frames of aggressor material: the user's (``1 - bundle-share``) or the bundle's patches, tilted
    by up to ``aggressor-tilt-db-per-octave`` either way."""
    parts, have = [], 0
    while have < length:
        use_bundle = not data.user_background or (bool(data.bundle_background)
                                                  and rng.random() < settings.bundle_share)
        sources = data.bundle_background if use_bundle else data.user_background
        weights = np.array([len(f) for f in sources], dtype=np.float64)
        source = sources[int(rng.choice(len(sources), p=weights / weights.sum()))]
        part = _crop(rng, source, length - have)
        parts.append(part)
        have += len(part)
    piece = np.concatenate(parts)
    if settings.aggressor_tilt_db_per_octave:
        tilt = settings.aggressor_tilt_db_per_octave
        piece = tilt_bands(piece, data.band_hz, rng.uniform(-tilt, tilt))
    return piece


def _sound_piece(rng: np.random.Generator, data: PersonalData, settings: PersonalizeConfig, n_sounds: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A crop of a training take around one of its sounds (classes balanced), with gain and mixing."""
    sound = int(rng.integers(n_sounds))
    takes = [t for t in data.train if t.sound == sound]
    take = takes[int(rng.integers(len(takes)))]
    onset = take.onsets[int(rng.integers(len(take.onsets)))]
    end = onset
    while end < len(take.classes) and take.classes[end] == sound + 1:
        end += 1
    start = max(0, onset - int(rng.integers(data.inflate + 5, 4 * data.inflate + 20)))
    stop = min(len(take.frames), end + int(rng.integers(5, 2 * data.inflate + 20)))
    frames = take.frames[start:stop]
    if settings.warp_percent:
        frames = warp_bands(frames, data.band_hz, _log_uniform(rng, settings.warp_percent))
    frames = frames + _gain(rng, -settings.gain_db, settings.gain_db)
    if rng.random() < settings.mix_probability:
        noise = _background_piece(rng, data, settings, len(frames))
        noise = noise + _gain(rng, *settings.mix_gain_db)
        frames = np.logaddexp(frames, noise)
    return frames, take.classes[start:stop], take.mask[start:stop]


def make_batch(rng: np.random.Generator, data: PersonalData, settings: PersonalizeConfig
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [B, T, n_mels], targets [B, T, n_sounds + 1], mask [B, T])``: half sound pieces, half aggressors."""
    n_sounds = len(data.sounds)
    length = settings.sequence_frames
    xs, targets, masks = [], [], []
    for _ in range(settings.batch_size):
        pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        sound_frames = 0
        while sound_frames < length // 2:
            piece = _sound_piece(rng, data, settings, n_sounds)
            pieces.append(piece)
            sound_frames += len(piece[0])
        aggressor_frames = 0
        while aggressor_frames < length - length // 2:
            frames = _background_piece(rng, data, settings, int(rng.integers(30, 150)))
            if rng.random() < settings.aggressor_overlay_probability:
                other = _background_piece(rng, data, settings, len(frames))
                frames = np.logaddexp(frames, other + _gain(rng, -10.0, 0.0))
            frames = frames + _gain(rng, *settings.aggressor_gain_db)
            pieces.append((frames, np.zeros(len(frames), np.int64), np.ones(len(frames), bool)))
            aggressor_frames += len(frames)
        order = rng.permutation(len(pieces))
        x = np.concatenate([pieces[i][0] for i in order])
        classes = np.concatenate([pieces[i][1] for i in order])
        mask = np.concatenate([pieces[i][2] for i in order])
        start = int(rng.integers(len(x) - length + 1))
        xs.append(x[start : start + length])
        targets.append(np.eye(n_sounds + 1, dtype=np.float32)[classes[start : start + length]])
        masks.append(mask[start : start + length])
    return (torch.from_numpy(np.stack(xs).astype(np.float32)), torch.from_numpy(np.stack(targets)),
            torch.from_numpy(np.stack(masks)))


def new_head_model(bundle: Bundle, n_sounds: int, seed: int) -> TCN:
    """The bundle's TCN with a fresh head of ``n_sounds`` + 1 outputs (background is output 0)."""
    base = bundle.model
    torch.manual_seed(seed)
    model = TCN(base.config, base.n_mels, n_sounds + 1)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    model.load_state_dict(state, strict=False)
    return model


def _trainable(model: TCN, adapt: str) -> tuple[list[nn.Module], list[nn.Module]]:
    """(modules that adapt, modules that stay frozen) for an ``adapt`` mode."""
    if adapt == "all":
        return [model], []
    body = [model.input_proj, model.input_norm, *model.blocks]
    if adapt == "head":
        return [model.head], [*body, model.out_norm]
    return [model.blocks[-1], model.out_norm, model.head], body[:-1]


def _train_steps(model: TCN, data: PersonalData, settings: PersonalizeConfig, rng: np.random.Generator, adapt: str,
                 steps: int, cosine: bool, progress: bool, teacher: TCN | None = None,
                 checkpoint: FineTuneCheckpoint | None = None, phase: str = "adapt",
                 resume: Progress | None = None) -> list[float]:
    """``steps`` Adam steps of the ``adapt`` weights (the rest frozen), with a cosine schedule or a constant
    learning rate; returns the losses. With a ``teacher`` (the frozen global model), ``distill-weight`` times
    the Learning-without-Forgetting loss is added: the teacher's head on ``model``'s features against the
    teacher's own outputs. With a ``checkpoint`` the state is saved as ``phase`` when it is due; ``resume``
    (saved progress of this phase) continues from its step."""
    adapted, frozen = _trainable(model, adapt)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for module in adapted for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine else None
    weight = torch.ones(len(data.sounds) + 1)
    weight[1:] = settings.positive_weight
    losses: list[float] = []
    start = 0
    if resume is not None:
        model.load_state_dict(resume.state["model"])
        optimizer.load_state_dict(resume.state["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(resume.state["schedule"])
        rng.bit_generator.state = resume.state["numpy_rng"]
        torch.set_rng_state(resume.state["torch_rng"])
        start, losses = resume.step, list(resume.state["losses"])
    model.train()
    for module in frozen:
        module.eval()
    for step in tqdm(range(start, steps), initial=start, total=steps, disable=not progress,
                     desc=f"personalize ({adapt})", leave=False):
        x, target, mask = make_batch(rng, data, settings)
        frames = mask.sum().clamp(min=1)
        features = model.features(x)
        per_frame = nn.functional.binary_cross_entropy_with_logits(model.head(features), target, reduction="none")
        per_frame = per_frame * torch.where(target > 0, weight, 1.0)
        loss = (per_frame.sum(-1) * mask).sum() / frames
        if teacher is not None:
            with torch.no_grad():
                kept = torch.sigmoid(teacher(x))
            forgetting = nn.functional.binary_cross_entropy_with_logits(teacher.head(features), kept,
                                                                        reduction="none").mean(-1)
            loss = loss + settings.distill_weight * (forgetting * mask).sum() / frames
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        losses.append(loss.item())
        if checkpoint is not None and checkpoint.due(step + 1, steps):
            checkpoint.save(phase, step + 1, model, optimizer, schedule, rng, losses)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return losses


def fine_tune(model: TCN, data: PersonalData, settings: PersonalizeConfig, seed: int, progress: bool = False,
              teacher: TCN | None = None, checkpoint: FineTuneCheckpoint | None = None) -> float:
    """Train ``model`` in place: ``head-warmup-steps`` steps of the new head alone at a constant learning rate
    (LP-FT: a head that already fits moves the pretrained body less, which then keeps more of what it knew
    about sounds the user never enrolled), then ``steps`` steps of the ``adapt`` weights on a cosine schedule,
    with the Learning-without-Forgetting term when ``distill-weight`` > 0 (``teacher``: the global model it
    starts from, required then; a frozen copy of it is used, the model given is left as it was). With a
    ``checkpoint`` the progress is saved as it goes and a matching saved one is resumed, to the same model as
    an uninterrupted run. Returns the mean loss of the last 10% of those steps."""
    if settings.distill_weight > 0 and teacher is None:
        raise ValueError("distill-weight > 0 needs the global model as teacher")
    rng = np.random.default_rng([seed, 2])
    torch.manual_seed(seed)
    phases = {"head": settings.head_warmup_steps, "adapt": settings.steps}
    resume = checkpoint.load(model, phases) if checkpoint is not None else None
    if settings.head_warmup_steps and (resume is None or resume.phase == "head"):
        _train_steps(model, data, settings, rng, "head", settings.head_warmup_steps, False, progress,
                     checkpoint=checkpoint, phase="head", resume=resume)
    adapt_resume = resume if resume is not None and resume.phase == "adapt" else None
    teacher = copy.deepcopy(teacher).eval().requires_grad_(False) if settings.distill_weight > 0 else None
    losses = _train_steps(model, data, settings, rng, settings.adapt, settings.steps, True, progress, teacher,
                          checkpoint=checkpoint, resume=adapt_resume)
    return float(np.mean(losses[-max(1, len(losses) // 10) :]))


def sound_model(model: TCN) -> TCN:
    """The exported model: the same TCN with the background output removed from the head."""
    out = TCN(model.config, model.n_mels, model.n_classes - 1)
    state = dict(model.state_dict())
    state["head.weight"] = state["head.weight"][1:]
    state["head.bias"] = state["head.bias"][1:]
    out.load_state_dict(state)
    return out.eval()


# ----------------------------------------------------------------------------------------------------------
# Thresholds and held-out evaluation


@dataclass
class ValidationStream:
    """Held-out takes between stretches of held-out background, as one frame sequence."""

    frames: np.ndarray
    reference: list[tuple[str, float]]  # (sound, onset_s)
    background: list[tuple[int, int]]  # [start, stop) frames of background stretches
    levels: np.ndarray  # each frame's level in dB (the detector's onset check)

    def background_seconds(self, frame_s: float) -> float:
        """Length of the background stretches."""
        return sum(b - a for a, b in self.background) * frame_s


def validation_stream(data: PersonalData, seed: int) -> ValidationStream:
    """Lay the held-out takes out in random order between slices of the held-out background."""
    rng = np.random.default_rng([seed, 3])
    background = np.concatenate(data.background_held_out) if data.background_held_out else np.zeros(
        (0, data.train[0].frames.shape[1]), np.float32)
    parts, reference, stretches = [], [], []
    position = used = 0
    for i in rng.permutation(len(data.held_out)):
        gap = int(rng.uniform(*VALIDATION_GAP_S) / data.frame_s)
        chunk = background[used : used + gap]
        used += len(chunk)
        if len(chunk):
            parts.append(chunk)
            stretches.append((position, position + len(chunk)))
            position += len(chunk)
        take = data.held_out[i]
        parts.append(take.frames)
        reference += [(data.sounds[take.sound], (position + on) * data.frame_s) for on in take.onsets]
        position += len(take.frames)
    rest = background[used:]
    if len(rest):
        parts.append(rest)
        stretches.append((position, position + len(rest)))
    frames = np.concatenate(parts).astype(np.float32)
    return ValidationStream(frames, reference, stretches, Frontend(data.frontend_config).levels_db(frames))


def detect_onsets(probs: np.ndarray, levels: np.ndarray, labels: Sequence[str], settings: DetectorConfig,
                  frame_s: float) -> list[tuple[str, float]]:
    """Onset events ``(label, onset_s)`` of the streaming post-processing run over ``probs`` and the frames'
    ``levels``."""
    tracker = EventTracker(labels, settings, frame_s)
    return [(e.label, e.onset_s) for e in tracker.update(probs, 0.0, levels) if e.type == "onset"]


def min_durations(segment_s: Mapping[str, Sequence[float]], settings: PersonalizeConfig) -> dict[str, float]:
    """Per sound, how long it must hold before it triggers: ``min-duration-fraction`` times the 20th percentile
    of its enrolled lengths, between ``min-duration-ms`` and ``max-min-duration-ms``. A hum enrolled at 0.3-0.9 s
    waits 0.5 s; pops and clicks keep ``min-duration-ms``."""
    out = {}
    for name, lengths in segment_s.items():
        typical_ms = 1000.0 * float(np.percentile(lengths, 20)) if len(lengths) else 0.0
        out[name] = round(float(np.clip(settings.min_duration_fraction * typical_ms, settings.min_duration_ms,
                                        settings.max_min_duration_ms)), 1)
    return out


def _reached_on(probs: np.ndarray, stream: ValidationStream, sounds: Sequence[str], on: Sequence[float],
                frame_s: float) -> list[list[int]]:
    """Per sound: the frame at which each of its held-out takes first reached its on-threshold, for the takes
    that did within ``ON_SEARCH_S`` of their onset."""
    search = to_frames(1000.0 * ON_SEARCH_S, frame_s)
    frames: list[list[int]] = []
    for k, name in enumerate(sounds):
        firsts = []
        for sound, onset_s in stream.reference:
            if sound == name:
                start = int(round(onset_s / frame_s))
                reached = np.flatnonzero(probs[start : start + search, k] >= on[k])
                if len(reached):
                    firsts.append(start + int(reached[0]))
        frames.append(firsts)
    return frames


def held_runs_ms(probs: np.ndarray, stream: ValidationStream, sounds: Sequence[str], on: Sequence[float],
                 off: Sequence[float], frame_s: float) -> list[list[float]]:
    """Per sound: for each held-out take that reaches its on-threshold within ``ON_SEARCH_S`` of its onset, how
    long (ms) its probability then stayed at or above its off threshold, the frame that reached on included."""
    runs: list[list[float]] = []
    for k, firsts in enumerate(_reached_on(probs, stream, sounds, on, frame_s)):
        lengths = []
        for first in firsts:
            below = np.flatnonzero(probs[first:, k] < off[k])
            lengths.append(1000.0 * frame_s * (int(below[0]) if len(below) else len(probs) - first))
        runs.append(lengths)
    return runs


def shorten_holds(durations: Mapping[str, float], sounds: Sequence[str], runs: Sequence[Sequence[float]],
                  settings: PersonalizeConfig) -> dict[str, float]:
    """The hold of each short sound (one that holds only ``min-duration-ms``, from :func:`min_durations`) cut to the
    median of its held-out runs (:func:`held_runs_ms`) less ``run-margin-ms``, but not below
    ``shortest-min-duration-ms``: a click's probability stays up for about the receptive field (290 ms), barely
    longer than that floor. A sustained sound keeps the hold its enrolled length gave it (held-out takes that fell
    back early would otherwise let speech through), and so does a sound without runs."""
    out = dict(durations)
    for name, lengths in zip(sounds, runs, strict=True):
        if lengths and out[name] <= settings.min_duration_ms:
            limit = max(settings.shortest_min_duration_ms, float(np.median(lengths)) - settings.run_margin_ms)
            out[name] = round(min(out[name], limit), 1)
    return out


def off_thresholds(on: Sequence[float], settings: PersonalizeConfig) -> list[float]:
    """Each sound's off threshold: ``on x off-ratio`` (at least 0.01)."""
    return [float(max(0.01, round(threshold * settings.off_ratio, 4))) for threshold in on]


def detector_settings(sounds: Sequence[str], on: Sequence[float], settings: PersonalizeConfig,
                      base: DetectorConfig, durations: Mapping[str, float],
                      off: Sequence[float] | None = None) -> DetectorConfig:
    """The personal detector's post-processing: per-sound thresholds (``off`` default: on x ``off-ratio``) and
    minimum durations (``durations``, from :func:`min_durations`), onset dating (``onset-at-rise``,
    ``rise-threshold``), refractory time, the onset's level check (``min-onset-rise-db``)."""
    off = off_thresholds(on, settings) if off is None else off
    pairs = {name: [float(t), float(o)] for name, t, o in zip(sounds, on, off, strict=True)}
    return dataclasses.replace(base, class_thresholds=pairs, min_duration_ms=settings.min_duration_ms,
                               class_min_duration_ms=dict(durations), onset_at_rise=settings.onset_at_rise,
                               rise_threshold=settings.rise_threshold,
                               refractory_ms=settings.refractory_ms,
                               min_onset_rise_db=settings.min_onset_rise_db)


def threshold_f1(probs: np.ndarray, stream: ValidationStream, sounds: Sequence[str], settings: PersonalizeConfig,
                 base: DetectorConfig, frame_s: float, durations: Mapping[str, float]) -> np.ndarray:
    """Held-out event F1 of each sound (rows) at each on-threshold of ``THRESHOLD_GRID`` (columns)."""
    f1 = np.zeros((len(sounds), len(THRESHOLD_GRID)))
    for j, threshold in enumerate(THRESHOLD_GRID):
        detector = detector_settings(sounds, [threshold] * len(sounds), settings, base, durations)
        counts = event_counts(stream.reference, detect_onsets(probs, stream.levels, sounds, detector, frame_s),
                              COLLAR_S, sounds)
        f1[:, j] = [counts[name].f1 for name in sounds]
    return f1


def pick_thresholds(f1: np.ndarray, ceilings: Sequence[float] | None = None) -> list[float]:
    """Per sound (a row of :func:`threshold_f1`): the highest on-threshold up to its ``ceilings`` entry (default
    1) with the best held-out event F1 of those thresholds."""
    grid = np.array(THRESHOLD_GRID)
    chosen = []
    for scores_k, ceiling in zip(f1, [1.0] * len(f1) if ceilings is None else ceilings, strict=True):
        scores = np.where(grid <= ceiling, scores_k, -np.inf)
        best = np.flatnonzero(scores >= scores.max() - 1e-9)
        chosen.append(THRESHOLD_GRID[int(best[-1])])
    return chosen


def on_ceilings(sounds: Sequence[str], durations: Mapping[str, float], holds: Mapping[str, float],
                settings: PersonalizeConfig) -> list[float]:
    """Per sound, the highest on-threshold it may take: ``brief-sound-max-on`` for a brief sound, one whose hold
    :func:`shorten_holds` cut below ``durations`` (its held-out takes' probability fell below off soon after
    reaching on: a click, where a pop's stays up), 1 for the others."""
    return [settings.brief_sound_max_on if holds[name] < durations[name] else 1.0 for name in sounds]


def evaluate_held_out(probs: np.ndarray, stream: ValidationStream, sounds: Sequence[str], detector: DetectorConfig,
                      frame_s: float) -> tuple[dict[str, EventCounts], float]:
    """Per-sound event counts on the validation stream and false triggers per hour on its background."""
    detected = detect_onsets(probs, stream.levels, sounds, detector, frame_s)
    counts = event_counts(stream.reference, detected, COLLAR_S, sounds)
    on_background = sum(1 for _, onset in detected
                        if any(a * frame_s <= onset < b * frame_s for a, b in stream.background))
    seconds = stream.background_seconds(frame_s)
    return counts, false_triggers_per_hour(on_background, seconds) if seconds > 0 else float("nan")


def _thresholds_and_holds(probs: np.ndarray, stream: ValidationStream, data: PersonalData, f1: np.ndarray,
                          settings: PersonalizeConfig, durations: Mapping[str, float],
                          ceilings: Sequence[float] | None = None
                          ) -> tuple[list[float], list[float], dict[str, float]]:
    """(on, off, holds): on-thresholds from :func:`pick_thresholds` over ``f1`` (:func:`threshold_f1`),
    off-thresholds from :func:`off_thresholds`, holds shortened by :func:`shorten_holds`."""
    on = pick_thresholds(f1, ceilings)
    off = off_thresholds(on, settings)
    runs = held_runs_ms(probs, stream, data.sounds, on, off, data.frame_s)
    return on, off, shorten_holds(durations, data.sounds, runs, settings)


def latency_holds(durations: Mapping[str, float], choice: str, settings: PersonalizeConfig) -> dict[str, float]:
    """The holds of latency ``choice``: ``durations`` for ``safe``, each capped at its ``latency-holds-ms``
    entry for ``balanced`` and ``fast``."""
    if choice == "safe":
        return dict(durations)
    cap = settings.latency_holds_ms[LATENCY_CHOICES.index(choice) - 1]
    return {name: min(hold, cap) for name, hold in durations.items()}


def calibrate(model: TCN, stream: ValidationStream, data: PersonalData, settings: PersonalizeConfig,
              base: DetectorConfig, durations: Mapping[str, float]
              ) -> dict[str, tuple[float, DetectorConfig, dict[str, EventCounts], float]]:
    """Per latency choice (:data:`fl.config.LATENCY_CHOICES`): :func:`_held_out_f1` at that choice's holds
    (:func:`latency_holds`); the thresholds are picked for each."""
    return {choice: _held_out_f1(model, stream, data, settings, base, latency_holds(durations, choice, settings))
            for choice in LATENCY_CHOICES}


def _held_out_f1(model: TCN, stream: ValidationStream, data: PersonalData, settings: PersonalizeConfig,
                 base: DetectorConfig, durations: Mapping[str, float]
                 ) -> tuple[float, DetectorConfig, dict[str, EventCounts], float]:
    """(mean F1 over sounds, detector settings, counts, false triggers per hour) of a model with its own
    thresholds and holds (:func:`_thresholds_and_holds`), picked again under :func:`on_ceilings` where a brief
    sound's on-threshold was above its ceiling."""
    probs = frame_probabilities(sound_model(model), stream.frames)
    f1 = threshold_f1(probs, stream, data.sounds, settings, base, data.frame_s, durations)
    on, off, holds = _thresholds_and_holds(probs, stream, data, f1, settings, durations)
    ceilings = on_ceilings(data.sounds, durations, holds, settings)
    if any(t > c for t, c in zip(on, ceilings, strict=True)):
        on, off, holds = _thresholds_and_holds(probs, stream, data, f1, settings, durations, ceilings)
    detector = detector_settings(data.sounds, on, settings, base, holds, off)
    counts, per_hour = evaluate_held_out(probs, stream, data.sounds, detector, data.frame_s)
    return float(np.mean([counts[s].f1 for s in data.sounds])), detector, counts, per_hour


# ----------------------------------------------------------------------------------------------------------
# Entry point


def _base_bundle(profile: Profile, bundle: Path | None) -> Path:
    if bundle is not None:
        return Path(bundle)
    manifest = profile.personal_dir / "bundle.json"
    try:
        base = json.loads(manifest.read_text(encoding="utf-8"))["provenance"]["base_bundle"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        base = None  # no earlier personal bundle to take the global one from
    if isinstance(base, str) and Path(base).is_dir():
        return Path(base)
    shipped = shipped_bundle()
    if shipped is not None:
        return shipped
    raise PersonalizeError(f"{profile.path}: no global model: pass --bundle BUNDLE (a detector bundle made by "
                           "`fedsound export`; this install ships none)")


def personalize(profile: Path, bundle: Path | None, config: Config, progress: bool = True,
                settings: PersonalizeConfig | None = None,
                also_calibrate: Mapping[str, PersonalizeConfig] | None = None) -> dict:
    """Fine-tune ``bundle``'s model on ``profile`` and save the personal bundle in ``PROFILE/personal``.

    ``bundle`` None reuses the global bundle the profile was last personalized from, else the shipped one.
    ``settings`` default to ``config.personalize``; ``config.seed`` seeds everything. ``also_calibrate``: other
    calibration settings (name -> settings) whose detector settings for the same fine-tuned model the report
    adds under ``other_detectors`` (an ablation measures a rule this way). Returns the report (see the module
    docstring); :func:`format_report` renders it. The profile is locked meanwhile (``PROFILE.lock``).
    """
    with exclusive(Path(profile), "profile", is_dir=False):
        return _personalize(Path(profile), bundle, config, progress, settings, also_calibrate or {})


def _personalize(profile: Path, bundle: Path | None, config: Config, progress: bool,
                 settings: PersonalizeConfig | None, also_calibrate: Mapping[str, PersonalizeConfig]) -> dict:
    started = time.perf_counter()
    settings = settings or config.personalize
    store = Profile.load(Path(profile))
    base_path = _base_bundle(store, bundle)
    base = load_bundle(base_path)
    data = prepare_data(store, base, settings, config.seed)
    stream = validation_stream(data, config.seed)
    model = new_head_model(base, len(data.sounds), config.seed)
    durations = min_durations(data.segment_s, settings)
    untuned_f1, *_ = _held_out_f1(model, stream, data, settings, base.detector, durations)
    train_started = time.perf_counter()
    checkpoint = FineTuneCheckpoint.for_profile(store, base.manifest["manifest_sha256"], settings, config.seed)
    loss = fine_tune(model, data, settings, config.seed, progress, teacher=base.model, checkpoint=checkpoint)
    train_seconds = time.perf_counter() - train_started
    calibrated = calibrate(model, stream, data, settings, base.detector, durations)
    f1, detector, counts, per_hour = calibrated[settings.latency]
    presets = {choice: to_dict(found[1]) for choice, found in calibrated.items()}
    others = {name: _held_out_f1(model, stream, data, other, base.detector,
                                 latency_holds(min_durations(data.segment_s, other), other.latency, other))[1]
              for name, other in also_calibrate.items()}
    provenance = {"base_bundle": str(base.path.resolve()), "base_manifest_sha256": base.manifest["manifest_sha256"],
                  "personalize": to_dict(settings), "seed": config.seed, "examples": data.counts,
                  "latency": {"chosen": settings.latency, "detectors": presets}}
    write_bundle(store.personal_dir, sound_model(model), base.frontend_config, data.sounds,
                 [f"user:{name}" for name in data.sounds], detector, provenance=provenance,
                 portable=base.manifest.get("portable") is not None)
    make_private_tree(store.personal_dir)
    checkpoint.clear()
    resumed = checkpoint.resumed
    return {
        "profile": str(store.path),
        "bundle": str(store.personal_dir),
        "base_bundle": str(base.path),
        "adapt": settings.adapt,
        "steps": settings.steps,
        "loss": loss,
        "resumed": {"phase": resumed.phase, "step": resumed.step} if resumed else None,
        "checkpoint_discarded": checkpoint.discarded,
        "sounds": {name: {**data.counts[name], "on_threshold": detector.class_thresholds[name][0],
                          "off_threshold": detector.class_thresholds[name][1],
                          "min_duration_ms": detector.class_min_duration_ms[name], **counts[name].to_dict()}
                   for name in data.sounds},
        "latency": settings.latency,
        "latency_detectors": {choice: found[1] for choice, found in calibrated.items()},
        "latency_f1": {choice: found[0] for choice, found in calibrated.items()},
        "other_detectors": others,
        "f1": f1,
        "untuned_f1": untuned_f1,
        "false_triggers_per_hour": per_hour,
        "background_held_out_s": stream.background_seconds(data.frame_s),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - started,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """The personalization report as a few lines of text."""
    lines = [f"personal detector: {report['bundle']} (latency {report['latency']}; from {report['base_bundle']}, "
             f"adapt {report['adapt']}, "
             f"{report['steps']} steps, {report['train_seconds']:.1f} s of training, {report['seconds']:.1f} s "
             "in all)"]
    if report.get("resumed"):
        phase, step = report["resumed"]["phase"], report["resumed"]["step"]
        lines.append(f"resumed an interrupted fine-tune at step {step} of its {phase} phase")
    if report.get("checkpoint_discarded"):
        lines.append(f"started over: {report['checkpoint_discarded']}")
    lines.append(f"{'sound':<12} {'examples':>8} {'held out':>8} {'on':>5} {'off':>5} {'hold ms':>7} "
                 f"{'precision':>9} {'recall':>6}")
    for name, row in report["sounds"].items():
        lines.append(f"{name:<12} {row['examples']:>8} {row['held_out']:>8} {row['on_threshold']:>5.2f} "
                     f"{row['off_threshold']:>5.2f} {row['min_duration_ms']:>7.0f} {row['precision']:>9.2f} "
                     f"{row['recall']:>6.2f}")
    lines.append("held-out F1 by latency: " + ", ".join(f"{choice} {f1:.2f}" for choice, f1 in
                                                         report["latency_f1"].items())
                 + " (`fedsound listen PROFILE --latency CHOICE` switches)")
    lines.append(f"held-out F1 {report['f1']:.2f} (untuned head {report['untuned_f1']:.2f}); false triggers "
                 f"{report['false_triggers_per_hour']:.1f} per hour on {report['background_held_out_s']:.0f} s of "
                 "held-out background")
    return "\n".join(lines)

"""A small synthetic corpus in FSD50K's release layout, with Freesound-like uploaders.

Every class is a real FSD50K vocabulary entry (label and AudioSet mid) rendered by its own synthesized
acoustics (harmonic notes, struck partials, noise textures, impulse trains, frequency sweeps, pulsed
carriers), each with its own parameter set. Uploaders have heavy-tailed clip counts, their own class
preferences (Dirichlet) and their own recording chain (gain, spectral tilt, band limits, background noise
of a given colour, mains hum, room reverberation), so partitioning by uploader gives non-IID clients as in
FSD50K. Sounds are synthesized at 22.05 kHz (the feature rate) and written at 44.1 kHz, PCM_16, mono.
The same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import soundfile as sf
from scipy import fft as sfft
from tqdm import tqdm

from fl.errors import ConfigError, DataError

SYNTH_RATE = 22050
OUTPUT_RATE = 44100
MIN_SECONDS = 0.3
MAX_SECONDS = 30.0
TWO_LABEL_FRACTION = 0.15
UPLOADER_ZIPF_EXPONENT = 1.1
CLASS_PREFERENCE_ALPHA = 0.5
MEDIAN_SECONDS = 2.0
_TOP_HZ = 10000.0  # highest partial rendered (below the 11.025 kHz Nyquist of the synthesis rate)
_TABLE_SIZE = 2048

Range = tuple[float, float]


class SoundModel(Protocol):
    """Renders one class's sound filling ``n`` samples at ``rate``; the scale is arbitrary."""

    def render(self, n: int, rate: int, rng: np.random.Generator) -> np.ndarray: ...


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def _uniform(rng: np.random.Generator, bounds: Range) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _log_uniform(rng: np.random.Generator, bounds: Range) -> float:
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


def _band_gain(freqs: np.ndarray, low: float, high: float, order: int = 4) -> np.ndarray:
    """Magnitude of a Butterworth-like band-pass (no phase), evaluated at ``freqs``."""
    safe = np.maximum(freqs, 1e-3)
    highpass = 1.0 / np.sqrt(1.0 + (low / safe) ** (2 * order))
    lowpass = 1.0 / np.sqrt(1.0 + (safe / high) ** (2 * order))
    return highpass * lowpass


def _fast_size(n: int) -> int:
    return sfft.next_fast_len(n, real=True)


def _band_filter(signal: np.ndarray, rate: int, low: float, high: float) -> np.ndarray:
    size = _fast_size(signal.size)
    spectrum = sfft.rfft(signal, size)
    spectrum *= _band_gain(sfft.rfftfreq(size, 1.0 / rate), low, high)
    return sfft.irfft(spectrum, size)[: signal.size]


def _band_noise(rng: np.random.Generator, n: int, rate: int, band: Range) -> np.ndarray:
    noise = _band_filter(rng.standard_normal(n), rate, band[0], band[1])
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _harmonic_amplitudes(f_max: float, harmonics: int, rolloff: float, odd_only: bool) -> np.ndarray:
    count = int(max(1, min(harmonics, _TOP_HZ // max(f_max, 1.0))))
    k = np.arange(1, count + 1, dtype=float)
    amps = k**-rolloff
    if odd_only:
        amps[1::2] = 0.0
    return amps


def _wavetable(amps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One period of a band-limited waveform with the given harmonic amplitudes (plus a wrap sample)."""
    spectrum = np.zeros(_TABLE_SIZE // 2 + 1, dtype=complex)
    phases = rng.uniform(0.0, 2 * np.pi, amps.size)
    spectrum[1 : amps.size + 1] = amps * np.exp(1j * phases)
    table = sfft.irfft(spectrum, _TABLE_SIZE)
    table /= np.max(np.abs(table)) + 1e-12
    return np.append(table, table[0])


def _tone(freq_track: np.ndarray, rate: int, amps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Harmonic tone following ``freq_track`` (Hz per sample), by wavetable lookup."""
    table = _wavetable(amps, rng)
    cycles = np.cumsum(freq_track) / rate + rng.uniform()
    position = (cycles % 1.0) * _TABLE_SIZE
    index = position.astype(np.int64)
    frac = position - index
    return table[index] * (1.0 - frac) + table[index + 1] * frac


def _ramps(n: int, rate: int, attack: float, release: float) -> np.ndarray:
    """Envelope of ones with raised-cosine attack and release (shortened to fit ``n``)."""
    env = np.ones(n)
    a = min(int(attack * rate), n // 2)
    r = min(int(release * rate), n - a)
    if a > 0:
        env[:a] = 0.5 - 0.5 * np.cos(np.pi * np.arange(a) / a)
    if r > 0:
        env[n - r :] = 0.5 + 0.5 * np.cos(np.pi * np.arange(1, r + 1) / r)
    return env


def _contour(kind: str, depth: float, m: int) -> np.ndarray:
    u = np.linspace(0.0, 1.0, m)
    if kind == "rise":
        return depth**u
    if kind == "fall":
        return depth**-u
    if kind == "arch":
        return depth ** np.sin(np.pi * u)
    if kind == "updown":
        return depth ** (0.5 - 0.5 * np.cos(2 * np.pi * u))
    return np.ones(m)


def _group_times(
    rng: np.random.Generator, seconds: float, period: Range, group: tuple[int, int], spacing: float
) -> np.ndarray:
    """Event times: groups of hits every ``period`` seconds, hits within a group ``spacing`` apart."""
    times: list[float] = []
    start = rng.uniform(0.0, min(0.08, 0.3 * seconds))
    while start < seconds:
        hits = int(rng.integers(group[0], group[1] + 1))
        offsets = np.arange(hits) * spacing * rng.uniform(0.85, 1.15, hits)
        times.extend(float(t) for t in start + offsets if t < seconds)
        start += _uniform(rng, period) + (hits - 1) * spacing
    return np.asarray(times)


def _peak_normalise(signal: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(signal))) if signal.size else 0.0
    return signal / peak if peak > 0 else signal


# ----------------------------------------------------------------------------------------------------------
# Sound families: each class is one family with its own parameters.


@dataclass(frozen=True)
class HarmonicNotes:
    """Notes or syllables of a harmonic tone with a pitch contour, vibrato, optional chord and breath."""

    f0: Range
    note: Range
    gap: Range
    harmonics: int = 20
    rolloff: float = 1.0
    contour: str = "flat"
    contour_depth: float = 1.0
    vibrato: Range = (0.0, 0.0)  # (rate Hz, depth as a fraction of f0)
    voices: tuple[float, ...] = (1.0,)
    breath: float = 0.0
    odd_only: bool = False
    attack: float = 0.015

    def render(self, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
        out = np.zeros(n)
        start = int(rng.uniform(0.0, 0.06) * rate)
        while start < n:
            m = min(n - start, max(int(_uniform(rng, self.note) * rate), 32))
            f0 = _log_uniform(rng, self.f0)
            t = np.arange(m) / rate
            track = f0 * _contour(self.contour, self.contour_depth, m)
            if self.vibrato[0] > 0:
                track *= 1.0 + self.vibrato[1] * np.sin(2 * np.pi * self.vibrato[0] * t + rng.uniform(0, 6.3))
            note = np.zeros(m)
            for ratio in self.voices:
                f_max = float(track.max()) * ratio
                amps = _harmonic_amplitudes(f_max, self.harmonics, self.rolloff, self.odd_only)
                note += _tone(track * ratio, rate, amps, rng)
            if self.breath > 0:
                note += self.breath * rng.standard_normal(m)
            out[start : start + m] = note * _ramps(m, rate, self.attack, 0.03)
            start += m + int(_uniform(rng, self.gap) * rate)
        return out


@dataclass(frozen=True)
class StruckPartials:
    """Struck resonators (bells, bars, gongs): inharmonic partials with exponential decays."""

    f0: Range
    ratios: tuple[float, ...]
    decay: float
    period: Range
    pitches: tuple[float, ...] = (1.0,)  # a scale: each strike picks one ratio over the clip's base pitch

    def render(self, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
        out = np.zeros(n)
        base = _log_uniform(rng, self.f0)
        ratios = np.asarray(self.ratios)
        t = np.arange(min(n, int(4 * self.decay * rate))) / rate
        strikes: dict[int, np.ndarray] = {}  # one rendered strike per pitch of the scale, reused
        for onset in _group_times(rng, n / rate, self.period, (1, 1), 0.0):
            pitch = int(rng.integers(len(self.pitches)))
            if pitch not in strikes:
                freqs = base * self.pitches[pitch] * ratios
                keep = freqs < _TOP_HZ
                decays = np.exp(-t[None, :] * np.sqrt(ratios[keep, None]) / self.decay)
                phases = rng.uniform(0, 2 * np.pi, (int(keep.sum()), 1))
                partials = decays * np.sin(2 * np.pi * freqs[keep, None] * t[None, :] + phases)
                strikes[pitch] = ratios[keep] ** -0.5 @ partials
            start = int(onset * rate)
            m = min(n - start, t.size)
            out[start : start + m] += rng.uniform(0.6, 1.0) * strikes[pitch][:m]
            click = min(m, 64)
            out[start : start + click] += 0.3 * rng.standard_normal(click)
        return out


@dataclass(frozen=True)
class NoiseTexture:
    """Continuous band-limited noise with slow amplitude modulation, optional grains (crackle) and hum."""

    band: Range
    am_rate: Range = (0.0, 0.0)
    am_depth: float = 0.0
    grain_rate: float = 0.0  # grains per second
    grain_band: Range = (1000.0, 8000.0)
    grain_decay: float = 0.003
    grain_level: float = 1.0
    hum: Range = (0.0, 0.0)  # a tonal component (fundamental Hz range)
    hum_level: float = 0.0

    def render(self, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
        out = _band_noise(rng, n, rate, self.band)
        t = np.arange(n) / rate
        if self.am_depth > 0:
            swell = 0.5 - 0.5 * np.cos(2 * np.pi * _uniform(rng, self.am_rate) * t + rng.uniform(0, 6.3))
            out *= 1.0 - self.am_depth * swell
        if self.grain_rate > 0:
            spikes = np.zeros(n)
            count = int(rng.poisson(self.grain_rate * n / rate)) + 1
            signs = rng.choice([-1.0, 1.0], count)
            spikes[rng.integers(0, n, count)] = rng.lognormal(0.0, 0.6, count) * signs
            kernel = np.exp(-np.arange(int(6 * self.grain_decay * rate) + 1) / (self.grain_decay * rate))
            size = _fast_size(n + kernel.size)
            spectrum = sfft.rfft(spikes, size) * sfft.rfft(kernel, size)
            spectrum *= _band_gain(sfft.rfftfreq(size, 1.0 / rate), *self.grain_band)
            grains = sfft.irfft(spectrum, size)[:n]
            out += self.grain_level * grains / (np.sqrt(np.mean(grains**2)) + 1e-12)
        if self.hum_level > 0:
            f = _uniform(rng, self.hum)
            out += self.hum_level * _tone(np.full(n, f), rate, np.array([1.0, 0.5, 0.25]), rng)
        return out


@dataclass(frozen=True)
class ImpulseTrain:
    """Knocks, clicks, drum hits: decaying resonances plus band-limited noise bursts, in groups."""

    freq: Range
    decay: float
    period: Range
    noise: float = 0.0  # share of the noise burst against the resonance
    noise_band: Range = (500.0, 8000.0)
    group: tuple[int, int] = (1, 1)
    spacing: float = 0.0
    sweep: float = 1.0  # pitch ratio reached after three decay times (drum fall < 1, drop rise > 1)
    alternate: tuple[float, ...] = (1.0,)  # pitch factors cycled over successive hits (tick-tock)

    def render(self, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
        tone = np.zeros(n)
        burst = np.zeros(n)
        times = _group_times(rng, n / rate, self.period, self.group, self.spacing)
        base = _log_uniform(rng, self.freq)
        for i, onset in enumerate(times):
            start = int(onset * rate)
            m = min(n - start, int(6 * self.decay * rate) + 1)
            t = np.arange(m) / rate
            env = np.exp(-t / self.decay)
            gain = rng.uniform(0.6, 1.0)
            f = base * self.alternate[i % len(self.alternate)] * rng.uniform(0.97, 1.03)
            track = f * self.sweep ** np.minimum(t / (3 * self.decay), 1.0)
            tone[start : start + m] += gain * env * np.sin(2 * np.pi * np.cumsum(track) / rate)
            if self.noise > 0:
                burst[start : start + m] += gain * env**2 * rng.standard_normal(m)
        out = (1.0 - self.noise) * _peak_normalise(tone)
        if self.noise > 0:
            out += self.noise * _peak_normalise(_band_filter(burst, rate, *self.noise_band))
        return out


@dataclass(frozen=True)
class Sweeps:
    """Frequency sweeps (tweets, sirens, whooshes, revving): tonal or noise-band carriers, in groups."""

    f_start: Range
    f_end: Range
    length: Range
    gap: Range
    group: tuple[int, int] = (1, 1)
    spacing: float = 0.0
    harmonics: int = 1
    rolloff: float = 1.0
    shape: str = "exp"  # "exp": start to end; "updown": start to end and back
    trill: Range = (0.0, 0.0)  # (rate Hz, depth as a fraction)
    noise_bandwidth: float = 0.0  # > 0: a noise band of this width (Hz) follows the sweep instead of a tone

    def render(self, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
        out = np.zeros(n)
        start = int(rng.uniform(0.0, 0.06) * rate)
        while start < n:
            hits = int(rng.integers(self.group[0], self.group[1] + 1))
            for hit in range(hits):
                if start >= n:
                    break
                m = min(n - start, max(int(_uniform(rng, self.length) * rate), 32))
                f_a, f_b = _log_uniform(rng, self.f_start), _log_uniform(rng, self.f_end)
                u = np.linspace(0.0, 1.0, m)
                if self.shape == "updown":
                    u = 0.5 - 0.5 * np.cos(2 * np.pi * u)
                track = f_a * (f_b / f_a) ** u
                if self.trill[0] > 0:
                    track *= 1.0 + self.trill[1] * np.sin(2 * np.pi * self.trill[0] * np.arange(m) / rate)
                if self.noise_bandwidth > 0:
                    lowpassed = _band_noise(rng, m, rate, (1.0, self.noise_bandwidth))
                    carrier = lowpassed * np.cos(2 * np.pi * np.cumsum(track) / rate)
                    env = np.sin(np.pi * np.linspace(0.0, 1.0, m))
                else:
                    amps = _harmonic_amplitudes(float(track.max()), self.harmonics, self.rolloff, False)
                    carrier = _tone(track, rate, amps, rng)
                    env = _ramps(m, rate, 0.005, 0.01)
                out[start : start + m] += carrier * env
                start += m + (int(self.spacing * rate) if hit + 1 < hits else 0)
            start += int(_uniform(rng, self.gap) * rate)
        return out


@dataclass(frozen=True)
class Pulsed:
    """A tonal or noise carrier chopped by a pulse train, optionally in bursts (crickets, frogs, engines)."""

    pulse_rate: Range
    duty: float
    f0: Range = (0.0, 0.0)  # tonal carrier when > 0
    band: Range = (0.0, 0.0)  # noise carrier otherwise
    harmonics: int = 1
    rolloff: float = 1.0
    burst_on: Range = (0.0, 0.0)  # (0, 0): continuous
    burst_off: Range = (0.0, 0.0)

    def render(self, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
        t = np.arange(n) / rate
        if self.f0[1] > 0:
            f = _log_uniform(rng, self.f0)
            track = f * (1.0 + 0.01 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6.3)))
            carrier = _tone(track, rate, _harmonic_amplitudes(f, self.harmonics, self.rolloff, False), rng)
        else:
            carrier = _band_noise(rng, n, rate, self.band)
        phase = (_uniform(rng, self.pulse_rate) * t + rng.uniform()) % 1.0
        pulses = np.where(phase < self.duty, 0.5 - 0.5 * np.cos(2 * np.pi * phase / self.duty), 0.0)
        out = carrier * pulses
        if self.burst_on[1] > 0:
            gate = np.zeros(n)
            start = int(rng.uniform(0.0, 0.05) * rate)
            while start < n:
                m = min(n - start, int(_uniform(rng, self.burst_on) * rate))
                gate[start : start + m] = _ramps(m, rate, 0.01, 0.02)
                start += m + int(_uniform(rng, self.burst_off) * rate)
            out *= gate
        return out


# ----------------------------------------------------------------------------------------------------------
# The vocabulary: real FSD50K (label, mid) pairs, each with its own acoustics.
# Labels and mids verified against FSD50K.ground_truth/vocabulary.csv as mirrored in the soundata test
# resources (github.com/soundata/soundata, tests/resources/sound_datasets/fsd50k/FSD50K.ground_truth/).
# The first entries are the most distinct families, so small class counts stay easy to tell apart.


@dataclass(frozen=True)
class SynthClass:
    """One vocabulary entry: FSD50K label and AudioSet mid, and the model that renders it."""

    label: str
    mid: str
    sound: SoundModel


SYNTH_VOCABULARY: tuple[SynthClass, ...] = (
    SynthClass("Bark", "/m/05tny_", HarmonicNotes(
        f0=(380, 620), note=(0.08, 0.18), gap=(0.08, 0.3), harmonics=14, rolloff=0.8,
        contour="arch", contour_depth=1.35, breath=0.35, attack=0.005)),
    SynthClass("Church_bell", "/m/03w41f", StruckPartials(
        f0=(260, 420), ratios=(0.5, 1.0, 1.19, 1.5, 2.0, 2.5, 3.0), decay=1.4, period=(0.9, 1.4))),
    SynthClass("Rain", "/m/06mb1", NoiseTexture(
        band=(400, 9000), am_rate=(0.1, 0.3), am_depth=0.15, grain_rate=70, grain_band=(1500, 8000),
        grain_decay=0.004, grain_level=1.2)),
    SynthClass("Knock", "/m/07r4wb8", ImpulseTrain(
        freq=(130, 300), decay=0.03, period=(0.55, 0.9), noise=0.4, noise_band=(200, 2000),
        group=(2, 4), spacing=0.14)),
    SynthClass("Chirp_and_tweet", "/m/07pggtn", Sweeps(
        f_start=(2600, 3800), f_end=(4800, 7000), length=(0.04, 0.08), gap=(0.15, 0.4), group=(3, 6),
        spacing=0.06, harmonics=2, rolloff=1.5)),
    SynthClass("Siren", "/m/03kmc9", Sweeps(
        f_start=(550, 750), f_end=(1200, 1600), length=(1.2, 2.4), gap=(0.0, 0.02), harmonics=6,
        rolloff=1.2, shape="updown")),
    SynthClass("Male_speech_and_man_speaking", "/m/05zppz", HarmonicNotes(
        f0=(95, 140), note=(0.1, 0.3), gap=(0.02, 0.15), harmonics=40, rolloff=1.2, contour="fall",
        contour_depth=1.3, breath=0.15)),
    SynthClass("Tick-tock", "/m/07qjznl", ImpulseTrain(
        freq=(2500, 3500), decay=0.006, period=(0.49, 0.51), noise=0.3, noise_band=(2000, 8000),
        alternate=(1.0, 0.7))),
    SynthClass("Wind", "/m/03m9d0z", NoiseTexture(band=(80, 900), am_rate=(0.3, 0.7), am_depth=0.8)),
    SynthClass("Cricket", "/m/09xqv", Pulsed(
        pulse_rate=(25, 40), duty=0.5, f0=(4200, 5200), burst_on=(0.15, 0.35), burst_off=(0.08, 0.25))),
    SynthClass("Accordion", "/m/0mkg", HarmonicNotes(
        f0=(200, 500), note=(0.4, 1.2), gap=(0.02, 0.1), harmonics=24, rolloff=0.7,
        vibrato=(6.0, 0.004), voices=(1.0, 1.003))),
    SynthClass("Glockenspiel", "/m/0dwtp", StruckPartials(
        f0=(900, 1400), ratios=(1.0, 2.76, 5.40), decay=0.6, period=(0.18, 0.4),
        pitches=(1.0, 1.122, 1.26, 1.498, 1.682, 2.0))),
    SynthClass("Applause", "/m/028ght", NoiseTexture(
        band=(700, 5000), am_rate=(0.2, 0.5), am_depth=0.2, grain_rate=180, grain_band=(800, 5000),
        grain_decay=0.01, grain_level=1.5)),
    SynthClass("Bass_drum", "/m/0bm02", ImpulseTrain(
        freq=(95, 130), decay=0.11, period=(0.45, 0.55), noise=0.1, noise_band=(50, 800), sweep=0.45)),
    SynthClass("Hi-hat", "/m/03qtq", ImpulseTrain(
        freq=(7000, 9000), decay=0.025, period=(0.2, 0.3), noise=0.9, noise_band=(6000, 10500))),
    SynthClass("Meow", "/m/07qrkrw", HarmonicNotes(
        f0=(450, 700), note=(0.4, 0.9), gap=(0.15, 0.4), harmonics=10, rolloff=1.0, contour="arch",
        contour_depth=1.5, attack=0.04)),
    SynthClass("Drip", "/m/07r5v4s", ImpulseTrain(
        freq=(500, 1100), decay=0.03, period=(0.25, 0.7), sweep=2.2)),
    SynthClass("Mechanical_fan", "/m/02x984l", NoiseTexture(
        band=(150, 2500), am_rate=(18, 35), am_depth=0.25, hum=(90, 180), hum_level=0.4)),
    SynthClass("Trumpet", "/m/07gql", HarmonicNotes(
        f0=(350, 900), note=(0.15, 0.45), gap=(0.05, 0.15), harmonics=30, rolloff=0.4, contour="rise",
        contour_depth=1.03, attack=0.03)),
    SynthClass("Whoosh_and_swoosh_and_swish", "/m/07rqsjt", Sweeps(
        f_start=(300, 700), f_end=(3000, 6000), length=(0.3, 0.6), gap=(0.15, 0.45),
        noise_bandwidth=600)),
    SynthClass("Typing", "/m/0316dw", ImpulseTrain(
        freq=(2000, 4500), decay=0.008, period=(0.06, 0.22), noise=0.6, noise_band=(1500, 7000))),
    SynthClass("Idling", "/m/07pb8fc", Pulsed(pulse_rate=(22, 40), duty=0.35, band=(60, 1500))),
    SynthClass("Organ", "/m/013y1f", HarmonicNotes(
        f0=(260, 520), note=(0.8, 2.0), gap=(0.0, 0.03), harmonics=12, rolloff=1.3,
        voices=(1.0, 1.26, 1.5, 2.0), attack=0.05)),
    SynthClass("Frog", "/m/09ld4", Pulsed(
        pulse_rate=(10, 18), duty=0.5, f0=(180, 350), harmonics=10, rolloff=0.8, burst_on=(0.25, 0.5),
        burst_off=(0.15, 0.4))),
    SynthClass("Hiss", "/m/07rjwbb", NoiseTexture(band=(3500, 10000), am_rate=(0.2, 0.5), am_depth=0.1)),
    SynthClass("Gong", "/m/0mbct", StruckPartials(
        f0=(90, 160), ratios=(1.0, 1.47, 2.09, 2.56, 3.2, 4.1), decay=2.2, period=(1.6, 2.4))),
    SynthClass("Finger_snapping", "/m/025_jnm", ImpulseTrain(
        freq=(2000, 3000), decay=0.01, period=(0.45, 0.7), noise=0.8, noise_band=(1500, 5000))),
    SynthClass("Female_speech_and_woman_speaking", "/m/02zsn", HarmonicNotes(
        f0=(180, 260), note=(0.1, 0.3), gap=(0.02, 0.15), harmonics=30, rolloff=1.2, contour="fall",
        contour_depth=1.3, breath=0.15)),
    SynthClass("Buzz", "/m/07pjwq1", HarmonicNotes(
        f0=(110, 180), note=(0.6, 1.5), gap=(0.05, 0.2), harmonics=60, rolloff=1.0, odd_only=True)),
    SynthClass("Purr", "/m/02yds9", Pulsed(
        pulse_rate=(22, 30), duty=0.5, band=(40, 500), burst_on=(1.0, 1.8), burst_off=(0.15, 0.4))),
    SynthClass("Ringtone", "/m/01hnzm", Pulsed(
        pulse_rate=(15, 22), duty=0.6, f0=(900, 1700), harmonics=4, rolloff=1.5, burst_on=(0.7, 1.0),
        burst_off=(0.3, 0.5))),
    SynthClass("Cowbell", "/m/0239kh", StruckPartials(
        f0=(540, 600), ratios=(1.0, 1.48, 2.4), decay=0.12, period=(0.25, 0.35))),
    SynthClass("Sawing", "/m/01b82r", Pulsed(pulse_rate=(1.6, 2.4), duty=0.8, band=(1500, 7000))),
    SynthClass("Snare_drum", "/m/06rvn", ImpulseTrain(
        freq=(180, 220), decay=0.06, period=(0.4, 0.6), noise=0.8, noise_band=(1000, 8000))),
    SynthClass("Walk_and_footsteps", "/m/07pbtc8", ImpulseTrain(
        freq=(60, 120), decay=0.05, period=(0.45, 0.6), noise=0.5, noise_band=(100, 1500))),
    SynthClass("Bird_vocalization_and_bird_call_and_bird_song", "/m/020bb7", Sweeps(
        f_start=(2000, 3000), f_end=(2500, 3600), length=(0.3, 0.8), gap=(0.1, 0.4), harmonics=2,
        rolloff=2.0, trill=(18, 0.25))),
    SynthClass("Accelerating_and_revving_and_vroom", "/m/07q2z82", Sweeps(
        f_start=(40, 60), f_end=(120, 200), length=(1.0, 2.0), gap=(0.05, 0.3), harmonics=40,
        rolloff=0.9)),
    SynthClass("Wind_chime", "/m/026fgl", StruckPartials(
        f0=(1900, 2600), ratios=(1.0, 2.76), decay=0.9, period=(0.06, 0.2),
        pitches=(1.0, 1.125, 1.25, 1.5, 1.667))),
    SynthClass("Female_singing", "/t/dd00004", HarmonicNotes(
        f0=(220, 520), note=(0.5, 1.2), gap=(0.02, 0.1), harmonics=20, rolloff=1.1, vibrato=(5.5, 0.03),
        attack=0.05)),
    SynthClass("Male_singing", "/t/dd00003", HarmonicNotes(
        f0=(100, 240), note=(0.5, 1.2), gap=(0.02, 0.1), harmonics=30, rolloff=1.1, vibrato=(5.0, 0.03),
        attack=0.05)),
    SynthClass("Waves_and_surf", "/m/034srq", NoiseTexture(
        band=(150, 4000), am_rate=(0.15, 0.3), am_depth=0.9)),
    SynthClass("Gunshot_and_gunfire", "/m/032s66", ImpulseTrain(
        freq=(80, 150), decay=0.15, period=(0.6, 1.0), noise=0.8, noise_band=(200, 8000))),
    SynthClass("Frying_(food)", "/m/0dxrf", NoiseTexture(
        band=(2500, 10000), am_rate=(0.2, 0.5), am_depth=0.2, grain_rate=150, grain_band=(2000, 9000),
        grain_decay=0.002, grain_level=2.0)),
    SynthClass("Drill", "/m/01d380", HarmonicNotes(
        f0=(300, 450), note=(0.8, 2.0), gap=(0.1, 0.3), harmonics=25, rolloff=0.6, contour="rise",
        contour_depth=1.2, breath=0.4, odd_only=True)),
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Uploaders and their recording chain


_ADJECTIVES = ("quiet", "field", "urban", "lofi", "analog", "night", "river", "studio", "pocket", "hollow",
               "amber", "static", "coastal", "mellow", "rusty", "velvet")
_NOUNS = ("fox", "owl", "tape", "mic", "echo", "room", "wave", "hum", "reed", "crow", "loop", "drum",
          "pine", "moth")
_LICENSES = (
    "http://creativecommons.org/publicdomain/zero/1.0/",
    "http://creativecommons.org/licenses/by/3.0/",
    "http://creativecommons.org/licenses/by-nc/3.0/",
    "http://creativecommons.org/licenses/sampling+/1.0/",
)


@dataclass(frozen=True)
class _Uploader:
    name: str
    license: str
    preferences: np.ndarray  # probability per class
    duration_scale: float
    gain_db: float
    tilt_db_per_octave: float
    highpass_hz: float
    lowpass_hz: float
    noise_dbfs: float
    noise_colour: float  # 0 white, 1 pink, 2 brown
    hum_hz: float
    hum_dbfs: float
    reverb_wet: float
    impulse_response: np.ndarray  # at SYNTH_RATE, unit energy

    def chain_gain(self, freqs: np.ndarray) -> np.ndarray:
        """Magnitude response of the uploader's microphone chain (tilt and band limits)."""
        safe = np.maximum(freqs, freqs.dtype.type(20.0))
        gain = (safe / 1000.0) ** freqs.dtype.type(self.tilt_db_per_octave / (20 * np.log10(2)))
        gain /= np.sqrt(1.0 + (freqs.dtype.type(self.highpass_hz) / safe) ** 4)
        return gain / np.sqrt(1.0 + (safe / freqs.dtype.type(self.lowpass_hz)) ** 8)


def _make_uploader(seed: int, index: int, name: str, n_classes: int) -> _Uploader:
    rng = np.random.default_rng([seed, 1, index])
    rt60 = rng.uniform(0.08, 0.9)
    ir_t = np.arange(int(rt60 * SYNTH_RATE)) / SYNTH_RATE
    ir = rng.standard_normal(ir_t.size) * np.exp(-6.91 * ir_t / rt60)
    ir[: int(rng.uniform(0.002, 0.012) * SYNTH_RATE)] = 0.0  # pre-delay
    ir /= np.sqrt(np.sum(ir**2)) + 1e-12
    has_hum = rng.uniform() < 0.25
    return _Uploader(
        name=name,
        license=str(rng.choice(_LICENSES)),
        preferences=rng.dirichlet(np.full(n_classes, CLASS_PREFERENCE_ALPHA)),
        duration_scale=float(rng.lognormal(0.0, 0.4)),
        gain_db=rng.uniform(-14.0, -1.0),
        tilt_db_per_octave=rng.uniform(-3.0, 3.0),
        highpass_hz=rng.uniform(20.0, 150.0),
        lowpass_hz=rng.uniform(7000.0, 10500.0) if rng.uniform() < 0.3 else 20000.0,
        noise_dbfs=rng.uniform(-72.0, -40.0),
        noise_colour=rng.uniform(0.0, 2.0),
        hum_hz=float(rng.choice([50.0, 60.0])) if has_hum else 0.0,
        hum_dbfs=rng.uniform(-55.0, -38.0),
        reverb_wet=rng.uniform(0.0, 0.5) if rng.uniform() < 0.7 else 0.0,
        impulse_response=ir,
    )


def _uploader_names(rng: np.random.Generator, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = f"{rng.choice(_ADJECTIVES)}{rng.choice(_NOUNS)}{int(rng.integers(1, 100))}"
        if name not in names:
            names.append(name)
    return names


def _heavy_tailed_counts(rng: np.random.Generator, total: int, uploaders: int) -> np.ndarray:
    """Clips per uploader: at least one each, the rest Zipf-distributed (a few with many, most with few)."""
    weights = np.arange(1, uploaders + 1, dtype=float) ** -UPLOADER_ZIPF_EXPONENT
    counts = 1 + rng.multinomial(total - uploaders, weights / weights.sum())
    return rng.permutation(counts)


def _record(dry: np.ndarray, uploader: _Uploader, rng: np.random.Generator) -> np.ndarray:
    """Recording chain at SYNTH_RATE in, OUTPUT_RATE out: reverb, mic response, background, hum, gain."""
    n = dry.size
    gain = 10 ** (uploader.gain_db / 20 + rng.normal(0.0, 1.5) / 20)
    if uploader.hum_hz > 0:
        hum = _tone(np.full(n, uploader.hum_hz), SYNTH_RATE, np.array([1.0, 0.5, 0.33]), rng)
        dry = dry + 10 ** (uploader.hum_dbfs / 20) / gain * hum
    half = _fast_size(n + uploader.impulse_response.size)
    half += half % 2
    # The output grid (2 * half points at OUTPUT_RATE) has the same bin spacing as the synthesis grid
    # (half points at SYNTH_RATE): upsampling is zero-padding the spectrum.
    size = 2 * half
    # Single precision halves the FFT cost; 16-bit output needs no more.
    freqs = sfft.rfftfreq(size, 1.0 / OUTPUT_RATE).astype(np.float32)
    chain = uploader.chain_gain(freqs)
    spectrum = np.zeros(freqs.size, dtype=np.complex64)
    room = sfft.rfft(uploader.impulse_response.astype(np.float32), half)
    spectrum[: half // 2 + 1] = sfft.rfft(dry.astype(np.float32), half) * (1.0 + uploader.reverb_wet * room)
    spectrum[half // 2] = 0.0
    spectrum *= np.float32(2.0 * gain) * chain
    colour = np.maximum(freqs, 20.0) ** np.float32(-uploader.noise_colour / 2) * chain
    colour *= np.float32(np.sqrt(size / 2 / np.mean(colour**2)) * 10 ** (uploader.noise_dbfs / 20))
    noise = rng.standard_normal((2, freqs.size), dtype=np.float32)
    spectrum += colour * (noise[0] + 1j * noise[1])
    audio = sfft.irfft(spectrum, size)[: 2 * n]
    peak = float(np.max(np.abs(audio)))
    return audio * (0.99 / peak) if peak > 0.99 else audio


# ----------------------------------------------------------------------------------------------------------
# The corpus plan and writer


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`synthesize_corpus` wrote."""

    out: Path
    n_dev: int
    n_eval: int
    n_uploaders_dev: int
    n_uploaders_eval: int
    classes: list[str]
    audio_seconds: float


@dataclass
class _Clip:
    fname: int
    uploader: int
    split: str  # train, val or eval
    labels: list[int]  # class indices into the chosen vocabulary; the first is the predominant one
    samples: int  # at SYNTH_RATE


def _validate(
    n_clips: int, n_uploaders: int, n_classes: int, eval_fraction: float, val_fraction: float
) -> None:
    if not 1 <= n_classes <= len(SYNTH_VOCABULARY):
        raise ConfigError(
            f"n_classes={n_classes}: the synthetic vocabulary has {len(SYNTH_VOCABULARY)} classes "
            f"(choose 1 to {len(SYNTH_VOCABULARY)})"
        )
    if n_uploaders < 2:
        raise ConfigError(f"n_uploaders={n_uploaders}: need at least 2 (dev and eval uploaders are disjoint)")
    if n_clips < n_uploaders:
        raise ConfigError(f"n_clips={n_clips}: need at least one clip per uploader ({n_uploaders} uploaders)")
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction={eval_fraction}: must be between 0 and 1 (exclusive)")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction}: must be in [0, 1)")


def _ensure_coverage(clips: list[_Clip], split: str, n_classes: int, rng: np.random.Generator) -> None:
    """Relabel clips so that every class occurs in ``split``, when the split has enough clips for it.

    A missing class replaces the predominant label of a clip whose predominant class is the split's most
    frequent one, so no other class loses its last occurrence.
    """
    members = [c for c in clips if c.split == split]
    if len(members) < n_classes:
        return
    for missing in rng.permutation(n_classes):
        if any(missing in c.labels for c in members):
            continue
        primary = np.bincount([c.labels[0] for c in members], minlength=n_classes)
        donors = [c for c in members if c.labels[0] == int(np.argmax(primary))]
        donor = donors[int(rng.integers(len(donors)))]
        donor.labels = [int(missing)] + [lab for lab in donor.labels[1:] if lab != missing]


def _plan(
    n_clips: int, n_uploaders: int, n_classes: int, seed: int, eval_fraction: float, val_fraction: float
) -> tuple[list[_Uploader], list[_Clip], int]:
    rng = np.random.default_rng([seed, 0])
    n_eval_uploaders = min(n_uploaders - 1, max(1, round(n_uploaders * eval_fraction)))
    n_dev_uploaders = n_uploaders - n_eval_uploaders
    n_eval = max(n_eval_uploaders, round(n_clips * eval_fraction))
    if n_clips - n_eval < n_dev_uploaders:
        raise ConfigError(
            f"n_clips={n_clips}: too few for {n_dev_uploaders} dev and {n_eval_uploaders} eval uploaders"
        )
    names = _uploader_names(rng, n_uploaders)
    uploaders = [_make_uploader(seed, i, names[i], n_classes) for i in range(n_uploaders)]
    counts = np.concatenate([
        _heavy_tailed_counts(rng, n_clips - n_eval, n_dev_uploaders),
        _heavy_tailed_counts(rng, n_eval, n_eval_uploaders),
    ])
    owner = np.repeat(np.arange(n_uploaders), counts)
    fnames = rng.choice(np.arange(1000, 450000), size=n_clips, replace=False)  # like Freesound ids
    two_label = np.zeros(n_clips, dtype=bool)
    if n_classes > 1:
        two_label[rng.choice(n_clips, size=max(1, round(TWO_LABEL_FRACTION * n_clips)), replace=False)] = True

    clips: list[_Clip] = []
    for i in range(n_clips):
        uploader = uploaders[owner[i]]
        first = int(rng.choice(n_classes, p=uploader.preferences))
        labels = [first]
        if two_label[i]:
            others = np.delete(uploader.preferences, first) + 1e-3
            second = int(rng.choice(n_classes - 1, p=others / others.sum()))
            labels.append(second + (second >= first))
        seconds = np.exp(rng.normal(np.log(MEDIAN_SECONDS), 1.0)) * uploader.duration_scale
        samples = int(round(np.clip(seconds, MIN_SECONDS, MAX_SECONDS) * SYNTH_RATE))
        split = "eval" if owner[i] >= n_dev_uploaders else "train"
        clips.append(_Clip(int(fnames[i]), int(owner[i]), split, labels, samples))

    dev = [c for c in clips if c.split == "train"]
    n_val = round(len(dev) * val_fraction)
    if val_fraction > 0:
        n_val = min(len(dev) - 1, max(1, n_val))
    for k in rng.choice(len(dev), size=n_val, replace=False):
        dev[int(k)].split = "val"
    for split in ("train", "val", "eval"):
        _ensure_coverage(clips, split, n_classes, rng)
    return uploaders, clips, n_dev_uploaders


def write_csv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    """Rows (and a header row, unless None) as CSV with FSD50K's line ends."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)


def _clip_info(uploader: _Uploader, labels: list[str], number: int) -> dict[str, object]:
    words = [w.lower() for label in labels for w in label.replace("(", "").replace(")", "").split("_")]
    spoken = " and ".join(label.replace("_", " ").lower() for label in labels)
    return {
        "title": f"{labels[0].lower()}_{number:03d}.wav",
        "description": f"Synthetic {spoken}, recorded by {uploader.name}.",
        "tags": sorted({w for w in words if w not in ("and", "or")} | {"synthetic"}),
        "license": uploader.license,
        "uploader": uploader.name,
    }


@contextmanager
def staged_tree(out: Path) -> Iterator[Path]:
    """A folder to write a corpus tree into, moved to ``out`` only when the block completes (removed if it
    fails). ``out`` must not exist or be an empty directory: DataError otherwise, before anything is written."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: already exists and is not an empty directory; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():  # left behind by an interrupted run
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def synthesize_corpus(
    out: Path,
    n_clips: int = 600,
    n_uploaders: int = 60,
    n_classes: int = 10,
    seed: int = 0,
    eval_fraction: float = 0.2,
    val_fraction: float = 0.1,
    progress: bool = True,
) -> SynthSummary:
    """Write a synthetic corpus in FSD50K's release layout under ``out`` and summarise it.

    Classes are the first ``n_classes`` entries of :data:`SYNTH_VOCABULARY`; the defaults give about
    35 minutes of audio. Eval uploaders are disjoint from dev uploaders; dev is split into train and val
    by clip. Every class occurs in train, val and eval whenever that split has at least ``n_classes`` clips.
    ``out`` must not exist or be an empty directory; the corpus is written to ``.<out name>.partial`` beside
    it and moved into place only when complete. Raises ConfigError for impossible sizes and DataError for
    an unusable ``out``.
    """
    out = Path(out)
    _validate(n_clips, n_uploaders, n_classes, eval_fraction, val_fraction)
    uploaders, clips, n_dev_uploaders = _plan(
        n_clips, n_uploaders, n_classes, seed, eval_fraction, val_fraction
    )
    # The plan labels rows of the table; FSD50K's vocabulary.csv is sorted by label, so re-index.
    order = sorted(range(n_classes), key=lambda row: SYNTH_VOCABULARY[row].label)
    chosen = [SYNTH_VOCABULARY[row] for row in order]
    position = {row: i for i, row in enumerate(order)}
    for clip in clips:
        clip.labels = [position[row] for row in clip.labels]

    with staged_tree(out) as staging:
        _write_tree(staging, clips, uploaders, chosen, seed, progress)

    dev = [c for c in clips if c.split != "eval"]
    return SynthSummary(
        out=out,
        n_dev=len(dev),
        n_eval=len(clips) - len(dev),
        n_uploaders_dev=n_dev_uploaders,
        n_uploaders_eval=n_uploaders - n_dev_uploaders,
        classes=[c.label for c in chosen],
        audio_seconds=sum(2 * c.samples for c in clips) / OUTPUT_RATE,
    )


def _write_tree(
    root: Path,
    clips: list[_Clip],
    uploaders: list[_Uploader],
    vocabulary: list[SynthClass],
    seed: int,
    progress: bool,
) -> None:
    audio_dirs = {"dev": root / "FSD50K.dev_audio", "eval": root / "FSD50K.eval_audio"}
    truth, meta = root / "FSD50K.ground_truth", root / "FSD50K.metadata"
    for folder in (*audio_dirs.values(), truth, meta):
        folder.mkdir(parents=True)

    rows: dict[str, list[list[str]]] = {"dev": [], "eval": []}
    infos: dict[str, dict[str, dict[str, object]]] = {"dev": {}, "eval": {}}
    per_uploader = np.zeros(len(uploaders), dtype=int)
    for index, clip in enumerate(tqdm(clips, desc="synth clips", unit="clip", disable=not progress)):
        rng = np.random.default_rng([seed, 2, index])
        uploader = uploaders[clip.uploader]
        dry = np.zeros(clip.samples)
        for rank, lab in enumerate(clip.labels):
            level = 1.0 if rank == 0 else rng.uniform(0.5, 1.0)
            dry += level * _peak_normalise(vocabulary[lab].sound.render(clip.samples, SYNTH_RATE, rng))
        audio = _record(_peak_normalise(dry), uploader, rng)
        group = "eval" if clip.split == "eval" else "dev"
        pcm = np.round(audio * 32767.0).astype(np.int16)
        sf.write(audio_dirs[group] / f"{clip.fname}.wav", pcm, OUTPUT_RATE, subtype="PCM_16", format="WAV")

        names = [vocabulary[lab].label for lab in clip.labels]
        row = [str(clip.fname), ",".join(names), ",".join(vocabulary[lab].mid for lab in clip.labels)]
        rows[group].append(row + ([clip.split] if group == "dev" else []))
        per_uploader[clip.uploader] += 1
        infos[group][str(clip.fname)] = _clip_info(uploader, names, int(per_uploader[clip.uploader]))

    by_fname = {group: sorted(group_rows, key=lambda r: int(r[0])) for group, group_rows in rows.items()}
    write_csv(truth / "dev.csv", ["fname", "labels", "mids", "split"], by_fname["dev"])
    write_csv(truth / "eval.csv", ["fname", "labels", "mids"], by_fname["eval"])
    write_csv(truth / "vocabulary.csv", None, [[str(i), c.label, c.mid] for i, c in enumerate(vocabulary)])
    for group in ("dev", "eval"):
        with (meta / f"{group}_clips_info_FSD50K.json").open("w", encoding="utf-8") as handle:
            json.dump(infos[group], handle, sort_keys=True, indent=4)
            handle.write("\n")

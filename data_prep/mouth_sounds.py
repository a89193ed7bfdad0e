"""Synthetic mouth sounds and aggressors: enrollment takes, background material and labelled test streams.

Five sounds a person may use as triggers (as with parrot.py or Talon, and in Lea et al.): ``pop`` (lip pop: a
damped low-mid resonance with a thump), ``click`` (tongue click: a sharp transient exciting high resonances),
``hiss`` (a sustained band of noise), ``hum`` (a nasal "mm": harmonic tone with a low-pass nasal spectrum) and
``whistle`` (a tone with glide, vibrato and breath noise). A :class:`Voice` holds how one person makes them
(pitch, resonances, noise band, brightness); every take varies around it in pitch, length, level and timbre.

Aggressors are what must not trigger: speech-like utterances (a glottal pulse train through vowel formants,
with plosive bursts, fricatives and nasals, which resemble pops, hisses and hums) and noise (room, fan with
mains hum, traffic rumble, babble of several voices).

Test streams place mouth sounds at known onsets between aggressor clips over a continuous noise floor;
aggressor-only streams hold no mouth sound at all. Everything is seeded (a seed or a numpy Generator), and
the same seed gives the same samples. Audio is float32, mono, at ``sample_rate`` (16 kHz by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft
from scipy import signal

SOUNDS = ("pop", "click", "hiss", "hum", "whistle")
SAMPLE_RATE = 16000
VOWELS = ((730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240),
          (660, 1720, 2410), (490, 1350, 1690))  # (F1, F2, F3) in Hz of a, e, i, o, u, ae, er
NOISE_BEDS = ("room", "fan", "traffic", "babble")
LOUD_ROOM_FRACTION = 0.5  # of corpus takes recorded over a test-like room floor

Seed = int | np.random.Generator


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def db_to_gain(db: float) -> float:
    """Amplitude factor of ``db`` decibels."""
    return float(10.0 ** (db / 20.0))


@dataclass(frozen=True)
class Voice:
    """How one person makes each sound and speaks: the centre of every parameter a take varies around."""

    f0: float  # speaking and humming pitch, Hz
    pop_hz: float  # lip-pop cavity resonance
    click_hz: tuple[float, float]  # two tongue-click resonances
    hiss_hz: float  # centre of the hiss noise band
    hiss_width: float  # relative width of the band
    whistle_hz: float
    formant_scale: float  # vocal tract length factor applied to the vowel formants
    brightness: float  # 0 (dull) .. 1 (bright): spectral tilt of voiced sounds, noise mix of transients


def make_voice(seed: Seed) -> Voice:
    """A random person (seeded)."""
    rng = _rng(seed)
    low_voice = rng.random() < 0.5
    return Voice(
        f0=float(rng.uniform(85, 150) if low_voice else rng.uniform(160, 250)),
        pop_hz=float(rng.uniform(300, 900)),
        click_hz=(float(rng.uniform(1400, 2600)), float(rng.uniform(2800, 4500))),
        hiss_hz=float(rng.uniform(4000, 6500)),
        hiss_width=float(rng.uniform(0.3, 0.6)),
        whistle_hz=float(rng.uniform(900, 2600)),
        formant_scale=float(rng.uniform(0.9, 1.0) if low_voice else rng.uniform(1.05, 1.2)),
        brightness=float(rng.uniform(0.2, 0.8)),
    )


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def _ramps(n: int, rate: int, attack_s: float, release_s: float) -> np.ndarray:
    """Raised-cosine attack and release over ``n`` samples."""
    env = np.ones(n)
    a = min(n // 2, max(1, int(attack_s * rate)))
    r = min(n - a, max(1, int(release_s * rate)))
    env[:a] = 0.5 - 0.5 * np.cos(np.pi * np.arange(a) / a)
    env[n - r :] = 0.5 + 0.5 * np.cos(np.pi * np.arange(1, r + 1) / r)
    return env


def _shaped_noise(rng: np.random.Generator, n: int, rate: int, low: float, high: float, tilt: float = 0.0
                  ) -> np.ndarray:
    """White noise band-limited to [low, high] Hz (smooth edges) with a spectral tilt of ``tilt`` dB/octave."""
    size = sfft.next_fast_len(max(n, 16), real=True)
    spectrum = sfft.rfft(rng.standard_normal(size))
    freqs = np.fft.rfftfreq(size, 1.0 / rate)
    f = np.maximum(freqs, 1.0)
    gain = 1.0 / (1.0 + (low / f) ** 8) / (1.0 + (f / max(high, 1.0)) ** 8)
    if tilt:
        gain = gain * (f / 1000.0) ** (tilt / 6.02)
    out = sfft.irfft(spectrum * gain, size)[:n]
    return out / (np.std(out) + 1e-12)


def _colored_noise(rng: np.random.Generator, n: int, rate: int, exponent: float) -> np.ndarray:
    """Noise with power spectrum ``1 / f**exponent`` (1: pink, 2: brown) above 20 Hz, unit RMS."""
    size = sfft.next_fast_len(max(n, 16), real=True)
    spectrum = sfft.rfft(rng.standard_normal(size))
    f = np.maximum(np.fft.rfftfreq(size, 1.0 / rate), 20.0)
    out = sfft.irfft(spectrum / f ** (exponent / 2.0), size)[:n]
    return out / (np.std(out) + 1e-12)


def _harmonic_tone(freq: np.ndarray, rate: int, amplitudes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sum of harmonics k*freq(t) with ``amplitudes[k-1]``, partials above 0.45 * rate left out."""
    phase = 2 * np.pi * np.cumsum(freq) / rate
    out = np.zeros_like(phase)
    top = float(np.max(freq))
    for k, amp in enumerate(amplitudes, start=1):
        if k * top >= 0.45 * rate:
            break
        out += amp * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out


def _resonator(x: np.ndarray, rate: int, freq: float, bandwidth: float) -> np.ndarray:
    """Second-order resonance (a formant) at ``freq`` Hz, unity gain at that frequency."""
    r = np.exp(-np.pi * bandwidth / rate)
    theta = 2 * np.pi * min(freq, 0.45 * rate) / rate
    a = [1.0, -2 * r * np.cos(theta), r * r]
    return signal.lfilter([1.0 - r], a, x)


def _damped(rng: np.random.Generator, n: int, rate: int, freq: float, decay_s: float, chirp: float = 0.0
            ) -> np.ndarray:
    t = np.arange(n) / rate
    inst = freq * (1.0 + chirp * t / max(t[-1], 1e-9))
    return np.sin(2 * np.pi * np.cumsum(inst) / rate + rng.uniform(0, 2 * np.pi)) * np.exp(-t / decay_s)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / (np.max(np.abs(x)) + 1e-12)


# ----------------------------------------------------------------------------------------------------------
# Mouth sounds


def _pop(rng: np.random.Generator, voice: Voice, rate: int) -> np.ndarray:
    n = int(rng.uniform(0.05, 0.1) * rate)
    t = np.arange(n) / rate
    body = _damped(rng, n, rate, voice.pop_hz * rng.uniform(0.85, 1.15), rng.uniform(0.008, 0.02),
                   chirp=-rng.uniform(0.1, 0.35))
    thump = _damped(rng, n, rate, rng.uniform(70, 150), rng.uniform(0.01, 0.025))
    burst = _shaped_noise(rng, n, rate, 200, 3000) * np.exp(-t / rng.uniform(0.002, 0.005))
    mix = body + rng.uniform(0.3, 0.8) * thump + (0.1 + 0.4 * voice.brightness) * rng.uniform(0.5, 1.5) * burst
    return _normalise(mix * _ramps(n, rate, 0.0005, 0.01))


def _click(rng: np.random.Generator, voice: Voice, rate: int) -> np.ndarray:
    n = int(rng.uniform(0.03, 0.06) * rate)
    t = np.arange(n) / rate
    low, high = voice.click_hz
    mix = (_damped(rng, n, rate, low * rng.uniform(0.9, 1.1), rng.uniform(0.003, 0.008))
           + rng.uniform(0.4, 1.0) * _damped(rng, n, rate, high * rng.uniform(0.9, 1.1), rng.uniform(0.002, 0.006)))
    snap = _shaped_noise(rng, n, rate, 1000, 7000) * np.exp(-t / rng.uniform(0.0007, 0.002))
    mix += (0.3 + 0.6 * voice.brightness) * rng.uniform(0.6, 1.4) * snap
    return _normalise(mix * _ramps(n, rate, 0.0002, 0.005))


def _hiss(rng: np.random.Generator, voice: Voice, rate: int) -> np.ndarray:
    n = int(rng.uniform(0.3, 0.9) * rate)
    centre = voice.hiss_hz * rng.uniform(0.9, 1.1)
    half = centre * voice.hiss_width * rng.uniform(0.8, 1.2) / 2
    noise = _shaped_noise(rng, n, rate, centre - half, min(centre + half, 0.47 * rate))
    t = np.arange(n) / rate
    tremolo = 1.0 + rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 6.3))
    env = _ramps(n, rate, rng.uniform(0.015, 0.05), rng.uniform(0.03, 0.12))
    return _normalise(noise * tremolo * env)


def _contour(rng: np.random.Generator, n: int, depth: float) -> np.ndarray:
    shape = rng.integers(3)
    x = np.linspace(0.0, 1.0, n)
    if shape == 0:
        return np.ones(n)
    return 1.0 + depth * (x if shape == 1 else -x)


def _hum(rng: np.random.Generator, voice: Voice, rate: int) -> np.ndarray:
    n = int(rng.uniform(0.3, 1.0) * rate)
    f0 = voice.f0 * rng.uniform(0.85, 1.2) * _contour(rng, n, rng.uniform(0.03, 0.12))
    f0 = f0 * (1.0 + 0.004 * _colored_noise(rng, n, rate, 2.0))  # jitter
    rolloff = rng.uniform(1.6, 2.6) - voice.brightness
    amps = 1.0 / np.arange(1, 40) ** rolloff
    tone = _harmonic_tone(f0, rate, amps, rng)
    nasal = _resonator(tone, rate, rng.uniform(220, 320), 80) + 0.2 * _resonator(tone, rate, 2200, 300)
    env = _ramps(n, rate, rng.uniform(0.02, 0.06), rng.uniform(0.04, 0.12))
    return _normalise(nasal * env)


def _whistle(rng: np.random.Generator, voice: Voice, rate: int) -> np.ndarray:
    n = int(rng.uniform(0.25, 1.0) * rate)
    t = np.arange(n) / rate
    glide = _contour(rng, n, rng.uniform(0.05, 0.2))
    vibrato = 1.0 + rng.uniform(0.0, 0.02) * np.sin(2 * np.pi * rng.uniform(4, 7) * t)
    freq = voice.whistle_hz * rng.uniform(0.85, 1.2) * glide * vibrato
    tone = _harmonic_tone(freq, rate, np.array([1.0, rng.uniform(0.0, 0.1)]), rng)
    breath = _shaped_noise(rng, n, rate, 0.7 * float(freq.mean()), 1.4 * float(freq.mean()))
    mix = tone + db_to_gain(rng.uniform(-32, -18)) * breath
    return _normalise(mix * _ramps(n, rate, rng.uniform(0.02, 0.05), rng.uniform(0.02, 0.08)))


_SOUND_MAKERS = {"pop": _pop, "click": _click, "hiss": _hiss, "hum": _hum, "whistle": _whistle}


def mouth_sound(kind: str, voice: Voice, seed: Seed, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One take of ``kind`` (one of :data:`SOUNDS`) by ``voice``, peak-normalised to 1 (float64)."""
    if kind not in _SOUND_MAKERS:
        raise ValueError(f"unknown mouth sound {kind!r} (known: {', '.join(SOUNDS)})")
    return _SOUND_MAKERS[kind](_rng(seed), voice, sample_rate)


# ----------------------------------------------------------------------------------------------------------
# Aggressors


def _glottal(rng: np.random.Generator, f0: np.ndarray, rate: int, brightness: float) -> np.ndarray:
    """Glottal pulse train at the pitch track ``f0`` with a -6 dB/octave tilt (brightness raises it)."""
    phase = np.cumsum(f0 / rate) + rng.uniform(0, 1)
    pulses = np.diff(np.floor(phase), prepend=np.floor(phase[0])).astype(np.float64)
    pole = 0.98 - 0.1 * brightness
    return signal.lfilter([1.0, -1.0], [1.0, -2 * pole, pole * pole], pulses)


def _vowel(rng: np.random.Generator, source: np.ndarray, rate: int, scale: float) -> np.ndarray:
    formants = VOWELS[rng.integers(len(VOWELS))]
    out = source
    for k, formant in enumerate(formants):
        out = _resonator(out, rate, formant * scale * rng.uniform(0.93, 1.07), 60 + 40 * k)
    return out


def _consonant(rng: np.random.Generator, kind: str, n: int, rate: int, source: np.ndarray) -> np.ndarray:
    t = np.arange(n) / rate
    if kind == "fricative":
        low, high = [(3500, 7500), (2000, 4500), (1000, 7500)][rng.integers(3)]
        noise = _shaped_noise(rng, n, rate, low * rng.uniform(0.9, 1.1), min(high, 0.47 * rate))
        return rng.uniform(0.2, 0.5) * noise * _ramps(n, rate, 0.01, 0.01)
    if kind == "plosive":
        low, high = [(300, 1500), (2500, 6000), (1200, 3000)][rng.integers(3)]
        closure = int(rng.uniform(0.02, 0.05) * rate)
        burst = _shaped_noise(rng, n, rate, low, high) * np.exp(-np.maximum(t - closure / rate, 0) / 0.006)
        burst[:closure] = 0.0
        return rng.uniform(0.3, 0.8) * burst
    # nasal: the voiced source through a low nasal resonance
    return rng.uniform(0.3, 0.7) * _resonator(source[:n], rate, rng.uniform(220, 350), 90) * _ramps(n, rate, .01, .01)


def speech_like(voice: Voice, seconds: float, seed: Seed, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """An utterance of about ``seconds`` by ``voice``: words of 1-3 syllables (consonant + vowel) and pauses.

    Peak-normalised to 1. Consonants are plosive bursts, fricatives and nasals, the speech parts most like
    pops, hisses and hums.
    """
    rng = _rng(seed)
    rate = sample_rate
    total = max(int(seconds * rate), int(0.2 * rate))
    # Pitch: declination over the utterance plus slow wander.
    decline = np.linspace(1.1, 0.9, total) * (1.0 + 0.06 * _colored_noise(rng, total, rate, 2.0))
    source = _glottal(rng, voice.f0 * rng.uniform(0.9, 1.1) * decline, rate, voice.brightness)
    out = np.zeros(total)
    pos = int(rng.uniform(0.0, 0.05) * rate)
    while pos < total - int(0.1 * rate):
        for _ in range(int(rng.integers(1, 4))):  # syllables of one word
            if rng.random() < 0.75:
                kind = ("plosive", "fricative", "nasal")[rng.integers(3)]
                n = int(rng.uniform(0.05, 0.14) * rate)
                end = min(pos + n, total)
                if end - pos > 16:
                    out[pos:end] += _consonant(rng, kind, end - pos, rate, source[pos:end])
                pos = end
            n = int(rng.uniform(0.08, 0.22) * rate)
            end = min(pos + n, total)
            if end - pos > 16:
                vowel = _vowel(rng, source[pos:end], rate, voice.formant_scale)
                out[pos:end] += vowel / (np.std(vowel) + 1e-12) * 0.3 * _ramps(end - pos, rate, 0.015, 0.02)
            pos = end
        pos += int(rng.uniform(0.03, 0.3) * rate)  # pause between words
    return _normalise(out)


def noise_bed(kind: str, n: int, seed: Seed, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``n`` samples of a continuous noise aggressor at unit RMS: room, fan (with mains hum), traffic, babble."""
    rng = _rng(seed)
    rate = sample_rate
    if kind == "room":
        return _colored_noise(rng, n, rate, rng.uniform(0.8, 1.3))
    if kind == "fan":
        mains = rng.choice([50.0, 60.0])
        out = _colored_noise(rng, n, rate, rng.uniform(0.5, 1.5))
        out += _harmonic_tone(np.full(n, mains), rate, rng.uniform(0.1, 0.6, 6) / np.arange(1, 7), rng)
        blade = _shaped_noise(rng, n, rate, 200, 2000)
        t = np.arange(n) / rate
        out += 0.3 * blade * (1 + 0.5 * np.sin(2 * np.pi * rng.uniform(10, 30) * t))
        return out / (np.std(out) + 1e-12)
    if kind == "traffic":
        out = _shaped_noise(rng, n, rate, 20, rng.uniform(300, 900), tilt=-3.0)
        t = np.arange(n) / rate
        swell = 1.0 + 0.8 * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t + rng.uniform(0, 6.3))
        return out * swell / (np.std(out * swell) + 1e-12)
    if kind == "babble":
        out = np.zeros(n)
        for _ in range(int(rng.integers(3, 7))):
            talker = speech_like(make_voice(rng), n / rate, rng, rate)[:n]
            out[: len(talker)] += talker
        return out / (np.std(out) + 1e-12)
    raise ValueError(f"unknown noise bed {kind!r} (known: {', '.join(NOISE_BEDS)})")


# ----------------------------------------------------------------------------------------------------------
# Takes and streams


@dataclass
class Stream:
    """Audio with its ground truth: mouth-sound events and aggressor clips, each ``(label, start_s, end_s)``."""

    wave: np.ndarray
    sample_rate: int
    events: list[tuple[str, float, float]] = field(default_factory=list)
    aggressors: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Length in seconds."""
        return len(self.wave) / self.sample_rate


def _floor(rng: np.random.Generator, n: int, rate: int, quiet: bool) -> np.ndarray:
    """The noise floor of a room: pink-ish noise, sometimes with a fan or traffic under it."""
    floor = noise_bed("room", n, rng, rate) * db_to_gain(rng.uniform(-66, -56) if quiet else rng.uniform(-62, -50))
    if not quiet and rng.random() < 0.5:
        kind = ("fan", "traffic")[rng.integers(2)]
        floor += noise_bed(kind, n, rng, rate) * db_to_gain(rng.uniform(-60, -46))
    return floor


def _take(kind: str, voice: Voice, rng: np.random.Generator, sample_rate: int, seconds: float,
          peak_db: tuple[float, float], quiet: bool) -> Stream:
    """Silence over a room floor, one mouth sound at a peak level drawn from ``peak_db``, silence."""
    sound = mouth_sound(kind, voice, rng, sample_rate) * db_to_gain(rng.uniform(*peak_db))
    n = int(seconds * sample_rate)
    if len(sound) > n - int(0.6 * sample_rate):
        raise ValueError(f"a {seconds} s take is too short for a {len(sound) / sample_rate:.2f} s {kind}")
    wave = _floor(rng, n, sample_rate, quiet=quiet)
    start = int(rng.uniform(0.4 * sample_rate, n - len(sound) - 0.2 * sample_rate))
    wave[start : start + len(sound)] += sound
    events = [(kind, start / sample_rate, (start + len(sound)) / sample_rate)]
    return Stream(wave.astype(np.float32), sample_rate, events)


def enrollment_take(kind: str, voice: Voice, seed: Seed, sample_rate: int = SAMPLE_RATE, seconds: float = 2.0
                    ) -> Stream:
    """A recording of one mouth sound in a quiet room: silence, the sound (peak -24..-6 dBFS), silence."""
    return _take(kind, voice, _rng(seed), sample_rate, seconds, (-24, -6), quiet=True)


def corpus_take(kind: str, voice: Voice, seed: Seed, sample_rate: int = SAMPLE_RATE, seconds: float = 2.0
                ) -> Stream:
    """A take of one mouth sound as a many-voice corpus holds it (peak -26..-6 dBFS, as in the test streams):
    half of them recorded in a quiet room, half over a room floor like the test streams' (louder, sometimes
    a fan or traffic under it)."""
    rng = _rng(seed)
    quiet = rng.random() >= LOUD_ROOM_FRACTION
    return _take(kind, voice, rng, sample_rate, seconds, (-26, -6), quiet=quiet)


def background_take(voice: Voice, seed: Seed, sample_rate: int = SAMPLE_RATE, seconds: float = 20.0) -> Stream:
    """Background material of a user: their room with its noises (sometimes a television), their own speech."""
    rng = _rng(seed)
    n = int(seconds * sample_rate)
    wave = _floor(rng, n, sample_rate, quiet=False)
    aggressors = []
    if rng.random() < 0.3:  # a television or other people talking in the room
        wave += noise_bed("babble", n, rng, sample_rate) * db_to_gain(rng.uniform(-45, -30))
        aggressors.append(("babble", 0.0, seconds))
    pos = int(rng.uniform(0.2, 1.0) * sample_rate)
    while pos < n - sample_rate:
        length = min(rng.uniform(1.0, 4.0), (n - pos) / sample_rate - 0.1)
        talker = voice if rng.random() < 0.7 else make_voice(rng)
        utterance = speech_like(talker, length, rng, sample_rate) * db_to_gain(rng.uniform(-26, -8))
        wave[pos : pos + len(utterance)] += utterance
        aggressors.append(("speech", pos / sample_rate, (pos + len(utterance)) / sample_rate))
        pos += len(utterance) + int(rng.uniform(0.3, 2.0) * sample_rate)
    return Stream(wave.astype(np.float32), sample_rate, [], aggressors)


def recorded_in_room(recording: np.ndarray, kind: str, seed: Seed, sample_rate: int = SAMPLE_RATE,
                     peak_db: tuple[float, float] = (-28.0, -6.0)) -> Stream:
    """A recording (real speech or music at ``sample_rate``, peak 1) played in a user's room: at a peak level drawn
    from ``peak_db`` over a room floor; the whole recording is one aggressor clip of ``kind``."""
    rng = _rng(seed)
    wave = _floor(rng, len(recording), sample_rate, quiet=False) + recording * db_to_gain(rng.uniform(*peak_db))
    return Stream(wave.astype(np.float32), sample_rate, [], [(kind, 0.0, len(recording) / sample_rate)])


def _aggressor_clip(rng: np.random.Generator, voice: Voice, rate: int) -> tuple[str, np.ndarray]:
    """A speech utterance (the user or someone else) or a stretch of babble, fan or traffic noise."""
    choice = rng.random()
    if choice < 0.6:
        talker = voice if rng.random() < 0.5 else make_voice(rng)
        return "speech", speech_like(talker, rng.uniform(0.8, 4.0), rng, rate) * db_to_gain(rng.uniform(-28, -6))
    kind = NOISE_BEDS[1 + rng.integers(3)]
    n = int(rng.uniform(1.0, 5.0) * rate)
    clip = noise_bed(kind, n, rng, rate) * db_to_gain(rng.uniform(-40, -22)) * _ramps(n, rate, 0.2, 0.2)
    return kind, clip


def make_test_stream(voice: Voice, events_per_sound: int, seed: Seed, sounds: tuple[str, ...] = SOUNDS,
                sample_rate: int = SAMPLE_RATE, aggressors_per_event: float = 1.0) -> Stream:
    """Mouth sounds (peak -26..-6 dBFS) at known onsets, interleaved with aggressor clips, over a noise floor.

    Sounds and aggressor clips do not overlap; gaps of 0.4 to 1.5 s lie between them.
    """
    rng = _rng(seed)
    rate = sample_rate
    items: list[tuple[str, np.ndarray, bool]] = []
    for kind in sounds:
        for _ in range(events_per_sound):
            items.append((kind, mouth_sound(kind, voice, rng, rate) * db_to_gain(rng.uniform(-26, -6)), True))
    for _ in range(int(round(aggressors_per_event * len(items)))):
        kind, clip = _aggressor_clip(rng, voice, rate)
        items.append((kind, clip, False))
    order = rng.permutation(len(items))
    gaps = (rng.uniform(0.4, 1.5, len(items) + 1) * rate).astype(int)
    n = int(sum(len(items[i][1]) for i in order) + gaps.sum())
    wave = _floor(rng, n, rate, quiet=False)
    events, aggressors = [], []
    pos = int(gaps[0])
    for gap, i in zip(gaps[1:], order, strict=True):
        label, clip, is_event = items[i]
        wave[pos : pos + len(clip)] += clip
        (events if is_event else aggressors).append((label, pos / rate, (pos + len(clip)) / rate))
        pos += len(clip) + int(gap)
    return Stream(wave.astype(np.float32), rate, events, aggressors)


def make_aggressor_stream(voice: Voice, seconds: float, seed: Seed, sample_rate: int = SAMPLE_RATE) -> Stream:
    """``seconds`` of aggressors only (speech, babble, fan, traffic over a noise floor): no mouth sound."""
    rng = _rng(seed)
    rate = sample_rate
    n = int(seconds * rate)
    wave = _floor(rng, n, rate, quiet=False)
    aggressors = []
    pos = int(rng.uniform(0.1, 0.5) * rate)
    while pos < n:
        kind, clip = _aggressor_clip(rng, voice, rate)
        clip = clip[: n - pos]
        wave[pos : pos + len(clip)] += clip
        aggressors.append((kind, pos / rate, (pos + len(clip)) / rate))
        pos += len(clip) + int(rng.uniform(0.1, 1.0) * rate)
    return Stream(wave.astype(np.float32), rate, [], aggressors)

"""``fedsound enroll``: record or import a user's examples of a sound, or background material, into a profile.

Frame labels follow Lea et al.: the take's frame energy (25 ms windows every 10 ms, frame ``t`` centred on
``t * 10 ms`` like the frontend's frames, in dB) is compared with its mean plus one standard deviation; runs of
frames above it lasting at least 30 ms carry the sound, every other frame is background. Dips shorter than
30 ms inside a sound are bridged first, so one sound gives one segment.

A take is rejected, with a message saying why and what to do, when it is

* not audio: NaN or infinite samples, or samples far beyond full scale (:func:`fl.audio.sample_problem`);
* silent: its peak is below -60 dBFS, no segment stands out, or the sound is less than 10 dB above the
  take's median frame energy;
* clipped: at least 3 consecutive samples at full scale (|x| >= 0.999).

Background takes are only checked for clipping and for a dead input (all zeros). Recording (the optional
package sounddevice, ``fedsound[mic]``) counts down, shows a level meter while it records, and asks for a
take again (up to ``RETRIES`` times) when it was rejected. Imported files are all checked before any is
stored: one bad file rejects the import with a one-line error naming it. Nothing here uses the network.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from clients.detector.audio_input import AudioInputError, MicSource, open_input_stream, read_mono
from clients.detector.profile import Profile, Take, check_sound_name
from fl.audio import sample_problem
from fl.config import PersonalizeConfig
from fl.errors import FedsoundError
from fl.locks import exclusive

RECORD_RATE = 16000
HOP_S = 0.010
WINDOW_S = 0.025
MIN_SEGMENT_S = 0.030
SILENT_PEAK_DBFS = -60.0
MIN_SOUND_DB = 10.0
CLIP_LEVEL = 0.999
CLIP_RUN = 3
MIN_EXAMPLES = PersonalizeConfig().min_examples
SOUND_TAKE_S = 2.0
BACKGROUND_TAKE_S = 10.0
RETRIES = 3
METER_WIDTH = 30
_ENERGY_FLOOR = 1e-12


class EnrollError(FedsoundError):
    """Enrollment cannot proceed: a rejected take, an unreadable file, no microphone, bad arguments."""


class TakeRejected(EnrollError):
    """A take is silent or clipped; the message says which and what to do."""


StreamOpener = Callable[[int, int], MicSource]  # (sample_rate, block_size) -> blocks at sample_rate


def frame_energy_db(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Energy in dB of 25 ms frames every 10 ms, frame ``t`` centred on sample ``t * hop`` (zero-padded)."""
    hop = int(round(HOP_S * sample_rate))
    window = int(round(WINDOW_S * sample_rate))
    wave = np.asarray(wave, dtype=np.float64)
    n_frames = 1 + len(wave) // hop
    power = np.concatenate(([0.0], np.cumsum(wave * wave)))
    centres = np.arange(n_frames) * hop
    lo = np.clip(centres - window // 2, 0, len(wave))
    hi = np.clip(centres - window // 2 + window, 0, len(wave))
    return 10.0 * np.log10((power[hi] - power[lo]) / window + _ENERGY_FLOOR)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of every run of True in a boolean vector."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def segments_from_energy(energy_db: np.ndarray) -> list[tuple[int, int]]:
    """Frame runs ``[start, stop)`` of the sound: energy above mean + one standard deviation, dips shorter
    than 30 ms bridged, runs shorter than 30 ms dropped."""
    energy_db = np.asarray(energy_db, dtype=np.float64)
    above = energy_db > energy_db.mean() + energy_db.std()
    min_frames = int(round(MIN_SEGMENT_S / HOP_S))
    for start, stop in _runs(~above):
        if stop - start < min_frames and start > 0 and stop < len(above):
            above[start:stop] = True
    return [(start, stop) for start, stop in _runs(above) if stop - start >= min_frames]


def energy_segments(wave: np.ndarray, sample_rate: int) -> list[tuple[float, float]]:
    """Lea et al.'s energy labels of a take: ``[(onset_s, offset_s), ...]`` of the frames that carry the sound.

    Frame ``t`` spans ``[t * 10 ms, (t + 1) * 10 ms)`` in the result.
    """
    return [(start * HOP_S, stop * HOP_S) for start, stop in segments_from_energy(frame_energy_db(wave, sample_rate))]


def _clipped_samples(wave: np.ndarray) -> int:
    """Samples in runs of at least ``CLIP_RUN`` consecutive samples at full scale."""
    return sum(stop - start for start, stop in _runs(np.abs(wave) >= CLIP_LEVEL) if stop - start >= CLIP_RUN)


def check_take(wave: np.ndarray, sample_rate: int, where: str, background: bool = False
               ) -> list[tuple[float, float]]:
    """The take's sound segments (none for background); raises TakeRejected naming ``where`` if unusable."""
    wave = np.asarray(wave, dtype=np.float64)
    problem = sample_problem(wave)
    if problem:
        raise TakeRejected(f"{where}: rejected: {problem}; the input device or file is broken")
    if wave.ndim != 1 or len(wave) < int(0.1 * sample_rate):
        raise TakeRejected(f"{where}: rejected: too short ({len(wave) / sample_rate:.2f} s; at least 0.1 s)")
    clipped = _clipped_samples(wave)
    if clipped:
        raise TakeRejected(f"{where}: rejected: clipped ({clipped} samples at full scale); record it again "
                           "further from the microphone or at a lower input level")
    peak = float(np.max(np.abs(wave)))
    if background:
        if peak == 0.0:
            raise TakeRejected(f"{where}: rejected: silent (all samples are zero); is the microphone muted?")
        return []
    peak_db = 20.0 * np.log10(max(peak, 1e-10))
    if peak_db < SILENT_PEAK_DBFS:
        raise TakeRejected(f"{where}: rejected: silent (peak {peak_db:.0f} dBFS); make the sound closer to "
                           "the microphone or raise the input level")
    segments = energy_segments(wave, sample_rate)
    energy = frame_energy_db(wave, sample_rate)
    loudest = max((energy[int(round(a / HOP_S)) : int(round(b / HOP_S))].max() for a, b in segments),
                  default=-np.inf)
    above_db = loudest - float(np.median(energy))
    if not segments or above_db < MIN_SOUND_DB:
        level = "" if not segments else f" (only {above_db:.0f} dB above the background)"
        raise TakeRejected(f"{where}: rejected: silent: no sound stands out of the background{level}; "
                           "leave quiet before and after the sound and make it louder")
    return segments


def read_take_file(path: Path) -> tuple[np.ndarray, int]:
    """A file's samples mixed to mono (float32) and its rate; a file that is not usable audio raises EnrollError
    naming it."""
    try:
        return read_mono(path)
    except AudioInputError as exc:
        raise EnrollError(str(exc)) from None


def import_files(paths: Sequence[Path], background: bool) -> list[Take]:
    """Read and check every file (all before any is stored); the first bad one raises naming it."""
    takes = []
    for path in paths:
        wave, rate = read_take_file(path)
        segments = check_take(wave, rate, str(path), background)
        takes.append(Take(wave, rate, segments, Path(path).name))
    return takes


def open_microphone(sample_rate: int, block_size: int) -> MicSource:
    """The default input device at its native rate, resampled to ``sample_rate``; a one-line error when
    sounddevice or a device is missing."""
    try:
        stream, rate = open_input_stream(block_size / sample_rate, alternative="import WAV files with --from-files")
    except AudioInputError as exc:
        raise EnrollError(str(exc)) from None
    return MicSource(stream, sample_rate, block_size, device_rate=rate)


def _meter(block: np.ndarray) -> str:
    peak = float(np.max(np.abs(block))) if len(block) else 0.0
    db = 20.0 * np.log10(max(peak, 1e-6))
    filled = int(round(METER_WIDTH * min(1.0, max(0.0, (db + 60.0) / 60.0))))
    flag = "  CLIPPING" if peak >= CLIP_LEVEL else ""
    return f"\r  [{'#' * filled}{'.' * (METER_WIDTH - filled)}] {db:6.1f} dBFS{flag}"


def record_take(open_stream: StreamOpener, seconds: float, sample_rate: int, out: TextIO, meter: bool
                ) -> np.ndarray:
    """Record ``seconds`` of mono audio, drawing a level meter on ``out`` every 100 ms when ``meter``; a take in
    which the input delivered samples that are not audio is rejected (TakeRejected)."""
    wanted = int(seconds * sample_rate)
    source = open_stream(sample_rate, int(0.1 * sample_rate))
    blocks = source.blocks()
    parts: list[np.ndarray] = []
    got = 0
    try:
        for block in blocks:
            parts.append(block[: wanted - got])
            got += len(parts[-1])
            if meter:
                print(_meter(parts[-1]), end="", file=out, flush=True)
            if got >= wanted:
                break
    finally:
        blocks.close()  # stops and closes the input stream
    if meter:
        print(file=out)
    if got < wanted:
        raise EnrollError(f"the microphone stream ended after {got / sample_rate:.2f} s of {seconds:.2f} s")
    if source.repaired:
        raise TakeRejected(f"rejected: {source.repaired} samples were NaN, infinite or far beyond full scale; the "
                           "input device is broken")
    return np.concatenate(parts)


def record_takes(count: int, seconds: float, open_stream: StreamOpener, background: bool, out: TextIO,
                 countdown_s: int, progress: bool, what: str) -> tuple[list[Take], list[str]]:
    """Guide the user through ``count`` takes; returns the accepted takes and the reasons of the given-up ones."""
    takes: list[Take] = []
    given_up: list[str] = []
    for number in range(1, count + 1):
        for attempt in range(1, RETRIES + 1):
            again = f" (attempt {attempt} of {RETRIES})" if attempt > 1 else ""
            print(f"take {number} of {count}: {what}{again}; recording {seconds:.1f} s in", end="", file=out,
                  flush=True)
            for tick in range(countdown_s, 0, -1):
                print(f" {tick}", end="", file=out, flush=True)
                time.sleep(1.0)
            print(" - now", file=out, flush=True)
            try:
                wave = record_take(open_stream, seconds, RECORD_RATE, out, meter=progress)
                segments = check_take(wave, RECORD_RATE, f"take {number}", background)
            except TakeRejected as exc:
                print(f"warning: {exc}", file=out, flush=True)
                if attempt == RETRIES:
                    given_up.append(str(exc))
                continue
            takes.append(Take(wave, RECORD_RATE, segments, "microphone"))
            break
    return takes, given_up


def enroll(
    profile: Path,
    sound: str | None = None,
    record: int | None = None,
    from_files: Sequence[Path] | None = None,
    background: bool = False,
    progress: bool = True,
    take_seconds: float | None = None,
    open_stream: StreamOpener | None = None,
    countdown_s: int = 3,
    out: TextIO | None = None,
) -> dict:
    """Add examples of ``sound`` (or background material with ``background=True``) to ``profile``.

    Exactly one of ``record`` (number of takes from the microphone, each ``take_seconds`` long: default 2 s
    for a sound, 10 s for background) and ``from_files`` (audio files, checked before any is stored).
    ``open_stream`` replaces the microphone (``(sample_rate, block_size) -> InputStream``-like); messages,
    the countdown and the level meter go to ``out`` (stderr). Returns a summary: ``added``, ``rejected``
    (reasons of takes given up), ``examples`` of this sound in the profile and ``needed`` (how many more
    make :data:`MIN_EXAMPLES`), or ``background_seconds``. The profile is locked meanwhile (``PROFILE.lock``
    beside it): a second enroll or personalize of the same profile is refused.
    """
    with exclusive(Path(profile), "profile", is_dir=False):
        return _enroll(Path(profile), sound, record, from_files, background, progress, take_seconds, open_stream,
                       countdown_s, out or sys.stderr)


def _enroll(profile: Path, sound: str | None, record: int | None, from_files: Sequence[Path] | None,
            background: bool, progress: bool, take_seconds: float | None, open_stream: StreamOpener | None,
            countdown_s: int, out: TextIO) -> dict:
    if (sound is None) == (not background):
        raise EnrollError("enroll: give either --sound NAME or --background")
    if (record is None) == (from_files is None):
        raise EnrollError("enroll: give either --record N or --from-files FILE...")
    if sound is not None:
        check_sound_name(sound)
    what = "background (room noise, your own speech)" if background else f"make the sound {sound!r} once"
    given_up: list[str] = []
    if record is not None:
        if record < 1:
            raise EnrollError(f"--record: number of takes must be at least 1, got {record}")
        seconds = take_seconds or (BACKGROUND_TAKE_S if background else SOUND_TAKE_S)
        opener = open_stream or open_microphone
        opener(RECORD_RATE, int(0.1 * RECORD_RATE)).stream.close()  # fail before the countdown when there is no mic
        takes, given_up = record_takes(record, seconds, opener, background, out, countdown_s, progress, what)
    else:
        if not from_files:
            raise EnrollError("--from-files: no files given")
        takes = import_files([Path(p) for p in from_files], background)
    store = Profile.open(Path(profile))
    added = store.add(None if background else sound, takes) if takes else []
    summary: dict = {"profile": str(profile), "sound": None if background else sound, "added": len(added),
                     "rejected": given_up}
    if background:
        summary["background_seconds"] = round(store.background_seconds, 2)
    else:
        count = store.counts().get(sound, 0)
        summary.update(examples=count, needed=max(0, MIN_EXAMPLES - count))
    return summary

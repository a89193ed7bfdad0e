"""A corpus of synthetic mouth sounds from many voices, in FSD50K's release layout.

What a federation of many users would hold, and what the global detector of Lea et al. was trained on: each
voice (:func:`data_prep.mouth_sounds.make_voice`) is one uploader, with a few takes of each mouth sound
(``pop``, ``click``, ``hiss``, ``hum``, ``whistle``: one label each; half in a quiet room, half over a louder
room floor, :func:`data_prep.mouth_sounds.corpus_take`) and clips of its background (its room, its
speech and other talkers, fan, traffic, babble: the label ``background``). Given the real recordings of
:mod:`data_prep.real_audio`, half of each voice's background clips are instead real speech or music of its
``train`` split played in the voice's room (:func:`data_prep.mouth_sounds.recorded_in_room`): no speaker of the
tuning or test splits is heard; :func:`real_background_patches` cuts the global bundle's real background patches
from the same split and the ``bank`` split's music, played the same way. Voices are split whole between
train, val and eval (one in ten each to val and eval), so a partition by uploader is a partition by voice.
Audio is written at 44.1 kHz, PCM_16, mono; ``fedsound data prep`` turns the tree into a feature store like
any FSD50K tree. The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from data_prep.fsd50k import AUDIO_DIRS, GROUND_TRUTH, METADATA
from data_prep.mouth_sounds import (
    SOUNDS,
    Stream,
    Voice,
    background_take,
    corpus_take,
    make_aggressor_stream,
    make_voice,
    recorded_in_room,
)
from data_prep.real_audio import RealAudio
from data_prep.synth import staged_tree, write_csv
from fl.config import FrontendConfig
from fl.errors import ConfigError
from fl.frontend import Frontend, cut_patches

RATE = 44100
BACKGROUND = "background"
LABELS = (*SOUNDS, BACKGROUND)
TAKE_SECONDS = 2.0
BACKGROUND_SECONDS = 4.0
# Peak level (dBFS) of a real recording played in a voice's room.
ROOM_PEAK_DB = {"speech": (-28.0, -6.0), "music": (-34.0, -8.0)}
# the global bundle's real negatives, in turn: half speech, half music of two genres
REAL_NEGATIVES = (("train", "speech"), ("train", "music"), ("train", "speech"), ("bank", "music"))
# bench personalize trains its global detector on a corpus of this size (about 14 hours of audio, 4.4 GB of WAV).
VOICES = 960
TAKES_PER_SOUND = 2
BACKGROUND_CLIPS = 8


def background_clip(voice: Voice, v: int, j: int, seed: int, real: RealAudio | None) -> Stream:
    """Background clip ``j`` of voice number ``v``: without real recordings, an aggressor stream (even ``j``) or
    the voice's room with its speech (odd); with them, clips 2 and 3 of every 4 are real speech, or music for
    clip 3 of every third voice, from the ``train`` split."""
    clip_seed = [seed, 102, v, j]
    if real is not None and j % 4 >= 2:
        kind = "music" if j % 4 == 3 and v % 3 == 0 else "speech"
        recording = real.stretch("train", kind, BACKGROUND_SECONDS, [seed, 103, v, j], RATE)
        return recorded_in_room(recording, kind, clip_seed, RATE, ROOM_PEAK_DB[kind])
    make = make_aggressor_stream if j % 2 == 0 else background_take
    return make(voice, seconds=BACKGROUND_SECONDS, seed=clip_seed, sample_rate=RATE)


def _split(voice: int) -> str:
    return {8: "val", 9: "eval"}.get(voice % 10, "train")


def synthesize_mouth_corpus(out: Path, n_voices: int = VOICES, takes_per_sound: int = TAKES_PER_SOUND,
                            background_clips: int = BACKGROUND_CLIPS, seed: int = 0, progress: bool = True,
                            real_audio: Path | None = None) -> Path:
    """Write the corpus under ``out``; returns ``out``.

    Per voice: ``takes_per_sound`` takes of each mouth sound (2 s each) and ``background_clips`` clips of
    background (4 s each, :func:`background_clip`; ``real_audio``: the folder of ``fedsound data real-audio``).
    ``out`` must not exist or be an empty directory; the tree is written beside it and moved into place only when
    complete.
    Raises ConfigError for impossible sizes and DataError for an unusable ``out``.
    """
    if n_voices < 10 or takes_per_sound < 1 or background_clips < 1:
        raise ConfigError(f"mouth corpus: needs at least 10 voices, 1 take per sound and 1 background clip "
                          f"(got {n_voices}, {takes_per_sound}, {background_clips})")
    out = Path(out)
    real = RealAudio(real_audio) if real_audio is not None else None
    with staged_tree(out) as root:
        for folder in (*AUDIO_DIRS.values(), GROUND_TRUTH, METADATA):
            (root / folder).mkdir(parents=True)
        rows: dict[str, list[list[str]]] = {"dev": [], "eval": []}
        infos: dict[str, dict[str, dict[str, str]]] = {"dev": {}, "eval": {}}
        fname = 0
        for v in tqdm(range(n_voices), desc="mouth corpus", unit="voice", disable=not progress):
            voice = make_voice([seed, 100, v])
            clips = [(kind, corpus_take(kind, voice, [seed, 101, v, k, j], RATE, TAKE_SECONDS).wave)
                     for k, kind in enumerate(SOUNDS) for j in range(takes_per_sound)]
            clips += [(BACKGROUND, background_clip(voice, v, j, seed, real).wave) for j in range(background_clips)]
            split = _split(v)
            part = "eval" if split == "eval" else "dev"
            for label, wave in clips:
                fname += 1
                pcm = np.round(np.clip(wave, -1.0, 1.0) * 32767.0).astype(np.int16)
                sf.write(root / AUDIO_DIRS[part] / f"{fname}.wav", pcm, RATE, subtype="PCM_16", format="WAV")
                rows[part].append([str(fname), label, f"synthetic:{label}"] + ([split] if part == "dev" else []))
                infos[part][str(fname)] = {"uploader": f"voice{v:03d}", "title": f"{label}_{fname}.wav",
                                           "license": "http://creativecommons.org/publicdomain/zero/1.0/"}
        write_csv(root / GROUND_TRUTH / "dev.csv", ["fname", "labels", "mids", "split"], rows["dev"])
        write_csv(root / GROUND_TRUTH / "eval.csv", ["fname", "labels", "mids"], rows["eval"])
        write_csv(root / GROUND_TRUTH / "vocabulary.csv", None,
                  [[str(i), label, f"synthetic:{label}"] for i, label in enumerate(LABELS)])
        for part in ("dev", "eval"):
            with (root / METADATA / f"{part}_clips_info_FSD50K.json").open("w", encoding="utf-8") as handle:
                json.dump(infos[part], handle, sort_keys=True, indent=1)
    return out


def real_background_patches(real: RealAudio, frontend: FrontendConfig, count: int, seed: int = 0,
                            progress: bool = True) -> np.ndarray:
    """``count`` log-mel patches ``[count, patch_frames, n_mels]`` of real recordings in the turn of
    :data:`REAL_NEGATIVES` (speech and music of the ``train`` split, music of the ``bank`` split): each cut at random
    from its own clip of ``BACKGROUND_SECONDS`` played in a room as :func:`background_clip` plays them (same levels
    and floors), through ``frontend``."""
    features = Frontend(frontend)
    rng = np.random.default_rng([seed, 104])
    patches = np.zeros((count, frontend.patch_frames, frontend.n_mels), dtype=np.float32)
    for k in tqdm(range(count), desc="real background", unit="patch", disable=not progress):
        split, kind = REAL_NEGATIVES[k % len(REAL_NEGATIVES)]
        recording = real.stretch(split, kind, BACKGROUND_SECONDS, [seed, 105, k], RATE)
        clip = recorded_in_room(recording, kind, [seed, 106, k], RATE, ROOM_PEAK_DB[kind])
        cut = cut_patches(features.frames(clip.wave, RATE), frontend)
        patches[k] = cut[rng.integers(len(cut))]
    return patches

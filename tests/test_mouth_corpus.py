"""The many-voice mouth-sound corpus: FSD50K layout, one uploader per voice, voices split whole, seeded."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.fsd50k import read_index
from data_prep.mouth_corpus import BACKGROUND, synthesize_mouth_corpus
from data_prep.mouth_sounds import SOUNDS
from data_prep.prep import prep
from fl.config import CONFIG_DIR, load_config
from fl.errors import ConfigError, DataError
from fl.store import FeatureStore

VOICES = 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return synthesize_mouth_corpus(tmp_path_factory.mktemp("mouth") / "corpus", n_voices=VOICES,
                                   takes_per_sound=1, background_clips=2, seed=3, progress=False)


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_tree_reads_like_fsd50k_with_one_uploader_per_voice(corpus):
    index = read_index(corpus)
    assert index.labels == [*SOUNDS, BACKGROUND] and index.orphans.empty
    clips = index.clips
    assert len(clips) == VOICES * (len(SOUNDS) + 2)
    assert clips["uploader"].nunique() == VOICES
    per_voice = clips.groupby("uploader")["labels"].apply(sorted)
    assert all(labels == sorted([*SOUNDS, BACKGROUND, BACKGROUND]) for labels in per_voice)
    splits = clips.groupby("uploader")["split"].nunique()
    assert (splits == 1).all(), "a voice lies in one split only"
    assert sorted(clips.groupby("split")["uploader"].nunique().items()) == [("eval", 1), ("train", 8), ("val", 1)]


def test_clips_are_44k_mono_pcm16_and_hold_their_sound(corpus):
    index = read_index(corpus)
    for row in index.clips.itertuples():
        info = sf.info(row.path)
        assert (info.samplerate, info.channels, info.subtype) == (44100, 1, "PCM_16")
        wave, _ = sf.read(row.path, dtype="float32")
        assert np.abs(wave).max() > 10 ** (-30 / 20), f"{row.fname} ({row.labels}) is near silent"


def test_same_seed_same_bytes_other_seed_other_audio(corpus, tmp_path):
    again = synthesize_mouth_corpus(tmp_path / "again", n_voices=VOICES, takes_per_sound=1, background_clips=2,
                                    seed=3, progress=False)
    assert digest(again) == digest(corpus)
    other = synthesize_mouth_corpus(tmp_path / "other", n_voices=VOICES, takes_per_sound=1, background_clips=2,
                                    seed=4, progress=False)
    assert digest(other) != digest(corpus)


def test_prep_turns_it_into_a_store(corpus, tmp_path):
    frontend = load_config(CONFIG_DIR / "features" / "lea16k.toml").frontend
    summary = prep(corpus, tmp_path / "store.h5", frontend, workers=0, progress=False)
    assert summary.errors == 0 and sum(summary.clips.values()) == VOICES * (len(SOUNDS) + 2)
    store = FeatureStore(tmp_path / "store.h5")
    assert list(store.labels) == [*SOUNDS, BACKGROUND]


def test_cli_writes_the_corpus(tmp_path, capsys):
    from fedsound.cli import main

    code = main(["data", "mouth-sounds", str(tmp_path / "cli"), "--voices", "10", "--takes", "1", "--background", "1",
                 "--seed", "3", "--workdir", str(tmp_path), "-q"])
    assert code == 0 and "one uploader per voice" in capsys.readouterr().out
    assert len(read_index(tmp_path / "cli").clips) == 10 * (len(SOUNDS) + 1)


def test_an_existing_folder_is_never_overwritten(tmp_path):
    keep = tmp_path / "mine" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("do not delete")
    with pytest.raises(DataError, match="refusing to overwrite it"):
        synthesize_mouth_corpus(keep.parent, n_voices=VOICES, progress=False)
    assert keep.read_text() == "do not delete" and sorted(tmp_path.iterdir()) == [keep.parent]


def test_too_small_a_corpus_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="at least 10 voices"):
        synthesize_mouth_corpus(tmp_path / "c", n_voices=3, progress=False)

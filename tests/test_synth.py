"""Tests of the synthetic FSD50K-format corpus (data_prep.synth)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from data_prep.synth import SYNTH_RATE, SYNTH_VOCABULARY, SynthSummary, synthesize_corpus
from fl.errors import ConfigError, DataError

TINY = {"n_clips": 40, "n_uploaders": 8, "n_classes": 4, "progress": False}
TRUTH = "FSD50K.ground_truth"
META = "FSD50K.metadata"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return synthesize_corpus(tmp_path_factory.mktemp("tiny") / "corpus", seed=0, **TINY)


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    out = tmp_path_factory.mktemp("medium") / "corpus"
    return synthesize_corpus(out, n_clips=100, n_uploaders=25, n_classes=4, seed=6, progress=False)


def _read_truth(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    vocabulary = pd.read_csv(root / TRUTH / "vocabulary.csv", header=None, names=["index", "label", "mid"])
    dev = pd.read_csv(root / TRUTH / "dev.csv")
    evaluation = pd.read_csv(root / TRUTH / "eval.csv")
    return vocabulary, dev, evaluation


def _clip_infos(root: Path) -> dict[str, dict[str, dict]]:
    return {
        group: json.loads((root / META / f"{group}_clips_info_FSD50K.json").read_text(encoding="utf-8"))
        for group in ("dev", "eval")
    }


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_layout_matches_fsd50k_release(tiny: SynthSummary) -> None:
    root = tiny.out
    for name in ("FSD50K.dev_audio", "FSD50K.eval_audio", TRUTH, META):
        assert (root / name).is_dir(), name
    for name in ("dev.csv", "eval.csv", "vocabulary.csv"):
        assert (root / TRUTH / name).is_file(), name
    for name in ("dev_clips_info_FSD50K.json", "eval_clips_info_FSD50K.json"):
        assert (root / META / name).is_file(), name
    assert not list(root.parent.glob(".*partial*")), "staging directory left behind"
    assert tiny.n_dev + tiny.n_eval == TINY["n_clips"]
    assert tiny.n_uploaders_dev + tiny.n_uploaders_eval == TINY["n_uploaders"]


def test_ground_truth_parses_like_fsd50k(tiny: SynthSummary) -> None:
    vocabulary, dev, evaluation = _read_truth(tiny.out)
    assert vocabulary["index"].tolist() == list(range(TINY["n_classes"]))
    assert vocabulary["label"].tolist() == tiny.classes == sorted(tiny.classes)
    real_pairs = {(c.label, c.mid) for c in SYNTH_VOCABULARY}
    assert set(zip(vocabulary["label"], vocabulary["mid"], strict=True)) <= real_pairs
    mid_of = dict(zip(vocabulary["label"], vocabulary["mid"], strict=True))

    assert list(dev.columns) == ["fname", "labels", "mids", "split"]
    assert list(evaluation.columns) == ["fname", "labels", "mids"]
    assert set(dev["split"]) == {"train", "val"}
    assert len(dev) == tiny.n_dev and len(evaluation) == tiny.n_eval
    for table in (dev, evaluation):
        assert table["fname"].dtype.kind == "i"
        for labels, mids in zip(table["labels"], table["mids"], strict=True):
            names = labels.split(",")
            assert len(set(names)) == len(names)
            assert mids.split(",") == [mid_of[name] for name in names]
    assert not set(dev["fname"]) & set(evaluation["fname"])


def test_metadata_keyed_by_fname_with_freesound_fields(tiny: SynthSummary) -> None:
    _, dev, evaluation = _read_truth(tiny.out)
    infos = _clip_infos(tiny.out)
    for group, table in (("dev", dev), ("eval", evaluation)):
        assert set(infos[group]) == {str(f) for f in table["fname"]}
        for info in infos[group].values():
            assert set(info) == {"title", "description", "tags", "license", "uploader"}
            assert isinstance(info["tags"], list) and info["tags"]
            assert info["uploader"] and info["license"].startswith("http")


def test_every_listed_clip_is_a_44k_mono_pcm16_wav_of_valid_length(tiny: SynthSummary) -> None:
    _, dev, evaluation = _read_truth(tiny.out)
    total = 0.0
    for folder, table in (("FSD50K.dev_audio", dev), ("FSD50K.eval_audio", evaluation)):
        listed = {f"{f}.wav" for f in table["fname"]}
        assert {p.name for p in (tiny.out / folder).iterdir()} == listed
        for name in listed:
            info = sf.info(tiny.out / folder / name)
            assert (info.samplerate, info.channels, info.subtype) == (44100, 1, "PCM_16")
            assert 0.3 <= info.duration <= 30.0
            audio, _ = sf.read(tiny.out / folder / name, dtype="int16")
            assert np.abs(audio.astype(np.int32)).max() > 1000, f"{name} is nearly silent"
            total += info.duration
    assert total == pytest.approx(tiny.audio_seconds)


def test_eval_uploaders_are_disjoint_from_dev_uploaders(tiny: SynthSummary) -> None:
    infos = _clip_infos(tiny.out)
    dev_uploaders = {info["uploader"] for info in infos["dev"].values()}
    eval_uploaders = {info["uploader"] for info in infos["eval"].values()}
    assert not dev_uploaders & eval_uploaders
    assert (len(dev_uploaders), len(eval_uploaders)) == (tiny.n_uploaders_dev, tiny.n_uploaders_eval)


def test_uploader_clip_counts_are_heavy_tailed(medium: SynthSummary) -> None:
    infos = _clip_infos(medium.out)
    uploaders = [info["uploader"] for group in infos.values() for info in group.values()]
    counts = pd.Series(uploaders).value_counts()
    assert len(counts) == 25
    assert counts.max() >= 5 * counts.median()
    assert (counts <= 5).mean() >= 0.5


def test_every_class_occurs_in_train_val_and_eval(medium: SynthSummary) -> None:
    _, dev, evaluation = _read_truth(medium.out)
    for name, table in (
        ("train", dev[dev["split"] == "train"]),
        ("val", dev[dev["split"] == "val"]),
        ("eval", evaluation),
    ):
        present = {label for labels in table["labels"] for label in labels.split(",")}
        assert present == set(medium.classes), name


def test_some_clips_are_two_label_mixtures(tiny: SynthSummary) -> None:
    _, dev, evaluation = _read_truth(tiny.out)
    labels = pd.concat([dev["labels"], evaluation["labels"]])
    two = labels.str.count(",") == 1
    assert 0.05 <= two.mean() <= 0.3
    assert (labels.str.count(",") <= 1).all()


def test_same_seed_gives_byte_identical_tree(tiny: SynthSummary, tmp_path: Path) -> None:
    again = synthesize_corpus(tmp_path / "again", seed=0, **TINY)
    assert dataclasses.replace(again, out=tiny.out) == tiny
    assert _tree_hashes(again.out) == _tree_hashes(tiny.out)


def test_different_seed_gives_a_different_corpus(tiny: SynthSummary, tmp_path: Path) -> None:
    other = synthesize_corpus(tmp_path / "other", seed=1, **TINY)
    _, dev_a, _ = _read_truth(tiny.out)
    _, dev_b, _ = _read_truth(other.out)
    assert set(dev_a["fname"]) != set(dev_b["fname"])
    assert _tree_hashes(other.out) != _tree_hashes(tiny.out)


def test_too_many_classes_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"n_classes={len(SYNTH_VOCABULARY) + 1}"):
        synthesize_corpus(tmp_path / "c", n_classes=len(SYNTH_VOCABULARY) + 1, progress=False)
    assert not (tmp_path / "c").exists()


def test_impossible_sizes_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_clips=5"):
        synthesize_corpus(tmp_path / "c", n_clips=5, n_uploaders=8, progress=False)
    with pytest.raises(ConfigError, match="n_uploaders=1"):
        synthesize_corpus(tmp_path / "c", n_clips=5, n_uploaders=1, progress=False)
    with pytest.raises(ConfigError, match="eval_fraction"):
        synthesize_corpus(tmp_path / "c", eval_fraction=1.0, progress=False)


def test_refuses_to_overwrite_a_non_empty_directory(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    out.mkdir()
    keep = out / "notes.txt"
    keep.write_text("mine", encoding="utf-8")
    with pytest.raises(DataError, match="not an empty directory"):
        synthesize_corpus(out, **TINY)
    assert keep.read_text(encoding="utf-8") == "mine"
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_vocabulary_table_holds_real_distinct_fsd50k_entries() -> None:
    assert len(SYNTH_VOCABULARY) >= 30
    assert len({c.label for c in SYNTH_VOCABULARY}) == len(SYNTH_VOCABULARY)
    assert len({c.mid for c in SYNTH_VOCABULARY}) == len(SYNTH_VOCABULARY)
    for entry in SYNTH_VOCABULARY:
        assert " " not in entry.label and "," not in entry.label
        assert entry.mid.startswith(("/m/", "/t/"))
    # a few entries checked against FSD50K's vocabulary.csv
    pairs = {(c.label, c.mid) for c in SYNTH_VOCABULARY}
    assert {("Bark", "/m/05tny_"), ("Male_speech_and_man_speaking", "/m/05zppz"),
            ("Accelerating_and_revving_and_vroom", "/m/07q2z82")} <= pairs


def _band_profile(audio: np.ndarray) -> np.ndarray:
    """Mean and temporal spread of log energy in 24 log-spaced bands (a crude, independent frontend)."""
    frames = np.lib.stride_tricks.sliding_window_view(audio, 1024)[::256] * np.hanning(1024)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(1024, 1.0 / SYNTH_RATE)
    edges = np.geomspace(40.0, 10500.0, 25)
    masks = [(freqs >= lo) & (freqs < hi) for lo, hi in itertools.pairwise(edges)]
    bands = np.stack([power[:, mask].sum(1) for mask in masks], 1)
    log_bands = np.log(bands + 1e-8)
    log_bands -= log_bands.max()
    return np.concatenate([log_bands.mean(0), log_bands.std(0)])


def test_class_sounds_are_acoustically_distinct() -> None:
    """Fresh renders of a class sit nearest to that class's own centroid (nearest-centroid accuracy)."""
    renders, fit, samples = 5, 3, int(1.5 * SYNTH_RATE)
    profiles = np.array([
        [_band_profile(entry.sound.render(samples, SYNTH_RATE, np.random.default_rng([k, i])))
         for k in range(renders)]
        for i, entry in enumerate(SYNTH_VOCABULARY)
    ])
    for n_classes, wanted in ((10, 0.95), (len(SYNTH_VOCABULARY), 0.8)):
        centroids = profiles[:n_classes, :fit].mean(1)
        held_out = profiles[:n_classes, fit:]
        distances = ((held_out[:, :, None, :] - centroids[None, None]) ** 2).sum(-1)
        accuracy = (distances.argmin(-1) == np.arange(n_classes)[:, None]).mean()
        assert accuracy >= wanted, (n_classes, accuracy)

"""prep: FSD50K tree -> feature store + manifests; bad inputs, uploader order, resume after a kill."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import REPO
from fsd_tree import TreeClip, audio_path, make_clips, tone, truncate, write_fsd_tree, write_garbage
from torch.utils.data import DataLoader

from data_prep.prep import CHUNK_CLIPS, prep
from fl.config import CONFIG_DIR, FrontendConfig, load_config
from fl.errors import DataError
from fl.frontend import Frontend, cut_patches
from fl.store import FeatureStore, PatchDataset

CONFIG = FrontendConfig()
MANIFEST_COLUMNS = ["fname", "labels", "mids", "split", "uploader", "n_segs"]

# Bad inputs: fname -> expected reason. Their uploaders sort among the good ones, so they share a chunk.
BAD = {
    "900": "unreadable audio",
    "901": "truncated audio",
    "902": "empty audio",
    "903": "NaN or inf samples",
    "904": "audio file missing",
    "905": "audio file without a ground-truth row",
    "906": "missing uploader",
    "907": "too short",
    "908": "unknown label(s) Kazoo",
}


def bad_clips() -> list[TreeClip]:
    nan_wave = tone(0.5, seed=9)
    nan_wave[100], nan_wave[200] = np.nan, np.inf
    return [
        TreeClip("900", "train", "user002", ("Bark",), tone(0.5)),
        TreeClip("901", "train", "user003", ("Meow",), tone(1.0)),
        TreeClip("902", "val", "user004", ("Bark",), np.zeros(0, np.float32)),
        TreeClip("903", "train", "user005", ("Meow",), nan_wave, subtype="FLOAT"),
        TreeClip("904", "train", "user006", ("Bark",), None),
        TreeClip("905", "train", "user007", ("Bark",), tone(0.5), listed=False),
        TreeClip("906", "train", "", ("Bark",), tone(0.5)),
        TreeClip("907", "eval", "user001", ("Meow",), tone(0.01)),  # 441 samples: less than the STFT's padding
        TreeClip("908", "val", "user002", ("Bark", "Kazoo"), tone(0.5)),
    ]


def odd_clips() -> list[TreeClip]:
    """Good but unusual: stereo, 48 kHz instead of 44.1 kHz, and the shortest clip the frontend takes."""
    stereo = np.stack([tone(0.8, seed=11), tone(0.8, freq=1500.0, seed=12)], axis=1)
    return [
        TreeClip("950", "train", "user004", ("Whistling",), stereo),
        TreeClip("951", "eval", "user000", ("Clapping", "Meow"), tone(1.2, rate=48000, seed=13), rate=48000),
        TreeClip("952", "val", "user003", ("Bark",), tone(662 / 44100, seed=14)),  # 331 samples at 22.05 kHz
    ]


def direct_frames(path: Path, config: FrontendConfig = CONFIG) -> np.ndarray:
    """Frontend frames computed straight from a WAV file (mixed to mono), without prep or the store."""
    wave, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return Frontend(config).frames(wave.mean(axis=1), rate)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Good, odd and bad clips, prepped once: (tree root, clips by fname, store path, summary, log lines)."""
    base = tmp_path_factory.mktemp("prep")
    clips = make_clips(40, 8, seed=1) + odd_clips() + bad_clips()
    root = write_fsd_tree(base / "fsd", clips)
    by_name = {c.fname: c for c in clips}
    write_garbage(audio_path(root, by_name["900"]))
    truncate(audio_path(root, by_name["901"]), 5000)
    handler = ListHandler()
    logger = logging.getLogger("data_prep.prep")
    logger.addHandler(handler)
    try:
        summary = prep(root, base / "out" / "store.h5", CONFIG, workers=0, progress=False)
    finally:
        logger.removeHandler(handler)
    return root, by_name, base / "out" / "store.h5", summary, handler.messages


class ListHandler(logging.Handler):
    """Collects log messages at WARNING and above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def stored_fnames(store: FeatureStore) -> set[str]:
    return {f for split in store.splits for f in store.table(split).clips["fname"]}


def test_each_bad_input_is_recorded_with_its_reason_and_good_clips_are_all_stored(prepared):
    root, by_name, path, summary, _ = prepared
    store = FeatureStore(path)
    for errors in (store.errors(), pd.read_csv(path.parent / "errors.csv", dtype=str)):
        assert sorted(errors["fname"]) == sorted(BAD)
        for fname, reason in zip(errors["fname"], errors["reason"], strict=True):
            assert BAD[fname] in reason
    good = {f for f in by_name if f not in BAD}
    assert stored_fnames(store) == good
    assert summary.errors == len(BAD)
    assert sum(summary.clips.values()) == len(good)
    assert summary.patches == {s: int(store.table(s).clips["n_segs"].sum()) for s in store.splits}


def test_stereo_is_mixed_down_and_48k_is_resampled_with_a_warning(prepared):
    root, by_name, path, _, messages = prepared
    assert any(m.startswith("950:") and "mixed down" in m for m in messages)
    assert any(m.startswith("951:") and "48000 Hz resampled" in m for m in messages)
    store = FeatureStore(path)
    for fname, split in (("950", "train"), ("951", "eval")):
        clips = store.table(split).clips
        row = clips.index[clips["fname"] == fname][0]
        offset, n = clips.loc[row, ["offset", "n_frames"]]
        expected = direct_frames(audio_path(root, by_name[fname]))
        np.testing.assert_allclose(store.frames(split)[offset : offset + n], expected, rtol=2e-3, atol=2e-3)


def test_stored_frames_equal_the_frontend_on_each_clip(prepared):
    root, by_name, path, _, _ = prepared
    store = FeatureStore(path)
    assert "952" in set(store.table("val").clips["fname"])  # the shortest clip is kept (2 frames, tiled)
    for split in store.splits:
        clips = store.table(split).clips
        for fname, offset, n in zip(clips["fname"], clips["offset"], clips["n_frames"], strict=True):
            expected = direct_frames(audio_path(root, by_name[fname]))
            assert n == len(expected)
            stored = store.frames(split)[offset : offset + n]
            np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)


def test_each_uploader_is_one_contiguous_frame_range(prepared):
    _, by_name, path, _, _ = prepared
    store = FeatureStore(path)
    for split in store.splits:
        clips = store.table(split).clips
        assert clips["offset"].iloc[0] == 0
        np.testing.assert_array_equal(clips["offset"].iloc[1:], np.cumsum(clips["n_frames"])[:-1])
        assert clips["n_frames"].sum() == len(store.frames(split))
        runs = clips["uploader"].ne(clips["uploader"].shift()).cumsum()
        assert runs.iloc[-1] == clips["uploader"].nunique(), f"{split}: an uploader's clips are split up"
        assert all(by_name[f].uploader == u for f, u in zip(clips["fname"], clips["uploader"], strict=True))
        assert all(by_name[f].split == split for f in clips["fname"])


def test_manifests_have_fsd_fed_columns_and_match_the_store(prepared):
    _, by_name, path, _, _ = prepared
    store = FeatureStore(path)
    for split in ("train", "val", "eval"):
        manifest = pd.read_csv(path.parent / f"{split}.csv", dtype={"fname": str})
        assert list(manifest.columns) == MANIFEST_COLUMNS
        clips = store.table(split).clips
        assert manifest["fname"].tolist() == clips["fname"].tolist()
        np.testing.assert_array_equal(manifest["n_segs"], clips["n_segs"])
        assert (manifest["split"] == split).all()
        assert manifest["labels"].tolist() == [",".join(by_name[f].labels) for f in manifest["fname"]]
        labels = store.table(split).labels
        for row, names in enumerate(manifest["labels"]):
            assert {store.labels[k] for k in np.flatnonzero(labels[row])} == set(names.split(","))


def test_patch_dataset_of_one_uploader_equals_frontend_patches_from_audio(prepared):
    root, by_name, path, _, _ = prepared
    store = FeatureStore(path)
    clips = store.table("train").clips
    uploader = clips["uploader"].value_counts().index[0]
    mine = clips.index[clips["uploader"] == uploader]
    dataset = PatchDataset(store, "train", uploaders=[uploader])
    assert len(dataset) == clips.loc[mine, "n_segs"].sum()
    expected = np.concatenate([cut_patches(direct_frames(audio_path(root, by_name[f])), CONFIG)
                               for f in clips.loc[mine, "fname"]])
    items = [dataset[i] for i in range(len(dataset))]
    assert {clip for _, _, clip in items} == set(mine)
    for (patch, target, clip), want in zip(items, expected, strict=True):
        assert patch.shape == (101, 96) and patch.dtype == torch.float32
        np.testing.assert_allclose(patch.numpy(), want, rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(target.numpy(), store.table("train").labels[clip])


def test_patch_dataset_works_in_a_dataloader_with_two_workers(prepared):
    _, _, path, _, _ = prepared
    dataset = PatchDataset(path, "train")
    loader = DataLoader(dataset, batch_size=16, shuffle=False, num_workers=2)
    batches = list(loader)
    x = torch.cat([b[0] for b in batches])
    clips = torch.cat([b[2] for b in batches]).numpy()
    assert x.shape == (len(dataset), 101, 96)
    np.testing.assert_array_equal(clips, dataset.index[:, 0])
    np.testing.assert_array_equal(x.numpy(), dataset.store.read_patches("train", dataset.index))


def test_lea16k_features_give_a_64_band_store(prepared, tmp_path):
    root, _, _, _, _ = prepared
    config = load_config(CONFIG_DIR / "features" / "lea16k.toml").frontend
    prep(root, tmp_path / "lea.h5", config, workers=0, progress=False)
    store = FeatureStore(tmp_path / "lea.h5")
    assert store.frontend == config
    assert store.frames("train").shape[1] == 64
    patch, _, _ = PatchDataset(store, "train")[0]
    assert patch.shape == (101, 64)


def test_missing_dev_csv_is_a_one_line_error_naming_the_file(tmp_path):
    root = write_fsd_tree(tmp_path / "fsd", make_clips(3, 2, seed=2))
    (root / "FSD50K.ground_truth" / "dev.csv").unlink()
    with pytest.raises(DataError, match=r"dev\.csv") as info:
        prep(root, tmp_path / "store.h5", CONFIG, workers=0, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "store.h5").exists()


def test_unfinished_prep_of_other_inputs_is_refused(tmp_path):
    root = write_fsd_tree(tmp_path / "fsd", make_clips(3, 2, seed=3))
    partial = tmp_path / "store.h5.partial"
    partial.mkdir()
    (partial / "fingerprint").write_text("0123456789abcdef")
    with pytest.raises(DataError, match="store.h5.partial"):
        prep(root, tmp_path / "store.h5", CONFIG, workers=0, progress=False)


def _prep_in_subprocess(root: Path, store: Path) -> subprocess.Popen:
    code = ("from pathlib import Path\n"
            "from data_prep.prep import prep\n"
            "from fl.config import FrontendConfig\n"
            f"prep(Path({str(root)!r}), Path({str(store)!r}), FrontendConfig(), workers=0, progress=False)\n")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _kill_after_first_shard(process: subprocess.Popen, partial: Path, limit_s: float = 120.0) -> list[Path]:
    """SIGKILL ``process`` as soon as a finished shard exists; return the finished shards."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        finished = sorted(partial.glob("shard-*[0-9].npz"))
        if finished:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return sorted(partial.glob("shard-*[0-9].npz"))
        if process.poll() is not None:
            pytest.fail(f"prep ended before a shard was seen: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.002)
    process.kill()
    pytest.fail("no shard appeared in time")


def test_resume_after_kill_reuses_finished_shards_and_equals_an_uninterrupted_prep(prepared, tmp_path):
    n_chunks = 8  # short clips, many chunks: a wide window for the kill
    clips = make_clips(n_chunks * CHUNK_CLIPS, 12, seed=4, seconds=(0.1, 0.4))
    root = write_fsd_tree(tmp_path / "fsd", clips)
    store = tmp_path / "out" / "store.h5"
    store.parent.mkdir()
    previous = prepared[2]
    shutil.copy(previous, store)  # a store from an earlier prep sits where the new one will go
    partial = store.with_name(store.name + ".partial")

    process = _prep_in_subprocess(root, store)
    finished = _kill_after_first_shard(process, partial)
    assert process.returncode == -signal.SIGKILL
    assert 1 <= len(finished) < n_chunks, "the kill should land in the middle of feature extraction"
    assert stored_fnames(FeatureStore(store)) == stored_fnames(FeatureStore(previous))  # opens, unchanged

    # Mark the finished shards: a reused shard carries the mark into the summary, a recomputed one would not.
    mark_seconds = 1000.0
    for shard in finished:
        with np.load(shard) as data:
            content = dict(data)
        content["seconds"] = content["seconds"] + mark_seconds
        np.savez(shard.with_name(shard.stem + ".tmp.npz"), **content)
        os.replace(shard.with_name(shard.stem + ".tmp.npz"), shard)

    resumed = prep(root, store, CONFIG, workers=0, progress=False)
    reference = prep(root, tmp_path / "ref" / "store.h5", CONFIG, workers=0, progress=False)
    assert not partial.exists()
    extra_hours = resumed.audio_hours - reference.audio_hours
    assert extra_hours == pytest.approx(len(finished) * mark_seconds / 3600), "finished shards recomputed"

    a, b = FeatureStore(store), FeatureStore(reference.store)
    assert a.splits == b.splits
    for split in a.splits:
        pd.testing.assert_frame_equal(a.table(split).clips, b.table(split).clips)
        np.testing.assert_array_equal(a.table(split).labels, b.table(split).labels)
        np.testing.assert_array_equal(a.frames(split), b.frames(split))
        pd.testing.assert_frame_equal(pd.read_csv(store.parent / f"{split}.csv"),
                                      pd.read_csv(reference.store.parent / f"{split}.csv"))
    pd.testing.assert_frame_equal(a.errors(), b.errors())


def test_worker_pool_gives_the_same_store_as_one_process(tmp_path):
    clips = make_clips(2 * CHUNK_CLIPS + 5, 9, seed=6, seconds=(0.1, 0.6)) + odd_clips()
    root = write_fsd_tree(tmp_path / "fsd", clips)
    truncate(audio_path(root, clips[3]), 3000)
    pooled = prep(root, tmp_path / "pool" / "store.h5", CONFIG, workers=2, progress=False)
    single = prep(root, tmp_path / "one" / "store.h5", CONFIG, workers=0, progress=False)
    assert pooled.clips == single.clips and pooled.errors == single.errors == 1
    a, b = FeatureStore(pooled.store), FeatureStore(single.store)
    pd.testing.assert_frame_equal(a.errors(), b.errors())
    for split in a.splits:
        pd.testing.assert_frame_equal(a.table(split).clips, b.table(split).clips)
        np.testing.assert_array_equal(a.frames(split), b.frames(split))

"""The HDF5 feature store: round trip, patch reads, bad stores, pickling and batch iteration."""

import pickle

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from fl.config import FrontendConfig
from fl.errors import DataError
from fl.frontend import cut_patches, n_segments
from fl.store import FeatureStore, PatchDataset, SplitTable, iter_batches, write_store

CONFIG = FrontendConfig(n_mels=8)
LABELS, MIDS = ["Bark", "Meow", "Siren"], ["/m/a", "/m/b", "/m/c"]
LENGTHS = {"train": [31, 101, 151, 400, 150], "val": [], "eval": [260, 7]}
UPLOADERS = {"train": ["ann", "ann", "bob", "bob", "cy"], "val": [], "eval": ["dee", "dee"]}


def make_split(split: str, rng: np.random.Generator) -> tuple[SplitTable, list[np.ndarray]]:
    lengths = LENGTHS[split]
    clips = pd.DataFrame({
        "fname": [f"{split}{k}" for k in range(len(lengths))],
        "uploader": UPLOADERS[split],
        "offset": np.cumsum([0, *lengths])[:-1].astype(np.int64),
        "n_frames": np.array(lengths, dtype=np.int64),
        "n_segs": [n_segments(n, CONFIG) for n in lengths],
    })
    labels = (rng.random((len(lengths), len(LABELS))) < 0.5).astype(np.uint8)
    frames = [rng.normal(-5, 3, (n, CONFIG.n_mels)).astype(np.float32) for n in lengths]
    return SplitTable(clips, labels), frames


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    rng = np.random.default_rng(0)
    parts = {split: make_split(split, rng) for split in LENGTHS}
    errors = pd.DataFrame({"fname": ["bad1", "bad2"], "split": ["train", "eval"],
                           "reason": ["empty audio", "NaN or inf samples"]})
    path = tmp_path_factory.mktemp("store") / "store.h5"
    write_store(path, CONFIG, LABELS, MIDS, {s: t for s, (t, _) in parts.items()},
                {s: iter(f) for s, (_, f) in parts.items()}, errors)
    return path, parts, errors


def test_round_trip_keeps_config_vocabulary_tables_frames_and_errors(written):
    path, parts, errors = written
    store = FeatureStore(path)
    assert store.frontend == CONFIG
    assert (store.labels, store.mids, store.n_classes) == (LABELS, MIDS, 3)
    assert store.splits == ("train", "val", "eval")
    for split, (table, frames) in parts.items():
        read = store.table(split)
        pd.testing.assert_frame_equal(read.clips, table.clips, check_dtype=False)
        np.testing.assert_array_equal(read.labels, table.labels)
        stored = store.frames(split)
        assert stored.dtype == np.float16 and stored.shape == (sum(LENGTHS[split]), CONFIG.n_mels)
        if frames:
            np.testing.assert_array_equal(stored, np.concatenate(frames).astype(np.float16))
    pd.testing.assert_frame_equal(store.errors(), errors)
    assert len(PatchDataset(store, "val")) == 0


def test_read_patches_equal_patches_cut_from_each_clip(written):
    path, parts, _ = written
    store = FeatureStore(path)
    for split in ("train", "eval"):
        table, frames = parts[split]
        index = store.patch_index(split)
        assert len(index) == table.clips["n_segs"].sum()
        stored = [f.astype(np.float16).astype(np.float32) for f in frames]
        expected = np.concatenate([cut_patches(f, CONFIG) for f in stored])
        np.testing.assert_array_equal(store.read_patches(split, index), expected)
        shuffled = np.random.default_rng(1).permutation(len(index))
        np.testing.assert_array_equal(store.read_patches(split, index[shuffled]), expected[shuffled])
        np.testing.assert_array_equal(store.clip_patches(split, 0), expected[: table.clips["n_segs"][0]])


def test_uploaders_select_their_clips_and_patches(written):
    path, parts, _ = written
    store = FeatureStore(path)
    np.testing.assert_array_equal(store.uploader_clips("train", ["bob"]), [2, 3])
    dataset = PatchDataset(store, "train", uploaders=["bob"])
    assert len(dataset) == n_segments(151, CONFIG) + n_segments(400, CONFIG)
    assert {int(c) for c in dataset.index[:, 0]} == {2, 3}
    patch, target, clip = dataset[0]
    assert patch.shape == (101, CONFIG.n_mels) and patch.dtype == torch.float32
    np.testing.assert_array_equal(target.numpy(), parts["train"][0].labels[clip].astype(np.float32))
    limited = PatchDataset(store, "train", uploaders=["ann", "bob"], clip_indices=[0, 3])
    assert set(limited.index[:, 0]) == {0, 3}


def test_iter_batches_visits_every_patch_once_in_a_seeded_order(written):
    path, _, _ = written
    store = FeatureStore(path)
    index = store.patch_index("train")
    clips_seen = []
    for x, y, clips in iter_batches(store, "train", index, 4, np.random.default_rng(7)):
        assert x.shape[1:] == (101, CONFIG.n_mels) and y.shape[1] == 3 and len(x) == len(y) == len(clips) <= 4
        clips_seen.append(clips)
    rerun = iter_batches(store, "train", index, 4, np.random.default_rng(7))
    again = np.concatenate([c for _, _, c in rerun])
    np.testing.assert_array_equal(np.concatenate(clips_seen), again)
    np.testing.assert_array_equal(np.sort(np.concatenate(clips_seen)), np.sort(index[:, 0]))
    in_order = np.concatenate([x.numpy() for x, _, _ in iter_batches(store, "train", index, 4)])
    np.testing.assert_array_equal(in_order, store.read_patches("train", index))


def test_store_pickles_after_use_and_reads_the_same_in_the_copy(written):
    path, _, _ = written
    store = FeatureStore(path)
    before = store.read_patches("eval", store.patch_index("eval"))
    copy = pickle.loads(pickle.dumps(store))
    assert copy.frontend == store.frontend
    np.testing.assert_array_equal(copy.read_patches("eval", copy.patch_index("eval")), before)


def test_failed_write_leaves_the_previous_store_intact(written, tmp_path):
    path, parts, errors = written
    target = tmp_path / "store.h5"
    target.write_bytes(path.read_bytes())
    table, frames = parts["train"]
    frames_short = [f[:-1] for f in frames]
    with pytest.raises(DataError, match="frames"):
        write_store(target, CONFIG, LABELS, MIDS, {"train": table}, {"train": iter(frames_short)}, errors)
    assert FeatureStore(target).table("eval").clips["fname"].tolist() == ["eval0", "eval1"]


def test_bad_stores_are_one_line_data_errors_naming_the_file(tmp_path):
    missing = tmp_path / "none.h5"
    with pytest.raises(DataError, match="none.h5: feature store not found"):
        FeatureStore(missing)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(DataError, match="garbage.h5: cannot open feature store") as info:
        FeatureStore(garbage)
    assert "\n" not in str(info.value)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as h5:
        h5.create_dataset("x", data=[1, 2, 3])
    with pytest.raises(DataError, match="foreign.h5: not a fedsound feature store"):
        FeatureStore(foreign)


def test_other_store_version_is_refused(written, tmp_path):
    path, _, _ = written
    newer = tmp_path / "newer.h5"
    newer.write_bytes(path.read_bytes())
    with h5py.File(newer, "r+") as h5:
        h5.attrs["version"] = 99
    with pytest.raises(DataError, match="newer.h5: store format version 99 is not supported"):
        FeatureStore(newer)


def test_unknown_split_is_a_data_error(written):
    path, _, _ = written
    store = FeatureStore(path)
    with pytest.raises(DataError, match="no split 'test'"):
        store.table("test")

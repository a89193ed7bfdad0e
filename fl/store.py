"""The HDF5 feature store: format, writer and readers.

Layout (``FORMAT``, version ``VERSION``)::

    /                 attrs: format, version, frontend (JSON of the frontend config)
    /vocabulary/      label, mid                      (str, one row per class)
    /<split>/frames   [total_frames, n_mels]          (float16 by default; contiguous, memory-mapped on read)
    /<split>/clips/   fname, uploader, offset, n_frames, n_segs, labels [n_clips, n_classes] (uint8)
    /errors/          fname, split, reason

Every dataset carries a ``sha256`` attribute: the SHA-256 of its values (numbers: the raw bytes in row order;
strings: their UTF-8 bytes, each followed by a zero byte). The small datasets (vocabulary, clip tables) are
checked whenever they are read; the frames are checked by :meth:`FeatureStore.verify` (``fedsound data verify``,
and the training drivers before they start), one pass over the file.

Clips are stored grouped by uploader, so one client's frames are one contiguous range. Patches are cut from
the frames when read (:func:`fl.frontend.patch_frame_indices`), so the 50% overlap costs no disk. The frame
arrays are contiguous HDF5 datasets read through ``numpy.memmap``: a random patch is a plain memory gather,
and nothing needs to fit in RAM. The file is opened lazily in each process (DataLoader workers, Ray actors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from fl.config import Config, FrontendConfig, frontend_from_dict, to_dict
from fl.errors import ConfigError, DataError
from fl.frontend import patch_frame_indices

FORMAT = "fedsound-store"
VERSION = 1
SPLITS = ("train", "val", "eval")
CLIP_COLUMNS = ("fname", "uploader", "offset", "n_frames", "n_segs")
VERIFY_CHUNK_BYTES = 64 * 1024**2


@dataclass
class SplitTable:
    """Clip table of one split: metadata columns plus the multi-hot label matrix."""

    clips: pd.DataFrame  # fname, uploader, offset, n_frames, n_segs
    labels: np.ndarray  # [n_clips, n_classes] uint8


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array([str(v).encode("utf-8") for v in values], dtype=object)


def _digest(values: np.ndarray) -> str:
    """SHA-256 of a dataset's values: raw bytes of numbers in row order; each string's UTF-8 bytes and a zero."""
    digest = hashlib.sha256()
    if values.dtype == object:
        for value in values:
            digest.update((value if isinstance(value, bytes) else str(value).encode("utf-8")) + b"\0")
    else:
        digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def _dataset(group: h5py.Group, name: str, data: np.ndarray, **kwargs) -> None:
    """Create a dataset with its ``sha256`` attribute."""
    group.create_dataset(name, data=data, **kwargs)
    group[name].attrs["sha256"] = _digest(np.asarray(data))


def write_store(
    path: Path,
    frontend: FrontendConfig,
    labels: Sequence[str],
    mids: Sequence[str],
    tables: dict[str, SplitTable],
    frames_of: dict[str, Iterator[np.ndarray]],
    errors: pd.DataFrame,
) -> None:
    """Write a complete store atomically (to ``path.tmp``, then renamed).

    ``frames_of[split]`` yields each clip's frames in table order; their lengths must match ``n_frames``.
    """
    dtype = np.dtype(frontend.store_dtype)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        h5.attrs["format"] = FORMAT
        h5.attrs["version"] = VERSION
        h5.attrs["frontend"] = json.dumps(to_dict(frontend), sort_keys=True)
        vocab = h5.create_group("vocabulary")
        _dataset(vocab, "label", _strings(labels), dtype=h5py.string_dtype())
        _dataset(vocab, "mid", _strings(mids), dtype=h5py.string_dtype())
        for split, table in tables.items():
            group = h5.create_group(split)
            clips = table.clips
            total = int(clips["n_frames"].sum())
            frames = group.create_dataset("frames", shape=(total, frontend.n_mels), dtype=dtype)
            digest = hashlib.sha256()
            cursor = 0
            for expected, clip_frames in zip(clips["n_frames"], frames_of[split], strict=True):
                if len(clip_frames) != expected:
                    raise DataError(f"{path}: clip frames {len(clip_frames)} != table {expected}")
                stored = np.ascontiguousarray(clip_frames, dtype=dtype)
                frames[cursor : cursor + expected] = stored
                digest.update(stored.tobytes())
                cursor += expected
            frames.attrs["sha256"] = digest.hexdigest()
            ctab = group.create_group("clips")
            for column in ("fname", "uploader"):
                _dataset(ctab, column, _strings(clips[column]), dtype=h5py.string_dtype())
            for column in ("offset", "n_frames"):
                _dataset(ctab, column, clips[column].to_numpy(np.int64))
            _dataset(ctab, "n_segs", clips["n_segs"].to_numpy(np.int32))
            _dataset(ctab, "labels", table.labels.astype(np.uint8).reshape(len(clips), len(labels)))
        err = h5.create_group("errors")
        for column in ("fname", "split", "reason"):
            _dataset(err, column, _strings(errors[column] if len(errors) else []), dtype=h5py.string_dtype())
    os.replace(tmp, path)


def _read(ds: h5py.Dataset) -> np.ndarray:
    """A small dataset's values, checked against its ``sha256`` attribute (stores without one are not checked)."""
    values = ds[()]
    expected = ds.attrs.get("sha256")
    if expected is not None and _digest(np.asarray(values)) != expected:
        raise DataError(f"{ds.file.filename}: {ds.name} does not match its checksum: the store is corrupt "
                        "(`fedsound data verify` checks all of it; prep it again)")
    return values


def _decode(ds: h5py.Dataset) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in _read(ds)]


class FeatureStore:
    """Read-only view of a feature store; safe to pickle (reopens lazily in each process)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: feature store not found (run `fedsound data prep` first)")
        try:
            with h5py.File(self.path, "r") as h5:
                if h5.attrs.get("format") != FORMAT:
                    raise DataError(f"{self.path}: not a fedsound feature store")
                if int(h5.attrs.get("version", -1)) != VERSION:
                    raise DataError(f"{self.path}: store format version {h5.attrs.get('version')} "
                                    f"is not supported (expected {VERSION})")
                self.frontend = frontend_from_dict(json.loads(h5.attrs["frontend"]), str(self.path))
                self.labels = _decode(h5["vocabulary/label"])
                self.mids = _decode(h5["vocabulary/mid"])
                self.splits = tuple(s for s in SPLITS if s in h5)
                self._layout = {}
                for split in self.splits:
                    ds = h5[f"{split}/frames"]
                    offset = ds.id.get_offset() if ds.size else None
                    self._layout[split] = (offset, ds.shape, ds.dtype)
        except OSError as exc:
            raise DataError(f"{self.path}: cannot open feature store: {exc}") from None
        self._tables: dict[str, SplitTable] = {}
        self._frames: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_frames"] = {}
        return state

    @property
    def n_classes(self) -> int:
        """Number of classes in the vocabulary."""
        return len(self.labels)

    def _require(self, split: str) -> None:
        if split not in self.splits:
            raise DataError(f"{self.path}: no split {split!r} (has {', '.join(self.splits)})")

    def table(self, split: str) -> SplitTable:
        """Clip table and label matrix of ``split`` (cached)."""
        self._require(split)
        if split not in self._tables:
            with h5py.File(self.path, "r") as h5:
                g = h5[f"{split}/clips"]
                clips = pd.DataFrame({
                    "fname": _decode(g["fname"]),
                    "uploader": _decode(g["uploader"]),
                    "offset": _read(g["offset"]),
                    "n_frames": _read(g["n_frames"]),
                    "n_segs": _read(g["n_segs"]),
                })
                self._tables[split] = SplitTable(clips, _read(g["labels"]))
        return self._tables[split]

    def frames(self, split: str) -> np.ndarray:
        """All frames of ``split`` as a read-only memory map ``[total_frames, n_mels]``."""
        self._require(split)
        if split not in self._frames:
            offset, shape, dtype = self._layout[split]
            if offset is None:
                self._frames[split] = np.zeros(shape, dtype=dtype)
            else:
                self._frames[split] = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)
        return self._frames[split]

    def verify(self, progress: bool = False) -> dict[str, str]:
        """Check every dataset against its ``sha256`` attribute, the frames in one pass over the file (a progress
        bar when that takes more than a second). Returns dataset -> "ok" | "no checksum"; a mismatch raises a
        DataError naming every corrupt dataset."""
        with h5py.File(self.path, "r") as h5:
            names: list[str] = []
            h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            expected = {name: h5[name].attrs.get("sha256") for name in names}
        total = sum(self.frames(split).nbytes for split in self.splits)
        status, corrupt = {}, []
        with tqdm(total=total, unit="B", unit_scale=True, desc="verify store", disable=not progress, delay=1.0,
                  leave=False) as bar:
            for name in sorted(names):
                if expected[name] is None:
                    status[name] = "no checksum"
                    continue
                split = name.split("/")[0]
                if name == f"{split}/frames" and split in self.splits:
                    actual = self._frames_digest(split, bar)
                else:
                    with h5py.File(self.path, "r") as h5:
                        actual = _digest(np.asarray(h5[name][()]))
                status[name] = "ok" if actual == expected[name] else "corrupt"
                if actual != expected[name]:
                    corrupt.append(name)
        if corrupt:
            raise DataError(f"{self.path}: corrupt (checksum mismatch): {', '.join(corrupt)}; prep the store again")
        return status

    def _frames_digest(self, split: str, bar: tqdm) -> str:
        frames = self.frames(split)
        digest = hashlib.sha256()
        step = max(1, VERIFY_CHUNK_BYTES // max(1, frames.itemsize * frames.shape[1]))
        for start in range(0, len(frames), step):
            chunk = np.ascontiguousarray(frames[start : start + step])
            digest.update(chunk.tobytes())
            bar.update(chunk.nbytes)
        return digest.hexdigest()

    def errors(self) -> pd.DataFrame:
        """Inputs that prep skipped, with the reason."""
        with h5py.File(self.path, "r") as h5:
            return pd.DataFrame({c: _decode(h5[f"errors/{c}"]) for c in ("fname", "split", "reason")})

    def patch_index(self, split: str, clip_indices: np.ndarray | None = None) -> np.ndarray:
        """``[n_patches, 2]`` array of (clip index, segment) for the given clips (default all)."""
        clips = self.table(split).clips
        idx = np.arange(len(clips)) if clip_indices is None else np.asarray(clip_indices, dtype=np.int64)
        n_segs = clips["n_segs"].to_numpy()[idx]
        return np.stack([np.repeat(idx, n_segs), np.concatenate([np.arange(n) for n in n_segs])
                         if len(idx) else np.zeros(0, np.int64)], axis=1).astype(np.int64)

    def read_patches(self, split: str, patches: np.ndarray) -> np.ndarray:
        """Patches ``[n, patch_frames, n_mels]`` float32 for rows of (clip index, segment)."""
        clips = self.table(split).clips
        ci, seg = patches[:, 0], patches[:, 1]
        idx = patch_frame_indices(clips["offset"].to_numpy()[ci], clips["n_frames"].to_numpy()[ci], seg,
                                  self.frontend)
        frames = self.frames(split)
        lo, hi = int(idx.min(initial=0)), int(idx.max(initial=-1)) + 1
        if len(idx) and hi - lo <= 4 * idx.size:  # nearby patches (one client, one clip): one contiguous read
            gathered = np.asarray(frames[lo:hi])[idx - lo]
        else:
            gathered = np.asarray(frames[idx])
        # float16 -> float32 is exact; torch converts several times faster than numpy's astype.
        return torch.from_numpy(gathered).to(torch.float32).numpy()

    def clip_patches(self, split: str, clip: int) -> np.ndarray:
        """All patches of one clip ``[n_segs, patch_frames, n_mels]``."""
        return self.read_patches(split, self.patch_index(split, np.array([clip])))

    def uploader_clips(self, split: str, uploaders: Sequence[str]) -> np.ndarray:
        """Indices of the clips of the given uploaders."""
        wanted = set(uploaders)
        return np.flatnonzero(self.table(split).clips["uploader"].isin(wanted).to_numpy())


def with_store_frontend(config: Config, store: FeatureStore) -> Config:
    """``config`` with the store's frontend, which prep fixed: training reads its frames as they are. A
    ``[frontend]`` key set to something else (neither the default nor the store's value) is a ConfigError."""
    default = FrontendConfig()
    conflicts = [f"{f.name.replace('_', '-')} = {getattr(config.frontend, f.name)!r} where the store has "
                 f"{getattr(store.frontend, f.name)!r}" for f in dataclasses.fields(FrontendConfig)
                 if getattr(config.frontend, f.name) not in (getattr(default, f.name), getattr(store.frontend, f.name))]
    if conflicts:
        raise ConfigError(f"frontend: {store.path} was prepared with another frontend ({'; '.join(conflicts)}); "
                          "training uses the store's frames as they are: drop the [frontend] keys or prep again")
    return dataclasses.replace(config, frontend=store.frontend)


class PatchDataset(Dataset):
    """Patches of one split as ``(patch [101, 96] float32, multi-hot target float32, clip index)``.

    Optionally limited to some uploaders or clip indices. Supports batched fetching (``__getitems__``), so a
    DataLoader batch is one gather from the memory-mapped frames.
    """

    def __init__(self, store: FeatureStore | Path | str, split: str, uploaders: Sequence[str] | None = None,
                 clip_indices: Sequence[int] | np.ndarray | None = None) -> None:
        self.store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        self.split = split
        if uploaders is not None:
            selected = self.store.uploader_clips(split, uploaders)
            if clip_indices is not None:
                selected = np.intersect1d(selected, np.asarray(clip_indices))
            clip_indices = selected
        self.index = self.store.patch_index(split, None if clip_indices is None else np.asarray(clip_indices))
        self.targets = self.store.table(split).labels.astype(np.float32)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        rows = self.index[np.asarray(indices)]
        patches = torch.from_numpy(self.store.read_patches(self.split, rows))
        targets = torch.from_numpy(self.targets[rows[:, 0]])
        return [(patches[k], targets[k], int(rows[k, 0])) for k in range(len(rows))]


def iter_batches(
    store: FeatureStore,
    split: str,
    patches: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """Yield ``(x [B, T, F], y [B, C], clip indices)`` over the given patch rows; shuffled if ``rng`` given."""
    order = rng.permutation(len(patches)) if rng is not None else np.arange(len(patches))
    targets = store.table(split).labels
    for start in range(0, len(order), batch_size):
        rows = patches[order[start : start + batch_size]]
        x = torch.from_numpy(store.read_patches(split, rows))
        y = torch.from_numpy(targets[rows[:, 0]].astype(np.float32))
        yield x, y, rows[:, 0]

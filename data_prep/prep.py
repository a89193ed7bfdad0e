"""FSD50K tree -> feature store + manifests, in parallel, resumable after a kill.

Clips are processed in fixed chunks (in final store order: split, uploader, fname). Each finished chunk is
written atomically as a shard file under ``STORE.partial/``; a rerun skips finished shards. When all shards
exist they are assembled into the HDF5 store (written to a temporary name and renamed), the manifests and
``errors.csv`` are written, and the shards are removed. So a killed prep never leaves a store that fails to
open, and never recomputes a finished clip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from data_prep.fsd50k import read_index
from fl.audio import AudioFileError, read_audio, to_mono
from fl.config import FrontendConfig, to_dict
from fl.errors import DataError
from fl.frontend import Frontend, n_segments
from fl.locks import exclusive
from fl.store import SPLITS, SplitTable, write_store

log = logging.getLogger(__name__)

EXPECTED_RATE = 44100
CHUNK_CLIPS = 64


@dataclass
class PrepSummary:
    """What a prep produced."""

    store: Path
    clips: dict[str, int]
    patches: dict[str, int]
    uploaders: dict[str, int]
    audio_hours: float
    errors: int
    seconds: float

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [f"store: {self.store}  ({self.store.stat().st_size / 1e6:.1f} MB, "
               f"{self.audio_hours:.2f} h of audio, {self.seconds:.1f} s)"]
        for split in self.clips:
            out.append(f"  {split:5s}: {self.clips[split]:6d} clips  {self.patches[split]:7d} patches  "
                       f"{self.uploaders[split]:5d} uploaders")
        out.append(f"  errors: {self.errors} input(s) skipped (see errors.csv)")
        return out


class ClipError(Exception):
    """A clip that cannot be turned into features; recorded in the errors table."""


def load_audio(path: Path) -> tuple[np.ndarray, int, list[str]]:
    """Read an audio file as mono float32; returns (wave, sample rate, warnings). Raises ClipError on bad audio
    (:func:`fl.audio.read_audio`'s reasons)."""
    try:
        wave, rate = read_audio(path)
    except AudioFileError as exc:
        raise ClipError(exc.reason) from None
    notes = []
    if wave.shape[1] > 1:
        notes.append(f"{wave.shape[1]} channels mixed down to mono")
    if rate != EXPECTED_RATE:
        notes.append(f"sample rate {rate} Hz resampled")
    return to_mono(wave), rate, notes


def _check_length(n_samples: int, rate: int, config: FrontendConfig) -> None:
    """Raise ClipError for a clip too short for the centred STFT (:attr:`FrontendConfig.min_samples`), before
    it is resampled and framed."""
    resampled = math.ceil(n_samples * config.sample_rate / rate)  # torchaudio's Resample output length
    if resampled < config.min_samples:
        raise ClipError(f"too short: {n_samples} samples ({1000 * n_samples / rate:.1f} ms); the frontend needs "
                        f"at least {config.min_samples} samples at {config.sample_rate} Hz")


def _process_chunk(args: tuple[FrontendConfig, list[dict], str]) -> tuple[int, float]:
    """Compute one chunk's features and write its shard atomically. Returns (clips, audio seconds)."""
    config, jobs, shard_path = args
    import torch

    torch.set_num_threads(1)
    frontend = Frontend(config)
    dtype = np.dtype(config.store_dtype)
    frames, n_frames, errors, notes = [], [], [], []
    seconds = 0.0
    for job in jobs:
        try:
            wave, rate, warn = load_audio(Path(job["path"]))
            _check_length(len(wave), rate, config)
            feats = frontend.frames(wave, rate)
            if not np.isfinite(feats).all():
                raise ClipError("non-finite features")
            frames.append(feats.astype(dtype))
            n_frames.append(len(feats))
            seconds += len(wave) / rate
            notes.extend(f"{job['fname']}: {w}" for w in warn)
        except ClipError as exc:
            n_frames.append(-1)
            errors.append(str(exc))
    tmp = shard_path + ".tmp.npz"
    np.savez(tmp, frames=np.concatenate(frames) if frames else np.zeros((0, config.n_mels), dtype),
             n_frames=np.array(n_frames, dtype=np.int64), errors=np.array(errors, dtype=str),
             notes=np.array(notes, dtype=str), seconds=np.float64(seconds))
    os.replace(tmp, shard_path)
    return len(jobs), seconds


def _pool_context() -> mp.context.BaseContext:
    """Forked workers on Linux: a forked worker inherits the parent's imported torch, where a spawned one must
    import it again before its first clip. Each worker sets torch to one thread first (as DataLoader workers
    do), so no thread pool inherited from the parent is used. Elsewhere workers are spawned."""
    return mp.get_context("fork" if sys.platform == "linux" else "spawn")


def _fingerprint(config: FrontendConfig, jobs: pd.DataFrame) -> str:
    digest = hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode())
    digest.update("\n".join(jobs["path"]).encode())
    return digest.hexdigest()[:16]


def _shard_frames(shards: list[Path]) -> Iterator[np.ndarray]:
    """Yield the frames of each valid clip, shard by shard, in order (failed clips hold no frames)."""
    for shard in shards:
        with np.load(shard) as data:
            frames, n_frames = data["frames"], data["n_frames"]
        starts = np.concatenate([[0], np.cumsum(n_frames[n_frames >= 0])])
        for start, stop in zip(starts[:-1], starts[1:], strict=True):
            yield frames[start:stop]


def prep(
    root: Path, store: Path, config: FrontendConfig, workers: int = 0, progress: bool = True
) -> PrepSummary:
    """Turn an FSD50K-format tree into a feature store, manifests and ``errors.csv`` beside ``store``. The store
    is locked meanwhile (``STORE.lock``): a second prep into it is refused."""
    root, store = Path(root), Path(store)
    store.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(store, "feature store", is_dir=False):
        return _prep(root, store, config, workers, progress)


def _prep(root: Path, store: Path, config: FrontendConfig, workers: int, progress: bool) -> PrepSummary:
    started = time.perf_counter()
    index = read_index(root)
    clips = index.clips
    vocab = {label: k for k, label in enumerate(index.labels)}

    errors = [{"fname": r.fname, "split": r.split, "reason": "audio file without a ground-truth row"}
              for r in index.orphans.itertuples()]
    ok = np.ones(len(clips), dtype=bool)
    for i, row in enumerate(clips.itertuples()):
        unknown = [lab for lab in row.labels.split(",") if lab not in vocab]
        reason = ("no labels" if not row.labels else f"unknown label(s) {', '.join(unknown)}" if unknown
                  else "missing uploader in clips_info" if not row.uploader else None)
        if reason:
            errors.append({"fname": row.fname, "split": row.split, "reason": reason})
            ok[i] = False
    jobs = clips[ok].copy()
    jobs["split_order"] = jobs["split"].map({s: k for k, s in enumerate(SPLITS)})
    jobs = jobs.sort_values(["split_order", "uploader", "fname"], kind="stable").reset_index(drop=True)

    partial = store.with_name(store.name + ".partial")
    partial.mkdir(exist_ok=True)
    fingerprint = _fingerprint(config, jobs)
    stamp = partial / "fingerprint"
    if stamp.exists() and stamp.read_text() != fingerprint:
        raise DataError(f"{partial}: an unfinished prep with other inputs or features is here; "
                        "delete it or rerun with the same settings")
    stamp.write_text(fingerprint)
    for stale in partial.glob("*.tmp.npz"):
        stale.unlink()

    records = jobs[["fname", "path"]].to_dict("records")
    chunks = [records[i : i + CHUNK_CLIPS] for i in range(0, len(records), CHUNK_CLIPS)]
    shards = [partial / f"shard-{k:06d}.npz" for k in range(len(chunks))]
    todo = [(config, chunk, str(shard))
            for chunk, shard in zip(chunks, shards, strict=True) if not shard.exists()]
    done_clips = len(records) - sum(len(t[1]) for t in todo)
    bar = tqdm(total=len(records), initial=done_clips, unit="clip", disable=not progress, desc="prep")
    audio_seconds = 0.0
    if workers > 1 and len(todo) > 1:
        with _pool_context().Pool(workers) as pool:
            for n, seconds in pool.imap_unordered(_process_chunk, todo):
                audio_seconds += seconds
                bar.update(n)
                bar.set_postfix(audio_h_per_s=f"{audio_seconds / 3600 / (time.perf_counter() - started):.3f}")
    else:
        for task in todo:
            n, seconds = _process_chunk(task)
            audio_seconds += seconds
            bar.update(n)
            bar.set_postfix(audio_h_per_s=f"{audio_seconds / 3600 / (time.perf_counter() - started):.3f}")
    bar.close()

    n_frames_all, total_seconds = [], 0.0
    for k, shard in enumerate(shards):
        with np.load(shard) as data:
            n_frames = data["n_frames"]
            reasons = iter(data["errors"].tolist())
            for note in data["notes"].tolist():
                log.warning(note)
            total_seconds += float(data["seconds"])
        for j, n in enumerate(n_frames):
            if n < 0:
                job = chunks[k][j]
                errors.append({"fname": job["fname"], "split": jobs.loc[k * CHUNK_CLIPS + j, "split"],
                               "reason": next(reasons)})
        n_frames_all.append(n_frames)
    jobs["n_frames"] = np.concatenate(n_frames_all) if n_frames_all else np.zeros(0, np.int64)
    kept = jobs[jobs["n_frames"] >= 0].copy()
    kept["n_segs"] = [n_segments(int(n), config) for n in kept["n_frames"]]

    tables: dict[str, SplitTable] = {}
    for split in SPLITS:
        part = kept[kept["split"] == split].reset_index(drop=True)
        part["offset"] = np.concatenate([[0], np.cumsum(part["n_frames"].to_numpy())[:-1]]).astype(np.int64) \
            if len(part) else np.zeros(0, np.int64)
        labels = np.zeros((len(part), len(index.labels)), dtype=np.uint8)
        for i, names in enumerate(part["labels"]):
            labels[i, [vocab[n] for n in names.split(",")]] = 1
        tables[split] = SplitTable(part, labels)
        part[["fname", "labels", "mids", "split", "uploader", "n_segs"]].to_csv(
            store.parent / f"{split}.csv", index=False)

    # Shards hold clips in the same split order as the tables, so one pass over them feeds all splits.
    stream = _shard_frames(shards)
    frames_of = {split: (next(stream) for _ in range(len(tables[split].clips))) for split in SPLITS}
    error_table = pd.DataFrame(errors, columns=["fname", "split", "reason"])
    write_store(store, config, index.labels, index.mids, tables, frames_of, error_table)
    error_table.to_csv(store.parent / "errors.csv", index=False)
    shutil.rmtree(partial)
    return PrepSummary(
        store=store,
        clips={s: len(t.clips) for s, t in tables.items()},
        patches={s: int(t.clips["n_segs"].sum()) for s, t in tables.items()},
        uploaders={s: int(t.clips["uploader"].nunique()) for s, t in tables.items()},
        audio_hours=total_seconds / 3600,
        errors=len(error_table),
        seconds=time.perf_counter() - started,
    )

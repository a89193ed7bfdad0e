"""Reading FSD50K's release layout: vocabulary, ground truth, and uploaders from the clips_info JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fl.errors import DataError

GROUND_TRUTH = "FSD50K.ground_truth"
METADATA = "FSD50K.metadata"
AUDIO_DIRS = {"dev": "FSD50K.dev_audio", "eval": "FSD50K.eval_audio"}


@dataclass
class Fsd50kIndex:
    """Everything prep needs to know about a release tree before touching audio."""

    labels: list[str]
    mids: list[str]
    clips: pd.DataFrame  # fname, labels, mids, split, uploader, path (uploader may be missing -> "")
    orphans: pd.DataFrame  # audio files without a ground-truth row: fname, split, path


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: missing (is this an FSD50K directory?)")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot parse CSV: {exc}") from None


def _require_columns(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")


def read_vocabulary(root: Path) -> tuple[list[str], list[str]]:
    """``vocabulary.csv`` (no header: index, label, mid) -> (labels, mids) in index order."""
    path = root / GROUND_TRUTH / "vocabulary.csv"
    vocab = _read_csv(path, header=None)
    if vocab.shape[1] != 3:
        raise DataError(f"{path}: expected 3 columns (index, label, mid), found {vocab.shape[1]}")
    vocab = vocab.sort_values(0, key=lambda s: s.astype(int))
    return vocab[1].tolist(), vocab[2].tolist()


def read_uploaders(path: Path) -> dict[str, str]:
    """fname -> uploader from a ``*_clips_info_FSD50K.json`` file."""
    if not path.exists():
        raise DataError(f"{path}: missing clips_info metadata (needed for uploaders)")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected an object keyed by fname")
    return {str(fname): str(entry.get("uploader") or "") for fname, entry in info.items()
            if isinstance(entry, dict)}


def read_index(root: Path) -> Fsd50kIndex:
    """Read ground truth, vocabulary and uploaders; list audio files that have no ground-truth row."""
    root = Path(root)
    labels, mids = read_vocabulary(root)
    frames = []
    for part, csv_name, split_column in (("dev", "dev.csv", True), ("eval", "eval.csv", False)):
        path = root / GROUND_TRUTH / csv_name
        table = _read_csv(path)
        _require_columns(table, ["fname", "labels", "mids"] + (["split"] if split_column else []), path)
        if not split_column:
            table["split"] = "eval"
        uploaders = read_uploaders(root / METADATA / f"{part}_clips_info_FSD50K.json")
        table["uploader"] = table["fname"].map(uploaders).fillna("")
        table["path"] = [str(root / AUDIO_DIRS[part] / f"{f}.wav") for f in table["fname"]]
        table["part"] = part
        frames.append(table[["fname", "labels", "mids", "split", "uploader", "path", "part"]])
    clips = pd.concat(frames, ignore_index=True)
    bad_split = ~clips["split"].isin(["train", "val", "eval"])
    if bad_split.any():
        row = clips[bad_split].iloc[0]
        raise DataError(f"{root / GROUND_TRUTH / 'dev.csv'}: clip {row['fname']} has split {row['split']!r} "
                        "(expected train or val)")
    orphans = []
    for part, folder in AUDIO_DIRS.items():
        listed = set(clips.loc[clips["part"] == part, "fname"])
        directory = root / folder
        if directory.is_dir():
            for wav in sorted(directory.glob("*.wav")):
                if wav.stem not in listed:
                    orphans.append({"fname": wav.stem, "split": part, "path": str(wav)})
    return Fsd50kIndex(labels, mids, clips, pd.DataFrame(orphans, columns=["fname", "split", "path"]))

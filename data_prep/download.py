"""Download FSD50K from Zenodo: resumable, md5-checked; split zips are joined and extracted in pure Python.

Archives are kept in ``OUT/zips`` and extracted into ``OUT`` (``OUT/FSD50K.dev_audio/...``,
``OUT/FSD50K.ground_truth/...``). A rerun skips files recorded in ``OUT/zips/.verified.json`` and archives
whose ``OUT/zips/<archive>.extracted.json`` marker exists.
"""

import bisect
import hashlib
import http.client
import json
import os
import re
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tqdm import tqdm

from fl.errors import ConfigError, DataError, FedsoundError

ZENODO_BASE_URL = "https://zenodo.org/records/4060432/files"

# md5 of every file of Zenodo record 4060432 (FSD50K v1.0), as listed on the record; the same values appear
# in independent loaders (soundata's fsd50k module and others).
FSD50K_MD5: dict[str, str] = {
    "FSD50K.dev_audio.z01": "faa7cf4cc076fc34a44a479a5ed862a3",
    "FSD50K.dev_audio.z02": "8f9b66153e68571164fb1315d00bc7bc",
    "FSD50K.dev_audio.z03": "1196ef47d267a993d30fa98af54b7159",
    "FSD50K.dev_audio.z04": "d088ac4e11ba53daf9f7574c11cccac9",
    "FSD50K.dev_audio.z05": "81356521aa159accd3c35de22da28c7f",
    "FSD50K.dev_audio.zip": "c480d119b8f7a7e32fdb58f3ea4d6c5a",
    "FSD50K.eval_audio.z01": "3090670eaeecc013ca1ff84fe4442aeb",
    "FSD50K.eval_audio.zip": "6fa47636c3a3ad5c7dfeba99f2637982",
    "FSD50K.ground_truth.zip": "ca27382c195e37d2269c4c866dd73485",
    "FSD50K.metadata.zip": "b9ea0c829a411c1d42adb9da539ed237",
    "FSD50K.doc.zip": "3516162b82dc2945d3e7feba0904e800",
}

PARTS = ("dev", "eval", "meta")
ZIPS_DIRNAME = "zips"
VERIFIED_RECORD_NAME = ".verified.json"
MAX_RETRIES_WITHOUT_PROGRESS = 4

_CHUNK = 1 << 20
_USER_AGENT = "fedsound-download/1.0 (+urllib)"
_VOLUME_NAME = re.compile(r"^(?P<stem>.+)\.(?:zip|z(?P<number>\d{2,}))$")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(FedsoundError):
    """A file could not be fetched or did not match its expected md5."""


def part_of(name: str) -> str:
    """The part (``dev``, ``eval`` or ``meta``) a record file belongs to, from its name."""
    stem = _archive_stem(name)
    if stem.endswith(".dev_audio"):
        return "dev"
    if stem.endswith(".eval_audio"):
        return "eval"
    return "meta"


def download_fsd50k(
    out: Path,
    parts: Sequence[str] = PARTS,
    base_url: str = ZENODO_BASE_URL,
    files: Mapping[str, str] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    retry_delay: float = 2.0,
) -> list[Path]:
    """Fetch, verify and extract the FSD50K archives of ``parts`` (a sequence or "dev,eval") into ``out``.

    Each file ``{base_url}/{name}`` is downloaded to ``out/zips`` (resuming a ``.part`` file with HTTP Range)
    and checked against its md5; ``files`` (name -> md5) replaces the built-in table. Connection errors are
    retried with resume; ``retry_delay`` seconds (doubling) are waited only after attempts that received
    nothing. Returns the top-level paths extracted into ``out``, sorted.
    """
    if isinstance(parts, str):
        parts = [part.strip() for part in parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ConfigError(
            f"unknown part(s) {', '.join(unknown) or '(none given)'} in --parts; "
            f"choose from {', '.join(PARTS)}"
        )
    table = {name: md5.lower() for name, md5 in (FSD50K_MD5 if files is None else files).items()}
    archives: dict[str, list[str]] = {}
    for name in table:
        if part_of(name) in parts:
            archives.setdefault(_archive_stem(name), []).append(name)
    if not archives:
        raise ConfigError(f"no files to download for parts {list(parts)}")

    out = Path(out)
    zips = out / ZIPS_DIRNAME
    zips.mkdir(parents=True, exist_ok=True)
    verified = _VerifiedRecord(zips / VERIFIED_RECORD_NAME)
    extracted: set[Path] = set()
    order = sorted(archives, key=lambda stem: (PARTS.index(part_of(stem + ".zip")), stem))
    for stem in order:
        names = sorted(archives[stem], key=_volume_order)
        if not names[-1].endswith(".zip"):
            raise ConfigError(f"{stem}: the file table lists volumes {names} but not {stem}.zip")
        volumes = [
            _ensure_file(name, table[name], _file_url(base_url, name), zips, verified, progress, timeout,
                         retry_delay)
            for name in names
        ]
        marker = zips / f"{stem}.extracted.json"
        extracted.update(_extract_once(volumes, {name: table[name] for name in names}, out, marker, progress))
    return sorted(extracted)


def extract_zip(volumes: Sequence[Path], out: Path, progress: bool = True) -> list[Path]:
    """Extract a zip archive, single or spanned (``X.z01``, ``X.z02``, ..., ``X.zip`` in that order).

    Entries (stored or deflated) are written to a ``.partial`` name, CRC32-checked, then renamed, so an
    interrupted run never leaves a truncated file under its final name; files already present with the
    right size are kept. Returns the top-level paths of the archive under ``out``, sorted.
    """
    out = Path(out)
    with _Volumes(volumes) as archive:
        entries = _central_directory(archive)
        top_level = sorted({out / entry.parts[0] for entry in entries})
        for entry in tqdm(entries, desc=f"extract {archive.name}", unit="file", disable=not progress):
            target = out.joinpath(*entry.parts)
            if entry.is_dir:
                target.mkdir(parents=True, exist_ok=True)
            elif not (target.is_file() and target.stat().st_size == entry.size):
                target.parent.mkdir(parents=True, exist_ok=True)
                _extract_entry(archive, entry, target)
    return top_level


# --------------------------------------------------------------------------------------------- download


class _VerifiedRecord:
    """``name -> {md5, size}`` of files already checked, saved atomically after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, object]] = {}
        if path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except json.JSONDecodeError:
                self.entries = {}  # unreadable record: files are simply hashed again

    def matches(self, name: str, md5: str, path: Path) -> bool:
        return self.entries.get(name) == {"md5": md5, "size": path.stat().st_size}

    def add(self, name: str, md5: str, path: Path) -> None:
        self.entries[name] = {"md5": md5, "size": path.stat().st_size}
        _write_json_atomic(self.path, self.entries)


@dataclass
class _PartialFile:
    """A ``.part`` download and the md5 of the bytes it holds so far."""

    path: Path
    size: int = 0
    md5: "hashlib._Hash" = field(default_factory=hashlib.md5)

    @classmethod
    def resume(cls, path: Path, progress: bool) -> "_PartialFile":
        partial = cls(path)
        if path.is_file():
            partial.md5 = _md5_of(path, progress, desc=f"rehash {path.name}")
            partial.size = path.stat().st_size
        return partial

    def restart(self) -> None:
        self.path.write_bytes(b"")
        self.size = 0
        self.md5 = hashlib.md5()


def _ensure_file(
    name: str,
    md5: str,
    url: str,
    zips: Path,
    verified: _VerifiedRecord,
    progress: bool,
    timeout: float,
    retry_delay: float,
) -> Path:
    """Return ``zips/name`` with the expected md5, downloading it (at most twice) when needed."""
    final = zips / name
    if final.is_file():
        if verified.matches(name, md5, final):
            return final
        if _md5_of(final, progress, desc=f"verify {name}").hexdigest() == md5:
            verified.add(name, md5, final)
            return final
        final.unlink()  # changed or corrupt since it was verified: fetch it again
    part = zips / f"{name}.part"
    got = ""
    for attempt in range(2):
        if attempt:
            part.unlink(missing_ok=True)  # the second try starts from scratch
        got = _fetch(name, url, part, progress, timeout, retry_delay)
        if got == md5:
            os.replace(part, final)
            verified.add(name, md5, final)
            return final
    part.unlink(missing_ok=True)
    raise DownloadError(f"{name}: md5 mismatch after a fresh re-download (expected {md5}, got {got})")


def _fetch(name: str, url: str, part: Path, progress: bool, timeout: float, retry_delay: float) -> str:
    """Download ``url`` into ``part``, resuming what is there; return the md5 of the whole file."""
    partial = _PartialFile.resume(part, progress)
    failures = 0
    with tqdm(desc=name, initial=partial.size, unit="B", unit_scale=True, unit_divisor=1024,
              disable=not progress) as bar:
        while True:
            size_before = partial.size
            try:
                _stream_once(name, url, partial, bar, timeout)
                return partial.md5.hexdigest()
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500:
                    raise DownloadError(f"{name}: HTTP {exc.code} {exc.reason} for {url}") from exc
                error: Exception = exc
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                error = exc
            failures = 0 if partial.size > size_before else failures + 1
            if failures > MAX_RETRIES_WITHOUT_PROGRESS:
                raise DownloadError(
                    f"{name}: download failed {failures} times in a row without progress "
                    f"({type(error).__name__}: {error}); rerun to resume from byte {partial.size}"
                ) from error
            if failures:
                time.sleep(retry_delay * 2 ** (failures - 1))


def _stream_once(name: str, url: str, partial: _PartialFile, bar: tqdm, timeout: float) -> None:
    """One HTTP request appending to ``partial``; raises ConnectionError if the body ends early."""
    headers = {"User-Agent": _USER_AGENT}
    if partial.size:
        headers["Range"] = f"bytes={partial.size}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and partial.size:
            return  # nothing left after our offset: the file is complete, the md5 check decides
        raise
    with response:
        if partial.size and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            match = _CONTENT_RANGE.fullmatch(content_range.strip())
            if match is None or int(match.group(1)) != partial.size:
                raise DownloadError(
                    f"{name}: asked for bytes from {partial.size}, server sent range {content_range!r}"
                )
        elif partial.size:  # the server ignored Range and sends the whole file
            partial.restart()
            bar.reset()
        length = response.headers.get("Content-Length")
        expected_end = partial.size + int(length) if length is not None else None
        if expected_end is not None:
            bar.total = expected_end
            bar.refresh()
        with open(partial.path, "ab") as sink:
            while chunk := response.read(_CHUNK):
                sink.write(chunk)
                partial.md5.update(chunk)
                partial.size += len(chunk)
                bar.update(len(chunk))
    if expected_end is not None and partial.size < expected_end:
        raise ConnectionError(f"connection closed after byte {partial.size} of {expected_end}")


def _md5_of(path: Path, progress: bool, desc: str) -> "hashlib._Hash":
    md5 = hashlib.md5()
    with open(path, "rb") as source, tqdm(desc=desc, total=path.stat().st_size, unit="B", unit_scale=True,
                                          unit_divisor=1024, disable=not progress) as bar:
        while chunk := source.read(_CHUNK):
            md5.update(chunk)
            bar.update(len(chunk))
    return md5


def _file_url(base_url: str, name: str) -> str:
    return f"{base_url.rstrip('/')}/{urllib.parse.quote(name)}"


def _archive_stem(name: str) -> str:
    match = _VOLUME_NAME.match(name)
    if match is None:
        raise ConfigError(f"{name}: not a zip volume name (expected X.zip or X.z01, X.z02, ...)")
    return match.group("stem")


def _volume_order(name: str) -> int:
    """Spanned volumes come in the order X.z01, X.z02, ..., X.zip."""
    number = _VOLUME_NAME.match(name).group("number")
    return int(number) if number else 1 << 30


def _write_json_atomic(path: Path, payload: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _extract_once(volumes: list[Path], md5s: dict[str, str], out: Path, marker: Path,
                  progress: bool) -> list[Path]:
    """Extract unless ``marker`` says these very volumes were already fully extracted."""
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except json.JSONDecodeError:
            done = {}
        if done.get("volumes") == md5s:
            return [out / name for name in done["top_level"]]
    top_level = extract_zip(volumes, out, progress)
    _write_json_atomic(marker, {"volumes": md5s, "top_level": [path.name for path in top_level]})
    return top_level


# ------------------------------------------------------------------------------------------------ zip

_EOCD = struct.Struct("<4sHHHHIIH")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL_ENTRY = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_MAX_EOCD_SEARCH = _EOCD.size + 0xFFFF


class _Volumes:
    """The volumes of a (possibly spanned) zip archive read as one virtual byte stream."""

    def __init__(self, paths: Sequence[Path]) -> None:
        if not paths:
            raise DataError("extract_zip: no archive volumes given")
        self.paths = [Path(path) for path in paths]
        self.name = self.paths[-1].name
        missing = [str(path) for path in self.paths if not path.is_file()]
        if missing:
            raise DataError(f"{missing[0]}: archive volume not found")
        self.sizes = [path.stat().st_size for path in self.paths]
        self.starts = [sum(self.sizes[:disk]) for disk in range(len(self.sizes))]
        self.size = sum(self.sizes)
        self._handles: list[IO[bytes]] = []

    def __enter__(self) -> "_Volumes":
        self._handles = [open(path, "rb") for path in self.paths]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.close()

    def absolute(self, disk: int, offset: int) -> int:
        """Position in the joined stream of ``offset`` bytes into volume ``disk``."""
        if disk >= len(self.paths):
            raise DataError(f"{self.name}: refers to volume {disk + 1} of only {len(self.paths)}")
        return self.starts[disk] + offset

    def read(self, position: int, count: int) -> bytes:
        """Exactly ``count`` bytes from ``position`` of the joined stream (may cross volumes)."""
        if position < 0 or position + count > self.size:
            raise DataError(f"{self.name}: truncated archive (read of {count} bytes at {position})")
        pieces = []
        while count:
            disk = bisect.bisect_right(self.starts, position) - 1
            handle = self._handles[disk]
            handle.seek(position - self.starts[disk])
            piece = handle.read(min(count, self.starts[disk] + self.sizes[disk] - position))
            pieces.append(piece)
            position += len(piece)
            count -= len(piece)
        return b"".join(pieces)


@dataclass(frozen=True)
class _Entry:
    parts: tuple[str, ...]
    is_dir: bool
    method: int
    crc: int
    compressed_size: int
    size: int
    header_position: int


def _central_directory(archive: _Volumes) -> list[_Entry]:
    """Parse the end records and the central directory into entries with absolute header positions."""
    last_start = archive.starts[-1]
    tail_start = max(last_start, archive.size - _MAX_EOCD_SEARCH)
    tail = archive.read(tail_start, archive.size - tail_start)
    found = tail.rfind(b"PK\x05\x06")
    if found < 0 or found + _EOCD.size > len(tail):
        raise DataError(f"{archive.name}: no end of central directory record (not a zip, or truncated)")
    eocd_position = tail_start + found
    _, disk, cd_disk, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, found)
    locator_position = eocd_position - _ZIP64_LOCATOR.size
    if locator_position >= 0 and archive.read(locator_position, 4) == b"PK\x06\x07":
        locator = archive.read(locator_position, _ZIP64_LOCATOR.size)
        _, z64_disk, z64_offset, _ = _ZIP64_LOCATOR.unpack(locator)
        record = archive.read(archive.absolute(z64_disk, z64_offset), _ZIP64_EOCD.size)
        signature, _, _, _, disk, cd_disk, _, count, cd_size, cd_offset = _ZIP64_EOCD.unpack(record)
        if signature != b"PK\x06\x06":
            raise DataError(f"{archive.name}: bad zip64 end of central directory record")
    if disk + 1 != len(archive.paths):
        raise DataError(f"{archive.name}: the archive has {disk + 1} volume(s) but {len(archive.paths)} "
                        "were given (expected X.z01, X.z02, ..., X.zip)")
    directory = archive.read(archive.absolute(cd_disk, cd_offset), cd_size)
    entries = []
    position = 0
    for _ in range(count):
        entry, position = _parse_central_entry(archive, directory, position)
        entries.append(entry)
    return entries


def _parse_central_entry(archive: _Volumes, directory: bytes, position: int) -> tuple[_Entry, int]:
    if directory[position:position + 4] != b"PK\x01\x02":
        raise DataError(f"{archive.name}: corrupt central directory at byte {position}")
    (_, _, _, flags, method, _, _, crc, compressed_size, size, name_length, extra_length, comment_length,
     disk, _, _, header_offset) = _CENTRAL_ENTRY.unpack_from(directory, position)
    start = position + _CENTRAL_ENTRY.size
    raw_name = directory[start:start + name_length]
    extra = directory[start + name_length:start + name_length + extra_length]
    name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
    size, compressed_size, header_offset, disk = _apply_zip64_extra(
        extra, [size, compressed_size, header_offset, disk]
    )
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if name.startswith("/") or "\\" in name or ".." in parts or not parts or ":" in parts[0]:
        raise DataError(f"{archive.name}: unsafe entry name {name!r}")
    if flags & 0x1:
        raise DataError(f"{archive.name}: entry {name!r} is encrypted")
    is_dir = name.endswith("/")
    if not is_dir and method not in (0, 8):
        raise DataError(f"{archive.name}: entry {name!r} uses compression method {method} (only 0, 8)")
    entry = _Entry(parts, is_dir, method, crc, compressed_size, size, archive.absolute(disk, header_offset))
    return entry, start + name_length + extra_length + comment_length


def _apply_zip64_extra(extra: bytes, fields: list[int]) -> list[int]:
    """Replace saturated sizes / offset / disk (in that order) by the values of the zip64 extra field."""
    saturated = (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFF)
    position = 0
    while position + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, position)
        if tag == 0x0001:
            cursor = position + 4
            for index, limit in enumerate(saturated):
                if fields[index] == limit:
                    width, code = (4, "<I") if index == 3 else (8, "<Q")
                    (fields[index],) = struct.unpack_from(code, extra, cursor)
                    cursor += width
            break
        position += 4 + length
    return fields


def _extract_entry(archive: _Volumes, entry: _Entry, target: Path) -> None:
    header = archive.read(entry.header_position, _LOCAL_HEADER.size)
    signature, *_, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    name = "/".join(entry.parts)
    if signature != b"PK\x03\x04":
        raise DataError(f"{archive.name}: bad local header for {name}")
    position = entry.header_position + _LOCAL_HEADER.size + name_length + extra_length
    inflater = zlib.decompressobj(-zlib.MAX_WBITS) if entry.method == 8 else None
    tmp = target.with_name(target.name + ".partial")
    crc = 0
    written = 0
    with open(tmp, "wb") as sink:
        remaining = entry.compressed_size
        while remaining:
            chunk = archive.read(position, min(_CHUNK, remaining))
            position += len(chunk)
            remaining -= len(chunk)
            data = inflater.decompress(chunk) if inflater else chunk
            sink.write(data)
            crc = zlib.crc32(data, crc)
            written += len(data)
        if inflater:
            data = inflater.flush()
            sink.write(data)
            crc = zlib.crc32(data, crc)
            written += len(data)
    if crc != entry.crc or written != entry.size:
        tmp.unlink()
        raise DataError(
            f"{archive.name}: {name} is corrupt (CRC32 {crc:08x}, {written} bytes; "
            f"expected {entry.crc:08x}, {entry.size} bytes)"
        )
    os.replace(tmp, target)

"""FSD50K downloader against a local HTTP server: resume, checksums, reruns, split-zip extraction."""

import hashlib
import io
import json
import re
import shutil
import socket
import struct
import subprocess
import threading
import urllib.parse
import zipfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from data_prep.download import (
    VERIFIED_RECORD_NAME,
    ZIPS_DIRNAME,
    DownloadError,
    download_fsd50k,
    extract_zip,
)
from fl.errors import ConfigError, DataError

DEV_STEM = "FSD50K.dev_audio"
GROUND_TRUTH = "FSD50K.ground_truth.zip"


# ------------------------------------------------------------------------------------------ test data


def dev_audio_files(seed: int = 0) -> dict[str, bytes]:
    """Incompressible "audio" (so a 64 KiB split gives several volumes) plus a compressible text file."""
    rng = np.random.default_rng(seed)
    return {
        f"{DEV_STEM}/1001.wav": rng.bytes(150_000),
        f"{DEV_STEM}/sub/1002.wav": rng.bytes(60_000),
        f"{DEV_STEM}/notes.txt": "\n".join(f"line {i}" for i in range(3000)).encode(),
    }


def ground_truth_files() -> dict[str, bytes]:
    return {"FSD50K.ground_truth/dev.csv": b"fname,labels,mids,split\n1001,Bark,/m/05tny_,train\n"}


def single_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def split_with_zip_binary(files: dict[str, bytes], work: Path) -> dict[str, bytes]:
    """Volumes X.z01.. X.zip written by Info-ZIP's ``zip -s 64k``."""
    source = work / "src"
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    target = work / "zipped"
    target.mkdir()
    subprocess.run(["zip", "-q", "-r", "-s", "64k", str(target / f"{DEV_STEM}.zip"), DEV_STEM],
                   cwd=source, check=True, timeout=30)
    return {path.name: path.read_bytes() for path in target.iterdir()}


def split_in_python(files: dict[str, bytes], volume_size: int = 40_000) -> dict[str, bytes]:
    """A spanned archive built without ``zip``: one zip stream behind the spanning signature, cut into
    volumes, with every central-directory offset rewritten as (volume, offset in volume)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, (name, data) in enumerate(files.items()):
            method = zipfile.ZIP_DEFLATED if index % 2 else zipfile.ZIP_STORED
            archive.writestr(name, data, compress_type=method)
    stream = bytearray(b"PK\x07\x08" + buffer.getvalue())
    eocd = stream.rfind(b"PK\x05\x06")
    count, cd_size, cd_offset = struct.unpack_from("<HII", stream, eocd + 10)
    cd_start = 4 + cd_offset
    position = cd_start
    for _ in range(count):
        (header_offset,) = struct.unpack_from("<I", stream, position + 42)
        disk, offset = divmod(4 + header_offset, volume_size)
        struct.pack_into("<H", stream, position + 34, disk)
        struct.pack_into("<I", stream, position + 42, offset)
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", stream, position + 28)
        position += 46 + name_length + extra_length + comment_length
    last = eocd // volume_size
    cd_disk, cd_offset_in_volume = divmod(cd_start, volume_size)
    struct.pack_into("<HHHHII", stream, eocd + 4, last, cd_disk, count, count, cd_size, cd_offset_in_volume)
    assert last >= 2, "test data too small to span several volumes"
    volumes = {f"{DEV_STEM}.z{disk + 1:02d}": bytes(stream[disk * volume_size:(disk + 1) * volume_size])
               for disk in range(last)}
    volumes[f"{DEV_STEM}.zip"] = bytes(stream[last * volume_size:])
    return volumes


def md5_table(blobs: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.md5(data).hexdigest() for name, data in blobs.items()}


def assert_extracted(out: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (out / name).read_bytes() == data, name


# ---------------------------------------------------------------------------------------- HTTP server


class FileServer:
    """Serves ``blobs`` at ``/files/<name>`` on 127.0.0.1 with Range support and fault modes."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.requests: list[tuple[str, str | None]] = []
        self.cut_once: set[str] = set()  # send half the body, then close the connection (once per name)
        self.corrupt: set[str] = set()  # serve inverted bytes
        self.ignore_range = False  # answer 200 with the whole file even to a Range request
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/files"

    def ranges(self, name: str) -> list[str | None]:
        """The Range header of every GET for ``name``, in order (None: no Range)."""
        return [header for requested, header in self.requests if requested == name]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = urllib.parse.unquote(self.path.rsplit("/", 1)[-1])
                range_header = self.headers.get("Range")
                server.requests.append((name, range_header))
                data = server.blobs.get(name)
                if data is None:
                    self.send_error(404)
                    return
                if name in server.corrupt:
                    data = bytes(byte ^ 0xFF for byte in data)
                start = 0
                if range_header and not server.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.cut_once:
                    server.cut_once.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, bytes]], FileServer]]:
    servers: list[FileServer] = []

    def start(blobs: dict[str, bytes]) -> FileServer:
        server = FileServer(blobs)
        server.thread.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.httpd.shutdown()
        server.httpd.server_close()


def dev_and_ground_truth() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(served blobs, all files the archives contain): pure-Python split dev audio + ground truth zip."""
    dev = dev_audio_files()
    blobs = split_in_python(dev) | {GROUND_TRUTH: single_zip(ground_truth_files())}
    return blobs, dev | ground_truth_files()


def fetch(server: FileServer, out: Path, blobs: dict[str, bytes], parts: tuple[str, ...] = ("dev", "meta"),
          **kwargs: object) -> list[Path]:
    return download_fsd50k(out, parts=parts, base_url=server.url, files=md5_table(blobs), progress=False,
                           timeout=5.0, **kwargs)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("builder", ["zip_binary", "python"])
def test_full_download_joins_and_extracts(builder: str, serve, tmp_path: Path) -> None:
    dev = dev_audio_files()
    if builder == "zip_binary":
        if shutil.which("zip") is None:
            pytest.skip("the zip binary is not installed")
        volumes = split_with_zip_binary(dev, tmp_path / "build")
    else:
        volumes = split_in_python(dev)
    assert len(volumes) >= 3
    blobs = volumes | {GROUND_TRUTH: single_zip(ground_truth_files())}
    server = serve(blobs)
    out = tmp_path / "fsd50k"

    extracted = fetch(server, out, blobs)

    assert extracted == [out / "FSD50K.dev_audio", out / "FSD50K.ground_truth"]
    assert_extracted(out, dev | ground_truth_files())
    assert sorted(name for name, _ in server.requests) == sorted(blobs)
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.part"))
    for name, data in blobs.items():
        assert (out / ZIPS_DIRNAME / name).read_bytes() == data


def test_resume_after_connection_cut_uses_range(serve, tmp_path: Path) -> None:
    blobs, contents = dev_and_ground_truth()
    server = serve(blobs)
    first_volume = f"{DEV_STEM}.z01"
    server.cut_once.add(first_volume)

    fetch(server, tmp_path / "out", blobs)

    ranges = server.ranges(first_volume)
    assert len(ranges) == 2 and ranges[0] is None
    resumed_from = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert 0 < resumed_from < len(blobs[first_volume])
    assert_extracted(tmp_path / "out", contents)


def test_server_ignoring_range_restarts_the_file(serve, tmp_path: Path) -> None:
    blobs, contents = dev_and_ground_truth()
    server = serve(blobs)
    server.ignore_range = True
    server.cut_once.add(f"{DEV_STEM}.zip")

    fetch(server, tmp_path / "out", blobs)

    ranges = server.ranges(f"{DEV_STEM}.zip")
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] is not None  # asked for a range, got it all
    assert (tmp_path / "out" / ZIPS_DIRNAME / f"{DEV_STEM}.zip").read_bytes() == blobs[f"{DEV_STEM}.zip"]
    assert_extracted(tmp_path / "out", contents)


def test_checksum_mismatch_refetches_once_then_fails(serve, tmp_path: Path) -> None:
    blobs, _ = dev_and_ground_truth()
    server = serve(blobs)
    bad = f"{DEV_STEM}.zip"
    server.corrupt.add(bad)
    expected = hashlib.md5(blobs[bad]).hexdigest()
    served = hashlib.md5(bytes(byte ^ 0xFF for byte in blobs[bad])).hexdigest()

    with pytest.raises(DownloadError) as raised:
        fetch(server, tmp_path / "out", blobs)

    message = str(raised.value)
    assert bad in message and expected in message and served in message and "\n" not in message
    assert server.ranges(bad) == [None, None]  # exactly two fetches, the second from scratch
    zips = tmp_path / "out" / ZIPS_DIRNAME
    assert not (zips / bad).exists() and not (zips / f"{bad}.part").exists()
    assert (zips / f"{DEV_STEM}.z01").read_bytes() == blobs[f"{DEV_STEM}.z01"]  # verified work is kept


def test_rerun_skips_verified_files_and_reverifies_changed_ones(serve, tmp_path: Path) -> None:
    blobs, contents = dev_and_ground_truth()
    server = serve(blobs)
    out = tmp_path / "out"
    first = fetch(server, out, blobs)
    record = json.loads((out / ZIPS_DIRNAME / VERIFIED_RECORD_NAME).read_text())
    assert record == {name: {"md5": md5, "size": len(blobs[name])} for name, md5 in md5_table(blobs).items()}
    server.requests.clear()

    assert (out / ZIPS_DIRNAME / f"{DEV_STEM}.extracted.json").is_file()
    assert fetch(server, out, blobs) == first
    assert server.requests == []

    changed = out / ZIPS_DIRNAME / f"{DEV_STEM}.z02"
    changed.write_bytes(changed.read_bytes() + b"x")
    fetch(server, out, blobs)
    assert server.requests == [(f"{DEV_STEM}.z02", None)]
    assert changed.read_bytes() == blobs[f"{DEV_STEM}.z02"]
    assert_extracted(out, contents)


def test_parts_select_files_and_unknown_part_is_an_error(serve, tmp_path: Path) -> None:
    blobs, _ = dev_and_ground_truth()
    server = serve(blobs)

    extracted = fetch(server, tmp_path / "out", blobs, parts=("meta",))
    assert extracted == [tmp_path / "out" / "FSD50K.ground_truth"]
    assert [name for name, _ in server.requests] == [GROUND_TRUTH]

    for parts in (("dev", "bogus"), "dev,bogus"):
        with pytest.raises(ConfigError, match=r"bogus.*choose from dev, eval, meta"):
            download_fsd50k(tmp_path / "other", parts=parts, base_url=server.url, progress=False)
    assert not (tmp_path / "other").exists()


def test_missing_file_and_dead_server_name_the_file(serve, tmp_path: Path) -> None:
    blobs, _ = dev_and_ground_truth()
    server = serve({name: data for name, data in blobs.items() if name != GROUND_TRUTH})
    with pytest.raises(DownloadError, match=rf"{re.escape(GROUND_TRUTH)}: HTTP 404"):
        fetch(server, tmp_path / "a", blobs, parts=("meta",))
    assert server.ranges(GROUND_TRUTH) == [None]

    with socket.socket() as probe:  # a port on which nothing listens once the probe is closed
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}/files"
    with pytest.raises(DownloadError, match=rf"{re.escape(GROUND_TRUTH)}: download failed"):
        download_fsd50k(tmp_path / "b", parts=("meta",), base_url=dead_url, files=md5_table(blobs),
                        progress=False, timeout=2.0, retry_delay=0.0)


def test_corrupt_entry_fails_crc_and_leaves_no_file(tmp_path: Path) -> None:
    payload = b"0123456789" * 100
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("FSD50K.doc/README.md", payload)
    data = bytearray(buffer.getvalue())
    data[data.find(payload) + 5] ^= 0xFF
    (tmp_path / "FSD50K.doc.zip").write_bytes(bytes(data))

    with pytest.raises(DataError, match=r"FSD50K.doc.zip: FSD50K.doc/README.md is corrupt"):
        extract_zip([tmp_path / "FSD50K.doc.zip"], tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").rglob("README.md*"))


def test_split_archive_needs_all_volumes(tmp_path: Path) -> None:
    volumes = split_in_python(dev_audio_files())
    for name, data in volumes.items():
        (tmp_path / name).write_bytes(data)
    given = [tmp_path / f"{DEV_STEM}.z01", tmp_path / f"{DEV_STEM}.zip"]
    with pytest.raises(DataError, match=rf"has {len(volumes)} volume\(s\) but 2 were given"):
        extract_zip(given, tmp_path / "out", progress=False)

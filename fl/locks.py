"""Exclusive writer locks on run directories, sweep directories, stores being written and profiles.

A lock is a POSIX record lock (``lockf``) on a small lock file (``DIR/.fedsound.lock`` for a folder, ``FILE.lock``
beside a file) that records its holder (pid, host, command, start time). The operating system releases it when the
holder exits, however it exits, so a killed run never leaves a stale lock; unlike ``flock``, a record lock is not
inherited by a forked child, which could otherwise keep it after the holder let go. A second writer is refused at
once with a one-line :class:`LockedError` naming the holder. Within one process the lock is re-entrant (a driver
and the Flower ServerApp it runs in a thread share it); the process opens each lock file once while it holds it.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fl.errors import FedsoundError

LOCK_NAME = ".fedsound.lock"


class LockedError(FedsoundError):
    """Another process is writing the same run, sweep, store or profile."""


_held: dict[Path, tuple[int, int]] = {}  # lock file -> (file descriptor, holders in this process)
_guard = threading.Lock()


def lock_path(target: Path, is_dir: bool) -> Path:
    """The lock file of ``target``: inside it for a folder, beside it for a file."""
    target = Path(target).resolve()
    return target / LOCK_NAME if is_dir else target.with_name(target.name + ".lock")


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return (f"pid {holder['pid']} on {holder['host']} ({holder['command']}) since {holder['since']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def exclusive(target: Path, what: str, is_dir: bool = True) -> Iterator[Path]:
    """Hold the writer lock of ``target`` (a folder, created if missing, or a file) inside the block; a
    :class:`LockedError` naming ``what``, the target and the holder if another process holds it."""
    path = lock_path(target, is_dir)
    with _guard:
        if path in _held:
            fd, count = _held[path]
            _held[path] = (fd, count + 1)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                raise LockedError(f"{target}: this {what} is in use by {_holder_text(path)}; wait for it to "
                                  "finish or write elsewhere") from None
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200],
                      "since": datetime.datetime.now().isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            _held[path] = (fd, 1)
    try:
        yield path
    finally:
        with _guard:
            fd, count = _held[path]
            if count > 1:
                _held[path] = (fd, count - 1)
            else:
                del _held[path]
                os.close(fd)  # closing the descriptor releases the lock

"""Exclusive use of an output folder: one run writes into it at a time.

The lock is an ``flock`` on a file in the folder, so the kernel releases it when its holder
dies, however it dies; the file names the holder (host, pid, start time) for whoever is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

LOCK_SUFFIX = ".lock"


class FolderInUse(RuntimeError):
    """Another live process holds the folder; the message names the folder and the holder."""


@contextmanager
def exclusive(folder: Path, name: str = f".stage{LOCK_SUFFIX}") -> Iterator[None]:
    """Hold ``folder/name`` for the block; FolderInUse at once, having changed nothing, when another process does."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # never truncates a holder's record
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUse(f"{folder}: in use by another run ({_holder(fd)}); nothing was written") from None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": datetime.now(UTC).isoformat()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        return f"host {record['host']}, pid {record['pid']}, started {record['started_at']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"

"""
The real QEMU captures in tests/data/captures (see its README): the bytes a
real QEMU 7.2 / 10.0 source sent on each connection, and its guest memory.
"""

from __future__ import annotations

import functools
import gzip
import os

import attrs

DATA = os.path.join(os.path.dirname(__file__), "data", "captures")
CAPTURE_NAMES = ("cap72-1", "cap72-4", "cap10-1", "cap10-4", "cap10-4-zstd")


@attrs.frozen
class RecordedMigration:
    name: str
    streams: tuple[bytes, ...]  # streams[0] is the main channel, as connected first

    @property
    def channels(self) -> int:
        return len(self.streams) - 1

    @property
    def memory(self) -> bytes:
        return _memory(self.name)


@functools.lru_cache(maxsize=None)
def _memory(name: str) -> bytes:
    with gzip.open(os.path.join(DATA, name, "src-mem.bin.gz")) as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def recorded(name: str) -> RecordedMigration:
    folder = os.path.join(DATA, name)
    files = sorted(
        (f for f in os.listdir(folder) if f.startswith("conn-")),
        key=lambda f: int(f.split("-")[1].split(".")[0]),
    )
    streams = []
    for file in files:
        with gzip.open(os.path.join(folder, file)) as f:
            streams.append(f.read())
    return RecordedMigration(name, tuple(streams))

"""
Multifd payload compression: the values QEMU puts in bits 1-5 of a packet's
flags, and one persistent (de)compression stream per channel, because QEMU
compresses all of a channel's packets as one never-finished stream, each
packet ended by a sync flush.
"""

from __future__ import annotations

import zlib
from typing import Protocol

from ._errors import ProtocolError, UnsupportedFeature

COMPRESSION_MASK = 0x3E

COMPRESSION_VALUES: dict[str, int] = {
    "none": 0x00,
    "zlib": 0x02,
    "zstd": 0x04,
    "qpl": 0x08,
    "uadk": 0x10,
    "qatzip": 0x20,
}
COMPRESSION_NAMES = {value: name for name, value in COMPRESSION_VALUES.items()}
SUPPORTED_COMPRESSION = ("none", "zlib", "zstd")


def compressionName(value: int) -> str:
    return COMPRESSION_NAMES.get(value, f"unknown ({value:#04x})")


class Decompressor(Protocol):
    def decompress(self, payload: bytes, expectedLength: int) -> bytes: ...


class _ZlibDecompressor:
    def __init__(self) -> None:
        self._stream = zlib.decompressobj()

    def decompress(self, payload: bytes, expectedLength: int) -> bytes:
        try:
            # Bounded: a hostile stream cannot make us inflate more than the
            # packet's pages.
            out = self._stream.decompress(payload, expectedLength + 1)
        except zlib.error as e:
            raise ProtocolError(f"zlib stream is corrupt: {e}", field="payload")
        if len(out) != expectedLength or self._stream.unconsumed_tail:
            raise ProtocolError(
                f"zlib payload inflates to {len(out)}{'+' if self._stream.unconsumed_tail else ''}"
                f" bytes, expected {expectedLength}",
                field="payload",
            )
        return out


class _ZstdDecompressor:
    def __init__(self) -> None:
        import zstandard

        self._error = zstandard.ZstdError
        self._stream = zstandard.ZstdDecompressor().decompressobj()

    def decompress(self, payload: bytes, expectedLength: int) -> bytes:
        try:
            out = self._stream.decompress(payload)
        except self._error as e:
            raise ProtocolError(f"zstd stream is corrupt: {e}", field="payload")
        if len(out) != expectedLength:
            raise ProtocolError(
                f"zstd payload decompresses to {len(out)} bytes, expected {expectedLength}",
                field="payload",
            )
        return out


def makeDecompressor(value: int) -> Decompressor:
    name = compressionName(value)
    if name == "zlib":
        return _ZlibDecompressor()
    if name == "zstd":
        return _ZstdDecompressor()
    raise UnsupportedFeature(
        f"multifd compression {name} is not supported (only {', '.join(SUPPORTED_COMPRESSION)})",
        field="packet flags",
    )


class Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...


class _ZlibCompressor:
    def __init__(self, level: int) -> None:
        self._stream = zlib.compressobj(level)

    def compress(self, data: bytes) -> bytes:
        return self._stream.compress(data) + self._stream.flush(zlib.Z_SYNC_FLUSH)


class _ZstdCompressor:
    def __init__(self, level: int) -> None:
        import zstandard

        self._flush = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        self._stream = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._stream.compress(data) + self._stream.flush(self._flush)


def makeCompressor(name: str, level: int | None = None) -> Compressor:
    """
    A persistent per-channel compression stream in QEMU's convention: each
    packet's pages back to back, ended by a sync flush, never finished.
    """
    if name == "zlib":
        return _ZlibCompressor(1 if level is None else level)
    if name == "zstd":
        return _ZstdCompressor(1 if level is None else level)
    raise ValueError(f"no compressor for {name!r}")

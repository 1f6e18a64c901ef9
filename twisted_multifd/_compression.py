"""
Multifd payload compression: the values QEMU puts in bits 1-5 of a packet's
flags, and one persistent (de)compression stream per channel, because QEMU
compresses all of a channel's packets as one never-finished stream, each
packet ended by a sync flush.
"""

from __future__ import annotations

import zlib
from typing import Any, Protocol

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


# RFC 8878 (zstd) framing, which _ZstdDecompressor walks itself.
ZSTD_FRAME_MAGIC = 0xFD2FB528
# Block_Maximum_Size: no block (raw, RLE or compressed) regenerates more.
ZSTD_BLOCK_MAXIMUM_SIZE = 128 * 1024
# QEMU's multifd-zstd-level goes up to 20, whose streams (of unknown size, as
# QEMU's are) use a 32 MiB window; zstd's own default limit is 128 MiB.
ZSTD_MAX_WINDOW_SIZE = 32 * 1024 * 1024
_ZSTD_BLOCK_HEADER_SIZE = 3
_ZSTD_RAW, _ZSTD_RLE, _ZSTD_COMPRESSED = 0, 1, 2
# Where in the stream the unscanned bytes start.
_AT_FRAME_HEADER, _AT_BLOCK, _AT_CHECKSUM = "frame header", "block", "checksum"


class _ZstdDecompressor:
    """
    One channel's zstd stream, decompressed with a bound on its output.

    zstandard's streaming decompressors take no output limit, so a small
    hostile payload could inflate to gigabytes before the length check sees
    it. Instead this walks the stream's frame and block headers (RFC 8878)
    itself and gives zstd whole blocks only: a run of blocks at a time whose
    largest possible output (a raw or RLE block's size, or Block_Maximum_Size
    for a compressed one) fits in what the packet may still produce, or a
    single block when none fits. After each run the output so far is checked,
    so at most C{expectedLength} + 128 KiB is ever held for one packet. QEMU
    ends each packet's payload with a flush, which ends a block, so a
    legitimate packet is a few runs. Bytes of a block or header that a payload
    ends in the middle of are kept for the next payload, as zstd would.
    """

    def __init__(self) -> None:
        import zstandard

        self._zstandard = zstandard
        self._error = zstandard.ZstdError
        self._stream = self._newStream()
        self._at = _AT_FRAME_HEADER
        self._checksumSize = 0
        self._unscanned = b""

    def _newStream(self) -> Any:
        return self._zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW_SIZE).decompressobj()

    def decompress(self, payload: bytes, expectedLength: int) -> bytes:
        data = memoryview(self._unscanned + payload if self._unscanned else payload)
        chunks: list[bytes] = []
        produced = 0
        runStart = pos = 0
        runMaximum = 0  # the most the blocks in data[runStart:pos] can produce

        def feed() -> None:
            # Give zstd data[runStart:pos], whole headers and blocks only.
            nonlocal produced, runStart, runMaximum
            if pos == runStart:
                return
            try:
                out = self._stream.decompress(data[runStart:pos])
            except self._error as e:
                raise ProtocolError(f"zstd stream is corrupt: {e}", field="payload")
            runStart, runMaximum = pos, 0
            produced += len(out)
            if produced > expectedLength:
                raise ProtocolError(
                    f"zstd payload decompresses to more than {expectedLength} bytes"
                    f" (refused at {produced})",
                    field="payload",
                )
            if out:
                chunks.append(out)

        while True:
            left = len(data) - pos
            if self._at == _AT_FRAME_HEADER:
                size = self._frameHeaderSize(data, pos)
                if size is None or left < size:
                    break
                pos += size
                self._at = _AT_BLOCK
            elif self._at == _AT_BLOCK:
                if left < _ZSTD_BLOCK_HEADER_SIZE:
                    break
                header = int.from_bytes(data[pos : pos + _ZSTD_BLOCK_HEADER_SIZE], "little")
                last, kind, blockSize = header & 1, (header >> 1) & 3, header >> 3
                if kind not in (_ZSTD_RAW, _ZSTD_RLE, _ZSTD_COMPRESSED):
                    raise ProtocolError(
                        f"zstd block header {header:#08x} has the reserved block type 3", field="payload"
                    )
                if blockSize > ZSTD_BLOCK_MAXIMUM_SIZE:
                    raise ProtocolError(
                        f"zstd block size {blockSize} is over the {ZSTD_BLOCK_MAXIMUM_SIZE}-byte"
                        " Block_Maximum_Size",
                        field="payload",
                    )
                blockLength = _ZSTD_BLOCK_HEADER_SIZE + (1 if kind == _ZSTD_RLE else blockSize)
                if left < blockLength:
                    break
                maximum = ZSTD_BLOCK_MAXIMUM_SIZE if kind == _ZSTD_COMPRESSED else blockSize
                if runMaximum + maximum > expectedLength - produced:
                    feed()
                pos += blockLength
                runMaximum += maximum
                if last:
                    self._at = _AT_CHECKSUM
            else:
                if left < self._checksumSize:
                    break
                pos += self._checksumSize
                # The frame is finished (QEMU never finishes one): a new
                # frame may follow, which needs a new zstd stream.
                feed()
                self._stream = self._newStream()
                self._at = _AT_FRAME_HEADER
        feed()
        self._unscanned = bytes(data[pos:])
        if produced != expectedLength:
            raise ProtocolError(
                f"zstd payload decompresses to {produced} bytes, expected {expectedLength}",
                field="payload",
            )
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _frameHeaderSize(self, data: memoryview, pos: int) -> int | None:
        """
        The size of the frame header at C{data[pos:]}, or L{None} if too
        little of it is there to tell; checks what zstd would not report
        clearly, and leaves the rest of the header's checks to zstd.
        """
        available = data[pos : pos + 5]
        # A partial magic is checked as far as it goes.
        if not ZSTD_FRAME_MAGIC.to_bytes(4, "little").startswith(bytes(available[:4])):
            raise ProtocolError(
                f"zstd frame starts with {bytes(available[:4]).hex(' ')}, expected the frame magic"
                f" {ZSTD_FRAME_MAGIC:#010x} (28 b5 2f fd)",
                field="payload",
            )
        if len(available) < 5:
            return None
        descriptor = available[4]
        if descriptor & 0x08:
            raise ProtocolError(
                f"zstd frame header descriptor {descriptor:#04x} has the reserved bit 3 set",
                field="payload",
            )
        singleSegment = descriptor >> 5 & 1
        self._checksumSize = 4 if descriptor & 0x04 else 0
        dictionaryIdSize = (0, 1, 2, 4)[descriptor & 3]
        contentSizeSize = (singleSegment, 2, 4, 8)[descriptor >> 6]
        return 5 + (1 - singleSegment) + dictionaryIdSize + contentSizeSize


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

"""
The zstd decompressor's output bound (twisted_multifd/_compression.py).

zstandard's streaming decompression takes no output limit, so
L{_ZstdDecompressor} walks the stream's frame and block headers itself and
feeds zstd whole blocks, checking the output after each run of them. These
tests use real zstd streams made the way QEMU makes them (one stream per
channel, each packet's pages ended by a block flush, the frame never
finished) and hostile ones: a payload that inflates to 256 MiB must be
refused within a few MiB, and no bytes whatever may raise anything but a
L{ProtocolError} naming the payload.
"""

from __future__ import annotations

import functools
import os
import random
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted_multifd._compression import (
    COMPRESSION_VALUES,
    ZSTD_BLOCK_MAXIMUM_SIZE,
    _ZstdDecompressor,
    makeCompressor,
    makeDecompressor,
)
from twisted_multifd._errors import ProtocolError

PAGE = 4096
MAX_PAGES = 128  # a packet's pages_alloc
BOMB_MEMORY_BOUND = 8 * 1024 * 1024
# The most the decompressor holds past a packet's expected length: one
# block's output.
OVERSHOOT = ZSTD_BLOCK_MAXIMUM_SIZE

FUZZ = settings(
    max_examples=max(300, settings().max_examples), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def zstdDecompressor() -> _ZstdDecompressor:
    decompressor = makeDecompressor(COMPRESSION_VALUES["zstd"])
    assert isinstance(decompressor, _ZstdDecompressor)
    return decompressor


class CountingStream:
    """
    Wraps a zstandard decompressobj, recording how much each call was given
    and produced.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.calls: list[tuple[int, int]] = []

    def decompress(self, data: Any) -> bytes:
        out: bytes = self._stream.decompress(data)
        self.calls.append((len(data), len(out)))
        return out


def countCalls(decompressor: _ZstdDecompressor) -> CountingStream:
    counting = CountingStream(decompressor._stream)
    decompressor._stream = counting
    return counting


def pages(kind: str, count: int, rng: random.Random) -> bytes:
    if kind == "zero":
        return bytes(count * PAGE)
    if kind == "random":
        return rng.randbytes(count * PAGE)
    # Half-compressible pages: text-like runs with random bytes between.
    data = b"".join(
        (rng.choice([b"migration ", b"page ", b"\x00" * 64]) * PAGE)[: PAGE // 2] + rng.randbytes(PAGE // 2)
        for _ in range(count)
    )
    assert len(data) == count * PAGE
    return data


@functools.cache
def bomb() -> bytes:
    # 256 MiB of zeros: about 8 KiB, under the 12 KiB a one-page payload may be.
    return zstandard.ZstdCompressor(level=19).compress(bytes(256 << 20))


def rleBomb(blocks: int) -> bytes:
    """
    A frame header (no content size, 128 KiB window) and then RLE blocks of
    the most allowed each: 4 bytes for every 128 KiB.
    """
    header = bytes.fromhex("28b52ffd") + bytes([0x00, (17 - 10) << 3])
    block = ((ZSTD_BLOCK_MAXIMUM_SIZE << 3) | (1 << 1)).to_bytes(3, "little") + b"\x00"
    return header + block * blocks


def refusal(call: Callable[[], object]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        call()
    assert info.value.field == "payload"
    return info.value


@pytest.mark.parametrize("level", [1, 19])
@pytest.mark.parametrize("kind", ["zero", "random", "mixed"])
def test_qemuStreamRoundTrips(level: int, kind: str) -> None:
    """
    Many packets of one QEMU-style zstd stream, of 1 to 128 pages each,
    decompress to exactly their pages.
    """
    rng = random.Random(f"{level}-{kind}")
    compressor = makeCompressor("zstd", level)
    decompressor = zstdDecompressor()
    for packet in range(40):
        data = pages(kind, rng.choice([1, 2, 7, 31, 64, 127, MAX_PAGES]), rng)
        payload = compressor.compress(data)
        assert decompressor.decompress(payload, len(data)) == data, f"packet {packet}"


def test_interleavedKindsRoundTrip() -> None:
    """
    One stream whose packets alternate zero, random and mixed pages (zstd
    back-references across packets included) decompresses exactly.
    """
    rng = random.Random(7)
    compressor = makeCompressor("zstd", 3)
    decompressor = zstdDecompressor()
    previous = b""
    for packet in range(60):
        data = pages(rng.choice(["zero", "random", "mixed"]), rng.randint(1, MAX_PAGES), rng)
        if previous and packet % 3 == 0:
            data = previous  # a whole packet the window has already seen
        payload = compressor.compress(data)
        assert decompressor.decompress(payload, len(data)) == data, f"packet {packet}"
        previous = data


def test_largestQemuWindowIsAccepted() -> None:
    """
    QEMU's highest multifd-zstd-level, 20, uses a 32 MiB window on its
    unknown-size streams: that is accepted.
    """
    compressor = makeCompressor("zstd", 20)
    decompressor = zstdDecompressor()
    rng = random.Random(20)
    for _ in range(3):
        data = pages("mixed", MAX_PAGES, rng)
        assert decompressor.decompress(compressor.compress(data), len(data)) == data


def test_windowOverQemusLargestIsRefused() -> None:
    """
    A stream whose frame asks for a window over 32 MiB (level 22: 128 MiB),
    which QEMU never sends, is refused before any block.
    """
    stream = zstandard.ZstdCompressor(level=22).compressobj()
    payload = stream.compress(bytes(PAGE)) + stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    error = refusal(lambda: zstdDecompressor().decompress(payload, PAGE))
    assert "zstd stream is corrupt" in error.reason and "memory" in error.reason


@pytest.mark.parametrize("kind", ["zero", "random", "mixed"])
def test_fullPacketTakesFewDecompressCalls(kind: str) -> None:
    """
    A legitimate 512 KiB packet is given to zstd in a handful of calls, not
    block by block or byte by byte.
    """
    rng = random.Random(kind)
    compressor = makeCompressor("zstd", 1)
    decompressor = zstdDecompressor()
    counting = countCalls(decompressor)
    for _ in range(5):
        data = pages(kind, MAX_PAGES, rng)
        counting.calls.clear()
        assert decompressor.decompress(compressor.compress(data), len(data)) == data
        assert 1 <= len(counting.calls) <= 6, counting.calls


def test_bombIsRefusedWithinMemoryBound() -> None:
    """
    An 8 KiB payload that inflates to 256 MiB, expected to be one page, is
    refused after at most one block's output past the page, with under 8 MiB
    traced at peak.
    """
    payload = bomb()
    assert len(payload) < 3 * PAGE
    decompressor = zstdDecompressor()
    counting = countCalls(decompressor)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        error = refusal(lambda: decompressor.decompress(payload, PAGE))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "decompresses to more than 4096 bytes" in error.reason
    assert sum(out for _, out in counting.calls) <= PAGE + OVERSHOOT, counting.calls
    assert peak - base < BOMB_MEMORY_BOUND, f"{(peak - base) >> 10} KiB at peak"


def test_bombAfterLegitimatePacketsIsRefused() -> None:
    """
    The bound is per packet: a stream that starts legitimately and then sends
    a packet of RLE blocks (4 bytes each inflating to 128 KiB) worth far more
    than its pages is refused within one block of its expected length.
    """
    compressor = makeCompressor("zstd", 1)
    decompressor = zstdDecompressor()
    data = bytes(MAX_PAGES * PAGE)
    assert decompressor.decompress(compressor.compress(data), len(data)) == data
    counting = countCalls(decompressor)
    block = ((ZSTD_BLOCK_MAXIMUM_SIZE << 3) | (1 << 1)).to_bytes(3, "little") + b"\x00"
    hostile = block * 100_000  # 400 KB, inflating to 12.5 GiB
    refusal(lambda: decompressor.decompress(hostile, 2 * PAGE))
    assert sum(out for _, out in counting.calls) <= 2 * PAGE + OVERSHOOT, counting.calls


@pytest.mark.parametrize("expected", [0, 1, PAGE, 3 * ZSTD_BLOCK_MAXIMUM_SIZE + 5])
def test_rleBombOutputStaysWithinOneBlock(expected: int) -> None:
    """
    However much a payload could inflate to, no more than one block's output
    past the expected length is ever produced.
    """
    decompressor = zstdDecompressor()
    counting = countCalls(decompressor)
    refusal(lambda: decompressor.decompress(rleBomb(10_000), expected))
    produced = sum(out for _, out in counting.calls)
    assert expected < produced <= expected + OVERSHOOT


def test_shortPayloadIsRefused() -> None:
    """
    A payload that decompresses to fewer bytes than its pages says so.
    """
    compressor = makeCompressor("zstd", 1)
    payload = compressor.compress(bytes(PAGE))
    error = refusal(lambda: zstdDecompressor().decompress(payload, 2 * PAGE))
    assert error.reason == f"zstd payload decompresses to {PAGE} bytes, expected {2 * PAGE}"


def firstPayload(data: bytes = bytes(PAGE)) -> bytes:
    return makeCompressor("zstd", 1).compress(data)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: b"\x00" + p[1:], "zstd frame starts with 00 b5 2f fd, expected the frame magic 0xfd2fb528"),
        (lambda p: bytes.fromhex("50 2a 4d 18") + p[4:], "zstd frame starts with 50 2a 4d 18"),  # skippable
        (lambda p: p[:4] + bytes([p[4] | 0x08]) + p[5:], "reserved bit 3 set"),
        (lambda p: p[:6] + bytes([p[6] | 0x06]) + p[7:], "has the reserved block type 3"),
        (
            lambda p: p[:6] + b"\xf8\xff\xff" + p[9:],
            "zstd block size 2097151 is over the 131072-byte Block_Maximum_Size",
        ),
    ],
)
def test_corruptHeaderIsRefused(mutate: Callable[[bytes], bytes], message: str) -> None:
    """
    A payload with a wrong frame magic, a reserved descriptor bit, a reserved
    block type or an oversized block is refused, naming what is wrong.
    """
    payload = firstPayload()
    assert payload[4] == 0x00  # no window descriptor: the first block header is at 6
    error = refusal(lambda: zstdDecompressor().decompress(mutate(payload), PAGE))
    assert message in error.reason


def test_corruptBlockContentIsRefused() -> None:
    """
    A compressed block whose content zstd cannot decode is refused as a
    corrupt stream.
    """
    rng = random.Random(3)
    payload = bytearray(firstPayload(pages("mixed", 4, rng)))
    header = int.from_bytes(payload[6:9], "little")
    assert (header >> 1) & 3 == 2, "expected a compressed first block"
    payload[9 : 9 + 8] = b"\xff" * 8
    error = refusal(lambda: zstdDecompressor().decompress(bytes(payload), 4 * PAGE))
    assert error.reason.startswith("zstd stream is corrupt")


def test_dictionaryFrameIsRefused() -> None:
    """
    A frame that needs a dictionary (QEMU uses none) is refused.
    """
    plain = firstPayload()
    assert plain[4] == 0x00
    payload = plain[:4] + bytes([0x01, 0x2A]) + plain[5:]  # Dictionary_ID_flag 1, ID 42
    error = refusal(lambda: zstdDecompressor().decompress(payload, PAGE))
    assert error.reason.startswith("zstd stream is corrupt")


@pytest.mark.parametrize("split", [1, 3, 4, 5, 6, 7, 8, 9, 50])
def test_headersSplitAcrossPayloadsAreCarried(split: int) -> None:
    """
    A payload that ends inside the frame header, a block header or a block
    (QEMU's never do) is carried over to the next one, as zstd itself would.
    """
    data = pages("mixed", 1, random.Random(split))
    payload = firstPayload(data)
    assert len(payload) > 100 and payload[4] == 0x00  # one block, from offset 6
    decompressor = zstdDecompressor()
    assert decompressor.decompress(payload[:split], 0) == b""
    assert decompressor.decompress(payload[split:], PAGE) == data


def test_finishedFrameThenNewFrame() -> None:
    """
    A frame finished with a checksum may be followed by a new frame, whose
    header and blocks decompress too; a wrong checksum is refused.
    """
    rng = random.Random(5)
    first, second = pages("mixed", 3, rng), pages("random", 2, rng)
    stream = zstandard.ZstdCompressor(level=1, write_checksum=True).compressobj()
    payload = stream.compress(first) + stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
    following = makeCompressor("zstd", 1).compress(second)
    decompressor = zstdDecompressor()
    assert decompressor.decompress(payload, len(first)) == first
    assert decompressor.decompress(following, len(second)) == second

    corrupt = payload[:-1] + bytes([payload[-1] ^ 1])
    error = refusal(lambda: zstdDecompressor().decompress(corrupt, len(first)))
    assert "zstd stream is corrupt" in error.reason


def checkOutcome(decompressor: _ZstdDecompressor, payload: bytes, expected: int) -> bytes | None:
    try:
        out = decompressor.decompress(payload, expected)
    except ProtocolError as e:
        assert e.field == "payload"
        return None
    assert len(out) == expected
    return out


@FUZZ
@given(payload=st.binary(max_size=400), expected=st.integers(0, 3 * PAGE))
def test_arbitraryPayloadRaisesOnlyProtocolError(payload: bytes, expected: int) -> None:
    """
    Arbitrary payload bytes, alone or after a valid frame header, only ever
    decompress to the expected length or raise a ProtocolError.
    """
    checkOutcome(zstdDecompressor(), payload, expected)
    checkOutcome(zstdDecompressor(), firstPayload()[:6] + payload, expected)


@FUZZ
@given(
    data=st.data(),
    packets=st.lists(
        st.tuples(st.integers(0, 8), st.sampled_from(["zero", "random", "mixed"])), min_size=1, max_size=4
    ),
)
def test_mutatedStreamRaisesOnlyProtocolError(data: st.DataObject, packets: list[tuple[int, str]]) -> None:
    """
    A QEMU-style stream with bytes flipped, cut or inserted only ever
    decompresses to the expected lengths or raises a ProtocolError, and
    never produces more than one block past a packet's expected length.
    """
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    compressor = makeCompressor("zstd", data.draw(st.sampled_from([1, 19])))
    decompressor = zstdDecompressor()
    counting = countCalls(decompressor)
    for count, kind in packets:
        original = pages(kind, count, rng)
        payload = bytearray(compressor.compress(original))
        for _ in range(data.draw(st.integers(0, 3))):
            at = data.draw(st.integers(0, len(payload)))
            action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            if action == "flip" and at < len(payload):
                payload[at] ^= data.draw(st.integers(1, 255))
            elif action == "cut":
                del payload[at : at + data.draw(st.integers(1, 16))]
            else:
                payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        counting.calls.clear()
        out = checkOutcome(decompressor, bytes(payload), len(original))
        assert sum(produced for _, produced in counting.calls) <= len(original) + OVERSHOOT
        if out is None:
            return


def test_emptyAndPartialHeaderPayloadsFeedNothing() -> None:
    """
    An empty payload, or one of only a partial frame header, feeds zstd
    nothing and expects nothing.
    """
    decompressor = zstdDecompressor()
    counting = countCalls(decompressor)
    assert decompressor.decompress(b"", 0) == b""
    assert decompressor.decompress(bytes.fromhex("28b5"), 0) == b""
    assert counting.calls == []
    refusal(lambda: decompressor.decompress(b"", PAGE))


def test_randomPayloadsOfRealSizes() -> None:
    """
    Random bytes the size of real payloads (up to ~1 MiB) after a valid
    frame header are refused within the bound.
    """
    for size in (PAGE, 64 * PAGE, 256 * PAGE):
        decompressor = zstdDecompressor()
        counting = countCalls(decompressor)
        assert checkOutcome(decompressor, firstPayload()[:6] + os.urandom(size), MAX_PAGES * PAGE) is None
        assert sum(out for _, out in counting.calls) <= MAX_PAGES * PAGE + OVERSHOOT

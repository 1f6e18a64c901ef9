"""
Runs of consecutive pages: the receiver checks and writes a packet whose
offsets are one run (nearly every packet QEMU sends) at once instead of page
by page. The shortcut must decide exactly as the page-by-page loop does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, strategies as st

from twisted_multifd._capture import _BlockImage
from twisted_multifd._mainstream import RamBlock
from twisted_multifd._migration import _firstOffsetOutside
from twisted_multifd._packet import isOneRun

PAGE = 4096


def _slowFirstOutside(offsets: tuple[int, ...], limit: int) -> int | None:
    for offset in offsets:
        if offset % PAGE or offset > limit:
            return offset
    return None


def test_isOneRun() -> None:
    assert isOneRun((), PAGE)
    assert isOneRun((8192,), PAGE)
    assert isOneRun(tuple(range(0, 128 * PAGE, PAGE)), PAGE)
    assert not isOneRun((0, 2 * PAGE), PAGE)
    assert not isOneRun((PAGE, 0), PAGE)
    assert not isOneRun((0, PAGE, PAGE), PAGE)
    assert not isOneRun((0, PAGE + 1), PAGE)


runs = st.builds(
    lambda first, count: tuple(range(first, first + count * PAGE, PAGE)),
    st.integers(0, 1 << 20), st.integers(1, 128),
)
anyOffsets = st.lists(st.integers(0, 1 << 21), max_size=128).map(tuple)


@given(st.one_of(runs, anyOffsets), st.integers(0, 1 << 21))
def test_firstOffsetOutsideMatchesThePageByPageCheck(offsets: tuple[int, ...], limit: int) -> None:
    assert _firstOffsetOutside(offsets, PAGE, limit) == _slowFirstOutside(offsets, limit)


def test_aRunThatCrossesTheEndNamesItsFirstPageBeyond() -> None:
    limit = 10 * PAGE
    assert _firstOffsetOutside(tuple(range(8 * PAGE, 16 * PAGE, PAGE)), PAGE, limit) == 11 * PAGE
    assert _firstOffsetOutside(tuple(range(PAGE + 8, 4 * PAGE, PAGE)), PAGE, limit) == PAGE + 8
    assert _firstOffsetOutside(tuple(range(0, 11 * PAGE, PAGE)), PAGE, limit) is None


@given(st.lists(st.integers(0, 63), min_size=1, max_size=40).map(tuple),
       st.integers(0, 60), st.integers(1, 4))
def test_writtenPagesLandWhereTheirOffsetsSay(scattered: tuple[int, ...], runStart: int, runLength: int) -> None:
    """
    A packet that is one run and one that is not both put each page at its
    offset and mark it as data; a page written twice keeps the later bytes.
    """
    with tempfile.TemporaryDirectory() as tmp:
        block = RamBlock("pc.ram", 64 * PAGE)
        image = _BlockImage(block, str(Path(tmp) / "pc.ram"), PAGE)
        expected = bytearray(64 * PAGE)
        marked = set()
        for index, packet in enumerate([
            tuple(p * PAGE for p in scattered),
            tuple(range(runStart * PAGE, min(64, runStart + runLength) * PAGE, PAGE)),
        ]):
            data = bytes((index * 64 + n) % 251 for n in range(len(packet)))
            payload = b"".join(bytes([data[n]]) * PAGE for n in range(len(packet)))
            image.write(packet, payload)
            for n, offset in enumerate(packet):
                expected[offset : offset + PAGE] = payload[n * PAGE : (n + 1) * PAGE]
                marked.add(offset // PAGE)
        with open(Path(tmp) / "pc.ram", "rb") as f:
            assert f.read() == bytes(expected)
        assert {i for i, state in enumerate(image.pages) if state == 2} == marked
        image.close()

"""
The receive path's shortcuts: large reads on multifd channels, payloads
handed over without a copy, and early writeback of RAM images.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from twisted_multifd import _capture
from twisted_multifd._capture import _BlockImage, _EarlyWriteback
from twisted_multifd._channels import MULTIFD_READ_SIZE, MultiFDChannel
from twisted_multifd._incremental import IncrementalParser
from twisted_multifd._mainstream import RamBlock
from twisted_multifd._packet import RamPacket, buildRamPacket, channelPackets

PAGE = 4096


class _TCPLikeTransport:
    bufferSize = 64 * 1024


class _OtherTransport:
    pass


def test_multifdChannelReadsInLargeChunks() -> None:
    """
    A multifd channel raises its TCP transport's read size; a transport
    without that knob is left alone.
    """
    for transport in (_TCPLikeTransport(), _OtherTransport()):
        channel = MultiFDChannel(receiver=None, peer=None)  # type: ignore[arg-type]
        channel.transport = transport
        channel.connectionMade()
        assert getattr(transport, "bufferSize", None) == (
            MULTIFD_READ_SIZE if isinstance(transport, _TCPLikeTransport) else None
        )


def _packet(seed: int, pages: int = 3) -> tuple[bytes, bytes]:
    payload = bytes([seed]) * (PAGE * pages)
    return payload, buildRamPacket(
        pageSize=PAGE, flags=0, packetNum=seed, block="pc.ram",
        normalOffsets=tuple(PAGE * (seed * 8 + i) for i in range(pages)), payload=payload,
    )


def test_payloadInOneChunkIsNotCopied() -> None:
    """
    An uncompressed payload that arrived in one read is handed over as a view
    of it; one split over reads is joined. Both equal the bytes sent.
    """
    first, one = _packet(1)
    second, two = _packet(2)
    parser = IncrementalParser(channelPackets(PAGE))
    parser.feed(one + two[:100])
    event = parser.nextEvent()
    assert isinstance(event, RamPacket) and isinstance(event.data, memoryview)
    assert event.data == first and event.data.readonly
    assert parser.nextEvent() is None
    parser.feed(two[100:-PAGE])
    assert parser.nextEvent() is None
    parser.feed(two[-PAGE:])
    event = parser.nextEvent()
    assert isinstance(event, RamPacket) and event.data == second and isinstance(event.data, bytes)


def test_earlyWritebackKeepsImageIntact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    With writeback started every two pages, the image still holds every page
    written, writeback was started from a worker thread, and closing waits
    for it before closing the file.
    """
    monkeypatch.setattr(_capture, "WRITEBACK_EVERY", 2 * PAGE)
    started: list[int] = []
    original = _capture._startWriteback

    def recording(fd: int) -> None:
        started.append(fd)
        if _capture._syncFileRange is not None:
            original(fd)

    monkeypatch.setattr(_capture, "_startWriteback", recording)
    monkeypatch.setattr(_capture, "_syncFileRange", _capture._syncFileRange or (lambda *a: 0))
    writeback = _EarlyWriteback()
    path = tmp_path / "pc.ram.img"
    image = _BlockImage(RamBlock("pc.ram", 16 * PAGE), str(path), PAGE, writeback)
    expected = bytearray(16 * PAGE)
    for index in range(16):
        page = os.urandom(PAGE)
        image.write([index * PAGE], memoryview(page))
        expected[index * PAGE : (index + 1) * PAGE] = page
    image.close()
    writeback.shutdown()
    assert started and all(fd == started[0] for fd in started)
    assert path.read_bytes() == expected
    assert image.stats()["pages_with_data"] == 16

"""
Pages spliced from a multifd channel's socket straight into a capture's
image (L{twisted_multifd._directread}): the capture is the same as when the
pages pass through Python, packets the migration would refuse are never
spliced, a file that cannot be spliced into still gets its pages, and
writing errors and cut connections are reported as before.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.task import Clock

from twisted_multifd import CaptureWriter, MigrationReceiverFactory, _directread
from twisted_multifd._capturereader import loadCapture
from twisted_multifd._directread import DirectReader
from twisted_multifd._incremental import (
    DeliveredElsewhere,
    IncrementalParser,
    PagePayload,
)
from twisted_multifd._initpacket import INIT_PACKET_SIZE
from twisted_multifd._mainstream import RamBlock
from twisted_multifd._migration import DRAINING, LOADING, Migration, _firstOffsetOutside
from twisted_multifd._packet import RamPacket, buildRamPacket, channelPackets, isOneRun, pageRuns
from twisted_multifd._records import MigrationInfo
from twisted_multifd._testing_pump import _StreamWriter
from twisted_multifd.testing import playOverTCP, synthesizeMigration

PAGE = 4096

needsSplice = pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux-only")


class _Readers:
    """
    Records every L{DirectReader} installed while in use.
    """

    def __init__(self, splicing: bool = True) -> None:
        self.readers: list[DirectReader] = []
        self._original = DirectReader.install
        self._splicing = splicing

    def __enter__(self) -> _Readers:
        original = self._original
        readers = self.readers
        splicing = self._splicing

        def install(reader: DirectReader) -> None:
            readers.append(reader)
            reader.splicing = reader.splicing and splicing
            original(reader)

        DirectReader.install = install  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        DirectReader.install = self._original  # type: ignore[method-assign]

    @property
    def spliced(self) -> int:
        return sum(reader.splicedPayloads for reader in self.readers)


def _captured(folder: Path) -> dict[str, bytes]:
    capture = loadCapture(str(folder))
    assert capture.complete, capture.error
    return {block.name: Path(block.path).read_bytes() for block in capture.blocks}


def _endingFactory(folder: Path, channels: int) -> tuple[MigrationReceiverFactory, Deferred[Any]]:
    """
    A capturing receiver and a Deferred that fires with its migration's result.
    """
    ended: Deferred[Any] = Deferred()
    factory = MigrationReceiverFactory(
        lambda info: CaptureWriter(str(folder)), channels=channels, onMigrationEnded=ended.callback
    )
    return factory, ended


@inlineCallbacks
def _receiveRaw(folder: Path, main: bytes, multifd: bytes) -> Any:
    """
    Capture into C{folder} what a main channel and one multifd channel
    send, written whole to plain sockets that are then closed (multifd
    first); fires with the migration's result.
    """
    factory, ended = _endingFactory(folder, 1)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        address = ("127.0.0.1", port.getHost().port)
        connections = [socket.create_connection(address), socket.create_connection(address)]
        try:
            connections[0].sendall(main)
            connections[1].sendall(multifd)
            connections[1].close()
            result = yield ended
        finally:
            for connection in connections:
                connection.close()
    finally:
        yield port.stopListening()
    return result


def test_parserHandsOverPayloadsDeliveredElsewhere() -> None:
    """
    A reader that stores a page payload itself reports its size; the parser
    then yields the packet with a L{DeliveredElsewhere} of that size, and
    counts the bytes as consumed.
    """
    payload = os.urandom(3 * PAGE)
    packet = buildRamPacket(pageSize=PAGE, flags=0, packetNum=7, block="pc.ram",
                            normalOffsets=(8 * PAGE, 9 * PAGE, 10 * PAGE), payload=payload)
    parser = IncrementalParser(channelPackets(PAGE))
    header = len(packet) - len(payload)
    parser.feed(packet[:header])
    assert parser.nextEvent() is None
    request = parser.pendingPagePayload()
    assert isinstance(request, PagePayload)
    assert (int(request), request.block, request.offsets) == (3 * PAGE, "pc.ram", (8 * PAGE, 9 * PAGE, 10 * PAGE))
    assert not parser.externalFilled(PAGE)
    assert parser.directBuffer() is None and parser.buffered == PAGE and not parser.atBoundary
    assert parser.pendingPagePayload() is None
    assert parser.externalFilled(2 * PAGE)
    event = parser.nextEvent()
    assert isinstance(event, RamPacket) and type(event.data) is DeliveredElsewhere
    assert len(event.data) == 3 * PAGE and event.normalOffsets == (8 * PAGE, 9 * PAGE, 10 * PAGE)
    assert parser.consumed == len(packet)


def test_payloadPartlyQueuedIsNotOfferedForSplicing() -> None:
    """
    Once any byte of a payload is held by the parser, the rest must follow
    it there: the payload is not offered to be stored elsewhere.
    """
    payload = bytes(2 * PAGE)
    packet = buildRamPacket(pageSize=PAGE, flags=0, packetNum=1, block="pc.ram",
                            normalOffsets=(0, PAGE), payload=payload)
    parser = IncrementalParser(channelPackets(PAGE))
    parser.feed(packet[: len(packet) - len(payload) + 10])
    assert parser.nextEvent() is None
    assert parser.pendingPagePayload() is None


@needsSplice
@pytest_twisted.inlineCallbacks
def test_capturedThroughSpliceOverTCP(tmp_path: Path):
    """
    Over real loopback TCP into a capture, page payloads are spliced into
    the images, and the capture holds exactly the source's memory (zero
    pages, pages sent again in later rounds and all).
    """
    migration = synthesizeMigration(seed=21, convention="10.0", channels=3, dirtyRounds=2)
    captures = {}
    for splicing in (True, False):
        folder = tmp_path / f"capture-{splicing}"
        factory, ended = _endingFactory(folder, 3)
        with _Readers(splicing) as readers:
            yield playOverTCP(reactor, factory, migration, order=[2, 0, 3, 1])
        result = yield ended
        assert result.complete, result.error
        assert (readers.spliced > 0) == splicing
        assert _captured(folder) == migration.memory
        captures[splicing] = loadCapture(str(folder))
    # The same page records either way (which pages hold data, which are zero).
    assert [attrs.evolve(block, path="", file="") for block in captures[True].blocks] == [
        attrs.evolve(block, path="", file="") for block in captures[False].blocks
    ]


@needsSplice
@pytest.mark.parametrize("refusing", ["file", "socket"])
@pytest_twisted.inlineCallbacks
def test_refusedSpliceFallsBackToReading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusing: str):
    """
    If splicing fails with EINVAL (a filesystem without splice support, or a
    socket that cannot be spliced from), the payload is stored the ordinary
    way (for a file: the bytes already in the pipe are read out and written),
    the channel stops splicing, and the capture is exact.
    """
    real = os.splice
    refused: list[int] = []

    def splice(source: int, destination: int, count: int, **kwargs: Any) -> int:
        if ("offset_dst" in kwargs) == (refusing == "file"):
            refused.append(count)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(source, destination, count, **kwargs)

    monkeypatch.setattr(_directread.os, "splice", splice)
    migration = synthesizeMigration(seed=5, convention="10.0", channels=2, dirtyRounds=1)
    factory, ended = _endingFactory(tmp_path / "capture", 2)
    with _Readers() as readers:
        yield playOverTCP(reactor, factory, migration)
    result = yield ended
    assert result.complete, result.error
    # One refusal per channel that had a run of pages, then no more splicing.
    assert 1 <= len(refused) <= 2
    assert all(not reader.splicing for reader in readers.readers if reader.splicedPayloads)
    if refusing == "socket":
        assert readers.spliced == 0
    assert _captured(tmp_path / "capture") == migration.memory


@needsSplice
@pytest_twisted.inlineCallbacks
def test_writeErrorWhileSplicingFailsTheCapture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """
    A disk that is full while pages are spliced into an image fails the
    migration with the capture's own error (which capture, which file, what
    failed), and the capture is not complete.
    """
    real = os.splice

    def splice(source: int, destination: int, count: int, **kwargs: Any) -> int:
        if "offset_dst" in kwargs:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(source, destination, count, **kwargs)

    def pwrite(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_directread.os, "splice", splice)
    monkeypatch.setattr(_directread.os, "pwrite", pwrite)
    migration = synthesizeMigration(seed=6, convention="10.0", channels=1, dirtyRounds=0)
    factory, ended = _endingFactory(tmp_path / "capture", 1)
    yield playOverTCP(reactor, factory, migration)
    result = yield ended
    assert not result.complete
    # As when a pwrite of pages passed through Python fails.
    assert result.error == (
        f"capture {tmp_path / 'capture'}: writing ram/pc.ram.img failed: No space left on device (errno 28)"
    )
    assert not loadCapture(str(tmp_path / "capture"), strict=False).complete


@needsSplice
@pytest_twisted.inlineCallbacks
def test_pagesOutsideTheBlockAreRefusedNotSpliced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """
    A packet whose pages lie beyond its block is refused as before (the
    offset named), and not one of its bytes reaches the image.
    """
    migration = synthesizeMigration(seed=8, convention="10.0", channels=1, dirtyRounds=0)
    [channel] = migration.multifd
    length = len(migration.memory["pc.ram"])
    # A good packet first: the sniffer's first read takes the start of it.
    good = buildRamPacket(pageSize=PAGE, flags=0, packetNum=98, block="pc.ram",
                          normalOffsets=tuple(PAGE * i for i in range(32)), payload=os.urandom(32 * PAGE))
    bad = buildRamPacket(pageSize=PAGE, flags=0, packetNum=99, block="pc.ram",
                         normalOffsets=(length - PAGE, length), payload=b"\xee" * (2 * PAGE))
    asked: list[tuple[tuple[int, ...], Any]] = []
    original = Migration.pageFileFor

    def pageFileFor(self: Migration, blockName: str, offsets: tuple[int, ...]) -> Any:
        answer = original(self, blockName, offsets)
        asked.append((offsets, answer))
        return answer

    monkeypatch.setattr(Migration, "pageFileFor", pageFileFor)
    result = yield _receiveRaw(tmp_path / "capture", migration.main.data, channel.data[:INIT_PACKET_SIZE] + good + bad)
    assert not result.complete
    assert f"offset {length:#x} is not a page of 'pc.ram'" in result.error
    assert asked[-1] == ((length - PAGE, length), None)
    image = next(block for block in loadCapture(str(tmp_path / "capture"), strict=False).blocks
                 if block.name == "pc.ram")
    # The one page of the packet inside the block was not written either.
    assert Path(image.path).read_bytes()[length - PAGE :] == bytes(PAGE)
    assert os.path.getsize(image.path) == length


@needsSplice
@pytest_twisted.inlineCallbacks
def test_connectionCutInsideASplicedPayload(tmp_path: Path):
    """
    A channel that ends in the middle of a spliced payload fails the
    migration with the same error as when the payload passes through Python
    (how much of the packet arrived); the capture is not complete.
    """
    migration = synthesizeMigration(seed=3, convention="10.0", channels=1, dirtyRounds=0)
    [channel] = migration.multifd
    run = buildRamPacket(pageSize=PAGE, flags=0, packetNum=1, block="pc.ram",
                         normalOffsets=tuple(PAGE * (16 + i) for i in range(8)), payload=os.urandom(8 * PAGE))
    whole = buildRamPacket(pageSize=PAGE, flags=0, packetNum=0, block="pc.ram",
                           normalOffsets=tuple(PAGE * i for i in range(32)), payload=os.urandom(32 * PAGE))
    errors = {}
    for splicing in (True, False):
        folder = tmp_path / f"capture-{splicing}"
        with _Readers(splicing) as readers:
            # The initial packet, a whole packet (the sniffer's first read
            # takes the start of it), and a packet of one run of 8 pages cut
            # after 5.5 of them.
            result = yield _receiveRaw(
                folder, migration.main.data,
                channel.data[:INIT_PACKET_SIZE] + whole + run[: len(run) - 5 * PAGE // 2],
            )
        assert not result.complete
        assert (readers.readers[0]._written > 0) == splicing
        assert not loadCapture(str(folder), strict=False).complete
        errors[splicing] = re.sub(r"127\.0\.0\.1:\d+", "PEER", result.error)
    assert errors[True].startswith(
        f"multifd channel 0 from PEER: connection ended in the middle of a packet ({5 * PAGE + PAGE // 2} bytes of it received"
    )
    assert errors[True] == errors[False]


class _FileSink:
    def _pageFile(self, block: Any, offset: int, length: int) -> Any:
        return (block.name, offset, length)


def _expanded(runs: tuple[tuple[int, int], ...]) -> list[int]:
    return [start + i * PAGE for start, size in runs for i in range(size // PAGE)]


_offsetLists = st.lists(
    st.one_of(st.integers(0, 40).map(lambda page: page * PAGE), st.integers(0, 40 * PAGE)),
    max_size=24,
)


@settings(max_examples=300, deadline=None)
@given(offsets=_offsetLists)
def test_pageRunsFollowThePayload(offsets: list[int]) -> None:
    """
    The runs of a packet's pages, laid end to end, are its offsets in payload
    order; each run is consecutive pages and no run could go on into the next.
    """
    runs = pageRuns(tuple(offsets), PAGE)
    assert _expanded(runs) == offsets
    assert all(size > 0 and size % PAGE == 0 for _, size in runs)
    assert all(start + size != following for (start, size), (following, _) in zip(runs, runs[1:]))


@settings(max_examples=300, deadline=None)
@given(offsets=_offsetLists, consecutive=st.booleans())
def test_onlyRunsThatWouldBeAcceptedAreSpliced(offsets: list[int], consecutive: bool) -> None:
    """
    The migration offers a file for a packet's pages exactly when they are
    one run of pages that its own checks accept (aligned, inside the block):
    splicing never writes anything the ordinary path would have refused.
    """
    if consecutive and offsets:
        offsets = [offsets[0] + i * PAGE for i in range(len(offsets))]
    block = RamBlock("pc.ram", 32 * PAGE)
    migration = Migration(
        MigrationInfo(number=1, peer="test", channels=1, startedAt=0.0), _FileSink(),  # type: ignore[arg-type]
        clock=Clock(), pageSize=PAGE, compression=None, channelTimeout=60.0, onEnded=lambda m, r: None,
    )
    migration.state = LOADING
    migration.blocks = {"pc.ram": block}
    inside = all(offset % PAGE == 0 and offset <= block.length - PAGE for offset in offsets)
    assert (_firstOffsetOutside(tuple(offsets), PAGE, block.length - PAGE) is None) == inside
    accepted = bool(offsets) and inside and isOneRun(tuple(offsets), PAGE)
    answer = migration.pageFileFor("pc.ram", tuple(offsets))
    assert answer == (("pc.ram", offsets[0], len(offsets) * PAGE) if accepted else None)
    assert migration.pageFileFor("other", tuple(offsets)) is None
    migration.state = DRAINING
    assert migration.pageFileFor("pc.ram", tuple(offsets)) is None

"""
Multifd channels read in place (L{twisted_multifd._directread}): the parser's
direct-fill interface gives the same events as feeding chunks, whatever mix of
the two delivers the bytes, and over real sockets the reader is installed and
the received memory is exact.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol

from twisted_multifd import MigrationReceiverFactory
from twisted_multifd._directread import DirectReader, canReadDirectly
from twisted_multifd._errors import ProtocolError
from twisted_multifd._incremental import DIRECT_SMALL, IncrementalParser, View
from twisted_multifd._initpacket import INIT_PACKET_SIZE
from twisted_multifd._packet import RamPacket, buildRamPacket, channelPackets
from twisted_multifd.testing import RecordingSink, playOverTCP, synthesizeMigration

PAGE = 4096


def _stream(packets: int = 4) -> bytes:
    parts = []
    for number in range(packets):
        pages = 1 + number % 5
        parts.append(buildRamPacket(
            pageSize=PAGE, flags=0, packetNum=number, block="pc.ram",
            normalOffsets=tuple(PAGE * (number * 8 + i) for i in range(pages)),
            payload=bytes([number + 1]) * (PAGE * pages),
        ))
    return b"".join(parts)


def _materialized(event: Any) -> Any:
    # A direct View is only valid until the parser asks for more: copy it out
    # as a sink would.
    if isinstance(event, RamPacket):
        return (event.flags, event.packetNum, event.block, event.normalOffsets, bytes(event.data))
    return event


def _allAtOnce(data: bytes) -> list[Any]:
    parser = IncrementalParser(channelPackets(PAGE))
    parser.feed(data)
    events = []
    while (event := parser.nextEvent()) is not None:
        events.append(_materialized(event))
    return events


def _mixed(data: bytes, steps: list[tuple[bool, int]]) -> tuple[list[Any], IncrementalParser]:
    """
    Deliver C{data} by a script of (direct?, size) steps, pulling events after
    each, and whatever is left by feeding.
    """
    parser = IncrementalParser(channelPackets(PAGE))
    events: list[Any] = []
    position = 0

    def pull() -> None:
        while (event := parser.nextEvent()) is not None:
            events.append(_materialized(event))

    for direct, size in steps:
        if position >= len(data):
            break
        target = parser.directBuffer() if direct else None
        if target is not None:
            count = min(size, len(target), len(data) - position)
            target[:count] = data[position : position + count]
            parser.directFilled(count)
        else:
            count = min(size, len(data) - position)
            parser.feed(data[position : position + count])
        position += count
        pull()
    if position < len(data):
        parser.feed(data[position:])
        pull()
    return events, parser


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3 * PAGE)), max_size=80))
def test_directFillsGiveTheSameEvents(steps: list[tuple[bool, int]]) -> None:
    """
    Any mix of direct fills and fed chunks yields the events of the stream
    fed at once, and leaves the parser at a record boundary.
    """
    data = _stream()
    events, parser = _mixed(data, steps)
    assert events == _allAtOnce(data)
    assert parser.atBoundary and parser.buffered == 0
    assert parser.consumed == len(data)


def test_partialDirectFillCountsAsBufferedAndNotABoundary() -> None:
    """
    Bytes received in place for an unfinished request are held: a stream
    that ends there ends in the middle of a record.
    """
    data = _stream(1)
    parser = IncrementalParser(channelPackets(PAGE))
    assert parser.nextEvent() is None and parser.atBoundary
    target = parser.directBuffer()
    assert target is not None and len(target) == 12  # the common header
    target[:5] = data[:5]
    assert parser.directFilled(5) is False
    assert (parser.buffered, parser.atBoundary, parser.wanted()) == (5, False, 7)
    # Feeding after a partial fill keeps the order of the bytes.
    parser.feed(data[5:])
    [event] = [_materialized(parser.nextEvent())]
    assert event == _allAtOnce(data)[0]


def test_queuedBytesGoFirstIntoTheDirectBuffer() -> None:
    """
    Bytes queued before (as the sniffer's first read) are moved into the
    direct buffer ahead of what is received in place.
    """
    data = _stream(2)
    parser = IncrementalParser(channelPackets(PAGE))
    parser.feed(data[:20])  # the header and 8 bytes of the next request
    assert parser.nextEvent() is None
    target = parser.directBuffer()
    assert target is not None
    assert parser.buffered == 8
    rest = data[20:]
    position = 0
    events = []
    while position < len(rest):
        target = parser.directBuffer()
        assert target is not None  # nothing is ever queued again
        count = len(target)
        target[:] = rest[position : position + count]
        position += count
        if parser.directFilled(count):
            while (event := parser.nextEvent()) is not None:
                events.append(_materialized(event))
    assert events == _allAtOnce(data)


def test_largePlainRequestsAreNotPreallocated() -> None:
    """
    A plain request above L{DIRECT_SMALL} (a compressed payload, a
    device-state blob) goes through the queue, so a hostile length field
    does not make the parser set aside memory before the bytes arrive;
    L{View} requests (bounded by the packet's page count) are filled in
    place.
    """
    def wants(request: int):
        yield request
        yield "done"

    parser = IncrementalParser(wants(DIRECT_SMALL + 1))
    assert parser.directBuffer() is None
    assert parser.wanted() == DIRECT_SMALL + 1
    parser = IncrementalParser(wants(View(DIRECT_SMALL * 8)))
    target = parser.directBuffer()
    assert target is not None and len(target) == DIRECT_SMALL * 8


def test_viewBufferIsReusedAndReadOnly() -> None:
    """
    The payloads of successive packets land in one buffer, handed to the
    parser read-only.
    """
    data = _stream(6)
    parser = IncrementalParser(channelPackets(PAGE))
    assert parser.nextEvent() is None
    buffers = set()
    position = 0
    while position < len(data):
        target = parser.directBuffer()
        assert target is not None
        count = len(target)
        target[:] = data[position : position + count]
        position += count
        parser.directFilled(count)
        while (event := parser.nextEvent()) is not None:
            assert isinstance(event.data, memoryview) and event.data.readonly
            buffers.add(id(event.data.obj))
    assert len(buffers) == 1


def test_errorsStillNameTheField() -> None:
    """
    A bad header received in place is refused like a fed one.
    """
    data = bytearray(_stream(1))
    data[0] ^= 0xFF
    parser = IncrementalParser(channelPackets(PAGE))
    parser.nextEvent()
    target = parser.directBuffer()
    assert target is not None
    target[:] = data[: len(target)]
    parser.directFilled(len(target))
    with pytest.raises(ProtocolError, match="packet magic"):
        parser.nextEvent()


class _Plain(Protocol):
    pass


def test_onlyPlainSocketTransportsAreReadDirectly() -> None:
    class Fake:
        socket = object()

    assert not canReadDirectly(Fake())
    assert not canReadDirectly(object())


@pytest_twisted.inlineCallbacks
def test_receivedOverTCPInPlace():
    """
    Over real loopback TCP every multifd channel is read by a
    L{DirectReader}, and the memory received is exact.
    """
    migration = synthesizeMigration(seed=9, convention="10.0", channels=3, dirtyRounds=2)
    sink = RecordingSink()
    readers: list[DirectReader] = []
    factory = MigrationReceiverFactory(lambda info: sink, channels=3)
    original = DirectReader.install

    def install(self: DirectReader) -> None:
        readers.append(self)
        original(self)

    DirectReader.install = install  # type: ignore[method-assign]
    try:
        yield playOverTCP(reactor, factory, migration, order=[1, 0, 3, 2])
    finally:
        DirectReader.install = original  # type: ignore[method-assign]
    result = yield sink.whenEnded()
    assert result.complete, result.error
    assert sink.memory() == migration.memory
    assert len(readers) == 3


@pytest_twisted.inlineCallbacks
def test_connectionCutInsideAPayload():
    """
    A multifd channel that ends in the middle of a payload received in place
    fails the migration, saying how much of the packet arrived.
    """
    migration = synthesizeMigration(seed=3, convention="10.0", channels=1, dirtyRounds=0)
    [channel] = migration.multifd
    sink = RecordingSink()
    factory = MigrationReceiverFactory(lambda info: sink, channels=1)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        address = ("127.0.0.1", port.getHost().port)
        main = socket.create_connection(address)
        multifd = socket.create_connection(address)
        try:
            main.sendall(migration.main.data)
            # The initial packet, one whole packet, and half of the next
            # packet's payload.
            cut = INIT_PACKET_SIZE + (len(channel.data) - INIT_PACKET_SIZE) // 2
            multifd.sendall(channel.data[:cut])
            multifd.close()
            result = yield sink.whenEnded()
        finally:
            main.close()
    finally:
        yield port.stopListening()
    assert not result.complete
    assert "multifd channel 0" in result.error
    assert "connection ended" in result.error
    yield defer.succeed(None)

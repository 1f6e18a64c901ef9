"""
The order-fixing relay (`twisted-multifd relay`).

Most tests run in memory: StringTransports for the source's connections and
for the connections to the destination (a MemoryReactorClock records the
relay's connection attempts and runs every timeout), delivering nothing to a
paused transport, like a socket. The last ones run the command and the twistd
plugin over real sockets with recorded QEMU connections and a destination
that records what reaches it.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure

from captures import recorded

from twisted_multifd._initpacket import MultiFDInitPacket, buildInitPacket
from twisted_multifd._options import MultifdOptions
from twisted_multifd._relay import RelayFactory, RelayResult
from twisted_multifd._relaycommand import RelayOptions

HOST = "192.0.2.1"
DESTINATION = ("198.51.100.7", 4444)
UPSTREAM = f"tcp:{DESTINATION[0]}:{DESTINATION[1]}"
UUID = bytes(range(16))
CHANNEL_TIMEOUT = 60.0
CONNECT_TIMEOUT = 30.0
MAIN_START = b"QEVM\x00\x00\x00\x03" + b"main stream " * 10


def initPacket(channelID: int, uuid: bytes = UUID, version: int = 1) -> bytes:
    return buildInitPacket(MultiFDInitPacket(uuid=uuid, channelID=channelID, version=version))


def multifdStart(channelID: int) -> bytes:
    return initPacket(channelID) + f"packets of channel {channelID} ".encode() * 8


# Harness


class HalfCloseTransport(StringTransport):
    """
    A StringTransport that can half-close, as TCP and Unix sockets can.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


class Wire:
    """
    One end of an in-memory connection: bytes for the protocol are queued
    and delivered only while its transport is producing, like a socket.
    """

    def __init__(self, protocol: Any, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self.pending = b""
        self.eof = False
        self.gone = False
        self.protocol.makeConnection(transport)

    @property
    def paused(self) -> bool:
        return self.transport.producerState == "paused"

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)

    @property
    def written(self) -> bytes:
        return self.transport.value()

    def send(self, data: bytes, chunk: int = 65536) -> None:
        self.pending += data
        self.pump(chunk)

    def end(self) -> None:
        """
        The peer half-closes (EOF) once everything queued is delivered.
        """
        self.eof = True
        self.pump()

    def pump(self, chunk: int = 65536) -> None:
        while self.pending and not self.paused and not self.closing and not self.gone:
            piece, self.pending = self.pending[:chunk], self.pending[chunk:]
            self.protocol.dataReceived(piece)
        if self.eof and not self.pending and not self.paused and not self.closing and not self.gone:
            self.eof = False
            self.protocol.readConnectionLost()

    def lose(self, reason: Exception | None = None) -> None:
        """
        The connection is gone: after the relay closed or aborted it (as
        asked), or for C{reason}.
        """
        if self.gone:
            return
        self.gone = True
        if reason is None:
            reason = ConnectionAborted() if self.aborted else ConnectionDone()
        self.protocol.connectionLost(Failure(reason))


class Relay:
    """
    A RelayFactory on a MemoryReactorClock, with helpers to connect sources
    and to answer its connection attempts.
    """

    def __init__(self, channels: int = 4, upstream: str = UPSTREAM, transport: type = HalfCloseTransport,
                 **kwargs: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.results: list[RelayResult] = []
        self.factory = RelayFactory(upstream, channels=channels, reactor=self.reactor,
                                    onMigrationEnded=self.results.append, channelTimeout=CHANNEL_TIMEOUT,
                                    connectTimeout=CONNECT_TIMEOUT, **kwargs)
        self.transport = transport
        self.sources: list[Wire] = []
        self.upstreams: list[Wire] = []
        self._port = 40000
        self._answered = 0

    def source(self, data: bytes = b"", host: str = HOST) -> Wire:
        self._port += 1
        peer = IPv4Address("TCP", host, self._port)
        wire = Wire(self.factory.buildProtocol(peer), self.transport(peerAddress=peer))
        self.sources.append(wire)
        if data:
            wire.send(data)
        return wire

    @property
    def attempts(self) -> int:
        """
        Connection attempts to the destination not answered yet.
        """
        return len(self.reactor.tcpClients) + len(self.reactor.unixClients) - self._answered

    def accept(self) -> Wire:
        """
        The oldest unanswered attempt connects.
        """
        assert self.attempts > 0, "the relay is not connecting"
        host, port, factory, _, _ = self.reactor.tcpClients[self._answered]
        assert (host, port) == DESTINATION
        self._answered += 1
        wire = Wire(factory.buildProtocol(None), self.transport(peerAddress=IPv4Address("TCP", host, port)))
        self.upstreams.append(wire)
        return wire

    def refuse(self, reason: Exception | None = None) -> None:
        assert self.attempts > 0, "the relay is not connecting"
        _, _, factory, _, _ = self.reactor.tcpClients[self._answered]
        connector = self.reactor.connectors[self._answered]
        self._answered += 1
        factory.clientConnectionFailed(connector, Failure(reason or ConnectionRefusedError()))

    def closeAsked(self) -> None:
        """
        Deliver connectionLost to every transport the relay closed or aborted.
        """
        for wire in self.sources + self.upstreams:
            if wire.closing and not wire.gone:
                wire.lose()


def assemble(relay: Relay, order: list[int | str], host: str = HOST) -> dict[int | str, Wire]:
    """
    Connect a migration's channels in C{order} (ids and C{"main"}), each
    sending its first bytes.
    """
    wires = {}
    for which in order:
        wires[which] = relay.source(MAIN_START if which == "main" else multifdStart(int(which)), host)
    return wires


def connectAll(relay: Relay, channels: int) -> list[Wire]:
    upstreams = []
    for _ in range(channels + 1):
        upstreams.append(relay.accept())
    assert relay.attempts == 0
    return upstreams


def errors(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"] >= LogLevel.error]


# Connection order


def test_mainConnectsFirstThenMultifdInIdOrderEachAfterThePrevious() -> None:
    relay = Relay(channels=4)
    wires = assemble(relay, [2, 0, 3, 1])
    assert relay.attempts == 0, "nothing connects before the main channel is in"
    wires["main"] = relay.source(MAIN_START)
    order = []
    for _ in range(5):
        assert relay.attempts == 1, "one connection attempt at a time"
        upstream = relay.accept()
        order.append(upstream.written)
    assert relay.attempts == 0
    assert order == [MAIN_START] + [multifdStart(i) for i in range(4)]


def test_nothingConnectsUntilTheLastMultifdChannelIsIn() -> None:
    relay = Relay(channels=3)
    assemble(relay, ["main", 1, 0])
    assert relay.attempts == 0
    relay.source(multifdStart(2))
    assert relay.attempts == 1
    assert relay.accept().written == MAIN_START


def test_plainMigrationConnectsAtOnce() -> None:
    relay = Relay(channels=0)
    source = relay.source(MAIN_START)
    assert relay.accept().written == MAIN_START
    assert not source.paused


def test_unixDestination(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    factory = RelayFactory(f"unix:{tmp_path}/dest.sock", channels=0, reactor=reactor)
    peer = IPv4Address("TCP", HOST, 40001)
    Wire(factory.buildProtocol(peer), StringTransport(peerAddress=peer)).send(MAIN_START)
    assert [client[0] for client in reactor.unixClients] == [f"{tmp_path}/dest.sock"]


def test_channelsAreGroupedBySourceHost() -> None:
    relay = Relay(channels=1)
    relay.source(MAIN_START, host="192.0.2.1")
    relay.source(multifdStart(0), host="192.0.2.2")
    assert relay.attempts == 0
    relay.source(multifdStart(0), host="192.0.2.1")
    assert relay.attempts == 1
    assert len(relay.factory.migrations) == 2


# Bytes read before the destination connection


def test_sourcesAreNotReadUntilTheirDestinationConnectionIsMade() -> None:
    relay = Relay(channels=2)
    wires = assemble(relay, [1, 0, "main"])
    assert all(wire.paused for wire in wires.values())
    relay.accept()
    assert not wires["main"].paused and wires[0].paused and wires[1].paused
    relay.accept()
    assert not wires[0].paused and wires[1].paused
    relay.accept()
    assert not wires[1].paused


@settings(max_examples=60, deadline=None)
@given(
    mainChunk=st.integers(1, 40),
    multifdChunk=st.integers(1, 100),
    mainMore=st.binary(max_size=300),
    multifdMore=st.binary(max_size=300),
)
def test_earlyBytesAreForwardedOnceAndInOrder(mainChunk: int, multifdChunk: int, mainMore: bytes,
                                              multifdMore: bytes) -> None:
    relay = Relay(channels=1)
    channel = relay.source()
    channel.send(multifdStart(0) + multifdMore, chunk=multifdChunk)  # read only up to the initial packet
    main = relay.source()
    main.send(MAIN_START + mainMore, chunk=mainChunk)  # read only up to the magic
    mainUp = relay.accept()
    main.send(b"later main bytes")
    channelUp = relay.accept()
    channel.send(b"later channel bytes")
    assert mainUp.written == MAIN_START + mainMore + b"later main bytes"
    assert channelUp.written == multifdStart(0) + multifdMore + b"later channel bytes"


def test_bytesFromTheDestinationGoBackToTheSource() -> None:
    relay = Relay(channels=0)
    source = relay.source(MAIN_START)
    upstream = relay.accept()
    upstream.send(b"return path")
    assert source.written == b"return path"


# Flow control


def test_eachTransportIsTheOtherSidesStreamingProducer() -> None:
    relay = Relay(channels=1)
    wires = assemble(relay, [0, "main"])
    for upstream, source in zip(connectAll(relay, 1), [wires["main"], wires[0]]):
        assert upstream.transport.producer is source.transport and upstream.transport.streaming
        assert source.transport.producer is upstream.transport and source.transport.streaming


def test_aFullDestinationPausesTheSource() -> None:
    relay = Relay(channels=1)
    wires = assemble(relay, [0, "main"])
    mainUp, channelUp = connectAll(relay, 1)
    channelUp.transport.producer.pauseProducing()  # what a full socket buffer does
    assert wires[0].paused
    wires[0].send(b"x" * 100000)
    assert channelUp.written == multifdStart(0), "nothing read while the destination is full"
    channelUp.transport.producer.resumeProducing()
    wires[0].pump()
    assert channelUp.written == multifdStart(0) + b"x" * 100000
    assert not wires["main"].paused


def test_aFullSourcePausesTheDestination() -> None:
    relay = Relay(channels=0)
    source = relay.source(MAIN_START)
    upstream = relay.accept()
    source.transport.producer.pauseProducing()
    assert upstream.paused


# Ending


def runMigration(relay: Relay, channels: int) -> tuple[dict[int | str, Wire], list[Wire]]:
    wires = assemble(relay, [*reversed(range(channels)), "main"])
    return wires, connectAll(relay, channels)


def test_cleanEndHalfClosesEachWayThenCloses() -> None:
    relay = Relay(channels=1)
    wires, (mainUp, channelUp) = runMigration(relay, 1)
    source = wires["main"]
    source.send(b"end of stream")
    source.end()
    assert mainUp.transport.writeClosed and not mainUp.closing, "half-closed: the destination may still answer"
    assert mainUp.transport.producer is None
    mainUp.send(b"a late answer")
    assert source.written == b"a late answer"
    mainUp.end()
    assert source.closing and mainUp.closing
    wires[0].end()
    channelUp.end()
    assert relay.results == []
    with capturedLogs() as events:
        relay.closeAsked()
    (result,) = relay.results
    assert result.clean and result.error is None
    assert [(c.channelID, c.toDestination, c.toSource) for c in result.connections] == [
        (None, len(MAIN_START + b"end of stream"), len(b"a late answer")),
        (0, len(multifdStart(0)), 0),
    ]
    (line,) = [formatEvent(e) for e in events if "relayed cleanly" in formatEvent(e)]
    assert "main + multifd [0] of 1" in line
    assert f"main {len(MAIN_START) + 13}/13, multifd 0 {len(multifdStart(0))}/0" in line
    assert errors(events) == []
    assert relay.factory.migrations == []


def test_withoutHalfCloseTheOtherSideClosesAfterItsWrites() -> None:
    relay = Relay(channels=0, transport=StringTransport)
    source = relay.source(MAIN_START)
    upstream = relay.accept()
    source.end()
    assert upstream.closing and not upstream.aborted
    relay.closeAsked()
    assert source.closing
    relay.closeAsked()
    assert relay.results[0].clean


def test_sourceGoneWithoutHalfCloseStillEndsCleanly() -> None:
    relay = Relay(channels=0)
    source = relay.source(MAIN_START)
    upstream = relay.accept()
    source.lose(ConnectionDone())
    assert upstream.closing
    upstream.lose()
    assert relay.results[0].clean


# Failures: each ends its migration with one error line and closes both sides


def test_destinationRefusedAbortsEverySource() -> None:
    relay = Relay(channels=2)
    wires = assemble(relay, [1, 0, "main"])
    with capturedLogs() as events:
        relay.refuse()
    assert all(wire.aborted for wire in wires.values())
    (result,) = relay.results
    assert not result.clean
    assert result.error == (
        f"main channel from {HOST}:40003: connecting to {UPSTREAM} failed: Connection was refused by other side."
    )
    (line,) = errors(events)
    assert result.error in line and "migration 1 from 192.0.2.1: failed" in line


def test_multifdChannelRefusedAbortsBothSidesOfEveryConnection() -> None:
    relay = Relay(channels=2)
    wires = assemble(relay, [1, 0, "main"])
    mainUp = relay.accept()
    channelUp = relay.accept()
    with capturedLogs() as events:
        relay.refuse()
    assert all(wire.aborted for wire in [*wires.values(), mainUp, channelUp])
    assert "multifd channel 1 from" in relay.results[0].error
    assert len(errors(events)) == 1


def test_connectionAttemptTimesOut() -> None:
    relay = Relay(channels=0)
    source = relay.source(MAIN_START)
    relay.reactor.advance(CONNECT_TIMEOUT - 1)
    assert relay.results == []
    relay.reactor.advance(1)
    assert relay.reactor.connectors[0].stoppedConnecting
    assert source.aborted
    assert relay.results[0].error.endswith(f"failed: no connection within {CONNECT_TIMEOUT:g} s")


def test_missingChannelTimesOut() -> None:
    relay = Relay(channels=4)
    wires = assemble(relay, [0, "main", 2, 1])
    relay.reactor.advance(CHANNEL_TIMEOUT - 1)
    assert relay.results == []
    with capturedLogs() as events:
        relay.reactor.advance(1)
    assert all(wire.aborted for wire in wires.values())
    assert relay.attempts == 0
    assert relay.results[0].error == (
        "migration 1 from 192.0.2.1: multifd channels [3] missing: waited 60 s for all channels to connect;"
        " have the main channel and multifd channels [0, 1, 2] of 4"
    )
    (line,) = errors(events)
    assert line.startswith("migration 1 from 192.0.2.1: failed after 60.00 s (") and line.count("migration 1") == 1


def test_missingMainChannelTimesOut() -> None:
    relay = Relay(channels=1)
    relay.source(multifdStart(0))
    relay.reactor.advance(CHANNEL_TIMEOUT)
    assert relay.results[0].error.startswith("migration 1 from 192.0.2.1: the main channel missing")


def test_destinationLostMidRelayEndsTheMigration() -> None:
    relay = Relay(channels=1)
    wires, (mainUp, channelUp) = runMigration(relay, 1)
    with capturedLogs() as events:
        channelUp.lose(ConnectionLost())
    assert wires["main"].aborted and wires[0].aborted and mainUp.aborted
    assert relay.results[0].error == (
        f"multifd channel 0 from {HOST}:40001: the destination connection was lost:"
        " Connection to the other side was lost in a non-clean fashion."
    )
    assert len(errors(events)) == 1


def test_lossAfterBothSidesEndedIsStillClean() -> None:
    """
    A destination that closed its socket (QEMU 7.2 does once loaded) makes
    the relay's final empty write fail (EPIPE on a Unix socket): no byte can
    be lost by then.
    """
    relay = Relay(channels=0)
    source = relay.source(MAIN_START)
    upstream = relay.accept()
    upstream.end()
    source.end()
    upstream.lose(ConnectionLost())
    source.lose()
    assert relay.results[0].clean


def test_destinationGoneWhileTheSourceStillSendsFails() -> None:
    relay = Relay(channels=0)
    source = relay.source(MAIN_START)
    upstream = relay.accept()
    upstream.end()
    assert source.transport.writeClosed and not source.closing
    source.send(b"more of the stream")
    upstream.lose(ConnectionLost())
    assert source.aborted
    assert "the destination connection was lost" in relay.results[0].error


def test_sourceResetMidRelayEndsTheMigration() -> None:
    relay = Relay(channels=1)
    wires, upstreams = runMigration(relay, 1)
    wires["main"].lose(ConnectionLost())
    assert all(wire.aborted for wire in [wires[0], *upstreams])
    assert relay.results[0].error.startswith(f"main channel from {HOST}:40002: the source connection was lost")


def test_badFirstBytesEndTheMigrationAssemblingFromThatHost() -> None:
    relay = Relay(channels=2)
    wires = assemble(relay, [0, "main"])
    stranger = relay.source(b"GET / HTTP/1.1\r\n")
    assert stranger.aborted
    with capturedLogs() as events:
        stranger.lose()
    assert all(wire.aborted for wire in wires.values())
    assert relay.results[0].error == (
        f"connection from {HOST}:40003: dropped before its channel type was known"
        " (first bytes 47 45 54 20 2f 20 48 54 54 50 2f 31 2e 31 0d 0a)"
    )
    assert len(errors(events)) == 1


def test_badFirstBytesFromAnotherHostLeaveTheMigrationAlone() -> None:
    relay = Relay(channels=1)
    assemble(relay, [0])
    relay.source(b"\x16\x03\x01\x02", host="203.0.113.9").lose()
    assert relay.results == []
    relay.source(MAIN_START)
    assert relay.attempts == 1


def test_silentConnectionIsDroppedAtTheSniffTimeout() -> None:
    relay = Relay(channels=1, sniffTimeout=5.0)
    channel = relay.source(multifdStart(0))
    silent = relay.source(b"QE")
    relay.reactor.advance(5)
    assert silent.aborted
    silent.lose()
    assert channel.aborted
    assert "dropped before its channel type was known (first bytes 51 45)" in relay.results[0].error


def test_multifdChannelShortOfItsInitialPacketIsDroppedAtTheSniffTimeout() -> None:
    """
    The sniff timeout also covers a multifd channel's 64-byte initial
    packet, counted from when the connection was accepted: a channel that
    sent its magic but not the rest in time is dropped, and so is the
    migration assembling from its host.
    """
    relay = Relay(channels=2, sniffTimeout=5.0)
    channel = relay.source(multifdStart(0))
    relay.reactor.advance(3)
    slow = relay.source(initPacket(1)[:10])
    relay.reactor.advance(4.9)
    slow.send(initPacket(1)[10:40])
    assert not slow.aborted
    with capturedLogs() as events:
        relay.reactor.advance(0.1)
    assert slow.aborted
    assert ("connection from 192.0.2.1:40002: multifd channel sent 40 of the 64 bytes of its initial packet"
            " in 5 s; dropping it") in [formatEvent(e) for e in events]
    slow.lose()
    assert channel.aborted
    [result] = relay.results
    assert not result.clean
    assert result.error.startswith("multifd channel from 192.0.2.1:40002: the source connection was lost")
    # The migration's error says why, not only that the connection went.
    assert "it sent 40 of the 64 bytes of its initial packet in 5 s (the sniff timeout)" in result.error


@pytest.mark.parametrize(
    "packet, expected",
    [
        (initPacket(2), "multifd channel 2 from 192.0.2.1:40002: initial packet id: channel id 2, expected 0 to 1"),
        (initPacket(0), "multifd channel 0 from 192.0.2.1:40002: initial packet id: channel id 0 twice"),
        (initPacket(1, version=2), "multifd channel from 192.0.2.1:40002: initial packet version: expected 1, got 2"),
    ],
)
def test_badInitialPacketEndsTheMigration(packet: bytes, expected: str) -> None:
    relay = Relay(channels=2)
    first = relay.source(multifdStart(0))
    bad = relay.source(packet)
    assert first.aborted and bad.aborted
    assert relay.results[0].error == expected


def test_multifdChannelForAPlainRelay() -> None:
    relay = Relay(channels=0)
    channel = relay.source(multifdStart(0))
    assert channel.aborted
    assert "expects plain migrations (channels = 0)" in relay.results[0].error


@pytest.mark.parametrize("close", ["eof", "lost"])
def test_multifdChannelEndingBeforeItsInitialPacket(close: str) -> None:
    relay = Relay(channels=2)
    main = relay.source(MAIN_START)
    channel = relay.source(initPacket(0)[:40])
    if close == "eof":
        channel.end()
        assert channel.closing
    channel.lose(ConnectionDone())
    assert main.aborted
    assert relay.results[0].error == (
        f"multifd channel from {HOST}:40002: connection ended after 40 bytes, before its 64-byte initial packet"
    )


# Grouping by source host and uuid, as the receiver does


def _relayedAlone(wires: dict[int | str, Wire], upstreams: list[Wire], channels: int, uuid: bytes) -> None:
    """
    Each of C{upstreams} (main first, then multifd ids in order) got exactly
    what its own source connection in C{wires} sent.
    """
    starts = [MAIN_START] + [initPacket(i, uuid) + f"packets of {uuid.hex()[:4]} {i}".encode()
                             for i in range(channels)]
    for which, upstream, start in zip(["main", *range(channels)], upstreams, starts):
        wires[which].send(b" and more of " + str(which).encode())
        assert upstream.written == start + b" and more of " + str(which).encode()


def test_twoMigrationsFromOneHostWithDifferentUUIDsAreRelayedSeparately() -> None:
    relay = Relay(channels=2)
    first, second = b"\xaa" * 16, b"\xbb" * 16

    def channel(i: int, uuid: bytes) -> Wire:
        return relay.source(initPacket(i, uuid) + f"packets of {uuid.hex()[:4]} {i}".encode())

    a = {1: channel(1, first), 0: channel(0, first), "main": relay.source(MAIN_START)}
    aUp = [relay.accept()]
    # The second source starts while the first is still connecting to the destination.
    b = {0: channel(0, second)}
    aUp += [relay.accept(), relay.accept()]
    b[1] = channel(1, second)
    assert relay.attempts == 0, "the second waits for its main channel"
    b["main"] = relay.source(MAIN_START)
    bUp = connectAll(relay, 2)
    _relayedAlone(a, aUp, 2, first)
    _relayedAlone(b, bUp, 2, second)
    first_, second_ = relay.factory.migrations
    assert (first_.uuid, second_.uuid) == (first, second)
    assert {c.peer.port for c in first_.connections} == {w.transport.getPeer().port for w in a.values()}
    for wire in [*a.values(), *b.values(), *aUp, *bUp]:
        wire.end()
    relay.closeAsked()
    assert [(r.number, r.clean) for r in relay.results] == [(1, True), (2, True)]


def refusedHost(events: list[dict]) -> str:
    (line,) = [line for line in errors(events) if "refusing the migrations assembling from" in line]
    return line


def test_mainChannelWithTwoMigrationsAssemblingIsRefused() -> None:
    """
    QEMU 9+ order: two sources on one host connect their multifd channels,
    then a main channel arrives that could be either's. Both migrations are
    refused, and so is the host for the channel timeout; nothing reaches
    the destination. After that the host relays again.
    """
    relay = Relay(channels=1)
    a = relay.source(initPacket(0, b"\x01" * 16))
    b = relay.source(initPacket(0, b"\x02" * 16))
    with capturedLogs() as events:
        main = relay.source(MAIN_START)
    assert main.aborted and a.aborted and b.aborted
    assert relay.attempts == 0
    assert [r.number for r in relay.results] == [1, 2]
    for result in relay.results:
        assert result.error == (
            f"main channel from {HOST}:40003, while migration 1 from {HOST} (uuid {'01' * 16}), migration 2 from"
            f" {HOST} (uuid {'02' * 16}) assembling from the same host: a main channel carries no uuid, so which"
            " migration it belongs to cannot be told; refusing them rather than relay a mix"
        )
    assert f"and new connections from it for {CHANNEL_TIMEOUT:g} s" in refusedHost(events)
    # A late channel of the refused sources is refused too, for a while; other hosts are not.
    with capturedLogs() as events:
        late = relay.source(multifdStart(0))
    assert late.aborted
    assert f"refused: connections from {HOST} are refused for 60 s more" in errors(events)[0]
    assemble(relay, [0, "main"], host="192.0.2.99")
    assert relay.attempts == 1
    relay.accept(), relay.accept()
    relay.reactor.advance(CHANNEL_TIMEOUT)
    wires, upstreams = runMigration(relay, 1)
    assert [u.written for u in upstreams] == [MAIN_START, multifdStart(0)]


def test_secondMainChannelFromTheSameHostIsRefused() -> None:
    relay = Relay(channels=1)
    first = relay.source(MAIN_START)
    with capturedLogs() as events:
        second = relay.source(MAIN_START)
    assert second.aborted and first.aborted, "which main channel the multifd channel would join cannot be told"
    assert "(uuid none yet, has its main channel) assembling from the same host" in relay.results[0].error
    refusedHost(events)


def test_newUUIDWhileAMainChannelWaitsIsRefused() -> None:
    """
    QEMU 7.2 order: a main channel first, then channels of two uuids. The
    main channel could be either's: refused, with both uuids named.
    """
    relay = Relay(channels=2)
    main = relay.source(MAIN_START)
    first = relay.source(initPacket(0))
    second = relay.source(initPacket(1, uuid=bytes(16)))
    assert main.aborted and first.aborted and second.aborted
    assert relay.attempts == 0
    (result,) = relay.results
    assert result.error == (
        f"multifd channel 1 from {HOST}:40003: initial packet uuid: uuid {'00' * 16}, other channels sent"
        f" {UUID.hex()}: a new migration from a host whose main channel is already waiting (migration 1 from"
        f" {HOST}); which migration that main channel belongs to cannot be told, so both are refused"
    )


def test_secondMigrationWithTheUUIDOfOneBeingRelayedIsRefused() -> None:
    relay = Relay(channels=1)
    wires, upstreams = runMigration(relay, 1)
    with capturedLogs() as events:
        again = relay.source(multifdStart(0))
    assert again.aborted
    assert f"a second migration from {HOST} with uuid {UUID.hex()}, while migration 1 from {HOST} with the same" \
           " uuid is being relayed" in refusedHost(events)
    wires[0].send(b"still relayed")
    assert upstreams[1].written == multifdStart(0) + b"still relayed"
    assert not any(wire.aborted for wire in [*wires.values(), *upstreams])
    assert relay.results == []


def test_sameUUIDAssemblingAtOnceAreBothRefused() -> None:
    relay = Relay(channels=2)
    first = relay.source(multifdStart(0))
    with capturedLogs() as events:
        second = relay.source(multifdStart(0))
    assert first.aborted and second.aborted
    assert relay.results[0].error == f"multifd channel 0 from {HOST}:40002: initial packet id: channel id 0 twice"
    refusedHost(events)


def test_otherHostsAreNotAffectedByARefusedHost() -> None:
    relay = Relay(channels=1)
    other = assemble(relay, [0], host="192.0.2.50")
    relay.source(MAIN_START)
    relay.source(MAIN_START)
    assert not other[0].aborted
    other["main"] = relay.source(MAIN_START, host="192.0.2.50")
    assert [u.written for u in connectAll(relay, 1)] == [MAIN_START, multifdStart(0)]


def test_relayKeepsServingAfterAFailedMigration() -> None:
    relay = Relay(channels=1)
    assemble(relay, [0, "main"])
    relay.refuse()
    relay.closeAsked()
    wires, (mainUp, channelUp) = runMigration(relay, 1)
    for wire in [wires["main"], wires[0], mainUp, channelUp]:
        wire.end()
    relay.closeAsked()
    assert [result.clean for result in relay.results] == [False, True]
    assert [result.number for result in relay.results] == [1, 2]


def test_progressLine() -> None:
    relay = Relay(channels=0)
    relay.source(MAIN_START)
    relay.accept()
    relay.reactor.advance(2)
    (migration,) = relay.factory.migrations
    assert migration.progressLine() == (
        f"migration 1 from 192.0.2.1: relaying, {len(MAIN_START)} B to the destination and 0 B back"
        " in 2.0 s (0.0 MiB/s)"
    )


# Options


def test_relaySubcommand() -> None:
    options = MultifdOptions()
    options.parseOptions(["relay", "--to", "unix:/run/dest.sock", "--channels", "4", "--once"])
    assert isinstance(options.subOptions, RelayOptions)
    assert options.subOptions["to"] == "unix:/run/dest.sock"
    assert options.subOptions["channels"] == 4


@pytest.mark.parametrize("argv, message", [
    ([], "--to is required"),
    (["--to", "nowhere:1"], "not a client endpoint"),
    (["--to", "tcp:h:1", "--channels", "256"], "0 to 255"),
])
def test_relayOptionErrors(argv: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        RelayOptions().parseOptions(argv)


def test_relayProgressOption() -> None:
    options = RelayOptions()
    options.parseOptions(["--to", UPSTREAM])
    assert options["progress"] == "auto"
    for mode in ["tty", "log", "off"]:
        options = RelayOptions()
        options.parseOptions(["--to", UPSTREAM, "--progress", mode])
        assert options["progress"] == mode


def test_relayBadProgressModeIsAUsageError() -> None:
    with pytest.raises(usage.UsageError, match="^--progress must be auto, tty, log, off; not 'fancy'$"):
        RelayOptions().parseOptions(["--to", UPSTREAM, "--progress", "fancy"])
    result = subprocess.run(
        [sys.executable, "-m", "twisted_multifd", "relay", "--to", UPSTREAM, "--progress", "fancy"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--progress must be auto, tty, log, off; not 'fancy'" in result.stderr
    assert "Traceback" not in result.stderr


def _relayService(argv: list[str], reactor: Any, underTwistd: bool = False,
                  ended: Any = lambda result: None) -> Any:
    from twisted_multifd._relaycommand import _listeningService

    options = RelayOptions()
    options.parseOptions(["--to", UPSTREAM, "--listen", "tcp:0", *argv])
    return _listeningService(options, reactor, ended, underTwistd=underTwistd)


@pytest.mark.parametrize("argv, underTwistd, mode", [
    ([], False, "tty"),  # auto, and stderr is a terminal
    (["--progress", "log"], False, "log"),
    (["--progress", "off"], False, "off"),
    ([], True, "log"),  # twistd owns stderr
    (["--progress", "tty"], True, "log"),
    (["--progress", "off"], True, "off"),
])
def test_relayProgressModeResolved(monkeypatch: Any, argv: list[str], underTwistd: bool, mode: str) -> None:
    from test_progress import FakeTerminal

    monkeypatch.setattr("sys.stderr", FakeTerminal())
    service = _relayService(argv, MemoryReactorClock(), underTwistd)
    assert service.progressMode == mode


def test_relayProgressModeWithoutATerminalIsLog(monkeypatch: Any) -> None:
    import io

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert _relayService([], MemoryReactorClock()).progressMode == "log"


def test_twistdRelayServiceLogsProgress(monkeypatch: Any) -> None:
    """
    C{twistd -n multifd relay}: progress log lines even on a terminal, and
    C{--status} still gets the relay's own tracker.
    """
    from test_progress import FakeTerminal
    from twisted_multifd._relaycommand import makeRelayService
    from twisted_multifd._status import RelayStatusTracker

    monkeypatch.setattr("sys.stderr", FakeTerminal())
    options = RelayOptions()
    options.parseOptions(["--to", UPSTREAM, "--listen", "tcp:0", "--progress", "tty",
                          "--status", "tcp:0:interface=127.0.0.1"])
    service = makeRelayService(options, MemoryReactorClock())
    assert service.progressMode == "log"
    assert isinstance(service.statusTracker, RelayStatusTracker)


def test_relayedMigrationOnATerminal(monkeypatch: Any) -> None:
    """
    C{--progress tty}: a relayed migration gets a status line on stderr,
    redrawn every 0.25 s of the reactor's clock, with the bytes relayed to
    the destination, their rate and the channels in; the line goes when the
    migration ends, and stderr is given back when the relay stops.
    """
    from test_progress import FakeTerminal

    monkeypatch.setenv("COLUMNS", "200")
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    relay = Relay(channels=1)
    service = _relayService(["--channels", "1", "--progress", "tty"], relay.reactor, ended=relay.results.append)
    relay.factory = service.factory  # drive the command's own factory
    service.startService()
    assert service.whenListening.called
    assert sys.stderr is not terminal  # status lines clear themselves before other writes

    wires = assemble(relay, [0])
    relay.reactor.advance(0.25)
    assert terminal.screen().text == "migration 1 from 192.0.2.1: assembling, 0 B relayed, -- /s, 1/2 channels"
    wires["main"] = relay.source(MAIN_START)
    upstreams = connectAll(relay, 1)
    early = len(MAIN_START) + len(multifdStart(0))
    for _ in range(8):  # 2 s at 128 KiB a channel every 0.25 s: 1 MiB/s in all
        wires["main"].send(b"m" * 128 * 1024)
        wires[0].send(b"c" * 128 * 1024)
        relay.reactor.advance(0.25)
    assert terminal.screen().rows == [
        "migration 1 from 192.0.2.1: relaying, 2.0 MiB relayed, 1.0 MiB/s, 2/2 channels"]
    assert sum(len(u.written) for u in upstreams) == early + 2 * 1024 * 1024

    for wire in [wires["main"], wires[0], *upstreams]:
        wire.end()
    relay.closeAsked()
    assert [result.clean for result in relay.results] == [True]
    relay.reactor.advance(0.25)
    assert terminal.screen().text == ""  # the line is gone with the migration
    service.stopService()
    assert service.terminal is None
    assert sys.stderr is terminal
    assert terminal.screen().text == ""


# Over real sockets


class RecordingDestination:
    """
    A destination that accepts connections and reads each to its end,
    remembering the order they were accepted in and every byte.
    """

    def __init__(self, unixPath: Path | None = None) -> None:
        if unixPath is None:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.address = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        else:
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(str(unixPath))
            self.listener.listen(16)
            self.address = f"unix:{unixPath}"
        self.received: list[bytearray] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            data = bytearray()
            self.received.append(data)
            thread = threading.Thread(target=self._read, args=(connection, data), daemon=True)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _read(connection: socket.socket, data: bytearray) -> None:
        with connection:
            while chunk := connection.recv(1 << 20):
                data += chunk

    def join(self, timeout: float = 30.0) -> None:
        for thread in list(self._threads):
            thread.join(timeout)

    def close(self) -> None:
        self.listener.close()


def _waitForAddress(path: Path, process: subprocess.Popen, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"relay exited early ({process.returncode}): {out or ''}{err or ''}")
        time.sleep(0.02)
    raise AssertionError("relay did not write its address file")


def _playSource(address: str, streams: tuple[bytes, ...], order: list[int]) -> list[bytes]:
    """
    Connect the streams in C{order}, then send them all at once (the relay
    reads none of them until it has all), half-close, read to the end.
    """
    _, host, port = address.split(":")
    sockets = {index: socket.create_connection((host, int(port))) for index in order}
    answers: dict[int, bytes] = {}

    def play(index: int) -> None:
        s = sockets[index]
        s.sendall(streams[index])
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        answers[index] = answer
        s.close()

    threads = [threading.Thread(target=play, args=(index,), daemon=True) for index in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return [answers[index] for index in sorted(answers)]


def _relayCommand(destination: str, channels: int, addressFile: Path) -> list[str]:
    return ["relay", "--listen", "tcp:0:interface=127.0.0.1", "--to", destination, "--channels", str(channels),
            "--once", "--address-file", str(addressFile)]


@pytest.mark.parametrize("name, unix", [("cap72-4", False), ("cap10-4-zstd", True)])
def test_commandRelaysRecordedMigrationMainFirst(tmp_path: Path, name: str, unix: bool) -> None:
    migration = recorded(name)
    destination = RecordingDestination(tmp_path / "dest.sock" if unix else None)
    addressFile = tmp_path / "address"
    process = subprocess.Popen(
        [sys.executable, "-m", "twisted_multifd", *_relayCommand(destination.address, migration.channels, addressFile)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        address = _waitForAddress(addressFile, process)
        # Multifd channels first, in reverse, then the main channel last.
        answers = _playSource(address, migration.streams, [*range(migration.channels, 0, -1), 0])
        _, err = process.communicate(timeout=60)
        destination.join()
    finally:
        process.kill()
        destination.close()
    assert process.returncode == 0, err
    assert answers == [b""] * len(migration.streams), "every source connection saw a clean end"
    byID = sorted(migration.streams[1:], key=lambda stream: stream[24])
    assert [bytes(data) for data in destination.received] == [migration.streams[0], *byID]
    assert "relayed cleanly" in err and "Traceback" not in err


def test_commandDrawsAStatusLineOnATerminal(tmp_path: Path) -> None:
    """
    With stderr on a terminal, C{relay} redraws a status line (bytes relayed
    to the destination, rate, channels in) while a migration is relayed, and
    clears it: what is left on the screen is the log lines, the last saying
    the migration was relayed cleanly.
    """
    import fcntl
    import struct
    import termios

    from test_cli import _readTerminal
    from test_progress import Screen

    migration = recorded("cap72-1")
    destination = RecordingDestination()
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    addressFile = tmp_path / "address"
    process = subprocess.Popen(
        [sys.executable, "-m", "twisted_multifd", *_relayCommand(destination.address, 1, addressFile)],
        stdout=subprocess.PIPE, stderr=slave,
    )
    os.close(slave)
    try:
        _, host, port = _waitForAddress(addressFile, process).split(":")
        channel = socket.create_connection((host, int(port)))  # the multifd channel first
        main = socket.create_connection((host, int(port)))
        half = [len(stream) // 2 for stream in migration.streams]
        main.sendall(migration.streams[0][: half[0]])
        channel.sendall(migration.streams[1][: half[1]])
        before = _readTerminal(master, process, lambda text: re.search(
            r"migration 1 from 127\.0\.0\.1: relaying, [\d.]+ [KM]iB relayed, [^,]+/s, 2/2 channels", text))
        main.sendall(migration.streams[0][half[0]:])
        channel.sendall(migration.streams[1][half[1]:])
        for s in (main, channel):
            s.shutdown(socket.SHUT_WR)
        after = _readTerminal(master, process, lambda text: False, timeout=60)
        process.wait(timeout=60)
        destination.join()
        main.close()
        channel.close()
    finally:
        process.kill()
        os.close(master)
        destination.close()
    assert process.returncode == 0
    assert [bytes(data) for data in destination.received] == list(migration.streams)
    text = (before + after).decode()
    assert "\x1b[J" in text
    screen = Screen()
    screen.feed(text)
    rows = [row for row in screen.rows if row]
    assert "relayed cleanly" in rows[-1], rows
    assert not [row for row in rows if "/s, 2/2 channels" in row], rows  # no status line left
    assert all(row.startswith("twisted-multifd: ") for row in rows), rows


def test_commandExitsOneWhenTheDestinationRefuses(tmp_path: Path) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    addressFile = tmp_path / "address"
    process = subprocess.Popen(
        [sys.executable, "-m", "twisted_multifd", *_relayCommand(f"tcp:127.0.0.1:{port}", 1, addressFile)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, host, relayPort = _waitForAddress(addressFile, process).split(":")
        channel = socket.create_connection((host, int(relayPort)))
        channel.sendall(initPacket(0))
        main = socket.create_connection((host, int(relayPort)))
        main.sendall(MAIN_START)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1
    (line,) = [line for line in err.splitlines() if line.startswith("twisted-multifd: error:")]
    assert "main channel from 127.0.0.1:" in line and f"connecting to tcp:127.0.0.1:{port} failed" in line
    assert "Connection refused" in line and "Traceback" not in err
    for source in (channel, main):
        with pytest.raises(ConnectionResetError):  # aborted: the source must not take it for a clean end
            source.recv(10)


def test_commandStoppedEndsMigrationsInProgress(tmp_path: Path) -> None:
    addressFile = tmp_path / "address"
    log = tmp_path / "stderr"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "twisted_multifd", "relay", "--listen", "tcp:0:interface=127.0.0.1",
             "--to", "tcp:127.0.0.1:1", "--channels", "2", "--address-file", str(addressFile)],
            stdout=subprocess.DEVNULL, stderr=stderr,
        )
    try:
        _, host, port = _waitForAddress(addressFile, process).split(":")
        channel = socket.create_connection((host, int(port)))
        channel.sendall(initPacket(1))
        deadline = time.monotonic() + 30
        while "joins migration 1" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        process.terminate()
        process.wait(60)
    finally:
        process.kill()
    err = log.read_text()
    (line,) = [line for line in err.splitlines() if line.startswith("twisted-multifd: error:")]
    assert "migration 1 from 127.0.0.1" in line and line.endswith(": the relay was stopped"), err
    assert "Traceback" not in err
    with pytest.raises(ConnectionResetError):
        channel.recv(10)


def test_commandCannotListen(tmp_path: Path) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    result = subprocess.run(
        [sys.executable, "-m", "twisted_multifd", "relay", "--listen",
         f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1", "--to", "tcp:127.0.0.1:1", "--once"],
        capture_output=True, text=True, timeout=60,
    )
    busy.close()
    assert result.returncode == 2
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_twistdPlugin(tmp_path: Path) -> None:
    """
    `twistd -n multifd relay --once` relays a migration (main channel last).
    """
    migration = recorded("cap72-1")
    destination = RecordingDestination()
    addressFile = tmp_path / "address"
    process = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "--logfile=-", "multifd", *_relayCommand(destination.address, 1, addressFile)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )
    try:
        address = _waitForAddress(addressFile, process)
        _playSource(address, migration.streams, [1, 0])
        out, _ = process.communicate(timeout=60)
        destination.join()
    finally:
        process.kill()
        destination.close()
    assert "relayed cleanly" in out
    assert [bytes(data) for data in destination.received] == list(migration.streams)


# The splice(2) path: plain sockets, in this process


class _Far(Protocol):
    """
    The destination's or the source's end of a relayed connection over
    loopback TCP: keeps what arrives.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


async def _until(condition: Any, what: str, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


async def _splicedRelay(results: list[RelayResult]) -> tuple[Any, Any, list[_Far], _Far]:
    """
    A plain-migration relay on loopback TCP in front of an in-process
    destination, and one source connection through it that sent its magic.
    """
    arrived: list[_Far] = []

    def accepted() -> _Far:
        arrived.append(_Far())
        return arrived[-1]

    destination = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(accepted))
    factory = RelayFactory(f"tcp:127.0.0.1:{destination.getHost().port}", channels=0,
                           onMigrationEnded=results.append)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    source = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), _Far())
    source.transport.write(MAIN_START)
    await _until(lambda: arrived and bytes(arrived[0].received) == MAIN_START, "the early bytes at the destination")
    return destination, port, arrived, source


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux only")
@pytest_twisted.ensureDeferred
async def test_splicedBothWaysThenCleanEnd() -> None:
    results: list[RelayResult] = []
    destination, port, arrived, source = await _splicedRelay(results)
    try:
        (connection,) = [m.main for m in port.factory.migrations]
        assert len(connection._spliced) == 2, "plain TCP on both sides: the splice path"
        payload = random.Random(5).randbytes(3 * 1024 * 1024 + 17)
        source.transport.write(payload)
        far = arrived[0]
        await _until(lambda: len(far.received) == len(MAIN_START + payload), "the payload at the destination")
        assert bytes(far.received) == MAIN_START + payload
        answer = random.Random(6).randbytes(300000)
        far.transport.write(answer)
        await _until(lambda: len(source.received) == len(answer), "the answer at the source")
        assert bytes(source.received) == answer
        source.transport.loseConnection()
        await far.lost
        await source.lost
        await _until(lambda: results, "the migration to end")
        (result,) = results
        assert result.clean, result.error
        assert (result.toDestination, result.toSource) == (len(MAIN_START + payload), len(answer))
        assert all(direction.closed for direction in connection._spliced)
    finally:
        await port.stopListening()
        await destination.stopListening()


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux only")
@pytest_twisted.ensureDeferred
async def test_splicedDestinationNotReadingStopsTheSourceBeingRead() -> None:
    results: list[RelayResult] = []
    destination, port, arrived, source = await _splicedRelay(results)
    try:
        (connection,) = [m.main for m in port.factory.migrations]
        far = arrived[0]
        far.transport.pauseProducing()  # the destination reads nothing
        payload = random.Random(7).randbytes(64 * 1024 * 1024)
        source.transport.write(payload)
        relayed: list[int] = []

        def settled() -> bool:
            relayed.append(connection.destination.written)
            return len(relayed) > 30 and relayed[-1] == relayed[-30]

        await _until(settled, "the relay to stop moving bytes")
        toward = connection._spliced[0]
        assert connection.source.transport not in reactor.getReaders(), "the source is not read"
        assert toward.pending > 0 and connection.destination.transport in reactor.getWriters()
        # What left the source is in socket buffers and one pipe, not tens of MiB.
        assert relayed[-1] < 24 * 1024 * 1024
        far.transport.resumeProducing()
        await _until(lambda: len(far.received) == len(MAIN_START + payload), "everything at the destination")
        assert bytes(far.received) == MAIN_START + payload
        source.transport.loseConnection()
        await far.lost
        await _until(lambda: results, "the migration to end")
        assert results[0].clean, results[0].error
    finally:
        await port.stopListening()
        await destination.stopListening()


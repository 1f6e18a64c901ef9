"""
Play a migration source's connections into any server factory: in memory
over L{StringTransport}s (L{MigrationPump}), or over real loopback TCP
(L{playOverTCP}). See L{twisted_multifd.testing}.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTCP
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from ._testing_source import MAIN_CHANNEL_MAGIC, SyntheticMigration

ChunkSizes = int | Sequence[int]
"""
How a connection's bytes are cut into reads: one size for every read, or
sizes used in turn, over and over (C{[997, 1, 3]}: 997 bytes, then 1, then
3, then 997...).
"""

Source = SyntheticMigration | Sequence[bytes]
"""
What to play: a L{SyntheticMigration}, or the bytes of each connection with
the main channel first (recorded streams, a stream cut short...).
"""

DEFAULT_CHUNK_SIZE = 65536
DEFAULT_PEER_HOST = "192.0.2.1"
FIRST_PEER_PORT = 40000


def _streamsOf(source: Source) -> tuple[bytes, ...]:
    if isinstance(source, SyntheticMigration):
        return source.streams
    if isinstance(source, (bytes, bytearray)):
        raise TypeError("source must be a sequence of streams (one bytes per connection), not one bytes")
    return tuple(bytes(stream) for stream in source)


def _cycle(sizes: ChunkSizes) -> Iterator[int]:
    sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes)
    if not sizes or any(size < 1 for size in sizes):
        raise ValueError(f"chunk sizes must be positive, not {sizes!r}")
    return itertools.cycle(sizes)


class PumpedConnection:
    """
    One in-memory connection of a L{MigrationPump}: bytes the source has
    written and not yet delivered, and whether the source has closed it.

    Like a socket, it delivers nothing while its protocol has paused the
    transport (C{pauseProducing}): that is how a channel waiting at a sync
    barrier stops reading. Its end reaches the protocol only once every byte
    before it has; if the protocol closes or aborts the transport, the
    protocol is told the connection is lost (C{ConnectionDone} or
    C{ConnectionAborted}) and undelivered bytes are dropped.

    @ivar number: the order it was connected in (0 first); its peer port is
        C{40000 + number}.
    @ivar index: the stream index in the pump's source, or L{None} for a
        connection made with L{MigrationPump.connect}.
    @ivar transport: the L{StringTransport} the protocol sees.
    @ivar protocol: what the factory built for it, or L{None} if the factory
        refused it (then it is closed at once).
    @ivar delivered: how many bytes the protocol has been handed.
    @ivar reason: why it ended, once L{closed}.
    """

    def __init__(
        self, factory: IProtocolFactory, number: int, index: int | None, host: str,
        chunkSizes: ChunkSizes,
    ) -> None:
        self.number = number
        self.index = index
        peer = IPv4Address("TCP", host, FIRST_PEER_PORT + number)
        self.transport = StringTransport(peerAddress=peer)
        self.delivered = 0
        self.reason: Failure | None = None
        self._chunkSizes = _cycle(chunkSizes)
        self._pending = bytearray()
        self._head = b""
        self._closing = False
        self.protocol: IProtocol | None = factory.buildProtocol(peer)
        if self.protocol is None:
            self.transport.loseConnection()
            self.reason = Failure(ConnectionDone("the factory refused the connection"))
        else:
            self.protocol.makeConnection(self.transport)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "paused" if self.paused else "open"
        return (f"<PumpedConnection {self.number} (stream {self.index}): {state}, {self.delivered} delivered,"
                f" {len(self._pending)} pending{', closing' if self._closing else ''}>")

    @property
    def closed(self) -> bool:
        """
        The protocol has been told the connection is lost.
        """
        return self.reason is not None

    @property
    def paused(self) -> bool:
        """
        The protocol has stopped reading (C{pauseProducing}).
        """
        return self.transport.producerState != "producing"

    @property
    def pending(self) -> int:
        """
        Bytes the source has written that the protocol has not been handed.
        """
        return len(self._pending)

    @property
    def isMain(self) -> bool:
        """
        Its bytes start with C{QEVM}: a main migration channel.
        """
        return self._head[:4] == MAIN_CHANNEL_MAGIC

    def send(self, data: bytes = b"", *, close: bool = False) -> None:
        """
        The source writes C{data}, and with C{close} then closes the
        connection; nothing reaches the protocol until the pump runs.
        """
        if self._closing and data:
            raise ValueError("the source already closed this connection")
        if len(self._head) < 4:
            self._head = (self._head + data)[:4]
        self._pending += data
        self._closing |= close

    def _wantsToMove(self) -> bool:
        """
        L{_step} would do something, the end of the connection included.
        """
        if self.closed:
            return False
        if self.transport.disconnecting:
            return True
        return not self.paused and (bool(self._pending) or self._closing)

    def _step(self, holdEnd: bool) -> bool:
        """
        Deliver one read, or the end of the connection unless C{holdEnd}.
        True if anything happened.
        """
        if self.closed:
            return False
        if self.transport.disconnecting:
            # The protocol closed or aborted it: like a socket, no more reads.
            self._lose(ConnectionAborted() if self.transport.disconnected else ConnectionDone())
            return True
        if self.paused:
            return False
        if self._pending:
            size = next(self._chunkSizes)
            chunk = bytes(self._pending[:size])
            del self._pending[:size]
            self.delivered += len(chunk)
            assert self.protocol is not None
            self.protocol.dataReceived(chunk)
            return True
        if self._closing and not holdEnd:
            self._lose(ConnectionDone())
            return True
        return False

    def _lose(self, reason: Exception) -> None:
        self.reason = Failure(reason)
        self._pending.clear()
        self.transport.connected = False
        assert self.protocol is not None
        self.protocol.connectionLost(self.reason)


class MigrationPump:
    """
    Connects a migration source to a server factory entirely in memory and
    delivers its bytes the way sockets would, deterministically, without a
    reactor.

    Each connection gets a L{StringTransport} whose peer is C{host} (one
    source host, so the receiver groups them into one migration) and port
    C{40000 + n}. Reads go round robin over the connections, one chunk each
    per L{pump}; a connection whose protocol paused the transport gets
    nothing until it resumes.

    @param factory: any L{IProtocolFactory}, typically a
        L{twisted_multifd.MigrationReceiverFactory} (give it the same
        L{Clock} as the pump, or any clock you advance yourself).
    @param source: a L{SyntheticMigration} or the bytes of each connection,
        main first (see L{Source}); each is written whole and then closed.
        Default: nothing (use L{connect}).
    @param order: the source's stream indexes in the order their
        connections are made (C{[2, 1, 0]}: multifd channel 1, then channel
        0, then main); streams left out are not connected. Default: main
        first, then the multifd channels, as QEMU connects.
    @param chunkSizes: how each connection's bytes are cut into reads: one
        size for all, or one L{ChunkSizes} per stream index (C{[4096, [997,
        1], 3]}: main in 4096-byte reads, channel 0 alternating 997 and 1,
        channel 1 three bytes at a time).
    @param clock: the L{Clock} the factory uses. Given, L{flush} also lets
        time pass when nothing else can happen, so that a migration that
        cannot finish ends with its timeout instead of waiting for ever.
    @param host: the source host every connection comes from.
    @param mainClosesLast: hold the end of the main channel (a connection
        starting with C{QEVM}) while any other connection can still move, as
        a QEMU source closes its multifd sockets before its main one.
    @param clockLimit: L{flush} never moves the clock more than this many
        seconds past where it found it (a L{LoopingCall} would otherwise
        keep it going for ever).
    """

    def __init__(
        self,
        factory: IProtocolFactory,
        source: Source = (),
        *,
        order: Sequence[int] | None = None,
        chunkSizes: int | Sequence[ChunkSizes] = DEFAULT_CHUNK_SIZE,
        clock: Clock | None = None,
        host: str = DEFAULT_PEER_HOST,
        mainClosesLast: bool = True,
        clockLimit: float = 3600.0,
    ) -> None:
        self.factory = factory
        self.clock = clock
        self.host = host
        self.mainClosesLast = mainClosesLast
        self.clockLimit = clockLimit
        self.connections: list[PumpedConnection] = []
        streams = _streamsOf(source)
        if isinstance(chunkSizes, int):
            perStream: list[ChunkSizes] = [chunkSizes] * len(streams)
        else:
            perStream = list(chunkSizes)
            if len(perStream) != len(streams):
                raise ValueError(
                    f"{len(perStream)} chunk sizes for {len(streams)} streams: give one int for all,"
                    " or one entry (an int or a sequence of ints) per stream"
                )
        order = list(range(len(streams))) if order is None else list(order)
        if len(set(order)) != len(order) or not all(0 <= i < len(streams) for i in order):
            raise ValueError(f"order must list distinct stream indexes 0 to {len(streams) - 1}, not {order}")
        for index in order:
            self._open(index, streams[index], True, perStream[index])

    def connect(
        self, data: bytes = b"", *, close: bool = True, chunkSizes: ChunkSizes = DEFAULT_CHUNK_SIZE
    ) -> PumpedConnection:
        """
        Open one more connection now (C{buildProtocol}, C{makeConnection})
        and have the source write C{data} on it, then close it unless
        C{close} is false (send more later with L{PumpedConnection.send}).
        For a channel that connects late, or a test that hands out bytes
        piece by piece.
        """
        return self._open(None, data, close, chunkSizes)

    def _open(self, index: int | None, data: bytes, close: bool, chunkSizes: ChunkSizes) -> PumpedConnection:
        connection = PumpedConnection(self.factory, len(self.connections), index, self.host, chunkSizes)
        connection.send(data, close=close)
        self.connections.append(connection)
        return connection

    def connection(self, index: int) -> PumpedConnection:
        """
        The connection playing the source's stream C{index} (0: main).
        """
        for connection in self.connections:
            if connection.index == index:
                return connection
        raise KeyError(f"stream {index} is not connected")

    def pump(self) -> bool:
        """
        One round: at most one read (or end) on every connection, in the
        order they were connected. True if anything was delivered.
        """
        moved = False
        for connection in self.connections:
            holdEnd = self.mainClosesLast and connection.isMain and any(
                other._wantsToMove() for other in self.connections if other is not connection
            )
            moved |= connection._step(holdEnd)
        if not moved and self.mainClosesLast:
            # Only ends of main channels were held: deliver them now.
            for connection in self.connections:
                moved |= connection._step(holdEnd=False)
        return moved

    def flush(self) -> bool:
        """
        L{pump} until nothing more can be delivered; with a C{clock}, then
        advance it to its next timer and go on, until no timer is left or
        C{clockLimit} is reached. True if anything was delivered.
        """
        moved = False
        clock = self.clock
        deadline = None if clock is None else clock.seconds() + self.clockLimit
        while True:
            while self.pump():
                moved = True
            if clock is None or deadline is None:
                return moved
            calls = clock.getDelayedCalls()
            if not calls:
                return moved
            due = min(call.getTime() for call in calls)
            if due > deadline:
                return moved
            clock.advance(max(0.0, due - clock.seconds()))

    @property
    def closed(self) -> bool:
        """
        Every connection has ended.
        """
        return all(connection.closed for connection in self.connections)


# Real sockets


class _StreamWriter(Protocol):
    """
    Writes one stream as soon as it is connected; L{lost} fires when the
    connection is gone.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


def playOverTCP(
    reactor: IReactorTCP,
    factory: IProtocolFactory,
    source: Source,
    *,
    order: Sequence[int] | None = None,
    interface: str = "127.0.0.1",
) -> Deferred[None]:
    """
    Listen with C{factory} on an ephemeral port of C{interface}, connect to
    it once per stream in C{order} (each connection made before the next is
    started, so the factory accepts them in that order), write every stream
    whole, then close the connections, main last as QEMU does.

    For integration tests that want real sockets (Nagle, kernel buffers,
    real flow control) rather than L{MigrationPump}. It needs a running
    reactor: under trial, a L{twisted.trial.unittest.TestCase} returning
    this Deferred; under pytest, pytest-twisted.

    @return: fires with L{None} once every connection is closed and the port
        has stopped listening; how the migration ended is the factory's
        business (e.g. L{RecordingSink.whenEnded}).
    """
    streams = _streamsOf(source)
    order = list(range(len(streams))) if order is None else list(order)

    async def play() -> None:
        port = await TCP4ServerEndpoint(reactor, 0, interface=interface).listen(factory)
        try:
            client = TCP4ClientEndpoint(reactor, interface, port.getHost().port)
            writers = []
            for index in order:
                writers.append(await connectProtocol(client, _StreamWriter(streams[index])))
            main = [w for w in writers if w.data[:4] == MAIN_CHANNEL_MAGIC]
            others = [w for w in writers if w not in main]
            for group in (others, main):
                for writer in group:
                    assert writer.transport is not None
                    writer.transport.loseConnection()
                for writer in group:
                    await writer.lost
        finally:
            await maybeDeferred(port.stopListening)

    return Deferred.fromCoroutine(play())


__all__ = ["ChunkSizes", "MigrationPump", "PumpedConnection", "Source", "playOverTCP"]

"""
An order-fixing relay for QEMU migrations, to run beside a destination QEMU.

QEMU destinations up to 7.2 take the first connection they accept as the main
migration channel. When the network reorders a source's connection set-up (a
lost ACK), a multifd channel is accepted first: the destination parses the
main stream as a multifd channel, logs C{received packet magic 5145564d
expected 11223344} and stays C{inmigrate} for ever.

The relay accepts a source's main and multifd connections in any order on one
port and tells them apart by their first bytes, with the receiver's
L{ChannelSniffer}. Once the main channel and all N multifd channels are in, it
connects to the destination the main channel first, then the multifd channels
one at a time in channel-id order, each only after the previous one is
connected, and forwards first the bytes it had already read. From then on it
copies bytes both ways, unchanged, with flow control: each side's transport is
the other side's streaming producer, so a slow destination slows the source
and a connection never holds more than about one read and one write buffer.
Between plain sockets on Linux the bytes are moved with splice(2) instead,
never entering Python (L{twisted_multifd._splice}). Nothing is added to or
removed from the wire.

Connections are grouped into migrations by source host and the uuid of the
multifd initial packets, as the receiver groups them; see L{RelayFactory}.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet import defer, error
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._closing import skipEmptySends
from ._errors import ConnectionClosed, MigrationError, MigrationTimeout, ProtocolError
from ._initpacket import INIT_PACKET_SIZE, MultiFDInitPacket, parseInitPacket, checkChannelJoins
from ._sniff import MAIN_CHANNEL, ChannelSniffer, describePeer, sourceHost
from ._splice import PIPE_SIZE, SplicedDirection, canSplice

log = Logger(namespace="twisted_multifd.relay")

DEFAULT_SNIFF_TIMEOUT = 120.0
DEFAULT_CHANNEL_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 30.0

ASSEMBLING, CONNECTING, RELAYING, ENDED = "assembling", "connecting", "relaying", "ended"


def formatSize(size: int) -> str:
    """
    C{"512 B"}, C{"12.0 KiB"}, C{"33.4 MiB"}: a byte count for log lines.
    """
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


@attrs.frozen
class RelayedConnectionReport:
    """
    What one of a migration's connections carried.

    @ivar label: which connection, e.g. C{"multifd channel 2 from 10.0.0.5:40112"}.
    @ivar channelID: the multifd channel id; L{None} for the main channel, or
        for a multifd channel whose initial packet never arrived.
    @ivar connected: whether its connection to the destination was made.
    @ivar toDestination: bytes relayed from the source to the destination.
    @ivar toSource: bytes relayed from the destination back to the source.
    """

    label: str
    channelID: int | None
    connected: bool
    toDestination: int
    toSource: int


@attrs.frozen
class RelayResult:
    """
    How a relayed migration ended.

    @ivar number: the relay's sequence number for the migration (1, 2, ...).
    @ivar peer: the source host.
    @ivar channels: the multifd channels the relay expected.
    @ivar startedAt: when its first connection was classified (the clock's seconds: POSIX
        time on a real reactor).
    @ivar duration: seconds from its first connection to its end.
    @ivar error: why it did not end cleanly, naming the connection; L{None}
        if every connection was relayed and closed normally on both sides.
    @ivar connections: the main channel's report first, then the multifd
        channels' in id order.
    @ivar uuid: the uuid of its multifd channels' initial packets; L{None}
        for a plain migration, or if none arrived.
    """

    number: int
    peer: str
    channels: int
    startedAt: float
    duration: float
    error: str | None
    connections: tuple[RelayedConnectionReport, ...]
    uuid: bytes | None = None

    @property
    def clean(self) -> bool:
        return self.error is None

    @property
    def toDestination(self) -> int:
        return sum(c.toDestination for c in self.connections)

    @property
    def toSource(self) -> int:
        return sum(c.toSource for c in self.connections)


@attrs.define(eq=False)
class _End:
    """
    One of a relayed connection's two transports, and how far it has closed.

    @ivar written: bytes written to this transport.
    @ivar readEnded: its peer will send nothing more (EOF, or the connection
        is gone).
    @ivar hasProducer: the other side's transport is registered as this
        transport's producer.
    """

    name: str
    transport: Any = None
    written: int = 0
    readEnded: bool = False
    hasProducer: bool = False
    halfClosed: bool = False
    closing: bool = False
    lost: Failure | None = None


def _canHalfClose(transport: ITransport) -> bool:
    return callable(getattr(transport, "loseWriteConnection", None))


def _noDelay(transport: ITransport) -> None:
    """
    Like QEMU's own sockets: small writes (the return path) go out at once.
    """
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is not None:
        try:
            setNoDelay(True)
        except OSError:
            pass  # not a TCP socket (Unix)


@implementer(IHalfCloseableProtocol)
class _RelaySniffer(ChannelSniffer):
    """
    The receiver's L{ChannelSniffer}, passing half-closes on to the relayed
    connection, and telling the relay when it dropped a connection (bad first
    bytes, or too slow to send them): the migration assembling from that host
    cannot complete then.
    """

    def __init__(self, relay: "RelayFactory", peer: IAddress) -> None:
        super().__init__(relay._channelFor, peer, relay.clock, relay.sniffTimeout)
        self._relay = relay
        self._head = b""

    def dataReceived(self, data: bytes) -> None:
        if self.delegate is None and len(self._head) < 16:
            self._head += data[: 16 - len(self._head)]
        super().dataReceived(data)

    def readConnectionLost(self) -> None:
        if self.delegate is None:
            self.transport.loseConnection()
        else:
            self.delegate.readConnectionLost()  # type: ignore[attr-defined]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if self.delegate is None and reason.check(error.ConnectionAborted):
            seen = f"first bytes {self._head.hex(' ')}" if self._head else "nothing received"
            self._relay._strayFailed(self._peer, ProtocolError(
                f"dropped before its channel type was known ({seen})",
                connection=f"connection from {describePeer(self._peer)}",
            ))


@implementer(IHalfCloseableProtocol)
class _UpstreamProtocol(Protocol):
    """
    The destination side of a relayed connection: reports everything to it.
    """

    def __init__(self, connection: "RelayedConnection") -> None:
        self.connection = connection

    def connectionMade(self) -> None:
        self.connection._upstreamMade(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.connection._received(self.connection.destination, data)

    def readConnectionLost(self) -> None:
        self.connection._readEnded(self.connection.destination)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self.connection._lost(self.connection.destination, reason)


class _UpstreamFactory(Factory):
    noisy = False  # one connection each: no "Starting factory" lines

    def __init__(self, protocol: _UpstreamProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress) -> Protocol:
        return self._protocol


@implementer(IHalfCloseableProtocol)
class RelayedConnection(Protocol):
    """
    One source connection, once its kind is known, and its connection to the
    destination.

    Until the destination connection is made the source is not read (a
    multifd channel is read up to its 64-byte initial packet); the bytes
    read so far are kept and written to the destination first.
    """

    def __init__(self, relay: "RelayFactory", kind: str, peer: IAddress) -> None:
        self.relay = relay
        self.kind = kind
        self.peer = peer
        self.peerName = describePeer(peer)
        self.channelID: int | None = None
        self.migration: RelayedMigration | None = None
        self.source = _End("source")
        self.destination = _End("destination")
        self._early: list[bytes] = []
        self._earlySize = 0
        self._stopped = False
        self._connecting = False
        self._spliced: tuple[SplicedDirection, ...] = ()

    @property
    def label(self) -> str:
        if self.kind == MAIN_CHANNEL:
            return f"main channel from {self.peerName}"
        which = "" if self.channelID is None else f" {self.channelID}"
        return f"multifd channel{which} from {self.peerName}"

    @property
    def finished(self) -> bool:
        return self.source.lost is not None and self.destination.lost is not None

    @property
    def state(self) -> str:
        """
        For C{/status}: C{"held"} (in, waiting for the other channels or for
        its turn), C{"connecting"} (to the destination), C{"relaying"},
        C{"closing"} (one direction has ended), C{"closed"}.
        """
        if self._stopped or self.finished:
            return "closed"
        if self.destination.transport is None:
            return "connecting" if self._connecting else "held"
        if self.source.readEnded or self.destination.readEnded:
            return "closing"
        return "relaying"

    def report(self) -> RelayedConnectionReport:
        return RelayedConnectionReport(
            label=self.label,
            channelID=self.channelID,
            connected=self.destination.transport is not None,
            toDestination=self.destination.written,
            toSource=self.source.written,
        )

    # The source side (IProtocol, IHalfCloseableProtocol)

    def connectionMade(self) -> None:
        self.source.transport = self.transport
        skipEmptySends(self.transport)
        if self.kind == MAIN_CHANNEL:
            self.transport.pauseProducing()
            log.info("{label}: classified as main channel", label=self.label)
            self.relay._mainArrived(self)
        else:
            log.info("{label}: classified as multifd channel", label=self.label)

    def dataReceived(self, data: bytes) -> None:
        self._received(self.source, data)

    def readConnectionLost(self) -> None:
        self._readEnded(self.source)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self._lost(self.source, reason)

    # Both sides

    def _other(self, end: _End) -> _End:
        return self.destination if end is self.source else self.source

    def _received(self, end: _End, data: bytes) -> None:
        if self._stopped:
            return
        other = self._other(end)
        if other.transport is None:
            self._early.append(data)
            self._earlySize += len(data)
            if self.kind != MAIN_CHANNEL and self.migration is None and self._earlySize >= INIT_PACKET_SIZE:
                self._initPacketIn()
            return
        if other.lost is None:
            other.written += len(data)
            other.transport.write(data)

    def _initPacketIn(self) -> None:
        self.transport.pauseProducing()
        head = b"".join(self._early)
        self._early = [head]
        try:
            init = parseInitPacket(head[:INIT_PACKET_SIZE])
        except ProtocolError as e:
            self.stop()
            self.relay._strayFailed(self.peer, e.onConnection(self.label))
            return
        self.channelID = init.channelID
        self.relay._multifdArrived(self, init)

    def _readEnded(self, end: _End) -> None:
        if end.readEnded:
            return
        end.readEnded = True
        if end is self.source and self.migration is None and not self._stopped:
            self.transport.loseConnection()  # a multifd channel that ended before its initial packet
            return
        self._settle()

    def _lost(self, end: _End, reason: Failure) -> None:
        if end.lost is not None:
            return
        # Both peers had ended what they send: nothing can be lost any more,
        # and an error closing a socket its peer has closed is no failure
        # (QEMU 7.2 closes its side as soon as it has loaded the stream). The
        # empty send Twisted flushes with before closing is skipped
        # altogether (_closing): it failed with EPIPE on a Unix socket whose
        # peer had closed, before the relay had read that peer's EOF.
        bothEnded = end.readEnded and self._other(end).readEnded
        end.lost = reason
        end.readEnded = True
        if self.source.lost is not None and self.destination.lost is not None:
            for direction in self._spliced:
                direction.close()
        if self._stopped:
            return
        if not reason.check(error.ConnectionDone) and not bothEnded:
            self._failed(ConnectionClosed(
                f"the {end.name} connection was lost: {reason.getErrorMessage()}", connection=self.label
            ))
            return
        if self.migration is None:
            why = ConnectionClosed(
                f"connection ended after {self._earlySize} bytes, before its {INIT_PACKET_SIZE}-byte initial packet",
                connection=self.label,
            )
            self.stop()
            self.relay._strayFailed(self.peer, why)
            return
        self._settle()
        if self.finished:
            self.migration.connectionFinished(self)

    def _settle(self) -> None:
        """
        Pass each side's end on to the other: once nothing more will be
        written to a transport, half-close it after its buffered writes (or
        close it, if it cannot half-close); once nothing more will be read
        from it either, close it.
        """
        if self._stopped or self.destination.transport is None:
            return
        for end, other in ((self.source, self.destination), (self.destination, self.source)):
            if end.lost is not None or end.closing or not other.readEnded:
                continue
            # Nothing more will be written to `end`; `other` produces no more for it.
            if end.hasProducer:
                end.hasProducer = False
                end.transport.unregisterProducer()
            if end.readEnded or other.lost is not None or not _canHalfClose(end.transport):
                end.closing = True
                end.transport.loseConnection()
            elif not end.halfClosed:
                end.halfClosed = True
                end.transport.loseWriteConnection()

    def _failed(self, reason: MigrationError) -> None:
        if self.migration is not None:
            self.migration.fail(reason)
        else:
            self.stop()
            self.relay._strayFailed(self.peer, reason)

    # Relaying

    def connectUpstream(self, endpoint: IStreamClientEndpoint) -> "defer.Deferred[None]":
        """
        Connect to the destination; fires once connected and relaying.
        """
        self._connecting = True
        d: defer.Deferred[Any] = endpoint.connect(_UpstreamFactory(_UpstreamProtocol(self)))

        def done(result: Any) -> None:
            self._connecting = False
            return None if not isinstance(result, Failure) else result  # type: ignore[return-value]

        return d.addBoth(done)

    def _upstreamMade(self, transport: ITransport) -> None:
        destination = self.destination
        destination.transport = transport
        if self._stopped:
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        skipEmptySends(transport)
        _noDelay(transport)
        source = self.source
        if source.lost is None:
            _noDelay(source.transport)
            transport.registerProducer(source.transport, True)  # type: ignore[attr-defined]
            source.transport.registerProducer(transport, True)
            destination.hasProducer = source.hasProducer = True
        early, self._early, self._earlySize = b"".join(self._early), [], 0
        if early:
            destination.written += len(early)
            transport.write(early)
        if source.lost is None and canSplice(source.transport) and canSplice(transport):
            self._spliced = (
                SplicedDirection(source.transport, transport, self._movedToDestination, PIPE_SIZE),
                SplicedDirection(transport, source.transport, self._movedToSource, None),
            )
        if source.readEnded:
            self._settle()
        else:
            source.transport.resumeProducing()

    def _movedToDestination(self, count: int) -> None:
        self.destination.written += count

    def _movedToSource(self, count: int) -> None:
        self.source.written += count

    def stop(self) -> None:
        """
        Drop both sides at once (the migration failed).
        """
        self._stopped = True
        self._early, self._earlySize = [], 0
        for end in (self.source, self.destination):
            if end.transport is not None and end.lost is None:
                end.transport.abortConnection()

    def refuse(self, reason: str) -> None:
        log.error("{label}: {reason}; closing it", label=self.label, reason=reason)
        self.stop()


class RelayedMigration:
    """
    One source's migration through the relay: assembles its connections,
    connects them to the destination in order, and ends when every
    connection has closed on both sides, or at the first failure.
    """

    def __init__(self, relay: "RelayFactory", number: int, host: str) -> None:
        self.relay = relay
        self.number = number
        self.peer = host
        self.channels = relay.channels
        self.clock = relay.clock
        self.state = ASSEMBLING
        self.main: RelayedConnection | None = None
        self.multifd: dict[int, RelayedConnection] = {}
        self.uuid: bytes | None = None
        self.result: RelayResult | None = None
        self.startedAt = self.clock.seconds()
        self._started = self.clock.seconds()
        self._queue: list[RelayedConnection] = []
        self._pending: defer.Deferred[None] | None = None
        self._timer: IDelayedCall | None = self.clock.callLater(relay.channelTimeout, self._timedOut)

    @property
    def label(self) -> str:
        return f"migration {self.number} from {self.peer}"

    @property
    def ended(self) -> bool:
        return self.state == ENDED

    @property
    def connections(self) -> list[RelayedConnection]:
        """
        The main channel first, then the multifd channels in id order.
        """
        ordered = [] if self.main is None else [self.main]
        return ordered + [self.multifd[i] for i in sorted(self.multifd)]

    # Assembly

    def attachMain(self, connection: RelayedConnection) -> None:
        self.main = connection
        connection.migration = self
        self._maybeConnect()

    def attachMultiFD(self, connection: RelayedConnection, init: MultiFDInitPacket) -> None:
        """
        Validates the initial packet as the receiver does; raises
        L{ProtocolError} if the channel cannot belong to this migration.
        """
        self.uuid = checkChannelJoins(init, self.channels, self.multifd, self.uuid, "relay")
        self.multifd[init.channelID] = connection
        connection.migration = self
        self._maybeConnect()

    def _maybeConnect(self) -> None:
        if self.state != ASSEMBLING or self.main is None or len(self.multifd) != self.channels:
            return
        self.state = CONNECTING
        self._cancelTimer()
        self.relay._assembled(self)
        if self.channels == 0:
            arrived = "the main channel is in (plain migration)"
        elif self.channels == 1:
            arrived = "the main channel and the multifd channel are in"
        else:
            arrived = f"the main channel and all {self.channels} multifd channels are in"
        log.info("{label}: {arrived}; connecting to {upstream}, main channel first",
                 label=self.label, arrived=arrived, upstream=self.relay.upstreamName)
        self._queue = self.connections
        self._connectNext()

    def _connectNext(self) -> None:
        if self.ended:
            return
        if not self._queue:
            self.state = RELAYING
            ids = sorted(self.multifd)
            order = "the main channel" + (
                f", then multifd channel{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}" if ids else ""
            )
            log.info("{label}: relaying to {upstream}; connected {order}",
                     label=self.label, upstream=self.relay.upstreamName, order=order)
            self._maybeEnd()
            return
        connection = self._queue.pop(0)
        d = connection.connectUpstream(self.relay.endpoint)
        d.addTimeout(self.relay.connectTimeout, self.clock)
        self._pending = d

        def connected(_: None) -> None:
            self._pending = None
            self._connectNext()

        def failed(failure: Failure) -> None:
            self._pending = None
            if self.ended:
                return
            if failure.check(defer.TimeoutError, defer.CancelledError, error.TimeoutError,
                             error.ConnectingCancelledError):
                why = f"no connection within {self.relay.connectTimeout:g} s"
            else:
                why = failure.getErrorMessage()
            self.fail(MigrationError(
                f"connecting to {self.relay.upstreamName} failed: {why}", connection=connection.label
            ))

        d.addCallbacks(connected, failed)

    def _timedOut(self) -> None:
        self._timer = None
        missing = []
        if self.main is None:
            missing.append("the main channel")
        absent = sorted(set(range(self.channels)) - set(self.multifd))
        if absent:
            missing.append(f"multifd channels {absent}")
        self.fail(MigrationTimeout(
            f"{' and '.join(missing)} missing: waited {self.relay.channelTimeout:g} s for all channels to connect;"
            f" have {'the main channel' if self.main else 'no main channel'} and multifd channels"
            f" {sorted(self.multifd)} of {self.channels}",
            connection=self.label,
        ))

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # Ending

    def connectionFinished(self, connection: RelayedConnection) -> None:
        """
        A connection closed normally on both sides.
        """
        self._maybeEnd()

    def _maybeEnd(self) -> None:
        if self.state == RELAYING and all(c.finished for c in self.connections):
            self._end(None)

    def fail(self, reason: MigrationError) -> None:
        if not self.ended:
            self._end(reason)

    def _end(self, reason: MigrationError | None) -> None:
        self._cancelTimer()
        self.state = ENDED
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if reason is not None:
            for connection in self.connections:
                connection.stop()
        duration = self.clock.seconds() - self._started
        self.result = result = RelayResult(
            number=self.number,
            peer=self.peer,
            channels=self.channels,
            startedAt=self.startedAt,
            duration=duration,
            error=None if reason is None else str(reason),
            connections=tuple(c.report() for c in self.connections),
            uuid=self.uuid,
        )
        if result.clean:
            log.info("{label}: relayed cleanly in {duration:.2f} s ({summary})",
                     label=self.label, duration=duration, summary=self._summary(result))
        else:
            shown = result.error or ""
            if shown.startswith(self.label + ": "):
                shown = shown[len(self.label) + 2 :]  # the line starts with the label already
            log.error("{label}: failed after {duration:.2f} s ({summary}): {error}",
                      label=self.label, duration=duration, error=shown, summary=self._summary(result))
        self.relay._ended(self, result)

    def _summary(self, result: RelayResult) -> str:
        seen = ["main" if self.main is not None else "no main"]
        seen.append(f"multifd {sorted(self.multifd)} of {self.channels}" if self.channels else "no multifd")
        counts = ", ".join(
            f"{'main' if c.channelID is None else f'multifd {c.channelID}'} {c.toDestination}/{c.toSource}"
            for c in result.connections
        )
        return (
            f"channels seen: {' + '.join(seen)}; {formatSize(result.toDestination)} to the destination,"
            f" {formatSize(result.toSource)} back; bytes to destination/back: {counts or 'none'}"
        )

    def progressLine(self) -> str:
        """
        One line on how far the migration is, for logs.
        """
        elapsed = self.clock.seconds() - self._started
        sent = sum(c.destination.written for c in self.connections)
        back = sum(c.source.written for c in self.connections)
        rate = sent / (1024 * 1024) / elapsed if elapsed > 0 else 0.0
        return (f"{self.label}: {self.state}, {formatSize(sent)} to the destination and {formatSize(back)} back"
                f" in {elapsed:.1f} s ({rate:.1f} MiB/s)")

    def status(self) -> dict[str, Any]:
        """
        Where the migration is, for C{/status} (docs/status.md): its state,
        and per channel (C{"main"}, C{"0"}, ...) the connection's state and
        the bytes relayed each way; a channel not in yet is C{"waiting"}.
        """
        connections: dict[str, dict[str, Any]] = {
            name: {"state": "waiting", "to_destination": 0, "to_source": 0}
            for name in ["main", *map(str, range(self.channels))]
        }
        for connection in self.connections:
            name = "main" if connection.kind == MAIN_CHANNEL else str(connection.channelID)
            connections[name] = {
                "state": connection.state,
                "to_destination": connection.destination.written,
                "to_source": connection.source.written,
            }
        return {
            "state": self.state,
            "uuid": None if self.uuid is None else self.uuid.hex(),
            "elapsed": self.clock.seconds() - self._started,
            "connections": connections,
        }


class RelayFactory(ServerFactory):
    """
    Accepts the main and multifd connections of QEMU migrations in any order
    on one port, groups them by source host and uuid, and relays each
    migration to the destination with its main channel connected first.

    Grouping is the receiver's (L{MigrationReceiverFactory}, docs/relay.md):
    a multifd channel joins the migration assembling from its host with the
    uuid of its initial packet; a main channel, which carries no uuid, joins
    one only while its host has exactly one migration assembling and that
    one has no main channel yet. Anything else cannot be paired for sure (a
    main channel with several migrations, or a second main channel,
    assembling from its host; a multifd channel of a new uuid while a main
    channel waits; a second migration with the uuid of one already relaying
    from the host): every migration assembling from that host is ended, and
    new connections from it are refused for C{channelTimeout} seconds, rather
    than relay a main channel with another migration's multifd channels.
    Migrations already connecting or relaying are never touched.

    @param upstream: the destination: a client endpoint string
        (C{"tcp:HOST:PORT"}, C{"unix:PATH"}) or an endpoint.
    @param channels: multifd channels per migration, as the source's
        C{multifd-channels}; 0 for plain (non-multifd) migrations.
    @param sniffTimeout: seconds a new connection has to send its first four
        bytes.
    @param channelTimeout: seconds a migration may wait for its missing
        channels.
    @param connectTimeout: seconds each connection to the destination may take.
    @param onMigrationEnded: called with the L{RelayResult} of every migration
        that ends, cleanly or not.
    @param reactor: makes the connections to the destination (when
        C{upstream} is a string) and, unless C{clock} is given, the timers.
    @param clock: the time provider for timeouts (injectable for tests).
    """

    def __init__(
        self,
        upstream: str | IStreamClientEndpoint,
        *,
        channels: int = 2,
        sniffTimeout: float = DEFAULT_SNIFF_TIMEOUT,
        channelTimeout: float = DEFAULT_CHANNEL_TIMEOUT,
        connectTimeout: float = DEFAULT_CONNECT_TIMEOUT,
        onMigrationEnded: Callable[[RelayResult], None] | None = None,
        reactor: Any = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if not 0 <= channels <= 255:
            raise ValueError(f"channels must be 0 to 255, not {channels}")
        for name, value in (("sniffTimeout", sniffTimeout), ("channelTimeout", channelTimeout),
                            ("connectTimeout", connectTimeout)):
            if not value > 0:
                raise ValueError(f"{name} must be more than 0, not {value}")
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.reactor = reactor
        self.clock: IReactorTime = reactor if clock is None else clock
        if isinstance(upstream, str):
            self.upstreamName = upstream
            self.endpoint: IStreamClientEndpoint = clientFromString(reactor, upstream)
        else:
            self.upstreamName = str(upstream)
            self.endpoint = upstream
        self.channels = channels
        self.sniffTimeout = sniffTimeout
        self.channelTimeout = channelTimeout
        self.connectTimeout = connectTimeout
        self.onMigrationEnded = onMigrationEnded
        self.noisy = False
        self.migrations: list[RelayedMigration] = []
        # Per source host, its migrations still assembling, oldest first.
        self._assembling: dict[str, list[RelayedMigration]] = {}
        # Hosts refused until this time (see the class docstring).
        self._refusedUntil: dict[str, float] = {}
        self._count = 0

    def buildProtocol(self, addr: IAddress) -> Protocol:
        sniffer = _RelaySniffer(self, addr)
        sniffer.factory = self
        return sniffer

    def _channelFor(self, kind: str, peer: IAddress) -> Protocol:
        return RelayedConnection(self, kind, peer)

    def _newMigration(self, host: str) -> RelayedMigration:
        self._count += 1
        migration = RelayedMigration(self, self._count, host)
        log.info("{label}: first channel connected; expecting a main channel and {n} multifd channels",
                 label=migration.label, n=self.channels)
        self.migrations.append(migration)
        self._assembling.setdefault(host, []).append(migration)
        return migration

    # Refusals

    def _hostRefused(self, connection: RelayedConnection, host: str) -> bool:
        """
        Refuse C{connection} (and say so) if its host is refused for now.
        """
        until = self._refusedUntil.get(host)
        if until is None:
            return False
        if self.clock.seconds() >= until:
            del self._refusedUntil[host]
            return False
        connection.refuse(f"refused: connections from {host} are refused for {until - self.clock.seconds():.0f} s"
                          " more, after migrations from it could not be told apart")
        return True

    def _refuseHost(self, host: str, connection: RelayedConnection, reason: MigrationError) -> None:
        """
        Channels from C{host} cannot be paired for sure: drop C{connection},
        end every migration assembling from the host, and refuse new
        connections from it for a while (late channels of those sources
        could otherwise join a wrong migration).
        """
        self._refusedUntil[host] = self.clock.seconds() + self.channelTimeout
        connection.stop()
        log.error("refusing the migrations assembling from {host}, and new connections from it for"
                  " {timeout:g} s: {error}", host=host, timeout=self.channelTimeout, error=str(reason))
        for migration in list(self._assembling.get(host, ())):
            migration.fail(reason)

    # Channels arriving

    def _mainArrived(self, connection: RelayedConnection) -> None:
        host = sourceHost(connection.peer)
        if self.channels == 0:
            # Plain migrations: each main channel is a whole migration.
            self._newMigration(host).attachMain(connection)
            return
        if self._hostRefused(connection, host):
            return
        assembling = self._assembling.get(host, [])
        if not assembling:
            migration = self._newMigration(host)
        elif len(assembling) == 1 and assembling[0].main is None:
            migration = assembling[0]
        else:
            self._refuseHost(host, connection, MigrationError(
                f"main channel from {connection.peerName}, while "
                + ", ".join(f"{m.label} (uuid {_uuidText(m.uuid)}"
                            f"{', has its main channel' if m.main is not None else ''})" for m in assembling)
                + " assembling from the same host: a main channel carries no uuid, so which migration it"
                " belongs to cannot be told; refusing them rather than relay a mix"
            ))
            return
        migration.attachMain(connection)

    def _multifdArrived(self, connection: RelayedConnection, init: MultiFDInitPacket) -> None:
        host = sourceHost(connection.peer)
        if self._hostRefused(connection, host):
            return
        assembling = self._assembling.get(host, [])
        migration = next((m for m in assembling if m.uuid == init.uuid), None)
        if migration is None:
            running = next((m for m in self.migrations if m.peer == host and m.uuid == init.uuid
                            and not m.ended and m not in assembling), None)
            if running is not None:
                self._refuseHost(host, connection, MigrationError(
                    f"a second migration from {host} with uuid {init.uuid.hex()}, while {running.label} with"
                    " the same uuid is being relayed: the two cannot be told apart, so the second is refused",
                    connection=connection.label,
                ))
                return
            if len(assembling) == 1 and assembling[0].uuid is None:
                migration = assembling[0]  # a main channel alone, waiting for the multifd channels
            elif any(m.main is not None for m in assembling):
                waiting = next(m for m in assembling if m.main is not None)
                self._refuseHost(host, connection, ProtocolError(
                    f"uuid {init.uuid.hex()}, other channels sent {_uuidText(waiting.uuid)}: a new migration from"
                    f" a host whose main channel is already waiting ({waiting.label}); which migration that main"
                    " channel belongs to cannot be told, so both are refused",
                    field="initial packet uuid",
                ).onConnection(connection.label))
                return
            else:
                migration = self._newMigration(host)
        log.info("{label}: joins {migration} (uuid {uuid})",
                 label=connection.label, migration=migration.label, uuid=init.uuid.hex())
        duplicate = init.channelID in migration.multifd
        try:
            migration.attachMultiFD(connection, init)
        except ProtocolError as e:
            if duplicate:
                # Two sources on one host sending the same uuid at once.
                self._refuseHost(host, connection, e.onConnection(connection.label))
                return
            connection.stop()
            migration.fail(e.onConnection(connection.label))

    def _strayFailed(self, peer: IAddress, reason: MigrationError) -> None:
        """
        A connection failed before it joined a migration: the migration
        assembling from that host, if only one is, can no longer complete.
        """
        assembling = self._assembling.get(sourceHost(peer), [])
        if len(assembling) == 1:
            assembling[0].fail(reason)
        else:
            log.error("{error}", error=str(reason))

    def _assembled(self, migration: RelayedMigration) -> None:
        assembling = self._assembling.get(migration.peer)
        if assembling is not None and migration in assembling:
            assembling.remove(migration)
            if not assembling:
                del self._assembling[migration.peer]

    def _ended(self, migration: RelayedMigration, result: RelayResult) -> None:
        self._assembled(migration)
        if migration in self.migrations:
            self.migrations.remove(migration)
        if self.onMigrationEnded is not None:
            self.onMigrationEnded(result)


def _uuidText(uuid: bytes | None) -> str:
    return "none yet" if uuid is None else uuid.hex()

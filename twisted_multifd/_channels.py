"""
The protocols of a migration's connections once their kind is known: thin
wrappers that feed a pure parser and pass its events to the L{Migration}.

Both stop reading their socket (C{pauseProducing}) whenever the migration
says they must wait: before loading starts, and at sync barriers. Bytes
already received stay unparsed in the parser until then; nothing is buffered
beyond one read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._directread import DirectReader, PageFile, canReadDirectly
from ._errors import ConnectionClosed, MigrationError, ProtocolError
from ._incremental import IncrementalParser, PagePayload, ParserGenerator
from ._initpacket import INIT_PACKET_SIZE, MultiFDInitPacket, parseInitPacket
from ._mainstream import (
    FLUSH_PER_SECTION,
    Command,
    Configuration,
    MainPage,
    MainZeroPage,
    MultiFDFlush,
    RamBlockList,
    RamSection,
    RamSectionEnd,
    StreamEnd,
    StreamHeader,
    mainStream,
)
from ._packet import DeviceStatePacket, RamPacket, channelPackets
from ._sniff import describePeer

if TYPE_CHECKING:
    from ._migration import Migration
    from ._receiver import MigrationReceiverFactory

log = Logger(namespace="twisted_multifd.channel")

# The device-state tail is held in memory until the stream ends.
MAX_TAIL = 256 * 1024 * 1024

# Bytes asked for per read on a multifd channel (Twisted's TCP transport reads
# C{bufferSize} bytes at a time, 64 KiB by default). A multifd RAM packet is
# 512 KiB of pages plus its header, so most arrive in one or two reads instead
# of about nine, and Twisted's per-read dispatch is paid far less often.
MULTIFD_READ_SIZE = 1024 * 1024


class _Channel(Protocol):
    """
    The shared driving loop: pull events while not paused, report errors to
    the migration, notice the end of the connection.
    """

    migration: "Migration | None" = None
    parser: IncrementalParser
    _reader: DirectReader | None = None

    def __init__(self, receiver: "MigrationReceiverFactory", peer: Any) -> None:
        self.receiver = receiver
        self.peer = peer
        self.peerName = describePeer(peer)
        self._paused = False
        self._processing = False
        self._lost: Failure | None = None
        self._detached = False
        self._finished = False

    @property
    def label(self) -> str:
        raise NotImplementedError

    def dataReceived(self, data: bytes) -> None:
        if self._detached:
            return
        if self.migration is not None:
            self.migration.countBytes(len(data))
        self.parser.feed(data)
        self._process()

    def directReceived(self, count: int) -> None:
        """
        C{count} bytes were received in place into the parser's buffer (see
        L{DirectReader}).
        """
        if self.migration is not None:
            self.migration.countBytes(count)
        if self.parser.directFilled(count):
            self._process()

    def externalReceived(self, count: int) -> None:
        """
        C{count} bytes of a page payload were received and stored by the
        reader itself (see L{DirectReader}).
        """
        if self.migration is not None:
            self.migration.countBytes(count)
        if self.parser.externalFilled(count):
            self._process()

    def pageFileFor(self, payload: PagePayload) -> PageFile | None:
        """
        Where the reader may store C{payload}'s pages itself, if the
        migration allows it now, else L{None}.
        """
        if self.migration is None:
            return None
        return self.migration.pageFileFor(payload.block, payload.offsets)

    def storingFailed(self, error: MigrationError) -> None:
        """
        Storing pages the reader received itself failed.
        """
        self._fail(error.onConnection(self.label))

    @property
    def finished(self) -> bool:
        """
        Whether the connection ended or its stream is over.
        """
        return self._finished or self._lost is not None

    @property
    def reading(self) -> bool:
        """
        Whether the channel wants bytes now.
        """
        return not (self._paused or self._detached or self._finished or self._lost is not None)

    def connectionLost(self, reason: Failure) -> None:
        self._lost = reason
        if self._reader is not None:
            self._reader.close()
        if self._detached:
            return
        self.parser.end()
        self._process()

    def release(self) -> None:
        """
        Start (or go on) reading and parsing.
        """
        if self._detached:
            return
        self._paused = False
        if self._lost is None:
            self.transport.resumeProducing()
        self._process()

    def _pause(self) -> None:
        self._paused = True
        if self._lost is None:
            self.transport.pauseProducing()

    def detach(self, abort: bool) -> None:
        """
        The migration is over: drop the connection (at once if it failed).
        """
        self._detached = True
        if self._lost is None and self.transport is not None:
            if abort:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()

    def _process(self) -> None:
        if self._processing:
            return  # the outer loop picks up where this call would have
        self._processing = True
        try:
            while not self._paused and not self._detached and not self._finished:
                event = self.parser.nextEvent()
                if event is None:
                    if self._lost is not None:
                        self._finished = True
                        self._ended()
                    break
                self._handle(event)
        except MigrationError as e:
            self._fail(e.onConnection(self.label))
        except Exception as e:
            log.failure("{label}: unexpected error", label=self.label)
            self._fail(MigrationError(f"{type(e).__name__}: {e}", connection=self.label))
        finally:
            self._processing = False
        if self.parser.buffered > MAX_TAIL and not self._detached:
            self._fail(ProtocolError(f"more than {MAX_TAIL} bytes held unparsed", connection=self.label))

    def _fail(self, error: MigrationError) -> None:
        if self.migration is not None:
            self.migration.fail(error)
        else:
            if self.receiver.isFollowingRefusal(self):
                log.info("{error}", error=str(error))
            else:
                log.error("{error}", error=str(error))
            self._detached = True
            if self._lost is None:
                self.transport.abortConnection()

    def _handle(self, event: Any) -> None:
        raise NotImplementedError

    def _ended(self) -> None:
        """
        The connection is gone and every byte of it has been parsed.
        """
        raise NotImplementedError


class MainChannel(_Channel):
    """
    The main migration channel. It waits (not reading) until the migration
    has all its channels, then parses the stream.
    """

    def __init__(self, receiver: "MigrationReceiverFactory", peer: Any) -> None:
        super().__init__(receiver, peer)
        self.parser = IncrementalParser(mainStream(receiver.pageSize))
        self._paused = True

    @property
    def label(self) -> str:
        return f"main channel from {self.peerName}"

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        log.info("{label}: classified as main channel", label=self.label)
        try:
            self.migration = self.receiver.mainArrived(self)
        except MigrationError as e:
            self._fail(e.onConnection(self.label))

    def start(self) -> None:
        self.release()

    def resume(self) -> None:
        self.release()

    def _handle(self, event: Any) -> None:
        migration = self.migration
        assert migration is not None
        if isinstance(event, MainZeroPage):
            migration.mainZeroPage(event.block, event.offset)
        elif isinstance(event, MainPage):
            migration.mainPage(event.block, event.offset, event.data)
        elif isinstance(event, MultiFDFlush):
            self._syncPoint(migration.flushMode or "per-round")
        elif isinstance(event, RamSectionEnd):
            migration.flushMode = event.flushMode
            if event.flushMode == FLUSH_PER_SECTION:
                self._syncPoint(event.flushMode)
        elif isinstance(event, RamSection):
            migration.mainRamSection(event)
        elif isinstance(event, RamBlockList):
            migration.mainBlockList(event)
        elif isinstance(event, Configuration):
            migration.mainConfiguration(event)
        elif isinstance(event, StreamHeader):
            migration.mainHeader(event.version)
        elif isinstance(event, Command):
            migration.mainCommand(event)
        elif isinstance(event, StreamEnd):
            self._finished = True
            migration.mainFinished(event.tail)

    def _syncPoint(self, flushMode: str) -> None:
        self._pause()
        assert self.migration is not None
        if self.migration.mainSyncPoint(flushMode) and not self._detached:
            self._paused = False
            if self._lost is None:
                self.transport.resumeProducing()

    def _ended(self) -> None:
        if self.migration is None or self.migration.ended:
            return
        self._fail(ConnectionClosed(
            f"connection ended after {self.parser.consumed + self.parser.buffered} bytes,"
            f" in the middle of the stream ({self._lost.getErrorMessage() if self._lost else ''})",
            connection=self.label,
        ))


class MultiFDChannel(_Channel):
    """
    A multifd channel: reads its initial packet, joins its migration, then
    (once the RAM block list is known) applies packets, stopping at each SYNC
    until the main channel reaches the matching sync point.
    """

    channelID: int | None = None

    def __init__(self, receiver: "MigrationReceiverFactory", peer: Any) -> None:
        super().__init__(receiver, peer)
        self.parser = IncrementalParser(self._stream())

    @property
    def label(self) -> str:
        which = "" if self.channelID is None else f" {self.channelID}"
        return f"multifd channel{which} from {self.peerName}"

    def connectionMade(self) -> None:
        log.info("{label}: classified as multifd channel", label=self.label)
        if canReadDirectly(self.transport):
            # Pages go from the socket straight into the parser's reused
            # buffer, and from there to the sink; or, for a sink that keeps
            # them in files, spliced from the socket into the file.
            self._reader = DirectReader(self.transport, self)
            self._reader.install()
        elif isinstance(getattr(self.transport, "bufferSize", None), int):
            # Other transports with this knob read as they do, but in larger
            # reads; the rest (TLS, test transports) are left alone.
            setattr(self.transport, "bufferSize", MULTIFD_READ_SIZE)

    def _stream(self) -> ParserGenerator:
        yield parseInitPacket((yield INIT_PACKET_SIZE))
        # Read after the migration released this channel: by then the main
        # channel has settled the page size and configured compression.
        assert self.migration is not None
        yield from channelPackets(self.migration.pageSize, self.receiver.compression)

    def _handle(self, event: Any) -> None:
        migration = self.migration
        if isinstance(event, RamPacket):
            assert migration is not None
            migration.multifdPacket(self, event)
            if event.sync:
                self._pause()
                if migration.syncArrived(self) and not self._detached:
                    self._paused = False
                    if self._lost is None:
                        self.transport.resumeProducing()
        elif isinstance(event, MultiFDInitPacket):
            self.channelID = event.channelID
            self._pause()  # until the migration knows its RAM blocks
            self.migration = self.receiver.multifdArrived(self, event)
            self.migration.countBytes(INIT_PACKET_SIZE + self.parser.buffered)
            if self.migration.blocks is not None:
                self.release()
        elif isinstance(event, DeviceStatePacket):
            assert migration is not None
            migration.multifdDeviceState(event)

    def _fail(self, error: MigrationError) -> None:
        if self.migration is None and not self._detached:
            # Not joined yet (its initial packet was bad): the migration being
            # assembled from this host can no longer complete, so it ends now,
            # with this error, rather than at the channel timeout.
            self._detached = True
            if self._lost is None:
                self.transport.abortConnection()
            self.receiver.strayChannelLost(self, error)
            return
        super()._fail(error)

    def _ended(self) -> None:
        migration = self.migration
        if migration is None:
            self.receiver.strayChannelLost(self, ConnectionClosed(
                f"connection ended after {self.parser.consumed + self.parser.buffered} bytes,"
                f" before its {INIT_PACKET_SIZE}-byte initial packet"
                f" ({self._lost.getErrorMessage() if self._lost else ''})",
                connection=self.label,
            ))
            return
        if migration.ended:
            return
        if not self.parser.atBoundary:
            self._fail(ConnectionClosed(
                f"connection ended in the middle of a packet ({self.parser.buffered} bytes of it"
                f" received; {self._lost.getErrorMessage() if self._lost else ''})",
                connection=self.label,
            ))
            return
        assert self.channelID is not None
        migration.channelClosed(self.channelID)

"""
Sending a capture into a QEMU destination (started with C{-incoming}), the
way a QEMU source would: the source side of the protocol, on the receiver's
own codecs (the C{build*} encoders beside each parser).

The stream is produced by L{streamActions}, a pure generator shared with
L{twisted_multifd._export}: it reads the RAM images a window of pages at a
time and yields what goes on the main channel, the multifd packets, and the
sync barriers. L{sendCapture} connects the channels and writes those actions
as the transports take them: every connection has a streaming producer, and
nothing more is read from the capture while the connection it would go to is
paused, so the image is never held in memory. On plain TCP and UNIX sockets
the bytes go straight to the socket while its transport holds nothing (a
window of data pages from the image file with C{os.sendfile}, usually
without ever reading it: see L{readPageWindows}; what the socket does not
take of such a window follows from the file once it has room), and
anything else the socket does not take is left to the transport
(L{_Connection.writeFromImage}).

What is sent (docs/send.md has the details):

- connections: the main channel first; once it is up, the N multifd channels,
  each opening with its initial packet (the capture's uuid, its channel id);
  the header is written when every channel is connected (as QEMU 9.0+ does);
- main: header, the configuration section as captured, RAM START (the
  captured section id, instance and version) with the block list, one PART
  with the pages, [SWITCHOVER_START if the capture had it], RAM END, the
  device state verbatim, EOF and VMDESC;
- every page of every block exactly once: pages with data in multifd packets
  of up to 128 pages (one block per packet, in block order); zero pages, and
  pages the capture never received, as ZERO records on main by default (a
  QEMU destination clears a page for those whatever its memory held; from
  9.0 it clears a page in a packet's zero list only if it received that page
  before), or in the packets' zero lists on request; with no multifd
  channels, PAGE and ZERO records on main;
- barriers in the capture's flush mode: per-section, SYNC on every channel
  before each RAM EOS; per-round, SYNC on every channel before a
  MULTIFD_FLUSH in START, in the PART (the round is complete) and in END;
- the end: the multifd channels are closed, then the main channel.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Generator, Iterator
from typing import Any

import attrs
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._capturereader import (
    Capture,
    CaptureError,
    DataPages,
    OpenImage,
    describePayload,
    loadCapture,
    readPageWindows,
)
from ._closing import skipEmptySends
from ._compression import (
    COMPRESSION_VALUES,
    SUPPORTED_COMPRESSION,
    Compressor,
    makeCompressor,
)
from ._errors import MigrationError
from ._initpacket import MultiFDInitPacket, buildInitPacket
from ._mainstream import (
    COMMAND_SWITCHOVER_START,
    FLUSH_PER_ROUND,
    FLUSH_PER_SECTION,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_MULTIFD_FLUSH,
    RAM_PAGE,
    RAM_ZERO,
    SECTION_END,
    SECTION_PART,
    SECTION_START,
    RamBlock,
    buildBlockList,
    buildCommand,
    buildFooter,
    buildHeader,
    buildRamRecord,
    buildSectionHeader,
)
from ._packet import FLAG_SYNC, buildRamPacket, pagesPerPacket
from ._tail import buildTail

log = Logger(namespace="twisted_multifd.sender")

ZERO_PAGES_ON_MAIN = "main"
ZERO_PAGES_IN_PACKETS = "multifd"
ZERO_PAGE_CONVENTIONS = (ZERO_PAGES_ON_MAIN, ZERO_PAGES_IN_PACKETS)
FLUSH_MODES = (FLUSH_PER_SECTION, FLUSH_PER_ROUND)

DEFAULT_TIMEOUT = 60.0
DEFAULT_PROGRESS_INTERVAL = 10.0

# Main-channel records are written in batches of about this size.
MAIN_BATCH = 256 * 1024
# Bytes written in one go before the reactor gets a turn, even if no
# transport asks us to pause.
PUMP_BUDGET = 8 * 1024 * 1024
# The most a transport we write to directly sends in one call: more than a
# socket's buffer holds, so what is left of a packet goes in one send.
DIRECT_SEND_LIMIT = 8 * 1024 * 1024

# At most this many bytes written to a multifd socket to a destination on
# this host wait in it unsent (TCP_NOTSENT_LOWAT): see
# _Connection.connectionMade.
LOCAL_NOTSENT_LOWAT = 32 * 1024

# Capabilities of the configuration section a capture cannot be sent with.
_UNSENDABLE_CAPABILITIES = {
    "x-ignore-shared": "its block list carries each block's guest address, which a capture does not record",
    "mapped-ram": "mapped-ram streams (file migration) are not supported",
}


class SendError(MigrationError):
    """
    A capture could not be sent: C{connection} names the channel, the
    message what happened.
    """


@attrs.frozen
class SendConventions:
    """
    How a capture is put on the wire.

    @ivar channels: multifd channels; 0 sends a plain migration.
    @ivar compression: the multifd payload compression (C{none} without multifd).
    @ivar flushMode: C{per-section} or C{per-round}; L{None} without multifd.
    @ivar zeroPages: C{main} (ZERO records) or C{multifd} (zero lists of packets).
    @ivar switchoverStart: send QEMU 10's SWITCHOVER_START before RAM END.
    """

    channels: int
    compression: str
    flushMode: str | None
    zeroPages: str
    switchoverStart: bool

    def describe(self) -> str:
        if not self.channels:
            how = "plain migration (PAGE and ZERO records on the main channel)"
        else:
            how = (
                f"{self.channels} multifd channel{'s' if self.channels != 1 else ''},"
                f" {self.flushMode} sync, zero pages "
                + ("as ZERO records on main" if self.zeroPages == ZERO_PAGES_ON_MAIN else "in multifd packets")
                + f", compression {self.compression}"
            )
        return how + (", SWITCHOVER_START" if self.switchoverStart else "")


@attrs.frozen
class SendResult:
    """
    A capture that was sent whole, every connection closed cleanly.

    @ivar bytesSent: over all connections.
    @ivar pages: pages sent (every page of every block, once).
    """

    capture: str
    endpoint: str
    conventions: SendConventions
    pages: int
    pagesWithData: int
    zeroPages: int
    packets: int
    bytesSent: int
    duration: float


def machineFlushMode(machine: str) -> str:
    """
    The flush mode a destination running C{machine} expects from a multifd
    source: per-section for machine types up to 8.0
    (C{multifd-flush-after-each-section} is on in their compat properties),
    per-round for later ones and for unversioned machine types.
    """
    match = re.search(r"-(\d+)\.(\d+)$", machine)
    if match is not None and (int(match.group(1)), int(match.group(2))) <= (8, 0):
        return FLUSH_PER_SECTION
    return FLUSH_PER_ROUND


def sendProblems(capture: Capture) -> list[str]:
    """
    Why C{capture} cannot be sent again, if it cannot.
    """
    problems = list(capture.problems)
    if not capture.complete and not problems:
        problems.append("the capture is not complete")
    if capture.stream is None:
        if capture.complete:
            problems.append("the manifest has no stream facts (stream)")
        return problems
    for capability in capture.stream.configuration.capabilities:
        reason = _UNSENDABLE_CAPABILITIES.get(capability)
        if reason is not None:
            problems.append(f"the source used capability {capability}: {reason}")
    if capture.deviceState is None and capture.complete:
        problems.append("the manifest has no device state (device_state)")
    if capture.multifdDeviceState:
        problems.append(
            f"the capture holds {len(capture.multifdDeviceState)} multifd device-state packets (VFIO),"
            " which cannot be sent"
        )
    for block in capture.blocks:
        if not block.name.isascii() or not 0 < len(block.name) <= 255:
            problems.append(f"RAM block name {block.name!r} is not 1 to 255 ASCII characters")
    return problems


def chooseConventions(
    capture: Capture,
    *,
    channels: int | None = None,
    compression: str | None = None,
    flushMode: str | None = None,
    zeroPages: str | None = None,
) -> SendConventions:
    """
    How to send C{capture}: whatever is not given follows the capture.

    - C{channels}: the capture's channel count.
    - C{compression}: the capture's (C{none} without multifd).
    - C{flushMode}: the capture's if it was a multifd migration, else the one
      its machine type implies (L{machineFlushMode}): it is not negotiated,
      and a destination waits for ever at a barrier it does not expect.
    - C{zeroPages}: C{main}, ZERO records on the main channel, whatever the
      capture's source did. Every destination takes them (7.2 and 10.0
      alike), and clears the page for each whatever its memory held, so the
      destination ends with zeros where the capture has them even where its
      memory did not start zeroed (ROM blocks loaded from other firmware,
      file-backed RAM). C{multifd} (zero lists in packets, QEMU 9.0+ only)
      is what a 9.0+ source sends, but such a destination only clears a
      listed page it received before and otherwise trusts it to be zero.

    @raise CaptureError: the capture cannot be sent.
    @raise ValueError: the choices do not fit together.
    """
    problems = sendProblems(capture)
    if problems:
        raise CaptureError(capture.path, problems)
    assert capture.stream is not None
    if channels is None:
        channels = capture.channels
    if not 0 <= channels <= 255:
        raise ValueError(f"channels must be 0 to 255, not {channels}")
    if compression is None:
        compression = (capture.compression or "none") if channels and capture.channels else "none"
    if compression not in SUPPORTED_COMPRESSION:
        raise ValueError(f"compression must be one of {', '.join(SUPPORTED_COMPRESSION)}, not {compression!r}")
    if compression != "none" and not channels:
        raise ValueError(f"compression {compression} needs multifd channels (channels > 0)")
    if flushMode is not None and flushMode not in FLUSH_MODES:
        raise ValueError(f"flush mode must be one of {', '.join(FLUSH_MODES)}, not {flushMode!r}")
    if zeroPages is not None and zeroPages not in ZERO_PAGE_CONVENTIONS:
        raise ValueError(f"zero pages must go to one of {', '.join(ZERO_PAGE_CONVENTIONS)}, not {zeroPages!r}")
    if zeroPages == ZERO_PAGES_IN_PACKETS and not channels:
        raise ValueError("zero pages in multifd packets need multifd channels (channels > 0)")
    if channels:
        if flushMode is None:
            if capture.channels and capture.flushMode is not None:
                flushMode = capture.flushMode
            else:
                flushMode = machineFlushMode(capture.stream.configuration.machine)
        if zeroPages is None:
            zeroPages = ZERO_PAGES_ON_MAIN
    else:
        flushMode = None
        zeroPages = ZERO_PAGES_ON_MAIN
    return SendConventions(
        channels=channels,
        compression=compression,
        flushMode=flushMode,
        zeroPages=zeroPages,
        switchoverStart="SWITCHOVER_START" in capture.stream.commands,
    )


# The stream, as actions.


@attrs.frozen
class MainBytes:
    """
    Bytes for the main channel; C{pages} page records among them, of which
    C{dataPages} PAGE records.
    """

    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    pages: int = 0
    dataPages: int = 0


@attrs.frozen
class PagePacket(DataPages):
    """
    The pages of one multifd packet (not yet compressed nor numbered).

    @ivar payload: the data pages back to back, or L{None} when they were not
        read: they are then the image's bytes from the first data page on
        (C{image}), read only if the packet cannot be sent from the file.
    @ivar image: the image the data pages are, from the first one on, while
        it is open: see L{OpenImage}.
    """

    block: str
    normalOffsets: tuple[int, ...]
    zeroOffsets: tuple[int, ...]
    payload: bytes | None = attrs.field(repr=describePayload)
    image: OpenImage | None = attrs.field(default=None, eq=False, repr=False)


class _Sync:
    """
    A SYNC packet on every multifd channel.
    """

    def __repr__(self) -> str:
        return "SYNC"


SYNC = _Sync()

Action = MainBytes | PagePacket | _Sync


class _MainRecords:
    """
    Page records for the main channel, gathered into batches; keeps the
    main channel's CONTINUE state (the block of the previous page record).
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.pages = 0
        self.dataPages = 0
        self.lastBlock: str | None = None

    def add(self, block: str, offset: int, page: bytes | memoryview | None) -> None:
        flags = RAM_ZERO if page is None else RAM_PAGE
        name: str | None = block
        if block == self.lastBlock:
            flags |= RAM_CONTINUE
            name = None
        self.lastBlock = block
        self.buffer += buildRamRecord(flags, offset, name, b"\0" if page is None else bytes(page))
        self.pages += 1
        if page is not None:
            self.dataPages += 1

    def take(self) -> MainBytes:
        batch = MainBytes(bytes(self.buffer), self.pages, self.dataPages)
        self.buffer.clear()
        self.pages = self.dataPages = 0
        return batch


def _sectionEnd(conventions: SendConventions, sectionID: int) -> Iterator[Action]:
    records = b""
    if conventions.channels:
        yield SYNC
        if conventions.flushMode == FLUSH_PER_ROUND:
            records = buildRamRecord(RAM_MULTIFD_FLUSH)
    yield MainBytes(records + buildRamRecord(RAM_EOS) + buildFooter(sectionID))


def _pages(capture: Capture, conventions: SendConventions) -> Iterator[Action]:
    pageSize = capture.pageSize
    perPacket = pagesPerPacket(pageSize)
    channels = conventions.channels
    zeroInPackets = channels > 0 and conventions.zeroPages == ZERO_PAGES_IN_PACKETS
    main = _MainRecords()
    for block in capture.blocks:
        name = block.name
        pending: list[int] = []
        pendingData: list[memoryview] = []
        for window in readPageWindows(block, pageSize, perPacket):
            if zeroInPackets:
                # As QEMU 9.0+ does: every page of the window in one packet,
                # the zero ones in its zero list.
                yield PagePacket(name, window.normalOffsets, window.zeroOffsets, window.payload, window.image)
                continue
            if channels and not pending and not window.zeroOffsets and len(window.normalOffsets) == perPacket:
                # A window of data pages is exactly one packet: send it as
                # it is in the image, usually unread (see readPageWindows),
                # without slicing and joining its pages again. (With pages
                # pending from an earlier window, packets go on filling
                # across windows below, as QEMU fills them.)
                yield PagePacket(name, window.normalOffsets, (), window.payload, window.image)
                continue
            view = memoryview(window.data)
            if not channels:
                index = {offset: i for i, offset in enumerate(window.normalOffsets)}
                for offset in range(window.start, window.start + window.count * pageSize, pageSize):
                    i = index.get(offset)
                    main.add(name, offset, None if i is None else view[i * pageSize : (i + 1) * pageSize])
            else:
                # As QEMU up to 8.2 does: zero pages on main, the others in
                # packets of up to 128 pages of one block.
                for offset in window.zeroOffsets:
                    main.add(name, offset, None)
                for i, offset in enumerate(window.normalOffsets):
                    pending.append(offset)
                    pendingData.append(view[i * pageSize : (i + 1) * pageSize])
                    if len(pending) == perPacket:
                        yield PagePacket(name, tuple(pending), (), b"".join(pendingData))
                        pending.clear()
                        pendingData.clear()
            if len(main.buffer) >= MAIN_BATCH:
                yield main.take()
        if pending:
            yield PagePacket(name, tuple(pending), (), b"".join(pendingData))
    if main.buffer:
        yield main.take()


def streamActions(capture: Capture, conventions: SendConventions) -> Generator[Action, None, None]:
    """
    The whole migration of C{capture}, in order: L{MainBytes} for the main
    channel, L{PagePacket}s for any multifd channel, and L{SYNC} for a SYNC
    packet on every multifd channel (always before the main-channel record
    that is its sync point). With C{conventions.channels == 0} there are
    only L{MainBytes}.

    The RAM images are read lazily, one window of pages at a time.
    """
    facts = capture.stream
    assert facts is not None, "chooseConventions refuses captures without stream facts"
    sectionID = facts.ramSectionID
    blocks = [RamBlock(block.name, block.length) for block in capture.blocks]
    yield MainBytes(
        buildHeader(facts.version)
        + facts.configuration.raw
        + buildSectionHeader(SECTION_START, sectionID, "ram", facts.ramInstanceID, facts.ramVersion)
        + buildBlockList(blocks)
    )
    yield from _sectionEnd(conventions, sectionID)
    yield MainBytes(buildSectionHeader(SECTION_PART, sectionID))
    yield from _pages(capture, conventions)
    yield from _sectionEnd(conventions, sectionID)
    if conventions.switchoverStart:
        yield MainBytes(buildCommand(COMMAND_SWITCHOVER_START))
    yield MainBytes(buildSectionHeader(SECTION_END, sectionID))
    yield from _sectionEnd(conventions, sectionID)
    yield MainBytes(buildTail(capture.readDeviceState(), capture.readVMDesc()))


# The connections.


def _mib(size: int) -> float:
    return size / (1024 * 1024)


@implementer(IPushProducer, IHalfCloseableProtocol)
class _Connection(Protocol):
    """
    One outgoing channel: a thin protocol that tells the sender when its
    transport wants no more data (C{paused}) and how it ended.
    """

    def __init__(self, sender: _Sender, label: str, channelID: int | None = None) -> None:
        self.sender = sender
        self.label = label
        self.channelID = channelID
        self.paused = False
        self.closing = False
        self.readClosed = False
        self.lost: Failure | None = None
        self.bytesWritten = 0
        self.socket: socket.socket | None = None
        self._moreFlag = 0
        # What the socket did not take of a window sent from an image: the
        # image (its own descriptor, open until then), the offset, the
        # bytes left. It goes from the file once the socket has room, and
        # before anything else is written (see writeFromImage).
        self._windowRest: tuple[OpenImage, int, int] | None = None

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        if self.channelID is not None:
            setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
            if setNoDelay is not None:
                setNoDelay(True)  # as QEMU's multifd sockets
        transport = self.transport
        skipEmptySends(transport)
        self.socket = _directSocket(transport)
        if self.socket is not None:
            assert isinstance(transport, FileDescriptor)
            self._moreFlag = socket.MSG_MORE if self.socket.family in (socket.AF_INET, socket.AF_INET6) else 0
            # Any byte left in the transport's buffer pauses us, and only an
            # empty buffer resumes us: so while we are not paused, nothing
            # is queued ahead of a direct write and the order holds.
            transport.bufferSize = 0
            # What the socket did not take goes out in one send, not in
            # 128 KiB pieces, one reactor turn each.
            transport.SEND_LIMIT = DIRECT_SEND_LIMIT
            if (
                self.channelID is not None and self._moreFlag and _isLocalPeer(self.socket)
                and len(self.sender.multifd) < _usableCPUs()
            ):
                # Over loopback, bytes we write ahead of the destination's
                # receive window wait in our socket, and are sent when its
                # window opens: by its ACK, on its CPU (its recvmsg sends the
                # ACK and runs our transmit and its own receive in softirq).
                # A sender faster than the destination thus makes it do our
                # sending too (about 0.05-0.07 CPU s per GiB here). With
                # little left unsent, the socket takes more only when it has
                # room to send it, and our own write sends it, on our CPU.
                # That costs us more wake-ups, and pays only if we have a CPU
                # of our own beside the destination's receive threads (one
                # per channel); on 2 CPUs with 2 or 4 channels it measured no
                # better, or worse.
                try:
                    self.socket.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, LOCAL_NOTSENT_LOWAT)
                except OSError:
                    pass  # not on this system: only slower
        self.sender.connectionMade(self)

    def write(self, *parts: bytes | memoryview) -> None:
        """
        Write C{parts} in order.

        On a plain socket whose transport holds nothing, they go straight to
        the kernel, from the buffers as they are (no copy in Python); only
        what the socket does not take is copied, into the transport, which
        then pauses us until it has written it. Otherwise (paused, or a
        transport without a socket of its own) everything goes through the
        transport, behind what is left of a window sent from an image.

        @raise CaptureError: what was left of a window could not be read.
        """
        self._windowRestToTransport()
        size = sum(len(part) for part in parts)
        self.bytesWritten += size
        taken = 0
        if self._direct():
            assert self.socket is not None
            try:
                taken = self.socket.sendmsg(parts)
            except BlockingIOError:
                pass
            except OSError:
                # Broken: the transport's own write meets the same error and
                # loses the connection with its reason.
                pass
        if taken == size:
            return
        if taken:
            parts = _after(parts, taken)
        self.transport.write(parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts))

    def writeFromImage(
        self, header: bytes, image: OpenImage, offset: int, size: int, payload: bytes | None = None
    ) -> None:
        """
        Write C{header}, then C{size} bytes of C{image} from C{offset}.

        On a plain socket whose transport holds nothing, the header goes
        with C{sendmsg} and the bytes straight from the file with
        C{os.sendfile}, which gives the kernel the page cache's pages: they
        are never read into Python. What the socket does not take of them
        follows from the file too, once the socket has room: we pause
        until then (L{_waitForRoom}). Only where that cannot be (the header
        not taken whole, or the bytes already read: C{payload}) is the rest
        left to the transport, read if need be (that part only). Otherwise
        everything is read and goes through the transport.

        @raise CaptureError: the image could not be read.
        """
        self._windowRestToTransport()
        self.bytesWritten += len(header) + size
        taken = 0
        if self._direct() and image.fd >= 0:
            try:
                taken = self._sendWithFile(header, image.fd, offset, size)
            except BlockingIOError:
                pass
            except OSError:
                pass  # broken: as in write()
        if taken == len(header) + size:
            return
        done = max(0, taken - len(header))
        if taken >= len(header) and payload is None and self._direct() and image.fd >= 0:
            # The rest from the file as well, through a descriptor of its
            # own: the reader may be done with the image before the socket
            # has room.
            self._windowRest = (OpenImage(os.dup(image.fd), image.block, image.pageSize), offset + done, size - done)
            self._waitForRoom()
            return
        if payload is not None:
            rest: bytes | memoryview = memoryview(payload)[done:]
        else:
            rest = image.read(offset + done, size - done)
        if taken < len(header):
            self.transport.write(b"".join((memoryview(header)[taken:], rest)))
        else:
            self.transport.write(rest if type(rest) is bytes else bytes(rest))

    def _direct(self) -> bool:
        return (
            self.socket is not None and not self.paused and self.lost is None and not self.closing
            and self._windowRest is None
        )

    def _sendWithFile(self, header: bytes, fd: int, offset: int, size: int) -> int:
        """
        Send C{header} with C{sendmsg}, then C{size} bytes of file C{fd}
        from C{offset}; how many bytes the socket took.
        """
        assert self.socket is not None
        # MSG_MORE: the header waits for the pages, as one segment (multifd
        # sockets have TCP_NODELAY).
        taken = self.socket.sendmsg((header,), (), self._moreFlag)
        if taken < len(header):
            return taken
        try:
            sent = os.sendfile(self.socket.fileno(), fd, offset, size)
        except OSError:
            # Full (EAGAIN), or broken: the rest goes to the transport, whose
            # own write then meets any error. A short count (the file shrank)
            # is read for the transport, and that read fails clearly.
            sent = 0
        return taken + sent

    def _waitForRoom(self) -> None:
        """
        Pause until the socket has room for the rest of a window (C{_windowRest}).

        The transport, which holds nothing, is asked to watch for the
        socket being writable: when it is, its C{doWrite} finds nothing of
        its own to write and resumes its paused producer (us), and
        L{resumeProducing} sends the rest from the file. This saves reading
        the rest and copying it into the transport.
        """
        self.paused = True
        transport = self.transport
        assert isinstance(transport, FileDescriptor)
        transport.producerPaused = True
        transport.startWriting()

    def _sendWindowRest(self) -> bool:
        """
        Send what is left of a window from the file: whether all of it went.
        Otherwise we wait for room again, or, for what cannot go from the
        file (the socket broke, the file shrank), for the transport, which
        gets it instead.

        @raise CaptureError: what was left could not be read.
        """
        assert self._windowRest is not None and self.socket is not None
        image, offset, size = self._windowRest
        try:
            sent = os.sendfile(self.socket.fileno(), image.fd, offset, size)
        except BlockingIOError:
            sent = -1
        except OSError:
            sent = 0  # broken: the transport's write meets the error
        if sent == size:
            self._dropWindowRest()
            return True
        if sent == 0:
            # Broken, or the file ends before (the read says so): the
            # transport has the rest now, and resumes us once it wrote it.
            self._windowRestToTransport()
            return False
        if sent > 0:
            self._windowRest = (image, offset + sent, size - sent)
        self._waitForRoom()
        return False

    def _windowRestToTransport(self) -> None:
        """
        Read what is left of a window sent from an image, and leave it to
        the transport, which writes it before anything written after.

        @raise CaptureError: it could not be read.
        """
        if self._windowRest is None:
            return
        image, offset, size = self._windowRest
        try:
            rest = image.read(offset, size)
        finally:
            self._dropWindowRest()
        self.transport.write(rest)

    def _dropWindowRest(self) -> None:
        if self._windowRest is not None:
            image = self._windowRest[0]
            self._windowRest = None
            image.close()

    def dataReceived(self, data: bytes) -> None:
        self.sender.unexpectedData(self, data)

    def readConnectionLost(self) -> None:
        self.readClosed = True
        self.sender.readClosed(self)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
        self.paused = True
        self._dropWindowRest()
        self.sender.connectionLost(self, reason)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.lost is not None:
            return
        if self._windowRest is not None:
            try:
                if not self._sendWindowRest():
                    return  # still waiting for room
            except CaptureError as e:
                self.sender.readFailed(e)
                return
        self.paused = False
        self.sender.resumed(self)

    def stopProducing(self) -> None:
        self.paused = True

    def close(self) -> None:
        """
        Everything is written: close once the transport has flushed it.

        @raise CaptureError: what was left of a window could not be read.
        """
        self.closing = True
        if self.lost is None:
            self._windowRestToTransport()
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.lost is None and self.transport is not None:
            self.transport.abortConnection()


def _directSocket(transport: Any) -> socket.socket | None:
    """
    The socket of a plain TCP or UNIX connection made by a reactor's own
    file-descriptor transport, which C{_Connection.write} may write to
    directly; L{None} for anything else (TLS, in-memory test transports).
    """
    if not isinstance(transport, FileDescriptor):
        return None
    getHandle = getattr(transport, "getHandle", None)
    handle = getHandle() if getHandle is not None else None
    if not isinstance(handle, socket.socket) or handle.type != socket.SOCK_STREAM:
        return None
    return handle


_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def _isLocalPeer(handle: socket.socket) -> bool:
    """
    Whether C{handle}'s TCP peer is on this host: a loopback address, or
    our own address (a connection to one of this host's own addresses goes
    over loopback too).
    """
    if handle.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        peer = handle.getpeername()[0]
        local = handle.getsockname()[0]
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except (OSError, ValueError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return peer == local or address.is_loopback


def _usableCPUs() -> int:
    """
    The CPUs this process may run on.
    """
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _after(parts: tuple[bytes | memoryview, ...], taken: int) -> tuple[bytes | memoryview, ...]:
    """
    What is left of C{parts} once their first C{taken} bytes are written.
    """
    for i, part in enumerate(parts):
        if taken < len(part):
            return (memoryview(part)[taken:], *parts[i + 1 :])
        taken -= len(part)
    return ()


CONNECTING, SENDING, CLOSING, DONE, FAILED = "connecting", "sending", "closing", "done", "failed"


class _Sender:
    """
    One capture being sent: connects, writes L{streamActions} as the
    transports take them, closes, and fires C{done}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        capture: Capture,
        conventions: SendConventions,
        endpoint: IStreamClientEndpoint,
        endpointName: str,
        timeout: float,
        progressInterval: float | None,
    ) -> None:
        self.clock = clock
        self.capture = capture
        self.conventions = conventions
        self.endpoint = endpoint
        self.endpointName = endpointName
        self.timeout = timeout
        self.progressInterval = progressInterval
        self.state = CONNECTING
        self.main = _Connection(self, "main channel")
        self.multifd = [_Connection(self, f"multifd channel {i}", i) for i in range(conventions.channels)]
        self.done: Deferred[SendResult] = Deferred(self._cancel)
        self._connecting: list[Deferred[Any]] = []
        self._actions = streamActions(capture, conventions)
        self._pending: Action | None = None
        self._pumping = False
        self._nextChannel = 0
        self._packetNum = 0
        self._compressors: list[Compressor | None] = [
            None if conventions.compression == "none" else makeCompressor(conventions.compression)
            for _ in self.multifd
        ]
        self._flags = COMPRESSION_VALUES[conventions.compression]
        self._pageSize = capture.pageSize
        self._perPacket = pagesPerPacket(capture.pageSize)
        # SYNC packets say pages_alloc = 128 in per-section mode, as QEMU 7.2
        # writes them, and 0 in per-round mode, as 9.2+ does; both are valid
        # for every destination (it only checks pages_alloc <= 128).
        self._syncPagesAlloc = self._perPacket if conventions.flushMode == FLUSH_PER_SECTION else 0
        self._totalPages = capture.totalPages
        self._pages = 0
        self._dataPages = 0
        self._zeroPages = 0
        self._packets = 0
        self._started = clock.seconds()
        self._lastProgress = self._started
        self._watchdog: IDelayedCall | None = None
        self._progress: LoopingCall | None = None
        self._warnedData = False

    @property
    def label(self) -> str:
        return f"sending {self.capture.path} to {self.endpointName}"

    @property
    def ended(self) -> bool:
        return self.state in (DONE, FAILED)

    @property
    def connections(self) -> list[_Connection]:
        return [self.main, *self.multifd]

    def start(self) -> Deferred[SendResult]:
        log.info("{label}: {machine}, {mib:.1f} MiB in {blocks} RAM blocks; {how}",
                 label=self.label, machine=self.capture.machine, mib=_mib(self.capture.ramTotal),
                 blocks=len(self.capture.blocks), how=self.conventions.describe())
        self._watchdog = self.clock.callLater(self.timeout, self._checkStall)
        if self.progressInterval:
            self._progress = LoopingCall(self._logProgress)
            self._progress.clock = self.clock
            self._progress.start(self.progressInterval, now=False)
        self._connect(self.main)
        return self.done

    # Connecting

    def _connect(self, connection: _Connection) -> None:
        d = connectProtocol(self.endpoint, connection)
        self._connecting.append(d)
        d.addErrback(self._connectFailed, connection)

    def _connectFailed(self, failure: Failure, connection: _Connection) -> None:
        if not self.ended:
            self._fail(SendError(
                f"cannot connect to {self.endpointName}: {failure.getErrorMessage()}",
                connection=connection.label,
            ))

    def connectionMade(self, connection: _Connection) -> None:
        if self.ended:
            connection.abort()
            return
        self._touch()
        if connection is self.main:
            log.info("{label}: main channel connected", label=self.label)
            # The multifd channels only once main is in: a QEMU 7.2
            # destination takes the first connection it accepts as main.
            for channel in self.multifd:
                self._connect(channel)
        else:
            assert connection.channelID is not None
            uuid = self.capture.uuid if self.capture.uuid is not None else bytes(16)
            connection.write(buildInitPacket(MultiFDInitPacket(uuid=uuid, channelID=connection.channelID)))
        if self.state == CONNECTING and all(c.transport is not None for c in self.connections):
            if self.multifd:
                log.info("{label}: all {n} multifd channels connected", label=self.label, n=len(self.multifd))
            self.state = SENDING
            self._pump()

    # Writing

    def resumed(self, connection: _Connection) -> None:
        self._touch()
        self._pump()

    def _pump(self) -> None:
        if self.state != SENDING or self._pumping:
            return
        self._pumping = True
        try:
            budget = PUMP_BUDGET
            while budget > 0:
                action = self._pending
                if action is None:
                    action = next(self._actions, None)
                    if action is None:
                        self._closeMultiFD()
                        return
                written = self._perform(action)
                if written is None:
                    self._pending = action  # its channel is paused: resumed() goes on
                    return
                self._pending = None
                self._touch()
                budget -= written
            self.clock.callLater(0, self._pump)
        except (CaptureError, OSError) as e:
            self.readFailed(e)
        except Exception as e:
            log.failure("{label}: unexpected error", label=self.label)
            self._fail(SendError(f"{type(e).__name__}: {e}"))
        finally:
            self._pumping = False

    def _perform(self, action: Action) -> int | None:
        """
        Write C{action}; L{None} if the connection it needs is paused.
        """
        if isinstance(action, MainBytes):
            if self.main.paused:
                return None
            self.main.write(action.data)
            self._countPages(action.pages, action.dataPages)
            return len(action.data)
        if action is SYNC:
            # Small, and always written before the main-channel record that
            # is its sync point, whatever the channels' buffers hold.
            size = 0
            for each in self.multifd:
                packet = buildRamPacket(
                    pageSize=self._pageSize, flags=FLAG_SYNC, packetNum=self._nextPacketNum(),
                    pagesAlloc=self._syncPagesAlloc,
                )
                each.write(packet)
                size += len(packet)
            return size
        assert isinstance(action, PagePacket)
        channel = self._idleChannel()
        if channel is None:
            return None
        assert channel.channelID is not None
        compressor = self._compressors[channel.channelID]
        size = action.size
        image = action.image
        payload: bytes | None = None
        if compressor is not None and size:
            payload = compressor.compress(action.data)
            size = len(payload)
        elif image is None or image.fd < 0 or channel.socket is None:
            # No file to send from, or no socket to send it to (TLS, the
            # tests' in-memory transports): the bytes themselves.
            payload = action.data
        # The header and offsets, then the payload as its own buffer or
        # straight from the image: the pages are not copied into one packet.
        header = buildRamPacket(
            pageSize=self._pageSize, flags=self._flags, packetNum=self._nextPacketNum(),
            block=action.block, normalOffsets=action.normalOffsets, zeroOffsets=action.zeroOffsets,
            nextPacketSize=size,
        )
        if payload is None:
            assert image is not None
            channel.writeFromImage(header, image, action.normalOffsets[0], size, action.payload)
        else:
            channel.write(header, payload)
        self._packets += 1
        self._countPages(len(action.normalOffsets) + len(action.zeroOffsets), len(action.normalOffsets))
        return len(header) + size

    def _idleChannel(self) -> _Connection | None:
        """
        The next multifd channel, round robin, whose transport takes data.
        """
        count = len(self.multifd)
        for k in range(count):
            index = (self._nextChannel + k) % count
            channel = self.multifd[index]
            if not channel.paused:
                self._nextChannel = (index + 1) % count
                return channel
        return None

    def _nextPacketNum(self) -> int:
        number = self._packetNum
        self._packetNum += 1
        return number

    def _countPages(self, pages: int, dataPages: int) -> None:
        self._pages += pages
        self._dataPages += dataPages
        self._zeroPages += pages - dataPages

    # Closing, as QEMU's source: every multifd channel, then main.

    def _closeMultiFD(self) -> None:
        self.state = CLOSING
        log.info("{label}: everything written; closing the connections", label=self.label)
        for channel in self.multifd:
            channel.close()
        self._maybeCloseMain()

    def _maybeCloseMain(self) -> None:
        if self.state == CLOSING and not self.main.closing and all(c.lost is not None for c in self.multifd):
            self.main.close()

    def connectionLost(self, connection: _Connection, reason: Failure) -> None:
        if self.ended:
            return
        if not connection.closing:
            self._fail(SendError(
                f"the destination closed the connection after {connection.bytesWritten} bytes were written"
                f" to it, before the migration was sent ({reason.getErrorMessage()}); see the destination's log",
                connection=connection.label,
            ))
            return
        if not reason.check(ConnectionDone):
            self._fail(SendError(
                f"the connection broke while its last bytes were being flushed: {reason.getErrorMessage()}",
                connection=connection.label,
            ))
            return
        self._touch()
        if connection is self.main:
            self._succeed()
        else:
            self._maybeCloseMain()

    def readClosed(self, connection: _Connection) -> None:
        """
        The destination shut its side: fine once everything is written (a
        QEMU destination that has loaded the stream shuts its sockets),
        a failure before.
        """
        if self.ended or self.state == CLOSING:
            return
        self._fail(SendError(
            f"the destination closed its end of the connection (EOF) after {connection.bytesWritten}"
            f" bytes were written to it, before the migration was sent; see the destination's log",
            connection=connection.label,
        ))

    def readFailed(self, error: CaptureError | OSError) -> None:
        """
        The capture could not be read: while pumping, or what was left of a
        window (see L{_Connection.resumeProducing}).
        """
        self._fail(SendError(f"reading the capture failed: {error}"))

    def unexpectedData(self, connection: _Connection, data: bytes) -> None:
        # A QEMU destination never writes on multifd channels, and on the
        # main channel only with a return path, which is never asked for.
        if not self._warnedData:
            self._warnedData = True
            log.warn("{label}: {connection}: ignoring {n} bytes from the destination ({hex})",
                     label=self.label, connection=connection.label, n=len(data), hex=data[:16].hex(" "))

    # Progress and time-outs

    def _touch(self) -> None:
        self._lastProgress = self.clock.seconds()

    def _checkStall(self) -> None:
        self._watchdog = None
        if self.ended:
            return
        idle = self.clock.seconds() - self._lastProgress
        if idle < self.timeout:
            self._watchdog = self.clock.callLater(self.timeout - idle, self._checkStall)
            return
        self._fail(SendError(f"nothing moved for {self.timeout:g} s: {self._waitingFor()}"))

    def _waitingFor(self) -> str:
        if self.state == CONNECTING:
            missing = [c.label for c in self.connections if c.transport is None]
            return f"still connecting ({', '.join(missing)})"
        if self.state == SENDING:
            if isinstance(self._pending, MainBytes):
                return ("the destination does not read the main channel (is it waiting for more multifd"
                        f" channels than {len(self.multifd)}?)")
            return ("the destination reads none of the multifd channels (do its multifd-channels and"
                    f" multifd-compression match {len(self.multifd)} and {self.conventions.compression}?)")
        open_ = [c.label for c in self.connections if c.lost is None]
        return f"waiting for {', '.join(open_)} to close"

    def progressLine(self) -> str:
        elapsed = self.clock.seconds() - self._started
        sent = sum(c.bytesWritten for c in self.connections)
        percent = 100 * self._pages / self._totalPages if self._totalPages else 100.0
        rate = _mib(sent) / elapsed if elapsed > 0 else 0.0
        return (f"{self.label}: {self.state}, {percent:.0f}% of pages ({self._pages} of {self._totalPages}),"
                f" {_mib(sent):.1f} MiB in {elapsed:.2f} s ({rate:.1f} MiB/s)")

    def _logProgress(self) -> None:
        if not self.ended:
            log.info("{line}", line=self.progressLine())

    # Ending

    def _stopTimers(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        if self._progress is not None and self._progress.running:
            self._progress.stop()

    def _succeed(self) -> None:
        self.state = DONE
        self._stopTimers()
        duration = self.clock.seconds() - self._started
        result = SendResult(
            capture=self.capture.path,
            endpoint=self.endpointName,
            conventions=self.conventions,
            pages=self._pages,
            pagesWithData=self._dataPages,
            zeroPages=self._zeroPages,
            packets=self._packets,
            bytesSent=sum(c.bytesWritten for c in self.connections),
            duration=duration,
        )
        rate = _mib(result.bytesSent) / duration if duration > 0 else 0.0
        log.info("{label}: sent {pages} pages ({data} with data, {zero} zero) and the device state:"
                 " {mib:.1f} MiB in {seconds:.2f} s ({rate:.1f} MiB/s); every connection closed",
                 label=self.label, pages=result.pages, data=result.pagesWithData, zero=result.zeroPages,
                 mib=_mib(result.bytesSent), seconds=duration, rate=rate)
        self.done.callback(result)

    def _shutDown(self) -> None:
        self.state = FAILED
        self._stopTimers()
        for d in self._connecting:
            if not d.called:
                d.cancel()
        for connection in self.connections:
            connection.abort()
        self._actions.close()

    def _fail(self, error: SendError) -> None:
        if self.ended:
            return
        self._shutDown()
        log.error("{label}: failed: {error}", label=self.label, error=str(error))
        self.done.errback(Failure(error))

    def _cancel(self, d: Deferred[SendResult]) -> None:
        if not self.ended:
            self._shutDown()  # the Deferred then fails with CancelledError


def sendCapture(
    reactor: Any,
    capture: Capture | str | os.PathLike[str],
    endpoint: IStreamClientEndpoint | str,
    *,
    channels: int | None = None,
    compression: str | None = None,
    flushMode: str | None = None,
    zeroPages: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progressInterval: float | None = DEFAULT_PROGRESS_INTERVAL,
) -> Deferred[SendResult]:
    """
    Send a capture into a QEMU destination listening with C{-incoming}, as
    a QEMU source would (see the module docstring and docs/send.md).

    @param reactor: provides the time (L{IReactorTime}) and, for an endpoint
        string, the connections.
    @param capture: a L{Capture} or the path of a capture folder (loaded with
        L{loadCapture}).
    @param endpoint: where the destination listens: a client endpoint or an
        endpoint string (C{tcp:HOST:PORT}, C{unix:path=/run/mig.sock}).
    @param channels: multifd channels, as the destination's
        C{multifd-channels}; 0 for a plain migration. Default: the capture's.
    @param compression: C{none}, C{zlib} or C{zstd}, as the destination's
        C{multifd-compression}. Default: the capture's.
    @param flushMode: C{per-section} or C{per-round}; default: the capture's
        (see L{chooseConventions}).
    @param zeroPages: C{main} (default) or C{multifd}; see L{chooseConventions}.
    @param timeout: seconds without progress (the destination not reading,
        not closing) before giving up.
    @param progressInterval: seconds between progress log lines; L{None} for
        none.
    @return: fires with a L{SendResult} once every connection closed
        cleanly; fails with L{CaptureError} (nothing was connected) for a
        capture that cannot be sent, L{ValueError} for options that do not
        fit, L{SendError} if sending failed.
    """
    try:
        if not isinstance(capture, Capture):
            capture = loadCapture(os.fspath(capture))
        conventions = chooseConventions(
            capture, channels=channels, compression=compression, flushMode=flushMode, zeroPages=zeroPages,
        )
        if not timeout > 0:
            raise ValueError(f"timeout must be more than 0, not {timeout}")
        if isinstance(endpoint, str):
            endpointName = endpoint
            client: IStreamClientEndpoint = clientFromString(reactor, endpoint)
        else:
            endpointName = str(endpoint)
            client = endpoint
    except Exception as e:
        return fail(e)
    return _Sender(reactor, capture, conventions, client, endpointName, timeout, progressInterval).start()


__all__ = [
    "SYNC",
    "MainBytes",
    "PagePacket",
    "SendConventions",
    "SendError",
    "SendResult",
    "chooseConventions",
    "machineFlushMode",
    "sendCapture",
    "sendProblems",
    "streamActions",
]

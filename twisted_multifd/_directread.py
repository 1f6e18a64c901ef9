"""
Receive a multifd channel's bytes in place.

Twisted's TCP transport reads with C{socket.recv(bufferSize)}, which makes a
new C{bytes} for every read: for a channel that carries gigabytes of pages,
that is one allocation (and fresh, not yet faulted-in memory) per read, then a
copy when a payload spans reads. Here the transport's C{doRead} is replaced so
that each read goes with C{recv_into} straight into the buffer the channel's
parser is waiting to fill: packet headers into a small scratch buffer, page
payloads into one buffer reused from packet to packet, from which the sink
writes them out. The parser is the same pure one as everywhere else; only how
its bytes arrive changes (see L{IncrementalParser.directBuffer}).

Where the sink keeps pages in files (a capture), the pages of a RAM packet
do not even pass through Python: once the migration has checked the packet's
header (known block, pages inside it, one run, loading under way), its
payload goes with C{splice(2)} from the socket into a pipe and from the pipe
into the image file at the pages' offset. That is one copy in the kernel
instead of two (socket to buffer, buffer to file) and no Python work per
read. The parser then gets a L{DeliveredElsewhere} for the payload and the
sink only records that the pages were written. If the file cannot be
spliced into, the bytes already in the pipe are read out and written with
C{pwrite}, and this channel stops splicing.

Only a plain TCP or UNIX transport of a POSIX reactor is read this way; any
other transport (TLS, test transports) goes on calling C{dataReceived}.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any, Callable

import attrs
from twisted.internet import main, tcp

from ._errors import MigrationError
from ._splice import SPLICE_FLAGS, openPipe

if TYPE_CHECKING:
    from ._channels import _Channel

# Bytes read in one doRead before giving the other connections a turn.
READ_BUDGET = 8 * 1024 * 1024

# Read size when the parser cannot say how much it needs.
FALLBACK_READ = 1024 * 1024


# Pipe capacity asked for when splicing pages (a whole 512 KiB payload fits);
# over the user's allowance the pipe keeps its default 64 KiB.
PIPE_SIZE = 1024 * 1024


def canReadDirectly(transport: Any) -> bool:
    return isinstance(transport, tcp.Connection) and getattr(transport, "socket", None) is not None


_NOT_SUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


class _SocketNotSpliceable(Exception):
    """
    The socket cannot be spliced from (nothing was taken from it).
    """


@attrs.frozen
class PageFile:
    """
    Where a run of pages goes: C{length} bytes at C{offset} of the open file
    C{fd}. C{failed} turns an C{OSError} of writing there into the sink's
    own error (which file of which capture, what failed).
    """

    fd: int
    offset: int
    length: int
    failed: Callable[[OSError], MigrationError]


class DirectReader:
    """
    The replacement C{doRead} of one transport: reads into the parser's
    buffers until the socket has nothing more, the channel stops reading
    (pause, failure), or L{READ_BUDGET} bytes have been read.
    """

    def __init__(self, transport: Any, channel: "_Channel") -> None:
        self.transport = transport
        self.channel = channel
        # Whether to splice the next runs of pages (and whether the files
        # take splice(2) at all).
        self.splicing = hasattr(os, "splice")
        self._spliceIntoFiles = True
        # The run of pages being spliced, and how much of it is written.
        self._pageFile: PageFile | None = None
        self._written = 0
        self._pipe: tuple[int, int] | None = None
        self._pipeSize = 0
        self.splicedPayloads = 0

    def install(self) -> None:
        self.transport.doRead = self.doRead

    def close(self) -> None:
        """
        The connection is gone: release the pipe.
        """
        self.splicing = False
        self._pageFile = None
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def doRead(self) -> Any:
        channel = self.channel
        parser = channel.parser
        sock = self.transport.socket
        received = 0
        while received < READ_BUDGET and channel.reading:
            if self._pageFile is None and self.splicing:
                payload = parser.pendingPagePayload()
                if payload is not None:
                    self._pageFile = channel.pageFileFor(payload)
                    self._written = 0
            if self._pageFile is not None:
                try:
                    count = self._splicePages(sock.fileno())
                except BlockingIOError:
                    return None
                except _SocketNotSpliceable:
                    # Nothing of the payload was taken: it is read as before.
                    self._pageFile = None
                    self.splicing = False
                    continue
                except OSError:
                    return main.CONNECTION_LOST
                except MigrationError as e:
                    self._pageFile = None
                    channel.storingFailed(e)
                    return None
                if not count:
                    return main.CONNECTION_DONE
                received += count
                if self._written == self._pageFile.length:
                    self._pageFile = None
                    self.splicedPayloads += 1
                channel.externalReceived(count)
                continue
            target = parser.directBuffer()
            try:
                if target is not None:
                    count = sock.recv_into(target)
                else:
                    # recv(n) sets aside n bytes whatever arrives: never
                    # more than FALLBACK_READ, whatever a length field says.
                    data = sock.recv(min(parser.wanted() or FALLBACK_READ, FALLBACK_READ))
                    count = len(data)
            except BlockingIOError:
                return None
            except OSError:
                return main.CONNECTION_LOST
            if not count:
                return main.CONNECTION_DONE
            received += count
            if target is not None:
                channel.directReceived(count)
            else:
                channel.dataReceived(data)
        return None

    def _splicePages(self, socketFd: int) -> int:
        """
        Move what the socket has of the pending run (at most a pipe's worth)
        into its file; return the count, 0 at the end of the stream.

        @raise BlockingIOError: nothing to read now.
        @raise OSError: reading the socket failed.
        @raise MigrationError: writing the file failed.
        """
        pageFile = self._pageFile
        assert pageFile is not None
        if self._pipe is None:
            pipeRead, pipeWrite, self._pipeSize = openPipe(PIPE_SIZE)
            self._pipe = (pipeRead, pipeWrite)
        pipeRead, pipeWrite = self._pipe
        try:
            count = os.splice(socketFd, pipeWrite, min(pageFile.length - self._written, self._pipeSize),
                              flags=SPLICE_FLAGS)
        except OSError as e:
            if e.errno in _NOT_SUPPORTED and not self._written:
                raise _SocketNotSpliceable() from e
            raise
        if not count:
            return 0
        offset = pageFile.offset + self._written
        moved = 0
        try:
            while moved < count and self._spliceIntoFiles:
                step = os.splice(pipeRead, pageFile.fd, count - moved, offset_dst=offset + moved)
                if step <= 0:
                    raise OSError(0, "splice into the file moved nothing")
                moved += step
        except OSError:
            # This file cannot be spliced into (or writing failed): write the
            # rest the ordinary way, where a real write error shows, and
            # start no more runs this way on this channel.
            self._spliceIntoFiles = self.splicing = False
        if moved < count:
            self._writeFromPipe(pageFile, count - moved, offset + moved)
        self._written += count
        return count

    def _writeFromPipe(self, pageFile: PageFile, count: int, offset: int) -> None:
        assert self._pipe is not None
        while count:
            data = os.read(self._pipe[0], count)
            try:
                written = 0
                while written < len(data):
                    written += os.pwrite(pageFile.fd, data[written:], offset + written)
            except OSError as e:
                raise pageFile.failed(e) from e
            count -= len(data)
            offset += len(data)

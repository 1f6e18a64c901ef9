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

Only a plain TCP or UNIX transport of a POSIX reactor is read this way; any
other transport (TLS, test transports) goes on calling C{dataReceived}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import main, tcp

if TYPE_CHECKING:
    from ._channels import _Channel

# Bytes read in one doRead before giving the other connections a turn.
READ_BUDGET = 8 * 1024 * 1024

# Read size when the parser cannot say how much it needs.
FALLBACK_READ = 1024 * 1024


def canReadDirectly(transport: Any) -> bool:
    return isinstance(transport, tcp.Connection) and getattr(transport, "socket", None) is not None


class DirectReader:
    """
    The replacement C{doRead} of one transport: reads into the parser's
    buffers until the socket has nothing more, the channel stops reading
    (pause, failure), or L{READ_BUDGET} bytes have been read.
    """

    def __init__(self, transport: Any, channel: "_Channel") -> None:
        self.transport = transport
        self.channel = channel

    def install(self) -> None:
        self.transport.doRead = self.doRead

    def doRead(self) -> Any:
        channel = self.channel
        parser = channel.parser
        sock = self.transport.socket
        received = 0
        while received < READ_BUDGET and channel.reading:
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

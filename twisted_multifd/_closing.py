"""
Half-closing and closing a socket transport whose peer may have closed
first.

Before Twisted half-closes or closes a transport it flushes it, and with
nothing left to write that flush is still a C{send} of zero bytes. On a Unix
socket whose peer has already closed, that empty C{send} fails with EPIPE,
and the transport reports its connection lost "in a non-clean fashion"
although every byte it was given had been delivered. A QEMU destination
closes its sockets as soon as it has loaded the stream, so the relay and
C{send} met this as a race: the relay half-closing the destination's socket
(the source had finished) in the moment between the reactor finding the
socket writable and the destination closing it. CI saw it fail one relayed
migration in a few hundred; under load here, about one in forty.

A zero-byte C{send} carries nothing, so it is skipped. A peer that really
broke the connection is still seen: by the next read (ECONNRESET, as a Unix
socket reports a peer that closed with bytes unread) or by a write of real
bytes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def skipEmptySends(transport: Any) -> None:
    """
    Make C{transport}'s flush of an empty buffer a no-op instead of a
    zero-byte C{send}; for Twisted's TCP and Unix socket transports (others
    are left alone).
    """
    if not isinstance(transport, tcp.Connection):
        return
    writeSomeData = transport.writeSomeData

    def writeSomeBytes(data: Any) -> Any:
        if not len(data):
            return 0
        return writeSomeData(data)

    transport.writeSomeData = writeSomeBytes  # type: ignore[method-assign]

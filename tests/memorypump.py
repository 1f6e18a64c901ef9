"""
Deliver recorded connections' bytes to a server factory over in-memory
transports, honouring pauseProducing the way a real socket would.
"""

from __future__ import annotations

from typing import Sequence

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure


class FakeConnection:
    def __init__(self, factory, data: bytes, chunk: int, host: str, port: int) -> None:
        peer = IPv4Address("TCP", host, port)
        self.transport = StringTransport(peerAddress=peer)
        self.protocol = factory.buildProtocol(peer)
        self.data = data
        self.position = 0
        self.chunk = chunk
        self.closed = False
        self.protocol.makeConnection(self.transport)

    @property
    def readable(self) -> bool:
        return (
            not self.closed
            and self.transport.producerState == "producing"
            and not self.transport.disconnecting
        )

    def step(self) -> bool:
        """
        Deliver one chunk, or the end of the connection. True if anything happened.
        """
        if self.transport.disconnecting and not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(ConnectionDone()))
            return True
        if not self.readable:
            return False
        if self.position < len(self.data):
            piece = self.data[self.position : self.position + self.chunk]
            self.position += len(piece)
            self.protocol.dataReceived(piece)
            return True
        self.closed = True
        self.protocol.connectionLost(Failure(ConnectionDone()))
        return True


def pump(
    factory,
    streams: Sequence[bytes],
    order: Sequence[int],
    chunks: Sequence[int] | int = 65536,
    host: str = "192.0.2.1",
    lastToClose: int | None = None,
) -> list[FakeConnection]:
    """
    Connect C{streams} in C{order} and deliver them round robin in chunks
    until nothing can move. The stream C{lastToClose} (default: the first one
    connected, like QEMU's main channel) is held open until every other one has
    been closed, as a QEMU source closes its main channel last.
    """
    if isinstance(chunks, int):
        chunks = [chunks] * len(streams)
    connections = {}
    for n, index in enumerate(order):
        connections[index] = FakeConnection(factory, streams[index], chunks[index], host, 40000 + n)
    last = order[0] if lastToClose is None else lastToClose
    progress = True
    while progress:
        progress = False
        for index, connection in connections.items():
            if index == last and connection.position >= len(connection.data) and not all(
                c.closed for i, c in connections.items() if i != last
            ):
                continue
            progress |= connection.step()
    return list(connections.values())

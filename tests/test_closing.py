"""
Closing a socket whose peer has already closed (twisted_multifd._closing).

A QEMU destination closes its sockets as soon as it has loaded the stream;
the relay half-closes its socket to the destination when the source has
finished. If the destination closes in between, Twisted's flush before the
half-close (C{doWrite}, called when the reactor found the socket writable)
must not turn a delivered stream into a lost connection.
"""

from __future__ import annotations

import socket
from typing import Any, Iterator

import pytest
from twisted.internet import error, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_multifd._closing import skipEmptySends


@implementer(IHalfCloseableProtocol)
class _Recorder(Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.lost: Failure | None = None

    def readConnectionLost(self) -> None:
        self.events.append("readConnectionLost")

    def writeConnectionLost(self) -> None:
        self.events.append("writeConnectionLost")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.events.append("connectionLost")
        self.lost = reason


@pytest.fixture
def closedPeer() -> Iterator[tuple[tcp.Connection, _Recorder, socket.socket]]:
    """
    A Twisted transport on one end of a Unix socket pair, connected, whose
    other end (the peer) the test closes.
    """
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    protocol = _Recorder()
    transport = tcp.Connection(ours, protocol, MemoryReactor())
    transport.connected = 1
    protocol.makeConnection(transport)
    yield transport, protocol, peer
    ours.close()
    peer.close()


def _writeAsTheReactorDoes(transport: tcp.Connection) -> Any:
    """What the reactor calls when the socket is writable; a non-None result disconnects."""
    why = transport.doWrite()
    if why is not None:
        transport.connectionLost(Failure(why))
    return why


def test_withoutTheFixTheEmptyFlushOfAHalfCloseLosesTheConnection(closedPeer: Any) -> None:
    """
    The kernel behaviour the fix is for: without it, half-closing a Unix
    socket whose peer has closed reports the connection lost, not cleanly.
    """
    transport, protocol, peer = closedPeer
    peer.close()
    transport.loseWriteConnection()
    why = _writeAsTheReactorDoes(transport)
    assert isinstance(why, error.ConnectionLost)
    assert protocol.events == ["connectionLost"]


def test_halfCloseAfterThePeerClosedIsClean(closedPeer: Any) -> None:
    transport, protocol, peer = closedPeer
    skipEmptySends(transport)
    peer.close()
    transport.loseWriteConnection()
    assert _writeAsTheReactorDoes(transport) is None
    assert protocol.events == ["writeConnectionLost"]
    # The peer's end is then read: EOF, and closing is clean.
    assert isinstance(transport.doRead(), error.ConnectionDone)


def test_closeAfterThePeerClosedIsClean(closedPeer: Any) -> None:
    transport, protocol, peer = closedPeer
    skipEmptySends(transport)
    peer.close()
    transport.loseConnection()
    _writeAsTheReactorDoes(transport)
    assert protocol.lost is not None and protocol.lost.check(error.ConnectionDone)


def test_bytesStillGoOutAndAPeerThatLeftThemUnreadIsSeen(closedPeer: Any) -> None:
    """
    Only empty sends are skipped: bytes written are sent, and bytes written
    after the peer closed still fail the connection.
    """
    transport, protocol, peer = closedPeer
    skipEmptySends(transport)
    transport.write(b"delivered")
    assert _writeAsTheReactorDoes(transport) is None
    assert peer.recv(100) == b"delivered"
    peer.close()
    transport.write(b"never read")
    assert isinstance(_writeAsTheReactorDoes(transport), error.ConnectionLost)
    assert protocol.lost is not None and protocol.lost.check(error.ConnectionLost)


def test_otherTransportsAreLeftAlone() -> None:
    from twisted.internet.testing import StringTransport

    transport = StringTransport()
    skipEmptySends(transport)
    assert "writeSomeData" not in vars(transport)

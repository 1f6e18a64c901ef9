"""
Decide what a new connection is from its first four bytes, then hand it over.

A QEMU migration source opens its main channel and its multifd channels to
the same address, and nothing but their first bytes tells them apart: the
main channel starts with C{QEVM} (be32 0x5145564d), a multifd channel with
its initial packet's magic (be32 0x11223344). QEMU up to 7.2 instead takes the
first accepted connection as the main one, which hangs the migration when the
network reorders connection set-up. Sniffing adds nothing to the wire.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

MAIN_CHANNEL = "main"
MULTIFD_CHANNEL = "multifd"

MAGICS = {
    b"QEVM": MAIN_CHANNEL,
    b"\x11\x22\x33\x44": MULTIFD_CHANNEL,
}
MAGIC_SIZE = 4

log = Logger(namespace="twisted_multifd.sniff")


def describePeer(address: IAddress) -> str:
    host = getattr(address, "host", None)
    if host is not None:
        return f"{host}:{address.port}"
    return "local socket"


def sourceHost(address: IAddress) -> str:
    """
    What groups connections into one migration: the source host (every local
    socket counts as one host).
    """
    return getattr(address, "host", None) or "local"


class ChannelSniffer(Protocol):
    """
    Wraps a connection until its first four bytes are in, then hands the
    connection and every byte read so far to the protocol C{chooser} returns
    for the channel kind, and forwards everything after that to it.

    @param chooser: called with L{MAIN_CHANNEL} or L{MULTIFD_CHANNEL} and the
        peer address; returns the protocol for the connection.
    @param timeout: seconds to wait for four bytes before dropping the
        connection.
    """

    def __init__(
        self,
        chooser: Callable[[str, IAddress], Protocol],
        peer: IAddress,
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        self._chooser = chooser
        self._peer = peer
        self._clock = clock
        self._timeout = timeout
        self._buffer = b""
        self._timer: IDelayedCall | None = None
        self.delegate: Protocol | None = None

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._timeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        if self.delegate is not None:
            self.delegate.dataReceived(data)
            return
        self._buffer += data
        if len(self._buffer) < MAGIC_SIZE:
            return
        self._cancelTimer()
        buffered, self._buffer = self._buffer, b""
        kind = MAGICS.get(buffered[:MAGIC_SIZE])
        if kind is None:
            log.error(
                "connection from {peer}: first bytes {hex} are neither a main channel (51 45 56 4d)"
                " nor a multifd channel (11 22 33 44); closing it",
                peer=describePeer(self._peer),
                hex=buffered[:16].hex(" "),
            )
            self.transport.abortConnection()
            return
        self.delegate = self._chooser(kind, self._peer)
        self.delegate.makeConnection(self.transport)
        self.delegate.dataReceived(buffered)

    def connectionLost(self, reason: Failure) -> None:
        self._cancelTimer()
        if self.delegate is not None:
            self.delegate.connectionLost(reason)
        elif self._buffer:
            log.warn("connection from {peer} closed after {n} bytes ({hex}), before its channel type was known",
                     peer=describePeer(self._peer), n=len(self._buffer), hex=self._buffer.hex(" "))

    def _timedOut(self) -> None:
        self._timer = None
        log.warn(
            "connection from {peer}: {n} bytes in {timeout:g} s, not enough to tell its channel type; dropping it",
            peer=describePeer(self._peer), n=len(self._buffer), timeout=self._timeout,
        )
        self.transport.abortConnection()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

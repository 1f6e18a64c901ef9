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
from weakref import ref

from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._initpacket import INIT_PACKET_SIZE

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


class _SniffDeadlines:
    """
    The connections still being sniffed on one clock with one timeout, oldest
    first, under a single timer.

    Accepting a connection is the hot path of a busy receiver: a timer of its
    own per connection (an L{IDelayedCall} made, scheduled and cancelled)
    costs about as much as the rest of sniffing together. With one timeout for
    all, deadlines grow with arrival order, so one timer for the oldest is
    enough. It is stopped whenever no connection is waiting, so nothing is
    left pending on the clock once every connection is classified. (Should
    the clock step back, connections that arrive then wait behind older ones:
    at most that step longer than their timeout.)

    @param clock: returns the clock, or L{None} once it is gone (the queue
        does not keep a test's Clock alive).
    """

    def __init__(self, clock: Callable[[], IReactorTime | None], timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        # Insertion-ordered: oldest (earliest deadline) first.
        self._waiting: dict[ChannelSniffer, float] = {}
        self._timer: IDelayedCall | None = None

    def add(self, sniffer: "ChannelSniffer", clock: IReactorTime) -> None:
        self._waiting[sniffer] = clock.seconds() + self._timeout
        if self._timer is None:
            self._timer = clock.callLater(self._timeout, self._expire)

    def remove(self, sniffer: "ChannelSniffer") -> None:
        if self._waiting.pop(sniffer, None) is not None and not self._waiting and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        clock = self._clock()
        if clock is None:
            return
        now = clock.seconds()
        waiting = self._waiting
        due = []
        while waiting:
            sniffer = next(iter(waiting))
            # The timer was set for exactly this deadline; the tolerance only
            # absorbs float rounding between "then + delay" and the deadline.
            remaining = waiting[sniffer] - now
            if remaining > 1e-9:
                self._timer = clock.callLater(remaining, self._expire)
                break
            del waiting[sniffer]
            due.append(sniffer)
        # Dropped after the timer is set again for the rest, so that nothing
        # a dropped connection does can stop the others' timeouts.
        for sniffer in due:
            sniffer._timedOut()


# One queue per (clock, timeout), dropped when its clock is (so a test's Clock
# is not kept alive). Keyed by id() because a clock need not be hashable; the
# weakref's callback removes the entry before the id can be reused.
_deadlines: dict[tuple[int, float], _SniffDeadlines] = {}


def _deadlinesFor(clock: IReactorTime, timeout: float) -> _SniffDeadlines:
    key = (id(clock), timeout)
    queue = _deadlines.get(key)
    if queue is None:
        try:
            clockRef: Callable[[], IReactorTime | None] = ref(clock, lambda _: _deadlines.pop(key, None))
        except TypeError:
            # A clock that cannot be weakly referenced: a queue of its own per connection.
            return _SniffDeadlines(lambda: clock, timeout)
        queue = _deadlines[key] = _SniffDeadlines(clockRef, timeout)
    return queue


class ChannelSniffer(Protocol):
    """
    Wraps a connection until its first four bytes are in, then hands the
    connection and every byte read so far to the protocol C{chooser} returns
    for the channel kind, and forwards everything after that to it.

    Bytes are never copied on the way: when the first read holds the whole
    magic (the usual case) the chosen protocol receives that very C{bytes}
    object, and every later read is passed on as it came.

    The timeout covers what a connection must send before anything else
    watches it: the magic, and for a multifd channel the rest of its
    64-byte (L{INIT_PACKET_SIZE}) initial packet (until that is in, the channel
    has joined no migration, so no channel timeout applies to it yet).

    @param chooser: called with L{MAIN_CHANNEL} or L{MULTIFD_CHANNEL} and the
        peer address; returns the protocol for the connection.
    @param timeout: seconds to wait for those bytes before dropping the
        connection.
    """

    # Bytes a multifd channel still owes of its initial packet after hand-off.
    _owed = 0
    # Why this sniffer dropped a handed-over connection, for its protocol.
    _dropReason: str | None = None

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
        self._deadlines: _SniffDeadlines | None = None
        self.delegate: Protocol | None = None

    def connectionMade(self) -> None:
        self._deadlines = _deadlinesFor(self._clock, self._timeout)
        self._deadlines.add(self, self._clock)

    def dataReceived(self, data: bytes) -> None:
        delegate = self.delegate
        if delegate is not None:
            if self._owed:
                self._owed = max(0, self._owed - len(data))
                if not self._owed:
                    self._stopWaiting()
            delegate.dataReceived(data)
            return
        if self._buffer:
            data = self._buffer + data
        if len(data) < MAGIC_SIZE:
            self._buffer = data
            return
        self._buffer = b""
        kind = MAGICS.get(data[:MAGIC_SIZE])
        if kind is None:
            self._stopWaiting()
            log.error(
                "connection from {peer}: first bytes {hex} are neither a main channel (51 45 56 4d)"
                " nor a multifd channel (11 22 33 44); closing it",
                peer=describePeer(self._peer),
                hex=data[:16].hex(" "),
            )
            self.transport.abortConnection()
            return
        if kind is MULTIFD_CHANNEL and len(data) < INIT_PACKET_SIZE:
            self._owed = INIT_PACKET_SIZE - len(data)
        else:
            self._stopWaiting()
        self.delegate = delegate = self._chooser(kind, self._peer)
        delegate.makeConnection(self.transport)
        delegate.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        self._stopWaiting()
        if self.delegate is not None:
            if self._dropReason is not None:
                # Say why, rather than only that it was aborted locally.
                reason = Failure(ConnectionAborted(self._dropReason))
            self.delegate.connectionLost(reason)
        elif self._buffer:
            log.warn("connection from {peer} closed after {n} bytes ({hex}), before its channel type was known",
                     peer=describePeer(self._peer), n=len(self._buffer), hex=self._buffer.hex(" "))

    def _timedOut(self) -> None:
        self._deadlines = None
        if self.delegate is not None:
            self._dropReason = (
                f"it sent {INIT_PACKET_SIZE - self._owed} of the {INIT_PACKET_SIZE} bytes of its initial"
                f" packet in {self._timeout:g} s (the sniff timeout)"
            )
            log.warn(
                "connection from {peer}: multifd channel sent {n} of the {size} bytes of its initial packet"
                " in {timeout:g} s; dropping it",
                peer=describePeer(self._peer), n=INIT_PACKET_SIZE - self._owed, size=INIT_PACKET_SIZE,
                timeout=self._timeout,
            )
        else:
            log.warn(
                "connection from {peer}: {n} bytes in {timeout:g} s, not enough to tell its channel type;"
                " dropping it",
                peer=describePeer(self._peer), n=len(self._buffer), timeout=self._timeout,
            )
        self.transport.abortConnection()

    def _stopWaiting(self) -> None:
        self._owed = 0
        if self._deadlines is not None:
            self._deadlines.remove(self)
            self._deadlines = None

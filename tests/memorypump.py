"""
Deliver recorded connections' bytes to a server factory over in-memory
transports, honouring pauseProducing the way a real socket would.

A thin layer over the public L{twisted_multifd.testing.MigrationPump}, kept
for the tests (and helpers) that call L{pump}.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.interfaces import IProtocolFactory

from twisted_multifd.testing import MigrationPump, PumpedConnection

FakeConnection = PumpedConnection


def pump(
    factory: IProtocolFactory,
    streams: Sequence[bytes],
    order: Sequence[int],
    chunks: Sequence[int] | int = 65536,
    host: str = "192.0.2.1",
    lastToClose: int | None = None,
) -> list[PumpedConnection]:
    """
    Connect C{streams} in C{order} and deliver them round robin in chunks
    until nothing can move.

    @param chunks: one read size for every stream, or one per stream index.
    @param lastToClose: the stream whose end is delivered last, as a QEMU
        source closes its main channel after its multifd channels. Only the
        main channel (C{streams[0]}, the default) can be held back; any other
        index (e.g. -1) holds back none.
    """
    held = lastToClose is None or lastToClose == 0
    migrationPump = MigrationPump(factory, streams, order=order, chunkSizes=chunks, host=host, mainClosesLast=held)
    migrationPump.flush()
    return migrationPump.connections

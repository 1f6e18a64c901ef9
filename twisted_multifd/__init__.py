"""
twisted-multifd: QEMU live migration, multifd included, for Twisted.

Receive migrations from unmodified QEMU sources on one port, whatever order
their connections arrive in::

    from twisted.internet import endpoints, reactor
    from twisted_multifd import CaptureWriter, MigrationReceiverFactory

    factory = MigrationReceiverFactory(
        lambda info: CaptureWriter(f"/var/lib/captures/{info.number}"),
        channels=4,
    )
    endpoints.serverFromString(reactor, "tcp:4444").listen(factory)
    reactor.run()

Implement L{IMigrationSink} to send pages and device state somewhere else.
"""

from ._capture import CaptureWriter
from ._errors import (
    ConnectionClosed,
    MigrationError,
    MigrationTimeout,
    ProtocolError,
    UnsupportedFeature,
)
from ._interfaces import IMigrationSink
from ._mainstream import Configuration, RamBlock
from ._packet import DeviceStatePacket
from ._receiver import MigrationReceiverFactory
from ._records import MigrationInfo, MigrationResult
from ._relay import RelayedConnectionReport, RelayFactory, RelayResult
from ._tail import DeviceSection, StreamTail

__all__ = [
    "CaptureWriter",
    "Configuration",
    "ConnectionClosed",
    "DeviceSection",
    "DeviceStatePacket",
    "IMigrationSink",
    "MigrationError",
    "MigrationInfo",
    "MigrationReceiverFactory",
    "MigrationResult",
    "MigrationTimeout",
    "ProtocolError",
    "RamBlock",
    "RelayFactory",
    "RelayResult",
    "RelayedConnectionReport",
    "StreamTail",
    "UnsupportedFeature",
]

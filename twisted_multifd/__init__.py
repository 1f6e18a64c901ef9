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
Send a capture back into a QEMU destination with L{sendCapture}, write it as
one plain stream with L{exportCapture}, relay migrations to an unpatched
destination with L{RelayFactory}; L{twisted_multifd.testing} has in-memory
QEMU sources and sinks for your tests.
"""

from ._capture import CaptureWriter
from ._capturereader import Capture, CaptureError, loadCapture
from ._errors import (
    ConnectionClosed,
    MigrationError,
    MigrationTimeout,
    ProtocolError,
    UnsupportedFeature,
)
from ._export import ExportResult, exportCapture
from ._interfaces import IMigrationSink
from ._mainstream import Configuration, RamBlock
from ._packet import DeviceStatePacket
from ._receiver import MigrationReceiverFactory
from ._records import MigrationInfo, MigrationResult
from ._relay import RelayedConnectionReport, RelayFactory, RelayResult
from ._sender import SendError, SendResult, sendCapture
from ._tail import DeviceSection, StreamTail

__all__ = [
    "Capture",
    "CaptureError",
    "CaptureWriter",
    "Configuration",
    "ConnectionClosed",
    "DeviceSection",
    "DeviceStatePacket",
    "ExportResult",
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
    "SendError",
    "SendResult",
    "StreamTail",
    "UnsupportedFeature",
    "exportCapture",
    "loadCapture",
    "sendCapture",
]

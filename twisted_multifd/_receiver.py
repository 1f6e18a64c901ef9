"""
The receiving side's factory: one listening port for every channel of every
migration.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger

from ._channels import MainChannel, MultiFDChannel
from ._compression import COMPRESSION_VALUES, SUPPORTED_COMPRESSION
from ._errors import MigrationError, ProtocolError
from ._initpacket import MultiFDInitPacket
from ._interfaces import IMigrationSink
from ._migration import ASSEMBLING, Migration
from ._records import MigrationInfo, MigrationResult
from ._sniff import MAIN_CHANNEL, ChannelSniffer, sourceHost

log = Logger(namespace="twisted_multifd.receiver")

DEFAULT_SNIFF_TIMEOUT = 120.0
DEFAULT_CHANNEL_TIMEOUT = 60.0


def _refused(info: MigrationInfo, pageSize: int, error: str) -> MigrationResult:
    """
    The result of a migration that could not even start (no sink for it).
    """
    return MigrationResult(
        info=info, complete=False, error=error, machine=None, uuid=None, pageSize=pageSize,
        compression=None, flushMode=None, zeroPages=None, bytesReceived=0, pagesWithData=0,
        zeroPageRecords=0, duration=0.0,
    )


class MigrationReceiverFactory(ServerFactory):
    """
    Accepts the main and multifd channels of QEMU migrations in any order on
    one port, groups them by source host, and feeds each migration to a sink.

    @param sinkFactory: called with a L{MigrationInfo} for each new migration;
        returns its L{IMigrationSink} (for instance a L{CaptureWriter}).
    @param channels: multifd channels per migration, as the source's
        C{multifd-channels}; 0 for plain (non-multifd) migrations.
    @param compression: C{"auto"} (accept what the source uses) or the
        source's C{multifd-compression}: C{"none"}, C{"zlib"}, C{"zstd"}.
    @param pageSize: the source's target page size (4096 on x86) unless its
        configuration section says otherwise.
    @param sniffTimeout: seconds a new connection has to send its first four
        bytes. Generous by default: QEMU 9+ keeps the main channel silent until
        all multifd channels are connected.
    @param channelTimeout: seconds a migration may wait for missing channels
        (and, at the end, for its channels to close).
    @param onMigrationEnded: called with the L{MigrationResult} of every
        migration that ends, complete or not.
    @param clock: the reactor's time provider (injectable for tests).
    """

    def __init__(
        self,
        sinkFactory: Callable[[MigrationInfo], IMigrationSink],
        *,
        channels: int = 0,
        compression: str = "auto",
        pageSize: int = 4096,
        sniffTimeout: float = DEFAULT_SNIFF_TIMEOUT,
        channelTimeout: float = DEFAULT_CHANNEL_TIMEOUT,
        onMigrationEnded: Callable[[MigrationResult], None] | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if not 0 <= channels <= 255:
            raise ValueError(f"channels must be 0 to 255, not {channels}")
        if compression != "auto" and compression not in SUPPORTED_COMPRESSION:
            raise ValueError(f"compression must be auto, none, zlib or zstd, not {compression!r}")
        if pageSize < 1024 or pageSize & (pageSize - 1):
            raise ValueError(f"page size must be a power of two of at least 1024, not {pageSize}")
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.sinkFactory = sinkFactory
        self.channels = channels
        self.compression: int | None = None if compression == "auto" else COMPRESSION_VALUES[compression]
        self.pageSize = pageSize
        self.sniffTimeout = sniffTimeout
        self.channelTimeout = channelTimeout
        self.onMigrationEnded = onMigrationEnded
        self.clock = clock
        self.noisy = False
        self.migrations: list[Migration] = []
        self._assembling: dict[str, Migration] = {}
        self._count = 0

    def buildProtocol(self, addr: IAddress) -> Protocol:
        sniffer = ChannelSniffer(self._channelFor, addr, self.clock, self.sniffTimeout)
        sniffer.factory = self
        return sniffer

    def _channelFor(self, kind: str, peer: IAddress) -> Protocol:
        if kind == MAIN_CHANNEL:
            return MainChannel(self, peer)
        return MultiFDChannel(self, peer)

    def _newMigration(self, host: str) -> Migration:
        self._count += 1
        info = MigrationInfo(self._count, host, self.channels, self.clock.seconds())
        try:
            sink = self.sinkFactory(info)
        except Exception as e:
            if not isinstance(e, MigrationError):
                log.failure("cannot store migration {n} from {host}", n=info.number, host=host)
            error = MigrationError(f"cannot store migration {info.number} from {host}: {e}")
            if self.onMigrationEnded is not None:
                self.onMigrationEnded(_refused(info, self.pageSize, str(error)))
            raise error
        migration = Migration(
            info, sink, clock=self.clock, pageSize=self.pageSize, compression=self.compression,
            channelTimeout=self.channelTimeout, onEnded=self._ended,
        )
        log.info("migration {n} from {host}: first channel connected; expecting a main channel"
                 " and {channels} multifd channels", n=info.number, host=host, channels=self.channels)
        self.migrations.append(migration)
        self._assembling[host] = migration
        return migration

    def mainArrived(self, channel: MainChannel) -> Migration:
        host = sourceHost(channel.peer)
        migration = self._assembling.get(host)
        if migration is not None and migration.main is not None:
            raise ProtocolError(
                f"{migration.label} already has its main channel and is waiting for its multifd"
                " channels; refusing a second main channel from the same host"
            )
        if migration is None:
            migration = self._newMigration(host)
        channel.migration = migration
        self._attach(migration, host, lambda: migration.attachMain(channel), channel)
        return migration

    def multifdArrived(self, channel: MultiFDChannel, init: MultiFDInitPacket) -> Migration:
        host = sourceHost(channel.peer)
        migration = self._assembling.get(host) or self._newMigration(host)
        channel.migration = migration
        log.info("{label}: joins {migration} (uuid {uuid})", label=channel.label,
                 migration=migration.label, uuid=init.uuid.hex())
        self._attach(migration, host, lambda: migration.attachMultiFD(channel, init), channel)
        return migration

    def _attach(self, migration: Migration, host: str, attach: Callable[[], None], channel: Any) -> None:
        try:
            attach()
        except MigrationError as e:
            channel.migration = None
            migration.fail(e.onConnection(channel.label))
            raise
        finally:
            if migration.state != ASSEMBLING and self._assembling.get(host) is migration:
                del self._assembling[host]

    def strayChannelLost(self, channel: MultiFDChannel, error: MigrationError) -> None:
        """
        A multifd connection ended before its initial packet: the migration
        assembling from that host can no longer complete.
        """
        migration = self._assembling.get(sourceHost(channel.peer))
        if migration is not None:
            migration.fail(error)
        else:
            log.error("{error}", error=str(error))

    def _ended(self, migration: Migration, result: MigrationResult) -> None:
        host = migration.info.peer
        if self._assembling.get(host) is migration:
            del self._assembling[host]
        if migration in self.migrations:
            self.migrations.remove(migration)
        if self.onMigrationEnded is not None:
            self.onMigrationEnded(result)

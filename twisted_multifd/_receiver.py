"""
The receiving side's factory: one listening port for every channel of every
migration.
"""

from __future__ import annotations

from typing import Any, Callable
from weakref import WeakSet

import attrs

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
from ._sniff import MAIN_CHANNEL, ChannelSniffer, describePeer, sourceHost

log = Logger(namespace="twisted_multifd.receiver")

DEFAULT_SNIFF_TIMEOUT = 120.0
DEFAULT_CHANNEL_TIMEOUT = 60.0
# A loading migration from which nothing arrived for this long is dropped.
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_MAX_MIGRATIONS = 16
DEFAULT_MAX_WAITING_CHANNELS = 256


def _refused(info: MigrationInfo, pageSize: int, error: str) -> MigrationResult:
    """
    The result of a migration that could not even start (no sink for it).
    """
    return MigrationResult(
        info=info, complete=False, error=error, machine=None, uuid=None, pageSize=pageSize,
        compression=None, flushMode=None, zeroPages=None, bytesReceived=0, pagesWithData=0,
        zeroPageRecords=0, duration=0.0,
    )


class RefusedConnection(MigrationError):
    """
    The receiver would not take a connection: a limit was reached, or it could
    not be told which migration the connection belongs to.
    """


@attrs.define
class _RefusedAssembly:
    """
    A migration refused as its first channel arrived (no sink could be made
    for it): the channels of it seen so far, so that the rest of its channels
    are refused under its number rather than each starting a migration.
    """

    number: int
    until: float
    uuid: bytes | None = None
    main: bool = False
    multifd: set[int] = attrs.field(factory=set)


def _uuidText(uuid: bytes | None) -> str:
    return "none yet" if uuid is None else uuid.hex()


class MigrationReceiverFactory(ServerFactory):
    """
    Accepts the main and multifd channels of QEMU migrations in any order on
    one port, groups them into migrations by source host and uuid, and feeds
    each migration to a sink.

    Grouping (docs/embedding.md, "Many migrations on one port"): a multifd
    channel joins the assembling migration from its host with the uuid of its
    initial packet. A main channel carries no uuid on its first bytes, so it
    joins a migration only when that cannot be wrong: while a host has one
    migration assembling and no main channel for it yet. A main channel with
    several migrations assembling from its host, a second main channel, a
    multifd channel of a new uuid while a main channel is already waiting, or
    a second migration with the uuid of one already running from the host,
    cannot be paired for sure: those migrations are refused, and so is every
    new connection from that host for C{channelTimeout} seconds (their late
    channels could otherwise join a wrong migration). Migrations already
    loading are never touched.

    A migration whose sink cannot be made (C{sinkFactory} raised: a read-only
    output folder, say) is refused with one error when its first channel
    arrives; its other channels, arriving while nothing else assembles from
    that host, are refused under the same migration number (a main channel if
    none came yet, multifd channels of its uuid and of ids not seen yet). A
    channel that cannot be one of them (a second main channel, a channel id
    seen already), or any channel once all of them came or C{channelTimeout}
    seconds passed, starts a new migration as usual.

    @param sinkFactory: called with a L{MigrationInfo} for each new migration;
        returns its L{IMigrationSink} (for instance a L{CaptureWriter}).
    @param channels: multifd channels per migration, as the source's
        C{multifd-channels}; 0 for plain (non-multifd) migrations.
    @param compression: C{"auto"} (accept what the source uses) or the
        source's C{multifd-compression}: C{"none"}, C{"zlib"}, C{"zstd"}.
    @param pageSize: the source's target page size (4096 on x86) unless its
        configuration section says otherwise.
    @param sniffTimeout: seconds a new connection has to send its first four
        bytes (and a multifd channel its 64-byte initial packet). Generous by
        default: QEMU 9+ keeps the main channel silent until all multifd
        channels are connected.
    @param channelTimeout: seconds a migration may wait for missing channels
        (and, at the end, for its channels to close).
    @param idleTimeout: seconds a loading migration may go without receiving
        a byte on any of its connections before it is dropped as stalled;
        L{None} waits for ever (as a QEMU destination does).
    @param maxMigrations: migrations at once (assembling or loading); a
        connection that would start one more is refused.
    @param maxWaitingChannels: connections, over all migrations, that have
        joined a migration still assembling (waiting for its other channels);
        a connection that would be one more is refused.
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
        idleTimeout: float | None = DEFAULT_IDLE_TIMEOUT,
        maxMigrations: int = DEFAULT_MAX_MIGRATIONS,
        maxWaitingChannels: int = DEFAULT_MAX_WAITING_CHANNELS,
        onMigrationEnded: Callable[[MigrationResult], None] | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if not 0 <= channels <= 255:
            raise ValueError(f"channels must be 0 to 255, not {channels}")
        if compression != "auto" and compression not in SUPPORTED_COMPRESSION:
            raise ValueError(f"compression must be auto, none, zlib or zstd, not {compression!r}")
        if pageSize < 1024 or pageSize & (pageSize - 1):
            raise ValueError(f"page size must be a power of two of at least 1024, not {pageSize}")
        if maxMigrations < 1:
            raise ValueError(f"maxMigrations must be at least 1, not {maxMigrations}")
        if maxWaitingChannels < channels + 1:
            raise ValueError(f"maxWaitingChannels must be at least channels + 1 ({channels + 1}),"
                             f" not {maxWaitingChannels}")
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.sinkFactory = sinkFactory
        self.channels = channels
        self.compression: int | None = None if compression == "auto" else COMPRESSION_VALUES[compression]
        self.pageSize = pageSize
        self.sniffTimeout = sniffTimeout
        self.channelTimeout = channelTimeout
        self.idleTimeout = idleTimeout
        self.maxMigrations = maxMigrations
        self.maxWaitingChannels = maxWaitingChannels
        self.onMigrationEnded = onMigrationEnded
        self.clock = clock
        self.noisy = False
        self.migrations: list[Migration] = []
        # Per source host, its migrations still assembling, oldest first.
        self._assembling: dict[str, list[Migration]] = {}
        # Hosts refused until this time (see the class docstring).
        self._refusedUntil: dict[str, float] = {}
        self._refusedChannels: WeakSet[Any] = WeakSet()
        # Per source host, the migration refused for want of a sink whose
        # other channels may still arrive (see the class docstring).
        self._refusedAssemblies: dict[str, _RefusedAssembly] = {}
        self._followingRefusal: WeakSet[Any] = WeakSet()
        self._count = 0

    def buildProtocol(self, addr: IAddress) -> Protocol:
        sniffer = ChannelSniffer(self._channelFor, addr, self.clock, self.sniffTimeout)
        sniffer.factory = self
        return sniffer

    def _channelFor(self, kind: str, peer: IAddress) -> Protocol:
        if kind == MAIN_CHANNEL:
            return MainChannel(self, peer)
        return MultiFDChannel(self, peer)

    # Limits and refusals

    def _waitingChannels(self) -> int:
        return sum(
            len(m.multifd) + (m.main is not None)
            for migrations in self._assembling.values() for m in migrations
        )

    def _refuse(self, channel: Any, why: str) -> RefusedConnection:
        """
        The error refusing C{channel} (raise it); the channel logs it once.
        """
        self._refusedChannels.add(channel)
        return RefusedConnection(f"refused: {why}")

    def _checkLimits(self, channel: Any, newMigration: bool, completes: bool = False) -> None:
        """
        Refuse C{channel} if it would start a migration too many, or wait
        with too many others (a channel completing its migration does not wait).
        """
        if newMigration and len(self.migrations) >= self.maxMigrations:
            raise self._refuse(channel, f"{len(self.migrations)} migrations already in progress"
                                        f" (the limit, max migrations {self.maxMigrations})")
        if completes:
            return
        waiting = self._waitingChannels()
        if waiting >= self.maxWaitingChannels:
            raise self._refuse(channel, f"{waiting} channels already waiting for the other channels of"
                                        f" their migration (the limit, max waiting channels"
                                        f" {self.maxWaitingChannels})")

    def _checkHost(self, channel: Any, host: str) -> None:
        until = self._refusedUntil.get(host)
        if until is None:
            return
        if self.clock.seconds() >= until:
            del self._refusedUntil[host]
            return
        raise self._refuse(channel, f"connections from {host} are refused for"
                                    f" {until - self.clock.seconds():.0f} s more, after migrations from"
                                    " it could not be told apart")

    def _refuseHost(self, host: str, error: MigrationError) -> None:
        """
        Channels from C{host} cannot be paired for sure: fail every migration
        assembling from it, and refuse new connections from it for a while.
        """
        self._refusedUntil[host] = self.clock.seconds() + self.channelTimeout
        log.error("refusing the migrations assembling from {host}, and new connections from it for"
                  " {timeout:g} s: {error}", host=host, timeout=self.channelTimeout, error=str(error))
        for migration in list(self._assembling.get(host, ())):
            migration.fail(error)

    def _joinsRefusedAssembly(self, channel: Any, host: str, init: MultiFDInitPacket | None) -> None:
        """
        Refuse C{channel} (raise) if it is one of the channels still to come
        of the migration from C{host} refused for want of a sink.
        """
        record = self._refusedAssemblies.get(host)
        if record is None:
            return
        if self.clock.seconds() >= record.until:
            del self._refusedAssemblies[host]
            return
        if self._assembling.get(host):
            return  # a migration assembles from the host: the usual pairing decides
        if init is None:
            if record.main:
                del self._refusedAssemblies[host]  # a second main channel: a new migration
                return
            record.main = True
        else:
            if record.uuid is not None and init.uuid != record.uuid:
                return
            if init.channelID in record.multifd:
                del self._refusedAssemblies[host]  # a channel id seen already: a new migration
                return
            if init.channelID >= self.channels:
                return  # not a channel of any migration here: refused as usual
            record.uuid = init.uuid
            record.multifd.add(init.channelID)
        if record.main and len(record.multifd) == self.channels:
            del self._refusedAssemblies[host]  # all of them came
        # The error was logged with the first channel; this one is only news.
        self._followingRefusal.add(channel)
        raise self._refuse(channel, f"it belongs to migration {record.number} from {host}, which could not"
                                    " be stored (see above)")

    def isFollowingRefusal(self, channel: Any) -> bool:
        """
        Whether C{channel} was refused as one more channel of a migration
        whose refusal was already logged (so its own is only news).
        """
        return channel in self._followingRefusal

    # Channels arriving

    def _newMigration(self, host: str, channel: Any, init: MultiFDInitPacket | None = None) -> Migration:
        """
        @param channel: the channel starting it; C{init} its initial packet
            if it is a multifd channel.
        """
        self._count += 1
        info = MigrationInfo(self._count, host, self.channels, self.clock.seconds())
        try:
            sink = self.sinkFactory(info)
        except Exception as e:
            if not isinstance(e, MigrationError):
                log.failure("cannot store migration {n} from {host}", n=info.number, host=host)
            error = MigrationError(f"cannot store migration {info.number} from {host}: {e}")
            if self.channels:
                self._refusedAssemblies[host] = _RefusedAssembly(
                    info.number, self.clock.seconds() + self.channelTimeout,
                    uuid=None if init is None else init.uuid, main=init is None,
                    multifd=set() if init is None else {init.channelID},
                )
            # Logged once, by the channel; not a stray that ends another migration.
            self._refusedChannels.add(channel)
            if self.onMigrationEnded is not None:
                self.onMigrationEnded(_refused(info, self.pageSize, str(error)))
            raise error
        migration = Migration(
            info, sink, clock=self.clock, pageSize=self.pageSize, compression=self.compression,
            channelTimeout=self.channelTimeout, idleTimeout=self.idleTimeout, onEnded=self._ended,
        )
        log.info("migration {n} from {host}: first channel connected; expecting a main channel"
                 " and {channels} multifd channels", n=info.number, host=host, channels=self.channels)
        self.migrations.append(migration)
        self._assembling.setdefault(host, []).append(migration)
        return migration

    def mainArrived(self, channel: MainChannel) -> Migration:
        host = sourceHost(channel.peer)
        if self.channels == 0:
            # Plain migrations: each main channel is a whole migration.
            self._checkLimits(channel, newMigration=True)
            migration = self._newMigration(host, channel)
        else:
            self._checkHost(channel, host)
            self._joinsRefusedAssembly(channel, host, None)
            assembling = self._assembling.get(host, [])
            if len(assembling) == 1 and assembling[0].main is None:
                migration = assembling[0]
                self._checkLimits(channel, newMigration=False,
                                  completes=len(migration.multifd) == self.channels)
            elif not assembling:
                self._checkLimits(channel, newMigration=True)
                migration = self._newMigration(host, channel)
            else:
                error = RefusedConnection(
                    f"main channel from {describePeer(channel.peer)}, while "
                    + ", ".join(f"{m.label} (uuid {_uuidText(m.uuid)}"
                                f"{', has its main channel' if m.main is not None else ''})"
                                for m in assembling)
                    + " assembling from the same host: a main channel carries no uuid, so which"
                    " migration it belongs to cannot be told; refusing them rather than risk a"
                    " mixed capture"
                )
                self._refusedChannels.add(channel)
                self._refuseHost(host, error)
                raise error
        channel.migration = migration
        self._attach(migration, lambda: migration.attachMain(channel), channel)
        return migration

    def multifdArrived(self, channel: MultiFDChannel, init: MultiFDInitPacket) -> Migration:
        host = sourceHost(channel.peer)
        self._checkHost(channel, host)
        assembling = self._assembling.get(host, [])
        migration = next((m for m in assembling if m.uuid == init.uuid), None)
        if migration is None:
            self._joinsRefusedAssembly(channel, host, init)
            running = next((m for m in self.migrations if m.info.peer == host and m.uuid == init.uuid
                            and not m.ended and m not in assembling), None)
            if running is not None:
                error = RefusedConnection(
                    f"{channel.label}: a second migration from {host} with uuid {init.uuid.hex()},"
                    f" while {running.label} with the same uuid is in progress: the two cannot be"
                    " told apart, so the second is refused"
                )
                self._refusedChannels.add(channel)
                self._refuseHost(host, error)
                raise error
            if len(assembling) == 1 and assembling[0].uuid is None:
                # A main channel alone, waiting for the multifd channels.
                migration = assembling[0]
                self._checkLimits(channel, newMigration=False, completes=self.channels == 1)
            elif any(m.main is not None for m in assembling):
                withMain = next(m for m in assembling if m.main is not None)
                error = ProtocolError(
                    f"uuid {init.uuid.hex()}, other channels sent {_uuidText(withMain.uuid)}: a new"
                    f" migration from a host whose main channel is already waiting ({withMain.label});"
                    " which migration that main channel belongs to cannot be told, so both are refused",
                    field="initial packet uuid",
                ).onConnection(channel.label)
                self._refusedChannels.add(channel)
                self._refuseHost(host, error)
                raise error
            else:
                self._checkLimits(channel, newMigration=True)
                migration = self._newMigration(host, channel, init)
        else:
            self._checkLimits(channel, newMigration=False, completes=migration.main is not None
                              and len(migration.multifd) + 1 == self.channels)
        channel.migration = migration
        log.info("{label}: joins {migration} (uuid {uuid})", label=channel.label,
                 migration=migration.label, uuid=init.uuid.hex())
        duplicate = init.channelID in migration.multifd
        try:
            self._attach(migration, lambda: migration.attachMultiFD(channel, init), channel)
        except MigrationError as e:
            if duplicate and 0 < self.channels and init.channelID < self.channels:
                # Two sources on one host sending the same uuid at once.
                self._refuseHost(host, e.onConnection(channel.label))
            raise
        return migration

    def _attach(self, migration: Migration, attach: Callable[[], None], channel: Any) -> None:
        try:
            attach()
        except MigrationError as e:
            channel.migration = None
            migration.fail(e.onConnection(channel.label))
            raise
        finally:
            if migration.state != ASSEMBLING:
                self._stopAssembling(migration)

    def _stopAssembling(self, migration: Migration) -> None:
        host = migration.info.peer
        assembling = self._assembling.get(host)
        if assembling is not None and migration in assembling:
            assembling.remove(migration)
            if not assembling:
                del self._assembling[host]

    def strayChannelLost(self, channel: MultiFDChannel, error: MigrationError) -> None:
        """
        A multifd connection ended before its initial packet: the migration
        assembling from that host (if only one is) can no longer complete.
        """
        if channel in self._followingRefusal:
            log.info("{error}", error=str(error))
            return
        if channel in self._refusedChannels:
            log.error("{error}", error=str(error))
            return
        assembling = self._assembling.get(sourceHost(channel.peer), [])
        if len(assembling) == 1:
            assembling[0].fail(error)
        else:
            log.error("{error}", error=str(error))

    def _ended(self, migration: Migration, result: MigrationResult) -> None:
        self._stopAssembling(migration)
        if migration in self.migrations:
            self.migrations.remove(migration)
        if self.onMigrationEnded is not None:
            self.onMigrationEnded(result)

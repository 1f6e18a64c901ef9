"""
One incoming migration: a main channel and N multifd channels, assembled in
any order, loaded once all are in, kept in step at QEMU's sync barriers.

Barrier semantics (QEMU's C{multifd_recv_sync_main}): a multifd channel that
reads a SYNC packet applies that packet's pages, then stops reading its
socket; the main channel, at a sync point (MULTIFD_FLUSH, or every RAM EOS in
the per-section mode of 7.2/8.0), waits until every channel has stopped at
its SYNC, then releases them all. So everything a channel sent before its
SYNC is delivered before main passes the sync point, and nothing after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ._compression import compressionName
from ._errors import ConnectionClosed, MigrationError, MigrationTimeout, ProtocolError
from ._incremental import DeliveredElsewhere
from ._initpacket import MultiFDInitPacket, checkChannelJoins
from ._interfaces import IMigrationSink
from ._mainstream import Command, Configuration, RamBlock, RamBlockList, RamSection
from ._packet import DeviceStatePacket, RamPacket, isOneRun
from ._records import MigrationInfo, MigrationResult
from ._tail import StreamTail

if TYPE_CHECKING:
    from ._channels import MainChannel, MultiFDChannel
    from ._directread import PageFile

log = Logger(namespace="twisted_multifd.migration")

ASSEMBLING, LOADING, DRAINING, COMPLETE, FAILED = "assembling", "loading", "draining", "complete", "failed"


def _runOutside(offsets: tuple[int, ...], pageSize: int, limit: int) -> int | None:
    """
    L{_firstOffsetOutside} for C{offsets} that are one run of consecutive
    pages (L{isOneRun}), not empty: checked at its ends.
    """
    first = offsets[0]
    if first % pageSize or first > limit:
        return first
    if offsets[-1] > limit:
        return first + ((limit - first) // pageSize + 1) * pageSize
    return None


def _firstOffsetOutside(offsets: tuple[int, ...], pageSize: int, limit: int) -> int | None:
    """
    The first of C{offsets} that is not the start of a page at or below
    C{limit}, or L{None}. A run of consecutive pages is checked at its ends.
    """
    if not offsets:
        return None
    if isOneRun(offsets, pageSize):
        return _runOutside(offsets, pageSize, limit)
    for offset in offsets:
        if offset % pageSize or offset > limit:
            return offset
    return None


def _formatRate(size: int, seconds: float) -> str:
    mib = size / (1024 * 1024)
    return f"{mib:.1f} MiB in {seconds:.2f} s ({mib / seconds if seconds > 0 else 0:.1f} MiB/s)"


class Migration:
    """
    The session state of one migration. Channels report to it; it decides when
    loading starts, when barriers pass, and how the migration ends.
    """

    def __init__(
        self,
        info: MigrationInfo,
        sink: IMigrationSink,
        *,
        clock: IReactorTime,
        pageSize: int,
        compression: int | None,
        channelTimeout: float,
        onEnded: Callable[["Migration", MigrationResult], None],
        idleTimeout: float | None = None,
    ) -> None:
        self.info = info
        self.sink = sink
        self.clock = clock
        self.pageSize = pageSize
        self.compression = compression
        self.channelTimeout = channelTimeout
        self._onEnded = onEnded
        self.state = ASSEMBLING
        self.main: MainChannel | None = None
        self.multifd: dict[int, MultiFDChannel] = {}
        self.uuid: bytes | None = None
        self.blocks: dict[str, RamBlock] | None = None
        self.configuration: Configuration | None = None
        self.flushMode: str | None = None
        self.zeroPagesOn: set[str] = set()
        self.stream: dict[str, Any] = {"commands": []}
        self.result: MigrationResult | None = None
        self._tail: StreamTail | None = None
        self._arrived: set[int] = set()
        self._mainWaiting = False
        self._closedChannels: set[int] = set()
        self._bytes = 0
        self._pagesWithData = 0
        self._zeroPages = 0
        self._started = clock.seconds()
        self._timer: IDelayedCall | None = clock.callLater(
            channelTimeout, self._timedOut, "all channels to connect"
        )
        self.idleTimeout = idleTimeout
        self._idleTimer: IDelayedCall | None = None
        # A capture's private hook: pages spliced straight into its files.
        self._pageFile: Callable[[RamBlock, int, int], PageFile | None] | None = getattr(sink, "_pageFile", None)
        self._bytesAtIdleCheck = 0
        self._lastActivity = 0.0

    @property
    def label(self) -> str:
        return f"migration {self.info.number} from {self.info.peer}"

    @property
    def ended(self) -> bool:
        return self.state in (COMPLETE, FAILED)

    # Assembly

    def attachMain(self, channel: "MainChannel") -> None:
        if self.main is not None:
            raise ProtocolError(f"a second main channel for {self.label}")
        self.main = channel
        self._maybeStart()

    def attachMultiFD(self, channel: "MultiFDChannel", init: MultiFDInitPacket) -> None:
        self.uuid = checkChannelJoins(init, self.info.channels, self.multifd, self.uuid, "receiver")
        self.multifd[init.channelID] = channel
        self._maybeStart()

    def _maybeStart(self) -> None:
        if self.state != ASSEMBLING or self.main is None or len(self.multifd) != self.info.channels:
            return
        self.state = LOADING
        self._cancelTimer()
        log.info("{label}: all {n} multifd channels and the main channel are in; loading",
                 label=self.label, n=self.info.channels)
        self._watchIdle()
        self.sink.migrationStarted(self.info)
        self.main.start()

    def _watchIdle(self) -> None:
        """
        From loading on, check a few times per idle timeout that bytes still
        arrive (a timer per read would cost more than the reads).
        """
        if not self.idleTimeout:
            return
        self._bytesAtIdleCheck = self._bytes
        self._lastActivity = self.clock.seconds()
        self._idleTimer = self.clock.callLater(self.idleTimeout / 4, self._idleCheck)

    def _idleCheck(self) -> None:
        self._idleTimer = None
        if self.ended or not self.idleTimeout:
            return
        now = self.clock.seconds()
        if self._bytes != self._bytesAtIdleCheck:
            self._bytesAtIdleCheck = self._bytes
            self._lastActivity = now
        elif now - self._lastActivity >= self.idleTimeout:
            waiting = [channel.label for channel in [self.main, *self.multifd.values()]
                       if channel is not None and not channel.finished]
            self.fail(MigrationTimeout(
                f"nothing received for {now - self._lastActivity:g} s while {self.state}"
                f" (--idle-timeout {self.idleTimeout:g}); the source stalled or the network"
                f" dropped; still open: {', '.join(waiting) or 'none'}",
                connection=self.label,
            ))
            return
        self._idleTimer = self.clock.callLater(self.idleTimeout / 4, self._idleCheck)

    # Main channel events

    def mainHeader(self, version: int) -> None:
        self.stream["version"] = version

    def mainConfiguration(self, configuration: Configuration) -> None:
        if configuration.uuid is not None and self.uuid is not None and configuration.uuid != self.uuid:
            # The receiver pairs a main channel only when no other pairing is
            # possible; with validate-uuid the source proves it.
            raise ProtocolError(
                f"uuid {configuration.uuid.hex()}, its multifd channels sent {self.uuid.hex()}",
                field="configuration uuid",
            )
        self.configuration = configuration
        self.stream["configuration"] = configuration.raw.hex()
        if configuration.targetPageBits is not None:
            self.pageSize = 1 << configuration.targetPageBits
        log.info("{label}: machine {machine}", label=self.label, machine=configuration.machine)
        self.sink.configuration(configuration)

    def mainRamSection(self, section: RamSection) -> None:
        if section.kind == "START":
            self.stream["ram_section"] = {
                "section_id": section.sectionID,
                "instance_id": section.instanceID,
                "version": section.version,
            }

    def mainCommand(self, command: Command) -> None:
        self.stream["commands"].append(command.name)

    def mainBlockList(self, blockList: RamBlockList) -> None:
        self.blocks = {block.name: block for block in blockList.blocks}
        self.stream["ram_total"] = blockList.total
        self.sink.ramBlocks(blockList.blocks, self.pageSize)
        log.info("{label}: {count} RAM blocks, {mib:.1f} MiB",
                 label=self.label, count=len(blockList.blocks), mib=blockList.total / 1048576)
        for channel in list(self.multifd.values()):
            channel.release()

    def mainPage(self, block: RamBlock, offset: int, data: bytes) -> None:
        self._pagesWithData += 1
        self.sink.writePages(block, (offset,), data)

    def mainZeroPage(self, block: RamBlock, offset: int) -> None:
        self.zeroPagesOn.add("main")
        self._zeroPages += 1
        self.sink.zeroPages(block, (offset,))

    def mainSyncPoint(self, flushMode: str) -> bool:
        """
        Main reached a sync point. Returns True if it may go on at once;
        otherwise the main channel has to wait for L{MainChannel.resume}.
        """
        self.flushMode = flushMode
        if not self.multifd:
            return True
        missing = self._closedChannels - self._arrived
        if missing:
            raise ConnectionClosed(
                f"multifd channel {min(missing)} closed before reaching the sync point",
                connection=self.label,
            )
        if len(self._arrived) == len(self.multifd):
            self._passBarrier(resumeMain=False)
            return True
        self._mainWaiting = True
        return False

    def mainFinished(self, tail: StreamTail) -> None:
        """
        The main stream parsed to its end. Channels still parked at a SYNC
        (QEMU 9.1/9.2 send one that no FLUSH collects) are released; the
        migration completes when every channel has closed cleanly.
        """
        self.state = DRAINING
        self._tail = tail
        self._arrived.clear()
        for channel in list(self.multifd.values()):
            channel.release()
        if not self.ended:
            self._maybeComplete()
            if not self.ended:
                self._timer = self.clock.callLater(
                    self.channelTimeout, self._timedOut, "the multifd channels to close"
                )

    # Multifd channel events

    def multifdPacket(self, channel: "MultiFDChannel", packet: RamPacket) -> None:
        if packet.block is not None:
            block = self.blocks.get(packet.block) if self.blocks is not None else None
            if block is None:
                raise ProtocolError(f"unknown RAMBlock {packet.block!r}", field="ramblock")
            if self.state == DRAINING:
                raise ProtocolError("pages after the end of the main stream", field="packet")
            pageSize = self.pageSize
            limit = block.length - pageSize
            stored = type(packet.data) is DeliveredElsewhere
            # Pages already stored were checked by pageFileFor first.
            for offsets in (() if stored else packet.normalOffsets, packet.zeroOffsets):
                bad = _firstOffsetOutside(offsets, pageSize, limit)
                if bad is not None:
                    raise ProtocolError(
                        f"offset {bad:#x} is not a page of {block.name!r} ({block.length:#x} bytes)",
                        field="offset",
                    )
            value = packet.compression
            if self.compression is None:
                self.compression = value
            elif value != self.compression:
                raise ProtocolError(
                    f"compression is {compressionName(value)}, expected {compressionName(self.compression)}",
                    field="packet flags",
                )
            if packet.normalOffsets:
                self._pagesWithData += len(packet.normalOffsets)
                if stored:
                    # Already in the sink's file (see pageFileFor).
                    self.sink._pagesStored(block, packet.normalOffsets)
                else:
                    self.sink.writePages(block, packet.normalOffsets, packet.data)
            if packet.zeroOffsets:
                self.zeroPagesOn.add("multifd")
                self._zeroPages += len(packet.zeroOffsets)
                self.sink.zeroPages(block, packet.zeroOffsets)

    def pageFileFor(self, blockName: str, offsets: tuple[int, ...]) -> PageFile | None:
        """
        Where a multifd channel's reader may store the payload of a packet
        carrying pages C{offsets} of C{blockName} itself, before the packet
        reaches L{multifdPacket}: only while loading, for a run of pages
        inside a known block, into a sink that keeps pages in files.
        Anything else (including every packet L{multifdPacket} would refuse)
        gets L{None} and goes the ordinary way. Scattered pages are not
        spliced: one small splice per run cost more than copying them
        (docs/performance.md, "Receive, fifth round").
        """
        pageFile = self._pageFile
        if pageFile is None or self.state != LOADING or self.blocks is None or self.compression:
            return None
        block = self.blocks.get(blockName)
        pageSize = self.pageSize
        if block is None or not offsets:
            return None
        if not isOneRun(offsets, pageSize) or _runOutside(offsets, pageSize, block.length - pageSize) is not None:
            return None
        target: PageFile | None = pageFile(block, offsets[0], len(offsets) * pageSize)
        return target

    def multifdDeviceState(self, packet: DeviceStatePacket) -> None:
        self.sink.deviceStatePacket(packet)

    def syncArrived(self, channel: "MultiFDChannel") -> bool:
        """
        A channel read a SYNC. Returns True if it may go on reading, False if
        it must stop until released.
        """
        if self.state == DRAINING:
            return True  # a SYNC that no FLUSH collects
        self._arrived.add(channel.channelID)
        if self._mainWaiting and len(self._arrived) == len(self.multifd):
            self._passBarrier(resumeMain=True)
            # _passBarrier released this channel too.
            return True
        return False

    def _passBarrier(self, resumeMain: bool) -> None:
        self._arrived.clear()
        self._mainWaiting = False
        for channel in list(self.multifd.values()):
            channel.release()
        if resumeMain and self.main is not None:
            self.main.resume()

    def progressLine(self) -> str:
        """
        One line on how far the migration is, for logs.
        """
        elapsed = self.clock.seconds() - self._started
        line = f"{self.label}: {self.state}, {_formatRate(self._bytes, elapsed)}"
        total = self.stream.get("ram_total")
        if total:
            pages = self._pagesWithData + self._zeroPages
            line += f", {pages} pages of {total // self.pageSize} received ({100 * pages * self.pageSize / total:.0f}%)"
        return line

    def status(self) -> dict[str, Any]:
        """
        A read-only snapshot for the status page (docs/status.md): state,
        channel states (connected, waiting, at-barrier, closed), bytes, pages
        and the RAM total once the block list has arrived.
        """
        def channelState(channel: Any, closed: bool, atBarrier: bool) -> str:
            if channel is None:
                return "waiting"
            if closed or getattr(channel, "_lost", None) is not None:
                return "closed"
            return "at-barrier" if atBarrier else "connected"

        channels = {"main": channelState(self.main, self.ended, self._mainWaiting)}
        for n in range(self.info.channels):
            channels[str(n)] = channelState(self.multifd.get(n), n in self._closedChannels or self.ended,
                                            n in self._arrived)
        return {
            "state": self.state,
            "elapsed": self.clock.seconds() - self._started,
            "bytes": self._bytes,
            "pages_with_data": self._pagesWithData,
            "zero_pages": self._zeroPages,
            "ram_total": self.stream.get("ram_total"),
            "page_size": self.pageSize,
            "channels": channels,
        }

    def countBytes(self, size: int) -> None:
        self._bytes += size

    def channelClosed(self, channelID: int) -> None:
        """
        A multifd channel's connection ended at a packet boundary.
        """
        self._closedChannels.add(channelID)
        if self.state == DRAINING:
            self._maybeComplete()
        elif self._mainWaiting and channelID not in self._arrived:
            self.fail(ConnectionClosed(
                f"multifd channel {channelID} closed before reaching the sync point",
                connection=self.label,
            ))

    def _maybeComplete(self) -> None:
        if self.state == DRAINING and self._closedChannels >= set(self.multifd):
            self._end(None)

    # Ending

    def fail(self, error: MigrationError) -> None:
        if self.ended:
            return
        self._end(error)

    def _timedOut(self, what: str) -> None:
        self._timer = None
        if self.state == ASSEMBLING:
            absent = sorted(set(range(self.info.channels)) - set(self.multifd))
            missing = []
            if self.main is None:
                missing.append("the main channel")
            if absent:
                missing.append(f"multifd channels {absent}")
            self.fail(MigrationTimeout(
                f"{' and '.join(missing)} missing: waited {self.channelTimeout:g} s for {what};"
                f" have {'the main channel' if self.main else 'no main channel'} and multifd channels"
                f" {sorted(self.multifd)} of {self.info.channels}",
                connection=self.label,
            ))
        else:
            open_ = sorted(set(self.multifd) - self._closedChannels)
            self.fail(MigrationTimeout(
                f"main stream ended but multifd channels {open_} did not close within"
                f" {self.channelTimeout:g} s", connection=self.label))

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _end(self, error: MigrationError | None) -> None:
        self._cancelTimer()
        if self._idleTimer is not None and self._idleTimer.active():
            self._idleTimer.cancel()
        self._idleTimer = None
        self.state = FAILED if error else COMPLETE
        channels = [self.main, *self.multifd.values()]
        for channel in channels:
            if channel is not None:
                channel.detach(abort=error is not None)
        duration = self.clock.seconds() - self._started
        if error is None:
            try:
                self.sink.streamEnded(self._tail)
            except Exception as e:
                error = self._sinkFailed(e)
        result = self._result(error, duration)
        try:
            self.sink.migrationEnded(result)
        except Exception as e:
            if result.complete:
                # The sink could not record the migration (disk full, say): it
                # is not complete, whatever the wire said.
                result = self._result(self._sinkFailed(e), duration)
            elif isinstance(e, MigrationError):
                log.error("{label}: recording the failure failed too: {error}", label=self.label, error=str(e))
            else:
                log.failure("{label}: the sink failed while recording the failure", label=self.label)
        self.state = COMPLETE if result.complete else FAILED
        self.result = result
        if result.complete:
            log.info("{label}: complete: {rate}, {data} pages with data, {zero} zero pages",
                     label=self.label, rate=_formatRate(result.bytesReceived, duration),
                     data=result.pagesWithData, zero=result.zeroPageRecords)
        else:
            reason = result.error or ""
            if reason.startswith(self.label + ": "):
                reason = reason[len(self.label) + 2 :]
            log.error("{label}: failed after {rate}: {error}", label=self.label,
                      rate=_formatRate(result.bytesReceived, duration), error=reason)
        self._onEnded(self, result)

    def _sinkFailed(self, e: Exception) -> MigrationError:
        if not isinstance(e, MigrationError):
            log.failure("{label}: the sink failed", label=self.label)
        return MigrationError(f"storing the migration failed: {e}", connection=self.label)

    def _result(self, error: MigrationError | None, duration: float) -> MigrationResult:
        configuration = self.configuration
        zeroPages = None
        if self.zeroPagesOn:
            zeroPages = "+".join(sorted(self.zeroPagesOn))
        return MigrationResult(
            info=self.info,
            complete=error is None,
            error=None if error is None else str(error),
            machine=None if configuration is None else configuration.machine,
            uuid=None if self.uuid is None else _formatUUID(self.uuid),
            pageSize=self.pageSize,
            compression=None if self.compression is None else compressionName(self.compression),
            flushMode=self.flushMode if self.multifd else None,
            zeroPages=zeroPages,
            bytesReceived=self._bytes,
            pagesWithData=self._pagesWithData,
            zeroPageRecords=self._zeroPages,
            duration=duration,
            stream=dict(self.stream, flush_mode=self.flushMode),
        )


def _formatUUID(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"



"""
The receiver against bad and odd input (wire reference §10): every malformed
stream ends the migration with an error that names the connection and the
field, never as complete; every odd-but-valid stream QEMU sends is accepted.

Everything runs in memory: L{twisted_multifd.testing.MigrationPump} (whose
StringTransports honour pauseProducing), a Clock for every timeout, synthetic
migrations with faults injected from L{synthetic}.
"""

from __future__ import annotations

import json
import struct
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent

from synthetic import PAGE_SIZE, Device, SyntheticMigration, build, buildVMDesc, samplePage

from twisted_multifd._capture import CaptureWriter
from twisted_multifd._errors import ProtocolError
from twisted_multifd._initpacket import MultiFDInitPacket, buildInitPacket, parseInitPacket
from twisted_multifd._mainstream import (
    RAM_COMPRESS_PAGE,
    RAM_CONTINUE,
    RAM_FULL,
    RAM_MEM_SIZE,
    RAM_MULTIFD_FLUSH,
    RAM_PAGE,
    RAM_XBZRLE,
    RAM_ZERO,
    RamBlock,
    buildBlockList,
    buildCommand,
    buildHeader,
    buildRamRecord,
)
from twisted_multifd._packet import (
    FLAG_DEVICE_STATE,
    FLAG_SYNC,
    RAM_HEADER_FIXED,
    buildDeviceStatePacket,
    buildRamPacket,
    ramHeaderSize,
)
from twisted_multifd._receiver import MigrationReceiverFactory
from twisted_multifd._sniff import MAIN_CHANNEL, MULTIFD_CHANNEL, ChannelSniffer
from twisted_multifd._tail import splitTail
from twisted_multifd.testing import MigrationPump, PumpedConnection

HOST = "192.0.2.1"
CHANNEL_TIMEOUT = 60.0
SNIFF_TIMEOUT = 120.0
CONVENTIONS = ["7.2", "10.0"]


# Harness


def consumed(link: PumpedConnection) -> int:
    """
    Bytes the channel's parser has taken (not merely received).
    """
    return link.protocol.delegate.parser.consumed


class Receiver:
    """
    A MigrationReceiverFactory on a Clock, writing captures under a folder,
    and what it reported.
    """

    def __init__(self, directory: Path, channels: int, **options: Any) -> None:
        self.directory = directory
        self.clock = Clock()
        self.results: list = []
        options.setdefault("channelTimeout", CHANNEL_TIMEOUT)
        options.setdefault("sniffTimeout", SNIFF_TIMEOUT)
        self.factory = MigrationReceiverFactory(
            lambda info: CaptureWriter(str(directory / f"capture-{info.number}")),
            channels=channels, clock=self.clock, onMigrationEnded=self.results.append, **options,
        )
        # Connections whose bytes a test hands out piece by piece (links);
        # every end is delivered as soon as its bytes are read.
        self._links = MigrationPump(self.factory, host=HOST, mainClosesLast=False)

    def pump(self, streams, order=None, chunk: int = 65536, mainLast: bool = True) -> None:
        MigrationPump(self.factory, streams, order=order, chunkSizes=chunk, host=HOST,
                      mainClosesLast=mainLast).flush()

    def links(self, count: int) -> list[PumpedConnection]:
        """
        C{count} open connections (ports 40000, 40001, ...) to C{send} to.
        """
        return [self._links.connect(close=False) for _ in range(count)]

    def run(self) -> None:
        """
        Deliver what the links can take until nothing moves.
        """
        self._links.flush()

    @property
    def result(self):
        assert len(self.results) == 1, self.results
        return self.results[0]

    def manifest(self) -> dict:
        return json.loads((self.directory / "capture-1" / "manifest.json").read_text())

    def image(self, name: str) -> bytes:
        [block] = [b for b in self.manifest()["ram_blocks"] if b["name"] == name]
        return (self.directory / "capture-1" / block["file"]).read_bytes()

    def assertComplete(self, migration: SyntheticMigration) -> dict:
        result = self.result
        assert (result.complete, result.error) == (True, None)
        manifest = self.manifest()
        assert (manifest["complete"], manifest["error"]) == (True, None)
        for name, content in migration.memory.items():
            assert self.image(name) == content, name
        return manifest

    def assertFailed(self, *fragments: str) -> str:
        result = self.result
        assert result.complete is False
        assert result.error is not None
        for fragment in fragments:
            assert fragment in result.error
        manifest = self.manifest()
        assert manifest["complete"] is False
        assert manifest["error"] == result.error
        return result.error


def receive(tmp_path: Path, migration: SyntheticMigration, **options: Any) -> Receiver:
    receiver = Receiver(tmp_path, migration.channels, **options)
    receiver.pump(migration.streams)
    return receiver


def mainLabel(port: int = 40000) -> str:
    return f"main channel from {HOST}:{port}"


def channelLabel(channelID: int | None, port: int) -> str:
    which = "" if channelID is None else f" {channelID}"
    return f"multifd channel{which} from {HOST}:{port}"


def firstPacket(migration: SyntheticMigration, channel: int = 0, section: str = "PART1") -> str:
    return migration.multifd[channel].tags(f"{section}.packet")[0]


def staleCopy(stream, tag: str, *, flags: int, newTag: str | None = None, replace: str | None = None) -> None:
    """
    A QEMU <= 8.2 page-less packet: no pages, but the ramblock, offsets,
    next_packet_size and packet_num of the channel's data packet C{tag};
    inserted after C{tag}, or in place of the piece C{replace}.
    """
    data = stream[tag]
    args = data.args
    empty = buildRamPacket(
        pageSize=PAGE_SIZE, flags=flags, packetNum=args["packetNum"], block=args["block"],
        pagesAlloc=128, nextPacketSize=len(args["payload"]),
    )
    packet = empty[:RAM_HEADER_FIXED] + data.data[RAM_HEADER_FIXED : ramHeaderSize(PAGE_SIZE)]
    if replace is not None:
        stream.replace(replace, packet)
    else:
        stream.insertAfter(tag, newTag or f"{tag}.stale", packet)


# Initial packets


def test_initPacketWithBadMagicIsRejected() -> None:
    # A connection can only reach the initial-packet parser with the right
    # first four bytes, so the magic is checked on the parser itself.
    good = buildInitPacket(MultiFDInitPacket(bytes(16), 0))
    with pytest.raises(ProtocolError) as e:
        parseInitPacket(b"\x11\x22\x33\x45" + good[4:])
    assert e.value.field == "initial packet magic"
    assert "got 0x11223345" in str(e.value)
    assert parseInitPacket(good).channelID == 0


@pytest.mark.parametrize("size", [4, 30, 63])
def test_initPacketCutShortFailsTheMigration(tmp_path: Path, size: int) -> None:
    m = build(channels=2)
    receiver = Receiver(tmp_path, 2)
    receiver.pump([m.streams[0], m.streams[1], m.streams[2][:size]])
    receiver.assertFailed(channelLabel(None, 40002), f"connection ended after {size} bytes",
                          "before its 64-byte initial packet")


@pytest.mark.parametrize("channelID, expected", [
    (2, "channel id 2, expected 0 to 1"),  # QEMU's off-by-one lets id == N through
    (3, "channel id 3, expected 0 to 1"),
    (255, "channel id 255, expected 0 to 1"),
    (0, "channel id 0 twice"),
])
def test_initPacketWithBadChannelIDFailsTheMigration(tmp_path: Path, channelID: int, expected: str) -> None:
    m = build(channels=2)
    m.multifd[1].rebuild("init", packet=MultiFDInitPacket(bytes(16), channelID))
    receive(tmp_path, m).assertFailed(channelLabel(channelID, 40002), "initial packet id", expected)


def test_initPacketsWithDifferentUUIDsFailTheMigration(tmp_path: Path) -> None:
    m = build(channels=2, uuid=b"\x01" * 16)
    m.multifd[1].rebuild("init", packet=MultiFDInitPacket(b"\x02" * 16, 1))
    receive(tmp_path, m).assertFailed(
        channelLabel(1, 40002), "initial packet uuid", "uuid " + "02" * 16, "other channels sent " + "01" * 16)


def test_initPacketWithBadVersionFailsTheMigrationAtOnce(tmp_path: Path) -> None:
    m = build(channels=2)
    m.multifd[1].rebuild("init", packet=MultiFDInitPacket(bytes(16), 1, version=2))
    receiver = Receiver(tmp_path, 2)
    with capturedLogs() as events:
        main, c0, c1 = receiver.links(3)
        for link, data in zip((main, c0, c1), m.streams):
            link.send(data)
        receiver.run()
    assert c1.transport.disconnected
    assert any("initial packet version: expected 1, got 2" in formatEvent(e) for e in events)
    # No need to wait for the channel timeout: the migration cannot complete.
    receiver.assertFailed(channelLabel(None, 40002), "initial packet version", "expected 1, got 2")


def test_missingMultifdChannelTimesOut(tmp_path: Path) -> None:
    m = build(channels=3)
    receiver = Receiver(tmp_path, 3)
    receiver.pump(m.streams[:3])
    receiver.clock.advance(CHANNEL_TIMEOUT - 0.001)
    assert receiver.results == []
    receiver.clock.advance(0.001)
    receiver.assertFailed(f"migration 1 from {HOST}", "multifd channels [2] missing",
                          "waited 60 s", "have the main channel and multifd channels [0, 1] of 3")


def test_missingMainChannelTimesOut(tmp_path: Path) -> None:
    m = build(channels=2)
    receiver = Receiver(tmp_path, 2)
    receiver.pump(m.streams[1:], mainLast=False)
    receiver.clock.advance(CHANNEL_TIMEOUT - 0.001)
    assert receiver.results == []
    receiver.clock.advance(0.001)
    receiver.assertFailed("main channel missing", "have no main channel and multifd channels [0, 1] of 2")


# Sniffing


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.made = 0

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


def sniffer(clock: Clock, timeout: float = SNIFF_TIMEOUT) -> tuple[ChannelSniffer, StringTransport, list]:
    chosen: list[tuple[str, Recorder]] = []

    def chooser(kind: str, peer: Any) -> Recorder:
        chosen.append((kind, Recorder()))
        return chosen[-1][1]

    peer = IPv4Address("TCP", HOST, 40000)
    protocol = ChannelSniffer(chooser, peer, clock, timeout)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    return protocol, transport, chosen


@pytest.mark.parametrize("kind, magic", [(MAIN_CHANNEL, b"QEVM"), (MULTIFD_CHANNEL, b"\x11\x22\x33\x44")])
@pytest.mark.parametrize("reads", [[1, 3], [2, 2], [1, 1, 1, 1], [3, 1], [4 + 2**20]],
                         ids=["1+3", "2+2", "1+1+1+1", "3+1", "4+1MiB"])
def test_sniffClassifiesSplitMagicAndForwardsEveryByteOnce(kind: str, magic: bytes, reads: list[int]) -> None:
    data = magic + bytes(range(256)) * 4096 + b"end"
    protocol, transport, chosen = sniffer(Clock())
    position = 0
    for size in reads + [len(data)]:
        protocol.dataReceived(data[position : position + size])
        position += size
    assert [k for k, _ in chosen] == [kind]
    recorder = chosen[0][1]
    assert recorder.made == 1 and recorder.transport is transport
    assert b"".join(recorder.received) == data
    assert not transport.disconnecting


def test_sniffAbortsUnknownMagicAndLogsItsBytes() -> None:
    protocol, transport, chosen = sniffer(Clock())
    with capturedLogs() as events:
        protocol.dataReceived(b"GE")
        protocol.dataReceived(b"T / HTTP/1.0\r\n")
    assert chosen == []
    assert transport.disconnected
    [event] = [formatEvent(e) for e in events]
    assert f"connection from {HOST}:40000" in event
    assert "47 45 54 20 2f 20 48 54" in event


@pytest.mark.parametrize("size", [0, 1, 2, 3])
def test_sniffDropsSilentConnectionAfterTimeoutNotBefore(tmp_path: Path, size: int) -> None:
    receiver = Receiver(tmp_path, 2, sniffTimeout=5.0)
    [link] = receiver.links(1)
    link.send(b"QEVM"[:size])
    receiver.run()
    receiver.clock.advance(4.999)
    assert not link.transport.disconnecting
    receiver.clock.advance(0.001)
    assert link.transport.disconnected
    assert receiver.results == [] and receiver.factory.migrations == []


def test_sniffTimerStopsOnceClassified(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path, 2, sniffTimeout=5.0, channelTimeout=1000.0)
    [link] = receiver.links(1)
    link.send(b"QEV")
    receiver.run()
    receiver.clock.advance(4.0)
    link.send(b"M")
    receiver.run()
    receiver.clock.advance(10.0)
    assert not link.transport.disconnecting
    assert len(receiver.factory.migrations) == 1


# Sync barriers


def syncPoint(convention: str, section: str = "START") -> str:
    return f"{section}.flush" if convention == "10.0" else f"{section}.eos"


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_channelAtSyncStopsReadingUntilMainGetsThere(tmp_path: Path, convention: str) -> None:
    m = build(convention=convention, channels=2)
    receiver = Receiver(tmp_path, 2)
    main, c0, c1 = receiver.links(3)
    c0.send(m.multifd[0].data(), close=True)
    c1.send(m.multifd[1]["init"].data)
    main.send(m.main.through("START.blocks"))
    receiver.run()
    # Only channel 0 has reached its SYNC: it alone stops, right after it.
    assert (c0.paused, c1.paused, main.paused) == (True, False, False)
    assert consumed(c0) == len(m.multifd[0].through("START.sync"))
    main.send(m.main.after("START.blocks"), close=True)
    receiver.run()
    # Main at the sync point waits for channel 1; channel 0 still waits too.
    assert (c0.paused, main.paused) == (True, True)
    assert consumed(main) == len(m.main.through(syncPoint(convention)))
    assert consumed(c0) == len(m.multifd[0].through("START.sync"))
    c1.send(m.multifd[1].after("init"), close=True)
    receiver.run()
    receiver.assertComplete(m)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_mainAtSyncPointWaitsForTheLastChannel(tmp_path: Path, convention: str) -> None:
    m = build(convention=convention, channels=2)
    receiver = Receiver(tmp_path, 2)
    main, c0, c1 = receiver.links(3)
    c0.send(m.multifd[0]["init"].data)
    c1.send(m.multifd[1]["init"].data)
    main.send(m.main.data(), close=True)
    receiver.run()
    assert main.paused
    assert consumed(main) == len(m.main.through(syncPoint(convention)))
    c0.send(m.multifd[0].after("init"), close=True)
    receiver.run()
    assert main.paused and c0.paused
    assert consumed(main) == len(m.main.through(syncPoint(convention)))
    c1.send(m.multifd[1].after("init"), close=True)
    receiver.run()
    receiver.assertComplete(m)


# Page 1 of pc.ram holds data in the sample, page 0 is zero.
@pytest.mark.parametrize("offset, later", [(PAGE_SIZE, bytes(PAGE_SIZE)), (0, samplePage(77))],
                         ids=["data-then-zero", "zero-then-data"])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0]], ids=["main-first", "main-last"])
def test_laterVersionOfAPageWinsAcrossABarrier(tmp_path: Path, convention: str, offset: int,
                                               later: bytes, order: list[int]) -> None:
    m = build(convention=convention, channels=2, zeroPagesOnMain=True, rounds=[{"pc.ram": {offset: later}}])
    # One version travels on main, the other in a multifd packet.
    zeroOnMain = f"PART{1 if any(later) else 2}.zero:pc.ram@{offset:#x}"
    assert zeroOnMain in m.main
    receiver = Receiver(tmp_path, 2)
    receiver.pump(m.streams, order=order, chunk=4096)
    receiver.assertComplete(m)
    assert receiver.image("pc.ram")[offset : offset + PAGE_SIZE] == later


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("channels", [0, 1, 3])
@pytest.mark.parametrize("chunk", [65536, 1000])
@pytest.mark.parametrize("mainFirst", [True, False], ids=["main-first", "main-last"])
def test_bothFlushConventionsAreReceived(tmp_path: Path, convention: str, channels: int, chunk: int,
                                         mainFirst: bool) -> None:
    m = build(convention=convention, channels=channels, rounds=[{"pc.ram": {0: samplePage(5)}}])
    receiver = Receiver(tmp_path, channels)
    multifd = list(range(1, channels + 1))
    receiver.pump(m.streams, order=[0, *multifd] if mainFirst else [*multifd[::-1], 0], chunk=chunk)
    manifest = receiver.assertComplete(m)
    expected = {"7.2": "per-section", "10.0": "per-round"}[convention] if channels else None
    assert manifest["flush_mode"] == expected
    zeroPages = "multifd" if channels and convention == "10.0" else "main"
    assert manifest["zero_pages"] == zeroPages


def test_perRoundPartWithoutBarrierIsNotASyncPoint(tmp_path: Path) -> None:
    # Per-round mode is known from START's 0x200: then a PART's EOS is no
    # sync point, and a PART without 0x200 has no SYNC to wait for.
    m = build(convention="10.0", channels=2)
    m.main.remove("PART1.flush")
    for stream in m.multifd:
        stream.remove("PART1.sync")
    receive(tmp_path, m).assertComplete(m)


def test_perSectionStreamSyncsAtEveryEOS(tmp_path: Path) -> None:
    # Without 0x200 in START every EOS is a sync point: a channel missing the
    # SYNC of a PART is caught at that PART's EOS.
    m = build(convention="7.2", channels=2)
    m.multifd[1].remove("PART1.sync")
    receive(tmp_path, m).assertFailed(f"migration 1 from {HOST}",
                                      "multifd channel 1 closed before reaching the sync point")


# QEMU <= 8.2 and 9.2+ oddities


def syncRidesOnData(m: SyntheticMigration) -> None:
    stream = m.multifd[0]
    last = stream.tags("PART1.packet")[-1]
    stream.rebuild(last, flags=FLAG_SYNC)
    stream.remove("PART1.sync")


def emptyPacketAfterRidingSync(m: SyntheticMigration) -> None:
    syncRidesOnData(m)
    stream = m.multifd[0]
    last = stream.tags("PART1.packet")[-1]
    staleCopy(stream, last, flags=0)
    staleCopy(stream, last, flags=FLAG_SYNC, replace="END.sync")


def staleSyncPackets(m: SyntheticMigration) -> None:
    for stream in m.multifd:
        staleCopy(stream, stream.tags("PART1.packet")[-1], flags=FLAG_SYNC, replace="PART1.sync")
        staleCopy(stream, stream.tags("PART1.packet")[-1], flags=FLAG_SYNC, replace="END.sync")


def repeatedPacketNum(m: SyntheticMigration) -> None:
    number = m.multifd[0][firstPacket(m, 0)].args["packetNum"]
    m.multifd[1].rebuild(firstPacket(m, 1), packetNum=number)
    m.multifd[1].rebuild("END.sync", packetNum=number)


def staleUnusedOffsets(m: SyntheticMigration) -> None:
    # Offset slots after normal_pages hold leftovers of a fuller packet.
    stream = m.multifd[0]
    first, second = stream.tags("PART1.packet")[:2]
    data, fuller = stream[second].data, stream[first].data
    used = RAM_HEADER_FIXED + 8 * len(stream[second].args["normalOffsets"])
    assert len(stream[first].args["normalOffsets"]) > len(stream[second].args["normalOffsets"])
    stream.replace(second, data[:used] + fuller[used : ramHeaderSize(PAGE_SIZE)] + data[ramHeaderSize(PAGE_SIZE) :])


def syncWithoutPagesAlloc(m: SyntheticMigration) -> None:
    for stream in m.multifd:
        for tag in stream.tags():
            if tag.endswith(".sync"):
                stream.rebuild(tag, pagesAlloc=0)


@pytest.mark.parametrize("oddity", [
    syncRidesOnData, emptyPacketAfterRidingSync, staleSyncPackets, repeatedPacketNum,
    staleUnusedOffsets, syncWithoutPagesAlloc,
])
def test_qemuPacketOdditiesAreAccepted(tmp_path: Path, oddity: Callable) -> None:
    m = build(convention="7.2", channels=2)
    oddity(m)
    receive(tmp_path, m).assertComplete(m)


def test_staleNextPacketSizeIsNotReadAsPayload(tmp_path: Path) -> None:
    # A page-less packet says next_packet_size = that of the data before it;
    # if the receiver read that many bytes, the next SYNC would be lost.
    m = build(convention="7.2", channels=1)
    stream = m.multifd[0]
    last = stream.tags("PART1.packet")[-1]
    assert stream[last].args["payload"]
    staleCopy(stream, last, flags=0)
    receive(tmp_path, m).assertComplete(m)


# Endings


@pytest.mark.parametrize("ending", ["sync+flush", "dangling sync", "no sync"])
def test_everyKindOfRamEndIsFine(tmp_path: Path, ending: str) -> None:
    # 8.1-9.0: SYNC and 0x200 in END; 9.1/9.2: SYNC on every channel that no
    # 0x200 collects; 10.0 (per the reference's table): neither.
    m = build(convention="10.0", channels=2)
    if ending != "sync+flush":
        m.main.remove("END.flush")
    if ending == "no sync":
        for stream in m.multifd:
            stream.remove("END.sync")
    # The source has closed every connection; channels parked at a dangling
    # SYNC see their end only once main's end has released them.
    receiver = Receiver(tmp_path, 2)
    receiver.pump(m.streams, mainLast=False)
    receiver.assertComplete(m)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_channelsMayCloseBeforeMainFinishes(tmp_path: Path, convention: str) -> None:
    m = build(convention=convention, channels=2)
    receiver = Receiver(tmp_path, 2)
    main, c0, c1 = receiver.links(3)
    c0.send(m.multifd[0].data(), close=True)
    c1.send(m.multifd[1].data(), close=True)
    main.send(m.main.until("tail"))
    receiver.run()
    assert (c0.closed, c1.closed, main.closed) == (True, True, False)
    assert receiver.results == []
    main.send(m.main["tail"].data, close=True)
    receiver.run()
    receiver.assertComplete(m)


def test_channelsMayCloseAfterMain(tmp_path: Path) -> None:
    m = build(convention="10.0", channels=2)
    receiver = Receiver(tmp_path, 2)
    main, c0, c1 = receiver.links(3)
    c0.send(m.multifd[0].data())
    c1.send(m.multifd[1].data())
    main.send(m.main.data(), close=True)
    receiver.run()
    assert main.closed and receiver.results == []
    c0.send(close=True)
    c1.send(close=True)
    receiver.run()
    receiver.assertComplete(m)


def test_channelsNotClosingAfterMainEndedTimeOut(tmp_path: Path) -> None:
    m = build(convention="10.0", channels=2)
    receiver = Receiver(tmp_path, 2)
    main, c0, c1 = receiver.links(3)
    c0.send(m.multifd[0].data(), close=True)
    c1.send(m.multifd[1].data())
    main.send(m.main.data(), close=True)
    receiver.run()
    receiver.clock.advance(CHANNEL_TIMEOUT - 0.001)
    assert receiver.results == []
    receiver.clock.advance(0.001)
    receiver.assertFailed("main stream ended but multifd channels [1] did not close within 60 s")


@pytest.mark.parametrize("where", ["header", "offsets", "payload"])
def test_channelEndingMidPacketFails(tmp_path: Path, where: str) -> None:
    m = build(convention="10.0", channels=2)
    tag = firstPacket(m, 1)
    cut = m.multifd[1].offset(tag) + {"header": 100, "offsets": 400, "payload": 5000}[where]
    receiver = Receiver(tmp_path, 2)
    receiver.pump([m.streams[0], m.streams[1], m.streams[2][:cut]])
    receiver.assertFailed(channelLabel(1, 40002), "connection ended in the middle of a packet")


def test_channelClosingBeforeItsSyncFails(tmp_path: Path) -> None:
    m = build(convention="10.0", channels=2)
    receiver = Receiver(tmp_path, 2)
    receiver.pump([m.streams[0], m.streams[1], m.multifd[1].until("PART1.sync")])
    receiver.assertFailed("multifd channel 1 closed before reaching the sync point")


@pytest.mark.parametrize("tag", ["START.blocks", "PART1", "PART1.zero:pc.ram@0x0", "PART1.eos", "END"])
def test_mainEndingMidStreamFails(tmp_path: Path, tag: str) -> None:
    m = build(convention="7.2", channels=2)
    cut = m.main.offset(tag) + 3
    receiver = Receiver(tmp_path, 2)
    receiver.pump([m.streams[0][:cut], *m.streams[1:]], mainLast=False)
    receiver.assertFailed(mainLabel(), f"connection ended after {cut} bytes", "in the middle of the stream")


def tailCuts() -> dict[str, Callable[[SyntheticMigration], int]]:
    def inside(tag: str, at: int) -> Callable[[SyntheticMigration], int]:
        return lambda m: m.main.offset(tag) + at
    return {
        "in a section header": inside("dev:cpu_common", 4),
        "in a body": inside("dev:cpu_common", 20),
        "in a footer": inside("tail", -2),
        "between sections": inside("dev:apic", 0),
        "before EOF": inside("tail", 0),
        "in VMDESC length": inside("tail", 3),
        "in VMDESC": inside("tail", 20),
        "last byte missing": lambda m: len(m.streams[0]) - 1,
    }


@pytest.mark.parametrize("cut", list(tailCuts().values()), ids=list(tailCuts()))
def test_mainTailCutShortIsNotComplete(tmp_path: Path, cut: Callable) -> None:
    m = build(convention="10.0", channels=2)
    main = m.streams[0][: cut(m)]
    receiver = Receiver(tmp_path, 2)
    receiver.pump([main, *m.streams[1:]])
    receiver.assertFailed(mainLabel())


def test_noPrefixOfATailSplitsCleanly() -> None:
    # Exhaustively: a tail cut anywhere is an error, except just after the
    # EOF byte, which is a whole tail without VMDESC.
    m = build(channels=0)
    tail = m.main.data()[m.main.offset("dev:timer") :]
    withoutVMDesc = m.main.offset("tail") - m.main.offset("dev:timer") + 1
    for size in range(len(tail)):
        if size == withoutVMDesc:
            assert splitTail(tail[:size]).vmdescription is None
            continue
        with pytest.raises(ProtocolError):
            splitTail(tail[:size])
    assert len(splitTail(tail).devices) == 3


SMALL_MEMORY = {"pc.ram": b"".join(samplePage(i) if i % 2 else bytes(PAGE_SIZE) for i in range(6)),
                "pc.bios": samplePage(99)}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), convention=st.sampled_from(CONVENTIONS), which=st.integers(0, 2))
def test_anyConnectionCutShortIsNeverComplete(tmp_path: Path, data, convention: str, which: int) -> None:
    m = build(SMALL_MEMORY, convention=convention, channels=2)
    streams = list(m.streams)
    cut = data.draw(st.integers(0, len(streams[which]) - 1), label="cut")
    if which == 0 and cut == m.main.offset("tail") + 1:
        return  # EOF byte without VMDESC: a whole stream
    streams[which] = streams[which][:cut]
    receiver = Receiver(Path(tempfile.mkdtemp(dir=tmp_path)), 2)
    receiver.pump(streams, mainLast=False)
    receiver.clock.advance(CHANNEL_TIMEOUT)
    assert len(receiver.results) == 1
    assert receiver.results[0].complete is False
    assert receiver.manifest()["complete"] is False


# RAM records on the main channel


def test_continueAsFirstRecordOfAPart(tmp_path: Path) -> None:
    # PART1 ends with a pc.bios record; PART2's first record continues it.
    m = build(channels=0, rounds=[{"pc.bios": {PAGE_SIZE: samplePage(9)}}])
    first = m.main["PART2.page:pc.bios@0x1000"]
    assert m.main.index("PART2.page:pc.bios@0x1000") == m.main.index("PART2") + 1
    assert first.args["flags"] & RAM_CONTINUE and first.args["block"] is None
    receive(tmp_path, m).assertComplete(m)


@pytest.mark.parametrize("length", [1, 251, 252, 255])
@pytest.mark.parametrize("channels", [0, 2])
def test_blockNamesOfAnyLength(tmp_path: Path, length: int, channels: int) -> None:
    memory = {"a" * length: samplePage(1) + bytes(PAGE_SIZE), "pc.ram": samplePage(2) * 2}
    m = build(memory, convention="7.2", channels=channels)
    receive(tmp_path, m).assertComplete(m)


def page(m: SyntheticMigration, section: str = "PART1", kind: str = "zero", n: int = 0) -> str:
    return m.main.tags(f"{section}.{kind}:")[n]


MAIN_FAULTS: dict[str, tuple[Callable[[SyntheticMigration], None], tuple[str, ...]]] = {
    "CONTINUE without a block": (
        lambda m: m.main.rebuild(page(m), flags=RAM_ZERO | RAM_CONTINUE, block=None),
        ("RAM record", "CONTINUE with no previous block"),
    ),
    "offset == used_length": (
        lambda m: m.main.rebuild(page(m, n=1), offset=len(m.memory["pc.ram"])),
        ("RAM record", "offset 0xa0000 is outside 'pc.ram' (0xa0000 bytes)"),
    ),
    "offset far beyond": (
        lambda m: m.main.rebuild(page(m, n=2), offset=1 << 40),
        ("RAM record", "is outside 'pc.ram'"),
    ),
    "ZERO fill 1": (
        lambda m: m.main.rebuild(page(m, n=1), payload=b"\x01"),
        ("RAM record", "zero page with fill byte 0x01"),
    ),
    "unknown block": (
        lambda m: m.main.rebuild(page(m), block="pc.ram2"),
        ("RAM record", "unknown RAMBlock 'pc.ram2'"),
    ),
    "XBZRLE": (
        lambda m: m.main.insertBefore(page(m, n=1), "x", buildRamRecord(
            RAM_XBZRLE | RAM_CONTINUE, PAGE_SIZE, payload=b"\x01\x00\x02\x01\x00")),
        ("RAM record", "XBZRLE", "not supported"),
    ),
    "COMPRESS_PAGE": (
        lambda m: m.main.insertBefore(page(m, n=1), "x", buildRamRecord(
            RAM_COMPRESS_PAGE | RAM_CONTINUE, PAGE_SIZE, payload=b"\x00\x00\x00\x02\x78\x01")),
        ("RAM record", "compressed page (capability compress) is not supported"),
    ),
    "FULL": (
        lambda m: m.main.insertBefore("PART1.eos", "x", buildRamRecord(RAM_FULL)),
        ("RAM record", "obsolete RAM_SAVE_FLAG_FULL"),
    ),
    "ZERO|PAGE": (
        lambda m: m.main.rebuild(page(m), flags=RAM_ZERO | RAM_PAGE),
        ("RAM record", "invalid record flags 0x00a"),
    ),
    "flag 0x400": (
        lambda m: m.main.insertBefore("PART1.eos", "x", buildRamRecord(0x400)),
        ("RAM record", "invalid record flags 0x400"),
    ),
    "block list in PART": (
        lambda m: m.main.insertBefore("PART1.eos", "x", buildBlockList([RamBlock("pc.ram", 4096)])),
        ("RAM record", "block list in a PART section"),
    ),
    "unknown command 12": (
        lambda m: m.main.insertAfter("config", "x", buildCommand(12)),
        ("command", "unknown command 12"),
    ),
    "unknown command 0": (
        lambda m: m.main.insertAfter("config", "x", buildCommand(0)),
        ("command", "unknown command 0"),
    ),
    "OPEN_RETURN_PATH": (
        lambda m: m.main.insertAfter("config", "x", buildCommand(1)),
        ("command", "command OPEN_RETURN_PATH (1) is not supported"),
    ),
    "PING": (
        lambda m: m.main.insertAfter("config", "x", buildCommand(2, b"\x00\x00\x00\x01")),
        ("command", "command PING (2) is not supported"),
    ),
    "SWITCHOVER_START with data": (
        lambda m: m.main.insertBefore("END", "x", buildCommand(11, b"\x00")),
        ("command length", "SWITCHOVER_START with 1 bytes, expected 0"),
    ),
    "footer for another section": (
        lambda m: m.main.rebuild("PART1.footer", sectionID=3),
        ("section footer", "footer for section 3, expected 2")),
    "PART of an unopened section": (
        lambda m: m.main.rebuild("PART1", sectionID=7),
        ("section header", "PART section for id 7, which no START section opened (RAM is 2)")),
    "unknown section type": (
        lambda m: m.main.insertAfter("START.footer", "x", b"\x09"),
        ("section type", "unknown section type 0x09")),
    "SUBSECTION at top level": (
        lambda m: m.main.insertAfter("START.footer", "x", b"\x05"),
        ("section type", "unexpected SUBSECTION (0x05)")),
    "stream version 2": (
        lambda m: m.main.replace("header", buildHeader(2)),
        ("header version", "stream version 2 is obsolete"),
    ),
    "stream version 4": (
        lambda m: m.main.replace("header", buildHeader(4)),
        ("header version", "expected 3, got 4"),
    ),
    "mapped-ram": (
        lambda m: m.main.rebuild("config", capabilities=("mapped-ram",)),
        ("configuration", "mapped-ram", "not supported"),
    ),
}


@pytest.mark.parametrize("fault", list(MAIN_FAULTS), ids=list(MAIN_FAULTS))
@pytest.mark.parametrize("channels", [0, 2])
def test_badMainStreamFails(tmp_path: Path, fault: str, channels: int) -> None:
    mutate, fragments = MAIN_FAULTS[fault]
    m = build(convention="7.2", channels=channels)
    mutate(m)
    receive(tmp_path, m).assertFailed(mainLabel(), *fragments)


@pytest.mark.parametrize("sections", [["START"], ["PART1"], ["START", "PART1", "END"]])
def test_multifdFlushWithoutMultifdIsAccepted(tmp_path: Path, sections: list[str]) -> None:
    # QEMU 8.1.x sent 0x200 even without multifd.
    m = build(convention="7.2", channels=0)
    for section in sections:
        m.main.insertBefore(f"{section}.eos", f"{section}.flush", buildRamRecord(RAM_MULTIFD_FLUSH))
    manifest = receive(tmp_path, m).assertComplete(m)
    assert manifest["flush_mode"] is None


@pytest.mark.parametrize("channels", [0, 2])
def test_switchoverStartIsAccepted(tmp_path: Path, channels: int) -> None:
    m = build(convention="10.0", channels=channels)
    assert m.main.index("switchover") == m.main.index("END") - 1
    manifest = receive(tmp_path, m).assertComplete(m)
    assert manifest["stream"]["commands"] == ["SWITCHOVER_START"]


# The START block list


def blockListAnnouncing(blocks: list[RamBlock], total: int) -> bytes:
    header = buildRamRecord(RAM_MEM_SIZE, total)
    return header + buildBlockList(blocks)[len(header) :]


def test_blockListEndsByLengthSumAlone(tmp_path: Path) -> None:
    # No count: the list ends when the lengths add up, and whatever follows
    # is the next record (here EOS, whose first byte would be a name length).
    m = build(convention="7.2", channels=0)
    manifest = receive(tmp_path, m).assertComplete(m)
    assert [(b["name"], b["length"]) for b in manifest["ram_blocks"]] == [
        (name, len(content)) for name, content in m.memory.items()]


@pytest.mark.parametrize("delta, fragments", [
    (-PAGE_SIZE, ("block lengths add up to 0xa4000, the list announced 0xa3000",)),
    (+PAGE_SIZE, ("RAMBlock with an empty name",)),
])
def test_blockListNotAddingUpFails(tmp_path: Path, delta: int, fragments: tuple[str, ...]) -> None:
    m = build(convention="10.0", channels=2)
    blocks = m.main["START.blocks"].args["blocks"]
    m.main.replace("START.blocks", blockListAnnouncing(blocks, sum(b.length for b in blocks) + delta))
    receive(tmp_path, m).assertFailed(mainLabel(), "block list", *fragments)


def test_blockListedTwiceFails(tmp_path: Path) -> None:
    m = build(convention="10.0", channels=2)
    blocks = m.main["START.blocks"].args["blocks"]
    m.main.rebuild("START.blocks", blocks=(*blocks, blocks[1]))
    receive(tmp_path, m).assertFailed(mainLabel(), "block list", "RAMBlock '/rom@etc/acpi/tables' listed twice")


# Multifd packets


PACKET_FAULTS: dict[str, tuple[Callable[[SyntheticMigration, str], Any], tuple[str, ...]]] = {
    "unknown flag 0x80": (
        lambda m, tag: m.multifd[0].rebuild(tag, flags=0x80), ("packet flags", "unknown bits 0x80 in 0x80")),
    "unknown flag 0x100 on SYNC": (
        lambda m, tag: m.multifd[0].rebuild("START.sync", flags=FLAG_SYNC | 0x100),
        ("packet flags", "unknown bits 0x100 in 0x101")),
    "pages_alloc 129": (
        lambda m, tag: m.multifd[0].rebuild(tag, pagesAlloc=129),
        ("pages_alloc", "129 is more than the 128 pages a packet holds")),
    "normal_pages > pages_alloc": (
        lambda m, tag: m.multifd[0].rebuild(tag, pagesAlloc=84), ("normal_pages", "85 normal pages in a packet of 84")),
    "too many zero_pages": (
        lambda m, tag: m.multifd[0].rebuild(tag, pagesAlloc=127),
        ("zero_pages", "43 zero pages after 85 normal ones in a packet of 127")),
    "unknown RAMBlock": (
        lambda m, tag: m.multifd[0].rebuild(tag, block="pc.ram2"), ("ramblock", "unknown RAMBlock 'pc.ram2'")),
    "no RAMBlock name": (
        lambda m, tag: m.multifd[0].rebuild(tag, block=""), ("ramblock", "packet has pages but no RAMBlock name")),
    "normal offset == used_length": (
        lambda m, tag: m.multifd[0].rebuild(tag, normalOffsets=(
            *m.multifd[0][tag].args["normalOffsets"][:-1], 0xa0000)),
        ("offset", "offset 0xa0000 is not a page of 'pc.ram' (0xa0000 bytes)")),
    "zero offset far beyond": (
        lambda m, tag: m.multifd[0].rebuild(tag, zeroOffsets=(1 << 40,)),
        ("offset", "offset 0x10000000000 is not a page of 'pc.ram'")),
    "unaligned offset": (
        lambda m, tag: m.multifd[0].rebuild(tag, normalOffsets=(
            0x1010, *m.multifd[0][tag].args["normalOffsets"][1:])),
        ("offset", "offset 0x1010 is not a page of 'pc.ram'")),
    "compression zlib, configured none": (
        lambda m, tag: m.multifd[0].rebuild(tag, flags=0x02), ("packet flags", "compression is zlib, expected none")),
    "compression qpl": (
        lambda m, tag: m.multifd[0].rebuild(tag, flags=0x08), ("packet flags", "compression is qpl, expected none")),
    "packet magic": (
        lambda m, tag: m.multifd[0].replace(tag, buildHeader() + m.multifd[0][tag].data[8:]),
        ("packet magic", "expected 0x11223344, got 0x5145564d")),
    "packet version": (
        lambda m, tag: m.multifd[0].replace(tag, buildInitPacket(MultiFDInitPacket(bytes(16), 0, version=2))[:8]
                                            + m.multifd[0][tag].data[8:]),
        ("packet version", "expected 1, got 2")),
    "empty device state": (
        lambda m, tag: m.multifd[0].insertBefore(tag, "x", buildDeviceStatePacket("vfio", 0, b"")),
        ("next_packet_size", "device-state packet without data")),
    "device state with SYNC": (
        lambda m, tag: m.multifd[0].insertBefore(tag, "x", buildDeviceStatePacket(
            "vfio", 0, b"state", flags=FLAG_DEVICE_STATE | FLAG_SYNC)),
        ("packet flags", "a device-state packet cannot carry SYNC")),
}


@pytest.mark.parametrize("fault", list(PACKET_FAULTS), ids=list(PACKET_FAULTS))
def test_badMultifdPacketFails(tmp_path: Path, fault: str) -> None:
    mutate, fragments = PACKET_FAULTS[fault]
    m = build(convention="10.0", channels=2)
    tag = firstPacket(m, 0)
    assert m.multifd[0][tag].args["block"] == "pc.ram"
    mutate(m, tag)
    receive(tmp_path, m, compression="none").assertFailed(channelLabel(0, 40001), *fragments)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressionOtherThanConfiguredFails(tmp_path: Path, compression: str) -> None:
    m = build(convention="10.0", channels=2)
    receiver = receive(tmp_path, m, compression=compression)
    receiver.assertFailed("multifd channel", "packet flags", f"compression is none, expected {compression}")


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("configured", ["auto", "same"])
def test_compressedStreamsSpanPackets(tmp_path: Path, compression: str, convention: str, configured: str) -> None:
    # One compression stream per channel: only a channel's first packet
    # starts one, the others continue it.
    m = build(convention=convention, channels=2, compression=compression,
              rounds=[{"pc.ram": {PAGE_SIZE * n: samplePage(n + 50) for n in range(0, 160, 7)}}])
    assert len([tag for tag in m.multifd[0].tags() if ".packet" in tag]) >= 2
    options = {"compression": compression if configured == "same" else "auto"}
    manifest = receive(tmp_path, m, **options).assertComplete(m)
    assert manifest["compression"] == compression


def test_compressionIsOnlyCheckedOnPacketsWithPages(tmp_path: Path) -> None:
    # 10.0 SYNC packets carry no compression value even with zlib/zstd.
    m = build(convention="10.0", channels=2, memory={"pc.ram": bytes(PAGE_SIZE)})
    assert m.packetTags("PART1") == ["PART1.packet2"]  # zero pages only
    m.multifd[0].rebuild("PART1.packet2", flags=0x02)
    receive(tmp_path, m, compression="zlib").assertComplete(m)


def test_deviceStatePacketIsKept(tmp_path: Path) -> None:
    m = build(convention="10.0", channels=2)
    m.multifd[1].insertBefore("PART1.sync", "vfio",
                              buildDeviceStatePacket("0000:00:02.0/vfio", 3, b"device state bytes"))
    receiver = receive(tmp_path, m)
    manifest = receiver.assertComplete(m)
    [packet] = manifest["multifd_device_state"]
    assert (packet["idstr"], packet["instance_id"], packet["flags"]) == ("0000:00:02.0/vfio", 3, 0x40)
    assert (tmp_path / "capture-1" / packet["file"]).read_bytes() == b"device state bytes"


def test_deviceStatePacketWithLongIdstrIsKept(tmp_path: Path) -> None:
    m = build(convention="10.0", channels=2)
    m.multifd[1].insertBefore("PART1.sync", "vfio", buildDeviceStatePacket("v" * 250, 0, b"state"))
    manifest = receive(tmp_path, m).assertComplete(m)
    assert [p["idstr"] for p in manifest["multifd_device_state"]] == ["v" * 250]


# The tail: device sections, EOF, VMDESC


def test_tailWithoutVMDescIsComplete(tmp_path: Path) -> None:
    m = build(convention="7.2", channels=2)
    m.main.rebuild("tail", vmdescription=None)
    receiver = receive(tmp_path, m)
    manifest = receiver.assertComplete(m)
    assert manifest["vmdesc"] is None
    assert [s["idstr"] for s in manifest["device_state"]["sections"]] == ["timer", "cpu_common", "apic"]
    assert (tmp_path / "capture-1" / "device-state.bin").read_bytes() == m.main.data()[
        m.main.offset("dev:timer") : m.main.offset("tail")]


def test_tailWithVMDescIsComplete(tmp_path: Path) -> None:
    m = build(convention="10.0", channels=2)
    manifest = receive(tmp_path, m).assertComplete(m)
    assert manifest["vmdesc"] == "vmdesc.json"
    assert json.loads((tmp_path / "capture-1" / "vmdesc.json").read_bytes())["page_size"] == 4096
    assert [(s["idstr"], s["section_id"]) for s in manifest["device_state"]["sections"]] == [
        ("timer", 0), ("cpu_common", 4), ("apic", 5)]


@pytest.mark.parametrize("vmdesc, fragments", [
    (b'{"page_size": 4096, "devices": [{"name": "timer"', ("VMDESC",)),
    (b'{"page_size": 4096}', ("VMDESC", "not a device description")),
    (b"\xff garbage", ("VMDESC",)),
    (buildVMDesc([Device("timer", 0, 2, b"", 0), Device("hpet", 0, 2, b"", 4), Device("apic", 0, 3, b"", 5)]),
     ("device state",)),
    (buildVMDesc([Device("timer", 0, 2, b"", 0), Device("cpu_common", 0, 1, b"", 4)]),
     ("device state",)),
])
def test_badVMDescIsNotComplete(tmp_path: Path, vmdesc: bytes, fragments: tuple[str, ...]) -> None:
    m = build(convention="10.0", channels=2)
    m.main.rebuild("tail", vmdescription=vmdesc)
    receive(tmp_path, m).assertFailed(mainLabel(), *fragments)


def test_vmdescListingAnotherDeviceNamesTheMismatch(tmp_path: Path) -> None:
    m = build(convention="10.0", channels=2)
    other = [Device("timer", 0, 2, b"", 0), Device("hpet", 0, 2, b"", 4), Device("apic", 0, 3, b"", 5)]
    m.main.rebuild("tail", vmdescription=buildVMDesc(other))
    receive(tmp_path, m).assertFailed(mainLabel(), "device state", "'cpu_common'", "'hpet'")


# Configuration


def ignoreSharedBlockList(blocks: tuple[RamBlock, ...]) -> bytes:
    # With x-ignore-shared every entry also carries the block's guest address
    # (buildBlockList has no option for it).
    header = buildRamRecord(RAM_MEM_SIZE, sum(b.length for b in blocks))
    entries = b"".join(
        buildBlockList([block])[len(header) :] + struct.pack(">Q", 0x100000000 * n) for n, block in enumerate(blocks))
    return header + entries


UUID = bytes(range(0xA0, 0xB0))


@pytest.mark.parametrize("capabilities, configUUID", [
    ((), None), ((), UUID), (("x-ignore-shared",), None), (("x-ignore-shared",), UUID)])
def test_configurationWithSubsections(tmp_path: Path, capabilities: tuple[str, ...], configUUID: bytes | None) -> None:
    m = build(convention="10.0", channels=2, machine="pc-q35-10.0", capabilities=capabilities,
              configUUID=configUUID, uuid=configUUID or bytes(16))
    if capabilities:
        m.main.replace("START.blocks", ignoreSharedBlockList(m.main["START.blocks"].args["blocks"]))
    receiver = receive(tmp_path, m)
    manifest = receiver.assertComplete(m)
    assert manifest["machine"] == "pc-q35-10.0"
    assert manifest["stream"]["configuration"] == m.main["config"].data.hex()
    assert manifest["uuid"] == str(uuid.UUID(bytes=configUUID or bytes(16)))


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("channels", [0, 2])
@pytest.mark.parametrize("announced", [True, False], ids=["target-page-bits", "factory-option"])
def test_pageSizeOtherThan4096(tmp_path: Path, convention: str, channels: int, announced: bool) -> None:
    # 8 KiB pages: 64 offsets per packet header, flags in the low 13 bits.
    m = build(convention=convention, channels=channels, pageSize=8192)
    if not announced:
        m.main.rebuild("config", targetPageBits=None)
    receiver = receive(tmp_path, m, **({} if announced else {"pageSize": 8192}))
    manifest = receiver.assertComplete(m)
    assert manifest["page_size"] == 8192


def test_initPacketTooSlowSaysWhy(tmp_path: Path) -> None:
    """
    A multifd channel that sends part of its initial packet and then
    nothing is dropped at the sniff timeout, and the migration's error says
    so (not only that the connection was aborted).
    """
    from twisted.internet.task import Clock

    from twisted_multifd import MigrationReceiverFactory
    from twisted_multifd.testing import MigrationPump, RecordingSink

    m = build(channels=2)
    clock = Clock()
    results: list = []
    factory = MigrationReceiverFactory(lambda info: RecordingSink(), channels=2, clock=clock,
                                       onMigrationEnded=results.append, sniffTimeout=5.0)
    pump = MigrationPump(factory, clock=clock, host="192.0.2.7")
    pump.connect(m.streams[1], close=False)
    pump.connect(m.streams[2][:30], close=False)
    while pump.pump():
        pass
    clock.advance(5.0)
    while pump.pump():
        pass
    [result] = results
    assert "multifd channel from 192.0.2.7" in result.error
    assert "before its 64-byte initial packet" in result.error
    assert "it sent 30 of the 64 bytes of its initial packet in 5 s (the sniff timeout)" in result.error

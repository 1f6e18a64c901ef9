"""
Tests of L{twisted_multifd.testing} itself: the synthetic source in each
QEMU convention is received complete by L{MigrationReceiverFactory} in every
connection order and odd chunkings, and the recorded RAM is what was asked
for; the pump behaves like sockets; the recording sink records.

The L{SynchronousTestCase} classes at the end also run under trial, by path
(tests/ is not a package)::

    python -m twisted.trial tests/test_testing.py

and L{test_trialRunsTheTrialTestsAndTheDocumentedExample} checks that it
does, together with the complete example in docs/testing.md.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import textwrap
import types
import unittest
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import twisted_multifd.testing
from twisted_multifd import MigrationReceiverFactory, MigrationResult
from twisted_multifd._incremental import IncrementalParser
from twisted_multifd._packet import RamPacket, channelPackets
from twisted_multifd.testing import (
    CONVENTIONS,
    MigrationPump,
    RecordingSink,
    RecordingSinkFactory,
    SyntheticMigration,
    synthesizeMigration,
    syntheticMemory,
)

ROOT = Path(__file__).parent.parent
PAGE = 4096


def receive(source: Any, channels: int, **pumpOptions: Any) -> tuple[RecordingSink, MigrationPump]:
    """
    Play C{source} into a receiver on a Clock (which the pump advances once
    nothing else can happen), recording into a L{RecordingSink}.
    """
    sink = RecordingSink()
    clock = Clock()
    factory = MigrationReceiverFactory(lambda info: sink, channels=channels, clock=clock)
    pump = MigrationPump(factory, source, clock=clock, **pumpOptions)
    pump.flush()
    return sink, pump


def assertReceivedExactly(sink: RecordingSink, migration: SyntheticMigration) -> MigrationResult:
    result = sink.result
    assert result is not None, "the migration did not end"
    assert (result.complete, result.error) == (True, None)
    assert sink.memory() == migration.memory
    assert sink.blocks == migration.blocks
    for block in migration.blocks:
        assert sink.unsentPages(block.name) == []
    assert sink.tail is not None
    assert sink.tail.deviceState == migration.deviceState
    assert sink.tail.vmdescription == migration.vmdescription
    assert [d.idstr for d in sink.tail.devices] == [d.name for d in migration.devices]
    return result


def multifdPackets(migration: SyntheticMigration, channel: int) -> list[RamPacket]:
    """
    A channel's packets after its initial packet, decoded by the library.
    """
    parser = IncrementalParser(channelPackets(migration.pageSize))
    parser.feed(migration.multifd[channel].data[64:])
    parser.end()
    packets = []
    while (event := parser.nextEvent()) is not None:
        packets.append(event)
    return packets


CHUNKINGS = {
    "odd": [[997, 1, 4099], 61, [13, 8191]],
    "tiny-main": [[1, 2, 3], 65536, 65536],
}
COMPRESSIONS = ["none", "zlib", "zstd"]


# The synthetic source, received


@pytest.mark.parametrize("chunking", list(CHUNKINGS), ids=list(CHUNKINGS))
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_twoChannelsAreReceivedCompleteInEveryOrder(convention: str, compression: str, chunking: str) -> None:
    migration = synthesizeMigration(seed=11, convention=convention, channels=2, compression=compression)
    for order in itertools.permutations(range(3)):
        sink, pump = receive(migration, 2, order=order, chunkSizes=CHUNKINGS[chunking])
        result = assertReceivedExactly(sink, migration)
        assert result.compression == compression, order
        assert result.flushMode == {"7.2": "per-section", "10.0": "per-round"}[convention]
        assert result.zeroPages == {"7.2": "main", "10.0": "multifd"}[convention]
        assert result.stream["commands"] == (["SWITCHOVER_START"] if convention == "10.0" else [])
        assert pump.closed


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_requestedMemoryIsReceivedInEveryOrder(convention: str) -> None:
    memory = {
        "pc.ram": b"".join(bytes([n % 251 + 1]) * PAGE if n % 5 else bytes(PAGE) for n in range(200)),
        "/rom@etc/acpi/rsdp": b"RSD PTR " + bytes(PAGE - 8),
        "pc.bios": bytes(2 * PAGE),
    }
    migration = synthesizeMigration(memory, convention=convention, channels=2, dirtyRounds=0)
    assert migration.memory == memory
    for order in itertools.permutations(range(3)):
        sink, _ = receive(migration, 2, order=order, chunkSizes=[[4093, 2]] * 3)
        assertReceivedExactly(sink, migration)
        assert sink.memory() == memory


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("chunkSizes", [65536, [[4095, 7]]], ids=["64KiB", "odd"])
def test_plainMigrationIsReceivedComplete(convention: str, chunkSizes: Any) -> None:
    migration = synthesizeMigration(seed=12, convention=convention, channels=0)
    assert migration.streams == (migration.main.data,)
    result = assertReceivedExactly(receive(migration, 0, chunkSizes=chunkSizes)[0], migration)
    assert (result.flushMode, result.zeroPages) == (None, "main")


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_otherChannelCountsAreReceivedComplete(convention: str, channels: int) -> None:
    migration = synthesizeMigration(seed=channels, convention=convention, channels=channels, compression="zlib")
    order = [*range(channels, 0, -1), 0]  # main last
    assertReceivedExactly(receive(migration, channels, order=order, chunkSizes=3001)[0], migration)


def test_sevenTwoConventionOnTheWire() -> None:
    migration = synthesizeMigration(seed=1, convention="7.2", channels=2)
    main = migration.main
    # Per-section: a SYNC on every channel for every RAM EOS, no 0x200.
    sections = ["START", "PART1", "PART2", "PART3", "END"]
    assert [tag.split(".")[0] for tag in main.tags() if tag.endswith(".eos")] == sections
    assert not [tag for tag in main.tags() if tag.endswith(".flush") or tag == "switchover"]
    assert main.tags("PART1.zero:") and not main.tags("PART1.page:")
    for channel in range(2):
        packets = multifdPackets(migration, channel)
        assert sum(packet.sync for packet in packets) == len(sections)
        assert packets[0].sync and packets[-1].sync
        assert {packet.pagesAlloc for packet in packets} == {128}
        assert not any(packet.zeroOffsets for packet in packets)
        assert all(any(packet.data[i : i + PAGE]) for packet in packets for i in range(0, len(packet.data), PAGE))
    assert migration.machine == "pc-i440fx-7.2"


def test_tenZeroConventionOnTheWire() -> None:
    migration = synthesizeMigration(seed=1, convention="10.0", channels=2)
    main = migration.main
    # Per-round: SYNC on every channel, then 0x200, at START, each round and END.
    flushes = [tag.split(".")[0] for tag in main.tags() if tag.endswith(".flush")]
    assert flushes == ["START", "PART1", "PART2", "PART3", "END"]
    assert main.tags().index("switchover") == main.tags().index("END") - 1
    assert not main.tags("PART1.zero:") and not main.tags("PART1.page:")
    for channel in range(2):
        packets = multifdPackets(migration, channel)
        syncs = [packet for packet in packets if packet.sync]
        assert len(syncs) == len(flushes)
        assert all(packet.pagesAlloc == 0 and packet.block is None for packet in syncs)
        assert all(packet.pagesAlloc == 128 for packet in packets if not packet.sync)
        assert any(packet.zeroOffsets for packet in packets)
    assert migration.machine == "pc-i440fx-10.0"


def test_tenZeroWithLegacyZeroPageDetection() -> None:
    migration = synthesizeMigration(seed=3, convention="10.0", channels=2, zeroPagesOnMain=True)
    assert migration.main.tags("PART1.zero:")
    result = assertReceivedExactly(receive(migration, 2)[0], migration)
    assert (result.flushMode, result.zeroPages) == ("per-round", "main")


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_syncRidingOnDataPackets(compression: str) -> None:
    migration = synthesizeMigration(seed=5, convention="7.2", channels=2, syncOnData=True, compression=compression)
    for channel in range(2):
        packets = multifdPackets(migration, channel)
        riding = [n for n, packet in enumerate(packets) if packet.sync and packet.normalOffsets]
        assert riding
        for n in riding:  # then a flag-less empty packet with the same number
            empty = packets[n + 1]
            assert (empty.flags, empty.packetNum, empty.normalOffsets) == (0, packets[n].packetNum, ())
    for order in itertools.permutations(range(3)):
        assertReceivedExactly(receive(migration, 2, order=order, chunkSizes=[[777, 5]] * 3)[0], migration)


def test_laterVersionOfEveryResentPageWins() -> None:
    memory = syntheticMemory(21)
    migration = synthesizeMigration(memory, seed=21, convention="7.2", channels=2, dirtyRounds=3)
    assert [tag for tag in migration.main.tags() if re.fullmatch(r"PART\d", tag)] == ["PART1", "PART2", "PART3", "PART4"]
    changes = set()
    for pages in migration.dirtyRounds:
        for name, blockPages in pages.items():
            for offset, page in blockPages.items():
                before = memory[name][offset : offset + PAGE]
                changes.add((any(before), any(page)))
    assert {(True, False), (False, True), (True, True)} <= changes
    assert migration.memory != memory
    assertReceivedExactly(receive(migration, 2, order=[1, 0, 2])[0], migration)


def test_explicitDirtyRounds() -> None:
    memory = {"pc.ram": bytes(range(256)) * 16 * 4}
    rounds = [{"pc.ram": {PAGE: bytes(PAGE)}}, {"pc.ram": {PAGE: b"\x07" * PAGE, 3 * PAGE: b"\x09" * PAGE}}]
    migration = synthesizeMigration(memory, convention="10.0", channels=1, dirtyRounds=rounds)
    assert migration.memory["pc.ram"] == bytes(range(256)) * 16 + b"\x07" * PAGE + bytes(range(256)) * 16 + b"\x09" * PAGE
    assertReceivedExactly(receive(migration, 1)[0], migration)


def test_otherPageSize() -> None:
    migration = synthesizeMigration(seed=8, convention="10.0", channels=2, pageSize=8192)
    sink = receive(migration, 2)[0]  # the receiver learns it from target-page-bits
    assert sink.pageSize == 8192
    assertReceivedExactly(sink, migration)


def test_withoutVMDescription() -> None:
    migration = synthesizeMigration(seed=9, convention="7.2", channels=2, vmdescription=False)
    assert migration.vmdescription is None
    assertReceivedExactly(receive(migration, 2)[0], migration)


def test_sameArgumentsSameBytes() -> None:
    options: dict[str, Any] = {"seed": 31, "convention": "10.0", "channels": 3, "compression": "zstd"}
    assert synthesizeMigration(**options).streams == synthesizeMigration(**options).streams
    assert synthesizeMigration(**{**options, "seed": 32}).memory != synthesizeMigration(**options).memory
    assert syntheticMemory(1) == syntheticMemory(1) != syntheticMemory(2)


def test_syntheticMemoryLayout() -> None:
    memory = syntheticMemory(4, blockPages={"a": 30, "b": 1}, pageSize=1024)
    assert [(name, len(content)) for name, content in memory.items()] == [("a", 30 * 1024), ("b", 1024)]
    pages = [memory["a"][i : i + 1024] for i in range(0, len(memory["a"]), 1024)]
    data = [page for page in pages if any(page)]
    assert 0 < len(data) < len(pages)
    assert len(set(data)) == len(data)


def test_compressedPayloadsAreSmaller() -> None:
    plain = synthesizeMigration(seed=2, convention="10.0", channels=2)
    for compression in ("zlib", "zstd"):
        compressed = synthesizeMigration(seed=2, convention="10.0", channels=2, compression=compression)
        assert sum(map(len, compressed.streams[1:])) < sum(map(len, plain.streams[1:])) / 4


def test_taggedPiecesCutStreams() -> None:
    migration = synthesizeMigration(seed=1, channels=2)
    main = migration.main
    assert main.data == b"".join(piece.data for piece in main.pieces)
    assert main.until("tail") + main.piece("tail").data == main.data
    assert main.through("END") + main.after("END") == main.data
    assert main.through("header") == b"QEVM\x00\x00\x00\x03"
    assert main.offset("header") == 0
    assert migration.multifd[1].channelID == 1 and migration.main.isMain
    with pytest.raises(KeyError, match="no piece 'nothing'"):
        main.piece("nothing")


@pytest.mark.parametrize("options, message", [
    ({"convention": "9.0"}, "convention must be one of 7.2, 10.0"),
    ({"channels": 0, "compression": "zlib"}, "needs channels > 0"),
    ({"compression": "qpl"}, "compression must be one of"),
    ({"convention": "10.0", "syncOnData": True}, "syncOnData"),
    ({"memory": {"pc.ram": b"x" * 100}}, "not a positive multiple"),
    ({"memory": {}}, "at least one RAM block"),
    ({"dirtyRounds": [{"pc.rom": {0: bytes(PAGE)}}]}, "names block 'pc.rom'"),
    ({"dirtyRounds": [{"pc.ram": {1: bytes(PAGE)}}]}, "not one page"),
    ({"dirtyRounds": -1}, "0 or more"),
    ({"pageSize": 3000}, "power of two"),
    ({"uuid": b"short"}, "16 bytes"),
    ({"channels": 256}, "0 to 255"),
])
def test_badArgumentsAreRefused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        synthesizeMigration(**options)


# The pump, on plain protocols


@attrs.define
class Log:
    events: list[tuple[int, str, Any]] = attrs.Factory(list)


class LoggingProtocol(Protocol):
    """
    Logs what it is given; pauses its transport after C{pauseAfter} reads,
    closes (or aborts) it after C{closeAfter}.
    """

    def __init__(self, log: Log, number: int, pauseAfter: int | None, closeAfter: int | None, abort: bool) -> None:
        self.log, self.number = log, number
        self.pauseAfter, self.closeAfter, self.abort = pauseAfter, closeAfter, abort
        self.reads = 0

    def dataReceived(self, data: bytes) -> None:
        self.reads += 1
        self.log.events.append((self.number, "data", data))
        if self.reads == self.pauseAfter:
            self.transport.pauseProducing()
        if self.reads == self.closeAfter:
            (self.transport.abortConnection if self.abort else self.transport.loseConnection)()

    def connectionLost(self, reason: Failure) -> None:
        self.log.events.append((self.number, "lost", reason.type))


class LoggingFactory(Factory):
    def __init__(self, pauseAfter: int | None = None, closeAfter: int | None = None, abort: bool = False) -> None:
        self.log = Log()
        self.protocols: list[LoggingProtocol] = []
        self.options = (pauseAfter, closeAfter, abort)

    def buildProtocol(self, addr: Any) -> LoggingProtocol:
        protocol = LoggingProtocol(self.log, len(self.protocols), *self.options)
        protocol.factory = self
        self.protocols.append(protocol)
        return protocol


def test_pausedConnectionGetsNothingUntilResumed() -> None:
    factory = LoggingFactory(pauseAfter=2)
    pump = MigrationPump(factory, [b"a" * 10, b"b" * 10], chunkSizes=3)
    pump.flush()
    assert [(n, data) for n, kind, data in factory.log.events if kind == "data"] == [
        (0, b"aaa"), (1, b"bbb"), (0, b"aaa"), (1, b"bbb")]
    assert pump.connections[0].paused and pump.connections[0].pending == 4 and not pump.connections[0].closed
    factory.protocols[1].transport.resumeProducing()
    pump.flush()
    assert pump.connections[1].closed and pump.connections[1].delivered == 10
    assert not pump.connections[0].closed


def test_chunkSizesCycle() -> None:
    factory = LoggingFactory()
    MigrationPump(factory, [b"x" * 12], chunkSizes=[[3, 1]]).flush()
    assert [len(data) for _, kind, data in factory.log.events if kind == "data"] == [3, 1, 3, 1, 3, 1]


@pytest.mark.parametrize("mainClosesLast, lastToEnd", [(True, 0), (False, 2)])
def test_mainChannelEndsLast(mainClosesLast: bool, lastToEnd: int) -> None:
    factory = LoggingFactory()
    streams = [b"QEVM" + bytes(10), b"\x11\x22\x33\x44" + bytes(100), b"\x11\x22\x33\x44" + bytes(200)]
    MigrationPump(factory, streams, chunkSizes=10, mainClosesLast=mainClosesLast).flush()
    ends = [n for n, kind, _ in factory.log.events if kind == "lost"]
    assert ends[-1] == lastToEnd and sorted(ends) == [0, 1, 2]


@pytest.mark.parametrize("abort, reason", [(False, ConnectionDone), (True, ConnectionAborted)])
def test_protocolClosingTheConnectionDropsTheRest(abort: bool, reason: type) -> None:
    factory = LoggingFactory(closeAfter=1, abort=abort)
    pump = MigrationPump(factory, [b"y" * 100], chunkSizes=10)
    pump.flush()
    assert factory.log.events == [(0, "data", b"y" * 10), (0, "lost", reason)]
    assert pump.connections[0].closed and pump.connections[0].pending == 0


def test_orderConnectsInThatOrderAndLeavesOutTheRest() -> None:
    factory = LoggingFactory()
    pump = MigrationPump(factory, [b"0", b"1", b"2", b"3"], order=[3, 1])
    assert [(c.index, c.number, c.transport.getPeer().port) for c in pump.connections] == [(3, 0, 40000), (1, 1, 40001)]
    assert pump.connection(1).number == 1
    with pytest.raises(KeyError):
        pump.connection(0)
    pump.flush()
    assert [data for _, kind, data in factory.log.events if kind == "data"] == [b"3", b"1"]


def test_connectAndSendPieceByPiece() -> None:
    factory = LoggingFactory()
    pump = MigrationPump(factory)
    connection = pump.connect(b"ab", close=False)
    pump.flush()
    assert not connection.closed
    connection.send(b"cd", close=True)
    assert not pump.closed
    pump.flush()
    assert factory.log.events == [(0, "data", b"ab"), (0, "data", b"cd"), (0, "lost", ConnectionDone)]
    with pytest.raises(ValueError):
        connection.send(b"more")


def test_refusedConnectionIsClosed() -> None:
    class Refusing(Factory):
        def buildProtocol(self, addr: Any) -> None:
            return None

    pump = MigrationPump(Refusing(), [b"data"])
    assert pump.connections[0].closed and pump.connections[0].protocol is None
    assert pump.flush() is False


def test_flushStopsAtTheClockLimit() -> None:
    clock = Clock()
    ticks: list[float] = []
    looping = LoopingCall(lambda: ticks.append(clock.seconds()))
    looping.clock = clock
    looping.start(10, now=False)
    MigrationPump(LoggingFactory(), [b"x"], clock=clock, clockLimit=35).flush()
    assert ticks == [10, 20, 30]
    looping.stop()


@pytest.mark.parametrize("options, message", [
    ({"order": [0, 0]}, "distinct stream indexes"),
    ({"order": [2]}, "distinct stream indexes"),
    ({"chunkSizes": [1, 2, 3]}, "3 chunk sizes for 2 streams"),
    ({"chunkSizes": 0}, "positive"),
])
def test_badPumpArgumentsAreRefused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MigrationPump(LoggingFactory(), [b"a", b"b"], **options)


def test_oneBytesObjectIsNotASource() -> None:
    with pytest.raises(TypeError):
        MigrationPump(LoggingFactory(), b"QEVM")


# The pump and the receiver: failures end with the clock


def test_missingChannelTimesOutOnlyWithTheClock() -> None:
    migration = synthesizeMigration(seed=1, convention="10.0", channels=2)
    clock = Clock()
    sink = RecordingSink()
    factory = MigrationReceiverFactory(lambda info: sink, channels=2, clock=clock, channelTimeout=30)
    MigrationPump(factory, migration, order=[0, 1]).flush()
    assert sink.result is None and clock.seconds() == 0
    MigrationPump(factory, [], clock=clock).flush()  # nothing to deliver; lets the timer fire
    result = sink.result
    assert result is not None and not result.complete
    assert "multifd channels [1] missing" in result.error
    assert clock.seconds() == 30


def test_cutShortMainIsNotComplete() -> None:
    migration = synthesizeMigration(seed=1, convention="7.2", channels=2)
    sink, pump = receive([migration.main.until("dev:apic"), *migration.streams[1:]], 2)
    assert sink.result is not None and not sink.result.complete
    assert sink.methods()[-1] == "migrationEnded" and "streamEnded" not in sink.methods()
    assert pump.closed


def test_channelWaitingAtABarrierStopsReading() -> None:
    migration = synthesizeMigration(seed=1, convention="10.0", channels=2)
    sink = RecordingSink()
    factory = MigrationReceiverFactory(lambda info: sink, channels=2, clock=Clock())
    pump = MigrationPump(factory)
    main = pump.connect(migration.main.through("START.blocks"), close=False)
    channels = [pump.connect(channel.data, chunkSizes=1000) for channel in migration.multifd]
    pump.flush()
    # Each channel stopped reading in the read that held its first SYNC.
    for channel, synthetic in zip(channels, migration.multifd):
        assert channel.paused and not channel.closed
        assert 0 <= channel.delivered - len(synthetic.through("START.sync")) < 1000
    assert sink.methods() == ["migrationStarted", "configuration", "ramBlocks"]
    main.send(migration.main.after("START.blocks"), close=True)
    pump.flush()
    assertReceivedExactly(sink, migration)


# The recording sink


def test_whenEndedFiresEveryWaiterWithTheResult() -> None:
    migration = synthesizeMigration(seed=2, convention="10.0", channels=1)
    sink = RecordingSink()
    factory = MigrationReceiverFactory(lambda info: sink, channels=1, clock=Clock())
    early = sink.whenEnded()
    seen = []
    early.addCallback(lambda result: seen.append(result) or "changed")
    MigrationPump(factory, migration).flush()
    late = sink.whenEnded()
    assert seen == [sink.result]
    results: list = []
    late.addCallback(results.append)
    assert results == [sink.result] and sink.result.complete


def test_callsAreRecordedInOrderWithCopies() -> None:
    migration = synthesizeMigration(seed=6, convention="7.2", channels=2)
    sink = receive(migration, 2)[0]
    methods = sink.methods()
    assert methods[:3] == ["migrationStarted", "configuration", "ramBlocks"]
    assert methods[-2:] == ["streamEnded", "migrationEnded"]
    assert set(methods[3:-2]) == {"writePages", "zeroPages"}
    writes = [call for call in sink.calls if call.method == "writePages"]
    block, offsets, data = writes[0].arguments
    assert isinstance(offsets, tuple) and isinstance(data, bytes)
    assert len(data) == len(offsets) * PAGE and block.name == "pc.ram"
    assert sink.info is not None and sink.info.channels == 2
    assert sink.configurationSection is not None and sink.configurationSection.machine == "pc-i440fx-7.2"
    assert "writePages" in repr(writes[0]) and "bytes>" in repr(writes[0])


def test_ramOfAnUnknownBlock() -> None:
    sink = receive(synthesizeMigration(seed=1, channels=0), 0)[0]
    with pytest.raises(KeyError, match="no RAM block 'nothing'"):
        sink.ram("nothing")
    assert sink.ram("pc.bios") == sink.memory()["pc.bios"]


def test_recordingSinkFactoryKeepsOneSinkPerMigration() -> None:
    sinks = RecordingSinkFactory()
    clock = Clock()
    factory = MigrationReceiverFactory(sinks, channels=1, clock=clock)
    first = synthesizeMigration(seed=1, channels=1)
    second = synthesizeMigration(seed=2, channels=1)
    MigrationPump(factory, first, host="192.0.2.1").flush()
    MigrationPump(factory, second, host="192.0.2.2", order=[1, 0]).flush()
    assert [sink.memory() for sink in sinks.sinks] == [first.memory, second.memory]
    assert [sink.info.number for sink in sinks.sinks] == [1, 2]


# Under trial


class SyntheticSourceUnderTrial(SynchronousTestCase):
    """
    The helpers in a trial test case, as an embedder would write one.
    """

    def receive(self, migration: SyntheticMigration, **pumpOptions: Any) -> RecordingSink:
        sink = RecordingSink()
        clock = Clock()
        factory = MigrationReceiverFactory(lambda info: sink, channels=migration.channels, clock=clock)
        MigrationPump(factory, migration, clock=clock, **pumpOptions).flush()
        return sink

    def test_eachConventionIsReceivedComplete(self) -> None:
        for convention in CONVENTIONS:
            migration = synthesizeMigration(seed=3, convention=convention, channels=2, compression="zstd")
            sink = self.receive(migration, order=[2, 1, 0], chunkSizes=[[1000, 7]] * 3)
            result = self.successResultOf(sink.whenEnded())
            self.assertTrue(result.complete, result.error)
            self.assertEqual(sink.memory(), migration.memory)

    def test_cutShortIsNotComplete(self) -> None:
        migration = synthesizeMigration(seed=3, convention="7.2", channels=2)
        sink = RecordingSink()
        clock = Clock()
        factory = MigrationReceiverFactory(lambda info: sink, channels=2, clock=clock)
        MigrationPump(factory, [migration.main.until("tail"), *migration.streams[1:]], clock=clock).flush()
        result = self.successResultOf(sink.whenEnded())
        self.assertFalse(result.complete)
        self.assertIn("main channel", result.error)


# The documented example, and trial itself


def pythonBlocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def documentedTrialExample() -> str:
    """
    The complete trial example of docs/testing.md: the first Python block
    that defines a SynchronousTestCase.
    """
    text = (ROOT / "docs" / "testing.md").read_text()
    return next(block for block in pythonBlocks(text) if "(SynchronousTestCase)" in block)


def test_shortExamplesRun() -> None:
    """
    The few-line examples of docs/embedding.md and of the module docstring.
    """
    embedding = (ROOT / "docs" / "embedding.md").read_text()
    [short] = [block for block in pythonBlocks(embedding) if "MigrationPump(" in block]
    docstring = twisted_multifd.testing.__doc__
    assert docstring is not None
    indented = docstring.split("A whole test::\n", 1)[1].split("\nSee ", 1)[0]
    for code in (short, textwrap.dedent(indented)):
        exec(compile(code, "example", "exec"), {})  # noqa: S102 (our own docs)


def test_documentedTrialExamplePasses() -> None:
    module = types.ModuleType("test_documented_example")
    exec(compile(documentedTrialExample(), "docs/testing.md", "exec"), module.__dict__)  # noqa: S102 (our own docs)
    suite = unittest.defaultTestLoader.loadTestsFromModule(module)
    assert suite.countTestCases() >= 3
    result = unittest.TestResult()
    suite.run(result)
    assert (result.errors, result.failures) == ([], [])
    assert result.testsRun == suite.countTestCases()


def test_trialRunsTheTrialTestsAndTheDocumentedExample(tmp_path: Path) -> None:
    example = tmp_path / "test_documented_example.py"
    example.write_text(documentedTrialExample())
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run(
        [sys.executable, "-m", "twisted.trial", str(Path(__file__)), str(example)],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASSED" in run.stdout
    documented = len(re.findall(r"^    def test_", documentedTrialExample(), re.MULTILINE))
    ours = len(re.findall(r"^    def test_", Path(__file__).read_text(), re.MULTILINE))
    ran = re.search(r"Ran (\d+) tests", run.stdout)
    assert ran is not None and int(ran.group(1)) == documented + ours, run.stdout

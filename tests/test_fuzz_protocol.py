"""
Hostile bytes at the protocol level (issue 5, item 4): a whole
L{MigrationReceiverFactory}, on a L{Clock} and in-memory transports
(L{MigrationPump}), is fed arbitrary bytes and mutated synthesized migrations
over main and multifd connections, in arbitrary chunking and connection
order. tests/test_fuzz.py does the same for each decoder on its own.

Every run must end, once the clock has passed every timeout, with:

- each migration either complete with the right pages (unmutated input) or
  failed with a L{MigrationError} that names the connection, and for a
  L{ProtocolError} the wire field too;
- no other exception: nothing raised out of the protocols, nothing logged
  with C{log.failure}, no "internal parser error" (a codec bug that the
  parser driver turned into a ProtocolError);
- every connection closed (by the source or, for one the source keeps open,
  by the receiver), no migration left in progress, no timer left pending;
- bounded memory: (tracemalloc) a run with hostile length fields peaks
  under 64 MiB; and after every read no parser holds more unparsed bytes
  than it was given or than L{MAX_TAIL} (a sanity check: these small inputs
  cannot reach that limit; the tracemalloc bound is the one that bites).

Example counts keep this file well under a minute; HYPOTHESIS_PROFILE=long
(tests/conftest.py) runs many more.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from unittest import mock

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.control import currently_in_test_context
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from twisted_multifd import MigrationReceiverFactory
from twisted_multifd._channels import MAX_TAIL
from twisted_multifd._errors import MigrationError, MigrationTimeout, ProtocolError
from twisted_multifd._initpacket import INIT_PACKET_SIZE, MULTIFD_MAGIC
from twisted_multifd._migration import Migration
from twisted_multifd._packet import FLAG_DEVICE_STATE, MAX_DEVICE_STATE_PAYLOAD, buildRamPacket
from twisted_multifd._sniff import MAGIC_SIZE, ChannelSniffer
from twisted_multifd.testing import (
    MigrationPump,
    RecordingSink,
    RecordingSinkFactory,
    SyntheticMigration,
    synthesizeMigration,
    syntheticMemory,
)

HOST = "192.0.2.7"
SNIFF_TIMEOUT = 5.0
CHANNEL_TIMEOUT = 10.0
MEMORY_BOUND = 64 * 1024 * 1024


def _examples(default: int) -> int:
    # The suite's own count, unless a profile asks for more than hypothesis's
    # default of 100 (HYPOTHESIS_PROFILE=long).
    loaded = settings().max_examples
    return default if loaded <= 100 else max(default, loaded)


def fuzz(examples: int) -> settings:
    return settings(max_examples=_examples(examples), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Inputs


# Small migrations (ten pages and a dirty round), synthesized once.
def _migration(convention: str, channels: int, compression: str = "none") -> SyntheticMigration:
    memory = syntheticMemory(5, blockPages={"pc.ram": 8, "vga.vram": 2})
    return synthesizeMigration(memory, seed=5, convention=convention, channels=channels,
                               compression=compression, dirtyRounds=1, uuid=bytes(range(16)))


MIGRATIONS = {
    (convention, channels, compression): _migration(convention, channels, compression)
    for convention in ("7.2", "10.0")
    for channels in (0, 1, 2)
    for compression in (("none", "zlib", "zstd") if channels else ("none",))
}

MAIN_MAGIC = b"QEVM"
MULTIFD_MAGIC_BYTES = struct.pack(">I", MULTIFD_MAGIC)

# Values a hostile length or count field may hold.
HOSTILE_LENGTHS = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                   MAX_DEVICE_STATE_PAYLOAD, MAX_DEVICE_STATE_PAYLOAD + 1, 1 << 40, (1 << 64) - 1]


@attrs.frozen
class Mutation:
    """
    One change to one connection's bytes; C{position} is taken modulo the
    stream's length.
    """

    kind: str  # flip, truncate, insert, length
    stream: int
    position: int
    value: bytes = b""

    def apply(self, data: bytes) -> bytes:
        if not data:
            return self.value if self.kind == "insert" else data
        at = self.position % (len(data) + (self.kind in ("truncate", "insert")))
        if self.kind == "flip":
            return data[:at] + bytes([data[at] ^ (self.value[0] or 1)]) + data[at + 1 :]
        if self.kind == "truncate":
            return data[:at]
        if self.kind == "insert":
            return data[:at] + self.value + data[at:]
        # A length field overwritten, big-endian as every QEMU length is.
        return data[:at] + self.value + data[at + len(self.value) :]


def mutations(streams: int) -> st.SearchStrategy[Mutation]:
    stream = st.integers(0, streams - 1)
    # Anywhere, or (as often) among the first bytes, where the structure is:
    # the main channel's header, configuration and block list, a multifd
    # channel's initial packet and first packet header.
    position = st.one_of(st.integers(0, 1 << 20), st.integers(0, 1600))
    lengths = st.sampled_from(HOSTILE_LENGTHS).flatmap(
        lambda n: st.sampled_from([size for size in (1, 2, 4, 8) if n < 1 << (8 * size)]).map(
            lambda size: n.to_bytes(size, "big")))
    return st.one_of(
        st.builds(Mutation, st.just("flip"), stream, position, st.binary(min_size=1, max_size=1)),
        st.builds(Mutation, st.just("truncate"), stream, position),
        st.builds(Mutation, st.just("insert"), stream, position, st.binary(min_size=1, max_size=32)),
        st.builds(Mutation, st.just("length"), stream, position, lengths),
    )


def chunkings(count: int) -> st.SearchStrategy[list[list[int]]]:
    """
    How each connection's bytes are cut into reads (sizes used in turn): any
    small sizes, with a larger one among them so that a run stays short.
    """
    small = st.lists(st.integers(1, 80), max_size=3)
    large = st.one_of(st.integers(80, 5000), st.just(65536))
    sizes = st.tuples(small, large).map(lambda t: [*t[0], t[1]])
    return st.lists(sizes, min_size=count, max_size=count)


# Running a receiver


class CappedSink(RecordingSink):
    """
    A L{RecordingSink} that refuses a block list of more RAM than a test
    should hold (a mutated block length can announce up to the 1 TiB a
    receiver accepts; the sink decides what it can store, as a real one
    would).
    """

    LIMIT = 16 * 1024 * 1024

    def ramBlocks(self, blocks: Sequence[Any], pageSize: int) -> None:
        total = sum(block.length for block in blocks)
        if total > self.LIMIT:
            raise MigrationError(f"{total} bytes of RAM is more than this test sink holds")
        super().ramBlocks(blocks, pageSize)


class CappedSinkFactory(RecordingSinkFactory):
    def __call__(self, info: Any) -> RecordingSink:
        sink = CappedSink()
        self.sinks.append(sink)
        return sink


@attrs.define
class Outcome:
    clock: Clock
    factory: MigrationReceiverFactory
    pump: MigrationPump
    sinks: RecordingSinkFactory
    results: list
    errors: list[MigrationError]
    events: list[LogEvent]
    peakBuffered: int
    # Connections the source kept open that were still open after every
    # timeout, with the state of their migration then (None: not in one).
    openAfterTimeouts: list[tuple[Any, str | None]]


@contextmanager
def _recordingFailures(errors: list[MigrationError]) -> Iterator[None]:
    """
    Keep every error a migration fails with (the result only has its text).
    """
    fail = Migration.fail

    def recording(self: Migration, error: MigrationError) -> None:
        errors.append(error)
        fail(self, error)

    with mock.patch.object(Migration, "fail", recording):
        yield


def receive(
    streams: Sequence[bytes],
    *,
    channels: int,
    order: Sequence[int] | None = None,
    chunks: Sequence[Sequence[int]] | None = None,
    keepOpen: Sequence[bool] = (),
) -> Outcome:
    """
    Play C{streams} into a new receiver (one connection each, made in
    C{order}; those in C{keepOpen} are never closed by the source), then let
    the clock run past every timeout.
    """
    clock = Clock()
    sinks = CappedSinkFactory()
    results: list = []
    errors: list[MigrationError] = []
    factory = MigrationReceiverFactory(
        sinks, channels=channels, clock=clock, onMigrationEnded=results.append,
        sniffTimeout=SNIFF_TIMEOUT, channelTimeout=CHANNEL_TIMEOUT,
    )
    pump = MigrationPump(factory, clock=clock, host=HOST)
    order = list(range(len(streams))) if order is None else order
    events: list[LogEvent] = []
    peak = 0
    globalLogPublisher.addObserver(events.append)
    try:
        with _recordingFailures(errors):
            for index in order:
                pump.connect(streams[index], close=not (index < len(keepOpen) and keepOpen[index]),
                             chunkSizes=chunks[index] if chunks else 65536)
            # flush(), with the parsers' buffers looked at after every round.
            while True:
                while pump.pump():
                    peak = max(peak, _mostBuffered(pump))
                calls = clock.getDelayedCalls()
                if not calls:
                    break
                clock.advance(max(0.0, min(call.getTime() for call in calls) - clock.seconds()))
            clock.advance(10 * (SNIFF_TIMEOUT + CHANNEL_TIMEOUT))
            pump.flush()
            # Whatever is still open by now would stay open for ever, unless
            # the source closes it: it does now, and everything must end.
            stillOpen = []
            for connection in pump.connections:
                if not connection.closed:
                    migration = getattr(getattr(connection.protocol, "delegate", None), "migration", None)
                    stillOpen.append((connection, None if migration is None else migration.state))
                    connection.send(close=True)
            pump.flush()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return Outcome(clock, factory, pump, sinks, results, errors, events, peak, stillOpen)


def _mostBuffered(pump: MigrationPump) -> int:
    most = 0
    for connection in pump.connections:
        delegate = getattr(connection.protocol, "delegate", None)
        parser = getattr(delegate, "parser", None)
        if parser is not None:
            assert parser.buffered <= connection.delivered, "a parser holds bytes it was never given"
            most = max(most, parser.buffered)
    return most


def checkEnded(outcome: Outcome) -> None:
    """
    The properties every run must have, whatever its input.
    """
    failures = [formatEvent(e) + "\n" + e["log_failure"].getTraceback()
                for e in outcome.events if e.get("log_failure") is not None]
    assert not failures, "an unexpected exception was logged:\n" + "\n".join(failures)
    texts = [formatEvent(e) for e in outcome.events]
    assert not [t for t in texts if "internal parser error" in t], texts
    # Every connection the source left open was closed by a timeout (sniff,
    # channel or, while loading, idle).
    assert outcome.openAfterTimeouts == [], f"still open after every timeout: {outcome.openAfterTimeouts}"
    for connection in outcome.pump.connections:
        assert connection.closed, f"{connection} is still open after the source closed it"
    assert outcome.factory.migrations == [], "a migration is still in progress after every timeout"
    assert outcome.clock.getDelayedCalls() == [], "a timer is left pending"
    assert outcome.peakBuffered <= MAX_TAIL
    for sink in outcome.sinks.sinks:
        assert sink.result is not None, "a migration never ended"
    assert len(outcome.results) >= len(outcome.sinks.sinks)
    for error in outcome.errors:
        assert isinstance(error, MigrationError)
        assert "internal parser error" not in str(error), str(error)
        if isinstance(error, ProtocolError):
            assert error.connection, f"no connection named: {error!r} ({error})"
            assert error.field, f"no field named: {error}"
        elif not isinstance(error, MigrationTimeout):
            # Timeouts are about the migration as a whole (and name what it waited for).
            assert error.connection, f"no connection named: {error!r} ({error})"
    for result in outcome.results:
        if not result.complete:
            assert result.error, result
    if currently_in_test_context():
        # --hypothesis-show-statistics: how runs ended, to see that mutations reach deep states.
        for error in outcome.errors[:1]:
            event(f"failed: {type(error).__name__} {getattr(error, 'field', None)}")
        if not outcome.errors:
            event(f"{len(outcome.results)} migrations, {sum(r.complete for r in outcome.results)} complete")


# Arbitrary bytes


def _withHead(head: bytes, body: bytes) -> bytes:
    return head + body


connectionBytes = st.builds(
    _withHead,
    # Most inputs get past the sniffer, to reach the channel parsers.
    st.sampled_from([b"", MAIN_MAGIC, MULTIFD_MAGIC_BYTES, MULTIFD_MAGIC_BYTES + struct.pack(">II", 1, 0)]),
    st.binary(max_size=600),
)


@fuzz(500)
@given(
    streams=st.lists(connectionBytes, min_size=1, max_size=4),
    channels=st.integers(0, 3),
    data=st.data(),
)
def test_arbitraryBytes(streams: list[bytes], channels: int, data: Any) -> None:
    """
    Arbitrary bytes on 1 to 4 connections, in any order and chunking, some
    left open by the source: every connection ends, every migration ends,
    no unexpected exception.
    """
    count = len(streams)
    order = data.draw(st.permutations(range(count)), label="order")
    chunks = data.draw(chunkings(count), label="chunks")
    keepOpen = data.draw(st.lists(st.booleans(), min_size=count, max_size=count), label="keepOpen")
    outcome = receive(streams, channels=channels, order=order, chunks=chunks, keepOpen=keepOpen)
    checkEnded(outcome)
    assert not any(result.complete for result in outcome.results)


# Valid migrations, as they are and mutated


migrationKeys = st.sampled_from(sorted(MIGRATIONS))


@fuzz(100)
@given(key=migrationKeys, data=st.data())
def test_validMigrationInAnyOrderAndChunking(key: tuple, data: Any) -> None:
    """
    The control: unmutated, every migration completes with the right pages,
    whatever the connection order and chunking.
    """
    migration = MIGRATIONS[key]
    count = len(migration.streams)
    order = data.draw(st.permutations(range(count)), label="order")
    chunks = data.draw(chunkings(count), label="chunks")
    outcome = receive(migration.streams, channels=key[1], order=order, chunks=chunks)
    checkEnded(outcome)
    [sink] = outcome.sinks.sinks
    assert sink.result is not None and (sink.result.complete, sink.result.error) == (True, None)
    assert sink.memory() == migration.memory


@fuzz(1500)
@given(key=migrationKeys, data=st.data())
def test_mutatedMigration(key: tuple, data: Any) -> None:
    """
    A valid migration with byte flips, truncations, inserted junk and
    hostile length fields, in any order and chunking, some connections left
    open: it completes or fails with an error naming connection and field.
    """
    migration = MIGRATIONS[key]
    count = len(migration.streams)
    changes = data.draw(st.lists(mutations(count), min_size=1, max_size=4), label="mutations")
    streams = list(migration.streams)
    for change in changes:
        streams[change.stream] = change.apply(streams[change.stream])
    order = data.draw(st.permutations(range(count)), label="order")
    chunks = data.draw(chunkings(count), label="chunks")
    # At most one connection the source never closes.
    keepOpen = data.draw(st.integers(-1, count - 1).map(lambda kept: [i == kept for i in range(count)]),
                         label="keepOpen")
    outcome = receive(streams, channels=key[1], order=order, chunks=chunks, keepOpen=keepOpen)
    checkEnded(outcome)
    if tuple(streams) == migration.streams and not any(keepOpen):
        [sink] = outcome.sinks.sinks
        assert sink.result is not None and sink.result.complete
        assert sink.memory() == migration.memory


# Memory: hostile length fields


@fuzz(200)
@given(key=migrationKeys, changes=st.data())
def test_hostileLengthFieldsStayWithinMemoryBound(key: tuple, changes: Any) -> None:
    """
    Length and count fields set to hostile values anywhere in a migration's
    streams: tracemalloc's peak over the whole run stays under 64 MiB (the
    streams are under 200 KiB; a parser that sets memory aside for what a
    length field announces would go far over).
    """
    migration = MIGRATIONS[key]
    count = len(migration.streams)
    streams = list(migration.streams)
    lengthChanges = st.builds(
        Mutation, st.just("length"), st.integers(0, count - 1), st.integers(0, 1 << 20),
        st.sampled_from([v.to_bytes(4, "big") for v in HOSTILE_LENGTHS if v < 1 << 32]
                        + [v.to_bytes(8, "big") for v in HOSTILE_LENGTHS if v < 1 << 64]),
    )
    for change in changes.draw(st.lists(lengthChanges, min_size=1, max_size=6), label="mutations"):
        streams[change.stream] = change.apply(streams[change.stream])
    keepOpen = changes.draw(st.lists(st.booleans(), min_size=count, max_size=count), label="keepOpen")
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        outcome = receive(streams, channels=key[1], keepOpen=keepOpen, chunks=[[4096]] * count)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    checkEnded(outcome)
    assert peak - base < MEMORY_BOUND, f"{(peak - base) >> 20} MiB at peak"


def test_deviceStatePacketAnnouncingTheLimitAllocatesNothingAhead() -> None:
    """
    A device-state packet announcing the largest payload accepted (256 MiB)
    and then a trickle of bytes: the receiver waits for them without setting
    the 256 MiB aside, and drops the connection at the channel timeout.
    """
    migration = MIGRATIONS[("10.0", 1, "none")]
    main, channel = migration.streams
    header = struct.pack(">III", MULTIFD_MAGIC, 1, FLAG_DEVICE_STATE) + struct.pack(
        ">256sII", b"vfio", 0, MAX_DEVICE_STATE_PAYLOAD)
    hostile = channel[:INIT_PACKET_SIZE] + header + bytes(100_000)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        outcome = receive([main, hostile], channels=1, keepOpen=[False, True], chunks=[[4096], [4096]])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    checkEnded(outcome)
    assert peak - base < MEMORY_BOUND
    [result] = outcome.results
    assert not result.complete


def test_compressedPayloadLengthOverItsBoundIsRefused() -> None:
    """
    A zlib packet whose next_packet_size is over what its pages can need is
    refused by field, before its payload is waited for.
    """
    migration = MIGRATIONS[("10.0", 1, "zlib")]
    main, channel = migration.streams
    packet = buildRamPacket(pageSize=4096, flags=1 << 1, packetNum=0, block="pc.ram",
                            normalOffsets=(0,), payload=b"", nextPacketSize=0xFFFFFFFF)
    outcome = receive([main, channel[:INIT_PACKET_SIZE] + packet], channels=1)
    checkEnded(outcome)
    [result] = outcome.results
    assert not result.complete and "next_packet_size" in result.error


def test_zstdBombStaysWithinMemoryBound() -> None:
    """
    A one-page zstd packet whose payload (8 KiB, under the 12 KiB allowed
    for one page) inflates to 256 MiB is refused without inflating it.
    """
    import zstandard

    migration = MIGRATIONS[("10.0", 1, "zstd")]
    main, channel = migration.streams
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(256 << 20))
    packet = buildRamPacket(pageSize=4096, flags=2 << 1, packetNum=0, block="pc.ram",
                            normalOffsets=(0,), payload=bomb)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        outcome = receive([main, channel[:INIT_PACKET_SIZE] + packet], channels=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    checkEnded(outcome)
    [result] = outcome.results
    assert not result.complete and "payload" in result.error
    assert peak - base < MEMORY_BOUND, f"{(peak - base) >> 20} MiB at peak"


def test_sourceSilentWhileLoadingIsDropped() -> None:
    """
    A source that sends its main channel's header and then nothing, keeping
    the connection open, holds its migration (a sink, a slot of
    maxMigrations) until something closes it.
    """
    outcome = receive([MIGRATIONS[("10.0", 0, "none")].streams[0][:40]], channels=0, keepOpen=[True])
    assert outcome.openAfterTimeouts == [], (
        "no idle timeout while loading: the connection stayed open past every timeout"
    )


# The sniffer hands bytes on without copying them


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


@fuzz(200)
@given(
    magic=st.sampled_from([MAIN_MAGIC, MULTIFD_MAGIC_BYTES]),
    body=st.binary(max_size=64),
    cuts=st.lists(st.integers(1, 70), max_size=8),
)
def test_sniffPassesTheVeryBytesOn(magic: bytes, body: bytes, cuts: list[int]) -> None:
    """
    Whatever the chunking, the chosen protocol gets every byte once; a read
    that arrives with nothing held back (the first, when it holds the whole
    magic, and every read after the hand-off) is passed on as the very same
    C{bytes} object: nothing is copied on the way.
    """
    data = magic + body
    chosen: list[_Recorder] = []

    def chooser(kind: str, peer: Any) -> _Recorder:
        chosen.append(_Recorder())
        return chosen[-1]

    peer = IPv4Address("TCP", HOST, 40000)
    sniffer = ChannelSniffer(chooser, peer, Clock(), SNIFF_TIMEOUT)
    sniffer.makeConnection(StringTransport(peerAddress=peer))
    reads, position = [], 0
    for cut in sorted(set(cuts)) + [len(data)]:
        if cut > position:
            reads.append(data[position:cut])
            position = cut
    handedOff = None
    for number, read in enumerate(reads):
        sniffer.dataReceived(read)
        if handedOff is None and chosen:
            handedOff = number
    [recorder] = chosen
    assert b"".join(recorder.received) == data
    assert handedOff is not None
    # Every read after the one that completed the magic is the object read.
    assert all(a is b for a, b in zip(recorder.received[1:], reads[handedOff + 1 :]))
    if len(reads[0]) >= MAGIC_SIZE:
        assert recorder.received[0] is reads[0]


@fuzz(150)
@given(
    gaps=st.lists(st.sampled_from([0.0, 0.01, 0.5, 1.0, 2.5, 4.99, 5.0, 7.0]), min_size=1, max_size=8),
    sends=st.lists(st.sampled_from([b"", b"Q", b"QEV", MULTIFD_MAGIC_BYTES, MULTIFD_MAGIC_BYTES + bytes(59),
                                    MULTIFD_MAGIC_BYTES + bytes(60), MAIN_MAGIC]), min_size=8, max_size=8),
)
def test_sniffTimeoutPerConnection(gaps: list[float], sends: list[bytes]) -> None:
    """
    Connections made at different times, each sending a few bytes and then
    nothing: each is dropped at its own connect time plus the sniff timeout
    if by then it has not sent its magic (and, for a multifd channel, its
    whole 64-byte initial packet), never before; the others never. One timer
    serves them all, and none is left pending once none is waiting.
    """
    clock = Clock()
    links: list[tuple[float, bool, StringTransport]] = []

    def check() -> None:
        # Dropped once past the deadline, not before (a millisecond either
        # side: the moment itself is a float comparison).
        now = clock.seconds()
        for deadline, owes, transport in links:
            if abs(deadline - now) > 0.001:
                assert transport.disconnecting == (owes and deadline < now), (deadline, now, owes)

    for number, gap in enumerate(gaps):
        clock.advance(gap)
        check()
        peer = IPv4Address("TCP", HOST, 40000 + number)
        sniffer = ChannelSniffer(lambda kind, peer: _Recorder(), peer, clock, SNIFF_TIMEOUT)
        transport = StringTransport(peerAddress=peer)
        sniffer.makeConnection(transport)
        if sends[number]:
            sniffer.dataReceived(sends[number])
        owes = len(sends[number]) < MAGIC_SIZE or (
            sends[number][:MAGIC_SIZE] == MULTIFD_MAGIC_BYTES and len(sends[number]) < INIT_PACKET_SIZE)
        links.append((clock.seconds() + SNIFF_TIMEOUT, owes, transport))
        assert len(clock.getDelayedCalls()) <= 1
    for deadline in sorted({deadline for deadline, _, _ in links}):
        for offset in (-0.002, 0.002):
            clock.advance(max(0.0, deadline + offset - clock.seconds()))
            check()
    assert clock.getDelayedCalls() == []

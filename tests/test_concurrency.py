"""
Many migrations on one port (issue 5, item 2): channels grouped by source
host and uuid, a refusal (never a mixed capture) when a main channel cannot
be paired for sure, limits, and idle connections that must not get in the way.

In memory (MigrationPump on a Clock) first, then over real loopback TCP: our
own sender bound to 127.0.0.2..9, and a receiver process under 1,000 idle
connections.
"""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from captures import recorded

from twisted_multifd import MigrationReceiverFactory, sendCapture
from twisted_multifd._capture import CaptureWriter
from twisted_multifd.testing import MigrationPump, RecordingSinkFactory, synthesizeMigration

CHANNEL_TIMEOUT = 60.0
SNIFF_TIMEOUT = 120.0


def makeFactory(channels: int = 2, **options: Any) -> tuple[MigrationReceiverFactory, RecordingSinkFactory, list, Clock]:
    clock = Clock()
    sinks = RecordingSinkFactory()
    results: list = []
    options.setdefault("channelTimeout", CHANNEL_TIMEOUT)
    options.setdefault("sniffTimeout", SNIFF_TIMEOUT)
    factory = MigrationReceiverFactory(sinks, channels=channels, clock=clock,
                                       onMigrationEnded=results.append, **options)
    return factory, sinks, results, clock


def pumpAll(*pumps: MigrationPump, rounds: int | None = None) -> None:
    """
    Round robin over several sources' pumps (one read per connection each),
    until nothing moves or C{rounds} rounds are done.
    """
    done = 0
    while rounds is None or done < rounds:
        moved = False
        for pump in pumps:
            moved |= pump.pump()
        done += 1
        if not moved:
            return


def sinkOf(sinks: RecordingSinkFactory, host: str) -> Any:
    [sink] = [s for s in sinks.sinks if s.result is not None and s.result.info.peer == host
              or s.info is not None and s.info.peer == host]
    return sink


def logged(events: list) -> list[str]:
    return [formatEvent(e) for e in events]


# In memory


def test_eightConcurrentMigrationsFromDistinctHosts() -> None:
    """
    Eight sources, both conventions, main channel first or last, the same
    uuid on all: their reads interleaved, every one complete and exact.
    """
    factory, sinks, results, clock = makeFactory(channels=3)
    migrations, pumps = {}, []
    for n in range(8):
        host = f"127.0.0.{n + 2}"
        migrations[host] = synthesizeMigration(seed=n, convention="7.2" if n % 2 else "10.0", channels=3)
        order = [0, 1, 2, 3] if n % 2 else [3, 1, 2, 0]
        pumps.append(MigrationPump(factory, migrations[host], order=order, chunkSizes=4096 + n * 1000,
                                   host=host, clock=clock))
    pumpAll(*pumps, rounds=1)
    assert len(factory.migrations) == 8
    pumpAll(*pumps)
    assert len(results) == 8
    for result in results:
        assert (result.complete, result.error) == (True, None)
    for sink in sinks.sinks:
        assert sink.memory() == migrations[sink.result.info.peer].memory


def test_secondMigrationFromAHostWhileTheFirstLoads() -> None:
    """
    One host, two uuids: the second assembles while the first is loading.
    Nothing is ambiguous, both complete.
    """
    factory, sinks, results, clock = makeFactory()
    first = synthesizeMigration(seed=1, uuid=b"\x01" * 16)
    second = synthesizeMigration(seed=2, uuid=b"\x02" * 16, convention="7.2")
    a = MigrationPump(factory, first, order=[1, 2, 0], chunkSizes=2048, host="192.0.2.7", clock=clock)
    pumpAll(a, rounds=20)
    assert factory.migrations[0].state == "loading"
    b = MigrationPump(factory, second, host="192.0.2.7", clock=clock)
    pumpAll(a, b)
    assert [(r.complete, r.error) for r in results] == [(True, None), (True, None)]
    byUUID = {sink.result.uuid[:2]: sink for sink in sinks.sinks}
    assert byUUID["01"].memory() == first.memory
    assert byUUID["02"].memory() == second.memory


def test_mainChannelWithTwoMigrationsAssemblingIsRefused() -> None:
    """
    Two sources on one host connect their multifd channels (QEMU 9+ order),
    then a main channel arrives: it could be either's, so both are refused,
    and so is the host for the channel timeout. Nothing is mixed; after that
    the host migrates again.
    """
    factory, sinks, results, clock = makeFactory()
    first = synthesizeMigration(seed=1, uuid=b"\x01" * 16)
    second = synthesizeMigration(seed=2, uuid=b"\x02" * 16)
    host = "192.0.2.8"
    with capturedLogs() as events:
        a = MigrationPump(factory, first, order=[1, 2], host=host, clock=clock)
        b = MigrationPump(factory, second, order=[1, 2], host=host, clock=clock)
        pumpAll(a, b)
        assert results == [] and len(factory.migrations) == 2
        main = MigrationPump(factory, [first.streams[0]], host=host, clock=clock)
        pumpAll(a, b, main)
    assert len(results) == 2
    for result in results:
        assert result.complete is False
        assert "a main channel carries no uuid" in result.error
        assert "refusing them rather than risk a mixed capture" in result.error
    assert all(sink.info is None for sink in sinks.sinks)  # never started loading
    assert main.connections[0].closed
    assert any("refusing the migrations assembling from 192.0.2.8" in line for line in logged(events))
    # Late channels of the refused sources are refused too, for a while.
    with capturedLogs() as events:
        late = MigrationPump(factory, [second.streams[0]], host=host, clock=clock)
        pumpAll(late)
    assert late.connections[0].closed
    assert [line for line in logged(events) if "refused: connections from 192.0.2.8" in line]
    clock.advance(CHANNEL_TIMEOUT)
    again = synthesizeMigration(seed=3)
    MigrationPump(factory, again, host=host, clock=clock).flush()
    assert (results[-1].complete, results[-1].error) == (True, None)
    assert sinks.sinks[-1].memory() == again.memory


def test_newUUIDWhileAMainChannelWaitsIsRefused() -> None:
    """
    QEMU 7.2 order: a main channel first, then channels of two uuids. The
    main channel could be either's: refused, with the uuids named.
    """
    factory, sinks, results, clock = makeFactory()
    first = synthesizeMigration(seed=1, uuid=b"\x01" * 16, convention="7.2")
    second = synthesizeMigration(seed=2, uuid=b"\x02" * 16, convention="7.2")
    MigrationPump(factory, [first.streams[0], first.streams[1], second.streams[1]], host="192.0.2.9",
                  clock=clock).flush()
    [result] = results
    assert result.complete is False
    assert "uuid " + "02" * 16 + ", other channels sent " + "01" * 16 in result.error
    assert "cannot be told" in result.error


def test_sameHostSameUUIDSecondIsRefusedFirstCompletes() -> None:
    """
    A second migration with the uuid of one loading from the same host (its
    main channel first, as QEMU 7.2 connects) is refused with a clear error;
    the first completes exactly.
    """
    factory, sinks, results, clock = makeFactory()
    first = synthesizeMigration(seed=1)
    second = synthesizeMigration(seed=2)
    host = "192.0.2.10"
    a = MigrationPump(factory, first, order=[1, 2, 0], chunkSizes=2048, host=host, clock=clock)
    pumpAll(a, rounds=20)
    assert factory.migrations[0].state == "loading"
    with capturedLogs() as events:
        b = MigrationPump(factory, second, host=host, clock=clock)
        pumpAll(a, b)
    refused, complete = sorted(results, key=lambda r: r.complete)
    assert (complete.complete, complete.error, complete.info.number) == (True, None, 1)
    assert refused.complete is False and refused.info.number == 2
    assert "a second migration from 192.0.2.10 with uuid " + "00" * 16 in refused.error
    assert "migration 1 from 192.0.2.10 with the same uuid is in progress" in refused.error
    assert sinks.sinks[0].memory() == first.memory
    assert sinks.sinks[1].info is None  # never loaded
    assert all(c.closed for c in b.connections)
    assert any("the second is refused" in line for line in logged(events))


def test_sameHostSameUUIDAssemblingAtOnceAreBothRefused() -> None:
    """
    Two sources with one uuid on one host connecting at the same time:
    whose channel is whose cannot be told, so neither is received.
    """
    factory, sinks, results, clock = makeFactory()
    first = synthesizeMigration(seed=1)
    second = synthesizeMigration(seed=2)
    a = MigrationPump(factory, first, order=[1], host="192.0.2.11", clock=clock)
    pumpAll(a)
    b = MigrationPump(factory, second, order=[1, 2, 0], host="192.0.2.11", clock=clock)
    pumpAll(a, b)
    assert [r.complete for r in results] == [False]
    assert "channel id 0 twice" in results[0].error
    assert all(sink.info is None for sink in sinks.sinks)
    assert all(c.closed for c in a.connections + b.connections)


def test_mainChannelConfigurationUUIDMustMatch() -> None:
    """
    With validate-uuid the configuration section names the uuid: a main
    channel paired with channels of another uuid fails, never mixes.
    """
    from synthetic import build

    factory, sinks, results, clock = makeFactory()
    first = build(channels=2, uuid=b"\x01" * 16, configUUID=b"\x01" * 16)
    second = build(channels=2, uuid=b"\x02" * 16, configUUID=b"\x02" * 16)
    MigrationPump(factory, [second.streams[0], *first.streams[1:]], host="192.0.2.12", clock=clock).flush()
    [result] = results
    assert result.complete is False
    assert "configuration uuid" in result.error
    assert "uuid " + "02" * 16 + ", its multifd channels sent " + "01" * 16 in result.error
    assert result.pagesWithData == 0


def test_maxMigrations() -> None:
    factory, sinks, results, clock = makeFactory(maxMigrations=2)
    migrations = [synthesizeMigration(seed=n) for n in range(3)]
    with capturedLogs() as events:
        pumps = [MigrationPump(factory, m, order=[1, 2, 0], host=f"198.51.100.{n + 1}", clock=clock)
                 for n, m in enumerate(migrations)]
        pumpAll(*pumps, rounds=1)
    refusals = [line for line in logged(events) if "refused: 2 migrations already in progress" in line]
    # The third source's two multifd channels and its main channel: one line each.
    assert len(refusals) == 3, logged(events)
    assert "max migrations 2" in refusals[0]
    pumpAll(*pumps)
    assert sorted((r.complete, r.info.peer) for r in results) == [(True, "198.51.100.1"), (True, "198.51.100.2")]
    assert all(c.closed for c in pumps[2].connections)
    # Once they are done, the next one is taken.
    MigrationPump(factory, migrations[2], host="198.51.100.3", clock=clock).flush()
    assert results[-1].complete and sinks.sinks[-1].memory() == migrations[2].memory


def test_maxWaitingChannels() -> None:
    factory, sinks, results, clock = makeFactory(maxWaitingChannels=3)
    first = synthesizeMigration(seed=1)
    second = synthesizeMigration(seed=2)
    with capturedLogs() as events:
        a = MigrationPump(factory, first, order=[1, 2], host="198.51.100.1", clock=clock)
        b = MigrationPump(factory, second, order=[1, 2], host="198.51.100.2", clock=clock)
        pumpAll(a, b)
    refusals = [line for line in logged(events) if "refused: 3 channels already waiting" in line]
    assert len(refusals) == 1 and "max waiting channels 3" in refusals[0]
    assert b.connections[1].closed and not b.connections[0].closed
    a.connect(first.streams[0])
    pumpAll(a, b)
    assert results[0].complete and sinks.sinks[0].memory() == first.memory


def test_limitsAreChecked() -> None:
    with pytest.raises(ValueError):
        MigrationReceiverFactory(RecordingSinkFactory(), channels=4, maxWaitingChannels=4, clock=Clock())
    with pytest.raises(ValueError):
        MigrationReceiverFactory(RecordingSinkFactory(), maxMigrations=0, clock=Clock())


class FailingThenRecordingSinks(RecordingSinkFactory):
    """
    A sink factory that cannot store the first C{failures} migrations (as a
    read-only output folder), then records.
    """

    def __init__(self, failures: int = 1) -> None:
        super().__init__()
        self.failures = failures
        self.asked: list[int] = []

    def __call__(self, info: Any) -> Any:
        self.asked.append(info.number)
        if len(self.asked) <= self.failures:
            from twisted_multifd._errors import MigrationError

            raise MigrationError("capture out/1: writing the capture folder failed: Read-only file system")
        return super().__call__(info)


def _sinkFailureFactory(failures: int = 1, channels: int = 2) -> tuple[MigrationReceiverFactory,
                                                                       FailingThenRecordingSinks, list, Clock]:
    clock = Clock()
    sinks = FailingThenRecordingSinks(failures)
    results: list = []
    factory = MigrationReceiverFactory(sinks, channels=channels, clock=clock, onMigrationEnded=results.append,
                                       channelTimeout=CHANNEL_TIMEOUT, sniffTimeout=SNIFF_TIMEOUT)
    return factory, sinks, results, clock


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 2, 0], [2, 0, 3, 1]])
def test_unstorableMigrationIsRefusedOnceUnderOneNumber(order: list[int]) -> None:
    """
    No sink for a migration (a read-only output folder): every channel of it
    is refused under the number its first channel got, with one error saying
    why and one result; the next migration from the host (the same VM
    again, so the same uuid) is stored.
    """
    factory, sinks, results, clock = _sinkFailureFactory(channels=3)
    migration = synthesizeMigration(seed=4, channels=3)
    with capturedLogs() as events:
        failed = MigrationPump(factory, migration, order=order, host="192.0.2.60", clock=clock)
        pumpAll(failed)
    lines = logged(events)
    assert sinks.asked == [1]
    assert [(r.info.number, r.complete) for r in results] == [(1, False)]
    assert results[0].error == ("cannot store migration 1 from 192.0.2.60: capture out/1: writing the"
                                " capture folder failed: Read-only file system")
    [error] = [line for line in lines if "cannot store" in line]
    assert error.endswith(": " + results[0].error)  # the channel's label, then why
    refusals = [e for e in events if "refused" in formatEvent(e)]
    assert len(refusals) == 3, lines
    assert all(formatEvent(e).endswith(": refused: it belongs to migration 1 from 192.0.2.60, which could not"
                                       " be stored (see above)") for e in refusals), lines
    # Only news after the error: every channel refused after the first says so
    # at info level.
    assert {e["log_level"] for e in refusals} == {LogLevel.info}
    assert all(connection.closed for connection in failed.connections)
    assert factory.migrations == [] and factory._refusedAssemblies == {}
    again = MigrationPump(factory, migration, order=order, host="192.0.2.60", clock=clock)
    pumpAll(again)
    assert [(r.info.number, r.complete, r.error) for r in results[1:]] == [(2, True, None)]
    assert sinks.sinks[0].memory() == migration.memory


def test_unstorableMigrationDoesNotHoldBackTheNextOne() -> None:
    """
    Only some channels of the refused migration came (its source gave up):
    the next migration from the host is not taken for the rest of it. Its
    channel 0, seen already, starts a new migration; after the channel
    timeout, anything does.
    """
    factory, sinks, results, clock = _sinkFailureFactory()
    migration = synthesizeMigration(seed=6)
    with capturedLogs() as events:
        pumpAll(MigrationPump(factory, [migration.streams[1]], host="192.0.2.61", clock=clock))
    assert [r.info.number for r in results] == [1]
    assert factory._refusedAssemblies["192.0.2.61"].multifd == {0}
    # The retry connects channel 0 first, as QEMU 9+ (multifd channels, then main).
    retry = MigrationPump(factory, migration, order=[1, 2, 0], host="192.0.2.61", clock=clock)
    pumpAll(retry)
    assert [(r.info.number, r.complete) for r in results] == [(1, False), (2, True)]
    assert sinks.sinks[0].memory() == migration.memory
    assert not [line for line in logged(events) if "refused" in line]

    # Refused again with only channel 1 in; a main channel first (7.2 order) would be
    # taken for the refused one's, until the channel timeout.
    factory, sinks, results, clock = _sinkFailureFactory()
    pumpAll(MigrationPump(factory, [migration.streams[2]], host="192.0.2.61", clock=clock))
    clock.advance(CHANNEL_TIMEOUT)
    retry = MigrationPump(factory, migration, host="192.0.2.61", clock=clock)
    pumpAll(retry)
    assert [(r.info.number, r.complete) for r in results] == [(1, False), (2, True)]
    assert sinks.sinks[0].memory() == migration.memory


def test_unstorableMigrationLeavesOtherHostsAlone() -> None:
    """
    The refusal is the host's: another host's migration, assembling at the
    same time, completes.
    """
    factory, sinks, results, clock = _sinkFailureFactory()
    bad, good = synthesizeMigration(seed=7), synthesizeMigration(seed=8)
    a = MigrationPump(factory, bad, order=[1, 0, 2], host="192.0.2.62", clock=clock)
    b = MigrationPump(factory, good, order=[2, 0, 1], host="192.0.2.63", clock=clock)
    pumpAll(a, b)
    assert sorted((r.info.peer, r.info.number, r.complete) for r in results) == [
        ("192.0.2.62", 1, False), ("192.0.2.63", 2, True)]
    assert sinks.sinks[0].memory() == good.memory


def test_thousandIdleConnectionsDoNotStopAMigration() -> None:
    """
    1,000 connections that send nothing, from the migration's own host and
    others: the migration completes, they are dropped at the sniff timeout,
    not before.
    """
    factory, sinks, results, clock = makeFactory(channels=4, sniffTimeout=30.0)
    migration = recorded("cap10-4")
    idle = [MigrationPump(factory, host=host, clock=clock) for host in ("127.0.0.1", "192.0.2.99")]
    links = [idle[n % 2].connect(close=False) for n in range(1000)]
    real = MigrationPump(factory, list(migration.streams), order=[4, 3, 2, 1, 0], chunkSizes=65536,
                         host="127.0.0.1", clock=clock)
    pumpAll(real, *idle, rounds=50)
    clock.advance(29.0)
    assert not any(link.closed for link in links)
    with capturedLogs() as events:
        clock.advance(1.0)
        pumpAll(*idle)
    assert all(link.closed for link in links)
    drops = [line for line in logged(events) if "not enough to tell its channel type; dropping it" in line]
    assert len(drops) == 1000
    pumpAll(real, *idle)
    [result] = results
    assert (result.complete, result.error) == (True, None)
    assert sinks.sinks[0].ram("pc.ram") == migration.memory
    assert factory.migrations == []


# Real sockets


def _raiseFileLimit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _waitForFile(path: Path, process: subprocess.Popen, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if process.poll() is not None:
            raise AssertionError(f"receiver exited early ({process.returncode})")
        time.sleep(0.02)
    raise AssertionError("receiver did not write its address file")


def test_thousandIdleTCPConnectionsDoNotStopAMigration(tmp_path: Path) -> None:
    """
    A receiver process with 1,000 idle TCP connections open: a recorded QEMU
    10.0 migration played over sockets completes exactly; the idle ones are
    closed by the receiver at the sniff timeout.
    """
    _raiseFileLimit(2500)
    migration = recorded("cap10-4")
    addressFile = tmp_path / "address"
    process = subprocess.Popen(
        [sys.executable, "-m", "twisted_multifd", "receive", "--listen", "tcp:0:interface=127.0.0.1:backlog=2048",
         "--channels", "4", "--output", str(tmp_path / "captures"), "--sniff-timeout", "10",
         "--address-file", str(addressFile)],
        # To a file: a pipe nobody reads would fill with the 1,000 log lines and stall the receiver.
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr", "w"),
    )
    idle: list[socket.socket] = []
    try:
        _, host, port = _waitForFile(addressFile, process).split(":")
        address = (host, int(port))
        started = time.monotonic()
        for _ in range(1000):
            idle.append(socket.create_connection(address, timeout=10))
        sockets = [socket.create_connection(address) for _ in range(migration.channels + 1)]
        # Multifd channels first, main last (QEMU 9+ order).
        for index, s in zip([*range(1, migration.channels + 1), 0], sockets):
            s.sendall(migration.streams[index])
        for s in sockets:
            s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 60
        manifest = None
        while time.monotonic() < deadline:
            found = list((tmp_path / "captures").glob("*/manifest.json"))
            if found:
                manifest = json.loads(found[0].read_text())
                break
            time.sleep(0.1)
        assert manifest is not None, "no capture"
        assert time.monotonic() - started < 10, "the migration should be done before the sniff timeout"
        assert (manifest["complete"], manifest["error"]) == (True, None)
        capture = found[0].parent
        block = {b["name"]: b for b in manifest["ram_blocks"]}["pc.ram"]
        assert (capture / block["file"]).read_bytes() == migration.memory
        for s in sockets:
            s.close()
        # Every idle connection is closed by the receiver at the sniff timeout.
        closed = 0
        deadline = time.monotonic() + 30
        pending = set(idle)
        while pending and time.monotonic() < deadline:
            for s in list(pending):
                readable, _, _ = select.select([s], [], [], 0)
                if readable:
                    try:
                        data = s.recv(1)
                    except ConnectionResetError:
                        data = b""
                    assert data == b""
                    pending.discard(s)
                    closed += 1
            time.sleep(0.2)
        assert closed == 1000
        assert time.monotonic() - started >= 10
        assert process.poll() is None  # still serving
    finally:
        for s in idle:
            s.close()
        process.terminate()
        process.wait(timeout=30)
    err = (tmp_path / "stderr").read_text()
    assert err.count("not enough to tell its channel type; dropping it") == 1000
    assert "complete" in err


def _captureFrom(folder: Path, streams: list[bytes] | tuple[bytes, ...], channels: int) -> Path:
    results: list = []
    factory = MigrationReceiverFactory(lambda info: CaptureWriter(str(folder)), channels=channels,
                                       clock=Clock(), onMigrationEnded=results.append)
    MigrationPump(factory, list(streams)).flush()
    assert results and results[0].complete, results
    return folder


@pytest_twisted.ensureDeferred
async def test_eightConcurrentSendersOverTCP(tmp_path: Path) -> None:
    """
    Our own sender, bound to 127.0.0.2..9, sends eight captures at once
    (recorded QEMU 10.0 / 7.2 and synthetic ones) into one receiver: eight
    captures, each byte-exact.
    """
    from twisted.internet import reactor

    sources: list[tuple[Path, dict[str, bytes]]] = []
    for n in range(8):
        folder = tmp_path / f"source-{n}"
        if n < 2:
            m = recorded(("cap10-4", "cap72-4")[n])
            _captureFrom(folder, m.streams, m.channels)
            sources.append((folder, {"pc.ram": m.memory}))
        else:
            s = synthesizeMigration(seed=n, convention="7.2" if n % 2 else "10.0", channels=4)
            _captureFrom(folder, s.streams, 4)
            sources.append((folder, dict(s.memory)))
    results: dict[str, Any] = {}
    allEnded: defer.Deferred[None] = defer.Deferred()

    def ended(result: Any) -> None:
        results[result.info.peer] = result
        if len(results) == 8:
            allEnded.callback(None)

    factory = MigrationReceiverFactory(
        lambda info: CaptureWriter(str(tmp_path / "received" / info.peer)), channels=4,
        onMigrationEnded=ended,
    )
    port = await endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    try:
        sends = [
            sendCapture(reactor, str(folder),
                        f"tcp:127.0.0.1:{port.getHost().port}:bindAddress=127.0.0.{n + 2}",
                        channels=4, progressInterval=None)
            for n, (folder, _) in enumerate(sources)
        ]
        await defer.gatherResults(sends, consumeErrors=True)
        await allEnded
    finally:
        await port.stopListening()
    assert sorted(results) == [f"127.0.0.{n + 2}" for n in range(8)]
    for n, (folder, memory) in enumerate(sources):
        result = results[f"127.0.0.{n + 2}"]
        assert (result.complete, result.error) == (True, None)
        received = tmp_path / "received" / f"127.0.0.{n + 2}"
        manifest = json.loads((received / "manifest.json").read_text())
        assert manifest["complete"] is True
        files = {b["name"]: b["file"] for b in manifest["ram_blocks"]}
        for name, content in memory.items():
            assert (received / files[name]).read_bytes() == content, (n, name)


@pytest.mark.qemu
def test_eightSendersAndARealQEMUIntoOneReceiver(tmp_path: Path, qemu_lab: Any, require_qemu: Any) -> None:
    """
    One receiver process (a service, one capture per migration): a real QEMU
    10.0 source (4 channels, from 127.0.0.1) and eight of our senders bound to
    127.0.0.2..9 migrate at the same time. Nine captures, each byte-exact.
    """
    from qemu_harness import MigrationSettings, memory_mismatch

    qemu = require_qemu("10.0")
    sources: list[tuple[Path, dict[str, bytes]]] = []
    for n in range(8):
        s = synthesizeMigration(seed=n, convention="7.2" if n % 2 else "10.0", channels=4)
        sources.append((_captureFrom(tmp_path / f"source-{n}", s.streams, 4), dict(s.memory)))
    backing, _ = qemu_lab.backing_file()
    output = tmp_path / "received"
    receiver = qemu_lab.start_receiver(4, output, once=False)
    target = receiver.wait_for_address()
    vm = qemu_lab.start_source(qemu, backing, MigrationSettings(channels=4))
    senders = [
        subprocess.Popen(
            [sys.executable, "-m", "twisted_multifd", "send", str(folder),
             "--to", f"{target}:bindAddress=127.0.0.{n + 2}", "--channels", "4"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"sender-{n}.log", "w"),
        )
        for n, (folder, _) in enumerate(sources)
    ]
    try:
        qemu_lab.migrate(vm, target)
        codes = [sender.wait(timeout=120) for sender in senders]
    finally:
        for sender in senders:
            if sender.poll() is None:
                sender.kill()
    assert codes == [0] * 8, [(tmp_path / f"sender-{n}.log").read_text() for n in range(8)]

    def captureOf(host: str) -> tuple[Path, dict]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = [p for p in output.glob(f"*-{host}-*/manifest.json")]
            if found:
                return found[0].parent, json.loads(found[0].read_text())
            time.sleep(0.1)
        raise AssertionError(f"no capture from {host}\n{qemu_lab.describe()}")

    folder, manifest = captureOf("127.0.0.1")
    assert (manifest["complete"], manifest["error"]) == (True, None), qemu_lab.describe()
    ram = {b["name"]: b for b in manifest["ram_blocks"]}["pc.ram"]
    mismatch = memory_mismatch(backing.read_bytes(), (folder / ram["file"]).read_bytes(), what="captured pc.ram")
    assert mismatch is None, mismatch
    for n, (_, memory) in enumerate(sources):
        folder, manifest = captureOf(f"127.0.0.{n + 2}")
        assert (manifest["complete"], manifest["error"]) == (True, None), n
        files = {b["name"]: b["file"] for b in manifest["ram_blocks"]}
        for name, content in memory.items():
            assert (folder / files[name]).read_bytes() == content, (n, name)
    assert len(list(output.glob("*/manifest.json"))) == 9

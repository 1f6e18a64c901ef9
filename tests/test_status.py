"""
C{--status}: GET /status and GET /metrics over real HTTP (treq), while a
migration is held in progress at a sync barrier, and after it completed.
"""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python import usage

from twisted_multifd._options import MultifdOptions
from twisted_multifd._receivecommand import _listeningService
from twisted_multifd.testing import synthesizeMigration


class Writer(Protocol):
    def __init__(self) -> None:
        self.lost: defer.Deferred = defer.Deferred()

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


def metricValues(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split()
            values[name] = float(value)
    return values


async def until(condition, what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.ensureDeferred
async def test_statusAndMetricsDuringAndAfterAMigration(tmp_path):
    options = MultifdOptions()
    options.parseOptions(["receive", "--listen", "tcp:0:interface=127.0.0.1", "--channels", "2",
                          "--output", str(tmp_path / "captures"), "--status", "tcp:0:interface=127.0.0.1"])
    service = _listeningService(options.subOptions, reactor, lambda result: None)
    service.startService()
    try:
        port = await service.whenListening
        base = f"http://127.0.0.1:{service.statusPort.getHost().port}"

        migration = synthesizeMigration(seed=7, convention="7.2", channels=2)
        streams = migration.streams
        client = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        writers = [await connectProtocol(client, Writer()) for _ in streams]
        # Main whole; each multifd channel only its first half: main waits at a sync
        # point for channels that have not reached their SYNC yet.
        held = [len(stream) // 2 for stream in streams[1:]]
        writers[0].transport.write(streams[0])
        for writer, stream, cut in zip(writers[1:], streams[1:], held):
            writer.transport.write(stream[:cut])
        factory = service.factory
        await until(lambda: factory.migrations and factory.migrations[0].status()["state"] == "loading"
                    and factory.migrations[0].status()["channels"]["main"] == "at-barrier", "main at a barrier")

        response = await treq.get(base + "/status")
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
        status = await response.json()
        [live] = status["in_progress"]
        assert live["source"] == "127.0.0.1" and live["state"] == "loading"
        assert live["expected_channels"] == 2
        assert set(live["channels"]) == {"main", "0", "1"}
        assert live["channels"]["main"] == "at-barrier"
        assert set(live["channels"].values()) <= {"connected", "at-barrier"}
        assert live["bytes"] > 0 and live["bytes"] <= sum(len(s) for s in streams)
        assert live["pages"]["total"] == sum(len(m) for m in migration.memory.values()) // 4096
        assert live["percent"] is not None and 0 <= live["percent"] < 100
        assert live["rate_bytes_per_second"] > 0 and live["error"] is None
        assert status["recent"] == []
        assert status["totals"]["migrations_in_progress"] == 1

        response = await treq.get(base + "/metrics")
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=0.0.4")
        text = await response.text()
        assert "# TYPE twisted_multifd_migrations_started_total counter" in text
        assert "# TYPE twisted_multifd_migrations_in_progress gauge" in text
        values = metricValues(text)
        assert values["twisted_multifd_migrations_started_total"] == 1
        assert values["twisted_multifd_migrations_in_progress"] == 1
        assert values["twisted_multifd_migrations_completed_total"] == 0
        assert values["twisted_multifd_channels_connected"] == 3
        assert values["twisted_multifd_received_bytes_total"] == live["bytes"]
        assert values["twisted_multifd_pages_received_total"] > 0

        # Let it finish.
        for writer, stream, cut in zip(writers[1:], streams[1:], held):
            writer.transport.write(stream[cut:])
        for writer in writers[1:] + writers[:1]:
            writer.transport.loseConnection()
            await writer.lost
        await until(lambda: not factory.migrations, "the migration to end")

        status = await (await treq.get(base + "/status")).json()
        assert status["in_progress"] == []
        [ended] = status["recent"]
        assert ended["state"] == "complete", ended["error"]
        assert ended["percent"] == 100.0 and ended["bytes"] == sum(len(s) for s in streams)
        assert ended["machine"] == "pc-i440fx-7.2"
        values = metricValues(await (await treq.get(base + "/metrics")).text())
        assert values["twisted_multifd_migrations_completed_total"] == 1
        assert values["twisted_multifd_migrations_in_progress"] == 0
        assert values["twisted_multifd_channels_connected"] == 0
        assert values["twisted_multifd_received_bytes_total"] == sum(len(s) for s in streams)
        assert values["twisted_multifd_pages_received_total"] == ended["pages"]["with_data"] + ended["pages"]["zero"]

        assert (await treq.get(base + "/nothing")).code == 404
    finally:
        await defer.maybeDeferred(service.stopService)


def test_statusEndpointIsChecked():
    with pytest.raises(usage.UsageError, match="--status 'nonsense:1' is not a server endpoint"):
        MultifdOptions().parseOptions(["receive", "--status", "nonsense:1"])


@pytest_twisted.ensureDeferred
async def test_statusEndpointInUse(tmp_path):
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.protocol import Factory

    busy = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
    try:
        options = MultifdOptions()
        options.parseOptions(["receive", "--listen", "tcp:0:interface=127.0.0.1", "--output", str(tmp_path),
                              "--status", f"tcp:{busy.getHost().port}:interface=127.0.0.1"])
        service = _listeningService(options.subOptions, reactor, lambda result: None)
        service.startService()
        with pytest.raises(RuntimeError, match="cannot serve the status page"):
            await service.whenListening
        await defer.maybeDeferred(service.stopService)
    finally:
        await busy.stopListening()


# The relay's status


class Recorder(Protocol):
    """
    One connection's far end (the destination, or the source's side of it):
    keeps what arrives.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_relayStatusAndMetricsWhileRelaying():
    """
    A migration held half-way through the relay (the source has sent half
    of each stream, the destination answered on the main channel), then
    finished: /status and /metrics say where it is, each way.
    """
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.protocol import Factory

    from twisted_multifd._relaycommand import _listeningService as relayService

    arrived: list[Recorder] = []

    def accepted() -> Recorder:
        arrived.append(Recorder())
        return arrived[-1]

    destination = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(accepted))
    options = MultifdOptions()
    options.parseOptions(["relay", "--listen", "tcp:0:interface=127.0.0.1", "--channels", "2",
                          "--to", f"tcp:127.0.0.1:{destination.getHost().port}",
                          "--status", "tcp:0:interface=127.0.0.1"])
    service = relayService(options.subOptions, reactor, lambda result: None)
    service.startService()
    try:
        port = await service.whenListening
        base = f"http://127.0.0.1:{service.statusPort.getHost().port}"
        migration = synthesizeMigration(seed=7, convention="7.2", channels=2)
        streams = migration.streams
        client = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        sources = [await connectProtocol(client, Recorder()) for _ in streams]
        halves = [len(stream) // 2 for stream in streams]
        # Multifd channels first: the migration waits, assembling, for its main channel.
        for source, stream, half in list(zip(sources, streams, halves))[1:]:
            source.transport.write(stream[:half])
        factory = service.factory
        await until(lambda: factory.migrations and len(factory.migrations[0].multifd) == 2, "the multifd channels")
        [live] = (await (await treq.get(base + "/status")).json())["in_progress"]
        assert live["state"] == "assembling"
        assert live["connections"]["main"] == {"state": "waiting", "to_destination": 0, "to_source": 0}
        assert {live["connections"][c]["state"] for c in ("0", "1")} == {"held"}

        sources[0].transport.write(streams[0][: halves[0]])
        await until(lambda: len(arrived) == 3 and [len(d.received) for d in arrived] == halves,
                    "half of each stream at the destination")
        arrived[0].transport.write(b"return path")
        await until(lambda: sources[0].received == b"return path", "the answer at the source")

        response = await treq.get(base + "/status")
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
        status = await response.json()
        [live] = status["in_progress"]
        assert live["number"] == 1 and live["source"] == "127.0.0.1" and live["state"] == "relaying"
        assert live["uuid"] == streams[1][8:24].hex() and live["expected_channels"] == 2
        assert live["connections"] == {
            "main": {"state": "relaying", "to_destination": halves[0], "to_source": len(b"return path")},
            "0": {"state": "relaying", "to_destination": halves[1], "to_source": 0},
            "1": {"state": "relaying", "to_destination": halves[2], "to_source": 0},
        }
        assert live["bytes_to_destination"] == sum(halves) and live["bytes_to_source"] == len(b"return path")
        assert live["rate_bytes_per_second"] > 0 and live["error"] is None
        assert status["recent"] == []
        assert status["totals"]["migrations_in_progress"] == 1 and status["totals"]["channels_connected"] == 3

        response = await treq.get(base + "/metrics")
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=0.0.4")
        text = await response.text()
        assert "# TYPE twisted_multifd_relayed_bytes_total counter" in text
        assert text.count("# TYPE twisted_multifd_relayed_bytes_total") == 1
        values = metricValues(text)
        assert values["twisted_multifd_migrations_started_total"] == 1
        assert values["twisted_multifd_migrations_in_progress"] == 1
        assert values["twisted_multifd_channels_connected"] == 3
        assert values['twisted_multifd_relayed_bytes_total{direction="to_destination"}'] == sum(halves)
        assert values['twisted_multifd_relayed_bytes_total{direction="to_source"}'] == len(b"return path")

        # Let it finish: the rest of each stream, then each side closes.
        for source, stream, half in zip(sources, streams, halves):
            source.transport.write(stream[half:])
            source.transport.loseConnection()
        for recorder in sources + arrived:
            await recorder.lost
        await until(lambda: not factory.migrations, "the migration to end")
        assert [d.received for d in arrived] == list(streams)

        status = await (await treq.get(base + "/status")).json()
        assert status["in_progress"] == []
        [ended] = status["recent"]
        assert ended["state"] == "complete", ended["error"]
        assert ended["bytes_to_destination"] == sum(len(s) for s in streams)
        assert ended["connections"]["1"] == {"state": "closed", "to_destination": len(streams[2]), "to_source": 0}
        values = metricValues(await (await treq.get(base + "/metrics")).text())
        assert values["twisted_multifd_migrations_completed_total"] == 1
        assert values["twisted_multifd_migrations_in_progress"] == 0
        assert values["twisted_multifd_channels_connected"] == 0
        assert values['twisted_multifd_relayed_bytes_total{direction="to_destination"}'] == sum(len(s) for s in streams)
        assert (await treq.get(base + "/nothing")).code == 404
    finally:
        await defer.maybeDeferred(service.stopService)
        await destination.stopListening()


def test_relayStatusEndpointIsChecked():
    with pytest.raises(usage.UsageError, match="--status 'nonsense:1' is not a server endpoint"):
        MultifdOptions().parseOptions(["relay", "--to", "tcp:127.0.0.1:1", "--status", "nonsense:1"])

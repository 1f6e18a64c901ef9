"""
TLS on the listening side, in-process over loopback: the receiver behind
L{twisted_multifd._tls.tlsServerFactory} sniffs decrypted bytes (main channel
last works inside TLS too), a channel ending with close_notify or with a bare
TCP close is a clean close, client certificates are checked with --tls-ca, and
the relay's listening side takes the same options.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Protocol
from twisted.python import usage

sys.path.insert(0, str(Path(__file__).parent))
from qemu_harness import write_tls_credentials

from twisted_multifd import MigrationReceiverFactory
from twisted_multifd._options import MultifdOptions
from twisted_multifd._tls import serverTLSOptions, tlsServerFactory
from twisted_multifd.testing import RecordingSink, synthesizeMigration


class Writer(Protocol):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.lost: defer.Deferred = defer.Deferred()
        self.reason = None

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        self.lost.callback(None)


def clientOptions(files, certificate: bool = True):
    ca = ssl.Certificate.loadPEM(files.ca_cert.read_bytes())
    client = None
    if certificate:
        qemu = files.qemu_dir
        client = ssl.PrivateCertificate.loadPEM(
            (qemu / "client-key.pem").read_bytes() + (qemu / "client-cert.pem").read_bytes()
        )
    return ssl.optionsForClientTLS("127.0.0.1", trustRoot=ca, clientCertificate=client)


async def play(files, factory, streams, order, *, certificate=True, closeNotify=True):
    """
    Each stream over its own TLS connection (in C{order}); close with a TLS
    close_notify (as QEMU 10.0) or by closing TCP under TLS (as QEMU 7.2).
    """
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        endpoint = wrapClientTLS(clientOptions(files, certificate), tcp)
        writers = []
        for index in order:
            writers.append(await connectProtocol(endpoint, Writer(streams[index])))
        for writer in sorted(writers, key=lambda w: w.data[:4] == b"QEVM"):
            if closeNotify:
                writer.transport.loseConnection()
            else:
                # Wait for the bytes to be out, then drop TCP under TLS: no close_notify.
                await deferLater(0.2)
                writer.transport.transport.loseConnection()
            await writer.lost
        return writers
    finally:
        await port.stopListening()


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


@pytest.fixture
def files(tmp_path: Path):
    return write_tls_credentials(tmp_path / "pki")


@pytest.mark.parametrize("convention,closeNotify", [("10.0", True), ("7.2", False), ("7.2", True)])
@pytest_twisted.ensureDeferred
async def test_mainLastInsideTLS(files, convention, closeNotify):
    migration = synthesizeMigration(seed=3, convention=convention, channels=3)
    sink = RecordingSink()
    receiver = MigrationReceiverFactory(lambda info: sink, channels=3)
    options = serverTLSOptions(str(files.server_cert), str(files.server_key), str(files.ca_cert))
    await play(files, tlsServerFactory(options, receiver), migration.streams, [2, 3, 1, 0], closeNotify=closeNotify)
    result = await sink.whenEnded()
    assert result.complete, result.error
    assert sink.memory() == migration.memory


@pytest_twisted.ensureDeferred
async def test_keyInTheCertificateFile(files, tmp_path):
    both = tmp_path / "both.pem"
    both.write_bytes(files.server_key.read_bytes() + files.server_cert.read_bytes())
    migration = synthesizeMigration(seed=5, convention="10.0", channels=1)
    sink = RecordingSink()
    receiver = MigrationReceiverFactory(lambda info: sink, channels=1)
    await play(files, tlsServerFactory(serverTLSOptions(str(both)), receiver), migration.streams, [0, 1],
               certificate=False)
    result = await sink.whenEnded()
    assert result.complete, result.error


@pytest_twisted.ensureDeferred
async def test_clientWithoutCertificateRefused(files, capsys):
    from twisted.logger import globalLogPublisher

    lines = []

    def observe(event):
        if event.get("log_namespace") == "twisted_multifd.tls":
            from twisted.logger import formatEvent

            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        migration = synthesizeMigration(seed=3, convention="10.0", channels=1)
        sink = RecordingSink()
        receiver = MigrationReceiverFactory(lambda info: sink, channels=1)
        options = serverTLSOptions(str(files.server_cert), str(files.server_key), str(files.ca_cert))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(tlsServerFactory(options, receiver))
        try:
            endpoint = wrapClientTLS(clientOptions(files, certificate=False),
                                     TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
            writer = await connectProtocol(endpoint, Writer(migration.streams[0]))
            await writer.lost
        finally:
            await port.stopListening()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not receiver.migrations and sink.result is None
    assert any("TLS handshake with 127.0.0.1:" in line and "connection refused" in line for line in lines), lines


def test_tlsOptionsNeedACertificate(files):
    with pytest.raises(usage.UsageError, match="--tls-ca needs --tls-cert"):
        MultifdOptions().parseOptions(["receive", "--tls-ca", str(files.ca_cert)])
    with pytest.raises(usage.UsageError, match="for TLS add --tls-cert"):
        MultifdOptions().parseOptions(["receive", "--listen", "ssl:4444:privateKey=k.pem"])
    with pytest.raises(usage.UsageError, match="cannot read the TLS certificate"):
        MultifdOptions().parseOptions(["receive", "--tls-cert", "/nonexistent.pem"])
    with pytest.raises(usage.UsageError, match="cannot load the TLS certificate"):
        MultifdOptions().parseOptions(["relay", "--to", "tcp:127.0.0.1:1", "--tls-cert", str(files.ca_cert)])


@pytest_twisted.ensureDeferred
async def test_relayListensWithTLS(files):
    """
    The relay's listening side with --tls-cert/--tls-ca: a source with a
    client certificate completes the handshake and its decrypted first bytes
    are sniffed (a multifd init packet joins a migration).
    """
    from twisted_multifd._relaycommand import _listeningService

    options = MultifdOptions()
    options.parseOptions(["relay", "--listen", "tcp:0:interface=127.0.0.1", "--to", "tcp:127.0.0.1:1",
                          "--channels", "1", "--tls-cert", str(files.server_cert), "--tls-key",
                          str(files.server_key), "--tls-ca", str(files.ca_cert)])
    service = _listeningService(options.subOptions, reactor, lambda result: None)
    service.startService()
    try:
        port = await service.whenListening
        migration = synthesizeMigration(seed=3, convention="10.0", channels=1)
        endpoint = wrapClientTLS(clientOptions(files), TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        writer = await connectProtocol(endpoint, Writer(migration.streams[1]))
        for _ in range(50):
            if service.factory.migrations:
                break
            await deferLater(0.05)
        assert service.factory.migrations, "the relay did not sniff the decrypted multifd init packet"
        await defer.maybeDeferred(service.stopService)  # ends the migration, drops its connections
        await writer.lost
    finally:
        await defer.maybeDeferred(service.stopService)

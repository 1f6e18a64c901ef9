"""
TLS for the listening side (receiver and relay): QEMU's C{tls-creds}.

The TLS layer wraps the receiver's (or relay's) factory, so the channel
sniffer sees decrypted bytes and channel order does not matter inside TLS
either. Any listening endpoint (C{tcp:}, C{unix:}) can carry TLS this way.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import ssl
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

log = Logger(namespace="twisted_multifd.tls")


def _readPEM(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the TLS {what} {path}: {e.strerror or e}") from None


def serverTLSOptions(cert: str, key: str | None = None, ca: str | None = None) -> Any:
    """
    Server TLS options from PEM files.

    @param cert: the server certificate (may also hold the key, and chain
        certificates after the first).
    @param key: the private key; defaults to C{cert}.
    @param ca: CA certificate(s): when given, every client must present a
        certificate signed by one of them (QEMU: C{client-cert.pem} in the
        C{tls-creds-x509} directory).
    @raise ValueError: a file is missing or unusable (message names it).
    """
    certPEM = _readPEM(cert, "certificate")
    keyPEM = certPEM if key is None else _readPEM(key, "key")
    try:
        certificate = ssl.PrivateCertificate.loadPEM(keyPEM + b"\n" + certPEM if key is not None else certPEM)
    except Exception as e:
        raise ValueError(f"cannot load the TLS certificate {cert} with key {key or cert}: {e}") from None
    kwargs: dict[str, Any] = {}
    if ca is not None:
        caPEM = _readPEM(ca, "CA certificate")
        try:
            authorities = [ssl.Certificate.loadPEM(block) for block in _pemBlocks(caPEM)]
        except Exception as e:
            raise ValueError(f"cannot load the TLS CA certificate {ca}: {e}") from None
        if not authorities:
            raise ValueError(f"no certificate in the TLS CA file {ca}")
        kwargs = {"verify": True, "caCerts": [a.original for a in authorities], "requireCertificate": True}
    return ssl.CertificateOptions(
        privateKey=certificate.privateKey.original, certificate=certificate.original,
        # TLS 1.2 at most: under TLS 1.3 OpenSSL sends NewSessionTicket messages
        # after the handshake (pyOpenSSL cannot turn them off), a QEMU source
        # never reads its migration sockets, and Linux answers its close() of
        # a socket with unread data with a reset that discards the end of the
        # stream. See docs/tls.md.
        lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_2,
        **kwargs,
    )


def _pemBlocks(data: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    blocks = []
    for part in data.split(end)[:-1]:
        start = part.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            blocks.append(part[start:] + end + b"\n")
    return blocks


def _errorText(value: BaseException) -> str:
    """
    Every string in an OpenSSL error (pyOpenSSL's error queue entries have
    varied in shape across versions).
    """
    texts: list[str] = []

    def walk(item: Any) -> None:
        if isinstance(item, (list, tuple)):
            for each in item:
                walk(each)
        elif item is not None:
            texts.append(str(item))

    walk(getattr(value, "args", ()))
    return "; ".join(text for text in texts if text) or type(value).__name__


def _isEOF(value: BaseException) -> bool:
    """
    Does this OpenSSL error mean the peer closed TCP without a close_notify?
    (Twisted's own check breaks on some pyOpenSSL error shapes.)
    """
    text = _errorText(value).lower()
    args: Any = getattr(value, "args", ())
    return "unexpected eof" in text or (bool(args) and isinstance(args[0], list) and not args[0])


class MigrationTLSProtocol(BufferingTLSTransport):
    """
    The server side of one TLS connection; see L{tlsServerFactory}.
    """

    # Replaces TLSMemoryBIOProtocol._tlsShutdownFinished (same steps), whose
    # EOF check raises on some pyOpenSSL error shapes.
    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        transport: Any = self.transport
        if reason is not None:
            eof = _isEOF(reason.value)
            if not self._handshakeDone:
                if not getattr(self, "_loggedFailure", False):
                    self._loggedFailure = True
                    peer: Any = transport.getPeer() if transport is not None else None
                    where = f"{peer.host}:{peer.port}" if hasattr(peer, "host") else str(peer)
                    error = "the client closed the connection" if eof else _errorText(reason.value)
                    log.error("TLS handshake with {peer} failed, connection refused: {error}",
                              peer=where, error=error)
                if eof:
                    reason = Failure(ConnectionLost("TLS handshake not completed"))
            elif eof:
                tcp = getattr(self, "_tcpReason", None)
                if tcp is not None and not tcp.check(ConnectionDone):
                    reason = tcp  # a reset is not a clean close
                else:
                    reason = Failure(ConnectionDone("connection closed without TLS close_notify"))
        if self._reason is None:
            self._reason = reason  # type: ignore[assignment]
        self._lostTLSConnection = True
        self._flushSendBIO()
        transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if reason is None:
            reason = Failure(ConnectionDone())
        self._tcpReason = reason
        super().connectionLost(reason)


def tlsServerFactory(options: Any, wrapped: Any, clock: Any = None) -> Any:
    """
    C{wrapped} (a receiver or relay factory) behind a TLS server layer.

    Two differences with a plain L{TLSMemoryBIOFactory}:
      - a connection whose peer closes TCP without a TLS close_notify after
        the handshake (QEMU up to 9.2, which never sends one) ends with
        L{ConnectionDone}, as if it had; the migration protocols themselves
        tell a complete stream from a truncated one. A close_notify (QEMU 10.0
        sends one on each multifd channel) is a clean close too.
      - a failed handshake (no or bad client certificate, wrong protocol)
        is logged with the peer address and the reason.
    """
    factory = TLSMemoryBIOFactory(options, False, wrapped, clock)
    factory.protocol = MigrationTLSProtocol
    return factory


__all__ = ["MigrationTLSProtocol", "serverTLSOptions", "tlsServerFactory"]

"""
C{twisted-multifd receive}: receive migrations into captures, from the
command line or as a twistd service.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from ._compression import SUPPORTED_COMPRESSION
from ._progress import PROGRESS_PARAMETER, resolveProgressMode
from ._options import DEFAULT_LISTEN, TLS_PARAMETERS, channelCount, positiveFloat
from ._records import MigrationResult
from ._capture import captureIsComplete
from ._service import (
    ListeningService,
    asTwistdService,
    checkListeningOptions,
    makeReceiverFactory,
    runListening,
)


def nonNegativeFloat(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be a number of seconds, 0 or more")
    return number


def positiveInt(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


class ReceiveOptions(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Receive QEMU live migrations (plain or multifd) on one port, whatever order the"
        " source's connections arrive in, and write each into a capture directory."
    )
    optParameters = [
        ["listen", "l", DEFAULT_LISTEN,
         "Where to listen: a Twisted endpoint string such as tcp:4444:interface=127.0.0.1 or unix:/run/mig.sock."],
        ["channels", "c", 2,
         "Multifd channels per migration, as the source's multifd-channels (QEMU's default is 2);"
         " 0 receives plain migrations (multifd capability off).", channelCount],
        ["output", "o", "captures",
         "Capture directory: with --once the capture itself, otherwise one sub-folder per migration."],
        ["compression", None, "auto",
         "Multifd compression the source uses: auto (accept the source's), " + ", ".join(SUPPORTED_COMPRESSION) + "."],
        ["page-size", None, 4096, "Source target page size in bytes (4096 on x86).", int],
        ["sniff-timeout", None, 120.0,
         "Seconds a connection has to send its first 4 bytes, and a multifd channel its 64-byte"
         " initial packet (QEMU 9+ keeps the main channel silent until every multifd channel is"
         " connected).", positiveFloat],
        ["channel-timeout", None, 60.0,
         "Seconds a migration waits for missing channels, and at the end for channels to close.",
         positiveFloat],
        ["idle-timeout", None, 300.0,
         "Seconds a loading migration may receive nothing on any of its connections before it is"
         " dropped as stalled; 0 waits for ever (raise it for a source paused with"
         " pause-before-switchover).", nonNegativeFloat],
        ["max-migrations", None, 16,
         "Migrations at once (assembling or loading); a connection that would start one more is"
         " refused.", positiveInt],
        ["max-waiting-channels", None, 256,
         "Connections waiting for the other channels of their migration, over all migrations; one"
         " more is refused.", positiveInt],
        PROGRESS_PARAMETER,
        ["progress-interval", None, 10.0, "Seconds between progress log lines (--progress log).", positiveFloat],
        ["address-file", None, None,
         "Once listening, write the address (tcp:HOST:PORT or unix:PATH) to this file."],
        *TLS_PARAMETERS,
        ["status", None, None,
         "Serve GET /status (JSON) and GET /metrics (Prometheus) over HTTP on this endpoint,"
         " e.g. tcp:8080:interface=127.0.0.1."],
    ]
    optFlags = [
        ["once", None, "Receive one migration into --output, then exit: status 0 only if the capture is complete."],
    ]

    def run(self, reactor: Any) -> Any:
        return runReceive(reactor, self)

    def makeService(self, reactor: Any) -> IService:
        return makeReceiveService(self, reactor)

    def postOptions(self) -> None:
        checkListeningOptions(self)
        if self["max-waiting-channels"] < self["channels"] + 1:
            raise usage.UsageError(
                f"--max-waiting-channels must be at least --channels + 1 ({self['channels'] + 1})")
        if self["compression"] != "auto" and self["compression"] not in SUPPORTED_COMPRESSION:
            raise usage.UsageError(
                f"--compression must be auto, {', '.join(SUPPORTED_COMPRESSION)}; not {self['compression']!r}"
            )
        size = self["page-size"]
        if size < 1024 or size & (size - 1):
            raise usage.UsageError(f"--page-size must be a power of two of at least 1024, not {size}")


def _listeningService(options: "ReceiveOptions", reactor: Any, ended: Any, *, underTwistd: bool = False) -> ListeningService:
    return ListeningService(
        serverFromString(reactor, options["listen"]), makeReceiverFactory(options, reactor, ended),
        addressFile=options["address-file"], progressInterval=options["progress-interval"], clock=reactor,
        description=f"receiving migrations with {options['channels']} multifd channels", role="receiver",
        tls=getattr(options, "tls", None),
        statusEndpoint=None if options["status"] is None else serverFromString(reactor, options["status"]),
        progress=resolveProgressMode(options["progress"], sys.stderr, underTwistd),
    )


async def runReceive(reactor: Any, options: "ReceiveOptions") -> int:
    if options["once"] and captureIsComplete(options["output"]):
        sys.stderr.write(f"twisted-multifd: error: {options['output']} already holds a complete capture\n")
        return 2
    first: Deferred[MigrationResult] | None = Deferred() if options["once"] else None

    def ended(result: MigrationResult) -> None:
        # With --once only the first migration counts; later ones are refused
        # (and reported) while it runs.
        if first is not None and not first.called and result.info.number == 1:
            first.callback(result)

    result = await runListening(reactor, _listeningService(options, reactor, ended, underTwistd=False),
                                options["listen"], first)
    if result is None:
        return 2
    return 0 if result.complete else 1


def makeReceiveService(options: "ReceiveOptions", reactor: Any) -> IService:
    """
    C{twistd -n multifd receive [options]}.
    """

    def ended(result: MigrationResult) -> None:
        if options["once"] and result.info.number == 1:
            reactor.callLater(0, reactor.stop)

    return asTwistdService(_listeningService(options, reactor, ended, underTwistd=True), reactor, options["listen"])

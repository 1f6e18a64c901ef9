"""
C{twisted-multifd relay}: relay migrations to a QEMU destination, main channel
first, from the command line or as a twistd service.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.python import usage

from ._progress import PROGRESS_PARAMETER, resolveProgressMode
from ._options import DEFAULT_LISTEN, TLS_PARAMETERS, channelCount, positiveFloat
from ._relay import (
    DEFAULT_CHANNEL_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_SNIFF_TIMEOUT,
    RelayFactory,
    RelayResult,
)
from ._service import ListeningService, asTwistdService, checkListeningOptions, runListening


class RelayOptions(usage.Options):
    synopsis = "--to ENDPOINT [options]"
    longdesc = (
        "Accept a QEMU source's migration connections in any order, then connect them to the"
        " destination QEMU main channel first and the multifd channels in channel-id order, and"
        " relay the bytes unchanged. Lets QEMU destinations up to 7.2 survive connections that the"
        " network reordered."
    )
    optParameters = [
        ["listen", "l", DEFAULT_LISTEN,
         "Where the source connects: a Twisted endpoint string such as tcp:4444:interface=0.0.0.0."],
        ["to", "t", None,
         "Where the destination QEMU listens (required): tcp:HOST:PORT, or unix:PATH for"
         " -incoming unix:PATH (its accept order is certain)."],
        ["channels", "c", 2,
         "Multifd channels per migration, as the source's multifd-channels (QEMU's default is 2);"
         " 0 relays plain migrations (multifd capability off).", channelCount],
        ["sniff-timeout", None, DEFAULT_SNIFF_TIMEOUT,
         "Seconds a connection has to send its first 4 bytes and, if it is a multifd channel, the"
         " rest of its 64-byte initial packet (QEMU 9+ keeps the main channel silent until every"
         " multifd channel is connected).", positiveFloat],
        ["channel-timeout", None, DEFAULT_CHANNEL_TIMEOUT,
         "Seconds a migration waits for its missing channels.", positiveFloat],
        ["connect-timeout", None, DEFAULT_CONNECT_TIMEOUT,
         "Seconds each connection to the destination may take.", positiveFloat],
        # The shared option, but a relay knows no RAM total: no percent, no ETA.
        [*PROGRESS_PARAMETER[:3],
         "How to show progress: tty (one status line per migration on stderr, redrawn in place:"
         " bytes relayed to the destination, rate, channels in), log (a line every"
         " --progress-interval seconds), off, or auto (tty if stderr is a terminal, else log;"
         " under twistd always log)."],
        ["progress-interval", None, 10.0, "Seconds between progress log lines (--progress log).", positiveFloat],
        ["address-file", None, None,
         "Once listening, write the address (tcp:HOST:PORT or unix:PATH) to this file."],
        *TLS_PARAMETERS,
        ["status", None, None,
         "Serve GET /status (JSON) and GET /metrics (Prometheus) over HTTP on this endpoint,"
         " e.g. tcp:8080:interface=127.0.0.1."],
    ]
    optFlags = [
        ["once", None, "Relay one migration, then exit: status 0 only if it ended cleanly."],
    ]

    def run(self, reactor: Any) -> Any:
        return runRelay(reactor, self)

    def makeService(self, reactor: Any) -> IService:
        return makeRelayService(self, reactor)

    def postOptions(self) -> None:
        checkListeningOptions(self)
        if not self["to"]:
            raise usage.UsageError("--to is required: where the destination QEMU listens (tcp:HOST:PORT or unix:PATH)")
        try:
            # Syntax only: endpoint constructors keep the reactor for later,
            # and importing the global one here would pre-empt twistd's choice.
            clientFromString(None, self["to"])
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--to {self['to']!r} is not a client endpoint: {e}")


def makeRelayFactory(
    options: Any, reactor: Any, onMigrationEnded: Callable[[RelayResult], None] | None = None
) -> RelayFactory:
    return RelayFactory(
        options["to"],
        channels=options["channels"],
        sniffTimeout=options["sniff-timeout"],
        channelTimeout=options["channel-timeout"],
        connectTimeout=options["connect-timeout"],
        onMigrationEnded=onMigrationEnded,
        reactor=reactor,
    )


def _listeningService(options: "RelayOptions", reactor: Any, ended: Callable[[RelayResult], None], *,
                      underTwistd: bool = False) -> ListeningService:
    factory = makeRelayFactory(options, reactor, ended)
    service = ListeningService(
        serverFromString(reactor, options["listen"]), factory,
        addressFile=options["address-file"], progressInterval=options["progress-interval"], clock=reactor,
        description=f"relaying migrations with {factory.channels} multifd channels to {factory.upstreamName},"
                    " main channel first",
        role="relay", tls=getattr(options, "tls", None),
        progress=resolveProgressMode(options["progress"], sys.stderr, underTwistd),
    )
    if options["status"] is not None:
        from ._status import RelayStatusTracker  # twisted.web only when asked for

        # ListeningService makes a receiver's tracker from its statusEndpoint
        # argument; the relay's migrations need the relay's tracker, so both
        # are set here (startService serves whatever tracker it holds).
        service.statusTracker = RelayStatusTracker(factory, reactor)
        service.statusEndpoint = serverFromString(reactor, options["status"])
    return service


async def runRelay(reactor: Any, options: "RelayOptions") -> int:
    first: Deferred[RelayResult] | None = Deferred() if options["once"] else None

    def ended(result: RelayResult) -> None:
        # With --once only the first migration counts.
        if first is not None and not first.called and result.number == 1:
            first.callback(result)

    result = await runListening(reactor, _listeningService(options, reactor, ended, underTwistd=False),
                                options["listen"], first)
    if result is None:
        return 2
    return 0 if result.clean else 1


def makeRelayService(options: "RelayOptions", reactor: Any) -> IService:
    """
    C{twistd -n multifd relay [options]}.
    """

    def ended(result: RelayResult) -> None:
        if options["once"] and result.number == 1:
            reactor.callLater(0, reactor.stop)

    return asTwistdService(_listeningService(options, reactor, ended, underTwistd=True), reactor, options["listen"])

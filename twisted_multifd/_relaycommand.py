"""
C{twisted-multifd relay}: relay migrations to a QEMU destination, main channel
first, from the command line or as a twistd service.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.task import LoopingCall
from twisted.python import usage

from ._errors import MigrationError
from ._options import DEFAULT_LISTEN, channelCount, positiveFloat
from ._relay import (
    DEFAULT_CHANNEL_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_SNIFF_TIMEOUT,
    RelayFactory,
    RelayResult,
    log,
)
from ._service import describeAddress, writeAddressFile


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
         "Seconds a connection has to send its first 4 bytes.", positiveFloat],
        ["channel-timeout", None, DEFAULT_CHANNEL_TIMEOUT,
         "Seconds a migration waits for its missing channels.", positiveFloat],
        ["connect-timeout", None, DEFAULT_CONNECT_TIMEOUT,
         "Seconds each connection to the destination may take.", positiveFloat],
        ["progress-interval", None, 10.0, "Seconds between progress log lines.", positiveFloat],
        ["address-file", None, None,
         "Once listening, write the address (tcp:HOST:PORT or unix:PATH) to this file."],
    ]
    optFlags = [
        ["once", None, "Relay one migration, then exit: status 0 only if it ended cleanly."],
    ]

    def run(self, reactor: Any) -> Any:
        return runRelay(reactor, self)

    def makeService(self, reactor: Any) -> IService:
        return makeRelayService(self, reactor)

    def postOptions(self) -> None:
        if not self["to"]:
            raise usage.UsageError("--to is required: where the destination QEMU listens (tcp:HOST:PORT or unix:PATH)")
        try:
            # Syntax only: endpoint constructors keep the reactor for later,
            # and importing the global one here would pre-empt twistd's choice.
            clientFromString(None, self["to"])
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--to {self['to']!r} is not a client endpoint: {e}")


class RelayService(Service):
    """
    Listens with a relay factory; announces the address (log line and
    optional address file) and logs progress while it runs.

    @ivar whenListening: fires with the listening port, or fails.
    """

    def __init__(self, endpoint: Any, factory: RelayFactory, *, addressFile: str | None,
                 progressInterval: float, clock: Any) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.addressFile = addressFile
        self.whenListening: Deferred[Any] = Deferred()
        self._interval = progressInterval
        self._progress = LoopingCall(self._report)
        self._progress.clock = clock
        self._port: Any = None

    def _report(self) -> None:
        for migration in self.factory.migrations:
            log.info("{line}", line=migration.progressLine())

    def startService(self) -> None:
        super().startService()
        d = self.endpoint.listen(self.factory)

        def listening(port: Any) -> Any:
            self._port = port
            address = port.getHost()
            writeAddressFile(self.addressFile, address)
            log.info("listening on {address}; relaying migrations with {n} multifd channels to {upstream},"
                     " main channel first", address=describeAddress(address), n=self.factory.channels,
                     upstream=self.factory.upstreamName)
            self._progress.start(self._interval, now=False)
            return port

        d.addCallback(listening)
        d.chainDeferred(self.whenListening)

    def stopService(self) -> Any:
        if not self.running:
            return None
        super().stopService()
        if self._progress.running:
            self._progress.stop()
        # Migrations cut short by a stop end with a line that says so, and
        # their connections are reset (the source must not see a clean end).
        for migration in list(self.factory.migrations):
            migration.fail(MigrationError("the relay was stopped", connection=migration.label))
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None


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


def _makeService(options: Any, reactor: Any, ended: Callable[[RelayResult], None]) -> RelayService:
    return RelayService(
        serverFromString(reactor, options["listen"]), makeRelayFactory(options, reactor, ended),
        addressFile=options["address-file"], progressInterval=options["progress-interval"], clock=reactor,
    )


async def runRelay(reactor: Any, options: "RelayOptions") -> int:
    done: Deferred[RelayResult] = Deferred()

    def ended(result: RelayResult) -> None:
        # With --once only the first migration counts.
        if options["once"] and not done.called and result.number == 1:
            done.callback(result)

    service = _makeService(options, reactor, ended)
    service.startService()
    # Ctrl-C or SIGTERM: migrations in progress end as failed, each with its line.
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    try:
        await service.whenListening
    except Exception as e:
        sys.stderr.write(f"twisted-multifd: error: cannot listen on {options['listen']}: {e}\n")
        return 2
    if not options["once"]:
        await Deferred()  # until interrupted
    result = await done
    await maybeDeferred(service.stopService)
    return 0 if result.clean else 1


def makeRelayService(options: "RelayOptions", reactor: Any) -> IService:
    """
    C{twistd -n multifd relay [options]}.
    """

    def ended(result: RelayResult) -> None:
        if options["once"] and result.number == 1:
            reactor.callLater(0, reactor.stop)

    service = _makeService(options, reactor, ended)

    def cannotListen(failure: Any) -> None:
        log.error("cannot listen on {listen}: {error}", listen=options["listen"], error=failure.getErrorMessage())
        reactor.stop()

    service.whenListening.addErrback(cannotListen)
    return service

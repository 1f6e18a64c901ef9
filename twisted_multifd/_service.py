"""
Building a running receiver from options: used by the command line and by
the twistd plugin (C{twistd -n multifd receive ...}).
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any, Callable

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from ._capture import CaptureWriter
from ._errors import MigrationError
from ._options import MultifdOptions as Options
from ._options import checkTLSOptions
from ._progress import TerminalProgress, checkProgressMode
from ._receiver import MigrationReceiverFactory
from ._records import MigrationInfo, MigrationResult

log = Logger(namespace="twisted_multifd.service")


def captureSinkFactory(output: str, once: bool) -> Callable[[MigrationInfo], CaptureWriter]:
    """
    With C{once}, the first migration is written into C{output} itself and any
    other is refused; otherwise each migration gets its own sub-folder named
    after its start time, source and number.
    """
    taken: list[int] = []

    def makeSink(info: MigrationInfo) -> CaptureWriter:
        if once:
            if taken:
                raise MigrationError(
                    f"receiving one migration only (--once); migration {taken[0]} is already being received"
                )
            taken.append(info.number)
            return CaptureWriter(output)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(info.startedAt))
        host = re.sub(r"[^A-Za-z0-9.-]+", "_", info.peer)
        return CaptureWriter(os.path.join(output, f"{stamp}-{host}-{info.number}"))

    return makeSink


def describeAddress(address: Any) -> str:
    host = getattr(address, "host", None)
    if host is not None:
        return f"tcp:{host}:{address.port}"
    name = getattr(address, "name", None) or b""
    return "unix:" + (name.decode("utf-8", "replace") if isinstance(name, bytes) else name)


def makeReceiverFactory(
    options: Any, reactor: Any, onMigrationEnded: Callable[[MigrationResult], None] | None = None
) -> MigrationReceiverFactory:
    return MigrationReceiverFactory(
        captureSinkFactory(options["output"], options["once"]),
        channels=options["channels"],
        compression=options["compression"],
        pageSize=options["page-size"],
        sniffTimeout=options["sniff-timeout"],
        channelTimeout=options["channel-timeout"],
        idleTimeout=options.get("idle-timeout", 300.0) or None,
        maxMigrations=options.get("max-migrations", 16),
        maxWaitingChannels=options.get("max-waiting-channels", 256),
        onMigrationEnded=onMigrationEnded,
        clock=reactor,
    )


def tlsFromOptions(options: Any) -> Any:
    """
    Server TLS options from --tls-cert/--tls-key/--tls-ca, or L{None}.

    @raise usage.UsageError: a file is missing or unusable.
    """
    if options.get("tls-cert") is None:
        return None
    from ._tls import serverTLSOptions

    try:
        return serverTLSOptions(options["tls-cert"], options["tls-key"], options["tls-ca"])
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def checkListeningOptions(options: Any) -> None:
    """
    What C{receive} and C{relay} check alike: the TLS files (loaded into
    C{options.tls}), C{--progress}, and the syntax of C{--status}.

    @raise usage.UsageError: for the first option that is wrong.
    """
    checkTLSOptions(options)
    try:
        checkProgressMode(options["progress"])
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
    options.tls = tlsFromOptions(options)
    if options["status"] is not None:
        try:
            # Syntax only: endpoint constructors keep the reactor for later,
            # and importing the global one here would pre-empt twistd's choice.
            serverFromString(None, options["status"])
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--status {options['status']!r} is not a server endpoint: {e}")


def writeAddressFile(path: str | None, address: Any) -> None:
    if path:
        temporary = f"{path}.tmp"  # renamed into place: readers never see half an address
        with open(temporary, "w") as f:
            f.write(describeAddress(address) + "\n")
        os.replace(temporary, path)


class ListeningService(Service):
    """
    Listens with a receiver or relay factory, announces the address (a log
    line, and the address file if asked), shows each migration's progress
    (log lines or status lines on a terminal), and on stop ends the
    migrations in progress as failed, so that each says so.

    @param factory: has C{migrations}, each with C{progressLine()} and
        C{fail(error)}.
    @param role: what is listening, for the log and the reason given to
        migrations cut short ("receiver", "relay").
    @param tls: server TLS options (L{twisted_multifd._tls.serverTLSOptions}):
        listen with TLS in front of C{factory}, or L{None}.
    @param statusEndpoint: where to serve C{/status} and C{/metrics} over
        HTTP (docs/status.md), or L{None}; C{factory} must then be a receiver
        factory (its migrations have C{status()}).
    @param progress: C{"log"} (a C{progressLine()} per migration every
        C{progressInterval} seconds), C{"tty"} (L{TerminalProgress}: a status
        line per migration redrawn on C{progressStream}) or C{"off"}; see
        L{resolveProgressMode} for C{--progress auto}.
    @param progressStream: the terminal for C{"tty"}; by default
        C{sys.stderr}, which is then replaced, while the service runs, by a
        stream that clears the status lines before anything (a log line) is
        written.
    @ivar whenListening: fires with the listening port, or fails.
    """

    def __init__(self, endpoint: Any, factory: Any, *, addressFile: str | None, progressInterval: float,
                 clock: Any, description: str, role: str, tls: Any = None,
                 statusEndpoint: Any = None, progress: str = "log", progressStream: Any = None) -> None:
        if progress not in ("tty", "log", "off"):
            raise ValueError(f"progress must be tty, log or off, not {progress!r}")
        self.endpoint = endpoint
        self.tls = tls
        self.statusEndpoint = statusEndpoint
        self.statusTracker: Any = None
        self.statusPort: Any = None
        if statusEndpoint is not None:
            from ._status import StatusTracker

            self.statusTracker = StatusTracker(factory, clock)
        self.factory = factory
        self.addressFile = addressFile
        self.description = description
        self.role = role
        self.whenListening: Deferred[Any] = Deferred()
        self._interval = progressInterval
        self.clock = clock
        self._logProgress = LoopingCall(self._report)
        self._logProgress.clock = clock
        self.progressMode = progress
        self._progressStream = progressStream
        self.terminal: TerminalProgress | None = None
        self._replacedStderr: Any = None
        self._port: Any = None

    def _report(self) -> None:
        for migration in self.factory.migrations:
            log.info("{line}", line=migration.progressLine())

    def _startProgress(self) -> None:
        if self.progressMode == "log":
            self._logProgress.start(self._interval, now=False)
        elif self.progressMode == "tty":
            stream = self._progressStream
            if stream is None:
                stream = sys.stderr
            self.terminal = TerminalProgress(lambda: self.factory.migrations, self.clock, stream)
            if self._progressStream is None:
                # Log lines (and any other error line) go through it, and so
                # clear the status lines first.
                self._replacedStderr, sys.stderr = sys.stderr, self.terminal.lines
            self.terminal.start()

    def _stopProgress(self) -> None:
        if self._logProgress.running:
            self._logProgress.stop()
        if self.terminal is not None:
            terminal, self.terminal = self.terminal, None
            terminal.stop()
            if self._replacedStderr is not None:
                if sys.stderr is terminal.lines:
                    sys.stderr = self._replacedStderr
                self._replacedStderr = None

    def startService(self) -> None:
        super().startService()
        factory = self.factory
        if self.tls is not None:
            from ._tls import tlsServerFactory

            factory = tlsServerFactory(self.tls, factory, self.clock)
        d = self.endpoint.listen(factory)

        def listening(port: Any) -> Any:
            self._port = port
            address = port.getHost()
            writeAddressFile(self.addressFile, address)
            log.info("listening on {address}{tls}; {description}", address=describeAddress(address),
                     tls=" with TLS" if self.tls is not None else "", description=self.description)
            self._startProgress()
            return port

        d.addCallback(listening)
        if self.statusEndpoint is not None:
            d.addCallback(lambda port: Deferred.fromCoroutine(self._listenStatus(port)))
        d.chainDeferred(self.whenListening)

    async def _listenStatus(self, port: Any) -> Any:
        from ._status import statusSite

        try:
            self.statusPort = await self.statusEndpoint.listen(statusSite(self.statusTracker))
        except Exception as e:
            await maybeDeferred(port.stopListening)
            self._port = None
            self._stopProgress()
            raise RuntimeError(f"cannot serve the status page: {e}") from e
        address = self.statusPort.getHost()
        log.info("status on http://{host}:{port}/status and /metrics", host=getattr(address, "host", "?"),
                 port=getattr(address, "port", "?"))
        return port

    def stopService(self) -> Any:
        if not self.running:
            return None
        super().stopService()
        stopping = []
        if self.statusPort is not None:
            statusPort, self.statusPort = self.statusPort, None
            stopping.append(maybeDeferred(statusPort.stopListening))
        self._stopProgress()
        for migration in list(self.factory.migrations):
            migration.fail(MigrationError(f"the {self.role} was stopped", connection=migration.label))
        if self._port is not None:
            port, self._port = self._port, None
            stopping.append(maybeDeferred(port.stopListening))
        if stopping:
            return gatherResults(stopping)
        return None


async def runListening(reactor: Any, service: ListeningService, listen: str, first: Deferred[Any] | None) -> Any:
    """
    The command line's way to run a service: start it, and stop it (ending
    migrations in progress) on Ctrl-C or SIGTERM. Returns L{None} if it could
    not listen; otherwise, with C{first} (--once), what C{first} fires with;
    without, runs until interrupted.
    """
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    try:
        await service.whenListening
    except Exception as e:
        sys.stderr.write(f"twisted-multifd: error: cannot listen on {listen}: {e}\n")
        return None
    if first is None:
        await Deferred()  # until interrupted
    result = await first
    await maybeDeferred(service.stopService)
    return result


def asTwistdService(service: ListeningService, reactor: Any, listen: str) -> ListeningService:
    """
    Under twistd: a service that cannot listen stops the reactor with a clear
    line, rather than leaving twistd running idle.
    """

    def cannotListen(failure: Any) -> None:
        log.error("cannot listen on {listen}: {error}", listen=listen, error=failure.getErrorMessage())
        reactor.stop()

    service.whenListening.addErrback(cannotListen)
    return service


def makeService(options: Any) -> IService:
    """
    The twistd plugin's entry point: C{twistd -n multifd COMMAND [options]}.
    """
    from twisted.internet import reactor

    if not options.subCommand:
        options.parseOptions(["receive"])
    command = options.subOptions
    if not hasattr(command, "makeService"):
        raise usage.UsageError(f"{options.subCommand} is a one-off command; run it with twisted-multifd, not twistd")
    return command.makeService(reactor)


__all__ = ["Options", "makeService"]

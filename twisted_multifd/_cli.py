"""
The C{twisted-multifd} command.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from twisted.python import usage

from ._options import MultifdOptions


def _stderrObserver(event: dict) -> None:
    level = event.get("log_level")
    namespace = event.get("log_namespace", "")
    if not namespace.startswith("twisted_multifd") and level in (LogLevel.debug, LogLevel.info):
        return  # Twisted's own chatter (ports opening, main loop ending)
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None and event.get("log_level") in (LogLevel.critical,):
        text += "\n" + failure.getTraceback()
    prefix = "" if level in (LogLevel.info, None) else f"{level.name}: "
    sys.stderr.write(f"twisted-multifd: {prefix}{text}\n")
    sys.stderr.flush()


def startLogging(verbose: bool = False) -> None:
    predicate = LogLevelFilterPredicate(LogLevel.debug if verbose else LogLevel.info)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(_stderrObserver, [predicate])], redirectStandardIO=False
    )


def main(argv: list[str] | None = None) -> None:
    options = MultifdOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"{options}\ntwisted-multifd: error: {e}\n")
        raise SystemExit(2)
    startLogging()

    def run(reactor: Any) -> Deferred[None]:
        async def command() -> None:
            code = await options.subOptions.run(reactor)
            if code:
                raise SystemExit(code)

        return Deferred.fromCoroutine(command())

    react(run)


def console() -> None:
    """
    The console script: L{main}, then exit at once with its status.

    By then the command's work is done and durable (a capture's manifest is
    fsynced before the reactor stops) and every thread has been joined or is
    a daemon; tearing the interpreter down (collecting every module's
    objects) would only add about 50-90 ms to every C{receive --once}.
    """
    try:
        main()
        code: Any = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        code = code or 1
    os._exit(code or 0)

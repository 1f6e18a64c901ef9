"""
Long blocking work (reading or writing a whole capture) for commands that
run under the reactor: in a thread of its own, so that Ctrl-C or SIGTERM stops
it between chunks instead of waiting for it to finish.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")

# Seconds interrupted work has to stop (and clean up) before shutdown goes on.
STOP_GRACE = 2.0


def whenRunning(reactor: Any) -> Deferred[None]:
    """
    Fires once the reactor runs: its signal handlers are in place then, so
    that Ctrl-C or SIGTERM goes through the shutdown triggers that stop the
    work (and make the exit status non-zero).
    """
    running: Deferred[None] = Deferred()
    reactor.callWhenRunning(running.callback, None)
    return running


async def runInterruptibly(
    reactor: Any,
    work: Callable[[threading.Event], T],
    *,
    name: str,
    interrupted: Callable[[], BaseException],
    grace: float = STOP_GRACE,
) -> T:
    """
    Run C{work(stop)} in a daemon thread (one blocked on a stalled pipe cannot
    keep the process from exiting) and return what it returns, or raise what
    it raises. On shutdown C{stop} is set, and shutdown waits until the work
    has stopped or C{grace} seconds have passed; then this raises
    C{interrupted()}, unless the work ended first.
    """
    stop = threading.Event()
    outcome: Deferred[Any] = Deferred()

    def settle(result: Any) -> None:
        if not outcome.called:
            (outcome.errback if isinstance(result, Failure) else outcome.callback)(result)

    def thread() -> None:
        try:
            result: Any = work(stop)
        except BaseException:
            result = Failure()
        reactor.callFromThread(settle, result)

    await whenRunning(reactor)
    threading.Thread(target=thread, name=name, daemon=True).start()
    finished: Deferred[None] = Deferred()

    def passOn(result: Any) -> Any:
        finished.callback(None)
        return result

    outcome.addBoth(passOn)

    def onShutdown() -> Deferred[None] | None:
        if outcome.called:
            return None
        stop.set()
        giveUp = reactor.callLater(grace, settle, Failure(interrupted()))
        finished.addCallback(lambda _: giveUp.cancel() if giveUp.active() else None)
        return finished

    reactor.addSystemEventTrigger("before", "shutdown", onShutdown)
    return await outcome

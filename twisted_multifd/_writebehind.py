"""
Write a capture's pages in a thread of their own.

Receiving a page costs one copy (socket to buffer, C{recv_into}) and storing
it another (buffer to page cache, C{pwrite}); both let go of the GIL. Done in
the reactor's thread one after the other, a migration moves at the speed of
their sum on one CPU. Here the writes are queued, in the order given, to one
writer thread, so that the next packet is received while the last is written.

The order of writes is the order of calls, so a later version of a page (a
zero page after data, a main-channel page) still lands after the earlier
one. The bytes queued but not written are bounded: a call that would go over
L{PENDING_LIMIT} waits for the writer, as a blocking write would.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable

# Bytes queued and not yet written beyond which a new write waits.
PENDING_LIMIT = 8 * 1024 * 1024


class WriteFailed(Exception):
    """
    An earlier queued write failed; C{what} names what it wrote to, C{error}
    is what it raised (an L{OSError}, unless a bug).
    """

    def __init__(self, what: str, error: Exception) -> None:
        super().__init__(what, error)
        self.what = what
        self.error = error


class WriteBehind:
    """
    One writer thread and its queue. After a write fails, later ones are
    dropped, and every L{submit} and L{drain} raises L{WriteFailed}.
    """

    def __init__(self, limit: int = PENDING_LIMIT, name: str = "twisted-multifd-writer") -> None:
        self._limit = limit
        self._name = name
        self._jobs: deque[tuple[int, str, Callable[..., Any], tuple[Any, ...], Any]] = deque()
        self._condition = threading.Condition()
        self._pending = 0
        self._failure: WriteFailed | None = None
        self._thread: threading.Thread | None = None
        self._closing = False

    def submit(self, size: int, what: str, function: Callable[..., Any], *args: Any, lent: Any = None) -> None:
        """
        Queue C{function(*args)}, which writes C{size} bytes to C{what}. If
        C{lent} is given, its C{lent} attribute is cleared once the call is
        over (whether it wrote or not).
        """
        with self._condition:
            while self._failure is None and self._pending and self._pending + size > self._limit:
                self._condition.wait()
            if self._failure is not None:
                if lent is not None:
                    lent.lent = False
                raise self._failure
            self._jobs.append((size, what, function, args, lent))
            self._pending += size
            self._condition.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def drain(self) -> None:
        """
        Wait until every queued write is over; raise L{WriteFailed} if one
        failed.
        """
        with self._condition:
            while self._jobs or self._pending:
                self._condition.wait()
            if self._failure is not None:
                raise self._failure

    def close(self) -> None:
        """
        Wait for the queued writes and stop the thread (errors are left to
        L{drain}).
        """
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        condition = self._condition
        while True:
            with condition:
                while not self._jobs and not self._closing:
                    condition.wait()
                if not self._jobs:
                    return
                size, what, function, args, lent = self._jobs.popleft()
                failed = self._failure is not None
            if not failed:
                try:
                    function(*args)
                except Exception as e:  # a bug must not leave drain() waiting
                    failure = WriteFailed(what, e)
                    with condition:
                        self._failure = failure
            if lent is not None:
                lent.lent = False
            with condition:
                self._pending -= size
                condition.notify_all()

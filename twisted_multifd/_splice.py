"""
The relay's fast path: move a direction's bytes from one socket to the other
with splice(2) through a pipe, never copying them into Python.

Relaying through C{recv} and C{send} copies every byte out of the kernel and
back in, and costs a Python C{bytes} and a few reactor calls per read; on a
small machine that shares its CPUs with the source and the destination QEMU
it makes the relayed migration CPU-bound (docs/performance.md#relay). With
C{splice} the kernel moves page references from the source socket into a
pipe and from the pipe into the destination socket.

Only the reading transport's C{doRead} and the writing transport's
C{doWrite} are replaced (as L{twisted_multifd._directread} does for the
receiver); everything else stays Twisted's: the end of the stream (EOF)
still becomes C{readConnectionLost}, closing and half-closing still go
through the writing transport's own C{doWrite}, errors still disconnect the
transport they happened on. Flow control keeps its shape: while the pipe
holds bytes the destination did not take, the source is not read, and it is
read again once the destination took them all.

Bytes the relay had buffered in the writing transport before (the bytes it
read before connecting, or anything written while this path stood aside)
go first: while the transport's own buffer is not empty the reading side
reads as it did before (C{recv}, C{dataReceived}, C{write}), so the order on
the wire is kept.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any, Callable

from twisted.internet import main, tcp

PIPE_SIZE = 256 * 1024
"""Pipe capacity asked for (the default /proc/sys/fs/pipe-max-size); what a splice moves at most."""

READ_BUDGET = 8 * 1024 * 1024
"""Bytes moved in one C{doRead} before the reactor gives the other connections a turn."""

SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
"""Flags of every C{splice} from or into a non-blocking socket."""

_DEFAULT_PIPE = 65536


def openPipe(size: int | None) -> tuple[int, int, int]:
    """
    A non-blocking pipe for splicing: (read end, write end, capacity), with
    the capacity C{size} if asked for and allowed; over the user's
    pipe-buffer allowance the pipe keeps its default 64 KiB.
    """
    pipeRead, pipeWrite = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    capacity = _DEFAULT_PIPE
    if size is not None:
        try:
            capacity = fcntl.fcntl(pipeWrite, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
        except OSError:
            pass
    return pipeRead, pipeWrite, capacity


def canSplice(transport: Any) -> bool:
    """
    A plain TCP or Unix socket transport of a POSIX reactor, where C{splice}
    exists (Linux); not TLS, not a test transport.
    """
    return (
        hasattr(os, "splice")
        and isinstance(transport, tcp.Connection)
        and getattr(transport, "socket", None) is not None
        and bool(transport.connected)
    )


def _buffered(transport: Any) -> int:
    """
    Bytes written to C{transport} and not yet sent (Twisted's two buffers).
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class SplicedDirection:
    """
    One direction of a relayed connection, from C{reading} to C{writing}.

    @param moved: called with the count of every splice into the pipe (the
        bytes then belong to the destination socket, as bytes written to a
        transport do).
    """

    def __init__(self, reading: Any, writing: Any, moved: Callable[[int], None], pipeSize: int | None) -> None:
        self.reading = reading
        self.writing = writing
        self._moved = moved
        self._readFd = reading.fileno()
        self._writeFd = writing.fileno()
        self._pipeRead, self._pipeWrite, self._chunk = openPipe(pipeSize)
        self.pending = 0
        self.closed = False
        self._originalRead = reading.doRead
        self._originalWrite = writing.doWrite
        reading.doRead = self.doRead
        writing.doWrite = self.doWrite

    def _bypassed(self) -> bool:
        """
        Whether to read as Twisted does: the path is closed, the writing side
        is going away, or bytes are still in its own buffer.
        """
        writing = self.writing
        return (self.closed or not writing.connected or writing.disconnecting or writing._writeDisconnected
                or writing._writeDisconnecting or _buffered(writing) > 0)

    def doRead(self) -> Any:
        if self.pending:
            if self.writing.connected and not self.closed:
                # The destination has not taken the last splice yet (reading
                # was resumed early): wait for it.
                self._waitForWriting()
                return None
            self.pending = 0  # bytes for a connection that is gone
        if self._bypassed():
            return self._originalRead()
        moved = 0
        while moved < READ_BUDGET:
            try:
                count = os.splice(self._readFd, self._pipeWrite, self._chunk, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return None
            except OSError:
                return main.CONNECTION_LOST
            if count == 0:
                return main.CONNECTION_DONE
            self.pending = count
            self._moved(count)
            moved += count
            if not self._flush():
                self._waitForWriting()
                return None
        return None

    def _flush(self) -> bool:
        """
        Splice the pipe into the writing socket; L{False} if it is full (or
        failed: its own C{doWrite} then reports the error).
        """
        while self.pending:
            try:
                count = os.splice(self._pipeRead, self._writeFd, self.pending, flags=SPLICE_FLAGS)
            except OSError:
                return False
            if count <= 0:
                return False
            self.pending -= count
        return True

    def _waitForWriting(self) -> None:
        self.reading.stopReading()
        self.writing.startWriting()

    def doWrite(self) -> Any:
        if self.pending and not self.closed:
            try:
                while self.pending:
                    count = os.splice(self._pipeRead, self._writeFd, self.pending, flags=SPLICE_FLAGS)
                    if count <= 0:
                        return None
                    self.pending -= count
            except BlockingIOError:
                return None
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    return None
                return main.CONNECTION_LOST
            # All taken: read on. (The source's end of stream is only ever
            # read with an empty pipe, so a source read here is still open.)
            reading = self.reading
            if reading.connected and not reading.disconnecting:
                reading.startReading()
        return self._originalWrite()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._pipeRead)
            os.close(self._pipeWrite)

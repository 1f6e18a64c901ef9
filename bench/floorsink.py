"""The floor for any Python receiver: take a migration's bytes and store them durably, nothing else.

``python bench/floorsink.py --address-file FILE --channels N --output DIR --size BYTES [--copy]``
listens on an ephemeral loopback port (written to FILE as
``tcp:127.0.0.1:PORT``), accepts the main channel and N multifd channels,
and reads every connection to its end in one thread with one epoll loop, as
the receiver does, into one file per connection in DIR (each first sized to
the RAM, as the receiver sizes its images): with ``splice`` from the socket
into a 1 MiB pipe and from the pipe into the file, as the receiver stores
page payloads, or with ``--copy`` by ``recv_into`` a reused 512 KiB buffer
and ``pwrite``. Writeback is started every 64 MiB by the capture writer's own
helper thread and the files are fsynced at the end, as the receiver does. It
parses nothing, checks nothing, and its files are not a capture.

``bench receive --floor`` runs it beside the QEMU destination and the
receiver, so that the table says how much of the receiver's time is this
machine's cost of moving the bytes through Python to a disk and how much is
the receiver's own work. A QEMU source needs no answer from its destination,
so it migrates into this sink as into any other.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import selectors
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The receiver's own writeback: the floor stores the bytes the way it does.
from twisted_multifd._capture import WRITEBACK_EVERY, _EarlyWriteback  # noqa: E402

BUFFER = 512 * 1024
PIPE_SIZE = 1024 * 1024
READ_BUDGET = 8 * 1024 * 1024
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address-file", type=Path, required=True)
    parser.add_argument("--channels", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--size", type=int, required=True, help="guest RAM bytes: each file is sized to it first")
    parser.add_argument("--copy", action="store_true", help="recv_into + pwrite instead of splice")
    args = parser.parse_args()

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(64)
    pending = args.address_file.with_suffix(".tmp")
    pending.write_text(f"tcp:127.0.0.1:{listening.getsockname()[1]}\n")
    os.replace(pending, args.address_file)
    args.output.mkdir(parents=True, exist_ok=True)

    writeback = _EarlyWriteback()
    selector = selectors.EpollSelector()
    files = []
    for index in range(args.channels + 1):
        connection, _ = listening.accept()
        connection.setblocking(False)
        fd = os.open(args.output / f"connection-{index}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        # Sized first, as the receiver sizes its images: writes that extend
        # a file cost ext4 more (the size changes on every write).
        os.ftruncate(fd, args.size)
        files.append(fd)
        state = {"fd": fd, "offset": 0, "unkicked": 0, "view": memoryview(bytearray(BUFFER)), "pipe": None}
        if not args.copy:
            state["pipe"] = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            fcntl.fcntl(state["pipe"][1], getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
        selector.register(connection, selectors.EVENT_READ, state)
    listening.close()

    open_connections = args.channels + 1
    while open_connections:
        for key, _ in selector.select():
            connection, state = key.fileobj, key.data
            view, fd = state["view"], state["fd"]
            moved = 0
            while moved < READ_BUDGET:
                pipe = state["pipe"]
                try:
                    if pipe is None:
                        count = connection.recv_into(view)  # type: ignore[union-attr]
                    else:
                        count = os.splice(connection.fileno(), pipe[1], PIPE_SIZE, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    break
                if not count:
                    selector.unregister(connection)
                    connection.close()  # type: ignore[union-attr]
                    open_connections -= 1
                    break
                written = 0
                while written < count:
                    if pipe is None:
                        written += os.pwrite(fd, view[written:count], state["offset"] + written)
                    else:
                        written += os.splice(pipe[0], fd, count - written, offset_dst=state["offset"] + written)
                state["offset"] += count
                moved += count
                state["unkicked"] += count
                if state["unkicked"] >= WRITEBACK_EVERY:
                    state["unkicked"] = 0
                    writeback.kick(fd)
    writeback.shutdown()
    for fd in files:
        os.fsync(fd)
        os.close(fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

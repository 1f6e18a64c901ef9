"""
C{twisted-multifd send} (play a capture into a QEMU destination) and
C{twisted-multifd export} (write a capture as a plain migration stream file).

Exit status: 0 when everything was sent (written) and every connection
closed cleanly; 1 when sending or writing failed; 2 for usage errors and
captures refused before anything was connected or written.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python import usage

from ._capturereader import CaptureError, loadCapture
from ._compression import SUPPORTED_COMPRESSION
from ._options import OptionsAroundArguments, channelCount, positiveFloat, printError
from ._sender import (
    DEFAULT_TIMEOUT,
    FLUSH_MODES,
    ZERO_PAGE_CONVENTIONS,
    SendError,
    sendCapture,
)
from ._threadwork import runInterruptibly, whenRunning

log = Logger(namespace="twisted_multifd.send")

AUTO = "auto"

# Seconds an interrupted export has to stop (and remove its partial file).
EXPORT_STOP_GRACE = 2.0


class _CaptureCommand(OptionsAroundArguments):
    """
    A command on one capture folder, given anywhere among the options.
    """

    def parseArgs(self, capture: str | None = None, *rest: str) -> None:
        if capture is None:
            raise usage.UsageError("which capture? Give the capture folder.")
        if rest:
            raise usage.UsageError(f"one capture folder only, not also {' '.join(rest)}")
        self["capture"] = capture


class SendOptions(_CaptureCommand):
    synopsis = "CAPTURE --to ENDPOINT [options]"
    longdesc = (
        "Send a capture into a QEMU destination started with -incoming (and the same multifd-channels and"
        " multifd-compression), as a QEMU source would: main channel first, then the multifd channels."
        " Exit status 0 only when everything was sent and every connection closed cleanly."
    )
    optParameters = [
        ["to", "t", None,
         "Where the destination listens: a Twisted client endpoint string such as tcp:HOST:PORT"
         " or unix:path=/run/mig.sock."],
        ["channels", "c", None,
         "Multifd channels, as the destination's multifd-channels; 0 sends a plain migration"
         " (multifd off). Default: as the capture was made.", channelCount],
        ["compression", None, None,
         "Multifd compression, as the destination's multifd-compression: " + ", ".join(SUPPORTED_COMPRESSION)
         + ". Default: as the capture was made."],
        ["flush-mode", None, AUTO,
         "Sync barriers: per-section (machine types up to 8.0), per-round (8.1 on), or auto"
         " (the capture's, else the one its machine type implies)."],
        ["zero-pages", None, "main",
         "Where zero pages go: main (ZERO records on the main channel; every QEMU, and they clear the page"
         " whatever the destination's memory held) or multifd (zero lists in packets, as QEMU 9.0+ sources"
         " send them; 9.0+ destinations only, which trust pages they have not received to be zero)."],
        ["timeout", None, DEFAULT_TIMEOUT,
         "Seconds without progress (the destination not reading, or not closing) before giving up.",
         positiveFloat],
        ["progress-interval", None, 5.0, "Seconds between progress lines.", positiveFloat],
    ]

    def postOptions(self) -> None:
        if not self["to"]:
            raise usage.UsageError("--to is required: where the destination QEMU listens (e.g. tcp:HOST:PORT)")
        compression = self["compression"]
        if compression is not None and compression not in SUPPORTED_COMPRESSION:
            raise usage.UsageError(
                f"--compression must be one of {', '.join(SUPPORTED_COMPRESSION)}, not {compression!r}"
            )
        if self["flush-mode"] not in (AUTO, *FLUSH_MODES):
            raise usage.UsageError(f"--flush-mode must be auto, {', '.join(FLUSH_MODES)}; not {self['flush-mode']!r}")
        if self["zero-pages"] not in ZERO_PAGE_CONVENTIONS:
            raise usage.UsageError(
                f"--zero-pages must be one of {', '.join(ZERO_PAGE_CONVENTIONS)}, not {self['zero-pages']!r}"
            )

    def run(self, reactor: Any) -> Any:
        return runSend(reactor, self)


async def runSend(reactor: Any, options: SendOptions) -> int:
    try:
        capture = loadCapture(options["capture"])
    except CaptureError as e:
        printError(f"cannot send {e}")
        return 2
    await whenRunning(reactor)
    sending = sendCapture(
        reactor, capture, options["to"],
        channels=options["channels"],
        compression=options["compression"],
        flushMode=None if options["flush-mode"] == AUTO else options["flush-mode"],
        zeroPages=options["zero-pages"],
        timeout=options["timeout"],
        progressInterval=options["progress-interval"],
    )

    def interrupted() -> None:
        # Ctrl-C or SIGTERM: drop the connections; the status must not say 0.
        if not sending.called:
            log.error("interrupted: the destination did not get the whole migration")
            sending.cancel()

    reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    try:
        await sending
    except CaptureError as e:
        printError(f"cannot send {e}")
        return 2
    except ValueError as e:
        printError(str(e))
        return 2
    except (SendError, CancelledError):
        return 1  # the sender has logged why
    return 0


class ExportOptions(_CaptureCommand):
    synopsis = "CAPTURE -o FILE"
    longdesc = (
        "Write a capture as one plain (non-multifd) migration stream, which QEMU loads with"
        " -incoming 'exec:cat FILE' (or file:FILE on QEMU 9.0+). -o - writes to standard output,"
        " e.g. -incoming 'exec:twisted-multifd export CAPTURE -o -'."
    )
    optParameters = [
        ["output", "o", None, "The stream file to write (replaced atomically), or - for standard output."],
        ["progress-interval", None, 5.0, "Seconds between progress lines.", positiveFloat],
    ]

    def postOptions(self) -> None:
        if not self["output"]:
            raise usage.UsageError("-o/--output is required: the stream file to write, or -")

    def run(self, reactor: Any) -> Any:
        return runExport(reactor, self)


class _Interrupted(Exception):
    pass


async def runExport(reactor: Any, options: ExportOptions) -> int:
    from ._export import exportCapture

    try:
        capture = loadCapture(options["capture"])
    except CaptureError as e:
        printError(f"cannot export {e}")
        return 2
    output = options["output"]
    if output == "-" and sys.stdout.isatty():
        printError("-o - writes a binary stream to standard output, which is a terminal; redirect it")
        return 2
    total = capture.totalPages
    interval = options["progress-interval"]
    last = [time.monotonic()]

    def work(stop: threading.Event) -> Any:
        def progress(pages: int, size: int) -> None:
            if stop.is_set():
                raise _Interrupted()
            now = time.monotonic()
            if now - last[0] >= interval:
                last[0] = now
                reactor.callFromThread(
                    log.info, "exporting {capture}: {percent:.0f}% of pages ({pages} of {total}), {mib:.1f} MiB",
                    capture=capture.path, percent=100 * pages / total if total else 100,
                    pages=pages, total=total, mib=size / 1048576,
                )

        return exportCapture(capture, sys.stdout.buffer if output == "-" else output, onProgress=progress)

    try:
        # Interrupted, the export stops at its next progress call and removes
        # its partial file.
        result = await runInterruptibly(
            reactor, work, name="twisted-multifd export", interrupted=_Interrupted, grace=EXPORT_STOP_GRACE
        )
    except _Interrupted:
        printError(f"interrupted: {output} was not written" if output != "-" else "interrupted")
        return 1
    except CaptureError as e:
        printError(f"cannot export {e}")
        return 2
    except OSError as e:
        printError(f"writing {output} failed: {e}")
        return 1
    log.info("exported {capture} to {output}: {pages} pages ({data} with data), {mib:.1f} MiB"
             " of plain migration stream in {seconds:.2f} s",
             capture=capture.path, output=result.output, pages=result.pages, data=result.pagesWithData,
             mib=result.size / 1048576, seconds=result.duration)
    return 0

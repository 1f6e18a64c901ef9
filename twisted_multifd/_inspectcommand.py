"""
C{twisted-multifd inspect PATH [--json]}: describe a capture folder or a
plain migration stream file (see docs/inspect.md).

Exit status: 0 when what was inspected is complete (a capture) or parses to
its end (a stream); 1 when it is readable but incomplete or invalid (the
report is printed all the same); 2 for usage errors and paths that cannot be
inspected at all (one line on standard error).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from twisted.python import usage

from ._inspect import (
    InspectError,
    InspectInterrupted,
    inspectPath,
    inspectStream,
    renderJSON,
    renderText,
)
from ._options import OptionsAroundArguments, printError
from ._threadwork import runInterruptibly


class InspectOptions(OptionsAroundArguments):
    synopsis = "PATH [--json]"
    longdesc = (
        "Describe a capture (its folder or its manifest.json) or a plain migration stream file (as"
        " export writes, or QEMU's migrate \"exec:cat > FILE\"; - reads one from standard input):"
        " machine type, conventions, channels, RAM blocks and their non-zero pages, devices, and"
        " whether it is complete. Exit status 0 complete, 1 incomplete or invalid, 2 cannot be read."
    )
    optFlags = [
        ["json", None, "Print the report as JSON (keys in docs/inspect.md)."],
    ]
    optParameters = [
        ["page-size", None, 4096,
         "A stream's target page size, unless its configuration says (4096 on x86).", int],
    ]

    def parseArgs(self, path: str | None = None, *rest: str) -> None:
        if path is None:
            raise usage.UsageError("what to inspect? Give a capture folder or a migration stream file.")
        if rest:
            raise usage.UsageError(f"one path only, not also {' '.join(rest)}")
        self["path"] = path

    def postOptions(self) -> None:
        size = self["page-size"]
        if size < 1024 or size & (size - 1):
            raise usage.UsageError(f"--page-size must be a power of two of at least 1024, not {size}")

    def run(self, reactor: Any) -> Any:
        return runInspect(reactor, self)


async def runInspect(reactor: Any, options: InspectOptions) -> int:
    path = options["path"]
    def work(stop: threading.Event) -> Any:
        if path == "-":
            return inspectStream(sys.stdin.buffer, pageSize=options["page-size"], name="-", interrupted=stop.is_set)
        return inspectPath(path, pageSize=options["page-size"], interrupted=stop.is_set)

    try:
        report = await runInterruptibly(reactor, work, name="twisted-multifd inspect", interrupted=InspectInterrupted)
    except InspectInterrupted:
        printError("interrupted")
        return 1
    except InspectError as e:
        printError(f"cannot inspect {e}")
        return 2
    except OSError as e:
        printError(f"cannot inspect {path}: {e.strerror or e}")
        return 2
    sys.stdout.write(renderJSON(report) if options["json"] else renderText(report))
    sys.stdout.flush()
    return report.exitStatus

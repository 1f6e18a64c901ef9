"""
Writing a capture as one plain (non-multifd) migration stream, the bytes a
QEMU source with multifd off would send: a real QEMU loads it with
C{-incoming 'exec:cat FILE'} (any version) or C{-incoming file:FILE} (QEMU
9.0+ without mapped-ram).

The stream is L{twisted_multifd._sender.streamActions} with no multifd
channel: every page a PAGE or ZERO record on the main channel, one EOS per
RAM section and no MULTIFD_FLUSH; SWITCHOVER_START only if the capture's
source sent it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import BinaryIO

import attrs

from ._capturereader import Capture, loadCapture
from ._sender import MainBytes, chooseConventions, streamActions


@attrs.frozen
class ExportResult:
    """
    @ivar output: the file written (C{"-"} for a stream given by the caller).
    @ivar size: bytes written.
    """

    capture: str
    output: str
    size: int
    pages: int
    pagesWithData: int
    zeroPages: int
    switchoverStart: bool
    duration: float


def writeStream(
    capture: Capture,
    out: BinaryIO,
    onProgress: Callable[[int, int], None] | None = None,
) -> tuple[int, int, int]:
    """
    Write the plain stream of C{capture} to C{out}.

    @param onProgress: called with (pages written, bytes written) after each
        batch.
    @return: (bytes written, pages, pages with data)
    """
    conventions = chooseConventions(capture, channels=0)
    size = pages = dataPages = 0
    for action in streamActions(capture, conventions):
        assert isinstance(action, MainBytes), "a plain stream has nothing but main-channel bytes"
        out.write(action.data)
        size += len(action.data)
        pages += action.pages
        dataPages += action.dataPages
        if onProgress is not None and action.pages:
            onProgress(pages, size)
    return size, pages, dataPages


def exportCapture(
    capture: Capture | str | os.PathLike[str],
    output: str | os.PathLike[str] | BinaryIO,
    *,
    onProgress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """
    Write C{capture} as one plain migration stream.

    @param capture: a L{Capture} or the path of a capture folder.
    @param output: a file path, written to a temporary file beside it and
        renamed into place once complete (a reader never sees half a
        stream), or a binary file object, written as is.
    @param onProgress: see L{writeStream}.
    @raise CaptureError: the capture cannot be exported (nothing is written).
    @raise OSError: writing failed (a file path is then left untouched).
    """
    started = time.monotonic()
    if not isinstance(capture, Capture):
        capture = loadCapture(os.fspath(capture))
    conventions = chooseConventions(capture, channels=0)  # refuses before anything is written
    if isinstance(output, (str, os.PathLike)):
        path = os.fspath(output)
        temporary = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as f:
                size, pages, dataPages = writeStream(capture, f, onProgress)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        name = path
    else:
        size, pages, dataPages = writeStream(capture, output, onProgress)
        output.flush()
        name = "-"
    return ExportResult(
        capture=capture.path,
        output=name,
        size=size,
        pages=pages,
        pagesWithData=dataPages,
        zeroPages=pages - dataPages,
        switchoverStart=conventions.switchoverStart,
        duration=time.monotonic() - started,
    )

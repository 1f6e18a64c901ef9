"""
What a capture folder or a plain migration stream file holds, at a glance:
C{twisted-multifd inspect} (see docs/inspect.md).

L{inspectPath} (or L{inspectCapture}, L{inspectStream}) builds an
L{InspectReport}; L{renderText} and L{renderJSON} print it. Nothing here
needs a reactor.

- A capture is described from its manifest (loaded with
  C{loadCapture(strict=False)}, so an incomplete one is described too, with
  every problem found), its VMDESC and its device state; the non-zero pages
  are counted in the RAM images themselves, reading only their data
  (C{SEEK_DATA}/C{SEEK_HOLE}) one chunk at a time.
- A stream file is fed in chunks to the main stream's own incremental parser.
  Memory stays bounded: what is kept of RAM is 2 bits of state per page sent,
  never the pages. It is valid only if it parses to its end (EOF marker, and
  VMDESC checked against the device sections); otherwise the report says
  where and why it stops.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from collections.abc import Callable
from typing import IO, Any

import attrs

from ._capture import MANIFEST
from ._capturereader import Capture, CaptureError, loadCapture
from ._errors import ProtocolError
from ._incremental import IncrementalParser
from ._initpacket import MULTIFD_MAGIC
from ._mainstream import (
    FLUSH_PER_ROUND,
    QEMU_VM_FILE_MAGIC,
    Command,
    Configuration,
    MainPage,
    MainZeroPage,
    MultiFDFlush,
    RamBlockList,
    RamSection,
    RamSectionEnd,
    StreamEnd,
    StreamHeader,
    mainStream,
)
from ._sender import machineFlushMode
from ._tail import DeviceSection, _expectedDevices, walkDeviceSections

#: The version of the JSON report's layout (its C{"format"} key).
REPORT_FORMAT = 1

KIND_CAPTURE = "capture"
KIND_STREAM = "stream"

#: Bytes read from a stream file at a time.
STREAM_CHUNK = 1 << 20
#: Bytes read from a RAM image at a time (a whole number of pages).
IMAGE_CHUNK = 1 << 20
#: The device state after RAM is kept whole until the stream ends (it is
#: not self-delimiting); a stream whose tail grows past this is not followed.
MAX_TAIL = 256 << 20


class InspectError(Exception):
    """
    C{path} cannot be inspected at all: it does not exist, cannot be read, or
    is neither a capture nor a migration stream. The message is one line that
    names the path.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class InspectInterrupted(Exception):
    """
    The caller's C{interrupted} callable said to stop.
    """


@attrs.frozen
class BlockReport:
    """
    One RAM block.

    @ivar pagesNonZero: pages whose contents are not all zero (a capture: in
        its image; a stream: the last version of each page sent), or L{None}
        when the image cannot be read.
    @ivar pagesWithData: pages last sent with their contents (PAGE records,
        multifd data pages), even contents that are all zero.
    @ivar pagesZero: pages last sent as zero pages (ZERO records, multifd zero
        lists).
    @ivar pagesNeverSent: pages the source never sent.
    @ivar file: the image, relative to the capture folder (L{None} for a stream).
    """

    name: str
    length: int
    pages: int
    pagesNonZero: int | None
    pagesWithData: int | None
    pagesZero: int | None
    pagesNeverSent: int | None
    file: str | None


@attrs.frozen
class DeviceReport:
    """
    One device (non-iterable vmstate) in the device state.

    @ivar sectionID: the section id it was sent with (L{None} if unknown).
    @ivar length: its FULL section's bytes (header, body and footer), or
        L{None} when the device state does not have it.
    """

    idstr: str
    instanceID: int
    version: int
    sectionID: int | None
    length: int | None


@attrs.frozen
class ParseError:
    """
    Where and why a stream file stops parsing.

    @ivar offset: the stream offset at which the parser stopped: every byte
        before it was parsed, the field at fault ends there.
    @ivar field: the wire field at fault, or L{None}.
    """

    offset: int
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"at byte {self.offset}"
        if self.field:
            where += f", {self.field}"
        return f"{where}: {self.reason}"


@attrs.frozen
class InspectReport:
    """
    What a capture or a stream file holds.

    @ivar kind: L{KIND_CAPTURE} or L{KIND_STREAM}.
    @ivar complete: a capture: its manifest says complete and nothing is
        wrong with its files; a stream: it parses to its end.
    @ivar problems: why it is not complete (empty when it is).
    @ivar notes: remarks that are not problems.
    @ivar manifestError: a capture's manifest C{error}.
    @ivar parseError: where a stream stops parsing.
    @ivar flushMode: C{per-section}, C{per-round} or L{None} (a plain
        migration: no multifd sync points).
    @ivar machineFlushMode: the flush mode the machine type implies for a
        multifd destination (what C{send --flush-mode auto} uses for a plain
        capture).
    @ivar zeroPages: where zero pages travelled: C{main}, C{multifd},
        C{main+multifd}, or L{None} (none seen).
    @ivar devicesFrom: C{vmdesc}, C{device-state} (the sections walked, no
        VMDESC), or L{None} (no device state).
    @ivar size: a stream file's size in bytes (L{None} for a capture, or a
        stream read from a pipe before its end).
    """

    path: str
    kind: str
    complete: bool
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    manifestError: str | None
    parseError: ParseError | None
    machine: str | None
    streamVersion: int | None
    pageSize: int
    capabilities: tuple[str, ...]
    channels: int
    uuid: str | None
    compression: str | None
    flushMode: str | None
    machineFlushMode: str | None
    zeroPages: str | None
    commands: tuple[str, ...]
    blocks: tuple[BlockReport, ...]
    devices: tuple[DeviceReport, ...]
    devicesFrom: str | None
    deviceStateLength: int | None
    vmdesc: bool
    multifdDeviceState: int
    source: str | None
    startedAt: str | None
    size: int | None

    @property
    def switchoverStart(self) -> bool:
        return "SWITCHOVER_START" in self.commands

    @property
    def ramTotal(self) -> int:
        return sum(block.length for block in self.blocks)

    @property
    def totalPages(self) -> int:
        return sum(block.pages for block in self.blocks)

    @property
    def pagesNonZero(self) -> int | None:
        counts = [block.pagesNonZero for block in self.blocks]
        return None if None in counts else sum(c for c in counts if c is not None)

    @property
    def exitStatus(self) -> int:
        """
        C{twisted-multifd inspect}'s: 0 complete, 1 readable but not complete.
        """
        return 0 if self.complete else 1


# Entry point


def inspectPath(
    path: str,
    *,
    pageSize: int = 4096,
    interrupted: Callable[[], bool] | None = None,
) -> InspectReport:
    """
    Inspect a capture folder (or its C{manifest.json}) or a stream file.

    @param pageSize: a stream's target page size unless its configuration
        says otherwise (x86: 4096).
    @param interrupted: polled between chunks; when it returns true,
        L{InspectInterrupted} is raised.
    @raise InspectError: C{path} does not exist, cannot be read, or is
        neither a capture nor a migration stream.
    """
    if os.path.isdir(path):
        return inspectCapture(path, interrupted=interrupted)
    if os.path.basename(path) == MANIFEST and os.path.isfile(path):
        return inspectCapture(os.path.dirname(path) or ".", interrupted=interrupted)
    if not os.path.exists(path):
        raise InspectError(path, "no such file or folder")
    return inspectStream(path, pageSize=pageSize, interrupted=interrupted)


def _check(interrupted: Callable[[], bool] | None) -> None:
    if interrupted is not None and interrupted():
        raise InspectInterrupted()


# Captures


_NOT_COMPLETE = "the capture is not complete"


def inspectCapture(path: str, *, interrupted: Callable[[], bool] | None = None) -> InspectReport:
    """
    Describe the capture in folder C{path}, complete or not.

    @raise InspectError: there is no readable manifest (not a capture, or
        one still being received), or it is not a format-1 manifest object.
    """
    try:
        capture = loadCapture(path, strict=False)
    except CaptureError as e:
        raise InspectError(path, "; ".join(e.problems) if e.problems else str(e))
    manifest = capture.manifest
    problems: list[str] = []
    notes: list[str] = []
    if not capture.complete:
        problems.append(
            "the migration did not end cleanly: " + (capture.error or "the manifest gives no reason")
        )
    # loadCapture's own "not complete" sentence speaks of sending; the one
    # above says the same for a reader.
    problems.extend(p for p in capture.problems if not p.startswith(_NOT_COMPLETE))

    blocks = []
    for block in capture.blocks:
        _check(interrupted)
        nonZero = None
        try:
            size = os.stat(block.path).st_size
        except OSError:
            size = None  # loadCapture named the problem
        if size is not None:
            try:
                nonZero = countNonZeroPages(
                    block.path, min(size, block.length), capture.pageSize, interrupted=interrupted
                )
            except OSError as e:
                problems.append(f"the image of RAM block {block.name!r}, {block.file}, cannot be read: {e.strerror}")
        blocks.append(BlockReport(
            name=block.name,
            length=block.length,
            pages=block.length // capture.pageSize,
            pagesNonZero=nonZero,
            pagesWithData=block.pagesWithData,
            pagesZero=block.pagesZero,
            pagesNeverSent=block.pagesNeverSent,
            file=block.file,
        ))
        if block.pagesNeverSent and capture.complete:
            notes.append(f"{block.pagesNeverSent} pages of RAM block {block.name!r} were never sent (they read as zero)")

    devices, devicesFrom, deviceProblems = _captureDevices(capture)
    problems.extend(deviceProblems)

    stream = capture.stream
    streamEntry = manifest.get("stream")
    if not isinstance(streamEntry, dict):
        streamEntry = {}
    commands = stream.commands if stream is not None else tuple(
        c for c in streamEntry.get("commands") or () if isinstance(c, str)
    )
    if capture.multifdDeviceState:
        notes.append(f"{len(capture.multifdDeviceState)} multifd device-state packets (QEMU 10 VFIO)")
    source = manifest.get("source")
    startedAt = manifest.get("started_at")
    return InspectReport(
        path=path,
        kind=KIND_CAPTURE,
        complete=not problems,
        problems=tuple(problems),
        notes=tuple(notes),
        manifestError=capture.error,
        parseError=None,
        machine=capture.machine,
        streamVersion=stream.version if stream is not None else None,
        pageSize=capture.pageSize,
        capabilities=stream.configuration.capabilities if stream is not None else (),
        channels=capture.channels,
        uuid=_uuidText(capture.uuid) if capture.uuid is not None else None,
        compression=capture.compression,
        flushMode=capture.flushMode,
        machineFlushMode=machineFlushMode(capture.machine) if capture.machine else None,
        zeroPages=capture.zeroPages,
        commands=tuple(commands),
        blocks=tuple(blocks),
        devices=devices,
        devicesFrom=devicesFrom,
        deviceStateLength=capture.deviceState.length if capture.deviceState is not None else None,
        vmdesc=capture.vmdescPath is not None,
        multifdDeviceState=len(capture.multifdDeviceState),
        source=source if isinstance(source, str) else None,
        startedAt=startedAt if isinstance(startedAt, str) else None,
        size=None,
    )


def _captureDevices(capture: Capture) -> tuple[tuple[DeviceReport, ...], str | None, list[str]]:
    """
    The devices of a capture: from its VMDESC if it has one, else from the
    device sections; sizes from the manifest's section walk, checked by
    walking C{device-state.bin} again.
    """
    problems: list[str] = []
    expected = None
    if capture.vmdescPath is not None:
        try:
            expected = _expectedDevices(capture.readVMDesc() or b"")
        except OSError:
            pass  # loadCapture named the missing file
        except ProtocolError as e:
            problems.append(f"the VMDESC file {os.path.basename(capture.vmdescPath)}: {e.reason}")
    sections: tuple[DeviceSection, ...] = ()
    state = capture.deviceState
    if state is not None:
        sections = state.sections
        try:
            raw = capture.readDeviceState()
        except OSError:
            raw = None  # loadCapture named it
        if raw is not None and len(raw) == state.length:
            try:
                walked = walkDeviceSections(raw, expected)
            except ProtocolError as e:
                problems.append(f"the device state {state.file}: {e.reason}")
            else:
                if sections and walked != sections:
                    problems.append(f"the device state {state.file} does not hold the sections the manifest lists")
                sections = sections or walked
    return (*_devices(expected, sections),), _devicesFrom(expected, sections), problems


def _devices(
    expected: list[tuple[str, int, int]] | None, sections: tuple[DeviceSection, ...]
) -> list[DeviceReport]:
    if expected is None:
        return [DeviceReport(s.idstr, s.instanceID, s.version, s.sectionID, s.length) for s in sections]
    devices = []
    for i, (idstr, instanceID, version) in enumerate(expected):
        section = sections[i] if i < len(sections) else None
        if section is not None and (section.idstr, section.instanceID, section.version) != (idstr, instanceID, version):
            section = None
        devices.append(DeviceReport(
            idstr, instanceID, version,
            section.sectionID if section is not None else None,
            section.length if section is not None else None,
        ))
    return devices


def _devicesFrom(expected: list[Any] | None, sections: tuple[DeviceSection, ...]) -> str | None:
    if expected is not None:
        return "vmdesc"
    return "device-state" if sections else None


def _uuidText(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def countNonZeroPages(
    path: str,
    length: int,
    pageSize: int = 4096,
    *,
    interrupted: Callable[[], bool] | None = None,
) -> int:
    """
    How many of the first C{length} bytes' pages of the file at C{path} are
    not all zero. Holes are skipped without being read (C{SEEK_DATA} and
    C{SEEK_HOLE}, where the file system has them); data is read
    L{IMAGE_CHUNK} bytes at a time.

    @raise OSError: the file cannot be opened or read.
    """
    chunkSize = max(pageSize, IMAGE_CHUNK - IMAGE_CHUNK % pageSize)
    zeroChunk = bytes(chunkSize)
    zeroPage = bytes(pageSize)
    count = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        position = 0  # always a page boundary; everything before it is counted
        while position < length:
            _check(interrupted)
            start, end = _dataExtent(fd, position, length)
            if start >= length:
                break
            start = max(position, start - start % pageSize)
            end = min(length, -(-end // pageSize) * pageSize)
            while start < end:
                _check(interrupted)
                want = min(chunkSize, end - start)
                data = os.pread(fd, want, start)
                if not data:
                    return count  # shorter than it was: nothing more to count
                if data != zeroChunk[: len(data)]:
                    for offset in range(0, len(data), pageSize):
                        if data[offset : offset + pageSize] != zeroPage[: len(data) - offset]:
                            count += 1
                start += -(-len(data) // pageSize) * pageSize
                if len(data) < want:
                    return count
            position = end
    finally:
        os.close(fd)
    return count


def _dataExtent(fd: int, position: int, length: int) -> tuple[int, int]:
    """
    The next run of data at or after C{position}: (start, end), with
    C{start >= length} when there is none. Without C{SEEK_DATA}, everything
    is data.
    """
    try:
        start = os.lseek(fd, position, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return length, length
        return position, length
    except AttributeError:  # pragma: no cover - platforms without SEEK_DATA
        return position, length
    try:
        end = os.lseek(fd, start, os.SEEK_HOLE)
    except OSError:
        end = length
    return start, min(end, length)


# Stream files


# Page states, 2 bits per page.
_NEVER, _ZERO, _DATA_ZERO, _DATA = 0, 1, 2, 3
_CHUNK_PAGES_BITS = 16  # 65536 pages a map chunk: 16 KiB for 256 MiB of 4 KiB pages
_CHUNK_PAGES = 1 << _CHUNK_PAGES_BITS
# _STATE_COUNT[s][byte]: how many of the 4 pages in the byte are in state s.
_STATE_COUNT = [
    bytes(sum(1 for shift in range(0, 8, 2) if (b >> shift) & 3 == state) for b in range(256))
    for state in range(4)
]


class _PageStates:
    """
    The state of every page of one RAM block, 2 bits each, in chunks
    allocated only where pages were sent (the block list's lengths are the
    peer's word; the pages sent are in the file).
    """

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.chunks: dict[int, bytearray] = {}

    def set(self, index: int, state: int) -> None:
        chunk = self.chunks.get(index >> _CHUNK_PAGES_BITS)
        if chunk is None:
            chunk = self.chunks[index >> _CHUNK_PAGES_BITS] = bytearray(_CHUNK_PAGES // 4)
        i = index & (_CHUNK_PAGES - 1)
        shift = (i & 3) * 2
        chunk[i >> 2] = (chunk[i >> 2] & ~(3 << shift)) | (state << shift)

    def count(self, state: int) -> int:
        table = _STATE_COUNT[state]
        total = 0
        for chunk in self.chunks.values():
            counts = chunk.translate(table)
            total += sum(n * counts.count(n) for n in range(1, 5))
        return total


class _StreamInspector:
    """
    Follows the main stream's events; keeps a page-state map per block.
    """

    def __init__(self, pageSize: int) -> None:
        self.pageSize = pageSize
        self.zeroPage = bytes(pageSize)
        self.version: int | None = None
        self.configuration: Configuration | None = None
        self.blocks: list[tuple[str, int]] = []
        self.states: dict[str, _PageStates] = {}
        self.where = "header"
        self.flushes = 0
        self.zeroRecords = 0
        self.pageRecords = 0
        self.commands: list[str] = []
        self.end: StreamEnd | None = None

    def event(self, event: Any) -> None:
        if isinstance(event, MainPage):
            self.pageRecords += 1
            index = event.offset // self.pageSize
            nonZero = event.data != self.zeroPage
            self.states[event.block.name].set(index, _DATA if nonZero else _DATA_ZERO)
        elif isinstance(event, MainZeroPage):
            self.zeroRecords += 1
            self.states[event.block.name].set(event.offset // self.pageSize, _ZERO)
        elif isinstance(event, StreamHeader):
            self.version = event.version
            self.where = "the section after the header"
        elif isinstance(event, Configuration):
            self.configuration = event
            if event.targetPageBits is not None:
                self.pageSize = 1 << event.targetPageBits
                self.zeroPage = bytes(self.pageSize)
            self.where = "the section after the configuration"
        elif isinstance(event, RamSection):
            self.where = f"RAM {event.kind} section (id {event.sectionID})"
        elif isinstance(event, RamBlockList):
            for block in event.blocks:
                self.blocks.append((block.name, block.length))
                self.states[block.name] = _PageStates(block.length // self.pageSize)
        elif isinstance(event, MultiFDFlush):
            self.flushes += 1
        elif isinstance(event, RamSectionEnd):
            self.where = f"the section after RAM {event.section}"
        elif isinstance(event, Command):
            self.commands.append(event.name)
            self.where = f"the section after command {event.name}"
        elif isinstance(event, StreamEnd):
            self.end = event


def inspectStream(
    source: str | IO[bytes],
    *,
    pageSize: int = 4096,
    name: str | None = None,
    interrupted: Callable[[], bool] | None = None,
) -> InspectReport:
    """
    Describe a plain migration stream: a file path, or a binary file object
    read to its end (e.g. standard input).

    @param pageSize: the target page size unless the configuration says
        otherwise (x86: 4096).
    @param name: what to call a file object in the report.
    @raise InspectError: the file cannot be opened or read, or is not a
        migration stream (it does not start with QEVM).
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            f: IO[bytes] = open(path, "rb")
        except OSError as e:
            raise InspectError(path, f"cannot be read: {e.strerror}")
        with f:
            return _inspectStream(f, path, pageSize, interrupted)
    return _inspectStream(source, str(name or getattr(source, "name", "-")), pageSize, interrupted)


def _inspectStream(
    f: IO[bytes], path: str, pageSize: int, interrupted: Callable[[], bool] | None
) -> InspectReport:
    inspector = _StreamInspector(pageSize)
    parser = IncrementalParser(mainStream(pageSize))
    error: ParseError | None = None
    total = 0
    first = True
    while error is None:
        _check(interrupted)
        try:
            chunk = f.read(STREAM_CHUNK)
        except OSError as e:
            raise InspectError(path, f"cannot be read: {e.strerror}")
        if first:
            _checkMagic(path, chunk)
            first = False
        if not chunk:
            parser.end()
        else:
            total += len(chunk)
            parser.feed(chunk)
        try:
            while (event := parser.nextEvent()) is not None:
                inspector.event(event)
        except ProtocolError as e:
            error = ParseError(parser.consumed, e.field, e.reason)
            break
        if not chunk:
            if not parser.done:
                error = ParseError(
                    parser.consumed, inspector.where,
                    f"the stream is cut short: the file ends at byte {total}, inside a record"
                    f" ({total - parser.consumed} bytes of it are there)",
                )
            elif parser.buffered:
                error = ParseError(parser.consumed, None, f"{parser.buffered} bytes after the end of the stream")
            break
        if parser.buffered > MAX_TAIL + STREAM_CHUNK:
            error = ParseError(
                parser.consumed, "device state",
                f"more than {MAX_TAIL >> 20} MiB after RAM without an end: not followed further",
            )
    return _streamReport(path, inspector, error, _fileSize(f, total, error))


def _fileSize(f: IO[bytes], read: int, error: ParseError | None) -> int | None:
    try:
        st = os.fstat(f.fileno())
    except (OSError, AttributeError, ValueError):
        return read if error is None else None
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    return read if error is None else None


def _checkMagic(path: str, start: bytes) -> None:
    magic = struct.pack(">I", QEMU_VM_FILE_MAGIC)
    if not start:
        raise InspectError(path, "empty file: not a migration stream")
    head = start[:4]
    if head == magic[: len(head)]:
        return
    if head == struct.pack(">I", MULTIFD_MAGIC):
        raise InspectError(
            path, "a multifd channel (it starts with 0x11223344), not a main migration stream: inspect the"
            " main channel's file or the capture",
        )
    raise InspectError(
        path, f"not a capture folder or a migration stream file (it starts with {head.hex()}, not"
        f" {magic.hex()} 'QEVM')",
    )


def _streamReport(
    path: str, inspector: _StreamInspector, error: ParseError | None, size: int | None
) -> InspectReport:
    pageSize = inspector.pageSize
    blocks = []
    neverSent = 0
    for name, length in inspector.blocks:
        states = inspector.states[name]
        zero, dataZero, data = (states.count(s) for s in (_ZERO, _DATA_ZERO, _DATA))
        pages = length // pageSize
        blocks.append(BlockReport(
            name=name,
            length=length,
            pages=pages,
            pagesNonZero=data,
            pagesWithData=data + dataZero,
            pagesZero=zero,
            pagesNeverSent=pages - zero - dataZero - data,
            file=None,
        ))
        neverSent += pages - zero - dataZero - data
    notes = []
    if inspector.flushes:
        notes.append(
            f"{inspector.flushes} MULTIFD_FLUSH records: this is the main channel of a multifd migration;"
            " the pages sent over its multifd channels are not in it"
        )
    if neverSent and error is None:
        notes.append(f"{neverSent} pages were never sent (a destination keeps what its memory holds there)")
    end = inspector.end
    tail = end.tail if end is not None else None
    configuration = inspector.configuration
    expected = None
    if tail is not None and tail.vmdescription is not None:
        expected = _expectedDevices(tail.vmdescription)  # checked by the parser already
    sections = tail.devices if tail is not None else ()
    return InspectReport(
        path=path,
        kind=KIND_STREAM,
        complete=error is None,
        problems=(str(error),) if error is not None else (),
        notes=tuple(notes),
        manifestError=None,
        parseError=error,
        machine=configuration.machine if configuration is not None else None,
        streamVersion=inspector.version,
        pageSize=pageSize,
        capabilities=configuration.capabilities if configuration is not None else (),
        channels=0,
        uuid=_uuidText(configuration.uuid) if configuration is not None and configuration.uuid else None,
        compression=None,
        # A plain stream has no MULTIFD_FLUSH; a multifd main channel of 8.1+
        # machine types has them (per-section ones cannot be told apart).
        flushMode=FLUSH_PER_ROUND if inspector.flushes else None,
        machineFlushMode=machineFlushMode(configuration.machine) if configuration is not None else None,
        zeroPages="main" if inspector.zeroRecords else None,
        commands=tuple(inspector.commands),
        blocks=tuple(blocks),
        devices=(*_devices(expected, sections),),
        devicesFrom=_devicesFrom(expected, sections) if tail is not None else None,
        deviceStateLength=len(tail.deviceState) if tail is not None else None,
        vmdesc=tail is not None and tail.vmdescription is not None,
        multifdDeviceState=0,
        source=None,
        startedAt=None,
        size=size,
    )


# Rendering


def reportToJSON(report: InspectReport) -> dict[str, Any]:
    """
    The report as the JSON object C{inspect --json} prints (keys in
    docs/inspect.md).
    """
    return {
        "format": REPORT_FORMAT,
        "path": report.path,
        "kind": report.kind,
        "complete": report.complete,
        "problems": list(report.problems),
        "notes": list(report.notes),
        "manifest_error": report.manifestError,
        "parse_error": None if report.parseError is None else {
            "offset": report.parseError.offset,
            "field": report.parseError.field,
            "reason": report.parseError.reason,
        },
        "machine": report.machine,
        "stream_version": report.streamVersion,
        "page_size": report.pageSize,
        "capabilities": list(report.capabilities),
        "channels": report.channels,
        "uuid": report.uuid,
        "compression": report.compression,
        "flush_mode": report.flushMode,
        "machine_flush_mode": report.machineFlushMode,
        "zero_pages": report.zeroPages,
        "commands": list(report.commands),
        "switchover_start": report.switchoverStart,
        "ram_total": report.ramTotal,
        "pages": report.totalPages,
        "pages_nonzero": report.pagesNonZero,
        "ram_blocks": [
            {
                "name": b.name,
                "length": b.length,
                "pages": b.pages,
                "pages_nonzero": b.pagesNonZero,
                "pages_with_data": b.pagesWithData,
                "pages_zero": b.pagesZero,
                "pages_never_sent": b.pagesNeverSent,
                "file": b.file,
            }
            for b in report.blocks
        ],
        "devices_from": report.devicesFrom,
        "device_state_length": report.deviceStateLength,
        "devices": [
            {
                "idstr": d.idstr,
                "instance_id": d.instanceID,
                "version": d.version,
                "section_id": d.sectionID,
                "length": d.length,
            }
            for d in report.devices
        ],
        "vmdesc": report.vmdesc,
        "multifd_device_state": report.multifdDeviceState,
        "source": report.source,
        "started_at": report.startedAt,
        "size": report.size,
    }


def reportFromJSON(data: dict[str, Any]) -> InspectReport:
    """
    The report that L{reportToJSON} gave C{data} for (the keys it derives,
    such as C{ram_total}, are not read back).

    @raise KeyError, TypeError: C{data} is not such a report.
    """
    if data["format"] != REPORT_FORMAT:
        raise ValueError(f"report format {data['format']!r} is not {REPORT_FORMAT}")
    error = data["parse_error"]
    return InspectReport(
        path=data["path"],
        kind=data["kind"],
        complete=data["complete"],
        problems=tuple(data["problems"]),
        notes=tuple(data["notes"]),
        manifestError=data["manifest_error"],
        parseError=None if error is None else ParseError(error["offset"], error["field"], error["reason"]),
        machine=data["machine"],
        streamVersion=data["stream_version"],
        pageSize=data["page_size"],
        capabilities=tuple(data["capabilities"]),
        channels=data["channels"],
        uuid=data["uuid"],
        compression=data["compression"],
        flushMode=data["flush_mode"],
        machineFlushMode=data["machine_flush_mode"],
        zeroPages=data["zero_pages"],
        commands=tuple(data["commands"]),
        blocks=tuple(
            BlockReport(
                name=b["name"], length=b["length"], pages=b["pages"], pagesNonZero=b["pages_nonzero"],
                pagesWithData=b["pages_with_data"], pagesZero=b["pages_zero"],
                pagesNeverSent=b["pages_never_sent"], file=b["file"],
            )
            for b in data["ram_blocks"]
        ),
        devices=tuple(
            DeviceReport(d["idstr"], d["instance_id"], d["version"], d["section_id"], d["length"])
            for d in data["devices"]
        ),
        devicesFrom=data["devices_from"],
        deviceStateLength=data["device_state_length"],
        vmdesc=data["vmdesc"],
        multifdDeviceState=data["multifd_device_state"],
        source=data["source"],
        startedAt=data["started_at"],
        size=data["size"],
    )


def renderJSON(report: InspectReport) -> str:
    return json.dumps(reportToJSON(report), indent=2) + "\n"


def humanSize(n: int) -> str:
    """
    C{67108864} -> C{"64 MiB"}, C{12916} -> C{"12.6 KiB"}, C{48} -> C{"48 B"}.
    """
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return f"{text} {unit}"


def sizeText(n: int) -> str:
    """
    C{"64 MiB (67108864 bytes)"}; bytes alone below 1 KiB.
    """
    if n < 1024:
        return f"{n} bytes"
    return f"{humanSize(n)} ({n} bytes)"


_FLUSH_TEXT = {
    "per-section": "per-section (a sync point at every RAM EOS: QEMU 7.2/8.0, machine types up to 8.0)",
    "per-round": "per-round (MULTIFD_FLUSH records: machine types 8.1 and later)",
}
_ZERO_TEXT = {
    "main": "main (ZERO records on the main channel: QEMU up to 8.2, or zero-page-detection=legacy)",
    "multifd": "multifd (zero-page lists in multifd packets: QEMU 9.0 and later)",
    "main+multifd": "main and multifd (ZERO records and multifd zero-page lists)",
}


def _conventionLines(report: InspectReport) -> list[tuple[str, str]]:
    lines = []
    if report.flushMode is not None:
        flush = _FLUSH_TEXT.get(report.flushMode, report.flushMode)
    elif report.kind == KIND_CAPTURE and report.channels:
        flush = "unknown (the migration ended before its first sync point)"
    else:
        flush = "none (a plain migration has no multifd sync points)"
        if report.machineFlushMode is not None:
            flush += f"; its machine type implies {report.machineFlushMode} for multifd"
    lines.append(("flush mode", flush))
    lines.append(("zero pages", _ZERO_TEXT.get(report.zeroPages or "", report.zeroPages or "none sent")))
    if report.compression is not None:
        compression = report.compression
    elif report.channels:
        compression = "unknown (no multifd page came)"
    else:
        compression = "none (no multifd payloads)"
    lines.append(("compression", compression))
    if report.switchoverStart:
        switchover = "SWITCHOVER_START (QEMU 10.0 and later, machine types 10.0 and later)"
    else:
        switchover = "no SWITCHOVER_START (QEMU before 10.0, or a machine type before 10.0)"
    lines.append(("switchover", switchover))
    return lines


def _table(rows: list[list[str]], right: set[int], indent: str = "    ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def _count(n: int | None) -> str:
    return "?" if n is None else str(n)


def renderText(report: InspectReport) -> str:
    """
    The report for a person, as C{inspect} prints it.
    """
    out: list[str] = []
    if report.kind == KIND_CAPTURE:
        verdict = "complete" if report.complete else "NOT complete"
        out.append(f"{report.path}: capture, {verdict}")
    else:
        what = "plain migration stream" if not any("MULTIFD_FLUSH" in n for n in report.notes) \
            else "migration stream (main channel of a multifd migration)"
        sizeNote = f", {sizeText(report.size)}" if report.size is not None else ""
        verdict = "parses to the end" if report.complete else "does NOT parse to the end"
        out.append(f"{report.path}: {what}{sizeNote}, {verdict}")
    fields: list[tuple[str, str]] = []
    for problem in report.problems:
        fields.append(("problem", problem))
    if report.machine is not None:
        fields.append(("machine", report.machine))
    else:
        fields.append(("machine", "none (no configuration section)" if report.complete else "unknown"))
    if report.streamVersion is not None:
        fields.append(("stream version", str(report.streamVersion)))
    if report.capabilities:
        fields.append(("capabilities", ", ".join(report.capabilities)))
    if report.kind == KIND_CAPTURE:
        fields.append(("channels", f"{report.channels} multifd" if report.channels else "0 (plain migration)"))
    else:
        fields.append(("channels", "0 (one stream)"))
    fields.append(("uuid", report.uuid or "none"))
    if report.source or report.startedAt:
        fields.append(("received", " at ".join(x for x in (report.source and f"from {report.source}",
                                                           report.startedAt) if x)))
    fields.extend(_conventionLines(report))
    fields.append(("page size", f"{report.pageSize} bytes"))
    nonZero = report.pagesNonZero
    ram = f"{sizeText(report.ramTotal)} in {len(report.blocks)} block{'s' if len(report.blocks) != 1 else ''}"
    if report.blocks:
        ram += f", {_count(nonZero)} of {report.totalPages} pages non-zero"
    fields.append(("RAM", ram))
    width = max(len(label) for label, _ in fields) + 1
    for label, value in fields:
        out.append(f"  {label + ':':<{width}} {value}")
    if report.blocks:
        rows = [["block", "size", "bytes", "pages", "non-zero", "sent with data", "sent zero", "never sent"]]
        for b in report.blocks:
            rows.append([
                b.name, humanSize(b.length), str(b.length), str(b.pages), _count(b.pagesNonZero),
                _count(b.pagesWithData), _count(b.pagesZero), _count(b.pagesNeverSent),
            ])
        out.extend(_table(rows, right={1, 2, 3, 4, 5, 6, 7}))
    if report.deviceStateLength is None and report.devices:
        devices = f"{len(report.devices)} (from VMDESC), no device state"
    elif report.deviceStateLength is None:
        if report.kind == KIND_STREAM:
            devices = "none (the stream did not get as far as the device state)"
        elif report.complete:
            devices = "none (the capture has no device state)"
        else:
            devices = "none (the migration did not get as far as the device state)"
    else:
        origin = {"vmdesc": "from VMDESC", "device-state": "from the device sections; no VMDESC"}.get(
            report.devicesFrom or "", "no device sections")
        devices = f"{len(report.devices)} ({origin}), device state {sizeText(report.deviceStateLength)}"
    out.append(f"  {'devices:':<{width}} {devices}")
    if report.devices:
        rows = [["device", "instance", "version", "bytes"]]
        for d in report.devices:
            rows.append([d.idstr, str(d.instanceID), str(d.version), _count(d.length)])
        out.extend(_table(rows, right={1, 2, 3}))
    for note in report.notes:
        out.append(f"  {'note:':<{width}} {note}")
    return "\n".join(out) + "\n"

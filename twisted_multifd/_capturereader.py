"""
Reading a capture folder back (see docs/capture-format.md): the manifest,
checked field by field, and the files it names, checked against it.

L{loadCapture} is the one entry point. By default (C{strict=True}) it refuses
anything that could not be sent again as it is: a folder without a manifest,
a manifest that does not parse or lacks a field, a capture that is not
complete, a missing file, an image whose size is not its block's length. Every
problem found is named in one L{CaptureError}. With C{strict=False} it loads
whatever the manifest describes, incomplete captures included, and lists the
problems in L{Capture.problems} instead (only a manifest that cannot be read
at all still raises).

L{readPageWindows} goes over a RAM image a window of pages at a time,
reading only windows with both data and holes: a window in a hole is zero
pages, one inside a data extent is data pages, read only when asked.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs

from ._capture import MANIFEST, MANIFEST_FORMAT
from ._errors import MigrationError
from ._incremental import IncrementalParser
from ._mainstream import QEMU_VM_FILE_VERSION, Configuration, buildHeader, mainStream
from ._tail import DeviceSection

FLUSH_MODES = ("per-section", "per-round")


class CaptureError(Exception):
    """
    A capture folder cannot be used: the message names the folder and every
    problem found.

    @ivar path: the capture folder.
    @ivar problems: one sentence per problem.
    """

    def __init__(self, path: str, problems: list[str] | tuple[str, ...]) -> None:
        self.path = path
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            message = f"{path}: {self.problems[0]}"
        else:
            message = f"{path}: {len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(message)


@attrs.frozen
class CaptureBlock:
    """
    One RAM block of a capture.

    @ivar file: the image, relative to the capture folder.
    @ivar path: the image's full path.
    """

    name: str
    length: int
    file: str
    path: str
    pagesWithData: int
    pagesZero: int
    pagesNeverSent: int


@attrs.frozen
class StreamFacts:
    """
    What is needed to write the main stream again (the manifest's C{stream}).

    @ivar configuration: the configuration section, parsed; C{raw} is the
        section as the source sent it.
    @ivar commands: the commands the source sent (e.g. C{("SWITCHOVER_START",)}).
    @ivar flushMode: as detected from the RAM START section; meaningful only
        for multifd streams.
    """

    version: int
    configuration: Configuration
    ramSectionID: int
    ramInstanceID: int
    ramVersion: int
    ramTotal: int
    commands: tuple[str, ...]
    flushMode: str | None


@attrs.frozen
class DeviceStateFile:
    """
    The FULL device sections, verbatim, in C{path}.
    """

    file: str
    path: str
    length: int
    sections: tuple[DeviceSection, ...]


@attrs.frozen
class MultiFDDeviceStateFile:
    """
    One QEMU 10 multifd device-state packet (VFIO), its payload in C{path}.
    """

    idstr: str
    instanceID: int
    flags: int
    file: str
    path: str


@attrs.frozen
class Capture:
    """
    A capture folder as its manifest describes it.

    Fields the manifest leaves empty (an incomplete capture loaded with
    C{strict=False}) are L{None} or empty.

    @ivar problems: what is wrong with the capture (always empty for a
        capture loaded with C{strict=True}).
    @ivar uuid: the 16 raw bytes of the multifd channels' uuid, or L{None}.
    @ivar vmdescPath: the VMDESC JSON file, or L{None} when the source sent none.
    """

    path: str
    complete: bool
    error: str | None
    machine: str | None
    channels: int
    uuid: bytes | None
    pageSize: int
    compression: str | None
    flushMode: str | None
    zeroPages: str | None
    blocks: tuple[CaptureBlock, ...]
    stream: StreamFacts | None
    deviceState: DeviceStateFile | None
    vmdescPath: str | None
    multifdDeviceState: tuple[MultiFDDeviceStateFile, ...]
    problems: tuple[str, ...]
    manifest: dict[str, Any] = attrs.field(repr=False, eq=False)

    @property
    def ramTotal(self) -> int:
        return sum(block.length for block in self.blocks)

    @property
    def totalPages(self) -> int:
        return sum(block.length // self.pageSize for block in self.blocks)

    @property
    def pagesWithData(self) -> int:
        return sum(block.pagesWithData for block in self.blocks)

    def readDeviceState(self) -> bytes:
        """
        The device state, verbatim (empty if the capture has none).
        """
        if self.deviceState is None:
            return b""
        with open(self.deviceState.path, "rb") as f:
            return f.read()

    def readVMDesc(self) -> bytes | None:
        if self.vmdescPath is None:
            return None
        with open(self.vmdescPath, "rb") as f:
            return f.read()


def parseConfiguration(raw: bytes) -> Configuration:
    """
    Parse a raw configuration section (from its C{0x07} byte) with the main
    stream's own parser.

    @raise MigrationError: it is not a well-formed configuration section.
    """
    parser = IncrementalParser(mainStream())
    # The header and an EOF byte around it let the stream parser find where
    # the section ends; only the events up to the configuration are used.
    parser.feed(buildHeader(QEMU_VM_FILE_VERSION) + raw + b"\x00")
    parser.end()
    while True:
        event = parser.nextEvent()
        if event is None:
            raise MigrationError("the configuration section is cut short", field="configuration")
        if isinstance(event, Configuration):
            if event.raw != raw:
                raise MigrationError(
                    f"{len(raw) - len(event.raw)} bytes after the configuration section",
                    field="configuration",
                )
            return event


_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")


class _Fields:
    """
    Typed access to the manifest's fields; every mismatch is one problem,
    named by its path in the manifest (C{ram_blocks[2].length}).
    """

    def __init__(self) -> None:
        self.problems: list[str] = []

    def get(self, obj: Any, key: str, kind: Any, where: str, *, optional: bool = False) -> Any:
        name = f"{where}.{key}" if where else key
        if not isinstance(obj, dict):
            self.problems.append(f"manifest.json: {where or 'the manifest'} is not an object")
            return None
        if key not in obj:
            if not optional:
                self.problems.append(f"manifest.json: {name} is missing")
            return None
        value = obj[key]
        if value is None and optional:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a manifest never means one for the other.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            self.problems.append(f"manifest.json: {name} should be {names}, not {value!r}"[:300])
            return None
        if kind is int and value < 0:
            self.problems.append(f"manifest.json: {name} is negative ({value})")
            return None
        return value


_KIND_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object", bool: "true or false"}


def _insideFolder(fields: _Fields, folder: str, relative: str, where: str) -> str | None:
    """
    The full path of a file the manifest names, if it stays inside the folder.
    """
    if os.path.isabs(relative) or ".." in relative.replace("\\", "/").split("/"):
        fields.problems.append(f"manifest.json: {where} {relative!r} is not a path inside the capture")
        return None
    return os.path.join(folder, relative)


def _checkFile(problems: list[str], path: str, relative: str, length: int | None, what: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        problems.append(f"{what} {relative} is missing")
        return
    except OSError as e:
        problems.append(f"{what} {relative} cannot be read: {e.strerror}")
        return
    if not os.path.isfile(path):
        problems.append(f"{what} {relative} is not a regular file")
    elif length is not None and st.st_size != length:
        problems.append(f"{what} {relative} is {st.st_size} bytes, the manifest says {length}")
    elif not os.access(path, os.R_OK):
        problems.append(f"{what} {relative} is not readable")


def readManifest(path: str) -> dict[str, Any]:
    """
    The manifest of the capture in C{path}, as a dict.

    @raise CaptureError: the folder or its manifest is missing, or the
        manifest is not a JSON object.
    """
    if not os.path.isdir(path):
        raise CaptureError(path, ["not a folder" if os.path.exists(path) else "no such folder"])
    manifestPath = os.path.join(path, MANIFEST)
    try:
        with open(manifestPath, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CaptureError(path, [
            (f"no {MANIFEST}: not a capture, or its migration is still being received"
             " (the manifest is written last)")
        ])
    except OSError as e:
        raise CaptureError(path, [f"{MANIFEST} cannot be read: {e.strerror}"])
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise CaptureError(path, [f"{MANIFEST} is corrupted (not JSON: {e})"])
    if not isinstance(manifest, dict):
        raise CaptureError(path, [f"{MANIFEST} is corrupted (not a JSON object)"])
    return manifest


def loadCapture(path: str, *, strict: bool = True) -> Capture:
    """
    Load and check the capture in folder C{path}.

    @param strict: refuse (raise) a capture with any problem, incomplete ones
        included; otherwise list the problems in L{Capture.problems}.
    @raise CaptureError: the capture cannot be used; its message names every
        problem found.
    """
    manifest = readManifest(path)
    fields = _Fields()
    fmt = fields.get(manifest, "format", int, "")
    if fmt is not None and fmt != MANIFEST_FORMAT:
        raise CaptureError(path, [f"manifest.json: format {fmt} is not supported (only {MANIFEST_FORMAT})"])

    complete = fields.get(manifest, "complete", bool, "")
    error = fields.get(manifest, "error", str, "", optional=True)
    notComplete: list[str] = []
    if complete is not True:
        notComplete.append(
            "the capture is not complete"
            + (f" ({error})" if error else "")
            + ": its migration did not end cleanly, so it cannot be sent"
        )

    machine = fields.get(manifest, "machine", str, "", optional=True)
    channels = fields.get(manifest, "channels", int, "")
    pageSize = fields.get(manifest, "page_size", int, "")
    if pageSize is not None and (pageSize < 1024 or pageSize & (pageSize - 1)):
        fields.problems.append(f"manifest.json: page_size {pageSize} is not a power of two of at least 1024")
        pageSize = None
    compression = fields.get(manifest, "compression", str, "", optional=True)
    flushMode = fields.get(manifest, "flush_mode", str, "", optional=True)
    if flushMode is not None and flushMode not in FLUSH_MODES:
        fields.problems.append(f"manifest.json: flush_mode {flushMode!r} is not one of {', '.join(FLUSH_MODES)}")
    zeroPages = fields.get(manifest, "zero_pages", str, "", optional=True)

    uuid = None
    uuidText = fields.get(manifest, "uuid", str, "", optional=True)
    if uuidText is not None:
        if _UUID.fullmatch(uuidText):
            uuid = bytes.fromhex(uuidText.replace("-", ""))
        else:
            fields.problems.append(f"manifest.json: uuid {uuidText!r} is not a uuid")

    # RAM blocks and their images.
    blocks: list[CaptureBlock] = []
    fileProblems: list[str] = []
    for i, entry in enumerate(fields.get(manifest, "ram_blocks", list, "") or []):
        where = f"ram_blocks[{i}]"
        name = fields.get(entry, "name", str, where)
        length = fields.get(entry, "length", int, where)
        relative = fields.get(entry, "file", str, where)
        counts = [fields.get(entry, key, int, where, optional=True) or 0
                  for key in ("pages_with_data", "pages_zero", "pages_never_sent")]
        if None in (name, length, relative):
            continue
        if pageSize is not None and length % pageSize:
            fields.problems.append(f"manifest.json: {where}.length {length} is not a whole number of pages")
        full = _insideFolder(fields, path, relative, f"{where}.file")
        if full is None:
            continue
        _checkFile(fileProblems, full, relative, length, f"the image of RAM block {name!r},")
        blocks.append(CaptureBlock(name, length, relative, full, *counts))
    names = [block.name for block in blocks]
    if len(set(names)) != len(names):
        fields.problems.append("manifest.json: a RAM block is listed twice")

    # Stream facts.
    stream = None
    streamEntry = fields.get(manifest, "stream", dict, "", optional=not complete)
    if streamEntry is not None:
        stream = _streamFacts(fields, streamEntry, required=bool(complete))
        if stream is not None and blocks and stream.ramTotal != sum(b.length for b in blocks):
            fields.problems.append(
                f"manifest.json: stream.ram_total {stream.ramTotal} is not the sum of the RAM block"
                f" lengths ({sum(b.length for b in blocks)})"
            )
        if stream is not None and pageSize is not None and stream.configuration.targetPageBits is not None \
                and 1 << stream.configuration.targetPageBits != pageSize:
            fields.problems.append(
                f"manifest.json: page_size {pageSize} does not match the configuration's target page bits"
                f" ({stream.configuration.targetPageBits})"
            )
    if complete and not blocks:
        fields.problems.append("manifest.json: a complete capture lists no RAM block")

    # Device state, VMDESC, multifd device-state packets.
    deviceState = None
    deviceEntry = fields.get(manifest, "device_state", dict, "", optional=not complete)
    if deviceEntry is not None:
        deviceState = _deviceState(fields, fileProblems, path, deviceEntry)

    vmdescPath = None
    vmdescRelative = fields.get(manifest, "vmdesc", str, "", optional=True)
    if vmdescRelative is not None:
        vmdescPath = _insideFolder(fields, path, vmdescRelative, "vmdesc")
        if vmdescPath is not None:
            _checkFile(fileProblems, vmdescPath, vmdescRelative, None, "the VMDESC file")

    packets: list[MultiFDDeviceStateFile] = []
    for i, entry in enumerate(fields.get(manifest, "multifd_device_state", list, "", optional=True) or []):
        where = f"multifd_device_state[{i}]"
        idstr = fields.get(entry, "idstr", str, where)
        instanceID = fields.get(entry, "instance_id", int, where)
        flags = fields.get(entry, "flags", int, where)
        relative = fields.get(entry, "file", str, where)
        if None in (idstr, instanceID, flags, relative):
            continue
        full = _insideFolder(fields, path, relative, f"{where}.file")
        if full is not None:
            _checkFile(fileProblems, full, relative, None, "the device-state packet")
            packets.append(MultiFDDeviceStateFile(idstr, instanceID, flags, relative, full))

    problems = notComplete + fields.problems + fileProblems
    if strict and problems:
        raise CaptureError(path, problems)
    return Capture(
        path=path,
        complete=complete is True,
        error=error,
        machine=machine,
        channels=channels or 0,
        uuid=uuid,
        pageSize=pageSize or 4096,
        compression=compression,
        flushMode=flushMode if flushMode in FLUSH_MODES else None,
        zeroPages=zeroPages,
        blocks=tuple(blocks),
        stream=stream,
        deviceState=deviceState,
        vmdescPath=vmdescPath,
        multifdDeviceState=tuple(packets),
        problems=tuple(problems),
        manifest=manifest,
    )


def _streamFacts(fields: _Fields, entry: dict[str, Any], required: bool) -> StreamFacts | None:
    where = "stream"
    before = len(fields.problems)
    version = fields.get(entry, "version", int, where, optional=not required)
    configurationHex = fields.get(entry, "configuration", str, where, optional=not required)
    section = fields.get(entry, "ram_section", dict, where, optional=not required)
    total = fields.get(entry, "ram_total", int, where, optional=not required)
    commands = fields.get(entry, "commands", list, where, optional=True) or []
    flushMode = fields.get(entry, "flush_mode", str, where, optional=True)
    sectionID = instanceID = ramVersion = None
    if section is not None:
        sectionID = fields.get(section, "section_id", int, f"{where}.ram_section")
        instanceID = fields.get(section, "instance_id", int, f"{where}.ram_section")
        ramVersion = fields.get(section, "version", int, f"{where}.ram_section")
    if not all(isinstance(c, str) for c in commands):
        fields.problems.append(f"manifest.json: {where}.commands should be a list of names")
    if flushMode is not None and flushMode not in FLUSH_MODES:
        fields.problems.append(f"manifest.json: {where}.flush_mode {flushMode!r} is not one of {', '.join(FLUSH_MODES)}")
    if None in (version, configurationHex, total, sectionID, instanceID, ramVersion) \
            or len(fields.problems) > before:
        return None
    assert sectionID is not None and instanceID is not None and ramVersion is not None
    try:
        configuration = parseConfiguration(bytes.fromhex(configurationHex))
    except ValueError:
        fields.problems.append(f"manifest.json: {where}.configuration is not hexadecimal")
        return None
    except MigrationError as e:
        fields.problems.append(f"manifest.json: {where}.configuration is not a configuration section: {e}")
        return None
    return StreamFacts(
        version, configuration, sectionID, instanceID, ramVersion, total,
        tuple(commands), flushMode,
    )


def _deviceState(
    fields: _Fields, fileProblems: list[str], folder: str, entry: dict[str, Any]
) -> DeviceStateFile | None:
    where = "device_state"
    relative = fields.get(entry, "file", str, where)
    length = fields.get(entry, "length", int, where)
    sections: list[DeviceSection] = []
    position = 0
    for i, section in enumerate(fields.get(entry, "sections", list, where) or []):
        at = f"{where}.sections[{i}]"
        values = [
            fields.get(section, "idstr", str, at),
            fields.get(section, "instance_id", int, at),
            fields.get(section, "version", int, at),
            fields.get(section, "section_id", int, at),
            fields.get(section, "offset", int, at),
            fields.get(section, "length", int, at),
        ]
        if None in values:
            continue
        device = DeviceSection(*values)
        if device.offset != position:
            fields.problems.append(
                f"manifest.json: {at} starts at {device.offset}, the previous section ends at {position}"
            )
        position = device.offset + device.length
        sections.append(device)
    if length is not None and sections and position != length:
        fields.problems.append(
            f"manifest.json: {where}.sections end at {position}, the device state is {length} bytes"
        )
    if relative is None or length is None:
        return None
    full = _insideFolder(fields, folder, relative, f"{where}.file")
    if full is None:
        return None
    _checkFile(fileProblems, full, relative, length, "the device state")
    return DeviceStateFile(relative, full, length, tuple(sections))


def describePayload(payload: bytes | None) -> str:
    return "<not read>" if payload is None else f"<{len(payload)} bytes>"


class DataPages:
    """
    Data pages that were read (C{payload}), or not (L{None}): then they are
    the bytes of C{image}, open, from the first of C{normalOffsets} on, and
    are read only if asked for. Shared by L{PageWindow} and the sender's
    packets, which hand such pages on unread.
    """

    __slots__ = ()

    if TYPE_CHECKING:
        normalOffsets: tuple[int, ...]
        payload: bytes | None
        image: OpenImage | None

    @property
    def size(self) -> int:
        """
        The bytes of the data pages, read or not.
        """
        if self.payload is not None:
            return len(self.payload)
        assert self.image is not None
        return len(self.normalOffsets) * self.image.pageSize

    @property
    def data(self) -> bytes:
        """
        The data pages back to back; read from the image (on every access)
        if they were not read.
        """
        if self.payload is not None:
            return self.payload
        assert self.image is not None
        return self.image.read(self.normalOffsets[0], self.size)


@attrs.frozen
class PageWindow(DataPages):
    """
    Consecutive pages of one RAM block, from its image.

    @ivar start: the block offset of the first page.
    @ivar count: how many pages the window covers.
    @ivar normalOffsets: block offsets of the pages sent as data.
    @ivar zeroOffsets: block offsets of the zero pages (also those never sent).
    @ivar payload: the data pages back to back, as read; L{None} when they
        were not read (a window wholly inside a data extent of the image:
        every page is a data page, and C{data} reads them when asked).
    @ivar image: when the data pages are the image's bytes from C{start} on
        (no zero page in the window), the image, open; see L{OpenImage}.
        Always set when C{payload} is L{None}.
    """

    start: int
    count: int
    normalOffsets: tuple[int, ...]
    zeroOffsets: tuple[int, ...]
    payload: bytes | None = attrs.field(repr=describePayload)
    image: OpenImage | None = attrs.field(default=None, eq=False, repr=False)


class OpenImage:
    """
    A RAM image open for reading while L{readPageWindows} goes over it.

    A window whose data pages are the image's bytes from its C{start} on
    names it: a socket can then be given those bytes straight from the file
    (C{os.sendfile}), and any part of them read (L{read}) only when needed,
    for as long as the image is open (C{fd} is -1 once the reader is done).
    """

    def __init__(self, fd: int, block: CaptureBlock, pageSize: int) -> None:
        self.fd = fd
        self.block = block
        self.pageSize = pageSize

    def read(self, offset: int, size: int) -> bytes:
        """
        C{size} bytes of the image from C{offset}.

        @raise CaptureError: the image is closed, or shorter than that.
        """
        block = self.block
        if self.fd < 0:
            raise CaptureError(block.path, [
                f"the image of RAM block {block.name!r} was read after its reader was done"
            ])
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise CaptureError(block.path, [
                (f"the image of RAM block {block.name!r} ends at {offset + len(data)},"
                 f" before the block's length {block.length} (did it change?)")
            ])
        return data

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def readPageWindows(
    block: CaptureBlock, pageSize: int, windowPages: int, *, readData: bool = False
) -> Iterator[PageWindow]:
    """
    The pages of C{block}'s image, C{windowPages} at a time from offset 0
    (the last window may be shorter). Only one window is held in memory.

    The image's extents (C{SEEK_DATA}, C{SEEK_HOLE}) say where pages are
    without reading them: the receiver leaves zero and never-sent pages as
    holes. A window wholly in a hole is all zero pages, and not read. A
    window wholly inside a data extent is all data pages, and not read
    either (unless C{readData}): its L{PageWindow.data} reads it when asked.
    Only windows with both are read, and their pages checked for zeros.
    A page with data that later became zero is written as zeros by the
    receiver, inside an extent: it is then a data page of zeros, which is
    what it holds. Extents are trusted only when they can tell zero pages
    (see L{_extentsTellZeroPages}); otherwise every window with data is read.

    A window without zero pages names the image (L{PageWindow.image}), open
    until the reader is done.

    @param readData: read every window with data, as before extents were
        trusted (the data then is in L{PageWindow.payload}).
    @raise CaptureError: the image is shorter than the block, or unreadable.
    """
    windowSize = windowPages * pageSize
    zeroWindow = bytes(windowSize)
    zeroPage = bytes(pageSize)
    length = block.length
    try:
        fd = os.open(block.path, os.O_RDONLY)
    except OSError as e:
        raise CaptureError(block.path, [f"the image of RAM block {block.name!r} cannot be opened: {e.strerror}"])
    image = OpenImage(fd, block, pageSize)
    try:
        trustExtents = not readData and _extentsTellZeroPages(fd, block)
        # First byte of data at or after the last position asked for: no
        # data lies between the two. None: SEEK_DATA is not available.
        nextData: int | None = -1
        # The end of the data extent found last (from where it was asked).
        holeAt = -1
        position = 0
        while position < length:
            end = min(position + windowSize, length)
            count = (end - position) // pageSize
            if nextData is not None and nextData < position:
                nextData = _seekData(fd, position)
            if nextData is not None and nextData >= end:
                yield PageWindow(position, count, (), tuple(range(position, end, pageSize)), b"")
                position = end
                continue
            if trustExtents and nextData == position:
                if holeAt <= position:
                    holeAt = _seekHole(fd, position)
                if holeAt >= end:
                    # Data all through: every page is a data page, unread.
                    yield PageWindow(position, count, tuple(range(position, end, pageSize)), (), None, image)
                    position = end
                    continue
            data = os.pread(fd, end - position, position)
            if len(data) != end - position:
                raise CaptureError(block.path, [
                    (f"the image of RAM block {block.name!r} ends at {position + len(data)},"
                     f" before the block's length {length} (did it change?)")
                ])
            if data == zeroWindow[: len(data)]:
                yield PageWindow(position, count, (), tuple(range(position, end, pageSize)), b"")
            elif 0 not in data[::pageSize]:
                # Every page starts with a non-zero byte (the usual case for
                # pages with data): none is a zero page, and the window is
                # sent as read, without a Python step per page.
                yield PageWindow(position, count, tuple(range(position, end, pageSize)), (), data, image)
            else:
                view = memoryview(data)
                normal: list[int] = []
                zero: list[int] = []
                for i in range(count):
                    # startswith compares in place (memcmp), without a copy.
                    if data.startswith(zeroPage, i * pageSize):
                        zero.append(position + i * pageSize)
                    else:
                        normal.append(position + i * pageSize)
                if not zero:
                    yield PageWindow(position, count, tuple(normal), (), data, image)
                else:
                    payload = b"".join(view[o - position : o - position + pageSize] for o in normal)
                    yield PageWindow(position, count, tuple(normal), tuple(zero), payload)
            position = end
    finally:
        image.close()


def _extentsTellZeroPages(fd: int, block: CaptureBlock) -> bool:
    """
    Whether the image's data extents can be taken for its data pages: yes
    if the manifest counts no zero (nor never-sent) page in the block, or
    if the image has holes at all. An image with zero pages but no hole
    (copied without keeping it sparse, or on a file system without holes,
    whose C{SEEK_HOLE} finds only the end) has them written as zeros: its
    windows are read and checked.
    """
    if block.pagesZero + block.pagesNeverSent == 0:
        return True
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_blocks * 512 < st.st_size


def _seekData(fd: int, position: int) -> int | None:
    try:
        return os.lseek(fd, position, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return 1 << 62  # no data after position: the rest is a hole
        return None  # the file system cannot tell: read everything
    except AttributeError:  # pragma: no cover - platforms without SEEK_DATA
        return None


def _seekHole(fd: int, position: int) -> int:
    """
    The end of the data extent at C{position} (the next hole, or the end
    of the file); C{position} itself if that cannot be told.
    """
    try:
        return os.lseek(fd, position, os.SEEK_HOLE)
    except (OSError, AttributeError):
        return position

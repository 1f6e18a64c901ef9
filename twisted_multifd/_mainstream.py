"""
The main migration channel: header, configuration, RAM sections, commands and
the device-state tail, as a pure incremental parser (see L{IncrementalParser}).

RAM sections are parsed record by record; everything after the RAM END
section is kept verbatim and split at the end (L{splitTail}).
"""

from __future__ import annotations

import struct

import attrs

from ._errors import ProtocolError, UnsupportedFeature
from ._incremental import READ_TO_END, ParserGenerator
from ._tail import StreamTail, splitTail

QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3
QEMU_VM_FILE_VERSION_COMPAT = 2

SECTION_EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
SECTION_VMDESCRIPTION = 0x06
SECTION_CONFIGURATION = 0x07
SECTION_COMMAND = 0x08
SECTION_FOOTER = 0x7E

SECTION_NAMES = {
    SECTION_EOF: "EOF",
    SECTION_START: "START",
    SECTION_PART: "PART",
    SECTION_END: "END",
    SECTION_FULL: "FULL",
    SUBSECTION: "SUBSECTION",
    SECTION_VMDESCRIPTION: "VMDESCRIPTION",
    SECTION_CONFIGURATION: "CONFIGURATION",
    SECTION_COMMAND: "COMMAND",
    SECTION_FOOTER: "FOOTER",
}

# RAM record flags (low bits of each record's be64).
RAM_FULL = 0x001
RAM_ZERO = 0x002
RAM_MEM_SIZE = 0x004
RAM_PAGE = 0x008
RAM_EOS = 0x010
RAM_CONTINUE = 0x020
RAM_XBZRLE = 0x040
RAM_HOOK = 0x080
RAM_COMPRESS_PAGE = 0x100
RAM_MULTIFD_FLUSH = 0x200

RAM_SECTION_VERSION = 4

COMMAND_SWITCHOVER_START = 11
COMMAND_NAMES = {
    1: "OPEN_RETURN_PATH",
    2: "PING",
    3: "POSTCOPY_ADVISE",
    4: "POSTCOPY_LISTEN",
    5: "POSTCOPY_RUN",
    6: "POSTCOPY_RAM_DISCARD",
    7: "PACKAGED",
    8: "ENABLE_COLO",
    9: "POSTCOPY_RESUME",
    10: "RECV_BITMAP",
    11: "SWITCHOVER_START",
}

FLUSH_PER_ROUND = "per-round"
FLUSH_PER_SECTION = "per-section"

MAX_MACHINE_NAME = 256
MAX_RAM_TOTAL = 1 << 40  # 1 TiB: a capture keeps a byte of state per page (256 MiB at most)
MAX_CAPABILITIES = 64


@attrs.frozen
class RamBlock:
    name: str
    length: int


@attrs.frozen
class StreamHeader:
    version: int


@attrs.frozen
class Configuration:
    """
    @ivar machine: the machine type the source runs (e.g. C{pc-i440fx-7.2}).
    @ivar raw: the whole section as sent, from its C{0x07} byte, so that it can
        be sent again verbatim.
    """

    machine: str
    capabilities: tuple[str, ...]
    uuid: bytes | None
    targetPageBits: int | None
    raw: bytes = attrs.field(repr=False)


@attrs.frozen
class RamSection:
    """
    The header of a RAM section: C{kind} is C{"START"}, C{"PART"} or C{"END"}.
    """

    kind: str
    sectionID: int
    instanceID: int
    version: int


@attrs.frozen
class RamBlockList:
    total: int
    blocks: tuple[RamBlock, ...]


@attrs.frozen
class MainPage:
    block: RamBlock
    offset: int
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


@attrs.frozen
class MainZeroPage:
    block: RamBlock
    offset: int


@attrs.frozen
class MultiFDFlush:
    """
    A C{RAM_SAVE_FLAG_MULTIFD_FLUSH} record: a multifd sync point (8.1+).
    """

    section: str


@attrs.frozen
class RamSectionEnd:
    """
    A RAM section's EOS. C{flushMode} is known from the end of START on: a
    per-round stream has a MULTIFD_FLUSH before START's EOS; in a per-section
    stream (7.2, 8.0, flush-after-each-section) every EOS is a sync point.
    """

    section: str
    flushMode: str


@attrs.frozen
class Command:
    number: int
    name: str
    data: bytes


@attrs.frozen
class StreamEnd:
    tail: StreamTail


def mainStream(pageSize: int = 4096) -> ParserGenerator:
    """
    Parser for a whole main channel, from its first byte to its end.

    @param pageSize: the source's target page size, used unless the
        configuration section says otherwise (4096 for x86, which never sends
        it).
    """
    magic, version = struct.unpack(">II", (yield 8))
    if magic != QEMU_VM_FILE_MAGIC:
        raise ProtocolError(
            f"expected {QEMU_VM_FILE_MAGIC:#010x} (QEVM), got {magic:#010x}", field="header magic"
        )
    if version == QEMU_VM_FILE_VERSION_COMPAT:
        raise UnsupportedFeature("stream version 2 is obsolete", field="header version")
    if version != QEMU_VM_FILE_VERSION:
        raise ProtocolError(
            f"expected {QEMU_VM_FILE_VERSION}, got {version}", field="header version"
        )
    yield StreamHeader(version)

    ram = _RamState(pageSize)
    kind = (yield 1)[0]
    if kind == SECTION_CONFIGURATION:
        configuration, kind = yield from _configuration()
        if configuration.targetPageBits is not None:
            ram.pageSize = 1 << configuration.targetPageBits
        ram.ignoreShared = "x-ignore-shared" in configuration.capabilities
        if "mapped-ram" in configuration.capabilities:
            raise UnsupportedFeature("capability mapped-ram (file migration) is not supported",
                                     field="configuration")
        yield configuration

    while True:
        if kind in (SECTION_START, SECTION_FULL):
            raw = bytes([kind]) + (yield 5)
            sectionID, idlen = struct.unpack(">IB", raw[1:])
            rawName = yield idlen
            raw += rawName + (yield 8)
            instanceID, sectionVersion = struct.unpack(">II", raw[-8:])
            idstr = rawName.decode("ascii", "replace")
            if idstr == "ram" and kind == SECTION_START:
                if ram.sectionID is not None:
                    raise ProtocolError("second RAM START section", field="section header")
                if sectionVersion > RAM_SECTION_VERSION:
                    raise UnsupportedFeature(
                        f"RAM section version {sectionVersion} is newer than {RAM_SECTION_VERSION}",
                        field="section header",
                    )
                ram.sectionID = sectionID
                yield RamSection("START", sectionID, instanceID, sectionVersion)
                yield from ram.body("START")
                kind = yield from _footer(sectionID)
                continue
            if kind == SECTION_FULL and ram.ended:
                tail = raw + (yield READ_TO_END)
                yield StreamEnd(splitTail(tail))
                return
            what = "START" if kind == SECTION_START else "FULL"
            raise UnsupportedFeature(
                f"{what} section of {idstr!r} (id {sectionID})"
                + (" before the end of RAM (early-setup devices such as virtio-mem)" if kind == SECTION_FULL
                   else ": iterable devices other than RAM are not supported"),
                field="section header",
            )
        elif kind in (SECTION_PART, SECTION_END):
            (sectionID,) = struct.unpack(">I", (yield 4))
            name = SECTION_NAMES[kind]
            if sectionID != ram.sectionID:
                raise ProtocolError(
                    f"{name} section for id {sectionID}, which no START section opened"
                    + ("" if ram.sectionID is None else f" (RAM is {ram.sectionID})"),
                    field="section header",
                )
            if ram.ended:
                raise ProtocolError(f"{name} section after RAM END", field="section header")
            yield RamSection(name, sectionID, 0, RAM_SECTION_VERSION)
            yield from ram.body(name)
            if kind == SECTION_END:
                ram.ended = True
            kind = yield from _footer(sectionID)
        elif kind == SECTION_COMMAND:
            number, length = struct.unpack(">HH", (yield 4))
            name = COMMAND_NAMES.get(number)
            if name is None:
                raise ProtocolError(f"unknown command {number}", field="command")
            data = yield length
            if number != COMMAND_SWITCHOVER_START:
                raise UnsupportedFeature(
                    f"command {name} ({number}) is not supported"
                    " (return path, postcopy and COLO are not implemented)",
                    field="command",
                )
            if length != 0:
                raise ProtocolError(f"{name} with {length} bytes, expected 0", field="command length")
            yield Command(number, name, data)
            kind = (yield 1)[0]
        elif kind == SECTION_EOF:
            if ram.sectionID is not None and not ram.ended:
                raise ProtocolError("EOF before the RAM END section", field="section type")
            tail = bytes([kind]) + (yield READ_TO_END)
            yield StreamEnd(splitTail(tail))
            return
        else:
            name = SECTION_NAMES.get(kind)
            raise ProtocolError(
                f"unexpected {name} ({kind:#04x})" if name else f"unknown section type {kind:#04x}",
                field="section type",
            )


def _configuration() -> ParserGenerator:
    start = yield 4
    (length,) = struct.unpack(">I", start)
    if not 0 < length <= MAX_MACHINE_NAME:
        raise ProtocolError(f"machine name of {length} bytes", field="configuration")
    nameBytes = yield length
    raw = bytes([SECTION_CONFIGURATION]) + start + nameBytes
    machine = nameBytes.decode("ascii", "replace")
    capabilities: tuple[str, ...] = ()
    uuid = None
    pageBits = None
    while True:
        kind = (yield 1)[0]
        if kind != SUBSECTION:
            break
        head = yield 1
        subName = yield head[0]
        versionBytes = yield 4
        raw += bytes([kind]) + head + subName + versionBytes
        name = subName.decode("ascii", "replace")
        if name == "configuration/target-page-bits":
            body = yield 4
            (pageBits,) = struct.unpack(">I", body)
            if not 10 <= pageBits <= 16:
                raise ProtocolError(f"target page bits {pageBits}", field="configuration")
        elif name == "configuration/capabilities":
            body = yield 4
            (count,) = struct.unpack(">I", body)
            if count > MAX_CAPABILITIES:
                raise ProtocolError(f"{count} capabilities", field="configuration")
            names = []
            for _ in range(count):
                size = yield 1
                capability = yield size[0]
                body += size + capability
                names.append(capability.decode("ascii", "replace"))
            capabilities = tuple(names)
        elif name == "configuration/uuid":
            body = uuid = yield 16
        else:
            raise UnsupportedFeature(f"unknown configuration subsection {name!r}", field="configuration")
        raw += body
    return Configuration(machine, capabilities, uuid, pageBits, raw), kind


def _footer(sectionID: int) -> ParserGenerator:
    """
    Read the footer after a section body, if the stream has footers (machine
    types from 2.4 on), and return the next section type byte.
    """
    kind = (yield 1)[0]
    if kind != SECTION_FOOTER:
        return kind
    (footerID,) = struct.unpack(">I", (yield 4))
    if footerID != sectionID:
        raise ProtocolError(f"footer for section {footerID}, expected {sectionID}", field="section footer")
    return (yield 1)[0]


_UNSUPPORTED_RECORDS = {
    RAM_XBZRLE: "XBZRLE page (capability xbzrle)",
    RAM_COMPRESS_PAGE: "compressed page (capability compress)",
    RAM_HOOK: "RDMA hook (RDMA migration)",
}


class _RamState:
    """
    What RAM parsing carries from section to section: the block list, the
    CONTINUE block and the flush mode.
    """

    def __init__(self, pageSize: int) -> None:
        self.pageSize = pageSize
        self.ignoreShared = False
        self.sectionID: int | None = None
        self.blocks: dict[str, RamBlock] | None = None
        self.lastBlock: RamBlock | None = None
        self.flushMode: str | None = None
        self.ended = False

    def body(self, section: str) -> ParserGenerator:
        pageSize = self.pageSize
        flagMask = pageSize - 1
        flushInStart = False
        while True:
            (value,) = struct.unpack(">Q", (yield 8))
            flags = value & flagMask
            offset = value & ~flagMask
            record = flags & ~RAM_CONTINUE
            if record in (RAM_ZERO, RAM_PAGE):
                if self.blocks is None:
                    raise ProtocolError("page record before the RAM block list", field="RAM record")
                if flags & RAM_CONTINUE:
                    block = self.lastBlock
                    if block is None:
                        raise ProtocolError("CONTINUE with no previous block", field="RAM record")
                else:
                    name = (yield (yield 1)[0]).decode("ascii", "replace")
                    block = self.blocks.get(name)
                    if block is None:
                        raise ProtocolError(f"unknown RAMBlock {name!r}", field="RAM record")
                    self.lastBlock = block
                if offset + pageSize > block.length:
                    raise ProtocolError(
                        f"offset {offset:#x} is outside {block.name!r} ({block.length:#x} bytes)",
                        field="RAM record",
                    )
                if record == RAM_ZERO:
                    fill = (yield 1)[0]
                    if fill != 0:
                        raise ProtocolError(f"zero page with fill byte {fill:#04x}", field="RAM record")
                    yield MainZeroPage(block, offset)
                else:
                    yield MainPage(block, offset, (yield pageSize))
            elif record == RAM_EOS:
                if section == "START":
                    if self.blocks is None:
                        raise ProtocolError("RAM START without a block list", field="RAM record")
                    self.flushMode = FLUSH_PER_ROUND if flushInStart else FLUSH_PER_SECTION
                yield RamSectionEnd(section, self.flushMode or FLUSH_PER_SECTION)
                return
            elif record == RAM_MULTIFD_FLUSH:
                if section == "START":
                    flushInStart = True
                yield MultiFDFlush(section)
            elif record == RAM_MEM_SIZE:
                if section != "START" or self.blocks is not None:
                    raise ProtocolError(f"block list in a {section} section", field="RAM record")
                yield (yield from self._blockList(offset))
            elif record in _UNSUPPORTED_RECORDS:
                raise UnsupportedFeature(f"{_UNSUPPORTED_RECORDS[record]} is not supported", field="RAM record")
            elif record == RAM_FULL:
                raise ProtocolError("obsolete RAM_SAVE_FLAG_FULL record", field="RAM record")
            else:
                raise ProtocolError(f"invalid record flags {flags:#05x}", field="RAM record")

    def _blockList(self, total: int) -> ParserGenerator:
        # A hostile total must not make a sink set aside memory or disk for
        # it: receivers keep a byte of state per page.
        if total > MAX_RAM_TOTAL:
            raise ProtocolError(
                f"the block list announces {total:#x} bytes of RAM, more than the"
                f" {MAX_RAM_TOTAL >> 40} TiB accepted", field="block list"
            )
        blocks: dict[str, RamBlock] = {}
        seen = 0
        while seen < total:
            name = (yield (yield 1)[0]).decode("ascii", "replace")
            (length,) = struct.unpack(">Q", (yield 8))
            if self.ignoreShared:
                yield 8  # the block's guest address
            if name in blocks:
                raise ProtocolError(f"RAMBlock {name!r} listed twice", field="block list")
            if not name:
                raise ProtocolError("RAMBlock with an empty name", field="block list")
            blocks[name] = RamBlock(name, length)
            seen += length
        if seen != total:
            raise ProtocolError(
                f"block lengths add up to {seen:#x}, the list announced {total:#x}", field="block list"
            )
        self.blocks = blocks
        return RamBlockList(total, tuple(blocks.values()))


# Encoders: the same structures, written (used by senders and test sources).


def buildHeader(version: int = QEMU_VM_FILE_VERSION) -> bytes:
    return struct.pack(">II", QEMU_VM_FILE_MAGIC, version)


def buildConfiguration(
    machine: str,
    capabilities: tuple[str, ...] = (),
    uuid: bytes | None = None,
    targetPageBits: int | None = None,
) -> bytes:
    name = machine.encode("ascii")
    out = bytes([SECTION_CONFIGURATION]) + struct.pack(">I", len(name)) + name

    def subsection(subName: str, body: bytes) -> bytes:
        raw = subName.encode("ascii")
        return bytes([SUBSECTION, len(raw)]) + raw + struct.pack(">I", 1) + body

    if targetPageBits is not None:
        out += subsection("configuration/target-page-bits", struct.pack(">I", targetPageBits))
    if capabilities:
        body = struct.pack(">I", len(capabilities))
        for capability in capabilities:
            raw = capability.encode("ascii")
            body += bytes([len(raw)]) + raw
        out += subsection("configuration/capabilities", body)
    if uuid is not None:
        out += subsection("configuration/uuid", uuid)
    return out


def buildSectionHeader(
    kind: int, sectionID: int, idstr: str = "ram", instanceID: int = 0, version: int = RAM_SECTION_VERSION
) -> bytes:
    if kind in (SECTION_START, SECTION_FULL):
        raw = idstr.encode("ascii")
        return struct.pack(">BIB", kind, sectionID, len(raw)) + raw + struct.pack(">II", instanceID, version)
    return struct.pack(">BI", kind, sectionID)


def buildFooter(sectionID: int) -> bytes:
    return struct.pack(">BI", SECTION_FOOTER, sectionID)


def buildRamRecord(flags: int, offset: int = 0, block: str | None = None, payload: bytes = b"") -> bytes:
    """
    One RAM record: C{be64 offset|flags}, the block name unless C{block} is
    L{None} (then CONTINUE should be in C{flags}), then C{payload}.
    """
    out = struct.pack(">Q", offset | flags)
    if block is not None:
        raw = block.encode("ascii")
        out += bytes([len(raw)]) + raw
    return out + payload


def buildBlockList(blocks: tuple[RamBlock, ...] | list[RamBlock]) -> bytes:
    total = sum(block.length for block in blocks)
    out = struct.pack(">Q", total | RAM_MEM_SIZE)
    for block in blocks:
        raw = block.name.encode("ascii")
        out += bytes([len(raw)]) + raw + struct.pack(">Q", block.length)
    return out


def buildCommand(number: int, data: bytes = b"") -> bytes:
    return struct.pack(">BHH", SECTION_COMMAND, number, len(data)) + data

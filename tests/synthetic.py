"""
Synthetic QEMU migrations, built only with the library's own encoders
(C{build*} in L{twisted_multifd._mainstream}, L{twisted_multifd._packet},
L{twisted_multifd._initpacket}, L{twisted_multifd._tail}, and
L{twisted_multifd._compression.makeCompressor} for compressed payloads).

L{build} turns RAM block contents into the bytes of a main channel and N
multifd channels, in one of two conventions (see the wire reference §4.2, §11):

- C{"7.2"}, per-section: a SYNC on every channel before every RAM EOS, zero
  pages as ZERO records on main, data pages in multifd packets, every packet
  with pages_alloc = 128;
- C{"10.0"}, per-round: SYNC on every channel before a MULTIFD_FLUSH (0x200)
  that precedes the EOS of START, of each PART and of END, SYNC-only packets
  with pages_alloc = 0, zero pages in the packets' zero list, and a
  SWITCHOVER_START command before END.

With C{channels=0} every page is a PAGE or ZERO record on main (no 0x200).
Each round of pages is one PART section. After RAM END come a few FULL device
sections, the EOF byte and a VMDESC listing them. Options: zero pages on main
in 10.0 (C{zero-page-detection=legacy}), zlib/zstd payloads, other page sizes.

Every stream is a L{Stream} of tagged L{Piece}s, so that a test can inject a
fault at one precise place: C{m.main.rebuild("PART1.zero:pc.ram@0x1000",
payload=b"\\x01")}, C{m.multifd[0].remove("PART1.sync")}, ... Tags:

- main: C{header}, C{config}, C{START}, C{START.blocks}, C{START.flush},
  C{START.eos}, C{START.footer}, C{PART<r>}, C{PART<r>.page:<block>@<offset>},
  C{PART<r>.zero:<block>@<offset>}, C{PART<r>.flush}, C{PART<r>.eos},
  C{PART<r>.footer}, C{switchover}, C{END}, C{END.flush}, C{END.eos},
  C{END.footer}, C{dev:<name>} (one FULL section each), C{tail} (EOF byte and
  VMDESC);
- each multifd channel: C{init}, C{<section>.sync}, C{PART<r>.packet<n>} (n is
  the packet_num, unique over all channels).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

import attrs

from twisted_multifd._compression import COMPRESSION_VALUES, makeCompressor
from twisted_multifd._initpacket import MultiFDInitPacket, buildInitPacket
from twisted_multifd._mainstream import (
    COMMAND_SWITCHOVER_START,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_MULTIFD_FLUSH,
    RAM_PAGE,
    RAM_ZERO,
    SECTION_END,
    SECTION_FULL,
    SECTION_PART,
    SECTION_START,
    RamBlock,
    buildBlockList,
    buildCommand,
    buildConfiguration,
    buildFooter,
    buildHeader,
    buildRamRecord,
    buildSectionHeader,
)
from twisted_multifd._packet import FLAG_SYNC, buildRamPacket, pagesPerPacket
from twisted_multifd._tail import buildTail

PAGE_SIZE = 4096
RAM_SECTION_ID = 2
CONVENTIONS = ("7.2", "10.0")


@attrs.frozen
class Device:
    """
    A non-iterable device's FULL section in the tail.
    """

    name: str
    instanceID: int
    version: int
    body: bytes
    sectionID: int


DEFAULT_DEVICES = (
    Device("timer", 0, 2, bytes(range(1, 17)), 0),
    Device("cpu_common", 0, 1, b"\x00\x00\x00\x01\x00", 4),
    Device("apic", 0, 3, bytes(range(0x20, 0x40)), 5),
)


def buildDevice(device: Device) -> bytes:
    return (
        buildSectionHeader(SECTION_FULL, device.sectionID, device.name, device.instanceID, device.version)
        + device.body
        + buildFooter(device.sectionID)
    )


def buildVMDesc(devices: Sequence[Device], pageSize: int = PAGE_SIZE) -> bytes:
    return json.dumps({
        "page_size": pageSize,
        "devices": [{"name": d.name, "instance_id": d.instanceID, "version": d.version} for d in devices],
    }).encode()


@attrs.define
class Piece:
    """
    Bytes with a tag and, when it came from an encoder, how to encode it again
    with some arguments changed (L{Stream.rebuild}).
    """

    tag: str
    data: bytes
    encoder: Callable[..., bytes] | None = None
    args: dict[str, Any] = attrs.field(factory=dict)


def _encoded(tag: str, encoder: Callable[..., bytes], **args: Any) -> Piece:
    return Piece(tag, encoder(**args), encoder, args)


@attrs.define
class Stream:
    """
    The bytes one connection sends, as a list of tagged pieces.
    """

    pieces: list[Piece] = attrs.field(factory=list)

    def add(self, piece: Piece) -> None:
        if piece.tag in self.tags():
            raise ValueError(f"tag {piece.tag!r} used twice")
        self.pieces.append(piece)

    def tags(self, prefix: str = "") -> list[str]:
        return [p.tag for p in self.pieces if p.tag.startswith(prefix)]

    def index(self, tag: str) -> int:
        for i, piece in enumerate(self.pieces):
            if piece.tag == tag:
                return i
        raise KeyError(f"no piece {tag!r}; tags: {self.tags()}")

    def __getitem__(self, tag: str) -> Piece:
        return self.pieces[self.index(tag)]

    def __contains__(self, tag: str) -> bool:
        return tag in self.tags()

    def data(self) -> bytes:
        return b"".join(p.data for p in self.pieces)

    def offset(self, tag: str) -> int:
        """
        Where the piece C{tag} starts in L{data}.
        """
        return sum(len(p.data) for p in self.pieces[: self.index(tag)])

    def until(self, tag: str) -> bytes:
        """
        The bytes before the piece C{tag}.
        """
        return self.data()[: self.offset(tag)]

    def through(self, tag: str) -> bytes:
        """
        The bytes up to and including the piece C{tag}.
        """
        return self.data()[: self.offset(tag) + len(self[tag].data)]

    def after(self, tag: str) -> bytes:
        """
        The bytes after the piece C{tag}.
        """
        return self.data()[len(self.through(tag)) :]

    def rebuild(self, tag: str, **changes: Any) -> Piece:
        """
        Encode the piece C{tag} again with some of its encoder's arguments
        changed.
        """
        old = self[tag]
        assert old.encoder is not None, f"{tag} has no encoder"
        new = _encoded(tag, old.encoder, **{**old.args, **changes})
        self.pieces[self.index(tag)] = new
        return new

    def replace(self, tag: str, data: bytes) -> None:
        self.pieces[self.index(tag)] = Piece(tag, data)

    def remove(self, tag: str) -> Piece:
        return self.pieces.pop(self.index(tag))

    def insertBefore(self, tag: str, newTag: str, data: bytes) -> None:
        self.pieces.insert(self.index(tag), Piece(newTag, data))

    def insertAfter(self, tag: str, newTag: str, data: bytes) -> None:
        self.pieces.insert(self.index(tag) + 1, Piece(newTag, data))


@attrs.define
class SyntheticMigration:
    """
    @ivar main: the main channel.
    @ivar multifd: the multifd channels, C{multifd[i]} opens with id C{i}.
    @ivar memory: what the RAM blocks hold once the migration is complete.
    """

    convention: str
    main: Stream
    multifd: list[Stream]
    memory: dict[str, bytes]
    devices: tuple[Device, ...]

    @property
    def channels(self) -> int:
        return len(self.multifd)

    @property
    def streams(self) -> tuple[bytes, ...]:
        """
        Every connection's bytes, main first.
        """
        return (self.main.data(), *(s.data() for s in self.multifd))

    def packetTags(self, section: str = "") -> list[str]:
        return [t for s in self.multifd for t in s.tags(section) if ".packet" in t]


def samplePage(seed: int, size: int = PAGE_SIZE) -> bytes:
    return bytes((seed * 7 + i) % 251 + 1 for i in range(256)) * (size // 256)


def sampleMemory() -> dict[str, bytes]:
    """
    Three blocks: C{pc.ram} of 160 pages (more than one packet's worth) where
    every third page is zero, and two small ones.
    """
    ram = b"".join(bytes(PAGE_SIZE) if i % 3 == 0 else samplePage(i) for i in range(160))
    return {
        "pc.ram": ram,
        "/rom@etc/acpi/tables": samplePage(1000) + bytes(PAGE_SIZE),
        "pc.bios": bytes(PAGE_SIZE) + samplePage(2000),
    }


def pagesOf(memory: Mapping[str, bytes], pageSize: int = PAGE_SIZE) -> dict[str, dict[int, bytes]]:
    return {
        name: {offset: content[offset : offset + pageSize] for offset in range(0, len(content), pageSize)}
        for name, content in memory.items()
    }


class _Builder:
    def __init__(
        self, convention: str, channels: int, zeroPagesOnMain: bool, pageSize: int, compression: str
    ) -> None:
        self.pageSize = pageSize
        self.compression = COMPRESSION_VALUES[compression]
        # One never-finished stream per channel, as QEMU compresses.
        self.compressors = [
            None if compression == "none" else makeCompressor(compression) for _ in range(channels)
        ]
        self.perRound = convention == "10.0"
        self.channels = channels
        self.zeroPagesOnMain = zeroPagesOnMain or channels == 0
        self.main = Stream()
        self.multifd = [Stream() for _ in range(channels)]
        self.packetNum = 0
        self.nextChannel = 0
        self.lastBlock: str | None = None

    def packet(self, **args: Any) -> Piece:
        args.setdefault("pagesAlloc", None if self.perRound else pagesPerPacket(self.pageSize))
        piece = _encoded("", buildRamPacket, pageSize=self.pageSize, packetNum=self.packetNum, **args)
        self.packetNum += 1
        return piece

    def sync(self, section: str) -> None:
        """
        SYNC on every channel, then (per-round) the MULTIFD_FLUSH on main.
        """
        if not self.channels:
            return
        for stream in self.multifd:
            piece = self.packet(flags=FLAG_SYNC)
            piece.tag = f"{section}.sync"
            stream.add(piece)
        if self.perRound:
            self.main.add(_encoded(f"{section}.flush", buildRamRecord, flags=RAM_MULTIFD_FLUSH))

    def endSection(self, section: str) -> None:
        self.sync(section)
        self.main.add(_encoded(f"{section}.eos", buildRamRecord, flags=RAM_EOS))
        self.main.add(_encoded(f"{section}.footer", buildFooter, sectionID=RAM_SECTION_ID))

    def mainRecord(self, section: str, name: str, offset: int, page: bytes) -> None:
        zero = not any(page)
        flags = RAM_ZERO if zero else RAM_PAGE
        block: str | None = name
        if name == self.lastBlock:
            flags |= RAM_CONTINUE
            block = None
        self.lastBlock = name
        self.main.add(_encoded(
            f"{section}.{'zero' if zero else 'page'}:{name}@{offset:#x}", buildRamRecord,
            flags=flags, offset=offset, block=block, payload=bytes(1) if zero else page,
        ))

    def part(self, section: str, pages: Mapping[str, Mapping[int, bytes]]) -> None:
        self.main.add(_encoded(section, buildSectionHeader, kind=SECTION_PART, sectionID=RAM_SECTION_ID))
        perPacket = pagesPerPacket(self.pageSize)
        for name, blockPages in pages.items():
            offsets = sorted(blockPages)
            for start in range(0, len(offsets), perPacket):
                normal, zero, data = [], [], b""
                for offset in offsets[start : start + perPacket]:
                    page = blockPages[offset]
                    if self.channels and any(page):
                        normal.append(offset)
                        data += page
                    elif self.channels and not self.zeroPagesOnMain:
                        zero.append(offset)
                    else:
                        self.mainRecord(section, name, offset, page)
                if normal or zero:
                    compressor = self.compressors[self.nextChannel]
                    if compressor is not None and data:
                        data = compressor.compress(data)
                    piece = self.packet(flags=self.compression, block=name, normalOffsets=tuple(normal),
                                        zeroOffsets=tuple(zero), payload=data)
                    piece.tag = f"{section}.packet{piece.args['packetNum']}"
                    self.multifd[self.nextChannel].add(piece)
                    self.nextChannel = (self.nextChannel + 1) % self.channels
        self.endSection(section)


def build(
    memory: Mapping[str, bytes] | None = None,
    *,
    convention: str = "10.0",
    channels: int = 2,
    rounds: Sequence[Mapping[str, Mapping[int, bytes]]] = (),
    zeroPagesOnMain: bool | None = None,
    machine: str | None = None,
    capabilities: tuple[str, ...] = (),
    configUUID: bytes | None = None,
    uuid: bytes = bytes(16),
    devices: Sequence[Device] = DEFAULT_DEVICES,
    pageSize: int = PAGE_SIZE,
    compression: str = "none",
) -> SyntheticMigration:
    """
    A whole migration of C{memory} (block name -> contents, a whole number of
    pages each; default L{sampleMemory}).

    @param rounds: further rounds of pages (block -> offset -> page) sent
        after the first, each in its own PART section: the later version of
        a page is the one the destination must end up with.
    @param zeroPagesOnMain: send zero pages as ZERO records on main (default:
        yes for 7.2, no for 10.0, as QEMU's C{zero-page-detection} defaults).
    @param pageSize: the target page size; other than 4096 it is announced
        in the configuration's target-page-bits subsection.
    @param compression: C{"none"}, C{"zlib"} or C{"zstd"} for the multifd
        payloads (SYNC-only packets carry no compression value, as in 10.0).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}")
    memory = dict(sampleMemory() if memory is None else memory)
    if zeroPagesOnMain is None:
        zeroPagesOnMain = convention == "7.2"
    b = _Builder(convention, channels, zeroPagesOnMain, pageSize, compression)
    main = b.main

    for i, stream in enumerate(b.multifd):
        stream.add(_encoded("init", buildInitPacket, packet=MultiFDInitPacket(uuid=uuid, channelID=i)))
    main.add(_encoded("header", buildHeader))
    main.add(_encoded(
        "config", buildConfiguration, machine=machine or f"pc-i440fx-{convention}",
        capabilities=capabilities, uuid=configUUID,
        targetPageBits=None if pageSize == PAGE_SIZE else pageSize.bit_length() - 1,
    ))
    blocks = tuple(RamBlock(name, len(content)) for name, content in memory.items())
    main.add(_encoded("START", buildSectionHeader, kind=SECTION_START, sectionID=RAM_SECTION_ID))
    main.add(_encoded("START.blocks", buildBlockList, blocks=blocks))
    b.endSection("START")

    final = {name: bytearray(content) for name, content in memory.items()}
    for r, pages in enumerate([pagesOf(memory, pageSize), *rounds], start=1):
        b.part(f"PART{r}", pages)
        for name, blockPages in pages.items():
            for offset, page in blockPages.items():
                final[name][offset : offset + pageSize] = page

    if convention == "10.0":
        main.add(_encoded("switchover", buildCommand, number=COMMAND_SWITCHOVER_START))
    main.add(_encoded("END", buildSectionHeader, kind=SECTION_END, sectionID=RAM_SECTION_ID))
    b.endSection("END")
    for device in devices:
        main.add(_encoded(f"dev:{device.name}", buildDevice, device=device))
    main.add(_encoded("tail", buildTail, deviceState=b"", vmdescription=buildVMDesc(devices, pageSize)))
    return SyntheticMigration(
        convention, main, b.multifd, {name: bytes(c) for name, c in final.items()}, tuple(devices)
    )

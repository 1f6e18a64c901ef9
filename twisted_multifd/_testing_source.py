"""
Synthetic QEMU migration sources (see L{twisted_multifd.testing}).

Every byte comes from the library's own encoders (C{build*} in
L{twisted_multifd._mainstream}, L{twisted_multifd._packet},
L{twisted_multifd._initpacket}, L{twisted_multifd._tail}, and
L{twisted_multifd._compression.makeCompressor}): a synthetic source and the
receiver share one copy of the wire formats. What each convention puts where
follows the real QEMU 7.2 and 10.0 captures in C{tests/data}.

L{buildPieces} is the one implementation. It returns every connection as a
list of L{EncodedPiece}s that remember their encoder and its arguments, so
that the project's own tests can encode one piece again with a field changed
(fault injection, C{tests/synthetic.py}); L{synthesizeMigration} wraps the
same output in the public frozen records.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs

from ._compression import COMPRESSION_VALUES, Compressor, makeCompressor
from ._initpacket import MultiFDInitPacket, buildInitPacket
from ._mainstream import (
    COMMAND_SWITCHOVER_START,
    QEMU_VM_FILE_MAGIC,
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
from ._packet import FLAG_SYNC, buildRamPacket, pagesPerPacket
from ._tail import buildTail

Convention = Literal["7.2", "10.0"]
CONVENTIONS: tuple[Convention, ...] = ("7.2", "10.0")
Compression = Literal["none", "zlib", "zstd"]
COMPRESSIONS: tuple[Compression, ...] = ("none", "zlib", "zstd")

PageRound = Mapping[str, Mapping[int, bytes]]
"""
Pages sent in one pass over RAM: block name -> block offset -> page contents.
"""

DEFAULT_PAGE_SIZE = 4096
RAM_SECTION_ID = 2
MAIN_CHANNEL_MAGIC = QEMU_VM_FILE_MAGIC.to_bytes(4, "big")

DEFAULT_BLOCK_PAGES: Mapping[str, int] = {"pc.ram": 160, "/rom@etc/acpi/tables": 2, "pc.bios": 2}
"""
The RAM layout of L{syntheticMemory}: block name -> pages. C{pc.ram} holds
more than one multifd packet's worth (128 pages of 4 KiB), so a round needs
several packets and every channel gets some.
"""


@attrs.frozen
class SyntheticDevice:
    """
    A non-iterable device's FULL section in the device-state tail.

    @ivar name: its idstr (C{"timer"}, C{"apic"}, ...), also listed in VMDESC.
    @ivar body: the section's contents; opaque to the receiver, which keeps
        them verbatim.
    @ivar sectionID: its section id; the tail is split at C{7e + be32 id}
        footers, so ids need not be contiguous (QEMU's are not).
    """

    name: str
    instanceID: int
    version: int
    body: bytes
    sectionID: int


DEFAULT_DEVICES: tuple[SyntheticDevice, ...] = (
    SyntheticDevice("timer", 0, 2, bytes(range(1, 17)), 0),
    SyntheticDevice("cpu_common", 0, 1, b"\x00\x00\x00\x01\x00", 4),
    SyntheticDevice("apic", 0, 3, bytes(range(0x20, 0x40)), 5),
)


def buildDeviceSection(device: SyntheticDevice) -> bytes:
    """
    One FULL section: header, body, footer.
    """
    return (
        buildSectionHeader(SECTION_FULL, device.sectionID, device.name, device.instanceID, device.version)
        + device.body
        + buildFooter(device.sectionID)
    )


def buildVMDescription(devices: Sequence[SyntheticDevice], pageSize: int = DEFAULT_PAGE_SIZE) -> bytes:
    """
    The VMDESC JSON QEMU appends after EOF, listing the FULL sections in
    stream order (QEMU's separators: C{", "} and C{": "}, on one line).
    """
    return json.dumps({
        "page_size": pageSize,
        "devices": [{"name": d.name, "instance_id": d.instanceID, "version": d.version} for d in devices],
    }).encode()


@attrs.frozen
class EncodedPiece:
    """
    Bytes of one connection with a tag, and, when an encoder made them, the
    encoder and its keyword arguments, so that a test can encode the piece
    again with one argument changed.
    """

    tag: str
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    encoder: Callable[..., bytes] | None = attrs.field(default=None, repr=False)
    args: dict[str, Any] = attrs.field(factory=dict, repr=False)


def encoded(tag: str, encoder: Callable[..., bytes], **args: Any) -> EncodedPiece:
    return EncodedPiece(tag, encoder(**args), encoder, args)


@attrs.frozen
class BuiltPieces:
    """
    What L{buildPieces} produces.

    @ivar multifd: C{multifd[i]} is the channel whose initial packet has id C{i}.
    @ivar memory: what every RAM block holds once the migration is complete.
    """

    main: list[EncodedPiece]
    multifd: list[list[EncodedPiece]]
    memory: dict[str, bytes]
    blocks: tuple[RamBlock, ...]
    dirtyRounds: tuple[PageRound, ...]
    devices: tuple[SyntheticDevice, ...]
    machine: str


def validateMemory(memory: Mapping[str, bytes], pageSize: int) -> None:
    if not memory:
        raise ValueError("a migration needs at least one RAM block")
    for name, content in memory.items():
        raw = name.encode("ascii")  # UnicodeEncodeError is a ValueError
        if not 0 < len(raw) <= 255:
            raise ValueError(f"RAM block name {name!r} must be 1 to 255 ASCII bytes")
        if not content or len(content) % pageSize:
            raise ValueError(
                f"RAM block {name!r} holds {len(content)} bytes, not a positive multiple of the {pageSize}-byte page"
            )


def pagesOf(memory: Mapping[str, bytes], pageSize: int = DEFAULT_PAGE_SIZE) -> dict[str, dict[int, bytes]]:
    """
    Every page of every block: the first pass over RAM.
    """
    return {
        name: {offset: bytes(content[offset : offset + pageSize]) for offset in range(0, len(content), pageSize)}
        for name, content in memory.items()
    }


class _Builder:
    """
    Appends pieces to the main channel and the multifd channels in the order
    a QEMU source of the chosen convention writes them.
    """

    def __init__(
        self, convention: Convention, channels: int, zeroPagesOnMain: bool, pageSize: int,
        compression: Compression, syncOnData: bool,
    ) -> None:
        self.pageSize = pageSize
        self.compression = COMPRESSION_VALUES[compression]
        # One never-finished stream per channel, as QEMU compresses.
        self.compressors: list[Compressor | None] = [
            None if compression == "none" else makeCompressor(compression) for _ in range(channels)
        ]
        self.perRound = convention == "10.0"
        self.channels = channels
        self.zeroPagesOnMain = zeroPagesOnMain or channels == 0
        self.syncOnData = syncOnData
        self.main: list[EncodedPiece] = []
        self.multifd: list[list[EncodedPiece]] = [[] for _ in range(channels)]
        self.packetNum = 0
        self.nextChannel = 0
        self.lastBlock: str | None = None

    def addMain(self, tag: str, encoder: Callable[..., bytes], **args: Any) -> None:
        self.main.append(encoded(tag, encoder, **args))

    def addPacket(self, channel: int, tag: str, **args: Any) -> None:
        """
        A RAM packet on C{channel}; C{packet_num} counts over all channels, as
        in QEMU.
        """
        # 7.2 says pages_alloc = 128 in every packet, SYNC-only ones included;
        # 10.0 says 0 in packets without pages.
        args.setdefault("pagesAlloc", None if self.perRound else pagesPerPacket(self.pageSize))
        self.multifd[channel].append(
            encoded(tag, buildRamPacket, pageSize=self.pageSize, packetNum=self.packetNum, **args)
        )
        self.packetNum += 1

    def sync(self, section: str) -> None:
        """
        A SYNC on every channel, then (per-round) the MULTIFD_FLUSH on main:
        QEMU writes the SYNCs before the main-channel record that waits for
        them.
        """
        if not self.channels:
            return
        for channel, pieces in enumerate(self.multifd):
            last = pieces[-1] if pieces else None
            if self.syncOnData and last is not None and last.tag.startswith(f"{section}.packet"):
                # QEMU <= 8.2 when a flush races a packet: the SYNC rides on
                # the channel's last data packet, and one flag-less packet
                # without pages (same packet_num, stale name and size) follows.
                pieces[-1] = encoded(last.tag, buildRamPacket, **{**last.args, "flags": last.args["flags"] | FLAG_SYNC})
                pieces.append(encoded(
                    f"{section}.empty", buildRamPacket, pageSize=self.pageSize, flags=0,
                    packetNum=last.args["packetNum"], block=last.args["block"],
                    pagesAlloc=pagesPerPacket(self.pageSize), nextPacketSize=len(last.args["payload"]),
                ))
            else:
                self.addPacket(channel, f"{section}.sync", flags=FLAG_SYNC)
        if self.perRound:
            self.addMain(f"{section}.flush", buildRamRecord, flags=RAM_MULTIFD_FLUSH)

    def endSection(self, section: str) -> None:
        self.sync(section)
        self.addMain(f"{section}.eos", buildRamRecord, flags=RAM_EOS)
        self.addMain(f"{section}.footer", buildFooter, sectionID=RAM_SECTION_ID)

    def mainRecord(self, section: str, name: str, offset: int, page: bytes) -> None:
        zero = not any(page)
        flags = RAM_ZERO if zero else RAM_PAGE
        block: str | None = name
        if name == self.lastBlock:
            # The CONTINUE state survives across sections, as in QEMU.
            flags |= RAM_CONTINUE
            block = None
        self.lastBlock = name
        self.addMain(
            f"{section}.{'zero' if zero else 'page'}:{name}@{offset:#x}", buildRamRecord,
            flags=flags, offset=offset, block=block, payload=bytes(1) if zero else page,
        )

    def part(self, section: str, pages: PageRound) -> None:
        """
        One pass over RAM in one PART section: data pages in multifd packets
        dealt round robin over the channels, zero pages where the convention
        puts them, then the section's sync point.
        """
        self.addMain(section, buildSectionHeader, kind=SECTION_PART, sectionID=RAM_SECTION_ID)
        perPacket = pagesPerPacket(self.pageSize)
        for name, blockPages in pages.items():
            offsets = sorted(blockPages)
            for start in range(0, len(offsets), perPacket):
                normal: list[int] = []
                zero: list[int] = []
                data = b""
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
                    self.addPacket(
                        self.nextChannel, f"{section}.packet{self.packetNum}", flags=self.compression, block=name,
                        normalOffsets=tuple(normal), zeroOffsets=tuple(zero), payload=data,
                    )
                    self.nextChannel = (self.nextChannel + 1) % self.channels
        self.endSection(section)


def buildPieces(
    memory: Mapping[str, bytes],
    *,
    convention: Convention = "10.0",
    channels: int = 2,
    dirtyRounds: Sequence[PageRound] = (),
    zeroPagesOnMain: bool | None = None,
    syncOnData: bool = False,
    machine: str | None = None,
    capabilities: tuple[str, ...] = (),
    configUUID: bytes | None = None,
    uuid: bytes = bytes(16),
    devices: Sequence[SyntheticDevice] = DEFAULT_DEVICES,
    pageSize: int = DEFAULT_PAGE_SIZE,
    compression: Compression = "none",
    vmdescription: bool = True,
) -> BuiltPieces:
    """
    A whole migration of C{memory}, as tagged pieces (see
    L{twisted_multifd.testing.synthesizeMigration} for the parameters, and
    C{docs/testing.md} for the tags). C{capabilities} and C{configUUID} go
    into the configuration section as subsections (real 7.2 and 10.0 x86
    sources send none).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, not {convention!r}")
    if not 0 <= channels <= 255:
        raise ValueError(f"channels must be 0 to 255, not {channels}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
    if compression != "none" and channels == 0:
        raise ValueError("compression applies to multifd packets: it needs channels > 0")
    if syncOnData and (convention != "7.2" or channels == 0):
        raise ValueError("syncOnData is a QEMU <= 8.2 behaviour: it needs convention '7.2' and channels > 0")
    if not 1024 <= pageSize <= 65536 or pageSize & (pageSize - 1):
        raise ValueError(f"page size must be a power of two from 1024 to 65536, not {pageSize}")
    if len(uuid) != 16:
        raise ValueError("uuid must be 16 bytes")
    validateMemory(memory, pageSize)
    rounds = [pagesOf(memory, pageSize), *dirtyRounds]
    for pages in rounds[1:]:
        for name, blockPages in pages.items():
            if name not in memory:
                raise ValueError(f"a dirty round names block {name!r}, which the memory does not have")
            for offset, page in blockPages.items():
                if offset % pageSize or not 0 <= offset < len(memory[name]) or len(page) != pageSize:
                    raise ValueError(f"a dirty round's page {name!r}@{offset:#x} is not one page of the block")

    if zeroPagesOnMain is None:
        # QEMU's zero-page-detection default: legacy (main) before 9.0.
        zeroPagesOnMain = convention == "7.2"
    machine = machine or f"pc-i440fx-{convention}"
    b = _Builder(convention, channels, zeroPagesOnMain, pageSize, compression, syncOnData)

    for i, pieces in enumerate(b.multifd):
        pieces.append(encoded("init", buildInitPacket, packet=MultiFDInitPacket(uuid=uuid, channelID=i)))
    b.addMain("header", buildHeader)
    b.addMain(
        "config", buildConfiguration, machine=machine, capabilities=capabilities, uuid=configUUID,
        targetPageBits=None if pageSize == DEFAULT_PAGE_SIZE else pageSize.bit_length() - 1,
    )
    blocks = tuple(RamBlock(name, len(content)) for name, content in memory.items())
    b.addMain("START", buildSectionHeader, kind=SECTION_START, sectionID=RAM_SECTION_ID)
    b.addMain("START.blocks", buildBlockList, blocks=blocks)
    b.endSection("START")

    final = {name: bytearray(content) for name, content in memory.items()}
    for r, pages in enumerate(rounds, start=1):
        b.part(f"PART{r}", pages)
        for name, blockPages in pages.items():
            for offset, page in blockPages.items():
                final[name][offset : offset + pageSize] = page

    if convention == "10.0":
        b.addMain("switchover", buildCommand, number=COMMAND_SWITCHOVER_START)
    b.addMain("END", buildSectionHeader, kind=SECTION_END, sectionID=RAM_SECTION_ID)
    b.endSection("END")
    for device in devices:
        b.addMain(f"dev:{device.name}", buildDeviceSection, device=device)
    b.addMain("tail", buildTail, deviceState=b"",
              vmdescription=buildVMDescription(devices, pageSize) if vmdescription else None)
    return BuiltPieces(
        main=b.main,
        multifd=b.multifd,
        memory={name: bytes(content) for name, content in final.items()},
        blocks=blocks,
        dirtyRounds=tuple(rounds[1:]),
        devices=tuple(devices),
        machine=machine,
    )


# Seeded contents


def _dataPage(rng: random.Random, pageSize: int) -> bytes:
    # 64 random bytes repeated: unique per page, yet compressible, so that
    # zlib/zstd payloads are smaller than their pages as with real guests.
    pattern = rng.randbytes(64)
    if not any(pattern):
        pattern = b"\x01" + pattern[1:]
    return pattern * (pageSize // 64)


def syntheticMemory(
    seed: int = 0,
    *,
    blockPages: Mapping[str, int] = DEFAULT_BLOCK_PAGES,
    pageSize: int = DEFAULT_PAGE_SIZE,
) -> dict[str, bytes]:
    """
    RAM contents derived from C{seed} alone: about one page in three is zero,
    the others hold distinct data.

    @param blockPages: block name -> number of pages, in the order QEMU lists
        them (default: L{DEFAULT_BLOCK_PAGES}).
    """
    rng = random.Random(f"twisted-multifd memory {seed}")
    memory = {}
    for name, count in blockPages.items():
        memory[name] = b"".join(
            bytes(pageSize) if rng.randrange(3) == 0 else _dataPage(rng, pageSize) for _ in range(count)
        )
    return memory


def seededDirtyRounds(
    memory: Mapping[str, bytes], count: int, seed: int, pageSize: int = DEFAULT_PAGE_SIZE
) -> tuple[dict[str, dict[int, bytes]], ...]:
    """
    C{count} later passes over RAM, as a guest still running would cause:
    each re-sends about one page in eight of every block with new contents.
    A page that was zero gets data; of pages with data, every third chosen
    becomes zero and the others get new data, so both changes that a
    destination can get wrong (data -> zero, zero -> data) occur.
    """
    if count < 0:
        raise ValueError(f"dirtyRounds must be 0 or more, not {count}")
    rng = random.Random(f"twisted-multifd dirty rounds {seed}")
    current = {name: bytearray(content) for name, content in memory.items()}
    rounds = []
    for _ in range(count):
        pages: dict[str, dict[int, bytes]] = {}
        for name, content in current.items():
            total = len(content) // pageSize
            chosen = sorted(rng.sample(range(total), max(1, total // 8)))
            blockPages = {}
            for n, index in enumerate(chosen):
                offset = index * pageSize
                old = content[offset : offset + pageSize]
                page = bytes(pageSize) if any(old) and n % 3 == 2 else _dataPage(rng, pageSize)
                blockPages[offset] = page
                content[offset : offset + pageSize] = page
            pages[name] = blockPages
        rounds.append(pages)
    return tuple(rounds)


# The public records


@attrs.frozen
class Piece:
    """
    A tagged stretch of one connection's bytes: one wire structure (a RAM
    record, a packet, a section header...). Tags are listed in
    C{docs/testing.md}; they let a test cut or inspect a stream at a named
    place instead of a byte count.
    """

    tag: str
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


def _joined(connection: SyntheticConnection) -> bytes:
    return b"".join(piece.data for piece in connection.pieces)


@attrs.frozen
class SyntheticConnection:
    """
    Everything a synthetic source writes on one connection, as tagged pieces.

    @ivar channelID: the multifd channel id, or L{None} for the main channel.
    @ivar data: all the bytes, in order.
    """

    channelID: int | None
    pieces: tuple[Piece, ...]
    data: bytes = attrs.field(
        init=False, repr=False, eq=False, default=attrs.Factory(_joined, takes_self=True)
    )

    @property
    def isMain(self) -> bool:
        return self.channelID is None

    def tags(self, prefix: str = "") -> list[str]:
        """
        The tags of the pieces, in order, that start with C{prefix}.
        """
        return [piece.tag for piece in self.pieces if piece.tag.startswith(prefix)]

    def piece(self, tag: str) -> Piece:
        return self.pieces[self._index(tag)]

    def offset(self, tag: str) -> int:
        """
        Where the piece C{tag} starts in L{data}.
        """
        return sum(len(piece.data) for piece in self.pieces[: self._index(tag)])

    def until(self, tag: str) -> bytes:
        """
        The bytes before the piece C{tag}: a connection cut short just there.
        """
        return self.data[: self.offset(tag)]

    def through(self, tag: str) -> bytes:
        """
        The bytes up to the end of the piece C{tag}.
        """
        return self.data[: self.offset(tag) + len(self.piece(tag).data)]

    def after(self, tag: str) -> bytes:
        """
        The bytes after the piece C{tag}: the rest of a stream handed out in
        two parts.
        """
        return self.data[len(self.through(tag)) :]

    def _index(self, tag: str) -> int:
        for i, piece in enumerate(self.pieces):
            if piece.tag == tag:
                return i
        raise KeyError(f"no piece {tag!r}; tags: {self.tags()}")


@attrs.frozen
class SyntheticMigration:
    """
    A synthetic VM's migration: what each connection carries and what the
    destination must end up with.

    @ivar convention: the QEMU version whose conventions the streams follow.
    @ivar main: the main channel.
    @ivar multifd: the multifd channels; C{multifd[i]} opens with id C{i}.
    @ivar blocks: the RAM block list, as sent in the START section.
    @ivar memory: block name -> contents once the migration is complete
        (the later version of every re-sent page).
    @ivar dirtyRounds: the passes over RAM after the first full one: the
        pages they re-sent (block -> offset -> page).
    @ivar deviceState: the FULL device sections, verbatim: what
        L{twisted_multifd.StreamTail.deviceState} holds for this stream.
    @ivar vmdescription: the VMDESC JSON, or L{None} when the source sends none.
    """

    convention: Convention
    compression: Compression
    pageSize: int
    machine: str
    uuid: bytes
    main: SyntheticConnection
    multifd: tuple[SyntheticConnection, ...]
    blocks: tuple[RamBlock, ...]
    memory: Mapping[str, bytes] = attrs.field(repr=False)
    dirtyRounds: tuple[PageRound, ...] = attrs.field(repr=False)
    devices: tuple[SyntheticDevice, ...] = attrs.field(repr=False)
    deviceState: bytes = attrs.field(repr=False)
    vmdescription: bytes | None = attrs.field(repr=False)

    @property
    def channels(self) -> int:
        """
        The number of multifd channels (0: a plain migration): what the
        receiver's C{channels} must be.
        """
        return len(self.multifd)

    @property
    def connections(self) -> tuple[SyntheticConnection, ...]:
        """
        Every connection, main first, then multifd channels 0 to N-1.
        """
        return (self.main, *self.multifd)

    @property
    def streams(self) -> tuple[bytes, ...]:
        """
        Every connection's bytes, main first: C{streams[i + 1]} is multifd
        channel C{i}. Indexes into this are what L{MigrationPump}'s C{order}
        takes.
        """
        return tuple(connection.data for connection in self.connections)


def synthesizeMigration(
    memory: Mapping[str, bytes] | None = None,
    *,
    seed: int = 0,
    convention: Convention = "10.0",
    channels: int = 2,
    compression: Compression = "none",
    dirtyRounds: int | Sequence[PageRound] = 2,
    zeroPagesOnMain: bool | None = None,
    syncOnData: bool = False,
    pageSize: int = DEFAULT_PAGE_SIZE,
    machine: str | None = None,
    uuid: bytes = bytes(16),
    devices: Sequence[SyntheticDevice] = DEFAULT_DEVICES,
    vmdescription: bool = True,
) -> SyntheticMigration:
    """
    The streams a QEMU source of version C{convention} would send to migrate
    a VM whose RAM holds C{memory}.

    @param memory: block name -> contents (a whole number of pages each), in
        block-list order; default L{syntheticMemory}C{(seed)}.
    @param seed: where the default memory and the seeded dirty rounds come
        from; the same arguments always give the same bytes.
    @param convention: C{"7.2"}: per-section sync (a SYNC on every channel
        before every RAM EOS), zero pages as ZERO records on main, pages_alloc
        128 in every packet. C{"10.0"}: per-round sync (SYNC-only packets with
        pages_alloc 0, then MULTIFD_FLUSH on main, at the end of START, of each
        round and of END), zero pages in the packets' zero list, and
        SWITCHOVER_START before END.
    @param channels: multifd channels; 0 for a plain migration, where every
        page is a PAGE or ZERO record on main.
    @param compression: C{"none"}, C{"zlib"} or C{"zstd"} for the multifd
        payloads, one never-finished stream per channel as QEMU does.
    @param dirtyRounds: passes over RAM after the first (which sends every
        page), each in its own PART section, so that pages are sent more
        than once and the destination must keep the later version: a number
        of passes whose pages and contents come from C{seed} (about one page
        in eight each), or the passes themselves (block -> offset -> page).
    @param zeroPagesOnMain: send zero pages as ZERO records on main (default:
        yes for 7.2, no for 10.0, as QEMU's C{zero-page-detection} defaults;
        yes is 10.0 with C{zero-page-detection=legacy}).
    @param syncOnData: (7.2 only) put each channel's SYNC on its last data
        packet of the section, followed by a flag-less packet without pages,
        as QEMU up to 8.2 does when a flush races a packet.
    @param pageSize: the target page size; other than 4096 it is announced in
        the configuration's target-page-bits subsection.
    @param machine: the machine type in the configuration section (default
        C{pc-i440fx-7.2} / C{pc-i440fx-10.0}).
    @param uuid: the 16-byte uuid in every multifd initial packet.
    @param devices: the FULL sections of the device-state tail.
    @param vmdescription: end with a VMDESC listing C{devices}, as QEMU does.
    """
    if memory is None:
        memory = syntheticMemory(seed, pageSize=pageSize)
    else:
        validateMemory(memory, pageSize)
    rounds = (
        seededDirtyRounds(memory, dirtyRounds, seed, pageSize) if isinstance(dirtyRounds, int) else tuple(dirtyRounds)
    )
    built = buildPieces(
        memory, convention=convention, channels=channels, dirtyRounds=rounds, zeroPagesOnMain=zeroPagesOnMain,
        syncOnData=syncOnData, machine=machine, uuid=uuid, devices=devices, pageSize=pageSize,
        compression=compression, vmdescription=vmdescription,
    )
    main = SyntheticConnection(None, tuple(Piece(p.tag, p.data) for p in built.main))
    return SyntheticMigration(
        convention=convention,
        compression=compression,
        pageSize=pageSize,
        machine=built.machine,
        uuid=uuid,
        main=main,
        multifd=tuple(
            SyntheticConnection(i, tuple(Piece(p.tag, p.data) for p in pieces))
            for i, pieces in enumerate(built.multifd)
        ),
        blocks=built.blocks,
        memory=built.memory,
        dirtyRounds=built.dirtyRounds,
        devices=built.devices,
        deviceState=b"".join(buildDeviceSection(device) for device in built.devices),
        vmdescription=buildVMDescription(built.devices, pageSize) if vmdescription else None,
    )

"""
Synthetic QEMU migrations with fault injection, for the project's own tests.

The streams come from L{twisted_multifd._testing_source.buildPieces}, the
implementation behind the public L{twisted_multifd.testing} source (one copy
of the formats: every byte is written by the library's encoders). What this
module adds is test-only: each connection is a mutable L{Stream} of tagged
pieces that remember their encoder, so that a test can inject a fault at one
precise place: C{m.main.rebuild("PART1.zero:pc.ram@0x1000",
payload=b"\\x01")}, C{m.multifd[0].remove("PART1.sync")}, ...

L{build} keeps its defaults: L{sampleMemory} (a fixed layout the tests
refer to by offset), no dirty rounds unless C{rounds} says so. Conventions
(see the wire reference §4.2, §11):

- C{"7.2"}, per-section: a SYNC on every channel before every RAM EOS, zero
  pages as ZERO records on main, data pages in multifd packets, every packet
  with pages_alloc = 128;
- C{"10.0"}, per-round: SYNC on every channel before a MULTIFD_FLUSH (0x200)
  that precedes the EOS of START, of each PART and of END, SYNC-only packets
  with pages_alloc = 0, zero pages in the packets' zero list, and a
  SWITCHOVER_START command before END.

With C{channels=0} every page is a PAGE or ZERO record on main (no 0x200).
Each round of pages is one PART section. Tags:

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

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from twisted_multifd._testing_source import (
    CONVENTIONS,
    DEFAULT_DEVICES,
    DEFAULT_PAGE_SIZE,
    RAM_SECTION_ID,
    EncodedPiece,
    SyntheticDevice,
    buildDeviceSection,
    buildPieces,
    buildVMDescription,
    encoded,
    pagesOf,
)

PAGE_SIZE = DEFAULT_PAGE_SIZE
Device = SyntheticDevice
Piece = EncodedPiece
buildDevice = buildDeviceSection
buildVMDesc = buildVMDescription

__all__ = [
    "CONVENTIONS", "DEFAULT_DEVICES", "PAGE_SIZE", "RAM_SECTION_ID", "Device", "Piece", "Stream",
    "SyntheticMigration", "build", "buildDevice", "buildVMDesc", "pagesOf", "sampleMemory", "samplePage",
]


@attrs.define
class Stream:
    """
    The bytes one connection sends, as a list of tagged pieces that a test
    may change.
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
        new = encoded(tag, old.encoder, **{**old.args, **changes})
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
    syncOnData: bool = False,
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
    @param syncOnData: (7.2) SYNC riding on each channel's last data packet of
        a section, then a flag-less empty packet; the tag C{<section>.sync} is
        then C{<section>.empty} on channels that had data in the section.
    """
    built = buildPieces(
        sampleMemory() if memory is None else memory,
        convention=convention,  # type: ignore[arg-type]
        channels=channels,
        dirtyRounds=rounds,
        zeroPagesOnMain=zeroPagesOnMain,
        syncOnData=syncOnData,
        machine=machine,
        capabilities=capabilities,
        configUUID=configUUID,
        uuid=uuid,
        devices=devices,
        pageSize=pageSize,
        compression=compression,  # type: ignore[arg-type]
    )
    return SyntheticMigration(
        convention,
        Stream(list(built.main)),
        [Stream(list(pieces)) for pieces in built.multifd],
        built.memory,
        built.devices,
    )

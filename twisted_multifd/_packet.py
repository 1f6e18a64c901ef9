"""
Multifd channel packets, after the initial packet: RAM packets
(C{MultiFDPacket_t}) and, from QEMU 10.0, device-state packets
(C{MultiFDPacketDeviceState_t}).

Both start with the same 12 bytes (magic, version, flags); the rest of a RAM
packet's header is fixed-size whatever its page counts (an array of
C{MULTIFD_PACKET_SIZE / page size} offsets), which is why the page size has to
be known before the first packet is read.
"""

from __future__ import annotations

import struct

import attrs

from ._compression import (
    COMPRESSION_MASK,
    Decompressor,
    compressionName,
    makeDecompressor,
)
from ._errors import ProtocolError
from ._incremental import RECORD_BOUNDARY, PagePayload, ParserGenerator
from ._initpacket import MULTIFD_MAGIC, MULTIFD_VERSION

MULTIFD_PACKET_SIZE = 512 * 1024

FLAG_SYNC = 0x01
FLAG_DEVICE_STATE = 0x40
_KNOWN_FLAGS = FLAG_SYNC | COMPRESSION_MASK | FLAG_DEVICE_STATE

_COMMON = struct.Struct(">III")  # magic, version, flags
# pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages, unused, ramblock
_RAM = struct.Struct(">IIIQI28x256s")
_DEVICE_STATE = struct.Struct(">256sII")  # idstr, instance_id, next_packet_size
RAM_HEADER_FIXED = _COMMON.size + _RAM.size
assert RAM_HEADER_FIXED == 320
DEVICE_STATE_HEADER = _COMMON.size + _DEVICE_STATE.size
assert DEVICE_STATE_HEADER == 276

# Largest device-state payload accepted in one packet: a hostile length must
# not make us allocate without bound.
MAX_DEVICE_STATE_PAYLOAD = 256 * 1024 * 1024


def pagesPerPacket(pageSize: int) -> int:
    return MULTIFD_PACKET_SIZE // pageSize


def ramHeaderSize(pageSize: int) -> int:
    return RAM_HEADER_FIXED + 8 * pagesPerPacket(pageSize)


def isOneRun(offsets: tuple[int, ...], pageSize: int) -> bool:
    """
    Whether C{offsets} are consecutive pages in ascending order, C{pageSize}
    apart: what a QEMU source sends for a run of dirty pages, nearly every
    packet. Checked by one comparison in C, so that the callers can deal with
    the whole run at once instead of page by page (at 2,048 packets per GiB,
    the per-page loops were a fifth of the receiver's Python time).
    """
    if not offsets:
        return True
    first = offsets[0]
    return offsets == tuple(range(first, first + len(offsets) * pageSize, pageSize))


def pageRuns(offsets: tuple[int, ...], pageSize: int) -> tuple[tuple[int, int], ...]:
    """
    C{offsets} (of pages, in payload order) as runs of consecutive pages:
    (first offset, byte count) each, in the same order.
    """
    if isOneRun(offsets, pageSize):
        return ((offsets[0], len(offsets) * pageSize),) if offsets else ()
    runs = []
    start = previous = offsets[0]
    for offset in offsets[1:]:
        if offset != previous + pageSize:
            runs.append((start, previous + pageSize - start))
            start = offset
        previous = offset
    runs.append((start, previous + pageSize - start))
    return tuple(runs)


@attrs.frozen
class RamPacket:
    """
    One multifd RAM packet.

    @ivar block: the RAMBlock name, or L{None} for a packet without pages
        (whose name field may be stale, as QEMU up to 8.2 leaves it).
    @ivar normalOffsets: block offsets of the pages carried in C{data}, in order.
    @ivar zeroOffsets: block offsets of pages that are zero (QEMU 9.0+).
    @ivar data: the (decompressed) contents of the normal pages, back to back
        (C{bytes}, or a read-only C{memoryview} of received bytes), or a
        L{DeliveredElsewhere} when the reader stored them itself.
    """

    flags: int
    packetNum: int
    pagesAlloc: int
    nextPacketSize: int
    block: str | None
    normalOffsets: tuple[int, ...]
    zeroOffsets: tuple[int, ...]
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")

    @property
    def sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)

    @property
    def compression(self) -> int:
        return self.flags & COMPRESSION_MASK


@attrs.frozen
class DeviceStatePacket:
    """
    A QEMU 10.0+ device-state packet (VFIO multifd transfer): opaque state of
    one device instance, kept verbatim.
    """

    flags: int
    idstr: str
    instanceID: int
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


def _cString(raw: bytes, field: str) -> str:
    name = raw.split(b"\0", 1)[0]
    try:
        return name.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"not ASCII: {name!r}", field=field)


def channelPackets(pageSize: int, compression: int | None = None) -> ParserGenerator:
    """
    Parser (see L{IncrementalParser}) for the packets of one multifd channel
    after its initial packet.

    @param compression: the compression value every page-bearing packet must
        carry, or L{None} to accept the first one seen and require it after.
    """
    pageCount = pagesPerPacket(pageSize)
    offsetsSize = 8 * pageCount
    decompressor: Decompressor | None = None
    while True:
        yield RECORD_BOUNDARY
        magic, version, flags = _COMMON.unpack((yield _COMMON.size))
        if magic != MULTIFD_MAGIC:
            raise ProtocolError(
                f"expected {MULTIFD_MAGIC:#010x}, got {magic:#010x}", field="packet magic"
            )
        if version != MULTIFD_VERSION:
            raise ProtocolError(
                f"expected {MULTIFD_VERSION}, got {version}", field="packet version"
            )
        if flags & ~_KNOWN_FLAGS:
            raise ProtocolError(
                f"unknown bits {flags & ~_KNOWN_FLAGS:#x} in {flags:#x}", field="packet flags"
            )
        if flags & FLAG_DEVICE_STATE:
            if flags & FLAG_SYNC:
                raise ProtocolError(
                    "a device-state packet cannot carry SYNC", field="packet flags"
                )
            rawID, instanceID, size = _DEVICE_STATE.unpack((yield _DEVICE_STATE.size))
            if size == 0:
                raise ProtocolError("device-state packet without data", field="next_packet_size")
            if size > MAX_DEVICE_STATE_PAYLOAD:
                raise ProtocolError(
                    f"{size} bytes is over the limit of {MAX_DEVICE_STATE_PAYLOAD}",
                    field="next_packet_size",
                )
            idstr = _cString(rawID, "device-state idstr")
            yield DeviceStatePacket(flags, idstr, instanceID, (yield size))
            continue

        rest = yield _RAM.size + offsetsSize
        pagesAlloc, normal, nextSize, packetNum, zero, rawBlock = _RAM.unpack_from(rest)
        if pagesAlloc > pageCount:
            raise ProtocolError(
                f"{pagesAlloc} is more than the {pageCount} pages a packet holds",
                field="pages_alloc",
            )
        if normal > pagesAlloc:
            raise ProtocolError(
                f"{normal} normal pages in a packet of {pagesAlloc}", field="normal_pages"
            )
        if zero > pagesAlloc - normal:
            raise ProtocolError(
                f"{zero} zero pages after {normal} normal ones in a packet of {pagesAlloc}",
                field="zero_pages",
            )
        if normal + zero == 0:
            # The name, offsets and next_packet_size of a page-less packet may
            # be left over from the channel's previous data packet (QEMU <= 8.2)
            # and no payload follows, whatever next_packet_size says.
            yield RamPacket(flags, packetNum, pagesAlloc, nextSize, None, (), (), b"")
            continue

        value = flags & COMPRESSION_MASK
        if compression is None:
            compression = value
        elif value != compression:
            raise ProtocolError(
                f"compression is {compressionName(value)}, expected {compressionName(compression)}",
                field="packet flags",
            )
        offsets = struct.unpack_from(f">{normal + zero}Q", rest, _RAM.size)
        block = _cString(rawBlock, "ramblock")
        if not block:
            raise ProtocolError("packet has pages but no RAMBlock name", field="ramblock")
        expected = normal * pageSize
        if normal == 0:
            data = b""
        elif value == 0:
            # Passed on to the sink as it is: no need to copy it out of the
            # received chunk when it lies in one. A reader that can store the
            # pages itself may do so (the data is then DeliveredElsewhere).
            data = yield PagePayload(expected, block, offsets[:normal])
        else:
            # A compressed payload can be slightly larger than its input.
            if nextSize > 2 * expected + 4096:
                raise ProtocolError(
                    f"{nextSize} bytes of compressed payload for {normal} pages",
                    field="next_packet_size",
                )
            payload = yield nextSize
            if decompressor is None:
                decompressor = makeDecompressor(value)
            data = decompressor.decompress(payload, expected)
        yield RamPacket(
            flags, packetNum, pagesAlloc, nextSize, block,
            offsets[:normal], offsets[normal:], data,
        )


def buildRamPacket(
    *,
    pageSize: int,
    flags: int,
    packetNum: int,
    block: str | None = None,
    normalOffsets: tuple[int, ...] = (),
    zeroOffsets: tuple[int, ...] = (),
    payload: bytes = b"",
    pagesAlloc: int | None = None,
    nextPacketSize: int | None = None,
) -> bytes:
    """
    Encode one RAM packet: header, the whole fixed-size offset array, then the
    payload as given (already compressed when C{flags} says so).
    """
    pageCount = pagesPerPacket(pageSize)
    offsets = tuple(normalOffsets) + tuple(zeroOffsets)
    if len(offsets) > pageCount:
        raise ValueError(f"{len(offsets)} pages do not fit a packet of {pageCount}")
    if pagesAlloc is None:
        pagesAlloc = pageCount if offsets else 0
    if nextPacketSize is None:
        nextPacketSize = len(payload)
    name = (block or "").encode("ascii")
    if len(name) > 255:
        raise ValueError("RAMBlock name longer than 255 bytes")
    header = _COMMON.pack(MULTIFD_MAGIC, MULTIFD_VERSION, flags) + _RAM.pack(
        pagesAlloc, len(normalOffsets), nextPacketSize, packetNum, len(zeroOffsets), name
    )
    table = struct.pack(f">{len(offsets)}Q", *offsets) + bytes(8 * (pageCount - len(offsets)))
    return header + table + payload


def buildDeviceStatePacket(idstr: str, instanceID: int, data: bytes, flags: int = FLAG_DEVICE_STATE) -> bytes:
    return (
        _COMMON.pack(MULTIFD_MAGIC, MULTIFD_VERSION, flags)
        + _DEVICE_STATE.pack(idstr.encode("ascii"), instanceID, len(data))
        + data
    )

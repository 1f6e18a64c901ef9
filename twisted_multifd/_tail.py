"""
The part of the main stream after RAM: the FULL sections of every
non-iterable device, the EOF byte and the optional VMDESC JSON trailer.

Device vmstate is not self-delimiting, so the tail is kept verbatim until the
stream ends and then split from the end, the way QEMU's own
C{analyze-migration.py} finds VMDESC: C{00 06 be32 len JSON} with the JSON
reaching exactly the last byte. The device sections are then walked by their
footers (C{7e be32 section_id}) and checked against the device list in VMDESC,
so that a stream cut short is never taken for a whole one.
"""

from __future__ import annotations

import json
import struct

import attrs

from ._errors import ProtocolError

SECTION_FULL = 0x04
SECTION_FOOTER = 0x7E
EOF_MARKER = 0x00
VMDESCRIPTION = 0x06


@attrs.frozen
class DeviceSection:
    """
    One device's FULL section inside the device state.

    @ivar offset: where its header starts in the device state.
    @ivar length: header, body and footer together.
    """

    idstr: str
    instanceID: int
    version: int
    sectionID: int
    offset: int
    length: int


@attrs.frozen
class StreamTail:
    """
    @ivar deviceState: the FULL sections, verbatim, without the EOF byte.
    @ivar vmdescription: the VMDESC JSON text, or L{None} when the source sent
        none.
    """

    deviceState: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    vmdescription: bytes | None = attrs.field(repr=lambda d: "None" if d is None else f"<{len(d)} bytes>")
    devices: tuple[DeviceSection, ...]


_FULL_HEAD = struct.Struct(">BIB")


def _header(data: bytes, pos: int) -> tuple[int, str, int, int, int] | None:
    """
    Decode a FULL section header at C{pos}: (section id, idstr, instance,
    version, header length), or L{None} if there is none there.
    """
    if pos + _FULL_HEAD.size > len(data):
        return None
    kind, sectionID, idlen = _FULL_HEAD.unpack_from(data, pos)
    end = pos + _FULL_HEAD.size + idlen + 8
    if kind != SECTION_FULL or idlen == 0 or end > len(data):
        return None
    raw = data[pos + _FULL_HEAD.size : pos + _FULL_HEAD.size + idlen]
    if not all(0x20 < b < 0x7F for b in raw):
        return None
    instanceID, version = struct.unpack_from(">II", data, end - 8)
    return sectionID, raw.decode("ascii"), instanceID, version, end - pos


def _expectedDevices(vmdesc: bytes) -> list[tuple[str, int, int]]:
    try:
        description = json.loads(vmdesc)
        return [
            (device["name"], int(device["instance_id"]), int(device["version"]))
            for device in description["devices"]
        ]
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"VMDESC JSON is not a device description: {e}", field="VMDESC")


def _sectionEnd(
    deviceState: bytes, search: int, sectionID: int, nextWant: tuple[str, int, int] | None
) -> int | None:
    """
    Where the section with C{sectionID} whose body starts at C{search} ends:
    just after a footer for it that is followed by the end of the device
    state or by a plausible next header (the one VMDESC lists, if known).
    """
    footer = struct.pack(">BI", SECTION_FOOTER, sectionID)
    while True:
        found = deviceState.find(footer, search)
        if found == -1:
            return None
        end = found + len(footer)
        if end == len(deviceState):
            return end
        following = _header(deviceState, end)
        if following is not None and (nextWant is None or following[1:4] == nextWant):
            return end
        search = found + 1


def walkDeviceSections(
    deviceState: bytes, expected: list[tuple[str, int, int]] | None
) -> tuple[DeviceSection, ...]:
    sections: list[DeviceSection] = []
    pos = 0
    while pos < len(deviceState):
        index = len(sections)
        header = _header(deviceState, pos)
        if header is None:
            raise ProtocolError(
                f"no FULL section header at device-state offset {pos}", field="device state"
            )
        sectionID, idstr, instanceID, version, headerLength = header
        want = expected[index] if expected is not None and index < len(expected) else None
        if expected is not None and (idstr, instanceID, version) != want:
            raise ProtocolError(
                f"section {index} is {idstr!r} instance {instanceID} version {version},"
                f" VMDESC lists {want!r}",
                field="device state",
            )
        nextWant = expected[index + 1] if expected is not None and index + 1 < len(expected) else None
        end = _sectionEnd(deviceState, pos + headerLength, sectionID, nextWant)
        if end is None and nextWant is not None:
            # No footer is followed by the section VMDESC lists next: end at
            # the first plausible one, so that the next pass names the mismatch.
            end = _sectionEnd(deviceState, pos + headerLength, sectionID, None)
        if end is None:
            raise ProtocolError(f"device section {idstr!r} (id {sectionID}) has no footer", field="device state")
        sections.append(DeviceSection(idstr, instanceID, version, sectionID, pos, end - pos))
        pos = end
    if expected is not None and len(sections) != len(expected):
        raise ProtocolError(
            f"{len(sections)} device sections, VMDESC lists {len(expected)}", field="device state"
        )
    return tuple(sections)


def splitTail(tail: bytes) -> StreamTail:
    """
    Split everything from the first device section (or the EOF byte) to the
    end of the stream.
    """
    position = len(tail)
    while True:
        position = tail.rfind(b"\x00\x06", 0, position)
        if position == -1:
            break
        start = position + 6
        if start <= len(tail) and struct.unpack_from(">I", tail, position + 2)[0] == len(tail) - start:
            vmdesc = tail[start:]
            if vmdesc[:1] == b"{":
                deviceState = tail[:position]
                devices = walkDeviceSections(deviceState, _expectedDevices(vmdesc))
                return StreamTail(deviceState, vmdesc, devices)
    if not tail or tail[-1] != EOF_MARKER:
        raise ProtocolError(
            "main stream ended without the EOF marker and VMDESC (cut short?)", field="EOF"
        )
    deviceState = tail[:-1]
    return StreamTail(deviceState, None, walkDeviceSections(deviceState, None))


def buildTail(deviceState: bytes, vmdescription: bytes | None) -> bytes:
    """
    The bytes that end a main stream: device state, EOF, optional VMDESC.
    """
    out = deviceState + bytes([EOF_MARKER])
    if vmdescription is not None:
        out += struct.pack(">BI", VMDESCRIPTION, len(vmdescription)) + vmdescription
    return out

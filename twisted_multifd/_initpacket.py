"""
The 64-byte initial packet that opens every multifd channel (QEMU's
C{MultiFDInit_t}): be32 magic, be32 version, 16-byte uuid, u8 channel id,
then 39 unused bytes.
"""

from __future__ import annotations

import struct
from typing import Container

import attrs

from ._errors import ProtocolError

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
INIT_PACKET_SIZE = 64

_INIT = struct.Struct(">II16sB39x")
assert _INIT.size == INIT_PACKET_SIZE


@attrs.frozen
class MultiFDInitPacket:
    """
    @ivar uuid: the source's VM uuid, 16 raw bytes (all zero when unset).
    @ivar channelID: the channel index, 0 .. channels - 1.
    """

    uuid: bytes
    channelID: int
    version: int = MULTIFD_VERSION


def parseInitPacket(data: bytes) -> MultiFDInitPacket:
    """
    Decode an initial packet; checks what does not depend on the migration
    (magic, version). The channel id and uuid are checked by the migration
    they belong to.
    """
    if len(data) != INIT_PACKET_SIZE:
        raise ProtocolError(
            f"expected {INIT_PACKET_SIZE} bytes, got {len(data)}",
            field="initial packet",
        )
    magic, version, uuid, channelID = _INIT.unpack(data)
    if magic != MULTIFD_MAGIC:
        raise ProtocolError(
            f"expected {MULTIFD_MAGIC:#010x}, got {magic:#010x}",
            field="initial packet magic",
        )
    if version != MULTIFD_VERSION:
        raise ProtocolError(
            f"expected {MULTIFD_VERSION}, got {version}",
            field="initial packet version",
        )
    return MultiFDInitPacket(uuid=uuid, channelID=channelID, version=version)


def buildInitPacket(packet: MultiFDInitPacket) -> bytes:
    if len(packet.uuid) != 16:
        raise ValueError("uuid must be 16 bytes")
    return _INIT.pack(MULTIFD_MAGIC, packet.version, packet.uuid, packet.channelID)


def checkChannelJoins(
    init: MultiFDInitPacket, channels: int, taken: Container[int], uuid: bytes | None, role: str
) -> bytes:
    """
    Check that a channel with this initial packet can join a migration of
    C{channels} channels whose ids in C{taken} are in, and whose channels so
    far sent C{uuid} (L{None}: none yet). Returns the migration's uuid.

    @param role: what is checking ("receiver", "relay"), for the message.
    """
    if channels == 0:
        raise ProtocolError(
            f"multifd channel, but this {role} expects plain migrations (channels = 0)",
            field="initial packet",
        )
    if init.channelID >= channels:
        # QEMU itself lets id == N through (off by one); it must not pass.
        raise ProtocolError(
            f"channel id {init.channelID}, expected 0 to {channels - 1}", field="initial packet id"
        )
    if init.channelID in taken:
        raise ProtocolError(f"channel id {init.channelID} twice", field="initial packet id")
    if uuid is not None and init.uuid != uuid:
        raise ProtocolError(
            f"uuid {init.uuid.hex()}, other channels sent {uuid.hex()}", field="initial packet uuid"
        )
    return init.uuid

"""
Records describing a migration as a whole, handed to sinks and callers.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class MigrationInfo:
    """
    @ivar number: this receiver's sequence number for the migration (1, 2, ...).
    @ivar peer: the source host (address of its connections).
    @ivar channels: the number of multifd channels (0: plain migration).
    @ivar startedAt: POSIX time of the first connection.
    """

    number: int
    peer: str
    channels: int
    startedAt: float


@attrs.frozen
class MigrationResult:
    """
    How a migration ended and what is known about it.

    @ivar complete: the main stream ended cleanly and every channel was
        accounted for; nothing else is complete.
    @ivar error: the reason it is not complete, or L{None}.
    @ivar stream: facts about the main stream needed to send it again: header
        version, the raw configuration section (hex), RAM section id, instance
        and version, the flush mode, where zero pages travelled, commands.
    """

    info: MigrationInfo
    complete: bool
    error: str | None
    machine: str | None
    uuid: str | None
    pageSize: int
    compression: str | None
    flushMode: str | None
    zeroPages: str | None
    bytesReceived: int
    pagesWithData: int
    zeroPageRecords: int
    duration: float
    stream: dict = attrs.field(factory=dict)

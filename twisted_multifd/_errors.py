"""
The errors a migration can end with.

Every error names what it is about (``connection``: which connection, e.g.
``"multifd channel 2 from 10.0.0.5"``; ``field``: which wire field) so that a
person reading one log line knows where to look, without a traceback.
"""

from __future__ import annotations


class MigrationError(Exception):
    """
    A migration could not be received.

    @ivar reason: what went wrong, in words.
    @ivar connection: which connection it happened on, or L{None} when it is
        about the migration as a whole.
    @ivar field: the wire field at fault, or L{None}.
    """

    def __init__(
        self, reason: str, *, connection: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.connection = connection
        self.field = field

    def onConnection(self, connection: str) -> "MigrationError":
        """
        Say which connection this happened on, unless that is known already.
        Pure codecs do not know their connection; the protocol that drives them
        does, and adds it with this.
        """
        if self.connection is None:
            self.connection = connection
        return self

    def __str__(self) -> str:
        parts = []
        if self.connection:
            parts.append(self.connection)
        if self.field:
            parts.append(self.field)
        parts.append(self.reason)
        return ": ".join(parts)


class ProtocolError(MigrationError):
    """
    The peer sent bytes that do not follow the migration wire format.
    """


class UnsupportedFeature(ProtocolError):
    """
    The peer used a well-formed part of the wire format that this library does
    not implement (XBZRLE, postcopy commands, non-RAM iterable devices, ...).
    """


class MigrationTimeout(MigrationError):
    """
    Something the migration needs did not happen in time.
    """


class ConnectionClosed(MigrationError):
    """
    A connection ended before the migration was complete.
    """

"""
Where a received migration goes.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IMigrationSink(Interface):
    """
    Receives the contents of one migration, in an order that respects QEMU's
    sync barriers: when two versions of a page are sent, the later one is
    delivered later.

    Methods are called from the reactor thread; they should not block for
    long (a capture writer writes to a local file). An exception raised by any
    method ends the migration as failed, with the exception as its reason.
    """

    def migrationStarted(info):
        """
        Every channel of the migration has connected and loading starts.

        @type info: L{twisted_multifd.MigrationInfo}
        """

    def configuration(configuration):
        """
        The source's configuration section (machine type, capabilities).

        @type configuration: L{twisted_multifd.Configuration}
        """

    def ramBlocks(blocks, pageSize):
        """
        The RAM block list, before any page.

        @type blocks: sequence of L{twisted_multifd.RamBlock}
        @param pageSize: the target page size in bytes.
        """

    def writePages(block, offsets, data):
        """
        Pages with contents.

        @param block: the L{twisted_multifd.RamBlock} they belong to.
        @param offsets: page-aligned byte offsets inside the block.
        @param data: C{len(offsets)} pages back to back (bytes-like), valid
            only during the call.
        """

    def zeroPages(block, offsets):
        """
        Pages that are all zero (a page written earlier must become zero).
        """

    def deviceStatePacket(packet):
        """
        A QEMU 10.0+ multifd device-state packet (VFIO), kept verbatim.

        @type packet: L{twisted_multifd.DeviceStatePacket}
        """

    def streamEnded(tail):
        """
        The main stream ended cleanly; C{tail} holds the device state and
        VMDESC. Called before L{migrationEnded} of a complete migration.

        @type tail: L{twisted_multifd.StreamTail}
        """

    def migrationEnded(result):
        """
        The migration is over, complete or not. Always called exactly once,
        last, if L{migrationStarted} or anything else was called, and also for
        a migration that failed before it started.

        @type result: L{twisted_multifd.MigrationResult}
        """


class IMigrationSinkFactory(Interface):
    """
    Something that makes a sink for each new migration.
    """

    def __call__(info):
        """
        @type info: L{twisted_multifd.MigrationInfo}
        @rtype: L{IMigrationSink}
        """


__all__ = ["IMigrationSink", "IMigrationSinkFactory", "Attribute"]

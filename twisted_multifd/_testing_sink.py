"""
A sink that keeps everything in memory, for tests (see
L{twisted_multifd.testing}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from ._interfaces import IMigrationSink
from ._mainstream import Configuration, RamBlock
from ._packet import DeviceStatePacket
from ._records import MigrationInfo, MigrationResult
from ._tail import StreamTail


@attrs.frozen
class SinkCall:
    """
    One call the receiver made on a L{RecordingSink}.

    @ivar method: the L{IMigrationSink} method name (C{"writePages"}, ...).
    @ivar arguments: its positional arguments; C{offsets} as a tuple and
        C{data} as a bytes copy, since the receiver's buffer is only valid
        during the call.
    """

    method: str
    arguments: tuple[Any, ...] = attrs.field(repr=lambda a: _shortRepr(a))


def _shortRepr(arguments: tuple[Any, ...]) -> str:
    return "(" + ", ".join(f"<{len(a)} bytes>" if isinstance(a, bytes) else repr(a) for a in arguments) + ")"


@implementer(IMigrationSink)
class RecordingSink:
    """
    An L{IMigrationSink} that keeps one migration in memory: every call made
    on it, each RAM block's image, the device state, and the result.

    For tests of code around the receiver (a factory wrapper, an
    C{onMigrationEnded} handler, a service), and a reference to compare your
    own sink with: give both the same stream and compare what they hold.

    @ivar calls: every call, in order.
    @ivar info: from C{migrationStarted}, or L{None}.
    @ivar configurationSection: from C{configuration}, or L{None}.
    @ivar blocks: the RAM block list, or L{None} before C{ramBlocks}.
    @ivar pageSize: the target page size, or L{None} before C{ramBlocks}.
    @ivar deviceStatePackets: QEMU 10 device-state packets, in order.
    @ivar tail: from C{streamEnded} (device state and VMDESC), or L{None}.
    @ivar result: from C{migrationEnded}, or L{None} while it goes on.
    """

    def __init__(self) -> None:
        self.calls: list[SinkCall] = []
        self.info: MigrationInfo | None = None
        self.configurationSection: Configuration | None = None
        self.blocks: tuple[RamBlock, ...] | None = None
        self.pageSize: int | None = None
        self.deviceStatePackets: list[DeviceStatePacket] = []
        self.tail: StreamTail | None = None
        self.result: MigrationResult | None = None
        self._images: dict[str, bytearray] = {}
        self._sent: dict[str, bytearray] = {}
        self._waiting: list[Deferred[MigrationResult]] = []

    def __repr__(self) -> str:
        state = "running" if self.result is None else "complete" if self.result.complete else "failed"
        return f"<RecordingSink {state}, {len(self.calls)} calls>"

    # IMigrationSink

    def migrationStarted(self, info: MigrationInfo) -> None:
        self.calls.append(SinkCall("migrationStarted", (info,)))
        self.info = info

    def configuration(self, configuration: Configuration) -> None:
        self.calls.append(SinkCall("configuration", (configuration,)))
        self.configurationSection = configuration

    def ramBlocks(self, blocks: Sequence[RamBlock], pageSize: int) -> None:
        self.calls.append(SinkCall("ramBlocks", (tuple(blocks), pageSize)))
        self.blocks = tuple(blocks)
        self.pageSize = pageSize
        self._images = {block.name: bytearray(block.length) for block in blocks}
        self._sent = {block.name: bytearray(-(-block.length // pageSize)) for block in blocks}

    def writePages(self, block: RamBlock, offsets: Sequence[int], data: Any) -> None:
        data = bytes(data)
        offsets = tuple(offsets)
        self.calls.append(SinkCall("writePages", (block, offsets, data)))
        pageSize = self._pageSize()
        if len(data) != len(offsets) * pageSize:
            raise ValueError(f"{len(data)} bytes for {len(offsets)} pages of {pageSize}")
        image, sent = self._images[block.name], self._sent[block.name]
        for i, offset in enumerate(offsets):
            image[offset : offset + pageSize] = data[i * pageSize : (i + 1) * pageSize]
            sent[offset // pageSize] = 1

    def zeroPages(self, block: RamBlock, offsets: Sequence[int]) -> None:
        offsets = tuple(offsets)
        self.calls.append(SinkCall("zeroPages", (block, offsets)))
        pageSize = self._pageSize()
        image, sent = self._images[block.name], self._sent[block.name]
        for offset in offsets:
            image[offset : offset + pageSize] = bytes(pageSize)
            sent[offset // pageSize] = 1

    def deviceStatePacket(self, packet: DeviceStatePacket) -> None:
        self.calls.append(SinkCall("deviceStatePacket", (packet,)))
        self.deviceStatePackets.append(packet)

    def streamEnded(self, tail: StreamTail) -> None:
        self.calls.append(SinkCall("streamEnded", (tail,)))
        self.tail = tail

    def migrationEnded(self, result: MigrationResult) -> None:
        self.calls.append(SinkCall("migrationEnded", (result,)))
        self.result = result
        waiting, self._waiting = self._waiting, []
        for deferred in waiting:
            deferred.callback(result)

    # For tests

    def whenEnded(self) -> Deferred[MigrationResult]:
        """
        A new Deferred that fires with the L{MigrationResult}, complete or
        not, once C{migrationEnded} is called (at once if it was). Each call
        gets its own Deferred, so callbacks added by one waiter never change
        what another sees.
        """
        if self.result is not None:
            return succeed(self.result)
        deferred: Deferred[MigrationResult] = Deferred()
        self._waiting.append(deferred)
        return deferred

    def ram(self, blockName: str) -> bytes:
        """
        The block's image: every page as last written, zero where a page was
        zeroed or never sent.
        """
        return bytes(self._image(blockName))

    def memory(self) -> dict[str, bytes]:
        """
        Every block's image (L{ram}), in block-list order: compare it with
        L{SyntheticMigration.memory}.
        """
        return {name: bytes(image) for name, image in self._images.items()}

    def unsentPages(self, blockName: str) -> list[int]:
        """
        Offsets of the block's pages that neither C{writePages} nor
        C{zeroPages} mentioned (a complete QEMU migration sends every page).
        """
        self._image(blockName)
        pageSize = self._pageSize()
        return [index * pageSize for index, sent in enumerate(self._sent[blockName]) if not sent]

    def methods(self) -> list[str]:
        """
        The names of the methods called, in order.
        """
        return [call.method for call in self.calls]

    def _image(self, blockName: str) -> bytearray:
        try:
            return self._images[blockName]
        except KeyError:
            raise KeyError(f"no RAM block {blockName!r}; the sink has {sorted(self._images)}") from None

    def _pageSize(self) -> int:
        if self.pageSize is None:
            raise ValueError("pages before the RAM block list")
        return self.pageSize


class RecordingSinkFactory:
    """
    A C{sinkFactory} for L{twisted_multifd.MigrationReceiverFactory} that
    makes one L{RecordingSink} per migration and keeps them, for tests where
    more than one migration arrives.

    @ivar sinks: the sinks made, in order.
    """

    def __init__(self) -> None:
        self.sinks: list[RecordingSink] = []

    def __call__(self, info: MigrationInfo) -> RecordingSink:
        sink = RecordingSink()
        self.sinks.append(sink)
        return sink

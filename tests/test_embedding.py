"""
The public API as an embedder uses it, over real loopback TCP inside the test's
reactor (pytest-twisted): the example in docs/embedding.md.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor
from zope.interface import implementer

from captures import recorded
from twisted_multifd import IMigrationSink, MigrationReceiverFactory


@implementer(IMigrationSink)
class PagesInMemory:
    """
    A sink that keeps pc.ram in a bytearray.
    """

    def __init__(self):
        self.ram = {}
        self.tail = None
        self.result = defer.Deferred()

    def migrationStarted(self, info):
        self.info = info

    def configuration(self, configuration):
        self.machine = configuration.machine

    def ramBlocks(self, blocks, pageSize):
        self.pageSize = pageSize
        self.ram = {block.name: bytearray(block.length) for block in blocks}

    def writePages(self, block, offsets, data):
        image = self.ram[block.name]
        for i, offset in enumerate(offsets):
            image[offset : offset + self.pageSize] = data[i * self.pageSize : (i + 1) * self.pageSize]

    def zeroPages(self, block, offsets):
        image = self.ram[block.name]
        for offset in offsets:
            image[offset : offset + self.pageSize] = bytes(self.pageSize)

    def deviceStatePacket(self, packet):
        pass

    def streamEnded(self, tail):
        self.tail = tail

    def migrationEnded(self, result):
        self.result.callback(result)


class _Send(protocol.Protocol):
    def __init__(self, data):
        self.data = data

    def connectionMade(self):
        self.transport.write(self.data)


@pytest_twisted.inlineCallbacks
def test_embeddedReceiverOverLoopback():
    migration = recorded("cap10-4")
    sink = PagesInMemory()
    factory = MigrationReceiverFactory(lambda info: sink, channels=4)
    port = yield endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    try:
        client = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        # Main channel last: the order QEMU 7.2's own destination cannot take.
        senders = []
        for index in (3, 1, 4, 2, 0):
            sender = yield endpoints.connectProtocol(client, _Send(migration.streams[index]))
            senders.append(sender)
        for sender in senders:  # multifd first, main last, as QEMU closes them
            sender.transport.loseConnection()
        result = yield sink.result
    finally:
        yield port.stopListening()
    assert result.complete, result.error
    assert sink.machine == "pc-i440fx-10.0"
    assert bytes(sink.ram["pc.ram"]) == migration.memory
    assert len(sink.tail.devices) == 31

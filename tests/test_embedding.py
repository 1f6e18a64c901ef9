"""
The public API as an embedder uses it, over real loopback TCP inside the test's
reactor (pytest-twisted): the sink example in docs/embedding.md, exactly as
printed there, and L{twisted_multifd.testing.RecordingSink}.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, reactor

from captures import recorded
from twisted_multifd import MigrationReceiverFactory
from twisted_multifd.testing import RecordingSink, playOverTCP, synthesizeMigration

DOCS = Path(__file__).parent.parent / "docs"


def documentedSinkClass() -> type:
    """
    The C{PagesInMemory} class of docs/embedding.md, run from the document's
    own text so that the example cannot drift from what is tested.
    """
    text = (DOCS / "embedding.md").read_text()
    [code] = [block for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "class PagesInMemory" in block]
    namespace: dict = {}
    exec(compile(code, "docs/embedding.md", "exec"), namespace)  # noqa: S102 (our own docs)
    return namespace["PagesInMemory"]


@pytest_twisted.inlineCallbacks
def test_documentedSinkOverLoopback():
    migration = recorded("cap10-4")
    sink = documentedSinkClass()()
    ended = defer.Deferred()
    factory = MigrationReceiverFactory(lambda info: sink, channels=4, onMigrationEnded=ended.callback)
    # Main channel last: the order QEMU 7.2's own destination cannot take.
    yield playOverTCP(reactor, factory, migration.streams, order=[3, 1, 4, 2, 0])
    result = yield ended
    assert result.complete, result.error
    assert sink.machine == "pc-i440fx-10.0"
    assert bytes(sink.ram["pc.ram"]) == migration.memory
    assert len(sink.deviceState) == 12916


@pytest_twisted.inlineCallbacks
def test_recordingSinkOverLoopback():
    migration = synthesizeMigration(seed=4, convention="7.2", channels=3, compression="zlib")
    sink = RecordingSink()
    factory = MigrationReceiverFactory(lambda info: sink, channels=3)
    yield playOverTCP(reactor, factory, migration, order=[2, 3, 0, 1])
    result = yield sink.whenEnded()
    assert result.complete, result.error
    assert (result.machine, result.compression, result.flushMode) == ("pc-i440fx-7.2", "zlib", "per-section")
    assert sink.memory() == migration.memory
    assert sink.tail.deviceState == migration.deviceState
    methods = sink.methods()
    assert methods[:3] == ["migrationStarted", "configuration", "ramBlocks"]
    assert methods[-2:] == ["streamEnded", "migrationEnded"]

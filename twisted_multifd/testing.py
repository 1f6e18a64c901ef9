"""
Test code that embeds L{twisted_multifd.MigrationReceiverFactory} without
QEMU, under trial or pytest, deterministically and without a reactor.

Three pieces, usable apart:

- a synthetic migration source: L{synthesizeMigration} gives the bytes a
  QEMU 7.2 or 10.0 source would send (main channel and N multifd channels)
  to migrate a VM whose RAM you choose or derive from a seed, written by the
  library's own encoders;
- L{MigrationPump}: connects those streams (or recorded ones) to any server
  factory over in-memory transports, in any connection order and chunking,
  honouring C{pauseProducing} like a socket; L{playOverTCP} does the same
  over real loopback TCP;
- L{RecordingSink}: an L{twisted_multifd.IMigrationSink} that keeps pages,
  calls and the result in memory, with L{RecordingSink.whenEnded}.

A whole test::

    from twisted.internet.task import Clock
    from twisted_multifd import MigrationReceiverFactory
    from twisted_multifd.testing import MigrationPump, RecordingSink, synthesizeMigration

    migration = synthesizeMigration(seed=1, convention="7.2", channels=2)
    sink = RecordingSink()
    clock = Clock()
    factory = MigrationReceiverFactory(lambda info: sink, channels=2, clock=clock)
    MigrationPump(factory, migration, order=[2, 1, 0], clock=clock).flush()
    assert sink.result.complete and sink.memory() == migration.memory

See C{docs/testing.md}.
"""

from ._testing_pump import (
    ChunkSizes,
    MigrationPump,
    PumpedConnection,
    Source,
    playOverTCP,
)
from ._testing_sink import RecordingSink, RecordingSinkFactory, SinkCall
from ._testing_source import (
    COMPRESSIONS,
    CONVENTIONS,
    DEFAULT_BLOCK_PAGES,
    DEFAULT_DEVICES,
    Compression,
    Convention,
    PageRound,
    Piece,
    SyntheticConnection,
    SyntheticDevice,
    SyntheticMigration,
    synthesizeMigration,
    syntheticMemory,
)

__all__ = [
    "COMPRESSIONS",
    "CONVENTIONS",
    "DEFAULT_BLOCK_PAGES",
    "DEFAULT_DEVICES",
    "ChunkSizes",
    "Compression",
    "Convention",
    "MigrationPump",
    "PageRound",
    "Piece",
    "PumpedConnection",
    "RecordingSink",
    "RecordingSinkFactory",
    "SinkCall",
    "Source",
    "SyntheticConnection",
    "SyntheticDevice",
    "SyntheticMigration",
    "playOverTCP",
    "synthesizeMigration",
    "syntheticMemory",
]

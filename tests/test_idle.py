"""
The idle timeout: a loading migration from which nothing arrives for
C{idleTimeout} seconds is dropped as stalled, naming what was still open; one
that keeps receiving, however slowly, is not.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from twisted_multifd import MigrationReceiverFactory
from twisted_multifd._receivecommand import ReceiveOptions
from twisted_multifd.testing import MigrationPump, RecordingSink, synthesizeMigration

IDLE = 40.0


def _stalled(idleTimeout: float | None, channels: int = 2) -> tuple[Clock, list, MigrationPump, bytes]:
    """
    A migration whose multifd channels send their initial packet and its
    main channel half its stream, and then nothing, every connection left
    open.
    """
    clock = Clock()
    results: list = []
    factory = MigrationReceiverFactory(
        lambda info: RecordingSink(), channels=channels, clock=clock, onMigrationEnded=results.append,
        channelTimeout=30.0, sniffTimeout=10.0, idleTimeout=idleTimeout,
    )
    migration = synthesizeMigration(seed=5, channels=channels)
    pump = MigrationPump(factory, clock=clock, host="192.0.2.9")
    main = migration.main.data
    for channel in migration.multifd:
        pump.connect(channel.data[:64], close=False)
    pump.connect(main[: len(main) // 2], close=False)
    _deliver(pump)
    return clock, results, pump, main


def _deliver(pump: MigrationPump) -> None:
    # Not flush(): that also runs the clock.
    while pump.pump():
        pass


def test_silentSourceIsDroppedAfterTheIdleTimeout() -> None:
    """
    The last byte arrived at time 0: the migration is dropped no sooner than
    the idle timeout after it, and at most a quarter of it later (the check
    runs four times per timeout).
    """
    clock, results, pump, _ = _stalled(IDLE)
    while not results:
        clock.advance(IDLE / 16)
    assert IDLE <= clock.seconds() <= IDLE + IDLE / 4
    [result] = results
    assert not result.complete
    assert result.error.startswith("migration 1 from 192.0.2.9: nothing received for")
    assert "while loading (--idle-timeout 40)" in result.error
    assert "multifd channel 0 from 192.0.2.9" in result.error and "main channel from 192.0.2.9" in result.error
    _deliver(pump)
    assert all(connection.closed for connection in pump.connections)
    assert clock.getDelayedCalls() == []


def test_trickleKeepsItAlive() -> None:
    """
    A byte now and then is progress: the migration is not dropped, however
    long it takes. (A plain migration: with multifd channels that send
    nothing, the main channel would soon wait for them at a sync point, and
    not be read.)
    """
    clock, results, pump, main = _stalled(IDLE, channels=0)
    mainConnection = pump.connections[-1]
    position = len(main) // 2
    for _ in range(20):
        clock.advance(IDLE / 2)
        mainConnection.send(main[position : position + 1])
        position += 1
        _deliver(pump)
    assert results == []
    assert not mainConnection.closed


def test_noIdleTimeoutWaitsForEver() -> None:
    clock, results, pump, _ = _stalled(None)
    clock.advance(10 * 24 * 3600)
    assert results == [] and clock.getDelayedCalls() == []
    assert not any(connection.closed for connection in pump.connections)


@pytest.mark.parametrize("value, expected", [("0", 0.0), ("12.5", 12.5)])
def test_idleTimeoutOption(value: str, expected: float) -> None:
    options = ReceiveOptions()
    options.parseOptions(["--idle-timeout", value])
    assert options["idle-timeout"] == expected


def test_idleTimeoutOptionRefusesNegative() -> None:
    from twisted.python.usage import UsageError

    with pytest.raises(UsageError, match="0 or more"):
        ReceiveOptions().parseOptions(["--idle-timeout", "-1"])

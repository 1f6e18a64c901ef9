"""
Progress for people: the pure formatting, the sliding-window rate, status
lines on a (fake) terminal driven by a Clock, and the service choosing
between status lines and log lines.
"""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from twisted_multifd._progress import (
    SlidingRate,
    StatusLines,
    TerminalProgress,
    formatDuration,
    formatProgress,
    formatSize,
    resolveProgressMode,
)
from twisted_multifd._service import ListeningService
from twisted_multifd.testing import MigrationPump, RecordingSinkFactory, synthesizeMigration
from twisted_multifd import MigrationReceiverFactory

MiB = 1024 * 1024


class Screen:
    """
    Just enough of a terminal to check what the user sees: text, C{\\r},
    C{\\n}, cursor up (C{ESC [ n A}) and clear to the end (C{ESC [ J}).
    """

    def __init__(self) -> None:
        self.rows: list[str] = [""]
        self.row = 0
        self.column = 0

    def feed(self, text: str) -> None:
        for token in re.findall(r"\x1b\[\d*[A-Za-z]|\r|\n|[^\x1b\r\n]+", text):
            if token == "\r":
                self.column = 0
            elif token == "\n":
                self.row += 1
                self.column = 0
                if self.row == len(self.rows):
                    self.rows.append("")
            elif token.startswith("\x1b["):
                command, count = token[-1], int(token[2:-1] or 1)
                if command == "A":
                    self.row = max(0, self.row - count)
                elif command == "J":
                    self.rows[self.row] = self.rows[self.row][: self.column]
                    del self.rows[self.row + 1 :]
                else:
                    raise AssertionError(f"unexpected escape sequence {token!r}")
            else:
                line = self.rows[self.row]
                line = line[: self.column].ljust(self.column) + token + line[self.column + len(token) :]
                self.rows[self.row] = line
                self.column += len(token)

    @property
    def text(self) -> str:
        return "\n".join(self.rows)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def screen(self) -> Screen:
        screen = Screen()
        screen.feed(self.getvalue())
        return screen


# Formatting


def test_formatSize() -> None:
    assert formatSize(0) == "0 B"
    assert formatSize(1023) == "1023 B"
    assert formatSize(1536) == "1.5 KiB"
    assert formatSize(33.4 * MiB) == "33.4 MiB"
    assert formatSize(4 * 1024 * MiB) == "4.00 GiB"


def test_formatDuration() -> None:
    assert formatDuration(0.4) == "0s"
    assert formatDuration(7.2) == "7s"
    assert formatDuration(185) == "3m05s"
    assert formatDuration(7440) == "2h04m"


def test_formatProgress() -> None:
    line = formatProgress("migration 1 from 10.0.0.5", "loading", done=1024 * MiB, total=4096 * MiB,
                          received=900 * MiB, rate=300 * MiB, doneRate=512 * MiB, channels=5,
                          expectedChannels=5)
    assert line == ("migration 1 from 10.0.0.5: loading  25% of 4.00 GiB, 900.0 MiB received,"
                    " 300.0 MiB/s, ETA 6s, 5/5 channels")


def test_formatProgressBeforeTheBlockListAndWithoutARate() -> None:
    line = formatProgress("migration 2 from h", "assembling", done=0, total=None, received=0, rate=None,
                          doneRate=None, channels=1, expectedChannels=3)
    assert line == "migration 2 from h: assembling, 0 B received, -- /s, 1/3 channels"


def test_formatProgressStalledHasNoETA() -> None:
    line = formatProgress("m", "loading", done=MiB, total=4 * MiB, received=MiB, rate=0.0, doneRate=0.0,
                          channels=3, expectedChannels=3)
    assert " 25% of 4.0 MiB" in line and "0 B/s" in line and "ETA --" in line


def test_formatProgressPastTheTotal() -> None:
    """
    Precopy resends dirtied pages: more than the RAM size arrives. No
    percent above 100 and no ETA then.
    """
    line = formatProgress("m", "loading", done=5 * MiB, total=4 * MiB, received=6 * MiB, rate=MiB,
                          doneRate=MiB, channels=3, expectedChannels=3)
    assert "100% of 4.0 MiB, resending dirty pages" in line
    assert "ETA" not in line


# The sliding rate


def test_slidingRateForgetsOldSamples() -> None:
    clock = Clock()
    rate = SlidingRate(clock, window=5.0)
    assert rate.rate() is None
    rate.add(0)
    assert rate.rate() is None  # one sample is no rate
    for _ in range(10):  # 10 MiB/s for 10 s
        clock.advance(1)
        rate.add(int(clock.seconds()) * 10 * MiB)
    assert rate.rate() == pytest.approx(10 * MiB)
    for _ in range(5):  # then a stall: the average since the start would still say 6.7 MiB/s
        clock.advance(1)
        rate.add(100 * MiB)
    assert rate.rate() == 0.0
    clock.advance(1)
    rate.add(101 * MiB)
    assert rate.rate() == pytest.approx(MiB / 5)


def test_slidingRateSpansTheWholeWindow() -> None:
    """
    Samples closer than the window keep the one at the window's start.
    """
    clock = Clock()
    rate = SlidingRate(clock, window=2.0)
    for n in range(9):
        rate.add(n * 100)
        clock.advance(0.25)
    # Samples at 0.0..2.0 s: the rate spans 2 s, not the last 0.25 s.
    assert rate.rate() == pytest.approx(400.0)


# Status lines on a terminal


def test_statusLinesRedrawInPlace() -> None:
    terminal = FakeTerminal()
    shown = [["first 1", "second 1"]]
    lines = StatusLines(terminal, lambda: shown[0], size=lambda: (80, 24))
    lines.redraw()
    shown[0] = ["first 2", "second 2"]
    lines.redraw()
    assert terminal.screen().text == "first 2\nsecond 2"
    shown[0] = ["only"]
    lines.redraw()
    assert terminal.screen().text == "only"
    lines.clear()
    assert terminal.screen().text == ""


def test_statusLinesMakeWayForLogLines() -> None:
    """
    Text written through the lines' stream (log lines) lands above them,
    never mixed in; the lines come back below it.
    """
    terminal = FakeTerminal()
    lines = StatusLines(terminal, lambda: ["status A", "status B"], size=lambda: (80, 24))
    lines.write("before\n")
    lines.redraw()
    lines.write("twisted-multifd: a log line\n")
    assert terminal.screen().text == "before\ntwisted-multifd: a log line\nstatus A\nstatus B"
    lines.clear()
    assert terminal.screen().text == "before\ntwisted-multifd: a log line\n"


def test_statusLinesAreCutToTheWidth() -> None:
    terminal = FakeTerminal()
    lines = StatusLines(terminal, lambda: ["x" * 100], size=lambda: (40, 24))
    lines.redraw()
    assert terminal.screen().rows == ["x" * 39]


def test_statusLinesFitTheHeight() -> None:
    terminal = FakeTerminal()
    lines = StatusLines(terminal, lambda: [f"migration {n}" for n in range(10)], size=lambda: (80, 5))
    lines.redraw()
    lines.redraw()
    assert terminal.screen().rows == ["migration 0", "migration 1", "migration 2", "... and 7 more migrations"]


class FakeMigration:
    def __init__(self, label: str, total: int | None = 4 * MiB) -> None:
        self.label = label
        self.ended = False
        self.snapshot: dict[str, Any] = {
            "state": "loading", "bytes": 0, "pages_with_data": 0, "zero_pages": 0, "ram_total": total,
            "page_size": 4096, "channels": {"main": "connected", "0": "connected", "1": "waiting"},
        }

    def status(self) -> dict[str, Any]:
        return dict(self.snapshot)

    def receive(self, pages: int) -> None:
        self.snapshot["pages_with_data"] += pages
        self.snapshot["bytes"] += pages * 4096


def test_terminalProgressOneLinePerMigration() -> None:
    clock = Clock()
    terminal = FakeTerminal()
    first, second = FakeMigration("migration 1 from a"), FakeMigration("migration 2 from b", total=None)
    migrations = [first, second]
    progress = TerminalProgress(lambda: migrations, clock, terminal, interval=0.25, window=1.0,
                                size=lambda: (200, 24))
    progress.start()
    for _ in range(8):  # 2 s at 64 pages (256 KiB) every 0.25 s: 1 MiB/s
        first.receive(64)
        second.receive(64)
        clock.advance(0.25)
    screen = terminal.screen().rows
    assert screen == [
        "migration 1 from a: loading  50% of 4.0 MiB, 2.0 MiB received, 1.0 MiB/s, ETA 2s, 2/3 channels",
        "migration 2 from b: loading, 2.0 MiB received, 1.0 MiB/s, 2/3 channels",
    ]
    # A migration that ended leaves the lines at once.
    first.ended = True
    progress.lines.write("twisted-multifd: migration 1 from a: complete\n")  # its log line
    assert terminal.screen().rows == [
        "twisted-multifd: migration 1 from a: complete",
        "migration 2 from b: loading, 2.0 MiB received, 1.0 MiB/s, 2/3 channels",
    ]
    clock.advance(0.25)  # nothing more received: the rate drops over the window
    assert terminal.screen().rows[1] == "migration 2 from b: loading, 2.0 MiB received, 768.0 KiB/s, 2/3 channels"
    progress.stop()
    assert not progress.running
    assert "migration 2" not in terminal.screen().text


def test_terminalProgressShowsProgressLineOfOtherMigrations() -> None:
    """
    A migration without C{status()} (a relayed one) shows its progress line.
    """

    class Relayed:
        label = "migration 1 from a"
        ended = False

        def progressLine(self) -> str:
            return "migration 1 from a: relaying, 1.0 MiB to the destination"

    clock = Clock()
    terminal = FakeTerminal()
    progress = TerminalProgress(lambda: [Relayed()], clock, terminal, size=lambda: (200, 24))
    progress.start()
    assert terminal.screen().text == "migration 1 from a: relaying, 1.0 MiB to the destination"


def test_terminalProgressOfARelayedMigration() -> None:
    """
    A relayed migration's C{status()} (per connection, bytes each way): its
    line shows the bytes relayed to the destination and their rate.
    """

    class Relayed:
        label = "migration 1 from a"
        ended = False
        toDestination = 0

        def status(self) -> dict[str, Any]:
            return {"state": "relaying", "connections": {
                "main": {"state": "relaying", "to_destination": self.toDestination, "to_source": 5},
                "0": {"state": "closing", "to_destination": 0, "to_source": 0},
                "1": {"state": "waiting", "to_destination": 0, "to_source": 0},
            }}

    clock = Clock()
    terminal = FakeTerminal()
    relayed = Relayed()
    progress = TerminalProgress(lambda: [relayed], clock, terminal, window=1.0, size=lambda: (200, 24))
    progress.start()
    for _ in range(4):
        relayed.toDestination += 512 * 1024
        clock.advance(0.25)
    assert terminal.screen().text == "migration 1 from a: relaying, 2.0 MiB relayed, 2.0 MiB/s, 2/3 channels"


# Choosing


def test_resolveProgressMode() -> None:
    terminal, pipe = FakeTerminal(), io.StringIO()
    assert resolveProgressMode("auto", terminal) == "tty"
    assert resolveProgressMode("auto", pipe) == "log"
    assert resolveProgressMode("tty", pipe) == "tty"
    assert resolveProgressMode("log", terminal) == "log"
    assert resolveProgressMode("off", terminal) == "off"
    # twistd owns stderr and the log.
    assert resolveProgressMode("auto", terminal, underTwistd=True) == "log"
    assert resolveProgressMode("tty", terminal, underTwistd=True) == "log"
    assert resolveProgressMode("off", terminal, underTwistd=True) == "off"
    with pytest.raises(ValueError, match="--progress must be auto, tty, log, off; not 'fancy'"):
        resolveProgressMode("fancy", terminal)


class _Port:
    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 4444)

    def stopListening(self) -> None:
        pass


class _Endpoint:
    def listen(self, factory: Any) -> Any:
        from twisted.internet.defer import succeed

        return succeed(_Port())


def _service(progress: str, stream: Any = None) -> tuple[ListeningService, MigrationReceiverFactory, Clock]:
    clock = Clock()
    factory = MigrationReceiverFactory(RecordingSinkFactory(), channels=2, clock=clock)
    service = ListeningService(_Endpoint(), factory, addressFile=None, progressInterval=10.0, clock=clock,
                               description="test", role="receiver", progress=progress, progressStream=stream)
    return service, factory, clock


def _holdAtTheFirstBarrier(factory: MigrationReceiverFactory, clock: Clock) -> MigrationPump:
    migration = synthesizeMigration(seed=5, channels=2)
    pump = MigrationPump(factory, migration, host="192.0.2.50", clock=clock, chunkSizes=4096)
    for _ in range(40):
        pump.pump()
    [live] = factory.migrations
    assert live.status()["ram_total"]
    return pump


def test_serviceTTYModeDrawsStatusLinesNotLogLines(monkeypatch: Any) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    terminal = FakeTerminal()
    service, factory, clock = _service("tty", terminal)
    with capturedLogs() as events:
        service.startService()
        pump = _holdAtTheFirstBarrier(factory, clock)
        for _ in range(4):
            clock.advance(0.25)
    assert not any("pages of" in formatEvent(e) for e in events)  # no progress log lines
    [line] = terminal.screen().rows
    # Held at a barrier: nothing moves, so no ETA.
    assert re.fullmatch(r"migration 1 from 192\.0\.2\.50: loading +\d+% of [\d.]+ KiB, [\d.]+ KiB received,"
                        r" 0 B/s, ETA --, 3/3 channels", line), line
    pump.flush()
    assert factory.migrations == []
    clock.advance(0.25)
    assert terminal.screen().text == ""  # the line is gone with the migration
    service.stopService()
    assert service.terminal is None


def test_serviceLogMode() -> None:
    terminal = FakeTerminal()
    service, factory, clock = _service("log", terminal)
    with capturedLogs() as events:
        service.startService()
        _holdAtTheFirstBarrier(factory, clock)
        clock.advance(10.0)
    assert [e for e in events if "pages of" in formatEvent(e)]
    assert terminal.getvalue() == ""
    service.stopService()


def test_serviceOffMode() -> None:
    service, factory, clock = _service("off")
    with capturedLogs() as events:
        service.startService()
        _holdAtTheFirstBarrier(factory, clock)
        clock.advance(30.0)
    assert not [e for e in events if "pages of" in formatEvent(e)]
    assert service.terminal is None
    service.stopService()


def test_serviceTTYModeOnStderrReplacesItWhileRunning(monkeypatch: Any) -> None:
    """
    With no stream given, the status lines go to stderr, and anything
    written to stderr while they are shown clears them first.
    """
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    import sys

    service, factory, clock = _service("tty")
    service.startService()
    _holdAtTheFirstBarrier(factory, clock)
    clock.advance(0.25)
    assert sys.stderr is not terminal
    sys.stderr.write("twisted-multifd: something happened\n")
    rows = terminal.screen().rows
    assert rows[0] == "twisted-multifd: something happened"
    assert rows[1].startswith("migration 1 from 192.0.2.50: loading")
    service.stopService()
    assert sys.stderr is terminal
    assert terminal.screen().rows[0] == "twisted-multifd: something happened"
    assert "migration 1 from 192.0.2.50: loading" not in terminal.screen().text

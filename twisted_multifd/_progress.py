"""
Progress for people watching a long migration: on a terminal, one status line
per migration redrawn in place (percent of RAM, rate, ETA, channels);
otherwise a quiet log line now and then (L{ListeningService}).

The formatting is pure (numbers in, a string out) and the rate comes from a
sliding window over samples taken with an injected clock, so both are tested
without a terminal or a real clock.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable, Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

PROGRESS_MODES = ("auto", "tty", "log", "off")

# Shared by every listening command's options.
PROGRESS_PARAMETER = [
    "progress", None, "auto",
    "How to show progress: tty (one status line per migration on stderr, redrawn in place:"
    " percent, rate, ETA, channels), log (a line every --progress-interval seconds), off, or"
    " auto (tty if stderr is a terminal, else log; under twistd always log).",
]

# Seconds between redraws of the status lines.
REDRAW_INTERVAL = 0.25
# Seconds of history the shown rate is measured over.
RATE_WINDOW = 5.0

_CLEAR_TO_END = "\x1b[J"


def checkProgressMode(mode: str) -> None:
    """
    @raise ValueError: C{mode} is not one of L{PROGRESS_MODES}.
    """
    if mode not in PROGRESS_MODES:
        raise ValueError(f"--progress must be {', '.join(PROGRESS_MODES)}; not {mode!r}")


def resolveProgressMode(mode: str, stream: Any, underTwistd: bool = False) -> str:
    """
    What C{--progress MODE} means here: C{"tty"}, C{"log"} or C{"off"}.

    Under twistd, stderr and the log belong to twistd, so anything but
    C{"off"} is C{"log"}.
    """
    checkProgressMode(mode)
    if mode == "off":
        return "off"
    if underTwistd:
        return "log"
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        try:
            return "tty" if isatty is not None and isatty() else "log"
        except ValueError:  # a closed stream
            return "log"
    return mode


# Formatting: pure functions


def formatSize(size: float) -> str:
    """
    C{"512 B"}, C{"12.0 KiB"}, C{"33.4 MiB"}, C{"4.00 GiB"}.
    """
    if size < 1024:
        return f"{size:.0f} B"
    if size < 1024 ** 2:
        return f"{size / 1024:.1f} KiB"
    if size < 1024 ** 3:
        return f"{size / 1024 ** 2:.1f} MiB"
    return f"{size / 1024 ** 3:.2f} GiB"


def formatDuration(seconds: float) -> str:
    """
    C{"7s"}, C{"3m05s"}, C{"2h04m"}: how long, to the precision that
    matters at that length.
    """
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def formatProgress(
    label: str,
    state: str,
    *,
    done: int,
    total: int | None,
    received: int,
    rate: float | None,
    doneRate: float | None,
    channels: int,
    expectedChannels: int,
    moved: str = "received",
) -> str:
    """
    One status line: C{"migration 1 from 10.0.0.5: loading 42% of 4.00 GiB,
    312.0 MiB/s, ETA 7s, 5/5 channels"}.

    @param done: bytes of RAM received (pages with data and zero pages).
    @param total: bytes of RAM in the block list, or L{None} before it.
    @param received: bytes received on all channels.
    @param rate: bytes per second on the wire lately, or L{None} if not known yet.
    @param doneRate: bytes of RAM per second lately (the ETA's speed).
    @param channels: channels connected now; C{expectedChannels} of them make
        the migration (the main channel and the multifd channels).
    @param moved: what happened to the C{received} bytes (a relay's are
        "relayed" to the destination).
    """
    parts = [f"{label}: {state}"]
    if total:
        # Pages dirtied again are sent again: past 100% the source is
        # iterating, so say that instead of a guess.
        if done < total:
            parts[0] += f" {100 * done / total:3.0f}% of {formatSize(total)}"
        else:
            parts[0] += f" 100% of {formatSize(total)}, resending dirty pages"
    parts.append(f"{formatSize(received)} {moved}")
    parts.append("-- /s" if rate is None else f"{formatSize(rate)}/s")
    if total and done < total:
        if doneRate:
            parts.append(f"ETA {formatDuration((total - done) / doneRate)}")
        else:
            parts.append("ETA --")
    parts.append(f"{channels}/{expectedChannels} channels")
    return ", ".join(parts)


class SlidingRate:
    """
    A rate over the last C{window} seconds of samples of a growing count (not
    the average since the start, which a stall or a burst long ago would
    skew).
    """

    def __init__(self, clock: IReactorTime, window: float = RATE_WINDOW) -> None:
        self.clock = clock
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, count: int) -> None:
        now = self.clock.seconds()
        samples = self._samples
        samples.append((now, count))
        # Keep one sample at or before the window's start, so the rate
        # spans the whole window once there is that much history.
        while len(samples) > 2 and samples[1][0] <= now - self.window:
            samples.popleft()

    def rate(self) -> float | None:
        """
        Counts per second over the window, or L{None} with less than two
        samples apart in time.
        """
        if len(self._samples) < 2:
            return None
        (start, first), (end, last) = self._samples[0], self._samples[-1]
        if end <= start:
            return None
        return (last - first) / (end - start)


# A migration's numbers


class _Tracked:
    """
    The sliding rates of one migration.
    """

    def __init__(self, clock: IReactorTime, window: float) -> None:
        self.received = SlidingRate(clock, window)
        self.done = SlidingRate(clock, window)


def _connectedChannels(channels: dict[str, str]) -> int:
    return sum(state in ("connected", "at-barrier") for state in channels.values())


def statusLineOf(migration: Any, tracked: _Tracked) -> str:
    """
    The status line of a migration with C{status()} (docs/status.md): a
    received one (percent, ETA), or a relayed one (bytes relayed to the
    destination, per connection); for any other, its C{progressLine()}.
    """
    status = getattr(migration, "status", None)
    snapshot = status() if status is not None else None
    if isinstance(snapshot, dict) and isinstance(snapshot.get("connections"), dict):
        return _relayedLineOf(migration, snapshot, tracked)
    if not isinstance(snapshot, dict) or "bytes" not in snapshot:
        return str(migration.progressLine())
    pageSize = snapshot.get("page_size") or 0
    done = (snapshot.get("pages_with_data", 0) + snapshot.get("zero_pages", 0)) * pageSize
    received = snapshot["bytes"]
    tracked.received.add(received)
    tracked.done.add(done)
    channels = snapshot.get("channels") or {}
    return formatProgress(
        migration.label, snapshot.get("state", "?"), done=done, total=snapshot.get("ram_total"),
        received=received, rate=tracked.received.rate(), doneRate=tracked.done.rate(),
        channels=_connectedChannels(channels), expectedChannels=len(channels),
    )


def _relayedLineOf(migration: Any, snapshot: dict[str, Any], tracked: _Tracked) -> str:
    connections = snapshot["connections"].values()
    relayed = sum(c.get("to_destination", 0) for c in connections)
    tracked.received.add(relayed)
    return formatProgress(
        migration.label, snapshot.get("state", "?"), done=0, total=None, received=relayed,
        rate=tracked.received.rate(), doneRate=None,
        channels=sum(c.get("state") not in ("waiting", "closed") for c in connections),
        expectedChannels=len(connections), moved="relayed",
    )


# The terminal


def terminalSize(stream: Any, fallback: tuple[int, int] = (80, 24)) -> tuple[int, int]:
    """
    The terminal's columns and lines; else C{$COLUMNS} and C{$LINES}; else
    C{fallback}.
    """
    try:
        size = os.get_terminal_size(stream.fileno())
        if size.columns and size.lines:
            return size.columns, size.lines
    except (AttributeError, OSError, ValueError):
        pass

    def fromEnvironment(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, "")) or default
        except ValueError:
            return default

    return fromEnvironment("COLUMNS", fallback[0]), fromEnvironment("LINES", fallback[1])


class StatusLines:
    """
    Status lines kept at the bottom of a terminal stream. Redrawing goes back
    to the first line (C{\\r}, cursor up) and clears to the end before
    writing; every other write through L{write} clears them first and draws
    them again below what it wrote, so log lines never mix with them.

    Lines are cut to the terminal's width, and their number to its height
    (the rest summed up in the last): going back up over a wrapped line, or
    past the top of the screen, would leave lines behind.

    @param render: the lines to show now.
    @param size: the terminal's columns and lines (default: asked of
        C{stream}'s terminal).
    """

    def __init__(self, stream: Any, render: Callable[[], list[str]],
                 size: Callable[[], tuple[int, int]] | None = None) -> None:
        self.stream = stream
        self.render = render
        self._size = size or (lambda: terminalSize(stream))
        self._drawn = 0  # lines on screen; the cursor is at the end of the last

    def _eraseText(self) -> str:
        if not self._drawn:
            return ""
        up = self._drawn - 1
        return "\r" + (f"\x1b[{up}A" if up else "") + _CLEAR_TO_END

    def redraw(self) -> None:
        lines = self.render()
        columns, rows = self._size()
        width, height = max(columns - 1, 10), max(rows - 1, 2)
        if len(lines) > height:
            lines = [*lines[: height - 1], f"... and {len(lines) - height + 1} more migrations"]
        text = self._eraseText() + "\n".join(line[:width] for line in lines)
        self._drawn = len(lines)
        if text:
            self._out(text)

    def clear(self) -> None:
        text = self._eraseText()
        self._drawn = 0
        if text:
            self._out(text)

    def _out(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a terminal gone away is no reason to stop receiving

    # The stream others write to while the lines are shown

    def write(self, text: str) -> int:
        wasDrawn = self._drawn
        self.clear()
        self.stream.write(text)
        if wasDrawn and text.endswith("\n"):
            self.redraw()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return bool(self.stream.isatty())

    def fileno(self) -> int:
        return int(self.stream.fileno())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class TerminalProgress:
    """
    One status line per migration in progress, redrawn on C{stream} every
    C{interval} seconds of C{clock}. A migration that ended is dropped from
    the lines at once (its own log line is the summary).

    @param migrations: the migrations in progress now (a factory's
        C{migrations}).
    """

    def __init__(self, migrations: Callable[[], Iterable[Any]], clock: IReactorTime, stream: Any, *,
                 interval: float = REDRAW_INTERVAL, window: float = RATE_WINDOW,
                 size: Callable[[], tuple[int, int]] | None = None) -> None:
        self.migrations = migrations
        self.clock = clock
        self.window = window
        self.interval = interval
        self.lines = StatusLines(stream, self._render, size)
        self._tracked: dict[int, tuple[Any, _Tracked]] = {}
        self._loop = LoopingCall(self.lines.redraw)
        self._loop.clock = clock

    def _render(self) -> list[str]:
        live = [m for m in self.migrations() if not getattr(m, "ended", False)]
        current = {id(m): m for m in live}
        for key in [k for k, (m, _) in self._tracked.items() if current.get(k) is not m]:
            del self._tracked[key]
        lines = []
        for migration in live:
            entry = self._tracked.get(id(migration))
            if entry is None:
                entry = self._tracked[id(migration)] = (migration, _Tracked(self.clock, self.window))
            lines.append(statusLineOf(migration, entry[1]))
        return lines

    @property
    def running(self) -> bool:
        return bool(self._loop.running)

    def start(self) -> None:
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        """
        Stop redrawing and clear the lines.
        """
        if self._loop.running:
            self._loop.stop()
        self.lines.clear()

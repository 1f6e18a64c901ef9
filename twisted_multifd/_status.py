"""
C{--status ENDPOINT}: the receiver's or the relay's state over HTTP
(twisted.web).

C{GET /status} gives JSON (every migration in progress and the most recent
ended ones), C{GET /metrics} the Prometheus text format. See docs/status.md.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from ._records import MigrationResult

RECENT = 20
"""How many ended migrations /status lists."""


def _percent(pages: int, pageSize: int, total: int | None) -> float | None:
    if not total:
        return None
    return round(min(100.0, 100.0 * pages * pageSize / total), 2)


class _Tracker:
    """
    Counts migrations for /status and /metrics. Hooks itself in front of the
    factory's C{onMigrationEnded} (so whatever was there still runs) and
    reads C{factory.migrations} (each with C{status()}) when asked.

    Subclasses say what a migration in progress and an ended one look like
    (L{_live}, L{_record}), what the totals are (L{_totals}) and which of
    them are metrics (L{METRICS}).
    """

    METRICS: tuple[tuple[str, str, str, str], ...] = ()
    """(name, type, totals key, help) of each metric; C{name} may carry labels: C{'x{a="b"}'}."""

    def __init__(self, factory: Any, clock: Any, recent: int = RECENT) -> None:
        self.factory = factory
        self.clock = clock
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.completed = 0
        self.failed = 0
        self.startedAt = clock.seconds()
        following: Callable[[Any], None] | None = factory.onMigrationEnded

        def ended(result: Any) -> None:
            self.migrationEnded(result)
            if following is not None:
                following(result)

        factory.onMigrationEnded = ended

    def migrationEnded(self, result: Any) -> None:
        record = self._record(result)
        if record["state"] == "complete":
            self.completed += 1
        else:
            self.failed += 1
        self.recent.appendleft(record)

    def _record(self, result: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _live(self, migration: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _totals(self, live: list[dict[str, Any]]) -> dict[str, int]:
        return {
            "migrations_started": self.completed + self.failed + len(live),
            "migrations_completed": self.completed,
            "migrations_failed": self.failed,
            "migrations_in_progress": len(live),
            **self._ownTotals(live),
        }

    def _ownTotals(self, live: list[dict[str, Any]]) -> dict[str, int]:
        """
        The totals besides the counts of migrations.
        """
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        live = [self._live(m) for m in list(self.factory.migrations)]
        return {
            "time": self.clock.seconds(),
            "in_progress": live,
            "recent": list(self.recent),
            "totals": self._totals(live),
        }

    def metrics(self) -> str:
        totals = self._totals([self._live(m) for m in list(self.factory.migrations)])
        lines: list[str] = []
        described = set()
        for name, kind, key, text in self.METRICS:
            metric = f"twisted_multifd_{name}"
            family = metric.partition("{")[0]
            if family not in described:
                described.add(family)
                lines += [f"# HELP {family} {text}", f"# TYPE {family} {kind}"]
            lines.append(f"{metric} {totals[key]}")
        return "\n".join(lines) + "\n"


class StatusTracker(_Tracker):
    """
    The receiver's (L{MigrationReceiverFactory}) /status and /metrics.
    """

    METRICS = (
        ("migrations_started_total", "counter", "migrations_started", "Migrations started (first channel accepted)."),
        ("migrations_completed_total", "counter", "migrations_completed", "Migrations that ended complete."),
        ("migrations_failed_total", "counter", "migrations_failed", "Migrations that ended incomplete or were refused."),
        ("received_bytes_total", "counter", "bytes_received", "Migration bytes received, all channels."),
        ("pages_received_total", "counter", "pages_received", "RAM pages received (with data and zero)."),
        ("migrations_in_progress", "gauge", "migrations_in_progress", "Migrations being received."),
        ("channels_connected", "gauge", "channels_connected", "Open channels of migrations in progress."),
    )

    def __init__(self, factory: Any, clock: Any, recent: int = RECENT) -> None:
        super().__init__(factory, clock, recent)
        self.endedBytes = 0
        self.endedPages = 0

    def _record(self, result: MigrationResult) -> dict[str, Any]:
        pages = result.pagesWithData + result.zeroPageRecords
        self.endedBytes += result.bytesReceived
        self.endedPages += pages
        total = result.stream.get("ram_total") if result.stream else None
        channels = {"main": "closed", **{str(n): "closed" for n in range(result.info.channels)}}
        return {
            "number": result.info.number,
            "source": result.info.peer,
            "state": "complete" if result.complete else "failed",
            "started_at": result.info.startedAt,
            "elapsed_seconds": round(result.duration, 3),
            "expected_channels": result.info.channels,
            "channels": channels,
            "bytes": result.bytesReceived,
            "pages": {"with_data": result.pagesWithData, "zero": result.zeroPageRecords,
                      "total": total // result.pageSize if total else None},
            "percent": 100.0 if result.complete else _percent(pages, result.pageSize, total),
            "rate_bytes_per_second": round(result.bytesReceived / result.duration, 1) if result.duration > 0 else None,
            "eta_seconds": None,
            "machine": result.machine,
            "error": result.error,
        }

    def _live(self, migration: Any) -> dict[str, Any]:
        s = migration.status()
        pages = s["pages_with_data"] + s["zero_pages"]
        total = s["ram_total"]
        elapsed = s["elapsed"]
        rate = s["bytes"] / elapsed if elapsed > 0 else None
        eta = None
        if total and pages and elapsed > 0:
            remaining = total // s["page_size"] - pages
            eta = round(max(0, remaining) * elapsed / pages, 1)
        return {
            "number": migration.info.number,
            "source": migration.info.peer,
            "state": s["state"],
            "started_at": migration.info.startedAt,
            "elapsed_seconds": round(elapsed, 3),
            "expected_channels": migration.info.channels,
            "channels": s["channels"],
            "bytes": s["bytes"],
            "pages": {"with_data": s["pages_with_data"], "zero": s["zero_pages"],
                      "total": total // s["page_size"] if total else None},
            "percent": _percent(pages, s["page_size"], total),
            "rate_bytes_per_second": None if rate is None else round(rate, 1),
            "eta_seconds": eta,
            "machine": None if migration.configuration is None else migration.configuration.machine,
            "error": None,
        }

    def _ownTotals(self, live: list[dict[str, Any]]) -> dict[str, int]:
        return {
            "bytes_received": self.endedBytes + sum(m["bytes"] for m in live),
            "pages_received": self.endedPages + sum(m["pages"]["with_data"] + m["pages"]["zero"] for m in live),
            "channels_connected": sum(
                1 for m in live for state in m["channels"].values() if state in ("connected", "at-barrier")
            ),
        }


class RelayStatusTracker(_Tracker):
    """
    The relay's (L{twisted_multifd._relay.RelayFactory}) /status and
    /metrics: per migration its connections' states and the bytes relayed
    each way.
    """

    METRICS = (
        ("migrations_started_total", "counter", "migrations_started", "Migrations started (first channel accepted)."),
        ("migrations_completed_total", "counter", "migrations_completed",
         "Migrations relayed cleanly (every connection relayed and closed normally)."),
        ("migrations_failed_total", "counter", "migrations_failed", "Migrations that failed or were refused."),
        ('relayed_bytes_total{direction="to_destination"}', "counter", "bytes_to_destination",
         "Bytes relayed, by direction (to_destination: from the source to the destination)."),
        ('relayed_bytes_total{direction="to_source"}', "counter", "bytes_to_source", ""),
        ("migrations_in_progress", "gauge", "migrations_in_progress", "Migrations assembling, connecting or relaying."),
        ("channels_connected", "gauge", "channels_connected",
         "Connections of migrations in progress that are connected to the destination and open."),
    )

    def __init__(self, factory: Any, clock: Any, recent: int = RECENT) -> None:
        super().__init__(factory, clock, recent)
        self.endedToDestination = 0
        self.endedToSource = 0

    def _record(self, result: Any) -> dict[str, Any]:
        self.endedToDestination += result.toDestination
        self.endedToSource += result.toSource
        connections = {"main": _closed(), **{str(n): _closed() for n in range(result.channels)}}
        for report in result.connections:
            connections["main" if report.channelID is None else str(report.channelID)] = {
                "state": "closed", "to_destination": report.toDestination, "to_source": report.toSource,
            }
        return {
            "number": result.number,
            "source": result.peer,
            "state": "complete" if result.clean else "failed",
            "uuid": None if result.uuid is None else result.uuid.hex(),
            "started_at": result.startedAt,
            "elapsed_seconds": round(result.duration, 3),
            "expected_channels": result.channels,
            "connections": connections,
            "bytes_to_destination": result.toDestination,
            "bytes_to_source": result.toSource,
            "rate_bytes_per_second": _rate(result.toDestination, result.duration),
            "error": result.error,
        }

    def _live(self, migration: Any) -> dict[str, Any]:
        s = migration.status()
        toDestination = sum(c["to_destination"] for c in s["connections"].values())
        return {
            "number": migration.number,
            "source": migration.peer,
            "state": s["state"],
            "uuid": s["uuid"],
            "started_at": migration.startedAt,
            "elapsed_seconds": round(s["elapsed"], 3),
            "expected_channels": migration.channels,
            "connections": s["connections"],
            "bytes_to_destination": toDestination,
            "bytes_to_source": sum(c["to_source"] for c in s["connections"].values()),
            "rate_bytes_per_second": _rate(toDestination, s["elapsed"]),
            "error": None,
        }

    def _ownTotals(self, live: list[dict[str, Any]]) -> dict[str, int]:
        return {
            "bytes_to_destination": self.endedToDestination + sum(m["bytes_to_destination"] for m in live),
            "bytes_to_source": self.endedToSource + sum(m["bytes_to_source"] for m in live),
            "channels_connected": sum(
                1 for m in live for c in m["connections"].values() if c["state"] in ("relaying", "closing")
            ),
        }


def _closed() -> dict[str, Any]:
    return {"state": "closed", "to_destination": 0, "to_source": 0}


def _rate(size: int, seconds: float) -> float | None:
    return round(size / seconds, 1) if seconds > 0 else None


class _Page(Resource):
    isLeaf = True

    def __init__(self, render: Callable[[], bytes], contentType: bytes) -> None:
        super().__init__()
        self._render = render
        self._type = contentType

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", self._type)
        request.setHeader(b"cache-control", b"no-store")
        return self._render()


class _Root(Resource):
    def getChild(self, path: bytes, request: Any) -> IResource:
        return notFound()


def statusSite(tracker: _Tracker) -> Site:
    root = _Root()
    status = _Page(lambda: json.dumps(tracker.status(), indent=1).encode() + b"\n", b"application/json")
    metrics = _Page(lambda: tracker.metrics().encode(), b"text/plain; version=0.0.4; charset=utf-8")
    root.putChild(b"status", cast(IResource, status))
    root.putChild(b"metrics", cast(IResource, metrics))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log lines
    return site


__all__ = ["RelayStatusTracker", "StatusTracker", "statusSite"]

"""Receive benchmark: a real QEMU destination vs. the twisted-multifd receiver.

For each multifd channel count, runs alternate between

  (a) QEMU source -> QEMU destination (``-incoming defer``, same build), and
  (b) QEMU source -> ``python -m twisted_multifd receive --once`` writing a
      full capture into a temporary folder on the work directory's disk
      (deleted after every run).

The source is a never-started (``-S``) VM whose RAM is a file of random bytes
(generated once, reused), so every page is a data page and the migrated
memory equals the file. ``max-bandwidth`` is lifted (QEMU's default is
128 MiB/s, which would make both sides wait for the source's throttle).

Wall time runs from issuing ``migrate`` on the source to the destination
side being done: the destination QEMU's MIGRATION ``completed`` event, or
the receiver process's exit (it writes and fsyncs the capture, then the
manifest, then exits). The source's own ``completed`` event is recorded too.
Every run is checked (QEMU: status completed; receiver: exit 0 and a complete
manifest), and the first capture of each channel count is compared with the
backing file by SHA-256 (``--verify all`` for every run).

Peak RSS of the destination side (receiver or QEMU) is its VmHWM, sampled
from /proc every few milliseconds until it exits (the value is a high-water
mark, so the last sample is the peak up to then). ``wait4``'s ru_maxrss is
kept in the JSON but is not used: a child started with vfork+exec (as
``subprocess`` does) inherits the parent's high-water mark at exec, so it
reports max(this benchmark process's peak, the receiver's peak).

CPU seconds of the source and the destination side cover the timed window;
"other CPU" is what the rest of the machine used in it, and each run first
waits (``--settle``) for a quiet machine, so disturbed runs can be told
apart. The receiver runs from a copy of ``twisted_multifd/`` taken at start,
so edits to the work tree during a benchmark do not change what is measured.

With ``--floor`` every round also runs ``bench/floorsink.py``: the same
bytes moved from each socket into a file with ``splice`` (as the receiver
stores page payloads; ``--floor-copy``: ``recv_into`` and ``pwrite``) and
written durably (writeback every 64 MiB, ``fsync``) by one thread, with no
parsing at all. Its row says what this machine charges for moving a
migration through Python to the disk, so the distance from it to the
receiver is the receiver's own work.

Optional extra runs (not in the table): ``--profile N`` runs the receiver
under cProfile with N channels, ``--py-spy N`` samples it with py-spy.
Results (JSON), logs of every run and profiles go to ``--workdir``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import hashlib
import json
import os
import platform
import pstats
import random
import re
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

# The harness lives beside the tests (tests/ is not a package).
from qemu_harness import (
    PAGE_SIZE,
    HarnessError,
    HarnessTimeout,
    MigrationSettings,
    QemuBinary,
    QemuLab,
    QemuVM,
    ListeningProcess,
    ManagedProcess,
    ReceiverProcess,
    accelerator,
    find_qemu,
)

UNLIMITED_BANDWIDTH = 1 << 40
"""``max-bandwidth`` used unless told otherwise: 1 TiB/s, i.e. no throttle."""

CHUNK = 64 * 1024 * 1024

BASELINE_CHUNK = 512 * 1024
"""Write size of the disk baseline: one multifd packet's pages (128 x 4 KiB)."""

QUIET_THRESHOLD = 0.1
"""CPUs (of all of them together) that may be busy for the machine to count as quiet."""

RSS_SAMPLE_INTERVAL = 0.005
"""Seconds between VmHWM samples of the destination process."""

PY_SPY_RATE = 250
"""py-spy samples per second."""


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``1G``, ``512M``, ``64MiB`` or a byte count; a whole number of MiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    size = int(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " ")
    if size <= 0 or size % (1024 * 1024):
        raise argparse.ArgumentTypeError(f"size must be a positive whole number of MiB: {text!r}")
    return size


def parse_channels(text: str) -> list[int]:
    try:
        channels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of channel counts: {text!r}") from None
    if not channels or any(not 1 <= n <= 255 for n in channels):
        raise argparse.ArgumentTypeError(f"channel counts must be 1..255: {text!r}")
    return channels


def add_common_arguments(parser: argparse.ArgumentParser, workdir_help: str) -> None:
    """
    The options every QEMU-against-ours benchmark (receive, send, relay) has.
    """
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"), help="guest RAM (default 1G)")
    parser.add_argument(
        "--memory",
        choices=MEMORY_PATTERNS,
        default="random",
        help="guest RAM contents: random pages (default), or runs of random and zero pages mixed",
    )
    parser.add_argument(
        "--channels", type=parse_channels, default=[1, 2, 4], help="multifd channel counts (default 1,2,4)"
    )
    parser.add_argument(
        "--runs", type=int, default=6,
        help="rounds per channel count, each with one run of every kind, in alternating order (default 6:"
        " even, so that each kind runs first as often as second)",
    )
    parser.add_argument("--qemu", default="10.0", help="QEMU build for every source and destination (default 10.0)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMF_BENCH_WORKDIR", "/var/tmp/twisted-multifd-bench")),
        help=workdir_help,
    )
    parser.add_argument(
        "--max-bandwidth",
        type=int,
        default=UNLIMITED_BANDWIDTH,
        help="QEMU source max-bandwidth in bytes/s (default 1 TiB/s = unthrottled)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one migration may take (default 300)")
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="before the runs, write back and drop the page cache (root only; the backing file is then read"
        " back in): a page cache left full by earlier work makes every run pay for reclaim",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(
        parser, "backing file, captures (deleted per run), logs, results (default /var/tmp/twisted-multifd-bench)"
    )
    parser.add_argument(
        "--verify",
        choices=("first", "all", "none"),
        default="first",
        help="SHA-256 of the captured pc.ram vs. the backing file: first run per channel count (default), all, none",
    )
    parser.add_argument(
        "--profile",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="after the timed runs, one extra receiver run with N channels under cProfile (repeatable)",
    )
    parser.add_argument(
        "--py-spy",
        type=int,
        action="append",
        default=[],
        metavar="N",
        dest="py_spy",
        help="after the timed runs, one extra receiver run with N channels sampled by py-spy (repeatable)",
    )
    parser.add_argument(
        "--no-disk-baseline",
        action="store_false",
        dest="disk_baseline",
        help="skip timing a plain write+fsync of SIZE bytes to the work directory",
    )
    parser.add_argument(
        "--capture-dir",
        type=Path,
        help="folder the receiver writes its captures into (default: the workdir; e.g. /dev/shm to"
        " take the disk out of the comparison)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=30.0,
        help=f"before each run, wait up to this many seconds for the machine to be quiet "
        f"(< {QUIET_THRESHOLD} CPU busy over 0.5 s; default 30, 0 = don't wait)",
    )
    parser.add_argument(
        "--only",
        choices=("qemu", "ours"),
        help="run only one kind of destination (for diagnosis; the ratio column then stays empty)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run bench/floorsink.py each round (read and store the bytes, parse nothing): "
        "the floor for any receiver in Python on this machine",
    )
    parser.add_argument(
        "--floor-copy",
        action="store_true",
        help="the floor sink copies (recv_into + pwrite) instead of splicing",
    )
    parser.add_argument("--json", type=Path, help="write all results here (default WORKDIR/results-TIME.json)")


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclass
class RunResult:
    kind: str  # "qemu" (QEMU destination), "ours" (twisted-multifd receiver) or "floor" (bench/floorsink.py)
    channels: int
    index: int
    ok: bool = False
    error: str | None = None
    wall: float | None = None
    """Seconds from issuing ``migrate`` to the destination side being done."""
    source_completed: float | None = None
    """Seconds from issuing ``migrate`` to the source's ``completed`` event."""
    source_total_time_ms: int | None = None
    source_mbps: float | None = None
    transferred: int | None = None
    destination_peak_rss_kib: int | None = None
    destination_cpu_seconds: float | None = None
    """CPU (user+system) the destination QEMU or receiver used from ``migrate`` to its end."""
    source_cpu_seconds: float | None = None
    other_cpu_seconds: float | None = None
    """CPU the rest of the machine used during the timed window (other processes, interrupts)."""
    steal_seconds: float | None = None
    """CPU time the hypervisor took from this VM during the timed window."""
    quiet_wait_seconds: float | None = None
    """How long the run waited for a quiet machine first (-1: never quiet, ran anyway)."""
    receiver_duration: float | None = None
    """The receiver's own ``duration_seconds`` (first connection to end)."""
    verified: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    qemu: QemuBinary
    size: int
    backing: Path
    backing_sha256: str
    workdir: Path
    runs_dir: Path
    timeout: float
    max_bandwidth: int
    settle: float
    code_root: Path
    """Folder holding the frozen copy of ``twisted_multifd`` that the receiver runs."""
    capture_dir: Path | None = None
    """Where the receiver writes its captures (default: the workdir)."""
    floor_copy: bool = False
    """The floor sink copies (recv_into + pwrite) instead of splicing."""
    data_bytes: int | None = None
    """Bytes of non-zero pages in the guest RAM (default: all of it)."""
    sequence: int = 0

    def settings(self, channels: int) -> MigrationSettings:
        return MigrationSettings(channels=channels, events=True, max_bandwidth=self.max_bandwidth)

    def run_dir(self, label: str) -> Path:
        self.sequence += 1
        path = self.runs_dir / f"{self.sequence:03d}-{label}"
        path.mkdir(parents=True)
        return path


# --------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------


def _first_match(path: str, pattern: str) -> str:
    with contextlib.suppress(OSError):
        match = re.search(pattern, Path(path).read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    return "?"


def machine_facts(qemu: QemuBinary) -> dict[str, Any]:
    import twisted

    mem_kib = _first_match("/proc/meminfo", r"^MemTotal:\s+(\d+)")
    return {
        "nproc": os.cpu_count(),
        "cpu": _first_match("/proc/cpuinfo", r"^model name\s*:\s*(.*)$"),
        "memory_gib": round(int(mem_kib) / 1024 / 1024, 1) if mem_kib.isdigit() else "?",
        "kernel": platform.release(),
        "qemu": str(qemu),
        "accelerator": accelerator(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
    }


def _fingerprint(package: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def snapshot_library(workdir: Path) -> tuple[Path, str]:
    """Copy ``twisted_multifd/`` (as it is in the work tree, edits included)
    to ``WORKDIR/code``; every receiver run uses this copy, so editing the
    work tree during a benchmark cannot change what is measured. Returns the
    copy's root and its fingerprint."""
    source = REPO_ROOT / "twisted_multifd"
    root = workdir / "code"
    for _ in range(5):
        shutil.rmtree(root, ignore_errors=True)
        (root / "twisted_multifd").mkdir(parents=True)
        for path in source.glob("*.py"):
            shutil.copy2(path, root / "twisted_multifd" / path.name)
        copied = _fingerprint(root / "twisted_multifd")
        if copied == _fingerprint(source):  # not caught in the middle of an edit
            return root, copied
        time.sleep(1)
    raise HarnessError(f"{source} kept changing while it was copied")


def code_version() -> dict[str, Any]:
    """The commit checked out, and a fingerprint of the library's files as
    they are in the work tree now."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return out.stdout.strip() if out.returncode == 0 else "?"

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "subject": git("log", "-1", "--format=%s"),
        "library_uncommitted_changes": bool(git("status", "--porcelain", "--", "twisted_multifd")),
        "library_fingerprint": _fingerprint(REPO_ROOT / "twisted_multifd"),
    }


def _proc_cpu_seconds(pid: int) -> float | None:
    """utime+stime of a live process (all its threads) from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_VMSTAT_KEYS = ("pgpgout", "pgmajfault", "compact_stall", "thp_fault_alloc", "thp_fault_fallback")


def system_counters() -> dict[str, float]:
    """Machine-wide counters whose change over a run helps explain outliers:
    CPU time by state (seconds, all CPUs; ``steal`` = taken by the hypervisor)
    and a few /proc/vmstat counters."""
    counters: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        tick = os.sysconf("SC_CLK_TCK")
        for name, value in zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), fields):
            counters[f"cpu_{name}"] = int(value) / tick
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/vmstat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in _VMSTAT_KEYS:
                counters[key] = int(value)
    return counters


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: round(after[key] - before[key], 3) for key in before if key in after}


_BUSY = ("cpu_user", "cpu_nice", "cpu_system", "cpu_irq", "cpu_softirq")


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Window:
    """Machine-wide CPU use over a timed migration, to tell how much of it
    went to something other than the source, the destination and us."""

    def __init__(self) -> None:
        self.system = system_counters()
        self.self_cpu = _self_cpu()
        self.delta: dict[str, float] = {}
        self.bench_cpu = 0.0

    def close(self) -> None:
        self.delta = counter_delta(self.system, system_counters())
        self.bench_cpu = _self_cpu() - self.self_cpu

    def record(self, result: RunResult) -> None:
        result.extra["system"] = self.delta
        result.steal_seconds = self.delta.get("cpu_steal")
        busy = sum(self.delta.get(key, 0.0) for key in _BUSY)
        ours = (result.destination_cpu_seconds or 0.0) + (result.source_cpu_seconds or 0.0) + self.bench_cpu
        result.other_cpu_seconds = round(busy - ours, 3)


def run_round(index: int, runs: list[Callable[[], RunResult]], results: list[RunResult]) -> None:
    """One round of a benchmark: every kind of run once, appended to C{results}
    and printed as it ends. The kinds go in the order given in odd rounds and
    reversed in even ones (A B, B A, A B, ...), so that no kind always runs
    right after the same other kind. On the benchmark machine a run right
    after one of another kind was often up to twice as slow (its destination
    QEMU used twice the CPU); with a fixed order that fell on the same kind in
    every round (see docs/performance.md, "Order of runs"). An even number of
    rounds puts each kind first as often as second.
    """
    for run in runs if index % 2 else reversed(runs):
        results.append(run())
        print(run_line(results[-1]), flush=True)


def wait_for_quiet(limit: float, threshold: float = QUIET_THRESHOLD) -> float:
    """Wait (at most ``limit`` seconds) until the machine was nearly idle for
    half a second: less than ``threshold`` CPUs busy. Returns the seconds
    waited, or -1 when the machine never went quiet."""
    if limit <= 0:
        return 0.0
    started = time.monotonic()
    while True:
        before = system_counters()
        time.sleep(0.5)
        delta = counter_delta(before, system_counters())
        busy = sum(delta.get(key, 0.0) for key in _BUSY) / 0.5
        waited = time.monotonic() - started
        if busy < threshold:
            return waited
        if waited >= limit:
            return -1.0


def _proc_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a live process."""
    text = _first_match(f"/proc/{pid}/status", r"^VmHWM:\s+(\d+)\s*kB")
    return int(text) if text.isdigit() else None


# --------------------------------------------------------------------------
# Backing file and disk baseline
# --------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            sha.update(chunk)
    return sha.hexdigest()


def drop_page_cache() -> None:
    """``sync`` and ``echo 3 > /proc/sys/vm/drop_caches``.

    With the page cache full (of earlier captures, images, packages), every
    gibibyte a run allocates (a QEMU destination's guest RAM, a capture's
    pages) first makes the kernel reclaim as much, on the same CPUs: 8 GiB
    runs took 10.7 s instead of 7.1 s. Raises L{SystemExit} with the reason
    when the cache cannot be dropped (not root).
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        raise SystemExit(f"bench: --drop-caches: cannot write /proc/sys/vm/drop_caches ({exc.strerror}); run as root") from exc
    print("page cache written back and dropped")


MEMORY_PATTERNS = ("random", "mixed")
"""``random``: every page random bytes. ``mixed``: runs of 1–32 random pages and
runs of 1–32 zero pages, alternating (lengths from a fixed seed), about half of
the pages zero, so that multifd packets carry scattered data pages and zero
pages, as a guest with used and free memory interleaved does."""

MIXED_SEED = 6
PAGE = 4096


def _mixed_runs(pages: int) -> Iterator[tuple[bool, int]]:
    """The ``mixed`` pattern over ``pages`` pages: (data?, page count) runs, in order."""
    rng = random.Random(MIXED_SEED)
    data = False
    while pages:
        data = not data
        count = min(rng.randint(1, 32), pages)
        yield data, count
        pages -= count


def memory_data_bytes(size: int, pattern: str) -> int:
    """Bytes of pages that are not zero in a backing file of ``pattern``."""
    if pattern == "random":
        return size
    return sum(count for data, count in _mixed_runs(size // PAGE) if data) * PAGE


def ensure_backing_file(
    workdir: Path, size: int, drop_caches: bool = False, pattern: str = "random"
) -> tuple[Path, str]:
    """``WORKDIR/PATTERN-SIZE.bin`` (see L{MEMORY_PATTERNS}; made once, reused) and its SHA-256.

    With ``drop_caches``, the page cache is dropped first (L{drop_page_cache});
    hashing the file then reads it back in, as the source QEMU's memory.
    """
    if drop_caches:
        drop_page_cache()
    path = workdir / f"{pattern}-{size // (1024 * 1024)}M.bin"
    started = time.monotonic()
    if path.exists() and path.stat().st_size == size:
        digest = sha256_file(path)
        print(f"backing file {path} reused (sha256 {digest[:16]}…, hashed in {time.monotonic() - started:.1f}s)")
        return path, digest
    temporary = path.with_suffix(".tmp")
    sha = hashlib.sha256()
    if pattern == "random":
        pieces: Iterator[bytes] = (os.urandom(min(CHUNK, size - at)) for at in range(0, size, CHUNK))
    else:
        pieces = (os.urandom(count * PAGE) if data else bytes(count * PAGE) for data, count in _mixed_runs(size // PAGE))
    with open(temporary, "wb") as f:
        for chunk in pieces:
            f.write(chunk)
            sha.update(chunk)
    os.replace(temporary, path)
    digest = sha.hexdigest()
    print(f"backing file {path}: {size} bytes ({pattern}) in {time.monotonic() - started:.1f}s (sha256 {digest[:16]}…)")
    return path, digest


def disk_baseline(ctx: Context) -> dict[str, float]:
    """Write SIZE bytes to a new file in the work directory and fsync it, the
    way the receiver writes an image (file sized with ftruncate first, then
    one pwrite per 512 KiB, the payload of one multifd packet): the floor for
    any durable capture of this size on this disk."""
    folder = Path(tempfile.mkdtemp(prefix="disk-baseline-", dir=ctx.capture_dir or ctx.workdir))
    try:
        target = folder / "image"
        with open(ctx.backing, "rb") as src:
            buffer = src.read(min(BASELINE_CHUNK, ctx.size))
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, ctx.size)
            started = time.monotonic()
            offset = 0
            while offset < ctx.size:
                offset += os.pwrite(fd, buffer[: ctx.size - offset], offset)
            written = time.monotonic()
            os.fsync(fd)
            synced = time.monotonic()
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {"write_seconds": written - started, "fsync_seconds": synced - written, "total_seconds": synced - started}
    print(
        f"disk baseline: write {ctx.size / 2**20:.0f} MiB {result['write_seconds']:.2f}s "
        f"+ fsync {result['fsync_seconds']:.2f}s = {result['total_seconds']:.2f}s "
        f"({ctx.size / 2**20 / result['total_seconds']:.0f} MiB/s)"
    )
    return result


# --------------------------------------------------------------------------
# Waiting for the end of one migration
# --------------------------------------------------------------------------


@dataclass
class Completion:
    source: float | None = None
    destination: float | None = None
    receiver_rusage: Any = None
    peak_rss_kib: int | None = None
    """Last VmHWM sample of the destination process (see module docstring)."""


def wait_for_completion(
    source: QemuVM,
    started: float,
    timeout: float,
    describe: Any,
    destination: QemuVM | None = None,
    receiver: ManagedProcess | None = None,
) -> Completion:
    """Block (select, no polling) until the source's MIGRATION ``completed``
    event and the destination side's end: the destination QEMU's
    ``completed`` event, or the receiver's exit (reaped here with ``wait4``,
    whose rusage is kept). Times are seconds after ``started``.
    """
    done = Completion()
    pidfd = os.pidfd_open(receiver.popen.pid) if receiver is not None else None
    peak_pid = receiver.popen.pid if receiver is not None else destination.popen.pid if destination else None
    watched: dict[int, str] = {source.qmp.fileno(): "source"}
    if destination is not None:
        watched[destination.qmp.fileno()] = "destination"
    if pidfd is not None:
        watched[pidfd] = "receiver"
    vms = {"source": source, "destination": destination}

    def events(name: str, now: float) -> None:
        vm = vms[name]
        assert vm is not None
        for event in vm.qmp.take_events():
            if event.get("event") != "MIGRATION":
                continue
            status = event.get("data", {}).get("status")
            if status == "completed":
                setattr(done, name, now - started)
                watched.pop(vm.qmp.fileno(), None)
            elif status in ("failed", "cancelled"):
                info = json.dumps(vm.query_migrate())
                raise HarnessError(f"{name}: migration {status}; query-migrate: {info}\n{describe()}")

    try:
        now = time.monotonic()
        events("source", now)
        if destination is not None:
            events("destination", now)
        deadline = started + timeout
        while watched:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waiting = ", ".join(sorted(watched.values()))
                raise HarnessTimeout(f"no completion from {waiting} within {timeout:.0f}s\n{describe()}")
            sampling = peak_pid is not None and done.destination is None
            ready, _, _ = select.select(list(watched), [], [], min(remaining, RSS_SAMPLE_INTERVAL if sampling else 1.0))
            now = time.monotonic()
            if sampling:
                done.peak_rss_kib = _proc_hwm_kib(peak_pid) or done.peak_rss_kib
            for fd in ready:
                name = watched.get(fd)
                if name == "receiver":
                    assert receiver is not None
                    _, status, rusage = os.wait4(receiver.popen.pid, 0)
                    receiver.popen.returncode = os.waitstatus_to_exitcode(status)
                    done.destination = now - started
                    done.receiver_rusage = rusage
                    del watched[fd]
                    if receiver.popen.returncode != 0:
                        raise HarnessError(f"receiver exited with {receiver.popen.returncode}\n{describe()}")
                elif name is not None:
                    events(name, now)
                    if name == "destination" and done.destination is not None:
                        done.peak_rss_kib = _proc_hwm_kib(peak_pid) or done.peak_rss_kib
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return done


def _cpu_pair(source: QemuVM, destination_pid: int) -> tuple[float | None, float | None]:
    """CPU seconds the source and the destination process have used so far."""
    return _proc_cpu_seconds(source.popen.pid), _proc_cpu_seconds(destination_pid)


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _source_stats(result: RunResult, source: QemuVM, cpu_before: float | None) -> None:
    info = source.query_migrate()
    if info.get("status") != "completed":
        raise HarnessError(f"source status {info.get('status')!r} after completion\n{source.describe()}")
    result.source_total_time_ms = info.get("total-time")
    ram = info.get("ram", {})
    result.source_mbps = ram.get("mbps")
    result.transferred = ram.get("transferred")
    result.source_cpu_seconds = _delta(_proc_cpu_seconds(source.popen.pid), cpu_before)


# --------------------------------------------------------------------------
# The two kinds of run
# --------------------------------------------------------------------------


def run_qemu_destination(ctx: Context, channels: int, index: int) -> RunResult:
    waited = wait_for_quiet(ctx.settle)
    result = _run_qemu_destination(ctx, channels, index)
    result.quiet_wait_seconds = round(waited, 1)
    return result


def _run_qemu_destination(ctx: Context, channels: int, index: int) -> RunResult:
    result = RunResult("qemu", channels, index)
    run_dir = ctx.run_dir(f"qemu-ch{channels}-{index}")
    settings = ctx.settings(channels)
    try:
        with QemuLab(run_dir) as lab:
            destination, uri = lab.start_destination(ctx.qemu, settings, ram_size=ctx.size)
            source = lab.start_source(ctx.qemu, ctx.backing, settings, ram_size=ctx.size)
            cpu_before = _cpu_pair(source, destination.popen.pid)
            window = Window()
            started = time.monotonic()
            source.migrate(uri)
            done = wait_for_completion(source, started, ctx.timeout, lab.describe, destination=destination)
            window.close()
            status = destination.query_migrate().get("status")
            if status != "completed":
                raise HarnessError(f"destination status {status!r} after its completed event\n{lab.describe()}")
            result.wall, result.source_completed = done.destination, done.source
            result.destination_peak_rss_kib = done.peak_rss_kib
            _source_stats(result, source, cpu_before[0])
            result.destination_cpu_seconds = _delta(_proc_cpu_seconds(destination.popen.pid), cpu_before[1])
            window.record(result)
            result.ok = True
    except Exception as exc:  # noqa: BLE001  (recorded, reported, and the benchmark goes on)
        _record_failure(result, exc, run_dir)
    return result


def run_receiver(
    ctx: Context, channels: int, index: int, verify: bool, profile: Path | None = None, py_spy: Path | None = None
) -> RunResult:
    waited = wait_for_quiet(ctx.settle)
    result = _run_receiver(ctx, channels, index, verify, profile, py_spy)
    result.quiet_wait_seconds = round(waited, 1)
    return result


def _run_receiver(
    ctx: Context, channels: int, index: int, verify: bool, profile: Path | None, py_spy: Path | None
) -> RunResult:
    label = "ours-cprofile" if profile else "ours-pyspy" if py_spy else "ours"
    result = RunResult(label, channels, index)
    if profile is not None:
        # Never summarize an earlier run's profile as this one's.
        profile.unlink(missing_ok=True)
    run_dir = ctx.run_dir(f"{label}-ch{channels}-{index}")
    capture_parent = Path(tempfile.mkdtemp(prefix="capture-", dir=ctx.capture_dir or ctx.workdir))
    output = capture_parent / "capture"
    spy: subprocess.Popen[bytes] | None = None
    try:
        with QemuLab(run_dir) as lab:
            python_args = ["-c", _PROFILED_RECEIVER, str(profile)] if profile else []
            receiver = lab.start_receiver(channels, output, python_args=python_args, root=ctx.code_root)
            address = receiver.wait_for_address()
            if py_spy is not None:
                spy = _start_py_spy(receiver.popen.pid, py_spy, run_dir)
            rusage = _migrate_into_process(ctx, lab, channels, receiver, address, lab.describe, result)
            # Not the receiver's own peak when it is lower than ours (see the module docstring).
            result.extra["receiver_ru_maxrss_kib"] = rusage.ru_maxrss
            result.extra["bench_ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            result.extra["receiver_user_seconds_total"] = rusage.ru_utime
            result.extra["receiver_system_seconds_total"] = rusage.ru_stime
            _check_capture(ctx, result, receiver, channels, verify, lab.describe)
            result.ok = True
    except Exception as exc:  # noqa: BLE001  (recorded, reported, and the benchmark goes on)
        _record_failure(result, exc, run_dir)
    finally:
        shutil.rmtree(capture_parent, ignore_errors=True)
        if spy is not None:
            stop_py_spy(spy)
    return result


# ``python -c`` this, then the profile's path, then ``-m twisted_multifd ARGS``
# (how the harness starts a receiver): the CLI under cProfile. ``python -m
# cProfile -m twisted_multifd`` writes nothing, as ``console()`` ends the
# process with ``os._exit``; this dumps the profile first, then exits the same
# way.
_PROFILED_RECEIVER = """
import cProfile, os, sys
path, args = sys.argv[1], sys.argv[4:]
from twisted_multifd import _cli
profiler = cProfile.Profile()
code = 0
profiler.enable()
try:
    _cli.main(args)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
finally:
    profiler.disable()
    profiler.dump_stats(path)
sys.stdout.flush()
sys.stderr.flush()
os._exit(code or 0)
"""


def _migrate_into_process(
    ctx: Context, lab: QemuLab, channels: int, destination: ManagedProcess, address: str, describe: Any,
    result: RunResult,
) -> Any:
    """
    Migrate a fresh source into C{destination} (a process listening on
    C{address} that exits once it is done: the receiver, the floor sink),
    timed; record wall, CPU, peak RSS and the source's figures in C{result}.
    Returns the destination's rusage.
    """
    source = lab.start_source(ctx.qemu, ctx.backing, ctx.settings(channels), ram_size=ctx.size)
    cpu_before = _cpu_pair(source, destination.popen.pid)
    window = Window()
    started = time.monotonic()
    source.migrate(address)
    done = wait_for_completion(source, started, ctx.timeout, describe, receiver=destination)
    window.close()
    result.wall, result.source_completed = done.destination, done.source
    result.destination_peak_rss_kib = done.peak_rss_kib
    rusage = done.receiver_rusage
    result.destination_cpu_seconds = _delta(rusage.ru_utime + rusage.ru_stime, cpu_before[1])
    _source_stats(result, source, cpu_before[0])
    window.record(result)
    return rusage


class FloorSinkProcess(ManagedProcess):
    """``python bench/floorsink.py``: listens like the receiver (address file), exits 0 once all is stored."""

    role = "floor sink"
    wait_for_address = ListeningProcess.wait_for_address

    def __init__(self, channels: int, output: Path, size: int, log_dir: Path, copy: bool = False) -> None:
        self.address_file = log_dir / "floorsink.address"
        super().__init__("floorsink", [
            sys.executable, str(Path(__file__).with_name("floorsink.py")), "--address-file", str(self.address_file),
            "--channels", str(channels), "--output", str(output), "--size", str(size),
            *(["--copy"] if copy else []),
        ], log_dir)  # fmt: skip


def run_floor(ctx: Context, channels: int, index: int) -> RunResult:
    waited = wait_for_quiet(ctx.settle)
    result = RunResult("floor", channels, index)
    result.quiet_wait_seconds = round(waited, 1)
    run_dir = ctx.run_dir(f"floor-ch{channels}-{index}")
    capture_parent = Path(tempfile.mkdtemp(prefix="capture-", dir=ctx.capture_dir or ctx.workdir))
    try:
        with QemuLab(run_dir) as lab:
            sink = FloorSinkProcess(channels, capture_parent / "floor", ctx.size, run_dir / "logs", ctx.floor_copy)
            try:
                address = sink.wait_for_address()
                _migrate_into_process(
                    ctx, lab, channels, sink, address, lambda: lab.describe() + sink.describe(), result
                )
                stored = sum(f.stat().st_blocks * 512 for f in (capture_parent / "floor").iterdir())
                expected = ctx.size if ctx.data_bytes is None else ctx.data_bytes
                if stored < expected:
                    raise HarnessError(
                        f"the floor sink stored {stored} bytes, less than the {expected} of RAM that are not zero"
                    )
                result.ok = True
            finally:
                sink.close()
    except Exception as exc:  # noqa: BLE001  (recorded, reported, and the benchmark goes on)
        _record_failure(result, exc, run_dir)
    finally:
        shutil.rmtree(capture_parent, ignore_errors=True)
    return result


def _check_capture(
    ctx: Context, result: RunResult, receiver: ReceiverProcess, channels: int, verify: bool, describe: Any
) -> None:
    manifest = receiver.manifest()

    def fail(why: str) -> HarnessError:
        return HarnessError(f"{why}\nmanifest: {json.dumps(manifest, indent=1)[:4000]}\n{describe()}")

    if manifest.get("complete") is not True or manifest.get("error") is not None:
        raise fail("capture is not complete")
    if manifest.get("channels") != channels:
        raise fail(f"manifest says {manifest.get('channels')} channels, expected {channels}")
    blocks = {block["name"]: block for block in manifest.get("ram_blocks", [])}
    ram = blocks.get("pc.ram")
    if ram is None or ram.get("length") != ctx.size:
        raise fail(f"pc.ram missing or not {ctx.size} bytes")
    if ram.get("pages_never_sent"):
        raise fail("pc.ram has pages that were never sent")
    result.receiver_duration = manifest.get("duration_seconds")
    result.extra["bytes_received"] = manifest.get("bytes_received")
    result.extra["pages_with_data"] = ram.get("pages_with_data")
    result.extra["pages_zero"] = ram.get("pages_zero")
    image = receiver.output / ram["file"]
    if image.stat().st_size != ctx.size:
        raise fail(f"{image} is {image.stat().st_size} bytes")
    if verify:
        digest = sha256_file(image)
        if digest != ctx.backing_sha256:
            raise fail(f"captured pc.ram sha256 {digest} != backing file {ctx.backing_sha256}")
        result.verified = True


def _record_failure(result: RunResult, exc: Exception, run_dir: Path) -> None:
    result.ok = False
    text = f"{type(exc).__name__}: {exc}"
    (run_dir / "error.txt").write_text(text + "\n")
    result.error = text.splitlines()[0][:300] + f" (details: {run_dir / 'error.txt'})"


# --------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------


def _start_py_spy(pid: int, output: Path, run_dir: Path) -> subprocess.Popen[bytes]:
    """Attach ``py-spy record`` (raw collapsed stacks, busy samples only) to the receiver."""
    executable = shutil.which("py-spy")
    if executable is None:
        raise HarnessError("py-spy not found (pip install py-spy)")
    argv = [
        executable,
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(PY_SPY_RATE),
        "--format",
        "raw",
        "--output",
        str(output),
    ]
    with open(run_dir / "py-spy.log", "wb") as log:
        spy = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    time.sleep(1.0)  # let it attach and start sampling before the migration starts
    if spy.poll() is not None:
        raise HarnessError(f"py-spy exited with {spy.returncode}: {(run_dir / 'py-spy.log').read_text()[-2000:]}")
    return spy


def stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    """Wait for py-spy to write its output (it stops with its target); kill it if it does not."""
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(5)


def summarize_cprofile(path: Path, limit: int = 20) -> str:
    out = []
    for key in ("tottime", "cumulative"):
        stream = _Text()
        stats = pstats.Stats(str(path), stream=stream)
        stats.strip_dirs().sort_stats(key).print_stats(limit)
        text = stream.getvalue()
        # Keep the table, drop pstats' file banner.
        out.append(f"--- cProfile, top {limit} by {key} ---\n" + text[text.find("   ncalls") :].rstrip())
    return "\n".join(out)


class _Text:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def getvalue(self) -> str:
        return "".join(self.parts)


def summarize_py_spy(path: Path, limit: int = 20) -> str:
    """Self and inclusive shares per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "--- py-spy: no samples ---"
    lines = [
        (
            f"--- py-spy, {total} busy samples at {PY_SPY_RATE}/s (~{total / PY_SPY_RATE:.1f}s not waiting in epoll), "
            f"top {limit} by own samples ---"
        )
    ]
    lines += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in own.most_common(limit)]
    lines.append(f"--- py-spy, top {limit} by inclusive samples (frames in every sample left out) ---")
    below_root = [(frame, n) for frame, n in inclusive.most_common() if n < total]  # drop main()/reactor chain
    lines += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in below_root[:limit]]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def order_table(results: list[RunResult], channel_counts: list[int]) -> str:
    """Median wall time of each kind's runs by what ran just before them (the
    same kind or another), in the order the runs were made: on a machine
    where one kind of run disturbs the next (see docs/performance.md, "Order
    of runs"), the two columns differ. Extra (profiled) runs are left out."""
    after: dict[tuple[int, str, bool], list[float]] = collections.defaultdict(list)
    previous: str | None = None
    for result in results:
        if "pyspy" in result.kind or "cprofile" in result.kind:
            continue
        if previous is not None and result.ok and result.wall is not None:
            after[(result.channels, result.kind, previous == result.kind)].append(result.wall)
        previous = result.kind
    rows = [
        "| channels | kind | wall s after a run of the same kind: median (runs) | after a run of another kind: median (runs) |",
        "|---:|---|---:|---:|",
    ]
    for n in channel_counts:
        for kind in sorted({k for c, k, _ in after if c == n}):
            cells = []
            for same in (True, False):
                walls = after.get((n, kind, same), [])
                cells.append(f"{statistics.median(walls):.2f} ({len(walls)})" if walls else "—")
            rows.append(f"| {n} | {kind} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def _stats(values: list[float]) -> tuple[float, float, float] | None:
    return (statistics.median(values), min(values), max(values)) if values else None


def _fmt(stat: tuple[float, float, float] | None) -> str:
    return "—" if stat is None else f"{stat[0]:.2f} / {stat[1]:.2f} / {stat[2]:.2f}"


def _median_max(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} / {max(values):.0f}" if values else "—"


@dataclass
class WallComparison:
    """
    One channel count's runs of the baseline kind (a real QEMU) and of the
    kind measured against it, with what every summary table shows of them.
    """

    baseline: list[RunResult]
    measured: list[RunResult]
    baseline_wall: tuple[float, float, float] | None = field(init=False)
    """Median / min / max wall time of the baseline's ok runs."""
    measured_wall: tuple[float, float, float] | None = field(init=False)

    def __post_init__(self) -> None:
        self.baseline_wall = _stats([r.wall for r in self.baseline if r.ok and r.wall is not None])
        self.measured_wall = _stats([r.wall for r in self.measured if r.ok and r.wall is not None])

    @classmethod
    def of(cls, results: list[RunResult], channels: int, kind: str, baseline: str = "qemu") -> "WallComparison":
        return cls(
            [r for r in results if r.kind == baseline and r.channels == channels],
            [r for r in results if r.kind == kind and r.channels == channels],
        )

    @property
    def ratio(self) -> str:
        """The ratio of the medians: the issue's figure."""
        b, m = self.baseline_wall, self.measured_wall
        return f"{m[0] / b[0]:.2f}" if b and m else "—"

    @property
    def paired(self) -> str:
        return paired_ratio(self.baseline, self.measured)

    @property
    def ok_runs(self) -> str:
        return ", ".join(f"{sum(r.ok for r in runs)}/{len(runs)}" for runs in (self.baseline, self.measured))

    @property
    def max_other_cpu(self) -> str:
        other = [
            max((r.other_cpu_seconds for r in runs if r.other_cpu_seconds is not None), default=None)
            for runs in (self.baseline, self.measured)
        ]
        return ", ".join("—" if v is None else f"{v:.2f}" for v in other)


def paired_ratio(baseline: list[RunResult], measured: list[RunResult]) -> str:
    """
    The median (min–max) of the ratios of runs made back to back (same
    channel count and run number, both ok). The machine drifts over minutes;
    each pair ran within seconds of each other, so this shows what the
    ratio of medians can hide. The issue's figure stays the ratio of medians.
    """
    walls = {r.index: r.wall for r in baseline if r.ok and r.wall}
    ratios = [r.wall / walls[r.index] for r in measured if r.ok and r.wall and r.index in walls]
    if not ratios:
        return "—"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def summary_table(results: list[RunResult], channel_counts: list[int]) -> str:
    rows = [
        (
            "| channels | QEMU dest wall s (median / min / max) | ours wall s (median / min / max) | ours / QEMU "
            "(medians) | ours / QEMU per pair: median (min–max) | ours: source completed s (median) "
            "| receiver peak RSS MiB (median / max) | ok runs (QEMU, ours) | max other CPU s (QEMU, ours) |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in channel_counts:
        c = WallComparison.of(results, n, "ours")
        src = _stats([r.source_completed for r in c.measured if r.ok and r.source_completed is not None])
        rss = [r.destination_peak_rss_kib / 1024 for r in c.measured if r.ok and r.destination_peak_rss_kib]
        rows.append(
            f"| {n} | {_fmt(c.baseline_wall)} | {_fmt(c.measured_wall)} | {c.ratio} | {c.paired} "
            f"| {'—' if src is None else f'{src[0]:.2f}'} | {_median_max(rss)} "
            f"| {c.ok_runs} | {c.max_other_cpu} |"
        )
    return "\n".join(rows)


def floor_table(results: list[RunResult], channel_counts: list[int]) -> str:
    """The receiver against the floor sink (bench/floorsink.py) of the same rounds."""
    rows = [
        "| channels | floor sink wall s (median / min / max) | ours / floor (medians) | ours / floor per pair: "
        "median (min–max) | floor / QEMU (medians) | floor CPU s (median) | ours CPU s (median) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in channel_counts:
        ours = WallComparison.of(results, n, "ours", baseline="floor")
        floor = WallComparison.of(results, n, "floor")

        def cpu(runs: list[RunResult]) -> str:
            values = [r.destination_cpu_seconds for r in runs if r.ok and r.destination_cpu_seconds is not None]
            return f"{statistics.median(values):.2f}" if values else "—"

        rows.append(
            f"| {n} | {_fmt(ours.baseline_wall)} | {ours.ratio} | {ours.paired} | {floor.ratio} "
            f"| {cpu(ours.baseline)} | {cpu(ours.measured)} |"
        )
    return "\n".join(rows)


def write_results(json_path: Path, record: dict[str, Any], results: list[RunResult], runs_dir: Path) -> int:
    """
    Write a benchmark's JSON record, say where, and give its exit status:
    1 if any run failed, else 0.
    """
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"results: {json_path}")
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} run(s) FAILED; logs under {runs_dir}", file=sys.stderr)
        return 1
    return 0


def run_line(r: RunResult) -> str:
    def num(value: float | None, fmt: str = ".2f") -> str:
        return "—" if value is None else format(value, fmt)

    rss = None if r.destination_peak_rss_kib is None else r.destination_peak_rss_kib / 1024
    verified = {True: "sha256 ok", False: "sha256 BAD", None: ""}[r.verified]
    status = "ok" if r.ok else f"FAILED: {r.error}"
    return (
        f"| {r.kind} | {r.channels} | {r.index} | {num(r.wall)} | {num(r.source_completed)} | "
        f"{num(r.source_mbps, '.0f')} | {num(rss, '.0f')} | {num(r.destination_cpu_seconds)} | "
        f"{num(r.source_cpu_seconds)} | {num(r.other_cpu_seconds)} | {num(r.steal_seconds)} | "
        f"{num(r.quiet_wait_seconds, '.1f')} | {status} {verified}".rstrip()
        + " |"
    )


RUN_HEADER = (
    "| destination | channels | run | wall s | source completed s | source Mbit/s | dest peak RSS MiB "
    "| dest CPU s | source CPU s | other CPU s | steal s | quiet wait s | status |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def qemu_for(args: argparse.Namespace) -> QemuBinary | None:
    """The QEMU build of C{--qemu}, or L{None} (said on stderr) for bad options."""
    if args.runs < 1:
        print("--runs must be at least 1", file=sys.stderr)
        return None
    try:
        return find_qemu(args.qemu)
    except (HarnessError, ValueError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return None


def code_fact(version: dict[str, Any]) -> str:
    """The measured commit, as the "code" line of the machine facts."""
    return f"{version['commit']} {version['subject'][:60]!r}" + (
        " + uncommitted library changes" if version["library_uncommitted_changes"] else ""
    )


def bench_command(name: str) -> str:
    """The command line this benchmark was started with, as printed and recorded."""
    return f"python -m bench {name} " + " ".join(sys.argv[2:] if sys.argv[1:2] == [name] else sys.argv[1:])


def run(args: argparse.Namespace) -> int:
    qemu = qemu_for(args)
    if qemu is None:
        return 2
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    runs_dir = workdir / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    for stale in workdir.glob("capture-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    runs_dir.mkdir()

    facts = machine_facts(qemu)
    version = code_version()
    code_root, measured = snapshot_library(workdir)
    version["measured_fingerprint"] = measured
    facts["code"] = code_fact(version)
    if measured != version["library_fingerprint"]:
        facts["code"] += " (changed while starting; measured the copy taken just after)"
    command = bench_command("receive")
    print(f"command: {command}")
    for key, value in facts.items():
        print(f"{key}: {value}")
    print(f"guest RAM {args.size / 2**20:.0f} MiB, {args.memory}; channels {args.channels}; {args.runs} runs each")
    if args.floor:
        print(f"floor sink: {'recv_into + pwrite' if args.floor_copy else 'splice'}")

    backing, digest = ensure_backing_file(workdir, args.size, args.drop_caches, args.memory)
    ctx = Context(
        qemu, args.size, backing, digest, workdir, runs_dir, args.timeout, args.max_bandwidth, args.settle, code_root,
        args.capture_dir, args.floor_copy, memory_data_bytes(args.size, args.memory),
    )
    baseline = disk_baseline(ctx) if args.disk_baseline else None

    results: list[RunResult] = []
    print(f"\n{RUN_HEADER}", flush=True)
    for channels in args.channels:
        for index in range(1, args.runs + 1):
            verify = args.verify == "all" or (args.verify == "first" and index == 1)
            runs: list[Callable[[], RunResult]] = []
            if args.only != "ours":
                runs.append(functools.partial(run_qemu_destination, ctx, channels, index))
            if args.only != "qemu":
                runs.append(functools.partial(run_receiver, ctx, channels, index, verify=verify))
            if args.floor:
                runs.append(functools.partial(run_floor, ctx, channels, index))
            run_round(index, runs, results)

    profiles: dict[str, str] = {}
    for channels in args.profile:
        path = workdir / f"receiver-ch{channels}.prof"
        result = run_receiver(ctx, channels, 1, verify=False, profile=path)
        results.append(result)
        print(run_line(result), flush=True)
        if result.ok and path.exists():
            profiles[f"cprofile-ch{channels}"] = summarize_cprofile(path)
        elif result.ok:
            print(f"cProfile: the receiver wrote no profile ({path})", flush=True)
    for channels in args.py_spy:
        path = workdir / f"receiver-ch{channels}.pyspy.txt"
        result = run_receiver(ctx, channels, 1, verify=False, py_spy=path)
        results.append(result)
        print(run_line(result), flush=True)
        if result.ok and path.exists():
            profiles[f"py-spy-ch{channels}"] = summarize_py_spy(path)

    table = summary_table(results, args.channels)
    if args.floor:
        table += "\n\n" + floor_table(results, args.channels)
    table += "\n\n" + order_table(results, args.channels)
    version_after = code_version()
    if version_after["library_fingerprint"] != measured:
        print(
            f"note: twisted_multifd/ changed in the work tree during the benchmark "
            f"({version['commit']} -> {version_after['commit']}); every run used the copy in {code_root}",
            file=sys.stderr,
        )
    print(f"\n{table}\n")
    for name, text in profiles.items():
        print(f"{name} ({workdir})\n{text}\n")

    json_path = args.json or workdir / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {
        "command": command,
        "machine": facts,
        "code_before": version,
        "code_after": version_after,
        "size": args.size,
        "page_size": PAGE_SIZE,
        "max_bandwidth": args.max_bandwidth,
        "disk_baseline": baseline,
        "results": [asdict(r) for r in results],
        "table": table,
        "profiles": profiles,
    }
    return write_results(json_path, record, results, runs_dir)

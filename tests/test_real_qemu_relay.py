"""The ``relay`` CLI between real, unmodified QEMUs.

The first cases put :class:`qemu_harness.MainLastRelay` right after the
source, so the destination side sees every multifd channel before the main
channel: the order a real network produces when the main channel's ACK is
lost.

* Without our relay a QEMU 7.2 destination takes the first multifd channel
  for the main one, logs ``received packet magic 5145564d expected
  11223344`` and stays ``inmigrate``: the problem exists.
* With ``twisted-multifd relay --once`` between the reordering relay and the
  destination (TCP or Unix socket), QEMU 7.2 and 10.0 migrations with 4
  channels complete, the destination's memory equals the source's, and the
  guest runs after ``cont``.
* Behind a destination that reads slowly (and not at all for its first two
  seconds), the relay's resident memory stays bounded while it relays more
  than 64 MiB: the slow destination slows the source instead.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import qemu_harness
from qemu_harness import (
    LEGACY_WINDOW,
    MAIN_MAGIC,
    MIGRATION_TIMEOUT,
    MULTIFD_MAGIC,
    RAM_SIZE,
    HarnessError,
    MigrationSettings,
    QemuBinary,
    QemuLab,
    memory_mismatch,
    poll_until,
)

CHANNELS = 4
RELAY_EXIT_TIMEOUT = 30.0
"""How long the relay may take to see every connection closed after QEMU says completed."""

MAGIC_ERROR = "received packet magic 5145564d expected 11223344"
HANG_WAIT = 20.0
"""Bound on waiting for the 7.2 destination's magic error (it comes within a second)."""
STILL_INMIGRATE_FOR = 2.0
"""How long the 7.2 destination is watched staying ``inmigrate`` after the error."""


class RelayProcess(qemu_harness.RelayProcess):
    """The harness's relay process, with what these tests look at."""

    def memory_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in KiB from /proc/PID/status."""
        status = Path(f"/proc/{self.popen.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture
def start_relay(qemu_lab: QemuLab) -> Iterator[Callable[..., RelayProcess]]:
    """Starts our relay CLI; stops it after the test (before the lab's QEMUs)."""
    started: list[RelayProcess] = []

    def start(destination: str, channels: int, extra_args: Sequence[str] = ()) -> RelayProcess:
        relay = RelayProcess(f"relay{len(started)}", destination, channels, qemu_lab.log_dir, extra_args)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.close()


def _context(lab: QemuLab, relay: RelayProcess | None = None) -> Callable[[], str]:
    return lambda: "\n".join(filter(None, [lab.describe(), relay.describe() if relay else ""]))


# --------------------------------------------------------------------------
# The problem: a QEMU 7.2 destination hangs when the main channel comes last
# --------------------------------------------------------------------------


@pytest.mark.qemu
def test_qemu72_destination_hangs_when_main_connects_last(
    qemu_lab: QemuLab, require_qemu: Callable[[str], QemuBinary]
) -> None:
    qemu = require_qemu("7.2")
    settings = MigrationSettings(channels=CHANNELS)
    backing, _ = qemu_lab.backing_file()
    destination, address = qemu_lab.start_destination(qemu, settings)
    reorder = qemu_lab.start_relay(address, CHANNELS)
    source = qemu_lab.start_source(qemu, backing, settings)
    source.migrate(reorder.address)

    def magic_error() -> bool:
        if not destination.alive():
            raise HarnessError(f"the destination died\n{qemu_lab.describe()}")
        return MAGIC_ERROR in destination.stderr_path.read_text(errors="replace")

    poll_until(magic_error, HANG_WAIT, f"{MAGIC_ERROR!r} in the destination's stderr", qemu_lab.describe)
    deadline = time.monotonic() + STILL_INMIGRATE_FOR
    while time.monotonic() < deadline:
        status = destination.qmp.execute("query-status")["status"]
        assert status == "inmigrate", f"destination is {status}\n{qemu_lab.describe()}"
        time.sleep(0.1)
    # The 7.2 source stops answering QMP here (its multifd channels are never
    # read); kill it rather than wait for it to ignore SIGTERM.
    source.popen.kill()


# --------------------------------------------------------------------------
# The fix: our relay between the reordering network and the destination
# --------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("upstream", ["tcp", "unix"])
@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_relay_makes_main_last_migration_complete(
    version: str,
    upstream: str,
    qemu_lab: QemuLab,
    require_qemu: Callable[[str], QemuBinary],
    start_relay: Callable[..., RelayProcess],
) -> None:
    qemu = require_qemu(version)
    settings = MigrationSettings(channels=CHANNELS)
    backing, expected = qemu_lab.backing_file()
    uri = f"unix:{qemu_lab.socket_dir}/destination.sock" if upstream == "unix" else "tcp:127.0.0.1:0"
    destination, address = qemu_lab.start_destination(qemu, settings, uri=uri)
    relay = start_relay(address, CHANNELS)
    reorder = qemu_lab.start_relay(relay.wait_for_address(), CHANNELS)
    source = qemu_lab.start_source(qemu, backing, settings)
    context = _context(qemu_lab, relay)

    source.migrate(reorder.address)
    source.wait_migration(MIGRATION_TIMEOUT, context)
    destination.wait_migration(MIGRATION_TIMEOUT, context)
    returncode = relay.wait(RELAY_EXIT_TIMEOUT, context)
    assert returncode == 0, f"relay exited with {returncode}\n{context()}"
    log = relay.stderr()
    assert "relayed cleanly" in log and "Traceback" not in log, context()
    assert "connected the main channel, then multifd channels 0, 1, 2, 3" in log, context()
    # The reordering really happened: the main channel reached our relay last.
    assert max(reorder.connections, key=lambda c: c.upstream_index or 0).role.startswith("main"), context()

    memory = destination.pmemsave(qemu_lab.workdir / "destination-pmemsave.bin", RAM_SIZE)
    mismatch = memory_mismatch(backing.read_bytes(), memory, ignore=LEGACY_WINDOW, what="destination memory")
    assert mismatch is None, f"{mismatch}\n{context()}"
    assert memory_mismatch(expected, backing.read_bytes(), what="source backing file") is None

    destination.qmp.execute("cont")
    status = destination.qmp.execute("query-status")
    assert status["status"] == "running" and status["running"] is True, f"{status}\n{context()}"


# --------------------------------------------------------------------------
# Flow control: a slow destination slows the source, not the relay's memory
# --------------------------------------------------------------------------

STALL = 2.0
"""Seconds the slow destination reads nothing at all (like a stopped QEMU)."""
READ_SIZE = 64 * 1024
READ_INTERVAL = 0.005
"""Then it reads 64 KiB every 5 ms per connection: about 12 MiB/s each."""
RSS_GROWTH_LIMIT = 16 * 1024 * 1024
"""The relay's allowed growth in resident memory while relaying.

With flow control a relayed connection holds at most its transport's write
buffer (Twisted pauses the producer above 64 KiB, so up to about 64 KiB plus
one 64 KiB read) and, before its destination connection exists, one read of
early bytes: well under 1 MiB for five connections. (Between these plain
sockets the relay splices: the bytes stay in a 256 KiB kernel pipe per
direction and never enter its memory.) The rest of the limit is
room for the allocator and the interpreter. The source sends 64 MiB of pages
(random RAM: none is a zero page) far faster than the destination reads;
during the stall alone an unthrottled relay would hold tens of MiB more.
"""


class SlowDestination:
    """A Unix socket server that reads slowly and remembers what it got, per connection.

    A Unix socket rather than TCP: its buffers are a few hundred KiB and never
    autotuned, so what the relay cannot deliver stays with the relay or the
    source, not in tens of MiB of loopback TCP buffers.
    """

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.address = f"unix:{path}"
        self.heads: list[bytes] = []
        self.sizes: list[int] = []
        self.errors: list[str] = []
        self._start: float | None = None
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            if self._start is None:
                self._start = time.monotonic()
            index = len(self.sizes)
            self.heads.append(b"")
            self.sizes.append(0)
            thread = threading.Thread(target=self._read, args=(connection, index), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _read(self, connection: socket.socket, index: int) -> None:
        assert self._start is not None
        try:
            with connection:
                time.sleep(max(0.0, self._start + STALL - time.monotonic()))
                while chunk := connection.recv(READ_SIZE):
                    if len(self.heads[index]) < 64:
                        self.heads[index] = (self.heads[index] + chunk)[:64]
                    self.sizes[index] += len(chunk)
                    time.sleep(READ_INTERVAL)
        except OSError as exc:
            self.errors.append(f"connection {index}: {exc!r}")

    def join(self, timeout: float) -> None:
        for thread in list(self._threads):
            thread.join(timeout)

    def describe(self) -> str:
        return f"--- slow destination {self.address}: sizes {self.sizes}, errors {self.errors}"

    def close(self) -> None:
        self.listener.close()


class MemorySampler:
    """Samples a relay process's VmRSS and VmHWM every few ms, from a thread."""

    def __init__(self, relay: RelayProcess) -> None:
        self.relay = relay
        self.baseline, _ = relay.memory_kib()
        self.peak_rss = self.baseline
        self.hwm = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            try:
                rss, hwm = self.relay.memory_kib()
            except (OSError, KeyError, ValueError):
                return  # exited
            self.peak_rss = max(self.peak_rss, rss)
            self.hwm = hwm
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def describe(self) -> str:
        return (f"relay RSS: {self.baseline} KiB listening, peak sampled {self.peak_rss} KiB,"
                f" VmHWM {self.hwm} KiB ({self.samples} samples)")


@pytest.mark.qemu
def test_relay_memory_stays_bounded_behind_a_slow_destination(
    qemu_lab: QemuLab,
    require_qemu: Callable[[str], QemuBinary],
    start_relay: Callable[..., RelayProcess],
) -> None:
    qemu = require_qemu("7.2")
    settings = MigrationSettings(channels=CHANNELS)
    backing = qemu_lab.workdir / "random-ram.bin"
    backing.write_bytes(random.Random(0x5EED).randbytes(RAM_SIZE))
    slow = SlowDestination(qemu_lab.socket_dir / "slow.sock")
    try:
        relay = start_relay(slow.address, CHANNELS)
        address = relay.wait_for_address()
        source = qemu_lab.start_source(qemu, backing, settings)
        time.sleep(0.2)  # let the idle relay settle before taking its baseline
        sampler = MemorySampler(relay)

        def context() -> str:
            return f"{qemu_lab.describe()}\n{relay.describe()}\n{slow.describe()}\n{sampler.describe()}"

        started = time.monotonic()
        source.migrate(address)
        source.wait_migration(MIGRATION_TIMEOUT, context)
        source_done = time.monotonic() - started
        read_when_source_done = sum(slow.sizes)
        returncode = relay.wait(MIGRATION_TIMEOUT, context)
        relayed = time.monotonic() - started
        sampler.stop()
        slow.join(RELAY_EXIT_TIMEOUT)
    finally:
        slow.close()

    print(f"\n{sampler.describe()}; source completed after {source_done:.2f} s, when the destination had read"
          f" {read_when_source_done / 2**20:.1f} MiB; relay done after {relayed:.2f} s;"
          f" {sum(slow.sizes) / 2**20:.1f} MiB relayed")
    assert returncode == 0, f"relay exited with {returncode}\n{context()}"
    peak = max(sampler.peak_rss, sampler.hwm) * 1024
    growth = peak - sampler.baseline * 1024
    assert growth < RSS_GROWTH_LIMIT, f"relay grew by {growth / 2**20:.1f} MiB\n{context()}"
    # The source had to wait for the stalled, then slow, destination. Unthrottled, it is done in a
    # fraction of the stall. Throttled, only its own TCP buffers (4 MiB or so per connection) let it
    # finish before the destination has read everything.
    assert source_done > STALL, context()
    assert read_when_source_done > sum(slow.sizes) / 2, context()
    assert slow.errors == [], context()
    # Main channel connected first, then the multifd channels in id order.
    assert slow.heads[0][:4] == MAIN_MAGIC, context()
    assert [head[:4] for head in slow.heads[1:]] == [MULTIFD_MAGIC] * CHANNELS, context()
    assert [head[24] for head in slow.heads[1:]] == list(range(CHANNELS)), context()
    # Every byte the relay says it relayed reached the destination.
    report = re.search(r"bytes to destination/back: main (\d+)/0, " + ", ".join(
        rf"multifd {n} (\d+)/0" for n in range(CHANNELS)), relay.stderr())
    assert report is not None, context()
    assert [int(size) for size in report.groups()] == slow.sizes, context()
    assert sum(slow.sizes) > RAM_SIZE, context()

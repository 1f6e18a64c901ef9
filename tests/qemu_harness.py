"""Harness for tests and benchmarks that migrate real QEMU processes.

Everything here is synchronous (subprocesses, blocking sockets, threads) on
purpose: it drives the system under test from the outside, exactly like an
operator would, so it must not share a reactor with the library it checks.

The pieces:

* :func:`find_qemu` locates the QEMU builds installed by
  ``scripts/install-qemu.sh`` (7.2 from Debian 12, 10.0 unpacked into a
  private prefix) and knows which ``-L`` firmware directories each needs.
* :class:`QMPClient` is a tiny line-based QMP client; every error it raises
  quotes the QEMU process's stderr, because "connection closed" alone never
  explains why QEMU died.
* :class:`QemuVM` starts a source (never-run VM whose RAM is a pre-filled
  file, so the expected memory is known byte for byte) or a destination
  (``-incoming defer``) and drives migrations over QMP.
* :class:`ReceiverProcess` runs the ``python -m twisted_multifd receive`` CLI.
* :class:`MainLastRelay` sits between a source and a destination and
  reorders the connections so that every multifd channel reaches the
  destination before the main channel.
* :class:`QemuLab` owns all of the above for one test and tears everything
  down, so no QEMU outlives its test.

Every wait has a deadline and raises :class:`HarnessTimeout` with the state
of every process involved; nothing here can hang a CI job.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent

RAM_SIZE = 64 * 1024 * 1024
"""Guest RAM of every test VM: small enough to keep the whole matrix fast."""

PAGE_SIZE = 4096
"""x86_64 target page size (fixed, never sent on the wire)."""

LEGACY_WINDOW = (0xA0000, 0x100000)
"""Guest-physical range where ``pmemsave`` reads VGA/ROM/PAM-routed memory
instead of ``pc.ram``, so physical-memory dumps may differ from the RAMBlock
there."""

MULTIFD_MAGIC = (0x11223344).to_bytes(4, "big")
MAIN_MAGIC = b"QEVM"

DEFAULT_BACKING_SEED = 0x7466_6D64
QMP_TIMEOUT = 20.0
START_TIMEOUT = 20.0
MIGRATION_TIMEOUT = 90.0
POLL_INTERVAL = 0.02
STDERR_TAIL = 3000

QEMU72_DEFAULT = Path("/usr/bin/qemu-system-x86_64")
QEMU10_PREFIX_DEFAULT = Path("/opt/twisted-multifd/qemu-10.0")

_Part = TypeVar("_Part", bound="ManagedProcess | MainLastRelay")


class HarnessError(Exception):
    """A real-QEMU scenario failed; the message carries the processes' state."""


class HarnessTimeout(HarnessError):
    """A bounded wait ran out; raised instead of hanging the test run."""


class QemuUnavailable(HarnessError):
    """The requested QEMU build is not installed (tests skip on this)."""


class QMPError(HarnessError):
    """QEMU answered a QMP command with an error, or died while we waited."""


def _tail(path: Path, limit: int = STDERR_TAIL) -> str:
    """Last ``limit`` characters of a log file (the interesting end of it)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data[-limit:].decode("utf-8", "replace")
    return ("…" if len(data) > limit else "") + text


def poll_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    context: Callable[[], str],
    interval: float = POLL_INTERVAL,
) -> None:
    """Poll ``predicate`` until true; on timeout raise with ``context()``.

    Used only where no event exists to wait on (files appearing, QEMU's
    migration status), with a short interval so tests stay fast.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise HarnessTimeout(f"timed out after {timeout:.0f}s waiting for {what}\n{context()}")
        time.sleep(interval)


def parse_tcp_address(address: str) -> tuple[str, int]:
    """Split ``tcp:HOST:PORT`` (QEMU's URI syntax) into host and port."""
    match = re.fullmatch(r"tcp:(.+):(\d+)", address.strip())
    if match is None:
        raise ValueError(f"not a tcp:HOST:PORT address: {address!r}")
    return match.group(1), int(match.group(2))


# --------------------------------------------------------------------------
# Deterministic guest memory
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def backing_contents(size: int = RAM_SIZE, seed: int = DEFAULT_BACKING_SEED) -> bytes:
    """Deterministic guest RAM that exercises every way QEMU sends a page.

    About half the pages are zero (ZERO records on the main channel, or
    multifd ``zero_pages`` on 9.0+), the rest mixes incompressible random
    pages, short repeated patterns (very compressible, so zlib/zstd streams
    are exercised), and "almost zero" pages with a few non-zero bytes in
    random places (catches zero detection that only looks at part of a page).
    The first and last pages are non-zero to catch off-by-one block ends.
    Cached because every test of a run uses the same contents.
    """
    if size % PAGE_SIZE:
        raise ValueError("size must be a whole number of pages")
    rng = random.Random(seed)
    memory = bytearray(size)
    pages = size // PAGE_SIZE
    for page in range(pages):
        roll = rng.random()
        if page not in (0, pages - 1) and roll < 0.5:
            continue
        start = page * PAGE_SIZE
        if roll < 0.75:
            memory[start : start + PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
        elif roll < 0.92:
            pattern = rng.randbytes(rng.randint(1, 64)) or b"\x01"
            if not any(pattern):
                pattern = b"\xa5" + pattern[1:]
            repeated = pattern * (PAGE_SIZE // len(pattern) + 1)
            memory[start : start + PAGE_SIZE] = repeated[:PAGE_SIZE]
        else:
            for _ in range(rng.randint(1, 3)):
                memory[start + rng.randrange(PAGE_SIZE)] = rng.randint(1, 255)
    return bytes(memory)


def write_backing_file(path: Path, size: int = RAM_SIZE, seed: int = DEFAULT_BACKING_SEED) -> bytes:
    """Write :func:`backing_contents` to ``path`` and return the contents."""
    contents = backing_contents(size, seed)
    path.write_bytes(contents)
    return contents


def memory_mismatch(
    expected: bytes,
    actual: bytes,
    *,
    ignore: tuple[int, int] | None = None,
    what: str = "memory",
) -> str | None:
    """Describe how ``actual`` differs from ``expected``, or None if equal.

    Returns a short page-level summary instead of letting pytest diff 64 MiB.
    ``ignore`` is a half-open byte range left out of the comparison.
    """
    if len(actual) != len(expected):
        return f"{what}: size {len(actual)} != expected {len(expected)}"
    ranges = [(0, len(expected))]
    if ignore is not None:
        ranges = [(0, ignore[0]), (ignore[1], len(expected))]
    if all(expected[a:b] == actual[a:b] for a, b in ranges):
        return None
    bad: list[int] = []
    for a, b in ranges:
        for offset in range(a, b, PAGE_SIZE):
            end = min(offset + PAGE_SIZE, b)
            if expected[offset:end] != actual[offset:end]:
                bad.append(offset)
    zero_page = bytes(PAGE_SIZE)
    zeroed = sum(1 for off in bad if actual[off : off + PAGE_SIZE] == zero_page)
    shown = ", ".join(hex(off) for off in bad[:12])
    return (
        f"{what}: {len(bad)} of {len(expected) // PAGE_SIZE} pages differ "
        f"({zeroed} of them are all-zero in the actual image); first: {shown}"
    )


# --------------------------------------------------------------------------
# QEMU binaries
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class QemuBinary:
    """One installed QEMU build and the arguments it needs to find firmware."""

    label: str
    executable: Path
    data_dirs: tuple[Path, ...] = ()

    def base_argv(self) -> list[str]:
        """Executable plus ``-L`` firmware search directories."""
        argv = [str(self.executable)]
        for directory in self.data_dirs:
            argv += ["-L", str(directory)]
        return argv

    @property
    def version(self) -> tuple[int, int, int]:
        """(major, minor, micro) from ``--version``."""
        return _qemu_version(tuple(self.base_argv()))

    def __str__(self) -> str:
        return f"QEMU {'.'.join(map(str, self.version))} ({self.executable})"


@functools.cache
def _qemu_version(base_argv: tuple[str, ...]) -> tuple[int, int, int]:
    """Run ``--version`` once per build, not once per test."""
    out = subprocess.run([*base_argv, "--version"], capture_output=True, text=True, timeout=30, check=False)
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", out.stdout)
    if match is None:
        raise QemuUnavailable(f"{base_argv[0]} --version printed {out.stdout!r} {out.stderr!r}")
    return (int(match.group(1)), int(match.group(2)), int(match.group(3)))


def find_qemu(label: str) -> QemuBinary:
    """Locate the QEMU build named ``label`` ("7.2" or "10.0").

    Overrides: ``TMF_QEMU72`` is the path of a 7.2 ``qemu-system-x86_64``;
    ``TMF_QEMU10_PREFIX`` is the ``dpkg -x`` prefix of 10.0. The unpacked
    10.0 gets ``-L PREFIX/usr/share/qemu`` for its own ROMs and ``-L
    PREFIX/usr/share/seabios``, because the Debian ``qemu`` data dir holds no
    ``bios-256k.bin`` (the system package finds it through a compiled-in
    ``/usr/share/seabios`` path, which would otherwise pick up Debian 12's
    older SeaBIOS or nothing at all). Raises :class:`QemuUnavailable` if the
    build is missing or is not the version asked for.
    """
    if label == "7.2":
        binary = QemuBinary(label, Path(os.environ.get("TMF_QEMU72", QEMU72_DEFAULT)))
    elif label == "10.0":
        prefix = Path(os.environ.get("TMF_QEMU10_PREFIX", QEMU10_PREFIX_DEFAULT))
        data_dirs = tuple(d for d in (prefix / "usr/share/qemu", prefix / "usr/share/seabios") if d.is_dir())
        binary = QemuBinary(label, prefix / "usr/bin/qemu-system-x86_64", data_dirs)
    else:
        raise ValueError(f"unknown QEMU label {label!r}")
    if not os.access(binary.executable, os.X_OK):
        raise QemuUnavailable(f"QEMU {label} not installed at {binary.executable} (run scripts/install-qemu.sh)")
    major, minor, _ = binary.version
    if f"{major}.{minor}" != label:
        raise QemuUnavailable(f"{binary.executable} is QEMU {major}.{minor}, expected {label}")
    return binary


@functools.lru_cache(maxsize=1)
def accelerator() -> str:
    """``kvm`` when /dev/kvm can be opened read-write, else ``tcg``.

    The VMs never run a vCPU, so the accelerator only changes start-up time,
    but KVM is what production uses and what the captures were made with.
    """
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return "tcg"
    os.close(fd)
    return "kvm"


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


class ManagedProcess:
    """A child process whose output goes to log files, quotable in failures.

    Files rather than pipes, so a chatty child can never block on a full pipe
    and the whole log survives for post-mortem. Each child gets its own
    session so that killing it never touches anything else.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stdin: Any = subprocess.DEVNULL,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.argv = list(argv)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=stdin,
                stdout=out,
                stderr=err,
                env=env,
                cwd=cwd,
                pass_fds=pass_fds,
                start_new_session=True,
            )
        self.started = time.monotonic()

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def describe(self, settle: float = 0.0) -> str:
        """State and log tails; ``settle`` waits (bounded) for a dying child."""
        if settle and self.alive():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(settle)
        rc = self.popen.poll()
        age = time.monotonic() - self.started
        state = f"running for {age:.1f}s" if rc is None else f"exited with {rc}"
        lines = [f"--- {self.name} (pid {self.popen.pid}, {state}): {' '.join(self.argv)}"]
        for label, path in (("stderr", self.stderr_path), ("stdout", self.stdout_path)):
            text = _tail(path).rstrip()
            if text:
                lines.append(f"{label} tail:\n{text}")
            elif label == "stderr":
                lines.append("stderr: (empty)")
        return "\n".join(lines)

    def wait(self, timeout: float, context: Callable[[], str] | None = None) -> int:
        """Exit code, or :class:`HarnessTimeout` quoting ``context`` or our logs."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            detail = context() if context else self.describe()
            raise HarnessTimeout(f"{self.name} did not exit within {timeout:.0f}s\n{detail}") from None

    def close(self) -> None:
        """Terminate, then kill; always reaps the child."""
        if self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


class QMPClient:
    """Minimal synchronous QMP client (one JSON object per line).

    Events are skipped (kept in :attr:`events` for debugging); replies are
    matched by ``id``. ``context`` is called to explain failures, and it
    should quote the QEMU's stderr: a dead QEMU shows up here first.
    """

    def __init__(self, path: Path, context: Callable[[float], str], timeout: float = QMP_TIMEOUT) -> None:
        self.path = path
        self.context = context
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._events_taken = 0
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0

    def connect(self, alive: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        """Connect (QEMU creates the socket during start-up), negotiate."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            if not alive():
                raise QMPError(f"QEMU exited before its QMP socket came up\n{self.context(2.0)}")
            if time.monotonic() >= deadline:
                raise HarnessTimeout(f"QMP socket {self.path} not ready after {timeout:.0f}s\n{self.context(0)}")
            time.sleep(POLL_INTERVAL)
        self._sock = sock
        greeting = self._read_message(deadline, "the QMP greeting")
        if "QMP" not in greeting:
            raise QMPError(f"unexpected QMP greeting {greeting!r}\n{self.context(0)}")
        self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Run ``command`` and return its ``return`` value; raise on error."""
        if self._sock is None:
            raise QMPError(f"QMP not connected (command {command})")
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments is not None:
            request["arguments"] = arguments
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise QMPError(f"sending {command} failed: {exc!r}\n{self.context(2.0)}") from exc
        while True:
            message = self._read_message(deadline, f"the reply to {request}")
            if "event" in message:
                self.events.append(message)
                continue
            if message.get("id") != self._next_id:
                continue
            if "error" in message:
                error = message["error"]
                raise QMPError(
                    f"{command} {json.dumps(arguments)} failed: {error.get('class')}: {error.get('desc')}\n"
                    f"{self.context(0)}"
                )
            return message.get("return")

    def _read_message(self, deadline: float, what: str) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HarnessTimeout(f"QMP: no answer while waiting for {what}\n{self.context(0)}")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise QMPError(f"QMP connection failed while waiting for {what}: {exc!r}\n{self.context(2.0)}") from exc
            if not chunk:
                raise QMPError(f"QEMU closed QMP while we waited for {what}\n{self.context(2.0)}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QMPError(f"QMP sent a non-object {message!r}")
        return message

    def fileno(self) -> int:
        """The QMP socket, for ``select`` on several QEMUs at once."""
        if self._sock is None:
            raise QMPError("QMP not connected")
        return self._sock.fileno()

    def take_events(self) -> list[dict[str, Any]]:
        """Events not returned before, without blocking.

        Includes those that arrived while a command waited for its reply and
        whatever the socket holds now; call it when :meth:`fileno` is
        readable. Stray replies (none are outstanding here) are dropped.
        """
        if self._sock is None:
            raise QMPError("QMP not connected")
        while select.select([self._sock], [], [], 0)[0]:
            try:
                chunk = self._sock.recv(65536)
            except OSError as exc:
                raise QMPError(f"QMP connection failed while reading events: {exc!r}\n{self.context(2.0)}") from exc
            if not chunk:
                raise QMPError(f"QEMU closed QMP while we waited for events\n{self.context(2.0)}")
            self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            message = json.loads(line)
            if isinstance(message, dict) and "event" in message:
                self.events.append(message)
        fresh = self.events[self._events_taken :]
        self._events_taken = len(self.events)
        return fresh

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@dataclass(frozen=True)
class MigrationSettings:
    """Migration capabilities/parameters, set identically on both ends.

    ``channels == 0`` means the multifd capability stays off (a plain,
    single-connection migration); ``compression``/``zero_page_detection``
    of None leave QEMU's defaults alone.
    """

    channels: int = 0
    compression: str | None = None
    zero_page_detection: str | None = None
    events: bool = False
    """Turn on the ``events`` capability (MIGRATION status events over QMP)."""
    max_bandwidth: int | None = None
    """``max-bandwidth`` in bytes per second; None keeps QEMU's 128 MiB/s default."""
    tls_creds: str | None = None
    """``tls-creds``: the id of a ``tls-creds-x509`` object given to the VM (see :func:`tls_object_args`)."""

    def __post_init__(self) -> None:
        if self.channels < 0 or self.channels > 255:
            raise ValueError("multifd-channels is a uint8")
        if self.compression is not None and self.channels == 0:
            raise ValueError("multifd-compression needs multifd (channels > 0)")

    @property
    def label(self) -> str:
        parts = [f"mfd{self.channels}" if self.channels else "plain"]
        if self.compression:
            parts.append(self.compression)
        if self.zero_page_detection:
            parts.append(f"zpd-{self.zero_page_detection}")
        if self.tls_creds:
            parts.append("tls")
        return "-".join(parts)

    def apply(self, vm: QemuVM) -> None:
        """Send the QMP commands; must run before ``migrate``/``migrate-incoming``."""
        if self.zero_page_detection is not None and vm.binary.version < (9, 0, 0):
            raise ValueError(f"zero-page-detection needs QEMU 9.0+, not {vm.binary}")
        capabilities = []
        if self.channels:
            capabilities.append({"capability": "multifd", "state": True})
        if self.events:
            capabilities.append({"capability": "events", "state": True})
        if capabilities:
            vm.qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})
        parameters: dict[str, Any] = {}
        if self.channels:
            parameters["multifd-channels"] = self.channels
        if self.max_bandwidth is not None:
            parameters["max-bandwidth"] = self.max_bandwidth
        if self.compression is not None:
            parameters["multifd-compression"] = self.compression
        if self.zero_page_detection is not None:
            parameters["zero-page-detection"] = self.zero_page_detection
        if self.tls_creds is not None:
            parameters["tls-creds"] = self.tls_creds
        if parameters:
            vm.qmp.execute("migrate-set-parameters", parameters)


class QemuVM(ManagedProcess):
    """A QEMU process driven over QMP (source or destination of a migration).

    Always started with ``-S``: a source stays in prelaunch, so no vCPU ever
    touches its RAM (QEMU migrates a prelaunch VM fine, 7.2 and 10.0 alike),
    and a destination stays paused after the migration, so its memory is
    exactly what arrived.
    """

    def __init__(
        self,
        binary: QemuBinary,
        name: str,
        machine_args: Sequence[str],
        log_dir: Path,
        socket_dir: Path,
        machine: str = "pc",
        ram_size: int = RAM_SIZE,
    ) -> None:
        self.binary = binary
        self.machine = machine
        self.ram_size = ram_size
        qmp_path = socket_dir / f"{name}.qmp"
        argv = [
            *binary.base_argv(),
            "-no-user-config",
            "-nodefaults",
            "-display", "none",
            "-M", machine,
            "-accel", accelerator(),
            "-m", f"{ram_size // (1024 * 1024)}M",
            "-S",
            "-name", name,
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            *machine_args,
        ]  # fmt: skip
        super().__init__(name, argv, log_dir)
        self.qmp = QMPClient(qmp_path, self.describe)
        try:
            self.qmp.connect(self.alive)
        except BaseException:
            self.close()
            raise

    def describe(self, settle: float = 0.0) -> str:
        return f"{super().describe(settle)}\n(binary: {self.binary}, accel {accelerator()})"

    def machine_type(self) -> str:
        """The concrete machine type the stream will name (``-M pc`` is an alias)."""
        for entry in self.qmp.execute("query-machines"):
            if self.machine in (entry["name"], entry.get("alias")):
                return str(entry["name"])
        raise HarnessError(f"query-machines does not list {self.machine!r}\n{self.describe()}")

    def query_migrate(self) -> dict[str, Any]:
        info = self.qmp.execute("query-migrate")
        assert isinstance(info, dict)
        return info

    def migrate(self, uri: str) -> None:
        self.qmp.execute("migrate", {"uri": uri})

    def migrate_incoming(self, uri: str = "tcp:127.0.0.1:0") -> str:
        """Start listening; return the bound ``tcp:HOST:PORT`` (port 0 resolved).

        QEMU reports the real address in ``query-migrate``'s
        ``socket-address``, which lets tests use ephemeral ports. A
        ``unix:PATH`` uri gives ``unix:PATH`` back.
        """
        self.qmp.execute("migrate-incoming", {"uri": uri})
        for address in self.query_migrate().get("socket-address", []):
            if address.get("type") in ("inet", "tcp"):
                return f"tcp:{address['host']}:{address['port']}"
            if address.get("type") == "unix":
                return f"unix:{address['path']}"
        raise HarnessError(f"migrate-incoming {uri}: no tcp socket-address in query-migrate\n{self.describe()}")

    def wait_migration(
        self, timeout: float = MIGRATION_TIMEOUT, context: Callable[[], str] | None = None
    ) -> dict[str, Any]:
        """Poll ``query-migrate`` until ``completed``; raise on failure/timeout.

        Works on both ends (a destination reports its incoming status).
        ``context`` explains the other parties (receiver, relay) on failure.
        """
        detail = context or (lambda: self.describe())
        info: dict[str, Any] = {}

        def finished() -> bool:
            nonlocal info
            try:
                info = self.query_migrate()
            except QMPError as exc:
                # This QEMU died; the other parties' logs usually say why.
                raise HarnessError(f"{self.name} stopped answering QMP during migration\n{detail()}") from exc
            status = info.get("status")
            if status in ("failed", "cancelled"):
                raise HarnessError(
                    f"{self.name}: migration {status}: {info.get('error-desc', '(no error-desc)')}\n"
                    f"query-migrate: {json.dumps(info)}\n{detail()}"
                )
            return status == "completed"

        poll_until(
            finished,
            timeout,
            f"{self.name}'s migration to complete",
            lambda: f"last query-migrate: {json.dumps(info)}\n{detail()}",
        )
        return info

    def pmemsave(self, path: Path, size: int = RAM_SIZE, address: int = 0) -> bytes:
        """Guest-physical memory dump (through the address space, not pc.ram)."""
        self.qmp.execute("pmemsave", {"val": address, "size": size, "filename": str(path)}, timeout=60)
        return path.read_bytes()

    def load_from(self, uri: str) -> None:
        """``migrate-incoming`` from a URI QEMU reads rather than listens on
        (``exec:cat FILE``, ``file:FILE``); wait with :meth:`wait_migration`."""
        self.qmp.execute("migrate-incoming", {"uri": uri})

    def resume(self) -> dict[str, Any]:
        """``cont``, then the guest's ``query-status``."""
        self.qmp.execute("cont")
        status = self.qmp.execute("query-status")
        if not isinstance(status, dict):
            raise QMPError(f"query-status returned {status!r}")
        return status

    def close(self) -> None:
        self.qmp.close()
        super().close()


def source_machine_args(backing_file: Path, ram_size: int = RAM_SIZE) -> list[str]:
    """RAM from a pre-filled shared file, under the default RAMBlock name.

    With ``share=on`` QEMU maps the file itself, so the guest RAM *is* the
    file, and because the VM stays in prelaunch (``-S``) no vCPU ever writes
    to it: the migrated ``pc.ram`` must equal the file byte for byte. The
    backend id ``pc.ram`` keeps the RAMBlock name the destination expects.
    """
    return [
        "-object", f"memory-backend-file,id=pc.ram,size={ram_size},mem-path={backing_file},share=on",
        "-machine", "memory-backend=pc.ram",
    ]  # fmt: skip


def destination_machine_args(ram_size: int = RAM_SIZE, initial_ram: Path | None = None) -> list[str]:
    """Anonymous RAM named ``pc.ram``, matching :func:`source_machine_args`.

    With ``initial_ram`` (a file of ``ram_size`` bytes, see
    :func:`write_junk_file`) the RAM starts as a private copy of that file
    instead of zeros, so that a page the migration leaves alone shows.
    """
    backend = (
        f"memory-backend-ram,id=pc.ram,size={ram_size}"
        if initial_ram is None
        else f"memory-backend-file,id=pc.ram,size={ram_size},mem-path={initial_ram},share=off"
    )
    return [
        "-object", backend,
        "-machine", "memory-backend=pc.ram",
        "-incoming", "defer",
    ]  # fmt: skip


JUNK_BYTE = 0xA5
"""What :func:`write_junk_file` fills RAM with: not zero, and not a page QEMU would skip."""


@dataclass(frozen=True)
class TLSFiles:
    """PEM files from :func:`write_tls_credentials`.

    ``qemu_dir`` is a QEMU ``tls-creds-x509`` client directory (``ca-cert.pem``,
    ``client-cert.pem``, ``client-key.pem``); ``bare_qemu_dir`` holds only
    ``ca-cert.pem`` (a source without a client certificate); ``rogue_qemu_dir``
    a client certificate from another CA. The server certificate is valid for
    127.0.0.1 and localhost.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    qemu_dir: Path
    bare_qemu_dir: Path
    rogue_qemu_dir: Path


def write_tls_credentials(directory: Path) -> TLSFiles:
    """A throw-away CA, server and client certificates (``cryptography``)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def make_ca(common: str) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(common)).issuer_name(name(common))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        return key, cert

    def make_leaf(ca: tuple[Any, Any], common: str, server: bool) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(common)).issuer_name(ca[1].subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False,
                                         content_commitment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )  # fmt: skip
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return key, builder.sign(ca[0], hashes.SHA256())

    def write(path: Path, key: Any = None, cert: Any = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if key is not None:
            path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
            path.chmod(0o600)
        else:
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca = make_ca("twisted-multifd test CA")
    rogue = make_ca("some other CA")
    server = make_leaf(ca, "127.0.0.1", server=True)
    client = make_leaf(ca, "source", server=False)
    stranger = make_leaf(rogue, "stranger", server=False)
    files = TLSFiles(
        ca_cert=write(directory / "ca-cert.pem", cert=ca[1]),
        server_cert=write(directory / "server-cert.pem", cert=server[1]),
        server_key=write(directory / "server-key.pem", key=server[0]),
        qemu_dir=directory / "qemu-client",
        bare_qemu_dir=directory / "qemu-no-client-cert",
        rogue_qemu_dir=directory / "qemu-rogue-client",
    )
    for qemu_dir, leaf in ((files.qemu_dir, client), (files.bare_qemu_dir, None), (files.rogue_qemu_dir, stranger)):
        write(qemu_dir / "ca-cert.pem", cert=ca[1])
        if leaf is stranger:
            # QEMU checks its own certificate against ca-cert.pem at start: list both CAs.
            with open(qemu_dir / "ca-cert.pem", "ab") as bundle:
                bundle.write(rogue[1].public_bytes(serialization.Encoding.PEM))
        if leaf is not None:
            write(qemu_dir / "client-cert.pem", cert=leaf[1])
            write(qemu_dir / "client-key.pem", key=leaf[0])
    return files


def tls_object_args(qemu_dir: Path, creds_id: str = "tls0", verify_peer: bool = True) -> list[str]:
    """A source's ``-object tls-creds-x509`` (client end) for :attr:`MigrationSettings.tls_creds`."""
    verify = "on" if verify_peer else "off"
    return ["-object", f"tls-creds-x509,id={creds_id},dir={qemu_dir},endpoint=client,verify-peer={verify}"]


def write_junk_file(path: Path, size: int = RAM_SIZE) -> Path:
    """A RAM image that is non-zero everywhere, for ``initial_ram``."""
    path.write_bytes(bytes([JUNK_BYTE]) * size)
    return path


# --------------------------------------------------------------------------
# The receiver CLI under test
# --------------------------------------------------------------------------


def package_environment(root: Path) -> dict[str, str]:
    """Our environment, with the ``twisted_multifd`` package in ``root``
    first on the path and unbuffered output (logs as they happen)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class CommandProcess(ManagedProcess):
    """``python -m twisted_multifd ARGS`` (``send``, ``export``, ...), run as a user would.

    ``python_args`` go between the interpreter and ``-m twisted_multifd``
    (e.g. ``-m cProfile -o FILE``); ``root`` is the folder holding the
    ``twisted_multifd`` package to run (a frozen copy, say), first on the
    path and the working directory."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_dir: Path,
        root: Path = REPO_ROOT,
        python_args: Sequence[str] = (),
    ) -> None:
        argv = [sys.executable, *python_args, "-m", "twisted_multifd", *args]
        super().__init__(name, argv, log_dir, env=package_environment(root), cwd=root)


class ListeningProcess(CommandProcess):
    """A listening command (``receive``, ``relay``) on an ephemeral loopback
    port, which writes its address to ``--address-file``."""

    role = "command"

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_dir: Path,
        root: Path = REPO_ROOT,
        python_args: Sequence[str] = (),
    ) -> None:
        self.address_file = log_dir / f"{name}.address"
        command, *rest = args
        super().__init__(name, [
            command, "--listen", "tcp:0:interface=127.0.0.1", "--address-file", str(self.address_file), *rest,
        ], log_dir, root, python_args)  # fmt: skip

    def wait_for_address(self, timeout: float = START_TIMEOUT) -> str:
        """The ``tcp:127.0.0.1:PORT`` the process wrote once listening.

        Polls the file (there is no event to wait on) and fails fast, with
        the process's stderr, if it exits first.
        """
        address = ""

        def ready() -> bool:
            nonlocal address
            try:
                text = self.address_file.read_text().strip()
            except FileNotFoundError:
                text = ""
            if text and re.fullmatch(r"tcp:127\.0\.0\.1:[1-9]\d*", text):
                address = text
                return True
            if not self.alive():
                raise HarnessError(f"{self.role} exited before writing its address file\n{self.describe(1.0)}")
            return False

        poll_until(ready, timeout, f"{self.address_file} to hold the listening address", self.describe)
        return address


class ReceiverProcess(ListeningProcess):
    """``python -m twisted_multifd receive --once``, run as a user would
    (or, with ``once=False``, as a service: one sub-folder of ``output`` per
    migration)."""

    role = "receiver"

    def __init__(
        self,
        name: str,
        channels: int,
        output: Path,
        log_dir: Path,
        extra_args: Sequence[str] = (),
        python_args: Sequence[str] = (),
        root: Path = REPO_ROOT,
        once: bool = True,
    ) -> None:
        self.output = output
        self.once = once
        super().__init__(name, [
            "receive", "--channels", str(channels), "--output", str(output),
            *(["--once"] if once else []), *extra_args,
        ], log_dir, root, python_args)  # fmt: skip

    def manifest(self) -> dict[str, Any]:
        path = self.output / "manifest.json"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise HarnessError(f"cannot read {path}: {exc!r}\n{self.describe()}") from exc
        if not isinstance(manifest, dict):
            raise HarnessError(f"{path} is not a JSON object: {manifest!r}")
        return manifest


class RelayProcess(ListeningProcess):
    """``python -m twisted_multifd relay --once`` to ``destination``, run as a user would."""

    role = "relay"

    def __init__(
        self,
        name: str,
        destination: str,
        channels: int,
        log_dir: Path,
        extra_args: Sequence[str] = (),
        root: Path = REPO_ROOT,
    ) -> None:
        super().__init__(name, [
            "relay", "--to", destination, "--channels", str(channels), "--once", *extra_args,
        ], log_dir, root)  # fmt: skip


# --------------------------------------------------------------------------
# Main-last reordering relay
# --------------------------------------------------------------------------


@dataclass
class RelayedConnection:
    """Book-keeping for one source connection passing through the relay."""

    accept_index: int
    source: socket.socket
    role: str = "unclassified"
    upstream: socket.socket | None = None
    upstream_index: int | None = None
    to_upstream: int = 0
    to_source: int = 0
    errors: list[str] = field(default_factory=list)
    directions_done: int = 0
    first_data: threading.Event = field(default_factory=threading.Event)
    """TLS mode: set once the first application-data record has been let through."""

    def __str__(self) -> str:
        errors = f" errors={self.errors}" if self.errors else ""
        return (
            f"conn#{self.accept_index} {self.role} upstream#{self.upstream_index}: "
            f"{self.to_upstream} B source→dest, {self.to_source} B dest→source{errors}"
        )


class MainLastRelay:
    """TCP relay that delivers every multifd channel before the main channel.

    A real source always opens main first, so this is the only way to make a
    real QEMU produce the "all multifd before main" order a receiver must
    handle. It accepts all ``channels + 1`` connections, classifies them by
    peeking their first bytes (the multifd init magic; main is whatever is
    left, because 9.0+ sources and sometimes 7.2 keep main silent until
    every multifd channel is connected), connects upstream the multifd ones
    first, each with its already-buffered bytes forwarded, then main, and
    pipes both ways with correct half-closes until both sides are done.
    """

    BUFFER = 256 * 1024

    def __init__(self, upstream: str, channels: int, timeout: float = MIGRATION_TIMEOUT, tls: bool = False) -> None:
        """``tls``: the source migrates with ``tls-creds`` (TLS 1.2, as the
        receiver offers). A TLS source opens its multifd connections only once
        the main channel's handshake is through, so main is connected first;
        its application data (the first TLS record of type 23 on) is held back
        until every multifd channel has passed its first application record
        (the init packet) on: main's decrypted bytes come last."""
        self.upstream = parse_tcp_address(upstream)
        self.channels = channels
        self.timeout = timeout
        self.tls = tls
        self._main_gate = threading.Event()
        self.connections: list[RelayedConnection] = []
        self.errors: list[str] = []
        self._closing = False
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=channels + 8)
        self.address = f"tcp:127.0.0.1:{self._listener.getsockname()[1]}"
        self._spawn(self._run, "relay-setup")

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self) -> None:
        if self.tls:
            self._run_tls()
            return
        try:
            deadline = time.monotonic() + self.timeout
            self._accept_all(deadline)
            main, multifd = self._classify(deadline)
            for conn in [*multifd, main]:
                self._connect_upstream(conn)
        except Exception as exc:  # reported through describe(); the source then fails fast
            if not self._closing:
                self.errors.append(f"setup: {exc!r}")
            self.close()

    TLS_APPLICATION_DATA = 23

    def _run_tls(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout
            self._accept_all(deadline, connect=self._connect_upstream_tls)
            passed: list[threading.Event] = [c.first_data for c in self.connections[1:]]
            for event in passed:
                if not event.wait(max(deadline - time.monotonic(), 0.001)):
                    raise HarnessTimeout(f"multifd channels did not send their init packets: {self.describe()}")
            time.sleep(0.2)  # let the receiver read them before main's first byte
            self._main_gate.set()
        except Exception as exc:
            if not self._closing:
                self.errors.append(f"setup: {exc!r}")
            self.close()

    def _connect_upstream_tls(self, conn: RelayedConnection) -> None:
        upstream = socket.create_connection(self.upstream, timeout=self.timeout)
        for sock in (conn.source, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout)
        main = conn.accept_index == 0
        conn.role = "main (tls)" if main else "multifd (tls)"
        with self._lock:
            conn.upstream = upstream
            conn.upstream_index = conn.accept_index
        self._spawn(self._record_pump, f"relay-{conn.accept_index}-up", conn, main)
        self._spawn(self._pump, f"relay-{conn.accept_index}-down", conn, upstream, conn.source, "to_source")

    def _record_pump(self, conn: RelayedConnection, gated: bool) -> None:
        """Source → upstream, whole TLS records; the main channel waits at its
        first application-data record until ``_main_gate`` opens."""
        src, dst = conn.source, conn.upstream
        assert dst is not None
        buffer = b""
        try:
            while True:
                data = src.recv(self.BUFFER)
                if not data:
                    if buffer:
                        dst.sendall(buffer)
                    break
                buffer += data
                out = bytearray()
                while len(buffer) >= 5:
                    length = int.from_bytes(buffer[3:5], "big")
                    if len(buffer) < 5 + length:
                        break
                    if buffer[0] == self.TLS_APPLICATION_DATA and not conn.first_data.is_set():
                        if gated:
                            if out:
                                dst.sendall(bytes(out))
                                conn.to_upstream += len(out)
                                out.clear()
                            if not self._main_gate.wait(self.timeout):
                                raise HarnessTimeout("main channel held too long")
                        conn.first_data.set()
                    out += buffer[: 5 + length]
                    buffer = buffer[5 + length :]
                if out:
                    dst.sendall(bytes(out))
                    conn.to_upstream += len(out)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._direction_broke(conn, src, dst, "to_upstream", exc)
        finally:
            self._direction_done(conn, src, dst)

    def _accept_all(self, deadline: float, connect: Callable[[RelayedConnection], None] | None = None) -> None:
        for index in range(self.channels + 1):
            self._listener.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                raise HarnessTimeout(
                    f"relay accepted {index} of {self.channels + 1} connections before its deadline"
                ) from None
            except OSError:
                if self._closing:
                    return
                raise
            sock.setblocking(True)
            self.connections.append(RelayedConnection(index, sock))
            if connect is not None:
                connect(self.connections[-1])
        self._listener.close()

    def _classify(self, deadline: float) -> tuple[RelayedConnection, list[RelayedConnection]]:
        """Find the N multifd channels by magic; main is the one left over."""
        pending = list(self.connections)
        multifd: list[RelayedConnection] = []
        main: RelayedConnection | None = None
        while len(multifd) < self.channels:
            remaining = deadline - time.monotonic()
            if self._closing:
                raise HarnessError("relay closed while classifying connections")
            if remaining <= 0:
                raise HarnessTimeout(f"relay classified only {len(multifd)} multifd channels: {self.describe()}")
            readable, _, _ = select.select([c.source for c in pending], [], [], min(remaining, 0.5))
            partial = False
            for conn in [c for c in pending if c.source in readable]:
                head = conn.source.recv(4, socket.MSG_PEEK)
                if len(head) < 4:
                    if not head:
                        raise HarnessError(f"conn#{conn.accept_index} closed before sending a magic")
                    partial = True
                    continue
                if head == MULTIFD_MAGIC:
                    conn.role = "multifd"
                    multifd.append(conn)
                elif head == MAIN_MAGIC and main is None:
                    conn.role = "main"
                    main = conn
                else:
                    raise HarnessError(f"conn#{conn.accept_index} starts with unexpected bytes {head.hex()}")
                pending.remove(conn)
            if partial:
                time.sleep(0.001)  # a magic split across segments: select cannot wait for "more"
        if main is None:  # still silent (or no multifd at all): the one left over
            (main,) = [c for c in self.connections if c.role == "unclassified"]
            main.role = "main (silent)"
        return main, multifd

    def _connect_upstream(self, conn: RelayedConnection) -> None:
        upstream = socket.create_connection(self.upstream, timeout=self.timeout)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.source.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            conn.upstream = upstream
            conn.upstream_index = sum(1 for c in self.connections if c.upstream is not None) - 1
        # Forward what the source already sent before the next channel is connected,
        # so the receiver has this channel's init packet in hand before it sees main.
        conn.source.setblocking(False)
        try:
            buffered = conn.source.recv(self.BUFFER)
        except BlockingIOError:
            buffered = b""
        if buffered:
            upstream.sendall(buffered)
            conn.to_upstream += len(buffered)
        for sock in (conn.source, upstream):
            sock.settimeout(self.timeout)
        self._spawn(self._pump, f"relay-{conn.accept_index}-up", conn, conn.source, upstream, "to_upstream")
        self._spawn(self._pump, f"relay-{conn.accept_index}-down", conn, upstream, conn.source, "to_source")

    def _pump(self, conn: RelayedConnection, src: socket.socket, dst: socket.socket, counter: str) -> None:
        """Copy one direction; forward EOF as a half-close; close when both ended."""
        try:
            while True:
                data = src.recv(self.BUFFER)
                if not data:
                    break
                dst.sendall(data)
                setattr(conn, counter, getattr(conn, counter) + len(data))
            with contextlib.suppress(OSError):  # the peer already closed; nothing left to tell it
                dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._direction_broke(conn, src, dst, counter, exc)
        finally:
            self._direction_done(conn, src, dst)

    def _direction_broke(
        self, conn: RelayedConnection, src: socket.socket, dst: socket.socket, counter: str, exc: OSError
    ) -> None:
        if not self._closing:
            conn.errors.append(f"{counter}: {exc!r}")
        # One direction broke: wake the other one too instead of waiting out its timeout.
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _direction_done(self, conn: RelayedConnection, src: socket.socket, dst: socket.socket) -> None:
        with self._lock:
            conn.directions_done += 1
            both_done = conn.directions_done == 2
        if both_done:
            src.close()
            dst.close()

    def finished(self) -> bool:
        """True when every connection has been relayed to EOF both ways."""
        with self._lock:
            return len(self.connections) == self.channels + 1 and all(c.directions_done == 2 for c in self.connections)

    def describe(self) -> str:
        with self._lock:
            lines = [f"--- relay {self.address} → tcp:{self.upstream[0]}:{self.upstream[1]} (main last)"]
            lines += [f"  {conn}" for conn in self.connections]
            lines += [f"  error: {err}" for err in self.errors]
        return "\n".join(lines)

    def close(self) -> None:
        """Tear everything down; safe to call from any thread, repeatedly."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
        self._listener.close()
        for conn in list(self.connections):
            for sock in (conn.source, conn.upstream):
                if sock is None:
                    continue
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if threading.current_thread() in self._threads:
            return
        for thread in self._threads:
            thread.join(5)
        for conn in self.connections:
            conn.source.close()
            if conn.upstream is not None:
                conn.upstream.close()


# --------------------------------------------------------------------------
# One test's worth of processes
# --------------------------------------------------------------------------


class QemuLab:
    """Starts and owns every process/relay of one scenario; closes them all.

    Failure messages from any wait quote :meth:`describe`, i.e. every QEMU's
    and receiver's stderr tail plus the relay's per-connection byte counts,
    since a migration failure is usually explained by the *other* party.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_dir = workdir / "logs"
        # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="tmf-"))
        self._parts: list[ManagedProcess | MainLastRelay] = []

    def __enter__(self) -> QemuLab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def backing_file(self, name: str = "source-ram.bin") -> tuple[Path, bytes]:
        """A fresh copy of the deterministic RAM image, and its contents."""
        path = self.workdir / name
        return path, write_backing_file(path)

    def start_source(
        self,
        binary: QemuBinary,
        backing_file: Path,
        settings: MigrationSettings,
        name: str = "source",
        ram_size: int = RAM_SIZE,
        extra_args: Sequence[str] = (),
    ) -> QemuVM:
        """A never-started VM whose RAM is ``backing_file``, ready to ``migrate``.

        ``ram_size`` must be the size of ``backing_file``; ``extra_args`` are
        added to its command line (e.g. :func:`tls_object_args`).
        """
        vm = self._track(
            QemuVM(
                binary,
                name,
                [*source_machine_args(backing_file, ram_size), *extra_args],
                self.log_dir,
                self.socket_dir,
                ram_size=ram_size,
            )
        )
        settings.apply(vm)
        return vm

    def start_destination(
        self,
        binary: QemuBinary,
        settings: MigrationSettings,
        uri: str = "tcp:127.0.0.1:0",
        name: str = "destination",
        machine: str = "pc",
        ram_size: int = RAM_SIZE,
        initial_ram: Path | None = None,
    ) -> tuple[QemuVM, str]:
        """A ``-incoming defer`` QEMU listening on ``uri``; returns it and its address.

        ``machine`` lets a newer QEMU receive from an older one (e.g.
        ``pc-i440fx-7.2`` on 10.0); the default matches :meth:`start_source`.
        ``initial_ram``: see :func:`destination_machine_args`.
        """
        vm = self._track(
            QemuVM(
                binary,
                name,
                destination_machine_args(ram_size, initial_ram),
                self.log_dir,
                self.socket_dir,
                machine,
                ram_size,
            )
        )
        settings.apply(vm)
        return vm, vm.migrate_incoming(uri)

    def start_receiver(
        self,
        channels: int,
        output: Path,
        extra_args: Sequence[str] = (),
        name: str = "receiver",
        python_args: Sequence[str] = (),
        root: Path = REPO_ROOT,
        once: bool = True,
    ) -> ReceiverProcess:
        """With ``once=False`` a service: one sub-folder of ``output`` per migration."""
        return self._track(
            ReceiverProcess(name, channels, output, self.log_dir, extra_args, python_args, root, once=once)
        )

    def start_relay(self, upstream: str, channels: int, tls: bool = False) -> MainLastRelay:
        return self._track(MainLastRelay(upstream, channels, tls=tls))

    def start_loading_destination(
        self,
        binary: QemuBinary,
        uri: str,
        settings: MigrationSettings | None = None,
        name: str = "destination",
        machine: str = "pc",
        ram_size: int = RAM_SIZE,
        initial_ram: Path | None = None,
    ) -> QemuVM:
        """A ``-incoming defer`` QEMU loading a stream from ``uri``
        (``exec:cat FILE``, ``file:FILE``); wait with :meth:`destination_memory`.
        ``initial_ram``: see :func:`destination_machine_args`."""
        vm = self._track(
            QemuVM(
                binary,
                name,
                destination_machine_args(ram_size, initial_ram),
                self.log_dir,
                self.socket_dir,
                machine,
                ram_size,
            )
        )
        (settings or MigrationSettings()).apply(vm)
        vm.load_from(uri)
        return vm

    def start_command(self, args: Sequence[str], name: str) -> CommandProcess:
        """``python -m twisted_multifd ARGS``; its logs are quoted by :meth:`describe`."""
        return self._track(CommandProcess(name, args, self.log_dir))

    def migrate(self, source: QemuVM, uri: str, timeout: float = MIGRATION_TIMEOUT) -> dict[str, Any]:
        """Migrate ``source`` to ``uri`` and wait for ``completed``."""
        source.migrate(uri)
        return source.wait_migration(timeout, self.describe)

    def destination_memory(
        self, destination: QemuVM, size: int = RAM_SIZE, timeout: float = MIGRATION_TIMEOUT
    ) -> bytes:
        """Wait for the destination's incoming migration, then ``pmemsave``."""
        destination.wait_migration(timeout, self.describe)
        return destination.pmemsave(self.workdir / f"{destination.name}-pmemsave.bin", size)

    def describe(self) -> str:
        return "\n".join(part.describe() for part in self._parts) or "(nothing started)"

    def close(self) -> None:
        """Kill every process and relay (newest first), then remove sockets."""
        errors: list[str] = []
        for part in reversed(self._parts):
            try:
                part.close()
            except Exception as exc:  # keep tearing down the rest
                errors.append(f"{part}: {exc!r}")
        self._parts.clear()
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        if errors:
            raise HarnessError("teardown failed: " + "; ".join(errors))

    def _track(self, part: _Part) -> _Part:
        self._parts.append(part)
        return part

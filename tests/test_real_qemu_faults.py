"""
Faults with real processes (issue 5, item 3): a channel reset (RST), a full
and a read-only filesystem under the capture, a real QEMU source killed with
SIGKILL mid-migration, and the receiver stopped with SIGTERM mid-migration.

Each must end that migration with ``complete: false`` and a specific reason
in the manifest and the log; the receiver (a service, not ``--once``, except
for SIGTERM) keeps accepting: the next migration is complete and byte-exact;
a complete capture from before is untouched; the receiver process holds no
more fds than before the fault.

The reset and filesystem cases play recorded QEMU connections
(tests/captures.py) over loopback sockets; the filesystem cases mount a small
tmpfs (root only; skipped where ``mount`` is not allowed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_harness import (
    RAM_SIZE,
    MigrationSettings,
    QemuBinary,
    QemuLab,
    QemuVM,
    ReceiverProcess,
    memory_mismatch,
    parse_tcp_address,
    poll_until,
)

from captures import RecordedMigration, recorded

WAIT = 60.0
BIG_RAM = 512 * 1024 * 1024
SLOW = 64 * 1024 * 1024  # bytes per second: a 512 MiB migration takes about 8 s


# Helpers


def captures(root: Path) -> dict[int, Path]:
    """The service's capture folders by migration number."""
    found = {}
    for path in root.iterdir() if root.exists() else ():
        match = re.fullmatch(r".*-(\d+)", path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return found


def waitForManifest(receiver: ReceiverProcess, number: int, timeout: float = WAIT) -> dict[str, Any]:
    """The manifest of migration C{number} of a service receiver, once written."""
    manifest: dict[str, Any] = {}

    def written() -> bool:
        nonlocal manifest
        folder = captures(receiver.output).get(number)
        if folder is None or not (folder / "manifest.json").exists():
            assert receiver.alive(), receiver.describe()
            return False
        manifest = json.loads((folder / "manifest.json").read_text())
        return True

    poll_until(written, timeout, f"the manifest of migration {number}", receiver.describe)
    return manifest


def fdCount(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def assertNoLeakedFds(receiver: ReceiverProcess, baseline: int) -> None:
    """The receiver's fds go back to C{baseline} (connections are closed asynchronously)."""
    poll_until(lambda: fdCount(receiver.popen.pid) <= baseline, 15.0,
               f"the receiver's fds to go back to {baseline}",
               lambda: f"{fdCount(receiver.popen.pid)} fds: "
                       f"{sorted(os.readlink(f'/proc/{receiver.popen.pid}/fd/{fd}') for fd in os.listdir(f'/proc/{receiver.popen.pid}/fd'))}")


def treeDigest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def logOf(receiver: ReceiverProcess) -> str:
    return receiver.stderr_path.read_text(errors="replace")


def play(address: str, migration: RecordedMigration) -> None:
    """
    All of C{migration}'s connections, multifd channels first, each sent by
    its own thread (a channel may wait at a barrier for the main channel),
    then closed cleanly.
    """
    host, port = parse_tcp_address(address)
    sockets = [socket.create_connection((host, port)) for _ in migration.streams[1:]]
    sockets.append(socket.create_connection((host, port)))
    streams = [*migration.streams[1:], migration.streams[0]]
    errors: list[BaseException] = []

    def send(s: socket.socket, data: bytes) -> None:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=send, args=pair) for pair in zip(sockets, streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    for s in sockets:
        s.close()
    assert not errors, errors


def assertCompleteAndExact(folder: Path, manifest: dict[str, Any], memory: bytes) -> None:
    assert manifest["complete"] is True and manifest["error"] is None, manifest["error"]
    block = {b["name"]: b for b in manifest["ram_blocks"]}["pc.ram"]
    image = (folder / block["file"]).read_bytes()
    mismatch = memory_mismatch(memory, image, what="captured pc.ram")
    assert mismatch is None, mismatch


@contextlib.contextmanager
def tmpfs(path: Path, size: int, *options: str) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def remount(path: Path, *options: str) -> None:
    subprocess.run(["mount", "-o", ",".join(["remount", *options]), str(path)], check=True, capture_output=True)


def serviceWithOneCapture(qemu_lab: QemuLab, output: Path, migration: RecordedMigration
                          ) -> tuple[ReceiverProcess, str, dict[str, str], int]:
    """
    A service receiver that has received C{migration} once (complete):
    it, its address, the capture's digest, and its fd count after it.
    """
    receiver = qemu_lab.start_receiver(migration.channels, output, once=False)
    address = receiver.wait_for_address()
    play(address, migration)
    manifest = waitForManifest(receiver, 1)
    assertCompleteAndExact(captures(output)[1], manifest, migration.memory)
    return receiver, address, treeDigest(captures(output)[1]), fdCount(receiver.popen.pid)


def thenComplete(receiver: ReceiverProcess, address: str, migration: RecordedMigration, number: int,
                 before: dict[str, str], baseline: int) -> None:
    """After a fault: the next migration is complete, capture 1 untouched, no fd leaked."""
    play(address, migration)
    manifest = waitForManifest(receiver, number)
    assertCompleteAndExact(captures(receiver.output)[number], manifest, migration.memory)
    assert treeDigest(captures(receiver.output)[1]) == before
    assertNoLeakedFds(receiver, baseline)
    assert receiver.alive()


# A channel reset


@pytest.mark.parametrize("reset", ["main", "multifd", "all"])
def test_channelReset(qemu_lab: QemuLab, tmp_path: Path, reset: str) -> None:
    """
    Connections closed with SO_LINGER 0 (an RST) in the middle of the stream,
    once loading has started.
    """
    migration = recorded("cap72-4")
    receiver, address, before, baseline = serviceWithOneCapture(qemu_lab, tmp_path / "out", migration)
    host, port = parse_tcp_address(address)
    sockets = [socket.create_connection((host, port)) for _ in migration.streams]
    for s, stream in zip(sockets, migration.streams):
        s.sendall(stream[: len(stream) // 2 + 1001])
    poll_until(lambda: logOf(receiver).count("RAM blocks") >= 2, WAIT, "loading to start", receiver.describe)
    which = {"main": sockets[:1], "multifd": sockets[2:3], "all": sockets}[reset]
    for s in which:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    manifest = waitForManifest(receiver, 2)
    for s in sockets:
        s.close()
    assert manifest["complete"] is False
    error = manifest["error"]
    assert re.search(r"(main channel|multifd channel \d) from 127\.0\.0\.1", error), error
    assert "connection ended" in error and ("uncleanly" in error or "reset" in error or "lost" in error), error
    if reset == "main":
        assert "main channel" in error, error
    # The manifest is written before the log line that reports the end.
    poll_until(lambda: "migration 2 from 127.0.0.1: failed after" in logOf(receiver), WAIT,
               "the failure to be logged", receiver.describe)
    thenComplete(receiver, address, migration, 3, before, baseline)


# The disk full, or read-only


def test_diskFull(qemu_lab: QemuLab, tmp_path: Path) -> None:
    """
    The capture's filesystem fills up in the middle of the RAM: the manifest
    still says why (it is written into space reserved at the start); once
    there is room again the next migration is complete.
    """
    migration = recorded("cap72-4")
    output = tmp_path / "small"
    with tmpfs(output, 16 * 1024 * 1024):
        try:
            receiver, address, before, baseline = serviceWithOneCapture(qemu_lab, output, migration)
            used = os.statvfs(output)
            usedBytes = (used.f_blocks - used.f_bfree) * used.f_frsize
            # Room for the manifest reserve and a few pages, not the whole RAM.
            remount(output, f"size={usedBytes + 160 * 1024}")
            play(address, migration)
            manifest = waitForManifest(receiver, 2)
            assert manifest["complete"] is False
            assert re.fullmatch(r"capture \S+: writing \S+ failed: No space left on device \(errno 28\)",
                                manifest["error"]), manifest["error"]
            assert "No space left on device" in logOf(receiver)
            assert "Traceback" not in logOf(receiver)
            assert not list(output.rglob(".manifest.reserve")) and not list(output.rglob("*.tmp-*"))
            remount(output, f"size={64 * 1024 * 1024}")
            thenComplete(receiver, address, migration, 3, before, baseline)
        finally:
            qemu_lab.close()


def test_readOnlyOutput(qemu_lab: QemuLab, tmp_path: Path) -> None:
    """
    The output filesystem is read-only: each migration is refused with that
    reason in the log; once writable again, the next one is complete.
    """
    migration = recorded("cap72-1")
    output = tmp_path / "ro"
    with tmpfs(output, 16 * 1024 * 1024):
        try:
            receiver, address, before, baseline = serviceWithOneCapture(qemu_lab, output, migration)
            remount(output, "ro")
            host, port = parse_tcp_address(address)
            sockets = [socket.create_connection((host, port)) for _ in migration.streams]
            for s, stream in zip(sockets, migration.streams):
                with contextlib.suppress(OSError):
                    s.sendall(stream[:65536])
            poll_until(lambda: "Read-only file system" in logOf(receiver), WAIT, "the refusal", receiver.describe)
            for s in sockets:
                s.close()
            assert re.search(r"cannot store migration \d+ from 127\.0\.0\.1: capture \S+: writing the capture"
                             r" folder failed: Read-only file system", logOf(receiver)), logOf(receiver)
            assert "Traceback" not in logOf(receiver)
            remount(output, "rw")
            # The refused connections used migration numbers; the next capture is the highest.
            play(address, migration)
            poll_until(lambda: any((f / "manifest.json").exists() for n, f in captures(output).items() if n > 1),
                       WAIT, "the next capture", receiver.describe)
            number = max(captures(output))
            manifest = waitForManifest(receiver, number)
            assertCompleteAndExact(captures(output)[number], manifest, migration.memory)
            assert treeDigest(captures(output)[1]) == before
            assertNoLeakedFds(receiver, baseline)
        finally:
            qemu_lab.close()


# Real QEMU: the source killed, the receiver stopped


def randomBackingFile(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (16 * 1024 * 1024)):
            f.write(os.urandom(16 * 1024 * 1024))


def startBigSlowMigration(qemu_lab: QemuLab, qemu: QemuBinary, channels: int, address: str) -> QemuVM:
    """
    A 512 MiB VM of random memory migrating at 64 MiB/s to C{address}; returns
    once a good part (64 MiB) is sent and much more is to come.
    """
    backing = qemu_lab.workdir / "big-ram.bin"
    randomBackingFile(backing, BIG_RAM)
    source = qemu_lab.start_source(qemu, backing, MigrationSettings(channels=channels, max_bandwidth=SLOW),
                                   name="big-source", ram_size=BIG_RAM)
    source.migrate(address)
    info: dict[str, Any] = {}

    def midway() -> bool:
        nonlocal info
        info = source.query_migrate()
        assert info.get("status") in ("setup", "active", None), info
        return info.get("ram", {}).get("transferred", 0) >= 64 * 1024 * 1024

    poll_until(midway, WAIT, "the big migration to be under way", lambda: f"{info}\n{qemu_lab.describe()}")
    return source


def assertPartialImageIntact(folder: Path, manifest: dict[str, Any], backing: Path) -> None:
    """
    Every page of the failed capture's pc.ram image is either the source's
    page (random, so never zero) or a hole: nothing written is corrupt, and
    the manifest counts exactly the pages that arrived.
    """
    block = {b["name"]: b for b in manifest["ram_blocks"]}["pc.ram"]
    zero = bytes(4096)
    arrived = 0
    with open(folder / block["file"], "rb") as image, open(backing, "rb") as source:
        assert os.fstat(image.fileno()).st_size == BIG_RAM
        for page in range(BIG_RAM // 4096):
            got, want = image.read(4096), source.read(4096)
            if got != zero:
                assert got == want, f"page {page} of the failed capture is not the source's"
                arrived += 1
    assert 0 < arrived == block["pages_with_data"] < BIG_RAM // 4096


def smallMigration(qemu_lab: QemuLab, qemu: QemuBinary, channels: int, address: str, name: str) -> bytes:
    backing, expected = qemu_lab.backing_file(f"{name}-ram.bin")
    source = qemu_lab.start_source(qemu, backing, MigrationSettings(channels=channels), name=name)
    qemu_lab.migrate(source, address)
    source.close()
    return expected


@pytest.mark.qemu
@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_sourceKilledMidMigration(qemu_lab: QemuLab, require_qemu: Callable[[str], QemuBinary],
                                  tmp_path: Path, version: str) -> None:
    qemu = require_qemu(version)
    channels = 4
    output = tmp_path / "out"
    receiver = qemu_lab.start_receiver(channels, output, once=False)
    address = receiver.wait_for_address()
    expected = smallMigration(qemu_lab, qemu, channels, address, "first")
    first = waitForManifest(receiver, 1)
    assertCompleteAndExact(captures(output)[1], first, expected)
    before = treeDigest(captures(output)[1])
    baseline = fdCount(receiver.popen.pid)

    source = startBigSlowMigration(qemu_lab, qemu, channels, address)
    source.popen.kill()
    source.popen.wait(10)
    manifest = waitForManifest(receiver, 2)
    assert manifest["complete"] is False
    error = manifest["error"]
    assert re.search(r"(main channel|multifd channel \d) from 127\.0\.0\.1", error), error
    assert "connection ended" in error or "closed before reaching the sync point" in error, error
    # The manifest is written before the log line that reports the end.
    poll_until(lambda: "migration 2 from 127.0.0.1: failed after" in logOf(receiver), WAIT,
               "the failure to be logged", receiver.describe)
    # Part of the RAM arrived, and it is what the source had.
    assertPartialImageIntact(captures(output)[2], manifest, qemu_lab.workdir / "big-ram.bin")
    assertNoLeakedFds(receiver, baseline)

    expected = smallMigration(qemu_lab, qemu, channels, address, "after")
    manifest = waitForManifest(receiver, 3)
    assertCompleteAndExact(captures(output)[3], manifest, expected)
    assert treeDigest(captures(output)[1]) == before
    assertNoLeakedFds(receiver, baseline)
    assert receiver.alive()


@pytest.mark.qemu
def test_receiverStoppedMidMigration(qemu_lab: QemuLab, require_qemu: Callable[[str], QemuBinary],
                                     tmp_path: Path) -> None:
    """
    SIGTERM to a ``--once`` receiver while a real QEMU migrates into it: exit
    status 1, the manifest and the log say it was stopped; a fresh ``--once``
    receiver into the same folder then receives a migration completely.
    """
    qemu = require_qemu("10.0")
    channels = 2
    output = tmp_path / "capture"
    receiver = qemu_lab.start_receiver(channels, output)
    startBigSlowMigration(qemu_lab, qemu, channels, receiver.wait_for_address())
    receiver.popen.send_signal(signal.SIGTERM)
    assert receiver.wait(WAIT, qemu_lab.describe) == 1
    manifest = receiver.manifest()
    assert manifest["complete"] is False
    assert manifest["error"].endswith("the receiver was stopped"), manifest["error"]
    assert "failed after" in logOf(receiver) and "the receiver was stopped" in logOf(receiver)
    assert not (output / ".manifest.reserve").exists()
    assertPartialImageIntact(output, manifest, qemu_lab.workdir / "big-ram.bin")

    again = qemu_lab.start_receiver(channels, output, name="receiver-again")
    expected = smallMigration(qemu_lab, qemu, channels, again.wait_for_address(), "after")
    assert again.wait(WAIT, qemu_lab.describe) == 0
    assertCompleteAndExact(output, again.manifest(), expected)
    assert {b["name"]: b for b in again.manifest()["ram_blocks"]}["pc.ram"]["length"] == RAM_SIZE


@pytest.mark.qemu
def test_diskFullFromRealQemu(qemu_lab: QemuLab, require_qemu: Callable[[str], QemuBinary],
                              tmp_path: Path) -> None:
    """
    A real QEMU source migrating a 64 MiB VM (about 32 MiB of data) into an
    8 MiB filesystem: the migration fails with ENOSPC in the manifest, the
    source's migration fails rather than completing, and once the filesystem
    has room the service receives the next one completely.
    """
    qemu = require_qemu("10.0")
    channels = 2
    output = tmp_path / "small"
    with tmpfs(output, 8 * 1024 * 1024):
        try:
            receiver = qemu_lab.start_receiver(channels, output, once=False)
            address = receiver.wait_for_address()
            baseline = fdCount(receiver.popen.pid)
            backing, _ = qemu_lab.backing_file("full-ram.bin")
            source = qemu_lab.start_source(qemu, backing, MigrationSettings(channels=channels), name="full")
            source.migrate(address)
            manifest = waitForManifest(receiver, 1)
            assert manifest["complete"] is False
            assert re.fullmatch(r"capture \S+: writing ram/\S+ failed: No space left on device \(errno 28\)",
                                manifest["error"]), manifest["error"]
            assert "Traceback" not in logOf(receiver)
            with pytest.raises(Exception, match="failed|cancelled"):
                source.wait_migration(WAIT, qemu_lab.describe)
            source.close()
            assertNoLeakedFds(receiver, baseline)
            # An operator makes room; the failed capture stays as it is.
            failed = treeDigest(captures(output)[1])
            remount(output, f"size={128 * 1024 * 1024}")
            expected = smallMigration(qemu_lab, qemu, channels, address, "after")
            manifest = waitForManifest(receiver, 2)
            assertCompleteAndExact(captures(output)[2], manifest, expected)
            assert treeDigest(captures(output)[1]) == failed
            assertNoLeakedFds(receiver, baseline)
        finally:
            qemu_lab.close()

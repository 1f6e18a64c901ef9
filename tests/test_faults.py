"""
Faults while writing a capture (issue 5, item 3), in memory: the disk fills
up (ENOSPC simulated at the writer: pwrite, the images' fsync, the manifest
itself) or the output folder cannot be written. Each ends that migration as
failed, with the reason in the result, the manifest and the log; every image
fd is closed, the writeback thread joined, no timer left, no temporary file
left behind; a complete capture from before is untouched, and the next
migration into the same receiver is complete and byte-exact.

The same faults with real processes, sockets and filesystems are in
tests/test_real_qemu_faults.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from captures import recorded

from twisted_multifd import _capture
from twisted_multifd._capture import MANIFEST, CaptureWriter, captureIsComplete, writeFileAtomically
from twisted_multifd._receiver import MigrationReceiverFactory
from twisted_multifd.testing import MigrationPump

HOST = "192.0.2.1"


def openFds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fdPath(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def treeDigest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def writebackThreads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("twisted-multifd-writeback")]


class Receiver:
    """
    One receiver (service mode: a folder per migration) on a Clock.
    """

    def __init__(self, root: Path, channels: int) -> None:
        self.root = root
        self.clock = Clock()
        self.results: list[Any] = []
        self.writers: list[CaptureWriter] = []
        self.factory = MigrationReceiverFactory(
            self._sink, channels=channels, clock=self.clock, onMigrationEnded=self.results.append
        )

    def _sink(self, info: Any) -> CaptureWriter:
        writer = CaptureWriter(str(self.root / f"capture-{info.number}"))
        self.writers.append(writer)
        return writer

    def play(self, streams: Any) -> Any:
        before = len(self.results)
        MigrationPump(self.factory, streams, host=HOST, clock=self.clock).flush()
        assert len(self.results) == before + 1, self.results
        return self.results[-1]

    def folder(self, number: int) -> Path:
        return self.root / f"capture-{number}"

    def manifest(self, number: int) -> dict[str, Any]:
        return json.loads((self.folder(number) / MANIFEST).read_text())


def assertReleased(receiver: Receiver, fdsBefore: set[str]) -> None:
    """
    Nothing of an ended migration is left: fds, threads, timers, temporary files.
    """
    for writer in receiver.writers:
        assert all(image.fd == -1 for image in writer._images.values())
        assert writer._writeback._executor is None
        assert writer._reserve is None
    assert writebackThreads() == []
    assert receiver.clock.getDelayedCalls() == []
    assert receiver.factory.migrations == []
    assert openFds() <= fdsBefore, [fdPath(int(fd)) for fd in openFds() - fdsBefore]
    leftovers = [p for p in receiver.root.rglob("*") if ".tmp-" in p.name or p.name == _capture._RESERVE_NAME]
    assert leftovers == []


def assertCompleteAndExact(receiver: Receiver, number: int, name: str) -> None:
    result = receiver.results[-1]
    assert result.complete, result.error
    manifest = receiver.manifest(number)
    assert manifest["complete"] is True and manifest["error"] is None
    block = {b["name"]: b for b in manifest["ram_blocks"]}["pc.ram"]
    assert (receiver.folder(number) / block["file"]).read_bytes() == recorded(name).memory


@pytest.fixture
def smallWriteback(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Start background writeback after every few pages, so that the writeback
    thread runs in every test here and has to be joined on failure.
    """
    monkeypatch.setattr(_capture, "WRITEBACK_EVERY", 16 * 4096)


def failingAfter(monkeypatch: pytest.MonkeyPatch, name: str, calls: int, error: int = errno.ENOSPC,
                 only: str | None = None) -> dict[str, int]:
    """
    Make C{os.NAME} fail with C{error} from its C{calls}-th call on (counting
    only calls on an fd whose path contains C{only}, if given).
    """
    original = getattr(os, name)
    seen = {"calls": 0, "failed": 0}

    def fake(fd: int, *args: Any) -> Any:
        if only is None or only in fdPath(fd):
            seen["calls"] += 1
            if seen["calls"] >= calls:
                seen["failed"] += 1
                raise OSError(error, os.strerror(error))
        return original(fd, *args)

    monkeypatch.setattr(os, name, fake)
    return seen


@pytest.mark.parametrize("name", ["cap72-4", "cap10-4"])
def test_diskFullWhileWritingPages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smallWriteback: None,
                                   name: str) -> None:
    """
    ENOSPC from pwrite in the middle of the RAM: the migration fails saying
    which file and why, in the result, the manifest and the log; the
    complete capture before it is untouched; the next one is complete.
    """
    migration = recorded(name)
    receiver = Receiver(tmp_path, migration.channels)
    fds = openFds()
    receiver.play(migration.streams)
    assertCompleteAndExact(receiver, 1, name)
    before = treeDigest(receiver.folder(1))

    with monkeypatch.context() as patch:
        seen = failingAfter(patch, "pwrite", 3)
        with capturedLogs() as events:
            result = receiver.play(migration.streams)
    assert seen["failed"] == 1  # the first failure ends the migration
    assert not result.complete
    assert re.fullmatch(r"capture \S+/capture-2: writing ram/\S+\.img failed: No space left on device \(errno 28\)",
                        result.error), result.error
    manifest = receiver.manifest(2)
    assert manifest["complete"] is False and manifest["error"] == result.error
    assert not captureIsComplete(str(receiver.folder(2)))
    lines = [formatEvent(e) for e in events]
    assert any("failed after" in line and "No space left on device" in line for line in lines), lines
    assert not any(e.get("log_failure") for e in events), "an expected fault logs no traceback"
    assertReleased(receiver, fds)
    assert treeDigest(receiver.folder(1)) == before

    receiver.play(migration.streams)
    assertCompleteAndExact(receiver, 3, name)
    assertReleased(receiver, fds)
    assert treeDigest(receiver.folder(1)) == before


def test_diskFullAtTheImagesFsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smallWriteback: None) -> None:
    """
    Every byte arrived but the RAM images cannot be flushed: not complete,
    every image fd closed anyway (the first failing fsync does not leave the
    others open).
    """
    migration = recorded("cap72-4")
    receiver = Receiver(tmp_path, migration.channels)
    fds = openFds()
    with monkeypatch.context() as patch:
        seen = failingAfter(patch, "fsync", 1, errno.EIO, only=".img")
        result = receiver.play(migration.streams)
    assert seen["failed"] >= 2, "every image is closed, not only up to the first failure"
    assert not result.complete
    assert "storing the migration failed" in result.error
    assert "writing ram/" in result.error and "Input/output error" in result.error
    manifest = receiver.manifest(1)
    assert manifest["complete"] is False and "Input/output error" in manifest["error"]
    assertReleased(receiver, fds)

    receiver.play(migration.streams)
    assertCompleteAndExact(receiver, 2, "cap72-4")
    assertReleased(receiver, fds)


def test_diskFullWritingTheDeviceState(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    migration = recorded("cap10-1")
    receiver = Receiver(tmp_path, migration.channels)
    fds = openFds()
    with monkeypatch.context() as patch:
        failingAfter(patch, "fsync", 1, only="device-state.bin")
        result = receiver.play(migration.streams)
    assert not result.complete
    assert "writing device-state.bin failed: No space left on device" in result.error
    assert receiver.manifest(1)["complete"] is False
    assertReleased(receiver, fds)
    receiver.play(migration.streams)
    assertCompleteAndExact(receiver, 2, "cap10-1")


@pytest.mark.parametrize("reserve", [True, False], ids=["reserved", "no-reserve"])
def test_diskFullWritingTheManifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reserve: bool) -> None:
    """
    The wire says complete but the manifest cannot be written (into the
    reserved space, nor afresh): there is no manifest at all, so the capture
    reads as incomplete; no temporary file is left; the result says why.
    """
    migration = recorded("cap72-1")
    if not reserve:
        monkeypatch.setattr(_capture, "_reserveSpace", lambda path, size: False)
    receiver = Receiver(tmp_path, migration.channels)
    fds = openFds()
    with monkeypatch.context() as patch:
        failingAfter(patch, "fsync", 1, only="manifest")
        result = receiver.play(migration.streams)
    assert not result.complete
    assert "writing manifest.json failed: No space left on device" in result.error
    assert not (receiver.folder(1) / MANIFEST).exists()
    assert not captureIsComplete(str(receiver.folder(1)))
    assertReleased(receiver, fds)
    receiver.play(migration.streams)
    assertCompleteAndExact(receiver, 2, "cap72-1")


def test_manifestWrittenIntoTheReserve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The disk is full (a new manifest file cannot be written), yet the failed
    migration's manifest is written: into the space reserved when the
    capture began.
    """
    migration = recorded("cap72-1")
    receiver = Receiver(tmp_path, migration.channels)
    with monkeypatch.context() as patch:
        failingAfter(patch, "pwrite", 3)
        fresh = failingAfter(patch, "fsync", 1, only="manifest.json.tmp")
        result = receiver.play(migration.streams)
    assert fresh["calls"] == 0, "written into the reserve, not afresh"
    assert not result.complete and "No space left on device" in result.error
    assert receiver.manifest(1)["error"] == result.error
    assert not (receiver.folder(1) / _capture._RESERVE_NAME).exists()


def test_writeFileAtomicallyLeavesTheOldFile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "file.json"
    target.write_bytes(b"old")
    with monkeypatch.context() as patch:
        failingAfter(patch, "fsync", 1)
        with pytest.raises(OSError):
            writeFileAtomically(str(target), b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]


def test_unwritableOutput(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The capture folder cannot be created (read-only filesystem): the
    migration is refused with that reason and no traceback; the receiver
    goes on, and receives the next one once the folder can be written.
    """
    migration = recorded("cap72-1")
    receiver = Receiver(tmp_path, migration.channels)
    fds = openFds()
    real = os.makedirs

    def readOnly(path: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    with monkeypatch.context() as patch:
        patch.setattr(os, "makedirs", readOnly)
        with capturedLogs() as events:
            MigrationPump(receiver.factory, migration.streams, host=HOST, clock=receiver.clock).flush()
    assert receiver.results, "the refusal is reported"
    for result in receiver.results:
        assert not result.complete
        assert "writing the capture folder failed: Read-only file system" in result.error
    assert not any(e.get("log_failure") for e in events)
    assert receiver.clock.getDelayedCalls() == []
    assert openFds() <= fds
    assert os.makedirs is real
    refused = len(receiver.results)
    receiver.play(migration.streams)
    assertCompleteAndExact(receiver, refused + 1, "cap72-1")


def test_migrationEndedRunsOnce(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    migrationEnded runs once: a second call (a sink reused by mistake) does
    not rewrite the manifest.
    """
    migration = recorded("cap72-1")
    receiver = Receiver(tmp_path, migration.channels)
    result = receiver.play(migration.streams)
    assert result.complete
    manifest = (receiver.folder(1) / MANIFEST).read_bytes()
    receiver.writers[0].migrationEnded(result)
    assert (receiver.folder(1) / MANIFEST).read_bytes() == manifest

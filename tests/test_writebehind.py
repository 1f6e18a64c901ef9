"""
Pages written behind the receive: in a thread of their own, in the order
given, with a bound on what is queued, and buffers lent until written.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from twisted_multifd._capture import CaptureWriter
from twisted_multifd._errors import MigrationError
from twisted_multifd._incremental import IncrementalParser, LendableBuffer, View
from twisted_multifd._mainstream import RamBlock
from twisted_multifd._writebehind import WriteBehind, WriteFailed

PAGE = 4096


def test_writesHappenInOrderInAnotherThread() -> None:
    writer = WriteBehind()
    done: list[tuple[int, str]] = []
    for index in range(100):
        writer.submit(1, "log", lambda i=index: done.append((i, threading.current_thread().name)))
    writer.drain()
    writer.close()
    assert [i for i, _ in done] == list(range(100))
    assert {name for _, name in done} == {"twisted-multifd-writer"}


def test_submitWaitsWhileTooMuchIsQueued() -> None:
    """
    A write that would take the queued bytes over the limit waits until the
    writer has made room; one larger than the limit goes when the queue is
    empty.
    """
    writer = WriteBehind(limit=10)
    gate = threading.Event()
    writer.submit(8, "first", gate.wait)
    submitted = threading.Event()

    def second() -> None:
        writer.submit(8, "second", lambda: None)
        submitted.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not submitted.wait(0.2), "queued past the limit"
    gate.set()
    thread.join(10)
    assert submitted.is_set()
    writer.submit(100, "large", lambda: None)
    writer.drain()
    writer.close()


def test_aFailedWriteDropsTheRestAndIsRaised() -> None:
    writer = WriteBehind()
    ran: list[int] = []
    gate = threading.Event()

    def failing() -> None:
        gate.wait()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    lent = LendableBuffer(16)
    lent.lent = True
    writer.submit(1, "ram/pc.ram.img", failing)
    writer.submit(1, "ram/pc.ram.img", ran.append, 1, lent=lent)
    gate.set()
    with pytest.raises(WriteFailed) as caught:
        writer.drain()
    assert caught.value.what == "ram/pc.ram.img" and caught.value.error.errno == errno.ENOSPC
    assert ran == [] and not lent.lent, "dropped, and its buffer given back"
    again = LendableBuffer(16)
    again.lent = True
    with pytest.raises(WriteFailed):
        writer.submit(1, "ram/pc.ram.img", ran.append, 2, lent=again)
    assert ran == [] and not again.lent
    writer.close()


def test_aBugInAWriteDoesNotHangTheDrain() -> None:
    writer = WriteBehind()
    writer.submit(1, "x", lambda: 1 / 0)
    with pytest.raises(WriteFailed) as caught:
        writer.drain()
    assert isinstance(caught.value.error, ZeroDivisionError)
    writer.close()


def test_theParserDoesNotReuseALentBuffer() -> None:
    def views():
        while True:
            yield View(PAGE)

    parser = IncrementalParser(views())
    first = parser.directBuffer()
    assert first is not None
    first[:] = b"a" * PAGE
    parser.directFilled(PAGE)
    parser.nextEvent()
    lent = first.obj
    assert isinstance(lent, LendableBuffer)
    lent.lent = True
    second = parser.directBuffer()
    assert second is not None and second.obj is not lent
    second[:] = b"b" * PAGE
    parser.directFilled(PAGE)
    parser.nextEvent()
    assert bytes(lent[:PAGE]) == b"a" * PAGE, "the lent bytes stay as they were"
    lent.lent = False
    assert parser.directBuffer().obj is lent, "given back, it is received into again"


def test_captureKeepsCallersBytesAsTheyWereWhenCalled(tmp_path: Path) -> None:
    """
    A mutable buffer the caller reuses is copied; a lent buffer's view is
    kept (lent) until written, then given back; the image holds what was
    passed at the time of each call, in call order.
    """
    block = RamBlock("pc.ram", 4 * PAGE)
    writer = CaptureWriter(str(tmp_path / "capture"))
    writer.ramBlocks([block], PAGE)
    reused = bytearray(b"1" * PAGE)
    writer.writePages(block, [0], reused)
    reused[:] = b"2" * PAGE
    writer.writePages(block, [PAGE], memoryview(reused))
    lendable = LendableBuffer(2 * PAGE)
    lendable[:] = b"3" * (2 * PAGE)
    writer.writePages(block, [2 * PAGE, 3 * PAGE], memoryview(lendable).toreadonly())
    writer.writePages(block, [0], b"4" * PAGE)
    writer.zeroPages(block, [PAGE])
    writer._writer.drain()
    assert not lendable.lent
    image = (tmp_path / "capture" / "ram" / "pc.ram.img").read_bytes()
    assert image == b"4" * PAGE + bytes(PAGE) + b"3" * (2 * PAGE)


def test_captureReportsAFailedWriteOnTheNextCall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = RamBlock("pc.ram", 4 * PAGE)
    writer = CaptureWriter(str(tmp_path / "capture"))
    writer.ramBlocks([block], PAGE)

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    writer.writePages(block, [0], b"x" * PAGE)
    with pytest.raises(WriteFailed):
        writer._writer.drain()
    with pytest.raises(MigrationError, match=r"writing ram/pc.ram.img failed: No space left on device \(errno 28\)"):
        writer.writePages(block, [PAGE], b"y" * PAGE)

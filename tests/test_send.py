"""
``send`` and ``export`` without QEMU.

- Shape: the stream a capture is sent as is the stream QEMU sent. For the
  five recorded real migrations, the main channel we would send is byte for
  byte the recorded one, and the multifd packets carry the same pages.
- Round trips: a capture (of a recorded real migration, or of a synthetic one
  in either convention, multifd or plain) is sent over loopback TCP into our
  own receiver, in this process; the second capture's RAM images, device
  state and VMDESC are the first's.
- Flow control, connection order, closing, time-outs and early closes, in
  memory: a MemoryReactorClock and transports that push back like full
  socket buffers.
- Bad input: a capture that cannot be sent is refused with a clear message
  before anything connects.
- The command line: ``send`` into ``receive --once``, ``export`` to a file
  and to standard output, exit statuses.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import synthetic
from captures import CAPTURE_NAMES, recorded
from memorypump import pump
from twisted.internet import defer, endpoints
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twisted_multifd import CaptureWriter, MigrationReceiverFactory, _sender
from twisted_multifd._capturereader import CaptureError, loadCapture, readPageWindows
from twisted_multifd._export import exportCapture
from twisted_multifd._incremental import IncrementalParser
from twisted_multifd._initpacket import INIT_PACKET_SIZE, parseInitPacket
from twisted_multifd._mainstream import (
    Command,
    MainPage,
    MainZeroPage,
    MultiFDFlush,
    buildConfiguration,
    mainStream,
)
from twisted_multifd._packet import RamPacket, channelPackets
from twisted_multifd._sender import (
    MainBytes,
    PagePacket,
    SendError,
    chooseConventions,
    machineFlushMode,
    sendCapture,
    streamActions,
)

PAGE = 4096
REPO = Path(__file__).resolve().parent.parent


# Helpers


def receive(folder: Path, streams: tuple[bytes, ...] | list[bytes], channels: int) -> dict[str, Any]:
    """
    Receive a migration's connections (main first) into a capture, in memory.
    """
    results = []
    factory = MigrationReceiverFactory(
        lambda info: CaptureWriter(str(folder)), channels=channels, clock=Clock(), onMigrationEnded=results.append
    )
    pump(factory, list(streams), list(range(len(streams))))
    assert len(results) == 1, "the migration did not end"
    assert results[0].complete, results[0].error
    return json.loads((folder / "manifest.json").read_text())


def recordedCapture(folder: Path, name: str) -> Path:
    migration = recorded(name)
    receive(folder, migration.streams, migration.channels)
    return folder


def syntheticCapture(folder: Path, **buildArgs: Any) -> tuple[Path, synthetic.SyntheticMigration]:
    migration = synthetic.build(**buildArgs)
    receive(folder, migration.streams, migration.channels)
    return folder, migration


def images(folder: Path) -> dict[str, bytes]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {block["name"]: (folder / block["file"]).read_bytes() for block in manifest["ram_blocks"]}


def assertSameCapture(original: Path, copy: Path) -> None:
    """
    Same RAM (block by block, in the same order), device state, VMDESC and
    stream facts.
    """
    a = json.loads((original / "manifest.json").read_text())
    b = json.loads((copy / "manifest.json").read_text())
    assert b["complete"] is True, b["error"]
    assert [x["name"] for x in b["ram_blocks"]] == [x["name"] for x in a["ram_blocks"]]
    assert images(copy) == images(original)
    for x, y in zip(a["ram_blocks"], b["ram_blocks"]):
        assert y["length"] == x["length"]
        assert y["pages_with_data"] == x["pages_with_data"]
        assert y["pages_never_sent"] == 0
    assert (copy / "device-state.bin").read_bytes() == (original / "device-state.bin").read_bytes()
    assert b["device_state"] == a["device_state"]
    assert (copy / "vmdesc.json").read_bytes() == (original / "vmdesc.json").read_bytes()
    assert b["machine"] == a["machine"] and b["page_size"] == a["page_size"]
    for key in ("version", "configuration", "ram_section", "ram_total", "commands"):
        assert b["stream"][key] == a["stream"][key], key


async def sendIntoReceiver(
    capture: Path, output: Path, channels: int, unixSocket: Path | None = None, **sendArgs: Any
) -> Any:
    """
    Listen with our receiver on loopback TCP (or on C{unixSocket}), send the
    capture into it; both must end well. Returns the L{SendResult}.
    """
    from twisted.internet import reactor

    ended: defer.Deferred[Any] = defer.Deferred()
    factory = MigrationReceiverFactory(
        lambda info: CaptureWriter(str(output)), channels=channels, onMigrationEnded=ended.callback,
    )
    listen = "tcp:0:interface=127.0.0.1" if unixSocket is None else f"unix:{unixSocket}"
    port = await endpoints.serverFromString(reactor, listen).listen(factory)
    to = f"tcp:127.0.0.1:{port.getHost().port}" if unixSocket is None else f"unix:path={unixSocket}"
    try:
        result = await sendCapture(reactor, str(capture), to, channels=channels, progressInterval=None, **sendArgs)
        migration = await ended
    finally:
        await port.stopListening()
    assert migration.complete, migration.error
    return result


def mainEvents(data: bytes) -> list[Any]:
    parser = IncrementalParser(mainStream())
    parser.feed(data)
    parser.end()
    events = []
    while (event := parser.nextEvent()) is not None:
        events.append(event)
    return events


# The stream is QEMU's


@pytest.mark.parametrize("name", CAPTURE_NAMES)
def test_mainChannelIsByteForByteWhatQEMUSent(tmp_path, name):
    """
    With the capture's own conventions (channels, zero pages), the main
    channel we send is the one the real QEMU source sent, byte for byte, and
    the multifd packets carry the same pages (as sets per packet; QEMU's
    channel assignment and in-packet order are its threads').
    """
    migration = recorded(name)
    capture = loadCapture(str(recordedCapture(tmp_path, name)))
    conventions = chooseConventions(capture, zeroPages=capture.zeroPages)
    actions = list(streamActions(capture, conventions))
    main = b"".join(a.data for a in actions if isinstance(a, MainBytes))
    assert main == migration.streams[0]

    ours = sorted(
        (a.block, tuple(sorted(a.normalOffsets)), tuple(sorted(a.zeroOffsets)))
        for a in actions if isinstance(a, PagePacket)
    )
    theirs = []
    for stream in migration.streams[1:]:
        parser = IncrementalParser(channelPackets(PAGE))
        parser.feed(stream[INIT_PACKET_SIZE:])
        parser.end()
        while (event := parser.nextEvent()) is not None:
            if isinstance(event, RamPacket) and event.block is not None:
                theirs.append((event.block, tuple(sorted(event.normalOffsets)), tuple(sorted(event.zeroOffsets))))
    assert ours == sorted(theirs)


@pytest.mark.parametrize("name", ["cap72-1", "cap72-4", "cap10-1", "cap10-4"])
@pytest_twisted.ensureDeferred
async def test_sameBytesOnTheWireAsQEMU(tmp_path, name):
    """
    Sent with the capture's own conventions, the migration takes exactly as
    many bytes, over all connections, as the real source's did.
    """
    migration = recorded(name)
    capture = recordedCapture(tmp_path / "capture", name)
    manifest = json.loads((capture / "manifest.json").read_text())
    result = await sendIntoReceiver(
        capture, tmp_path / "copy", migration.channels, zeroPages=manifest["zero_pages"]
    )
    assert result.bytesSent == sum(len(s) for s in migration.streams)
    assertSameCapture(capture, tmp_path / "copy")


@pytest.mark.parametrize("channels", [1, 4])
@pytest_twisted.ensureDeferred
async def test_dataPagesGoFromTheImageToTheSockets(tmp_path, monkeypatch, channels):
    """
    64 MiB of data pages, far more than the sockets' buffers hold: windows
    of data pages go from the image file to the socket (C{os.sendfile}),
    what a socket does not take goes through its transport, and what
    arrives is the image, page for page. Windows with a zero page, or a page
    that only starts with a zero byte, go the other ways.
    """
    capture = recordedCapture(tmp_path / "capture", "cap10-4")
    manifest = json.loads((capture / "manifest.json").read_text())
    ram = next(block for block in manifest["ram_blocks"] if block["name"] == "pc.ram")
    content = bytearray(os.urandom(ram["length"]))
    # A zero page in the last window (earlier, it would shift every packet
    # after it off the windows: packets fill across windows, as QEMU's).
    content[-5 * PAGE : -4 * PAGE] = bytes(PAGE)
    content[130 * PAGE] = 0  # a data page that starts like a zero page
    content[300 * PAGE : 300 * PAGE + PAGE // 2] = bytes(PAGE // 2)
    (capture / ram["file"]).write_bytes(content)
    sent = []
    realSendfile = os.sendfile

    def sendfile(out: int, in_: int, offset: int, count: int) -> int:
        n = realSendfile(out, in_, offset, count)
        sent.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", sendfile)
    result = await sendIntoReceiver(capture, tmp_path / "copy", channels)
    assert images(tmp_path / "copy")["pc.ram"] == content
    pages = len(content) // PAGE
    assert result.pagesWithData == pages - 1 + sum(b["pages_with_data"] for b in manifest["ram_blocks"][1:])
    assert len(sent) > pages // 128 // 2  # most windows went from the file,
    assert sum(sent) < len(content)  # and some of their bytes through the transports


def test_directWritesOnlyToPlainSockets():
    """
    Only a reactor's own socket transport is written to directly; anything
    else (here an in-memory transport, as for TLS) gets everything through
    its write().
    """
    from twisted_multifd._sender import _after, _directSocket

    assert _directSocket(StringTransport()) is None
    assert _after((b"abc", b"defg"), 0) == (b"abc", b"defg")
    assert [bytes(p) for p in _after((b"abc", b"defg"), 2)] == [b"c", b"defg"]
    assert [bytes(p) for p in _after((b"abc", b"defg"), 5)] == [b"fg"]
    assert _after((b"abc", b"defg"), 7) == ()


# Round trips through our own receiver


ROUND_TRIPS = [(name, recorded(name).channels) for name in CAPTURE_NAMES] + [
    ("cap72-4", 1),
    ("cap72-1", 0),
    ("cap10-4", 2),
    ("cap10-1", 0),
]


@pytest.mark.parametrize("name,channels", ROUND_TRIPS)
@pytest_twisted.ensureDeferred
async def test_recordedCaptureRoundTrip(tmp_path, name, channels):
    capture = recordedCapture(tmp_path / "capture", name)
    original = loadCapture(str(capture))
    result = await sendIntoReceiver(capture, tmp_path / "copy", channels)
    assertSameCapture(capture, tmp_path / "copy")

    copy = json.loads((tmp_path / "copy" / "manifest.json").read_text())
    assert result.pages == original.totalPages == 16514
    assert result.pagesWithData == original.pagesWithData
    assert result.zeroPages == result.pages - result.pagesWithData
    assert result.conventions.channels == channels
    assert copy["channels"] == channels
    if channels:
        # The barriers of the capture's flush mode; zero pages on main.
        assert copy["flush_mode"] == (original.flushMode or machineFlushMode(original.machine or ""))
        assert copy["zero_pages"] == "main"
        assert copy["compression"] == (original.compression if original.channels else "none")
    else:
        assert copy["flush_mode"] is None
    assert copy["stream"]["commands"] == (["SWITCHOVER_START"] if name.startswith("cap10") else [])


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest_twisted.ensureDeferred
async def test_compressedRoundTrip(tmp_path, compression):
    capture = recordedCapture(tmp_path / "capture", "cap10-4")
    result = await sendIntoReceiver(capture, tmp_path / "copy", 3, compression=compression)
    assert result.conventions.compression == compression
    assert json.loads((tmp_path / "copy" / "manifest.json").read_text())["compression"] == compression
    assertSameCapture(capture, tmp_path / "copy")


@pytest_twisted.ensureDeferred
async def test_zeroPagesInPackets(tmp_path):
    capture = recordedCapture(tmp_path / "capture", "cap72-4")
    result = await sendIntoReceiver(capture, tmp_path / "copy", 2, zeroPages="multifd", flushMode="per-round")
    copy = json.loads((tmp_path / "copy" / "manifest.json").read_text())
    assert copy["zero_pages"] == "multifd" and copy["flush_mode"] == "per-round"
    assert result.conventions.zeroPages == "multifd"
    assertSameCapture(capture, tmp_path / "copy")


BIG_PAGES = {
    "pc.ram": b"".join(bytes(16384) if n % 3 == 0 else synthetic.samplePage(n, 16384) for n in range(70)),
    "pc.bios": synthetic.samplePage(99, 16384) + bytes(16384),
}

SYNTHETIC = [
    pytest.param({"convention": convention, "channels": channels}, id=f"{convention}-mfd{channels}")
    for convention in synthetic.CONVENTIONS
    for channels in (0, 1, 3)
] + [
    pytest.param({"convention": "10.0", "channels": 2, "compression": "zstd"}, id="10.0-mfd2-zstd"),
    pytest.param({"convention": "7.2", "channels": 2, "compression": "zlib"}, id="7.2-mfd2-zlib"),
    pytest.param({"convention": "10.0", "channels": 2, "zeroPagesOnMain": True}, id="10.0-mfd2-legacy-zero-pages"),
    pytest.param({"convention": "10.0", "channels": 2, "pageSize": 16384, "memory": BIG_PAGES}, id="10.0-mfd2-16k-pages"),
]


@pytest.mark.parametrize("buildArgs", SYNTHETIC)
@pytest.mark.parametrize("sendChannels", [None, 2])
@pytest_twisted.ensureDeferred
async def test_syntheticCaptureRoundTrip(tmp_path, buildArgs, sendChannels):
    """
    Synthetic migrations in both conventions (and plain), sent with their
    own channel count and with 2 channels.
    """
    capture, migration = syntheticCapture(tmp_path / "capture", **buildArgs)
    channels = migration.channels if sendChannels is None else sendChannels
    await sendIntoReceiver(capture, tmp_path / "copy", channels)
    assertSameCapture(capture, tmp_path / "copy")
    assert images(tmp_path / "copy") == migration.memory
    copy = json.loads((tmp_path / "copy" / "manifest.json").read_text())
    if channels:
        expected = "per-section" if buildArgs["convention"] == "7.2" else "per-round"
        assert copy["flush_mode"] == expected


def test_flushModeOfAPlainCaptureFollowsItsMachineType(tmp_path):
    """
    A plain capture says nothing about barriers: sent over multifd, it gets
    the flush mode its machine type makes the destination expect.
    """
    for machine, expected in (("pc-i440fx-7.2", "per-section"), ("pc-q35-8.0", "per-section"),
                              ("pc-i440fx-8.1", "per-round"), ("pc-i440fx-10.0", "per-round")):
        folder, _ = syntheticCapture(tmp_path / machine, channels=0, machine=machine, convention="10.0")
        conventions = chooseConventions(loadCapture(str(folder)), channels=2)
        assert conventions.flushMode == expected, machine
        assert conventions.zeroPages == "main"


def test_machineFlushMode():
    assert machineFlushMode("pc-i440fx-7.2") == "per-section"
    assert machineFlushMode("pc-q35-8.0") == "per-section"
    assert machineFlushMode("pc-q35-8.1") == "per-round"
    assert machineFlushMode("pc-i440fx-10.0") == "per-round"
    assert machineFlushMode("microvm") == "per-round"


# Export


@pytest.mark.parametrize("name", CAPTURE_NAMES)
def test_exportIsAPlainStream(tmp_path, name):
    """
    The exported file is a plain migration: PAGE and ZERO records only, no
    MULTIFD_FLUSH, SWITCHOVER_START only when the source sent it; received
    as a plain migration it gives back the same capture.
    """
    capture = recordedCapture(tmp_path / "capture", name)
    result = exportCapture(str(capture), str(tmp_path / "vm.mig"))
    data = (tmp_path / "vm.mig").read_bytes()
    assert result.size == len(data)
    assert result.pages == 16514
    assert result.switchoverStart == name.startswith("cap10")
    events = mainEvents(data)
    assert not any(isinstance(e, MultiFDFlush) for e in events)
    assert sum(isinstance(e, (MainPage, MainZeroPage)) for e in events) == 16514
    commands = [e.name for e in events if isinstance(e, Command)]
    assert commands == (["SWITCHOVER_START"] if name.startswith("cap10") else [])
    receive(tmp_path / "copy", [data], 0)
    assertSameCapture(capture, tmp_path / "copy")
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


@pytest.mark.parametrize("convention", synthetic.CONVENTIONS)
def test_exportSyntheticCapture(tmp_path, convention):
    capture, migration = syntheticCapture(tmp_path / "capture", convention=convention, channels=3)
    with open(tmp_path / "vm.mig", "wb") as f:
        exportCapture(loadCapture(str(capture)), f)
    receive(tmp_path / "copy", [(tmp_path / "vm.mig").read_bytes()], 0)
    assert images(tmp_path / "copy") == migration.memory
    assertSameCapture(capture, tmp_path / "copy")


def test_exportLeavesNothingBehindWhenReadingFails(tmp_path):
    capture = loadCapture(str(recordedCapture(tmp_path / "capture", "cap72-1")))
    os.unlink(capture.blocks[0].path)  # gone after it was checked
    with pytest.raises(CaptureError, match="pc.ram"):
        exportCapture(capture, str(tmp_path / "vm.mig"))
    assert sorted(os.listdir(tmp_path)) == ["capture"]


# Reading captures


def test_loadCapture(tmp_path):
    capture = loadCapture(str(recordedCapture(tmp_path, "cap10-4")))
    assert capture.complete and capture.problems == ()
    assert capture.machine == "pc-i440fx-10.0"
    assert capture.channels == 4
    assert capture.uuid == bytes(16)
    assert capture.flushMode == "per-round" and capture.zeroPages == "multifd"
    assert [b.name for b in capture.blocks][:3] == ["pc.ram", "/rom@etc/acpi/tables", "pc.bios"]
    assert capture.ramTotal == capture.stream.ramTotal == 0x4082000
    assert capture.totalPages == 16514
    assert capture.stream.configuration.machine == "pc-i440fx-10.0"
    assert (capture.stream.ramSectionID, capture.stream.ramInstanceID, capture.stream.ramVersion) == (1, 0, 4)
    assert capture.stream.commands == ("SWITCHOVER_START",)
    assert capture.deviceState.length == len(capture.readDeviceState()) == 12916
    assert len(capture.deviceState.sections) == 31
    assert json.loads(capture.readVMDesc())["page_size"] == 4096


def test_loadIncompleteCaptureLeniently(tmp_path):
    folder = recordedCapture(tmp_path, "cap72-1")
    editManifest(folder, complete=False, error="main channel: connection ended")
    capture = loadCapture(str(folder), strict=False)
    assert not capture.complete
    assert capture.error == "main channel: connection ended"
    assert any("not complete (main channel: connection ended)" in p for p in capture.problems)
    assert capture.blocks and capture.stream is not None


@pytest.mark.parametrize("seekData", [True, False])
def test_readPageWindows(tmp_path, seekData, monkeypatch):
    """
    Windows classify pages the same, with holes skipped (SEEK_DATA) or read.
    """
    import twisted_multifd._capturereader as reader

    if not seekData:
        monkeypatch.setattr(reader, "_seekData", lambda fd, position: None)
    pages = 300
    content = bytearray(pages * PAGE)
    for n in (0, 1, 5, 127, 128, 200, 299):
        content[n * PAGE + 17] = n % 250 + 1
    path = tmp_path / "image"
    with open(path, "wb") as f:
        f.truncate(len(content))
        for n in (0, 1, 5, 127, 128, 200, 299):  # sparse: data only there
            f.seek(n * PAGE)
            f.write(content[n * PAGE : (n + 1) * PAGE])
    block = reader.CaptureBlock("b", len(content), "image", str(path), 0, 0, 0)
    windows = list(readPageWindows(block, PAGE, 128))
    assert [(w.start, w.count) for w in windows] == [(0, 128), (128 * PAGE, 128), (256 * PAGE, 44)]
    normal = [o for w in windows for o in w.normalOffsets]
    zero = [o for w in windows for o in w.zeroOffsets]
    assert normal == [n * PAGE for n in (0, 1, 5, 127, 128, 200, 299)]
    assert sorted(normal + zero) == list(range(0, len(content), PAGE))
    assert b"".join(w.data for w in windows) == b"".join(
        bytes(content[o : o + PAGE]) for o in normal
    )


def _sparseImage(path: Path, length: int, dataRanges: list[tuple[int, int]]) -> bytes:
    """
    Write a sparse image of C{length} bytes, random in C{dataRanges} (byte
    ranges) and holes elsewhere, as our receiver leaves them; its content.
    """
    content = bytearray(length)
    with open(path, "wb") as f:
        f.truncate(length)
        for start, end in dataRanges:
            content[start:end] = os.urandom(end - start)
            f.seek(start)
            f.write(content[start:end])
    return bytes(content)


def _countPreads(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[tuple[int, int]]:
    """
    Record (offset, size) of every os.pread of the file at C{path}.
    """
    reads: list[tuple[int, int]] = []
    realPread = os.pread
    target = os.path.realpath(path)

    def pread(fd: int, size: int, offset: int) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}") == target:
            reads.append((offset, size))
        return realPread(fd, size, offset)

    monkeypatch.setattr(os, "pread", pread)
    return reads


WINDOW = 128 * PAGE


def test_readPageWindowsDoesNotReadDataExtents(tmp_path, monkeypatch):
    """
    Windows wholly inside a data extent are all data pages and are not read
    (their data is read when asked, exact); a window with data and holes is
    read and its zero pages found; C{readData} reads every window with data.
    """
    import twisted_multifd._capturereader as reader

    path = tmp_path / "image"
    ranges = [(0, 2 * WINDOW), (3 * WINDOW + PAGE, 3 * WINDOW + 5 * PAGE)]
    content = _sparseImage(path, 4 * WINDOW, ranges)
    block = reader.CaptureBlock("b", len(content), "image", str(path), 0, 0, 0)
    reads = _countPreads(monkeypatch, path)
    windows = list(readPageWindows(block, PAGE, 128))
    assert reads == [(3 * WINDOW, WINDOW)]
    assert [w.payload is None for w in windows] == [True, True, False, False]
    assert windows[2].normalOffsets == () and windows[2].payload == b""
    assert windows[3].normalOffsets == tuple(range(3 * WINDOW + PAGE, 3 * WINDOW + 5 * PAGE, PAGE))
    assert len(windows[3].zeroOffsets) == 124
    assert reads == [(3 * WINDOW, WINDOW)]
    # Read when asked, while the reader is open; not after.
    lazy = list(readPageWindows(block, PAGE, 128))[:2]
    assert [w.normalOffsets for w in lazy] == [tuple(range(0, WINDOW, PAGE)), tuple(range(WINDOW, 2 * WINDOW, PAGE))]
    with pytest.raises(CaptureError, match="read after its reader was done"):
        _ = lazy[0].data
    iterator = readPageWindows(block, PAGE, 128)
    first = next(iterator)
    assert first.size == WINDOW and first.data == content[:WINDOW]
    iterator.close()
    # readData: every window with data is read, as before.
    del reads[:]
    windows = list(readPageWindows(block, PAGE, 128, readData=True))
    assert reads == [(0, WINDOW), (WINDOW, WINDOW), (3 * WINDOW, WINDOW)]
    assert windows[0].payload == content[:WINDOW] and windows[1].payload == content[WINDOW : 2 * WINDOW]


def test_readPageWindowsReadsAnImageWithoutHoles(tmp_path):
    """
    An image whose manifest counts zero pages but that has no hole (copied
    without keeping it sparse) has them written as zeros: extents cannot
    tell them, so its windows are read and its zero pages found.
    """
    import twisted_multifd._capturereader as reader

    content = bytearray(os.urandom(2 * WINDOW))
    content[5 * PAGE : 6 * PAGE] = bytes(PAGE)
    path = tmp_path / "image"
    path.write_bytes(content)
    block = reader.CaptureBlock("b", len(content), "image", str(path), 255, 1, 0)
    windows = list(readPageWindows(block, PAGE, 128))
    assert [w.zeroOffsets for w in windows] == [(5 * PAGE,), ()]
    assert [w.payload is not None for w in windows] == [True, True]
    assert b"".join(w.data for w in windows) == bytes(content[: 5 * PAGE] + content[6 * PAGE :])


def _sparseRAM(capture: Path) -> tuple[Path, bytes, int]:
    """
    Replace the capture's pc.ram image with a sparse one: 50 windows of
    random data pages (10 and 40 in a row) and a last window of 64 data
    pages and 64 holes. Its path, content and the bytes of whole data windows.
    """
    manifest = json.loads((capture / "manifest.json").read_text())
    ram = next(block for block in manifest["ram_blocks"] if block["name"] == "pc.ram")
    path = capture / ram["file"]
    ranges = [(0, 10 * WINDOW), (40 * WINDOW, 80 * WINDOW), (100 * WINDOW, 100 * WINDOW + 64 * PAGE)]
    content = _sparseImage(path, ram["length"], ranges)
    return path, content, 50 * WINDOW


@pytest.mark.parametrize("channels", [1, 3])
@pytest_twisted.ensureDeferred
async def test_dataExtentsGoToTheSocketsUnread(tmp_path, monkeypatch, channels):
    """
    Windows inside the image's data extents go from the file to the socket
    without being read: what a socket does not take of one follows from
    the file once the socket has room. The window with holes is read;
    of the others, every byte is sent from the file or (rarely: see
    test_restOfAWindowGoesFromTheFileOnceThereIsRoom) read, once. What
    arrives is the image, page for page.
    """
    capture = recordedCapture(tmp_path / "capture", "cap10-4")
    path, content, wholeWindows = _sparseRAM(capture)
    sent = _recordSendfiles(monkeypatch)
    reads = _countPreads(monkeypatch, path)
    result = await sendIntoReceiver(capture, tmp_path / "copy", channels)
    assert images(tmp_path / "copy")["pc.ram"] == content
    assert (100 * WINDOW, WINDOW) in reads
    read = [(offset, size) for offset, size in reads if (offset, size) != (100 * WINDOW, WINDOW)]
    fromFile = [(offset, n) for offset, count, n in sent if n > 0]
    assert _pieces(fromFile + read) == [(0, 10 * WINDOW), (40 * WINDOW, 80 * WINDOW)]
    assert sum(n for offset, n in fromFile) >= 0.9 * wholeWindows
    # The sockets were full at times: windows went in more than one piece.
    assert any(offset % WINDOW for offset, count, n in sent)
    assert result.pagesWithData >= 50 * 128 + 64


def _recordSendfiles(
    monkeypatch: pytest.MonkeyPatch, before: Any = None, limit: Any = None
) -> list[tuple[int, int, int]]:
    """
    Record (offset, count, bytes sent) of every os.sendfile. C{before} is
    called with its offset first; C{limit(offset, count)}, if given, is the
    most it may send (as a socket with less room would).
    """
    sent: list[tuple[int, int, int]] = []
    realSendfile = os.sendfile

    def sendfile(out: int, in_: int, offset: int, count: int) -> int:
        if before is not None:
            before(offset)
        n = realSendfile(out, in_, offset, count if limit is None else limit(offset, count))
        sent.append((offset, count, n))
        return n

    monkeypatch.setattr(os, "sendfile", sendfile)
    return sent


@pytest.mark.parametrize("over,cpus", [("tcp", 64), ("tcp", 2), ("unix", 64)])
@pytest_twisted.ensureDeferred
async def test_littleLeftUnsentInLoopbackSockets(tmp_path, monkeypatch, over, cpus):
    """
    Multifd sockets to a destination on this host keep at most
    LOCAL_NOTSENT_LOWAT bytes unsent (TCP_NOTSENT_LOWAT), so that our
    bytes are sent by our own writes, not by the destination's ACKs on its
    CPU, if we have a CPU beside its receive threads (one per channel); the
    main channel, and UNIX sockets, are left as they are.
    """
    from twisted_multifd._sender import LOCAL_NOTSENT_LOWAT, _Connection

    monkeypatch.setattr(_sender, "_usableCPUs", lambda: cpus)
    capture = recordedCapture(tmp_path / "capture", "cap10-4")
    lowats: dict[str, int] = {}
    realConnectionMade = _Connection.connectionMade

    def connectionMade(self: Any) -> None:
        realConnectionMade(self)
        handle = self.transport.getHandle()
        if handle.family != socket.AF_UNIX:
            lowats[self.label] = handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        else:
            lowats[self.label] = -1

    monkeypatch.setattr(_Connection, "connectionMade", connectionMade)
    unixSocket = Path(tempfile.mkdtemp(prefix="tmf-", dir="/tmp")) / "s" if over == "unix" else None
    await sendIntoReceiver(capture, tmp_path / "copy", 2, unixSocket)
    assertSameCapture(capture, tmp_path / "copy")
    assert len(lowats) == 3
    if over == "unix":
        assert set(lowats.values()) == {-1}
    elif cpus > 2:
        assert lowats["multifd channel 0"] == lowats["multifd channel 1"] == LOCAL_NOTSENT_LOWAT
        assert lowats["main channel"] != LOCAL_NOTSENT_LOWAT
    else:
        assert LOCAL_NOTSENT_LOWAT not in lowats.values()


def test_localPeers():
    """
    Loopback TCP connections, and connections to one of this host's own
    addresses, reach this host; UNIX sockets are not TCP.
    """
    from twisted_multifd._sender import _isLocalPeer

    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert not _isLocalPeer(a)
    for family, host in [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]:
        try:
            server = socket.create_server((host, 0), family=family)
        except OSError:  # pragma: no cover - no IPv6 here
            continue
        with server, socket.create_connection(server.getsockname()[:2]) as client:
            assert _isLocalPeer(client)
    unconnected = socket.socket()
    with unconnected:
        assert not _isLocalPeer(unconnected)


def _openDescriptors(path: Path) -> list[str]:
    """
    This process's descriptors open on the file at C{path}.
    """
    target = os.path.realpath(path)
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                found.append(fd)
    return found


def _halfOfEachWindow(offset: int, count: int) -> int:
    """
    At most half of a whole window at once: the rest of every window waits
    for room, and then goes from the file.
    """
    return count // 2 if count == WINDOW else count


@pytest.mark.parametrize("channels,over", [(1, "tcp"), (3, "tcp"), (2, "unix")])
@pytest_twisted.ensureDeferred
async def test_restOfAWindowGoesFromTheFileOnceThereIsRoom(tmp_path, monkeypatch, channels, over):
    """
    When a socket takes only part of a window (here at most half), the rest
    goes from the file once the socket has room, before anything else on
    that connection, even when the reader is done with the image by then
    (the rest has a descriptor of its own). Only a rest that a SYNC packet
    must follow at once, or a window whose header the socket did not take
    whole, is read instead, for the transport. Every byte of the windows
    goes exactly once, most from the file, and every descriptor is closed
    at the end.
    """
    capture = recordedCapture(tmp_path / "capture", "cap10-4")
    path, content, wholeWindows = _sparseRAM(capture)
    sent = _recordSendfiles(monkeypatch, limit=_halfOfEachWindow)
    reads = _countPreads(monkeypatch, path)
    unixSocket = Path(tempfile.mkdtemp(prefix="tmf-", dir="/tmp")) / "s" if over == "unix" else None
    await sendIntoReceiver(capture, tmp_path / "copy", channels, unixSocket)
    assert images(tmp_path / "copy")["pc.ram"] == content
    fromFile = [(offset, n) for offset, count, n in sent if n > 0]
    read = [(offset, size) for offset, size in reads if (offset, size) != (100 * WINDOW, WINDOW)]
    assert all(n <= WINDOW // 2 for offset, count, n in sent if count == WINDOW)
    assert len([1 for offset, n in fromFile if offset % WINDOW]) >= wholeWindows // WINDOW // 2
    assert _pieces(fromFile + read) == [(0, 10 * WINDOW), (40 * WINDOW, 80 * WINDOW)]
    assert sum(n for offset, n in fromFile) >= 0.9 * wholeWindows
    assert _openDescriptors(path) == []


def _pieces(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """
    The (start, end) byte ranges that C{ranges} ((offset, size), which must
    not overlap) cover.
    """
    covered: list[tuple[int, int]] = []
    for offset, size in sorted(ranges):
        assert not covered or offset >= covered[-1][1], f"{offset} was sent twice"
        if covered and covered[-1][1] == offset:
            covered[-1] = (covered[-1][0], offset + size)
        else:
            covered.append((offset, offset + size))
    return covered


@pytest.mark.parametrize("where", ["window", "rest"])
@pytest_twisted.ensureDeferred
async def test_imageShrinkingWhileSentFailsClearly(tmp_path, monkeypatch, where):
    """
    An image cut short while it is being sent (just before a window, or the
    rest of a window, goes from the file) fails the send with a clear
    error that says so.
    """
    capture = recordedCapture(tmp_path / "capture", "cap10-4")
    path, _, _ = _sparseRAM(capture)
    cuts: list[int] = []

    def shrink(offset: int) -> None:
        # The first window (or rest of one) from 40 windows on.
        if not cuts and 40 * WINDOW <= offset < 80 * WINDOW and bool(offset % WINDOW) == (where == "rest"):
            os.truncate(path, offset)
            cuts.append(offset)

    _recordSendfiles(monkeypatch, before=shrink, limit=_halfOfEachWindow)
    with pytest.raises(SendError) as caught:
        await sendIntoReceiver(capture, tmp_path / "copy", 1)
    [cut] = cuts
    assert os.path.getsize(path) == cut
    message = str(caught.value)
    assert message.startswith("reading the capture failed: ")
    assert f"the image of RAM block 'pc.ram' ends at {cut}, before the block's length" in message
    assert "(did it change?)" in message


@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
def test_dataExtentsReachInMemoryTransportsExact(tmp_path, compression):
    """
    Transports without a socket of their own (as TLS) and compressed
    channels get the unread windows' bytes, read when needed, exact.
    """
    capture = recordedCapture(tmp_path / "capture", "cap10-4")
    _, content, _ = _sparseRAM(capture)
    reactor = MemoryReactorClock()
    d = sendCapture(
        reactor, str(capture), "tcp:192.0.2.1:4444", channels=2, compression=compression, progressInterval=None
    )
    destination = MemoryDestination(reactor, limit=256 * 1024)
    destination.acceptAll()
    destination.acceptAll()
    destination.drainAll()
    for index in (1, 2, 0):
        destination.close(index)
    assert d.result.conventions.compression == compression
    receive(tmp_path / "copy", [bytes(t.sent) for t in destination.transports], 2)
    assert images(tmp_path / "copy")["pc.ram"] == content


# Bad input: refused before anything connects


def editManifest(folder: Path, **changes: Any) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def _incomplete(folder: Path) -> str:
    editManifest(folder, complete=False, error="multifd channel 1: connection ended in the middle of a packet")
    return "the capture is not complete (multifd channel 1: connection ended in the middle of a packet)"


def _missingImage(folder: Path) -> str:
    os.unlink(folder / "ram" / "pc.bios.img")
    return "the image of RAM block 'pc.bios', ram/pc.bios.img is missing"


def _wrongImageSize(folder: Path) -> str:
    with open(folder / "ram" / "pc.ram.img", "r+b") as f:
        f.truncate(4096)
    return "the image of RAM block 'pc.ram', ram/pc.ram.img is 4096 bytes, the manifest says 67108864"


def _corruptedManifest(folder: Path) -> str:
    path = folder / "manifest.json"
    path.write_bytes(path.read_bytes()[:200])
    return "manifest.json is corrupted (not JSON"


def _manifestMissingAField(folder: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["stream"]["ram_section"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return "manifest.json: stream.ram_section is missing"


def _manifestWithAWrongType(folder: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["ram_blocks"][1]["length"] = "131072"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return "manifest.json: ram_blocks[1].length should be an integer, not '131072'"


def _noManifest(folder: Path) -> str:
    os.unlink(folder / "manifest.json")
    return "no manifest.json: not a capture, or its migration is still being received"


def _missingDeviceState(folder: Path) -> str:
    os.unlink(folder / "device-state.bin")
    return "the device state device-state.bin is missing"


def _fileOutsideTheCapture(folder: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["ram_blocks"][0]["file"] = "../../etc/passwd"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return "ram_blocks[0].file '../../etc/passwd' is not a path inside the capture"


def _ignoreShared(folder: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["stream"]["configuration"] = buildConfiguration(
        "pc-i440fx-7.2", capabilities=("x-ignore-shared",)
    ).hex()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return "the source used capability x-ignore-shared"


def _deviceStatePackets(folder: Path) -> str:
    (folder / "vfio.bin").write_bytes(b"state")
    editManifest(folder, multifd_device_state=[{"idstr": "vfio", "instance_id": 0, "flags": 0x40,
                                                "file": "vfio.bin"}])
    return "multifd device-state packets (VFIO)"


BAD_CAPTURES = [
    _incomplete, _missingImage, _wrongImageSize, _corruptedManifest, _manifestMissingAField,
    _manifestWithAWrongType, _noManifest, _missingDeviceState, _fileOutsideTheCapture, _ignoreShared,
    _deviceStatePackets,
]


@pytest.mark.parametrize("spoil", BAD_CAPTURES, ids=[f.__name__.lstrip("_") for f in BAD_CAPTURES])
def test_badCaptureIsRefusedBeforeConnecting(tmp_path, spoil):
    folder = recordedCapture(tmp_path / "capture", "cap72-4")
    message = spoil(folder)
    reactor = MemoryReactorClock()
    d = sendCapture(reactor, str(folder), "tcp:192.0.2.1:4444", channels=4)
    failure = _failureOf(d)
    assert failure.check(CaptureError)
    assert message in str(failure.value)
    assert str(failure.value).startswith(str(folder))
    assert reactor.tcpClients == [] and reactor.unixClients == []
    with pytest.raises(CaptureError) as raised:
        exportCapture(str(folder), str(tmp_path / "vm.mig"))
    assert message in str(raised.value)
    assert not (tmp_path / "vm.mig").exists()


def test_everyProblemIsNamed(tmp_path):
    folder = recordedCapture(tmp_path / "capture", "cap72-4")
    _missingImage(folder)
    _wrongImageSize(folder)
    _missingDeviceState(folder)
    with pytest.raises(CaptureError) as raised:
        loadCapture(str(folder))
    assert len(raised.value.problems) == 3
    assert "3 problems" in str(raised.value)


@pytest.mark.parametrize("args,message", [
    ({"channels": 0, "compression": "zlib"}, "compression zlib needs multifd channels"),
    ({"channels": 300}, "channels must be 0 to 255"),
    ({"compression": "lz4"}, "compression must be one of none, zlib, zstd"),
    ({"channels": 0, "zeroPages": "multifd"}, "zero pages in multifd packets need multifd channels"),
    ({"flushMode": "sometimes"}, "flush mode must be one of per-section, per-round"),
])
def test_badOptionsAreRefusedBeforeConnecting(tmp_path, args, message):
    folder = recordedCapture(tmp_path / "capture", "cap72-1")
    reactor = MemoryReactorClock()
    failure = _failureOf(sendCapture(reactor, str(folder), "tcp:192.0.2.1:4444", **args))
    assert failure.check(ValueError) and message in str(failure.value)
    assert reactor.tcpClients == []


def _failureOf(d: defer.Deferred[Any]) -> Failure:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the Deferred did not fail"
    return failures[0]


# Connections, flow control and endings, in memory


class PushBackTransport(StringTransport):
    """
    A transport that, like a real one, pauses its streaming producer once more
    than C{limit} bytes wait to be sent, and resumes it once L{drain}ed.
    """

    def __init__(self, limit: int = 64 * 1024) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.1", 4444))
        self.limit = limit
        self.sent = bytearray()
        self.paused = False
        self.mostBuffered = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        buffered = len(self.value())
        self.mostBuffered = max(self.mostBuffered, buffered)
        if self.producer is not None and not self.paused and buffered > self.limit:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self) -> bool:
        """
        The peer read everything: True if anything was waiting.
        """
        data = self.value()
        self.sent += data
        self.clear()
        if self.paused and self.producer is not None:
            self.paused = False
            self.producer.resumeProducing()
        return bool(data)


class MemoryDestination:
    """
    Completes the sender's connections on a MemoryReactorClock, in order.
    """

    def __init__(self, reactor: MemoryReactorClock, limit: int = 64 * 1024) -> None:
        self.reactor = reactor
        self.limit = limit
        self.protocols: list[Any] = []
        self.transports: list[PushBackTransport] = []

    def pendingConnections(self) -> int:
        return len(self.reactor.tcpClients) - len(self.protocols)

    def accept(self) -> PushBackTransport:
        _, _, factory, _, _ = self.reactor.tcpClients[len(self.protocols)]
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 4444))
        transport = PushBackTransport(self.limit)
        self.protocols.append(protocol)
        self.transports.append(transport)
        protocol.makeConnection(transport)
        return transport

    def acceptAll(self) -> None:
        while self.pendingConnections():
            self.accept()

    def drainAll(self) -> None:
        """
        Let the destination read until the sender stops writing.
        """
        while True:
            self.reactor.advance(0)
            moved = [t.drain() for t in self.transports]
            if not any(moved):
                return

    def close(self, index: int, reason: Any = None) -> None:
        self.protocols[index].connectionLost(Failure(reason or ConnectionDone()))


# 4 MiB: more than the connections' buffers hold, so that a sender stops
# half-way when the destination does not read.
BIGGER_MEMORY = {
    "pc.ram": b"".join(synthetic.samplePage(n) if n % 5 else bytes(PAGE) for n in range(1024)),
    "pc.bios": synthetic.samplePage(7) + bytes(PAGE),
}


def startSending(tmp_path: Path, channels: int = 3, limit: int = 64 * 1024, **args: Any) -> tuple[
    defer.Deferred[Any], MemoryDestination, synthetic.SyntheticMigration, Path
]:
    folder, migration = syntheticCapture(
        tmp_path / "capture", memory=BIGGER_MEMORY, convention="7.2", channels=channels
    )
    reactor = MemoryReactorClock()
    d = sendCapture(reactor, str(folder), "tcp:192.0.2.1:4444", channels=channels, progressInterval=None, **args)
    return d, MemoryDestination(reactor, limit), migration, folder


def test_mainConnectsFirstThenEachChannelOpensWithItsInitialPacket(tmp_path):
    uuid = bytes(range(16))
    folder, _ = syntheticCapture(tmp_path / "capture", convention="10.0", channels=3, uuid=uuid)
    reactor = MemoryReactorClock()
    d = sendCapture(reactor, str(folder), "tcp:192.0.2.1:4444", channels=3, progressInterval=None)
    destination = MemoryDestination(reactor)
    assert destination.pendingConnections() == 1  # main only
    main = destination.accept()
    assert destination.pendingConnections() == 3
    assert main.value() == b""  # nothing on main before every channel is in
    destination.accept()
    destination.accept()
    assert main.value() == b""
    destination.accept()
    assert main.value().startswith(b"QEVM\x00\x00\x00\x03")
    for channelID, transport in enumerate(destination.transports[1:]):
        init = parseInitPacket(transport.value()[:INIT_PACKET_SIZE])
        assert (init.channelID, init.uuid) == (channelID, uuid)
    assert not d.called


def test_flowControlKeepsLittleInMemoryAndTheStreamWhole(tmp_path):
    """
    The sender writes no more to a connection while its transport is paused:
    what waits in a transport is at most its limit plus one write (a packet
    of 128 pages or a batch of main-channel records). Drained a little at a
    time, the connections carry a whole migration that our receiver takes.
    """
    pages = 2000
    memory = {"pc.ram": b"".join(synthetic.samplePage(n) if n % 4 else bytes(PAGE) for n in range(pages))}
    folder, migration = syntheticCapture(tmp_path / "capture", memory=memory, convention="7.2", channels=2)
    reactor = MemoryReactorClock()
    d = sendCapture(reactor, str(folder), "tcp:192.0.2.1:4444", channels=2, progressInterval=None)
    destination = MemoryDestination(reactor, limit=64 * 1024)
    destination.acceptAll()
    destination.acceptAll()
    rounds = 0
    while not all(t.disconnecting for t in destination.transports[1:]):
        rounds += 1
        assert rounds < 10_000
        reactor.advance(0)
        # Drain one connection at a time, in turn, like a slow reader.
        destination.transports[rounds % 3].drain()
    for transport in destination.transports:
        transport.drain()
        assert transport.mostBuffered <= 64 * 1024 + 128 * PAGE + 1344 + 256 * 1024
    assert rounds > 10  # it really had to wait
    # Closed in QEMU's order: the multifd channels first, main after.
    assert not destination.transports[0].disconnecting or all(t.disconnecting for t in destination.transports[1:])
    destination.close(1)
    destination.close(2)
    assert destination.transports[0].disconnecting
    assert not d.called
    destination.close(0)
    result = d.result
    assert result.pages == pages and result.pagesWithData == pages * 3 // 4
    receive(tmp_path / "copy", [bytes(t.sent) for t in destination.transports], 2)
    assert images(tmp_path / "copy") == migration.memory


def test_mainIsClosedOnlyAfterEveryChannel(tmp_path):
    d, destination, _, _ = startSending(tmp_path)
    destination.acceptAll()
    destination.acceptAll()
    destination.drainAll()
    assert [t.disconnecting for t in destination.transports] == [False, True, True, True]
    assert all(t.producer is None for t in destination.transports[1:])  # unregistered, so they can close
    destination.close(3)
    destination.close(1)
    assert not destination.transports[0].disconnecting
    destination.close(2)
    assert destination.transports[0].disconnecting
    destination.close(0)
    assert d.result.conventions.channels == 3


def test_connectionRefused(tmp_path):
    d, destination, _, _ = startSending(tmp_path)
    _, _, factory, _, _ = destination.reactor.tcpClients[0]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("Connection refused")))
    failure = _failureOf(d)
    assert failure.check(SendError)
    assert str(failure.value).startswith("main channel: cannot connect to tcp:192.0.2.1:4444: Connection was refused")


def test_multifdChannelRefused(tmp_path):
    d, destination, _, _ = startSending(tmp_path)
    destination.accept()
    destination.accept()
    _, _, factory, _, _ = destination.reactor.tcpClients[2]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("Connection refused")))
    failure = _failureOf(d)
    assert str(failure.value).startswith("multifd channel 1: cannot connect")
    assert all(t.disconnected for t in destination.transports)  # aborted


def test_destinationClosesEarly(tmp_path):
    d, destination, _, _ = startSending(tmp_path)
    destination.acceptAll()
    destination.acceptAll()
    destination.reactor.advance(0)
    destination.close(2, ConnectionLost("Connection reset by peer"))
    failure = _failureOf(d)
    assert failure.check(SendError)
    assert str(failure.value).startswith("multifd channel 1: the destination closed the connection after")
    assert "before the migration was sent" in str(failure.value)
    assert [t.disconnected for t in destination.transports] == [True, True, False, True]


def test_destinationShutsItsSideEarly(tmp_path):
    d, destination, _, _ = startSending(tmp_path)
    destination.acceptAll()
    destination.acceptAll()
    destination.protocols[0].readConnectionLost()
    failure = _failureOf(d)
    assert str(failure.value).startswith("main channel: the destination closed its end of the connection (EOF)")


def test_destinationShutsItsSideAfterTheEnd(tmp_path):
    """
    A QEMU destination that has loaded everything shuts its sockets: not an error.
    """
    d, destination, _, _ = startSending(tmp_path)
    destination.acceptAll()
    destination.acceptAll()
    destination.drainAll()
    for protocol in destination.protocols:
        protocol.readConnectionLost()
    for index in (1, 2, 3, 0):
        destination.close(index)
    assert d.result.pages > 0


def test_brokenWhileFlushingTheEnd(tmp_path):
    d, destination, _, _ = startSending(tmp_path)
    destination.acceptAll()
    destination.acceptAll()
    destination.drainAll()
    destination.close(1, ConnectionLost("Broken pipe"))
    failure = _failureOf(d)
    assert str(failure.value).startswith(
        "multifd channel 0: the connection broke while its last bytes were being flushed"
    )


def test_stalledDestinationTimesOut(tmp_path):
    d, destination, _, _ = startSending(tmp_path, timeout=30)
    destination.acceptAll()
    destination.acceptAll()
    destination.reactor.advance(0)  # the channels fill up and nobody reads
    destination.reactor.advance(29)
    assert not d.called
    destination.transports[2].drain()  # one channel read: progress...
    destination.reactor.advance(29)
    assert not d.called  # ... restarts the count
    destination.reactor.advance(31)
    failure = _failureOf(d)
    assert failure.check(SendError)
    assert "nothing moved for 30 s: the destination reads none of the multifd channels" in str(failure.value)
    assert all(t.disconnected for t in destination.transports)


def test_neverConnectingTimesOut(tmp_path):
    d, destination, _, _ = startSending(tmp_path, timeout=30)
    destination.accept()
    destination.reactor.advance(30)
    failure = _failureOf(d)
    assert "still connecting (multifd channel 0, multifd channel 1, multifd channel 2)" in str(failure.value)


def test_cancel(tmp_path):
    d, destination, _, _ = startSending(tmp_path)
    destination.acceptAll()
    destination.acceptAll()
    destination.reactor.advance(0)
    d.cancel()
    assert _failureOf(d).check(CancelledError)
    assert all(t.disconnected for t in destination.transports)


def test_unexpectedDataIsIgnored(tmp_path):
    d, destination, _, _ = startSending(tmp_path)
    destination.acceptAll()
    destination.acceptAll()
    destination.protocols[0].dataReceived(b"\x00\x01")
    destination.drainAll()
    for index in (1, 2, 3, 0):
        destination.close(index)
    assert d.result.pages > 0


def test_progressLines(tmp_path):
    from twisted.logger import capturedLogs, formatEvent

    folder, _ = syntheticCapture(tmp_path / "capture", convention="10.0", channels=1)
    reactor = MemoryReactorClock()
    with capturedLogs() as events:
        d = sendCapture(reactor, str(folder), "tcp:192.0.2.1:4444", channels=1, progressInterval=1.0)
        destination = MemoryDestination(reactor, limit=4096)
        destination.acceptAll()
        destination.acceptAll()
        reactor.advance(1.0)
        destination.drainAll()
        for index in (1, 0):
            destination.close(index)
    lines = [formatEvent(e) for e in events]
    assert any("% of pages (" in line and "MiB/s" in line for line in lines), lines
    assert any("every connection closed" in line for line in lines), lines
    assert d.result.pages == loadCapture(str(folder)).totalPages


# The command line


def run(*args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twisted_multifd", *args], capture_output=True, text=True, timeout=timeout,
        cwd=REPO, check=False, **kwargs,
    )


def _waitForFile(path: Path, process: subprocess.Popen[str], timeout: float = 30.0) -> str:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if process.poll() is not None:
            raise AssertionError(f"receiver exited early: {process.communicate()}")
        time.sleep(0.02)
    raise AssertionError("receiver did not write its address file")


@pytest.mark.parametrize("name,channels", [("cap72-4", 4), ("cap10-4-zstd", 2)])
def test_sendCommandIntoReceiveCommand(tmp_path, name, channels):
    capture = recordedCapture(tmp_path / "capture", name)
    receiver = subprocess.Popen(
        [sys.executable, "-m", "twisted_multifd", "receive", "--listen", "tcp:0:interface=127.0.0.1",
         "--channels", str(channels), "--output", str(tmp_path / "copy"), "--once",
         "--address-file", str(tmp_path / "address")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        address = _waitForFile(tmp_path / "address", receiver)
        sent = run("send", str(capture), "--to", address, "--channels", str(channels),
                   "--progress-interval", "0.001")
        _, receiverErr = receiver.communicate(timeout=60)
    finally:
        receiver.kill()
    assert sent.returncode == 0, sent.stderr
    assert receiver.returncode == 0, receiverErr
    assert "twisted-multifd: sending" in sent.stderr and "every connection closed" in sent.stderr
    assertSameCapture(capture, tmp_path / "copy")


def test_sendRefusesABadCaptureWithoutConnecting(tmp_path):
    folder = recordedCapture(tmp_path / "capture", "cap72-1")
    _wrongImageSize(folder)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    try:
        port = listener.getsockname()[1]
        result = run("send", str(folder), "--to", f"tcp:127.0.0.1:{port}", "--channels", "1")
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()
    assert result.returncode == 2
    assert f"twisted-multifd: error: cannot send {folder}: the image of RAM block 'pc.ram'" in result.stderr
    assert "Traceback" not in result.stderr


def test_sendExitsNonZeroWhenNobodyListens(tmp_path):
    folder = recordedCapture(tmp_path / "capture", "cap72-1")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    result = run("send", str(folder), "--to", f"tcp:127.0.0.1:{port}")
    assert result.returncode == 1
    assert "main channel: cannot connect" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args,message", [
    (["send", "somewhere"], "--to is required"),
    (["send", "--to", "tcp:127.0.0.1:1"], "which capture?"),
    (["send", "a", "b", "--to", "tcp:127.0.0.1:1"], "one capture folder only"),
    (["send", "a", "--to", "tcp:127.0.0.1:1", "--compression", "lz4"], "--compression must be one of"),
    (["send", "a", "--to", "tcp:127.0.0.1:1", "--zero-pages", "both"], "--zero-pages must be one of"),
    (["export", "a"], "-o/--output is required"),
])
def test_usageErrors(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_badEndpointString(tmp_path):
    folder = recordedCapture(tmp_path / "capture", "cap72-1")
    result = run("send", str(folder), "--to", "carrier-pigeon:home")
    assert result.returncode == 2
    assert "carrier-pigeon" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("toStdout", [False, True])
def test_exportCommand(tmp_path, toStdout):
    capture = recordedCapture(tmp_path / "capture", "cap10-4")
    if toStdout:
        with open(tmp_path / "vm.mig", "wb") as out:
            result = subprocess.run(
                [sys.executable, "-m", "twisted_multifd", "export", str(capture), "-o", "-"],
                stdout=out, stderr=subprocess.PIPE, text=False, timeout=60, cwd=REPO, check=False,
            )
        stderr = result.stderr.decode()
    else:
        result = run("export", "-o", str(tmp_path / "vm.mig"), str(capture))
        stderr = result.stderr
    assert result.returncode == 0, stderr
    assert "exported" in stderr
    receive(tmp_path / "copy", [(tmp_path / "vm.mig").read_bytes()], 0)
    assertSameCapture(capture, tmp_path / "copy")


def test_exportCommandRefusesABadCapture(tmp_path):
    folder = recordedCapture(tmp_path / "capture", "cap72-1")
    _incomplete(folder)
    result = run("export", str(folder), "-o", str(tmp_path / "vm.mig"))
    assert result.returncode == 2
    assert "cannot export" in result.stderr and "not complete" in result.stderr
    assert not (tmp_path / "vm.mig").exists()


def test_twistdSaysSendIsAOneOffCommand(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         "multifd", "send", "somewhere", "--to", "tcp:127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode != 0
    assert "one-off command" in result.stdout + result.stderr


def _waitForLine(process: subprocess.Popen[bytes], path: Path, text: str, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise AssertionError(f"exited early ({process.returncode}): {path.read_text()}")
        time.sleep(0.02)
    raise AssertionError(f"no {text!r} in {path.read_text()}")


def test_interruptedSendExitsNonZero(tmp_path):
    """
    Ctrl-C while the destination is not reading: the connections are dropped
    and the status says the migration was not sent.
    """
    import signal

    folder = recordedCapture(tmp_path / "capture", "cap10-1")
    # 64 MiB of data pages, far more than the kernel's socket buffers hold:
    # the recorded capture's 0.7 MiB would all be taken by them, and the
    # send would be over before the signal.
    manifest = json.loads((folder / "manifest.json").read_text())
    ram = next(block for block in manifest["ram_blocks"] if block["name"] == "pc.ram")
    (folder / ram["file"]).write_bytes(os.urandom(ram["length"]))
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)  # accepts (in the kernel), never reads
    port = listener.getsockname()[1]
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "twisted_multifd", "send", str(folder), "--to", f"tcp:127.0.0.1:{port}",
             "--channels", "1"],
            stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
        )
    try:
        _waitForLine(process, stderr, "all 1 multifd channels connected")
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 1
    finally:
        process.kill()
        listener.close()
    assert "interrupted: the destination did not get the whole migration" in stderr.read_text()


def test_interruptedExportToAStalledPipeExitsNonZero(tmp_path):
    import signal

    folder = recordedCapture(tmp_path / "capture", "cap10-1")
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "twisted_multifd", "export", str(folder), "-o", "-"],
            stdout=subprocess.PIPE, stderr=err, cwd=REPO,
        )
    try:
        assert process.stdout.read(8) == b"QEVM\x00\x00\x00\x03"  # writing; nobody reads on
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 1
    finally:
        process.kill()
        process.stdout.close()
    assert "interrupted" in stderr.read_text()


def test_exportStoppedHalfWayLeavesNoFile(tmp_path):
    capture = recordedCapture(tmp_path / "capture", "cap10-1")
    (tmp_path / "vm.mig").write_bytes(b"an older export")

    class Stop(Exception):
        pass

    def progress(pages: int, size: int) -> None:
        if pages > 1000:
            raise Stop()

    with pytest.raises(Stop):
        exportCapture(str(capture), str(tmp_path / "vm.mig"), onProgress=progress)
    assert (tmp_path / "vm.mig").read_bytes() == b"an older export"
    assert sorted(os.listdir(tmp_path)) == ["capture", "vm.mig"]

"""
``inspect``: describe a capture or a plain migration stream file.

- Real captures: the five recorded QEMU 7.2 / 10.0 migrations, received into
  capture folders in memory, then inspected: machine type, conventions,
  channels, non-zero pages (checked against the source's own memory), the 31
  devices with the manifest's sizes.
- Stream files: the same captures exported as plain streams, and synthetic
  QEMU 7.2 / 10.0 streams whose pages are re-sent in dirty rounds (the last
  version of a page counts).
- What is wrong, said: an incomplete capture (a truncated main channel), a
  missing or wrong-sized image, a corrupted device state, truncated and
  corrupted stream files, paths that are neither.
- The command line as a subprocess: exit statuses 0, 1, 2, ``--json``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from captures import CAPTURE_NAMES, recorded
from twisted.internet.task import Clock

from twisted_multifd import CaptureWriter, MigrationReceiverFactory
from twisted_multifd._export import exportCapture
from twisted_multifd._inspect import (
    KIND_CAPTURE,
    KIND_STREAM,
    STREAM_CHUNK,
    InspectError,
    InspectInterrupted,
    countNonZeroPages,
    humanSize,
    inspectCapture,
    inspectPath,
    inspectStream,
    renderJSON,
    renderText,
    reportFromJSON,
    reportToJSON,
    sizeText,
)
from twisted_multifd._mainstream import (
    RAM_CONTINUE,
    RAM_EOS,
    RAM_PAGE,
    RAM_ZERO,
    SECTION_END,
    SECTION_PART,
    SECTION_START,
    RamBlock,
    buildBlockList,
    buildConfiguration,
    buildFooter,
    buildHeader,
    buildRamRecord,
    buildSectionHeader,
)
from twisted_multifd._tail import buildTail
from twisted_multifd.testing import MigrationPump, SyntheticDevice, synthesizeMigration

PAGE = 4096
REPO = Path(__file__).resolve().parent.parent

# What each recorded migration's source used.
EXPECTED = {
    "cap72-1": ("pc-i440fx-7.2", 1, "per-section", "main", "none", False),
    "cap72-4": ("pc-i440fx-7.2", 4, "per-section", "main", "none", False),
    "cap10-1": ("pc-i440fx-10.0", 1, "per-round", "multifd", "none", True),
    "cap10-4": ("pc-i440fx-10.0", 4, "per-round", "multifd", "none", True),
    "cap10-4-zstd": ("pc-i440fx-10.0", 4, "per-round", "multifd", "zstd", True),
}


# Helpers


def receive(folder: Path, streams: tuple[bytes, ...] | list[bytes], channels: int) -> dict[str, Any]:
    """
    Receive a migration's connections (main first) into a capture folder, in
    memory; return its manifest (complete or not).
    """
    results: list[Any] = []
    factory = MigrationReceiverFactory(
        lambda info: CaptureWriter(str(folder)), channels=channels, clock=Clock(), onMigrationEnded=results.append
    )
    MigrationPump(factory, streams).flush()
    assert len(results) == 1, "the migration did not end"
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """
    Every recorded migration, received into a capture folder (once).
    """
    root = tmp_path_factory.mktemp("captures")
    folders = {}
    for name in CAPTURE_NAMES:
        migration = recorded(name)
        manifest = receive(root / name, migration.streams, migration.channels)
        assert manifest["complete"] is True, manifest["error"]
        folders[name] = root / name
    return folders


@pytest.fixture(scope="module")
def streams(captures: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """
    Every recorded capture exported as a plain stream file.
    """
    root = tmp_path_factory.mktemp("streams")
    files = {}
    for name, folder in captures.items():
        files[name] = root / f"{name}.mig"
        exportCapture(str(folder), str(files[name]))
    return files


def nonZeroPages(data: bytes, pageSize: int = PAGE) -> int:
    zero = bytes(pageSize)
    return sum(1 for o in range(0, len(data), pageSize) if data[o : o + pageSize] != zero)


def copyCapture(source: Path, target: Path) -> Path:
    """
    A copy of a capture folder that keeps its images sparse.
    """
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if path.is_dir():
            (target / relative).mkdir(parents=True, exist_ok=True)
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes()
        with open(target / relative, "wb") as f:
            f.truncate(len(data))
            for o in range(0, len(data), PAGE):
                page = data[o : o + PAGE]
                if page.count(0) != len(page):
                    f.seek(o)
                    f.write(page)
    return target


def cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twisted_multifd", "inspect", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False, **kwargs,
    )


def plainStream(migration: Any) -> bytes:
    assert migration.channels == 0
    return migration.streams[0]


# Real captures


@pytest.mark.parametrize("name", CAPTURE_NAMES)
def test_recordedCapture(captures: dict[str, Path], name: str) -> None:
    """
    What the report says of a real QEMU capture is what its source did, and
    the non-zero pages of pc.ram are those of the source's memory.
    """
    folder = captures[name]
    machine, channels, flushMode, zeroPages, compression, switchover = EXPECTED[name]
    report = inspectPath(str(folder))
    assert report.kind == KIND_CAPTURE
    assert report.complete and report.exitStatus == 0
    assert report.problems == () and report.manifestError is None and report.parseError is None
    assert report.machine == machine
    assert report.channels == channels
    assert report.uuid == "00000000-0000-0000-0000-000000000000"
    assert report.flushMode == flushMode
    assert report.machineFlushMode == flushMode  # the machine type implies what the source did
    assert report.zeroPages == zeroPages
    assert report.compression == compression
    assert report.switchoverStart is switchover
    assert report.commands == (("SWITCHOVER_START",) if switchover else ())
    assert report.streamVersion == 3 and report.pageSize == PAGE

    manifest = json.loads((folder / "manifest.json").read_text())
    blocks = {b.name: b for b in report.blocks}
    assert [b.name for b in report.blocks] == [b["name"] for b in manifest["ram_blocks"]]
    pcram = blocks["pc.ram"]
    assert pcram.length == 64 << 20 and pcram.pages == 16384
    # The source's own memory says how many pages of pc.ram are not zero.
    assert pcram.pagesNonZero == nonZeroPages(recorded(name).memory)
    assert pcram.pagesNonZero == (58 if name.startswith("cap72") else 59)
    for block, entry in zip(report.blocks, manifest["ram_blocks"]):
        assert block.length == entry["length"]
        assert block.file == entry["file"]
        assert block.pagesNonZero == nonZeroPages((folder / entry["file"]).read_bytes())
        assert (block.pagesWithData, block.pagesZero, block.pagesNeverSent) == (
            entry["pages_with_data"], entry["pages_zero"], entry["pages_never_sent"])
    assert report.ramTotal == manifest["stream"]["ram_total"] == 67641344
    assert report.totalPages == 16514

    # The 31 devices of VMDESC, with the section sizes the manifest lists.
    vmdesc = json.loads((folder / "vmdesc.json").read_text())
    sections = manifest["device_state"]["sections"]
    assert report.devicesFrom == "vmdesc" and report.vmdesc
    assert len(report.devices) == len(sections) == len(vmdesc["devices"]) == 31
    for device, section, described in zip(report.devices, sections, vmdesc["devices"]):
        assert (device.idstr, device.instanceID, device.version) == (
            described["name"], described["instance_id"], described["version"])
        assert (device.idstr, device.sectionID, device.length) == (
            section["idstr"], section["section_id"], section["length"])
    assert report.deviceStateLength == manifest["device_state"]["length"] == 12916
    assert sum(d.length for d in report.devices) == 12916
    assert report.source == "192.0.2.1"


def test_manifestPathIsTheCapture(captures: dict[str, Path]) -> None:
    folder = captures["cap10-4"]
    assert inspectPath(str(folder / "manifest.json")) == inspectPath(str(folder))


def test_captureText(captures: dict[str, Path]) -> None:
    text = renderText(inspectPath(str(captures["cap10-4"])))
    lines = text.splitlines()
    assert lines[0] == f"{captures['cap10-4']}: capture, complete"
    for pattern in (
        r"^  machine: +pc-i440fx-10\.0$",
        r"^  channels: +4 multifd$",
        r"^  uuid: +00000000-0000-0000-0000-000000000000$",
        r"^  flush mode: +per-round \(MULTIFD_FLUSH",
        r"^  zero pages: +multifd \(zero-page lists in multifd packets",
        r"^  compression: +none$",
        r"^  switchover: +SWITCHOVER_START \(QEMU 10\.0 and later",
        r"^  RAM: +64\.5 MiB \(67641344 bytes\) in 6 blocks, 111 of 16514 pages non-zero$",
        r"^    pc\.ram +64 MiB +67108864 +16384 +59 +59 +16325 +0$",
        r"^    pc\.bios +256 KiB +262144 +64 +47 +47 +17 +0$",
        r"^  devices: +31 \(from VMDESC\), device state 12\.6 KiB \(12916 bytes\)$",
        r"^    timer +0 +2 +48$",
        r"^    0000:00:01\.3/piix4_pm +0 +3 +2472$",
        r"^    dma +1 +1 +97$",
    ):
        assert any(re.search(pattern, line) for line in lines), (pattern, text)
    assert "problem" not in text

    text72 = renderText(inspectPath(str(captures["cap72-4"])))
    assert re.search(r"^  flush mode: +per-section \(a sync point at every RAM EOS", text72, re.M)
    assert re.search(r"^  zero pages: +main \(ZERO records on the main channel", text72, re.M)
    assert re.search(r"^  switchover: +no SWITCHOVER_START", text72, re.M)
    assert re.search(r"^    pc\.ram +64 MiB +67108864 +16384 +58 ", text72, re.M)


@pytest.mark.parametrize("name", ["cap72-4", "cap10-4-zstd"])
def test_jsonRoundTrips(captures: dict[str, Path], streams: dict[str, Path], name: str) -> None:
    for path in (captures[name], streams[name]):
        report = inspectPath(str(path))
        data = json.loads(renderJSON(report))
        assert data == reportToJSON(report)
        assert reportFromJSON(data) == report


def test_jsonKeys(captures: dict[str, Path]) -> None:
    """
    The keys docs/inspect.md documents, for both kinds.
    """
    data = reportToJSON(inspectPath(str(captures["cap10-4"])))
    assert list(data) == [
        "format", "path", "kind", "complete", "problems", "notes", "manifest_error", "parse_error",
        "machine", "stream_version", "page_size", "capabilities", "channels", "uuid", "compression",
        "flush_mode", "machine_flush_mode", "zero_pages", "commands", "switchover_start", "ram_total",
        "pages", "pages_nonzero", "ram_blocks", "devices_from", "device_state_length", "devices",
        "vmdesc", "multifd_device_state", "source", "started_at", "size",
    ]
    assert list(data["ram_blocks"][0]) == [
        "name", "length", "pages", "pages_nonzero", "pages_with_data", "pages_zero", "pages_never_sent", "file",
    ]
    assert list(data["devices"][0]) == ["idstr", "instance_id", "version", "section_id", "length"]
    assert data["format"] == 1 and data["kind"] == "capture" and data["pages_nonzero"] == 111
    docs = (REPO / "docs" / "inspect.md").read_text()
    for key in [*data, *data["ram_blocks"][0], *data["devices"][0], "offset", "field", "reason"]:
        assert f"`{key}`" in docs, key


# Stream files


@pytest.mark.parametrize("name", CAPTURE_NAMES)
def test_exportedStream(captures: dict[str, Path], streams: dict[str, Path], name: str) -> None:
    """
    A capture exported as a plain stream describes the same VM: the same
    non-zero pages, devices and sizes; zero pages as ZERO records, no
    multifd sync points.
    """
    machine, _, flushMode, _, _, switchover = EXPECTED[name]
    capture = inspectPath(str(captures[name]))
    report = inspectPath(str(streams[name]))
    assert report.kind == KIND_STREAM
    assert report.complete and report.exitStatus == 0 and report.parseError is None
    assert report.machine == machine
    assert report.channels == 0 and report.compression is None
    assert report.flushMode is None
    assert report.machineFlushMode == flushMode
    assert report.zeroPages == "main"
    assert report.switchoverStart is switchover
    assert report.size == os.path.getsize(streams[name])
    assert [(b.name, b.length, b.pagesNonZero) for b in report.blocks] == [
        (b.name, b.length, b.pagesNonZero) for b in capture.blocks]
    pcram = report.blocks[0]
    assert pcram.name == "pc.ram" and pcram.pagesNonZero == nonZeroPages(recorded(name).memory)
    for block in report.blocks:
        assert block.pagesNeverSent == 0
        assert block.pagesWithData == block.pagesNonZero  # export sends zero pages as ZERO records
        assert block.pagesZero == block.pages - block.pagesNonZero
        assert block.file is None
    assert report.devices == capture.devices
    assert len(report.devices) == 31 and report.devicesFrom == "vmdesc"
    assert report.deviceStateLength == 12916
    assert report.notes == ()


def test_streamText(streams: dict[str, Path]) -> None:
    path = streams["cap72-1"]
    text = renderText(inspectPath(str(path)))
    lines = text.splitlines()
    size = os.path.getsize(path)
    assert lines[0] == f"{path}: plain migration stream, {humanSize(size)} ({size} bytes), parses to the end"
    for pattern in (
        r"^  machine: +pc-i440fx-7\.2$",
        r"^  channels: +0 \(one stream\)$",
        r"^  flush mode: +none \(a plain migration has no multifd sync points\); its machine type implies"
        r" per-section for multifd$",
        r"^  zero pages: +main \(ZERO records",
        r"^  switchover: +no SWITCHOVER_START",
        r"^  RAM: +64\.5 MiB \(67641344 bytes\) in 6 blocks, 108 of 16514 pages non-zero$",
        r"^    pc\.ram +64 MiB +67108864 +16384 +58 +58 +16326 +0$",
        r"^  devices: +31 \(from VMDESC\), device state 12\.6 KiB \(12916 bytes\)$",
    ):
        assert re.search(pattern, text, re.M), (pattern, text)


def _syntheticMemory() -> dict[str, bytes]:
    def page(fill: int) -> bytes:
        return bytes([fill]) * PAGE

    return {
        "pc.ram": page(1) + bytes(PAGE) + page(2) + page(3) + bytes(PAGE) + page(4) + bytes(2 * PAGE),
        "pc.bios": page(5) + bytes(PAGE),
    }


@pytest.mark.parametrize("convention", ["7.2", "10.0"])
def test_syntheticStreamLastVersionWins(tmp_path: Path, convention: str) -> None:
    """
    Pages sent again in later rounds count as their last version: data that
    became zero, zero that became data.
    """
    memory = _syntheticMemory()
    rounds = [
        {"pc.ram": {0: bytes(PAGE), 1 * PAGE: b"\x07" * PAGE}},   # data -> zero, zero -> data
        {"pc.ram": {1 * PAGE: bytes(PAGE), 6 * PAGE: b"\x08" * PAGE}, "pc.bios": {0: b"\x09" * PAGE}},
    ]
    migration = synthesizeMigration(memory, convention=convention, channels=0, dirtyRounds=rounds)
    path = tmp_path / "vm.mig"
    path.write_bytes(plainStream(migration))
    report = inspectPath(str(path))
    assert report.complete, report.problems
    assert report.machine == f"pc-i440fx-{convention}"
    assert report.switchoverStart is (convention == "10.0")
    blocks = {b.name: b for b in report.blocks}
    # The final memory: pc.ram pages 2, 3, 5, 6 hold data; pc.bios page 0.
    assert blocks["pc.ram"].pagesNonZero == nonZeroPages(migration.memory["pc.ram"]) == 4
    assert blocks["pc.bios"].pagesNonZero == nonZeroPages(migration.memory["pc.bios"]) == 1
    for block in report.blocks:
        assert block.pagesNeverSent == 0
        assert block.pagesWithData + block.pagesZero == block.pages
    devices = [(d.idstr, d.instanceID, d.version) for d in report.devices]
    assert devices == [(d.name, d.instanceID, d.version) for d in migration.devices]
    assert report.deviceStateLength == len(migration.deviceState)
    assert sum(d.length for d in report.devices) == len(migration.deviceState)


def test_syntheticStreamWithoutVMDesc(tmp_path: Path) -> None:
    """
    Without VMDESC the devices come from walking the device sections.
    """
    devices = (SyntheticDevice("timer", 0, 2, b"\x01" * 24, 0), SyntheticDevice("apic", 0, 3, b"\x02" * 100, 5))
    migration = synthesizeMigration(seed=3, convention="7.2", channels=0, devices=devices, vmdescription=False)
    path = tmp_path / "vm.mig"
    path.write_bytes(plainStream(migration))
    report = inspectPath(str(path))
    assert report.complete, report.problems
    assert report.devicesFrom == "device-state" and not report.vmdesc
    assert [d.idstr for d in report.devices] == ["timer", "apic"]
    assert sum(d.length for d in report.devices) == report.deviceStateLength == len(migration.deviceState)
    assert "from the device sections; no VMDESC" in renderText(report)
    for block in report.blocks:
        assert block.pagesNonZero == nonZeroPages(migration.memory[block.name])


def test_syntheticLargePages(tmp_path: Path) -> None:
    """
    A target page size announced in the configuration is the one counted in.
    """
    migration = synthesizeMigration(seed=5, convention="10.0", channels=0, pageSize=16384)
    path = tmp_path / "vm.mig"
    path.write_bytes(plainStream(migration))
    report = inspectPath(str(path))
    assert report.complete, report.problems
    assert report.pageSize == 16384
    for block in report.blocks:
        assert block.pages == block.length // 16384
        assert block.pagesNonZero == nonZeroPages(migration.memory[block.name], 16384)


def test_multifdMainChannel(tmp_path: Path) -> None:
    """
    The main channel of a multifd migration parses, but says its pages went
    elsewhere.
    """
    migration = synthesizeMigration(seed=1, convention="10.0", channels=2)
    path = tmp_path / "main.bin"
    path.write_bytes(migration.streams[0])
    report = inspectPath(str(path))
    assert report.complete
    assert report.flushMode == "per-round"
    assert report.zeroPages is None
    assert all(b.pagesNeverSent == b.pages for b in report.blocks)
    assert any("MULTIFD_FLUSH" in note for note in report.notes)
    assert "main channel of a multifd migration" in renderText(report).splitlines()[0]


def test_syntheticPlainCapture(tmp_path: Path) -> None:
    migration = synthesizeMigration(seed=2, convention="7.2", channels=0)
    manifest = receive(tmp_path / "c", migration.streams, 0)
    assert manifest["complete"]
    report = inspectPath(str(tmp_path / "c"))
    assert report.complete and report.channels == 0 and report.flushMode is None
    assert report.machineFlushMode == "per-section"
    for block in report.blocks:
        assert block.pagesNonZero == nonZeroPages(migration.memory[block.name])
    text = renderText(report)
    assert re.search(r"^  channels: +0 \(plain migration\)$", text, re.M)
    assert re.search(r"^  flush mode: +none \(a plain migration", text, re.M)


def test_streamIsReadInChunks(streams: dict[str, Path]) -> None:
    """
    A stream is read a bounded chunk at a time, whatever its size.
    """
    reads = []

    class Recording:
        name = "recorded"

        def __init__(self, f: Any) -> None:
            self.f = f

        def read(self, size: int = -1) -> bytes:
            reads.append(size)
            return self.f.read(size)

    with open(streams["cap10-4"], "rb") as f:
        report = inspectStream(Recording(f))  # type: ignore[arg-type]
    assert report.complete and report.path == "recorded"
    assert reads and all(0 < size <= STREAM_CHUNK for size in reads)
    assert report.size == os.path.getsize(streams["cap10-4"])


def test_hugeBlockWithFewPages(tmp_path: Path) -> None:
    """
    Page states are kept only where pages came: a block list that claims
    1 TiB costs nothing until pages arrive.
    """
    block = RamBlock("pc.ram", 1 << 40)
    stream = (
        buildHeader() + buildConfiguration("pc-i440fx-9.2")
        + buildSectionHeader(SECTION_START, 1) + buildBlockList([block]) + buildRamRecord(RAM_EOS) + buildFooter(1)
        + buildSectionHeader(SECTION_PART, 1)
        + buildRamRecord(RAM_PAGE, 0, "pc.ram", b"\x01" * PAGE)
        + buildRamRecord(RAM_ZERO | RAM_CONTINUE, (1 << 40) - PAGE, None, b"\x00")
        + buildRamRecord(RAM_PAGE | RAM_CONTINUE, (1 << 39), None, bytes(PAGE))
        + buildRamRecord(RAM_EOS) + buildFooter(1)
        + buildSectionHeader(SECTION_END, 1) + buildRamRecord(RAM_EOS) + buildFooter(1)
        + buildTail(b"", None)
    )
    path = tmp_path / "huge.mig"
    path.write_bytes(stream)
    report = inspectPath(str(path))
    assert report.complete, report.problems
    (b,) = report.blocks
    assert b.pages == 1 << 28
    assert (b.pagesNonZero, b.pagesWithData, b.pagesZero, b.pagesNeverSent) == (1, 2, 1, (1 << 28) - 3)
    assert report.machineFlushMode == "per-round"
    assert report.devices == () and report.deviceStateLength == 0 and report.devicesFrom is None
    assert "1 TiB (1099511627776 bytes) in 1 block, 1 of 268435456 pages non-zero" in renderText(report)


# What is wrong, said


def test_incompleteCapture(tmp_path: Path) -> None:
    """
    A main channel cut short: the receiver writes complete:false with the
    reason, and inspect says it (exit status 1).
    """
    migration = recorded("cap72-4")
    cut = list(migration.streams)
    cut[0] = cut[0][: len(cut[0]) // 2]
    manifest = receive(tmp_path / "cut", cut, migration.channels)
    assert manifest["complete"] is False and manifest["error"]
    report = inspectPath(str(tmp_path / "cut"))
    assert not report.complete and report.exitStatus == 1
    assert report.manifestError == manifest["error"]
    assert report.problems[0] == f"the migration did not end cleanly: {manifest['error']}"
    assert report.machine == "pc-i440fx-7.2"
    assert report.deviceStateLength is None and report.devices == ()
    text = renderText(report)
    assert text.splitlines()[0] == f"{tmp_path / 'cut'}: capture, NOT complete"
    assert f"problem:        the migration did not end cleanly: {manifest['error']}" in text
    assert "none (the migration did not get as far as the device state)" in text

    result = cli(str(tmp_path / "cut"))
    assert result.returncode == 1, result.stderr
    assert manifest["error"] in result.stdout
    assert result.stderr == ""
    data = json.loads(cli("--json", str(tmp_path / "cut")).stdout)
    assert data["complete"] is False and data["manifest_error"] == manifest["error"]


def test_missingAndWrongSizedImages(captures: dict[str, Path], tmp_path: Path) -> None:
    folder = copyCapture(captures["cap10-4"], tmp_path / "c")
    (folder / "ram" / "pc.bios.img").unlink()
    with open(folder / "ram" / "pc.rom.img", "r+b") as f:
        f.truncate(4096)
    report = inspectPath(str(folder))
    assert not report.complete and report.exitStatus == 1
    assert report.manifestError is None
    assert report.problems == (
        "the image of RAM block 'pc.bios', ram/pc.bios.img is missing",
        "the image of RAM block 'pc.rom', ram/pc.rom.img is 4096 bytes, the manifest says 131072",
    )
    blocks = {b.name: b for b in report.blocks}
    assert blocks["pc.bios"].pagesNonZero is None
    assert blocks["pc.ram"].pagesNonZero == 59
    assert report.pagesNonZero is None
    text = renderText(report)
    assert "capture, NOT complete" in text
    assert "problem:        the image of RAM block 'pc.bios', ram/pc.bios.img is missing" in text
    assert re.search(r"^    pc\.bios +256 KiB +262144 +64 +\? +47 +17 +0$", text, re.M)
    assert "in 6 blocks, ? of 16514 pages non-zero" in text
    result = cli(str(folder), "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["problems"] == list(report.problems)


def test_corruptedDeviceState(captures: dict[str, Path], tmp_path: Path) -> None:
    folder = copyCapture(captures["cap72-1"], tmp_path / "c")
    data = bytearray((folder / "device-state.bin").read_bytes())
    data[48] = 0x05  # the second section's FULL byte
    (folder / "device-state.bin").write_bytes(bytes(data))
    report = inspectPath(str(folder))
    assert not report.complete
    # The walk looks for timer's footer followed by the cpu_common header VMDESC lists next.
    assert report.problems == (
        "the device state device-state.bin: device section 'timer' (id 0) has no footer",
    )
    assert len(report.devices) == 31  # as the manifest lists them


def test_missingVMDesc(captures: dict[str, Path], tmp_path: Path) -> None:
    folder = copyCapture(captures["cap10-1"], tmp_path / "c")
    (folder / "vmdesc.json").unlink()
    report = inspectPath(str(folder))
    assert not report.complete
    assert report.problems == ("the VMDESC file vmdesc.json is missing",)
    assert report.devicesFrom == "device-state" and len(report.devices) == 31


@pytest.mark.parametrize("keep", [5, 160, 300_000, -100])
def test_truncatedStream(streams: dict[str, Path], tmp_path: Path, keep: int) -> None:
    data = streams["cap10-4"].read_bytes()
    cut = data[:keep]
    path = tmp_path / "cut.mig"
    path.write_bytes(cut)
    report = inspectPath(str(path))
    assert not report.complete and report.exitStatus == 1
    error = report.parseError
    assert error is not None and 0 <= error.offset <= len(cut)
    assert report.problems == (str(error),)
    if keep == -100:
        # Cut in the device state: the end is not the EOF marker and VMDESC.
        assert error.field == "EOF" and "cut short" in error.reason and error.offset == len(cut)
        assert report.blocks[0].pagesNonZero == 59
    else:
        assert f"the stream is cut short: the file ends at byte {len(cut)}, inside a record" in error.reason
    if keep == 300_000:
        assert error.field.startswith("RAM PART section")
        assert 0 < report.blocks[0].pagesNonZero < 59  # the pages before the cut
    result = cli(str(path))
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: plain migration stream, {sizeText(len(cut))}, does NOT parse to the end"
    assert re.fullmatch(rf"  problem: +{re.escape(str(error))}", lines[1]), lines[1]
    data = json.loads(cli(str(path), "--json").stdout)
    assert data["parse_error"] == {"offset": error.offset, "field": error.field, "reason": error.reason}


def test_corruptedStream(streams: dict[str, Path], tmp_path: Path) -> None:
    """
    A bad section type right after the configuration: the offset and the
    field of the error.
    """
    data = bytearray(streams["cap72-4"].read_bytes())
    at = 8 + len(buildConfiguration("pc-i440fx-7.2"))
    assert data[at] == SECTION_START
    data[at] = 0x09
    path = tmp_path / "bad.mig"
    path.write_bytes(bytes(data))
    report = inspectPath(str(path))
    assert not report.complete
    assert report.parseError is not None
    assert (report.parseError.offset, report.parseError.field, report.parseError.reason) == (
        at + 1, "section type", "unknown section type 0x09")
    assert report.machine == "pc-i440fx-7.2" and report.blocks == ()
    assert f"problem:        at byte {at + 1}, section type: unknown section type 0x09" in renderText(report)


def test_notInspectable(captures: dict[str, Path], tmp_path: Path) -> None:
    """
    Paths that are neither a capture nor a migration stream: exit status 2
    and one line naming the path, never a traceback.
    """
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.txt").write_text("hello\n")
    (tmp_path / "zero.mig").write_bytes(b"")
    (tmp_path / "multifd.bin").write_bytes(recorded("cap10-4").streams[1][:4096])
    corrupt = copyCapture(captures["cap72-1"], tmp_path / "corrupt")
    (corrupt / "manifest.json").write_text("{not json")
    cases = {
        tmp_path / "nothing": "no such file or folder",
        tmp_path / "empty": "no manifest.json: not a capture",
        tmp_path / "text.txt": "not a capture folder or a migration stream file (it starts with 68656c6c",
        tmp_path / "zero.mig": "empty file: not a migration stream",
        tmp_path / "multifd.bin": "a multifd channel (it starts with 0x11223344)",
        corrupt: "manifest.json is corrupted (not JSON",
    }
    for path, message in cases.items():
        with pytest.raises(InspectError) as caught:
            inspectPath(str(path))
        assert message in str(caught.value) and str(caught.value).startswith(str(path))
    for path, message in list(cases.items())[:3]:
        result = cli(str(path))
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr == f"twisted-multifd: error: cannot inspect {path}: {inspectError(path)}\n"
        assert message in result.stderr and "Traceback" not in result.stderr


def inspectError(path: Path) -> str:
    with pytest.raises(InspectError) as caught:
        inspectPath(str(path))
    return caught.value.reason


def test_usageErrors(captures: dict[str, Path]) -> None:
    for args, message in [
        ((), "what to inspect? Give a capture folder or a migration stream file."),
        (("a", "b"), "one path only, not also b"),
        (("--page-size", "1000", "x"), "--page-size must be a power of two"),
        (("--bogus", "x"), "option --bogus not recognized"),
    ]:
        result = cli(*args)
        assert result.returncode == 2
        assert f"twisted-multifd: error: {message}" in result.stderr
        assert "Traceback" not in result.stderr


# The command line


def test_cliCapture(captures: dict[str, Path]) -> None:
    folder = captures["cap10-4-zstd"]
    result = cli(str(folder))
    assert result.returncode == 0, result.stderr
    assert result.stdout == renderText(inspectPath(str(folder)))
    assert re.search(r"^  compression: +zstd$", result.stdout, re.M)
    assert result.stderr == ""
    # --json before or after the path.
    for args in (("--json", str(folder)), (str(folder), "--json")):
        result = cli(*args)
        assert result.returncode == 0
        data = json.loads(result.stdout)
        assert data == reportToJSON(inspectPath(str(folder)))
        assert data["compression"] == "zstd" and data["complete"] is True
        assert len(data["devices"]) == 31


def test_cliStreamOnStandardInput(streams: dict[str, Path]) -> None:
    with open(streams["cap72-4"], "rb") as f:
        result = subprocess.run(
            [sys.executable, "-m", "twisted_multifd", "inspect", "-", "--json"],
            stdin=f, capture_output=True, timeout=60, cwd=REPO, check=False,
        )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["path"] == "-" and data["kind"] == "stream" and data["machine"] == "pc-i440fx-7.2"
    assert data["pages_nonzero"] == 108


# Pieces


def test_countNonZeroPages(tmp_path: Path) -> None:
    """
    Holes are skipped, data extents read; pages of written zeros are zero;
    extents that start or end inside a page count the page once.
    """
    path = tmp_path / "image"
    length = 64 << 20
    with open(path, "wb") as f:
        f.truncate(length)
        for offset, data in [
            (0, b"\x01"),                           # page 0
            (5 * PAGE + 100, b"\x02" * 5000),       # pages 5 and 6
            (8 << 20, bytes(4 << 20)),              # written zeros: no page
            ((20 << 20) - 1, b"\x03\x04"),          # the last byte of one page, the first of the next
            (length - PAGE, b"\x05" * PAGE),        # the last page
        ]:
            f.seek(offset)
            f.write(data)
    expected = nonZeroPages(path.read_bytes())
    assert expected == 6
    assert countNonZeroPages(str(path), length) == 6
    assert countNonZeroPages(str(path), length - PAGE) == 5  # only the first pages counted
    assert countNonZeroPages(str(path), 0) == 0


def test_holesAreNotRead(captures: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Inspecting a capture reads the images' data, not their holes: for the
    64 MiB pc.ram with 59 pages of data, far less than 64 MiB.
    """
    folder = captures["cap10-4"]
    probe = folder / "ram" / "pc.ram.img"
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
        if os.lseek(fd, 0, os.SEEK_HOLE) >= os.path.getsize(probe):
            pytest.skip("this file system does not report holes")
    except OSError:
        pytest.skip("this file system does not report holes")
    finally:
        os.close(fd)
    read = []
    realPread = os.pread

    def pread(fd: int, size: int, offset: int) -> bytes:
        data = realPread(fd, size, offset)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", pread)
    report = inspectCapture(str(folder))
    assert report.pagesNonZero == 111
    assert sum(read) < 8 << 20, sum(read)


def test_interrupted(captures: dict[str, Path], streams: dict[str, Path]) -> None:
    for path in (captures["cap72-1"], streams["cap72-1"]):
        with pytest.raises(InspectInterrupted):
            inspectPath(str(path), interrupted=lambda: True)


def test_humanSize() -> None:
    assert humanSize(48) == "48 B"
    assert humanSize(4096) == "4 KiB"
    assert humanSize(12916) == "12.6 KiB"
    assert humanSize(67641344) == "64.5 MiB"
    assert humanSize(1 << 30) == "1 GiB"
    assert humanSize(1 << 40) == "1 TiB"

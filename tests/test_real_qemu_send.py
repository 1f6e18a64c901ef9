"""``send`` and ``export`` bring a capture back to life in a real QEMU.

Each case captures a never-started 64 MiB VM (RAM from a file with known
contents) with ``python -m twisted_multifd receive --once``, exactly as
test_real_qemu_receive does, then plays the capture into a fresh destination
of the same QEMU version, machine type and RAM size: with ``send`` over 0, 1
or 4 multifd channels (and zlib/zstd on 10.0), or with ``export`` loaded
through ``-incoming 'exec:cat FILE'`` (and ``file:FILE`` on 10.0).

The destination must reach ``completed``; its memory (``pmemsave``) must
equal the captured ``pc.ram`` image outside the 0xA0000–0xFFFFF window; and
the guest, resumed with ``cont``, must report ``running``. Memory is read
before ``cont``: once resumed, the guest's firmware writes to RAM.

The destinations' RAM starts filled with junk (``initial_ram``), not zeros:
a zero page that is not sent, or sent but not applied, shows up as a
difference instead of passing unseen.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu_harness import (
    LEGACY_WINDOW,
    RAM_SIZE,
    REPO_ROOT,
    MigrationSettings,
    QemuBinary,
    QemuLab,
    QemuVM,
    memory_mismatch,
    write_junk_file,
)

COMMAND_TIMEOUT = 60.0
"""How long ``send``/``export``/``receive`` may take once the other end is ready."""


@dataclass(frozen=True)
class Capture:
    """A capture of a real VM, as the receiver CLI wrote it."""

    path: Path
    manifest: dict[str, Any]
    source_ram: bytes

    @property
    def machine(self) -> str:
        return str(self.manifest["machine"])

    @property
    def ram_image(self) -> bytes:
        block = {b["name"]: b for b in self.manifest["ram_blocks"]}["pc.ram"]
        return (self.path / block["file"]).read_bytes()


def capture_vm(lab: QemuLab, qemu: QemuBinary, settings: MigrationSettings, output: Path) -> Capture:
    """Migrate a fresh source VM into the receiver CLI; return its capture."""
    backing, expected = lab.backing_file()
    receiver = lab.start_receiver(settings.channels, output, name="capture-receiver")
    target = receiver.wait_for_address()
    source = lab.start_source(qemu, backing, settings, name="capture-source")
    lab.migrate(source, target)
    returncode = receiver.wait(COMMAND_TIMEOUT, lab.describe)
    assert returncode == 0, f"receiver exited with {returncode}\n{lab.describe()}"
    manifest = receiver.manifest()
    assert manifest["complete"] is True, f"{json.dumps(manifest, indent=1)}\n{lab.describe()}"
    capture = Capture(output, manifest, expected)
    assert memory_mismatch(expected, capture.ram_image, what="captured pc.ram") is None
    source.close()  # only the destination may run from here on
    return capture


def check_destination(lab: QemuLab, destination: QemuVM, capture: Capture) -> None:
    """Completed, memory equal to the capture, and the guest runs once resumed."""
    image = lab.destination_memory(destination)
    mismatch = memory_mismatch(capture.ram_image, image, ignore=LEGACY_WINDOW, what="destination pmemsave")
    assert mismatch is None, f"{mismatch}\n{lab.describe()}"
    status = destination.resume()
    assert status.get("status") == "running" and status.get("running") is True, (
        f"query-status after cont: {status}\n{lab.describe()}"
    )


def junk(tmp_path: Path) -> Path:
    return write_junk_file(tmp_path / "destination-initial-ram.bin")


@dataclass(frozen=True)
class SendCase:
    qemu: str
    captured_with: int
    channels: int
    compression: str | None = None
    zero_pages: str | None = None

    @property
    def id(self) -> str:
        parts = [f"qemu{self.qemu}", f"captured-mfd{self.captured_with}", f"send-mfd{self.channels}"]
        if self.compression:
            parts.append(self.compression)
        if self.zero_pages:
            parts.append(f"zero-pages-{self.zero_pages}")
        return "-".join(parts)


SEND_MATRIX = [
    SendCase("7.2", 4, 1),
    SendCase("7.2", 4, 4),
    SendCase("7.2", 0, 0),
    SendCase("7.2", 0, 4),
    SendCase("10.0", 4, 1),
    SendCase("10.0", 4, 4),
    SendCase("10.0", 4, 4, "zlib"),
    SendCase("10.0", 4, 4, "zstd"),
    SendCase("10.0", 0, 0),
    SendCase("10.0", 0, 2),
    SendCase("10.0", 4, 4, zero_pages="multifd"),
]


@pytest.mark.qemu
@pytest.mark.parametrize("case", SEND_MATRIX, ids=[case.id for case in SEND_MATRIX])
def test_send_capture_into_real_qemu(
    case: SendCase, qemu_lab: QemuLab, require_qemu: Callable[[str], QemuBinary], tmp_path: Path
) -> None:
    qemu = require_qemu(case.qemu)
    capture = capture_vm(qemu_lab, qemu, MigrationSettings(channels=case.captured_with), tmp_path / "capture")

    settings = MigrationSettings(channels=case.channels, compression=case.compression)
    # A 9.0+ destination clears a page in a packet's zero list only if it
    # received that page before: with zero lists, its RAM must start zeroed.
    initial_ram = None if case.zero_pages == "multifd" else junk(tmp_path)
    destination, address = qemu_lab.start_destination(
        qemu, settings, machine=capture.machine, ram_size=RAM_SIZE, initial_ram=initial_ram
    )
    args = ["send", str(capture.path), "--to", address, "--channels", str(case.channels),
            "--progress-interval", "0.05"]
    if case.compression:
        args += ["--compression", case.compression]
    if case.zero_pages:
        args += ["--zero-pages", case.zero_pages]
    send = qemu_lab.start_command(args, "send")
    returncode = send.wait(COMMAND_TIMEOUT, qemu_lab.describe)
    assert returncode == 0, f"send exited with {returncode}\n{qemu_lab.describe()}"
    log = send.stderr_path.read_text()
    assert "% of pages" in log and "every connection closed" in log, log

    check_destination(qemu_lab, destination, capture)


@dataclass(frozen=True)
class ExportCase:
    qemu: str
    captured_with: int
    scheme: str  # "exec" or "file"

    @property
    def id(self) -> str:
        return f"qemu{self.qemu}-captured-mfd{self.captured_with}-{self.scheme}"


EXPORT_MATRIX = [
    ExportCase("7.2", 4, "exec"),
    ExportCase("7.2", 0, "exec"),
    ExportCase("10.0", 4, "exec"),
    ExportCase("10.0", 4, "file"),
    ExportCase("10.0", 0, "file"),
]


@pytest.mark.qemu
@pytest.mark.parametrize("case", EXPORT_MATRIX, ids=[case.id for case in EXPORT_MATRIX])
def test_exported_stream_loads_in_real_qemu(
    case: ExportCase, qemu_lab: QemuLab, require_qemu: Callable[[str], QemuBinary], tmp_path: Path
) -> None:
    qemu = require_qemu(case.qemu)
    capture = capture_vm(qemu_lab, qemu, MigrationSettings(channels=case.captured_with), tmp_path / "capture")

    stream = tmp_path / "vm.mig"
    export = qemu_lab.start_command(["export", str(capture.path), "-o", str(stream)], "export")
    returncode = export.wait(COMMAND_TIMEOUT, qemu_lab.describe)
    assert returncode == 0, f"export exited with {returncode}\n{qemu_lab.describe()}"

    uri = f"exec:cat {stream}" if case.scheme == "exec" else f"file:{stream}"
    destination = qemu_lab.start_loading_destination(
        qemu, uri, machine=capture.machine, ram_size=RAM_SIZE, initial_ram=junk(tmp_path)
    )
    check_destination(qemu_lab, destination, capture)


@pytest.mark.qemu
def test_export_to_stdout_as_exec_command(
    qemu_lab: QemuLab, require_qemu: Callable[[str], QemuBinary], tmp_path: Path
) -> None:
    """``-incoming 'exec:twisted-multifd export CAPTURE -o -'``: no file in between."""
    qemu = require_qemu("10.0")
    capture = capture_vm(qemu_lab, qemu, MigrationSettings(channels=4), tmp_path / "capture")
    command = (f"cd {shlex.quote(str(REPO_ROOT))} && {shlex.quote(sys.executable)} -m twisted_multifd"
               f" export {shlex.quote(str(capture.path))} -o - 2>{shlex.quote(str(tmp_path / 'export.stderr'))}")
    destination = qemu_lab.start_loading_destination(
        qemu, f"exec:{command}", machine=capture.machine, ram_size=RAM_SIZE, initial_ram=junk(tmp_path)
    )
    check_destination(qemu_lab, destination, capture)

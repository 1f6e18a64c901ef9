"""The ``receive`` CLI captures migrations from real, unmodified QEMUs.

Each case migrates a never-started 64 MiB VM, whose RAM is a file with known
contents, into ``python -m twisted_multifd receive --once``, and checks the
capture byte for byte. "main-last" cases go through
:class:`qemu_harness.MainLastRelay`, so every multifd channel (init packet
included) reaches the receiver before the main channel: the order a real
network can produce, but a real source never does on its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu_harness import RAM_SIZE, MigrationSettings, QemuBinary, QemuLab, memory_mismatch

RECEIVER_EXIT_TIMEOUT = 30.0
"""How long the receiver may take to finish writing after QEMU says completed."""

MANIFEST_KEYS = {"complete", "error", "machine", "channels", "uuid", "ram_blocks"}


@dataclass(frozen=True)
class Case:
    """One source configuration of the matrix."""

    qemu: str
    settings: MigrationSettings
    main_last: bool = False

    @property
    def id(self) -> str:
        order = "main-last" if self.main_last else "natural"
        return f"qemu{self.qemu}-{self.settings.label}-{order}"


def _matrix() -> list[Case]:
    """Source configurations to run.

    Plain and multifd for both QEMUs, in natural and main-last order; 10.0
    additionally with compression (one of them reordered) and with zero
    pages sent on the main channel (``zero-page-detection=legacy``).
    """
    cases = []
    for qemu in ("7.2", "10.0"):
        cases += [Case(qemu, MigrationSettings(channels=n)) for n in (0, 1, 4)]
        cases += [Case(qemu, MigrationSettings(channels=n), main_last=True) for n in (1, 4)]
    cases += [
        Case("10.0", MigrationSettings(channels=4, compression="zlib")),
        Case("10.0", MigrationSettings(channels=4, compression="zstd"), main_last=True),
        Case("10.0", MigrationSettings(channels=4, zero_page_detection="legacy")),
    ]
    return cases


MATRIX = _matrix()


@pytest.mark.qemu
@pytest.mark.parametrize("case", MATRIX, ids=[case.id for case in MATRIX])
def test_receive_from_real_qemu(
    case: Case, qemu_lab: QemuLab, require_qemu: Callable[[str], QemuBinary], tmp_path: Path
) -> None:
    qemu = require_qemu(case.qemu)
    channels = case.settings.channels
    backing, expected = qemu_lab.backing_file()
    output = tmp_path / "capture"

    receiver = qemu_lab.start_receiver(channels, output)
    target = receiver.wait_for_address()
    if case.main_last:
        target = qemu_lab.start_relay(target, channels).address
    source = qemu_lab.start_source(qemu, backing, case.settings)
    machine = source.machine_type()

    qemu_lab.migrate(source, target)
    returncode = receiver.wait(RECEIVER_EXIT_TIMEOUT, qemu_lab.describe)
    assert returncode == 0, f"receiver exited with {returncode}\n{qemu_lab.describe()}"

    manifest = receiver.manifest()

    def context() -> str:
        return f"manifest: {json.dumps(manifest, indent=1)}\n{qemu_lab.describe()}"

    assert manifest.keys() >= MANIFEST_KEYS, f"missing {MANIFEST_KEYS - manifest.keys()}\n{context()}"
    assert manifest["complete"] is True, context()
    assert manifest["error"] is None, context()
    assert str(manifest["machine"]).startswith("pc-i440fx-"), context()
    assert manifest["machine"] == machine, context()
    assert manifest["channels"] == channels, context()

    blocks = {block["name"]: block for block in manifest["ram_blocks"]}
    assert "pc.ram" in blocks, context()
    ram = blocks["pc.ram"]
    assert ram["length"] == RAM_SIZE, context()
    image = (output / ram["file"]).read_bytes()
    assert len(image) == ram["length"], f"pc.ram image is {len(image)} bytes\n{context()}"

    source_ram = backing.read_bytes()
    assert memory_mismatch(expected, source_ram, what="source backing file") is None
    mismatch = memory_mismatch(source_ram, image, what="captured pc.ram")
    assert mismatch is None, f"{mismatch}\n{context()}"

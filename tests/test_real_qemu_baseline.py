"""QEMU → QEMU migrations that prove the real-QEMU harness itself.

If these fail, a failing receiver test says nothing about the receiver:
the source set-up (never-run VM whose RAM is a pre-filled file), the QMP
client or the multifd settings are wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from qemu_harness import LEGACY_WINDOW, MigrationSettings, QemuBinary, QemuLab, memory_mismatch


@pytest.mark.qemu
@pytest.mark.parametrize("label", ["7.2", "10.0"])
def test_qemu_to_qemu_multifd(label: str, qemu_lab: QemuLab, require_qemu: Callable[[str], QemuBinary]) -> None:
    qemu = require_qemu(label)
    settings = MigrationSettings(channels=4)
    backing, expected = qemu_lab.backing_file()
    destination, address = qemu_lab.start_destination(qemu, settings)
    source = qemu_lab.start_source(qemu, backing, settings)

    qemu_lab.migrate(source, address)
    image = qemu_lab.destination_memory(destination)

    # pmemsave reads guest-physical memory, which shows ROM/PAM/VGA instead of
    # pc.ram in the legacy window, so only the rest must match.
    mismatch = memory_mismatch(expected, image, ignore=LEGACY_WINDOW, what="destination pmemsave")
    assert mismatch is None, f"{mismatch}\n{qemu_lab.describe()}"
    # A never-started VM must not have written to its RAM file.
    assert memory_mismatch(expected, backing.read_bytes(), what="source backing file") is None

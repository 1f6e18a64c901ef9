"""Real QEMU 7.2 and 10.0 sources migrating with ``tls-creds`` into the receiver.

The receiver listens with ``--tls-cert/--tls-key/--tls-ca``; the sources use a
``tls-creds-x509`` client object (CA + client certificate) and check the
receiver's certificate against the migrate URI host (127.0.0.1). Pages are
checked as in ``test_real_qemu_receive.py``. 10.0 sends a TLS close_notify on
each multifd channel, 7.2 does not: both must end complete.

On "main last" under TLS: a QEMU source opens its multifd connections only
after the main channel's TLS handshake has completed, so the main connection
cannot arrive last at the TCP level. What matters to the receiver's sniffer is
the order of the decrypted bytes: the "main-last" cases go through
:class:`qemu_harness.MainLastRelay` in TLS mode, which forwards raw TLS
records and holds the main channel's application data back until every
multifd channel's init packet went through.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from qemu_harness import (
    LEGACY_WINDOW,
    RAM_SIZE,
    HarnessError,
    MigrationSettings,
    QemuBinary,
    QemuLab,
    memory_mismatch,
    poll_until,
    tls_object_args,
    write_tls_credentials,
)

RECEIVER_EXIT_TIMEOUT = 30.0


def _tls_args(files) -> list[str]:
    return ["--tls-cert", str(files.server_cert), "--tls-key", str(files.server_key), "--tls-ca", str(files.ca_cert)]


@pytest.mark.qemu
@pytest.mark.parametrize(
    "qemu_label,channels,main_last",
    [("7.2", 4, False), ("10.0", 4, False), ("7.2", 0, False), ("10.0", 0, False), ("7.2", 4, True), ("10.0", 4, True)],
    ids=["qemu7.2-mfd4", "qemu10.0-mfd4", "qemu7.2-plain", "qemu10.0-plain", "qemu7.2-mfd4-main-last",
         "qemu10.0-mfd4-main-last"],
)
def test_receive_tls_from_real_qemu(
    qemu_label: str, channels: int, main_last: bool, qemu_lab: QemuLab,
    require_qemu: Callable[[str], QemuBinary], tmp_path: Path,
) -> None:
    qemu = require_qemu(qemu_label)
    files = write_tls_credentials(tmp_path / "pki")
    backing, expected = qemu_lab.backing_file()
    output = tmp_path / "capture"

    receiver = qemu_lab.start_receiver(channels, output, extra_args=_tls_args(files))
    target = receiver.wait_for_address()
    if main_last:
        target = qemu_lab.start_relay(target, channels, tls=True).address
    settings = MigrationSettings(channels=channels, tls_creds="tls0")
    source = qemu_lab.start_source(qemu, backing, settings, extra_args=tls_object_args(files.qemu_dir))

    qemu_lab.migrate(source, target)
    returncode = receiver.wait(RECEIVER_EXIT_TIMEOUT, qemu_lab.describe)
    assert returncode == 0, f"receiver exited with {returncode}\n{qemu_lab.describe()}"

    manifest = receiver.manifest()

    def context() -> str:
        return f"manifest: {json.dumps(manifest, indent=1)}\n{qemu_lab.describe()}"

    assert manifest["complete"] is True, context()
    assert manifest["error"] is None, context()
    assert manifest["channels"] == channels, context()
    assert manifest["machine"] == source.machine_type(), context()
    blocks = {block["name"]: block for block in manifest["ram_blocks"]}
    ram = blocks["pc.ram"]
    assert ram["length"] == RAM_SIZE, context()
    image = (output / ram["file"]).read_bytes()
    source_ram = backing.read_bytes()
    assert memory_mismatch(expected, source_ram, what="source backing file") is None
    mismatch = memory_mismatch(source_ram, image, what="captured pc.ram")
    assert mismatch is None, f"{mismatch}\n{context()}"
    log = receiver.describe()
    assert "with TLS" in log
    if main_last:
        # Decrypted, the main channel's first bytes came after every multifd init packet.
        lines = log.splitlines()
        main_at = next(i for i, line in enumerate(lines) if "classified as main channel" in line)
        joined = [i for i, line in enumerate(lines) if ": joins migration" in line]
        assert len(joined) == channels and max(joined) < main_at, log


@pytest.mark.qemu
@pytest.mark.parametrize("which", ["no-client-cert", "other-ca"])
def test_source_without_valid_client_certificate_is_refused(
    which: str, qemu_lab: QemuLab, require_qemu: Callable[[str], QemuBinary], tmp_path: Path
) -> None:
    qemu = require_qemu("10.0")
    files = write_tls_credentials(tmp_path / "pki")
    backing, _ = qemu_lab.backing_file()
    output = tmp_path / "capture"
    receiver = qemu_lab.start_receiver(2, output, extra_args=_tls_args(files))
    target = receiver.wait_for_address()
    qemu_dir = files.bare_qemu_dir if which == "no-client-cert" else files.rogue_qemu_dir
    source = qemu_lab.start_source(qemu, backing, MigrationSettings(channels=2, tls_creds="tls0"),
                                   extra_args=tls_object_args(qemu_dir))
    with pytest.raises(HarnessError, match="migration failed"):
        qemu_lab.migrate(source, target, timeout=60)
    deadline = time.monotonic() + 10
    while "TLS handshake with 127.0.0.1" not in receiver.describe() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = receiver.describe()
    assert "TLS handshake with 127.0.0.1" in log and "connection refused" in log, log
    assert receiver.alive(), log
    assert not (output / "manifest.json").exists()


@pytest.mark.qemu
@pytest.mark.parametrize("qemu_label", ["7.2", "10.0"])
def test_relay_listens_with_tls(
    qemu_label: str, qemu_lab: QemuLab, require_qemu: Callable[[str], QemuBinary], tmp_path: Path
) -> None:
    """Source with tls-creds → ``relay --tls-cert ... --tls-ca ...`` → plain QEMU destination."""
    qemu = require_qemu(qemu_label)
    files = write_tls_credentials(tmp_path / "pki")
    backing, _ = qemu_lab.backing_file()
    plain = MigrationSettings(channels=4)
    destination, address = qemu_lab.start_destination(qemu, plain)
    address_file = tmp_path / "relay.address"
    relay = qemu_lab.start_command(
        ["relay", "--listen", "tcp:0:interface=127.0.0.1", "--to", address, "--channels", "4", "--once",
         "--address-file", str(address_file), *_tls_args(files)], "relay")
    poll_until(lambda: address_file.exists() or not relay.alive(), 30, "the relay's address", relay.describe)
    target = address_file.read_text().strip()
    source = qemu_lab.start_source(qemu, backing, MigrationSettings(channels=4, tls_creds="tls0"),
                                   extra_args=tls_object_args(files.qemu_dir))
    qemu_lab.migrate(source, target)
    memory = qemu_lab.destination_memory(destination)
    mismatch = memory_mismatch(backing.read_bytes(), memory, ignore=LEGACY_WINDOW, what="destination memory")
    assert mismatch is None, f"{mismatch}\n{qemu_lab.describe()}"
    assert relay.wait(RECEIVER_EXIT_TIMEOUT, qemu_lab.describe) == 0, qemu_lab.describe()
    assert "with TLS" in relay.describe()

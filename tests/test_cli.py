"""
The command line over real sockets: recorded QEMU connections are played into
a `twisted-multifd receive --once` process, main channel last.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from typing import Any

import pytest

from captures import recorded


def _waitForFile(path: str, process: subprocess.Popen, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and open(path).read().strip():
            return open(path).read().strip()
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"receiver exited early ({process.returncode}): {out or ''}{err or ''}")
        time.sleep(0.02)
    raise AssertionError("receiver did not write its address file")


def _startReceiver(tmp_path, channels: int, *extra: str) -> tuple[subprocess.Popen, tuple[str, int]]:
    addressFile = str(tmp_path / "address")
    process = subprocess.Popen(
        [sys.executable, "-m", "twisted_multifd", "receive", "--listen", "tcp:0:interface=127.0.0.1",
         "--channels", str(channels), "--output", str(tmp_path / "capture"), "--once",
         "--address-file", addressFile, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    address = _waitForFile(addressFile, process)
    kind, host, port = address.split(":")
    assert kind == "tcp"
    return process, (host, int(port))


@pytest.mark.parametrize("name", ["cap72-4", "cap10-4-zstd"])
def test_receiveMainChannelLast(tmp_path, name: str) -> None:
    migration = recorded(name)
    process, address = _startReceiver(tmp_path, migration.channels)
    try:
        sockets = []
        # Multifd channels first, in reverse, then the main channel last.
        for index in [*range(migration.channels, 0, -1), 0]:
            s = socket.create_connection(address)
            sockets.append((index, s))
        for index, s in sockets:
            s.sendall(migration.streams[index])
        # Like QEMU: multifd channels are closed before the main channel.
        for index, s in sockets:
            s.shutdown(socket.SHUT_WR)
        for index, s in sockets:
            s.close()
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    manifest = json.load(open(tmp_path / "capture" / "manifest.json"))
    assert manifest["complete"] is True
    assert manifest["error"] is None
    assert manifest["channels"] == migration.channels
    block = {b["name"]: b for b in manifest["ram_blocks"]}["pc.ram"]
    image = open(tmp_path / "capture" / block["file"], "rb").read()
    assert image == migration.memory
    assert "complete" in err


def test_incompleteCaptureExitsNonZero(tmp_path) -> None:
    migration = recorded("cap72-1")
    process, address = _startReceiver(tmp_path, 1)
    try:
        main = socket.create_connection(address)
        channel = socket.create_connection(address)
        channel.sendall(migration.streams[1])
        main.sendall(migration.streams[0][: len(migration.streams[0]) // 2])
        channel.close()
        main.close()
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1
    manifest = json.load(open(tmp_path / "capture" / "manifest.json"))
    assert manifest["complete"] is False
    assert "main channel" in manifest["error"] and "middle of the stream" in manifest["error"]


def test_cannotListen(tmp_path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "twisted_multifd", "receive", "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--output", str(tmp_path / "c"), "--once"],
        capture_output=True, text=True, timeout=60,
    )
    busy.close()
    assert result.returncode == 2
    assert "cannot listen" in result.stderr


def test_badOption() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twisted_multifd", "receive", "--channels", "300"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "channels" in result.stderr and "Traceback" not in result.stderr


def test_twistdPlugin(tmp_path) -> None:
    """
    `twistd -n multifd receive --once` receives a migration (main channel last).
    """
    migration = recorded("cap72-1")
    addressFile = str(tmp_path / "address")
    process = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "--logfile=-", "multifd", "receive",
         "--listen", "tcp:0:interface=127.0.0.1", "--channels", "1", "--output", str(tmp_path / "capture"),
         "--once", "--address-file", addressFile],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )
    try:
        _, host, port = _waitForFile(addressFile, process).split(":")
        channel = socket.create_connection((host, int(port)))
        main = socket.create_connection((host, int(port)))
        channel.sendall(migration.streams[1])
        main.sendall(migration.streams[0])
        channel.close()
        main.close()
        out, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert "complete" in out
    manifest = json.load(open(tmp_path / "capture" / "manifest.json"))
    assert manifest["complete"] is True
    assert open(tmp_path / "capture" / "ram" / "pc.ram.img", "rb").read() == migration.memory


def test_stoppedMidMigrationLeavesAnIncompleteManifest(tmp_path) -> None:
    """
    SIGTERM while a migration is loading: exit status 1 and a manifest that
    says why the capture is not complete.
    """
    migration = recorded("cap72-1")
    process, address = _startReceiver(tmp_path, 1)
    try:
        main = socket.create_connection(address)
        channel = socket.create_connection(address)
        main.sendall(migration.streams[0][:100_000])
        channel.sendall(migration.streams[1][:100_000])
        deadline = time.monotonic() + 30
        # Wait until loading has started (the block list was logged).
        lines = []
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            lines.append(line)
            if "RAM blocks" in line:
                break
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1, "".join(lines) + err
    manifest = json.load(open(tmp_path / "capture" / "manifest.json"))
    assert manifest["complete"] is False
    assert manifest["error"].endswith("the receiver was stopped")


def test_completeCaptureIsNeverOverwritten(tmp_path) -> None:
    capture = tmp_path / "capture"
    capture.mkdir()
    (capture / "manifest.json").write_text('{"complete": true}')
    result = subprocess.run(
        [sys.executable, "-m", "twisted_multifd", "receive", "--listen", "tcp:0:interface=127.0.0.1",
         "--output", str(capture), "--once"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "already holds a complete capture" in result.stderr
    assert (capture / "manifest.json").read_text() == '{"complete": true}'


def _readTerminal(master: int, process: subprocess.Popen, until: Any, timeout: float = 30.0) -> bytes:
    """
    What the process wrote to its terminal, read until C{until(text)} holds
    or the terminal closes.
    """
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                return output
            if not chunk:
                return output
            output += chunk
            if until(output.decode("utf-8", "replace")):
                return output
    raise AssertionError(f"nothing like that on the terminal: {output!r}")


def test_receiveDrawsAStatusLineOnATerminal(tmp_path) -> None:
    """
    With stderr on a terminal, `receive` redraws a status line (percent of
    RAM, rate, ETA, channels) while a migration loads, and clears it: what
    is left on the screen is the log lines, the last saying the capture is
    complete.
    """
    from test_progress import Screen

    migration = recorded("cap72-1")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    addressFile = str(tmp_path / "address")
    process = subprocess.Popen(
        [sys.executable, "-m", "twisted_multifd", "receive", "--listen", "tcp:0:interface=127.0.0.1",
         "--channels", "1", "--output", str(tmp_path / "capture"), "--once", "--address-file", addressFile],
        stdout=subprocess.PIPE, stderr=slave, text=True,
    )
    os.close(slave)
    try:
        _, host, port = _waitForFile(addressFile, process).split(":")
        main = socket.create_connection((host, int(port)))
        channel = socket.create_connection((host, int(port)))
        half = [len(stream) // 2 for stream in migration.streams]
        main.sendall(migration.streams[0][: half[0]])
        channel.sendall(migration.streams[1][: half[1]])
        # Held until the status line shows the RAM percentage.
        before = _readTerminal(master, process, lambda text: re.search(r"\d+% of [\d.]+ MiB", text))
        main.sendall(migration.streams[0][half[0]:])
        channel.sendall(migration.streams[1][half[1]:])
        channel.close()
        main.close()
        after = _readTerminal(master, process, lambda text: False, timeout=60)
        process.wait(timeout=60)
    finally:
        process.kill()
        os.close(master)
    assert process.returncode == 0
    text = (before + after).decode()
    status = re.search(r"migration 1 from 127\.0\.0\.1: loading +\d+% of [\d.]+ MiB, [\d.]+ [KM]iB received,"
                       r" [^,]+/s, ETA [^,]+, 2/2 channels", text)
    assert status, text
    assert "\x1b[J" in text
    screen = Screen()
    screen.feed(text)
    rows = [row for row in screen.rows if row]
    assert rows[-1].startswith("twisted-multifd: migration 1 from 127.0.0.1: complete"), rows
    assert not [row for row in rows if "% of" in row], rows  # no status line left, none mixed into a log line
    assert all(row.startswith("twisted-multifd: ") for row in rows), rows
    assert not [row for row in rows if "pages of" in row]  # no progress log lines either


def test_progressLogOnATerminal(tmp_path) -> None:
    """
    --progress log keeps the log lines even on a terminal: no escape codes.
    """
    master, slave = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "twisted_multifd", "receive", "--listen", "tcp:0:interface=127.0.0.1",
         "--output", str(tmp_path / "capture"), "--progress", "log", "--address-file", str(tmp_path / "a")],
        stdout=subprocess.PIPE, stderr=slave,
    )
    os.close(slave)
    try:
        _waitForFile(str(tmp_path / "a"), process)
        text = _readTerminal(master, process, lambda text: "listening on" in text).decode()
        process.send_signal(signal.SIGTERM)
        text += _readTerminal(master, process, lambda text: False).decode()
        process.wait(timeout=60)
    finally:
        process.kill()
        os.close(master)
    assert "listening on" in text and "\x1b" not in text


def test_badProgressMode() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twisted_multifd", "receive", "--progress", "fancy"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--progress must be auto, tty, log, off; not 'fancy'" in result.stderr

"""Send benchmark: a real QEMU source vs. ``twisted-multifd send`` of a capture.

For each multifd channel count, a capture of the VM is made once (a real
QEMU source migrating into ``python -m twisted_multifd receive --once``;
its ``pc.ram`` is checked against the backing file by SHA-256, and it is
kept under ``WORKDIR/send/captures`` and reused while the backing file is
the same; a reused capture is hashed again, which also reads it into the
page cache, as hashing the backing file does for the QEMU source's memory).
Then runs alternate between

  (a) QEMU source -> fresh QEMU destination (``-incoming defer``, same
      build): exactly :func:`bench.receive.run_qemu_destination`, and
  (b) ``python -m twisted_multifd send CAPTURE`` -> fresh QEMU destination
      of the same build, machine, RAM size and multifd settings.

The VM is the one :mod:`bench.receive` migrates: never started (``-S``),
its RAM a file of random bytes (made once, reused), so every page of
``pc.ram`` is a data page. ``max-bandwidth`` is lifted on the QEMU source.

Wall time runs from the start of sending to the destination QEMU's MIGRATION
``completed`` event. For (a) the start is issuing ``migrate`` on the
already-running source. For (b) the ``send`` process is started first and
waits, its interpreter up and its modules imported, until it is told to go
(a line on its stdin): like the QEMU source, its start-up is not timed, but
it is measured and shown (``startup s``). Everything from parsing the
command line and loading the capture on is timed.

Every run is checked: the destination reaches ``completed`` (its
``query-migrate`` too) and ``send`` exits with 0. On the first (b) run of
each channel count (``--verify all``: every run) the destination's memory
(``pmemsave``) is compared with the backing file by SHA-256 outside the
0xA0000-0xFFFFF window (VGA/ROM there, not ``pc.ram``).

Peak RSS and CPU of the sender are taken as in :mod:`bench.receive` (VmHWM
samples from /proc; ``wait4`` rusage minus the start-up's CPU). The sender
runs from a copy of ``twisted_multifd/`` taken at start, so edits to the
work tree during a benchmark do not change what is measured.

Optional extra runs (not in the table): ``--py-spy N`` samples one ``send``
with N channels with py-spy, ``--profile N`` runs one under cProfile.
``--compare DIR`` adds a third run to every round, ``send`` from the package
in DIR (e.g. a copy of the committed tree), with a table of its own: on a
shared machine, two versions are best compared within one invocation.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qemu_harness import (
    LEGACY_WINDOW,
    HarnessError,
    HarnessTimeout,
    ManagedProcess,
    QemuLab,
    QemuVM,
    package_environment,
)

from bench.receive import (
    RSS_SAMPLE_INTERVAL,
    Context,
    RunResult,
    WallComparison,
    Window,
    _check_capture,
    _cpu_pair,
    _delta,
    _fingerprint,
    _fmt,
    _median_max,
    _proc_cpu_seconds,
    _proc_hwm_kib,
    _record_failure,
    _start_py_spy,
    add_common_arguments,
    bench_command,
    code_fact,
    code_version,
    ensure_backing_file,
    machine_facts,
    order_table,
    qemu_for,
    write_results,
    run_qemu_destination,
    run_round,
    sha256_file,
    snapshot_library,
    stop_py_spy,
    summarize_cprofile,
    summarize_py_spy,
    wait_for_completion,
    wait_for_quiet,
)

PMEMSAVE_TIMEOUT = 120.0

# The child that runs ``send``: imports everything, says "ready" on the fd
# it is given, waits for a line on stdin, then runs the CLI as
# ``python -m twisted_multifd send ARGS`` would: through ``console()``, which
# exits at once with the status (no interpreter teardown, about 0.05 CPU s).
# Under cProfile (TMF_BENCH_PROFILE set) it returns instead, so that the
# profile gets written.
_CHILD = """
import os, sys
from twisted.internet import epollreactor
epollreactor.install()
from twisted_multifd import _cli, _sendcommand, _sender, _capturereader
ready = int(sys.argv[1])
os.write(ready, b"ready\\n")
os.close(ready)
sys.stdin.readline()
if os.environ.get("TMF_BENCH_PROFILE") or not hasattr(_cli, "console"):  # (or an older tree, --code)
    _cli.main(["send", *sys.argv[2:]])
else:
    sys.argv = ["twisted-multifd", "send", *sys.argv[2:]]
    _cli.console()
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "backing file (shared with bench receive); captures, logs, results under WORKDIR/send")
    parser.add_argument(
        "--verify", choices=("first", "all", "none"), default="first",
        help="pmemsave of the destination after send vs. the backing file: first run per channel count "
        "(default), all, none",
    )
    parser.add_argument("--py-spy", type=int, action="append", default=[], metavar="N", dest="py_spy",
                        help="after the timed runs, one extra send with N channels sampled by py-spy (repeatable)")
    parser.add_argument("--profile", type=int, action="append", default=[], metavar="N",
                        help="after the timed runs, one extra send with N channels under cProfile (repeatable)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="before each run, wait up to this many seconds for a quiet machine (default 30)")
    parser.add_argument("--only", choices=("qemu", "ours"), help="run only one kind (for diagnosis)")
    parser.add_argument(
        "--code", type=Path,
        help="run send from the twisted_multifd package in this folder (e.g. an older version, to compare);"
        " default: a copy of the work tree's, taken at start",
    )
    parser.add_argument(
        "--compare", type=Path, metavar="DIR",
        help="in every round, also run send from the twisted_multifd package in DIR (e.g. a copy of the"
        " committed tree), to compare two versions within one invocation; its own table follows",
    )
    parser.add_argument("--json", type=Path, help="write all results here (default WORKDIR/send/results-TIME.json)")


# --------------------------------------------------------------------------
# Captures
# --------------------------------------------------------------------------


def ensure_capture(ctx: Context, channels: int, root: Path) -> Path:
    """``root/chN``: a capture of the VM migrated over N channels by a real
    QEMU source, made with ``receive --once`` and checked against the backing
    file; reused while it is complete and made from the same backing file."""
    folder = root / f"ch{channels}"
    capture = folder / "capture"
    stamp = folder / "backing.sha256"
    if stamp.exists() and stamp.read_text().strip() == ctx.backing_sha256 and (capture / "manifest.json").exists():
        manifest = json.loads((capture / "manifest.json").read_text())
        if manifest.get("complete") is True and manifest.get("channels") == channels:
            started = time.monotonic()
            if _reused_capture_matches(ctx, capture, manifest):
                print(f"capture for {channels} channels reused (pc.ram sha256 ok, read in"
                      f" {time.monotonic() - started:.1f}s): {capture}")
                return capture
            print(f"capture for {channels} channels no longer matches the backing file: made again")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.monotonic()
    result = RunResult("capture", channels, 0)
    with QemuLab(folder / "made") as lab:
        receiver = lab.start_receiver(channels, capture, root=ctx.code_root)
        address = receiver.wait_for_address()
        source = lab.start_source(ctx.qemu, ctx.backing, ctx.settings(channels), ram_size=ctx.size)
        t0 = time.monotonic()
        source.migrate(address)
        wait_for_completion(source, t0, ctx.timeout, lab.describe, receiver=receiver)
        _check_capture(ctx, result, receiver, channels, True, lab.describe)
    stamp.write_text(ctx.backing_sha256 + "\n")
    print(f"capture for {channels} channels made in {time.monotonic() - started:.1f}s: {capture}"
          f" (pc.ram sha256 ok)", flush=True)
    return capture


def _reused_capture_matches(ctx: Context, capture: Path, manifest: dict[str, Any]) -> bool:
    """Whether a kept capture's pc.ram still hashes to the backing file's digest.

    Reading every image file back also puts the capture in the page cache, as
    hashing the backing file does for the QEMU source's memory: with
    ``--drop-caches`` a reused capture would otherwise be read from the disk
    in the first ``send`` run of its channel count only, and not the QEMU
    source's memory in any run.
    """
    ram = None
    for block in manifest.get("ram_blocks", []):
        image = capture / block["file"]
        digest = sha256_file(image)
        if block["name"] == "pc.ram":
            ram = digest
    return ram == ctx.backing_sha256


# --------------------------------------------------------------------------
# The send run
# --------------------------------------------------------------------------


class SendProcess(ManagedProcess):
    """``twisted-multifd send``, started and imported but held until :meth:`go`."""

    def __init__(self, code_root: Path, args: list[str], run_dir: Path, python_args: list[str]) -> None:
        ready_read, ready_write = os.pipe()
        env = package_environment(code_root)
        if python_args:
            env["TMF_BENCH_PROFILE"] = "1"
        # A script file rather than -c, so that -m cProfile can run it too.
        script = run_dir / "send_child.py"
        script.write_text(_CHILD)
        argv = [sys.executable, *python_args, str(script), str(ready_write), *args]
        started = time.monotonic()
        try:
            super().__init__(
                "send", argv, run_dir, env=env, cwd=code_root, stdin=subprocess.PIPE, pass_fds=(ready_write,)
            )
        finally:
            os.close(ready_write)
        try:
            ready, _, _ = select.select([ready_read], [], [], 60)
            line = os.read(ready_read, 64) if ready else b""
        finally:
            os.close(ready_read)
        if line != b"ready\n":
            self.close()
            raise HarnessError(f"send did not start: {line!r}\n{self.describe()}")
        self.startup = time.monotonic() - started

    def go(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(b"go\n")
        self.popen.stdin.close()


def wait_for_send(
    destination: QemuVM, sender: SendProcess, started: float, timeout: float, describe: Any
) -> dict[str, Any]:
    """Block until the destination's MIGRATION ``completed`` event and the
    sender's exit (reaped with ``wait4``); sample the sender's VmHWM until it
    exits. Times are seconds after ``started``."""
    done: dict[str, Any] = {"destination": None, "sender": None, "rusage": None, "peak_rss_kib": None}
    pid = sender.popen.pid
    pidfd = os.pidfd_open(pid)
    watched = {destination.qmp.fileno(): "destination", pidfd: "sender"}
    try:
        deadline = started + timeout
        while watched:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HarnessTimeout(f"no end from {', '.join(sorted(watched.values()))} within {timeout:.0f}s\n"
                                     f"{describe()}\n{sender.describe()}")
            sampling = done["sender"] is None
            ready, _, _ = select.select(list(watched), [], [], min(remaining, RSS_SAMPLE_INTERVAL if sampling else 1.0))
            now = time.monotonic()
            if sampling:
                done["peak_rss_kib"] = _proc_hwm_kib(pid) or done["peak_rss_kib"]
            for fd in ready:
                if watched.get(fd) == "sender":
                    _, status, rusage = os.wait4(pid, 0)
                    sender.popen.returncode = os.waitstatus_to_exitcode(status)
                    done["sender"], done["rusage"] = now - started, rusage
                    del watched[fd]
                    if sender.popen.returncode != 0:
                        raise HarnessError(f"send exited with {sender.popen.returncode}\n{sender.describe()}\n"
                                           f"{describe()}")
                elif watched.get(fd) == "destination":
                    for event in destination.qmp.take_events():
                        if event.get("event") != "MIGRATION":
                            continue
                        status = event.get("data", {}).get("status")
                        if status == "completed":
                            done["destination"] = now - started
                            del watched[fd]
                        elif status in ("failed", "cancelled"):
                            raise HarnessError(f"destination: migration {status}; "
                                               f"{json.dumps(destination.query_migrate())}\n{describe()}\n"
                                               f"{sender.describe()}")
    finally:
        os.close(pidfd)
    return done


def destination_digest(destination: QemuVM, size: int, path: Path) -> str:
    """SHA-256 of the destination's guest-physical memory [0, size) outside
    the legacy window (read with ``pmemsave``, then deleted)."""
    destination.qmp.execute("pmemsave", {"val": 0, "size": size, "filename": str(path)}, timeout=PMEMSAVE_TIMEOUT)
    try:
        return _digest_outside_window(path, size)
    finally:
        path.unlink(missing_ok=True)


def _digest_outside_window(path: Path, size: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for start, end in ((0, LEGACY_WINDOW[0]), (LEGACY_WINDOW[1], size)):
            f.seek(start)
            remaining = end - start
            while remaining:
                chunk = f.read(min(remaining, 8 * 1024 * 1024))
                if not chunk:
                    raise HarnessError(f"{path} is shorter than {size} bytes")
                sha.update(chunk)
                remaining -= len(chunk)
    return sha.hexdigest()


def run_send(
    ctx: Context, code_root: Path, capture: Path, channels: int, index: int, verify: str | None,
    py_spy: Path | None = None, profile: Path | None = None, kind: str = "ours",
) -> RunResult:
    """``verify``: the backing file's digest outside the legacy window, or None.
    ``kind``: ``ours``, or ``compare`` for a run of the ``--compare`` package."""
    waited = wait_for_quiet(ctx.settle)
    label = "ours-pyspy" if py_spy else "ours-cprofile" if profile else kind
    result = RunResult(label, channels, index)
    result.quiet_wait_seconds = round(waited, 1)
    run_dir = ctx.run_dir(f"{label}-ch{channels}-{index}")
    spy: subprocess.Popen[bytes] | None = None
    sender: SendProcess | None = None
    try:
        with QemuLab(run_dir) as lab:
            destination, uri = lab.start_destination(ctx.qemu, ctx.settings(channels), ram_size=ctx.size)
            args = [str(capture), "--to", uri, "--channels", str(channels), "--progress-interval", "1000"]
            python_args = ["-m", "cProfile", "-o", str(profile)] if profile else []
            sender = SendProcess(code_root, args, run_dir, python_args)
            result.extra["sender_startup_seconds"] = round(sender.startup, 3)
            if py_spy is not None:
                spy = _start_py_spy(sender.popen.pid, py_spy, run_dir)
            cpu_before = _cpu_pair(destination, sender.popen.pid)  # (destination, sender)
            window = Window()
            started = time.monotonic()
            sender.go()
            done = wait_for_send(destination, sender, started, ctx.timeout, lab.describe)
            window.close()
            status = destination.query_migrate().get("status")
            if status != "completed":
                raise HarnessError(f"destination status {status!r} after its completed event\n{lab.describe()}")
            result.wall = done["destination"]
            result.extra["sender_exit_seconds"] = done["sender"]
            result.destination_peak_rss_kib = done["peak_rss_kib"]  # the sender's, in this table
            rusage = done["rusage"]
            result.source_cpu_seconds = _delta(rusage.ru_utime + rusage.ru_stime, cpu_before[1])
            result.destination_cpu_seconds = _delta(_proc_cpu_seconds(destination.popen.pid), cpu_before[0])
            window.record(result)
            if verify is not None:
                digest = destination_digest(destination, ctx.size, run_dir / "pmemsave.bin")
                if digest != verify:
                    raise HarnessError(f"destination memory sha256 {digest} != backing file {verify}"
                                       " (outside the legacy window)")
                result.verified = True
            result.ok = True
    except Exception as exc:  # noqa: BLE001  (recorded, reported, and the benchmark goes on)
        _record_failure(result, exc, run_dir)
    finally:
        if sender is not None:
            sender.close()
        if spy is not None:
            stop_py_spy(spy)
    return result


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def summary_table(results: list[RunResult], channel_counts: list[int], kind: str = "ours") -> str:
    rows = [
        (
            "| channels | QEMU source wall s (median / min / max) | send wall s (median / min / max) "
            "| send / QEMU (medians) | send / QEMU (min / max) | send / QEMU per pair: median (min–max) "
            "| send startup s (median, not timed) "
            "| send peak RSS MiB (median / max) | CPU s median: QEMU source / send | ok runs (QEMU, send) |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in channel_counts:
        c = WallComparison.of(results, n, kind)
        q, o, ours = c.baseline_wall, c.measured_wall, c.measured
        spread = f"{o[1] / q[1]:.2f} / {o[2] / q[2]:.2f}" if q and o else "—"
        startup = [r.extra["sender_startup_seconds"] for r in ours if r.ok and "sender_startup_seconds" in r.extra]
        rss = [r.destination_peak_rss_kib / 1024 for r in ours if r.ok and r.destination_peak_rss_kib]
        cpu = " / ".join(
            "—" if not v else f"{statistics.median(v):.2f}"
            for v in ([r.source_cpu_seconds for r in runs if r.ok and r.source_cpu_seconds is not None]
                      for runs in (c.baseline, ours))
        )
        rows.append(
            f"| {n} | {_fmt(q)} | {_fmt(o)} | {c.ratio} | {spread} | {c.paired} "
            f"| {'—' if not startup else f'{statistics.median(startup):.2f}'} "
            f"| {_median_max(rss)} | {cpu} | {c.ok_runs} |"
        )
    return "\n".join(rows)


RUN_HEADER = (
    "| source | channels | run | wall s | source CPU s | dest CPU s | other CPU s | source peak RSS MiB "
    "| quiet wait s | status |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def run_line(r: RunResult) -> str:
    def num(value: float | None, fmt: str = ".2f") -> str:
        return "—" if value is None else format(value, fmt)

    kind = {"qemu": "QEMU"}.get(r.kind, f"send ({r.kind})" if r.kind != "ours" else "send")
    rss = r.destination_peak_rss_kib / 1024 if r.kind != "qemu" and r.destination_peak_rss_kib else None
    verified = " memory sha256 ok" if r.verified else ""
    status = ("ok" if r.ok else f"FAILED: {r.error}") + verified
    return (f"| {kind} | {r.channels} | {r.index} | {num(r.wall)} | {num(r.source_cpu_seconds)} "
            f"| {num(r.destination_cpu_seconds)} | {num(r.other_cpu_seconds)} | {num(rss, '.0f')} "
            f"| {num(r.quiet_wait_seconds, '.1f')} | {status} |")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def backing_digest_outside_window(backing: Path, size: int) -> str:
    return _digest_outside_window(backing, size)


def run(args: argparse.Namespace) -> int:
    qemu = qemu_for(args)
    if qemu is None:
        return 2
    workdir: Path = args.workdir
    base = workdir / "send"
    runs_dir = base / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)

    facts = machine_facts(qemu)
    version = code_version()
    code_root, measured = snapshot_library(base)
    facts["code"] = code_fact(version)
    if args.code is not None:
        # The captures are still made with the work tree's receiver (the copy
        # above); only send runs from the given package.
        facts["send code"] = f"{args.code} (fingerprint {_fingerprint(args.code / 'twisted_multifd')})"
    if args.compare is not None:
        facts["compare code"] = f"{args.compare} (fingerprint {_fingerprint(args.compare / 'twisted_multifd')})"
    command = bench_command("send")
    print(f"command: {command}")
    for key, value in facts.items():
        print(f"{key}: {value}")
    print(f"guest RAM {args.size / 2**20:.0f} MiB, random; channels {args.channels}; {args.runs} runs each")

    backing, digest = ensure_backing_file(workdir, args.size, args.drop_caches)
    ctx = Context(
        qemu, args.size, backing, digest, base, runs_dir, args.timeout, args.max_bandwidth, args.settle, code_root
    )
    send_code = ctx.code_root if args.code is None else args.code.resolve()
    expected = backing_digest_outside_window(backing, args.size)
    results: list[RunResult] = []
    captures: dict[int, Path] = {}
    for channels in sorted(set(args.channels + args.py_spy + args.profile)):
        captures[channels] = ensure_capture(ctx, channels, base / "captures")

    print(f"\n{RUN_HEADER}", flush=True)
    for channels in args.channels:
        for index in range(1, args.runs + 1):
            verify = args.verify == "all" or (args.verify == "first" and index == 1)
            digest = expected if verify else None
            runs: list[Callable[[], RunResult]] = []
            if args.only != "ours":
                runs.append(functools.partial(run_qemu_destination, ctx, channels, index))
            if args.only != "qemu":
                runs.append(functools.partial(run_send, ctx, send_code, captures[channels], channels, index, digest))
                if args.compare is not None:
                    runs.append(functools.partial(
                        run_send, ctx, args.compare.resolve(), captures[channels], channels, index, digest,
                        kind="compare",
                    ))
            run_round(index, runs, results)

    profiles: dict[str, str] = {}
    for channels in args.py_spy:
        path = base / f"send-ch{channels}.pyspy.txt"
        result = run_send(ctx, send_code, captures[channels], channels, 1, None, py_spy=path)
        results.append(result)
        print(run_line(result), flush=True)
        if result.ok and path.exists():
            profiles[f"py-spy-ch{channels}"] = summarize_py_spy(path)
    for channels in args.profile:
        path = base / f"send-ch{channels}.prof"
        result = run_send(ctx, send_code, captures[channels], channels, 1, None, profile=path)
        results.append(result)
        print(run_line(result), flush=True)
        if result.ok and path.exists():
            profiles[f"cprofile-ch{channels}"] = summarize_cprofile(path)

    table = summary_table(results, args.channels)
    print(f"\n{table}\n")
    if args.compare is not None:
        compared = summary_table(results, args.channels, "compare")
        table += f"\n\n--compare {args.compare}:\n\n{compared}"
        print(f"--compare {args.compare}:\n\n{compared}\n")
    order = order_table(results, args.channels)
    table += f"\n\n{order}"
    print(f"{order}\n")
    for name, text in profiles.items():
        print(f"{name} ({base})\n{text}\n")
    json_path = args.json or base / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {
        "command": command, "machine": facts, "code": version, "measured_fingerprint": measured,
        "size": args.size, "max_bandwidth": args.max_bandwidth,
        "results": [asdict(r) for r in results], "table": table, "profiles": profiles,
    }
    return write_results(json_path, record, results, runs_dir)

"""Relay benchmark: QEMU -> twisted-multifd relay -> QEMU vs. QEMU -> QEMU.

For each multifd channel count, runs alternate between

  (a) QEMU source -> QEMU destination directly (``-incoming defer``, same
      build), and
  (b) QEMU source -> ``python -m twisted_multifd relay --once`` -> the same
      kind of QEMU destination.

The source is the receive benchmark's (:mod:`bench.receive`): a never-started
VM whose RAM is a file of random bytes, ``max-bandwidth`` lifted. Wall time
runs from issuing ``migrate`` on the source to the destination QEMU's
MIGRATION ``completed`` event, in both kinds of run. Every run is checked:
source and destination status ``completed``; for (b) also the relay's exit
status 0 and its "relayed cleanly" log line once every connection closed.

"dest CPU s" of a relayed run is the destination QEMU's plus the relay's
(the relay's alone is kept in the JSON as ``relay_cpu_seconds``); peak RSS
is the relay's VmHWM (the destination QEMU's in a direct run).

The relay runs from a copy of ``twisted_multifd/`` taken at start, so edits
to the work tree during a benchmark do not change what is measured.
``--py-spy N`` adds one relayed run with N channels sampled by py-spy (not in
the table). Results (JSON) and logs of every run go to ``--workdir``.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from qemu_harness import HarnessError, QemuLab, RelayProcess

from bench.receive import (
    RUN_HEADER,
    Context,
    RunResult,
    WallComparison,
    Window,
    _delta,
    _fmt,
    _median_max,
    _proc_cpu_seconds,
    _proc_hwm_kib,
    _record_failure,
    _source_stats,
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
    run_line,
    run_qemu_destination,
    run_round,
    snapshot_library,
    stop_py_spy,
    summarize_py_spy,
    wait_for_completion,
    wait_for_quiet,
)

RELAY_EXIT_TIMEOUT = 30.0
"""Seconds the relay may take, after the destination's ``completed``, to see every connection closed."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "backing file, logs, results (default /var/tmp/twisted-multifd-bench)")
    parser.add_argument(
        "--py-spy",
        type=int,
        action="append",
        default=[],
        metavar="N",
        dest="py_spy",
        help="after the timed runs, one extra relayed run with N channels sampled by py-spy (repeatable)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=30.0,
        help="before each run, wait up to this many seconds for the machine to be quiet (default 30, 0 = don't wait)",
    )
    parser.add_argument(
        "--only",
        choices=("qemu", "relay"),
        help="run only one kind (for diagnosis; the ratio column then stays empty)",
    )
    parser.add_argument("--json", type=Path, help="write all results here (default WORKDIR/relay-results-TIME.json)")


def run_relayed(ctx: Context, channels: int, index: int, py_spy: Path | None = None) -> RunResult:
    waited = wait_for_quiet(ctx.settle)
    result = _run_relayed(ctx, channels, index, py_spy)
    result.quiet_wait_seconds = round(waited, 1)
    return result


def _run_relayed(ctx: Context, channels: int, index: int, py_spy: Path | None) -> RunResult:
    label = "relay-pyspy" if py_spy else "relay"
    result = RunResult(label, channels, index)
    run_dir = ctx.run_dir(f"{label}-ch{channels}-{index}")
    settings = ctx.settings(channels)
    spy: subprocess.Popen[bytes] | None = None
    relay: RelayProcess | None = None
    try:
        with QemuLab(run_dir) as lab:
            destination, upstream = lab.start_destination(ctx.qemu, settings, ram_size=ctx.size)
            relay = RelayProcess("relay", upstream, channels, lab.log_dir, root=ctx.code_root)
            address = relay.wait_for_address()
            if py_spy is not None:
                spy = _start_py_spy(relay.popen.pid, py_spy, run_dir)
            source = lab.start_source(ctx.qemu, ctx.backing, settings, ram_size=ctx.size)
            source_cpu = _proc_cpu_seconds(source.popen.pid)
            destination_cpu = _proc_cpu_seconds(destination.popen.pid)
            relay_cpu = _proc_cpu_seconds(relay.popen.pid)

            def describe() -> str:
                return f"{lab.describe()}\n{relay.describe()}"

            window = Window()
            started = time.monotonic()
            source.migrate(address)
            done = wait_for_completion(source, started, ctx.timeout, describe, destination=destination)
            relay_cpu_after = _proc_cpu_seconds(relay.popen.pid)
            relay_peak = _proc_hwm_kib(relay.popen.pid)
            window.close()
            status = destination.query_migrate().get("status")
            if status != "completed":
                raise HarnessError(f"destination status {status!r} after its completed event\n{describe()}")
            result.wall, result.source_completed = done.destination, done.source
            _source_stats(result, source, source_cpu)
            relay_used = _delta(relay_cpu_after, relay_cpu)
            destination_used = _delta(_proc_cpu_seconds(destination.popen.pid), destination_cpu)
            result.extra["relay_cpu_seconds"] = relay_used
            result.extra["destination_qemu_cpu_seconds"] = destination_used
            result.extra["destination_qemu_peak_rss_kib"] = done.peak_rss_kib
            result.destination_cpu_seconds = (
                None if relay_used is None or destination_used is None else relay_used + destination_used
            )
            result.destination_peak_rss_kib = relay_peak
            window.record(result)
            returncode = relay.wait(RELAY_EXIT_TIMEOUT, describe)
            log = relay.stderr_path.read_text(errors="replace")
            if returncode != 0 or "relayed cleanly" not in log:
                raise HarnessError(f"relay exited with {returncode} without relaying cleanly\n{describe()}")
            result.ok = True
    except Exception as exc:  # noqa: BLE001  (recorded, reported, and the benchmark goes on)
        _record_failure(result, exc, run_dir)
    finally:
        if relay is not None:
            relay.close()
        if spy is not None:
            stop_py_spy(spy)
    return result


def summary_table(results: list[RunResult], channel_counts: list[int]) -> str:
    rows = [
        (
            "| channels | QEMU → QEMU wall s (median / min / max) | QEMU → relay → QEMU wall s (median / min / max) "
            "| relayed / direct (medians) | relayed / direct per pair: median (min–max) | relay CPU s (median) "
            "| relay peak RSS MiB (median / max) | ok runs (direct, relayed) | max other CPU s (direct, relayed) |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in channel_counts:
        c = WallComparison.of(results, n, "relay")
        relayed = c.measured
        cpu = [r.extra["relay_cpu_seconds"] for r in relayed if r.ok and r.extra.get("relay_cpu_seconds") is not None]
        rss = [r.destination_peak_rss_kib / 1024 for r in relayed if r.ok and r.destination_peak_rss_kib]
        rows.append(
            f"| {n} | {_fmt(c.baseline_wall)} | {_fmt(c.measured_wall)} | {c.ratio} | {c.paired} "
            f"| {f'{statistics.median(cpu):.2f}' if cpu else '—'} | {_median_max(rss)} "
            f"| {c.ok_runs} | {c.max_other_cpu} |"
        )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    qemu = qemu_for(args)
    if qemu is None:
        return 2
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    runs_dir = workdir / "relay-runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir()

    facts = machine_facts(qemu)
    version = code_version()
    code_root, measured = snapshot_library(workdir)
    facts["code"] = code_fact(version)
    command = bench_command("relay")
    print(f"command: {command}")
    for key, value in facts.items():
        print(f"{key}: {value}")
    print(f"guest RAM {args.size / 2**20:.0f} MiB, random; channels {args.channels}; {args.runs} runs each")

    backing, digest = ensure_backing_file(workdir, args.size, args.drop_caches)
    ctx = Context(
        qemu, args.size, backing, digest, workdir, runs_dir, args.timeout, args.max_bandwidth, args.settle, code_root
    )

    results: list[RunResult] = []
    print(f"\n{RUN_HEADER.replace('dest peak RSS', 'dest (relay) peak RSS')}", flush=True)
    for channels in args.channels:
        for index in range(1, args.runs + 1):
            runs: list[Callable[[], RunResult]] = []
            if args.only != "relay":
                runs.append(functools.partial(run_qemu_destination, ctx, channels, index))
            if args.only != "qemu":
                runs.append(functools.partial(run_relayed, ctx, channels, index))
            run_round(index, runs, results)

    profiles: dict[str, str] = {}
    for channels in args.py_spy:
        path = workdir / f"relay-ch{channels}.pyspy.txt"
        result = run_relayed(ctx, channels, 1, py_spy=path)
        results.append(result)
        print(run_line(result), flush=True)
        if result.ok and path.exists():
            profiles[f"py-spy-ch{channels}"] = summarize_py_spy(path)

    table = summary_table(results, args.channels) + "\n\n" + order_table(results, args.channels)
    print(f"\n{table}\n")
    for name, text in profiles.items():
        print(f"{name} ({workdir})\n{text}\n")
    json_path = args.json or workdir / f"relay-results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {
        "command": command,
        "machine": facts,
        "code": version,
        "measured_fingerprint": measured,
        "size": args.size,
        "max_bandwidth": args.max_bandwidth,
        "results": [asdict(r) for r in results],
        "table": table,
        "profiles": profiles,
    }
    return write_results(json_path, record, results, runs_dir)

"""Sniff benchmark: connections per second classified and handed over.

Issue 6: the receiver's L{twisted_multifd._sniff.ChannelSniffer} must not
make accepting connections much slower than the cheapest Twisted server
doing the same amount of socket work. Two servers, each in its own process
on the default (epoll) reactor, listening on 127.0.0.1 with the same backlog:

  (plain) a Twisted protocol that reads its first 4 bytes and closes
          (C{transport.loseConnection()});
  (sniff) the real job up to hand-off: a C{ChannelSniffer} (with its sniff
          timeout armed, as the receiver does) classifies the first 4 bytes,
          calls the chooser, hands the connection and the bytes already read
          to the chosen protocol, which checks them and closes the same way.

The load comes from another process: a small C program (compiled from the
source below with the system's C compiler into the work directory) keeping
C{--concurrency} non-blocking connections in flight with epoll; each
connects, sends a magic (alternately the main channel's C{QEVM} and the
multifd channel's 0x11223344) and waits for the server's close. A C client
leaves the server's process the bottleneck on a 2-CPU machine: the table
shows the server's CPU use in the timed window (about 100 % of one CPU means
the server is what limits the rate).

Each run starts a fresh server, lets the client warm up (C{--warmup}), then
counts connections closed by the server within C{--duration}. Runs alternate
(plain, sniff, sniff, plain, ...); the figure is the median, the ratio is
sniff/plain of the medians (target: at least 0.9). Before each run the
driver waits (C{--settle}) for a quiet machine; "other CPU" in the output is
what the rest of the machine used during the window, so disturbed runs can be
told apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

CLIENT_SOURCE = r"""/* bench/sniff.py's load generator: keeps CONCURRENCY loopback connections in
 * flight for DURATION ms; each connects, sends 4 bytes (alternating the main
 * and multifd magics) and waits for the server to close. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in server;
static int ep;
static long opened, completed, failed;
static const char magics[2][4] = {{'Q', 'E', 'V', 'M'}, {0x11, 0x22, 0x33, 0x44}};
static char *sent; /* per fd: 0 = connecting, 1 = magic sent */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void trySend(int fd) {
    ssize_t n = send(fd, magics[fd & 1], 4, MSG_NOSIGNAL);
    struct epoll_event ev = {.data.fd = fd};
    if (n == 4) {
        sent[fd] = 1;
        ev.events = EPOLLIN | EPOLLRDHUP;
    } else {
        ev.events = EPOLLOUT;
    }
    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
}

static int openOne(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) { perror("socket"); exit(2); }
    sent[fd] = 0;
    opened++;
    struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)&server, sizeof server) < 0 && errno != EINPROGRESS) {
        failed++;
        close(fd);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: client HOST PORT CONCURRENCY WARMUP_MS DURATION_MS\n"); return 2; }
    server.sin_family = AF_INET;
    inet_pton(AF_INET, argv[1], &server.sin_addr);
    server.sin_port = htons(atoi(argv[2]));
    int concurrency = atoi(argv[3]);
    double warmup = atoi(argv[4]) / 1000.0, duration = atoi(argv[5]) / 1000.0;
    sent = calloc(65536, 1);
    ep = epoll_create1(0);
    double start = now() + warmup, stopAt = start + duration, drainUntil = stopAt + 10.0;
    long windowCompleted = 0;
    int inFlight = 0;
    for (int i = 0; i < concurrency; i++) inFlight += openOne();
    struct epoll_event events[256];
    int stopping = 0;
    char buf[64];
    while (inFlight > 0) {
        double t = now();
        if (!stopping && t >= stopAt) stopping = 1;
        if (t >= drainUntil) break;
        int n = epoll_wait(ep, events, 256, 100);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd, done = 0;
            if (!sent[fd]) {
                int err = 0; socklen_t len = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) { failed++; done = 1; } else trySend(fd);
            } else {
                ssize_t r = recv(fd, buf, sizeof buf, 0);
                if (r == 0) {
                    completed++;
                    done = 1;
                    if (!stopping && t >= start) windowCompleted++;
                }
                else if (r < 0 && errno != EAGAIN) { failed++; done = 1; }
            }
            if (done) {
                close(fd);
                inFlight--;
                if (!stopping) inFlight += openOne();
            }
        }
    }
    double elapsed = stopAt - start;
    printf("{\"window_completed\": %ld, \"completed\": %ld, \"failed\": %ld, \"opened\": %ld, \"unfinished\": %d, \"elapsed\": %.6f}\n",
           windowCompleted, completed, failed, opened, inFlight, elapsed);
    return 0;
}
"""

KINDS = ("plain", "sniff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=5, help="runs of each server (default 5)")
    parser.add_argument("--duration", type=float, default=3.0, help="timed seconds per run (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="untimed seconds before each run (default 0.5)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="connections the client keeps in flight (default 64)")
    parser.add_argument("--backlog", type=int, default=1024, help="listen backlog of both servers (default 1024)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="before each run, wait up to this many seconds for a quiet machine (default 30)")
    parser.add_argument("--profile", action="store_true",
                        help="one extra sniff run under cProfile (not in the table); stats in the work directory")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/twisted-multifd-bench/sniff"),
                        help="client binary, results JSON and profiles")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)


# The server side (runs in its own process: python -m bench sniff --serve KIND)


def serve(kind: str, backlog: int, profile: Path | None) -> int:
    """
    Listen, print the port, count connections until stdin closes, print the
    counts as JSON.
    """
    from twisted.internet import reactor
    from twisted.internet.protocol import Protocol, ServerFactory

    from twisted_multifd._sniff import MAGICS, ChannelSniffer

    counts: dict[str, int] = {"main": 0, "multifd": 0, "plain": 0, "wrong": 0}

    class FirstFourBytes(Protocol):
        """The baseline: read 4 bytes, close."""

        buffered = b""

        def dataReceived(self, data: bytes) -> None:
            self.buffered += data
            if len(self.buffered) >= 4:
                counts["plain"] += 1
                self.transport.loseConnection()

    class HandedOver(Protocol):
        """What the sniffer hands a connection to: checks the bytes the sniffer read, closes."""

        def __init__(self, kind: str) -> None:
            self.kind = kind

        def dataReceived(self, data: bytes) -> None:
            counts[self.kind if MAGICS.get(data[:4]) == self.kind else "wrong"] += 1
            self.transport.loseConnection()

    def chooser(channelKind: str, peer: Any) -> Protocol:
        return HandedOver(channelKind)

    class Factory(ServerFactory):
        noisy = False

        def buildProtocol(self, addr: Any) -> Protocol:
            if kind == "plain":
                return FirstFourBytes()
            # The receiver's sniff timeout: armed per connection, as in MigrationReceiverFactory.
            return ChannelSniffer(chooser, addr, reactor, 120.0)

    port = reactor.listenTCP(0, Factory(), backlog=backlog, interface="127.0.0.1")

    from twisted.internet import stdio

    class Control(Protocol):
        def connectionLost(self, reason: Any) -> None:
            reactor.stop()

    stdio.StandardIO(Control())
    print(port.getHost().port, flush=True)
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(reactor.run)
        profiler.dump_stats(str(profile))
    else:
        reactor.run()
    print(json.dumps(counts), flush=True)
    return 0


# The driver


def build_client(workdir: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("bench sniff needs a C compiler (cc or gcc) for its load generator")
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "sniff-client.c"
    binary = workdir / "sniff-client"
    source.write_text(CLIENT_SOURCE)
    subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy so far (every CPU, /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def one_run(kind: str, args: argparse.Namespace, client: Path, profile: Path | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench", "sniff", "--serve", kind, "--backlog", str(args.backlog)]
    if profile is not None:
        command += ["--profile", "--workdir", str(profile)]
    server = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdin is not None
        port = int(server.stdout.readline())
        loader = subprocess.Popen(
            [str(client), "127.0.0.1", str(port), str(args.concurrency),
             str(int(args.warmup * 1000)), str(int(args.duration * 1000))],
            stdout=subprocess.PIPE, text=True,
        )
        # The timed window starts after the warm-up; sample CPU around it.
        time.sleep(args.warmup)
        serverBefore, clientBefore = _cpu_seconds(server.pid), _cpu_seconds(loader.pid)
        machineBefore = _machine_busy_seconds()
        time.sleep(args.duration)
        serverAfter, clientAfter = _cpu_seconds(server.pid), _cpu_seconds(loader.pid)
        machineAfter = _machine_busy_seconds()
        out, _ = loader.communicate(timeout=60)
        loaded = json.loads(out)
        server.stdin.close()
        counts = json.loads(server.stdout.readline())
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    if loaded["failed"] or loaded["unfinished"]:
        raise SystemExit(f"{kind} run: {loaded['failed']} connections failed, {loaded['unfinished']} unfinished")
    served = counts["plain"] + counts["main"] + counts["multifd"]
    if counts["wrong"] or served != loaded["completed"]:
        raise SystemExit(f"{kind} run: server counted {counts}, client completed {loaded['completed']}")
    return {
        "kind": kind,
        "rate": loaded["window_completed"] / loaded["elapsed"],
        "connections": loaded["completed"],
        "server_cpu": (serverAfter - serverBefore) / args.duration,
        "client_cpu": (clientAfter - clientBefore) / args.duration,
        # What the rest of the machine used meanwhile (other processes, interrupts): disturbed runs show here.
        "other_cpu": max(0.0, (machineAfter - machineBefore) - (serverAfter - serverBefore)
                         - (clientAfter - clientBefore)) / args.duration,
        "counts": counts,
    }


def run(args: argparse.Namespace) -> int:
    if args.serve:
        return serve(args.serve, args.backlog, args.workdir / "sniff.pstats" if args.profile else None)
    # Not at the top: the server processes need none of the QEMU harness it imports.
    from bench.receive import wait_for_quiet

    client = build_client(args.workdir)
    results: list[dict[str, Any]] = []
    for index in range(args.runs):
        order = KINDS if index % 2 == 0 else KINDS[::-1]
        for kind in order:
            waited = wait_for_quiet(args.settle)
            result = one_run(kind, args, client)
            result["settle_waited"] = waited
            result["run"] = index + 1
            results.append(result)
            print(f"run {index + 1} {kind:5}: {result['rate']:8.0f} connections/s,"
                  f" server CPU {result['server_cpu']:.0%}, client CPU {result['client_cpu']:.0%},"
                  f" other CPU {result['other_cpu']:.0%}{' (the machine never went quiet)' if waited < 0 else ''}",
                  flush=True)
    if args.profile:
        one_run("sniff", args, client, profile=args.workdir)
        import pstats

        pstats.Stats(str(args.workdir / "sniff.pstats")).sort_stats("tottime").print_stats(25)
    if not results:
        return 0
    medians = {kind: statistics.median(r["rate"] for r in results if r["kind"] == kind) for kind in KINDS}
    ratio = medians["sniff"] / medians["plain"]
    print()
    print("| server | median connections/s | runs (connections/s) | server CPU (median) |")
    print("|---|---|---|---|")
    for kind in KINDS:
        mine = [r for r in results if r["kind"] == kind]
        rates = ", ".join(f"{r['rate']:,.0f}" for r in mine)
        print(f"| {kind} | {medians[kind]:,.0f} | {rates} |"
              f" {statistics.median(r['server_cpu'] for r in mine):.0%} |")
    print(f"\nratio sniff/plain (medians): {ratio:.3f} (target >= 0.9)")
    facts = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
             "kernel": platform.release(), "concurrency": args.concurrency, "backlog": args.backlog,
             "duration": args.duration, "warmup": args.warmup}
    (args.workdir / "results.json").write_text(json.dumps(
        {"facts": facts, "results": results, "medians": medians, "ratio": ratio}, indent=1))
    return 0

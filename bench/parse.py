"""Parse benchmark: the receiver's own work per multifd packet, in process, no sockets.

Splits what the receiver does with each 512 KiB RAM packet (128 pages of
4 KiB, one run, as a QEMU source sends them) into layers and times each
over ``--packets`` packets, ``--runs`` times (medians):

  parse        the multifd channel parser (L{IncrementalParser} over
               C{channelPackets}) filled in place the way the receiver's
               direct reads fill it: headers copied in, payloads not (the
               socket would write them);
  parse+check  the same, plus the migration's offset checks for each packet;
  pwrite       one C{pwrite} of each payload into a file sized first (in
               C{--dir}, default /dev/shm: page cache, no disk);
  image write  the capture's image write of each packet instead (runs found,
               C{pwrite}, page map updated), no parsing.

The receiver's own Python per packet is "parse+check" plus "image write"
minus "pwrite"; a GiB is 2,048 packets. Timing parsing and writing together
is left out on purpose: the parser's work evicts the payload from the CPU's
caches, which a socket-filled buffer would not have been in anyway, and that
would be charged to the Python.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

PAGE = 4096
PAGES_PER_PACKET = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--packets", type=int, default=2048, help="packets per run (default 2048 = 1 GiB)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each layer; medians are used (default 5)")
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"), help="where the image is written")


def run(args: argparse.Namespace) -> int:
    from twisted_multifd._capture import _BlockImage
    from twisted_multifd._incremental import IncrementalParser
    from twisted_multifd._mainstream import RamBlock
    from twisted_multifd._migration import _firstOffsetOutside
    from twisted_multifd._packet import RamPacket, buildRamPacket, channelPackets

    if args.packets < 1 or args.runs < 1:
        print("--packets and --runs must be at least 1")
        return 2
    size = args.packets * PAGES_PER_PACKET * PAGE
    limit = size - PAGE
    offsets = [tuple(range(n * 128 * PAGE, (n + 1) * 128 * PAGE, PAGE)) for n in range(args.packets)]
    headers = [
        buildRamPacket(pageSize=PAGE, flags=0, packetNum=n, block="pc.ram", normalOffsets=offsets[n],
                       nextPacketSize=128 * PAGE)
        for n in range(args.packets)
    ]  # fmt: skip
    payload = os.urandom(PAGES_PER_PACKET * PAGE)

    def parse(apply: Callable[[RamPacket], None]) -> None:
        parser = IncrementalParser(channelPackets(PAGE))
        for header in headers:
            position, total = 0, len(header) + len(payload)
            while position < total:
                target = parser.directBuffer()
                if target is None:
                    # Between records: let the parser move on to its next request.
                    event = parser.nextEvent()
                    if event is not None:
                        apply(event)
                    elif parser.directBuffer() is None:
                        raise AssertionError("the parser wants bytes it cannot take in place")
                    continue
                count = min(len(target), total - position)
                if position < len(header):
                    target[:count] = header[position : position + count]
                position += count
                if parser.directFilled(count):
                    while (event := parser.nextEvent()) is not None:
                        apply(event)

    def check(packet: RamPacket) -> None:
        if _firstOffsetOutside(packet.normalOffsets, PAGE, limit) is not None:
            raise AssertionError("offset check failed")

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        block = RamBlock("pc.ram", size)

        def image() -> _BlockImage:
            return _BlockImage(block, os.path.join(folder, "pc.ram"), PAGE)

        def layerPwrite() -> None:
            target = image()
            for n in range(args.packets):
                os.pwrite(target.fd, payload, n * PAGES_PER_PACKET * PAGE)
            os.close(target.fd)
            target.fd = -1

        def layerImageWrite() -> None:
            target = image()
            for n in range(args.packets):
                target.write(offsets[n], payload)
            os.close(target.fd)
            target.fd = -1

        layers = {
            "parse": lambda: parse(lambda packet: None),
            "parse+check": lambda: parse(check),
            "pwrite": layerPwrite,
            "image write": layerImageWrite,
        }
        median: dict[str, float] = {}
        for name, layer in layers.items():
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                layer()
                times.append(time.perf_counter() - started)
            median[name] = statistics.median(times)
            print(f"{name:12} median {median[name]:.3f} s, min {min(times):.3f} s, max {max(times):.3f} s"
                  f" ({median[name] / args.packets * 1e6:.1f} µs per packet)", flush=True)
    added = (median["parse+check"] + median["image write"] - median["pwrite"]) / args.packets * 1e6
    print(f"the receiver's own Python per packet (parse+check + image write - pwrite): {added:.1f} µs"
          f" ({added * 2048 / 1000:.0f} ms per GiB)")
    return 0

"""``python -m bench receive|send|relay|sniff|parse ...``: see :mod:`bench.receive`, :mod:`bench.send`, :mod:`bench.relay`, :mod:`bench.sniff` and :mod:`bench.parse`."""

from __future__ import annotations

import argparse
import sys

from bench import parse, receive, relay, send, sniff


# (name, module, one-line help): each module has add_arguments(parser) and run(args).
COMMANDS = (
    ("receive", receive, "QEMU destination vs. the twisted-multifd receiver, same source"),
    ("relay", relay, "QEMU -> QEMU directly vs. QEMU -> twisted-multifd relay -> QEMU"),
    ("sniff", sniff, "connections/s classified by the ChannelSniffer vs. a plain 4-byte Twisted server"),
    ("send", send, "QEMU source vs. twisted-multifd send of a capture, same QEMU destination"),
    ("parse", parse, "the receiver's own work per multifd packet, in process, layer by layer"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module, summary in COMMANDS:
        module.add_arguments(
            commands.add_parser(
                name, help=summary, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
            )
        )
    args = parser.parse_args(argv)
    return {name: module for name, module, _ in COMMANDS}[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())

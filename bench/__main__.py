"""``python -m bench receive|relay ...``: see :mod:`bench.receive` and :mod:`bench.relay`."""

from __future__ import annotations

import argparse
import sys

from bench import receive, relay, send, sniff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    receive.add_arguments(
        commands.add_parser(
            "receive",
            help="QEMU destination vs. the twisted-multifd receiver, same source",
            description=receive.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    relay.add_arguments(
        commands.add_parser(
            "relay",
            help="QEMU -> QEMU directly vs. QEMU -> twisted-multifd relay -> QEMU",
            description=relay.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    sniff.add_arguments(
        commands.add_parser(
            "sniff",
            help="connections/s classified by the ChannelSniffer vs. a plain 4-byte Twisted server",
            description=sniff.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    send.add_arguments(
        commands.add_parser(
            "send",
            help="QEMU source vs. twisted-multifd send of a capture, same QEMU destination",
            description=send.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    args = parser.parse_args(argv)
    if args.command == "send":
        return send.run(args)
    if args.command == "sniff":
        return sniff.run(args)
    return relay.run(args) if args.command == "relay" else receive.run(args)


if __name__ == "__main__":
    sys.exit(main())

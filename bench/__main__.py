"""``python -m bench receive ...``: see :mod:`bench.receive`."""

from __future__ import annotations

import argparse
import sys

from bench import receive


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
    args = parser.parse_args(argv)
    return receive.run(args)


if __name__ == "__main__":
    sys.exit(main())

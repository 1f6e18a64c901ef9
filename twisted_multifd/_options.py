"""
Command-line options, shared by the C{twisted-multifd} command and the
C{twistd multifd} plugin so that both accept the same words.
"""

from __future__ import annotations

import importlib
from typing import Callable

from twisted.python import usage

DEFAULT_LISTEN = "tcp:4444"


def positiveFloat(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be more than 0")
    return number


def channelCount(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 255:
        raise ValueError("must be 0 to 255")
    return number


def _command(module: str, name: str) -> Callable[[], usage.Options]:
    """
    A subcommand's options class, imported only when that subcommand is used
    (twistd imports this module's users for every plugin listing).

    Each subcommand's options object has C{run(reactor)}, a coroutine giving
    the exit status, and, if it makes sense as a service, C{makeService(reactor)}.
    """

    def make() -> usage.Options:
        return getattr(importlib.import_module(f"twisted_multifd.{module}"), name)()

    return make


class MultifdOptions(usage.Options):
    synopsis = "twisted-multifd COMMAND [options]"
    subCommands = [
        ["receive", None, _command("_receivecommand", "ReceiveOptions"), "Receive migrations into captures."],
        ["send", None, _command("_sendcommand", "SendOptions"), "Send a capture into a QEMU destination."],
        ["export", None, _command("_sendcommand", "ExportOptions"), "Write a capture as one plain migration stream file."],
        ["relay", None, _command("_relaycommand", "RelayOptions"), "Relay migrations to a QEMU destination, main channel first."],
    ]
    defaultSubCommand = "receive"

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"twisted-multifd {version('twisted-multifd')}")
        except PackageNotFoundError:
            print("twisted-multifd (not installed)")
        raise SystemExit(0)

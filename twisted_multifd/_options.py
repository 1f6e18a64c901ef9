"""
Command-line options, shared by the C{twisted-multifd} command and the
C{twistd multifd} plugin so that both accept the same words.
"""

from __future__ import annotations

import getopt
import importlib
import sys
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


TLS_PARAMETERS = [
    ["tls-cert", None, None,
     "Listen with TLS (QEMU's tls-creds) using this PEM server certificate; its names or IP"
     " addresses must match the host in the source's migrate URI (or the source's tls-hostname)."],
    ["tls-key", None, None, "PEM private key of --tls-cert (default: read from the --tls-cert file)."],
    ["tls-ca", None, None,
     "PEM CA certificate(s): with it, sources must present a client certificate signed by it"
     " (QEMU: client-cert.pem in the tls-creds-x509 directory)."],
]


def checkTLSOptions(options: usage.Options) -> None:
    """
    --tls-key and --tls-ca only make sense with --tls-cert; TLS comes from
    these options, not from an C{ssl:} endpoint in --listen (whose TLS layer
    would not treat QEMU's channel endings as the receiver needs).
    """
    if str(options["listen"]).startswith("ssl:"):
        raise usage.UsageError(
            "--listen takes a plain endpoint (tcp:..., unix:...); for TLS add --tls-cert FILE"
            " [--tls-key FILE] [--tls-ca FILE] (see docs/tls.md)"
        )
    if options["tls-cert"] is None:
        for name in ("tls-key", "tls-ca"):
            if options[name] is not None:
                raise usage.UsageError(f"--{name} needs --tls-cert")


def printError(message: str) -> None:
    """
    One line on standard error, the way every command reports what stops it.
    """
    sys.stderr.write(f"twisted-multifd: error: {message}\n")
    sys.stderr.flush()


class OptionsAroundArguments(usage.Options):
    """
    Options before or after the positional arguments (C{send CAPTURE --to X}
    as well as C{send --to X CAPTURE}); twisted.python.usage alone stops at
    the first argument.
    """

    def parseOptions(self, options: list[str] | None = None) -> None:
        if options is None:
            options = sys.argv[1:]
        try:
            opts, args = getopt.gnu_getopt(options, self.shortOpt, self.longOpt)
        except getopt.error as e:
            raise usage.UsageError(str(e))
        ordered: list[str] = []
        for opt, value in opts:
            if opt.startswith("--"):
                ordered.append(f"{opt}={value}" if f"{opt[2:]}=" in self.longOpt else opt)
            else:
                ordered.append(opt + value)
        super().parseOptions([*ordered, "--", *args])


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
        ["inspect", None, _command("_inspectcommand", "InspectOptions"), "Describe a capture or a plain migration stream file."],
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

"""
Command-line options, shared by the C{twisted-multifd} command and the
C{twistd multifd} plugin so that both accept the same words.
"""

from __future__ import annotations

from twisted.python import usage

from ._compression import SUPPORTED_COMPRESSION

DEFAULT_LISTEN = "tcp:4444"


def _positiveFloat(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be more than 0")
    return number


def _channelCount(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 255:
        raise ValueError("must be 0 to 255")
    return number


class ReceiveOptions(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Receive QEMU live migrations (plain or multifd) on one port, whatever order the"
        " source's connections arrive in, and write each into a capture directory."
    )
    optParameters = [
        ["listen", "l", DEFAULT_LISTEN,
         "Where to listen: a Twisted endpoint string such as tcp:4444:interface=127.0.0.1 or unix:/run/mig.sock."],
        ["channels", "c", 2,
         "Multifd channels per migration, as the source's multifd-channels (QEMU's default is 2);"
         " 0 receives plain migrations (multifd capability off).", _channelCount],
        ["output", "o", "captures",
         "Capture directory: with --once the capture itself, otherwise one sub-folder per migration."],
        ["compression", None, "auto",
         "Multifd compression the source uses: auto (accept the source's), " + ", ".join(SUPPORTED_COMPRESSION) + "."],
        ["page-size", None, 4096, "Source target page size in bytes (4096 on x86).", int],
        ["sniff-timeout", None, 120.0,
         "Seconds a connection has to send its first 4 bytes (QEMU 9+ keeps the main channel"
         " silent until every multifd channel is connected).", _positiveFloat],
        ["channel-timeout", None, 60.0,
         "Seconds a migration waits for missing channels, and at the end for channels to close.",
         _positiveFloat],
        ["progress-interval", None, 10.0, "Seconds between progress log lines.", _positiveFloat],
        ["address-file", None, None,
         "Once listening, write the address (tcp:HOST:PORT or unix:PATH) to this file."],
    ]
    optFlags = [
        ["once", None, "Receive one migration into --output, then exit: status 0 only if the capture is complete."],
    ]

    def postOptions(self) -> None:
        if self["compression"] != "auto" and self["compression"] not in SUPPORTED_COMPRESSION:
            raise usage.UsageError(
                f"--compression must be auto, {', '.join(SUPPORTED_COMPRESSION)}; not {self['compression']!r}"
            )
        size = self["page-size"]
        if size < 1024 or size & (size - 1):
            raise usage.UsageError(f"--page-size must be a power of two of at least 1024, not {size}")


class MultifdOptions(usage.Options):
    synopsis = "twisted-multifd COMMAND [options]"
    subCommands = [
        ["receive", None, ReceiveOptions, "Receive migrations into captures."],
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

"""
The twistd plugin: C{twistd -n multifd receive --listen tcp:4444 --channels 4 --output DIR}.

Nothing heavy is imported here: twistd imports every plugin file to list them.
"""

from twisted.application.service import ServiceMaker

multifd = ServiceMaker(
    "twisted-multifd",
    "twisted_multifd._service",
    "Receive QEMU live migrations (multifd included) in any connection order into captures.",
    "multifd",
)

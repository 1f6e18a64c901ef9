"""
twisted-multifd: QEMU live migration (multifd included) for Twisted.
"""

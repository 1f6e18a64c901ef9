"""Benchmarks for twisted-multifd against real QEMU.

Run ``python -m bench receive --help``. Results and how to read them are in
docs/performance.md.
"""

"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from qemu_harness import QemuBinary, QemuLab, QemuUnavailable, find_qemu

# --- hypothesis: the suite's fuzz runs are sized for CI; a longer run is
# HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py (docs/testing.md)
settings.register_profile("long", max_examples=20_000, deadline=None)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])

# --- real QEMU (tests marked ``qemu``; harness in tests/qemu_harness.py) ---


@pytest.fixture
def qemu_lab(tmp_path: Path) -> Iterator[QemuLab]:
    """Starts QEMUs, receivers and relays for one test; kills them all after."""
    with QemuLab(tmp_path) as lab:
        yield lab


@pytest.fixture
def require_qemu() -> Callable[[str], QemuBinary]:
    """``require_qemu("10.0")``: that build, or skip (fail if TMF_REQUIRE_QEMU=1)."""

    def require(label: str) -> QemuBinary:
        try:
            return find_qemu(label)
        except QemuUnavailable as exc:
            if os.environ.get("TMF_REQUIRE_QEMU") == "1":
                pytest.fail(str(exc))
            pytest.skip(str(exc))

    return require

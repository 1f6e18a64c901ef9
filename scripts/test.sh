#!/usr/bin/env bash
# Installs everything the test suite needs (real QEMU 7.2 and 10.0, the
# package with its test extras) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-qemu.sh
# compat mode puts the checkout on sys.path, so twistd finds twisted/plugins/ here
python3 -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
# Real-QEMU tests fail (not skip) when QEMU is missing.
export TMF_REQUIRE_QEMU=1
exec python3 -m pytest "$@"

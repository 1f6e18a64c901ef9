#!/usr/bin/env bash
# Installs the real QEMUs the test suite migrates against:
#   - QEMU 7.2 from Debian 12 (system package, /usr/bin/qemu-system-x86_64)
#   - QEMU 10.0 from bookworm-backports, unpacked with dpkg -x into a private
#     prefix (default /opt/twisted-multifd/qemu-10.0) so it does not replace 7.2.
# Idempotent: does nothing that is already done. Needs root (apt-get).
set -euo pipefail

PREFIX="${TMF_QEMU10_PREFIX:-/opt/twisted-multifd/qemu-10.0}"
export DEBIAN_FRONTEND=noninteractive

backports=/etc/apt/sources.list.d/twisted-multifd-backports.sources
need_update=0
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > "$backports" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    need_update=1
fi
# Backports has priority 100, so plain installs still take Debian 12's 7.2.
if [ "$need_update" = 1 ] || ! apt-cache show qemu-system-x86/bookworm-backports >/dev/null 2>&1; then
    apt-get update -q
fi

if ! command -v qemu-system-x86_64 >/dev/null || ! qemu-system-x86_64 --version | grep -q "version 7\.2"; then
    apt-get install -y -q --no-install-recommends qemu-system-x86 qemu-utils >/dev/null
fi

if [ ! -x "$PREFIX/usr/bin/qemu-system-x86_64" ]; then
    work=$(mktemp -d)
    chmod 755 "$work"  # apt downloads as the _apt user
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download -q \
        qemu-system-x86/bookworm-backports \
        qemu-system-common/bookworm-backports \
        qemu-system-data/bookworm-backports \
        seabios/bookworm-backports >/dev/null)
    mkdir -p "$PREFIX"
    for deb in "$work"/*.deb; do dpkg -x "$deb" "$PREFIX"; done
fi

echo "QEMU 7.2:  $(command -v qemu-system-x86_64) ($(qemu-system-x86_64 --version | head -1))"
echo "QEMU 10.0: $PREFIX/usr/bin/qemu-system-x86_64 ($("$PREFIX/usr/bin/qemu-system-x86_64" -L "$PREFIX/usr/share/qemu" --version | head -1))"

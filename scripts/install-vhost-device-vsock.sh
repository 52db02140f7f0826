#!/usr/bin/env bash
# Installs rust-vmm's vhost-device-vsock, the peer hybrid-vsock backend that
# the vsock e2e test and scripts/bench-vsock.sh compare ours with, into
# $CLOISTER_CACHE/tools/bin (skipped when the pinned version is there).
# Prints the binary's path on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
. "$here/env.sh"

version="${VHOST_DEVICE_VSOCK_VERSION:-0.3.0}"
root="$CLOISTER_CACHE/tools"
bin="$root/bin/vhost-device-vsock"
stamp="$root/vhost-device-vsock.version"

if [ -x "$bin" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
    echo "$bin"
    exit 0
fi
echo "install-vhost-device-vsock: cargo install vhost-device-vsock@$version into $root" >&2
# Its own target dir: the build shares nothing with the workspace's.
CARGO_TARGET_DIR="$CLOISTER_CACHE/tools/target" \
    cargo install --locked --quiet --root "$root" "vhost-device-vsock@$version" >&2
rm -rf "$CLOISTER_CACHE/tools/target"
echo "$version" >"$stamp"
echo "$bin"

#!/usr/bin/env bash
# Installs a peer that benchmarks and e2e tests compare ours with, from
# crates.io, at a pinned version, into $CLOISTER_CACHE/tools/bin (skipped
# when that version is there). Prints the binary's path on stdout.
#
#   scripts/install-peer-tool.sh vhost-device-vsock   # rust-vmm's hybrid-vsock back end
#   scripts/install-peer-tool.sh virtiofsd            # the virtio-fs daemon Kata uses
#                                                     # (needs libseccomp-dev libcap-ng-dev)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
. "$here/env.sh"

tool="${1:?usage: install-peer-tool.sh vhost-device-vsock|virtiofsd}"
case "$tool" in
vhost-device-vsock) version="${VHOST_DEVICE_VSOCK_VERSION:-0.3.0}" ;;
virtiofsd) version="${VIRTIOFSD_VERSION:-1.14.0}" ;;
*)
    echo "install-peer-tool: unknown tool $tool (vhost-device-vsock or virtiofsd)" >&2
    exit 2
    ;;
esac
root="$CLOISTER_CACHE/tools"
bin="$root/bin/$tool"
stamp="$root/$tool.version"

if [ -x "$bin" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
    echo "$bin"
    exit 0
fi
echo "install-peer-tool: cargo install $tool@$version into $root" >&2
# Its own target dir: the build shares nothing with the workspace's.
CARGO_TARGET_DIR="$root/target-$tool" \
    cargo install --locked --quiet --root "$root" "$tool@$version" >&2
rm -rf "$root/target-$tool"
echo "$version" >"$stamp"
echo "$bin"

#!/usr/bin/env bash
# vsock benchmark: the same probe guest (QEMU/TCG -M microvm, vhost-user-vsock
# device) against our back end (cloister-vmm vhost-user --device vsock) and
# against rust-vmm's vhost-device-vsock, in one run: throughput each way,
# echo round-trip latency (median, p99), 32 concurrent connections, ratios.
# Usage: scripts/bench-vsock.sh [--mib N] [--rounds N] [--connections N] [--runs N]
#                               [--write-kib N] [--backend cloister|peer|both]
# Ours is built with the bench-opt profile (optimised, like the peer's
# `cargo install` release build); set CLOISTER_VMM to compare another build.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
. scripts/env.sh
scripts/build-guest.sh >/dev/null
kernel-config/build-initramfs.sh --package cloister-vsock-probe >/dev/null
VHOST_DEVICE_VSOCK="${VHOST_DEVICE_VSOCK:-$(scripts/install-peer-tool.sh vhost-device-vsock)}"
export VHOST_DEVICE_VSOCK
cargo build -q -p cloister-e2e --bins
if [ -z "${CLOISTER_VMM:-}" ]; then
    cargo build -q --profile bench-opt -p cloister-vmm --bin cloister-vmm
    export CLOISTER_VMM="$CARGO_TARGET_DIR/bench-opt/cloister-vmm"
fi
exec "$CARGO_TARGET_DIR/debug/cloister-bench-vsock" "$@"

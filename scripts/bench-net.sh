#!/usr/bin/env bash
# virtio-net benchmark: the same busybox guest (QEMU/TCG -M microvm) on a
# tap in a private network namespace, with our virtio-net (cloister-vmm
# vhost-user --device net) and with QEMU's own virtio-net on the tap
# (vhost=off), alternating in one run: guest→host TCP throughput and ping
# round trips, ratio ours / QEMU's. Needs root, busybox-static, iproute2.
# Usage: scripts/bench-net.sh [--mib N] [--runs N]
# Ours is built with the bench-opt profile (QEMU is an optimised build);
# set CLOISTER_VMM to compare another build.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
. scripts/env.sh
scripts/build-guest.sh >/dev/null
cargo build -q -p cloister-e2e --bin cloister-bench-net
if [ -z "${CLOISTER_VMM:-}" ]; then
    cargo build -q --profile bench-opt -p cloister-vmm --bin cloister-vmm
    export CLOISTER_VMM="$CARGO_TARGET_DIR/bench-opt/cloister-vmm"
fi
exec "$CARGO_TARGET_DIR/debug/cloister-bench-net" "$@"

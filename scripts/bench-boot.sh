#!/usr/bin/env bash
# Boot benchmark: cloister-vmm vs QEMU microvm (KVM) on the same guest image,
# medians and ratios. Usage: scripts/bench-boot.sh [RUNS]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
. scripts/env.sh
scripts/build-guest.sh >/dev/null
cargo build -q -p cloister-vmm -p cloister-e2e --bins
exec "$CARGO_TARGET_DIR/debug/cloister-bench-boot" "$@"

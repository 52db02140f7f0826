#!/usr/bin/env bash
# The jail's cost on VM start: cloister-vmm boots a tiny payload to its first
# exit jailed and not, interleaved; medians and the ratio jailed/unjailed.
# Needs root and /dev/kvm. Usage: scripts/bench-jail.sh [RUNS]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
. scripts/env.sh
cargo build -q -p cloister-vmm --bin cloister-vmm --example bench_jail
CLOISTER_VMM="$CARGO_TARGET_DIR/debug/cloister-vmm" exec "$CARGO_TARGET_DIR/debug/examples/bench_jail" "$@"

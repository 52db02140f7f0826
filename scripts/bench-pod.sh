#!/usr/bin/env bash
# What a pod costs: `ctr run --rm busybox true` latency and one idle pod's
# memory (PSS of the shim and everything under it) for runc, runsc (gVisor)
# and cloister, in one run through the same private containerd and image
# (tests/src/bin/cloister-bench-pod.rs). Root only.
#   scripts/bench-pod.sh [--runs 5]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
. scripts/env.sh
scripts/install-deps.sh >/dev/null
# The gVisor peer: Debian's runsc, run by containerd's runc shim.
command -v runsc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runsc >/dev/null
scripts/build-guest.sh >/dev/null
cargo build -q -p cloister-vmm -p cloister-shim -p cloister-e2e --bins
exec "$CARGO_TARGET_DIR/debug/cloister-bench-pod" "$@"

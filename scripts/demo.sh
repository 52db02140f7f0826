#!/usr/bin/env bash
# The main job for a new user: install, build the guest kernel, initramfs
# and cloister-vmm, then boot the guest in cloister-vmm and print the boot
# milestones as they are reached.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
. scripts/env.sh
scripts/install-deps.sh
scripts/build-guest.sh
cargo build -p cloister-vmm -p cloister-e2e --bins
exec "$CARGO_TARGET_DIR/debug/cloister-boot" "$@"

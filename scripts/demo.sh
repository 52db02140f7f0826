#!/usr/bin/env bash
# The main job for a new user: install what is needed, build the guest
# kernel, initramfs, shim and VMM, then run a container in a microVM through
# containerd — a private containerd (2.x from sid when fetched, else
# Debian's 1.6), a busybox image built here and imported (no registry), and
# our runtime io.containerd.cloister.v2 — printing what the container
# printed from inside its guest.
#
#   scripts/demo.sh           # the container through containerd (cloister-demo)
#   scripts/demo.sh --boot    # only boot the guest image and print milestones
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
. scripts/env.sh
scripts/install-deps.sh
scripts/build-guest.sh
cargo build -p cloister-vmm -p cloister-shim -p cloister-e2e --bins
if [ "${1:-}" = --boot ]; then
  shift
  exec "$CARGO_TARGET_DIR/debug/cloister-boot" "$@"
fi
exec "$CARGO_TARGET_DIR/debug/cloister-demo" "$@"

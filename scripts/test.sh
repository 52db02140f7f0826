#!/usr/bin/env bash
# The test command: installs what the tests need, builds the guest image
# (cached), then runs every test of the workspace. Tests that need what the
# machine lacks (root, /dev/kvm, a built kernel) print why they skip.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
. scripts/env.sh
scripts/install-deps.sh
scripts/build-guest.sh
# The jail's escape tests need a test-only VMM build (a flag that makes the
# jailed VMM try an open, an exec or a forbidden system call). They run
# first: the workspace build after them puts the plain binary back, so the
# cloister-vmm left in the target dir never carries the flag.
cargo test -p cloister-vmm --features jail-selftest --test jail "$@" -- --show-output
cargo test --workspace "$@" -- --show-output

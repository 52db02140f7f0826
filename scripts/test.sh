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
cargo test --workspace "$@" -- --show-output

#!/usr/bin/env bash
# Builds (or finds in the cache) the guest kernel and the initramfs images
# the tests boot: the boot test's init, the vsock probe, the agent.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
. "$here/scripts/env.sh"
"$here/kernel-config/build-kernel.sh"
"$here/kernel-config/build-initramfs.sh"
"$here/kernel-config/build-initramfs.sh" --package cloister-vsock-probe
"$here/kernel-config/build-agent-initramfs.sh"

#!/usr/bin/env bash
# Builds (or finds in the cache) the guest kernel and the boot-test initramfs.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
. "$here/scripts/env.sh"
"$here/kernel-config/build-kernel.sh"
"$here/kernel-config/build-initramfs.sh"
"$here/kernel-config/build-agent-initramfs.sh"

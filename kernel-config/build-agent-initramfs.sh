#!/usr/bin/env bash
# Builds the agent's guest image: cloister-agent as /init, plus a busybox
# container rootfs at /rootfs/busybox (Debian's busybox-static with its
# applet links) for in-guest tests that run a container without virtio-fs.
#
# Usage: build-agent-initramfs.sh [--out FILE]
#   default: ${CLOISTER_CACHE:-$HOME/.cache/cloister}/initramfs/agent.cpio
# Prints the archive's path on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${CLOISTER_CACHE:-$HOME/.cache/cloister}"
out="$cache/initramfs/agent.cpio"
case "${1:-}" in
    --out) out="${2:?--out needs a value}" ;;
    "") ;;
    *) echo "build-agent-initramfs: unknown argument '$1'" >&2; exit 1 ;;
esac

busybox=/bin/busybox
[ -x "$busybox" ] || { echo "build-agent-initramfs: $busybox missing (apt-get install busybox-static)" >&2; exit 1; }

rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,proc,sys,dev,tmp,etc,root}
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\n' > "$rootfs/etc/group"

"$here/build-initramfs.sh" --package cloister-agent --out "$out" --tree "$rootfs:/rootfs/busybox"

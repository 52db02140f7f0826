#!/usr/bin/env bash
# Builds a static binary of this workspace and packs it as /init into a raw
# newc initramfs (cloister-initramfs adds /dev, /dev/console, /proc, /sys).
#
# Usage: build-initramfs.sh [--package P] [--bin B] [--out FILE] [--file SRC:DST]... [--tree DIR:DST]...
#   defaults: --package cloister-test-init --bin <package>
#             --out ${CLOISTER_CACHE:-$HOME/.cache/cloister}/initramfs/<bin without cloister->.cpio
# Prints the archive's path on stdout (progress on stderr).
#
# Static binaries are static glibc: the musl target is not available. The
# explicit --target keeps RUSTFLAGS off build scripts and proc macros and
# puts the binary in $CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/debug/.
# Symbols are stripped: the kernel copies the archive byte by byte while
# unpacking, which is emulated on nested KVM, so size is boot time.
# (glibc's static getaddrinfo/NSS functions do not work without the shared
# libraries at run time; an /init must not use them.)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
workspace="$(cd "$here/.." && pwd)"
cache="${CLOISTER_CACHE:-$HOME/.cache/cloister}"
target=x86_64-unknown-linux-gnu

die() { printf 'build-initramfs: error: %s\n' "$*" >&2; exit 1; }

package=cloister-test-init
bin=""
out=""
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --package) package="${2:?--package needs a value}"; shift 2 ;;
        --bin) bin="${2:?--bin needs a value}"; shift 2 ;;
        --out) out="${2:?--out needs a value}"; shift 2 ;;
        --file) extra+=(--file "${2:?--file needs SRC:DST}"); shift 2 ;;
        --tree) extra+=(--tree "${2:?--tree needs DIR:DST}"); shift 2 ;;
        -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument '$1'" ;;
    esac
done
bin="${bin:-$package}"
out="${out:-$cache/initramfs/${bin#cloister-}.cpio}"

cd "$workspace"
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
[ -n "$target_dir" ] || die "cannot find cargo's target directory"

echo "build-initramfs: building $package ($bin) static for $target" >&2
RUSTFLAGS='-C target-feature=+crt-static -C strip=symbols' \
    cargo build --quiet -p "$package" --bin "$bin" --target "$target"
echo "build-initramfs: building cloister-initramfs" >&2
cargo build --quiet -p cloister-guest-image --bin cloister-initramfs

echo "build-initramfs: packing $target_dir/$target/debug/$bin as /init" >&2
"$target_dir/debug/cloister-initramfs" \
    --init "$target_dir/$target/debug/$bin" --out "$out" "${extra[@]}" >&2
echo "$out"

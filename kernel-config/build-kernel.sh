#!/usr/bin/env bash
# Builds the cloister guest kernel (vmlinux for PVH boot, bzImage) from the
# newest Debian linux-source-* package installed, with guest.config on top of
# tinyconfig and the patches in patches/.
#
# Output: ${CLOISTER_CACHE:-$HOME/.cache/cloister}/kernel/<key>/
#           vmlinux  bzImage  config  VERSION
#         and the symlink .../kernel/current -> <key>
# <key> = Debian package version + sha256 of (guest.config, patches, this
# script); when that folder is complete the script only prints it.
#
# Usage: build-kernel.sh              build if needed; prints the folder on stdout
#        build-kernel.sh --print-dir  print the folder for the current inputs;
#                                     exit 0 if it is built, 1 if not
#
# Progress goes to stderr, the folder (only) to stdout, so
#   dir=$(kernel-config/build-kernel.sh)
# works. Runs unattended (CI, as root or not).
#
# The build tree (source + objects, ~2 GB) is deleted after a successful
# build: any change of the inputs gives a new key and a fresh tree anyway, so
# a kept tree would only pile up. CLOISTER_KEEP_KERNEL_TREE=1 keeps it under
# <key>/build for kernel hacking. An interrupted build resumes in its tree.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/guest.config"
patch_dir="$here/patches"
cache="${CLOISTER_CACHE:-$HOME/.cache/cloister}"
started=$SECONDS

log() { printf 'build-kernel: [%4ds] %s\n' "$((SECONDS - started))" "$*" >&2; }
die() { printf 'build-kernel: error: %s\n' "$*" >&2; exit 1; }

print_only=0
case "${1:-}" in
    "") ;;
    --print-dir) print_only=1 ;;
    -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (expected --print-dir)" ;;
esac

# --- inputs ---------------------------------------------------------------
tarball="$(ls -1 /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n 1 || true)"
[ -n "$tarball" ] || die "no /usr/src/linux-source-*.tar.xz: apt-get install linux-source-6.12 (bookworm-security)"
package="$(basename "$tarball" .tar.xz)"
pkg_version="$(dpkg-query -W -f='${Version}' "$package" 2>/dev/null || true)"
[ -n "$pkg_version" ] || die "package '$package' (for $tarball) is not known to dpkg"
[ -f "$fragment" ] || die "missing fragment $fragment"

patches=()
if [ -d "$patch_dir" ]; then
    while IFS= read -r p; do patches+=("$p"); done < <(ls -1 "$patch_dir"/*.patch 2>/dev/null | sort)
fi

# The hash covers the file names too, so renaming a patch also rebuilds.
inputs_hash="$(
    for f in "$fragment" "${patches[@]}" "${BASH_SOURCE[0]}"; do
        printf '%s\n' "$(basename "$f")"
        sha256sum < "$f"
    done | sha256sum | cut -c1-16
)"
key="${pkg_version//[~:]/_}-${inputs_hash}"
out="$cache/kernel/$key"

is_complete() { [ -s "$out/vmlinux" ] && [ -s "$out/bzImage" ] && [ -s "$out/config" ] && [ -s "$out/VERSION" ]; }

if [ "$print_only" = 1 ]; then
    echo "$out"
    is_complete
    exit
fi

update_current() { ln -sfn "$key" "$cache/kernel/current"; }

if is_complete; then
    log "up to date: $out"
    update_current
    echo "$out"
    exit 0
fi

for tool in make gcc bc bison flex xz patch lz4 perl; do
    command -v "$tool" >/dev/null || die "'$tool' not found: apt-get install bc bison flex libelf-dev libssl-dev make gcc xz-utils lz4 patch"
done

mkdir -p "$cache/kernel"
# One build per cache at a time (CI and a developer, or two test runs).
exec 9>"$cache/kernel/.lock"
flock -n 9 || { log "waiting for another build (lock $cache/kernel/.lock)"; flock 9; }
if is_complete; then
    log "built meanwhile by another run: $out"
    update_current
    echo "$out"
    exit 0
fi

log "source: $tarball ($package $pkg_version)"
log "inputs: $(basename "$fragment") ${patches[*]+"${patches[*]##*/}"} -> key $key"
tree="$out/build"
mkdir -p "$out"

# --- source tree: extract + patch (resumed if an earlier run got that far) --
if [ ! -f "$tree/.cloister-prepared" ]; then
    rm -rf "$tree"
    mkdir -p "$tree"
    log "extracting $tarball"
    tar -xf "$tarball" -C "$tree" --strip-components=1 --no-same-owner
    for p in "${patches[@]}"; do
        log "applying $(basename "$p")"
        patch -d "$tree" -p1 --forward --batch --quiet < "$p" || die "patch $p does not apply to $package $pkg_version"
    done
    touch "$tree/.cloister-prepared"
fi

# Reproducible-ish build: no host name, user or date in the image.
export KBUILD_BUILD_USER=cloister KBUILD_BUILD_HOST=cloister
export KBUILD_BUILD_TIMESTAMP="$(date -u -R -d "@$(stat -c %Y "$tarball")")"
mk() { make -C "$tree" ARCH=x86_64 "$@"; }

# --- configuration ----------------------------------------------------------
log "configuring: tinyconfig + $(basename "$fragment")"
mk -s tinyconfig >/dev/null
(cd "$tree" && ARCH=x86_64 scripts/kconfig/merge_config.sh -m -O "$tree" "$tree/.config" "$fragment") >/dev/null
mk -s olddefconfig >/dev/null

# Every option of the fragment must have landed as written: Kconfig drops an
# option silently when a dependency is missing.
missing="$(awk '
    FNR == NR {
        if (match($0, /^CONFIG_[A-Za-z0-9_]+=/)) { name = substr($0, 1, RLENGTH - 1); want[name] = substr($0, RLENGTH + 1) }
        else if (match($0, /^# CONFIG_[A-Za-z0-9_]+ is not set/)) { name = $2; want[name] = "n" }
        next
    }
    {
        if (match($0, /^CONFIG_[A-Za-z0-9_]+=/)) { name = substr($0, 1, RLENGTH - 1); have[name] = substr($0, RLENGTH + 1) }
        else if (match($0, /^# CONFIG_[A-Za-z0-9_]+ is not set/)) { have[$2] = "n" }
    }
    END {
        for (name in want) {
            got = (name in have) ? have[name] : "n (absent)"
            # An absent option is off, which is what "is not set" asks for.
            if (want[name] == "n" && got == "n (absent)") continue
            if (got != want[name]) printf "  %s: wanted %s, got %s\n", name, want[name], got
        }
    }' "$fragment" "$tree/.config" | sort)"
if [ -n "$missing" ]; then
    printf 'build-kernel: error: options of %s did not land in .config (missing dependency?):\n%s\n' "$fragment" "$missing" >&2
    exit 1
fi
log "configuration checked: every option of $(basename "$fragment") is set as asked"

# --- build ------------------------------------------------------------------
jobs="$(nproc)"
log "building vmlinux bzImage with -j$jobs (8-25 min on 2 cores)"
mk -s -j"$jobs" vmlinux bzImage
kernel_version="$(mk -s kernelversion)"

cp "$tree/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
cp "$tree/arch/x86/boot/bzImage" "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
cp "$tree/.config" "$out/config.tmp" && mv "$out/config.tmp" "$out/config"
# VERSION last: its presence (with the others) marks the folder complete.
printf '%s %s\nkernel %s\n' "$package" "$pkg_version" "$kernel_version" > "$out/VERSION.tmp"
mv "$out/VERSION.tmp" "$out/VERSION"

if [ "${CLOISTER_KEEP_KERNEL_TREE:-0}" != 1 ]; then
    log "removing build tree $tree (CLOISTER_KEEP_KERNEL_TREE=1 keeps it)"
    rm -rf "$tree"
fi
update_current
log "done: vmlinux $(stat -c %s "$out/vmlinux") bytes, bzImage $(stat -c %s "$out/bzImage") bytes, kernel $kernel_version"
echo "$out"

#!/usr/bin/env bash
# Fetches containerd 2.x from Debian sid into $CLOISTER_CACHE/tools/containerd2
# without touching the machine's apt configuration (a private apt state
# folder with one sid line), so tests can run our shim under both Debian's
# containerd 1.6 and 2.x. Its binaries need only libc >= 2.34 and runc, so
# they run on bookworm with bookworm's runc. Prints the folder holding
# `containerd` and `ctr`. Reuses a fetched copy for a day (sid moves).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
. "$here/env.sh"

root="$CLOISTER_CACHE/tools/containerd2"
bin="$root/usr/bin"
if [ -x "$bin/containerd" ] && [ -n "$(find "$root/fetched" -mmin -1440 2>/dev/null)" ]; then
    echo "$bin"
    exit 0
fi

# The mirror this machine already uses, from deb822 or one-line sources.
uri="$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
[ -n "$uri" ] || uri="$(awk '$1 == "deb" && $2 ~ /debian$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)"
[ -n "$uri" ] || uri="http://deb.debian.org/debian"

apt_dir="$(mktemp -d)"
trap 'rm -rf "$apt_dir"' EXIT
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri sid main" >"$apt_dir/sources.list"
apt_opts=(
    -o "Dir::Etc::sourcelist=$apt_dir/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "APT::Get::List-Cleanup=0"
    -o "DPkg::Lock::Timeout=900"
    -o "APT::Sandbox::User=root"
)
echo "install-containerd2: fetching containerd from sid ($uri)" >&2
apt-get -q "${apt_opts[@]}" update >&2
(cd "$apt_dir" && apt-get -q "${apt_opts[@]}" download containerd >&2)
deb="$(ls "$apt_dir"/containerd_*.deb)"
rm -rf "$root"
mkdir -p "$root"
dpkg-deb -x "$deb" "$root"
touch "$root/fetched"
"$bin/containerd" --version >&2
echo "$bin"

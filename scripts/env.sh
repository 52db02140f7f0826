# Sourced by the scripts: one cache folder outside the clone for cargo's
# target dir, the guest kernel and the initramfs, reused between runs.
# HOME may be missing in a stripped CI environment: take it from passwd.
: "${HOME:=$(getent passwd "$(id -u)" | cut -d: -f6)}"
export HOME
export CLOISTER_CACHE="${CLOISTER_CACHE:-$HOME/.cache/cloister}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CLOISTER_CACHE/target}"
export PATH="$HOME/.cargo/bin:$PATH"
mkdir -p "$CLOISTER_CACHE"

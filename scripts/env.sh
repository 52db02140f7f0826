# Sourced by the scripts: one cache folder outside the clone for cargo's
# target dir, the guest kernel and the initramfs, reused between runs.
export CLOISTER_CACHE="${CLOISTER_CACHE:-${HOME:-/tmp}/.cache/cloister}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CLOISTER_CACHE/target}"
export PATH="$HOME/.cargo/bin:$PATH"
mkdir -p "$CLOISTER_CACHE"

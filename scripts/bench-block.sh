#!/usr/bin/env bash
# virtio-blk throughput: the block device (requests through its queue, as
# the transport drives it) against plain pread/pwrite and dd with the same
# block size on the same image, medians and ratios. Debug build, like every
# other binary here. Usage: scripts/bench-block.sh [bench_block options]
# (--mib N, --block-kib 64,1024, --depth, --segment-kib, --rounds, --dir,
# --verbose).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
. scripts/env.sh
cargo build -q -p cloister-vmm --example bench_block
exec "$CARGO_TARGET_DIR/debug/examples/bench_block" "$@"

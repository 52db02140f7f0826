#!/usr/bin/env bash
# virtio-blk throughput, side by side, in two settings:
#
# 1. host: the block device (requests through its queue, as the transport
#    drives it) against plain pread/pwrite and dd with the same block size
#    on the same image (vmm/examples/bench_block.rs; options below);
# 2. guest: a Linux guest under QEMU/TCG doing O_DIRECT dd to two disks in
#    the same run: ours (`cloister-vmm vhost-user --device block`, QEMU's
#    vhost-user-blk) and QEMU's own virtio-blk on an identical image. TCG
#    bounds both, so the ratio is what matters. Skipped, with the reason,
#    without qemu-system-x86_64, busybox (static), cpio or the guest kernel
#    (scripts/build-guest.sh).
#
# Built with the bench-opt profile (optimised), as the peers (coreutils dd,
# QEMU) are.
# Usage: scripts/bench-block.sh [bench_block options]
#   (--mib N, --block-kib 64,1024, --depth, --segment-kib, --rounds, --dir,
#   --verbose); BENCH_BLOCK_HOST=0 / BENCH_BLOCK_GUEST=0 skip a part,
#   GUEST_MIB (256) and GUEST_ROUNDS (3) size the guest part, GUEST_LOG=FILE
#   keeps the guest's console (every round's timing).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
. scripts/env.sh
cargo build -q --profile bench-opt -p cloister-vmm --example bench_block --bin cloister-vmm
[ "${BENCH_BLOCK_HOST:-1}" = 0 ] || "$CARGO_TARGET_DIR/bench-opt/examples/bench_block" "$@"

[ "${BENCH_BLOCK_GUEST:-1}" = 0 ] && exit 0
echo
skip() { echo "guest comparison: SKIP: $*"; exit 0; }
vmlinux="$CLOISTER_CACHE/kernel/current/vmlinux"
command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
command -v cpio >/dev/null || skip "cpio missing (apt-get install cpio)"
busybox="$(command -v busybox || true)"
# ldd fails on a static executable, which the initramfs needs.
[ -n "$busybox" ] && ! ldd "$busybox" >/dev/null 2>&1 ||
  skip "no static busybox (apt-get install busybox-static)"
[ -f "$vmlinux" ] || skip "no guest kernel at $vmlinux (scripts/build-guest.sh)"

mib="${GUEST_MIB:-256}"
rounds="${GUEST_ROUNDS:-3}"
work="$(mktemp -d)"
backend_pid=""
cleanup() {
  [ -n "$backend_pid" ] && kill "$backend_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The guest: busybox and an /init that times O_DIRECT writes and reads of
# $mib MiB per disk, block size and round (centiseconds from /proc/uptime).
mkdir -p "$work/root/bin" "$work/root/proc" "$work/root/sys" "$work/root/dev"
cp "$busybox" "$work/root/bin/busybox"
cat >"$work/root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
now() { cut -d' ' -f1 /proc/uptime; }
for d in /sys/block/vd*; do
  n=\${d##*/}
  who=qemu-virtio-blk
  [ "\$(cat \$d/serial)" = cloister-bench ] && who=cloister
  for bs in 64 1024; do
    count=\$(( $mib * 1024 / bs ))
    for round in \$(seq $rounds); do
      s=\$(now); dd if=/dev/zero of=/dev/\$n bs=\${bs}k count=\$count oflag=direct 2>/dev/null; e=\$(now)
      echo "bench: \$who \$bs write \$s \$e"
      s=\$(now); dd if=/dev/\$n of=/dev/null bs=\${bs}k count=\$count iflag=direct 2>/dev/null; e=\$(now)
      echo "bench: \$who \$bs read \$s \$e"
    done
  done
done
echo "bench: done"
reboot -f
EOF
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet >"$work/init.cpio")
truncate -s "$((mib + 16))M" "$work/ours.img" "$work/peer.img"

"$CARGO_TARGET_DIR/bench-opt/cloister-vmm" vhost-user --device block --path "$work/ours.img" \
  --serial cloister-bench --socket "$work/blk.sock" >"$work/backend.log" 2>&1 &
backend_pid=$!
for _ in $(seq 100); do [ -S "$work/blk.sock" ] && break; sleep 0.1; done
[ -S "$work/blk.sock" ] || { cat "$work/backend.log"; echo "vhost-user back end did not start" >&2; exit 1; }

echo "guest: Linux under QEMU/TCG, O_DIRECT dd of $mib MiB, median of $rounds rounds"
timeout 900 qemu-system-x86_64 -M microvm,acpi=off,memory-backend=mem \
  -object memory-backend-memfd,id=mem,size=256M,share=on \
  -accel tcg -cpu qemu64 -m 256M -smp 1 -nodefaults -no-reboot \
  -display none -monitor none -serial stdio \
  -kernel "$vmlinux" -initrd "$work/init.cpio" \
  -append "console=ttyS0 panic=-1 mitigations=off reboot=t tsc_early_khz=2445000 lpj=4890000 no_timer_check" \
  -chardev socket,id=blk,path="$work/blk.sock" -device vhost-user-blk,chardev=blk \
  -drive file="$work/peer.img",if=none,id=peer,format=raw,cache=writeback,aio=threads \
  -device virtio-blk-device,drive=peer,serial=qemu-peer >"$work/guest.log" 2>&1 || true
[ -n "${GUEST_LOG:-}" ] && cp "$work/guest.log" "$GUEST_LOG"
grep -q "bench: done" "$work/guest.log" ||
  { tail -30 "$work/guest.log"; cat "$work/backend.log"; echo "guest did not finish" >&2; exit 1; }

# MiB/s per (device, block size, direction): median over rounds; then the
# ratio ours / QEMU's.
grep -a "^bench: " "$work/guest.log" | grep -v done | awk -v mib="$mib" '
  { key = $3 " " $4; rate = ($6 > $5) ? mib / ($6 - $5) : 0; v[$2, key, ++n[$2, key]] = rate; keys[key] = 1 }
  function median(dev, key,   i, j, t, c, a) {
    c = n[dev, key]; for (i = 1; i <= c; i++) a[i] = v[dev, key, i]
    for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return (c % 2) ? a[(c + 1) / 2] : (a[c / 2] + a[c / 2 + 1]) / 2
  }
  END {
    printf "%6s %5s %14s %16s %8s\n", "block", "op", "cloister", "qemu virtio-blk", "ratio"
    split("64 write,64 read,1024 write,1024 read", order, ",")
    for (k = 1; k <= 4; k++) {
      key = order[k]; split(key, p, " ")
      ours = median("cloister", key); peer = median("qemu-virtio-blk", key)
      printf "%5sK %5s %8.0f MiB/s %10.0f MiB/s %8.2f\n", p[1], p[2], ours, peer, (peer > 0) ? ours / peer : 0
    }
  }'

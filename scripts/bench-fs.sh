#!/usr/bin/env bash
# virtio-fs throughput and metadata speed, side by side in one run:
#
# - host: the operations on a plain host folder (the ceiling);
# - guest, one Linux guest under QEMU/TCG with two virtio-fs shares mounted
#   at once: ours (`cloister-vmm vhost-user --device fs`) and virtiofsd, the
#   daemon Kata uses (installed from crates.io by
#   scripts/install-peer-tool.sh), both with cache=auto; plus the guest's
#   tmpfs, which shows what TCG itself costs.
#
# Operations: sequential write of $MIB MiB (dd bs=1M, fsync), sequential
# read after dropping caches, and $FILES small files created, listed with
# stat (ls -l, caches dropped first) and removed. Times are centiseconds
# from /proc/uptime; each figure is the median of $ROUNDS rounds. TCG slows
# the guest's own instructions ~10-50x, so "ours / virtiofsd" is the figure
# that compares device code; "ours / host" is printed as asked but is
# bounded by TCG here.
#
# Usage: scripts/bench-fs.sh    (MIB=256 FILES=2000 ROUNDS=3;
#   GUEST_LOG=FILE keeps the guest console; VIRTIOFSD=PATH skips the install)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
. scripts/env.sh

mib="${MIB:-256}"
files="${FILES:-2000}"
rounds="${ROUNDS:-3}"
skip() { echo "bench-fs: SKIP: $*"; exit 0; }
command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
command -v cpio >/dev/null || skip "cpio missing (apt-get install cpio)"
busybox="$(command -v busybox || true)"
# ldd fails on a static executable, which the initramfs needs.
[ -n "$busybox" ] && ! ldd "$busybox" >/dev/null 2>&1 ||
  skip "no static busybox (apt-get install busybox-static)"
vmlinux="$CLOISTER_CACHE/kernel/current/vmlinux"
[ -f "$vmlinux" ] || skip "no guest kernel at $vmlinux (scripts/build-guest.sh)"
[ "$(id -u)" = 0 ] || skip "not root (drops the host's page cache between rounds)"
cargo build -q --profile bench-opt -p cloister-vmm --bin cloister-vmm
virtiofsd="${VIRTIOFSD:-$(scripts/install-peer-tool.sh virtiofsd)}"

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The operations, for host and guest alike: ops.sh LABEL DIR
cat >"$work/ops.sh" <<'EOF'
label=$1 dir=$2 mib=$3 files=$4
now() { cut -d' ' -f1 /proc/uptime; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
run() { op=$1; shift; s=$(now); "$@"; e=$(now); echo "bench: $label $op $s $e"; }
mkdir -p "$dir/small"
run write dd if=/dev/zero of="$dir/seq" bs=1M count="$mib" conv=fsync 2>/dev/null
drop
run read dd if="$dir/seq" of=/dev/null bs=1M 2>/dev/null
rm -f "$dir/seq"
run create sh -c "cd '$dir/small' && seq $files | xargs touch"
drop
run stat sh -c "ls -l '$dir/small' >/dev/null"
run remove rm -r "$dir/small"
EOF

mkdir -p "$work/root/bin" "$work/root/proc" "$work/root/sys" "$work/root/dev" \
  "$work/root/ours" "$work/root/peer" "$work/root/tmp" "$work/share-ours" "$work/share-peer" "$work/host"
cp "$busybox" "$work/root/bin/busybox"
cp "$work/ops.sh" "$work/root/ops.sh"
cat >"$work/root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=$((mib + 64))m tmp /tmp
mount -t virtiofs ours /ours || echo "bench: mount ours failed"
mount -t virtiofs peer /peer || echo "bench: mount peer failed"
for round in \$(seq $rounds); do
  for where in ours peer tmp; do sh /ops.sh \$where /\$where $mib $files; done
done
echo "bench: done"
reboot -f
EOF
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet >"$work/init.cpio")

wait_socket() {
  for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done
  cat "$2"; echo "bench-fs: no vhost-user socket $1" >&2; exit 1
}
"$CARGO_TARGET_DIR/bench-opt/cloister-vmm" vhost-user --device fs --shared-dir "$work/share-ours" \
  --tag ours --cache auto --socket "$work/ours.sock" >"$work/ours.log" 2>&1 &
pids+=($!)
"$virtiofsd" --socket-path "$work/peer.sock" --shared-dir "$work/share-peer" --cache auto \
  >"$work/peer.log" 2>&1 &
pids+=($!)
wait_socket "$work/ours.sock" "$work/ours.log"
wait_socket "$work/peer.sock" "$work/peer.log"

echo "host: $mib MiB sequential, $files small files, median of $rounds rounds"
for _ in $(seq "$rounds"); do sh "$work/ops.sh" host "$work/host" "$mib" "$files"; done >"$work/host.log"

echo "guest: Linux under QEMU/TCG, both shares cache=auto"
timeout 1800 qemu-system-x86_64 -M microvm,acpi=off,memory-backend=mem \
  -object memory-backend-memfd,id=mem,size=1024M,share=on \
  -accel tcg -cpu qemu64 -m 1024M -smp 1 -nodefaults -no-reboot \
  -display none -monitor none -serial stdio \
  -kernel "$vmlinux" -initrd "$work/init.cpio" \
  -append "console=ttyS0 panic=-1 mitigations=off reboot=t tsc_early_khz=2445000 lpj=4890000 no_timer_check" \
  -chardev socket,id=ours,path="$work/ours.sock" -device vhost-user-fs-device,chardev=ours,tag=ours \
  -chardev socket,id=peer,path="$work/peer.sock" -device vhost-user-fs-device,chardev=peer,tag=peer \
  >"$work/guest.log" 2>&1 || true
[ -n "${GUEST_LOG:-}" ] && cp "$work/guest.log" "$GUEST_LOG"
if ! grep -q "bench: done" "$work/guest.log" || grep -q "mount .* failed" "$work/guest.log"; then
  tail -30 "$work/guest.log"; cat "$work/ours.log" "$work/peer.log"
  echo "bench-fs: guest did not finish" >&2; exit 1
fi

# Per (where, op): median seconds; MiB/s for write/read, files/s otherwise.
grep -ah "^bench: " "$work/guest.log" "$work/host.log" | grep -v "done\|failed" | awk -v mib="$mib" -v files="$files" '
  { t = $5 - $4; if (t <= 0) t = 0.01; v[$2, $3, ++n[$2, $3]] = t }
  function median(w, op,   i, j, x, c, a) {
    c = n[w, op]; for (i = 1; i <= c; i++) a[i] = v[w, op, i]
    for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (a[j] < a[i]) { x = a[i]; a[i] = a[j]; a[j] = x }
    return (c % 2) ? a[(c + 1) / 2] : (a[c / 2] + a[c / 2 + 1]) / 2
  }
  function rate(w, op) { return ((op == "write" || op == "read") ? mib : files) / median(w, op) }
  END {
    printf "%-7s %-7s %12s %12s %12s %12s %10s %10s\n", "op", "unit", "cloister", "virtiofsd", "guest tmpfs", "host", "/virtiofsd", "/host"
    split("write read create stat remove", ops, " ")
    for (k = 1; k <= 5; k++) {
      op = ops[k]; unit = (op == "write" || op == "read") ? "MiB/s" : "files/s"
      o = rate("ours", op); p = rate("peer", op); t = rate("tmp", op); h = rate("host", op)
      printf "%-7s %-7s %12.0f %12.0f %12.0f %12.0f %10.2f %10.2f\n", op, unit, o, p, t, h, o / p, o / h
    }
  }'

#!/usr/bin/env bash
# Installs the Debian packages cloister's builds and tests need. Idempotent:
# when everything is present it does not touch apt at all.
set -euo pipefail

packages=(
  # guest kernel build (kernel-config/build-kernel.sh)
  linux-source-6.12 bc bison flex libelf-dev libssl-dev cpio xz-utils lz4 patch make gcc libc6-dev
  # guest boot tests and benchmarks: QEMU microvm as the reference VMM
  qemu-system-x86
  # container rootfs for agent tests
  busybox-static
  # the shim under a private containerd (1.6; brings runc), host tests' tools
  containerd util-linux iproute2
  # CRI end-to-end tests: the k8s-cri crate's build runs protoc; CNI plugins
  protobuf-compiler containernetworking-plugins
  # attestation: OVMF with SEV metadata for launch-digest cross-checks,
  # a venv for the reference tool sev-snp-measure
  ovmf python3-venv openssl
  # benchmark peers built from crates.io (virtiofsd, scripts/install-peer-tool.sh)
  libseccomp-dev libcap-ng-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
else
  echo "install-deps: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: need root to install packages (run with sudo)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 update -qq
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}"
fi

# The shim is tested under containerd 2.x as well (from sid, unpacked into
# the cache; bookworm has only 1.6).
if [ "$(id -u)" -eq 0 ]; then
  echo "install-deps: containerd 2.x in $("$(dirname "$0")/install-containerd2.sh" 2>/dev/null)"
fi

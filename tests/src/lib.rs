//! End-to-end tests: real containerd with ctr and a CRI client, the RuntimeClass handler, and real microVMs where the host can run them.
//!
//! - [`guest_image`]: finds the built guest kernel and initramfs.
//! - [`console`]: runs a VMM process with its serial console on stdout,
//!   timing each console line and sampling its peak memory.
//! - [`qemu`]: boots the image in QEMU `-M microvm` (TCG or KVM) and names
//!   the console milestones.
//! - [`cloister_vmm`]: boots the same image the same way in `cloister-vmm`.
//! - [`hybrid_vsock`]: the host side of hybrid vsock and of the vsock
//!   probe's modes (echo, concurrent echo, bulk with checksums).
//! - [`pod_netns`]: a pod and a peer network namespace joined by a veth
//!   pair, removed on drop, for the pod network tests.
//! - [`vhost_user`]: vhost-user back ends for QEMU (ours, the
//!   `vhost-device-vsock` peer) and the vsock probe guest run.
//! - [`containerd`]: a private containerd (1.6 or 2.x) and busybox root
//!   file systems for `ctr run`.
//! - [`runtime`]: our shim and runtime config as the demo and benchmarks
//!   hand them to containerd.
//! - [`cri`]: a CRI client (kubelet's view of containerd), a confined CNI
//!   bridge network, CRI log files.
//! - [`oci_image`]: a container image archive from a folder, for
//!   `ctr images import` (no registry needed).
//! - [`agent_guest`]: the agent as PID 1 under QEMU/TCG, driven over
//!   hybrid vsock like the shim drives it, with extra vhost-user devices.
//! - [`net_guest`]: a busybox guest on a tap in a private network
//!   namespace, on our vhost-user virtio-net or QEMU's own.

pub mod agent_guest;
pub mod cloister_vmm;
pub mod console;
pub mod containerd;
pub mod cri;
pub mod guest_image;
pub mod hybrid_vsock;
pub mod net_guest;
pub mod oci_image;
pub mod pod_netns;
pub mod qemu;
pub mod runtime;
pub mod vhost_user;

//! Host side of pod networking: in the pod's network namespace (made by
//! CNI), one tap per pod interface joined to it by tc mirred redirects,
//! with no bridge; plus the interfaces, addresses and routes the agent needs
//! to configure the guest the same way.
//!
//! - [`netns`]: entering a namespace on a dedicated thread.
//! - [`netlink`]: an rtnetlink session bound to the namespace.
//! - [`pod_interfaces`]: what CNI made (interfaces, addresses, routes) and
//!   the agent's `Interface` / `Route` messages for it.
//! - [`tap`]: creating the tap (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`).
//! - [`tc`]: ingress qdiscs and the u32 → mirred redirect filters.
//! - [`pod_network`]: setup (undone on failure) and idempotent teardown.
//! - [`pod_spec`]: which network the sandbox's OCI spec asks for.
//!
//! The shim reads [`network_namespace`] from the sandbox container's spec
//! (host network: refuse; fresh namespace: nothing to do; a path: go on),
//! calls [`setup_pod_network`] with that path, hands each [`PodTap::fd`]
//! to the VMM it spawns ([`inherit_in_child`]; `cloister-vmm --net
//! fd=N,mac=M` or QEMU `-netdev tap,fd=N -device
//! virtio-net-device,mac=M`, with the veth's MAC from
//! [`PodEndpoint::guest_mac`]), sends the agent
//! [`PodNetwork::update_interfaces_request`] and
//! [`PodNetwork::update_routes_request`], and calls
//! [`teardown_pod_network`] when the sandbox goes.

pub mod netlink;
pub mod netns;
pub mod pod_interfaces;
pub mod pod_network;
pub mod pod_spec;
pub mod tap;
pub mod tc;

pub use netns::{NetNs, NetnsError};
pub use pod_interfaces::{IpPrefix, MacAddress, PodInterface, PodInterfaces, PodRoute};
pub use pod_network::{
    setup_pod_interfaces, setup_pod_network, teardown_pod_network, PodEndpoint, PodNetwork,
    PodNetworkError, PodTap, TeardownReport,
};
pub use pod_spec::{network_namespace, PodNetworkNamespace, PodSpecError};
pub use tap::{clear_cloexec, inherit_in_child, TapError, TapName};

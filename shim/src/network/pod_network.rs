//! Setup and teardown of a pod's network for its microVM: one tap per pod
//! interface, joined to it by tc mirred redirects, no bridge.
//!
//! ```text
//!  peer ── veth ═╗ ingress: u32 match-all → mirred egress redirect → tap
//!                ║                                                  │ fd (IFF_VNET_HDR)
//!  peer ◄─ veth ◄╝ mirred egress redirect ← u32 match-all ← ingress: tap ◄── VMM (virtio-net, veth's MAC)
//! ```
//!
//! The guest's interface takes the veth's MAC and the pod's IP, so for
//! everything upstream the guest *is* the veth's end of the pod. Teardown
//! works from what it finds (our taps by kind and name, our filters by
//! preference), not from a record of the setup, so it can run twice, after a
//! half-done setup, or after a shim restart.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use cloister_protocol::agent;

use super::netlink::{link_name, NetlinkError, NetlinkSession};
use super::netns::{NetNs, NetnsError};
use super::pod_interfaces::{discover, is_our_tap, PodInterface, PodInterfaces, PodRoute};
use super::tap::{open_tap, TapError, TapName};
use super::tc;

/// Errors setting up or tearing down a pod network.
#[derive(Debug, thiserror::Error)]
pub enum PodNetworkError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("pod network {netns:?}")]
    Netlink {
        netns: PathBuf,
        #[source]
        source: NetlinkError,
    },
    #[error("pod network {netns:?}")]
    Tap {
        netns: PathBuf,
        #[source]
        source: TapError,
    },
    #[error("pod network {netns:?}: no interface {name:?}")]
    UnknownInterface { netns: PathBuf, name: String },
    #[error("pod network {netns:?}: interface {name:?} is not an Ethernet pod interface (loopback, tap or not Ethernet)")]
    NotPodInterface { netns: PathBuf, name: String },
    #[error(
        "pod network {netns:?}: tap {name:?} already exists (a previous setup not torn down?)"
    )]
    TapExists { netns: PathBuf, name: String },
}

/// The tap made for one pod interface.
#[derive(Debug)]
pub struct PodTap {
    pub name: TapName,
    pub index: u32,
    /// The tap's queue, for the VMM (close-on-exec: see
    /// [`super::tap::clear_cloexec`]). The tap lives while any copy of this
    /// fd is open.
    pub fd: OwnedFd,
}

/// A pod interface and the tap redirected to it.
#[derive(Debug)]
pub struct PodEndpoint {
    pub interface: PodInterface,
    pub tap: PodTap,
}

impl PodEndpoint {
    /// The MAC address to give the guest's virtio-net device (the veth's).
    pub fn guest_mac(&self) -> String {
        self.interface.mac.to_string()
    }
}

/// A pod network set up for a VM.
#[derive(Debug)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub endpoints: Vec<PodEndpoint>,
    /// The pod's routes through its interfaces.
    pub routes: Vec<PodRoute>,
}

impl PodNetwork {
    /// The agent request that configures the guest's interfaces.
    pub fn update_interfaces_request(&self) -> agent::UpdateInterfacesRequest {
        let mut request = agent::UpdateInterfacesRequest::new();
        request.interfaces = self
            .endpoints
            .iter()
            .map(|e| e.interface.to_agent())
            .collect();
        request
    }

    /// The agent request that adds the pod's routes in the guest.
    pub fn update_routes_request(&self) -> agent::UpdateRoutesRequest {
        let mut request = agent::UpdateRoutesRequest::new();
        request.routes = self.routes.iter().map(PodRoute::to_agent).collect();
        request
    }
}

/// What [`teardown_pod_network`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TeardownReport {
    /// The namespace path no longer exists: nothing could be left in it.
    pub netns_missing: bool,
    pub filters_removed: usize,
    pub qdiscs_removed: usize,
    pub taps_removed: Vec<String>,
}

/// Sets up every pod interface of the namespace at `netns`.
pub async fn setup_pod_network(netns: &Path) -> Result<PodNetwork, PodNetworkError> {
    setup(netns, None).await
}

/// Sets up the named pod interfaces only; fails naming an interface that
/// does not exist or is not a pod interface.
pub async fn setup_pod_interfaces(
    netns: &Path,
    names: &[&str],
) -> Result<PodNetwork, PodNetworkError> {
    setup(netns, Some(names)).await
}

/// Removes every tap and redirect filter we made in `netns` (and ingress
/// qdiscs left empty by that). Idempotent; a missing namespace is not an
/// error (see [`TeardownReport::netns_missing`]).
pub async fn teardown_pod_network(netns: &Path) -> Result<TeardownReport, PodNetworkError> {
    let ns = match NetNs::open(netns) {
        Ok(ns) => ns,
        Err(e) if e.is_missing() => {
            return Ok(TeardownReport {
                netns_missing: true,
                ..TeardownReport::default()
            })
        }
        Err(e) => return Err(e.into()),
    };
    let netlink_error = |source| PodNetworkError::Netlink {
        netns: netns.to_path_buf(),
        source,
    };
    let session = NetlinkSession::open_in(&ns).await.map_err(netlink_error)?;
    let mut report = TeardownReport::default();
    let links = session.links().await.map_err(netlink_error)?;
    for link in links.iter().filter(|l| !is_our_tap(l)) {
        let index = link.header.index;
        let name = link_name(link).unwrap_or("?");
        let Some(qdisc) = tc::ingress_qdisc_kind(&session, index)
            .await
            .map_err(netlink_error)?
        else {
            continue;
        };
        let filters = tc::ingress_filters(&session, index)
            .await
            .map_err(netlink_error)?;
        let ours: Vec<u16> = filters
            .iter()
            .filter(|f| f.is_ours())
            .map(|f| f.pref)
            .collect();
        for pref in &ours {
            gone_is_fine(tc::delete_ingress_filter(&session, index, *pref, name).await)
                .map_err(netlink_error)?;
            report.filters_removed += 1;
        }
        // Only an `ingress` qdisc (setup never makes another kind: a
        // clsact one may hold egress filters we do not see here) that we
        // emptied; one with filters of its own stays.
        if qdisc == "ingress" && !ours.is_empty() && filters.len() == ours.len() {
            gone_is_fine(tc::delete_ingress_qdisc(&session, index, name).await)
                .map_err(netlink_error)?;
            report.qdiscs_removed += 1;
        }
    }
    for link in links.iter().filter(|l| is_our_tap(l)) {
        let name = link_name(link).unwrap_or("?");
        gone_is_fine(session.delete_link(link.header.index, name).await).map_err(netlink_error)?;
        report.taps_removed.push(name.to_string());
    }
    Ok(report)
}

/// Treats "no such device / object" as done: someone (the kernel, when a
/// tap's last fd closed) removed it first.
fn gone_is_fine(result: Result<(), NetlinkError>) -> Result<(), NetlinkError> {
    match result {
        Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::ENODEV)) => Ok(()),
        other => other,
    }
}

/// What a setup did so far, undone in reverse on failure. Things on the tap
/// itself (its qdisc and filter) go with the tap.
enum Done {
    Tap { index: u32, name: String },
    VethQdisc { index: u32, name: String },
    VethFilter { index: u32, name: String },
}

async fn setup(netns: &Path, only: Option<&[&str]>) -> Result<PodNetwork, PodNetworkError> {
    let ns = NetNs::open(netns)?;
    let netlink_error = |source| PodNetworkError::Netlink {
        netns: netns.to_path_buf(),
        source,
    };
    let session = NetlinkSession::open_in(&ns).await.map_err(netlink_error)?;
    let found = discover(&session).await.map_err(netlink_error)?;
    let interfaces = match only {
        None => found.interfaces.clone(),
        Some(names) => select(netns, &session, &found, names).await?,
    };
    let mut done = Vec::new();
    match plumb(&ns, &session, interfaces, &mut done).await {
        Ok(endpoints) => Ok(PodNetwork {
            netns: netns.to_path_buf(),
            routes: found
                .routes
                .into_iter()
                .filter(|r| endpoints.iter().any(|e| e.interface.name == r.device))
                .collect(),
            endpoints,
        }),
        Err(error) => {
            undo(&session, done).await;
            Err(error)
        }
    }
}

/// The named interfaces, each checked to be a pod interface.
async fn select(
    netns: &Path,
    session: &NetlinkSession,
    found: &PodInterfaces,
    names: &[&str],
) -> Result<Vec<PodInterface>, PodNetworkError> {
    let links = session
        .links()
        .await
        .map_err(|source| PodNetworkError::Netlink {
            netns: netns.to_path_buf(),
            source,
        })?;
    let mut chosen = Vec::new();
    for name in names {
        if let Some(interface) = found.interfaces.iter().find(|i| i.name == *name) {
            chosen.push(interface.clone());
            continue;
        }
        // Not among the pod interfaces: either absent or not eligible.
        let exists = links.iter().any(|l| link_name(l) == Some(name));
        return Err(if exists {
            PodNetworkError::NotPodInterface {
                netns: netns.to_path_buf(),
                name: name.to_string(),
            }
        } else {
            PodNetworkError::UnknownInterface {
                netns: netns.to_path_buf(),
                name: name.to_string(),
            }
        });
    }
    Ok(chosen)
}

async fn plumb(
    ns: &NetNs,
    session: &NetlinkSession,
    interfaces: Vec<PodInterface>,
    done: &mut Vec<Done>,
) -> Result<Vec<PodEndpoint>, PodNetworkError> {
    let netns = ns.path().to_path_buf();
    let netlink_error = |source| PodNetworkError::Netlink {
        netns: netns.clone(),
        source,
    };
    let tap_error = |source| PodNetworkError::Tap {
        netns: netns.clone(),
        source,
    };
    let mut endpoints = Vec::new();
    for (n, interface) in interfaces.into_iter().enumerate() {
        let tap_name = TapName::for_interface(n).map_err(tap_error)?;
        // TUNSETIFF on the name of an existing tap nobody holds would
        // attach to it instead of failing: check first.
        if session
            .link_index(tap_name.as_str())
            .await
            .map_err(netlink_error)?
            .is_some()
        {
            return Err(PodNetworkError::TapExists {
                netns: netns.clone(),
                name: tap_name.to_string(),
            });
        }
        let for_thread = tap_name.clone();
        let fd = ns
            .run_async(move || open_tap(&for_thread))
            .await?
            .map_err(tap_error)?;
        let tap_index = session
            .link_index(tap_name.as_str())
            .await
            .map_err(netlink_error)?
            .ok_or_else(|| PodNetworkError::UnknownInterface {
                netns: netns.clone(),
                name: tap_name.to_string(),
            })?;
        done.push(Done::Tap {
            index: tap_index,
            name: tap_name.to_string(),
        });
        session
            .prepare_tap(tap_index, tap_name.as_str(), interface.mtu)
            .await
            .map_err(netlink_error)?;
        tc::add_ingress_qdisc(session, tap_index, tap_name.as_str())
            .await
            .map_err(netlink_error)?;
        tc::add_redirect_filter(
            session,
            tap_index,
            interface.index,
            &format!("{tap_name} -> {}", interface.name),
        )
        .await
        .map_err(netlink_error)?;
        // A CNI plugin may already have an ingress or clsact qdisc on the
        // veth: share it.
        if tc::ingress_qdisc_kind(session, interface.index)
            .await
            .map_err(netlink_error)?
            .is_none()
        {
            tc::add_ingress_qdisc(session, interface.index, &interface.name)
                .await
                .map_err(netlink_error)?;
            done.push(Done::VethQdisc {
                index: interface.index,
                name: interface.name.clone(),
            });
        }
        tc::add_redirect_filter(
            session,
            interface.index,
            tap_index,
            &format!("{} -> {tap_name}", interface.name),
        )
        .await
        .map_err(netlink_error)?;
        done.push(Done::VethFilter {
            index: interface.index,
            name: interface.name.clone(),
        });
        endpoints.push(PodEndpoint {
            interface,
            tap: PodTap {
                name: tap_name,
                index: tap_index,
                fd,
            },
        });
    }
    Ok(endpoints)
}

/// Undoes a failed setup, newest first; failures are logged, the setup's
/// own error is what the caller sees.
async fn undo(session: &NetlinkSession, done: Vec<Done>) {
    for step in done.into_iter().rev() {
        let result = match &step {
            Done::VethFilter { index, name } => {
                tc::delete_ingress_filter(session, *index, tc::REDIRECT_FILTER_PREF, name).await
            }
            Done::VethQdisc { index, name } => {
                tc::delete_ingress_qdisc(session, *index, name).await
            }
            Done::Tap { index, name } => session.delete_link(*index, name).await,
        };
        if let Err(error) = gone_is_fine(result) {
            tracing::warn!(error = %error, "undoing a failed pod network setup");
        }
    }
}

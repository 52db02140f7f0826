//! An rtnetlink session bound to a pod's network namespace, and the link
//! operations the plumbing needs (list, set MTU and up, delete).
//!
//! A netlink socket talks to the namespace it was created in, whatever
//! thread uses it later. So [`NetlinkSession::open_in`] creates the socket
//! on a short-lived thread inside the namespace and then drives it as an
//! ordinary task on the caller's tokio runtime.

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute, LinkMessage,
};
use rtnetlink::{Handle, LinkUnspec};

use super::netns::{NetNs, NetnsError};

/// A failed netlink request, naming what it was for.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket in network namespace {netns:?}")]
    Socket {
        netns: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("netlink session for {netns:?} needs a tokio runtime to drive it")]
    NoRuntime { netns: std::path::PathBuf },
    #[error("netlink: {what}")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

impl NetlinkError {
    pub(crate) fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let what = what.into();
        move |source| NetlinkError::Request { what, source }
    }

    /// The kernel's errno when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(message),
                ..
            } => Some(-message.raw_code()),
            _ => None,
        }
    }
}

/// A netlink route socket in one network namespace; its driver task stops
/// when the session is dropped.
pub struct NetlinkSession {
    handle: Handle,
    driver: tokio::task::JoinHandle<()>,
}

impl NetlinkSession {
    /// Opens a route socket inside `netns`; the caller's tokio runtime
    /// then drives it.
    pub async fn open_in(netns: &NetNs) -> Result<Self, NetlinkError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime {
                netns: netns.path().to_path_buf(),
            })?;
        let (connection, handle) = netns
            .run_async(move || {
                // The socket registers with the caller's reactor, from here.
                let _entered = runtime.enter();
                rtnetlink::new_connection().map(|(connection, handle, _)| (connection, handle))
            })
            .await?
            .map_err(|source| NetlinkError::Socket {
                netns: netns.path().to_path_buf(),
                source,
            })?;
        let driver = tokio::spawn(connection);
        Ok(Self { handle, driver })
    }

    /// The request handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Every link in the namespace.
    pub async fn links(&self) -> Result<Vec<LinkMessage>, NetlinkError> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::request("list links"))
    }

    /// Prepares a fresh tap for the guest: the pod interface's MTU, no
    /// IPv6 address of its own (`addr_gen_mode none`, so the host sends no
    /// router solicitations or DAD probes from the tap's random MAC into the
    /// guest's link), then up.
    pub async fn prepare_tap(&self, index: u32, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        let no_ipv6_address =
            LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(
                In6AddrGenMode::None,
            )])]);
        let what = format!("set {name} mtu {mtu} addrgenmode none");
        let configured = self
            .handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(mtu)
                    .append_extra_attribute(no_ipv6_address)
                    .build(),
            )
            .execute()
            .await
            .map_err(NetlinkError::request(what));
        match configured {
            // A kernel without IPv6 has nothing to generate.
            Err(e) if e.errno() == Some(libc::EAFNOSUPPORT) => {
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
                    .execute()
                    .await
                    .map_err(NetlinkError::request(format!("set {name} mtu {mtu}")))?;
            }
            other => other?,
        }
        // Up only now: the address mode must be set before the device
        // starts IPv6 autoconfiguration.
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(NetlinkError::request(format!("set {name} up")))
    }

    /// Deletes link `index`.
    pub async fn delete_link(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(NetlinkError::request(format!("delete link {name}")))
    }

    /// The index of the link called `name`, if there is one.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self
            .links()
            .await?
            .iter()
            .find(|link| link_name(link) == Some(name))
            .map(|link| link.header.index))
    }
}

impl Drop for NetlinkSession {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// A link's name (`IFLA_IFNAME`).
pub fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

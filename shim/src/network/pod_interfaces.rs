//! What CNI made in a pod's network namespace: its interfaces (name, MAC,
//! MTU, addresses) and routes, read over netlink, and their translation
//! into the agent's `UpdateInterfaces` / `UpdateRoutes` messages.
//!
//! Which interfaces count: Ethernet links that are not loopback and not one
//! of our taps (veth from the bridge/ptp plugins, macvlan, ipvlan-l2 ...).
//! Which addresses: every IPv4 one and every IPv6 one but link-local (the
//! guest derives the same `fe80::` address from the same MAC itself).
//! Which routes: unicast routes of the main table through a pod interface,
//! except `proto kernel` ones — those the kernel makes from an address, and
//! the guest's kernel will make them again from the same address.

use std::fmt;
use std::net::IpAddr;

use cloister_protocol::agent;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::RouteMessageBuilder;

use super::netlink::{link_name, NetlinkError, NetlinkSession};
use super::tap::TapName;

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// An address with its prefix length (`10.88.0.5/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

/// A pod interface as CNI configured it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    pub name: String,
    pub index: u32,
    /// The guest's interface gets this MAC, so frames it sends are the
    /// veth's own as far as everything upstream can tell.
    pub mac: MacAddress,
    pub mtu: u32,
    pub addresses: Vec<IpPrefix>,
}

impl PodInterface {
    /// The agent's description: matched by MAC in the guest, renamed to
    /// the pod's name for it.
    pub fn to_agent(&self) -> agent::Interface {
        let mut interface = agent::Interface::new();
        interface.mac_address = self.mac.to_string();
        interface.name = self.name.clone();
        interface.mtu = self.mtu;
        interface.addresses = self.addresses.iter().map(ToString::to_string).collect();
        interface
    }
}

/// A route of the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    /// `None`: the default route.
    pub destination: Option<IpPrefix>,
    pub gateway: Option<IpAddr>,
    /// The pod interface it goes out of.
    pub device: String,
    pub source: Option<IpAddr>,
    pub metric: u32,
}

impl PodRoute {
    /// The agent's description (destination "" for the default route).
    pub fn to_agent(&self) -> agent::Route {
        let mut route = agent::Route::new();
        route.destination = self.destination.map(|d| d.to_string()).unwrap_or_default();
        route.gateway = self.gateway.map(|g| g.to_string()).unwrap_or_default();
        route.device = self.device.clone();
        route.source = self.source.map(|s| s.to_string()).unwrap_or_default();
        route.metric = self.metric;
        route
    }
}

/// The pod's interfaces (ordered by ifindex) and routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInterfaces {
    pub interfaces: Vec<PodInterface>,
    pub routes: Vec<PodRoute>,
}

/// Reads the pod's interfaces and routes in the session's namespace.
pub async fn discover(session: &NetlinkSession) -> Result<PodInterfaces, NetlinkError> {
    let links = session.links().await?;
    let addresses: Vec<AddressMessage> = session
        .handle()
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(NetlinkError::request("list addresses"))?;
    let mut routes: Vec<RouteMessage> = Vec::new();
    for query in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let family = query.header.address_family;
        let mut found: Vec<RouteMessage> = session
            .handle()
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::request(format!("list {family:?} routes")))?;
        routes.append(&mut found);
    }
    Ok(pod_interfaces_from(&links, &addresses, &routes))
}

/// The pure part of [`discover`]: picks and converts.
fn pod_interfaces_from(
    links: &[LinkMessage],
    addresses: &[AddressMessage],
    routes: &[RouteMessage],
) -> PodInterfaces {
    let mut interfaces: Vec<PodInterface> = links.iter().filter_map(pod_interface).collect();
    interfaces.sort_by_key(|i| i.index);
    for interface in &mut interfaces {
        interface.addresses = addresses
            .iter()
            .filter(|a| a.header.index == interface.index)
            .filter_map(address_prefix)
            .collect();
    }
    let routes = routes
        .iter()
        .filter_map(|r| pod_route(r, &interfaces))
        .collect();
    PodInterfaces { interfaces, routes }
}

/// A link's `IFLA_INFO_KIND`.
pub fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(kind) => Some(kind),
            _ => None,
        }),
        _ => None,
    })
}

/// Whether `link` is a tap we made (tun kind, our name pattern).
pub fn is_our_tap(link: &LinkMessage) -> bool {
    matches!(link_kind(link), Some(InfoKind::Tun)) && link_name(link).is_some_and(TapName::is_ours)
}

/// A pod interface, if `link` is one (see the module doc).
pub(crate) fn pod_interface(link: &LinkMessage) -> Option<PodInterface> {
    if link.header.flags.contains(LinkFlags::Loopback)
        || link.header.link_layer_type != LinkLayerType::Ether
        || matches!(link_kind(link), Some(InfoKind::Tun))
    {
        return None;
    }
    let name = link_name(link)?.to_string();
    let mac = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
        _ => None,
    })?;
    let mtu = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(mtu) => Some(*mtu),
        _ => None,
    })?;
    Some(PodInterface {
        name,
        index: link.header.index,
        mac: MacAddress(mac),
        mtu,
        addresses: Vec::new(),
    })
}

fn address_prefix(message: &AddressMessage) -> Option<IpPrefix> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's
    // on point-to-point links and the same as IFA_LOCAL otherwise (IPv6
    // sends only IFA_ADDRESS).
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = local.or_else(|| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })?;
    if let IpAddr::V6(v6) = address {
        if v6.is_unicast_link_local() {
            return None;
        }
    }
    Some(IpPrefix {
        address,
        prefix_len: message.header.prefix_len,
    })
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn pod_route(message: &RouteMessage, interfaces: &[PodInterface]) -> Option<PodRoute> {
    let header = &message.header;
    let table = message
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || header.kind != RouteType::Unicast
        || header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let mut route = PodRoute {
        destination: None,
        gateway: None,
        device: String::new(),
        source: None,
        metric: 0,
    };
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(d) => {
                route.destination = route_ip(d).map(|address| IpPrefix {
                    address,
                    prefix_len: header.destination_prefix_length,
                });
            }
            RouteAttribute::Gateway(g) => route.gateway = route_ip(g),
            RouteAttribute::PrefSource(s) => route.source = route_ip(s),
            RouteAttribute::Priority(p) => route.metric = *p,
            RouteAttribute::Oif(index) => {
                route.device = interfaces.iter().find(|i| i.index == *index)?.name.clone();
            }
            _ => {}
        }
    }
    // Multipath routes (no single Oif) and routes through other links are
    // not the pod's to carry into the guest.
    (!route.device.is_empty()).then_some(route)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::RouteScope;
    use rtnetlink::packet_route::AddressFamily;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn link(index: u32, name: &str, kind: Option<InfoKind>, flags: LinkFlags) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.link_layer_type = LinkLayerType::Ether;
        link.header.flags = flags;
        link.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Address(vec![0x02, 0, 0, 0, 0, index as u8]),
            LinkAttribute::Mtu(1450),
        ];
        if let Some(kind) = kind {
            link.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
        }
        link
    }

    fn address(index: u32, ip: IpAddr, prefix_len: u8) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.index = index;
        message.header.prefix_len = prefix_len;
        message.attributes = vec![AddressAttribute::Address(ip)];
        if ip.is_ipv4() {
            message.attributes.push(AddressAttribute::Local(ip));
        }
        message
    }

    fn route(
        destination: Option<(IpAddr, u8)>,
        gateway: Option<IpAddr>,
        oif: u32,
        protocol: RouteProtocol,
    ) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.kind = RouteType::Unicast;
        message.header.protocol = protocol;
        message.header.scope = RouteScope::Universe;
        if let Some((ip, len)) = destination {
            message.header.destination_prefix_length = len;
            message
                .attributes
                .push(RouteAttribute::Destination(ip.into()));
        }
        if let Some(gw) = gateway {
            message.attributes.push(RouteAttribute::Gateway(gw.into()));
        }
        message.attributes.push(RouteAttribute::Oif(oif));
        message
    }

    fn sample() -> PodInterfaces {
        let loopback = {
            let mut l = link(1, "lo", None, LinkFlags::Loopback | LinkFlags::Up);
            l.header.link_layer_type = LinkLayerType::Loopback;
            l
        };
        let links = [
            link(5, "tap0_clst", Some(InfoKind::Tun), LinkFlags::Up),
            link(3, "eth0", Some(InfoKind::Veth), LinkFlags::Up),
            loopback,
        ];
        let v4: IpAddr = Ipv4Addr::new(10, 88, 0, 5).into();
        let gw: IpAddr = Ipv4Addr::new(10, 88, 0, 1).into();
        let addresses = [
            address(3, v4, 16),
            address(3, "fd00::5".parse::<Ipv6Addr>().unwrap().into(), 64),
            address(3, "fe80::1".parse::<Ipv6Addr>().unwrap().into(), 64),
            address(1, Ipv4Addr::LOCALHOST.into(), 8),
        ];
        let routes = [
            route(None, Some(gw), 3, RouteProtocol::Boot),
            route(
                Some((Ipv4Addr::new(10, 88, 0, 0).into(), 16)),
                None,
                3,
                RouteProtocol::Kernel,
            ),
            route(
                Some((Ipv4Addr::new(10, 96, 0, 0).into(), 12)),
                Some(gw),
                3,
                RouteProtocol::Static,
            ),
            route(
                Some((Ipv4Addr::new(192, 0, 2, 0).into(), 24)),
                None,
                5,
                RouteProtocol::Boot,
            ),
        ];
        pod_interfaces_from(&links, &addresses, &routes)
    }

    #[test]
    fn discovery_keeps_veth_drops_loopback_and_our_tap() {
        let pod = sample();
        assert_eq!(pod.interfaces.len(), 1, "{pod:?}");
        let eth0 = &pod.interfaces[0];
        assert_eq!(eth0.name, "eth0");
        assert_eq!(eth0.index, 3);
        assert_eq!(eth0.mac.to_string(), "02:00:00:00:00:03");
        assert_eq!(eth0.mtu, 1450);
    }

    #[test]
    fn discovery_keeps_global_addresses_and_drops_link_local() {
        let pod = sample();
        let addresses: Vec<String> = pod.interfaces[0]
            .addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addresses, ["10.88.0.5/16", "fd00::5/64"]);
    }

    #[test]
    fn discovery_drops_kernel_routes_and_routes_through_other_links() {
        let pod = sample();
        let routes: Vec<agent::Route> = pod.routes.iter().map(PodRoute::to_agent).collect();
        assert_eq!(routes.len(), 2, "{routes:?}");
        assert_eq!(routes[0].destination, "");
        assert_eq!(routes[0].gateway, "10.88.0.1");
        assert_eq!(routes[0].device, "eth0");
        assert_eq!(routes[1].destination, "10.96.0.0/12");
    }

    #[test]
    fn interface_to_agent_carries_mac_name_mtu_and_cidrs() {
        let agent = sample().interfaces[0].to_agent();
        assert_eq!(agent.mac_address, "02:00:00:00:00:03");
        assert_eq!(agent.name, "eth0");
        assert_eq!(agent.mtu, 1450);
        assert_eq!(agent.addresses, ["10.88.0.5/16", "fd00::5/64"]);
    }

    #[test]
    fn our_tap_is_recognised_by_kind_and_name() {
        assert!(is_our_tap(&link(
            5,
            "tap0_clst",
            Some(InfoKind::Tun),
            LinkFlags::Up
        )));
        assert!(!is_our_tap(&link(
            5,
            "tap0_clst",
            Some(InfoKind::Veth),
            LinkFlags::Up
        )));
        assert!(!is_our_tap(&link(
            5,
            "tun0",
            Some(InfoKind::Tun),
            LinkFlags::Up
        )));
    }
}

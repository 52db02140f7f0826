//! Guest network setup over rtnetlink: find interfaces by MAC address,
//! rename them, set the MTU, bring them up, add addresses and routes.
//!
//! A small hand-written rtnetlink client (the messages are a few fixed
//! structs and type-length-value attributes) instead of a netlink crate
//! family, to keep the static agent small.
//!
//! ```text
//! nlmsghdr  len u32 | type u16 | flags u16 | seq u32 | pid u32
//! payload   ifinfomsg / ifaddrmsg / rtmsg, then rtattrs (len u16 | type u16 | data, 4-aligned)
//! ```

use std::net::IpAddr;

use cloister_protocol::agent;
use nix::sys::socket::{
    bind, recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

/// Errors configuring the network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{field} {value:?}: {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: &'static str,
    },
    #[error("{field}: no interface has MAC address {mac}")]
    NoSuchInterface { field: String, mac: String },
    #[error("netlink {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("netlink {what}: malformed answer")]
    Malformed { what: String },
}

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_PREFSRC: u16 = 7;
const IFF_UP: u32 = 0x1;

/// An address with its prefix length, parsed from CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// Parses "10.0.0.5/24" or "fd00::1/64"; a bare address gets a full prefix.
pub fn parse_cidr(field: &str, text: &str) -> Result<Cidr, NetworkError> {
    let invalid = |reason| NetworkError::Invalid {
        field: field.to_owned(),
        value: text.to_owned(),
        reason,
    };
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| invalid("not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p.parse::<u8>().map_err(|_| invalid("bad prefix length"))?,
        None => max,
    };
    if prefix > max {
        return Err(invalid("prefix length too long"));
    }
    Ok(Cidr { addr, prefix })
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(field: &str, text: &str) -> Result<[u8; 6], NetworkError> {
    let invalid = || NetworkError::Invalid {
        field: field.to_owned(),
        value: text.to_owned(),
        reason: "not a MAC address (aa:bb:cc:dd:ee:ff)",
    };
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(invalid());
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(invalid());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    Ok(mac)
}

fn family(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn addr_bytes(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Builds one netlink request.
struct Message {
    buf: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16, seq: u32) -> Message {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        Message { buf }
    }

    fn raw(mut self, bytes: &[u8]) -> Message {
        self.buf.extend_from_slice(bytes);
        self
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Message {
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn ifinfomsg(index: i32, flags: u32, change: u32) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    b[0] = libc::AF_UNSPEC as u8;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

/// RTM_NEWLINK changing name, MTU and the up flag of interface `index`.
fn set_link_message(
    seq: u32,
    index: i32,
    name: Option<&str>,
    mtu: Option<u32>,
    up: bool,
) -> Vec<u8> {
    let mut m = Message::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq).raw(&ifinfomsg(
        index,
        if up { IFF_UP } else { 0 },
        IFF_UP,
    ));
    if let Some(name) = name {
        let mut bytes = name.as_bytes().to_vec();
        bytes.push(0);
        m = m.attr(IFLA_IFNAME, &bytes);
    }
    if let Some(mtu) = mtu {
        m = m.attr(IFLA_MTU, &mtu.to_ne_bytes());
    }
    m.finish()
}

fn add_address_message(seq: u32, index: i32, cidr: &Cidr) -> Vec<u8> {
    let mut header = vec![0u8; 8];
    header[0] = family(&cidr.addr);
    header[1] = cidr.prefix;
    header[4..8].copy_from_slice(&index.to_ne_bytes());
    let bytes = addr_bytes(&cidr.addr);
    let mut m = Message::new(
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        seq,
    )
    .raw(&header);
    if cidr.addr.is_ipv4() {
        m = m.attr(IFA_LOCAL, &bytes);
    }
    m.attr(IFA_ADDRESS, &bytes).finish()
}

/// A checked route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    pub destination: Option<Cidr>,
    pub gateway: Option<IpAddr>,
    pub device_index: Option<i32>,
    pub source: Option<IpAddr>,
    pub metric: u32,
    pub family: u8,
}

fn add_route_message(seq: u32, route: &RoutePlan) -> Vec<u8> {
    let mut rtmsg = vec![0u8; 12];
    rtmsg[0] = route.family;
    rtmsg[1] = route.destination.map_or(0, |d| d.prefix);
    rtmsg[4] = libc::RT_TABLE_MAIN;
    rtmsg[5] = libc::RTPROT_BOOT;
    // Without a gateway the destination is on the link.
    rtmsg[6] = if route.gateway.is_some() {
        libc::RT_SCOPE_UNIVERSE
    } else {
        libc::RT_SCOPE_LINK
    };
    rtmsg[7] = libc::RTN_UNICAST;
    let mut m = Message::new(
        RTM_NEWROUTE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        seq,
    )
    .raw(&rtmsg);
    if let Some(dst) = &route.destination {
        m = m.attr(RTA_DST, &addr_bytes(&dst.addr));
    }
    if let Some(gw) = &route.gateway {
        m = m.attr(RTA_GATEWAY, &addr_bytes(gw));
    }
    if let Some(index) = route.device_index {
        m = m.attr(RTA_OIF, &index.to_ne_bytes());
    }
    if let Some(src) = &route.source {
        m = m.attr(RTA_PREFSRC, &addr_bytes(src));
    }
    if route.metric != 0 {
        m = m.attr(RTA_PRIORITY, &route.metric.to_ne_bytes());
    }
    m.finish()
}

/// One interface from a link dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: i32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
}

/// Splits a buffer into (type, payload) netlink messages.
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < 16 || len > rest.len() {
            break;
        }
        out.push((kind, &rest[16..len]));
        let aligned = (len + 3) & !3;
        rest = &rest[aligned.min(rest.len())..];
    }
    out
}

/// Attributes after a fixed header of `skip` bytes.
fn attributes(payload: &[u8], skip: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = payload.get(skip..).unwrap_or_default();
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]);
        if len < 4 || len > rest.len() {
            break;
        }
        out.push((kind, &rest[4..len]));
        let aligned = (len + 3) & !3;
        rest = &rest[aligned.min(rest.len())..];
    }
    out
}

/// Parses RTM_NEWLINK messages of a dump.
fn parse_links(buf: &[u8]) -> Vec<Link> {
    messages(buf)
        .into_iter()
        .filter(|(kind, payload)| *kind == RTM_NEWLINK && payload.len() >= 16)
        .map(|(_, payload)| {
            let index = i32::from_ne_bytes([payload[4], payload[5], payload[6], payload[7]]);
            let mut link = Link {
                index,
                name: String::new(),
                mac: None,
            };
            for (kind, data) in attributes(payload, 16) {
                match kind {
                    IFLA_IFNAME => {
                        link.name = String::from_utf8_lossy(data)
                            .trim_end_matches('\0')
                            .to_owned();
                    }
                    IFLA_ADDRESS if data.len() == 6 => {
                        let mut mac = [0u8; 6];
                        mac.copy_from_slice(data);
                        link.mac = Some(mac);
                    }
                    _ => {}
                }
            }
            link
        })
        .collect()
}

/// A NETLINK_ROUTE socket.
struct RouteSocket {
    fd: std::os::fd::OwnedFd,
    seq: u32,
}

impl RouteSocket {
    fn open() -> Result<RouteSocket, NetworkError> {
        let err = |source| NetworkError::Netlink {
            what: "socket".into(),
            source,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(err)?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, 0),
        )
        .map_err(err)?;
        Ok(RouteSocket { fd, seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    fn send(&self, what: &str, message: &[u8]) -> Result<(), NetworkError> {
        sendto(
            std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            message,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map(drop)
        .map_err(|source| NetworkError::Netlink {
            what: what.to_owned(),
            source,
        })
    }

    fn receive(&self, what: &str) -> Result<Vec<u8>, NetworkError> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = recv(
            std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            &mut buf,
            MsgFlags::empty(),
        )
        .map_err(|source| NetworkError::Netlink {
            what: what.to_owned(),
            source,
        })?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Sends a request and waits for its ACK.
    fn request(&mut self, what: &str, message: Vec<u8>) -> Result<(), NetworkError> {
        self.send(what, &message)?;
        loop {
            let buf = self.receive(what)?;
            for (kind, payload) in messages(&buf) {
                if kind == NLMSG_ERROR {
                    let Some(code) = payload.get(..4) else {
                        return Err(NetworkError::Malformed {
                            what: what.to_owned(),
                        });
                    };
                    let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
                    if code == 0 {
                        return Ok(());
                    }
                    return Err(NetworkError::Netlink {
                        what: what.to_owned(),
                        source: nix::Error::from_raw(-code),
                    });
                }
            }
        }
    }

    fn links(&mut self) -> Result<Vec<Link>, NetworkError> {
        let seq = self.next_seq();
        let message = Message::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq)
            .raw(&ifinfomsg(0, 0, 0))
            .finish();
        self.send("list links", &message)?;
        let mut links = Vec::new();
        loop {
            let buf = self.receive("list links")?;
            links.extend(parse_links(&buf));
            if messages(&buf)
                .iter()
                .any(|(k, _)| *k == NLMSG_DONE || *k == NLMSG_ERROR)
            {
                return Ok(links);
            }
        }
    }
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Configures each interface: rename, MTU, up, addresses.
pub fn update_interfaces(interfaces: &[agent::Interface]) -> Result<(), NetworkError> {
    // Check everything before touching anything.
    let mut planned = Vec::new();
    for (i, iface) in interfaces.iter().enumerate() {
        let mac = parse_mac(&format!("interfaces[{i}].mac_address"), &iface.mac_address)?;
        if iface.name.len() >= 16
            || iface.name.contains('/')
            || iface.name.contains(char::is_whitespace)
        {
            return Err(NetworkError::Invalid {
                field: format!("interfaces[{i}].name"),
                value: iface.name.clone(),
                reason: "not a valid interface name (at most 15 bytes, no '/' or spaces)",
            });
        }
        if iface.mtu != 0 && !(68..=65535).contains(&iface.mtu) {
            return Err(NetworkError::Invalid {
                field: format!("interfaces[{i}].mtu"),
                value: iface.mtu.to_string(),
                reason: "outside 68..=65535",
            });
        }
        let addresses = iface
            .addresses
            .iter()
            .enumerate()
            .map(|(j, a)| parse_cidr(&format!("interfaces[{i}].addresses[{j}]"), a))
            .collect::<Result<Vec<_>, _>>()?;
        planned.push((i, mac, iface, addresses));
    }
    let mut socket = RouteSocket::open()?;
    let links = socket.links()?;
    for (i, mac, iface, addresses) in planned {
        let link = links.iter().find(|l| l.mac == Some(mac)).ok_or_else(|| {
            NetworkError::NoSuchInterface {
                field: format!("interfaces[{i}].mac_address"),
                mac: format_mac(&mac),
            }
        })?;
        let name =
            (!iface.name.is_empty() && iface.name != link.name).then_some(iface.name.as_str());
        let mtu = (iface.mtu != 0).then_some(iface.mtu);
        if name.is_some() {
            // A link must be down to be renamed.
            let seq = socket.next_seq();
            socket.request(
                &format!("set {} down", link.name),
                set_link_message(seq, link.index, None, None, false),
            )?;
        }
        let seq = socket.next_seq();
        socket.request(
            &format!("configure interfaces[{i}] ({})", link.name),
            set_link_message(seq, link.index, name, mtu, true),
        )?;
        for (j, cidr) in addresses.iter().enumerate() {
            let seq = socket.next_seq();
            socket.request(
                &format!("add interfaces[{i}].addresses[{j}]"),
                add_address_message(seq, link.index, cidr),
            )?;
        }
    }
    Ok(())
}

/// Adds routes; link routes (no gateway) first so gateways are reachable.
pub fn update_routes(routes: &[agent::Route]) -> Result<(), NetworkError> {
    let mut socket = RouteSocket::open()?;
    let links = socket.links()?;
    let mut planned = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        let field = |name: &str| format!("routes[{i}].{name}");
        let destination = match route.destination.as_str() {
            "" | "default" => None,
            text => Some(parse_cidr(&field("destination"), text)?),
        };
        let gateway = match route.gateway.as_str() {
            "" => None,
            text => Some(text.parse::<IpAddr>().map_err(|_| NetworkError::Invalid {
                field: field("gateway"),
                value: text.to_owned(),
                reason: "not an IP address",
            })?),
        };
        let source = match route.source.as_str() {
            "" => None,
            text => Some(text.parse::<IpAddr>().map_err(|_| NetworkError::Invalid {
                field: field("source"),
                value: text.to_owned(),
                reason: "not an IP address",
            })?),
        };
        let device_index = match route.device.as_str() {
            "" => None,
            name => Some(
                links
                    .iter()
                    .find(|l| l.name == name)
                    .map(|l| l.index)
                    .ok_or_else(|| NetworkError::Invalid {
                        field: field("device"),
                        value: name.to_owned(),
                        reason: "no such interface",
                    })?,
            ),
        };
        let families: Vec<u8> = [destination.map(|d| d.addr), gateway, source]
            .iter()
            .flatten()
            .map(family)
            .collect();
        let Some(&route_family) = families.first() else {
            return Err(NetworkError::Invalid {
                field: field("gateway"),
                value: String::new(),
                reason: "a default route needs a gateway",
            });
        };
        if families.iter().any(|f| *f != route_family) {
            return Err(NetworkError::Invalid {
                field: format!("routes[{i}]"),
                value: route.destination.clone(),
                reason: "mixes IPv4 and IPv6 addresses",
            });
        }
        if gateway.is_none() && device_index.is_none() {
            return Err(NetworkError::Invalid {
                field: field("device"),
                value: String::new(),
                reason: "a route without gateway needs a device",
            });
        }
        planned.push((
            i,
            RoutePlan {
                destination,
                gateway,
                device_index,
                source,
                metric: route.metric,
                family: route_family,
            },
        ));
    }
    planned.sort_by_key(|(_, r)| r.gateway.is_some());
    for (i, route) in planned {
        let seq = socket.next_seq();
        socket.request(&format!("add routes[{i}]"), add_route_message(seq, &route))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_v4_v6_and_rejects_garbage() {
        assert_eq!(parse_cidr("f", "10.0.0.5/24").unwrap().prefix, 24);
        assert_eq!(parse_cidr("f", "fd00::1").unwrap().prefix, 128);
        let err = parse_cidr("interfaces[0].addresses[1]", "10.0.0.5/33").unwrap_err();
        assert!(err.to_string().contains("interfaces[0].addresses[1]"));
        assert!(parse_cidr("f", "nope/8").is_err());
    }

    #[test]
    fn mac_parses_and_rejects_garbage() {
        assert_eq!(
            parse_mac("f", "02:00:0A:ff:00:01").unwrap(),
            [2, 0, 10, 255, 0, 1]
        );
        assert!(parse_mac("f", "02:00:0a:ff:00").is_err());
        assert!(parse_mac("f", "02:00:0a:ff:00:zz").is_err());
    }

    #[test]
    fn address_message_has_header_and_attributes() {
        let msg = add_address_message(7, 3, &parse_cidr("f", "10.1.2.3/16").unwrap());
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
            msg.len()
        );
        assert_eq!(
            u16::from_ne_bytes(msg[4..6].try_into().unwrap()),
            RTM_NEWADDR
        );
        assert_eq!(u32::from_ne_bytes(msg[8..12].try_into().unwrap()), 7);
        // ifaddrmsg: family, prefix, flags, scope, index
        assert_eq!(msg[16], libc::AF_INET as u8);
        assert_eq!(msg[17], 16);
        assert_eq!(i32::from_ne_bytes(msg[20..24].try_into().unwrap()), 3);
        let attrs = attributes(&msg[16..], 8);
        assert_eq!(
            attrs,
            vec![
                (IFA_LOCAL, &[10u8, 1, 2, 3][..]),
                (IFA_ADDRESS, &[10u8, 1, 2, 3][..])
            ]
        );
    }

    #[test]
    fn link_dump_parses_name_and_mac() {
        let mut dump = Message::new(RTM_NEWLINK, 0, 1)
            .raw(&ifinfomsg(4, 0, 0))
            .attr(IFLA_IFNAME, b"eth0\0")
            .attr(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 9])
            .finish();
        dump.extend(Message::new(NLMSG_DONE, 0, 1).raw(&[0; 4]).finish());
        let links = parse_links(&dump);
        assert_eq!(
            links,
            vec![Link {
                index: 4,
                name: "eth0".into(),
                mac: Some([2, 0, 0, 0, 0, 9])
            }]
        );
    }

    #[test]
    fn route_message_without_gateway_is_link_scoped() {
        let route = RoutePlan {
            destination: Some(parse_cidr("f", "10.0.0.0/8").unwrap()),
            gateway: None,
            device_index: Some(2),
            source: None,
            metric: 0,
            family: libc::AF_INET as u8,
        };
        let msg = add_route_message(1, &route);
        assert_eq!(msg[17], 8);
        assert_eq!(msg[22], libc::RT_SCOPE_LINK);
        let attrs = attributes(&msg[16..], 12);
        assert_eq!(attrs[0], (RTA_DST, &[10u8, 0, 0, 0][..]));
        assert_eq!(attrs[1], (RTA_OIF, &2i32.to_ne_bytes()[..]));
    }
}

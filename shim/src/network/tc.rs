//! Traffic control for the veth ↔ tap redirect: ingress qdiscs and u32
//! match-all filters whose action is `mirred egress redirect`.
//!
//! What [`add_redirect_filter`] installs is, in `tc` terms,
//!
//! ```text
//! tc qdisc add dev FROM ingress                          # unless it has ingress or clsact
//! tc filter add dev FROM parent ffff: protocol all pref 49494 \
//!     u32 match u32 0 0 action mirred egress redirect dev TO
//! ```
//!
//! A frame arriving on FROM is taken (action "stolen") before the IP stack
//! sees it and transmitted out of TO. Kata calls this the "tcfilter"
//! internetworking model; we use u32 rather than matchall because u32 is
//! built into more kernels (this host's lacks cls_matchall). Our filters sit
//! at a fixed, otherwise unlikely preference ([`REDIRECT_FILTER_PREF`]) so
//! teardown removes exactly ours and leaves other filters alone.

use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use rtnetlink::packet_route::tc::{
    TcActionAttribute, TcActionMirrorOption, TcActionOption, TcAttribute, TcFilterU32Option,
    TcHandle, TcMessage, TcMirrorActionType, TcOption,
};
use rtnetlink::packet_route::RouteNetlinkMessage;

use super::netlink::{NetlinkError, NetlinkSession};

/// The preference (priority) of our redirect filters: arbitrary, chosen to
/// be distinctive (tc's own default is 49152).
pub const REDIRECT_FILTER_PREF: u16 = 49494;
/// `parent ffff:fff2` (TC_H_MIN_INGRESS): the ingress hook of either an
/// `ingress` qdisc (which accepts any minor, so `tc`'s `parent ffff:` is
/// the same place) or a `clsact` one (which needs exactly this minor).
const INGRESS_PARENT: u32 = 0xffff_fff2;
/// The ingress qdisc's own handle, `ffff:`.
const INGRESS_HANDLE: u32 = 0xffff_0000;

/// `protocol all` as the kernel expects it in `tcm_info`: ETH_P_ALL in
/// network byte order.
fn protocol_all() -> u16 {
    // ETH_P_ALL is 3: it fits.
    (libc::ETH_P_ALL as u16).to_be()
}

/// One filter on a link's ingress, as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressFilter {
    pub pref: u16,
    /// The classifier (`u32`, `matchall`, ...).
    pub kind: String,
    /// Whether it matches every protocol.
    pub protocol_all: bool,
    /// The ifindex a `mirred egress redirect` action sends to.
    pub redirect_to: Option<u32>,
}

impl IngressFilter {
    /// Whether this is one of ours: our preference, a redirect.
    pub fn is_ours(&self) -> bool {
        self.pref == REDIRECT_FILTER_PREF && self.redirect_to.is_some()
    }
}

fn ifindex_i32(ifindex: u32) -> i32 {
    // Interface indexes are positive ints in the kernel.
    i32::try_from(ifindex).unwrap_or(i32::MAX)
}

/// The qdisc on `ifindex`'s ingress hook, if any: `ingress`, or `clsact`
/// (ingress and egress hooks in one, as Cilium and others use it).
pub async fn ingress_qdisc_kind(
    session: &NetlinkSession,
    ifindex: u32,
) -> Result<Option<String>, NetlinkError> {
    let qdiscs: Vec<TcMessage> = session
        .handle()
        .qdisc()
        .get()
        .index(ifindex_i32(ifindex))
        .execute()
        .try_collect()
        .await
        .map_err(NetlinkError::request(format!(
            "list qdiscs of ifindex {ifindex}"
        )))?;
    // The dump may cover every link: filter here. Both kinds hang off the
    // same parent (TC_H_INGRESS == TC_H_CLSACT).
    Ok(qdiscs
        .iter()
        .filter(|q| q.header.index == ifindex_i32(ifindex) && q.header.parent == TcHandle::INGRESS)
        .find_map(|q| {
            q.attributes.iter().find_map(|a| match a {
                TcAttribute::Kind(kind) => Some(kind.clone()),
                _ => None,
            })
        }))
}

/// Adds the ingress qdisc (`handle ffff:`) to `ifindex`.
pub async fn add_ingress_qdisc(
    session: &NetlinkSession,
    ifindex: u32,
    name: &str,
) -> Result<(), NetlinkError> {
    session
        .handle()
        .qdisc()
        .add(ifindex_i32(ifindex))
        .ingress()
        .execute()
        .await
        .map_err(NetlinkError::request(format!(
            "add ingress qdisc to {name}"
        )))
}

/// Deletes the ingress qdisc of `ifindex` (with every filter on it).
pub async fn delete_ingress_qdisc(
    session: &NetlinkSession,
    ifindex: u32,
    name: &str,
) -> Result<(), NetlinkError> {
    let mut request = session.handle().qdisc().del(ifindex_i32(ifindex));
    request.message_mut().header.parent = TcHandle::INGRESS;
    request.message_mut().header.handle = TcHandle::from(INGRESS_HANDLE);
    request
        .execute()
        .await
        .map_err(NetlinkError::request(format!(
            "delete ingress qdisc of {name}"
        )))
}

/// Adds our redirect filter: everything arriving on `from` leaves by `to`.
pub async fn add_redirect_filter(
    session: &NetlinkSession,
    from: u32,
    to: u32,
    what: &str,
) -> Result<(), NetlinkError> {
    let context = || format!("add redirect filter {what}");
    session
        .handle()
        .traffic_filter(ifindex_i32(from))
        .add()
        .parent(INGRESS_PARENT)
        .priority(REDIRECT_FILTER_PREF)
        .protocol(protocol_all())
        .redirect(to)
        .map_err(NetlinkError::request(context()))?
        .execute()
        .await
        .map_err(NetlinkError::request(context()))
}

/// The filters on `ifindex`'s ingress qdisc, one per preference (u32 dumps
/// its hash tables as extra entries: they are merged in).
pub async fn ingress_filters(
    session: &NetlinkSession,
    ifindex: u32,
) -> Result<Vec<IngressFilter>, NetlinkError> {
    let messages: Vec<TcMessage> = session
        .handle()
        .traffic_filter(ifindex_i32(ifindex))
        .get()
        .ingress()
        .execute()
        .try_collect()
        .await
        .map_err(NetlinkError::request(format!(
            "list ingress filters of ifindex {ifindex}"
        )))?;
    Ok(merge_filter_entries(&messages))
}

/// Merges a filter dump into one [`IngressFilter`] per preference.
fn merge_filter_entries(messages: &[TcMessage]) -> Vec<IngressFilter> {
    let mut filters: Vec<IngressFilter> = Vec::new();
    for message in messages {
        // tcm_info: preference in the high 16 bits, protocol in the low.
        let pref = (message.header.info >> 16) as u16;
        let protocol = (message.header.info & 0xffff) as u16;
        let kind = message.attributes.iter().find_map(|a| match a {
            TcAttribute::Kind(kind) => Some(kind.clone()),
            _ => None,
        });
        let redirect_to = redirect_target(message);
        match filters.iter_mut().find(|f| f.pref == pref) {
            Some(filter) => {
                filter.redirect_to = filter.redirect_to.or(redirect_to);
            }
            None => filters.push(IngressFilter {
                pref,
                kind: kind.unwrap_or_default(),
                protocol_all: protocol == protocol_all(),
                redirect_to,
            }),
        }
    }
    filters
}

/// The target of a u32 filter's `mirred egress redirect` action, if any.
fn redirect_target(message: &TcMessage) -> Option<u32> {
    let options = message.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(options) => Some(options),
        _ => None,
    })?;
    options.iter().find_map(|option| {
        let TcOption::U32(TcFilterU32Option::Action(actions)) = option else {
            return None;
        };
        actions.iter().find_map(|action| {
            action.attributes.iter().find_map(|attribute| {
                let TcActionAttribute::Options(options) = attribute else {
                    return None;
                };
                options.iter().find_map(|option| match option {
                    TcActionOption::Mirror(TcActionMirrorOption::Parms(mirror))
                        if mirror.eaction == TcMirrorActionType::EgressRedir =>
                    {
                        Some(mirror.ifindex)
                    }
                    _ => None,
                })
            })
        })
    })
}

/// Deletes every filter at preference `pref` on `ifindex`'s ingress.
pub async fn delete_ingress_filter(
    session: &NetlinkSession,
    ifindex: u32,
    pref: u16,
    name: &str,
) -> Result<(), NetlinkError> {
    let what = format!("delete filter pref {pref} on {name}");
    let mut message = TcMessage::with_index(ifindex_i32(ifindex));
    message.header.parent = TcHandle::from(INGRESS_PARENT);
    message.header.info = (u32::from(pref) << 16) | u32::from(protocol_all());
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::DelTrafficFilter(message));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut handle = session.handle().clone();
    let mut responses = handle
        .request(request)
        .map_err(NetlinkError::request(what.clone()))?;
    while let Some(response) = responses.next().await {
        if let NetlinkPayload::Error(error) = response.payload {
            return Err(NetlinkError::request(what)(rtnetlink::Error::NetlinkError(
                error,
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::tc::{TcAction, TcActionMirror, TcFilterU32, TcMirror};

    fn u32_entry(pref: u16, redirect: Option<u32>) -> TcMessage {
        let mut message = TcMessage::with_index(7);
        message.header.info = (u32::from(pref) << 16) | u32::from(protocol_all());
        message
            .attributes
            .push(TcAttribute::Kind(TcFilterU32::KIND.into()));
        if let Some(to) = redirect {
            let mut mirror = TcMirror::default();
            mirror.eaction = TcMirrorActionType::EgressRedir;
            mirror.ifindex = to;
            let mut action = TcAction::default();
            action.attributes = vec![
                TcActionAttribute::Kind(TcActionMirror::KIND.into()),
                TcActionAttribute::Options(vec![TcActionOption::Mirror(
                    TcActionMirrorOption::Parms(mirror),
                )]),
            ];
            message
                .attributes
                .push(TcAttribute::Options(vec![TcOption::U32(
                    TcFilterU32Option::Action(vec![action]),
                )]));
        }
        message
    }

    #[test]
    fn merge_joins_u32_hash_table_entries_with_their_filter() {
        // What the kernel dumps for one u32 filter: the root hash table,
        // the hash table, then the key with the action.
        let dump = [
            u32_entry(REDIRECT_FILTER_PREF, None),
            u32_entry(REDIRECT_FILTER_PREF, None),
            u32_entry(REDIRECT_FILTER_PREF, Some(12)),
            u32_entry(49152, None),
        ];
        let filters = merge_filter_entries(&dump);
        assert_eq!(filters.len(), 2);
        assert_eq!(
            filters[0],
            IngressFilter {
                pref: REDIRECT_FILTER_PREF,
                kind: "u32".into(),
                protocol_all: true,
                redirect_to: Some(12),
            }
        );
        assert!(filters[0].is_ours());
        assert!(!filters[1].is_ours(), "a foreign filter without redirect");
    }

    #[test]
    fn redirect_at_another_pref_is_not_ours() {
        let filters = merge_filter_entries(&[u32_entry(1, Some(3))]);
        assert_eq!(filters[0].redirect_to, Some(3));
        assert!(!filters[0].is_ours());
    }

    #[test]
    fn protocol_all_is_eth_p_all_in_network_order() {
        assert_eq!(protocol_all().to_ne_bytes(), [0x00, 0x03]);
    }
}

//! The address policy for fetching image URLs: deny-by-default for every
//! address that is not ordinary public unicast, unless an operator allowed
//! its network (`images.allowed_networks`).
//!
//! Pure functions over addresses and URLs, with no I/O, so the whole table is
//! tested without touching the network.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Why an address is refused. The `label` is also the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Unspecified,
    Loopback,
    Private,
    LinkLocal,
    /// Cloud metadata services (169.254.169.254 and friends).
    Metadata,
    SharedCgnat,
    Multicast,
    Broadcast,
    Documentation,
    Benchmarking,
    Reserved,
    /// IPv6 space with no public unicast use (deprecated or unassigned).
    NotGlobalUnicast,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Unspecified => "unspecified",
            Reason::Loopback => "loopback",
            Reason::Private => "private",
            Reason::LinkLocal => "link_local",
            Reason::Metadata => "metadata",
            Reason::SharedCgnat => "cgnat",
            Reason::Multicast => "multicast",
            Reason::Broadcast => "broadcast",
            Reason::Documentation => "documentation",
            Reason::Benchmarking => "benchmarking",
            Reason::Reserved => "reserved",
            Reason::NotGlobalUnicast => "not_global_unicast",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Reason::Unspecified => "an unspecified address",
            Reason::Loopback => "a loopback address",
            Reason::Private => "a private network address",
            Reason::LinkLocal => "a link-local address",
            Reason::Metadata => "a cloud metadata service address",
            Reason::SharedCgnat => "a shared (CGNAT) address",
            Reason::Multicast => "a multicast address",
            Reason::Broadcast => "a broadcast address",
            Reason::Documentation => "a documentation address",
            Reason::Benchmarking => "a benchmarking address",
            Reason::Reserved => "a reserved address",
            Reason::NotGlobalUnicast => "not a public unicast address",
        }
    }
}

/// A refused address, with the address as it was written (which may embed
/// the IPv4 address that decided).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub addr: IpAddr,
    pub reason: Reason,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is {}", self.addr, self.reason.describe())
    }
}

/// Which addresses may be fetched.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allowed: Vec<IpNet>,
}

impl AddressPolicy {
    /// `allowed_networks` entries are CIDRs or single addresses (validated by config).
    pub fn new<S: AsRef<str>>(allowed_networks: &[S]) -> Result<Self, String> {
        let allowed = allowed_networks
            .iter()
            .map(|n| {
                let n = n.as_ref();
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("images.allowed_networks: {n:?} is not a CIDR"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { allowed })
    }

    /// Allows `networks` (already parsed by the config) through the block.
    pub fn from_networks(networks: Vec<IpNet>) -> Self {
        Self { allowed: networks }
    }

    /// Whether Iris may connect to `addr`.
    pub fn check(&self, addr: IpAddr) -> Result<(), Refused> {
        // An IPv4-mapped address is the IPv4 address itself to the kernel,
        // so an allowed IPv4 network covers its mapped form too.
        let as_v4 = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        if self
            .allowed
            .iter()
            .any(|net| net.contains(&addr) || as_v4.is_some_and(|v4| net.contains(&v4)))
        {
            return Ok(());
        }
        match classify(addr) {
            Some(reason) => Err(Refused { addr, reason }),
            None => Ok(()),
        }
    }
}

/// The reason `addr` is not ordinary public unicast, or `None` if it is.
pub fn classify(addr: IpAddr) -> Option<Reason> {
    match addr {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn in_v4(addr: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(addr) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

/// IPv4 special-purpose ranges (IANA's registry) that are not publicly routable.
pub fn classify_v4(addr: Ipv4Addr) -> Option<Reason> {
    const TABLE: &[([u8; 4], u32, Reason)] = &[
        ([255, 255, 255, 255], 32, Reason::Broadcast),
        // 100.100.100.200 (Alibaba) sits inside CGNAT space; named for the message.
        ([100, 100, 100, 200], 32, Reason::Metadata),
        ([169, 254, 169, 254], 32, Reason::Metadata),
        // Oracle Cloud's metadata service.
        ([192, 0, 0, 192], 32, Reason::Metadata),
        ([0, 0, 0, 0], 8, Reason::Unspecified),
        ([10, 0, 0, 0], 8, Reason::Private),
        ([100, 64, 0, 0], 10, Reason::SharedCgnat),
        ([127, 0, 0, 0], 8, Reason::Loopback),
        ([169, 254, 0, 0], 16, Reason::LinkLocal),
        ([172, 16, 0, 0], 12, Reason::Private),
        ([192, 0, 0, 0], 24, Reason::Reserved),
        ([192, 0, 2, 0], 24, Reason::Documentation),
        // The deprecated 6to4 relay anycast.
        ([192, 88, 99, 0], 24, Reason::Reserved),
        ([192, 168, 0, 0], 16, Reason::Private),
        ([198, 18, 0, 0], 15, Reason::Benchmarking),
        ([198, 51, 100, 0], 24, Reason::Documentation),
        ([203, 0, 113, 0], 24, Reason::Documentation),
        ([224, 0, 0, 0], 4, Reason::Multicast),
        ([240, 0, 0, 0], 4, Reason::Reserved),
    ];
    TABLE
        .iter()
        .find(|(net, prefix, _)| in_v4(addr, *net, *prefix))
        .map(|(_, _, reason)| *reason)
}

fn in_v6(addr: Ipv6Addr, net: [u16; 8], prefix: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    u128::from(addr) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

/// IPv6: forms that embed an IPv4 address are judged by that address; then
/// everything outside global unicast (2000::/3), and the special ranges
/// inside it, is refused.
pub fn classify_v6(addr: Ipv6Addr) -> Option<Reason> {
    let bits = u128::from(addr);
    if addr.is_unspecified() {
        return Some(Reason::Unspecified);
    }
    if addr.is_loopback() {
        return Some(Reason::Loopback);
    }
    // ::ffff:a.b.c.d (mapped): the kernel connects to a.b.c.d.
    if let Some(v4) = addr.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    // ::a.b.c.d (compatible, deprecated): never a legitimate image host,
    // and an embedded private address must not slip through.
    if bits >> 32 == 0 {
        return Some(classify_v4(Ipv4Addr::from(bits as u32)).unwrap_or(Reason::Reserved));
    }
    // NAT64 (64:ff9b::/96): a gateway forwards to the embedded IPv4 address.
    if in_v6(addr, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        return classify_v4(Ipv4Addr::from(bits as u32));
    }
    // Local-use NAT64 (64:ff9b:1::/48) translates into a private network.
    if in_v6(addr, [0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48) {
        return Some(Reason::Private);
    }
    // 6to4 (2002::/16): the IPv4 address of the relay sits in bits 16..48.
    if in_v6(addr, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        let embedded = Ipv4Addr::from((bits >> 80) as u32);
        return classify_v4(embedded);
    }
    const TABLE: &[([u16; 8], u32, Reason)] = &[
        // AWS's IPv6 metadata service, inside fc00::/7.
        ([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128, Reason::Metadata),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, Reason::Private),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, Reason::LinkLocal),
        // Site-local, deprecated but still routed by some stacks.
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, Reason::Private),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, Reason::Multicast),
        ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, Reason::Documentation),
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, Reason::Documentation),
        ([0x2001, 0x2, 0, 0, 0, 0, 0, 0], 48, Reason::Benchmarking),
        // IETF protocol assignments, Teredo (2001::/32, which hides an IPv4
        // address) and ORCHID among them.
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23, Reason::Reserved),
        // Discard-only.
        ([0x0100, 0, 0, 0, 0, 0, 0, 0], 64, Reason::Reserved),
        // Segment-routing SIDs.
        ([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, Reason::Reserved),
    ];
    if let Some((_, _, reason)) = TABLE
        .iter()
        .find(|(net, prefix, _)| in_v6(addr, *net, *prefix))
    {
        return Some(*reason);
    }
    if !in_v6(addr, [0x2000, 0, 0, 0, 0, 0, 0, 0], 3) {
        return Some(Reason::NotGlobalUnicast);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(addr: &str) -> Option<Reason> {
        classify(addr.parse().expect("address"))
    }

    #[test]
    fn ipv4_table() {
        for (addr, expected) in [
            ("0.0.0.0", Some(Reason::Unspecified)),
            ("0.1.2.3", Some(Reason::Unspecified)),
            ("10.0.0.1", Some(Reason::Private)),
            ("10.255.255.255", Some(Reason::Private)),
            ("100.64.0.1", Some(Reason::SharedCgnat)),
            ("100.127.255.255", Some(Reason::SharedCgnat)),
            ("100.100.100.200", Some(Reason::Metadata)),
            ("100.128.0.1", None),
            ("127.0.0.1", Some(Reason::Loopback)),
            ("127.255.255.254", Some(Reason::Loopback)),
            ("169.254.169.254", Some(Reason::Metadata)),
            ("169.254.0.1", Some(Reason::LinkLocal)),
            ("172.16.0.1", Some(Reason::Private)),
            ("172.31.255.255", Some(Reason::Private)),
            ("172.32.0.1", None),
            ("172.15.255.255", None),
            ("192.0.0.1", Some(Reason::Reserved)),
            ("192.0.0.192", Some(Reason::Metadata)),
            ("192.0.2.1", Some(Reason::Documentation)),
            ("192.88.99.1", Some(Reason::Reserved)),
            ("192.168.1.1", Some(Reason::Private)),
            ("198.18.0.1", Some(Reason::Benchmarking)),
            ("198.19.255.255", Some(Reason::Benchmarking)),
            ("198.51.100.7", Some(Reason::Documentation)),
            ("203.0.113.9", Some(Reason::Documentation)),
            ("224.0.0.1", Some(Reason::Multicast)),
            ("239.255.255.250", Some(Reason::Multicast)),
            ("240.0.0.1", Some(Reason::Reserved)),
            ("255.255.255.255", Some(Reason::Broadcast)),
            ("1.1.1.1", None),
            ("8.8.8.8", None),
            ("93.184.216.34", None),
            ("11.0.0.1", None),
            ("223.255.255.255", None),
        ] {
            assert_eq!(reason(addr), expected, "{addr}");
        }
    }

    #[test]
    fn ipv6_table() {
        for (addr, expected) in [
            ("::", Some(Reason::Unspecified)),
            ("::1", Some(Reason::Loopback)),
            ("fc00::1", Some(Reason::Private)),
            ("fd12:3456::1", Some(Reason::Private)),
            ("fd00:ec2::254", Some(Reason::Metadata)),
            ("fe80::1", Some(Reason::LinkLocal)),
            ("febf::1", Some(Reason::LinkLocal)),
            ("fec0::1", Some(Reason::Private)),
            ("ff02::1", Some(Reason::Multicast)),
            ("2001:db8::1", Some(Reason::Documentation)),
            ("3fff:1::1", Some(Reason::Documentation)),
            ("2001:2::1", Some(Reason::Benchmarking)),
            ("2001::1", Some(Reason::Reserved)),
            ("2001:10::1", Some(Reason::Reserved)),
            ("100::1", Some(Reason::Reserved)),
            ("5f00::1", Some(Reason::Reserved)),
            ("4000::1", Some(Reason::NotGlobalUnicast)),
            ("1234::1", Some(Reason::NotGlobalUnicast)),
            ("2606:4700:4700::1111", None),
            ("2a00:1450:4001:80b::200e", None),
            ("2001:4860:4860::8888", None),
        ] {
            assert_eq!(reason(addr), expected, "{addr}");
        }
    }

    #[test]
    fn ipv4_embedded_in_ipv6_is_judged_by_the_ipv4_address() {
        for (addr, expected) in [
            // Mapped.
            ("::ffff:127.0.0.1", Some(Reason::Loopback)),
            ("::ffff:7f00:1", Some(Reason::Loopback)),
            ("::ffff:169.254.169.254", Some(Reason::Metadata)),
            ("::ffff:10.1.2.3", Some(Reason::Private)),
            ("::ffff:100.64.1.1", Some(Reason::SharedCgnat)),
            ("::ffff:0.0.0.0", Some(Reason::Unspecified)),
            ("::ffff:8.8.8.8", None),
            // Compatible (deprecated): refused even when public.
            ("::127.0.0.1", Some(Reason::Loopback)),
            ("::169.254.169.254", Some(Reason::Metadata)),
            ("::10.0.0.1", Some(Reason::Private)),
            ("::8.8.8.8", Some(Reason::Reserved)),
            // NAT64.
            ("64:ff9b::127.0.0.1", Some(Reason::Loopback)),
            ("64:ff9b::a9fe:a9fe", Some(Reason::Metadata)),
            ("64:ff9b::192.168.0.1", Some(Reason::Private)),
            ("64:ff9b::8.8.8.8", None),
            ("64:ff9b:1::8.8.8.8", Some(Reason::Private)),
            // 6to4.
            ("2002:7f00:1::", Some(Reason::Loopback)),
            ("2002:a9fe:a9fe::1", Some(Reason::Metadata)),
            ("2002:c0a8:101::1", Some(Reason::Private)),
            ("2002:0a00:0001:1::1", Some(Reason::Private)),
            ("2002:808:808::1", None),
            // Teredo hides an IPv4 address too.
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                Some(Reason::Reserved),
            ),
        ] {
            assert_eq!(reason(addr), expected, "{addr}");
        }
    }

    #[test]
    fn allowed_networks_open_exactly_their_range() {
        let policy =
            AddressPolicy::new(&["127.0.0.2/32", "10.1.0.0/16", "fd00::5"]).expect("policy");
        let ok = |a: &str| policy.check(a.parse().expect("addr")).is_ok();
        assert!(ok("127.0.0.2"));
        assert!(
            ok("::ffff:127.0.0.2"),
            "the mapped form of an allowed address"
        );
        assert!(!ok("127.0.0.1"));
        assert!(ok("10.1.200.3"));
        assert!(!ok("10.2.0.1"));
        assert!(ok("fd00::5"));
        assert!(!ok("fd00::6"));
        assert!(!ok("169.254.169.254"));
        assert!(ok("8.8.8.8"));

        let denied = AddressPolicy::default()
            .check("169.254.169.254".parse().expect("addr"))
            .expect_err("refused");
        assert_eq!(denied.reason, Reason::Metadata);
        assert_eq!(
            denied.to_string(),
            "169.254.169.254 is a cloud metadata service address"
        );
        assert!(AddressPolicy::new(&["not-a-net"]).is_err());
    }
}

//! The client's address, decided once per request at the edge: the TCP
//! peer, or, when the peer is one of `server.trusted_proxies`, the
//! right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
//! A header from anyone else is ignored, so it cannot be spoofed. The
//! failed-authentication throttle, a client's `allowed_networks`, the
//! access log and the spend record all use this address.
//!
//! Also the one parser of the CIDR lists the config and the admin API take
//! (`server.trusted_proxies`, `clients[].allowed_networks`,
//! `images.allowed_networks`).

use std::net::{IpAddr, SocketAddr};

use axum::extract::ConnectInfo;
use axum::http::{Extensions, HeaderMap};
use ipnet::IpNet;

use crate::stamp::Stamp;

/// The client address the edge stamped on a request ([`resolve`]'s);
/// without a stamp (a router driven without the edge), its peer; else the
/// unspecified address.
pub fn of(extensions: &Extensions) -> IpAddr {
    Stamp::of(extensions)
        .map(|stamp| stamp.client_addr)
        .or_else(|| {
            extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|info| info.0.ip().to_canonical())
        })
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

/// The client's address: `peer` unless it is a trusted proxy; then, walking
/// `X-Forwarded-For` from the right (each proxy appends the address it was
/// connected from), the first entry that is not a trusted proxy. An entry
/// that is not an address (garbage, `unknown`, an empty one) ends the walk:
/// the address is then that of the last trusted proxy seen, which is the
/// one that passed the garbage on. IPv4-mapped IPv6 addresses count as
/// their IPv4 address.
pub fn resolve(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut addr = peer.to_canonical();
    if !is_trusted(&addr) {
        return addr;
    }
    // Several header lines are one comma-separated list, in order.
    let values: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
    for value in values.into_iter().rev() {
        let Ok(text) = value.to_str() else {
            return addr;
        };
        for entry in text.rsplit(',') {
            match parse_entry(entry) {
                Some(ip) => {
                    addr = ip;
                    if !is_trusted(&ip) {
                        return ip;
                    }
                }
                None => return addr,
            }
        }
    }
    addr
}

/// One `X-Forwarded-For` entry: an IPv4 or IPv6 address, optionally with a
/// port (`1.2.3.4:80`, `[2001:db8::1]:80`) or in brackets.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(socket) = entry.parse::<SocketAddr>() {
        return Some(socket.ip().to_canonical());
    }
    let bracketed = entry.strip_prefix('[')?.strip_suffix(']')?;
    bracketed
        .parse::<std::net::Ipv6Addr>()
        .ok()
        .map(|ip| IpAddr::V6(ip).to_canonical())
}

/// A network as written in a config or a request: a CIDR (`10.0.0.0/8`,
/// `2001:db8::/32`) or a single address (a /32 or /128).
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is not a CIDR such as 10.0.0.0/8 or 2001:db8::/32"))
}

/// Whether `addr` is inside one of `networks` (an empty list allows every
/// address).
pub fn allowed(addr: IpAddr, networks: &[IpNet]) -> bool {
    let addr = addr.to_canonical();
    networks.is_empty() || networks.iter().any(|net| net.contains(&addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| parse_network(n).unwrap()).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn with_xff(lines: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append("x-forwarded-for", line.parse().unwrap());
        }
        headers
    }

    #[test]
    fn the_right_most_untrusted_entry_is_the_client() {
        let trusted = nets(&["10.0.0.0/8", "2001:db8:1::/48"]);
        let cases: &[(&str, &[&str], &str)] = &[
            // No proxy: the peer, whatever the header says.
            ("192.0.2.7", &["203.0.113.9"], "192.0.2.7"),
            // One trusted proxy: the entry it appended.
            ("10.0.0.2", &["203.0.113.9"], "203.0.113.9"),
            // A spoofed entry left of the real one changes nothing.
            ("10.0.0.2", &["1.2.3.4, 203.0.113.9"], "203.0.113.9"),
            // Two trusted proxies: the first untrusted from the right.
            (
                "10.0.0.2",
                &["1.2.3.4, 203.0.113.9, 10.0.0.3"],
                "203.0.113.9",
            ),
            // Several header lines are one list, in order.
            (
                "10.0.0.2",
                &["1.2.3.4, 203.0.113.9", "10.0.0.3"],
                "203.0.113.9",
            ),
            // Only trusted entries: the left-most of them.
            ("10.0.0.2", &["10.0.0.4, 10.0.0.3"], "10.0.0.4"),
            // No header: the proxy itself.
            ("10.0.0.2", &[], "10.0.0.2"),
            // Ports and IPv6, bracketed or not.
            ("10.0.0.2", &["203.0.113.9:4711"], "203.0.113.9"),
            ("10.0.0.2", &["[2001:db8:2::5]:443"], "2001:db8:2::5"),
            ("10.0.0.2", &["2001:db8:2::5"], "2001:db8:2::5"),
            ("10.0.0.2", &["[2001:db8:2::5]"], "2001:db8:2::5"),
            (
                "2001:db8:1::1",
                &["2001:db8:2::5, 2001:db8:1::9"],
                "2001:db8:2::5",
            ),
            // IPv4-mapped IPv6 is its IPv4 address, peer and entries alike.
            ("::ffff:10.0.0.2", &["::ffff:203.0.113.9"], "203.0.113.9"),
            ("::ffff:192.0.2.7", &["203.0.113.9"], "192.0.2.7"),
            // Malformed entries end the walk at the last trusted hop.
            ("10.0.0.2", &["203.0.113.9, garbage"], "10.0.0.2"),
            ("10.0.0.2", &["203.0.113.9, unknown, 10.0.0.3"], "10.0.0.3"),
            ("10.0.0.2", &["203.0.113.9,,"], "10.0.0.2"),
            ("10.0.0.2", &[""], "10.0.0.2"),
            ("10.0.0.2", &["fe80::1%eth0"], "10.0.0.2"),
            ("10.0.0.2", &["203.0.113.9:99999"], "10.0.0.2"),
            // ...but garbage left of the client does not matter.
            ("10.0.0.2", &["garbage, 203.0.113.9"], "203.0.113.9"),
        ];
        for (peer, lines, expected) in cases {
            assert_eq!(
                resolve(ip(peer), &with_xff(lines), &trusted),
                ip(expected),
                "peer {peer}, X-Forwarded-For {lines:?}"
            );
        }
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let headers = with_xff(&["203.0.113.9"]);
        assert_eq!(resolve(ip("10.0.0.2"), &headers, &[]), ip("10.0.0.2"));
    }

    #[test]
    fn a_header_that_is_not_text_ends_the_walk() {
        let mut headers = HeaderMap::new();
        headers.append(
            "x-forwarded-for",
            axum::http::HeaderValue::from_bytes(b"203.0.113.9, \xff").unwrap(),
        );
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(resolve(ip("10.0.0.2"), &headers, &trusted), ip("10.0.0.2"));
    }

    #[test]
    fn networks_are_cidrs_or_single_addresses() {
        assert_eq!(
            parse_network("10.1.0.0/16").unwrap().to_string(),
            "10.1.0.0/16"
        );
        assert_eq!(
            parse_network("192.168.1.7").unwrap().to_string(),
            "192.168.1.7/32"
        );
        assert_eq!(
            parse_network("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert_eq!(parse_network("::1").unwrap().to_string(), "::1/128");
        for bad in [
            "10.0.0.0/33",
            "10.0.0",
            "",
            "example.com",
            "::/129",
            " 10.0.0.0/8",
        ] {
            assert!(parse_network(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_empty_list_allows_every_address() {
        assert!(allowed(ip("203.0.113.9"), &[]));
        let only = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        assert!(allowed(ip("10.2.3.4"), &only));
        assert!(allowed(ip("::ffff:10.2.3.4"), &only));
        assert!(allowed(ip("2001:db8::5"), &only));
        assert!(!allowed(ip("127.0.0.1"), &only));
        assert!(!allowed(ip("2001:db9::5"), &only));
    }
}

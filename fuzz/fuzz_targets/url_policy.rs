//! The URL/address classifier, differentially: Iris's verdict on an image
//! URL (`check_url` with the default `AddressPolicy`) against independent
//! judgements of the same URL.
//!
//! - The host: Iris judges the address that the URL parser hands to the
//!   connector (`Url::host()`), never a different one. For plain ASCII
//!   URLs, a hand-written WHATWG host parse (every IPv4 notation: hex,
//!   octal, fewer than four parts; IPv6 through `std`) must find the same
//!   address, and a host the URL parser keeps as a name must be no address
//!   in any `inet_aton` notation a resolver would accept.
//! - The address: standard library's `is_global` (nightly `ip` feature, an
//!   implementation of IANA's special-purpose registries independent of
//!   Iris's table), with IPv4 embedded in IPv6 (mapped, 6to4, NAT64,
//!   compatible) judged by the IPv4 address. Iris may allow only what that
//!   oracle calls global, and may refuse what it calls global only where
//!   Iris is deliberately stricter (multicast, IETF assignments, reserved
//!   space, metadata endpoints), and each refusal's reason is true of it.
//! - An allowed network lets its addresses (and their mapped forms) through
//!   and changes nothing else.
#![no_main]
#![feature(ip)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use iris::images::address_policy::{AddressPolicy, Reason};
use iris::images::fetch::{UrlRefusal, check_url};
use libfuzzer_sys::fuzz_target;
use url::{Host, Url};

fn allowing() -> &'static AddressPolicy {
    static POLICY: OnceLock<AddressPolicy> = OnceLock::new();
    POLICY.get_or_init(|| AddressPolicy::new(&["10.0.0.0/8", "fd00::/8"]).expect("policy"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let independent = simple_host(text);
    let Ok(url) = Url::parse(text) else {
        return;
    };
    let verdict = check_url(&url, &AddressPolicy::default());

    // What the URL alone decides.
    let http = matches!(url.scheme(), "http" | "https");
    let userinfo = !url.username().is_empty() || url.password().is_some();
    match &verdict {
        Err(UrlRefusal::Scheme(_)) => assert!(!http),
        Err(UrlRefusal::UserInfo) => assert!(http && userinfo),
        Err(UrlRefusal::NoHost) => assert!(url.host_str().is_none_or(str::is_empty)),
        Err(UrlRefusal::NotAUrl) => panic!("a parsed URL is a URL"),
        Err(UrlRefusal::Address(_)) | Ok(()) => assert!(http && !userinfo),
        // Metadata endpoints refused by name: only ever a name.
        Err(UrlRefusal::Name(_)) => {
            assert!(http && !userinfo && matches!(url.host(), Some(Host::Domain(_))));
        }
        Err(UrlRefusal::Location) => panic!("only a redirect's Location is refused so"),
    }

    // The address Iris judged is the one the connector will use.
    let host = url.host().map(|h| h.to_owned());
    let addr = match &host {
        Some(Host::Ipv4(v4)) => Some(IpAddr::V4(*v4)),
        Some(Host::Ipv6(v6)) => Some(IpAddr::V6(*v6)),
        // Other schemes' hosts are opaque strings, never fetched.
        Some(Host::Domain(name)) if http => {
            assert_eq!(
                inet_aton(name),
                None,
                "{name:?} is a name to the URL parser, an address to a resolver"
            );
            assert!(name.parse::<IpAddr>().is_err(), "{name:?} kept as a name");
            if !userinfo && !name.is_empty() {
                assert!(
                    matches!(verdict, Ok(()) | Err(UrlRefusal::Name(_))),
                    "names are judged by the resolver, or refused as metadata names: {verdict:?}"
                );
            }
            None
        }
        Some(Host::Domain(_)) | None => None,
    };
    if let Some(addr) = addr.filter(|_| http && !userinfo) {
        let refusal = match &verdict {
            Ok(()) => None,
            Err(UrlRefusal::Address(refused)) => {
                assert_eq!(refused.addr, addr, "the address judged is the URL's");
                Some(refused.reason)
            }
            Err(other) => panic!("{addr} refused as {other:?}"),
        };
        judge(addr, refusal);

        let allowed_net = match addr {
            IpAddr::V4(v4) => v4.octets()[0] == 10,
            IpAddr::V6(v6) => {
                v6.segments()[0] >> 8 == 0xfd
                    || v6.to_ipv4_mapped().is_some_and(|v4| v4.octets()[0] == 10)
            }
        };
        let with_allowed = check_url(&url, allowing());
        // Metadata and host-agent endpoints stay refused inside an allowed
        // network (fd00:ec2::254 is AWS's, inside fd00::/8).
        let metadata = refusal == Some(Reason::Metadata);
        if allowed_net && !metadata {
            assert_eq!(with_allowed, Ok(()), "{addr} is in an allowed network");
        } else {
            assert_eq!(
                with_allowed, verdict,
                "an allowed network changes nothing else"
            );
        }
    }

    // An independent parse of the host finds the same address.
    if let Some(expected) = independent {
        match (expected, &host) {
            (Parsed::Addr(a), Some(Host::Ipv4(b))) => assert_eq!(a, IpAddr::V4(*b)),
            (Parsed::Addr(a), Some(Host::Ipv6(b))) => assert_eq!(a, IpAddr::V6(*b)),
            (Parsed::Name, Some(Host::Domain(_))) => {}
            (expected, found) => panic!("independent parse {expected:?}, URL parser {found:?}"),
        }
    }
});

/// The oracle's view of an address: whether it is globally reachable, by
/// the standard library's registry, IPv4 embedded in IPv6 judged as IPv4.
fn global(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => v4.is_global(),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => {
                v4.is_global() && (v6.to_ipv4_mapped().is_some() || is_6to4(v6) || v6.is_global())
            }
            None => v6.is_global(),
        },
    }
}

fn is_6to4(v6: Ipv6Addr) -> bool {
    v6.segments()[0] == 0x2002
}

/// The IPv4 address a packet to `v6` reaches, where there is one.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(v6);
    let s = v6.segments();
    if let Some(v4) = v6.to_ipv4_mapped() {
        Some(v4)
    } else if is_6to4(v6) {
        Some(Ipv4Addr::from((bits >> 80) as u32))
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || (bits >> 32 == 0 && bits > 1) {
        // NAT64's well-known prefix; IPv4-compatible (deprecated; `::` and
        // `::1` are themselves).
        Some(Ipv4Addr::from(bits as u32))
    } else {
        None
    }
}

/// Where Iris refuses on purpose what the registry calls global.
fn deliberately_stricter(addr: IpAddr, reason: Reason) -> bool {
    if reason == Reason::Metadata {
        return true;
    }
    match addr {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_multicast()
                // 192.0.0.0/24 whole (std exempts .9 and .10), the 6to4 relay anycast.
                || o[..3] == [192, 0, 0]
                || o[..3] == [192, 88, 99]
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_multicast()
                // IETF protocol assignments, whole (std exempts a few).
                || (s[0] == 0x2001 && s[1] < 0x200)
                // Outside global unicast 2000::/3.
                || s[0] >> 13 != 1
                // Segment-routing SIDs.
                || s[0] == 0x5f00
                // An embedded IPv4 address the registry calls non-global,
                // or IPv4-compatible at all.
                || embedded_v4(v6).is_some_and(|v4| !v4.is_global() || u128::from(v6) >> 32 == 0)
        }
    }
}

/// Iris's verdict (`None`: allowed) against the oracle.
fn judge(addr: IpAddr, refusal: Option<Reason>) {
    let Some(reason) = refusal else {
        assert!(
            global(addr),
            "{addr} allowed, but the registry says it is not global"
        );
        return;
    };
    if global(addr) {
        assert!(
            deliberately_stricter(addr, reason),
            "{addr} refused as {reason:?}, but the registry says it is global"
        );
    }
    // The reason is true of the address that decided.
    let decisive = match addr {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    let holds = match (reason, decisive) {
        (Reason::Loopback, a) => a.is_loopback(),
        (Reason::Multicast, a) => a.is_multicast(),
        (Reason::Documentation, a) => a.is_documentation(),
        (Reason::Benchmarking, a) => a.is_benchmarking(),
        (Reason::Unspecified, IpAddr::V4(v4)) => v4.octets()[0] == 0,
        (Reason::Unspecified, a) => a.is_unspecified(),
        (Reason::Private, IpAddr::V4(v4)) => v4.is_private(),
        (Reason::Private, IpAddr::V6(v6)) => {
            v6.is_unique_local()
                || v6.segments()[0] & 0xffc0 == 0xfec0
                || v6.segments()[..3] == [0x64, 0xff9b, 1]
        }
        (Reason::LinkLocal, IpAddr::V4(v4)) => v4.is_link_local(),
        (Reason::LinkLocal, IpAddr::V6(v6)) => v6.is_unicast_link_local(),
        (Reason::SharedCgnat, IpAddr::V4(v4)) => v4.is_shared(),
        (Reason::Broadcast, IpAddr::V4(v4)) => v4.is_broadcast(),
        // Reserved, not global unicast, metadata: whatever is not global.
        (_, a) => !global(a) || deliberately_stricter(addr, reason),
    };
    assert!(holds, "{addr} refused as {reason:?}, which it is not");
}

/// A host as an independent parse sees it.
#[derive(Debug, Clone, Copy)]
enum Parsed {
    Addr(IpAddr),
    Name,
}

/// The host of a plain `http(s)://` URL (printable ASCII, no percent
/// escapes or backslashes, which WHATWG rewrites), parsed by hand after
/// the WHATWG URL standard; `None` when the URL is not that plain, or its
/// host is not valid to the standard.
fn simple_host(text: &str) -> Option<Parsed> {
    if !text.bytes().all(|b| (0x21..=0x7e).contains(&b)) || text.contains(['%', '\\']) {
        return None;
    }
    let lower = text.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))?;
    if rest.starts_with('/') {
        return None;
    }
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(bracketed) = host_port.strip_prefix('[') {
        let (v6, _) = bracketed.split_once(']')?;
        return v6
            .parse::<Ipv6Addr>()
            .ok()
            .map(|a| Parsed::Addr(IpAddr::V6(a)));
    }
    let host = host_port.split(':').next()?;
    if host.is_empty() || host.split('.').any(|label| label.starts_with("xn--")) {
        return None;
    }
    if ends_in_number(host) {
        return whatwg_ipv4(host).map(|a| Parsed::Addr(IpAddr::V4(a)));
    }
    Some(Parsed::Name)
}

/// WHATWG's "ends in a number" checker.
fn ends_in_number(host: &str) -> bool {
    let mut parts: Vec<&str> = host.split('.').collect();
    if parts.last() == Some(&"") {
        if parts.len() == 1 {
            return false;
        }
        parts.pop();
    }
    let last = parts.last().copied().unwrap_or("");
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    last.strip_prefix("0x")
        .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// WHATWG's IPv4 parser.
fn whatwg_ipv4(host: &str) -> Option<Ipv4Addr> {
    let mut parts: Vec<&str> = host.split('.').collect();
    if parts.last() == Some(&"") && parts.len() > 1 {
        parts.pop();
    }
    if parts.len() > 4 {
        return None;
    }
    let numbers = parts
        .iter()
        .map(|p| ipv4_number(p, true))
        .collect::<Option<Vec<u64>>>()?;
    combine(&numbers)
}

/// glibc's `inet_aton`, which `getaddrinfo` applies to a name first: one to
/// four parts, each decimal, octal (leading 0) or hex (0x), the last filling
/// the bytes left; no trailing dot.
fn inet_aton(host: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let numbers = parts
        .iter()
        .map(|p| ipv4_number(p, false))
        .collect::<Option<Vec<u64>>>()?;
    combine(&numbers)
}

fn combine(numbers: &[u64]) -> Option<Ipv4Addr> {
    let (last, init) = numbers.split_last()?;
    if init.iter().any(|&n| n > 255) || *last >= 256u64.pow(5 - numbers.len() as u32) {
        return None;
    }
    let mut value = *last;
    for (i, n) in init.iter().enumerate() {
        value += n << (8 * (3 - i));
    }
    Some(Ipv4Addr::from(value as u32))
}

/// One part: `0x` hex, leading-zero octal, or decimal; `None` on anything
/// else or on overflow. WHATWG reads a bare `0x` as 0; `inet_aton` does not.
fn ipv4_number(part: &str, bare_0x_is_zero: bool) -> Option<u64> {
    if part.is_empty() {
        return None;
    }
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            if hex.is_empty() {
                return bare_0x_is_zero.then_some(0);
            }
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (part, 10)
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

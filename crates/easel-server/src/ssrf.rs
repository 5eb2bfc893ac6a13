//! Webhook targets and the private network (SSRF): a webhook URL comes from whoever submits a
//! job, and the server POSTs to it from inside its own network, so an unchecked URL would let
//! any client reach loopback services, cloud metadata, or hosts only the server can see.
//!
//! The check resolves the host asynchronously (the blocking resolver would stall a runtime
//! thread), refuses on DNS failure (an unresolvable target is not known to be safe), refuses
//! if ANY resolved address is special (a name with one public and one private address would
//! otherwise win half the time), and returns the addresses it checked so the caller connects
//! to exactly those: resolving again at connect time would let a short-TTL name answer
//! differently the second time (DNS rebinding). The caller must also follow no redirects,
//! since a `Location` header is a new, unchecked target.
//!
//! "Special" is RFC 6890 and IANA's IPv4/IPv6 special-purpose registries, refused whole even
//! where a range holds a few globally reachable anycast addresses, since no webhook lives
//! there. For IPv6, only 2000::/3 is allocated for global unicast, so everything outside it is
//! special. IPv4-mapped addresses (::ffff:a.b.c.d) are plain IPv4 on a dual-stack socket and are
//! judged by the embedded address. Forms that only reach IPv4 through a translator or tunnel
//! (IPv4-compatible ::/96, NAT64 64:ff9b::/96 and 64:ff9b:1::/48, 6to4 2002::/16, Teredo) are
//! refused whole: where the packet ends up depends on whichever gateway serves the prefix,
//! which may well sit inside the private network. The cost: an IPv6-only host behind DNS64
//! cannot reach IPv4-only webhooks unless the operator allows private targets.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use url::{Host, Url};

/// How long a lookup may take before the target is refused as unresolvable.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a webhook target was refused.
#[derive(Debug, thiserror::Error)]
pub enum SsrfError {
    #[error("not a URL: {0}")]
    NotUrl(#[source] url::ParseError),
    #[error("scheme {0:?} is not allowed (only http and https)")]
    Scheme(String),
    #[error("URL has no host")]
    NoHost,
    #[error("{host} is or resolves to {addr}, a loopback, private, link-local or other special-purpose address")]
    Special { host: String, addr: IpAddr },
    #[error("could not resolve {host}: {source}")]
    Dns {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
}

/// IPv4 special-purpose ranges (RFC 6890 and IANA's registry), as (network, prefix length).
const V4_SPECIAL: [(u32, u32); 18] = [
    (0x0000_0000, 8),  // 0.0.0.0/8 "this network"
    (0x0a00_0000, 8),  // 10.0.0.0/8 private
    (0x6440_0000, 10), // 100.64.0.0/10 carrier-grade NAT
    (0x7f00_0000, 8),  // 127.0.0.0/8 loopback
    (0xa9fe_0000, 16), // 169.254.0.0/16 link-local (cloud metadata lives here)
    (0xac10_0000, 12), // 172.16.0.0/12 private
    (0xc000_0000, 24), // 192.0.0.0/24 IETF protocol assignments
    (0xc000_0200, 24), // 192.0.2.0/24 documentation
    (0xc01f_c400, 24), // 192.31.196.0/24 AS112
    (0xc034_c100, 24), // 192.52.193.0/24 AMT
    (0xc058_6300, 24), // 192.88.99.0/24 6to4 relay anycast
    (0xc0a8_0000, 16), // 192.168.0.0/16 private
    (0xc0af_3000, 24), // 192.175.48.0/24 AS112 direct delegation
    (0xc612_0000, 15), // 198.18.0.0/15 benchmarking
    (0xc633_6400, 24), // 198.51.100.0/24 documentation
    (0xcb00_7100, 24), // 203.0.113.0/24 documentation
    (0xe000_0000, 4),  // 224.0.0.0/4 multicast
    (0xf000_0000, 4),  // 240.0.0.0/4 reserved, including 255.255.255.255 broadcast
];

/// IPv6 special-purpose ranges inside 2000::/3 (everything outside it is special anyway).
const V6_SPECIAL: [(u128, u32); 4] = [
    (0x2001_0000 << 96, 23), // 2001::/23 IETF protocol assignments: Teredo, benchmarking, ORCHIDv2, ...
    (0x2001_0db8 << 96, 32), // 2001:db8::/32 documentation
    (0x2002 << 112, 16),     // 2002::/16 6to4 (embeds an IPv4 address that may be private)
    (0x3fff << 112, 20),     // 3fff::/20 documentation (RFC 9637)
];

/// Whether `ip` lies in a special-purpose range (anything not globally routable unicast).
pub fn is_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => V4_SPECIAL.iter().any(|&(net, len)| u32::from(v4) >> (32 - len) == net >> (32 - len)),
        IpAddr::V6(v6) => v6_special(v6),
    }
}

fn v6_special(v6: Ipv6Addr) -> bool {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return is_special(IpAddr::V4(v4));
    }
    let bits = u128::from(v6);
    // Outside 2000::/3: ::/8 (unspecified, loopback, IPv4-compatible and -translated, NAT64), 100::/64 discard,
    // 5f00::/16 SRv6 SIDs, fc00::/7 unique local, fe80::/10 link-local, fec0::/10 site-local, ff00::/8 multicast.
    bits >> 125 != 0b001 || V6_SPECIAL.iter().any(|&(net, len)| bits >> (128 - len) == net >> (128 - len))
}

/// A checked target: connect only to `addrs` (they passed the check) for `host`.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: Url,
    /// The host exactly as `url` spells it (IPv6 in brackets).
    pub host: String,
    /// With the URL's port; IPv4-mapped IPv6 addresses are given as the IPv4 address they stand for.
    pub addrs: Vec<SocketAddr>,
}

/// Syntax only (scheme, host), no DNS: for validating a URL at request time.
pub fn check_syntax(raw: &str) -> Result<Url, SsrfError> {
    let url = Url::parse(raw).map_err(SsrfError::NotUrl)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(SsrfError::Scheme(url.scheme().to_string()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(SsrfError::NoHost);
    }
    Ok(url)
}

/// Everything that can be checked without DNS (scheme, host, IP literals, `localhost` names):
/// for a request handler, which must not wait on a lookup. Delivery calls [`resolve`] again.
pub fn check_without_dns(raw: &str, allow_private: bool) -> Result<Url, SsrfError> {
    let url = check_syntax(raw)?;
    if allow_private {
        return Ok(url);
    }
    let host = url.host_str().unwrap_or_default().to_string();
    let literal: Option<IpAddr> = match url.host() {
        Some(Host::Ipv4(v4)) => Some(v4.into()),
        Some(Host::Ipv6(v6)) => Some(v6.into()),
        Some(Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            (name == "localhost" || name.ends_with(".localhost")).then_some(Ipv4Addr::LOCALHOST.into())
        }
        None => return Err(SsrfError::NoHost),
    };
    match literal {
        Some(addr) if is_special(addr) => Err(SsrfError::Special { host, addr }),
        _ => Ok(url),
    }
}

/// Parses, resolves asynchronously (tokio::net::lookup_host, never the blocking resolver), and
/// refuses if ANY resolved address is special (unless allow_private), if DNS fails, or nothing resolves.
/// With allow_private, DNS failure is still an error but special addresses pass.
/// IP-literal hosts (including bracketed IPv6) are checked without DNS. `localhost` and `*.localhost` are refused without DNS unless allow_private.
pub async fn resolve(raw: &str, allow_private: bool) -> Result<Target, SsrfError> {
    let url = check_syntax(raw)?;
    let host = url.host_str().unwrap_or_default().to_string();
    let port = url.port_or_known_default().unwrap_or(if url.scheme() == "https" { 443 } else { 80 });
    let ips: Vec<IpAddr> = match url.host() {
        Some(Host::Ipv4(v4)) => vec![v4.into()],
        Some(Host::Ipv6(v6)) => vec![v6.into()],
        Some(Host::Domain(name)) => {
            // RFC 6761: these names are loopback whatever a resolver says, so no resolver is asked.
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if !allow_private && (name == "localhost" || name.ends_with(".localhost")) {
                return Err(SsrfError::Special { host, addr: Ipv4Addr::LOCALHOST.into() });
            }
            let lookup = tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((host.as_str(), port))).await;
            let found = lookup.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "DNS lookup timed out"))).map(|a| a.map(|a| a.ip()).collect());
            found.map_err(|source| SsrfError::Dns { host: host.clone(), source })?
        }
        None => return Err(SsrfError::NoHost),
    };
    if ips.is_empty() {
        return Err(SsrfError::NoAddress { host });
    }
    if let Some(&addr) = ips.iter().find(|ip| !allow_private && is_special(**ip)) {
        return Err(SsrfError::Special { host, addr });
    }
    let mut addrs: Vec<SocketAddr> = Vec::with_capacity(ips.len());
    for ip in ips {
        let a = SocketAddr::new(ip.to_canonical(), port);
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    Ok(Target { url, host, addrs })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whitespace-separated addresses (a string keeps long lists compact under rustfmt).
    fn specials(list: &str) -> Vec<(&str, bool)> {
        list.split_whitespace().map(|a| (a, is_special(a.parse().unwrap_or_else(|e| panic!("{a}: {e}"))))).collect()
    }

    #[test]
    fn every_special_ipv4_range_is_special() {
        let list = "0.0.0.0 0.255.255.255 10.0.0.1 10.255.255.255 100.64.0.1 100.127.255.255 127.0.0.1 127.255.255.254 169.254.169.254 \
                    172.16.0.1 172.31.255.255 192.0.0.9 192.0.0.170 192.0.2.1 192.31.196.1 192.52.193.1 192.88.99.1 192.168.0.1 192.168.255.255 \
                    192.175.48.1 198.18.0.1 198.19.255.255 198.51.100.7 203.0.113.9 224.0.0.1 239.255.255.250 240.0.0.1 255.255.255.255";
        for (a, special) in specials(list) {
            assert!(special, "{a} should be special");
        }
    }

    #[test]
    fn every_special_ipv6_range_is_special() {
        // Unspecified, loopback, IPv4-compatible, IPv4-translated, NAT64 (both), discard, 2001::/23 (Teredo, benchmarking, ORCHIDv2, its end),
        // documentation, 6to4, documentation (RFC 9637), SRv6, ULA, link-local, site-local, multicast, and unallocated space outside 2000::/3.
        let list = ":: ::1 ::127.0.0.1 ::8.8.8.8 ::ffff:0:808:808 64:ff9b::808:808 64:ff9b::a00:1 64:ff9b:1::1 100::1 2001::1 \
                    2001:0:4136:e378:8000:63bf:3fff:fdd2 2001:2::1 2001:20::1 2001:1ff:ffff::1 2001:db8::1 2002:808:808::1 2002:7f00:1::1 \
                    3fff::1 3fff:fff:ffff::1 5f00::1 fc00::1 fd12:3456::1 fe80::1 febf::1 fec0::1 ff02::1 ff0e::1 1::1 4000::1";
        for (a, special) in specials(list) {
            assert!(special, "{a} should be special");
        }
    }

    #[test]
    fn ipv4_mapped_addresses_are_judged_by_the_embedded_ipv4() {
        for (a, special) in specials("::ffff:127.0.0.1 ::ffff:7f00:1 ::ffff:10.0.0.1 ::ffff:169.254.169.254 ::ffff:0.0.0.0 ::ffff:255.255.255.255") {
            assert!(special, "{a} should be special");
        }
        assert_eq!(specials("::ffff:8.8.8.8"), vec![("::ffff:8.8.8.8", false)]);
    }

    #[test]
    fn public_addresses_and_range_neighbours_are_not_special() {
        let list = "8.8.8.8 1.1.1.1 100.63.255.255 100.128.0.0 172.15.255.255 172.32.0.0 192.0.1.1 192.88.98.1 198.17.255.255 198.20.0.0 \
                    223.255.255.255 2606:4700:4700::1111 2001:4860:4860::8888 2001:200::1 2003::1 3fff:1000::1 2a00:1450::1";
        for (a, special) in specials(list) {
            assert!(!special, "{a} should not be special");
        }
    }

    #[test]
    fn the_url_crate_normalises_numeric_ipv4_forms_to_dotted_quads() {
        for raw in "http://2130706433/ http://0177.0.0.1/ http://0x7f.1/ http://0x7f000001/ http://127.1/".split_whitespace() {
            let url = check_syntax(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(url.host(), Some(Host::Ipv4(Ipv4Addr::LOCALHOST)), "{raw}");
        }
    }

    #[tokio::test]
    async fn loopback_private_and_localhost_urls_are_refused_without_dns() {
        // sub.localhost is in no hosts file: were it looked up, this would be a Dns error, not Special.
        let list = "http://2130706433/ http://0177.0.0.1/ http://0x7f.1/ http://0x7f000001/ http://127.1/ http://[::1]/ http://[::ffff:127.0.0.1]/ \
                    http://[::ffff:7f00:1]/ http://[::ffff:10.0.0.1]:8080/ http://[0:0:0:0:0:ffff:7f00:1]/ http://169.254.169.254/latest/meta-data \
                    http://[fe80::1]/ http://[64:ff9b::a9fe:a9fe]/ http://localhost/ http://LOCALHOST./ http://sub.localhost/ https://a.b.localhost:8443/";
        for raw in list.split_whitespace() {
            assert!(matches!(resolve(raw, false).await, Err(SsrfError::Special { .. })), "{raw} should be refused as special");
        }
    }

    #[tokio::test]
    async fn dns_failure_is_refused_even_with_allow_private() {
        for allow_private in [false, true] {
            let res = resolve("http://nothing.invalid/hook", allow_private).await;
            assert!(matches!(&res, Err(SsrfError::Dns { host, .. }) if host == "nothing.invalid"), "{res:?}");
        }
    }

    #[tokio::test]
    async fn allow_private_lets_loopback_through() {
        let t = resolve("http://127.0.0.1:8080/hook", true).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.addrs, vec![SocketAddr::from(([127, 0, 0, 1], 8080))]);
        // `localhost` then goes through the resolver (the hosts file), and only its answers are pinned.
        let t = resolve("http://localhost:9000/", true).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(!t.addrs.is_empty() && t.addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 9000), "{:?}", t.addrs);
    }

    #[tokio::test]
    async fn ip_literal_targets_pin_that_address_with_the_urls_port() {
        let t = resolve("https://8.8.8.8/x", false).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((t.host.as_str(), t.addrs), ("8.8.8.8", vec![SocketAddr::from(([8, 8, 8, 8], 443))]));
        let t = resolve("http://[2606:4700:4700::1111]/", false).await.unwrap_or_else(|e| panic!("{e}"));
        let v6 = SocketAddr::from(([0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1111], 80));
        assert_eq!((t.host.as_str(), t.addrs), ("[2606:4700:4700::1111]", vec![v6]));
        let t = resolve("http://[::ffff:8.8.8.8]:8081/", false).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.addrs, vec![SocketAddr::from(([8, 8, 8, 8], 8081))]);
    }

    #[test]
    fn only_http_and_https_urls_with_a_host_pass_the_syntax_check() {
        for raw in "ftp://8.8.8.8/ file:///etc/passwd gopher://8.8.8.8:70/ data:text/plain,hi javascript:alert(1) ws://8.8.8.8/".split_whitespace() {
            assert!(matches!(check_syntax(raw), Err(SsrfError::Scheme(_))), "{raw}");
        }
        assert!(matches!(check_syntax("not a url"), Err(SsrfError::NotUrl(_))));
        assert!(matches!(check_syntax("http://"), Err(SsrfError::NotUrl(_))));
        assert!(check_syntax("https://example.com/hook").is_ok());
    }
}

//! Which addresses the server may connect to on a user's behalf (webhook receivers, federation
//! JWKS URLs). Whoever can create a webhook or a federated credential could otherwise make the
//! server reach loopback services, the cloud metadata endpoint or the internal network (SSRF).
//! Loopback, link-local, private, shared (CGNAT), unspecified, multicast and reserved addresses,
//! and IPv6 forms embedding them, are refused unless the `outbound_allow` option names them.
//!
//! The check is made when a URL is registered (a clear 400) and again when connecting: host
//! names are resolved by [`FilteringResolver`], which drops refused addresses, so the address
//! checked is the address connected to (a name re-pointed after registration, DNS rebinding,
//! gains nothing). URLs with an IP literal skip the resolver and are checked by
//! [`OutboundPolicy::check_url`] before each request.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Address ranges never connected to unless allowed.
const REFUSED_RANGES: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    // IPv4-compatible (deprecated), with :: and ::1.
    "::/96",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// The outbound allow-list: address ranges and host names the operator vouches for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundPolicy {
    allowed_nets: Vec<IpNet>,
    allowed_hosts: Vec<String>,
}

fn refused_ranges() -> impl Iterator<Item = IpNet> {
    // Invariant: the constant ranges above parse.
    REFUSED_RANGES.iter().map(|r| r.parse().expect("valid refused range"))
}

/// The IPv4 address an IPv6 address stands for (IPv4-mapped, or NAT64's well-known prefix).
fn embedded_v4(ip: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]).then(|| {
        let o = ip.octets();
        std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15])
    })
}

impl OutboundPolicy {
    /// Parses allow-list entries: `10.1.2.0/24`, `127.0.0.1`, `fd00::/8` or a host name.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut policy = Self::default();
        for entry in entries {
            let entry = entry.trim();
            if let Ok(net) = entry.parse::<IpNet>() {
                policy.allowed_nets.push(net);
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                policy.allowed_nets.push(IpNet::from(ip));
            } else if is_host_name(entry) {
                policy.allowed_hosts.push(entry.trim_end_matches('.').to_ascii_lowercase());
            } else {
                return Err(format!(
                    "outbound_allow entry '{entry}' is not an address range (10.0.0.0/8), an address or \
                     a host name"
                ));
            }
        }
        Ok(policy)
    }

    /// Whether the server may connect to `ip`.
    pub fn ip_allowed(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        !refused_ranges().any(|r| r.contains(&ip)) || self.allowed_nets.iter().any(|n| n.contains(&ip))
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allowed_hosts.contains(&host)
    }

    /// Checks what can be checked without DNS: an IP literal's address, and names that are
    /// loopback by definition (`localhost`, RFC 6761).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), String> {
        let refused = |what: &str| {
            Err(format!(
                "{what} is a loopback, private or otherwise internal address; name it in the server's \
                 outbound_allow option (--outbound-allow) to allow it"
            ))
        };
        match url.host() {
            Some(url::Host::Ipv4(ip)) if !self.ip_allowed(ip.into()) => refused(&ip.to_string()),
            Some(url::Host::Ipv6(ip)) if !self.ip_allowed(ip.into()) => refused(&ip.to_string()),
            Some(url::Host::Domain(name)) if !self.host_allowed(name) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if name == "localhost" || name.ends_with(".localhost") {
                    refused(&name)
                } else {
                    Ok(())
                }
            }
            Some(_) => Ok(()),
            None => Err("the URL has no host".into()),
        }
    }

    /// The check made when a URL is registered: [`check_url`](Self::check_url), and every
    /// address the name resolves to now. A name that does not resolve yet is accepted: the
    /// connection is checked again.
    pub async fn check_url_now(&self, url: &reqwest::Url) -> Result<(), String> {
        self.check_url(url)?;
        let Some(url::Host::Domain(name)) = url.host() else { return Ok(()) };
        if self.host_allowed(name) {
            return Ok(());
        }
        let port = url.port_or_known_default().unwrap_or(443);
        if let Ok(addrs) = tokio::net::lookup_host((name, port)).await {
            for addr in addrs {
                if !self.ip_allowed(addr.ip()) {
                    return Err(format!(
                        "{name} resolves to {}, a loopback, private or otherwise internal address; name \
                         it in the server's outbound_allow option (--outbound-allow) to allow it",
                        addr.ip()
                    ));
                }
            }
        }
        Ok(())
    }

    /// An HTTP client for user-given URLs: resolves through [`FilteringResolver`], follows no
    /// redirects (a redirect to an internal address would bypass the check) and uses no proxy
    /// from the environment (the proxy would connect instead of us, unchecked).
    pub fn client_builder(self: &Arc<Self>) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .use_rustls_tls()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(FilteringResolver { policy: self.clone() }))
    }
}

fn is_host_name(text: &str) -> bool {
    let text = text.trim_end_matches('.');
    !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Resolves with the system resolver and keeps only the addresses the policy allows.
pub struct FilteringResolver {
    policy: Arc<OutboundPolicy>,
}

impl reqwest::dns::Resolve for FilteringResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let name = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let trusted = policy.host_allowed(&name);
            let allowed: Vec<SocketAddr> =
                resolved.into_iter().filter(|a| trusted || policy.ip_allowed(a.ip())).collect();
            if allowed.is_empty() {
                let refused: Box<dyn std::error::Error + Send + Sync> = format!(
                    "{name} resolves only to loopback, private or otherwise internal addresses \
                     (not in outbound_allow)"
                )
                .into();
                return Err(refused);
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_refused_by_default() {
        let p = OutboundPolicy::default();
        for refused in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "::127.0.0.1",
        ] {
            assert!(!p.ip_allowed(ip(refused)), "{refused} allowed");
        }
        for allowed in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(p.ip_allowed(ip(allowed)), "{allowed} refused");
        }
    }

    #[test]
    fn the_allow_list_names_ranges_addresses_and_hosts() {
        let p = OutboundPolicy::parse(&["127.0.0.1".into(), "10.1.0.0/16".into(), "Hooks.Internal.".into()])
            .unwrap();
        assert!(p.ip_allowed(ip("127.0.0.1")));
        assert!(p.ip_allowed(ip("::ffff:127.0.0.1")));
        assert!(!p.ip_allowed(ip("127.0.0.2")));
        assert!(p.ip_allowed(ip("10.1.200.3")));
        assert!(!p.ip_allowed(ip("10.2.0.1")));
        assert!(p.host_allowed("hooks.internal"));
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        assert!(p.check_url(&url("http://127.0.0.1:9/x")).is_ok());
        assert!(p.check_url(&url("http://[::1]:9/x")).is_err());
        assert!(p.check_url(&url("http://localhost:9/x")).is_err());
        assert!(p.check_url(&url("http://a.localhost./x")).is_err());
        assert!(p.check_url(&url("https://hooks.internal/x")).is_ok());
        assert!(OutboundPolicy::parse(&["not a host!".into()]).is_err());
    }

    #[tokio::test]
    async fn the_resolver_drops_refused_addresses() {
        use reqwest::dns::Resolve;
        let name = |n: &str| n.parse::<reqwest::dns::Name>().unwrap();
        let strict = FilteringResolver { policy: Arc::new(OutboundPolicy::default()) };
        let err = strict.resolve(name("localhost")).await.err().expect("loopback only: refused");
        assert!(err.to_string().contains("outbound_allow"), "{err}");
        let allowed = OutboundPolicy::parse(&["127.0.0.0/8".into()]).unwrap();
        let lenient = FilteringResolver { policy: Arc::new(allowed) };
        let addrs: Vec<SocketAddr> = lenient.resolve(name("localhost")).await.unwrap().collect();
        assert!(
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback() && a.ip().is_ipv4()),
            "{addrs:?}"
        );
    }
}

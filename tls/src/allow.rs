//! Allow-lists for the requests Ferry makes to URLs its users name: the
//! scheduler's callbacks and probe alerts, a worker's probe downloads. A
//! URL someone else chose must not become a way into the internal network
//! (Dragonfly's preheat URLs were, GHSA-g2rq-jv54-wcpr), so each daemon
//! reaches only the hosts its own configuration lists; an empty list
//! reaches none.

use std::net::IpAddr;

/// One entry: a host name, `*.domain` (any name under it), an IP address,
/// or an IP network (`10.0.0.0/8`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Name(String),
    Under(String),
    Network(IpAddr, u8),
}

/// The hosts a daemon may send requests to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hosts {
    entries: Vec<Entry>,
}

fn prefix_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl Hosts {
    /// Parses `entries`; the error names the bad one.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut out = Vec::new();
        for raw in entries {
            let e = raw.as_ref().trim().to_ascii_lowercase();
            let bad = |why: &str| Err(format!("'{}': {why}", raw.as_ref()));
            let entry = if let Some((ip, len)) = e.split_once('/') {
                let Ok(ip) = ip.parse::<IpAddr>() else { return bad("not an IP network (a.b.c.d/len)") };
                match len.parse::<u8>() {
                    Ok(len) if len <= prefix_of(ip) => Entry::Network(ip, len),
                    _ => return bad("the prefix length does not fit the address"),
                }
            } else if let Ok(ip) = e.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
                Entry::Network(ip, prefix_of(ip))
            } else if let Some(domain) = e.strip_prefix("*.") {
                if !valid_name(domain) {
                    return bad("not a host name after '*.'");
                }
                Entry::Under(domain.to_string())
            } else if valid_name(&e) {
                Entry::Name(e)
            } else {
                return bad("not a host name, *.domain, IP address or IP network");
            };
            out.push(entry);
        }
        Ok(Self { entries: out })
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `host` (a URL's host: a name, an IPv4 address or a bracketed
    /// IPv6 one) is allowed.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        self.entries.iter().any(|e| match (e, ip) {
            (Entry::Network(net, len), Some(ip)) => {
                // Both families sit at the top of the 128 bits: compare
                // the first `len` of them.
                let shift = 128 - u32::from(*len);
                net.is_ipv4() == ip.is_ipv4() && (shift >= 128 || (bits(*net) >> shift) == (bits(ip) >> shift))
            }
            (Entry::Name(name), None) => *name == host,
            (Entry::Under(domain), None) => host.strip_suffix(domain.as_str()).is_some_and(|sub| sub.ends_with('.')),
            _ => false,
        })
    }

    /// Checks the host of `url`: Ok, or why not (naming `field` and the
    /// setting `setting` that would allow it).
    pub fn check_url(&self, url: &str, field: &str, setting: &str) -> Result<(), String> {
        let host = url
            .split_once("://")
            .map(|(_, rest)| rest)
            .and_then(|rest| rest.split(['/', '?', '#']).next())
            .map(|authority| authority.rsplit_once('@').map_or(authority, |(_, h)| h))
            .map(|hostport| match hostport.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or_default(),
                None => hostport.rsplit_once(':').map_or(hostport, |(h, _)| h),
            })
            .unwrap_or_default();
        if self.allows(host) {
            Ok(())
        } else if self.is_empty() {
            Err(format!("{field}: host '{host}' is not allowed: {setting} is empty, so requests go nowhere"))
        } else {
            Err(format!("{field}: host '{host}' is not in {setting}"))
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_domains_addresses_and_networks_match_and_nothing_else_does() {
        let hosts =
            Hosts::parse(&["ops.example.com", "*.hooks.example", "10.1.0.0/16", "192.168.1.7", "fd00::/8", "[::1]"])
                .unwrap();
        for yes in [
            "ops.example.com",
            "OPS.example.com.",
            "a.hooks.example",
            "b.c.hooks.example",
            "10.1.200.3",
            "192.168.1.7",
            "fd12::1",
            "[::1]",
        ] {
            assert!(hosts.allows(yes), "{yes}");
        }
        for no in [
            "example.com",
            "evil-ops.example.com",
            "hooks.example",
            "xhooks.example",
            "10.2.0.1",
            "192.168.1.8",
            "169.254.169.254",
            "fe80::1",
            "localhost",
        ] {
            assert!(!hosts.allows(no), "{no}");
        }
        assert!(Hosts::parse(&["0.0.0.0/0"]).unwrap().allows("8.8.8.8"), "everything, when asked for");
        assert!(Hosts::default().is_empty() && !Hosts::default().allows("127.0.0.1"), "empty allows nothing");
    }

    #[test]
    fn bad_entries_are_named_and_urls_are_checked_by_their_host() {
        for bad in ["10.0.0.0/33", "a b", "*.", "http://x", "1.2.3.4/x"] {
            let err = Hosts::parse(&[bad]).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
        let hosts = Hosts::parse(&["127.0.0.1", "hooks.example"]).unwrap();
        assert!(hosts.check_url("http://127.0.0.1:8080/done", "callback_url", "callback_hosts").is_ok());
        assert!(hosts.check_url("https://user@hooks.example/x?y", "callback_url", "callback_hosts").is_ok());
        let err =
            hosts.check_url("http://169.254.169.254/latest/meta-data", "callback_url", "callback_hosts").unwrap_err();
        assert_eq!(err, "callback_url: host '169.254.169.254' is not in callback_hosts");
        let err = Hosts::default().check_url("http://[::1]:9/x", "targets[0].url", "fetch_hosts").unwrap_err();
        assert!(err.contains("host '::1' is not allowed: fetch_hosts is empty"), "{err}");
    }
}

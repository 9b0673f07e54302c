//! A redirection policy in user space: parsed from istio-iptables style flag
//! values, validated as a whole before anything touches the kernel, and
//! turned into the map contents the kernel programs read.
//!
//! [`UserPolicy`] implements the shared [`PolicyMaps`] trait over ordinary
//! collections so `redirect explain` and the tests run the exact decision code
//! the kernel runs.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use redirect_common::{
    Addr, Config, Inbound, Outbound, PolicyMaps, Verdict, config_flags, decide_inbound,
    decide_outbound, ip6_words, port_flags,
};

/// A policy value a user gave that cannot be used. Names the flag and value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Not a port number in 1..=65535.
    #[error("{flag}: '{value}' is not a port (expected a number from 1 to 65535)")]
    BadPort {
        /// The flag (long form).
        flag: &'static str,
        /// The offending value.
        value: String,
    },
    /// Not an address or CIDR.
    #[error("{flag}: '{value}' is not an IP address or CIDR ({reason})")]
    BadCidr {
        /// The flag (long form).
        flag: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a numeric user or group id.
    #[error("{flag}: '{value}' is not a numeric id (expected a number from 0 to 4294967294)")]
    BadId {
        /// The flag (long form).
        flag: &'static str,
        /// The offending value.
        value: String,
    },
    /// `*` mixed with other entries.
    #[error("{flag}: '*' means everything and cannot be combined with other entries")]
    WildcardMixed {
        /// The flag (long form).
        flag: &'static str,
    },
    /// Not a usable cgroup v2 directory.
    #[error("{flag}: '{value}' {reason}")]
    BadCgroup {
        /// The flag (long form).
        flag: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Not a socket mark.
    #[error(
        "{flag}: '{value}' is not a socket mark (expected a non-zero number, e.g. 0x1 or 1337)"
    )]
    BadMark {
        /// The flag (long form).
        flag: &'static str,
        /// The offending value.
        value: String,
    },
    /// Not an `ip:port` service address.
    #[error(
        "{flag}: '{value}' is not a service address (expected IP:PORT or [IPv6]:PORT, port 1-65535)"
    )]
    BadService {
        /// The flag (long form).
        flag: &'static str,
        /// The offending value.
        value: String,
    },
    /// Two flags that exclude each other.
    #[error("{a} and {b} cannot be used together")]
    Conflict {
        /// One flag.
        a: &'static str,
        /// The other.
        b: &'static str,
    },
    /// Outbound capture with nothing to tell the proxy's own connections
    /// apart: they would be captured and loop back to the proxy.
    #[error(
        "this policy captures outbound connections ({capture}) but exempts no proxy: no \
         --proxy-uid, no --proxy-gid, no --proxy-mark, no --proxy-cgroup. The proxy's own \
         connections would be captured too and loop back to it. Give one of them, or pass \
         --allow-no-proxy-exemption if that is really meant"
    )]
    NoProxyExemption {
        /// What makes outbound capture possible.
        capture: String,
    },
    /// Not an interface name.
    #[error("{flag}: '{value}' is not an interface name ({reason})")]
    BadInterface {
        /// The flag (long form).
        flag: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Too many entries for one list.
    #[error("{flag}: {count} entries is more than the {max} this list holds")]
    TooMany {
        /// The flag (long form).
        flag: &'static str,
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// An IPv4 or IPv6 prefix, host bits cleared (as iptables does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` falls inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_v4(u32::from(ip), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_v6(u128::from(ip), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask_v4(a: u32, prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        a & (u32::MAX << (32 - prefix))
    }
}

fn mask_v6(a: u128, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        a & (u128::MAX << (128 - prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| "bad address")?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                let p: u8 = p.parse().map_err(|_| "bad prefix length")?;
                if p > max {
                    return Err(if max == 32 {
                        "prefix length above 32"
                    } else {
                        "prefix length above 128"
                    });
                }
                p
            }
        };
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(mask_v4(u32::from(a), prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(mask_v6(u128::from(a), prefix))),
        };
        Ok(Cidr { addr, prefix })
    }
}

/// Include-outbound CIDRs: everything, or a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Include {
    /// `*`: capture everything not excluded.
    All,
    /// Capture these (empty: capture nothing by CIDR).
    List(Vec<Cidr>),
}

/// Inbound ports to capture (`-b`): every port, or a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundPorts {
    /// `*`: every port except the excluded ones (`-d`).
    All,
    /// These ports (empty: nothing inbound is captured).
    List(Vec<u16>),
}

/// The owner-group filter (rule 4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum OwnerGroups {
    /// No filter: every owner's traffic is considered.
    #[default]
    All,
    /// Capture only traffic of tasks whose GID is listed.
    Include(Vec<u32>),
    /// Capture traffic of every task except those whose GID is listed.
    Exclude(Vec<u32>),
}

/// The proxy's cgroup (`--proxy-cgroup`), resolved when the flag is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyCgroup {
    /// The directory given.
    pub path: std::path::PathBuf,
    /// Its path below the cgroup v2 root (what `iptables -m cgroup --path`
    /// takes).
    pub rel: String,
    /// Its cgroup id (inode number).
    pub id: u64,
    /// Its depth below the root (the root is 0).
    pub level: u32,
}

/// A complete, validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySpec {
    /// Outbound capture port (`-p`).
    pub proxy_port: u16,
    /// Inbound capture port (`-z`).
    pub inbound_port: u16,
    /// Tunnel port, never captured.
    pub tunnel_port: u16,
    /// Proxy UIDs, in the order given (the first one matters over `lo`).
    pub proxy_uids: Vec<u32>,
    /// Proxy GIDs, in the order given.
    pub proxy_gids: Vec<u32>,
    /// Include-outbound CIDRs (`-i`).
    pub include_cidrs: Include,
    /// Exclude-outbound CIDRs (`-x`).
    pub exclude_cidrs: Vec<Cidr>,
    /// Include-outbound ports (`-q`).
    pub include_ports: Vec<u16>,
    /// Exclude-outbound ports (`-o`).
    pub exclude_ports: Vec<u16>,
    /// Inbound ports captured (`-b`).
    pub inbound_ports: InboundPorts,
    /// Inbound ports never captured when `-b '*'` (`-d`).
    pub exclude_inbound_ports: Vec<u16>,
    /// Sockets carrying this mark are the proxy's (`--proxy-mark`).
    pub proxy_mark: Option<u32>,
    /// Every task in this cgroup (or below) is the proxy (`--proxy-cgroup`).
    pub proxy_cgroup: Option<ProxyCgroup>,
    /// The owner-group filter.
    pub owner_groups: OwnerGroups,
    /// Explicit services captured (`--service`), in addition to the CIDRs.
    pub services: Vec<std::net::SocketAddr>,
    /// DNS capture (`--redirect-dns`), rule 5.
    pub dns: Option<DnsCapture>,
    /// Interfaces whose traffic is never captured (`-c`), in the order
    /// given: inbound connections arriving on them, outbound ones whose
    /// route leaves through them.
    pub exclude_interfaces: Vec<String>,
}

/// Most interfaces `--exclude-interfaces` may list.
pub const MAX_INTERFACES: usize = 64;

/// Parses `--exclude-interfaces` (comma-separated interface names), keeping
/// order and dropping repeats. A name is what Linux takes for one: 1 to 15
/// bytes, no `/`, `:` or white space, not `.` or `..`; a `+` at its end
/// makes it a pattern for every name that starts with the rest, as in
/// iptables.
pub fn parse_interfaces(flag: &'static str, value: &str) -> Result<Vec<String>, PolicyError> {
    ordered_list(flag, value, MAX_INTERFACES, |item| {
        let bad = |reason| PolicyError::BadInterface {
            flag,
            value: item.to_string(),
            reason,
        };
        if item.len() > 15 {
            return Err(bad("longer than 15 bytes, the longest name Linux takes"));
        }
        if item == "." || item == ".." {
            return Err(bad("not a name Linux takes"));
        }
        if item
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(bad("names cannot hold '/', ':' or white space"));
        }
        Ok(item.to_string())
    })
}

/// Whether the interface `name` is `pattern`: the same name, or, for a
/// pattern ending in `+`, one that starts with what comes before it
/// (iptables' wildcard).
pub fn interface_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// One route of the pod's network namespace, as the loader read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Its destination prefix.
    pub dst: Cidr,
    /// The interface it leaves through; `None` for a route that leaves
    /// through none (unreachable, blackhole, prohibit).
    pub dev: Option<String>,
    /// Its metric (the lowest wins among routes to the same prefix).
    pub metric: u32,
}

/// The routes a policy with excluded interfaces needs, each with whether
/// it leaves through one of them: the namespace's routes (lowest metric
/// per prefix), then what the kernel's `local` table sends through `lo`
/// before any other table is asked: 127.0.0.0/8, `::1` and every address
/// the namespace owns. Looked up by longest prefix, this tells which
/// interface a connection to a destination leaves through, as
/// iptables' `-o` sees it (policy routing rules are not read). Empty when
/// the policy excludes no interface.
pub fn route_entries(spec: &PolicySpec, facts: &NetnsFacts) -> Vec<(Cidr, bool)> {
    if spec.exclude_interfaces.is_empty() {
        return Vec::new();
    }
    let excluded = |dev: Option<&str>| dev.is_some_and(|d| spec.excludes_interface(d));
    let mut best: std::collections::BTreeMap<Cidr, (u32, bool)> = std::collections::BTreeMap::new();
    for r in &facts.routes {
        let e = excluded(r.dev.as_deref());
        match best.get(&r.dst) {
            Some((m, _)) if *m <= r.metric => {}
            _ => {
                best.insert(r.dst, (r.metric, e));
            }
        }
    }
    let lo = excluded(Some("lo"));
    let local = [
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
            prefix: 8,
        },
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
            prefix: 128,
        },
    ]
    .into_iter()
    .chain(facts.local_addrs.iter().map(|a| Cidr {
        addr: *a,
        prefix: if a.is_ipv4() { 32 } else { 128 },
    }));
    for c in local {
        best.insert(c, (0, lo));
    }
    // A route inside 127.0.0.0/8 would outrank it; the local table, asked
    // first, sends all of it through lo.
    for (c, (_, e)) in best.iter_mut() {
        if matches!(c.addr, IpAddr::V4(a) if a.is_loopback()) {
            *e = lo;
        }
    }
    best.into_iter().map(|(c, (_, e))| (c, e)).collect()
}

/// Logs each excluded interface the namespace does not have: nothing
/// arrives on it or leaves through it, as with iptables' `-i`/`-o` of an
/// absent interface, until the policy is applied again once it exists.
pub fn warn_absent_interfaces(spec: &PolicySpec, facts: &NetnsFacts) {
    for name in spec.absent_interfaces(facts) {
        tracing::warn!(
            interface = name,
            "--exclude-interfaces: the pod's network namespace has no such interface (yet); \
             it excludes nothing until the policy is applied again after it is created"
        );
    }
}

/// Where the loader sends a policy's `-c` before it knows the running
/// kernel: `ingress_ifindex`'s offset in `struct bpf_sk_lookup_kern` from
/// Linux 5.17 to at least 6.18. The loader puts the running kernel's (from
/// BTF) in its place.
pub const SK_LOOKUP_IFINDEX_OFFSET: u16 = 40;

/// Where the proxy's DNS listener is (istio's agent: 15053).
pub const DNS_CAPTURE_PORT: u16 = 15053;

/// DNS capture: TCP and UDP to port 53 of these nameservers (or of any
/// address) go to the DNS capture port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsCapture {
    /// Any address (`--capture-all-dns`), not only `servers`.
    pub capture_all: bool,
    /// The nameservers, in the order given (those of the pod's
    /// `/etc/resolv.conf` unless `--dns-servers` lists them).
    pub servers: Vec<IpAddr>,
}

/// Most nameservers DNS capture may list.
pub const MAX_DNS_SERVERS: usize = 64;

/// The nameservers of a resolv.conf: the address of each `nameserver`
/// line, in order (a zone index, `fe80::1%eth0`, is dropped, as glibc
/// does with it for routing). Lines that are not addresses are skipped, as
/// istio-iptables skips them.
pub fn resolv_conf_servers(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        let addr = addr.split('%').next().unwrap_or(addr);
        if let Ok(ip) = addr.parse::<IpAddr>()
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

/// Parses `--dns-servers` (comma-separated addresses), keeping order and
/// dropping repeats.
pub fn parse_dns_servers(flag: &'static str, value: &str) -> Result<Vec<IpAddr>, PolicyError> {
    ordered_list(flag, value, MAX_DNS_SERVERS, |item| {
        item.parse::<IpAddr>().map_err(|_| PolicyError::BadCidr {
            flag,
            value: item.to_string(),
            reason: "a nameserver is one address, IPv4 or IPv6",
        })
    })
}

impl Default for PolicySpec {
    /// istio-iptables' defaults: ports 15001/15006/15008, UID and GID 1337,
    /// nothing included.
    fn default() -> Self {
        PolicySpec {
            proxy_port: 15001,
            inbound_port: 15006,
            tunnel_port: 15008,
            proxy_uids: vec![1337],
            proxy_gids: vec![1337],
            include_cidrs: Include::List(Vec::new()),
            exclude_cidrs: Vec::new(),
            include_ports: Vec::new(),
            exclude_ports: Vec::new(),
            inbound_ports: InboundPorts::List(Vec::new()),
            exclude_inbound_ports: Vec::new(),
            proxy_mark: None,
            proxy_cgroup: None,
            owner_groups: OwnerGroups::All,
            services: Vec::new(),
            dns: None,
            exclude_interfaces: Vec::new(),
        }
    }
}

/// Most CIDRs one list may hold (the tries hold a million; this keeps a typo
/// from exhausting kernel memory).
pub const MAX_CIDRS: usize = 1_000_000;
/// Most proxy UIDs or GIDs.
pub const MAX_IDS: usize = redirect_common::SET_CAPACITY as usize;

fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Parses a port number, 1..=65535.
pub fn parse_port(flag: &'static str, value: &str) -> Result<u16, PolicyError> {
    match value.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(PolicyError::BadPort {
            flag,
            value: value.to_string(),
        }),
    }
}

/// Parses a comma-separated port list; empty means none.
pub fn parse_ports(flag: &'static str, value: &str) -> Result<Vec<u16>, PolicyError> {
    let set: BTreeSet<u16> = items(value)
        .map(|p| parse_port(flag, p))
        .collect::<Result<_, _>>()?;
    Ok(set.into_iter().collect())
}

/// Parses a comma-separated list with `parse`, keeping order and dropping
/// repeats; at most `max` entries.
fn ordered_list<T: PartialEq>(
    flag: &'static str,
    value: &str,
    max: usize,
    parse: impl Fn(&str) -> Result<T, PolicyError>,
) -> Result<Vec<T>, PolicyError> {
    let mut out = Vec::new();
    for item in items(value) {
        let v = parse(item)?;
        if !out.contains(&v) {
            out.push(v);
        }
    }
    if out.len() > max {
        return Err(PolicyError::TooMany {
            flag,
            count: out.len(),
            max,
        });
    }
    Ok(out)
}

/// Parses a comma-separated id list, keeping order and dropping repeats.
pub fn parse_ids(flag: &'static str, value: &str) -> Result<Vec<u32>, PolicyError> {
    ordered_list(flag, value, MAX_IDS, |item| match item.parse::<u32>() {
        Ok(id) if id != u32::MAX => Ok(id),
        _ => Err(PolicyError::BadId {
            flag,
            value: item.to_string(),
        }),
    })
}

/// Parses a comma-separated CIDR list (bare addresses are /32 or /128).
pub fn parse_cidrs(flag: &'static str, value: &str) -> Result<Vec<Cidr>, PolicyError> {
    let mut out = BTreeSet::new();
    for item in items(value) {
        if item == "*" {
            return Err(PolicyError::WildcardMixed { flag });
        }
        let cidr = item
            .parse::<Cidr>()
            .map_err(|reason| PolicyError::BadCidr {
                flag,
                value: item.to_string(),
                reason,
            })?;
        out.insert(cidr);
    }
    if out.len() > MAX_CIDRS {
        return Err(PolicyError::TooMany {
            flag,
            count: out.len(),
            max: MAX_CIDRS,
        });
    }
    Ok(out.into_iter().collect())
}

/// Most explicit services.
pub const MAX_SERVICES: usize = 1_000_000;

/// Parses a socket mark: decimal or `0x` hex, not 0.
pub fn parse_mark(flag: &'static str, value: &str) -> Result<u32, PolicyError> {
    let v = value.trim();
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => v.parse::<u32>().ok(),
    };
    match parsed {
        Some(m) if m != 0 => Ok(m),
        _ => Err(PolicyError::BadMark {
            flag,
            value: value.to_string(),
        }),
    }
}

/// Parses a comma-separated list of `ip:port` services (IPv6 as
/// `[addr]:port`), sorted, repeats dropped.
pub fn parse_services(
    flag: &'static str,
    value: &str,
) -> Result<Vec<std::net::SocketAddr>, PolicyError> {
    let mut out = BTreeSet::new();
    for item in items(value) {
        match item.parse::<std::net::SocketAddr>() {
            Ok(a) if a.port() != 0 => {
                out.insert(a);
            }
            _ => {
                return Err(PolicyError::BadService {
                    flag,
                    value: item.to_string(),
                });
            }
        }
    }
    if out.len() > MAX_SERVICES {
        return Err(PolicyError::TooMany {
            flag,
            count: out.len(),
            max: MAX_SERVICES,
        });
    }
    Ok(out.into_iter().collect())
}

/// Resolves `--proxy-cgroup`: a directory of the cgroup v2 hierarchy.
pub fn resolve_proxy_cgroup(
    flag: &'static str,
    path: &std::path::Path,
) -> Result<ProxyCgroup, PolicyError> {
    use std::os::unix::fs::MetadataExt as _;
    let bad = |reason: String| PolicyError::BadCgroup {
        flag,
        value: path.display().to_string(),
        reason,
    };
    let Some(root) = crate::fs::cgroup2_mount() else {
        return Err(bad(
            "cannot be used: no cgroup v2 hierarchy is mounted".into()
        ));
    };
    if !crate::fs::is_cgroup2_dir(path) {
        return Err(bad(format!(
            "is not a cgroup v2 directory (cgroup v2 is mounted at {})",
            root.display()
        )));
    }
    let canon = path
        .canonicalize()
        .map_err(|e| bad(format!("cannot be resolved: {e}")))?;
    let rel = canon.strip_prefix(&root).map_err(|_| {
        bad(format!(
            "is not below the cgroup v2 root {}",
            root.display()
        ))
    })?;
    let id = std::fs::metadata(&canon)
        .map_err(|e| bad(format!("cannot be read: {e}")))?
        .ino();
    Ok(ProxyCgroup {
        path: path.to_path_buf(),
        rel: rel.display().to_string(),
        id,
        level: rel.components().count() as u32,
    })
}

/// Parses inbound ports: `*` alone, or a list.
pub fn parse_inbound_ports(flag: &'static str, value: &str) -> Result<InboundPorts, PolicyError> {
    let all: Vec<&str> = items(value).collect();
    if all.contains(&"*") {
        if all.len() > 1 {
            return Err(PolicyError::WildcardMixed { flag });
        }
        return Ok(InboundPorts::All);
    }
    parse_ports(flag, value).map(InboundPorts::List)
}

/// Parses include-outbound CIDRs: `*` alone, or a list.
pub fn parse_include(flag: &'static str, value: &str) -> Result<Include, PolicyError> {
    let all: Vec<&str> = items(value).collect();
    if all.contains(&"*") {
        if all.len() > 1 {
            return Err(PolicyError::WildcardMixed { flag });
        }
        return Ok(Include::All);
    }
    parse_cidrs(flag, value).map(Include::List)
}

/// Facts about the pod's network namespace that the decision needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetnsFacts {
    /// Addresses the namespace owns (routes to them leave through `lo`).
    pub local_addrs: Vec<IpAddr>,
    /// Source address the namespace's routing picks for outside destinations.
    pub source_v4: Option<Ipv4Addr>,
    /// The namespace's cookie (`SO_NETNS_COOKIE`), 0 if unknown.
    pub netns_cookie: u64,
    /// IPv6 source address the routing picks for outside destinations.
    pub source_v6: Option<Ipv6Addr>,
    /// The namespace's interfaces: name and ifindex.
    pub interfaces: Vec<(String, u32)>,
    /// The namespace's routes (main table, IPv4 and IPv6).
    pub routes: Vec<Route>,
}

/// The service map key of `ip:port`.
pub fn service_key(s: &std::net::SocketAddr) -> redirect_common::ServiceKey {
    match s.ip() {
        IpAddr::V4(a) => redirect_common::ServiceKey {
            ip: [u32::from_ne_bytes(a.octets()), 0, 0, 0],
            port: s.port(),
            family: redirect_common::AF_INET,
        },
        IpAddr::V6(a) => redirect_common::ServiceKey {
            ip: ip6_words(&a.octets()),
            port: s.port(),
            family: redirect_common::AF_INET6,
        },
    }
}

impl PolicySpec {
    /// What makes outbound capture possible under this policy (include
    /// CIDRs, include ports, services), or `None` if nothing outbound can be
    /// captured.
    pub fn outbound_capture(&self) -> Option<String> {
        let mut what = Vec::new();
        match &self.include_cidrs {
            Include::All => what.push("--include-cidrs '*'".to_string()),
            Include::List(l) if !l.is_empty() => what.push("--include-cidrs".to_string()),
            Include::List(_) => {}
        }
        if !self.include_ports.is_empty() {
            what.push("--include-ports".to_string());
        }
        if !self.services.is_empty() {
            what.push("--service".to_string());
        }
        (!what.is_empty()).then(|| what.join(", "))
    }

    /// Whether something exempts the proxy's own connections: a proxy UID
    /// or GID, a mark or a cgroup.
    pub fn has_proxy_exemption(&self) -> bool {
        !self.proxy_uids.is_empty()
            || !self.proxy_gids.is_empty()
            || self.proxy_mark.is_some()
            || self.proxy_cgroup.is_some()
    }

    /// Refuses a policy that captures outbound traffic with no proxy
    /// exemption at all: the proxy's own connections would loop back to it.
    pub fn check_proxy_exemption(&self) -> Result<(), PolicyError> {
        match self.outbound_capture() {
            Some(capture) if !self.has_proxy_exemption() => {
                Err(PolicyError::NoProxyExemption { capture })
            }
            _ => Ok(()),
        }
    }

    /// The scalar part as the kernel reads it.
    pub fn config(&self, facts: &NetnsFacts) -> Config {
        let mut flags = 0;
        if !self.proxy_uids.is_empty() {
            flags |= config_flags::HAS_UIDS;
        }
        if !self.proxy_gids.is_empty() {
            flags |= config_flags::HAS_GIDS;
        }
        match &self.include_cidrs {
            Include::All => flags |= config_flags::INCLUDE_ALL,
            Include::List(l) if !l.is_empty() => flags |= config_flags::HAS_INCLUDE_CIDRS,
            Include::List(_) => {}
        }
        if !self.exclude_cidrs.is_empty() {
            flags |= config_flags::HAS_EXCLUDE_CIDRS;
        }
        if let Include::List(l) = &self.include_cidrs
            && l.iter().any(|c| c.addr.is_loopback())
        {
            flags |= config_flags::LOOPBACK_INCLUDE;
        }
        if self.proxy_mark.is_some() {
            flags |= config_flags::HAS_MARK;
        }
        if self.proxy_cgroup.is_some() {
            flags |= config_flags::HAS_CGROUP;
        }
        match &self.owner_groups {
            OwnerGroups::All => {}
            OwnerGroups::Include(_) => flags |= config_flags::OWNER_GROUPS_INCLUDE,
            OwnerGroups::Exclude(_) => flags |= config_flags::OWNER_GROUPS_EXCLUDE,
        }
        if !self.services.is_empty() {
            flags |= config_flags::HAS_SERVICES;
        }
        match &self.inbound_ports {
            InboundPorts::All => flags |= config_flags::INBOUND_ALL,
            InboundPorts::List(l) if !l.is_empty() => flags |= config_flags::INBOUND_LIST,
            InboundPorts::List(_) => {}
        }
        if let Some(dns) = &self.dns {
            flags |= config_flags::DNS_CAPTURE;
            if dns.capture_all {
                flags |= config_flags::DNS_CAPTURE_ALL;
            }
        }
        Config {
            proxy_port: self.proxy_port,
            inbound_port: self.inbound_port,
            tunnel_port: self.tunnel_port,
            flags,
            first_uid: self.proxy_uids.first().copied().unwrap_or(0),
            first_gid: self.proxy_gids.first().copied().unwrap_or(0),
            source_v4: facts
                .source_v4
                .map(|a| u32::from_ne_bytes(a.octets()))
                .unwrap_or(0),
            dns_port: if self.dns.is_some() {
                DNS_CAPTURE_PORT
            } else {
                0
            },
            ifindex_offset: if self.exclude_interfaces.is_empty() {
                0
            } else {
                SK_LOOKUP_IFINDEX_OFFSET
            },
            netns_cookie: facts.netns_cookie,
            source_v6: facts
                .source_v6
                .map(|a| ip6_words(&a.octets()))
                .unwrap_or([0; 4]),
            proxy_cgroup_id: self.proxy_cgroup.as_ref().map_or(0, |c| c.id),
            proxy_mark: self.proxy_mark.unwrap_or(0),
            proxy_cgroup_level: self.proxy_cgroup.as_ref().map_or(0, |c| c.level),
            owner_path: Default::default(),
            policy: 0,
        }
    }

    /// `(port, flags)` for every port with a flag set.
    pub fn port_entries(&self) -> Vec<(u16, u8)> {
        let mut map = std::collections::BTreeMap::new();
        for p in &self.exclude_ports {
            *map.entry(*p).or_insert(0) |= port_flags::OUT_EXCLUDE;
        }
        for p in &self.include_ports {
            *map.entry(*p).or_insert(0) |= port_flags::OUT_INCLUDE;
        }
        for p in &self.exclude_inbound_ports {
            *map.entry(*p).or_insert(0) |= port_flags::IN_EXCLUDE;
        }
        if let InboundPorts::List(l) = &self.inbound_ports {
            for p in l {
                *map.entry(*p).or_insert(0) |= port_flags::IN_INCLUDE;
            }
        }
        map.into_iter().collect()
    }

    /// The IPv4 CIDRs of a list.
    pub fn v4_cidrs(list: &[Cidr]) -> impl Iterator<Item = (Ipv4Addr, u8)> + '_ {
        list.iter().filter_map(|c| match c.addr {
            IpAddr::V4(a) => Some((a, c.prefix)),
            IpAddr::V6(_) => None,
        })
    }

    /// The ifindexes of the excluded interfaces the namespace has (one it
    /// does not have matches nothing, as iptables' `-i` of an absent
    /// interface).
    pub fn excluded_ifindexes(&self, facts: &NetnsFacts) -> Vec<u32> {
        let mut out: Vec<u32> = facts
            .interfaces
            .iter()
            .filter(|(name, _)| self.excludes_interface(name))
            .map(|(_, i)| *i)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether `-c` names the interface `name` (itself, or a `prefix+`
    /// pattern that matches it, as iptables' `-i`/`-o` take them).
    pub fn excludes_interface(&self, name: &str) -> bool {
        self.exclude_interfaces
            .iter()
            .any(|x| interface_matches(x, name))
    }

    /// The excluded interfaces (or patterns) the namespace has none of.
    pub fn absent_interfaces<'a>(
        &'a self,
        facts: &'a NetnsFacts,
    ) -> impl Iterator<Item = &'a str> + 'a {
        self.exclude_interfaces
            .iter()
            .filter(|x| {
                !facts
                    .interfaces
                    .iter()
                    .any(|(n, _)| interface_matches(x, n))
            })
            .map(String::as_str)
    }

    /// The owner-group filter's GIDs.
    pub fn owner_group_ids(&self) -> &[u32] {
        match &self.owner_groups {
            OwnerGroups::All => &[],
            OwnerGroups::Include(l) | OwnerGroups::Exclude(l) => l,
        }
    }

    /// The keys of the nameservers DNS capture takes (`address:53`); none
    /// without DNS capture.
    pub fn dns_server_keys(&self) -> impl Iterator<Item = redirect_common::ServiceKey> + '_ {
        self.dns
            .iter()
            .flat_map(|d| d.servers.iter())
            .map(|ip| service_key(&std::net::SocketAddr::new(*ip, 53)))
    }

    /// The service map's keys.
    pub fn service_keys(&self) -> impl Iterator<Item = redirect_common::ServiceKey> + '_ {
        self.services.iter().map(service_key)
    }

    /// The IPv6 CIDRs of a list.
    pub fn v6_cidrs(list: &[Cidr]) -> impl Iterator<Item = (Ipv6Addr, u8)> + '_ {
        list.iter().filter_map(|c| match c.addr {
            IpAddr::V6(a) => Some((a, c.prefix)),
            IpAddr::V4(_) => None,
        })
    }
}

/// The policy over plain collections: what `explain` and the tests decide
/// with, through the same [`decide_outbound`] the kernel runs.
#[derive(Clone, Debug)]
pub struct UserPolicy {
    /// The scalar part.
    pub config: Config,
    spec: PolicySpec,
    facts: NetnsFacts,
    ports: std::collections::BTreeMap<u16, u8>,
    services: std::collections::HashSet<std::net::SocketAddr>,
}

impl UserPolicy {
    /// Builds it from a spec and the namespace facts.
    pub fn new(spec: PolicySpec, facts: NetnsFacts) -> Self {
        UserPolicy {
            config: spec.config(&facts),
            ports: spec.port_entries().into_iter().collect(),
            services: spec.services.iter().copied().collect(),
            spec,
            facts,
        }
    }

    /// Decides an outbound connection.
    pub fn decide(&self, conn: &Outbound) -> Verdict {
        decide_outbound(&self.config, self, conn)
    }

    /// The ifindex of the namespace's interface `name` (or `name` itself
    /// if it is a number); 0 if there is none.
    pub fn ifindex_of(&self, name: &str) -> u32 {
        name.parse().unwrap_or_else(|_| {
            self.facts
                .interfaces
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, i)| *i)
        })
    }

    /// Decides an inbound connection.
    pub fn decide_inbound(&self, conn: &Inbound) -> Verdict {
        decide_inbound(&self.config, self, conn)
    }
}

/// Converts a std address into the decision code's.
pub fn to_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(a) => Addr::V4(u32::from(a)),
        IpAddr::V6(a) => Addr::V6(a.octets()),
    }
}

fn from_addr(a: &Addr) -> IpAddr {
    match a {
        Addr::V4(a) => IpAddr::V4(Ipv4Addr::from(*a)),
        Addr::V6(b) => IpAddr::V6(Ipv6Addr::from(*b)),
    }
}

impl PolicyMaps for UserPolicy {
    fn port_flags(&self, port: u16) -> u8 {
        self.ports.get(&port).copied().unwrap_or(0)
    }

    fn is_proxy_uid(&self, uid: u32) -> bool {
        self.spec.proxy_uids.contains(&uid)
    }

    fn is_proxy_gid(&self, gid: u32) -> bool {
        self.spec.proxy_gids.contains(&gid)
    }

    fn cidr_excluded(&self, dst: &Addr) -> bool {
        let ip = from_addr(dst);
        self.spec.exclude_cidrs.iter().any(|c| c.contains(ip))
    }

    fn cidr_included(&self, dst: &Addr) -> bool {
        let ip = from_addr(dst);
        match &self.spec.include_cidrs {
            Include::All => true,
            Include::List(l) => l.iter().any(|c| c.contains(ip)),
        }
    }

    fn is_local_addr(&self, dst: &Addr) -> bool {
        self.facts.local_addrs.contains(&from_addr(dst))
    }

    fn is_owner_group(&self, gid: u32) -> bool {
        self.spec.owner_group_ids().contains(&gid)
    }

    fn is_service(&self, dst: &Addr, port: u16) -> bool {
        self.services
            .contains(&std::net::SocketAddr::new(from_addr(dst), port))
    }

    fn is_dns_server(&self, dst: &Addr) -> bool {
        self.spec
            .dns
            .as_ref()
            .is_some_and(|d| d.servers.contains(&from_addr(dst)))
    }

    fn is_excluded_interface(&self, ifindex: u32) -> bool {
        self.spec.excluded_ifindexes(&self.facts).contains(&ifindex)
    }

    fn routed_via_excluded_interface(&self, dst: &Addr) -> bool {
        let ip = from_addr(dst);
        route_entries(&self.spec, &self.facts)
            .into_iter()
            .filter(|(c, _)| c.contains(ip))
            .max_by_key(|(c, _)| c.prefix)
            .is_some_and(|(_, e)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, dev: Option<&str>, metric: u32) -> Route {
        Route {
            dst: dst.parse().unwrap(),
            dev: dev.map(str::to_string),
            metric,
        }
    }

    #[test]
    fn interface_names_and_patterns() {
        assert_eq!(
            parse_interfaces("-c", "net1, eth0,net1,net+").unwrap(),
            vec!["net1", "eth0", "net+"]
        );
        assert!(parse_interfaces("-c", "").unwrap().is_empty());
        for bad in ["net/1", "eth0:1", ".", "..", "a-name-longer-than-15"] {
            let e = parse_interfaces("--exclude-interfaces", bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(interface_matches("net+", "net1"));
        assert!(interface_matches("net1", "net1"));
        assert!(!interface_matches("net1", "net10"));
        assert!(!interface_matches("net+", "eth0"));
    }

    /// Which interface a destination leaves through, as the route entries
    /// say by longest prefix: the local table first (127/8, ::1, the
    /// pod's addresses go through lo), the lowest metric per prefix, and
    /// a route that leaves through no interface is not excluded.
    #[test]
    fn route_entries_tell_the_output_interface() {
        let facts = NetnsFacts {
            local_addrs: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            routes: vec![
                route("0.0.0.0/0", Some("eth0"), 0),
                route("10.0.0.0/24", Some("eth0"), 0),
                route("10.210.0.0/16", Some("net1"), 0),
                route("10.210.7.0/24", Some("eth0"), 0),
                route("10.220.0.0/16", Some("eth0"), 100),
                route("10.220.0.0/16", Some("net1"), 10),
                route("10.230.0.0/16", None, 0),
                route("127.1.0.0/16", Some("eth0"), 0),
                route("fd00:210::/64", Some("net1"), 256),
                route("::/0", Some("eth0"), 1024),
            ],
            ..NetnsFacts::default()
        };
        let spec = |c: &[&str]| PolicySpec {
            exclude_interfaces: c.iter().map(|s| s.to_string()).collect(),
            ..PolicySpec::default()
        };
        let via = |c: &[&str], dst: &str| {
            UserPolicy::new(spec(c), facts.clone())
                .routed_via_excluded_interface(&to_addr(dst.parse().unwrap()))
        };
        assert!(route_entries(&spec(&[]), &facts).is_empty());
        assert!(via(&["net1"], "10.210.0.1"));
        assert!(!via(&["net1"], "10.210.7.1"));
        assert!(via(&["net1"], "10.220.3.3"), "the lowest metric wins");
        assert!(!via(&["net1"], "10.230.0.1"));
        assert!(!via(&["net1"], "10.0.0.5"));
        assert!(via(&["lo"], "10.0.0.5"));
        assert!(
            via(&["lo"], "127.1.2.3"),
            "the local table has all of 127/8"
        );
        assert!(!via(&["eth0"], "127.1.2.3"));
        assert!(via(&["eth0"], "192.0.2.1"));
        assert!(via(&["net+"], "fd00:210::1"));
        assert!(!via(&["net+"], "fd00:211::1"));
        assert!(via(&["lo"], "::1"));
        assert!(via(&["lo"], "fd00::5"));
        assert!(!via(&["net1"], "192.0.2.1"));
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap().prefix, 32);
        assert_eq!("fd00::1/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix, 0);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0/8".parse::<Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
        assert!("::/129".parse::<Cidr>().is_err());
    }

    #[test]
    fn lists_accept_empty_values() {
        assert_eq!(
            parse_cidrs("--exclude-cidrs", "").unwrap(),
            Vec::<Cidr>::new()
        );
        assert_eq!(
            parse_ports("--exclude-ports", " ").unwrap(),
            Vec::<u16>::new()
        );
        assert_eq!(parse_ids("--proxy-uid", "").unwrap(), Vec::<u32>::new());
        assert_eq!(
            parse_include("--include-cidrs", "").unwrap(),
            Include::List(vec![])
        );
    }

    #[test]
    fn ports_are_checked() {
        assert_eq!(parse_ports("f", "80, 443,80").unwrap(), vec![80, 443]);
        for bad in ["0", "70000", "-1", "http", "1.5"] {
            let err = parse_ports("--exclude-ports", bad).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
            assert!(err.to_string().contains("--exclude-ports"), "{err}");
        }
    }

    #[test]
    fn wildcard_alone_only() {
        assert_eq!(parse_include("-i", "*").unwrap(), Include::All);
        assert!(matches!(
            parse_include("-i", "*,10.0.0.0/8"),
            Err(PolicyError::WildcardMixed { .. })
        ));
        assert!(parse_cidrs("-x", "*").is_err());
    }

    #[test]
    fn ids_keep_order() {
        assert_eq!(parse_ids("-u", "4,3,4").unwrap(), vec![4, 3]);
        assert!(parse_ids("-u", "root").is_err());
        assert!(parse_ids("-u", "4294967295").is_err());
    }

    #[test]
    fn marks() {
        assert_eq!(parse_mark("--proxy-mark", "0x1").unwrap(), 1);
        assert_eq!(parse_mark("--proxy-mark", "1337").unwrap(), 1337);
        assert_eq!(parse_mark("--proxy-mark", "0xFFFFFFFF").unwrap(), u32::MAX);
        for bad in ["0", "0x0", "", "x", "0x", "4294967296", "-1"] {
            let e = parse_mark("--proxy-mark", bad).unwrap_err().to_string();
            assert!(e.contains("--proxy-mark"), "{e}");
        }
    }

    #[test]
    fn services() {
        let s = parse_services("--service", "10.0.0.1:80, [fd00::1]:443,10.0.0.1:80").unwrap();
        assert_eq!(s.len(), 2);
        for bad in [
            "10.0.0.1",
            "10.0.0.1:0",
            "10.0.0.1:70000",
            "fd00::1:80",
            "x:1",
        ] {
            let e = parse_services("--service", bad).unwrap_err().to_string();
            assert!(e.contains("--service") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn proxy_cgroup_must_be_cgroup2() {
        let e = resolve_proxy_cgroup("--proxy-cgroup", std::path::Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--proxy-cgroup") && e.contains("/nonexistent"),
            "{e}"
        );
        if let Some(root) = crate::fs::cgroup2_mount() {
            let c = resolve_proxy_cgroup("--proxy-cgroup", &root).unwrap();
            assert_eq!((c.level, c.rel.as_str()), (0, ""));
        }
    }

    #[test]
    fn outbound_capture_needs_a_proxy_exemption() {
        let none = PolicySpec {
            proxy_uids: vec![],
            proxy_gids: vec![],
            ..PolicySpec::default()
        };
        // Nothing captured outbound: nothing to exempt.
        assert!(none.check_proxy_exemption().is_ok());
        let inbound_only = PolicySpec {
            inbound_ports: InboundPorts::All,
            ..none.clone()
        };
        assert!(inbound_only.check_proxy_exemption().is_ok());
        for capturing in [
            PolicySpec {
                include_cidrs: Include::All,
                ..none.clone()
            },
            PolicySpec {
                include_cidrs: Include::List(vec!["10.0.0.0/8".parse().unwrap()]),
                ..none.clone()
            },
            PolicySpec {
                include_ports: vec![80],
                ..none.clone()
            },
            PolicySpec {
                services: vec!["10.0.0.1:80".parse().unwrap()],
                ..none.clone()
            },
        ] {
            let e = capturing.check_proxy_exemption().unwrap_err().to_string();
            assert!(
                e.contains("exempts no proxy") && e.contains("--allow-no-proxy-exemption"),
                "{e}"
            );
            // Any one exemption is enough.
            for exempt in [
                PolicySpec {
                    proxy_uids: vec![1337],
                    ..capturing.clone()
                },
                PolicySpec {
                    proxy_gids: vec![1337],
                    ..capturing.clone()
                },
                PolicySpec {
                    proxy_mark: Some(1),
                    ..capturing.clone()
                },
                PolicySpec {
                    proxy_cgroup: Some(ProxyCgroup {
                        path: "/sys/fs/cgroup/p".into(),
                        rel: "p".into(),
                        id: 9,
                        level: 1,
                    }),
                    ..capturing.clone()
                },
            ] {
                assert!(exempt.check_proxy_exemption().is_ok(), "{exempt:?}");
            }
        }
        let e = PolicySpec {
            include_cidrs: Include::All,
            include_ports: vec![80],
            ..none
        }
        .check_proxy_exemption()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--include-cidrs '*', --include-ports"), "{e}");
    }

    #[test]
    fn cidr_contains() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.255.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
    }

    mod props {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            /// Every valid IPv4 CIDR parses, keeps its prefix, clears host
            /// bits, and contains the address it was written with.
            #[test]
            fn v4_cidrs_round_trip(a in any::<u32>(), len in 0u8..=32) {
                let ip = Ipv4Addr::from(a);
                let c: Cidr = format!("{ip}/{len}").parse().unwrap();
                prop_assert_eq!(c.prefix, len);
                prop_assert!(c.contains(IpAddr::V4(ip)));
                let again: Cidr = c.to_string().parse().unwrap();
                prop_assert_eq!(again, c);
            }

            /// Prefix lengths above the address size are refused.
            #[test]
            fn long_prefixes_refused(a in any::<u32>(), len in 33u32..1000) {
                let text = format!("{}/{}", Ipv4Addr::from(a), len);
                prop_assert!(text.parse::<Cidr>().is_err());
            }

            /// Ports: exactly 1..=65535 are accepted, and a refusal names the
            /// flag and the value.
            #[test]
            fn ports_in_range_only(p in 0u32..200_000) {
                let r = parse_port("--proxy-port", &p.to_string());
                if (1..=65535).contains(&p) {
                    prop_assert_eq!(r.unwrap(), p as u16);
                } else {
                    let e = r.unwrap_err().to_string();
                    prop_assert!(e.contains("--proxy-port") && e.contains(&p.to_string()));
                }
            }

            /// A port list parses to the sorted set of its members, whatever
            /// the spacing and empty items.
            #[test]
            fn port_lists(ps in prop::collection::vec(1u16..=65535, 0..20)) {
                let text = ps.iter().map(|p| format!(" {p} ")).collect::<Vec<_>>().join(",,");
                let mut want = ps.clone();
                want.sort_unstable();
                want.dedup();
                prop_assert_eq!(parse_ports("-o", &text).unwrap(), want);
            }

            /// Arbitrary text never panics the parsers.
            #[test]
            fn no_panics(s in ".{0,40}") {
                let _ = parse_cidrs("-x", &s);
                let _ = parse_include("-i", &s);
                let _ = parse_ports("-o", &s);
                let _ = parse_ids("-u", &s);
            }
        }
    }
}

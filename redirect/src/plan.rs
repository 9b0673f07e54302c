//! `redirect apply --dry-run`: everything `apply` would do, without doing it.
//!
//! [`plan`] checks the inputs as [`crate::apply::apply`] does (the policy was
//! already parsed; the cgroup directory; the network namespace, which it also
//! probes for its addresses, source addresses and cookie; the address counts;
//! the proxy exemption; the pin dir, which must not be a bpffs root and must
//! not belong to another pod), then reports what would be attached where and
//! what would be written into each policy map. It neither requires nor
//! mounts bpffs, takes no lock and changes nothing: the pin dir is only
//! inspected (is it on bpffs, which generations exist, which pod its record
//! names), so nothing of the kernel's BPF state changes.

use std::{
    fmt,
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use redirect_common::{Config, SET_CAPACITY, config_flags, map_names, port_flags};
use serde::Serialize;

use crate::{
    apply::{ApplyRequest, Layout, PROGRAMS, check_pod},
    entries::PolicyEntries,
    fs::{DEFAULT_BPFFS, check_cgroup, is_bpffs, refuse_bpffs_root},
    netns,
    pod_record::PodRecord,
    policy::PolicySpec,
};

/// How many entries of a long map are listed.
pub const SHOWN: usize = 20;

/// A map's entries: how many, and the first [`SHOWN`] of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Summary<T> {
    /// Number of entries that would be written.
    pub count: usize,
    /// The first [`SHOWN`] of them.
    pub entries: Vec<T>,
    /// Whether `entries` is only the beginning.
    pub truncated: bool,
}

impl<T> Summary<T> {
    fn new(all: impl IntoIterator<Item = T>) -> Self {
        let mut entries = Vec::new();
        let mut count = 0;
        for e in all {
            if count < SHOWN {
                entries.push(e);
            }
            count += 1;
        }
        Summary {
            count,
            entries,
            truncated: count > SHOWN,
        }
    }
}

/// One `PORTS` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortEntry {
    /// The port (the array index).
    pub port: u16,
    /// Names of the [`port_flags`] bits set.
    pub flags: Vec<&'static str>,
}

/// One program and where it would be attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attachment {
    /// The hook (`cgroup/connect4`, `sk_lookup`...).
    pub hook: &'static str,
    /// The program's name in the eBPF object.
    pub program: &'static str,
    /// `cgroup` or `netns`.
    pub target_kind: &'static str,
    /// The cgroup directory or the namespace file.
    pub target: String,
}

/// The `CONFIGS` entry that would be written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigPlan {
    /// Outbound capture port.
    pub proxy_port: u16,
    /// Inbound capture port.
    pub inbound_port: u16,
    /// Tunnel port.
    pub tunnel_port: u16,
    /// Names of the [`config_flags`] bits set.
    pub flags: Vec<&'static str>,
    /// First proxy UID (only meaningful with `has_uids`).
    pub first_uid: u32,
    /// First proxy GID (only meaningful with `has_gids`).
    pub first_gid: u32,
    /// IPv4 source bound on redirected sockets, if the namespace has one.
    pub source_v4: Option<String>,
    /// IPv6 source bound on redirected IPv6 sockets, if the namespace has one.
    pub source_v6: Option<String>,
    /// The namespace's cookie.
    pub netns_cookie: u64,
    /// The proxy's socket mark (only meaningful with `has_mark`).
    pub proxy_mark: u32,
    /// The proxy's cgroup id (only meaningful with `has_cgroup`).
    pub proxy_cgroup_id: u64,
    /// Its depth below the cgroup v2 root.
    pub proxy_cgroup_level: u32,
}

/// The pin dir, as inspected (never created, never mounted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PinDirPlan {
    /// The pin dir.
    pub path: String,
    /// Whether it is on bpffs now, or what apply would do about it.
    pub bpffs: String,
    /// Generations applied there now.
    pub existing: Vec<u64>,
    /// Those of them an interrupted apply left incomplete.
    pub incomplete: Vec<u64>,
    /// The generation apply would create.
    pub next_generation: u64,
}

/// What the policy maps would hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapsPlan {
    /// `CONFIGS[netns cookie]`.
    #[serde(rename = "CONFIGS")]
    pub config: ConfigPlan,
    /// `PORTS`: the ports with a flag set (every other port stays 0).
    #[serde(rename = "PORTS")]
    pub ports: Summary<PortEntry>,
    /// `PROXY_UIDS`.
    #[serde(rename = "PROXY_UIDS")]
    pub proxy_uids: Summary<u32>,
    /// `PROXY_GIDS`.
    #[serde(rename = "PROXY_GIDS")]
    pub proxy_gids: Summary<u32>,
    /// `OWNER_GROUPS`: the owner-group filter's GIDs.
    #[serde(rename = "OWNER_GROUPS")]
    pub owner_groups: Summary<u32>,
    /// `SERVICES`: explicitly listed `ip:port`s.
    #[serde(rename = "SERVICES")]
    pub services: Summary<String>,
    /// `EXCLUDE_V4` trie entries.
    #[serde(rename = "EXCLUDE_V4")]
    pub exclude_v4: Summary<String>,
    /// `INCLUDE_V4` trie entries (none with `-i '*'`: a flag says it).
    #[serde(rename = "INCLUDE_V4")]
    pub include_v4: Summary<String>,
    /// `LOCAL_V4`: the namespace's IPv4 addresses.
    #[serde(rename = "LOCAL_V4")]
    pub local_v4: Summary<String>,
    /// `EXCLUDE_V6` trie entries.
    #[serde(rename = "EXCLUDE_V6")]
    pub exclude_v6: Summary<String>,
    /// `INCLUDE_V6` trie entries.
    #[serde(rename = "INCLUDE_V6")]
    pub include_v6: Summary<String>,
    /// `LOCAL_V6`: the namespace's IPv6 addresses.
    #[serde(rename = "LOCAL_V6")]
    pub local_v6: Summary<String>,
    /// `POD_ADDRS`: the addresses `sk_lookup` finds the pod by.
    #[serde(rename = "POD_ADDRS")]
    pub pod_addrs: Summary<String>,
    /// `EXCLUDED_IFACES`: the ifindexes of the interfaces `-c` excludes.
    #[serde(rename = "EXCLUDED_IFACES")]
    pub excluded_ifaces: Summary<u32>,
    /// `ROUTES_V4` and `ROUTES_V6`: the routes through an excluded
    /// interface.
    #[serde(rename = "ROUTES_EXCLUDED")]
    pub routes_excluded: Summary<String>,
    /// ... and the others (they outrank a shorter excluded one).
    #[serde(rename = "ROUTES_OTHER")]
    pub routes_other: Summary<String>,
}

/// Everything `apply` would do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The cgroup directory (checked).
    pub cgroup: String,
    /// The network namespace (checked and probed), or the loader's own.
    pub netns: String,
    /// The pin dir.
    pub pin_dir: PinDirPlan,
    /// Programs in attach order.
    pub attach: Vec<Attachment>,
    /// The policy maps.
    pub maps: MapsPlan,
}

const CONFIG_FLAGS: [(u16, &str); 14] = [
    (config_flags::HAS_UIDS, "has_uids"),
    (config_flags::HAS_GIDS, "has_gids"),
    (config_flags::INCLUDE_ALL, "include_all"),
    (config_flags::HAS_INCLUDE_CIDRS, "has_include_cidrs"),
    (config_flags::HAS_EXCLUDE_CIDRS, "has_exclude_cidrs"),
    (config_flags::INBOUND_ALL, "inbound_all"),
    (config_flags::INBOUND_LIST, "inbound_list"),
    (config_flags::HAS_SERVICES, "has_services"),
    (config_flags::OWNER_GROUPS_INCLUDE, "owner_groups_include"),
    (config_flags::OWNER_GROUPS_EXCLUDE, "owner_groups_exclude"),
    (config_flags::LOOPBACK_INCLUDE, "loopback_include"),
    (config_flags::HAS_MARK, "has_mark"),
    (config_flags::HAS_CGROUP, "has_cgroup"),
    (config_flags::OWNER_FROM_FILE, "owner_from_file"),
];

const PORT_FLAGS: [(u8, &str); 4] = [
    (port_flags::OUT_EXCLUDE, "out_exclude"),
    (port_flags::OUT_INCLUDE, "out_include"),
    (port_flags::IN_EXCLUDE, "in_exclude"),
    (port_flags::IN_INCLUDE, "in_include"),
];

/// Names of the [`config_flags`] bits set in `flags`.
pub fn config_flag_names(flags: u16) -> Vec<&'static str> {
    CONFIG_FLAGS
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// Names of the [`port_flags`] bits set in `flags`.
pub fn port_flag_names(flags: u8) -> Vec<&'static str> {
    PORT_FLAGS
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// What apply would find about bpffs for `pin_dir`, without mounting.
fn bpffs_state(pin_dir: &Path) -> String {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return "on bpffs".to_string();
    }
    let default = Path::new(DEFAULT_BPFFS);
    if pin_dir.starts_with(default) && default.is_dir() && !is_bpffs(default) {
        return format!("not on bpffs yet: apply would mount bpffs at {DEFAULT_BPFFS}");
    }
    "not on bpffs: apply would refuse this pin dir".to_string()
}

/// The map contents for `spec` in a namespace with these facts.
pub fn maps_plan(spec: &PolicySpec, facts: &crate::policy::NetnsFacts) -> MapsPlan {
    let mut e = PolicyEntries::new(spec, facts, 0);
    e.config = crate::btf::with_owner_path(e.config);
    maps_plan_of(&e, facts)
}

/// The map contents of `e` (made for a namespace with these facts).
pub fn maps_plan_of(e: &PolicyEntries, facts: &crate::policy::NetnsFacts) -> MapsPlan {
    let cfg: &Config = &e.config;
    let cidrs = |list: &[(std::net::Ipv4Addr, u8)]| {
        Summary::new(list.iter().map(|(a, p)| format!("{a}/{p}")))
    };
    let cidrs6 = |list: &[(std::net::Ipv6Addr, u8)]| {
        Summary::new(list.iter().map(|(a, p)| format!("{a}/{p}")))
    };
    let services = e.services.iter().map(|k| {
        let ip = if k.family == redirect_common::AF_INET {
            std::net::IpAddr::from(k.ip[0].to_ne_bytes())
        } else {
            std::net::IpAddr::from(redirect_common::ip6_bytes(k.ip))
        };
        std::net::SocketAddr::new(ip, k.port).to_string()
    });
    MapsPlan {
        config: ConfigPlan {
            proxy_port: cfg.proxy_port,
            inbound_port: cfg.inbound_port,
            tunnel_port: cfg.tunnel_port,
            flags: config_flag_names(cfg.flags),
            first_uid: cfg.first_uid,
            first_gid: cfg.first_gid,
            source_v4: facts.source_v4.map(|a| a.to_string()),
            source_v6: facts.source_v6.map(|a| a.to_string()),
            netns_cookie: cfg.netns_cookie,
            proxy_mark: cfg.proxy_mark,
            proxy_cgroup_id: cfg.proxy_cgroup_id,
            proxy_cgroup_level: cfg.proxy_cgroup_level,
        },
        ports: Summary::new(e.ports.iter().map(|(port, f)| PortEntry {
            port: *port,
            flags: port_flag_names(*f),
        })),
        proxy_uids: Summary::new(e.proxy_uids.iter().copied()),
        proxy_gids: Summary::new(e.proxy_gids.iter().copied()),
        owner_groups: Summary::new(e.owner_groups.iter().copied()),
        services: Summary::new(services),
        exclude_v4: cidrs(&e.exclude_v4),
        include_v4: cidrs(&e.include_v4),
        local_v4: Summary::new(e.local_v4.iter().map(ToString::to_string)),
        exclude_v6: cidrs6(&e.exclude_v6),
        include_v6: cidrs6(&e.include_v6),
        local_v6: Summary::new(e.local_v6.iter().map(ToString::to_string)),
        pod_addrs: Summary::new(e.pod_addrs().map(|a| a.to_string())),
        excluded_ifaces: Summary::new(e.excluded_ifaces.iter().copied()),
        routes_excluded: Summary::new(e.routes_through(true)),
        routes_other: Summary::new(e.routes_through(false)),
    }
}

/// Checks `req` as `apply` does and returns what apply would do. Touches
/// neither bpffs nor the kernel's BPF state.
pub fn plan(req: &ApplyRequest) -> Result<Plan> {
    if !req.allow_no_proxy_exemption {
        req.policy.check_proxy_exemption()?;
    }
    check_cgroup(&req.cgroup)?;
    let facts = netns::probe(req.netns.as_deref())?;
    // -c on a kernel whose sk_lookup cannot tell the interface.
    crate::btf::with_ifindex_offset(req.policy.config(&facts))?;
    crate::policy::warn_absent_interfaces(&req.policy, &facts);
    refuse_bpffs_root(&req.pin_dir)?;
    let cgroup = File::open(&req.cgroup)
        .with_context(|| format!("--cgroup {}: cannot open", req.cgroup.display()))?;
    let netns_path: PathBuf = req
        .netns
        .clone()
        .unwrap_or_else(|| PathBuf::from("/proc/self/ns/net"));
    let netns_file = netns::open_netns(&netns_path)?;
    for v4 in [true, false] {
        let count = facts
            .local_addrs
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .count();
        if count > SET_CAPACITY as usize {
            bail!(
                "the network namespace owns {count} IPv{} addresses, more than the \
                 {SET_CAPACITY} redirect tracks",
                if v4 { 4 } else { 6 }
            );
        }
    }

    let layout = Layout::new(&req.pin_dir);
    if is_bpffs(layout.root()) {
        let pod = PodRecord::of(
            &req.cgroup,
            &cgroup,
            req.netns.as_deref(),
            &netns_file,
            facts.netns_cookie,
        )?;
        check_pod(&layout, &pod)?;
    }
    let existing = layout.generations()?;
    let incomplete = layout.incomplete()?;
    let next_generation = existing.last().map_or(1, |g| g + 1);

    let netns_label = match &req.netns {
        Some(p) => p.display().to_string(),
        None => "/proc/self/ns/net (the loader's own)".to_string(),
    };
    let cgroup = req.cgroup.display().to_string();
    let attach = PROGRAMS
        .iter()
        .map(|(program, attach, _)| {
            let (target_kind, target) = if attach.on_netns() {
                ("netns", netns_label.clone())
            } else {
                ("cgroup", cgroup.clone())
            };
            Attachment {
                hook: attach.hook(),
                program,
                target_kind,
                target,
            }
        })
        .collect();

    Ok(Plan {
        cgroup,
        netns: netns_label,
        pin_dir: PinDirPlan {
            path: req.pin_dir.display().to_string(),
            bpffs: bpffs_state(&req.pin_dir),
            existing,
            incomplete,
            next_generation,
        },
        attach,
        maps: maps_plan(&req.policy, &facts),
    })
}

fn write_summary<T: fmt::Display>(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    s: &Summary<T>,
    note: &str,
) -> fmt::Result {
    let noun = if s.count == 1 { "entry" } else { "entries" };
    write!(f, "  {name:<11} {} {noun}{note}", s.count)?;
    if s.count == 0 {
        return writeln!(f);
    }
    if !s.truncated {
        let all: Vec<String> = s.entries.iter().map(ToString::to_string).collect();
        return writeln!(f, ": {}", all.join(", "));
    }
    writeln!(f, ", the first {}:", s.entries.len())?;
    for e in &s.entries {
        writeln!(f, "  {:<11} {e}", "")?;
    }
    writeln!(f, "  {:<11} ... and {} more", "", s.count - s.entries.len())
}

impl fmt::Display for PortEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.port, self.flags.join("+"))
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dry run: inputs checked; nothing loaded, attached, pinned or mounted"
        )?;
        writeln!(f, "cgroup      {}", self.cgroup)?;
        writeln!(f, "netns       {}", self.netns)?;
        let p = &self.pin_dir;
        writeln!(f, "pin dir     {} ({})", p.path, p.bpffs)?;
        if p.existing.is_empty() {
            writeln!(
                f,
                "generation  {} (nothing applied there yet)",
                p.next_generation
            )?;
        } else {
            let old: Vec<String> = p.existing.iter().map(ToString::to_string).collect();
            let incomplete: Vec<String> = p.incomplete.iter().map(ToString::to_string).collect();
            writeln!(
                f,
                "generation  {}, replacing {}{}",
                p.next_generation,
                old.join(","),
                if incomplete.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({} left incomplete by an interrupted apply)",
                        incomplete.join(",")
                    )
                }
            )?;
        }
        writeln!(f, "attach, in this order")?;
        for a in &self.attach {
            writeln!(f, "  {:<20} -> {} {}", a.hook, a.target_kind, a.target)?;
        }
        writeln!(f, "maps")?;
        write!(f, "{}", self.maps)
    }
}

impl fmt::Display for MapsPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self;
        let c = &m.config;
        writeln!(
            f,
            "  {:<11} proxy_port {} inbound_port {} tunnel_port {}",
            map_names::CONFIGS,
            c.proxy_port,
            c.inbound_port,
            c.tunnel_port
        )?;
        writeln!(
            f,
            "  {:<11} flags {}",
            "",
            if c.flags.is_empty() {
                "-".to_string()
            } else {
                c.flags.join(",")
            }
        )?;
        writeln!(
            f,
            "  {:<11} first_uid {} first_gid {} netns_cookie {}",
            "", c.first_uid, c.first_gid, c.netns_cookie
        )?;
        if c.flags.contains(&"has_mark") {
            writeln!(f, "  {:<11} proxy_mark {:#x}", "", c.proxy_mark)?;
        }
        if c.flags.contains(&"has_cgroup") {
            writeln!(
                f,
                "  {:<11} proxy_cgroup_id {} proxy_cgroup_level {}",
                "", c.proxy_cgroup_id, c.proxy_cgroup_level
            )?;
        }
        writeln!(
            f,
            "  {:<11} source_v4 {} source_v6 {}",
            "",
            c.source_v4.as_deref().unwrap_or("-"),
            c.source_v6.as_deref().unwrap_or("-"),
        )?;
        write_summary(f, map_names::PORTS, &m.ports, "")?;
        write_summary(f, map_names::PROXY_UIDS, &m.proxy_uids, "")?;
        write_summary(f, map_names::PROXY_GIDS, &m.proxy_gids, "")?;
        let groups_note = if c.flags.contains(&"owner_groups_include") {
            " (only these are captured)"
        } else if c.flags.contains(&"owner_groups_exclude") {
            " (these are not captured)"
        } else {
            ""
        };
        write_summary(f, map_names::OWNER_GROUPS, &m.owner_groups, groups_note)?;
        write_summary(f, map_names::SERVICES, &m.services, "")?;
        write_summary(f, map_names::EXCLUDE_V4, &m.exclude_v4, "")?;
        let include_note = if c.flags.contains(&"include_all") {
            " (include_all is set)"
        } else {
            ""
        };
        write_summary(f, map_names::INCLUDE_V4, &m.include_v4, include_note)?;
        write_summary(f, map_names::LOCAL_V4, &m.local_v4, "")?;
        write_summary(f, map_names::EXCLUDE_V6, &m.exclude_v6, "")?;
        write_summary(f, map_names::INCLUDE_V6, &m.include_v6, include_note)?;
        write_summary(f, map_names::LOCAL_V6, &m.local_v6, "")?;
        write_summary(f, map_names::POD_ADDRS, &m.pod_addrs, "")?;
        write_summary(f, map_names::EXCLUDED_IFACES, &m.excluded_ifaces, "")?;
        write_summary(
            f,
            "ROUTES_V4/_V6",
            &m.routes_excluded,
            " (through an excluded interface)",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{InboundPorts, NetnsFacts, parse_cidrs};

    #[test]
    fn maps_for_a_policy() {
        let spec = PolicySpec {
            exclude_ports: vec![22],
            include_ports: vec![22, 8080],
            inbound_ports: InboundPorts::All,
            exclude_inbound_ports: vec![15090],
            exclude_cidrs: parse_cidrs("-x", "10.0.0.0/8,fd00::/8").unwrap(),
            ..PolicySpec::default()
        };
        let facts = NetnsFacts {
            local_addrs: vec!["10.1.0.2".parse().unwrap(), "fe80::1".parse().unwrap()],
            source_v4: Some("10.1.0.2".parse().unwrap()),
            netns_cookie: 7,
            ..NetnsFacts::default()
        };
        let m = maps_plan(&spec, &facts);
        // owner_from_file: this kernel has BTF, as apply would find.
        assert_eq!(
            m.config.flags,
            [
                "has_uids",
                "has_gids",
                "has_exclude_cidrs",
                "inbound_all",
                "owner_from_file"
            ]
        );
        assert_eq!(m.config.source_v4.as_deref(), Some("10.1.0.2"));
        assert_eq!(m.config.netns_cookie, 7);
        assert_eq!(
            m.ports.entries,
            [
                PortEntry {
                    port: 22,
                    flags: vec!["out_exclude", "out_include"]
                },
                PortEntry {
                    port: 8080,
                    flags: vec!["out_include"]
                },
                PortEntry {
                    port: 15090,
                    flags: vec!["in_exclude"]
                },
            ]
        );
        assert_eq!(m.exclude_v4.entries, ["10.0.0.0/8"]);
        assert_eq!(m.exclude_v6.entries, ["fd00::/8"]);
        assert_eq!(m.include_v4.count, 0);
        assert_eq!(m.include_v6.count, 0);
        assert_eq!(m.local_v4.entries, ["10.1.0.2"]);
        assert_eq!(m.local_v6.entries, ["fe80::1"]);
        assert_eq!(m.proxy_uids.entries, [1337]);
    }

    #[test]
    fn long_lists_are_summarised() {
        let s = Summary::new(0..25u32);
        assert_eq!((s.count, s.entries.len(), s.truncated), (25, SHOWN, true));
        let s = Summary::new(0..3u32);
        assert_eq!((s.count, s.entries.len(), s.truncated), (3, 3, false));
    }

    #[test]
    fn flag_names() {
        assert_eq!(config_flag_names(0), Vec::<&str>::new());
        assert_eq!(
            config_flag_names(config_flags::INCLUDE_ALL | config_flags::INBOUND_LIST),
            ["include_all", "inbound_list"]
        );
        assert_eq!(
            port_flag_names(port_flags::IN_INCLUDE | port_flags::OUT_EXCLUDE),
            ["out_exclude", "in_include"]
        );
    }
}

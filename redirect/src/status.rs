//! `status`: what is attached at a pin dir, the policy in force (read back
//! from the pinned maps, not from any cached copy) and the counters.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsFd,
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, PerCpuArray};
use redirect_common::{Counter, Rule, config_flags, ip6_bytes, map_names, port_flags};
use serde::Serialize;

use crate::{
    apply::{Layout, PROGRAMS, open_pinned},
    entries::{PolicyEntries, PolicyMaps},
    pod_record::PodRecord,
    sys,
};

/// One attached program.
#[derive(Clone, Debug, Serialize)]
pub struct LinkStatus {
    /// Hook name.
    pub hook: &'static str,
    /// Kernel link id.
    pub link_id: u32,
    /// Kernel program id.
    pub prog_id: u32,
    /// What it is attached to: `cgroup <id>` or `netns <inode>`.
    pub target: String,
}

/// The policy as the kernel holds it.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyStatus {
    /// Outbound capture port.
    pub proxy_port: u16,
    /// Inbound capture port.
    pub inbound_port: u16,
    /// Tunnel port.
    pub tunnel_port: u16,
    /// Proxy UIDs (first one first).
    pub proxy_uids: Vec<u32>,
    /// Proxy GIDs (first one first).
    pub proxy_gids: Vec<u32>,
    /// `*` or the include CIDRs.
    pub include_cidrs: Vec<String>,
    /// Exclude CIDRs.
    pub exclude_cidrs: Vec<String>,
    /// Include ports.
    pub include_ports: Vec<u16>,
    /// Exclude ports.
    pub exclude_ports: Vec<u16>,
    /// `*` or the captured inbound ports.
    pub inbound_ports: Vec<String>,
    /// Inbound ports excluded under `*`.
    pub exclude_inbound_ports: Vec<u16>,
    /// Sockets with this mark are the proxy's.
    pub proxy_mark: Option<u32>,
    /// Tasks in this cgroup (id) or below are the proxy's.
    pub proxy_cgroup_id: Option<u64>,
    /// Owner-group filter: only these GIDs are captured.
    pub owner_groups_include: Vec<u32>,
    /// Owner-group filter: these GIDs are not captured.
    pub owner_groups_exclude: Vec<u32>,
    /// Explicit services (`ip:port`).
    pub services: Vec<String>,
    /// DNS capture (rule 5): `None` if off.
    pub dns: Option<DnsStatus>,
    /// `-c`: the ifindexes of the excluded interfaces (in the pod's
    /// namespace, when the policy was applied).
    pub exclude_ifindexes: Vec<u32>,
    /// `-c`: the pod's routes through an excluded interface.
    pub exclude_routes: Vec<String>,
    /// `-c`: its other routes (they outrank a shorter excluded one).
    pub other_routes: Vec<String>,
    /// Addresses the pod's namespace owns.
    pub local_addrs: Vec<String>,
    /// Source address bound on redirected sockets.
    pub source_v4: Option<String>,
}

/// DNS capture as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct DnsStatus {
    /// Where queries go (15053).
    pub port: u16,
    /// Queries to any address are captured (`--capture-all-dns`).
    pub capture_all: bool,
    /// The nameservers whose queries are captured.
    pub servers: Vec<String>,
}

/// What `status` says of a generation that was started and not completed.
pub const INCOMPLETE_INTERRUPTED: &str =
    "incomplete (apply interrupted): run apply again or remove";
/// ... of one being built while `status` looks.
pub const INCOMPLETE_RUNNING: &str = "incomplete (an apply or remove is running on this pin dir)";

/// A generation without its completion marker.
#[derive(Clone, Debug, Serialize)]
pub struct IncompleteGeneration {
    /// Its number.
    pub generation: u64,
    /// [`INCOMPLETE_INTERRUPTED`] or [`INCOMPLETE_RUNNING`].
    pub state: &'static str,
    /// Hooks its pinned links attach (they are in force).
    pub attached: Vec<&'static str>,
    /// Hooks it has no link for.
    pub missing: Vec<&'static str>,
}

/// Everything `status` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The pin dir.
    pub pin_dir: String,
    /// The pod it belongs to, if recorded (pin dirs of older versions have
    /// no record).
    pub pod: Option<PodRecord>,
    /// The generation shown: the newest complete one or, when none is
    /// complete, the newest incomplete one.
    pub generation: u64,
    /// Whether that generation is complete.
    pub complete: bool,
    /// Every generation present that is not complete, oldest first.
    pub incomplete: Vec<IncompleteGeneration>,
    /// Attached programs of the generation shown.
    pub links: Vec<LinkStatus>,
    /// The policy of the generation shown; `None` only for an incomplete
    /// generation interrupted before its policy maps were pinned.
    pub policy: Option<PolicyStatus>,
    /// Decisions by rule (`redirected` and `passed` split).
    pub decisions: BTreeMap<String, u64>,
    /// Other counters.
    pub counters: BTreeMap<String, u64>,
    /// Captured outbound connections open now, and the capacity.
    pub connections: Option<Connections>,
}

/// The connection state's occupancy.
#[derive(Clone, Debug, Serialize)]
pub struct Connections {
    /// Entries in `CONNS`: captured connections whose application socket is
    /// open (or whose proxy side is still due).
    pub open: u64,
    /// `--max-connections`.
    pub capacity: u32,
}

/// Reads the occupancy of the state maps in `state`, if they exist.
pub fn connections(state: &Path) -> Result<Option<Connections>> {
    let path = state.join(map_names::CONNS);
    if !path.exists() {
        return Ok(None);
    }
    let capacity = aya::maps::MapInfo::from_pin(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .max_entries();
    let conns = HashMap::<_, u64, redirect_common::Conn>::try_from(open_pinned(&path)?)?;
    Ok(Some(Connections {
        open: conns.keys().count() as u64,
        capacity,
    }))
}

/// The counters in the state maps at `state`, summed over CPUs: decisions
/// by rule, and the others.
pub fn counters(state: &Path) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>)> {
    let path = state.join(map_names::COUNTERS);
    let map = PerCpuArray::<_, u64>::try_from(open_pinned(&path)?)?;
    let read = |i: u32| -> Result<u64> {
        Ok(map
            .get(&i, 0)
            .with_context(|| format!("reading counter {i}"))?
            .iter()
            .sum())
    };
    let (mut decisions, mut counters) = (BTreeMap::new(), BTreeMap::new());
    for rule in Rule::ALL {
        decisions.insert(rule.name().to_string(), read(rule as u32)?);
    }
    for c in Counter::ALL {
        counters.insert(c.name().to_string(), read(c as u32)?);
    }
    Ok((decisions, counters))
}

/// The pinned links of the generation in `dir`: those present, and the
/// hooks with none.
fn links(dir: &Path) -> Result<(Vec<LinkStatus>, Vec<&'static str>)> {
    let (mut links, mut missing) = (Vec::new(), Vec::new());
    for (_, attach, short) in PROGRAMS {
        let path = dir.join(format!("link_{short}"));
        if !path.exists() {
            missing.push(attach.hook());
            continue;
        }
        let fd = sys::obj_get(&path, 0)
            .with_context(|| format!("opening pinned link {}", path.display()))?;
        let info = sys::link_info(fd.as_fd())
            .with_context(|| format!("reading link {}", path.display()))?;
        links.push(LinkStatus {
            hook: attach.hook(),
            link_id: info.id,
            prog_id: info.prog_id,
            target: info.target.to_string(),
        });
    }
    Ok((links, missing))
}

/// Reads the status of what is applied at `pin_dir`.
pub fn status(pin_dir: &Path) -> Result<Status> {
    let layout = Layout::new(pin_dir);
    let all = layout.generations()?;
    if all.is_empty() {
        bail!("--pin-dir {}: nothing applied there", pin_dir.display());
    }
    let pod = PodRecord::read(pin_dir)?;
    let busy = crate::lock::is_busy(pin_dir);
    let mut incomplete = Vec::new();
    for g in layout.incomplete()? {
        let (attached, missing) = links(&layout.gen_dir(g))?;
        incomplete.push(IncompleteGeneration {
            generation: g,
            state: if busy {
                INCOMPLETE_RUNNING
            } else {
                INCOMPLETE_INTERRUPTED
            },
            attached: attached.iter().map(|l| l.hook).collect(),
            missing,
        });
    }
    let (generation, complete) = match layout.current()? {
        Some(g) => (g, true),
        None => (*all.last().expect("not empty"), false),
    };
    let dir = layout.gen_dir(generation);
    let (links, missing) = links(&dir)?;
    if complete && !missing.is_empty() {
        bail!(
            "{}: complete, yet it has no link for {} (removed by hand?): run apply again",
            dir.display(),
            missing.join(", ")
        );
    }
    let policy = match read_policy(&dir) {
        Ok(p) => Some(p),
        Err(_) if !complete => None,
        Err(e) => return Err(e),
    };

    let (mut decisions, mut counters) = (BTreeMap::new(), BTreeMap::new());
    let counters_path = layout.state_dir().join(map_names::COUNTERS);
    if complete || counters_path.exists() {
        let counters_map = PerCpuArray::<_, u64>::try_from(open_pinned(&counters_path)?)?;
        let read = |i: u32| -> Result<u64> {
            Ok(counters_map
                .get(&i, 0)
                .with_context(|| format!("reading counter {i}"))?
                .iter()
                .sum())
        };
        for rule in Rule::ALL {
            decisions.insert(rule.name().to_string(), read(rule as u32)?);
        }
        for c in Counter::ALL {
            counters.insert(c.name().to_string(), read(c as u32)?);
        }
    }
    Ok(Status {
        pin_dir: pin_dir.display().to_string(),
        pod,
        generation,
        complete,
        incomplete,
        links,
        policy,
        decisions,
        counters,
        connections: connections(&layout.state_dir())?,
    })
}

fn read_policy(dir: &Path) -> Result<PolicyStatus> {
    let mut maps = PolicyMaps::open(dir)?;
    let configs = maps.configs()?;
    let [(netns, _)] = configs.as_slice() else {
        bail!(
            "{}: CONFIGS holds {} pods, a one-shot apply holds one",
            dir.display(),
            configs.len()
        );
    };
    let entries = PolicyEntries::read(&mut maps, *netns)?
        .with_context(|| format!("{}: the pod's policy vanished", dir.display()))?;
    Ok(PolicyStatus::of(&entries))
}

impl PolicyStatus {
    /// What a pod's policy entries say, as `status` shows it.
    pub fn of(e: &PolicyEntries) -> PolicyStatus {
        let cfg = &e.config;
        let (mut include_ports, mut exclude_ports) = (Vec::new(), Vec::new());
        let (mut inbound_ports, mut exclude_inbound_ports) = (Vec::new(), Vec::new());
        if cfg.has(config_flags::INBOUND_ALL) {
            inbound_ports.push("*".to_string());
        }
        for (port, flags) in &e.ports {
            if flags & port_flags::IN_INCLUDE != 0 {
                inbound_ports.push(port.to_string());
            }
            if flags & port_flags::IN_EXCLUDE != 0 {
                exclude_inbound_ports.push(*port);
            }
            if flags & port_flags::OUT_INCLUDE != 0 {
                include_ports.push(*port);
            }
            if flags & port_flags::OUT_EXCLUDE != 0 {
                exclude_ports.push(*port);
            }
        }
        let cidrs = |v4: &[(Ipv4Addr, u8)], v6: &[(std::net::Ipv6Addr, u8)]| -> Vec<String> {
            let mut out: Vec<(IpAddr, u8)> = v4
                .iter()
                .map(|(a, p)| (IpAddr::V4(*a), *p))
                .chain(v6.iter().map(|(a, p)| (IpAddr::V6(*a), *p)))
                .collect();
            out.sort();
            out.into_iter().map(|(a, p)| format!("{a}/{p}")).collect()
        };
        let include_cidrs = if cfg.has(config_flags::INCLUDE_ALL) {
            vec!["*".to_string()]
        } else {
            cidrs(&e.include_v4, &e.include_v6)
        };
        let mut local_addrs: Vec<IpAddr> = e
            .local_v4
            .iter()
            .map(|a| IpAddr::V4(*a))
            .chain(e.local_v6.iter().map(|a| IpAddr::V6(*a)))
            .collect();
        local_addrs.sort();
        let groups = e.owner_groups.clone();
        let (owner_groups_include, owner_groups_exclude) =
            if cfg.has(config_flags::OWNER_GROUPS_INCLUDE) {
                (groups, Vec::new())
            } else if cfg.has(config_flags::OWNER_GROUPS_EXCLUDE) {
                (Vec::new(), groups)
            } else {
                (Vec::new(), Vec::new())
            };
        let socket_addrs = |keys: &[redirect_common::ServiceKey]| {
            let mut out: Vec<std::net::SocketAddr> = keys
                .iter()
                .map(|k| {
                    let ip = if k.family == redirect_common::AF_INET {
                        IpAddr::from(k.ip[0].to_ne_bytes())
                    } else {
                        IpAddr::from(ip6_bytes(k.ip))
                    };
                    std::net::SocketAddr::new(ip, k.port)
                })
                .collect();
            out.sort();
            out
        };
        let services = socket_addrs(&e.services);
        let dns = cfg.has(config_flags::DNS_CAPTURE).then(|| DnsStatus {
            port: cfg.dns_port,
            capture_all: cfg.has(config_flags::DNS_CAPTURE_ALL),
            servers: socket_addrs(&e.dns_servers)
                .iter()
                .map(|a| a.ip().to_string())
                .collect(),
        });
        PolicyStatus {
            exclude_ifindexes: e.excluded_ifaces.clone(),
            exclude_routes: e.routes_through(true),
            other_routes: e.routes_through(false),
            proxy_mark: cfg.has(config_flags::HAS_MARK).then_some(cfg.proxy_mark),
            proxy_cgroup_id: cfg
                .has(config_flags::HAS_CGROUP)
                .then_some(cfg.proxy_cgroup_id),
            owner_groups_include,
            owner_groups_exclude,
            services: services.iter().map(ToString::to_string).collect(),
            dns,
            proxy_port: cfg.proxy_port,
            inbound_port: cfg.inbound_port,
            tunnel_port: cfg.tunnel_port,
            proxy_uids: e.proxy_uids.clone(),
            proxy_gids: e.proxy_gids.clone(),
            include_cidrs,
            exclude_cidrs: cidrs(&e.exclude_v4, &e.exclude_v6),
            include_ports,
            exclude_ports,
            inbound_ports,
            exclude_inbound_ports,
            local_addrs: local_addrs.iter().map(ToString::to_string).collect(),
            source_v4: (cfg.source_v4 != 0)
                .then(|| Ipv4Addr::from(cfg.source_v4.to_ne_bytes()).to_string()),
        }
    }
}

/// `a,b,c`, or `-` for an empty list.
fn joined<T: ToString>(v: &[T]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.complete {
            writeln!(
                f,
                "pin dir     {} (generation {})",
                self.pin_dir, self.generation
            )?;
        } else {
            writeln!(
                f,
                "pin dir     {} (no complete generation; showing generation {})",
                self.pin_dir, self.generation
            )?;
        }
        match &self.pod {
            Some(pod) => writeln!(f, "pod         {pod}")?,
            None => writeln!(f, "pod         not recorded (applied by an older redirect)")?,
        }
        for g in &self.incomplete {
            writeln!(f, "generation  {} {}", g.generation, g.state)?;
            writeln!(
                f,
                "            attached {}; missing {}",
                joined(&g.attached),
                joined(&g.missing)
            )?;
        }
        for l in &self.links {
            writeln!(
                f,
                "attached    {:<20} link {:<5} prog {:<5} {}",
                l.hook, l.link_id, l.prog_id, l.target
            )?;
        }
        let Some(p) = &self.policy else {
            return writeln!(f, "policy      not pinned yet (the apply stopped before)");
        };
        writeln!(
            f,
            "ports       proxy {} inbound {} tunnel {}",
            p.proxy_port, p.inbound_port, p.tunnel_port
        )?;
        writeln!(f, "proxy uids  {}", joined(&p.proxy_uids))?;
        writeln!(f, "proxy gids  {}", joined(&p.proxy_gids))?;
        writeln!(f, "include     {}", joined(&p.include_cidrs))?;
        writeln!(f, "exclude     {} CIDR(s)", p.exclude_cidrs.len())?;
        writeln!(f, "out ports   include {}", joined(&p.include_ports))?;
        writeln!(f, "            exclude {}", joined(&p.exclude_ports))?;
        writeln!(f, "in ports    capture {}", joined(&p.inbound_ports))?;
        writeln!(
            f,
            "            exclude {}",
            joined(&p.exclude_inbound_ports)
        )?;
        if let Some(m) = p.proxy_mark {
            writeln!(f, "proxy mark  {m:#x}")?;
        }
        if let Some(id) = p.proxy_cgroup_id {
            writeln!(f, "proxy cgrp  id {id}")?;
        }
        if !p.owner_groups_include.is_empty() {
            writeln!(f, "owner grps  only {}", joined(&p.owner_groups_include))?;
        }
        if !p.owner_groups_exclude.is_empty() {
            writeln!(f, "owner grps  all but {}", joined(&p.owner_groups_exclude))?;
        }
        writeln!(f, "services    {}", p.services.len())?;
        if let Some(d) = &p.dns {
            let to = if d.capture_all {
                "any address".to_string()
            } else {
                joined(&d.servers)
            };
            writeln!(f, "dns         port 53 of {to} -> {}", d.port)?;
        }
        if !p.exclude_ifindexes.is_empty() || !p.exclude_routes.is_empty() {
            writeln!(
                f,
                "excl ifaces ifindex {}; routes through them {}",
                joined(&p.exclude_ifindexes),
                joined(&p.exclude_routes)
            )?;
        }
        writeln!(
            f,
            "pod addrs   {} (source {})",
            joined(&p.local_addrs),
            p.source_v4.as_deref().unwrap_or("-")
        )?;
        writeln!(f, "decisions")?;
        for rule in Rule::ALL {
            let n = self.decisions.get(rule.name()).copied().unwrap_or(0);
            let what = match rule {
                Rule::ProxyToLocal => "redirected (inbound port)",
                Rule::IncludedPort | Rule::Service | Rule::IncludedCidr | Rule::IncludeAll => {
                    "redirected"
                }
                Rule::InboundAll | Rule::InboundIncludedPort => "redirected (inbound)",
                Rule::Dns => "redirected (DNS port)",
                r if r.is_inbound() => "passed (inbound)",
                _ => "passed",
            };
            writeln!(
                f,
                "  {:<24} {:>10}  rule {:<8} {what}",
                rule.name(),
                n,
                rule.number()
            )?;
        }
        if let Some(c) = &self.connections {
            writeln!(
                f,
                "connections {} open of {} (--max-connections)",
                c.open, c.capacity
            )?;
        }
        writeln!(f, "counters")?;
        for (k, v) in &self.counters {
            writeln!(f, "  {k:<24} {v:>10}")?;
        }
        Ok(())
    }
}

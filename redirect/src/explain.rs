//! `redirect explain`: what redirect does with one TCP connection, and which
//! rule decided.
//!
//! The answer comes from [`UserPolicy::decide`] / [`UserPolicy::decide_inbound`],
//! which run `redirect_common::{decide_outbound, decide_inbound}`: the code
//! the `cgroup/connect4`, `cgroup/connect6` and `sk_lookup` programs run,
//! over the same policy and namespace facts held in ordinary collections
//! instead of BPF maps. Addresses are converted as those programs convert
//! them ([`Addr::from_ip6_words`]): an IPv4-mapped IPv6 address
//! (`::ffff:a.b.c.d`) is decided as IPv4.
//!
//! The policy comes from the policy flags or, with `--pin-dir`, from the maps
//! pinned by an earlier `apply` (read back through [`crate::status`]). The
//! namespace facts (the addresses the pod owns, which decide whether a
//! destination is routed over `lo`) come from `--local-addr`, from probing
//! `--netns`, or from the pinned `LOCAL_V4`/`LOCAL_V6` maps; by default the
//! pod owns no address besides 127.0.0.0/8 and `::1`.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use redirect_common::{Action, Addr, Inbound, Outbound, Rule, ip6_words};
use serde::Serialize;

use crate::{
    cli::{DirectionArg, ExplainArgs},
    policy::{
        Cidr, DnsCapture, NetnsFacts, OwnerGroups, PolicySpec, ProxyCgroup, Route, UserPolicy,
        parse_inbound_ports, parse_include, to_addr,
    },
};

/// Which way the connection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// A `connect()` from inside the pod (`nat OUTPUT`, `cgroup/connect4`).
    Out,
    /// A connection arriving at the pod (`nat PREROUTING`, `sk_lookup`).
    In,
}

/// One connection to explain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Which way.
    pub direction: Direction,
    /// UID of the task calling `connect()` (outbound only).
    pub uid: u32,
    /// Its GID (outbound only).
    pub gid: u32,
    /// Outbound: the socket's bound source, if it was bound before
    /// `connect()`. Inbound: the peer's address.
    pub src: Option<IpAddr>,
    /// The destination address and port asked for.
    pub dst: SocketAddr,
    /// Outbound: the socket's mark (`SO_MARK`), 0 if none.
    pub mark: u32,
    /// Outbound: whether the calling task is in the proxy's cgroup (or
    /// below it), as `bpf_get_current_ancestor_cgroup_id` tells the hook.
    pub in_proxy_cgroup: bool,
    /// Outbound: a UDP datagram (only DNS capture takes UDP), not a TCP
    /// connect.
    pub udp: bool,
    /// Inbound: the ifindex of the interface it arrives on (`-c`), 0 if
    /// not given.
    pub in_ifindex: u32,
}

/// A connection that cannot be explained as given. Names the flag and value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    /// An inbound connection without its peer.
    #[error("--direction in needs --src (the peer's address)")]
    MissingPeer,
    /// A flag that means nothing for inbound connections.
    #[error("{flag} applies to --direction out only (inbound decisions do not look at owners)")]
    OutboundOnly {
        /// The flag.
        flag: &'static str,
    },
}

impl Connection {
    /// Checks the flags of one connection. `uid`/`gid` default to 0 for an
    /// outbound connection and must be absent for an inbound one.
    pub fn new(
        direction: Direction,
        uid: Option<u32>,
        gid: Option<u32>,
        src: Option<IpAddr>,
        dst: SocketAddr,
    ) -> Result<Self, ConnectionError> {
        if direction == Direction::In {
            if uid.is_some() {
                return Err(ConnectionError::OutboundOnly { flag: "--uid" });
            }
            if gid.is_some() {
                return Err(ConnectionError::OutboundOnly { flag: "--gid" });
            }
            if src.is_none() {
                return Err(ConnectionError::MissingPeer);
            }
        }
        Ok(Connection {
            direction,
            uid: uid.unwrap_or(0),
            gid: gid.unwrap_or(0),
            src,
            dst,
            mark: 0,
            in_proxy_cgroup: false,
            udp: false,
            in_ifindex: 0,
        })
    }
}

/// A rule, as `explain` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleView {
    /// Its number in `docs/semantics.md` (`9`, `3b`, `in-2`...).
    pub number: &'static str,
    /// Stable name, as `status` counts it.
    pub name: &'static str,
    /// What the rule is.
    pub description: &'static str,
}

impl From<Rule> for RuleView {
    fn from(r: Rule) -> Self {
        RuleView {
            number: r.number(),
            name: r.name(),
            description: r.describe(),
        }
    }
}

/// The connection, as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConnectionView {
    /// `out` or `in`.
    pub direction: Direction,
    /// Outbound: the calling task's UID.
    pub uid: Option<u32>,
    /// Outbound: its GID.
    pub gid: Option<u32>,
    /// Outbound: the bound source, if any. Inbound: the peer.
    pub src: Option<String>,
    /// The destination asked for.
    pub dst: String,
    /// How the hooks see the destination: `ipv4`, `ipv6`, or `ipv4-mapped`
    /// (an IPv6 socket to `::ffff:a.b.c.d`, decided as IPv4).
    pub family: &'static str,
    /// Outbound: the socket's mark.
    pub mark: Option<u32>,
    /// Outbound: whether the task is in the proxy's cgroup or below.
    pub in_proxy_cgroup: Option<bool>,
    /// Outbound: UDP (a DNS query), not TCP.
    pub udp: Option<bool>,
}

/// What redirect does with a connection, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// Where the policy came from: `flags` or `pin dir ... (generation N)`.
    pub policy: String,
    /// The addresses the pod is taken to own, besides 127.0.0.0/8 and ::1.
    pub local_addrs: Vec<String>,
    /// Where those came from.
    pub local_addrs_from: String,
    /// The connection.
    pub connection: ConnectionView,
    /// `redirect` or `pass`.
    pub action: &'static str,
    /// The port it is redirected to.
    pub port: Option<u16>,
    /// Which port that is: `proxy` (outbound capture) or `inbound`.
    pub port_role: Option<&'static str>,
    /// Outbound: the address the connect hook rewrites the destination to
    /// (`127.0.0.1:P`, `[::1]:P`, or `[::ffff:127.0.0.1]:P` for an
    /// IPv4-mapped destination).
    pub redirect_to: Option<String>,
    /// The rule that decided.
    pub rule: RuleView,
    /// Outbound: whether the destination is routed over `lo` (127.0.0.0/8
    /// or an address the pod owns).
    pub over_lo: Option<bool>,
}

/// An address as the hooks hand it to the decision: IPv6 through
/// [`Addr::from_ip6_words`], so that `::ffff:a.b.c.d` becomes IPv4.
pub fn hook_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(_) => to_addr(ip),
        IpAddr::V6(a) => Addr::from_ip6_words(ip6_words(&a.octets())),
    }
}

/// Decides `conn` under `policy` with the kernel's decision code. `policy_from`
/// and `facts_from` only label the report.
pub fn explain(
    policy: &UserPolicy,
    local_addrs: &[IpAddr],
    conn: &Connection,
    policy_from: &str,
    facts_from: &str,
) -> Explanation {
    let dst = hook_addr(conn.dst.ip());
    let (verdict, over_lo) = match conn.direction {
        Direction::Out => {
            let v = policy.decide(&Outbound {
                udp: conn.udp,
                uid: conn.uid,
                gid: conn.gid,
                mark: conn.mark,
                in_proxy_cgroup: conn.in_proxy_cgroup,
                bound_src: conn.src.map(hook_addr),
                dst,
                dport: conn.dst.port(),
            });
            (v, Some(v.over_lo))
        }
        Direction::In => {
            let src = conn.src.map(hook_addr).unwrap_or(dst);
            let v = policy.decide_inbound(&Inbound {
                src,
                dst,
                dport: conn.dst.port(),
                ifindex: conn.in_ifindex,
            });
            (v, None)
        }
    };
    let (action, port, port_role) = match verdict.action {
        Action::Pass => ("pass", None, None),
        Action::Redirect(p) => {
            let role = if verdict.rule == Rule::ProxyToLocal || verdict.rule.is_inbound() {
                "inbound"
            } else if verdict.rule == Rule::Dns {
                "DNS capture"
            } else {
                "proxy"
            };
            ("redirect", Some(p), Some(role))
        }
    };
    let outbound = conn.direction == Direction::Out;
    let family = match conn.dst.ip() {
        IpAddr::V4(_) => "ipv4",
        IpAddr::V6(_) if matches!(dst, Addr::V4(_)) => "ipv4-mapped",
        IpAddr::V6(_) => "ipv6",
    };
    let redirect_to = port.filter(|_| outbound).map(|p| match family {
        "ipv4" => format!("127.0.0.1:{p}"),
        "ipv4-mapped" => format!("[::ffff:127.0.0.1]:{p}"),
        _ => format!("[::1]:{p}"),
    });
    Explanation {
        policy: policy_from.to_string(),
        local_addrs: local_addrs
            .iter()
            .filter(|a| !a.is_loopback())
            .map(ToString::to_string)
            .collect(),
        local_addrs_from: facts_from.to_string(),
        connection: ConnectionView {
            direction: conn.direction,
            uid: outbound.then_some(conn.uid),
            gid: outbound.then_some(conn.gid),
            src: conn.src.map(|s| s.to_string()),
            dst: conn.dst.to_string(),
            family,
            mark: outbound.then_some(conn.mark),
            in_proxy_cgroup: outbound.then_some(conn.in_proxy_cgroup),
            udp: outbound.then_some(conn.udp),
        },
        action,
        port,
        port_role,
        redirect_to,
        rule: verdict.rule.into(),
        over_lo,
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "policy      {}", self.policy)?;
        let addrs = if self.local_addrs.is_empty() {
            "none besides 127.0.0.0/8 and ::1".to_string()
        } else {
            self.local_addrs.join(",")
        };
        writeln!(f, "pod addrs   {addrs} ({})", self.local_addrs_from)?;
        let c = &self.connection;
        match c.direction {
            Direction::Out => write!(
                f,
                "connection  outbound {}, uid {} gid {}{}{}, {} -> {}",
                if c.udp == Some(true) { "UDP" } else { "TCP" },
                c.uid.unwrap_or(0),
                c.gid.unwrap_or(0),
                match c.mark {
                    Some(m) if m != 0 => format!(" mark {m:#x}"),
                    _ => String::new(),
                },
                if c.in_proxy_cgroup == Some(true) {
                    " (in the proxy's cgroup)"
                } else {
                    ""
                },
                c.src
                    .as_deref()
                    .map_or("source not bound".to_string(), |s| format!("bound to {s}")),
                c.dst
            )?,
            Direction::In => write!(
                f,
                "connection  inbound TCP, from {} -> {}",
                c.src.as_deref().unwrap_or("?"),
                c.dst
            )?,
        }
        if c.family == "ipv4-mapped" {
            write!(f, " (IPv4-mapped: decided as IPv4)")?;
        }
        writeln!(f)?;
        if let Some(lo) = self.over_lo {
            writeln!(
                f,
                "route       {}",
                if lo { "over lo" } else { "not over lo" }
            )?;
        }
        match (self.port, self.port_role, c.direction) {
            (Some(p), role, Direction::Out) => writeln!(
                f,
                "decision    redirect to {} ({} port)",
                self.redirect_to.clone().unwrap_or_else(|| p.to_string()),
                role.unwrap_or("proxy")
            )?,
            (Some(p), _, Direction::In) => writeln!(
                f,
                "decision    redirect to the proxy's listener on port {p} (inbound port)"
            )?,
            (None, _, _) => writeln!(f, "decision    pass")?,
        }
        writeln!(
            f,
            "rule        {} {}: {}",
            self.rule.number, self.rule.name, self.rule.description
        )
    }
}

/// `redirect explain`: checks the flags, gathers the policy and the
/// namespace facts they point to, and decides the connection.
pub fn run(args: &ExplainArgs) -> Result<Explanation> {
    let direction = match args.direction {
        DirectionArg::Out => Direction::Out,
        DirectionArg::In => Direction::In,
    };
    let mut conn = Connection::new(direction, args.uid, args.gid, args.src, args.dst)?;
    if direction == Direction::In {
        if args.mark.is_some() {
            return Err(ConnectionError::OutboundOnly { flag: "--mark" }.into());
        }
        if args.cgroup.is_some() {
            return Err(ConnectionError::OutboundOnly { flag: "--cgroup" }.into());
        }
    }
    if direction == Direction::In && args.udp {
        return Err(ConnectionError::OutboundOnly { flag: "--udp" }.into());
    }
    if direction == Direction::Out && args.in_interface.is_some() {
        bail!("--in-interface applies to --direction in only");
    }
    conn.mark = args.mark.unwrap_or(0);
    conn.udp = args.udp;
    let (spec, pinned_facts, policy_from) = match (&args.pin_dir, &args.netns) {
        (Some(dir), _) => {
            let (spec, facts, generation) = pinned_policy(dir)?;
            let from = format!("pinned at {} (generation {generation})", dir.display());
            (spec, Some(facts), from)
        }
        (None, Some(netns)) if args.registered => {
            let entries = crate::pods::policy_in_force(&args.node_pin_dir, netns)?;
            let status = crate::status::PolicyStatus::of(&entries);
            let (spec, facts) = spec_of(&status, &args.node_pin_dir)?;
            let from = format!(
                "registered for {} in the node install at {}",
                netns.display(),
                args.node_pin_dir.display()
            );
            (spec, Some(facts), from)
        }
        _ => (args.policy.to_spec()?, None, "policy flags".to_string()),
    };
    if let Some(task_cgroup) = &args.cgroup {
        crate::fs::check_cgroup(task_cgroup)?;
        if let Some(proxy) = &spec.proxy_cgroup {
            conn.in_proxy_cgroup = in_cgroup(task_cgroup, proxy.id)
                .with_context(|| format!("--cgroup {}", task_cgroup.display()))?;
        }
    }
    let (facts, facts_from) = if let Some(ns) = &args.netns {
        let mut facts = crate::netns::probe(Some(ns))?;
        // A registered policy's excluded interfaces are known by ifindex
        // and its routes as they were at registration: those, not the
        // namespace's names and routes of now.
        if let Some(pinned) = &pinned_facts {
            facts.interfaces = pinned.interfaces.clone();
            facts.routes = pinned.routes.clone();
        }
        (facts, format!("probed in {}", ns.display()))
    } else if !args.local_addr.is_empty() {
        let facts = NetnsFacts {
            local_addrs: args.local_addr.clone(),
            ..NetnsFacts::default()
        };
        (facts, "--local-addr".to_string())
    } else if let Some(facts) = pinned_facts {
        (
            facts,
            "recorded in the pinned LOCAL_V4/LOCAL_V6 maps".to_string(),
        )
    } else {
        (NetnsFacts::default(), "default".to_string())
    };
    let local_addrs = facts.local_addrs.clone();
    let policy = UserPolicy::new(spec, facts);
    if let Some(name) = &args.in_interface {
        conn.in_ifindex = policy.ifindex_of(name);
        if conn.in_ifindex == 0 {
            bail!(
                "--in-interface {name}: no such interface in {facts_from} (give --netns, or \
                 an ifindex)"
            );
        }
    }
    Ok(explain(
        &policy,
        &local_addrs,
        &conn,
        &policy_from,
        &facts_from,
    ))
}

/// Whether the cgroup v2 directory `dir`, or one of its ancestors, is the
/// cgroup with id (inode number) `id`: what the connect hook's
/// `bpf_get_current_ancestor_cgroup_id` comparison answers for a task there.
pub fn in_cgroup(dir: &Path, id: u64) -> Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let root = crate::fs::cgroup2_mount().context("no cgroup v2 hierarchy is mounted")?;
    let dir = dir.canonicalize()?;
    for d in dir.ancestors().take_while(|d| d.starts_with(&root)) {
        if std::fs::metadata(d)?.ino() == id {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The policy and namespace facts in force at a pin dir, read back from the
/// pinned maps, and the generation they belong to.
pub fn pinned_policy(pin_dir: &Path) -> Result<(PolicySpec, NetnsFacts, u64)> {
    let st = crate::status::status(pin_dir)?;
    let (true, Some(p)) = (st.complete, &st.policy) else {
        bail!(
            "--pin-dir {}: no complete generation there ({})",
            pin_dir.display(),
            crate::status::INCOMPLETE_INTERRUPTED
        );
    };
    let (spec, facts) = spec_of(p, pin_dir)?;
    Ok((spec, facts, st.generation))
}

/// The interface name pinned routes through an excluded interface are
/// given (the pins do not keep names).
const PINNED_EXCLUDED: &str = "(excluded)";

/// The policy and facts a policy as `status` shows it says, read from the
/// maps at `pin_dir`.
fn spec_of(p: &crate::status::PolicyStatus, pin_dir: &Path) -> Result<(PolicySpec, NetnsFacts)> {
    let ctx = || format!("{}: reading the pinned policy", pin_dir.display());
    let include_cidrs = parse_include("pinned INCLUDE_V4", &p.include_cidrs.join(","))
        .map_err(anyhow::Error::from)
        .with_context(ctx)?;
    let exclude_cidrs = p
        .exclude_cidrs
        .iter()
        .map(|c| c.parse::<Cidr>().map_err(|e| anyhow::anyhow!("{c}: {e}")))
        .collect::<Result<Vec<_>>>()
        .with_context(ctx)?;
    let inbound_ports = parse_inbound_ports("pinned PORTS", &p.inbound_ports.join(","))
        .map_err(anyhow::Error::from)
        .with_context(ctx)?;
    let local_addrs = p
        .local_addrs
        .iter()
        .map(|a| a.parse::<IpAddr>().map_err(|e| anyhow::anyhow!("{a}: {e}")))
        .collect::<Result<Vec<_>>>()
        .with_context(ctx)?;
    let services = p
        .services
        .iter()
        .map(|a| {
            a.parse::<SocketAddr>()
                .map_err(|e| anyhow::anyhow!("{a}: {e}"))
        })
        .collect::<Result<Vec<_>>>()
        .with_context(ctx)?;
    let spec = PolicySpec {
        proxy_port: p.proxy_port,
        inbound_port: p.inbound_port,
        tunnel_port: p.tunnel_port,
        proxy_uids: p.proxy_uids.clone(),
        proxy_gids: p.proxy_gids.clone(),
        include_cidrs,
        exclude_cidrs,
        include_ports: p.include_ports.clone(),
        exclude_ports: p.exclude_ports.clone(),
        inbound_ports,
        exclude_inbound_ports: p.exclude_inbound_ports.clone(),
        proxy_mark: p.proxy_mark,
        // The pins hold the cgroup's id only, which is all the decision
        // needs (`in_cgroup` compares ids).
        proxy_cgroup: p.proxy_cgroup_id.map(|id| ProxyCgroup {
            path: Default::default(),
            rel: String::new(),
            id,
            level: 0,
        }),
        owner_groups: match (
            p.owner_groups_include.is_empty(),
            p.owner_groups_exclude.is_empty(),
        ) {
            (false, _) => OwnerGroups::Include(p.owner_groups_include.clone()),
            (true, false) => OwnerGroups::Exclude(p.owner_groups_exclude.clone()),
            (true, true) => OwnerGroups::All,
        },
        services,
        // The pins hold ifindexes, not names: each is named by its number,
        // and the routes by whether they leave through one of them.
        exclude_interfaces: p
            .exclude_ifindexes
            .iter()
            .map(|i| i.to_string())
            .chain((!p.exclude_routes.is_empty()).then(|| PINNED_EXCLUDED.to_string()))
            .collect(),
        dns: p
            .dns
            .as_ref()
            .map(|d| {
                let servers = d
                    .servers
                    .iter()
                    .map(|a| a.parse::<IpAddr>().map_err(|e| anyhow::anyhow!("{a}: {e}")))
                    .collect::<Result<Vec<_>>>()?;
                Ok::<_, anyhow::Error>(DnsCapture {
                    capture_all: d.capture_all,
                    servers,
                })
            })
            .transpose()
            .with_context(ctx)?,
    };
    let routes = p
        .exclude_routes
        .iter()
        .chain(&p.other_routes)
        .map(|c| {
            let dst = c.parse::<Cidr>().map_err(|e| anyhow::anyhow!("{c}: {e}"))?;
            let dev = p
                .exclude_routes
                .contains(c)
                .then(|| PINNED_EXCLUDED.to_string());
            Ok(Route {
                dst,
                dev,
                metric: 0,
            })
        })
        .collect::<Result<Vec<_>>>()
        .with_context(ctx)?;
    let facts = NetnsFacts {
        local_addrs,
        source_v4: p.source_v4.as_deref().and_then(|s| s.parse().ok()),
        interfaces: p
            .exclude_ifindexes
            .iter()
            .map(|i| (i.to_string(), *i))
            .collect(),
        routes,
        ..NetnsFacts::default()
    };
    Ok((spec, facts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::InboundPorts;

    fn spec(include: &str) -> PolicySpec {
        PolicySpec {
            include_cidrs: parse_include("-i", include).unwrap(),
            ..PolicySpec::default()
        }
    }

    fn run(spec: PolicySpec, local: &[&str], conn: Connection) -> Explanation {
        let local: Vec<IpAddr> = local.iter().map(|a| a.parse().unwrap()).collect();
        let policy = UserPolicy::new(
            spec,
            NetnsFacts {
                local_addrs: local.clone(),
                ..NetnsFacts::default()
            },
        );
        explain(&policy, &local, &conn, "flags", "--local-addr")
    }

    fn out(uid: u32, dst: &str) -> Connection {
        Connection::new(
            Direction::Out,
            Some(uid),
            Some(uid),
            None,
            dst.parse().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn include_all_redirects_to_proxy_port() {
        let e = run(spec("*"), &[], out(1000, "10.0.0.1:80"));
        assert_eq!(e.action, "redirect");
        assert_eq!(e.port, Some(15001));
        assert_eq!(e.port_role, Some("proxy"));
        assert_eq!(e.rule.name, "include_all");
        assert_eq!(e.rule.number, "9");
        assert_eq!(e.over_lo, Some(false));
        let text = e.to_string();
        assert!(
            text.contains("redirect to 127.0.0.1:15001 (proxy port)"),
            "{text}"
        );
        assert!(text.contains("rule        9 include_all:"), "{text}");
    }

    #[test]
    fn own_pod_address_is_over_lo() {
        // The app calling its own pod IP: rule 3b passes it.
        let e = run(spec("*"), &["10.1.0.2"], out(1000, "10.1.0.2:8080"));
        assert_eq!(e.action, "pass");
        assert_eq!(e.rule.number, "3b");
        assert_eq!(e.over_lo, Some(true));
        // Without the fact, the same destination is not over lo: captured.
        let e = run(spec("*"), &[], out(1000, "10.1.0.2:8080"));
        assert_eq!(e.rule.name, "include_all");
        // The proxy calling it goes to the inbound port (3a).
        let e = run(spec("*"), &["10.1.0.2"], out(1337, "10.1.0.2:8080"));
        assert_eq!(
            (e.action, e.port, e.port_role),
            ("redirect", Some(15006), Some("inbound"))
        );
        assert_eq!(e.rule.number, "3a");
    }

    #[test]
    fn empty_include_passes() {
        let e = run(PolicySpec::default(), &[], out(1000, "10.0.0.1:80"));
        assert_eq!((e.action, e.rule.name), ("pass", "not_captured"));
        assert!(e.to_string().contains("decision    pass"));
    }

    #[test]
    fn inbound() {
        let s = PolicySpec {
            inbound_ports: InboundPorts::All,
            exclude_inbound_ports: vec![22],
            ..PolicySpec::default()
        };
        let conn = |dst: &str| {
            Connection::new(
                Direction::In,
                None,
                None,
                Some("10.9.0.1".parse().unwrap()),
                dst.parse().unwrap(),
            )
            .unwrap()
        };
        let e = run(s.clone(), &["10.1.0.2"], conn("10.1.0.2:8080"));
        assert_eq!(
            (e.action, e.port, e.rule.name),
            ("redirect", Some(15006), "inbound_all")
        );
        assert_eq!(e.over_lo, None);
        assert_eq!(e.connection.uid, None);
        let e = run(s.clone(), &["10.1.0.2"], conn("10.1.0.2:22"));
        assert_eq!((e.action, e.rule.number), ("pass", "in-2"));
        let e = run(s, &["10.1.0.2"], conn("10.1.0.2:15008"));
        assert_eq!(e.rule.name, "inbound_tunnel");
    }

    #[test]
    fn bad_connections_name_the_flag() {
        let v4: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let e = Connection::new(Direction::In, None, None, None, v4).unwrap_err();
        assert_eq!(e, ConnectionError::MissingPeer);
        let e = Connection::new(Direction::In, Some(1), None, Some(v4.ip()), v4).unwrap_err();
        assert!(e.to_string().contains("--uid"), "{e}");
        // Outbound owners default to 0.
        let c = Connection::new(Direction::Out, None, None, None, v4).unwrap();
        assert_eq!((c.uid, c.gid), (0, 0));
    }

    #[test]
    fn ipv6_and_mapped() {
        let s = PolicySpec {
            include_cidrs: parse_include("-i", "10.0.0.0/8,fd00::/8").unwrap(),
            ..PolicySpec::default()
        };
        let e = run(s.clone(), &[], out(1000, "[fd00::1]:80"));
        assert_eq!((e.action, e.rule.name), ("redirect", "included_cidr"));
        assert_eq!(e.redirect_to.as_deref(), Some("[::1]:15001"));
        assert_eq!(e.connection.family, "ipv6");
        // ::ffff:10.0.0.1 is decided as 10.0.0.1, and sent to 127.0.0.1 in
        // its mapped form.
        let e = run(s.clone(), &[], out(1000, "[::ffff:10.0.0.1]:80"));
        assert_eq!((e.action, e.rule.name), ("redirect", "included_cidr"));
        assert_eq!(e.connection.family, "ipv4-mapped");
        assert_eq!(e.redirect_to.as_deref(), Some("[::ffff:127.0.0.1]:15001"));
        assert!(e.to_string().contains("(IPv4-mapped: decided as IPv4)"));
        let e = run(s.clone(), &[], out(1000, "[::ffff:11.0.0.1]:80"));
        assert_eq!((e.action, e.rule.name), ("pass", "not_captured"));
        // ::1 and the pod's own IPv6 address are over lo.
        let e = run(s.clone(), &["fd00::2"], out(1000, "[fd00::2]:80"));
        assert_eq!((e.rule.number, e.over_lo), ("3b", Some(true)));
        let e = run(s.clone(), &[], out(1000, "[::1]:80"));
        assert_eq!((e.rule.number, e.over_lo), ("3b", Some(true)));
        // The passthrough source ::6 over lo.
        let c = Connection::new(
            Direction::Out,
            Some(1337),
            Some(1337),
            Some("::6".parse().unwrap()),
            "[fd00::2]:80".parse().unwrap(),
        )
        .unwrap();
        let e = run(s, &["fd00::2"], c);
        assert_eq!(e.rule.name, "passthrough_source");
    }
}

//! An independent model of the istio-iptables `nat` rule walk, and property
//! tests that the decision code (`decide_outbound`, `decide_inbound`) agrees
//! with it.
//!
//! The model is written from the rule order in `docs/iptables-rules.md` and
//! istio's own golden rule sets (`tools/istio-iptables/pkg/capture/testdata/
//! *.golden` and `run.go` at istio commit 86c9f01; see the end of
//! `docs/iptables-rules.md`), never from the decision code. For a policy it
//! emits, as data, the rules istio-iptables appends to the `nat` table (same
//! chains, same order, same match fields), and decides a connection by
//! walking them the way netfilter does: rules in order, first match wins;
//! `-j CHAIN` descends into a chain; `RETURN`, or the end of a user chain,
//! goes back to the caller; the end of a built-in chain is its policy
//! (ACCEPT: the connection passes untouched); `REDIRECT` ends the walk.
//!
//! The pod's world is modelled too: its interfaces by name and ifindex
//! (`lo`, `eth0`, a second network's `net1`), and its routes (the `local`
//! table sends 127.0.0.0/8 and the pod's own addresses through `lo`, then
//! the longest matching prefix of its routes decides, `eth0` by default).
//! Every outbound packet carries the interface its route leaves through,
//! every inbound one the interface it arrived on, and the rule matcher
//! compares `-i` / `-o` with those names as netfilter does (`+` at the end
//! of a name matches any name that starts with the rest).
//!
//! What the model leaves out: IPv6, the owner-group filter, virtual
//! interfaces and TPROXY (no rules for them are emitted), the `raw` table's
//! conntrack zones of DNS capture (they decide nothing), destinations the
//! kernel rewrites before netfilter sees them (0.0.0.0), and whatever
//! routes a packet other than its destination does (policy routing rules,
//! a socket bound to a device). It has UDP and DNS capture
//! (`ISTIO_OUTPUT_DNS`, and the owner rules istio changes with it), and
//! excluded interfaces (`-c`: `-A PREROUTING -i X -j RETURN` and `-A
//! OUTPUT -o X -j RETURN`, before anything else).
//!
//! One istio behaviour is easy to miss: when an include-outbound CIDR
//! starts in 127.0.0.0/8 (`HasLoopBackIP`), istio leaves out every
//! `-o lo -m owner ! --uid-owner/--gid-owner X -j RETURN` rule (golden
//! `loopback-outbound-iprange`). The model has it; the tests that depend on
//! it are `loopback_include_cidr_is_captured` and
//! `outbound_decision_agrees_with_iptables_model_loopback_includes`.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use redirect_common::{
    Action, Addr, Config, Inbound, Outbound, PolicyMaps, config_flags, decide_inbound,
    decide_outbound, port_flags,
};

// ---------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------

/// An IPv4 address in host order, the way `Addr::V4` holds it.
const fn ip(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

fn dotted(a: u32) -> String {
    let [a, b, c, d] = a.to_be_bytes();
    format!("{a}.{b}.{c}.{d}")
}

/// istio's `HostIPv4LoopbackCidr` default, `127.0.0.1/32`.
const LOCALHOST: u32 = ip(127, 0, 0, 1);
/// The passthrough source the proxy binds for inbound forwarding.
const PASSTHROUGH: u32 = ip(127, 0, 0, 6);

/// In 127.0.0.0/8 (every such address is local and routed over `lo`).
fn in_loopback_range(a: u32) -> bool {
    a >> 24 == 127
}

/// An IPv4 address that prints dotted.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Ip(u32);

impl fmt::Debug for Ip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&dotted(self.0))
    }
}

/// An IPv4 prefix as iptables prints it (network address masked).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Cidr {
    net: u32,
    len: u8,
}

fn netmask(len: u8) -> u32 {
    match len {
        0 => 0,
        l => u32::MAX << (32 - u32::from(l.min(32))),
    }
}

impl Cidr {
    fn new(addr: u32, len: u8) -> Self {
        let len = len.min(32);
        Cidr {
            net: addr & netmask(len),
            len,
        }
    }

    fn host(addr: u32) -> Self {
        Cidr::new(addr, 32)
    }

    fn contains(self, a: u32) -> bool {
        a & netmask(self.len) == self.net
    }

    /// An address inside the prefix: the network with `bits` in the host part.
    fn pick(self, bits: u32) -> u32 {
        self.net | (bits & !netmask(self.len))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", dotted(self.net), self.len)
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

// ---------------------------------------------------------------------------
// Interfaces
// ---------------------------------------------------------------------------

const LO: &str = "lo";
const ETH0: &str = "eth0";
/// A second network's interface (as Multus names them).
const NET1: &str = "net1";

/// The pod's interfaces, name and ifindex, as `ip link` lists them.
const INTERFACES: [(&str, u32); 3] = [(LO, 1), (ETH0, 2), (NET1, 3)];

/// Names `-c` may list: the pod's interfaces, and two it does not have.
const EXCLUDE_NAMES: [&str; 5] = [LO, ETH0, NET1, "eth1", "not-istio-nic"];

fn ifindex_of(name: &str) -> Option<u32> {
    INTERFACES.iter().find(|(n, _)| *n == name).map(|(_, i)| *i)
}

fn iface_named(ifindex: u32) -> Option<&'static str> {
    INTERFACES
        .iter()
        .find(|(_, i)| *i == ifindex)
        .map(|(n, _)| *n)
}

/// Whether the `-i` / `-o` argument `pattern` names interface `name`: the
/// same name, or, for a pattern ending in `+`, any name starting with what
/// precedes it (iptables makes it a mask over the name, which the
/// kernel's `ip_packet_match` compares).
fn iface_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

// ---------------------------------------------------------------------------
// Rules as data
// ---------------------------------------------------------------------------

const PREROUTING: &str = "PREROUTING";
const OUTPUT: &str = "OUTPUT";
const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
/// istio's `IstioAgentDNSListenerPort`.
const DNS_PORT: u16 = 15053;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Uid(u32),
    Gid(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// `-j RETURN`
    Return,
    /// `-j CHAIN`
    Jump(&'static str),
    /// `-j REDIRECT --to-ports P`
    Redirect(u16),
}

/// One `-A CHAIN ...` rule: the match fields istio-iptables uses in `nat`.
/// Every field left `None`/`false` matches anything.
#[derive(Clone, Debug)]
struct IptRule {
    /// `-i IFACE` (only in PREROUTING)
    in_iface: Option<&'static str>,
    /// `-o IFACE` (only in OUTPUT and its chains)
    out_iface: Option<&'static str>,
    /// `-s CIDR`
    src: Option<Cidr>,
    /// `[!] -d CIDR` (negated, prefix)
    dst: Option<(bool, Cidr)>,
    /// `-p tcp|udp`
    proto: Option<Proto>,
    /// `[!] --dport P` or `-m multiport [!] --dports P,Q` (negated, ports)
    dports: Option<(bool, Vec<u16>)>,
    /// `-m owner [!] --uid-owner U | --gid-owner G` (negated, owner)
    owner: Option<(bool, Owner)>,
    /// `-d` is written after the ports (istio's DNS rules), not before the
    /// protocol. Only the text changes.
    dst_last: bool,
    target: Target,
}

impl IptRule {
    fn to(target: Target) -> Self {
        IptRule {
            in_iface: None,
            out_iface: None,
            src: None,
            dst: None,
            proto: None,
            dports: None,
            owner: None,
            dst_last: false,
            target,
        }
    }
    fn in_iface(mut self, name: &'static str) -> Self {
        self.in_iface = Some(name);
        self
    }
    fn out_iface(mut self, name: &'static str) -> Self {
        self.out_iface = Some(name);
        self
    }
    fn out_lo(self) -> Self {
        self.out_iface(LO)
    }
    fn src(mut self, c: Cidr) -> Self {
        self.src = Some(c);
        self
    }
    fn dst(mut self, c: Cidr) -> Self {
        self.dst = Some((false, c));
        self
    }
    /// `-d CIDR`, written after `--dport`.
    fn dst_last(mut self, c: Cidr) -> Self {
        self.dst = Some((false, c));
        self.dst_last = true;
        self
    }
    fn not_dst(mut self, c: Cidr) -> Self {
        self.dst = Some((true, c));
        self
    }
    fn proto(mut self, p: Proto) -> Self {
        self.proto = Some(p);
        self
    }
    fn tcp(self) -> Self {
        self.proto(Proto::Tcp)
    }
    fn dports(mut self, ports: &[u16]) -> Self {
        self.dports = Some((false, ports.to_vec()));
        self
    }
    fn not_dports(mut self, ports: &[u16]) -> Self {
        self.dports = Some((true, ports.to_vec()));
        self
    }
    fn owner(mut self, o: Owner) -> Self {
        self.owner = Some((false, o));
        self
    }
    fn not_owner(mut self, o: Owner) -> Self {
        self.owner = Some((true, o));
        self
    }

    /// Whether the rule matches the packet (all its matches must hold).
    fn matches(&self, p: &Packet) -> bool {
        if let Some(name) = self.in_iface
            && !p.in_iface.is_some_and(|i| iface_matches(name, i))
        {
            return false;
        }
        if let Some(name) = self.out_iface
            && !p.out_iface.is_some_and(|o| iface_matches(name, o))
        {
            return false;
        }
        if let Some(s) = self.src
            && !s.contains(p.src)
        {
            return false;
        }
        if let Some((negated, d)) = self.dst
            && d.contains(p.dst) == negated
        {
            return false;
        }
        if let Some(proto) = self.proto
            && proto != p.proto
        {
            return false;
        }
        if let Some((negated, ports)) = &self.dports
            && ports.contains(&p.dport) == *negated
        {
            return false;
        }
        if let Some((negated, owner)) = self.owner {
            // xt_owner needs the packet's socket; every packet walked here is
            // a connect()'s SYN, which has one.
            let Some((uid, gid)) = p.owner else {
                return false;
            };
            let is = match owner {
                Owner::Uid(u) => uid == u,
                Owner::Gid(g) => gid == g,
            };
            if is == negated {
                return false;
            }
        }
        true
    }

    /// The rule as `iptables-save` prints it.
    fn render(&self, chain: &str) -> String {
        let bang = |negated: bool| if negated { " !" } else { "" };
        let mut s = format!("-A {chain}");
        if let Some(name) = self.in_iface {
            let _ = write!(s, " -i {name}");
        }
        if let Some(name) = self.out_iface {
            let _ = write!(s, " -o {name}");
        }
        if let Some(c) = self.src {
            let _ = write!(s, " -s {c}");
        }
        if let Some((negated, c)) = self.dst
            && !self.dst_last
        {
            let _ = write!(s, "{} -d {c}", bang(negated));
        }
        match self.proto {
            Some(Proto::Tcp) => s.push_str(" -p tcp"),
            Some(Proto::Udp) => s.push_str(" -p udp"),
            None => {}
        }
        match &self.dports {
            Some((negated, ports)) if ports.len() == 1 => {
                let _ = write!(s, "{} --dport {}", bang(*negated), ports[0]);
            }
            Some((negated, ports)) => {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                let _ = write!(
                    s,
                    " -m multiport{} --dports {}",
                    bang(*negated),
                    list.join(",")
                );
            }
            None => {}
        }
        if let Some((negated, c)) = self.dst
            && self.dst_last
        {
            let _ = write!(s, "{} -d {c}", bang(negated));
        }
        if let Some((negated, owner)) = self.owner {
            let (kind, id) = match owner {
                Owner::Uid(u) => ("uid", u),
                Owner::Gid(g) => ("gid", g),
            };
            let _ = write!(s, " -m owner{} --{kind}-owner {id}", bang(negated));
        }
        match self.target {
            Target::Return => s.push_str(" -j RETURN"),
            Target::Jump(chain) => {
                let _ = write!(s, " -j {chain}");
            }
            // istio writes `--to-port` in its UDP rules.
            Target::Redirect(port) if self.proto == Some(Proto::Udp) => {
                let _ = write!(s, " -j REDIRECT --to-port {port}");
            }
            Target::Redirect(port) => {
                let _ = write!(s, " -j REDIRECT --to-ports {port}");
            }
        }
        s
    }
}

/// The first packet (SYN) of a connection, as netfilter sees it.
#[derive(Clone, Copy, Debug)]
struct Packet {
    src: u32,
    dst: u32,
    dport: u16,
    proto: Proto,
    /// The interface it arrived on (PREROUTING; `None` at OUTPUT, or an
    /// ifindex the pod does not have).
    in_iface: Option<&'static str>,
    /// The interface its route leaves through (OUTPUT; `None` at
    /// PREROUTING, where routing has not happened yet).
    out_iface: Option<&'static str>,
    /// (uid, gid) of the owning socket; `None` for packets from outside.
    owner: Option<(u32, u32)>,
}

/// A rule that matched during a walk.
#[derive(Clone, Debug)]
struct Hit {
    chain: &'static str,
    /// 1-based, as `iptables -t nat -L CHAIN --line-numbers` numbers it.
    number: usize,
    text: String,
    /// The rule's target is RETURN.
    returns: bool,
}

/// The result of walking the table.
#[derive(Clone, Debug)]
struct Walk {
    action: Action,
    /// Every rule that matched, in walk order (jumps included).
    trace: Vec<Hit>,
    /// Why there is no rule to blame (fell off a chain, chain not walked).
    note: Option<String>,
}

impl Walk {
    /// The rule that decided: the last match outside the two one-rule
    /// REDIRECT chains, e.g. `ISTIO_OUTPUT #3 -A ISTIO_OUTPUT -o lo -m owner
    /// ! --uid-owner 1337 -j RETURN`.
    fn deciding(&self) -> Option<&Hit> {
        self.trace
            .iter()
            .rev()
            .find(|h| h.chain != ISTIO_REDIRECT && h.chain != ISTIO_IN_REDIRECT)
    }
}

impl fmt::Display for Walk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.action)?;
        match self.deciding() {
            Some(h) if self.note.is_none() => {
                write!(f, " by {} rule {}: `{}`", h.chain, h.number, h.text)?
            }
            _ => {}
        }
        if let Some(n) = &self.note {
            write!(f, " ({n})")?;
        }
        if !self.trace.is_empty() {
            write!(f, "\n    walk:")?;
            for h in &self.trace {
                write!(f, "\n      {} #{}: {}", h.chain, h.number, h.text)?;
            }
        }
        Ok(())
    }
}

/// The `nat` table: chains in creation order, each an ordered rule list.
#[derive(Clone, Debug)]
struct Nat {
    chains: Vec<(&'static str, Vec<IptRule>)>,
}

impl Nat {
    fn new() -> Self {
        let names = [
            PREROUTING,
            OUTPUT,
            ISTIO_INBOUND,
            ISTIO_REDIRECT,
            ISTIO_IN_REDIRECT,
            ISTIO_OUTPUT,
            ISTIO_OUTPUT_DNS,
        ];
        Nat {
            chains: names.iter().map(|n| (*n, Vec::new())).collect(),
        }
    }

    fn append(&mut self, chain: &'static str, rule: IptRule) {
        let (_, rules) = self
            .chains
            .iter_mut()
            .find(|(n, _)| *n == chain)
            .expect("known chain");
        rules.push(rule);
    }

    fn chain(&self, name: &str) -> &[IptRule] {
        self.chains
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(&[][..], |(_, r)| r)
    }

    /// `-A` lines of one chain, in order.
    fn lines(&self, chain: &str) -> Vec<String> {
        self.chain(chain).iter().map(|r| r.render(chain)).collect()
    }

    fn listing(&self) -> String {
        let mut s = String::new();
        for (name, _) in &self.chains {
            for (i, line) in self.lines(name).iter().enumerate() {
                let _ = writeln!(s, "    {name:>17} #{:<2} {line}", i + 1);
            }
        }
        s
    }

    /// Walk a packet from a built-in chain, netfilter style.
    fn walk(&self, builtin: &'static str, p: &Packet) -> Walk {
        let mut trace: Vec<Hit> = Vec::new();
        let mut stack: Vec<(&'static str, usize)> = Vec::new();
        let (mut chain, mut i) = (builtin, 0usize);
        loop {
            let rules = self.chain(chain);
            let Some(rule) = rules.get(i) else {
                // End of a user chain: back to the caller. End of the
                // built-in chain: its policy, ACCEPT.
                match stack.pop() {
                    Some((c, next)) => {
                        (chain, i) = (c, next);
                        continue;
                    }
                    None => {
                        // After a RETURN that rule decided; otherwise no
                        // rule did.
                        let returned = trace.last().is_some_and(|h| h.returns);
                        return Walk {
                            action: Action::Pass,
                            note: (!returned).then(|| {
                                format!("no rule matched: fell off {builtin}, policy ACCEPT")
                            }),
                            trace,
                        };
                    }
                }
            };
            if !rule.matches(p) {
                i += 1;
                continue;
            }
            trace.push(Hit {
                chain,
                number: i + 1,
                text: rule.render(chain),
                returns: rule.target == Target::Return,
            });
            match rule.target {
                Target::Redirect(port) => {
                    return Walk {
                        action: Action::Redirect(port),
                        trace,
                        note: None,
                    };
                }
                Target::Jump(to) => {
                    stack.push((chain, i + 1));
                    (chain, i) = (to, 0);
                }
                Target::Return => match stack.pop() {
                    Some((c, next)) => (chain, i) = (c, next),
                    None => {
                        return Walk {
                            action: Action::Pass,
                            trace,
                            note: None,
                        };
                    }
                },
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Policy, and the rules istio-iptables emits for it
// ---------------------------------------------------------------------------

/// Include outbound CIDRs (istio `-i`).
#[derive(Clone, Debug)]
enum IncludeCidrs {
    /// `*`
    All,
    /// A list; empty captures nothing by CIDR.
    List(Vec<Cidr>),
}

/// Include inbound ports (istio `-b`).
#[derive(Clone, Debug)]
enum InboundPorts {
    /// `*`: all but the exclude-inbound ports (istio `-d`).
    All,
    /// A list; empty captures nothing inbound.
    List(Vec<u16>),
}

/// The settings of one istio-iptables run that the model covers.
#[derive(Clone, Debug)]
struct Policy {
    /// `-p`
    proxy_port: u16,
    /// `-z`
    inbound_port: u16,
    /// `--inbound-tunnel-port`
    tunnel_port: u16,
    /// `-u`, in order
    uids: Vec<u32>,
    /// `-g`, in order
    gids: Vec<u32>,
    /// `-o`
    exclude_out_ports: Vec<u16>,
    /// `-q`
    include_out_ports: Vec<u16>,
    /// `-x`
    exclude_cidrs: Vec<Cidr>,
    /// `-i`
    include_cidrs: IncludeCidrs,
    /// `-b`
    inbound_ports: InboundPorts,
    /// `-d` (only used by iptables when `-b` is `*`)
    exclude_in_ports: Vec<u16>,
    /// Addresses the pod's network namespace owns besides 127.0.0.0/8
    /// (may list 127.0.0.1 too, as `ip addr` on `lo` does).
    local: Vec<Ip>,
    /// `--redirect-dns`: (`--capture-all-dns`, the nameservers).
    dns: Option<(bool, Vec<u32>)>,
    /// `-c`, in order: names, which the pod may not have.
    exclude_interfaces: Vec<&'static str>,
    /// The pod's routes (main table) besides its default route through
    /// `eth0`: prefix and interface. See [`Policy::route`].
    routes: Vec<(Cidr, &'static str)>,
}

const POD: u32 = ip(10, 200, 0, 2);

impl Policy {
    /// istio-iptables defaults: proxy UID and GID 1337, nothing included.
    fn istio_defaults() -> Self {
        Policy {
            proxy_port: 15001,
            inbound_port: 15006,
            tunnel_port: 15008,
            uids: vec![1337],
            gids: vec![1337],
            exclude_out_ports: vec![],
            include_out_ports: vec![],
            exclude_cidrs: vec![],
            include_cidrs: IncludeCidrs::List(vec![]),
            inbound_ports: InboundPorts::List(vec![]),
            exclude_in_ports: vec![],
            local: vec![Ip(POD)],
            dns: None,
            exclude_interfaces: vec![],
            routes: vec![],
        }
    }

    /// istio's `HasLoopBackIP`: an include CIDR whose address is in
    /// 127.0.0.0/8. istio then leaves out the "non-proxy owner over lo →
    /// RETURN" rules so that the loopback CIDR can be captured (`run.go`
    /// and golden `loopback-outbound-iprange` at 86c9f01).
    fn include_has_loopback(&self) -> bool {
        matches!(&self.include_cidrs, IncludeCidrs::List(l) if l.iter().any(|c| in_loopback_range(c.net)))
    }

    fn over_lo(&self, dst: u32) -> bool {
        in_loopback_range(dst) || self.local.contains(&Ip(dst))
    }

    /// The interface the pod's route to `dst` leaves through: the `local`
    /// table, asked first, sends 127.0.0.0/8 and the pod's own addresses
    /// through `lo`; then the longest matching prefix of [`Policy::routes`]
    /// (the first listed of equal ones, as the lower metric); then the
    /// default route, through `eth0`.
    fn route(&self, dst: u32) -> &'static str {
        if self.over_lo(dst) {
            return LO;
        }
        let mut best: Option<(Cidr, &'static str)> = None;
        for &(c, dev) in &self.routes {
            if c.contains(dst) && best.is_none_or(|(b, _)| c.len > b.len) {
                best = Some((c, dev));
            }
        }
        best.map_or(ETH0, |(_, dev)| dev)
    }
}

/// The `nat` rules istio-iptables (REDIRECT mode, IPv4) appends for a
/// policy, in its order (see `Run()` in istio's `capture/run.go` and the
/// goldens).
fn nat_table(p: &Policy) -> Nat {
    use Target::{Jump, Redirect, Return};
    let mut nat = Nat::new();
    let rule = IptRule::to;

    // `-c` (`shortCircuitExcludeInterfaces`, the first rules `Run()`
    // appends): per interface, in order, PREROUTING's then OUTPUT's.
    for &name in &p.exclude_interfaces {
        nat.append(PREROUTING, rule(Return).in_iface(name));
        nat.append(OUTPUT, rule(Return).out_iface(name));
    }

    nat.append(ISTIO_INBOUND, rule(Return).tcp().dports(&[p.tunnel_port]));
    nat.append(ISTIO_REDIRECT, rule(Redirect(p.proxy_port)).tcp());
    nat.append(ISTIO_IN_REDIRECT, rule(Redirect(p.inbound_port)).tcp());

    // Inbound (docs/iptables-rules.md, in-1 to in-end).
    match &p.inbound_ports {
        InboundPorts::List(ports) if ports.is_empty() => {}
        InboundPorts::All => {
            nat.append(PREROUTING, rule(Jump(ISTIO_INBOUND)).tcp());
            for &port in &p.exclude_in_ports {
                nat.append(ISTIO_INBOUND, rule(Return).tcp().dports(&[port]));
            }
            nat.append(ISTIO_INBOUND, rule(Jump(ISTIO_IN_REDIRECT)).tcp());
        }
        InboundPorts::List(ports) => {
            nat.append(PREROUTING, rule(Jump(ISTIO_INBOUND)).tcp());
            for &port in ports {
                nat.append(
                    ISTIO_INBOUND,
                    rule(Jump(ISTIO_IN_REDIRECT)).tcp().dports(&[port]),
                );
            }
        }
    }

    // Outbound (docs/iptables-rules.md, 1 to 9, without 4 and 5).
    nat.append(OUTPUT, rule(Jump(ISTIO_OUTPUT)));
    for &port in &p.exclude_out_ports {
        for proto in [Proto::Tcp, Proto::Udp] {
            nat.append(ISTIO_OUTPUT, rule(Return).proto(proto).dports(&[port]));
        }
    }
    nat.append(
        ISTIO_OUTPUT,
        rule(Return).out_lo().src(Cidr::host(PASSTHROUGH)),
    );
    let owners = p
        .uids
        .iter()
        .map(|&u| Owner::Uid(u))
        .chain(p.gids.iter().map(|&g| Owner::Gid(g)));
    for owner in owners {
        // With DNS capture istio leaves port 53 out of a UID's rule a (not
        // of a GID's), and makes rule b TCP-only without port 53.
        let not_dports = match (p.dns.is_some(), owner) {
            (true, Owner::Uid(_)) => vec![53, p.tunnel_port],
            _ => vec![p.tunnel_port],
        };
        nat.append(
            ISTIO_OUTPUT,
            rule(Jump(ISTIO_IN_REDIRECT))
                .out_lo()
                .not_dst(Cidr::host(LOCALHOST))
                .tcp()
                .not_dports(&not_dports)
                .owner(owner),
        );
        if !p.include_has_loopback() && p.dns.is_some() {
            nat.append(
                ISTIO_OUTPUT,
                rule(Return)
                    .out_lo()
                    .tcp()
                    .not_dports(&[53])
                    .not_owner(owner),
            );
        } else if !p.include_has_loopback() {
            nat.append(ISTIO_OUTPUT, rule(Return).out_lo().not_owner(owner));
        }
        nat.append(ISTIO_OUTPUT, rule(Return).owner(owner));
    }
    // DNS capture (`SetupDNSRedir`): TCP, then UDP, to port 53 of each
    // nameserver, or of any address.
    if let Some((all, servers)) = &p.dns {
        if *all || !servers.is_empty() {
            nat.append(ISTIO_OUTPUT, rule(Jump(ISTIO_OUTPUT_DNS)));
        }
        for proto in [Proto::Tcp, Proto::Udp] {
            if *all {
                nat.append(
                    ISTIO_OUTPUT_DNS,
                    rule(Redirect(DNS_PORT)).proto(proto).dports(&[53]),
                );
                continue;
            }
            for &server in servers {
                nat.append(
                    ISTIO_OUTPUT_DNS,
                    rule(Redirect(DNS_PORT))
                        .proto(proto)
                        .dports(&[53])
                        .dst_last(Cidr::host(server)),
                );
            }
        }
    }
    nat.append(ISTIO_OUTPUT, rule(Return).dst(Cidr::host(LOCALHOST)));
    for &c in &p.exclude_cidrs {
        nat.append(ISTIO_OUTPUT, rule(Return).dst(c));
    }
    for &port in &p.include_out_ports {
        nat.append(
            ISTIO_OUTPUT,
            rule(Jump(ISTIO_REDIRECT)).tcp().dports(&[port]),
        );
    }
    match &p.include_cidrs {
        IncludeCidrs::All => nat.append(ISTIO_OUTPUT, rule(Jump(ISTIO_REDIRECT))),
        IncludeCidrs::List(cidrs) => {
            for &c in cidrs {
                nat.append(ISTIO_OUTPUT, rule(Jump(ISTIO_REDIRECT)).dst(c));
            }
        }
    }
    nat
}

/// The model's answer for an outbound connect, or `None` when the kernel
/// refuses the connect before netfilter sees a packet (a socket bound to a
/// 127.0.0.0/8 address cannot reach a destination outside `lo`: the route
/// lookup fails with EINVAL).
fn model_outbound(p: &Policy, nat: &Nat, c: &Outbound) -> Option<Walk> {
    let Addr::V4(dst) = c.dst else {
        panic!("the model is IPv4 only")
    };
    let out = p.route(dst);
    let out_lo = out == LO;
    let src = match c.bound_src {
        Some(Addr::V4(s)) => {
            if in_loopback_range(s) && !out_lo {
                return None;
            }
            s
        }
        Some(Addr::V6(_)) => panic!("the model is IPv4 only"),
        // The route's preferred source: 127.0.0.1 for 127.0.0.0/8, the
        // address itself for the pod's own ones, else the pod's address.
        None if in_loopback_range(dst) => LOCALHOST,
        None if out_lo => dst,
        None => POD,
    };
    Some(nat.walk(
        OUTPUT,
        &Packet {
            src,
            dst,
            dport: c.dport,
            proto: if c.udp { Proto::Udp } else { Proto::Tcp },
            in_iface: None,
            out_iface: Some(out),
            owner: Some((c.uid, c.gid)),
        },
    ))
}

/// The model's answer for an inbound connection.
fn model_inbound(p: &Policy, nat: &Nat, c: &Inbound) -> Walk {
    let (Addr::V4(src), Addr::V4(dst)) = (c.src, c.dst) else {
        panic!("the model is IPv4 only")
    };
    if p.over_lo(src) {
        // Opened from inside the pod: NAT was set up at nat OUTPUT and the
        // packet never walks nat PREROUTING.
        return Walk {
            action: Action::Pass,
            trace: vec![],
            note: Some("locally originated: nat PREROUTING is not walked".into()),
        };
    }
    nat.walk(
        PREROUTING,
        &Packet {
            src,
            dst,
            dport: c.dport,
            proto: Proto::Tcp,
            in_iface: iface_named(c.ifindex),
            out_iface: None,
            owner: None,
        },
    )
}

// ---------------------------------------------------------------------------
// The same policy for the decision code: maps over plain Vecs, and Config
// ---------------------------------------------------------------------------

impl PolicyMaps for Policy {
    fn port_flags(&self, port: u16) -> u8 {
        let mut f = 0;
        if self.exclude_out_ports.contains(&port) {
            f |= port_flags::OUT_EXCLUDE;
        }
        if self.include_out_ports.contains(&port) {
            f |= port_flags::OUT_INCLUDE;
        }
        // The exclude-inbound list is filled whatever the inbound mode: it
        // is up to the decision to ignore it unless inbound is `*`.
        if self.exclude_in_ports.contains(&port) {
            f |= port_flags::IN_EXCLUDE;
        }
        if matches!(&self.inbound_ports, InboundPorts::List(l) if l.contains(&port)) {
            f |= port_flags::IN_INCLUDE;
        }
        f
    }
    fn is_proxy_uid(&self, uid: u32) -> bool {
        self.uids.contains(&uid)
    }
    fn is_proxy_gid(&self, gid: u32) -> bool {
        self.gids.contains(&gid)
    }
    fn cidr_excluded(&self, dst: &Addr) -> bool {
        matches!(dst, Addr::V4(a) if self.exclude_cidrs.iter().any(|c| c.contains(*a)))
    }
    fn cidr_included(&self, dst: &Addr) -> bool {
        match (&self.include_cidrs, dst) {
            (IncludeCidrs::List(l), Addr::V4(a)) => l.iter().any(|c| c.contains(*a)),
            _ => false,
        }
    }
    fn is_local_addr(&self, dst: &Addr) -> bool {
        matches!(dst, Addr::V4(a) if self.local.contains(&Ip(*a)))
    }
    fn is_dns_server(&self, dst: &Addr) -> bool {
        matches!((dst, &self.dns), (Addr::V4(a), Some((_, servers))) if servers.contains(a))
    }
    /// The ifindexes of the listed names the pod has (as the loader
    /// resolves them when it applies the policy).
    fn is_excluded_interface(&self, ifindex: u32) -> bool {
        self.exclude_interfaces
            .iter()
            .filter_map(|name| ifindex_of(name))
            .any(|i| i == ifindex)
    }
    fn routed_via_excluded_interface(&self, dst: &Addr) -> bool {
        matches!(dst, Addr::V4(a) if self.exclude_interfaces.contains(&self.route(*a)))
    }
}

fn config(p: &Policy) -> Config {
    let mut flags = 0;
    if !p.uids.is_empty() {
        flags |= config_flags::HAS_UIDS;
    }
    if !p.gids.is_empty() {
        flags |= config_flags::HAS_GIDS;
    }
    match &p.include_cidrs {
        IncludeCidrs::All => flags |= config_flags::INCLUDE_ALL,
        IncludeCidrs::List(l) if !l.is_empty() => flags |= config_flags::HAS_INCLUDE_CIDRS,
        IncludeCidrs::List(_) => {}
    }
    if !p.exclude_cidrs.is_empty() {
        flags |= config_flags::HAS_EXCLUDE_CIDRS;
    }
    // What the loader sets from the include list (`PolicySpec::config`).
    if p.include_has_loopback() {
        flags |= config_flags::LOOPBACK_INCLUDE;
    }
    match &p.inbound_ports {
        InboundPorts::All => flags |= config_flags::INBOUND_ALL,
        InboundPorts::List(l) if !l.is_empty() => flags |= config_flags::INBOUND_LIST,
        InboundPorts::List(_) => {}
    }
    if let Some((all, _)) = &p.dns {
        flags |= config_flags::DNS_CAPTURE;
        if *all {
            flags |= config_flags::DNS_CAPTURE_ALL;
        }
    }
    Config {
        proxy_port: p.proxy_port,
        inbound_port: p.inbound_port,
        tunnel_port: p.tunnel_port,
        flags,
        first_uid: p.uids.first().copied().unwrap_or(0),
        first_gid: p.gids.first().copied().unwrap_or(0),
        dns_port: DNS_PORT,
        // In user space any nonzero offset stands for "has `-c`".
        ifindex_offset: if p.exclude_interfaces.is_empty() {
            0
        } else {
            40
        },
        // Source addresses, namespace cookie: unknown / zero.
        ..Config::default()
    }
}

/// Compare model and decision code on one outbound connect. `Ok(false)` when
/// the connect cannot happen (nothing to compare).
fn check_outbound(p: &Policy, c: &Outbound) -> Result<bool, String> {
    let nat = nat_table(p);
    let cfg = config(p);
    let verdict = decide_outbound(&cfg, p, c);
    // The kernel's UDP paths (`redirect-ebpf/src/connect.rs`, `dns.rs`) skip
    // the walk, and pass, for any port but 53 and without DNS capture: the
    // decision must pass all of those too.
    if c.udp
        && (c.dport != 53 || !cfg.has(redirect_common::config_flags::DNS_CAPTURE))
        && verdict.action != Action::Pass
    {
        return Err(format!(
            "UDP the kernel never walks was captured\n  connection: {}\n  decide_outbound: {verdict:?}",
            show_outbound(c)
        ));
    }
    let Some(model) = model_outbound(p, &nat, c) else {
        // The kernel refuses this connect before any rule: the decision
        // must not capture it (a capture would make it succeed).
        if verdict.action != Action::Pass {
            return Err(format!(
                "unroutable connect captured\n  connection: {}\n  decide_outbound: {verdict:?}",
                show_outbound(c)
            ));
        }
        return Ok(false);
    };
    if verdict.action == model.action {
        return Ok(true);
    }
    let Addr::V4(dst) = c.dst else { unreachable!() };
    Err(format!(
        "outbound disagreement\n  connection: {} (route: dev {})\n  iptables model: {model}\n  decide_outbound: {verdict:?}\n  policy: {p:?}\n  nat table:\n{}",
        show_outbound(c),
        p.route(dst),
        nat.listing()
    ))
}

fn check_inbound(p: &Policy, c: &Inbound) -> Result<(), String> {
    let nat = nat_table(p);
    let model = model_inbound(p, &nat, c);
    let verdict = decide_inbound(&config(p), p, c);
    if verdict.action == model.action {
        return Ok(());
    }
    Err(format!(
        "inbound disagreement\n  connection: {}\n  iptables model: {model}\n  decide_inbound: {verdict:?}\n  policy: {p:?}\n  nat table:\n{}",
        show_inbound(c),
        nat.listing()
    ))
}

fn show_addr(a: &Addr) -> String {
    match a {
        Addr::V4(a) => dotted(*a),
        Addr::V6(b) => format!("{b:?}"),
    }
}

fn show_outbound(c: &Outbound) -> String {
    let bound = c.bound_src.as_ref().map_or("unbound".to_string(), |a| {
        format!("bound to {}", show_addr(a))
    });
    format!(
        "uid {} gid {} ({bound}) {} {}:{}",
        c.uid,
        c.gid,
        if c.udp { "send (UDP)" } else { "connect" },
        show_addr(&c.dst),
        c.dport
    )
}

fn show_inbound(c: &Inbound) -> String {
    format!(
        "{} -> {}:{} in on {} (ifindex {})",
        show_addr(&c.src),
        show_addr(&c.dst),
        c.dport,
        iface_named(c.ifindex).unwrap_or("?"),
        c.ifindex
    )
}

// ---------------------------------------------------------------------------
// The model against istio's goldens
// ---------------------------------------------------------------------------

/// The IPv4 `nat` section of a golden, `-A` lines grouped by chain (order
/// within a chain kept).
fn golden_chains(golden: &str) -> Vec<(String, Vec<String>)> {
    let mut chains: Vec<(String, Vec<String>)> = Vec::new();
    let section = golden
        .lines()
        .skip_while(|l| *l != "* nat")
        .take_while(|l| *l != "COMMIT");
    for line in section.filter(|l| l.starts_with("-A ")) {
        let chain = line.split_whitespace().nth(1).unwrap().to_string();
        match chains.iter_mut().find(|(c, _)| *c == chain) {
            Some((_, lines)) => lines.push(line.to_string()),
            None => chains.push((chain, vec![line.to_string()])),
        }
    }
    chains
}

fn assert_matches_golden(name: &str, p: &Policy, golden: &str) {
    let nat = nat_table(p);
    let expected = golden_chains(golden);
    for (chain, _) in &nat.chains {
        let want = expected
            .iter()
            .find(|(c, _)| c == chain)
            .map(|(_, l)| l.clone())
            .unwrap_or_default();
        assert_eq!(nat.lines(chain), want, "golden {name}, chain {chain}");
    }
    for (chain, _) in &expected {
        assert!(
            nat.chains.iter().any(|(c, _)| c == chain),
            "golden {name}: chain {chain} not modelled"
        );
    }
}

/// The IPv4 `nat` sections of istio's goldens, verbatim: Istio's test data
/// (`tools/istio-iptables/pkg/capture/testdata/*.golden` in istio/istio at
/// commit 86c9f01fd735fb01d8192f5bcaf0d424afb7f14c; Apache License 2.0,
/// Copyright Istio Authors). `docs/iptables-rules.md` lists the settings
/// behind each.
const GOLDEN_EMPTY: &str = "\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
COMMIT
";

const GOLDEN_IPNETS: &str = "\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT
COMMIT
";

const GOLDEN_INBOUND_PORTS_WILDCARD: &str = "\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
COMMIT
";

const GOLDEN_INBOUND_PORTS_INCLUDE: &str = "\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 32000 -j ISTIO_IN_REDIRECT
-A ISTIO_INBOUND -p tcp --dport 31000 -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
COMMIT
";

const GOLDEN_OUTBOUND_PORTS_INCLUDE: &str = "\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -p tcp --dport 32000 -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -p tcp --dport 31000 -j ISTIO_REDIRECT
COMMIT
";

/// `kube-virt-interfaces` (include `*`); its `-I PREROUTING -i ethN` lines
/// (virtual interfaces) are not `-A` lines and are out of scope.
const GOLDEN_KUBE_VIRT_INTERFACES: &str = "\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-I PREROUTING 1 -i eth1 -j RETURN
-I PREROUTING 1 -i eth2 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-I PREROUTING 1 -i eth1 -j ISTIO_REDIRECT
-I PREROUTING 1 -i eth2 -j ISTIO_REDIRECT
COMMIT
";

/// `basic-exclude-nic` (`-c not-istio-nic`): its two RETURN rules come
/// first in PREROUTING and OUTPUT (`shortCircuitExcludeInterfaces`, the
/// first thing `Run()` appends). Newer istio writes `-A OUTPUT -p tcp -j
/// ISTIO_OUTPUT`; at the reference commit it is `-A OUTPUT -j ISTIO_OUTPUT`.
const GOLDEN_BASIC_EXCLUDE_NIC: &str = "\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A PREROUTING -i not-istio-nic -j RETURN
-A OUTPUT -o not-istio-nic -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
COMMIT
";

/// `-o 22,80` and `-b '*' -d 22,80`: there is no golden for these at the
/// reference commit (86c9f01); these are the lines its `run.go` appends, one
/// per port (tcp then udp for outbound). Newer istio folds them into one
/// `-m multiport --dports 22,80` rule, which matches the same packets.
const OUTBOUND_PORTS_EXCLUDE_HEAD: [&str; 5] = [
    "-A ISTIO_OUTPUT -p tcp --dport 22 -j RETURN",
    "-A ISTIO_OUTPUT -p udp --dport 22 -j RETURN",
    "-A ISTIO_OUTPUT -p tcp --dport 80 -j RETURN",
    "-A ISTIO_OUTPUT -p udp --dport 80 -j RETURN",
    "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
];
const INBOUND_WILDCARD_EXCLUDE: [&str; 4] = [
    "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
    "-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN",
    "-A ISTIO_INBOUND -p tcp --dport 80 -j RETURN",
    "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
];

#[test]
fn rule_text_equals_istio_goldens() {
    let d = Policy::istio_defaults;
    assert_matches_golden("empty", &d(), GOLDEN_EMPTY);
    assert_matches_golden(
        "ipnets",
        &Policy {
            include_cidrs: IncludeCidrs::List(vec![Cidr::new(ip(10, 0, 0, 0), 8)]),
            ..d()
        },
        GOLDEN_IPNETS,
    );
    assert_matches_golden(
        "inbound-ports-wildcard",
        &Policy {
            inbound_ports: InboundPorts::All,
            ..d()
        },
        GOLDEN_INBOUND_PORTS_WILDCARD,
    );
    assert_matches_golden(
        "inbound-ports-include",
        &Policy {
            inbound_ports: InboundPorts::List(vec![32000, 31000]),
            ..d()
        },
        GOLDEN_INBOUND_PORTS_INCLUDE,
    );
    assert_matches_golden(
        "outbound-ports-include",
        &Policy {
            include_out_ports: vec![32000, 31000],
            ..d()
        },
        GOLDEN_OUTBOUND_PORTS_INCLUDE,
    );
    assert_matches_golden(
        "kube-virt-interfaces",
        &Policy {
            include_cidrs: IncludeCidrs::All,
            ..d()
        },
        GOLDEN_KUBE_VIRT_INTERFACES,
    );
    assert_matches_golden(
        "basic-exclude-nic",
        &Policy {
            exclude_interfaces: vec!["not-istio-nic"],
            ..d()
        },
        GOLDEN_BASIC_EXCLUDE_NIC,
    );
    // Several interfaces: one PREROUTING and one OUTPUT rule each, in the
    // order given, before the jumps to istio's chains.
    let two = nat_table(&Policy {
        exclude_interfaces: vec![NET1, "eth1"],
        inbound_ports: InboundPorts::All,
        ..d()
    });
    assert_eq!(
        two.lines(PREROUTING),
        [
            "-A PREROUTING -i net1 -j RETURN",
            "-A PREROUTING -i eth1 -j RETURN",
            "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        ]
    );
    assert_eq!(
        two.lines(OUTPUT),
        [
            "-A OUTPUT -o net1 -j RETURN",
            "-A OUTPUT -o eth1 -j RETURN",
            "-A OUTPUT -j ISTIO_OUTPUT",
        ]
    );
    // With DNS capture: istio's own files, as the redirect crate's render
    // tests read them.
    let dns = Policy {
        uids: vec![3, 4],
        gids: vec![1, 2],
        dns: Some((false, vec![ip(127, 0, 0, 53)])),
        ..d()
    };
    assert_matches_golden(
        "ip-range",
        &Policy {
            exclude_cidrs: vec![Cidr::new(ip(1, 1, 0, 0), 16)],
            include_cidrs: IncludeCidrs::List(vec![Cidr::new(ip(9, 9, 0, 0), 16)]),
            ..dns.clone()
        },
        include_str!("../../redirect/testdata/istio-goldens/ip-range.golden"),
    );
    assert_matches_golden(
        "dns-uid-gid",
        &dns,
        include_str!("../../redirect/testdata/istio-goldens/dns-uid-gid.golden"),
    );
    let excl = nat_table(&Policy {
        exclude_out_ports: vec![22, 80],
        ..d()
    });
    assert_eq!(excl.lines(ISTIO_OUTPUT)[..5], OUTBOUND_PORTS_EXCLUDE_HEAD);
    let inexcl = nat_table(&Policy {
        inbound_ports: InboundPorts::All,
        exclude_in_ports: vec![22, 80],
        ..d()
    });
    assert_eq!(inexcl.lines(ISTIO_INBOUND), INBOUND_WILDCARD_EXCLUDE);
    // The multiport form, as in the `dns-uid-gid` golden.
    let dns_style = IptRule::to(Target::Jump(ISTIO_IN_REDIRECT))
        .out_lo()
        .not_dst(Cidr::host(LOCALHOST))
        .tcp()
        .not_dports(&[53, 15008])
        .owner(Owner::Uid(3));
    assert_eq!(
        dns_style.render(ISTIO_OUTPUT),
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 3 -j ISTIO_IN_REDIRECT"
    );
}

#[test]
fn loopback_include_cidr_rule_text() {
    // istio's golden `loopback-outbound-iprange` at the reference commit
    // 86c9f01 (UIDs 3,4, GIDs 1,2, include 127.1.2.3/32, DNS capture; here
    // without the DNS parts): no "-o lo ! --uid-owner
    // RETURN" rules, and the loopback CIDR is captured last.
    let nat = nat_table(&Policy {
        uids: vec![3, 4],
        gids: vec![1, 2],
        include_cidrs: IncludeCidrs::List(vec![Cidr::host(ip(127, 1, 2, 3))]),
        ..Policy::istio_defaults()
    });
    let lines = nat.lines(ISTIO_OUTPUT);
    assert_eq!(
        lines,
        [
            "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
            "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 3 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -m owner --uid-owner 3 -j RETURN",
            "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 4 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -m owner --uid-owner 4 -j RETURN",
            "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -m owner --gid-owner 1 -j RETURN",
            "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 2 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -m owner --gid-owner 2 -j RETURN",
            "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A ISTIO_OUTPUT -d 127.1.2.3/32 -j ISTIO_REDIRECT",
        ]
    );
}

// ---------------------------------------------------------------------------
// Hand-written cases: the model against what the rules obviously say
// ---------------------------------------------------------------------------

const REMOTE: u32 = ip(10, 201, 0, 1);

fn out(uid: u32, gid: u32, dst: u32, dport: u16) -> Outbound {
    Outbound {
        udp: false,
        uid,
        gid,
        mark: 0,
        in_proxy_cgroup: false,
        bound_src: None,
        dst: Addr::V4(dst),
        dport,
    }
}

fn bound(src: u32, c: Outbound) -> Outbound {
    Outbound {
        bound_src: Some(Addr::V4(src)),
        ..c
    }
}

/// An inbound connection to the pod: over `lo` from the loopback range
/// or the pod's address, else in on `eth0`.
fn inb(src: u32, dport: u16) -> Inbound {
    let iface = if in_loopback_range(src) || src == POD {
        LO
    } else {
        ETH0
    };
    on(iface, src, dport)
}

/// An inbound connection to the pod arriving on `iface`.
fn on(iface: &str, src: u32, dport: u16) -> Inbound {
    Inbound {
        src: Addr::V4(src),
        dst: Addr::V4(POD),
        dport,
        ifindex: ifindex_of(iface).expect("one of the pod's interfaces"),
    }
}

/// A second network, 192.168.0.0/16, routed through `net1`, its nameserver
/// 192.168.0.10 with it; the rest through `eth0`.
const NET1_ROUTE: Cidr = Cidr {
    net: ip(192, 168, 0, 0),
    len: 16,
};
const NET1_DNS: u32 = ip(192, 168, 0, 10);

/// [`sidecar`] with `-c` and the `net1` network.
fn sidecar_excluding(names: &[&'static str]) -> Policy {
    Policy {
        exclude_interfaces: names.to_vec(),
        routes: vec![(NET1_ROUTE, NET1)],
        ..sidecar()
    }
}

/// The sidecar default: proxy 1337/1337, include `*`.
fn sidecar() -> Policy {
    Policy {
        include_cidrs: IncludeCidrs::All,
        ..Policy::istio_defaults()
    }
}

/// Expected: the action, and the text of the deciding rule (`None`: no rule
/// decided, the walk fell off the end or was not made).
type Expect = (Action, Option<&'static str>);

const IN_REDIRECT_1337: &str = "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT";
const LO_NOT_1337: &str = "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN";
const UID_1337: &str = "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN";
const PASSTHROUGH_RULE: &str = "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN";
const REDIRECT_ALL: &str = "-A ISTIO_OUTPUT -j ISTIO_REDIRECT";

fn outbound_hand_cases() -> Vec<(Policy, Outbound, Expect)> {
    use Action::{Pass, Redirect};
    let two_uids = Policy {
        uids: vec![1337, 1338],
        ..sidecar()
    };
    let no_owners = Policy {
        uids: vec![],
        gids: vec![],
        ..sidecar()
    };
    let ranges = Policy {
        exclude_cidrs: vec![Cidr::new(ip(1, 1, 0, 0), 16)],
        include_out_ports: vec![32000],
        include_cidrs: IncludeCidrs::List(vec![Cidr::new(ip(9, 9, 0, 0), 16)]),
        ..Policy::istio_defaults()
    };
    let excl80 = Policy {
        exclude_out_ports: vec![80],
        ..sidecar()
    };
    // DNS capture to kube-dns (10.96.0.10), proxy UID and GID 1337.
    let kube_dns = ip(10, 96, 0, 10);
    let dns = Policy {
        dns: Some((false, vec![kube_dns, ip(127, 0, 0, 53)])),
        ..sidecar()
    };
    let udp = |c: Outbound| Outbound { udp: true, ..c };
    let dns_tcp =
        "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-ports 15053";
    let dns_udp =
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-port 15053";
    let mut dns_cases = vec![
        // The app's queries, UDP and TCP, to the nameserver: to the agent.
        (
            dns.clone(),
            udp(out(1000, 1000, kube_dns, 53)),
            (Redirect(15053), Some(dns_udp)),
        ),
        (
            dns.clone(),
            out(1000, 1000, kube_dns, 53),
            (Redirect(15053), Some(dns_tcp)),
        ),
        // The proxy's own queries go out.
        (
            dns.clone(),
            udp(out(1337, 1337, kube_dns, 53)),
            (Pass, Some(UID_1337)),
        ),
        // Another server, or another port: not DNS capture's; UDP is
        // never sent to the proxy.
        (
            dns.clone(),
            udp(out(1000, 1000, ip(8, 8, 8, 8), 53)),
            (Pass, None),
        ),
        (
            dns.clone(),
            udp(out(1000, 1000, kube_dns, 5353)),
            (Pass, None),
        ),
        // A local resolver over lo: rule b no longer passes UDP, nor TCP
        // to 53.
        (
            dns.clone(),
            udp(out(1000, 1000, ip(127, 0, 0, 53), 53)),
            (
                Redirect(15053),
                Some(
                    "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 127.0.0.53/32 -j REDIRECT --to-port 15053",
                ),
            ),
        ),
        (
            dns.clone(),
            out(1000, 1000, ip(127, 0, 0, 53), 53),
            (
                Redirect(15053),
                Some(
                    "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 127.0.0.53/32 -j REDIRECT --to-ports 15053",
                ),
            ),
        ),
        // A proxy GID's TCP to the pod's own port 53 over lo: a GID's rule
        // a keeps port 53 (a UID's does not).
        (
            Policy {
                uids: vec![],
                ..dns.clone()
            },
            out(1000, 1337, POD, 53),
            (
                Redirect(15006),
                Some(
                    "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
                ),
            ),
        ),
        (
            dns.clone(),
            out(1337, 1000, POD, 53),
            (Pass, Some(UID_1337)),
        ),
    ];
    let mut cases = vec![
        (
            sidecar(),
            out(1000, 1000, REMOTE, 80),
            (Redirect(15001), Some(REDIRECT_ALL)),
        ),
        (
            sidecar(),
            out(1337, 1337, REMOTE, 80),
            (Pass, Some(UID_1337)),
        ),
        (
            sidecar(),
            out(1337, 1337, POD, 8080),
            (Redirect(15006), Some(IN_REDIRECT_1337)),
        ),
        (
            sidecar(),
            out(1337, 1337, POD, 15008),
            (Pass, Some(UID_1337)),
        ),
        (
            sidecar(),
            out(1337, 1337, LOCALHOST, 15000),
            (Pass, Some(UID_1337)),
        ),
        (
            sidecar(),
            out(1337, 1337, ip(127, 0, 0, 5), 80),
            (Redirect(15006), Some(IN_REDIRECT_1337)),
        ),
        (
            sidecar(),
            out(1000, 1000, POD, 8080),
            (Pass, Some(LO_NOT_1337)),
        ),
        (
            sidecar(),
            out(1000, 1000, LOCALHOST, 8080),
            (Pass, Some(LO_NOT_1337)),
        ),
        (
            sidecar(),
            bound(PASSTHROUGH, out(1337, 1337, POD, 8080)),
            (Pass, Some(PASSTHROUGH_RULE)),
        ),
        (
            sidecar(),
            bound(PASSTHROUGH, out(1000, 1000, POD, 8080)),
            (Pass, Some(PASSTHROUGH_RULE)),
        ),
        (
            sidecar(),
            bound(POD, out(1337, 1337, POD, 8080)),
            (Redirect(15006), Some(IN_REDIRECT_1337)),
        ),
        (
            sidecar(),
            out(0, 1337, REMOTE, 80),
            (
                Pass,
                Some("-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN"),
            ),
        ),
        // Only the first owner's "app called itself via a VIP" rule is
        // reachable over lo: the first owner's RETURN catches the second.
        (
            two_uids.clone(),
            out(1338, 1338, POD, 8080),
            (Pass, Some(LO_NOT_1337)),
        ),
        (
            two_uids,
            out(1338, 1338, REMOTE, 80),
            (
                Pass,
                Some("-A ISTIO_OUTPUT -m owner --uid-owner 1338 -j RETURN"),
            ),
        ),
        // With no proxy owners at all, loopback traffic falls through.
        (
            no_owners.clone(),
            out(1000, 1000, ip(127, 0, 0, 5), 80),
            (Redirect(15001), Some(REDIRECT_ALL)),
        ),
        (
            no_owners.clone(),
            out(1000, 1000, POD, 80),
            (Redirect(15001), Some(REDIRECT_ALL)),
        ),
        (
            no_owners,
            out(1000, 1000, LOCALHOST, 80),
            (Pass, Some("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN")),
        ),
        (
            excl80.clone(),
            out(1337, 1337, POD, 80),
            (Pass, Some("-A ISTIO_OUTPUT -p tcp --dport 80 -j RETURN")),
        ),
        (
            excl80,
            out(1000, 1000, REMOTE, 80),
            (Pass, Some("-A ISTIO_OUTPUT -p tcp --dport 80 -j RETURN")),
        ),
        (
            ranges.clone(),
            out(1000, 1000, ip(1, 1, 1, 1), 32000),
            (Pass, Some("-A ISTIO_OUTPUT -d 1.1.0.0/16 -j RETURN")),
        ),
        (
            ranges.clone(),
            out(1000, 1000, ip(8, 8, 8, 8), 32000),
            (
                Redirect(15001),
                Some("-A ISTIO_OUTPUT -p tcp --dport 32000 -j ISTIO_REDIRECT"),
            ),
        ),
        (
            ranges.clone(),
            out(1000, 1000, ip(9, 9, 1, 1), 80),
            (
                Redirect(15001),
                Some("-A ISTIO_OUTPUT -d 9.9.0.0/16 -j ISTIO_REDIRECT"),
            ),
        ),
        (ranges, out(1000, 1000, ip(8, 8, 8, 8), 80), (Pass, None)),
        (
            Policy::istio_defaults(),
            out(1000, 1000, REMOTE, 80),
            (Pass, None),
        ),
    ];
    cases.append(&mut dns_cases);
    cases.append(&mut excluded_interface_outbound_cases());
    cases
}

const RETURN_OUT_LO: &str = "-A OUTPUT -o lo -j RETURN";
const RETURN_OUT_NET1: &str = "-A OUTPUT -o net1 -j RETURN";
const RETURN_IN_NET1: &str = "-A PREROUTING -i net1 -j RETURN";
const RETURN_IN_ETH0: &str = "-A PREROUTING -i eth0 -j RETURN";

/// `-c`: what leaves through an excluded interface passes before any of
/// istio's own rules is asked.
fn excluded_interface_outbound_cases() -> Vec<(Policy, Outbound, Expect)> {
    use Action::{Pass, Redirect};
    let lo = sidecar_excluding(&[LO]);
    let net1 = sidecar_excluding(&[NET1]);
    let absent = sidecar_excluding(&["not-istio-nic"]);
    let on_net1 = ip(192, 168, 7, 7);
    let udp = |c: Outbound| Outbound { udp: true, ..c };
    let dns_everywhere = Policy {
        dns: Some((true, vec![])),
        ..net1.clone()
    };
    vec![
        // The proxy calling the pod's own address over lo: istio sends it
        // to the inbound port (rule 3a), unless lo is excluded.
        (
            lo.clone(),
            out(1337, 1337, POD, 8080),
            (Pass, Some(RETURN_OUT_LO)),
        ),
        (
            lo.clone(),
            out(1337, 1337, ip(127, 0, 0, 5), 80),
            (Pass, Some(RETURN_OUT_LO)),
        ),
        (
            lo.clone(),
            bound(PASSTHROUGH, out(1000, 1000, POD, 8080)),
            (Pass, Some(RETURN_OUT_LO)),
        ),
        // Off lo, nothing changes.
        (
            lo,
            out(1000, 1000, REMOTE, 80),
            (Redirect(15001), Some(REDIRECT_ALL)),
        ),
        (
            net1.clone(),
            out(1000, 1000, on_net1, 80),
            (Pass, Some(RETURN_OUT_NET1)),
        ),
        // An excluded port or the proxy's own traffic would pass anyway;
        // the interface decides first.
        (
            net1.clone(),
            out(1337, 1337, on_net1, 80),
            (Pass, Some(RETURN_OUT_NET1)),
        ),
        (
            net1.clone(),
            out(1000, 1000, REMOTE, 80),
            (Redirect(15001), Some(REDIRECT_ALL)),
        ),
        (
            net1.clone(),
            out(1337, 1337, POD, 8080),
            (Redirect(15006), Some(IN_REDIRECT_1337)),
        ),
        // DNS capture does not take a query that leaves through net1.
        (
            dns_everywhere.clone(),
            udp(out(1000, 1000, NET1_DNS, 53)),
            (Pass, Some(RETURN_OUT_NET1)),
        ),
        (
            dns_everywhere.clone(),
            out(1000, 1000, NET1_DNS, 53),
            (Pass, Some(RETURN_OUT_NET1)),
        ),
        (
            dns_everywhere,
            udp(out(1000, 1000, ip(10, 96, 0, 10), 53)),
            (
                Redirect(15053),
                Some("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053"),
            ),
        ),
        // A name the pod does not have matches nothing.
        (
            absent.clone(),
            out(1000, 1000, on_net1, 80),
            (Redirect(15001), Some(REDIRECT_ALL)),
        ),
        (
            absent,
            out(1337, 1337, POD, 8080),
            (Redirect(15006), Some(IN_REDIRECT_1337)),
        ),
    ]
}

fn inbound_hand_cases() -> Vec<(Policy, Inbound, Expect)> {
    use Action::{Pass, Redirect};
    let all = Policy {
        inbound_ports: InboundPorts::All,
        exclude_in_ports: vec![22],
        ..sidecar()
    };
    let list = Policy {
        inbound_ports: InboundPorts::List(vec![32000, 31000]),
        // Ignored by istio unless the inbound ports are `*`.
        exclude_in_ports: vec![31000],
        ..sidecar()
    };
    let peer = ip(10, 201, 0, 9);
    vec![
        (
            all.clone(),
            inb(peer, 22),
            (Pass, Some("-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN")),
        ),
        (
            all.clone(),
            inb(peer, 80),
            (
                Redirect(15006),
                Some("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"),
            ),
        ),
        (
            all.clone(),
            inb(peer, 15008),
            (
                Pass,
                Some("-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN"),
            ),
        ),
        (all.clone(), inb(PASSTHROUGH, 80), (Pass, None)),
        (all, inb(POD, 80), (Pass, None)),
        (
            list.clone(),
            inb(peer, 31000),
            (
                Redirect(15006),
                Some("-A ISTIO_INBOUND -p tcp --dport 31000 -j ISTIO_IN_REDIRECT"),
            ),
        ),
        (list, inb(peer, 80), (Pass, None)),
        (sidecar(), inb(peer, 80), (Pass, None)),
        // `-c`: what arrives on an excluded interface passes, even with
        // `-b '*'`.
        (
            inbound_all_excluding(&[NET1]),
            on(NET1, peer, 80),
            (Pass, Some(RETURN_IN_NET1)),
        ),
        (
            inbound_all_excluding(&[NET1]),
            on(ETH0, peer, 80),
            (
                Redirect(15006),
                Some("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"),
            ),
        ),
        (
            inbound_all_excluding(&[ETH0, NET1]),
            on(ETH0, peer, 15008),
            (Pass, Some(RETURN_IN_ETH0)),
        ),
        (
            Policy {
                inbound_ports: InboundPorts::List(vec![31000]),
                ..sidecar_excluding(&[ETH0])
            },
            on(ETH0, peer, 31000),
            (Pass, Some(RETURN_IN_ETH0)),
        ),
        // Without inbound capture the RETURN still matches first.
        (
            sidecar_excluding(&[ETH0]),
            on(ETH0, peer, 80),
            (Pass, Some(RETURN_IN_ETH0)),
        ),
        (
            inbound_all_excluding(&["not-istio-nic", "eth1"]),
            on(NET1, peer, 80),
            (
                Redirect(15006),
                Some("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"),
            ),
        ),
        // Excluding lo changes nothing inbound: what comes over lo was
        // opened from inside the pod and never walks PREROUTING.
        (
            inbound_all_excluding(&[LO]),
            on(ETH0, peer, 80),
            (
                Redirect(15006),
                Some("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"),
            ),
        ),
        (inbound_all_excluding(&[LO]), inb(POD, 80), (Pass, None)),
    ]
}

/// `-b '*'` with `-c`.
fn inbound_all_excluding(names: &[&'static str]) -> Policy {
    Policy {
        inbound_ports: InboundPorts::All,
        ..sidecar_excluding(names)
    }
}

fn check_expect(what: &str, walk: &Walk, (action, rule): &Expect) {
    assert_eq!(walk.action, *action, "{what}: {walk}");
    match rule {
        Some(text) => {
            assert!(walk.note.is_none(), "{what}: {walk}");
            assert_eq!(
                walk.deciding().map(|h| h.text.as_str()),
                Some(*text),
                "{what}: {walk}"
            );
        }
        None => assert!(
            walk.note.is_some(),
            "{what}: expected no deciding rule: {walk}"
        ),
    }
}

#[test]
fn model_hand_cases() {
    for (p, c, expect) in outbound_hand_cases() {
        let walk = model_outbound(&p, &nat_table(&p), &c).expect("routable");
        check_expect(&show_outbound(&c), &walk, &expect);
    }
    for (p, c, expect) in inbound_hand_cases() {
        let walk = model_inbound(&p, &nat_table(&p), &c);
        check_expect(&show_inbound(&c), &walk, &expect);
    }
    // A socket bound to 127.0.0.6 cannot reach a remote address at all.
    let c = bound(PASSTHROUGH, out(1337, 1337, REMOTE, 80));
    assert!(model_outbound(&sidecar(), &nat_table(&sidecar()), &c).is_none());
    // The walk reports rule numbers as `iptables -L --line-numbers` does.
    let walk = model_outbound(
        &sidecar(),
        &nat_table(&sidecar()),
        &out(1000, 1000, POD, 80),
    )
    .unwrap();
    let hit = walk.deciding().unwrap();
    assert_eq!((hit.chain, hit.number), (ISTIO_OUTPUT, 3));
    // netfilter's `+`: `-c net+` names net1 (and any other net...). Model
    // only: the decision's maps hold the ifindexes of exact names.
    let wild = inbound_all_excluding(&["net+"]);
    let walk = model_inbound(&wild, &nat_table(&wild), &on(NET1, REMOTE, 80));
    check_expect(
        "-c net+",
        &walk,
        &(Action::Pass, Some("-A PREROUTING -i net+ -j RETURN")),
    );
    let walk = model_outbound(
        &wild,
        &nat_table(&wild),
        &out(1000, 1000, ip(192, 168, 7, 7), 80),
    )
    .unwrap();
    check_expect(
        "-c net+",
        &walk,
        &(Action::Pass, Some("-A OUTPUT -o net+ -j RETURN")),
    );
}

#[test]
fn hand_cases_agree_with_decision_code() {
    for (p, c, _) in outbound_hand_cases() {
        assert_eq!(check_outbound(&p, &c), Ok(true));
    }
    for (p, c, _) in inbound_hand_cases() {
        assert_eq!(check_inbound(&p, &c), Ok(()));
    }
}

/// istio drops the "non-proxy owner over lo -> RETURN" rules when an include
/// CIDR starts in 127.0.0.0/8, so that the loopback CIDR is captured
/// (`SeparateV4V6` / `HasLoopBackIP` and `run.go` at 86c9f01, golden
/// `loopback-outbound-iprange`). Two consequences, both checked here:
/// an app's connection to that CIDR goes to the proxy port, and every proxy
/// owner's "app called itself via a VIP" rule becomes reachable (not only the
/// first owner's).
#[test]
fn loopback_include_cidr_is_captured() {
    let app_to_cidr = Policy {
        include_cidrs: IncludeCidrs::List(vec![Cidr::host(ip(127, 1, 2, 3))]),
        ..Policy::istio_defaults()
    };
    let second_uid = Policy {
        uids: vec![1337, 1338],
        include_cidrs: IncludeCidrs::List(vec![Cidr::new(ip(127, 0, 0, 0), 8)]),
        ..Policy::istio_defaults()
    };
    let cases = [
        (
            app_to_cidr,
            out(1000, 1000, ip(127, 1, 2, 3), 80),
            (
                Action::Redirect(15001),
                Some("-A ISTIO_OUTPUT -d 127.1.2.3/32 -j ISTIO_REDIRECT"),
            ),
        ),
        (
            second_uid,
            out(1338, 1338, POD, 8080),
            (
                Action::Redirect(15006),
                Some(
                    "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1338 -j ISTIO_IN_REDIRECT",
                ),
            ),
        ),
    ];
    let mut failures = Vec::new();
    for (p, c, expect) in &cases {
        let walk = model_outbound(p, &nat_table(p), c).unwrap();
        check_expect(&show_outbound(c), &walk, expect);
        if let Err(e) = check_outbound(p, c) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// Properties: random policies × random connections
// ---------------------------------------------------------------------------

const OUTBOUND_CASES: u32 = 4000;
const INBOUND_CASES: u32 = 3000;
const MIN_COMPARED: usize = 2000;

const IDS: [u32; 6] = [0, 1000, 1337, 1338, 3, 4];
const PORTS: [u16; 13] = [
    22, 53, 80, 443, 8080, 15001, 15006, 15008, 15020, 15021, 15090, 31000, 32000,
];
const EXTRA_LOCALS: [u32; 3] = [ip(10, 200, 0, 3), ip(192, 168, 1, 5), ip(172, 16, 0, 9)];
/// Nameservers: a local resolver, kube-dns, a public one, the pod's own
/// address and 127.0.0.1.
const NAMESERVERS: [u32; 5] = [
    ip(127, 0, 0, 53),
    ip(10, 96, 0, 10),
    ip(8, 8, 8, 8),
    POD,
    LOCALHOST,
];

/// DNS capture off, on for some nameservers, or on for all.
fn dns() -> impl Strategy<Value = Option<(bool, Vec<u32>)>> {
    prop_oneof![
        2 => Just(None),
        2 => prop::collection::vec(select(&NAMESERVERS[..]), 0..=2).prop_map(|s| Some((false, s))),
        1 => Just(Some((true, vec![]))),
    ]
}

fn id() -> impl Strategy<Value = u32> {
    prop_oneof![4 => select(&IDS[..]), 1 => any::<u32>()]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![4 => select(&PORTS[..]), 1 => 1..=u16::MAX]
}

/// Prefixes that overlap the pod's addresses and the connections' likely
/// destinations; `loopback` adds ones whose address is in 127.0.0.0/8.
fn cidr(loopback: bool) -> BoxedStrategy<Cidr> {
    let mut pool = vec![
        Cidr::new(ip(10, 0, 0, 0), 8),
        Cidr::new(ip(10, 200, 0, 0), 16),
        Cidr::host(POD),
        Cidr::new(ip(10, 201, 0, 0), 16),
        Cidr::new(ip(192, 168, 1, 0), 24),
        Cidr::new(ip(172, 16, 0, 0), 12),
        Cidr::new(ip(1, 1, 0, 0), 16),
        Cidr::new(ip(9, 9, 0, 0), 16),
        Cidr::host(ip(8, 8, 8, 8)),
        Cidr::new(0, 0),
    ];
    if loopback {
        pool.extend([
            Cidr::new(ip(127, 0, 0, 0), 8),
            Cidr::host(LOCALHOST),
            Cidr::new(ip(127, 0, 0, 0), 24),
            Cidr::host(ip(127, 1, 2, 3)),
        ]);
    }
    let random = (any::<u32>(), 0..=32u8).prop_map(move |(a, l)| {
        let c = Cidr::new(a, l);
        if !loopback && in_loopback_range(c.net) {
            Cidr::new(c.net ^ 0x8000_0000, l)
        } else {
            c
        }
    });
    prop_oneof![3 => select(pool), 1 => random].boxed()
}

/// Random policies. With `loopback_includes` false, include CIDRs never start
/// in 127.0.0.0/8 (see `loopback_include_cidr_is_captured`).
fn policy(loopback_includes: bool) -> impl Strategy<Value = Policy> {
    let ids = || prop::collection::vec(id(), 0..=3);
    let ports = || prop::collection::vec(port(), 0..=3);
    let include = prop_oneof![
        1 => Just(IncludeCidrs::All),
        2 => prop::collection::vec(cidr(loopback_includes), 0..=3).prop_map(IncludeCidrs::List),
    ];
    let inbound = prop_oneof![
        Just(InboundPorts::All),
        Just(InboundPorts::List(vec![])),
        prop::collection::vec(port(), 1..=3).prop_map(InboundPorts::List),
    ];
    let service_port = |default: u16| prop_oneof![3 => Just(default), 1 => port()];
    (
        (
            service_port(15001),
            service_port(15006),
            service_port(15008),
        ),
        (ids(), ids()),
        (ports(), ports()),
        (prop::collection::vec(cidr(true), 0..=3), include),
        (inbound, ports()),
        (
            prop::collection::vec(select(&EXTRA_LOCALS[..]), 0..=1),
            any::<bool>(),
        ),
        dns(),
        (exclude_interfaces(), routes()),
    )
        .prop_map(
            |(
                (proxy_port, inbound_port, tunnel_port),
                (uids, gids),
                (exclude_out_ports, include_out_ports),
                (exclude_cidrs, include_cidrs),
                (inbound_ports, exclude_in_ports),
                (extra, with_localhost),
                dns,
                (exclude_interfaces, routes),
            )| {
                let mut local = vec![Ip(POD)];
                local.extend(extra.into_iter().map(Ip));
                if with_localhost {
                    local.push(Ip(LOCALHOST));
                }
                Policy {
                    proxy_port,
                    inbound_port,
                    tunnel_port,
                    uids,
                    gids,
                    exclude_out_ports,
                    include_out_ports,
                    exclude_cidrs,
                    include_cidrs,
                    inbound_ports,
                    exclude_in_ports,
                    local,
                    dns,
                    exclude_interfaces,
                    routes,
                }
            },
        )
}

/// `-c`: none (most policies), or one or two names, which may be `lo`, the
/// pod's other interfaces, or names it does not have.
fn exclude_interfaces() -> impl Strategy<Value = Vec<&'static str>> {
    prop_oneof![
        2 => Just(vec![]),
        1 => prop::collection::vec(select(&EXCLUDE_NAMES[..]), 1..=2),
    ]
}

/// The pod's routes besides the default through eth0: up to two, mostly
/// through net1, over the same prefixes as the policies' CIDRs.
fn routes() -> impl Strategy<Value = Vec<(Cidr, &'static str)>> {
    let dev = prop_oneof![3 => Just(NET1), 1 => Just(ETH0)];
    prop::collection::vec((cidr(false), dev), 0..=2)
}

fn nth<T: Copy>(list: &[T], i: &Index) -> Option<T> {
    (!list.is_empty()).then(|| list[i.index(list.len())])
}

/// An owner id: one of the policy's UIDs or GIDs, or any id.
#[derive(Clone, Debug)]
enum IdPick {
    Uid(Index),
    Gid(Index),
    Id(u32),
}

impl IdPick {
    fn resolve(&self, p: &Policy) -> u32 {
        match self {
            IdPick::Uid(i) => nth(&p.uids, i).unwrap_or(1000),
            IdPick::Gid(i) => nth(&p.gids, i).unwrap_or(1000),
            IdPick::Id(id) => *id,
        }
    }
}

fn id_pick() -> impl Strategy<Value = IdPick> {
    prop_oneof![
        2 => any::<Index>().prop_map(IdPick::Uid),
        2 => any::<Index>().prop_map(IdPick::Gid),
        2 => id().prop_map(IdPick::Id),
    ]
}

#[derive(Clone, Debug)]
enum DstPick {
    Localhost,
    Passthrough,
    /// 127.0.0.x
    Loopback(u8),
    /// Anywhere in 127.0.0.0/8.
    LoopbackRange(u32),
    Local(Index),
    InExclude(Index, u32),
    InInclude(Index, u32),
    /// One of the policy's nameservers, or of [`NAMESERVERS`].
    Nameserver(Index),
    /// Inside one of the pod's routes (see [`Policy::route`]).
    InRoute(Index, u32),
    /// Any unicast address (1.0.0.0 up to 223.255.255.255).
    Remote(u32),
}

impl DstPick {
    fn resolve(&self, p: &Policy) -> u32 {
        let remote = ip(10, 201, 0, 1);
        match self {
            DstPick::Localhost => LOCALHOST,
            DstPick::Passthrough => PASSTHROUGH,
            DstPick::Loopback(x) => ip(127, 0, 0, *x),
            DstPick::LoopbackRange(a) => Cidr::new(ip(127, 0, 0, 0), 8).pick(*a),
            DstPick::Local(i) => nth(&p.local, i).map_or(POD, |a| a.0),
            DstPick::InExclude(i, bits) => {
                nth(&p.exclude_cidrs, i).map_or(remote, |c| c.pick(*bits))
            }
            DstPick::InInclude(i, bits) => match &p.include_cidrs {
                IncludeCidrs::List(l) => nth(l, i).map_or(remote, |c| c.pick(*bits)),
                IncludeCidrs::All => remote,
            },
            DstPick::Nameserver(i) => match &p.dns {
                Some((_, servers)) if !servers.is_empty() => nth(servers, i).unwrap(),
                _ => nth(&NAMESERVERS, i).unwrap(),
            },
            DstPick::InRoute(i, bits) => nth(&p.routes, i).map_or(remote, |(c, _)| c.pick(*bits)),
            DstPick::Remote(a) => *a,
        }
    }
}

fn dst_pick() -> impl Strategy<Value = DstPick> {
    prop_oneof![
        2 => Just(DstPick::Localhost),
        1 => Just(DstPick::Passthrough),
        2 => any::<u8>().prop_map(DstPick::Loopback),
        1 => any::<u32>().prop_map(DstPick::LoopbackRange),
        4 => any::<Index>().prop_map(DstPick::Local),
        3 => (any::<Index>(), any::<u32>()).prop_map(|(i, b)| DstPick::InExclude(i, b)),
        3 => (any::<Index>(), any::<u32>()).prop_map(|(i, b)| DstPick::InInclude(i, b)),
        3 => any::<Index>().prop_map(DstPick::Nameserver),
        3 => (any::<Index>(), any::<u32>()).prop_map(|(i, b)| DstPick::InRoute(i, b)),
        4 => (0x0100_0000u32..0xe000_0000).prop_map(DstPick::Remote),
    ]
}

#[derive(Clone, Debug)]
enum PortPick {
    OutExclude(Index),
    OutInclude(Index),
    InList(Index),
    InExclude(Index),
    Tunnel,
    Proxy,
    InboundCapture,
    Dns,
    Other(u16),
}

impl PortPick {
    fn resolve(&self, p: &Policy) -> u16 {
        let in_list = match &p.inbound_ports {
            InboundPorts::List(l) => l.as_slice(),
            InboundPorts::All => &[],
        };
        match self {
            PortPick::OutExclude(i) => nth(&p.exclude_out_ports, i).unwrap_or(80),
            PortPick::OutInclude(i) => nth(&p.include_out_ports, i).unwrap_or(80),
            PortPick::InList(i) => nth(in_list, i).unwrap_or(80),
            PortPick::InExclude(i) => nth(&p.exclude_in_ports, i).unwrap_or(80),
            PortPick::Tunnel => p.tunnel_port,
            PortPick::Proxy => p.proxy_port,
            PortPick::InboundCapture => p.inbound_port,
            PortPick::Dns => 53,
            PortPick::Other(port) => *port,
        }
    }
}

fn port_pick() -> impl Strategy<Value = PortPick> {
    prop_oneof![
        2 => any::<Index>().prop_map(PortPick::OutExclude),
        2 => any::<Index>().prop_map(PortPick::OutInclude),
        2 => any::<Index>().prop_map(PortPick::InList),
        2 => any::<Index>().prop_map(PortPick::InExclude),
        2 => Just(PortPick::Tunnel),
        1 => Just(PortPick::Proxy),
        1 => Just(PortPick::InboundCapture),
        3 => Just(PortPick::Dns),
        4 => port().prop_map(PortPick::Other),
    ]
}

#[derive(Clone, Debug)]
enum BoundPick {
    Unbound,
    Passthrough,
    Localhost,
    Local(Index),
}

impl BoundPick {
    fn resolve(&self, p: &Policy) -> Option<Addr> {
        match self {
            BoundPick::Unbound => None,
            BoundPick::Passthrough => Some(Addr::V4(PASSTHROUGH)),
            BoundPick::Localhost => Some(Addr::V4(LOCALHOST)),
            BoundPick::Local(i) => Some(Addr::V4(nth(&p.local, i).map_or(POD, |a| a.0))),
        }
    }
}

fn bound_pick() -> impl Strategy<Value = BoundPick> {
    prop_oneof![
        6 => Just(BoundPick::Unbound),
        2 => Just(BoundPick::Passthrough),
        1 => Just(BoundPick::Localhost),
        1 => any::<Index>().prop_map(BoundPick::Local),
    ]
}

/// How to build an outbound connect from a policy.
#[derive(Clone, Debug)]
struct OutboundPick {
    udp: bool,
    uid: IdPick,
    gid: IdPick,
    bound: BoundPick,
    dst: DstPick,
    port: PortPick,
}

impl OutboundPick {
    fn resolve(&self, p: &Policy) -> Outbound {
        Outbound {
            udp: self.udp,
            uid: self.uid.resolve(p),
            gid: self.gid.resolve(p),
            mark: 0,
            in_proxy_cgroup: false,
            bound_src: self.bound.resolve(p),
            dst: Addr::V4(self.dst.resolve(p)),
            dport: self.port.resolve(p),
        }
    }
}

fn outbound_pick() -> impl Strategy<Value = OutboundPick> {
    (
        prop::bool::weighted(0.3),
        id_pick(),
        id_pick(),
        bound_pick(),
        dst_pick(),
        port_pick(),
    )
        .prop_map(|(udp, uid, gid, bound, dst, port)| OutboundPick {
            udp,
            uid,
            gid,
            bound,
            dst,
            port,
        })
}

#[derive(Clone, Debug)]
enum SrcPick {
    Passthrough,
    Localhost,
    LoopbackRange(u32),
    Local(Index),
    Remote(u32),
}

/// How to build an inbound connection from a policy.
#[derive(Clone, Debug)]
struct InboundPick {
    src: SrcPick,
    dst: Index,
    port: PortPick,
    /// Arrived on net1 rather than eth0 (from a remote source).
    net1: bool,
}

impl InboundPick {
    fn resolve(&self, p: &Policy) -> Inbound {
        let src = match &self.src {
            SrcPick::Passthrough => PASSTHROUGH,
            SrcPick::Localhost => LOCALHOST,
            SrcPick::LoopbackRange(a) => Cidr::new(ip(127, 0, 0, 0), 8).pick(*a),
            SrcPick::Local(i) => nth(&p.local, i).map_or(POD, |a| a.0),
            SrcPick::Remote(a) => *a,
        };
        // Inbound connections are addressed to one of the pod's own
        // (non-loopback) addresses.
        let pod: Vec<u32> = p
            .local
            .iter()
            .map(|a| a.0)
            .filter(|a| !in_loopback_range(*a))
            .collect();
        // What the pod sends itself comes over lo; the rest on eth0 or
        // net1.
        let iface = if p.over_lo(src) {
            LO
        } else if self.net1 {
            NET1
        } else {
            ETH0
        };
        Inbound {
            src: Addr::V4(src),
            dst: Addr::V4(nth(&pod, &self.dst).unwrap_or(POD)),
            dport: self.port.resolve(p),
            ifindex: ifindex_of(iface).unwrap(),
        }
    }
}

fn inbound_pick() -> impl Strategy<Value = InboundPick> {
    let src = prop_oneof![
        1 => Just(SrcPick::Passthrough),
        1 => Just(SrcPick::Localhost),
        1 => any::<u32>().prop_map(SrcPick::LoopbackRange),
        1 => any::<Index>().prop_map(SrcPick::Local),
        6 => (0x0100_0000u32..0xe000_0000).prop_map(SrcPick::Remote),
    ];
    (src, any::<Index>(), port_pick(), prop::bool::weighted(0.3)).prop_map(
        |(src, dst, port, net1)| InboundPick {
            src,
            dst,
            port,
            net1,
        },
    )
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

/// Run the outbound property; returns (compared, skipped as unroutable).
fn outbound_property(loopback_includes: bool) -> (usize, usize) {
    let compared = AtomicUsize::new(0);
    let skipped = AtomicUsize::new(0);
    let result = runner(OUTBOUND_CASES).run(
        &(policy(loopback_includes), outbound_pick()),
        |(p, pick)| match check_outbound(&p, &pick.resolve(&p)) {
            Ok(true) => {
                compared.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(false) => {
                skipped.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(msg) => Err(TestCaseError::fail(msg)),
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    (compared.into_inner(), skipped.into_inner())
}

#[test]
fn outbound_decision_agrees_with_iptables_model() {
    let (compared, skipped) = outbound_property(false);
    eprintln!("outbound: {compared} connections compared, {skipped} unroutable (not compared)");
    assert!(compared >= MIN_COMPARED, "only {compared} cases compared");
}

/// The same with include CIDRs that start in 127.0.0.0/8 (istio's
/// `HasLoopBackIP`, see `loopback_include_cidr_is_captured`).
#[test]
fn outbound_decision_agrees_with_iptables_model_loopback_includes() {
    let (compared, skipped) = outbound_property(true);
    eprintln!("outbound (loopback includes): {compared} compared, {skipped} unroutable");
    assert!(compared >= MIN_COMPARED, "only {compared} cases compared");
}

#[test]
fn inbound_decision_agrees_with_iptables_model() {
    let compared = AtomicUsize::new(0);
    let result = runner(INBOUND_CASES).run(&(policy(true), inbound_pick()), |(p, pick)| {
        check_inbound(&p, &pick.resolve(&p)).map_err(TestCaseError::fail)?;
        compared.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let compared = compared.into_inner();
    eprintln!("inbound: {compared} connections compared");
    assert!(compared >= MIN_COMPARED, "only {compared} cases compared");
}

/// What decided a walk, for comparing two: the action and the deciding
/// rule's text (`None` if no rule did).
fn outcome(w: &Walk) -> (Action, Option<String>) {
    let rule = w
        .deciding()
        .filter(|_| w.note.is_none())
        .map(|h| h.text.clone());
    (w.action, rule)
}

/// `-c` lists the interface the connection uses (and maybe others): the
/// model's walk ends at `-A OUTPUT -o X -j RETURN` / `-A PREROUTING -i X -j
/// RETURN`, before any of istio's chains, whatever else the policy says;
/// the decision passes it too, naming rule c (in-c), wherever `-c` is what
/// changed the outcome.
#[test]
fn excluded_interface_passes_before_every_other_rule() {
    use redirect_common::Rule;
    let out_differs = AtomicUsize::new(0);
    let in_differs = AtomicUsize::new(0);
    let others = || prop::sample::subsequence(EXCLUDE_NAMES.to_vec(), 0..=2);
    let result = runner(OUTBOUND_CASES).run(
        &(policy(true), outbound_pick(), inbound_pick(), others()),
        |(p, opick, ipick, others)| {
            // Outbound.
            let c = opick.resolve(&p);
            let Addr::V4(dst) = c.dst else { unreachable!() };
            let via = p.route(dst);
            let without = Policy {
                exclude_interfaces: vec![],
                ..p.clone()
            };
            let mut names = others.clone();
            names.insert(0, via);
            let with = Policy {
                exclude_interfaces: names,
                ..p.clone()
            };
            check_outbound(&with, &c).map_err(TestCaseError::fail)?;
            let verdict = decide_outbound(&config(&with), &with, &c);
            prop_assert_eq!(verdict.action, Action::Pass);
            if let Some(walk) = model_outbound(&with, &nat_table(&with), &c) {
                let want = format!("-A OUTPUT -o {via} -j RETURN");
                prop_assert_eq!(outcome(&walk), (Action::Pass, Some(want)), "{}", walk);
                prop_assert_eq!(walk.trace.len(), 1, "{}", walk);
                prop_assert_eq!(verdict.rule, Rule::ExcludedInterface);
                let before = model_outbound(&without, &nat_table(&without), &c).unwrap();
                if before.action != Action::Pass {
                    out_differs.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Inbound.
            let c = ipick.resolve(&p);
            let on = iface_named(c.ifindex).unwrap();
            let mut names = others;
            names.push(on);
            let with = Policy {
                exclude_interfaces: names,
                ..p.clone()
            };
            check_inbound(&with, &c).map_err(TestCaseError::fail)?;
            let walk = model_inbound(&with, &nat_table(&with), &c);
            let verdict = decide_inbound(&config(&with), &with, &c);
            prop_assert_eq!(verdict.action, Action::Pass);
            if walk.note.is_none() {
                let want = format!("-A PREROUTING -i {on} -j RETURN");
                prop_assert_eq!(outcome(&walk), (Action::Pass, Some(want)), "{}", walk);
                prop_assert_eq!(walk.trace.len(), 1, "{}", walk);
            }
            if model_inbound(&without, &nat_table(&without), &c).action != Action::Pass {
                in_differs.fetch_add(1, Ordering::Relaxed);
                prop_assert_eq!(verdict.rule, Rule::InboundExcludedInterface);
            }
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    // `-c` made a difference often enough for the above to mean something.
    let (out_differs, in_differs) = (out_differs.into_inner(), in_differs.into_inner());
    eprintln!("-c changed {out_differs} outbound and {in_differs} inbound outcomes");
    // (Typically some 450 and 700 of the 4000.)
    assert!(out_differs >= 200, "only {out_differs} outbound");
    assert!(in_differs >= 200, "only {in_differs} inbound");
}

/// `-c` listing only interfaces a connection does not use (or names the
/// pod does not have) changes nothing: the same rule decides in the model,
/// and the decision returns the same verdict.
#[test]
fn other_excluded_interfaces_change_nothing() {
    let names = || prop::sample::subsequence(EXCLUDE_NAMES.to_vec(), 1..=4);
    let result = runner(OUTBOUND_CASES).run(
        &(policy(true), outbound_pick(), inbound_pick(), names()),
        |(p, opick, ipick, names)| {
            let without = Policy {
                exclude_interfaces: vec![],
                ..p.clone()
            };
            // Outbound.
            let c = opick.resolve(&p);
            let Addr::V4(dst) = c.dst else { unreachable!() };
            let via = p.route(dst);
            let with = Policy {
                exclude_interfaces: names.iter().copied().filter(|n| *n != via).collect(),
                ..p.clone()
            };
            check_outbound(&with, &c).map_err(TestCaseError::fail)?;
            let walks = [&with, &without].map(|q| model_outbound(q, &nat_table(q), &c));
            prop_assert_eq!(
                walks[0].as_ref().map(outcome),
                walks[1].as_ref().map(outcome)
            );
            prop_assert_eq!(
                decide_outbound(&config(&with), &with, &c),
                decide_outbound(&config(&without), &without, &c)
            );
            // Inbound.
            let c = ipick.resolve(&p);
            let on = iface_named(c.ifindex).unwrap();
            let with = Policy {
                exclude_interfaces: names.iter().copied().filter(|n| *n != on).collect(),
                ..p.clone()
            };
            check_inbound(&with, &c).map_err(TestCaseError::fail)?;
            let walks = [&with, &without].map(|q| model_inbound(q, &nat_table(q), &c));
            prop_assert_eq!(outcome(&walks[0]), outcome(&walks[1]));
            prop_assert_eq!(
                decide_inbound(&config(&with), &with, &c),
                decide_inbound(&config(&without), &without, &c)
            );
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

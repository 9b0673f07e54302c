//! The redirection decision, written once.
//!
//! [`decide_outbound`] walks the rules of istio-iptables' `nat OUTPUT` chain in
//! order (first match wins) and returns what iptables would do with the first
//! packet of a TCP connection or a UDP flow: pass it, or REDIRECT it to a
//! port. UDP is only ever redirected by DNS capture (rule 5). Rule numbers
//! are those of `docs/iptables-rules.md` and `docs/semantics.md`.
//!
//! The policy is reached through the [`PolicyMaps`] trait so the same code runs
//! in the kernel (backed by BPF maps) and in user space (backed by ordinary
//! collections, for `redirect explain` and the tests). The "routed over lo"
//! test runs first (the verdict reports it, and the connect hook needs it to
//! bind a redirected socket); every other lookup happens lazily, in rule
//! order, so a connection decided by an early rule costs no more.

use crate::abi::{Config, config_flags, port_flags};

/// An IP address, host byte order for IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Addr {
    /// IPv4, host order (`0x7f00_0001` is 127.0.0.1).
    V4(u32),
    /// IPv6, as its 16 bytes in network order.
    V6([u8; 16]),
}

/// 127.0.0.1 in host order.
pub const V4_LOCALHOST: u32 = 0x7f00_0001;
/// 127.0.0.6, the source the proxy binds when it forwards inbound traffic.
pub const V4_PASSTHROUGH: u32 = 0x7f00_0006;

impl Addr {
    /// In 127.0.0.0/8 or `::1`: always routed over `lo`.
    #[inline(always)]
    pub fn is_loopback_range(&self) -> bool {
        match self {
            Addr::V4(a) => a >> 24 == 127,
            Addr::V6(b) => *b == V6_LOCALHOST,
        }
    }

    /// The host loopback address of rules 3a and 6: 127.0.0.1/32 or ::1/128.
    #[inline(always)]
    pub fn is_host_loopback(&self) -> bool {
        match self {
            Addr::V4(a) => *a == V4_LOCALHOST,
            Addr::V6(b) => *b == V6_LOCALHOST,
        }
    }

    /// Where a connect to this address goes: the unspecified address
    /// (`0.0.0.0`, `::`) means the host loopback (`127.0.0.1`, `::1`). The
    /// kernel applies that after the connect hook, before iptables sees the
    /// packet, so the decision must apply it too.
    #[inline(always)]
    pub fn connect_target(self) -> Addr {
        match self {
            Addr::V4(0) => Addr::V4(V4_LOCALHOST),
            Addr::V6(b) if b == [0; 16] => Addr::V6(V6_LOCALHOST),
            a => a,
        }
    }

    /// The passthrough source of rule 2: 127.0.0.6 or ::6.
    #[inline(always)]
    pub fn is_passthrough(&self) -> bool {
        match self {
            Addr::V4(a) => *a == V4_PASSTHROUGH,
            Addr::V6(b) => *b == V6_PASSTHROUGH,
        }
    }
}

impl Addr {
    /// From the four network-order words of `user_ip6` / `remote_ip6`: an
    /// IPv4-mapped address (`::ffff:a.b.c.d`) becomes IPv4, as the kernel
    /// routes it (and iptables, not ip6tables, sees it).
    #[inline(always)]
    pub fn from_ip6_words(w: [u32; 4]) -> Addr {
        if is_v4_mapped(w) {
            return Addr::V4(u32::from_be(w[3]));
        }
        Addr::V6(ip6_bytes(w))
    }
}

/// An IPv6 address's bytes as the four network-order words BPF programs
/// see (`user_ip6`, `remote_ip6`, map keys).
#[inline(always)]
pub fn ip6_words(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// The inverse of [`ip6_words`].
#[inline(always)]
pub fn ip6_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let q = w[i].to_ne_bytes();
        b[i * 4] = q[0];
        b[i * 4 + 1] = q[1];
        b[i * 4 + 2] = q[2];
        b[i * 4 + 3] = q[3];
        i += 1;
    }
    b
}

/// Whether the network-order words hold an IPv4-mapped address.
#[inline(always)]
pub fn is_v4_mapped(w: [u32; 4]) -> bool {
    w[0] == 0 && w[1] == 0 && w[2] == 0xffffu32.to_be()
}

/// `::1`.
pub const V6_LOCALHOST: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// `::6`.
pub const V6_PASSTHROUGH: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];

/// The policy data that is too large for [`Config`]: sets and prefix tries.
///
/// Implemented over BPF maps in the kernel and over collections in user space.
pub trait PolicyMaps {
    /// [`port_flags`] bits of a port.
    fn port_flags(&self, port: u16) -> u8;
    /// Whether `uid` is one of the proxy's UIDs.
    fn is_proxy_uid(&self, uid: u32) -> bool;
    /// Whether `gid` is one of the proxy's GIDs.
    fn is_proxy_gid(&self, gid: u32) -> bool;
    /// Whether `dst` falls in an exclude-outbound CIDR.
    fn cidr_excluded(&self, dst: &Addr) -> bool;
    /// Whether `dst` falls in an include-outbound CIDR.
    fn cidr_included(&self, dst: &Addr) -> bool;
    /// Whether the pod's network namespace owns `dst` (so the route to it
    /// leaves through `lo`).
    fn is_local_addr(&self, dst: &Addr) -> bool;
    /// Whether `gid` is in the owner-group filter's list (rule 4). Only
    /// asked when [`config_flags::OWNER_GROUPS_INCLUDE`] or `_EXCLUDE` is
    /// set; the default is an empty list.
    fn is_owner_group(&self, _gid: u32) -> bool {
        false
    }
    /// Whether `dst` is one of the nameservers DNS capture takes (rule 5).
    /// Only asked when [`config_flags::DNS_CAPTURE`] is set without
    /// [`config_flags::DNS_CAPTURE_ALL`]; the default is none.
    fn is_dns_server(&self, _dst: &Addr) -> bool {
        false
    }
    /// Whether `ifindex` is one of the interfaces the policy excludes
    /// (`-c`). Only asked when [`Config::excludes_interfaces`]; the default
    /// is none.
    fn is_excluded_interface(&self, _ifindex: u32) -> bool {
        false
    }
    /// Whether the pod's route to `dst` leaves through an interface the
    /// policy excludes (`-c`): the longest-prefix match over the pod's
    /// routes as they were when the policy was applied. Only asked when
    /// [`Config::excludes_interfaces`]; the default is no.
    fn routed_via_excluded_interface(&self, _dst: &Addr) -> bool {
        false
    }
    /// Whether `dst:port` is one of the explicitly listed services. Only
    /// asked when [`config_flags::HAS_SERVICES`] is set; the default is an
    /// empty list.
    fn is_service(&self, _dst: &Addr, _port: u16) -> bool {
        false
    }
}

/// An outbound TCP connect (or UDP datagram or connect), as the connect
/// and send hooks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outbound {
    /// UDP rather than TCP.
    pub udp: bool,
    /// UID of the socket's owner: the file system UID the socket's file
    /// was opened with ([`config_flags::OWNER_FROM_FILE`]), else the UID of
    /// the task calling `connect()`.
    pub uid: u32,
    /// GID of the socket's owner, likewise.
    pub gid: u32,
    /// The socket's mark (`SO_MARK`), 0 if none.
    pub mark: u32,
    /// Whether the task is in the proxy's cgroup (or below it). Only read
    /// when [`config_flags::HAS_CGROUP`] is set.
    pub in_proxy_cgroup: bool,
    /// Source address if the socket was bound before `connect()`.
    pub bound_src: Option<Addr>,
    /// Destination address asked for.
    pub dst: Addr,
    /// Destination port asked for, host order.
    pub dport: u16,
}

/// Which rule decided, numbered as in `docs/semantics.md`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// 0: bound to a loopback source, destination off `lo`: the kernel
    /// refuses the connect (`EINVAL`) before any iptables rule sees it, so
    /// redirect leaves it to fail the same way → pass.
    LoopbackSourceOffLo = 0,
    /// 1: destination port excluded → pass.
    ExcludedPort,
    /// 2: source 127.0.0.6 over `lo` → pass.
    PassthroughSource,
    /// 3a: the proxy calls a local, non-127.0.0.1 address → inbound port.
    ProxyToLocal,
    /// 3b: someone other than the (first) proxy owner over `lo` → pass.
    LoopbackNotProxy,
    /// 3c: the proxy's own traffic (UID, GID, mark or cgroup) → pass.
    ProxyOwner,
    /// 4: the owner-group filter leaves this owner's traffic alone → pass.
    OwnerGroup,
    /// 5: DNS (TCP or UDP to port 53) to a nameserver DNS capture takes →
    /// the DNS capture port.
    Dns,
    /// 6: destination 127.0.0.1 → pass.
    HostLoopback,
    /// 7: destination in an excluded CIDR → pass.
    ExcludedCidr,
    /// 8: destination port included → proxy port.
    IncludedPort,
    /// 9s: destination is a listed service (`ip:port`) → proxy port.
    Service,
    /// 9: destination in an included CIDR → proxy port.
    IncludedCidr,
    /// 9 with `*`: everything left → proxy port.
    IncludeAll,
    /// End of the chain: nothing captured it → pass.
    NotCaptured,
    /// Inbound: opened from inside the pod (local source). Such connections
    /// are tracked from `nat OUTPUT` and never walk `nat PREROUTING` → pass.
    InboundLocalSource,
    /// Inbound 1: destination port is the tunnel port → pass.
    InboundTunnel,
    /// Inbound 2: `-b '*'` and the port is in the exclude-inbound list → pass.
    InboundExcludedPort,
    /// Inbound 2: `-b '*'`, anything else → inbound capture port.
    InboundAll,
    /// Inbound 3: the port is in the include-inbound list → inbound port.
    InboundIncludedPort,
    /// Inbound 3/4: not in the list (or the list is empty) → pass.
    InboundNotCaptured,
    /// Outbound c: the route to the destination leaves through an excluded
    /// interface (`-c`; istio's `nat OUTPUT -o IFACE -j RETURN`, before
    /// its jump to `ISTIO_OUTPUT`) → pass.
    ExcludedInterface,
    /// Inbound c: arrived on an excluded interface (`-c`; istio's `nat
    /// PREROUTING -i IFACE -j RETURN`) → pass.
    InboundExcludedInterface,
}

impl Rule {
    /// Number of rules (and of per-rule counters).
    pub const COUNT: u32 = Rule::ALL.len() as u32;
    /// All rules, in index order.
    pub const ALL: [Rule; 23] = [
        Rule::LoopbackSourceOffLo,
        Rule::ExcludedPort,
        Rule::PassthroughSource,
        Rule::ProxyToLocal,
        Rule::LoopbackNotProxy,
        Rule::ProxyOwner,
        Rule::OwnerGroup,
        Rule::Dns,
        Rule::HostLoopback,
        Rule::ExcludedCidr,
        Rule::IncludedPort,
        Rule::Service,
        Rule::IncludedCidr,
        Rule::IncludeAll,
        Rule::NotCaptured,
        Rule::InboundLocalSource,
        Rule::InboundTunnel,
        Rule::InboundExcludedPort,
        Rule::InboundAll,
        Rule::InboundIncludedPort,
        Rule::InboundNotCaptured,
        Rule::ExcludedInterface,
        Rule::InboundExcludedInterface,
    ];

    /// The rule with index `n` (as stored in `OrigDst::rule`), if any.
    pub const fn from_index(n: u32) -> Option<Rule> {
        if n < Rule::COUNT {
            Some(Rule::ALL[n as usize])
        } else {
            None
        }
    }

    /// Whether it is a rule of the inbound chain.
    pub const fn is_inbound(self) -> bool {
        matches!(
            self,
            Rule::InboundLocalSource
                | Rule::InboundTunnel
                | Rule::InboundExcludedPort
                | Rule::InboundAll
                | Rule::InboundIncludedPort
                | Rule::InboundNotCaptured
                | Rule::InboundExcludedInterface
        )
    }

    /// The rule's number in `docs/iptables-rules.md` (as `status` and
    /// `explain` print it).
    pub const fn number(self) -> &'static str {
        match self {
            Rule::LoopbackSourceOffLo => "0",
            Rule::ExcludedPort => "1",
            Rule::PassthroughSource => "2",
            Rule::ProxyToLocal => "3a",
            Rule::LoopbackNotProxy => "3b",
            Rule::ProxyOwner => "3c",
            Rule::OwnerGroup => "4",
            Rule::Dns => "5",
            Rule::HostLoopback => "6",
            Rule::ExcludedCidr => "7",
            Rule::IncludedPort => "8",
            Rule::Service => "9s",
            Rule::IncludedCidr | Rule::IncludeAll => "9",
            Rule::NotCaptured => "end",
            Rule::InboundLocalSource => "in-local",
            Rule::InboundTunnel => "in-1",
            Rule::InboundExcludedPort | Rule::InboundAll => "in-2",
            Rule::InboundIncludedPort => "in-3",
            Rule::InboundNotCaptured => "in-end",
            Rule::ExcludedInterface => "c",
            Rule::InboundExcludedInterface => "in-c",
        }
    }

    /// Stable snake_case name (counters, JSON).
    pub const fn name(self) -> &'static str {
        match self {
            Rule::LoopbackSourceOffLo => "loopback_source_off_lo",
            Rule::ExcludedPort => "excluded_port",
            Rule::PassthroughSource => "passthrough_source",
            Rule::ProxyToLocal => "proxy_to_local",
            Rule::LoopbackNotProxy => "loopback_not_proxy",
            Rule::ProxyOwner => "proxy_owner",
            Rule::OwnerGroup => "owner_group",
            Rule::Dns => "dns",
            Rule::HostLoopback => "host_loopback",
            Rule::ExcludedCidr => "excluded_cidr",
            Rule::IncludedPort => "included_port",
            Rule::Service => "service",
            Rule::IncludedCidr => "included_cidr",
            Rule::IncludeAll => "include_all",
            Rule::NotCaptured => "not_captured",
            Rule::InboundLocalSource => "inbound_local_source",
            Rule::InboundTunnel => "inbound_tunnel",
            Rule::InboundExcludedPort => "inbound_excluded_port",
            Rule::InboundAll => "inbound_all",
            Rule::InboundIncludedPort => "inbound_included_port",
            Rule::InboundNotCaptured => "inbound_not_captured",
            Rule::ExcludedInterface => "excluded_interface",
            Rule::InboundExcludedInterface => "inbound_excluded_interface",
        }
    }

    /// One line on what the rule is.
    pub const fn describe(self) -> &'static str {
        match self {
            Rule::LoopbackSourceOffLo => {
                "bound to a loopback source with a destination off lo: the kernel refuses it"
            }
            Rule::ExcludedPort => "destination port is in the exclude-outbound-ports list",
            Rule::PassthroughSource => "source is the passthrough address 127.0.0.6 over lo",
            Rule::ProxyToLocal => {
                "the proxy connects over lo to a local address other than 127.0.0.1"
            }
            Rule::LoopbackNotProxy => "a non-proxy owner connects over lo",
            Rule::ProxyOwner => "the proxy's own traffic (UID, GID, mark or cgroup match)",
            Rule::OwnerGroup => "the owner-group filter does not capture this owner's group",
            Rule::Dns => "DNS to port 53 of a nameserver DNS capture takes",
            Rule::HostLoopback => "destination is 127.0.0.1",
            Rule::ExcludedCidr => "destination is in an exclude-outbound CIDR",
            Rule::IncludedPort => "destination port is in the include-outbound-ports list",
            Rule::Service => "destination ip:port is a listed service",
            Rule::IncludedCidr => "destination is in an include-outbound CIDR",
            Rule::IncludeAll => "include-outbound CIDRs is '*'",
            Rule::NotCaptured => "no rule captured it (include list empty or no match)",
            Rule::InboundLocalSource => "opened from inside the pod: never walks nat PREROUTING",
            Rule::InboundTunnel => "destination port is the tunnel port",
            Rule::InboundExcludedPort => {
                "inbound ports '*' and the port is in the exclude-inbound-ports list"
            }
            Rule::InboundAll => "inbound ports '*': every other port is captured",
            Rule::InboundIncludedPort => "destination port is in the inbound-ports list",
            Rule::InboundNotCaptured => "inbound port not listed (or no inbound capture)",
            Rule::ExcludedInterface => {
                "the route to the destination leaves through an excluded interface"
            }
            Rule::InboundExcludedInterface => "arrived on an excluded interface",
        }
    }
}

/// What happens to the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Left alone: it goes where it asked.
    Pass,
    /// Sent to this local port (the proxy's outbound or inbound port).
    Redirect(u16),
}

/// A decision and the rule that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Verdict {
    /// Pass or redirect.
    pub action: Action,
    /// Which rule decided.
    pub rule: Rule,
    /// Whether the destination is routed over `lo` (127.0.0.0/8 or an
    /// address the namespace owns). The connect hook uses it to pick the
    /// source address of a redirected socket without a second lookup.
    pub over_lo: bool,
}

impl Verdict {
    #[inline(always)]
    const fn pass(rule: Rule) -> Self {
        Verdict {
            action: Action::Pass,
            rule,
            over_lo: false,
        }
    }

    #[inline(always)]
    const fn redirect(port: u16, rule: Rule) -> Self {
        Verdict {
            action: Action::Redirect(port),
            rule,
            over_lo: false,
        }
    }
}

/// Rule 3 for one owner list (UIDs or GIDs), collapsed.
///
/// istio-iptables emits, per owner `o` of the list in order:
/// a. `-o lo ! -d 127.0.0.1 ! --dport tunnel --owner o → inbound port`,
/// b. `-o lo ! --owner o → RETURN`, c. `--owner o → RETURN`.
/// Over `lo`, rule b of the *first* owner catches everything rules a and c of
/// that owner do not, so the first owner alone decides; off `lo`, only rule c
/// can match, for any owner of the list.
///
/// When an include CIDR is a loopback address, istio leaves every rule b out
/// ([`config_flags::LOOPBACK_INCLUDE`]): then any owner of the list takes
/// rule a or c, and other owners' loopback traffic walks on.
///
/// Rules a and b are TCP's; without DNS capture rule b matches any
/// protocol. With DNS capture, rule b leaves TCP to port 53 out (`-p tcp !
/// --dport 53`), and so does rule a of a UID list (`-m multiport !
/// --dports 53,TUNNEL`) but not that of a GID list (`! --dport TUNNEL`), as
/// istio-iptables writes them: such a connection, and any UDP, then meets
/// only rule a (`a_takes_dns`) and rule c of each owner.
#[inline(always)]
fn owner_rules(
    cfg: &Config,
    over_lo: bool,
    is_first: bool,
    in_list: impl FnOnce() -> bool,
    a_takes_dns: bool,
    c: &Outbound,
) -> Option<Verdict> {
    let to_inbound = || !c.dst.is_host_loopback() && c.dport != cfg.tunnel_port;
    let dns = cfg.has(config_flags::DNS_CAPTURE);
    if c.udp && dns {
        // Rule b is TCP-only with DNS capture; rule a is TCP's.
        return in_list().then_some(Verdict::pass(Rule::ProxyOwner));
    }
    if c.udp {
        // Rule b, any protocol, decides over lo (first owner: rule c).
        if over_lo && !cfg.has(config_flags::LOOPBACK_INCLUDE) {
            return Some(Verdict::pass(if is_first {
                Rule::ProxyOwner
            } else {
                Rule::LoopbackNotProxy
            }));
        }
        return in_list().then_some(Verdict::pass(Rule::ProxyOwner));
    }
    if dns && c.dport == 53 {
        if !in_list() {
            return None;
        }
        if a_takes_dns && over_lo && to_inbound() {
            return Some(Verdict::redirect(cfg.inbound_port, Rule::ProxyToLocal));
        }
        return Some(Verdict::pass(Rule::ProxyOwner));
    }
    if over_lo && !cfg.has(config_flags::LOOPBACK_INCLUDE) {
        if !is_first {
            return Some(Verdict::pass(Rule::LoopbackNotProxy));
        }
        if to_inbound() {
            return Some(Verdict::redirect(cfg.inbound_port, Rule::ProxyToLocal));
        }
        return Some(Verdict::pass(Rule::ProxyOwner));
    }
    if in_list() {
        if over_lo && to_inbound() {
            return Some(Verdict::redirect(cfg.inbound_port, Rule::ProxyToLocal));
        }
        return Some(Verdict::pass(Rule::ProxyOwner));
    }
    None
}

/// Decide an outbound TCP connect, or a UDP datagram, the way
/// istio-iptables' `nat OUTPUT` chain would (rules 1 to 9 of
/// `docs/semantics.md`).
#[inline(always)]
pub fn decide_outbound<P: PolicyMaps>(cfg: &Config, maps: &P, c: &Outbound) -> Verdict {
    let c = &Outbound {
        dst: c.dst.connect_target(),
        ..*c
    };
    // "Routed over lo": a loopback destination or one the namespace owns.
    let over_lo = c.dst.is_loopback_range() || maps.is_local_addr(&c.dst);
    let mut v = walk(cfg, maps, c, over_lo);
    v.over_lo = over_lo;
    v
}

/// The rule walk proper, first match wins.
#[inline(always)]
fn walk<P: PolicyMaps>(cfg: &Config, maps: &P, c: &Outbound, over_lo: bool) -> Verdict {
    // 0. a loopback source cannot reach off lo: no rule ever sees it.
    if !over_lo
        && let Some(src) = c.bound_src
        && src.is_loopback_range()
    {
        return Verdict::pass(Rule::LoopbackSourceOffLo);
    }
    // c. the route leaves through an excluded interface: istio returns
    // from `nat OUTPUT` before its jump to ISTIO_OUTPUT.
    if cfg.excludes_interfaces() && maps.routed_via_excluded_interface(&c.dst) {
        return Verdict::pass(Rule::ExcludedInterface);
    }
    let ports = maps.port_flags(c.dport);
    // 1. exclude outbound ports.
    if ports & port_flags::OUT_EXCLUDE != 0 {
        return Verdict::pass(Rule::ExcludedPort);
    }
    // 2. the proxy's passthrough source.
    if over_lo
        && let Some(src) = c.bound_src
        && src.is_passthrough()
    {
        return Verdict::pass(Rule::PassthroughSource);
    }
    // 3. proxy owners: UIDs, then GIDs, ...
    if cfg.has(config_flags::HAS_UIDS)
        && let Some(v) = owner_rules(
            cfg,
            over_lo,
            c.uid == cfg.first_uid,
            || maps.is_proxy_uid(c.uid),
            false,
            c,
        )
    {
        return v;
    }
    if cfg.has(config_flags::HAS_GIDS)
        && let Some(v) = owner_rules(
            cfg,
            over_lo,
            c.gid == cfg.first_gid,
            || maps.is_proxy_gid(c.gid),
            true,
            c,
        )
    {
        return v;
    }
    // ... then the proxy's socket mark, then its cgroup: one owner each.
    let marked = c.mark == cfg.proxy_mark;
    if cfg.has(config_flags::HAS_MARK)
        && let Some(v) = owner_rules(cfg, over_lo, marked, || marked, false, c)
    {
        return v;
    }
    if cfg.has(config_flags::HAS_CGROUP)
        && let Some(v) = owner_rules(
            cfg,
            over_lo,
            c.in_proxy_cgroup,
            || c.in_proxy_cgroup,
            false,
            c,
        )
    {
        return v;
    }
    // 4. the owner-group filter.
    if cfg.has(config_flags::OWNER_GROUPS_INCLUDE) && !maps.is_owner_group(c.gid) {
        return Verdict::pass(Rule::OwnerGroup);
    }
    if cfg.has(config_flags::OWNER_GROUPS_EXCLUDE) && maps.is_owner_group(c.gid) {
        return Verdict::pass(Rule::OwnerGroup);
    }
    // 5. DNS capture: TCP and UDP to port 53 of the nameservers (or any).
    if cfg.has(config_flags::DNS_CAPTURE)
        && c.dport == 53
        && (cfg.has(config_flags::DNS_CAPTURE_ALL) || maps.is_dns_server(&c.dst))
    {
        return Verdict::redirect(cfg.dns_port, Rule::Dns);
    }
    // 6. the host loopback address.
    if c.dst.is_host_loopback() {
        return Verdict::pass(Rule::HostLoopback);
    }
    // 7. exclude outbound CIDRs.
    if cfg.has(config_flags::HAS_EXCLUDE_CIDRS) && maps.cidr_excluded(&c.dst) {
        return Verdict::pass(Rule::ExcludedCidr);
    }
    // Everything below redirects TCP only (ISTIO_REDIRECT is `-p tcp`).
    if c.udp {
        return Verdict::pass(Rule::NotCaptured);
    }
    // 8. include outbound ports.
    if ports & port_flags::OUT_INCLUDE != 0 {
        return Verdict::redirect(cfg.proxy_port, Rule::IncludedPort);
    }
    // 9s. listed services.
    if cfg.has(config_flags::HAS_SERVICES) && maps.is_service(&c.dst, c.dport) {
        return Verdict::redirect(cfg.proxy_port, Rule::Service);
    }
    // 9. include outbound CIDRs.
    if cfg.has(config_flags::INCLUDE_ALL) {
        return Verdict::redirect(cfg.proxy_port, Rule::IncludeAll);
    }
    if cfg.has(config_flags::HAS_INCLUDE_CIDRS) && maps.cidr_included(&c.dst) {
        return Verdict::redirect(cfg.proxy_port, Rule::IncludedCidr);
    }
    Verdict::pass(Rule::NotCaptured)
}

/// An inbound TCP connection, as `sk_lookup` sees its first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inbound {
    /// The peer's address (the packet's source).
    pub src: Addr,
    /// The local address asked for.
    pub dst: Addr,
    /// The local port asked for, host order.
    pub dport: u16,
    /// The interface the packet arrived on (its ifindex). Only read when
    /// [`Config::excludes_interfaces`].
    pub ifindex: u32,
}

/// Decide an inbound TCP connection the way istio-iptables' `nat PREROUTING`
/// chain would (inbound rules 1–4 of `docs/semantics.md`).
///
/// Connections the pod opens to itself (source owned by the namespace or in
/// the loopback range, e.g. the proxy forwarding from 127.0.0.6) are decided
/// by the outbound chain when they start and never walk PREROUTING: they
/// pass here.
#[inline(always)]
pub fn decide_inbound<P: PolicyMaps>(cfg: &Config, maps: &P, c: &Inbound) -> Verdict {
    let mut v = walk_inbound(cfg, maps, c);
    v.over_lo = false;
    v
}

#[inline(always)]
fn walk_inbound<P: PolicyMaps>(cfg: &Config, maps: &P, c: &Inbound) -> Verdict {
    let all = cfg.has(config_flags::INBOUND_ALL);
    if !all && !cfg.has(config_flags::INBOUND_LIST) {
        // 4. nothing inbound is captured (no PREROUTING jump at all).
        return Verdict::pass(Rule::InboundNotCaptured);
    }
    if c.src.is_loopback_range() || maps.is_local_addr(&c.src) {
        return Verdict::pass(Rule::InboundLocalSource);
    }
    // c. an excluded interface: istio returns from `nat PREROUTING` before
    // its jump to ISTIO_INBOUND.
    if cfg.excludes_interfaces() && maps.is_excluded_interface(c.ifindex) {
        return Verdict::pass(Rule::InboundExcludedInterface);
    }
    // 1. the tunnel port.
    if c.dport == cfg.tunnel_port {
        return Verdict::pass(Rule::InboundTunnel);
    }
    let ports = maps.port_flags(c.dport);
    if all {
        // 2. '*' minus the excluded ports.
        if ports & port_flags::IN_EXCLUDE != 0 {
            return Verdict::pass(Rule::InboundExcludedPort);
        }
        return Verdict::redirect(cfg.inbound_port, Rule::InboundAll);
    }
    // 3. a list.
    if ports & port_flags::IN_INCLUDE != 0 {
        return Verdict::redirect(cfg.inbound_port, Rule::InboundIncludedPort);
    }
    Verdict::pass(Rule::InboundNotCaptured)
}

//! Unit and property tests of the shared decision function, over a plain
//! in-memory policy.

use proptest::prelude::*;
use redirect_common::*;

#[derive(Clone, Debug, Default)]
struct Maps {
    exclude_ports: Vec<u16>,
    include_ports: Vec<u16>,
    uids: Vec<u32>,
    gids: Vec<u32>,
    exclude: Vec<(u32, u8)>,
    include: Vec<(u32, u8)>,
    local: Vec<u32>,
    owner_groups: Vec<u32>,
    services: Vec<(u32, u16)>,
}

fn in_cidr(a: u32, (net, len): (u32, u8)) -> bool {
    len == 0 || (a >> (32 - len)) == (net >> (32 - len))
}

impl PolicyMaps for Maps {
    fn port_flags(&self, port: u16) -> u8 {
        let mut f = 0;
        if self.exclude_ports.contains(&port) {
            f |= port_flags::OUT_EXCLUDE;
        }
        if self.include_ports.contains(&port) {
            f |= port_flags::OUT_INCLUDE;
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
        matches!(dst, Addr::V4(a) if self.exclude.iter().any(|c| in_cidr(*a, *c)))
    }
    fn cidr_included(&self, dst: &Addr) -> bool {
        matches!(dst, Addr::V4(a) if self.include.iter().any(|c| in_cidr(*a, *c)))
    }
    fn is_local_addr(&self, dst: &Addr) -> bool {
        matches!(dst, Addr::V4(a) if self.local.contains(a))
    }
    fn is_owner_group(&self, gid: u32) -> bool {
        self.owner_groups.contains(&gid)
    }
    fn is_service(&self, dst: &Addr, port: u16) -> bool {
        matches!(dst, Addr::V4(a) if self.services.contains(&(*a, port)))
    }
}

const POD: u32 = 0x0ac8_0002; // 10.200.0.2
const OUT: u32 = 0x0ac9_0001; // 10.201.0.1

fn config(m: &Maps, include_all: bool) -> Config {
    let mut flags = 0;
    if !m.uids.is_empty() {
        flags |= config_flags::HAS_UIDS;
    }
    if !m.gids.is_empty() {
        flags |= config_flags::HAS_GIDS;
    }
    if include_all {
        flags |= config_flags::INCLUDE_ALL;
    }
    if !m.include.is_empty() {
        flags |= config_flags::HAS_INCLUDE_CIDRS;
    }
    if !m.exclude.is_empty() {
        flags |= config_flags::HAS_EXCLUDE_CIDRS;
    }
    Config {
        proxy_port: 15001,
        inbound_port: 15006,
        tunnel_port: 15008,
        flags,
        first_uid: m.uids.first().copied().unwrap_or(0),
        first_gid: m.gids.first().copied().unwrap_or(0),
        source_v4: 0,
        dns_port: 0,
        ifindex_offset: 0,
        netns_cookie: 0,
        source_v6: [0; 4],
        proxy_cgroup_id: 0,
        proxy_mark: 0,
        proxy_cgroup_level: 0,
        owner_path: Default::default(),
        policy: 0,
    }
}

fn istio() -> Maps {
    Maps {
        uids: vec![1337],
        gids: vec![1337],
        local: vec![POD, 0x7f00_0001],
        ..Maps::default()
    }
}

fn conn(uid: u32, gid: u32, dst: u32, dport: u16) -> Outbound {
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

fn decide(m: &Maps, all: bool, c: Outbound) -> Verdict {
    decide_outbound(&config(m, all), m, &c)
}

#[test]
fn app_outbound_is_captured_with_wildcard() {
    let v = decide(&istio(), true, conn(1000, 1000, OUT, 80));
    assert_eq!(v.action, Action::Redirect(15001));
    assert_eq!(v.rule, Rule::IncludeAll);
}

#[test]
fn empty_include_captures_nothing() {
    let v = decide(&istio(), false, conn(1000, 1000, OUT, 80));
    assert_eq!(
        v,
        Verdict {
            action: Action::Pass,
            rule: Rule::NotCaptured,
            over_lo: false,
        }
    );
}

#[test]
fn proxy_is_exempt() {
    let v = decide(&istio(), true, conn(1337, 1337, OUT, 80));
    assert_eq!(v.rule, Rule::ProxyOwner);
    assert_eq!(v.action, Action::Pass);
}

#[test]
fn proxy_to_own_pod_goes_inbound_except_tunnel_and_localhost() {
    let m = istio();
    let v = decide(&m, true, conn(1337, 1337, POD, 8080));
    assert_eq!(v.action, Action::Redirect(15006));
    assert_eq!(v.rule, Rule::ProxyToLocal);
    assert_eq!(
        decide(&m, true, conn(1337, 1337, POD, 15008)).rule,
        Rule::ProxyOwner
    );
    assert_eq!(
        decide(&m, true, conn(1337, 1337, 0x7f00_0001, 8080)).rule,
        Rule::ProxyOwner
    );
    // 127.0.0.2 is over lo and not 127.0.0.1: also inbound (as iptables).
    assert_eq!(
        decide(&m, true, conn(1337, 1337, 0x7f00_0002, 8080)).action,
        Action::Redirect(15006)
    );
}

#[test]
fn app_over_loopback_passes() {
    let m = istio();
    assert_eq!(
        decide(&m, true, conn(1000, 1000, POD, 8080)).rule,
        Rule::LoopbackNotProxy
    );
    assert_eq!(
        decide(&m, true, conn(1000, 1000, 0x7f00_0001, 8080)).rule,
        Rule::LoopbackNotProxy
    );
}

#[test]
fn second_uid_over_lo_is_passed_by_first_uids_rule() {
    // istio-iptables: "-o lo -m owner ! --uid-owner 3 -j RETURN" comes
    // before any rule for UID 4, so UID 4 over lo is passed, not sent inbound.
    let m = Maps {
        uids: vec![3, 4],
        local: vec![POD],
        ..Maps::default()
    };
    assert_eq!(
        decide(&m, true, conn(4, 4, POD, 8080)).rule,
        Rule::LoopbackNotProxy
    );
    assert_eq!(
        decide(&m, true, conn(3, 3, POD, 8080)).action,
        Action::Redirect(15006)
    );
    // Off lo, both are exempt.
    assert_eq!(decide(&m, true, conn(4, 4, OUT, 80)).rule, Rule::ProxyOwner);
}

#[test]
fn gid_rules_apply_when_uid_does_not_match() {
    let m = Maps {
        uids: vec![1337],
        gids: vec![7],
        local: vec![POD],
        ..Maps::default()
    };
    assert_eq!(
        decide(&m, true, conn(2000, 7, OUT, 80)).rule,
        Rule::ProxyOwner
    );
    assert_eq!(
        decide(&m, true, conn(2000, 8, OUT, 80)).rule,
        Rule::IncludeAll
    );
}

#[test]
fn passthrough_source_passes_over_lo_only() {
    let m = istio();
    let mut c = conn(1337, 1337, POD, 8080);
    c.bound_src = Some(Addr::V4(V4_PASSTHROUGH));
    assert_eq!(decide(&m, true, c).rule, Rule::PassthroughSource);
    // Off lo a loopback source cannot be routed: the kernel refuses the
    // connect before iptables sees it (measured by the differential test),
    // so it is passed, not captured.
    let mut c = conn(1000, 1000, OUT, 80);
    c.bound_src = Some(Addr::V4(V4_PASSTHROUGH));
    assert_eq!(decide(&m, true, c).rule, Rule::LoopbackSourceOffLo);
    assert_eq!(decide(&m, true, c).action, Action::Pass);
}

#[test]
fn rule_order_ports_and_cidrs() {
    let mut m = istio();
    m.exclude_ports = vec![22];
    m.include_ports = vec![22, 8443];
    m.exclude = vec![(0x0ac9_0000, 16)];
    m.include = vec![(0x0a00_0000, 8)];
    // 1 beats 8.
    assert_eq!(
        decide(&m, false, conn(1000, 1000, OUT, 22)).rule,
        Rule::ExcludedPort
    );
    // 7 beats 8 and 9.
    assert_eq!(
        decide(&m, false, conn(1000, 1000, OUT, 8443)).rule,
        Rule::ExcludedCidr
    );
    assert_eq!(
        decide(&m, true, conn(1000, 1000, OUT, 80)).rule,
        Rule::ExcludedCidr
    );
    // 8 on an unlisted CIDR.
    assert_eq!(
        decide(&m, false, conn(1000, 1000, 0x0b00_0001, 8443)).rule,
        Rule::IncludedPort
    );
    // 9 by list.
    assert_eq!(
        decide(&m, false, conn(1000, 1000, 0x0a0a_0001, 80)).rule,
        Rule::IncludedCidr
    );
    assert_eq!(
        decide(&m, false, conn(1000, 1000, 0x0b00_0001, 80)).rule,
        Rule::NotCaptured
    );
    // 6: 127.0.0.1 passes even for nobody-owned lists.
    let bare = Maps::default();
    assert_eq!(
        decide(&bare, true, conn(1000, 1000, 0x7f00_0001, 80)).rule,
        Rule::HostLoopback
    );
}

#[test]
fn rule_names_and_counters_are_distinct() {
    let mut names: Vec<&str> = Rule::ALL.iter().map(|r| r.name()).collect();
    names.extend(Counter::ALL.iter().map(|c| c.name()));
    let n = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), n);
    for (i, r) in Rule::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i);
    }
    assert_eq!(
        Counter::TOTAL as usize,
        Rule::ALL.len() + Counter::ALL.len()
    );
}

fn arb_maps() -> impl Strategy<Value = (Maps, bool)> {
    (
        prop::collection::vec(1u16..100, 0..3),
        prop::collection::vec(1u16..100, 0..3),
        prop::collection::vec(0u32..5, 0..3),
        prop::collection::vec(0u32..5, 0..3),
        prop::collection::vec((any::<u32>(), 0u8..=32), 0..4),
        prop::collection::vec((any::<u32>(), 0u8..=32), 0..4),
        any::<bool>(),
    )
        .prop_map(|(ep, ip, uids, gids, ex, inc, all)| {
            let mut uids = uids;
            uids.dedup();
            let mut gids = gids;
            gids.dedup();
            (
                Maps {
                    exclude_ports: ep,
                    include_ports: ip,
                    uids,
                    gids,
                    exclude: ex,
                    include: inc,
                    local: vec![POD],
                    ..Maps::default()
                },
                all,
            )
        })
}

fn arb_conn() -> impl Strategy<Value = Outbound> {
    (
        0u32..6,
        0u32..6,
        prop_oneof![
            Just(POD),
            Just(0x7f00_0001u32),
            Just(0x7f00_0002u32),
            Just(OUT),
            any::<u32>()
        ],
        prop_oneof![1u16..100, Just(15008u16)],
        prop::option::of(prop_oneof![Just(V4_PASSTHROUGH), Just(POD)]),
    )
        .prop_map(|(uid, gid, dst, dport, src)| Outbound {
            udp: false,
            uid,
            gid,
            mark: 0,
            in_proxy_cgroup: false,
            bound_src: src.map(Addr::V4),
            dst: Addr::V4(dst),
            dport,
        })
}

proptest! {
    #[test]
    fn invariants((m, all) in arb_maps(), c in arb_conn()) {
        let v = decide(&m, all, c);
        let Addr::V4(dst) = c.dst else { unreachable!() };
        // 0.0.0.0 is connected to 127.0.0.1 by the kernel.
        let over_lo = dst == 0 || dst >> 24 == 127 || m.local.contains(&dst);
        // Redirects only ever go to one of the two proxy ports, by the rule
        // that names that port.
        match v.action {
            Action::Redirect(15006) => prop_assert_eq!(v.rule, Rule::ProxyToLocal),
            Action::Redirect(15001) => prop_assert!(matches!(
                v.rule,
                Rule::IncludedPort | Rule::Service | Rule::IncludedCidr | Rule::IncludeAll
            )),
            Action::Redirect(p) => prop_assert!(false, "redirect to {}", p),
            Action::Pass => {}
        }
        // An excluded port is never captured: rule 1 decides, unless rule 0
        // (a loopback source off lo, which the kernel refuses) came first.
        if m.exclude_ports.contains(&c.dport) {
            prop_assert_eq!(v.action, Action::Pass);
            prop_assert!(matches!(v.rule, Rule::ExcludedPort | Rule::LoopbackSourceOffLo));
        }
        // A proxy owner is never sent to the outbound port (no loop).
        if m.uids.contains(&c.uid) || m.gids.contains(&c.gid) {
            prop_assert_ne!(v.action, Action::Redirect(15001));
        }
        // 127.0.0.1 is never captured to the outbound port.
        if dst == 0x7f00_0001 {
            prop_assert_eq!(v.action, Action::Pass);
        }
        // Over lo with any owner list, nothing reaches the outbound port.
        if over_lo && (!m.uids.is_empty() || !m.gids.is_empty()) {
            prop_assert_ne!(v.action, Action::Redirect(15001));
        }
        // Off lo, an excluded CIDR always passes unless an earlier rule did.
        if !over_lo && m.exclude.iter().any(|cidr| in_cidr(dst, *cidr))
            && !m.exclude_ports.contains(&c.dport) {
            prop_assert_eq!(v.action, Action::Pass);
        }
        // The lo fact is reported for every verdict.
        prop_assert_eq!(v.over_lo, over_lo);
        // Deterministic.
        prop_assert_eq!(v, decide(&m, all, c));
    }
}

/// The istio maps with no owner lists, and `extra` config flags.
fn with_flags(m: &Maps, all: bool, extra: u16) -> Config {
    let mut c = config(m, all);
    c.flags |= extra;
    c
}

fn no_owners() -> Maps {
    Maps {
        uids: vec![],
        gids: vec![],
        ..istio()
    }
}

#[test]
fn mark_is_an_owner_like_a_uid() {
    let m = no_owners();
    let mut cfg = with_flags(&m, true, config_flags::HAS_MARK);
    cfg.proxy_mark = 0x1;
    let marked = |dst, port| Outbound {
        mark: 0x1,
        ..conn(1000, 1000, dst, port)
    };
    assert_eq!(
        decide_outbound(&cfg, &m, &marked(OUT, 80)).rule,
        Rule::ProxyOwner
    );
    assert_eq!(
        decide_outbound(&cfg, &m, &conn(1000, 1000, OUT, 80)).rule,
        Rule::IncludeAll
    );
    // Over lo the mark's triplet decides, as the first owner's would.
    assert_eq!(
        decide_outbound(&cfg, &m, &marked(POD, 8080)).action,
        Action::Redirect(15006)
    );
    assert_eq!(
        decide_outbound(&cfg, &m, &conn(1000, 1000, POD, 8080)).rule,
        Rule::LoopbackNotProxy
    );
}

#[test]
fn cgroup_is_an_owner_after_uids_and_gids() {
    let m = istio();
    let mut cfg = with_flags(&m, true, config_flags::HAS_CGROUP);
    cfg.proxy_cgroup_id = 42;
    let in_cg = |dst, port| Outbound {
        in_proxy_cgroup: true,
        ..conn(1000, 1000, dst, port)
    };
    assert_eq!(
        decide_outbound(&cfg, &m, &in_cg(OUT, 80)).rule,
        Rule::ProxyOwner
    );
    // Over lo the first UID's rules come first: a non-1337 task in the
    // proxy's cgroup is passed by rule 3b (as iptables would).
    assert_eq!(
        decide_outbound(&cfg, &m, &in_cg(POD, 8080)).rule,
        Rule::LoopbackNotProxy
    );
    let bare = no_owners();
    let cfg2 = Config {
        flags: with_flags(&bare, true, config_flags::HAS_CGROUP).flags,
        ..cfg
    };
    assert_eq!(
        decide_outbound(&cfg2, &bare, &in_cg(POD, 8080)).action,
        Action::Redirect(15006)
    );
}

#[test]
fn owner_group_filter() {
    let m = Maps {
        owner_groups: vec![3000],
        ..istio()
    };
    let inc = with_flags(&m, true, config_flags::OWNER_GROUPS_INCLUDE);
    assert_eq!(
        decide_outbound(&inc, &m, &conn(1000, 3000, OUT, 80)).rule,
        Rule::IncludeAll
    );
    assert_eq!(
        decide_outbound(&inc, &m, &conn(1000, 1000, OUT, 80)).rule,
        Rule::OwnerGroup
    );
    let exc = with_flags(&m, true, config_flags::OWNER_GROUPS_EXCLUDE);
    assert_eq!(
        decide_outbound(&exc, &m, &conn(1000, 3000, OUT, 80)).rule,
        Rule::OwnerGroup
    );
    assert_eq!(
        decide_outbound(&exc, &m, &conn(1000, 1000, OUT, 80)).rule,
        Rule::IncludeAll
    );
}

#[test]
fn services_capture_exact_ip_and_port() {
    let m = Maps {
        services: vec![(OUT, 80)],
        ..istio()
    };
    let cfg = with_flags(&m, false, config_flags::HAS_SERVICES);
    let v = decide_outbound(&cfg, &m, &conn(1000, 1000, OUT, 80));
    assert_eq!((v.action, v.rule), (Action::Redirect(15001), Rule::Service));
    assert_eq!(
        decide_outbound(&cfg, &m, &conn(1000, 1000, OUT, 81)).rule,
        Rule::NotCaptured
    );
    assert_eq!(
        decide_outbound(&cfg, &m, &conn(1337, 1337, OUT, 80)).rule,
        Rule::ProxyOwner
    );
}

#[test]
fn loopback_include_drops_the_other_owner_return() {
    let m = Maps {
        uids: vec![1337, 1338],
        include: vec![(0x7f00_0000, 8)],
        ..istio()
    };
    let cfg = with_flags(&m, false, config_flags::LOOPBACK_INCLUDE);
    // The app to a 127/8 include: captured (istio has no rule 3b then).
    let v = decide_outbound(&cfg, &m, &conn(1000, 1000, 0x7f01_0203, 80));
    assert_eq!(
        (v.action, v.rule),
        (Action::Redirect(15001), Rule::IncludedCidr)
    );
    // The second proxy UID calling its own pod address: its own rule 3a.
    let v = decide_outbound(&cfg, &m, &conn(1338, 1338, POD, 8080));
    assert_eq!(v.action, Action::Redirect(15006));
}

#[test]
fn unspecified_destination_is_the_host_loopback() {
    // connect(0.0.0.0) goes to 127.0.0.1: never captured, as behind
    // iptables (found by the differential test).
    let v = decide(&istio(), true, conn(1000, 1000, 0, 8080));
    assert_eq!((v.action, v.rule), (Action::Pass, Rule::LoopbackNotProxy));
    let mut c = conn(1000, 1000, 0, 8080);
    c.dst = Addr::V6([0; 16]);
    assert_eq!(decide(&istio(), true, c).action, Action::Pass);
}

//! Micro-benchmark of the decision function, `decide_outbound`, over a
//! user-space `PolicyMaps` (a flag array for ports, hash sets for owners and
//! local addresses, and one hash set per prefix length for CIDR lists,
//! longest first). This measures the decision logic and the cost of the
//! lookups it chooses to make; the kernel's own map lookups (an LPM trie,
//! BPF hash maps) are measured end to end by `cargo xtask bench`.
//!
//! `cargo bench -p redirect-common --bench decide`

use std::{collections::HashSet, hint::black_box, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use redirect_common::{
    Addr, Config, Outbound, PolicyMaps, config_flags, decide_outbound, port_flags,
};

/// A CIDR list as one hash set per prefix length.
#[derive(Default)]
struct Prefixes {
    by_len: Vec<(u8, HashSet<u32>)>,
}

impl Prefixes {
    fn new(cidrs: &[(u32, u8)]) -> Prefixes {
        let mut by_len: Vec<(u8, HashSet<u32>)> = Vec::new();
        for &(net, len) in cidrs {
            let masked = mask(net, len);
            match by_len.iter_mut().find(|(l, _)| *l == len) {
                Some((_, set)) => {
                    set.insert(masked);
                }
                None => by_len.push((len, HashSet::from([masked]))),
            }
        }
        by_len.sort_by_key(|b| std::cmp::Reverse(b.0));
        Prefixes { by_len }
    }

    fn contains(&self, a: u32) -> bool {
        self.by_len
            .iter()
            .any(|(len, set)| set.contains(&mask(a, *len)))
    }
}

fn mask(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - len))
    }
}

struct Maps {
    ports: Box<[u8; 65_536]>,
    uids: HashSet<u32>,
    gids: HashSet<u32>,
    exclude: Prefixes,
    include: Prefixes,
    local: HashSet<u32>,
}

impl PolicyMaps for Maps {
    fn port_flags(&self, port: u16) -> u8 {
        self.ports[port as usize]
    }
    fn is_proxy_uid(&self, uid: u32) -> bool {
        self.uids.contains(&uid)
    }
    fn is_proxy_gid(&self, gid: u32) -> bool {
        self.gids.contains(&gid)
    }
    fn cidr_excluded(&self, dst: &Addr) -> bool {
        matches!(dst, Addr::V4(a) if self.exclude.contains(*a))
    }
    fn cidr_included(&self, dst: &Addr) -> bool {
        matches!(dst, Addr::V4(a) if self.include.contains(*a))
    }
    fn is_local_addr(&self, dst: &Addr) -> bool {
        matches!(dst, Addr::V4(a) if self.local.contains(a))
    }
}

const POD: u32 = 0x0ac8_0002; // 10.200.0.2
const UPSTREAM: u32 = 0x0ac9_0001; // 10.201.0.1

/// N distinct /24s from 11.0.0.0 up, as the end-to-end benchmark uses.
fn exclusions(n: u32) -> Vec<(u32, u8)> {
    (0..n).map(|i| ((11 << 24) + (i << 8), 24)).collect()
}

/// The istio default (`-i '*'`, owners 1337) with `exclude` and
/// `exclude_ports`.
fn policy(exclude: &[(u32, u8)], exclude_ports: &[u16]) -> (Config, Maps) {
    let mut ports = Box::new([0u8; 65_536]);
    for &p in exclude_ports {
        ports[p as usize] |= port_flags::OUT_EXCLUDE;
    }
    let mut flags = config_flags::HAS_UIDS | config_flags::HAS_GIDS | config_flags::INCLUDE_ALL;
    if !exclude.is_empty() {
        flags |= config_flags::HAS_EXCLUDE_CIDRS;
    }
    let cfg = Config {
        proxy_port: 15001,
        inbound_port: 15006,
        tunnel_port: 15008,
        flags,
        first_uid: 1337,
        first_gid: 1337,
        source_v4: POD.to_be(),
        ..Config::default()
    };
    let maps = Maps {
        ports,
        uids: HashSet::from([1337]),
        gids: HashSet::from([1337]),
        exclude: Prefixes::new(exclude),
        include: Prefixes::default(),
        local: HashSet::from([POD, 0x7f00_0001]),
    };
    (cfg, maps)
}

fn conn(uid: u32, dst: u32, dport: u16) -> Outbound {
    Outbound {
        udp: false,
        uid,
        gid: uid,
        mark: 0,
        in_proxy_cgroup: false,
        bound_src: None,
        dst: Addr::V4(dst),
        dport,
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("decide_outbound");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    let cases: Vec<(&str, (Config, Maps), Outbound)> = vec![
        (
            "istio_default_app_captured",
            policy(&[], &[]),
            conn(1000, UPSTREAM, 80),
        ),
        (
            "proxy_own_traffic",
            policy(&[], &[]),
            conn(1337, UPSTREAM, 80),
        ),
        (
            "app_loopback",
            policy(&[], &[]),
            conn(1000, 0x7f00_0001, 8080),
        ),
        (
            "excluded_port",
            policy(&[], &[22]),
            conn(1000, UPSTREAM, 22),
        ),
        (
            "exclusions_10_miss",
            policy(&exclusions(10), &[]),
            conn(1000, UPSTREAM, 80),
        ),
        (
            "exclusions_100000_miss",
            policy(&exclusions(100_000), &[]),
            conn(1000, UPSTREAM, 80),
        ),
        (
            "exclusions_100000_hit",
            policy(&exclusions(100_000), &[]),
            conn(1000, (11 << 24) + (77 << 8) + 5, 80),
        ),
    ];
    for (name, (cfg, maps), c) in &cases {
        g.bench_function(*name, |b| {
            b.iter(|| decide_outbound(black_box(cfg), black_box(maps), black_box(c)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

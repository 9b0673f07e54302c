//! Differential test: the same policies and the same connections through
//! real iptables (istio's rule set rendered by `redirect iptables`, loaded
//! with `iptables-restore`, legacy and nft backends) and through redirect,
//! each in its own identical pod. Every connection's outcome (which listener
//! got it, and the original destination the proxy learned) must agree.
//!
//! The matrix: owners × destination classes × ports × bound source for
//! outbound connections from the pod, plus inbound connections from outside
//! to every pod port. Run once per policy of the corpus.
//!
//! DNS capture (`--redirect-dns`, rule 5) has a corpus and a matrix of its
//! own ([`dns_capture_same_outcomes_as_iptables_legacy_and_nft`]): the same
//! owners send DNS over UDP (unconnected `sendto`/`recvfrom`, and connected)
//! and TCP to listed and unlisted nameservers, to port 53 and to another
//! port, over IPv4, IPv6 and IPv4-mapped; the iptables pods load istio's
//! `nat` *and* `raw` tables (its conntrack zones, without which the DNS
//! proxy's answers would not be un-NATed). Compared for UDP: which listener
//! answered, at which of its addresses, and the answer's source address as
//! the application saw it (`recvfrom`), and for connected sockets also
//! `getpeername`; under iptables conntrack rewrites the answer's source
//! back to the nameserver asked, and redirect must show the same.
//!
//! Excluded interfaces (`-c`, istio's `-A PREROUTING -i IFACE -j RETURN`
//! and `-A OUTPUT -o IFACE -j RETURN`) have a corpus and worlds of their
//! own ([`interface_rules_same_outcomes_as_iptables_legacy_and_nft`]):
//! each pod gets a second interface, `net1`
//! ([`redirect_tests::pod::Pod::add_second_interface`]), with a server
//! upstream (`upstream-net1`) on the addresses reached through it and on
//! the one inside its prefix routed back through `eth0` ([`NET1_HOLE`]).
//! The policies exclude `net1`, `eth0`, `lo`, two of them, patterns
//! (`net+`, `+`) and an interface the pod does not have, with and without
//! owners, excluded CIDRs, services, ports and IPv6 includes. A few owners
//! connect out to destinations whose routes leave through each interface
//! (IPv4, IPv6, IPv4-mapped; the pod's own addresses over `lo`, also from
//! 127.0.0.6), and the upstream host connects in to the pod's addresses on
//! `net1` and on `eth0`, and to one of each that it reaches through the
//! other interface (what counts is the interface a connection arrives on,
//! not the one holding its address). Some destinations are behind routes
//! with metrics: two routes to one prefix (the lowest metric is used), and
//! one with a metric of 100,000,000; others have routes through `net1` in
//! a table no rule selects (the main table's are used). Besides agreeing, the corpus must capture
//! each interface's traffic under some policies and leave it alone under
//! those excluding it, and iptables must never hand the proxy a connection
//! of an excluded interface.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    sync::Mutex,
    time::Instant,
};

use redirect_tests::{
    APP_PORT, Fixture, can_run, other,
    peer::{ClientView, ProbeView, Proto},
    pod::{
        As, NET1_HOLE, NET1_POD_IP, NET1_POD_IP6, NET1_REMOTE, NET1_REMOTE6, NET1_UPSTREAM_IP,
        NET1_UPSTREAM_IP6, POD_IP, POD_IP6, Side, UPSTREAM_IP, UPSTREAM_IP6, sample_bin,
        upstream_extra, upstream_extra6,
    },
    redirect_bin,
};

/// The policies, as `apply` / `iptables` flags. `{proxy_cgroup}` stands for
/// each pod's own `proxy/` cgroup.
const POLICIES: &[&[&str]] = &[
    &[],
    &["-i", "*"],
    &["-i", "10.201.0.0/30"],
    &["-i", "*", "-x", "10.201.0.0/30"],
    &["-i", "*", "-x", "10.201.0.2/32,10.201.0.8/29"],
    &["-q", "81"],
    &["-i", "10.201.0.0/30", "-q", "81"],
    &["-i", "*", "-o", "81"],
    &["-i", "*", "-o", "81,8080", "-x", "10.201.0.1"],
    &["-i", "*", "-u", "1337,3", "-g", "1337,4"],
    &["-i", "*", "-u", "", "-g", ""],
    &["-i", "*", "-u", "3", "-g", ""],
    &["-i", "*", "-u", "", "-g", "1337"],
    &["-i", "*", "-u", "1337", "-g", "4,1337"],
    &["-b", "*"],
    &["-b", "*", "-d", "2222,9090"],
    &["-b", "8080,15008"],
    &["-b", "*", "-i", "*", "-d", "2222"],
    &["-i", "*", "-b", "8080", "-x", "10.200.0.0/24"],
    &["-i", "10.200.0.1/32,127.0.0.2/32,10.200.0.2/32"],
    &["-i", "*", "--tunnel-port", "8080"],
    &["-i", "*", "-q", "15008", "-x", "0.0.0.0/0"],
    &["-i", "*", "-x", "0.0.0.0/0", "-b", "*", "-d", "15008"],
    &["-i", "127.0.0.0/8", "-u", "1000"],
    &["-i", "*", "-u", "", "-g", "", "--proxy-mark", "0x1"],
    &["-i", "*", "--proxy-mark", "0x1"],
    &[
        "-i",
        "*",
        "-u",
        "",
        "-g",
        "",
        "--proxy-cgroup",
        "{proxy_cgroup}",
    ],
    &[
        "-i",
        "10.201.0.0/30",
        "--proxy-cgroup",
        "{proxy_cgroup}",
        "-g",
        "",
    ],
    &["-i", "*", "--owner-groups-include", "1000,4"],
    &["-i", "*", "--owner-groups-exclude", "4"],
    &["--service", "10.201.0.1:80,10.201.0.9:81,10.200.0.2:8080"],
    &[
        "-i",
        "10.201.0.0/30",
        "--service",
        "10.201.0.5:8080",
        "-x",
        "10.201.0.1",
    ],
    &["-i", "fd00:201::/125", "-x", "fd00:201::2/128"],
    &["-i", "*", "-x", "fd00:201::/64,10.201.0.2/32"],
    &["-i", "fd00:201::1/128,10.201.0.1/32", "-q", "81"],
    &[
        "--service",
        "[fd00:201::9]:81,[fd00:200::2]:8080",
        "-b",
        "8080",
    ],
    &["-i", "::1/128"],
];

/// The DNS capture policies. Every one names its nameservers
/// (`--dns-servers`: the machine's resolv.conf is no part of the test),
/// from the upstream host's addresses (10.200.0.1, fd00:200::1) and
/// loopback ones (127.0.0.53, ::1); 10.201.0.1 and fd00:201::1 are never
/// listed. The DNS proxy runs as UID and GID 1337 and every policy keeps
/// one of them a proxy owner: istio's conntrack zones (the `raw` table)
/// key the proxy's answers on its UID or GID, and without them iptables
/// does not un-NAT the answers at all.
const DNS_POLICIES: &[&[&str]] = &[
    // Capture of DNS alone: no TCP include, no inbound.
    &["--redirect-dns", "--dns-servers", "10.200.0.1,fd00:200::1"],
    &[
        "-i",
        "*",
        "--redirect-dns",
        "--dns-servers",
        "10.200.0.1,fd00:200::1,127.0.0.53",
    ],
    &[
        "-i",
        "*",
        "--redirect-dns",
        "--capture-all-dns",
        "--dns-servers",
        "10.200.0.1",
    ],
    // Rule 5 comes before the excluded CIDRs (7): an excluded nameserver
    // is still captured.
    &[
        "-i",
        "10.201.0.0/30",
        "-x",
        "10.200.0.0/24,fd00:200::/64",
        "--redirect-dns",
        "--dns-servers",
        "10.200.0.1,fd00:200::1",
    ],
    &[
        "-i",
        "*",
        "-x",
        "10.201.0.0/24,fd00:201::/64",
        "--redirect-dns",
        "--capture-all-dns",
        "--dns-servers",
        "127.0.0.53",
    ],
    // Owner exemptions: several UIDs and GIDs.
    &[
        "-i",
        "*",
        "-u",
        "1337,3",
        "-g",
        "1337,4",
        "--redirect-dns",
        "--dns-servers",
        "10.200.0.1,fd00:200::1,127.0.0.53",
    ],
    // GIDs only: a GID's rule 3a keeps port 53 (TCP over lo to the
    // inbound port), a UID's leaves it out.
    &[
        "-i",
        "*",
        "-u",
        "",
        "-g",
        "1337",
        "--redirect-dns",
        "--dns-servers",
        "10.200.0.1,127.0.0.53,::1",
    ],
    &[
        "-i",
        "*",
        "-u",
        "1337",
        "-g",
        "",
        "--redirect-dns",
        "--capture-all-dns",
        "--dns-servers",
        "fd00:200::1",
    ],
    // The owner-group filter (rule 4) comes before rule 5.
    &[
        "-i",
        "*",
        "--owner-groups-include",
        "1000,4",
        "--redirect-dns",
        "--dns-servers",
        "10.200.0.1,fd00:200::1,127.0.0.53",
    ],
    &[
        "-i",
        "*",
        "--owner-groups-exclude",
        "4",
        "--redirect-dns",
        "--capture-all-dns",
        "--dns-servers",
        "10.200.0.1",
    ],
    // redirect's owners: the mark, the cgroup.
    &[
        "-i",
        "*",
        "--proxy-mark",
        "0x1",
        "--redirect-dns",
        "--dns-servers",
        "10.200.0.1,fd00:200::1",
    ],
    &[
        "-i",
        "*",
        "--proxy-cgroup",
        "{proxy_cgroup}",
        "--redirect-dns",
        "--capture-all-dns",
        "--dns-servers",
        "10.200.0.1",
    ],
    // An excluded port 53 (rule 1) leaves nothing for rule 5.
    &[
        "-i",
        "*",
        "-o",
        "53",
        "--redirect-dns",
        "--capture-all-dns",
        "--dns-servers",
        "10.200.0.1",
    ],
    // A loopback include: no rule 3b at all.
    &[
        "-i",
        "127.0.0.0/8",
        "-u",
        "1000",
        "-g",
        "1337",
        "--redirect-dns",
        "--dns-servers",
        "127.0.0.53,10.200.0.1",
    ],
    // An included port 53 (rule 8) comes after rule 5: TCP to an unlisted
    // nameserver goes to the outbound proxy.
    &["-q", "53", "--redirect-dns", "--dns-servers", "fd00:200::1"],
];

/// The excluded-interface policies (`-c`), for pods with `net1`
/// ([`interface_rules_same_outcomes_as_iptables_legacy_and_nft`]). Routes:
/// 10.210.0.0/16 and fd00:210::/64 leave through `net1`, 10.210.7.0/24
/// (inside it) through `eth0`, the pod's own addresses and 127.0.0.0/8
/// through `lo`.
const IFACE_POLICIES: &[&[&str]] = &[
    // Without `-c`: net1's traffic is captured like eth0's.
    &["-i", "*", "-b", "*"],
    &["-i", "*", "-b", "*", "-c", "net1"],
    &["-i", "*", "-b", "*", "-c", "eth0"],
    // Rule 3a (the proxy calling its own pod goes to the inbound port)
    // comes after the interface's RETURN.
    &["-i", "*", "-c", "lo"],
    // iptables' wildcard, matching net1 only; and one matching every
    // interface.
    &["-i", "*", "-b", "*", "-c", "net+"],
    &["-i", "*", "-b", "*", "-c", "+"],
    &["-c", "net1,eth0", "-i", "*", "-b", "*"],
    &["-i", "*", "-b", "*", "-c", "lo,net1"],
    // An include of net1's prefix: the hole routed through eth0 is still
    // captured.
    &["-i", "10.210.0.0/16", "-c", "net1"],
    &["-i", "10.210.0.0/16,10.202.0.0/24", "-c", "eth0"],
    &["-b", "8080", "-c", "net1"],
    &["-b", "*", "-d", "2222", "-c", "eth0"],
    // An interface the pod does not have excludes nothing.
    &["-i", "*", "-b", "*", "-c", "eth7"],
    // A loopback include (no rule 3b): the app is a proxy owner, UID 3's
    // connections over lo are captured unless lo is excluded.
    &["-i", "127.0.0.0/8", "-u", "1000", "-c", "lo"],
    &["-i", "127.0.0.0/8", "-u", "1000", "-c", "eth0,net1"],
    // Owners and excluded CIDRs: UID 3 is a proxy owner (rule 3a for it
    // too, unless lo is excluded).
    &[
        "-i",
        "*",
        "-b",
        "*",
        "-u",
        "1337,3",
        "-g",
        "1337",
        "-x",
        "10.210.7.0/24",
        "-c",
        "lo",
    ],
    &[
        "-i",
        "*",
        "-u",
        "3",
        "-g",
        "",
        "-x",
        "10.202.0.0/24",
        "-c",
        "net1",
    ],
    // Listed services (rule 9s) come after the interface's RETURN.
    &[
        "--service",
        "10.210.0.1:80,10.210.7.1:80,[fd00:210::1]:80",
        "-c",
        "net1",
    ],
    &["-i", "*", "-q", "80", "-o", "8080", "-c", "eth0"],
    // IPv6.
    &["-i", "fd00:210::/64", "-c", "net1"],
    &["-i", "fd00:210::/64,fd00:202::/64", "-b", "*"],
    &["-i", "::/0", "-b", "8080", "-c", "eth0"],
];

/// Addresses of the pod's that the upstream host reaches through the other
/// interface (routes of its own added in the interface worlds): one on
/// `net1` reached through `eth0`, one on `eth0` reached through `net1`,
/// per family. A connection arrives on the interface it came in by, not
/// on the one that holds its address.
const NET1_ADDR_VIA_ETH0: &str = "10.202.0.3";
const ETH0_ADDR_VIA_NET1: &str = "10.200.0.3";
const NET1_ADDR6_VIA_ETH0: &str = "fd00:202::3";
const ETH0_ADDR6_VIA_NET1: &str = "fd00:200::3";

/// Upstream addresses behind routes with metrics in the interface worlds:
/// [`METRIC_FAR`]'s route (10.230.0.0/16) leaves through `net1` with a
/// metric of 100,000,000 (the loader once read it as hex, and lost it);
/// [`METRIC_PAIR`]'s prefix (10.231.0.0/16) has two routes, through `net1`
/// (metric 20, used) and `eth0` (100); [`METRIC_PAIR6`]'s (fd00:231::/64)
/// through `net1` (300) and `eth0` (200, used).
const METRIC_FAR: &str = "10.230.0.1";
const METRIC_PAIR: &str = "10.231.0.1";
const METRIC_PAIR6: &str = "fd00:231::1";

/// Upstream addresses whose prefixes (10.240.0.0/16, fd00:240::/64) have a
/// route through `net1` in another routing table (100), which no rule
/// selects: the main table's default route through `eth0` is used.
const OTHER_TABLE: &str = "10.240.0.1";
const OTHER_TABLE6: &str = "fd00:240::1";

/// Ports the pod's servers listen on besides [`APP_PORT`].
const POD_PORTS: [u16; 3] = [2222, 9090, 15008];

/// The DNS proxy's port (istio-agent's).
const DNS_PROXY_PORT: u16 = 15053;

/// The pod's own resolver's addresses (port 53, TCP and UDP): a stub on
/// 127.0.0.53 (systemd-resolved's), and the loopback and pod addresses.
fn pod_resolver_addrs() -> Vec<String> {
    vec![
        "127.0.0.53:53".to_string(),
        "127.0.0.1:53".to_string(),
        format!("{POD_IP}:53"),
        "[::1]:53".to_string(),
        format!("[{POD_IP6}]:53"),
    ]
}

/// A listed nameserver (in some policies) and one never listed, per family.
fn nameservers() -> [String; 4] {
    [
        UPSTREAM_IP.to_string(),
        upstream_extra(1).to_string(),
        format!("[{UPSTREAM_IP6}]"),
        format!("[{}]", upstream_extra6(1)),
    ]
}

/// The addresses the DNS matrix sends to outside the pod on a port other
/// than 53 (UDP; TCP has the upstream services on every address).
fn other_port_addrs() -> [String; 3] {
    [
        UPSTREAM_IP.to_string(),
        upstream_extra(1).to_string(),
        format!("[{UPSTREAM_IP6}]"),
    ]
}

/// A port that is not 53, with TCP and UDP listeners upstream.
const OTHER_PORT: u16 = 81;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Legacy,
    Nft,
    Redirect,
}

impl Backend {
    /// The restore command for IPv4 (`v6` false) or IPv6 rules.
    fn restore(self, v6: bool) -> &'static str {
        match (self, v6) {
            (Backend::Legacy, false) => "iptables-legacy-restore",
            (Backend::Legacy, true) => "ip6tables-legacy-restore",
            (Backend::Nft, false) => "iptables-nft-restore",
            (Backend::Nft, true) => "ip6tables-nft-restore",
            (Backend::Redirect, _) => unreachable!(),
        }
    }
}

/// What a world's pod has besides the common servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Extra {
    /// Nothing more.
    None,
    /// The DNS servers (and the `raw` table is always loaded).
    Dns,
    /// A second interface, `net1`, with a server upstream on the addresses
    /// reached through it.
    Net1,
}

struct World {
    backend: Backend,
    f: Fixture,
    /// Whether the DNS servers run (and the `raw` table is always loaded).
    dns: bool,
}

/// Gives `f`'s pod its second interface (`net1`), and what the interface
/// matrix needs besides: the addresses reached through the other
/// interface ([`NET1_ADDR_VIA_ETH0`], ...), the routes with metrics
/// ([`METRIC_FAR`], ...) and in another table ([`OTHER_TABLE`], ...), and
/// a server upstream (`upstream-net1`) on port 80 of every address reached
/// through `net1` (and of [`NET1_HOLE`] and the other routes'
/// destinations, whichever way they go).
fn second_interface(f: &mut Fixture) {
    f.pod
        .add_second_interface()
        .expect("adding the pod's second interface");
    let (p, u) = (
        f.pod.netns_name(Side::Pod),
        f.pod.netns_name(Side::Upstream),
    );
    let ip_in = |ns: &str, cmd: &str| {
        let mut args = vec!["-n", ns];
        args.extend(cmd.split_whitespace());
        ip(&args);
    };
    // Each address on the pod's `dev`, and the upstream host's route to
    // it through the pod's address on the other interface.
    let (pod, pod6) = (POD_IP.to_string(), POD_IP6.to_string());
    let (pod_net1, pod_net1_6) = (NET1_POD_IP.to_string(), NET1_POD_IP6.to_string());
    for (addr, plen, dev, (gw, gw_dev)) in [
        (NET1_ADDR_VIA_ETH0, 24, "net1", (&pod, "eth0")),
        (NET1_ADDR6_VIA_ETH0, 64, "net1", (&pod6, "eth0")),
        (ETH0_ADDR_VIA_NET1, 24, "eth0", (&pod_net1, "net1")),
        (ETH0_ADDR6_VIA_NET1, 64, "eth0", (&pod_net1_6, "net1")),
    ] {
        let host = if plen == 24 { 32 } else { 128 };
        ip_in(&p, &format!("addr add {addr}/{plen} dev {dev} nodad"));
        let route = format!("route add {addr}/{host} via {gw} dev {gw_dev}");
        ip_in(&u, &route);
    }
    // The pod's routes with metrics, through the upstream host's address
    // on either link; and routes in a table no rule selects.
    let (eth0, net1) = (UPSTREAM_IP.to_string(), NET1_UPSTREAM_IP.to_string());
    let (eth0_6, net1_6) = (UPSTREAM_IP6.to_string(), NET1_UPSTREAM_IP6.to_string());
    for (route, via, metric) in [
        ("10.230.0.0/16", &net1, 100_000_000),
        ("10.231.0.0/16", &net1, 20),
        ("10.231.0.0/16", &eth0, 100),
        ("fd00:231::/64", &net1_6, 300),
        ("fd00:231::/64", &eth0_6, 200),
    ] {
        ip_in(&p, &format!("route add {route} via {via} metric {metric}"));
    }
    for (route, via) in [("10.240.0.0/16", &net1), ("fd00:240::/64", &net1_6)] {
        ip_in(&p, &format!("route add {route} via {via} table 100"));
    }
    for a in [METRIC_FAR, METRIC_PAIR, OTHER_TABLE] {
        ip_in(&u, &format!("addr add {a}/32 dev lo"));
    }
    for a in [METRIC_PAIR6, OTHER_TABLE6] {
        ip_in(&u, &format!("-6 addr add {a}/128 dev lo nodad"));
    }
    let at = [
        format!("{NET1_UPSTREAM_IP}:80"),
        format!("{NET1_REMOTE}:80"),
        format!("{NET1_HOLE}:80"),
        format!("[{NET1_UPSTREAM_IP6}]:80"),
        format!("[{NET1_REMOTE6}]:80"),
        format!("{METRIC_FAR}:80"),
        format!("{METRIC_PAIR}:80"),
        format!("[{METRIC_PAIR6}]:80"),
        format!("{OTHER_TABLE}:80"),
        format!("[{OTHER_TABLE6}]:80"),
    ];
    f.pod
        .start_server(Side::Upstream, As::PROXY_LESS, "upstream-net1", &strs(&at))
        .expect("upstream server on net1");
}

/// Runs `ip args`, which must succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `args` as `--udp ADDR` pairs.
fn udp_args(addrs: &[String]) -> Vec<String> {
    addrs
        .iter()
        .flat_map(|a| ["--udp".to_string(), a.clone()])
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

impl World {
    /// A pod for `backend`. With [`Extra::Dns`], also the DNS servers: the
    /// DNS proxy in the pod, a resolver of the pod's own, the nameservers
    /// upstream (TCP and UDP port 53) and UDP listeners on another port.
    /// With [`Extra::Net1`], the pod's second interface and a server
    /// upstream (`upstream-net1`) on the addresses reached through it, and
    /// on [`NET1_HOLE`] (routed back through `eth0`).
    fn new(backend: Backend, extra: Extra) -> World {
        let dns = extra == Extra::Dns;
        let mut f = Fixture::new();
        let listen: Vec<String> = POD_PORTS
            .iter()
            .flat_map(|p| [format!("0.0.0.0:{p}"), format!("[::]:{p}")])
            .collect();
        let refs: Vec<&str> = listen.iter().map(String::as_str).collect();
        f.pod
            .start_server(Side::Pod, As::APP, "app2", &refs)
            .expect("second app server");
        if extra == Extra::Net1 {
            second_interface(&mut f);
        }
        if dns {
            // istio-agent's place: the proxy's owner, on the loopback
            // addresses REDIRECT (and redirect) send to.
            let at = [
                format!("127.0.0.1:{DNS_PROXY_PORT}"),
                format!("[::1]:{DNS_PROXY_PORT}"),
            ];
            f.pod
                .start_server_with(
                    Side::Pod,
                    As::PROXY,
                    "dns-proxy",
                    &strs(&at),
                    &strs(&udp_args(&at)),
                )
                .expect("DNS proxy");
            // Port 53 takes root; it answers from app/.
            let at = pod_resolver_addrs();
            f.pod
                .start_server_with(
                    Side::Pod,
                    other(0, 0),
                    "pod-dns",
                    &strs(&at),
                    &strs(&udp_args(&at)),
                )
                .expect("the pod's resolver");
            let udp: Vec<String> = nameservers().iter().map(|a| format!("{a}:53")).collect();
            f.pod
                .start_server_with(
                    Side::Upstream,
                    As::PROXY_LESS,
                    "ns",
                    &["0.0.0.0:53", "[::]:53"],
                    &strs(&udp_args(&udp)),
                )
                .expect("nameservers");
            let udp: Vec<String> = other_port_addrs()
                .iter()
                .map(|a| format!("{a}:{OTHER_PORT}"))
                .collect();
            f.pod
                .start_server_with(
                    Side::Upstream,
                    As::PROXY_LESS,
                    "upstream",
                    &[],
                    &strs(&udp_args(&udp)),
                )
                .expect("upstream UDP");
        }
        World { backend, f, dns }
    }

    /// The policy with this pod's own paths filled in.
    fn policy(&self, policy: &[&str]) -> Vec<String> {
        let cg = self.f.pod.cgroup.join("proxy").display().to_string();
        policy
            .iter()
            .map(|a| a.replace("{proxy_cgroup}", &cg))
            .collect()
    }

    fn apply(&self, policy: &[&str]) {
        let policy = self.policy(policy);
        let policy: Vec<&str> = policy.iter().map(String::as_str).collect();
        let policy = policy.as_slice();
        match self.backend {
            Backend::Redirect => {
                // The corpus holds a policy with no proxy exemption at all
                // (iptables takes it; so must redirect, for the comparison).
                let mut policy = policy.to_vec();
                policy.push("--allow-no-proxy-exemption");
                self.f.apply_ok(&policy)
            }
            b => {
                for v6 in [false, true] {
                    let mut script = render(policy, v6);
                    if self.dns && !script.contains("*raw\n") {
                        // Replace the raw table of an earlier DNS policy.
                        script.push_str("*raw\nCOMMIT\n");
                    }
                    self.restore(b.restore(v6), &script, policy);
                }
                // Each policy starts with no connection tracked: a UDP
                // socket of this policy that drew the same port as one of
                // an earlier policy would otherwise take that one's NAT.
                flush_conntrack(&self.f.pod.netns_path(Side::Pod))
                    .expect("flushing the pod's conntrack table");
            }
        }
    }

    fn restore(&self, cmd: &str, script: &str, policy: &[&str]) {
        // The worlds, and the tests of this file, restore side by side;
        // iptables-legacy-restore takes the machine's xtables lock and
        // fails if another holds it.
        static RESTORE: Mutex<()> = Mutex::new(());
        let _one_at_a_time = RESTORE.lock().unwrap_or_else(|e| e.into_inner());
        let ns = self.f.pod.netns_name(Side::Pod);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns, cmd])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec iptables-restore");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{cmd} {policy:?}: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// One connection of the matrix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Case {
    /// "out" or "in".
    dir: &'static str,
    /// Owner label (outbound).
    who: &'static str,
    bind: Option<&'static str>,
    to: String,
}

/// The owners connections are made as: a name, who, and the socket mark.
fn owners() -> [(&'static str, As, Option<u32>); 7] {
    [
        ("app", As::APP, None),
        ("proxy", As::PROXY, None),
        ("uid2000-gid1337", other(2000, 1337), None),
        ("uid3", other(3, 3), None),
        ("uid2000-gid4", other(2000, 4), None),
        // Root may set SO_MARK; 0x1 is the proxy mark of some policies.
        ("root-mark1", other(0, 0), Some(1)),
        (
            "uid1000-in-proxy-cgroup",
            As {
                uid: 1000,
                gid: 1000,
                cgroup: Some("proxy"),
            },
            None,
        ),
    ]
}

fn matrix() -> Vec<Case> {
    let dsts = [
        upstream_extra(1).to_string(),
        upstream_extra(2).to_string(),
        upstream_extra(5).to_string(),
        upstream_extra(9).to_string(),
        UPSTREAM_IP.to_string(),
        POD_IP.to_string(),
        "127.0.0.1".to_string(),
        "127.0.0.2".to_string(),
        // The kernel connects 0.0.0.0 to 127.0.0.1 (after the connect hook).
        "0.0.0.0".to_string(),
    ];
    let ports = [80u16, 81, APP_PORT, 15008];
    let mut out = Vec::new();
    for (who, _, _) in owners() {
        for bind in [None, Some("127.0.0.6")] {
            for d in &dsts {
                for p in ports {
                    out.push(Case {
                        dir: "out",
                        who,
                        bind,
                        to: format!("{d}:{p}"),
                    });
                }
            }
        }
    }
    // IPv6, and IPv4-mapped destinations from IPv6 sockets.
    let dsts6 = [
        format!("[{}]", upstream_extra6(1)),
        format!("[{}]", upstream_extra6(2)),
        format!("[{}]", upstream_extra6(9)),
        format!("[{UPSTREAM_IP6}]"),
        format!("[{POD_IP6}]"),
        "[::1]".to_string(),
        "[::]".to_string(),
        format!("[::ffff:{}]", upstream_extra(1)),
        format!("[::ffff:{}]", upstream_extra(2)),
    ];
    for (who, _, _) in owners() {
        for d in &dsts6 {
            for p in ports {
                out.push(Case {
                    dir: "out",
                    who,
                    bind: None,
                    to: format!("{d}:{p}"),
                });
            }
        }
    }
    for p in [APP_PORT, 2222, 9090, 15008] {
        out.push(Case {
            dir: "in",
            who: "upstream",
            bind: None,
            to: format!("{POD_IP}:{p}"),
        });
        out.push(Case {
            dir: "in",
            who: "upstream",
            bind: None,
            to: format!("[{POD_IP6}]:{p}"),
        });
    }
    out
}

/// The DNS matrix: every owner sends over UDP (unconnected and connected)
/// and TCP to the nameservers (listed and not), to the loopback and pod
/// addresses (where the pod's own resolver is), and to the unspecified
/// address, at port 53; to the nameservers' addresses at another port; over
/// IPv4, IPv6 and IPv4-mapped; and from 127.0.0.6 (IPv4). Also TCP over lo
/// to other ports, where DNS capture changes the form of rules 3a and 3b
/// (their decision must not change).
fn dns_matrix() -> Vec<Case> {
    let [ns, unlisted, ns6, unlisted6] = nameservers();
    let v4 = [
        format!("{ns}:53"),
        format!("{unlisted}:53"),
        "127.0.0.53:53".to_string(),
        "127.0.0.1:53".to_string(),
        format!("{POD_IP}:53"),
        "0.0.0.0:53".to_string(),
        format!("{ns}:{OTHER_PORT}"),
        format!("{unlisted}:{OTHER_PORT}"),
    ];
    let v6 = [
        format!("{ns6}:53"),
        format!("{unlisted6}:53"),
        "[::1]:53".to_string(),
        format!("[{POD_IP6}]:53"),
        "[::]:53".to_string(),
        format!("{ns6}:{OTHER_PORT}"),
        format!("[::ffff:{ns}]:53"),
        format!("[::ffff:{unlisted}]:53"),
        "[::ffff:127.0.0.53]:53".to_string(),
        "[::ffff:0.0.0.0]:53".to_string(),
        format!("[::ffff:{ns}]:{OTHER_PORT}"),
    ];
    // TCP only: UDP to a port nobody listens on costs an ICMP error each,
    // which the kernel rate-limits.
    let tcp4 = [
        format!("{POD_IP}:{APP_PORT}"),
        format!("{POD_IP}:15008"),
        format!("127.0.0.1:{APP_PORT}"),
        format!("127.0.0.2:{APP_PORT}"),
    ];
    let tcp6 = [
        format!("[{POD_IP6}]:{APP_PORT}"),
        format!("[::1]:{APP_PORT}"),
        format!("[::ffff:{POD_IP}]:{APP_PORT}"),
    ];
    let all = [Proto::Udp, Proto::UdpConnected, Proto::Tcp];
    let mut out = Vec::new();
    for (who, _, _) in owners() {
        for (bind, dsts) in [
            (None, [&v4[..], &v6[..]].concat()),
            (Some("127.0.0.6"), v4.to_vec()),
        ] {
            for d in &dsts {
                for proto in all {
                    out.push(Case {
                        dir: "dns",
                        who,
                        bind,
                        to: format!("{}:{d}", proto.prefix()),
                    });
                }
            }
        }
        for (bind, dsts) in [
            (None, [&tcp4[..], &tcp6[..]].concat()),
            (Some("127.0.0.6"), tcp4.to_vec()),
        ] {
            for d in dsts {
                out.push(Case {
                    dir: "dns",
                    who,
                    bind,
                    to: format!("tcp:{d}"),
                });
            }
        }
    }
    out
}

/// The owners of the interface matrix: an application, the proxy, and UID
/// 3 (a proxy owner in some policies).
const IFACE_OWNERS: [&str; 3] = ["app", "proxy", "uid3"];

/// The interface matrix's outbound destinations, each with the interface
/// the pod's route to it leaves through (as iptables' `-o` sees it).
fn iface_out_targets() -> Vec<(String, &'static str)> {
    vec![
        (format!("{NET1_REMOTE}:80"), "net1"),
        (format!("{NET1_UPSTREAM_IP}:80"), "net1"),
        (format!("{NET1_HOLE}:80"), "eth0"),
        (format!("{}:80", upstream_extra(1)), "eth0"),
        (format!("{POD_IP}:{APP_PORT}"), "lo"),
        (format!("{NET1_POD_IP}:{APP_PORT}"), "lo"),
        (format!("{NET1_POD_IP}:15008"), "lo"),
        (format!("127.0.0.1:{APP_PORT}"), "lo"),
        (format!("127.0.0.2:{APP_PORT}"), "lo"),
        // The kernel connects 0.0.0.0 to 127.0.0.1 (after the connect
        // hook): over lo, whatever the default route.
        (format!("0.0.0.0:{APP_PORT}"), "lo"),
        (format!("[{NET1_REMOTE6}]:80"), "net1"),
        (format!("[{NET1_UPSTREAM_IP6}]:80"), "net1"),
        (format!("[{}]:80", upstream_extra6(1)), "eth0"),
        (format!("[::ffff:{NET1_REMOTE}]:80"), "net1"),
        (format!("[::ffff:{NET1_HOLE}]:80"), "eth0"),
        (format!("{METRIC_FAR}:80"), "net1"),
        (format!("{METRIC_PAIR}:80"), "net1"),
        (format!("[{METRIC_PAIR6}]:80"), "eth0"),
        (format!("{OTHER_TABLE}:80"), "eth0"),
        (format!("[{OTHER_TABLE6}]:80"), "eth0"),
        (format!("[{NET1_POD_IP6}]:{APP_PORT}"), "lo"),
        (format!("[{POD_IP6}]:{APP_PORT}"), "lo"),
        (format!("[::1]:{APP_PORT}"), "lo"),
        (format!("[::]:{APP_PORT}"), "lo"),
        (format!("[::ffff:{NET1_POD_IP}]:{APP_PORT}"), "lo"),
    ]
}

/// The interface matrix's inbound destinations (from the upstream host),
/// each with the interface the connection arrives on: the upstream host
/// reaches the pod's `net1` addresses through its own connected `net1`
/// routes, but [`NET1_ADDR_VIA_ETH0`] through `eth0` and
/// [`ETH0_ADDR_VIA_NET1`] through `net1`.
fn iface_in_targets() -> Vec<(String, &'static str)> {
    vec![
        (format!("{NET1_POD_IP}:{APP_PORT}"), "net1"),
        (format!("{NET1_POD_IP}:2222"), "net1"),
        (format!("{NET1_POD_IP}:15008"), "net1"),
        (format!("[{NET1_POD_IP6}]:{APP_PORT}"), "net1"),
        (format!("[{NET1_POD_IP6}]:2222"), "net1"),
        (format!("{POD_IP}:{APP_PORT}"), "eth0"),
        (format!("{POD_IP}:2222"), "eth0"),
        (format!("[{POD_IP6}]:{APP_PORT}"), "eth0"),
        (format!("{NET1_ADDR_VIA_ETH0}:{APP_PORT}"), "eth0"),
        (format!("[{NET1_ADDR6_VIA_ETH0}]:{APP_PORT}"), "eth0"),
        (format!("{ETH0_ADDR_VIA_NET1}:{APP_PORT}"), "net1"),
        (format!("[{ETH0_ADDR6_VIA_NET1}]:{APP_PORT}"), "net1"),
    ]
}

/// The interface matrix: [`IFACE_OWNERS`] to every outbound destination,
/// and to the IPv4 ones also from 127.0.0.6 (rule 0 over `lo`; off `lo`
/// the kernel refuses the route); every inbound destination from the
/// upstream host. Each case with its interface.
fn iface_matrix() -> Vec<(Case, &'static str)> {
    let mut out = Vec::new();
    for who in IFACE_OWNERS {
        for (to, iface) in iface_out_targets() {
            let binds: &[Option<&'static str>] = if to.starts_with('[') {
                &[None]
            } else {
                &[None, Some("127.0.0.6")]
            };
            for bind in binds {
                let c = Case {
                    dir: "out",
                    who,
                    bind: *bind,
                    to: to.clone(),
                };
                out.push((c, iface));
            }
        }
    }
    for (to, iface) in iface_in_targets() {
        let c = Case {
            dir: "in",
            who: "upstream",
            bind: None,
            to,
        };
        out.push((c, iface));
    }
    out
}

/// The interfaces a policy excludes (`-c`), as given (patterns included).
fn excluded_interfaces<'a>(policy: &[&'a str]) -> Vec<&'a str> {
    policy
        .windows(2)
        .filter(|w| w[0] == "-c")
        .flat_map(|w| w[1].split(','))
        .collect()
}

/// Whether iptables' `-i`/`-o PATTERN` matches the interface `name`: the
/// same name, or for a pattern ending in `+`, any name starting with the
/// rest.
fn iptables_iface_match(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// What a connection ended as: who answered, and what the proxy learned.
fn outcome(v: &ClientView) -> String {
    match &v.reply {
        None => "refused/failed".to_string(),
        Some(r) if r.server == "proxy" => format!(
            "proxy(orig_dst={})",
            r.orig_dst.as_deref().unwrap_or("none")
        ),
        // Only the proxy's SO_ORIGINAL_DST is compared: on a connection
        // nobody redirected, iptables' conntrack answers the socket's own
        // address while redirect leaves the kernel's ENOENT (see
        // docs/semantics.md).
        Some(r) => r.server.clone(),
    }
}

/// What a probe of the DNS matrix ended as. TCP: who answered, and what
/// either proxy learned. UDP: who answered at which of its addresses, and
/// where the answer came from as the application saw it (`recvfrom`; and
/// `getpeername` on a connected socket). A failure by its error number.
fn probe_outcome(v: &ProbeView) -> String {
    let Some(r) = &v.reply else {
        return match v.errno {
            Some(libc::EAGAIN) => "no answer (timeout)".to_string(),
            Some(e) => format!("failed (errno {e})"),
            None => format!("failed ({})", v.error.as_deref().unwrap_or("?")),
        };
    };
    let from = v.reply_from.as_deref().unwrap_or("none");
    match v.proto {
        Proto::Tcp if r.server == "proxy" || r.server == "dns-proxy" => format!(
            "{}(orig_dst={})",
            r.server,
            r.orig_dst.as_deref().unwrap_or("none")
        ),
        Proto::Tcp => r.server.clone(),
        Proto::Udp => format!("{}@{} from {from}", r.server, r.local),
        Proto::UdpConnected => format!(
            "{}@{} from {from}, peer {}",
            r.server,
            r.local,
            v.peer.as_deref().unwrap_or("none")
        ),
    }
}

/// Runs one `redirect-sample probe` in the pod as `who` over `targets`
/// (`PROTO:ADDR`), one view each, in order.
fn probe(
    w: &World,
    who: As,
    targets: &[&str],
    bind: Option<&str>,
    mark: Option<u32>,
) -> Vec<ProbeView> {
    let bin = sample_bin().expect("redirect-sample");
    let mut cmd =
        w.f.pod
            .command(Side::Pod, who, &bin)
            .expect("probe command");
    // An answer lost is a difference; it should not cost 3 s each.
    cmd.args(["probe", "--timeout-ms", "1500"]);
    for t in targets {
        cmd.arg("--to").arg(t);
    }
    if let Some(b) = bind {
        cmd.args(["--bind", b]);
    }
    if let Some(m) = mark {
        cmd.args(["--mark", &m.to_string()]);
    }
    let out = cmd.stdin(Stdio::null()).output().expect("sample probe");
    assert!(
        out.status.success(),
        "sample probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let views: Vec<ProbeView> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("probe printed {l:?}: {e}")))
        .collect();
    assert_eq!(
        views.len(),
        targets.len(),
        "probe answered for every target"
    );
    views
}

fn run_matrix(w: &World, cases: &[Case]) -> BTreeMap<Case, String> {
    let mut groups: BTreeMap<(&str, &str, Option<&str>), Vec<&Case>> = BTreeMap::new();
    for c in cases {
        groups.entry((c.dir, c.who, c.bind)).or_default().push(c);
    }
    let mut out = BTreeMap::new();
    for ((dir, who, bind), group) in groups {
        let (side, as_, mark) = if dir == "in" {
            (Side::Upstream, As::PROXY_LESS, None)
        } else {
            let (_, a, m) = owners().into_iter().find(|(n, _, _)| *n == who).unwrap();
            (Side::Pod, a, m)
        };
        let targets: Vec<&str> = group.iter().map(|c| c.to.as_str()).collect();
        if dir == "dns" {
            if w.backend != Backend::Redirect {
                // A probe's UDP sockets have ports of their own (it keeps
                // them open), but may draw one an earlier probe of this
                // policy used: conntrack would give the new socket that
                // one's flow, and its NAT.
                flush_conntrack(&w.f.pod.netns_path(Side::Pod))
                    .expect("flushing the pod's conntrack table");
            }
            let views = probe(w, as_, &targets, bind, mark);
            for (c, v) in group.into_iter().zip(views) {
                out.insert(c.clone(), probe_outcome(&v));
            }
            continue;
        }
        let views =
            w.f.pod
                .connect_many_marked(side, as_, &targets, bind, mark)
                .expect("sample client");
        for (c, v) in group.into_iter().zip(views) {
            out.insert(c.clone(), outcome(&v));
        }
    }
    out
}

/// Empties the conntrack table of the network namespace at `netns` (both
/// families, every zone): a `ctnetlink` delete without a tuple, sent from a
/// thread that entered the namespace.
fn flush_conntrack(netns: &Path) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const NETLINK_NETFILTER: libc::c_int = 12;
    const NFNL_SUBSYS_CTNETLINK: u16 = 1;
    const IPCTNL_MSG_CT_DELETE: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLMSG_ERROR: u16 = 2;
    let ns = std::fs::File::open(netns)?;
    let last = std::io::Error::last_os_error;
    std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<()> {
            // SAFETY: setns on this thread only, with a namespace fd we own.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(last());
            }
            // SAFETY: a new socket; owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    NETLINK_NETFILTER,
                )
            };
            if fd < 0 {
                return Err(last());
            }
            // SAFETY: fd is a socket this thread just opened.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            for (seq, family) in [(1u32, libc::AF_INET), (2, libc::AF_INET6)] {
                // nlmsghdr (16 bytes), then nfgenmsg (family, version 0,
                // resource id 0).
                let mut msg = [0u8; 20];
                msg[0..4].copy_from_slice(&20u32.to_ne_bytes());
                msg[4..6].copy_from_slice(
                    &((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes(),
                );
                msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
                msg[8..12].copy_from_slice(&seq.to_ne_bytes());
                msg[16] = family as u8;
                // SAFETY: sending a buffer we own, of its length.
                let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
                if n != msg.len() as isize {
                    return Err(last());
                }
                let mut ack = [0u8; 256];
                // SAFETY: receiving into a buffer we own, of its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), ack.as_mut_ptr().cast(), ack.len(), 0) };
                if n < 20 {
                    return Err(last());
                }
                let kind = u16::from_ne_bytes([ack[4], ack[5]]);
                let err = i32::from_ne_bytes([ack[16], ack[17], ack[18], ack[19]]);
                if kind != NLMSG_ERROR {
                    return Err(std::io::Error::other(format!(
                        "conntrack flush: answer of type {kind}"
                    )));
                }
                // ENOENT: nothing to flush.
                if err != 0 && err != -libc::ENOENT {
                    return Err(std::io::Error::from_raw_os_error(-err));
                }
            }
            Ok(())
        })
        .join()
        .expect("conntrack flush thread")
    })
}

fn render(policy: &[&str], v6: bool) -> String {
    let mut args = vec!["iptables", "--family", if v6 { "6" } else { "4" }];
    args.extend_from_slice(policy);
    let out = Command::new(redirect_bin())
        .args(&args)
        .output()
        .expect("redirect iptables");
    assert!(
        out.status.success(),
        "redirect iptables {policy:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Each backend's outcomes of one policy, as the worlds are ordered.
type Outcomes = Vec<BTreeMap<Case, String>>;

/// Every policy in the three worlds (redirect first), every case; the
/// differences between redirect and each iptables backend, how many cases
/// were compared with each, and every policy's outcomes.
struct Comparison {
    compared: BTreeMap<&'static str, usize>,
    diffs: Vec<String>,
    runs: Vec<(&'static [&'static str], Outcomes)>,
}

fn compare(worlds: &[World], policies: &[&'static [&'static str]], cases: &[Case]) -> Comparison {
    // The worlds are independent: each runs the whole corpus at its own
    // pace (one world's apply overlaps another's connections).
    let per_world: Vec<Vec<BTreeMap<Case, String>>> = std::thread::scope(|s| {
        let handles: Vec<_> = worlds
            .iter()
            .map(|w| {
                s.spawn(|| {
                    policies
                        .iter()
                        .map(|policy| {
                            w.apply(policy);
                            run_matrix(w, cases)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut compared: BTreeMap<&str, usize> = BTreeMap::new();
    let mut diffs = Vec::new();
    let mut runs = Vec::new();
    for (i, policy) in policies.iter().enumerate() {
        let results: Outcomes = per_world.iter().map(|r| r[i].clone()).collect();
        let ebpf = &results[0];
        for (w, res) in worlds.iter().zip(&results).skip(1) {
            let name = if w.backend == Backend::Legacy {
                "legacy"
            } else {
                "nft"
            };
            for c in cases {
                *compared.entry(name).or_default() += 1;
                if ebpf[c] != res[c] {
                    diffs.push(format!(
                        "{policy:?} {} {} bind={:?} -> {}: redirect={} iptables-{name}={}",
                        c.dir, c.who, c.bind, c.to, ebpf[c], res[c]
                    ));
                }
            }
        }
        runs.push((*policy, results));
    }
    Comparison {
        compared,
        diffs,
        runs,
    }
}

fn worlds(extra: Extra) -> Vec<World> {
    [Backend::Redirect, Backend::Legacy, Backend::Nft]
        .into_iter()
        .map(|b| World::new(b, extra))
        .collect()
}

#[test]
fn same_outcomes_as_iptables_legacy_and_nft() {
    if !can_run() {
        return;
    }
    let worlds = worlds(Extra::None);
    let cases = matrix();
    let Comparison {
        compared, diffs, ..
    } = compare(&worlds, POLICIES, &cases);
    eprintln!(
        "differential: {} policies x {} connections; compared {compared:?}; {} difference(s)",
        POLICIES.len(),
        cases.len(),
        diffs.len()
    );
    assert!(
        diffs.is_empty(),
        "{} difference(s):\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    assert!(POLICIES.len() >= 20);
    assert!(compared.values().all(|n| *n >= 1000), "{compared:?}");
}

/// The address an answer to `to` comes from when the nameserver asked
/// answers (or the DNS proxy, un-NATed): `to` itself, but the unspecified
/// address is the host loopback one.
fn expected_source(to: &str) -> String {
    to.replacen("0.0.0.0]:", "127.0.0.1]:", 1)
        .replacen("0.0.0.0:", "127.0.0.1:", 1)
        .replacen("[::]:", "[::1]:", 1)
}

#[test]
fn dns_capture_same_outcomes_as_iptables_legacy_and_nft() {
    if !can_run() {
        return;
    }
    let worlds = worlds(Extra::Dns);
    let dns = dns_matrix();
    let Comparison {
        compared,
        diffs,
        runs,
    } = compare(&worlds, DNS_POLICIES, &dns);
    // What the DNS cases ended as, per backend; and where iptables did not
    // do what this test takes for granted.
    let mut tally: BTreeMap<(&str, String), usize> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (policy, results) in &runs {
        for (w, res) in worlds.iter().zip(results) {
            let name = match w.backend {
                Backend::Redirect => "redirect",
                Backend::Legacy => "legacy",
                Backend::Nft => "nft",
            };
            for c in &dns {
                let out = &res[c];
                let (proto, to) = c.to.split_once(':').unwrap();
                let server = out.split(['@', '(', ' ']).next().unwrap_or("");
                *tally
                    .entry((name, format!("{proto} {server}")))
                    .or_default() += 1;
                // Under iptables conntrack shows every UDP answer from the
                // address asked (the DNS proxy's too), and nothing is lost.
                let from = out
                    .split_once(" from ")
                    .map(|(_, f)| f.split(',').next().unwrap_or(f));
                let udp_answer_elsewhere =
                    proto != "tcp" && from.is_some_and(|f| f != expected_source(to));
                if w.backend != Backend::Redirect
                    && (out.contains("timeout") || udp_answer_elsewhere)
                {
                    wrong.push(format!(
                        "{policy:?} {} bind={:?} -> {}: iptables-{name}={out}",
                        c.who, c.bind, c.to
                    ));
                }
            }
        }
    }
    let iptables: BTreeMap<&String, &usize> = tally
        .iter()
        .filter(|((b, _), _)| *b == "legacy")
        .map(|((_, k), n)| (k, n))
        .collect();
    eprintln!(
        "differential (DNS): {} policies x {} connections; compared {compared:?}; {} \
         difference(s); outcomes under iptables-legacy {iptables:?}",
        DNS_POLICIES.len(),
        dns.len(),
        diffs.len()
    );
    assert!(
        wrong.is_empty(),
        "iptables did not answer as this test expects ({}):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(
        diffs.is_empty(),
        "{} difference(s):\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    // The corpus captures DNS, and leaves some alone, over both protocols.
    for (proto, server, least) in [
        ("udp", "dns-proxy", 200),
        ("udp-connected", "dns-proxy", 200),
        ("tcp", "dns-proxy", 200),
        ("udp", "ns", 200),
        ("udp-connected", "ns", 200),
        ("tcp", "ns", 200),
        ("udp", "pod-dns", 100),
        ("tcp", "proxy", 100),
        ("tcp", "app", 100),
    ] {
        let n = tally
            .get(&("legacy", format!("{proto} {server}")))
            .copied()
            .unwrap_or(0);
        assert!(n >= least, "{proto} answered by {server}: {n} < {least}");
    }
}

#[test]
fn interface_rules_same_outcomes_as_iptables_legacy_and_nft() {
    if !can_run() {
        return;
    }
    let started = Instant::now();
    let worlds = worlds(Extra::Net1);
    let matrix = iface_matrix();
    let cases: Vec<Case> = matrix.iter().map(|(c, _)| c.clone()).collect();
    let iface: BTreeMap<&Case, &str> = matrix.iter().map(|(c, i)| (c, *i)).collect();
    let Comparison {
        compared,
        diffs,
        runs,
    } = compare(&worlds, IFACE_POLICIES, &cases);
    // Under iptables-legacy, per interface: (excluded, captured) counts;
    // and where iptables did not do what this test takes for granted:
    // handed the proxy a connection of an excluded interface, or failed a
    // connection that has a listener (or connected one that has no route).
    let mut tally: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (policy, results) in &runs {
        let excluded = excluded_interfaces(policy);
        for (w, res) in worlds.iter().zip(results) {
            if w.backend == Backend::Redirect {
                continue;
            }
            for c in &cases {
                let i = iface[c];
                let is_excluded = excluded.iter().any(|p| iptables_iface_match(p, i));
                let captured = res[c].starts_with("proxy");
                // Every destination has a listener: only a connection from
                // 127.0.0.6 off lo fails (the kernel has no route for it).
                let failed = res[c] == "refused/failed";
                let may_fail = c.bind.is_some() && i != "lo";
                if (is_excluded && captured) || failed != may_fail {
                    wrong.push(format!(
                        "{policy:?} {} {} bind={:?} -> {} ({i}): iptables-{}={}",
                        c.dir,
                        c.who,
                        c.bind,
                        c.to,
                        format!("{:?}", w.backend).to_lowercase(),
                        res[c]
                    ));
                }
                if w.backend == Backend::Legacy {
                    let key = match (is_excluded, captured) {
                        (false, true) => "captured",
                        (false, false) => "passed",
                        (true, _) => "passed (excluded)",
                    };
                    *tally.entry((i, key)).or_default() += 1;
                }
            }
        }
    }
    eprintln!(
        "differential (interfaces): {} policies x {} connections; compared {compared:?}; {} \
         difference(s); in {:.1} s; under iptables-legacy {tally:?}",
        IFACE_POLICIES.len(),
        cases.len(),
        diffs.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        wrong.is_empty(),
        "iptables did not answer as this test expects ({}):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(
        diffs.is_empty(),
        "{} difference(s):\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    assert!(IFACE_POLICIES.len() >= 8);
    assert!(compared.values().all(|n| *n >= 2000), "{compared:?}");
    // The same traffic is captured under policies that leave its
    // interface in, and passed under those that exclude it: net1's
    // (outbound and inbound), eth0's and lo's (rule 3a).
    for (i, least) in [("net1", 50), ("eth0", 50), ("lo", 50)] {
        for key in ["captured", "passed (excluded)"] {
            let n = tally.get(&(i, key)).copied().unwrap_or(0);
            assert!(n >= least, "{i}: {key} {n} < {least}");
        }
    }
}

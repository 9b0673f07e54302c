//! `redirect iptables`: the `nat` table istio-iptables would install for a
//! policy, as `iptables-restore` / `ip6tables-restore` input.
//!
//! [`render`] is a pure function of a [`PolicySpec`]. It follows
//! `tools/istio-iptables/pkg/capture/run.go` (REDIRECT mode, with DNS
//! capture, excluded interfaces and, render-only, virtual interfaces) rule
//! for rule and in the same order,
//! and prints the `nat` table the way istio's rule builder does: first `-N`
//! for each chain it creates, then every rule. The lines match istio's own
//! golden test data (`capture/testdata/*.golden`, the `nat` part) for the
//! settings redirect supports; the unit tests below hold them.
//!
//! Three settings of redirect have no istio-iptables flag: the proxy's socket
//! mark (`--proxy-mark`), its cgroup (`--proxy-cgroup`) and explicit services
//! (`--service`). They are rendered in the iptables forms
//! `docs/iptables-rules.md` gives for them, where redirect's decision places
//! them: the mark and the cgroup as one more owner each, with the same three
//! rules as a proxy UID (`-m mark --mark M`, `-m cgroup --path P`), after
//! the GIDs; each service as `-d IP -p tcp --dport P -j ISTIO_REDIRECT`
//! between the included ports and the included CIDRs.
//!
//! Differences from the files istio prints, none of which changes a decision:
//!
//! - The table header is `*nat`, as `iptables-restore` needs; istio's test
//!   data print `* nat`.
//! - Lists come in the order of the [`PolicySpec`]. The flag parser sorts and
//!   de-duplicates ports and CIDRs, istio keeps the order given. Within each
//!   group of lines (excluded ports, inbound ports, excluded owner groups,
//!   excluded CIDRs, included ports, services, included CIDRs) every line
//!   has the same target, so their order cannot change the outcome. Owner
//!   lists keep their order, which matters.
//! - CIDRs are printed with host bits cleared (`10.0.0.0/8` for
//!   `10.1.2.3/8`); iptables clears them itself when it loads the rule.
//! - IPv6 addresses are printed in their canonical form: a nameserver
//!   written `::127.0.0.53` is `::7f00:35`, the same address.
//!
//! With DNS capture (`--redirect-dns`), the `nat` table gets istio's
//! `ISTIO_OUTPUT_DNS` chain and its changed owner rules, and a `raw` table
//! follows with the conntrack zones istio puts DNS in (they change no
//! decision; they keep the proxy's queries and the app's apart in
//! conntrack). The proxy's mark and cgroup get no zone rules: istio has no
//! such owners.

use std::{fmt::Write as _, net::IpAddr};

use crate::policy::{Cidr, InboundPorts, Include, OwnerGroups, PolicySpec};

/// Which rule set: IPv4 (`iptables-restore`) or IPv6 (`ip6tables-restore`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The host loopback CIDR of rules 3a and 6.
    pub const fn host_loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The passthrough source of rule 2.
    pub const fn passthrough(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }

    /// The tool that loads this family's script.
    pub const fn restore_command(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// `IPv4` or `IPv6`.
    pub const fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn matches(self, cidr: &Cidr) -> bool {
        match (self, cidr.addr) {
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_)) => true,
            (Family::V4, IpAddr::V6(_)) | (Family::V6, IpAddr::V4(_)) => false,
        }
    }
}

const INBOUND: &str = "ISTIO_INBOUND";
const REDIRECT: &str = "ISTIO_REDIRECT";
const IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
const OUTPUT: &str = "ISTIO_OUTPUT";
const OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";

/// The nameservers of `family` DNS capture takes, if it is on; with
/// `--capture-all-dns`, `Some` of an empty list means any.
fn dns_servers(spec: &PolicySpec, family: Family) -> Option<(bool, Vec<IpAddr>)> {
    let dns = spec.dns.as_ref()?;
    let servers: Vec<IpAddr> = dns
        .servers
        .iter()
        .copied()
        .filter(|ip| match family {
            Family::V4 => ip.is_ipv4(),
            Family::V6 => ip.is_ipv6(),
        })
        .collect();
    Some((dns.capture_all, servers))
}

/// `-d SERVER/32` (or `/128`).
fn host(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// Whether the include list holds a loopback address (istio's
/// `HasLoopBackIP`, computed over both families). istio-iptables then leaves
/// out the `-o lo -m owner ! --uid-owner U -j RETURN` rules (3b), so that
/// other owners' calls over `lo` walk on to the include rules. redirect's
/// decision does the same (`config_flags::LOOPBACK_INCLUDE`).
pub fn include_has_loopback(spec: &PolicySpec) -> bool {
    match &spec.include_cidrs {
        Include::All => false,
        Include::List(l) => l.iter().any(|c| c.addr.is_loopback()),
    }
}

/// The lines of the `nat` table istio-iptables installs for `spec` in
/// `family`, without the `*nat` header and the `COMMIT` trailer.
pub fn nat_rules(spec: &PolicySpec, family: Family) -> Vec<String> {
    nat_rules_virt(spec, family, &[])
}

/// [`nat_rules`] with istio-iptables' `-k` (`--kube-virt-interfaces`):
/// traffic arriving on these interfaces (from a VM in the pod) goes to the
/// outbound proxy port. Rendered only: redirect cannot apply it (it needs
/// NAT; docs/semantics.md), but `redirect iptables` prints what
/// istio-iptables would install.
pub fn nat_rules_virt(spec: &PolicySpec, family: Family, virt: &[String]) -> Vec<String> {
    let dns = dns_servers(spec, family);
    // Whether this family's OUTPUT jumps to the DNS chain.
    let dns_jump = dns
        .as_ref()
        .is_some_and(|(all, servers)| *all || !servers.is_empty());
    let mut out: Vec<String> = [INBOUND, REDIRECT, IN_REDIRECT, OUTPUT]
        .iter()
        .chain(dns.is_some().then_some(&OUTPUT_DNS))
        .map(|c| format!("-N {c}"))
        .collect();
    let mut rule = |s: String| out.push(s);

    // Excluded interfaces (`-c`) come first: nothing arriving on one or
    // leaving through one walks istio's chains.
    for i in &spec.exclude_interfaces {
        rule(format!("-A PREROUTING -i {i} -j RETURN"));
        rule(format!("-A OUTPUT -o {i} -j RETURN"));
    }
    // Virtual interfaces (`-k`): inserted at the head of PREROUTING, so
    // that nothing of istio's inbound capture sees their traffic...
    for i in virt {
        rule(format!("-I PREROUTING 1 -i {i} -j RETURN"));
    }

    // The tunnel port never goes to the proxy; the two REDIRECT chains.
    rule(format!(
        "-A {INBOUND} -p tcp --dport {} -j RETURN",
        spec.tunnel_port
    ));
    rule(format!(
        "-A {REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        spec.proxy_port
    ));
    rule(format!(
        "-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        spec.inbound_port
    ));

    // Inbound (nat PREROUTING), only when some inbound port is captured.
    match &spec.inbound_ports {
        InboundPorts::List(l) if l.is_empty() => {}
        InboundPorts::All => {
            rule(format!("-A PREROUTING -p tcp -j {INBOUND}"));
            for p in &spec.exclude_inbound_ports {
                rule(format!("-A {INBOUND} -p tcp --dport {p} -j RETURN"));
            }
            rule(format!("-A {INBOUND} -p tcp -j {IN_REDIRECT}"));
        }
        InboundPorts::List(l) => {
            rule(format!("-A PREROUTING -p tcp -j {INBOUND}"));
            for p in l {
                rule(format!("-A {INBOUND} -p tcp --dport {p} -j {IN_REDIRECT}"));
            }
        }
    }

    // Outbound (nat OUTPUT).
    rule(format!("-A OUTPUT -j {OUTPUT}"));
    // 1. Excluded ports, TCP and UDP, before anything else.
    for p in &spec.exclude_ports {
        rule(format!("-A {OUTPUT} -p tcp --dport {p} -j RETURN"));
        rule(format!("-A {OUTPUT} -p udp --dport {p} -j RETURN"));
    }
    // 2. The proxy's passthrough source.
    rule(format!(
        "-A {OUTPUT} -o lo -s {} -j RETURN",
        family.passthrough()
    ));
    // 3. Three rules per proxy UID, then per proxy GID, then for the proxy's
    // mark and its cgroup (redirect's additions).
    let keep_3b = !include_has_loopback(spec);
    let lo = family.host_loopback();
    let tunnel = spec.tunnel_port;
    // (match, negated match, whether rule a keeps port 53 with DNS
    // capture: a GID's does, as istio writes it).
    let mut owners: Vec<(String, String, bool)> = Vec::new();
    for (kind, ids) in [("uid", &spec.proxy_uids), ("gid", &spec.proxy_gids)] {
        for id in ids {
            owners.push((
                format!("-m owner --{kind}-owner {id}"),
                format!("-m owner ! --{kind}-owner {id}"),
                kind == "gid",
            ));
        }
    }
    if let Some(m) = spec.proxy_mark {
        owners.push((
            format!("-m mark --mark {m:#x}"),
            format!("-m mark ! --mark {m:#x}"),
            false,
        ));
    }
    if let Some(c) = &spec.proxy_cgroup {
        let path = if c.rel.contains(char::is_whitespace) {
            format!("\"{}\"", c.rel)
        } else {
            c.rel.clone()
        };
        owners.push((
            format!("-m cgroup --path {path}"),
            format!("-m cgroup ! --path {path}"),
            false,
        ));
    }
    for (is, is_not, a_keeps_53) in &owners {
        // With DNS capture, rule a of every owner but a GID leaves port 53
        // out, and rule b is TCP-only and leaves it out too (istio's forms).
        if dns.is_some() && !a_keeps_53 {
            rule(format!(
                "-A {OUTPUT} -o lo ! -d {lo} -p tcp -m multiport ! --dports 53,{tunnel} {is} -j {IN_REDIRECT}"
            ));
        } else {
            rule(format!(
                "-A {OUTPUT} -o lo ! -d {lo} -p tcp ! --dport {tunnel} {is} -j {IN_REDIRECT}"
            ));
        }
        if keep_3b && dns.is_some() {
            rule(format!(
                "-A {OUTPUT} -o lo -p tcp ! --dport 53 {is_not} -j RETURN"
            ));
        } else if keep_3b {
            rule(format!("-A {OUTPUT} -o lo {is_not} -j RETURN"));
        }
        rule(format!("-A {OUTPUT} {is} -j RETURN"));
    }
    // 4. The owner-group filter.
    match &spec.owner_groups {
        OwnerGroups::All => {}
        OwnerGroups::Include(gids) => {
            let none_of: Vec<String> = gids
                .iter()
                .map(|g| format!("-m owner ! --gid-owner {g}"))
                .collect();
            rule(format!("-A {OUTPUT} {} -j RETURN", none_of.join(" ")));
        }
        OwnerGroups::Exclude(gids) => {
            for g in gids {
                rule(format!("-A {OUTPUT} -m owner --gid-owner {g} -j RETURN"));
            }
        }
    }
    // 5. DNS capture: TCP, then UDP, to port 53 of this family's
    // nameservers (or of any address).
    if let Some((all, servers)) = &dns {
        if dns_jump {
            rule(format!("-A {OUTPUT} -j {OUTPUT_DNS}"));
        }
        let port = crate::policy::DNS_CAPTURE_PORT;
        if *all {
            rule(format!(
                "-A {OUTPUT_DNS} -p tcp --dport 53 -j REDIRECT --to-ports {port}"
            ));
            rule(format!(
                "-A {OUTPUT_DNS} -p udp --dport 53 -j REDIRECT --to-port {port}"
            ));
        } else {
            for s in servers {
                rule(format!(
                    "-A {OUTPUT_DNS} -p tcp --dport 53 -d {} -j REDIRECT --to-ports {port}",
                    host(s)
                ));
            }
            for s in servers {
                rule(format!(
                    "-A {OUTPUT_DNS} -p udp --dport 53 -d {} -j REDIRECT --to-port {port}",
                    host(s)
                ));
            }
        }
    }
    // 6. The host loopback address.
    rule(format!("-A {OUTPUT} -d {lo} -j RETURN"));
    // 7. Excluded CIDRs of this family.
    for c in spec.exclude_cidrs.iter().filter(|c| family.matches(c)) {
        rule(format!("-A {OUTPUT} -d {c} -j RETURN"));
    }
    // 8. Included ports.
    for p in &spec.include_ports {
        rule(format!("-A {OUTPUT} -p tcp --dport {p} -j {REDIRECT}"));
    }
    // 9s. Listed services of this family (redirect's addition).
    for svc in &spec.services {
        let (ip, len) = match svc.ip() {
            IpAddr::V4(a) if family == Family::V4 => (IpAddr::V4(a), 32),
            IpAddr::V6(a) if family == Family::V6 => (IpAddr::V6(a), 128),
            _ => continue,
        };
        rule(format!(
            "-A {OUTPUT} -d {ip}/{len} -p tcp --dport {} -j {REDIRECT}",
            svc.port()
        ));
    }
    // 9. Included CIDRs of this family, or everything.
    // ... and above those, what they send to the outbound proxy port: all
    // of it, or what goes to an included CIDR.
    match &spec.include_cidrs {
        Include::All => {
            rule(format!("-A {OUTPUT} -j {REDIRECT}"));
            for i in virt {
                rule(format!("-I PREROUTING 1 -i {i} -j {REDIRECT}"));
            }
        }
        Include::List(l) => {
            for c in l.iter().filter(|c| family.matches(c)) {
                for i in virt {
                    rule(format!("-I PREROUTING 1 -i {i} -d {c} -j {REDIRECT}"));
                }
                rule(format!("-A {OUTPUT} -d {c} -j {REDIRECT}"));
            }
        }
    }
    out
}

/// The lines of the `raw` table istio-iptables installs for `spec` in
/// `family`: with DNS capture, the conntrack zones of DNS over UDP (the
/// proxy's queries and their answers in zone 1, the app's with the proxy
/// in zone 2); nothing otherwise.
pub fn raw_rules(spec: &PolicySpec, family: Family) -> Vec<String> {
    let Some((all, servers)) = dns_servers(spec, family) else {
        return Vec::new();
    };
    let inbound = all || !servers.is_empty();
    let mut out = vec![format!("-N {OUTPUT_DNS}")];
    if inbound {
        out.push(format!("-N {INBOUND}"));
    }
    out.push(format!("-A OUTPUT -j {OUTPUT_DNS}"));
    let port = crate::policy::DNS_CAPTURE_PORT;
    for (kind, ids) in [("uid", &spec.proxy_uids), ("gid", &spec.proxy_gids)] {
        for id in ids {
            out.push(format!(
                "-A {OUTPUT_DNS} -p udp --dport 53 -m owner --{kind}-owner {id} -j CT --zone 1"
            ));
            out.push(format!(
                "-A {OUTPUT_DNS} -p udp --sport {port} -m owner --{kind}-owner {id} -j CT --zone 2"
            ));
        }
    }
    if inbound {
        out.push(format!("-A PREROUTING -j {INBOUND}"));
    }
    if all {
        out.push(format!("-A {OUTPUT_DNS} -p udp --dport 53 -j CT --zone 2"));
        out.push(format!("-A {INBOUND} -p udp --sport 53 -j CT --zone 1"));
    } else {
        for s in &servers {
            out.push(format!(
                "-A {OUTPUT_DNS} -p udp --dport 53 -d {} -j CT --zone 2",
                host(s)
            ));
            out.push(format!(
                "-A {INBOUND} -p udp --sport 53 -s {} -j CT --zone 1",
                host(s)
            ));
        }
    }
    out
}

/// The `iptables-restore` (or `ip6tables-restore`) script for `family`:
/// `*nat`, the rules of [`nat_rules`], `COMMIT`, then, with DNS capture,
/// `*raw` and [`raw_rules`]. Loading it replaces those whole tables of the
/// namespace, as istio-iptables' own restore does.
pub fn render(spec: &PolicySpec, family: Family) -> String {
    render_virt(spec, family, &[])
}

/// [`render`] with `-k`'s rules ([`nat_rules_virt`]).
pub fn render_virt(spec: &PolicySpec, family: Family, virt: &[String]) -> String {
    let mut s = String::from("*nat\n");
    for line in nat_rules_virt(spec, family, virt) {
        s.push_str(&line);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    let raw = raw_rules(spec, family);
    if !raw.is_empty() {
        s.push_str("*raw\n");
        for line in raw {
            s.push_str(&line);
            s.push('\n');
        }
        s.push_str("COMMIT\n");
    }
    s
}

/// Both scripts, IPv4 first, each after a `#` comment naming the tool that
/// loads it. Not loadable as a whole: give each half to its own tool, or use
/// [`render`] for one family.
pub fn render_both(spec: &PolicySpec) -> String {
    render_both_virt(spec, &[])
}

/// [`render_both`] with `-k`'s rules ([`nat_rules_virt`]).
pub fn render_both_virt(spec: &PolicySpec, virt: &[String]) -> String {
    let mut s = String::new();
    for family in [Family::V4, Family::V6] {
        let _ = writeln!(
            s,
            "# {}: load with {}",
            family.label(),
            family.restore_command()
        );
        s.push_str(&render_virt(spec, family, virt));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `nat` table lines of istio's golden files
    /// (`tools/istio-iptables/pkg/capture/testdata/<name>.golden`), shared by
    /// all of them up to the end of rule 6, minus the inbound part.
    const HEAD: &[&str] = &[
        "-N ISTIO_INBOUND",
        "-N ISTIO_REDIRECT",
        "-N ISTIO_IN_REDIRECT",
        "-N ISTIO_OUTPUT",
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    ];
    const OUTPUT_HEAD: &[&str] = &[
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
    ];

    /// istio's `basic-exclude-nic.golden` (`ExcludeInterfaces =
    /// "not-istio-nic"`): the interface's two RETURN rules come right
    /// after the chains are declared, before anything else.
    #[test]
    fn exclude_interfaces_golden() {
        let spec = PolicySpec {
            exclude_interfaces: vec!["not-istio-nic".into()],
            ..PolicySpec::default()
        };
        let got = nat_rules(&spec, Family::V4);
        let want = golden(&[
            &HEAD[..4],
            &[
                "-A PREROUTING -i not-istio-nic -j RETURN",
                "-A OUTPUT -o not-istio-nic -j RETURN",
            ],
            &HEAD[4..],
            OUTPUT_HEAD,
        ]);
        assert_eq!(got, want);
    }

    /// istio's `kube-virt-interfaces.golden` (include `*`, virtual
    /// interfaces eth1 and eth2).
    #[test]
    fn kube_virt_interfaces_golden() {
        let spec = PolicySpec {
            include_cidrs: Include::All,
            ..PolicySpec::default()
        };
        let virt = ["eth1".to_string(), "eth2".to_string()];
        let got = nat_rules_virt(&spec, Family::V4, &virt);
        let want = golden(&[
            &HEAD[..4],
            &[
                "-I PREROUTING 1 -i eth1 -j RETURN",
                "-I PREROUTING 1 -i eth2 -j RETURN",
            ],
            &HEAD[4..],
            OUTPUT_HEAD,
            &[
                "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
                "-I PREROUTING 1 -i eth1 -j ISTIO_REDIRECT",
                "-I PREROUTING 1 -i eth2 -j ISTIO_REDIRECT",
            ],
        ]);
        assert_eq!(got, want);
        // With a CIDR list: one insert per CIDR and interface, before the
        // CIDR's own rule.
        let spec = PolicySpec {
            include_cidrs: Include::List(vec!["10.0.0.0/8".parse().unwrap()]),
            ..PolicySpec::default()
        };
        let got = nat_rules_virt(&spec, Family::V4, &virt[..1]);
        assert_eq!(
            got[got.len() - 2..],
            [
                "-I PREROUTING 1 -i eth1 -d 10.0.0.0/8 -j ISTIO_REDIRECT".to_string(),
                "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT".to_string(),
            ]
        );
    }

    fn golden(parts: &[&[&str]]) -> Vec<String> {
        parts
            .iter()
            .flat_map(|p| p.iter())
            .map(|s| s.to_string())
            .collect()
    }

    fn cidrs(s: &[&str]) -> Vec<Cidr> {
        s.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn golden_empty() {
        let got = nat_rules(&PolicySpec::default(), Family::V4);
        assert_eq!(got, golden(&[HEAD, OUTPUT_HEAD]));
    }

    #[test]
    fn golden_ipnets() {
        let spec = PolicySpec {
            include_cidrs: Include::List(cidrs(&["10.0.0.0/8"])),
            ..PolicySpec::default()
        };
        let tail: &[&str] = &["-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT"];
        assert_eq!(
            nat_rules(&spec, Family::V4),
            golden(&[HEAD, OUTPUT_HEAD, tail])
        );
    }

    #[test]
    fn golden_outbound_ports_include() {
        // The golden's flag value is "32000,31000"; the order of same-target
        // lines is the spec's.
        let spec = PolicySpec {
            include_ports: vec![32000, 31000],
            ..PolicySpec::default()
        };
        let tail: &[&str] = &[
            "-A ISTIO_OUTPUT -p tcp --dport 32000 -j ISTIO_REDIRECT",
            "-A ISTIO_OUTPUT -p tcp --dport 31000 -j ISTIO_REDIRECT",
        ];
        assert_eq!(
            nat_rules(&spec, Family::V4),
            golden(&[HEAD, OUTPUT_HEAD, tail])
        );
    }

    #[test]
    fn golden_inbound_ports_wildcard() {
        let spec = PolicySpec {
            inbound_ports: InboundPorts::All,
            ..PolicySpec::default()
        };
        let inbound: &[&str] = &[
            "-A PREROUTING -p tcp -j ISTIO_INBOUND",
            "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        ];
        assert_eq!(
            nat_rules(&spec, Family::V4),
            golden(&[HEAD, inbound, OUTPUT_HEAD])
        );
    }

    #[test]
    fn golden_inbound_ports_include() {
        let spec = PolicySpec {
            inbound_ports: InboundPorts::List(vec![32000, 31000]),
            ..PolicySpec::default()
        };
        let inbound: &[&str] = &[
            "-A PREROUTING -p tcp -j ISTIO_INBOUND",
            "-A ISTIO_INBOUND -p tcp --dport 32000 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_INBOUND -p tcp --dport 31000 -j ISTIO_IN_REDIRECT",
        ];
        assert_eq!(
            nat_rules(&spec, Family::V4),
            golden(&[HEAD, inbound, OUTPUT_HEAD])
        );
    }

    /// ip-range.golden without its DNS lines: UIDs 3,4, GIDs 1,2, exclude
    /// 1.1.0.0/16, include 9.9.0.0/16. With DNS off istio's 3a/3b lines take
    /// the forms of the other goldens, so those are used here.
    #[test]
    fn golden_ip_range_without_dns() {
        let spec = PolicySpec {
            proxy_uids: vec![3, 4],
            proxy_gids: vec![1, 2],
            exclude_cidrs: cidrs(&["1.1.0.0/16"]),
            include_cidrs: Include::List(cidrs(&["9.9.0.0/16"])),
            ..PolicySpec::default()
        };
        let mut want = golden(&[HEAD]);
        want.push("-A OUTPUT -j ISTIO_OUTPUT".into());
        want.push("-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN".into());
        for (kind, id) in [("uid", 3), ("uid", 4), ("gid", 1), ("gid", 2)] {
            want.push(format!("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --{kind}-owner {id} -j ISTIO_IN_REDIRECT"));
            want.push(format!(
                "-A ISTIO_OUTPUT -o lo -m owner ! --{kind}-owner {id} -j RETURN"
            ));
            want.push(format!(
                "-A ISTIO_OUTPUT -m owner --{kind}-owner {id} -j RETURN"
            ));
        }
        want.extend(
            [
                "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A ISTIO_OUTPUT -d 1.1.0.0/16 -j RETURN",
                "-A ISTIO_OUTPUT -d 9.9.0.0/16 -j ISTIO_REDIRECT",
            ]
            .map(String::from),
        );
        assert_eq!(nat_rules(&spec, Family::V4), want);
    }

    /// The tables of an istio golden file (testdata/istio-goldens): for
    /// each `* TABLE` ... `COMMIT`, the table's name and lines, in order
    /// (IPv4 first, then IPv6).
    fn golden_tables(text: &str) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        let mut cur: Option<(String, Vec<String>)> = None;
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("* ") {
                cur = Some((t.to_string(), Vec::new()));
            } else if line == "COMMIT" {
                out.extend(cur.take());
            } else if let Some((_, lines)) = cur.as_mut() {
                lines.push(canonical(line));
            }
        }
        out
    }

    /// The line with its IPv6 addresses in canonical form (istio prints
    /// a nameserver as written: `::127.0.0.53`; redirect as `::7f00:35`).
    fn canonical(line: &str) -> String {
        line.split(' ')
            .map(|w| match w.split_once('/') {
                Some((a, len)) if a.contains(':') => match a.parse::<std::net::Ipv6Addr>() {
                    Ok(ip) => format!("{ip}/{len}"),
                    Err(_) => w.to_string(),
                },
                _ => w.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn dns_spec(servers: &[&str]) -> PolicySpec {
        PolicySpec {
            proxy_uids: vec![3, 4],
            proxy_gids: vec![1, 2],
            dns: Some(crate::policy::DnsCapture {
                capture_all: false,
                servers: servers.iter().map(|s| s.parse().unwrap()).collect(),
            }),
            ..PolicySpec::default()
        }
    }

    /// dns-uid-gid.golden, every line of both families' nat and raw
    /// tables: DNS capture to 127.0.0.53 and ::127.0.0.53, UIDs 3,4, GIDs
    /// 1,2.
    #[test]
    fn golden_dns_uid_gid() {
        let tables = golden_tables(include_str!("../testdata/istio-goldens/dns-uid-gid.golden"));
        let spec = dns_spec(&["127.0.0.53", "::127.0.0.53"]);
        let want: Vec<&(String, Vec<String>)> = tables.iter().collect();
        assert_eq!(want.len(), 4);
        for (i, family) in [Family::V4, Family::V6].into_iter().enumerate() {
            assert_eq!(want[2 * i].0, "nat");
            assert_eq!(nat_rules(&spec, family), want[2 * i].1, "{family:?} nat");
            assert_eq!(want[2 * i + 1].0, "raw");
            assert_eq!(
                raw_rules(&spec, family),
                want[2 * i + 1].1,
                "{family:?} raw"
            );
        }
    }

    /// ip-range.golden, all of it: the DNS lines with exclude and include
    /// CIDRs.
    #[test]
    fn golden_ip_range() {
        let tables = golden_tables(include_str!("../testdata/istio-goldens/ip-range.golden"));
        let spec = PolicySpec {
            exclude_cidrs: cidrs(&["1.1.0.0/16"]),
            include_cidrs: Include::List(cidrs(&["9.9.0.0/16"])),
            ..dns_spec(&["127.0.0.53"])
        };
        assert_eq!(tables.len(), 2);
        assert_eq!(nat_rules(&spec, Family::V4), tables[0].1);
        assert_eq!(raw_rules(&spec, Family::V4), tables[1].1);
    }

    /// `--capture-all-dns`: the nameserver lines become address-free ones,
    /// in both families, as istio writes them.
    #[test]
    fn capture_all_dns() {
        let mut spec = dns_spec(&[]);
        spec.dns.as_mut().unwrap().capture_all = true;
        for family in [Family::V4, Family::V6] {
            let nat = nat_rules(&spec, family);
            for line in [
                "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS",
                "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053",
                "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053",
            ] {
                assert!(nat.contains(&line.to_string()), "{family:?}: {nat:#?}");
            }
            let raw = raw_rules(&spec, family);
            assert!(
                raw.contains(&"-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j CT --zone 2".to_string())
            );
            assert!(raw.contains(&"-A ISTIO_INBOUND -p udp --sport 53 -j CT --zone 1".to_string()));
        }
        // Without DNS capture there is no raw table at all.
        assert!(raw_rules(&PolicySpec::default(), Family::V4).is_empty());
        assert!(!render(&PolicySpec::default(), Family::V4).contains("*raw"));
    }

    /// The IPv6 set of dns-uid-gid.golden uses `::6/128` and `::1/128`.
    #[test]
    fn v6_addresses() {
        let got = nat_rules(&PolicySpec::default(), Family::V6);
        assert!(got.contains(&"-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN".to_string()));
        assert!(got.contains(&"-A ISTIO_OUTPUT -d ::1/128 -j RETURN".to_string()));
        assert!(got.contains(&"-A ISTIO_OUTPUT -o lo ! -d ::1/128 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT".to_string()));
        assert!(!got.iter().any(|l| l.contains("127.0.0.")), "{got:?}");
    }

    #[test]
    fn cidrs_go_to_their_family_only() {
        let spec = PolicySpec {
            exclude_cidrs: cidrs(&["10.1.0.0/16", "fd00:1::/32"]),
            include_cidrs: Include::List(cidrs(&["10.0.0.0/8", "fd00::/8"])),
            ..PolicySpec::default()
        };
        let v4 = nat_rules(&spec, Family::V4);
        let v6 = nat_rules(&spec, Family::V6);
        let tail4: Vec<&str> = v4[v4.len() - 2..].iter().map(String::as_str).collect();
        let tail6: Vec<&str> = v6[v6.len() - 2..].iter().map(String::as_str).collect();
        assert_eq!(
            tail4,
            [
                "-A ISTIO_OUTPUT -d 10.1.0.0/16 -j RETURN",
                "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT"
            ]
        );
        assert_eq!(
            tail6,
            [
                "-A ISTIO_OUTPUT -d fd00:1::/32 -j RETURN",
                "-A ISTIO_OUTPUT -d fd00::/8 -j ISTIO_REDIRECT"
            ]
        );
        assert!(!v4.iter().any(|l| l.contains("fd00")));
        assert!(!v6.iter().any(|l| l.contains("10.")));
    }

    /// istio's order: `-A OUTPUT -j ISTIO_OUTPUT`, then the excluded ports
    /// (TCP and UDP) before the passthrough rule; included ports after the
    /// excluded CIDRs; `*` last.
    #[test]
    fn rule_order() {
        let spec = PolicySpec {
            exclude_ports: vec![22, 3306],
            include_ports: vec![8080],
            exclude_cidrs: cidrs(&["192.168.0.0/16"]),
            include_cidrs: Include::All,
            inbound_ports: InboundPorts::All,
            exclude_inbound_ports: vec![15020, 15090],
            ..PolicySpec::default()
        };
        let got = nat_rules(&spec, Family::V4);
        let at = |l: &str| {
            got.iter()
                .position(|g| g == l)
                .unwrap_or_else(|| panic!("{l} missing from {got:#?}"))
        };
        assert_eq!(
            at("-A OUTPUT -j ISTIO_OUTPUT") + 1,
            at("-A ISTIO_OUTPUT -p tcp --dport 22 -j RETURN")
        );
        assert_eq!(
            &got[at("-A OUTPUT -j ISTIO_OUTPUT") + 1
                ..at("-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN")],
            [
                "-A ISTIO_OUTPUT -p tcp --dport 22 -j RETURN",
                "-A ISTIO_OUTPUT -p udp --dport 22 -j RETURN",
                "-A ISTIO_OUTPUT -p tcp --dport 3306 -j RETURN",
                "-A ISTIO_OUTPUT -p udp --dport 3306 -j RETURN",
            ]
        );
        assert_eq!(
            &got[at("-A PREROUTING -p tcp -j ISTIO_INBOUND")..at("-A OUTPUT -j ISTIO_OUTPUT")],
            [
                "-A PREROUTING -p tcp -j ISTIO_INBOUND",
                "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
                "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
                "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
            ]
        );
        assert_eq!(
            &got[at("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN")..],
            [
                "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A ISTIO_OUTPUT -d 192.168.0.0/16 -j RETURN",
                "-A ISTIO_OUTPUT -p tcp --dport 8080 -j ISTIO_REDIRECT",
                "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
            ]
        );
    }

    #[test]
    fn other_ports_and_no_owners() {
        let spec = PolicySpec {
            proxy_port: 1,
            inbound_port: 2,
            tunnel_port: 3,
            proxy_uids: vec![],
            proxy_gids: vec![],
            ..PolicySpec::default()
        };
        let got = nat_rules(&spec, Family::V4);
        assert!(got.contains(&"-A ISTIO_INBOUND -p tcp --dport 3 -j RETURN".into()));
        assert!(got.contains(&"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 1".into()));
        assert!(got.contains(&"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 2".into()));
        assert!(!got.iter().any(|l| l.contains("owner")), "{got:#?}");
    }

    /// istio-iptables drops the `-o lo ! --uid-owner` RETURN rules when an
    /// include CIDR is a loopback address (`HasLoopBackIP`).
    #[test]
    fn loopback_include_drops_rule_3b() {
        let spec = PolicySpec {
            include_cidrs: Include::List(cidrs(&["127.0.0.1/32", "10.0.0.0/8"])),
            ..PolicySpec::default()
        };
        assert!(include_has_loopback(&spec));
        for family in [Family::V4, Family::V6] {
            let got = nat_rules(&spec, family);
            assert!(!got.iter().any(|l| l.contains("! --uid-owner")));
            assert!(!got.iter().any(|l| l.contains("! --gid-owner")));
        }
        assert!(!include_has_loopback(&PolicySpec::default()));
    }

    /// outbound-owner-groups.golden, with numeric groups (redirect takes
    /// numeric GIDs only; the golden's `java` is a group name).
    #[test]
    fn golden_owner_groups() {
        let spec = PolicySpec {
            owner_groups: OwnerGroups::Include(vec![1001, 202]),
            ..PolicySpec::default()
        };
        let got = nat_rules(&spec, Family::V4);
        let mut want = golden(&[HEAD, OUTPUT_HEAD]);
        want.insert(
            want.len() - 1,
            "-A ISTIO_OUTPUT -m owner ! --gid-owner 1001 -m owner ! --gid-owner 202 -j RETURN"
                .into(),
        );
        assert_eq!(got, want);
        let spec = PolicySpec {
            owner_groups: OwnerGroups::Exclude(vec![5, 6]),
            ..PolicySpec::default()
        };
        let got = nat_rules(&spec, Family::V4);
        assert_eq!(
            &got[got.len() - 3..],
            [
                "-A ISTIO_OUTPUT -m owner --gid-owner 5 -j RETURN",
                "-A ISTIO_OUTPUT -m owner --gid-owner 6 -j RETURN",
                "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
            ]
        );
    }

    /// Mark and cgroup come after the GIDs as owners of their own; services
    /// between the included ports and the included CIDRs.
    #[test]
    fn redirect_additions() {
        let spec = PolicySpec {
            proxy_uids: vec![],
            proxy_gids: vec![],
            proxy_mark: Some(0x539),
            proxy_cgroup: Some(crate::policy::ProxyCgroup {
                path: "/sys/fs/cgroup/pod/proxy".into(),
                rel: "pod/proxy".into(),
                id: 1,
                level: 2,
            }),
            include_ports: vec![443],
            services: vec![
                "10.0.0.1:80".parse().unwrap(),
                "[fd00::1]:80".parse().unwrap(),
            ],
            include_cidrs: Include::List(cidrs(&["10.9.0.0/16"])),
            ..PolicySpec::default()
        };
        let got = nat_rules(&spec, Family::V4);
        let from = got.iter().position(|l| l.contains("127.0.0.6")).unwrap() + 1;
        assert_eq!(
            &got[from..],
            [
                "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark --mark 0x539 -j ISTIO_IN_REDIRECT",
                "-A ISTIO_OUTPUT -o lo -m mark ! --mark 0x539 -j RETURN",
                "-A ISTIO_OUTPUT -m mark --mark 0x539 -j RETURN",
                "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m cgroup --path pod/proxy -j ISTIO_IN_REDIRECT",
                "-A ISTIO_OUTPUT -o lo -m cgroup ! --path pod/proxy -j RETURN",
                "-A ISTIO_OUTPUT -m cgroup --path pod/proxy -j RETURN",
                "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A ISTIO_OUTPUT -p tcp --dport 443 -j ISTIO_REDIRECT",
                "-A ISTIO_OUTPUT -d 10.0.0.1/32 -p tcp --dport 80 -j ISTIO_REDIRECT",
                "-A ISTIO_OUTPUT -d 10.9.0.0/16 -j ISTIO_REDIRECT",
            ]
        );
        let v6 = nat_rules(&spec, Family::V6);
        assert!(v6.contains(
            &"-A ISTIO_OUTPUT -d fd00::1/128 -p tcp --dport 80 -j ISTIO_REDIRECT".to_string()
        ));
        assert!(!v6.iter().any(|l| l.contains("10.0.0.1")));
    }

    #[test]
    fn scripts() {
        let spec = PolicySpec::default();
        let v4 = render(&spec, Family::V4);
        assert!(v4.starts_with("*nat\n-N ISTIO_INBOUND\n"), "{v4}");
        assert!(v4.ends_with("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\nCOMMIT\n"));
        let both = render_both(&spec);
        assert_eq!(
            both,
            format!(
                "# IPv4: load with iptables-restore\n{v4}# IPv6: load with ip6tables-restore\n{}",
                render(&spec, Family::V6)
            )
        );
    }
}

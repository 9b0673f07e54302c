//! Differential test: the same policies and the same connections through
//! real iptables (istio's rule set rendered by `redirect iptables`, loaded
//! with `iptables-restore`, legacy and nft backends) and through redirect,
//! each in its own identical pod. Every connection's outcome (which listener
//! got it, and the original destination the proxy learned) must agree.
//!
//! The matrix: owners × destination classes × ports × bound source for
//! outbound connections from the pod, plus inbound connections from outside
//! to every pod port. Run once per policy of the corpus.

use std::{
    collections::BTreeMap,
    io::Write as _,
    process::{Command, Stdio},
};

use redirect_tests::{
    APP_PORT, Fixture, can_run, other,
    peer::ClientView,
    pod::{As, POD_IP, POD_IP6, Side, UPSTREAM_IP, UPSTREAM_IP6, upstream_extra, upstream_extra6},
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

/// Ports the pod's servers listen on besides [`APP_PORT`].
const POD_PORTS: [u16; 3] = [2222, 9090, 15008];

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

struct World {
    backend: Backend,
    f: Fixture,
}

impl World {
    fn new(backend: Backend) -> World {
        let mut f = Fixture::new();
        let listen: Vec<String> = POD_PORTS
            .iter()
            .flat_map(|p| [format!("0.0.0.0:{p}"), format!("[::]:{p}")])
            .collect();
        let refs: Vec<&str> = listen.iter().map(String::as_str).collect();
        f.pod
            .start_server(Side::Pod, As::APP, "app2", &refs)
            .expect("second app server");
        World { backend, f }
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
                    let script = render(policy, v6);
                    self.restore(b.restore(v6), &script, policy);
                }
            }
        }
    }

    fn restore(&self, cmd: &str, script: &str, policy: &[&str]) {
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

#[test]
fn same_outcomes_as_iptables_legacy_and_nft() {
    if !can_run() {
        return;
    }
    let worlds: Vec<World> = [Backend::Redirect, Backend::Legacy, Backend::Nft]
        .into_iter()
        .map(World::new)
        .collect();
    let cases = matrix();
    let mut compared: BTreeMap<&str, usize> = BTreeMap::new();
    let mut diffs = Vec::new();
    for policy in POLICIES {
        for w in &worlds {
            w.apply(policy);
        }
        let results: Vec<BTreeMap<Case, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = worlds
                .iter()
                .map(|w| s.spawn(|| run_matrix(w, &cases)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ebpf = &results[0];
        for (w, res) in worlds.iter().zip(&results).skip(1) {
            let name = if w.backend == Backend::Legacy {
                "legacy"
            } else {
                "nft"
            };
            for c in &cases {
                *compared.entry(name).or_default() += 1;
                if ebpf[c] != res[c] {
                    diffs.push(format!(
                        "{policy:?} {} {} bind={:?} -> {}: redirect={} iptables-{name}={}",
                        c.dir, c.who, c.bind, c.to, ebpf[c], res[c]
                    ));
                }
            }
        }
    }
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

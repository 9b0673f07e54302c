//! The scripts `redirect iptables --family 4|6` prints load into real
//! iptables: each one goes through `iptables-restore` (legacy and nft
//! backends) or `ip6tables-restore` in a fresh network namespace of its own,
//! and each table read back with `*-save` (`nat`, and `raw` with DNS
//! capture) holds the same rules, chain by chain.

use std::{
    collections::BTreeMap,
    io::Write as _,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use redirect_tests::{can_run, redirect_bin};

#[derive(Clone, Copy, Debug)]
enum Family {
    V4,
    V6,
}

/// Policies, as `redirect iptables` flags: the golden settings redirect
/// supports, and the corners of the renderer.
const POLICIES: &[&[&str]] = &[
    &[],
    &["-i", "10.0.0.0/8"],
    &["-q", "32000,31000"],
    &["-b", "*"],
    &["-b", "32000,31000"],
    &[
        "-i",
        "*",
        "-x",
        "10.1.0.0/16,192.168.0.0/24,fd00::/8",
        "-o",
        "22,3306",
        "-q",
        "80,443",
        "-b",
        "*",
        "-d",
        "15090,15021",
        "-u",
        "3,4",
        "-g",
        "1,2",
    ],
    &[
        "-i",
        "10.0.0.0/8,fd00::/16,2001:db8::1",
        "-x",
        "fd00:1::/32",
    ],
    &["-i", "127.0.0.1/32,fd00::/8"],
    &["-i", "*", "-u", "", "-g", ""],
    &["-p", "1", "-z", "2", "--tunnel-port", "3", "-q", "4"],
    &["-i", "*", "--owner-groups-include", "1001,202"],
    &["-i", "*", "--owner-groups-exclude", "5,6", "-u", "3,4"],
    &[
        "-i",
        "10.0.0.0/8",
        "--proxy-mark",
        "0x539",
        "--service",
        "10.9.0.1:80,[fd00::1]:443",
        "-u",
        "",
    ],
    // Excluded interfaces, a name and a pattern.
    &["-i", "*", "-b", "*", "-c", "eth1,net+"],
    // DNS capture: nameservers of both families (the raw table's zones
    // too), and every address.
    &[
        "-i",
        "*",
        "-u",
        "3,4",
        "-g",
        "1,2",
        "--redirect-dns",
        "--dns-servers",
        "127.0.0.53,::127.0.0.53,10.96.0.10",
    ],
    &[
        "-i",
        "10.0.0.0/8",
        "--owner-groups-exclude",
        "7",
        "--redirect-dns",
        "--capture-all-dns",
        "--dns-servers",
        "",
    ],
];

/// `redirect iptables --family 4|6 <flags>`.
fn render(flags: &[&str], family: Family) -> String {
    let family = match family {
        Family::V4 => "4",
        Family::V6 => "6",
    };
    let out = Command::new(redirect_bin())
        .args(["iptables", "--family", family])
        .args(flags)
        .output()
        .expect("running redirect");
    assert!(
        out.status.success(),
        "redirect iptables {flags:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 script")
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace deleted on drop, also when the test panics.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!(
            "rdt-render-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("running ip (is iproute2 installed?)");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns(name)
    }

    /// Runs `tool args` inside, with `stdin` on its standard input.
    fn exec(&self, tool: &str, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, tool])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("ip netns exec {tool}: {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// `-A` lines per chain, each as its sorted words, without the `-m tcp` /
/// `-m udp` that `*-save` adds and with the order of options ignored (save
/// prints `-s X -o lo` for `-o lo -s X`).
fn rules_by_chain(text: &str) -> BTreeMap<String, Vec<Vec<String>>> {
    let mut out: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        // `*-save` quotes some values (`--path "a/b"`).
        let words: Vec<&str> = rest
            .split_whitespace()
            .map(|w| w.trim_matches('"'))
            .collect();
        let chain = words[0].to_string();
        let mut kept = Vec::new();
        let mut i = 1;
        while i < words.len() {
            if words[i] == "-m" && matches!(words.get(i + 1), Some(&"tcp") | Some(&"udp")) {
                i += 2;
                continue;
            }
            // istio's UDP REDIRECT says `--to-port`; `*-save` prints
            // `--to-ports`.
            kept.push(match words[i] {
                "--to-port" => "--to-ports".to_string(),
                w => canonical(w),
            });
            i += 1;
        }
        kept.sort();
        out.entry(chain).or_default().push(kept);
    }
    out
}

fn load(family: Family, backend: &str, script: &str, policy: &[&str]) {
    let prefix = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    let ns = Netns::new();
    let restore = format!("{prefix}-{backend}-restore");
    let out = ns.exec(&restore, &[], script);
    assert!(
        out.status.success(),
        "{restore} refused the script for {policy:?}: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    let save = format!("{prefix}-{backend}-save");
    for (table, lines) in tables(script) {
        let out = ns.exec(&save, &["-t", &table], "");
        assert!(
            out.status.success(),
            "{save}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let saved = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            rules_by_chain(&saved),
            rules_by_chain(&lines),
            "{save} -t {table} after {restore} for {policy:?}:\n{saved}\nscript:\n{script}"
        );
    }
}

/// An IPv6 prefix in canonical form (`ip6tables-save` prints
/// `::127.0.0.53/128` for redirect's `::7f00:35/128`); any other word as is.
fn canonical(w: &str) -> String {
    match w.split_once('/') {
        Some((a, len)) if a.contains(':') => match a.parse::<std::net::Ipv6Addr>() {
            Ok(ip) => format!("{ip}/{len}"),
            Err(_) => w.to_string(),
        },
        _ => w.to_string(),
    }
}

/// The script's tables: (name, its lines).
fn tables(script: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in script.lines() {
        if let Some(t) = line.strip_prefix('*') {
            out.push((t.to_string(), String::new()));
        } else if let Some((_, text)) = out.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    out
}

/// A cgroup directory, removed on drop.
struct Cgroup(std::path::PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn rendered_scripts_load_into_iptables() {
    if !can_run() {
        return;
    }
    // `--proxy-cgroup` needs a real cgroup v2 directory, and so does
    // `-m cgroup --path` when the rule is loaded.
    let root = redirect::fs::cgroup2_mount().expect("a cgroup v2 hierarchy");
    let cgroup = Cgroup(root.join(format!("rdt-render-{}", std::process::id())));
    std::fs::create_dir(&cgroup.0).expect("creating a cgroup");
    let cg = cgroup.0.display().to_string();
    let with_cgroup: &[&str] = &["-i", "*", "--proxy-cgroup", &cg, "-g", ""];
    for policy in POLICIES.iter().copied().chain([with_cgroup]) {
        for family in [Family::V4, Family::V6] {
            let script = render(policy, family);
            assert!(script.starts_with("*nat\n"), "{script}");
            for backend in ["legacy", "nft"] {
                load(family, backend, &script, policy);
            }
        }
    }
}

/// Guard against a test that passes by comparing nothing.
#[test]
fn rule_comparison_sees_every_rule() {
    let script = render(&["-o", "22", "-i", "*"], Family::V4);
    let rules = rules_by_chain(&script);
    let count: usize = rules.values().map(Vec::len).sum();
    assert_eq!(
        count,
        script.lines().filter(|l| l.starts_with("-A ")).count()
    );
    assert_eq!(
        rules["ISTIO_OUTPUT"][0],
        ["--dport", "-j", "-p", "22", "RETURN", "tcp"]
    );
}

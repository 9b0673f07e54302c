//! End to end through the real binary: `redirect explain`, `redirect
//! iptables` and `redirect apply --dry-run`. The tests that need no
//! privilege run everywhere; the ones on a real pod need root (and fail under
//! `CI=true` without it).

use std::{path::PathBuf, process::Command};

use redirect::{apply::PROGRAMS, fs::cgroup2_mount};
use redirect_tests::{
    APP_PORT, Fixture, can_run, other,
    pod::{As, POD_IP, POD_IP6, Side, UPSTREAM_IP, UPSTREAM_IP6, upstream_extra, upstream_extra6},
    redirect_bin,
};
use serde_json::Value;

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn redirect(args: &[&str]) -> Run {
    let out = Command::new(redirect_bin())
        .args(args)
        .output()
        .expect("running redirect");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(args: &[&str]) -> String {
    let r = redirect(args);
    assert!(r.ok, "redirect {args:?} failed: {}", r.stderr);
    r.stdout
}

fn json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&ok(&all)).expect("JSON output")
}

/// Fails, and the error names `flag` and `value`.
fn refused(args: &[&str], flag: &str, value: &str) {
    let r = redirect(args);
    assert!(!r.ok, "redirect {args:?} should fail: {}", r.stdout);
    assert!(
        r.stderr.contains(flag) && r.stderr.contains(value),
        "error for {args:?} should name {flag} and {value}: {}",
        r.stderr
    );
}

/// `(action, port, rule name)`.
type Decision = (String, Option<u64>, String);

/// The [`Decision`] of `explain --json` output.
fn decision(v: &Value) -> Decision {
    (
        v["action"].as_str().unwrap().to_string(),
        v["port"].as_u64(),
        v["rule"]["name"].as_str().unwrap().to_string(),
    )
}

fn d(action: &str, port: Option<u64>, rule: &str) -> Decision {
    (action.to_string(), port, rule.to_string())
}

#[test]
fn explain_outbound() {
    let policy = [
        "-i",
        "10.0.0.0/8",
        "-x",
        "10.1.0.0/16",
        "-q",
        "443",
        "-o",
        "22",
        "-u",
        "1337",
        "-g",
        "1337",
    ];
    let cases: &[(&[&str], Decision)] = &[
        (
            &["--dst", "10.2.0.1:80", "--uid", "1000"],
            d("redirect", Some(15001), "included_cidr"),
        ),
        (
            &["--dst", "10.1.0.1:80", "--uid", "1000"],
            d("pass", None, "excluded_cidr"),
        ),
        (
            &["--dst", "10.1.0.1:443", "--uid", "1000"],
            d("pass", None, "excluded_cidr"),
        ),
        (
            &["--dst", "8.8.8.8:443", "--uid", "1000"],
            d("redirect", Some(15001), "included_port"),
        ),
        (
            &["--dst", "8.8.8.8:80", "--uid", "1000"],
            d("pass", None, "not_captured"),
        ),
        (
            &["--dst", "10.2.0.1:22", "--uid", "1000"],
            d("pass", None, "excluded_port"),
        ),
        (
            &["--dst", "10.2.0.1:80", "--uid", "1337"],
            d("pass", None, "proxy_owner"),
        ),
        (
            &["--dst", "10.2.0.1:80", "--uid", "5", "--gid", "1337"],
            d("pass", None, "proxy_owner"),
        ),
        (
            &["--dst", "127.0.0.1:80", "--uid", "1000"],
            d("pass", None, "loopback_not_proxy"),
        ),
        (
            &["--dst", "127.0.0.1:80", "--uid", "1337"],
            d("pass", None, "proxy_owner"),
        ),
        (
            &[
                "--dst",
                "10.9.0.2:8080",
                "--uid",
                "1337",
                "--local-addr",
                "10.9.0.2",
            ],
            d("redirect", Some(15006), "proxy_to_local"),
        ),
        (
            &[
                "--dst",
                "10.9.0.2:8080",
                "--uid",
                "1000",
                "--local-addr",
                "10.9.0.2",
            ],
            d("pass", None, "loopback_not_proxy"),
        ),
        (
            &[
                "--dst",
                "10.9.0.2:8080",
                "--uid",
                "1000",
                "--src",
                "127.0.0.6",
                "--local-addr",
                "10.9.0.2",
            ],
            d("pass", None, "passthrough_source"),
        ),
        // IPv6, and an IPv4-mapped destination decided as IPv4.
        (
            &["--dst", "[fd00::1]:80", "--uid", "1000"],
            d("pass", None, "not_captured"),
        ),
        (
            &["--dst", "[::ffff:10.2.0.1]:80", "--uid", "1000"],
            d("redirect", Some(15001), "included_cidr"),
        ),
        (
            &["--dst", "[::ffff:10.1.0.1]:80", "--uid", "1000"],
            d("pass", None, "excluded_cidr"),
        ),
        (
            &["--dst", "[fd00::1]:443", "--uid", "1000"],
            d("redirect", Some(15001), "included_port"),
        ),
        (
            &["--dst", "[::1]:80", "--uid", "1000"],
            d("pass", None, "loopback_not_proxy"),
        ),
    ];
    for (conn, want) in cases {
        let mut args = vec!["explain"];
        args.extend_from_slice(conn);
        args.extend_from_slice(&policy);
        let v = json(&args);
        assert_eq!(&decision(&v), want, "{args:?}: {v:#}");
        assert_eq!(v["connection"]["direction"], "out");
        assert!(v["over_lo"].is_boolean(), "{v:#}");
    }

    // A loopback include CIDR: istio has no rule 3b then, nor does redirect.
    let v = json(&[
        "explain",
        "-i",
        "127.0.0.0/8",
        "--uid",
        "1000",
        "--dst",
        "127.0.0.2:80",
    ]);
    assert_eq!(decision(&v), d("redirect", Some(15001), "included_cidr"));

    // The text form says the same.
    let text = ok(&[
        "explain",
        "--dst",
        "10.2.0.1:80",
        "--uid",
        "1000",
        "-i",
        "*",
    ]);
    assert!(
        text.contains("decision    redirect to 127.0.0.1:15001 (proxy port)"),
        "{text}"
    );
    assert!(text.contains("rule        9 include_all: "), "{text}");
    assert!(text.contains("route       not over lo"), "{text}");
    let text = ok(&[
        "explain",
        "--dst",
        "10.9.0.2:80",
        "--uid",
        "1000",
        "--local-addr",
        "10.9.0.2",
        "-i",
        "*",
    ]);
    assert!(text.contains("route       over lo"), "{text}");
    assert!(
        text.contains("rule        3b loopback_not_proxy: "),
        "{text}"
    );
    assert!(text.contains("decision    pass"), "{text}");
}

#[test]
fn explain_inbound() {
    let star = ["-b", "*", "-d", "22"];
    let cases: &[(&str, &[&str], Decision)] = &[
        (
            "10.9.0.2:8080",
            &star,
            d("redirect", Some(15006), "inbound_all"),
        ),
        (
            "10.9.0.2:22",
            &star,
            d("pass", None, "inbound_excluded_port"),
        ),
        ("10.9.0.2:15008", &star, d("pass", None, "inbound_tunnel")),
        (
            "10.9.0.2:8080",
            &["-b", "8080"],
            d("redirect", Some(15006), "inbound_included_port"),
        ),
        (
            "10.9.0.2:8081",
            &["-b", "8080"],
            d("pass", None, "inbound_not_captured"),
        ),
        (
            "10.9.0.2:8080",
            &[],
            d("pass", None, "inbound_not_captured"),
        ),
    ];
    for (dst, policy, want) in cases {
        let mut args = vec![
            "explain",
            "--direction",
            "in",
            "--src",
            "10.5.0.1",
            "--dst",
            dst,
        ];
        args.extend_from_slice(policy);
        let v = json(&args);
        assert_eq!(&decision(&v), want, "{args:?}: {v:#}");
        assert_eq!(v["connection"]["direction"], "in");
        assert!(
            v["over_lo"].is_null() && v["connection"]["uid"].is_null(),
            "{v:#}"
        );
    }
    // The pod's own connections never walk PREROUTING.
    let v = json(&[
        "explain",
        "--direction",
        "in",
        "--src",
        "10.9.0.2",
        "--dst",
        "10.9.0.2:8080",
        "--local-addr",
        "10.9.0.2",
        "-b",
        "*",
    ]);
    assert_eq!(decision(&v), d("pass", None, "inbound_local_source"));
    let text = ok(&[
        "explain",
        "--direction",
        "in",
        "--src",
        "10.5.0.1",
        "--dst",
        "10.9.0.2:80",
        "-b",
        "*",
    ]);
    assert!(text.contains("rule        in-2 inbound_all: "), "{text}");
    assert!(text.contains("port 15006"), "{text}");
}

#[test]
fn explain_refuses_bad_input() {
    refused(&["explain", "--dst", "10.0.0.1"], "--dst", "10.0.0.1");
    refused(&["explain", "--dst", "10.0.0.1:99999"], "--dst", "99999");
    refused(
        &["explain", "--dst", "1.1.1.1:80", "--uid", "root"],
        "--uid",
        "root",
    );
    refused(
        &["explain", "--dst", "1.1.1.1:80", "--local-addr", "pod"],
        "--local-addr",
        "pod",
    );
    refused(
        &["explain", "--dst", "1.1.1.1:80", "--direction", "up"],
        "--direction",
        "up",
    );
    refused(
        &["explain", "--dst", "1.1.1.1:80", "-p", "0"],
        "--proxy-port",
        "0",
    );
    refused(
        &["explain", "--dst", "1.1.1.1:80", "-i", "10.0.0.0/33"],
        "--include-cidrs",
        "10.0.0.0/33",
    );
    refused(
        &["explain", "--direction", "in", "--dst", "1.1.1.1:80"],
        "--direction in",
        "--src",
    );
    refused(
        &[
            "explain",
            "--direction",
            "in",
            "--src",
            "1.1.1.2",
            "--dst",
            "1.1.1.1:80",
            "--uid",
            "7",
        ],
        "--uid",
        "--direction out",
    );
    refused(
        &[
            "explain",
            "--dst",
            "1.1.1.1:80",
            "--pin-dir",
            "/p",
            "-i",
            "*",
        ],
        "--pin-dir",
        "--include-cidrs",
    );
    refused(
        &[
            "explain",
            "--dst",
            "1.1.1.1:80",
            "--netns",
            "/nonexistent/ns",
        ],
        "--netns",
        "/nonexistent/ns",
    );
    refused(
        &[
            "explain",
            "--dst",
            "1.1.1.1:80",
            "--pin-dir",
            "/nonexistent/pins",
        ],
        "--pin-dir",
        "/nonexistent/pins",
    );
    refused(
        &["explain", "--dst", "1.1.1.1:80", "--mark", "0x1g"],
        "--mark",
        "0x1g",
    );
    refused(
        &["explain", "--dst", "1.1.1.1:80", "--cgroup", "/tmp"],
        "--cgroup",
        "/tmp",
    );
    refused(
        &[
            "explain",
            "--direction",
            "in",
            "--src",
            "1.1.1.2",
            "--dst",
            "1.1.1.1:80",
            "--mark",
            "1",
        ],
        "--mark",
        "--direction out",
    );
}

/// The empty-policy `nat` table of istio's golden file `empty.golden`.
const EMPTY_GOLDEN: &str = "\
*nat
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

#[test]
fn iptables_output() {
    assert_eq!(ok(&["iptables", "--family", "4"]), EMPTY_GOLDEN);
    let v6 = ok(&["iptables", "--family", "6"]);
    assert_eq!(
        v6,
        EMPTY_GOLDEN
            .replace("127.0.0.6/32", "::6/128")
            .replace("127.0.0.1/32", "::1/128")
    );
    let both = ok(&["iptables"]);
    assert_eq!(
        both,
        format!(
            "# IPv4: load with iptables-restore\n{EMPTY_GOLDEN}# IPv6: load with ip6tables-restore\n{v6}"
        )
    );
    // Lists land in their family's script; the parser sorts ports.
    let v4 = ok(&[
        "iptables",
        "--family",
        "4",
        "-i",
        "10.0.0.0/8,fd00::/8",
        "-q",
        "32000,31000",
    ]);
    assert!(
        v4.ends_with(
            "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n\
         -A ISTIO_OUTPUT -p tcp --dport 31000 -j ISTIO_REDIRECT\n\
         -A ISTIO_OUTPUT -p tcp --dport 32000 -j ISTIO_REDIRECT\n\
         -A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT\n\
         COMMIT\n"
        ),
        "{v4}"
    );
    assert!(!v4.contains("fd00"));
    // A loopback include CIDR: istio drops rule 3b.
    let v4 = ok(&["iptables", "--family", "4", "-i", "127.0.0.1/32"]);
    assert!(
        !v4.contains("! --uid-owner") && !v4.contains("! --gid-owner"),
        "{v4}"
    );
    refused(&["iptables", "--family", "5"], "--family", "5");
    refused(&["iptables", "-q", "70000"], "--include-ports", "70000");
}

/// A directory of the cgroup v2 hierarchy to name in a dry run (read only).
fn some_cgroup() -> PathBuf {
    cgroup2_mount().expect("a cgroup v2 hierarchy")
}

#[test]
fn dry_run_checks_and_touches_nothing() {
    let cgroup = some_cgroup().display().to_string();
    let pin = std::env::temp_dir().join(format!("rdt-dry-{}", std::process::id()));
    let pin_s = pin.display().to_string();
    let excludes: Vec<String> = (1..=25).map(|i| format!("10.{i}.0.0/16")).collect();
    let excludes = excludes.join(",") + ",fd00::/8";
    let args = [
        "apply",
        "--dry-run",
        "--cgroup",
        &cgroup,
        "--pin-dir",
        &pin_s,
        "-i",
        "*",
        "-x",
        &excludes,
        "-o",
        "22",
        "-q",
        "22,8080",
        "-b",
        "*",
        "-d",
        "15090",
        "-u",
        "1337,7",
        "--owner-groups-include",
        "7,8",
        "--service",
        "10.0.0.1:80",
    ];
    let text = ok(&args);
    assert!(!pin.exists(), "a dry run created {}", pin.display());
    assert!(
        text.contains("nothing loaded, attached, pinned or mounted"),
        "{text}"
    );
    assert!(text.contains("not on bpffs: apply would refuse"), "{text}");
    assert!(
        text.contains(&format!("cgroup/connect4      -> cgroup {cgroup}")),
        "{text}"
    );
    assert!(
        text.contains("sk_lookup            -> netns /proc/self/ns/net"),
        "{text}"
    );
    assert!(
        text.contains("EXCLUDE_V4  25 entries, the first 20:"),
        "{text}"
    );
    assert!(text.contains("... and 5 more"), "{text}");
    assert!(
        text.contains(
            "PORTS       3 entries: 22 out_exclude+out_include, 8080 out_include, 15090 in_exclude"
        ),
        "{text}"
    );
    assert!(text.contains("PROXY_UIDS  2 entries: 1337, 7"), "{text}");
    assert!(text.contains("EXCLUDE_V6  1 entry: fd00::/8"), "{text}");
    assert!(
        text.contains("OWNER_GROUPS 2 entries (only these are captured): 7, 8"),
        "{text}"
    );
    assert!(text.contains("SERVICES    1 entry: 10.0.0.1:80"), "{text}");

    let v = json(&args);
    let maps = &v["maps"];
    assert_eq!(maps["EXCLUDE_V4"]["count"], 25);
    assert_eq!(maps["EXCLUDE_V4"]["entries"].as_array().unwrap().len(), 20);
    assert_eq!(maps["EXCLUDE_V4"]["truncated"], true);
    assert_eq!(maps["INCLUDE_V4"]["count"], 0);
    let flags: Vec<&str> = maps["CONFIGS"]["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(
        flags,
        [
            "has_uids",
            "has_gids",
            "include_all",
            "has_exclude_cidrs",
            "inbound_all",
            "has_services",
            "owner_groups_include",
            // As apply writes it: this kernel has BTF.
            "owner_from_file"
        ]
    );
    assert_eq!(maps["OWNER_GROUPS"]["entries"], serde_json::json!([7, 8]));
    assert_eq!(
        maps["SERVICES"]["entries"],
        serde_json::json!(["10.0.0.1:80"])
    );
    assert_eq!(maps["CONFIGS"]["first_uid"], 1337);
    let hooks: Vec<&str> = v["attach"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["hook"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = PROGRAMS.iter().map(|(_, a, _)| a.hook()).collect();
    assert_eq!(hooks, want);
    assert_eq!(v["pin_dir"]["next_generation"], 1);
    assert!(!pin.exists());

    // The same checks as apply.
    refused(
        &["apply", "--dry-run", "--cgroup", "/nonexistent/cg"],
        "--cgroup",
        "/nonexistent/cg",
    );
    refused(
        &["apply", "--dry-run", "--cgroup", "/tmp"],
        "--cgroup",
        "/tmp",
    );
    refused(
        &[
            "apply",
            "--dry-run",
            "--cgroup",
            &cgroup,
            "--netns",
            "/proc/self/ns/uts",
        ],
        "--netns",
        "/proc/self/ns/uts",
    );
    refused(
        &["apply", "--dry-run", "--cgroup", &cgroup, "-z", "x"],
        "--inbound-capture-port",
        "x",
    );
    refused(
        &["apply", "--json", "--cgroup", &cgroup],
        "--json",
        "--dry-run",
    );
}

/// `explain --pin-dir` on a real pod says what the kernel then does with
/// real connections, and `apply --dry-run` changes nothing there.
#[test]
fn explain_matches_the_kernel_on_a_pod() {
    if !can_run() {
        return;
    }
    let f = Fixture::new();
    let policy = [
        "-i",
        "*",
        "-x",
        "10.201.0.4/32",
        "-o",
        "82",
        "-u",
        "1337",
        "-g",
        "1337",
        "-b",
        "8080",
    ];
    f.apply_ok(&policy);
    let pin = f.pin_dir.display().to_string();
    let pod_app = format!("{POD_IP}:{APP_PORT}");
    let pod_app6 = format!("[{POD_IP6}]:{APP_PORT}");
    let cases: Vec<(As, String)> = vec![
        (As::APP, format!("{}:80", upstream_extra(1))),
        (As::APP, format!("{}:80", upstream_extra(4))),
        (As::APP, format!("{}:82", upstream_extra(1))),
        (As::PROXY, format!("{}:80", upstream_extra(1))),
        (other(2000, 1337), format!("{}:81", upstream_extra(2))),
        (As::APP, pod_app.clone()),
        (As::PROXY, pod_app.clone()),
        (As::APP, format!("[{}]:80", upstream_extra6(1))),
        (As::PROXY, format!("[{}]:80", upstream_extra6(1))),
        (As::APP, format!("[::ffff:{}]:80", upstream_extra(1))),
        (As::APP, format!("[::ffff:{}]:80", upstream_extra(4))),
        (As::APP, pod_app6.clone()),
    ];
    for (who, dst) in cases {
        let (uid, gid) = (who.uid.to_string(), who.gid.to_string());
        let v = json(&[
            "explain",
            "--pin-dir",
            &pin,
            "--uid",
            &uid,
            "--gid",
            &gid,
            "--dst",
            &dst,
        ]);
        let answered = f.who_answers(who, &dst);
        let expected = match (v["action"].as_str().unwrap(), v["port"].as_u64()) {
            ("redirect", Some(15001 | 15006)) => "proxy",
            ("pass", None) if dst == pod_app || dst == pod_app6 => "app",
            ("pass", None) => "upstream",
            other => panic!("unexpected decision {other:?}: {v:#}"),
        };
        assert_eq!(
            answered, expected,
            "uid {uid} gid {gid} -> {dst}: explain said {v:#}"
        );
        assert_eq!(
            v["local_addrs_from"],
            "recorded in the pinned LOCAL_V4/LOCAL_V6 maps"
        );
    }

    // Inbound, from the upstream host.
    for dst in [&pod_app, &pod_app6] {
        let src = if dst == &pod_app {
            UPSTREAM_IP.to_string()
        } else {
            UPSTREAM_IP6.to_string()
        };
        let v = json(&[
            "explain",
            "--pin-dir",
            &pin,
            "--direction",
            "in",
            "--src",
            &src,
            "--dst",
            dst,
        ]);
        assert_eq!(
            decision(&v),
            d("redirect", Some(15006), "inbound_included_port")
        );
        assert_eq!(f.who_answers_in(dst), "proxy", "inbound to {dst}");
    }

    // The pod's address comes from the pins, or from probing its netns.
    let netns = f.pod.netns_path(Side::Pod).display().to_string();
    let v = json(&[
        "explain", "-i", "*", "--netns", &netns, "--uid", "1000", "--dst", &pod_app,
    ]);
    assert_eq!(decision(&v), d("pass", None, "loopback_not_proxy"));
    assert!(
        v["local_addrs"]
            .as_array()
            .unwrap()
            .contains(&Value::from(POD_IP.to_string()))
    );

    // A dry run on the same pod reports the pod's facts and the generation
    // it would replace, and leaves the applied one alone.
    let before = f.status().expect("status");
    let cgroup = f.pod.cgroup.display().to_string();
    let plan = json(&[
        "apply",
        "--dry-run",
        "--cgroup",
        &cgroup,
        "--netns",
        &netns,
        "--pin-dir",
        &pin,
        "-q",
        "9",
    ]);
    assert_eq!(plan["pin_dir"]["bpffs"], "on bpffs");
    assert_eq!(plan["pin_dir"]["existing"], serde_json::json!([1]));
    assert_eq!(plan["pin_dir"]["next_generation"], 2);
    let local: Vec<&str> = plan["maps"]["LOCAL_V4"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(local.contains(&POD_IP.to_string().as_str()), "{local:?}");
    assert_eq!(plan["maps"]["CONFIGS"]["source_v4"], POD_IP.to_string());
    let after = f.status().expect("status");
    assert_eq!(before["generation"], after["generation"]);
    assert_eq!(before["policy"], after["policy"]);
}

/// The same with redirect's other exemptions: the proxy's mark, its cgroup,
/// the owner-group filter, and a listed service.
#[test]
fn explain_matches_the_kernel_with_exemptions() {
    if !can_run() {
        return;
    }
    let f = Fixture::new();
    let proxy_cgroup = f.pod.cgroup.join("proxy").display().to_string();
    let service = format!("{}:81", upstream_extra(3));
    f.apply_ok(&[
        "-i",
        "10.201.0.1/32",
        "-u",
        "",
        "-g",
        "",
        "--proxy-mark",
        "0x1",
        "--proxy-cgroup",
        &proxy_cgroup,
        "--owner-groups-exclude",
        "4242",
        "--service",
        &service,
    ]);
    let pin = f.pin_dir.display().to_string();
    let in_app = As {
        uid: 0,
        gid: 0,
        cgroup: Some("app"),
    };
    let in_proxy = As {
        cgroup: Some("proxy"),
        ..in_app
    };
    let to = |i: u8, port: u16| format!("{}:{port}", upstream_extra(i));
    let cases: Vec<(As, Option<u32>, String, &str)> = vec![
        (in_app, None, to(1, 80), "included_cidr"),
        (in_app, Some(1), to(1, 80), "proxy_owner"),
        (in_app, Some(2), to(1, 80), "included_cidr"),
        (in_proxy, None, to(1, 80), "proxy_owner"),
        (other(2000, 4242), None, to(1, 80), "owner_group"),
        (in_app, None, service.clone(), "service"),
        (in_app, None, to(3, 80), "not_captured"),
    ];
    for (who, mark, dst, rule) in cases {
        let (uid, gid) = (who.uid.to_string(), who.gid.to_string());
        let cgroup = f.pod.cgroup.join(who.cgroup.unwrap()).display().to_string();
        let mark_s = mark.unwrap_or(0).to_string();
        let v = json(&[
            "explain",
            "--pin-dir",
            &pin,
            "--uid",
            &uid,
            "--gid",
            &gid,
            "--mark",
            &mark_s,
            "--cgroup",
            &cgroup,
            "--dst",
            &dst,
        ]);
        assert_eq!(v["rule"]["name"], rule, "{v:#}");
        let view = match mark {
            Some(m) => f.pod.connect_marked(who, &dst, m).expect("sample client"),
            None => f.connect(who, &dst),
        };
        let answered = view.reply.map(|r| r.server).unwrap_or_default();
        let expected = if v["action"] == "redirect" {
            "proxy"
        } else {
            "upstream"
        };
        assert_eq!(
            answered, expected,
            "{who:?} mark {mark:?} -> {dst}: explain said {v:#}"
        );
    }
    // The text form names the mark and the cgroup.
    let text = ok(&[
        "explain",
        "--pin-dir",
        &pin,
        "--mark",
        "0x1",
        "--cgroup",
        &proxy_cgroup,
        "--dst",
        &to(1, 80),
    ]);
    assert!(text.contains("mark 0x1 (in the proxy's cgroup)"), "{text}");
}

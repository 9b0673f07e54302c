//! Excluded interfaces (`-c`, istio-iptables `--istio-exclude-interfaces`)
//! on a real kernel: a pod with a second interface (`net1`, as Multus
//! gives one), whose traffic is never captured. Inbound, `sk_lookup` sees
//! the interface a connection arrives on; outbound, the connect hook looks
//! the destination up in the pod's routes as they were at apply time, as
//! istio's `nat OUTPUT -o net1 -j RETURN` sees the route's interface.

use redirect_tests::{
    APP_PORT, Fixture, can_run,
    pod::{
        As, NET1_HOLE, NET1_POD_IP, NET1_POD_IP6, NET1_REMOTE, NET1_REMOTE6, NET1_UPSTREAM_IP,
        NET1_UPSTREAM_IP6, POD_IP, POD_IP6, Side, upstream_extra,
    },
};

macro_rules! need_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

/// A pod with `net1`, and a server upstream (`upstream-net1`) on the
/// addresses reached through it (and on the one routed back through
/// `eth0`).
fn fixture() -> Fixture {
    let mut f = Fixture::new();
    f.pod
        .add_second_interface()
        .expect("adding the pod's second interface");
    let at = [
        format!("{NET1_UPSTREAM_IP}:80"),
        format!("{NET1_REMOTE}:80"),
        format!("{NET1_HOLE}:80"),
        format!("[{NET1_UPSTREAM_IP6}]:80"),
        format!("[{NET1_REMOTE6}]:80"),
    ];
    let refs: Vec<&str> = at.iter().map(String::as_str).collect();
    f.pod
        .start_server(Side::Upstream, As::PROXY_LESS, "upstream-net1", &refs)
        .expect("upstream server on net1");
    f
}

/// Who answers each connection of the pod's: outbound as the app, inbound
/// from upstream.
fn answers(f: &Fixture) -> Vec<(String, String)> {
    let out = [
        format!("{NET1_REMOTE}:80"),
        format!("{NET1_UPSTREAM_IP}:80"),
        format!("{NET1_HOLE}:80"),
        format!("[{NET1_REMOTE6}]:80"),
        format!("[::ffff:{NET1_REMOTE}]:80"),
        format!("{}:80", upstream_extra(1)),
    ];
    let inb = [
        format!("{NET1_POD_IP}:{APP_PORT}"),
        format!("[{NET1_POD_IP6}]:{APP_PORT}"),
        format!("{POD_IP}:{APP_PORT}"),
        format!("[{POD_IP6}]:{APP_PORT}"),
    ];
    out.iter()
        .map(|to| (format!("out {to}"), f.who_answers(As::APP, to)))
        .chain(
            inb.iter()
                .map(|to| (format!("in {to}"), f.who_answers_in(to))),
        )
        .collect()
}

/// `redirect explain` of the policy in force (read back from the pins, or
/// in node mode from the pod's registration): action and rule number.
fn explain(f: &Fixture, args: &[&str]) -> (String, String) {
    let pin = f.pin_dir.display().to_string();
    let netns = f.pod.netns_path(Side::Pod).display().to_string();
    let mut all = vec!["explain", "--json"];
    if redirect_tests::node_mode() {
        all.extend(["--registered", "--netns", &netns, "--node-pin-dir", &pin]);
    } else {
        all.extend(["--pin-dir", &pin]);
    }
    all.extend_from_slice(args);
    let out = f.redirect(&all);
    assert!(
        out.status.success(),
        "explain {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("explain JSON");
    (
        v["action"].as_str().unwrap().to_string(),
        v["rule"]["number"].as_str().unwrap().to_string(),
    )
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn excluded_interface_traffic_is_not_captured() {
    need_root!();
    let f = fixture();
    // Without -c, net1's traffic is captured like eth0's.
    f.apply_ok(&["-i", "*", "-b", "*"]);
    let all_proxy: Vec<(String, String)> = answers(&f)
        .into_iter()
        .map(|(c, _)| (c, "proxy".to_string()))
        .collect();
    assert_eq!(answers(&f), all_proxy);
    // With it: connections arriving on net1, and connections whose route
    // leaves through it, are left alone; the more specific route inside
    // net1's prefix that leaves through eth0 is captured, as iptables'
    // `-o` sees it.
    f.apply_ok(&["-i", "*", "-b", "*", "-c", "net1"]);
    let want = pairs(&[
        (&format!("out {NET1_REMOTE}:80"), "upstream-net1"),
        (&format!("out {NET1_UPSTREAM_IP}:80"), "upstream-net1"),
        (&format!("out {NET1_HOLE}:80"), "proxy"),
        (&format!("out [{NET1_REMOTE6}]:80"), "upstream-net1"),
        (&format!("out [::ffff:{NET1_REMOTE}]:80"), "upstream-net1"),
        (&format!("out {}:80", upstream_extra(1)), "proxy"),
        (&format!("in {NET1_POD_IP}:{APP_PORT}"), "app"),
        (&format!("in [{NET1_POD_IP6}]:{APP_PORT}"), "app"),
        (&format!("in {POD_IP}:{APP_PORT}"), "proxy"),
        (&format!("in [{POD_IP6}]:{APP_PORT}"), "proxy"),
    ]);
    assert_eq!(answers(&f), want);
    // sock_ops does not know the interface: the application's socket of a
    // connection -c kept from the proxy has its own address as original
    // destination, which is what conntrack answers for a connection nobody
    // redirected (docs/semantics.md).
    let v = f.connect_in(&format!("{NET1_POD_IP}:{APP_PORT}"));
    let r = v.reply.expect("the app answers");
    assert_eq!(r.server, "app");
    assert_eq!(
        r.orig_dst.as_deref(),
        Some(format!("{NET1_POD_IP}:{APP_PORT}").as_str())
    );
    // `status` shows what is excluded, and `explain` reads it back from the
    // pins and decides as the kernel did.
    let status = f.status().expect("status");
    let policy = &status["policy"];
    assert_eq!(
        policy["exclude_ifindexes"].as_array().unwrap().len(),
        1,
        "{policy}"
    );
    let net1 = policy["exclude_ifindexes"][0].to_string();
    for route in ["10.210.0.0/16", "10.202.0.0/24", "fd00:210::/64"] {
        assert!(
            policy["exclude_routes"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!(route)),
            "{route}: {policy}"
        );
    }
    assert_eq!(
        explain(
            &f,
            &["--uid", "1000", "--dst", &format!("{NET1_REMOTE}:80")]
        ),
        ("pass".to_string(), "c".to_string())
    );
    assert_eq!(
        explain(&f, &["--uid", "1000", "--dst", &format!("{NET1_HOLE}:80")]),
        ("redirect".to_string(), "9".to_string())
    );
    let inbound = |ifindex: &str| {
        explain(
            &f,
            &[
                "--direction",
                "in",
                "--src",
                &NET1_UPSTREAM_IP.to_string(),
                "--dst",
                &format!("{NET1_POD_IP}:{APP_PORT}"),
                "--in-interface",
                ifindex,
            ],
        )
    };
    assert_eq!(inbound(&net1), ("pass".to_string(), "in-c".to_string()));
    assert_eq!(inbound("999"), ("redirect".to_string(), "in-2".to_string()));
    // Excluding eth0 instead turns it around.
    f.apply_ok(&["-i", "*", "-b", "*", "-c", "eth0"]);
    let want = pairs(&[
        (&format!("out {NET1_REMOTE}:80"), "proxy"),
        (&format!("out {NET1_UPSTREAM_IP}:80"), "proxy"),
        (&format!("out {NET1_HOLE}:80"), "upstream-net1"),
        (&format!("out [{NET1_REMOTE6}]:80"), "proxy"),
        (&format!("out [::ffff:{NET1_REMOTE}]:80"), "proxy"),
        (&format!("out {}:80", upstream_extra(1)), "upstream"),
        (&format!("in {NET1_POD_IP}:{APP_PORT}"), "proxy"),
        (&format!("in [{NET1_POD_IP6}]:{APP_PORT}"), "proxy"),
        (&format!("in {POD_IP}:{APP_PORT}"), "app"),
        (&format!("in [{POD_IP6}]:{APP_PORT}"), "app"),
    ]);
    assert_eq!(answers(&f), want);
}

#[test]
fn excluding_lo_leaves_the_proxys_calls_to_its_own_pod_alone() {
    need_root!();
    let f = fixture();
    let own = format!("{POD_IP}:{APP_PORT}");
    // Rule 3a: the proxy calling its own pod goes to the inbound port.
    f.apply_ok(&["-i", "*"]);
    assert_eq!(f.who_answers(As::PROXY, &own), "proxy");
    // Routed over lo, which is excluded: istio returns before rule 3a.
    f.apply_ok(&["-i", "*", "-c", "lo"]);
    assert_eq!(f.who_answers(As::PROXY, &own), "app");
    // Everything else is as before.
    assert_eq!(
        f.who_answers(As::APP, &format!("{NET1_REMOTE}:80")),
        "proxy"
    );
}

#[test]
fn dry_run_shows_the_excluded_interfaces_and_routes() {
    need_root!();
    let f = fixture();
    let cgroup = f.pod.cgroup.display().to_string();
    let netns = f.pod.netns_path(Side::Pod).display().to_string();
    let pin = f.pin_dir.display().to_string();
    let out = f.redirect(&[
        "apply",
        "--dry-run",
        "--json",
        "--cgroup",
        &cgroup,
        "--netns",
        &netns,
        "--pin-dir",
        &pin,
        "-i",
        "*",
        "-c",
        "net1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("plan JSON");
    let maps = &plan["maps"];
    assert_eq!(maps["EXCLUDED_IFACES"]["count"], 1, "{maps}");
    let excluded = maps["ROUTES_EXCLUDED"]["entries"].as_array().unwrap();
    assert!(
        excluded.contains(&serde_json::json!("10.210.0.0/16")),
        "{maps}"
    );
    assert!(
        maps["ROUTES_OTHER"]["entries"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("10.210.7.0/24")),
        "{maps}"
    );
    assert!(!f.pin_dir.exists(), "a dry run pins nothing");
}

#[test]
fn an_interface_the_pod_does_not_have_excludes_nothing() {
    need_root!();
    let f = fixture();
    // As iptables' `-i`/`-o` of an interface that does not exist: applied
    // (with a warning), matching nothing.
    let out = f.apply(&["-i", "*", "-b", "*", "-c", "net7"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("net7"),
        "the warning names the interface: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(answers(&f).iter().all(|(_, who)| who == "proxy"));
}

#[test]
fn a_bad_interface_name_is_refused_and_nothing_is_applied() {
    need_root!();
    let f = fixture();
    for bad in ["net/1", "a-name-longer-than-15", "eth0:1"] {
        let out = f.apply(&["-i", "*", "-c", bad]);
        assert!(!out.status.success(), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--exclude-interfaces") && err.contains(bad),
            "{bad}: {err}"
        );
        assert_eq!(
            f.who_answers(As::APP, &format!("{NET1_REMOTE}:80")),
            "upstream-net1"
        );
    }
}

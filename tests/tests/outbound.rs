//! Outbound capture on a real kernel: every test builds its own pod, applies
//! with the real `redirect` binary (which exits), and drives real connections.

use std::{
    io::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use redirect_tests::{
    APP_PORT, Fixture, can_run, other,
    pod::{As, POD_IP, POD_IP6, UPSTREAM_IP, upstream_extra, upstream_extra6},
    state_entries_after_close,
};

fn svc(i: u8, port: u16) -> String {
    format!("{}:{port}", upstream_extra(i))
}

macro_rules! need_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

#[test]
fn captures_and_proxy_learns_original_destination() {
    need_root!();
    let f = Fixture::new();
    // Before apply: straight to upstream.
    assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "upstream");

    f.apply_ok(&["-i", "*"]);
    let v = f.connect(As::APP, &svc(1, 80));
    assert!(v.ok, "{v:?}");
    let reply = v.reply.clone().unwrap();
    assert_eq!(reply.server, "proxy", "{v:?}");
    assert_eq!(
        reply.orig_dst.as_deref(),
        Some(svc(1, 80).as_str()),
        "{v:?}"
    );
    assert_eq!(reply.local, "127.0.0.1:15001");
    // Transparency, as under iptables REDIRECT: the app sees the peer it asked
    // for and its pod address; the proxy sees the pod address as the peer.
    assert_eq!(v.peer.as_deref(), Some(svc(1, 80).as_str()));
    let app_local = v.local.clone().unwrap();
    assert!(app_local.starts_with(&format!("{POD_IP}:")), "{v:?}");
    assert_eq!(reply.peer, app_local, "proxy's peer is the app's socket");
}

/// A socket the application bound to a wildcard address and a port before
/// `connect()` cannot be bound to the pod's address again; it runs from the
/// loopback address, and yet both ends see the pod's address, as under
/// iptables REDIRECT: the application as its local address, the proxy as
/// the peer (from `accept` and `getpeername`). IPv4 and IPv6, with and
/// without `SO_REUSEADDR`.
#[test]
fn socket_bound_to_wildcard_and_port_shows_pod_address() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    let cases = [
        (svc(1, 80), POD_IP.to_string(), 41001, false),
        (svc(2, 80), POD_IP.to_string(), 41002, true),
        (
            format!("[{}]:80", upstream_extra6(1)),
            format!("[{POD_IP6}]"),
            41003,
            false,
        ),
        (
            format!("[{}]:80", upstream_extra6(2)),
            format!("[{POD_IP6}]"),
            41004,
            true,
        ),
    ];
    for (to, pod, port, reuse) in cases {
        let port_s = port.to_string();
        let mut extra = vec!["--bind-port", port_s.as_str()];
        if reuse {
            extra.push("--reuseaddr");
        }
        let v = f.pod.connect_with(As::APP, &to, &extra).unwrap();
        let reply = v.reply.clone().unwrap_or_else(|| panic!("{to}: {v:?}"));
        let shown = format!("{pod}:{port}");
        assert_eq!(reply.server, "proxy", "{v:?}");
        assert_eq!(reply.orig_dst.as_deref(), Some(to.as_str()), "{v:?}");
        assert_eq!(
            v.local.as_deref(),
            Some(shown.as_str()),
            "app's getsockname"
        );
        assert_eq!(v.peer.as_deref(), Some(to.as_str()), "app's getpeername");
        assert_eq!(reply.peer, shown, "proxy's accept/getpeername");
    }
}

#[test]
fn proxy_uid_and_gid_are_exempt() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*", "-u", "1337", "-g", "1338"]);
    // UID 1337 (the proxy) goes straight out.
    assert_eq!(f.who_answers(As::PROXY, &svc(1, 80)), "upstream");
    // Another UID whose GID is a proxy GID, likewise.
    assert_eq!(f.who_answers(other(2000, 1338), &svc(1, 80)), "upstream");
    // Anyone else is captured.
    assert_eq!(f.who_answers(other(2000, 2000), &svc(1, 80)), "proxy");
    assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "proxy");
}

#[test]
fn no_uids_means_proxy_is_captured_too() {
    need_root!();
    let f = Fixture::new();
    // Refused without the override (apply_safety.rs tests that).
    f.apply_ok(&["-i", "*", "-u", "", "-g", "", "--allow-no-proxy-exemption"]);
    // Nothing exempts UID 1337 now, so its outbound call loops to itself:
    // exactly what iptables does with no owner rules.
    assert_eq!(f.who_answers(As::PROXY, &svc(1, 80)), "proxy");
}

#[test]
fn loopback_is_not_captured() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    // Rule 3b: the app over lo (127.0.0.1 and other 127/8) reaches its own server.
    assert_eq!(
        f.who_answers(As::APP, &format!("127.0.0.1:{APP_PORT}")),
        "app"
    );
    assert_eq!(
        f.who_answers(As::APP, &format!("127.0.0.2:{APP_PORT}")),
        "app"
    );
    // The app reaches the proxy directly on localhost.
    let v = f.connect(As::APP, "127.0.0.1:15001");
    assert_eq!(
        v.reply.unwrap().orig_dst,
        None,
        "not redirected, no original dst"
    );
}

#[test]
fn app_to_own_pod_ip_is_not_captured() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    let v = f.connect(As::APP, &format!("{POD_IP}:{APP_PORT}"));
    assert_eq!(v.reply.as_ref().unwrap().server, "app", "{v:?}");
}

#[test]
fn proxy_to_own_pod_ip_goes_to_inbound_port() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    // Rule 3a: the proxy calling its own pod's IP is sent to the inbound port.
    let v = f.connect(As::PROXY, &format!("{POD_IP}:{APP_PORT}"));
    let reply = v.reply.clone().unwrap();
    assert_eq!(reply.server, "proxy", "{v:?}");
    assert_eq!(reply.local, "127.0.0.1:15006", "{v:?}");
    assert_eq!(reply.orig_dst, Some(format!("{POD_IP}:{APP_PORT}")));
    assert_eq!(v.peer, Some(format!("{POD_IP}:{APP_PORT}")));
    // ...but not 127.0.0.1, and not the tunnel port.
    assert_eq!(
        f.who_answers(As::PROXY, &format!("127.0.0.1:{APP_PORT}")),
        "app"
    );
}

#[test]
fn excluded_cidr_passes() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&[
        "-i",
        "*",
        "-x",
        &format!("{}/32,192.0.2.0/24", upstream_extra(2)),
    ]);
    assert_eq!(f.who_answers(As::APP, &svc(2, 80)), "upstream");
    assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "proxy");
}

#[test]
fn ten_thousand_excluded_cidrs() {
    need_root!();
    let f = Fixture::new();
    let file = std::env::temp_dir().join(format!("{}-cidrs", f.pod.name));
    let mut text = String::new();
    for i in 0..9_999u32 {
        // 10,000 distinct /24s in 11.0.0.0/8 and 12.0.0.0/8, plus the one
        // that matters.
        let n = i + 1;
        text.push_str(&format!(
            "{}.{}.{}.0/24\n",
            11 + n / 65_536,
            (n / 256) % 256,
            n % 256
        ));
    }
    text.push_str(&format!("{}/32\n", upstream_extra(3)));
    std::fs::File::create(&file)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = f.apply(&["-i", "*", "--exclude-cidrs-file", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = f.status().unwrap();
    assert_eq!(
        st["policy"]["exclude_cidrs"].as_array().unwrap().len(),
        10_000
    );
    assert_eq!(f.who_answers(As::APP, &svc(3, 80)), "upstream");
    assert_eq!(f.who_answers(As::APP, &svc(4, 80)), "proxy");
}

#[test]
fn excluded_and_included_ports() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*", "-o", "81"]);
    assert_eq!(f.who_answers(As::APP, &svc(1, 81)), "upstream");
    assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "proxy");

    // Include list empty: only the included port is captured.
    f.apply_ok(&["-i", "", "-q", "82"]);
    assert_eq!(f.who_answers(As::APP, &svc(1, 82)), "proxy");
    assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "upstream");
}

#[test]
fn include_cidr_list() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "10.201.0.0/30"]);
    assert_eq!(f.who_answers(As::APP, &svc(2, 80)), "proxy");
    assert_eq!(f.who_answers(As::APP, &svc(5, 80)), "upstream");
    assert_eq!(
        f.who_answers(As::APP, &format!("{UPSTREAM_IP}:80")),
        "upstream"
    );
    // Default (no -i): nothing captured, as with istio-iptables.
    f.apply_ok(&[]);
    assert_eq!(f.who_answers(As::APP, &svc(2, 80)), "upstream");
}

#[test]
fn state_persists_after_loader_exits_and_remove_restores() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    // The loader process has exited (apply_ok waited for it).
    assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "proxy");
    let st = f.status().expect("status");
    assert_eq!(
        st["links"].as_array().unwrap().len(),
        redirect::apply::PROGRAMS.len()
    );
    assert!(st["decisions"]["include_all"].as_u64().unwrap() >= 1);

    let out = f.remove();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!f.pin_dir.exists());
    assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "upstream");
    assert!(f.status().is_none());
}

#[test]
fn reapply_replaces_without_gap() {
    need_root!();
    let f = Arc::new(Fixture::new());
    f.apply_ok(&["-i", "*"]);
    // A client loop runs while the policy is re-applied several times: every
    // single connection must be captured with its original destination.
    let stop = Arc::new(AtomicBool::new(false));
    let looper = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = 0;
            while !stop.load(Ordering::Relaxed) || seen < 5 {
                let v = f.connect(As::APP, &svc(1, 80));
                let r = v.reply.as_ref().unwrap_or_else(|| panic!("{v:?}"));
                assert_eq!(r.server, "proxy", "escaped during re-apply: {v:?}");
                assert_eq!(r.orig_dst.as_deref(), Some(svc(1, 80).as_str()), "{v:?}");
                seen += 1;
            }
            seen
        })
    };
    for i in 0..4 {
        f.apply_ok(&["-i", "*", "-x", &format!("192.0.2.{i}/32")]);
    }
    stop.store(true, Ordering::Relaxed);
    let seen = looper.join().expect("client loop");
    assert!(seen >= 5);
    let st = f.status().unwrap();
    assert_eq!(st["generation"], 5);
    assert_eq!(st["policy"]["exclude_cidrs"][0], "192.0.2.3/32");
    // Only the newest generation remains pinned.
    let gens: Vec<_> = std::fs::read_dir(&f.pin_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("gen-"))
        .collect();
    assert_eq!(gens.len(), 1);
}

#[test]
fn bad_input_fails_and_attaches_nothing() {
    need_root!();
    let f = Fixture::new();
    let cases: &[(&[&str], &str)] = &[
        (&["-i", "*", "-x", "10.0.0.0/33"], "--exclude-cidrs"),
        (&["-i", "*", "-x", "banana"], "banana"),
        (&["-i", "*", "-p", "0"], "--proxy-port"),
        (&["-i", "*", "-p", "70000"], "70000"),
        (&["-i", "*", "-o", "22,99999"], "99999"),
        (&["-i", "*", "--no-such-flag"], "--no-such-flag"),
        (&["-i", "*,10.0.0.0/8"], "--include-cidrs"),
    ];
    for (args, needle) in cases {
        let out = f.apply(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(needle),
            "{args:?}: error does not name {needle}: {err}"
        );
        assert!(!f.pin_dir.exists(), "{args:?} left {}", f.pin_dir.display());
        assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "upstream", "{args:?}");
    }
    // A cgroup that does not exist, a netns that is not one.
    let pin = f.pin_dir.display().to_string();
    let out = f.redirect(&[
        "apply",
        "--cgroup",
        "/nonexistent/cg",
        "--pin-dir",
        &pin,
        "-i",
        "*",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cg"));
    let cg = f.pod.cgroup.display().to_string();
    let out = f.redirect(&[
        "apply",
        "--cgroup",
        &cg,
        "--netns",
        "/etc/hostname",
        "--pin-dir",
        &pin,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--netns"));
    // A pin dir outside bpffs.
    let out = f.redirect(&[
        "apply",
        "--cgroup",
        &cg,
        "--pin-dir",
        "/tmp/redirect-not-bpffs",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bpf filesystem"));
    assert!(!std::path::Path::new("/tmp/redirect-not-bpffs").exists());
    assert!(!f.pin_dir.exists());
    assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "upstream");
}

#[test]
fn failed_reapply_keeps_previous_policy() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    let out = f.apply(&["-i", "*", "-x", "300.0.0.0/8"]);
    assert!(!out.status.success());
    let pin = f.pin_dir.display().to_string();
    let out = f.redirect(&[
        "apply",
        "--cgroup",
        "/nonexistent",
        "--pin-dir",
        &pin,
        "-i",
        "",
    ]);
    assert!(!out.status.success());
    assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "proxy");
    assert_eq!(f.status().unwrap()["generation"], 1);
}

#[test]
fn maps_are_empty_after_connections_close() {
    need_root!();
    let mut f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    for i in 1..=5 {
        assert_eq!(f.who_answers(As::APP, &svc(i, 80)), "proxy");
    }
    // With the proxy gone, captured connects are refused: their hand-over
    // entries must be dropped when the client socket closes.
    f.pod.stop_servers();
    for i in 1..=3 {
        let who = f.who_answers(As::APP, &svc(i, 80));
        assert!(who.starts_with("error"), "{who}");
    }
    assert_eq!(
        state_entries_after_close(&f),
        0,
        "hand-over entries outlived their connections"
    );
    let st = f.status().unwrap();
    assert_eq!(st["counters"]["handover_taken"], 5);
    assert_eq!(st["counters"]["handover_dropped"], 3);
    assert_eq!(st["counters"]["orig_dst_served"], 5);
}

/// A proxy that asks `SO_ORIGINAL_DST` only after the client has sent its
/// FIN still gets the answer (under REDIRECT, conntrack keeps the entry):
/// the hand-over entry lives until the client's socket is fully closed, not
/// just until it stops sending. Then the entry goes.
#[test]
fn proxy_learns_destination_after_client_half_closed() {
    need_root!();
    let mut f = Fixture::new();
    f.restart_outbound_proxy_with(&["--answer-delay-ms", "300"]);
    f.apply_ok(&["-i", "*"]);
    for to in [svc(1, 80), format!("[{}]:81", upstream_extra6(2))] {
        let v = f
            .pod
            .connect_with(As::APP, &to, &["--shutdown-write"])
            .unwrap();
        let reply = v.reply.unwrap_or_else(|| panic!("{to}: {:?}", v.error));
        assert_eq!(reply.server, "proxy");
        assert_eq!(reply.orig_dst.as_deref(), Some(to.as_str()), "{reply:?}");
    }
    let st = f.status().unwrap();
    assert_eq!(st["counters"]["orig_dst_served"], 2);
    assert_eq!(st["counters"]["orig_dst_missing"], 0);
    // Both sides have closed: nothing is left behind.
    assert_eq!(
        state_entries_after_close(&f),
        0,
        "hand-over entries outlived their connections"
    );
}

#[test]
fn unredirected_getsockopt_is_untouched() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    // The proxy's own connection to it on localhost was not redirected: the
    // kernel's own error stands (no conntrack here: ENOPROTOOPT or ENOENT).
    let v = f.connect(As::APP, "127.0.0.1:15001");
    let reply = v.reply.unwrap();
    assert!(reply.orig_dst.is_none());
    let err = reply.orig_dst_error.unwrap();
    assert!(
        err.contains("Protocol not available") || err.contains("No such file"),
        "{err}"
    );
}

/// The same connection behind real iptables REDIRECT and behind redirect:
/// what the app and the proxy see must match, and `redirect::original_dst`
/// (which the sample proxy calls) works behind both.
#[test]
fn same_view_as_iptables_redirect() {
    need_root!();
    let f = Fixture::new();
    let ns = f.pod.netns_name(redirect_tests::pod::Side::Pod);
    let ipt = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "iptables"])
            .args(args)
            .output()
            .expect("running iptables (cargo xtask setup installs it)");
        assert!(
            out.status.success(),
            "iptables {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ipt(&[
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-m",
        "owner",
        "!",
        "--uid-owner",
        "1337",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ]);
    let under_iptables = f.connect(As::APP, &svc(1, 80));
    ipt(&["-t", "nat", "-F", "OUTPUT"]);
    assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "upstream");

    f.apply_ok(&["-i", "*"]);
    let under_redirect = f.connect(As::APP, &svc(1, 80));

    let (a, b) = (&under_iptables, &under_redirect);
    let (ra, rb) = (a.reply.as_ref().unwrap(), b.reply.as_ref().unwrap());
    let ip = |s: &str| s.rsplit_once(':').unwrap().0.to_string();
    assert_eq!(ra.server, rb.server);
    assert_eq!(ra.orig_dst, rb.orig_dst, "SO_ORIGINAL_DST");
    assert_eq!(ra.orig_dst.as_deref(), Some(svc(1, 80).as_str()));
    assert_eq!(ra.local, rb.local, "proxy's local address");
    assert_eq!(ip(&ra.peer), ip(&rb.peer), "proxy's view of the peer");
    assert_eq!(a.peer, b.peer, "app's getpeername");
    assert_eq!(
        ip(a.local.as_deref().unwrap()),
        ip(b.local.as_deref().unwrap()),
        "app's getsockname"
    );
}

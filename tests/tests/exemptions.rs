//! Every exemption method of `docs/iptables-rules.md`, on a real kernel: the
//! proxy's socket mark, the proxy's cgroup (whatever its UID), the
//! owner-group filter, and explicit per-service capture (100,000 entries).

use std::io::Write as _;

use redirect_tests::{
    APP_PORT, Fixture, can_run, other,
    pod::{As, POD_IP, upstream_extra, upstream_extra6},
};

macro_rules! need_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

fn svc(i: u8, port: u16) -> String {
    format!("{}:{port}", upstream_extra(i))
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Root in the pod's `app/` cgroup: allowed to set SO_MARK, and not a proxy
/// UID or GID.
const ROOT_APP: As = As {
    uid: 0,
    gid: 0,
    cgroup: Some("app"),
};

#[test]
fn proxy_mark_exempts_marked_sockets() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*", "-u", "", "-g", "", "--proxy-mark", "0x1"]);
    let marked = f.pod.connect_marked(ROOT_APP, &svc(1, 80), 1).unwrap();
    assert_eq!(marked.reply.unwrap().server, "upstream");
    let other_mark = f.pod.connect_marked(ROOT_APP, &svc(1, 80), 2).unwrap();
    assert_eq!(other_mark.reply.unwrap().server, "proxy");
    assert_eq!(f.who_answers(ROOT_APP, &svc(1, 80)), "proxy");
    // Rule 3a holds for the mark as for a UID: the marked proxy calling its
    // own pod address goes to the inbound port.
    let v = f
        .pod
        .connect_marked(ROOT_APP, &format!("{POD_IP}:{APP_PORT}"), 1)
        .unwrap();
    assert_eq!(v.reply.unwrap().local, "127.0.0.1:15006");
    let st = f.status().unwrap();
    assert_eq!(st["policy"]["proxy_mark"], 1, "{st}");

    for bad in ["0", "mark", "0x1g", "4294967296"] {
        let out = f.apply(&["--proxy-mark", bad]);
        assert!(!out.status.success(), "{bad}");
        assert!(stderr(&out).contains("--proxy-mark"), "{}", stderr(&out));
    }
}

/// A cgroup below the proxy's, removed on drop.
struct SubCgroup(std::path::PathBuf);

impl Drop for SubCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[test]
fn proxy_cgroup_exempts_any_uid_in_it() {
    need_root!();
    let f = Fixture::new();
    let proxy_cg = f.pod.cgroup.join("proxy");
    let sub = SubCgroup(proxy_cg.join("worker"));
    std::fs::create_dir(&sub.0).unwrap();
    f.apply_ok(&[
        "-i",
        "*",
        "-u",
        "",
        "-g",
        "",
        "--proxy-cgroup",
        proxy_cg.to_str().unwrap(),
    ]);
    // UID 1000 in the proxy's cgroup, and in a cgroup below it: exempt.
    let in_proxy = As {
        uid: 1000,
        gid: 1000,
        cgroup: Some("proxy"),
    };
    let below = As {
        uid: 1000,
        gid: 1000,
        cgroup: Some("proxy/worker"),
    };
    assert_eq!(f.who_answers(in_proxy, &svc(1, 80)), "upstream");
    assert_eq!(f.who_answers(below, &svc(1, 80)), "upstream");
    // The same UID in the app's cgroup: captured.
    assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "proxy");
    // Rule 3a by cgroup.
    let v = f.connect(in_proxy, &format!("{POD_IP}:{APP_PORT}"));
    assert_eq!(v.reply.unwrap().local, "127.0.0.1:15006");

    let out = f.apply(&["--proxy-cgroup", "/nonexistent/cg"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--proxy-cgroup") && stderr(&out).contains("/nonexistent/cg"),
        "{}",
        stderr(&out)
    );
    let out = f.apply(&["--proxy-cgroup", "/tmp"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a cgroup v2"), "{}", stderr(&out));
}

#[test]
fn owner_group_filter_include_and_exclude() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*", "--owner-groups-include", "1000,3000"]);
    assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "proxy");
    assert_eq!(f.who_answers(other(2000, 3000), &svc(1, 80)), "proxy");
    assert_eq!(f.who_answers(other(2000, 2000), &svc(1, 80)), "upstream");

    f.apply_ok(&["-i", "*", "--owner-groups-exclude", "1000"]);
    assert_eq!(f.who_answers(As::APP, &svc(1, 80)), "upstream");
    assert_eq!(f.who_answers(other(2000, 2000), &svc(1, 80)), "proxy");
    let st = f.status().unwrap();
    assert_eq!(st["policy"]["owner_groups_exclude"][0], 1000, "{st}");

    let out = f.apply(&["--owner-groups-include", "1", "--owner-groups-exclude", "2"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--owner-groups-include"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn hundred_thousand_services() {
    need_root!();
    let f = Fixture::new();
    let dir = tempdir();
    let file = dir.0.join("services");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
    writeln!(w, "# 100,000 services").unwrap();
    for i in 0..99_998u32 {
        // 10.210.0.0/16 and on: nothing the test connects to.
        let a = 0x0ad2_0000u32 + i;
        writeln!(w, "{}:{}", std::net::Ipv4Addr::from(a), 80 + (i % 3)).unwrap();
    }
    writeln!(w, "{}", svc(1, 80)).unwrap();
    writeln!(w, "[{}]:80", upstream_extra6(1)).unwrap();
    drop(w);
    f.apply_ok(&["--services-file", file.to_str().unwrap()]);
    // Members: captured, with the original destination.
    let v = f.connect(As::APP, &svc(1, 80));
    let reply = v.reply.unwrap();
    assert_eq!(reply.server, "proxy");
    assert_eq!(reply.orig_dst.as_deref(), Some(svc(1, 80).as_str()));
    assert_eq!(
        f.who_answers(As::APP, &format!("[{}]:80", upstream_extra6(1))),
        "proxy"
    );
    // Non-members: the same address on another port, another address.
    assert_eq!(f.who_answers(As::APP, &svc(1, 81)), "upstream");
    assert_eq!(f.who_answers(As::APP, &svc(2, 80)), "upstream");
    // The proxy itself stays exempt.
    assert_eq!(f.who_answers(As::PROXY, &svc(1, 80)), "upstream");
    let st = f.status().unwrap();
    assert_eq!(
        st["policy"]["services"].as_array().unwrap().len(),
        100_000,
        "status lists every service"
    );
    assert_eq!(st["decisions"]["service"], 2, "{}", st["decisions"]);

    let out = f.apply(&["--service", "10.0.0.1:70000"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--service") && stderr(&out).contains("70000"),
        "{}",
        stderr(&out)
    );
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> TempDir {
    let d = std::env::temp_dir().join(format!(
        "redirect-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

//! Node mode at scale on a real kernel: 1,000 pods, each a network
//! namespace with its own veth and policy, registered in one node install;
//! isolation spot-checked across policy kinds; pods removed and added while
//! a client loop runs in another pod, with zero misdirected connections.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use redirect_tests::{
    can_run,
    fleet::{Fleet, HUB_IP},
    peer::ClientView,
    pod::sample_bin,
    redirect_bin,
};

/// Pods registered at once (fewer under emulation, `REDIRECT_TEST_QUICK`).
fn pods() -> usize {
    if std::env::var_os("REDIRECT_TEST_QUICK").is_some() {
        100
    } else {
        1000
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The policy kinds, by `i % 4`.
fn policy(i: usize) -> Vec<String> {
    let v: &[&str] = match i % 4 {
        // Everything, both ways; the proxy is UID 1337.
        0 => &["-i", "*", "-b", "*"],
        // Everything but the hub.
        1 => &["-i", "*", "-x", "10.64.0.1/32"],
        // Everything but port 81; the proxy is UID 1400, so 1337 is captured.
        2 => &[
            "-i",
            "*",
            "--exclude-ports",
            "81",
            "-u",
            "1400",
            "-g",
            "1400",
        ],
        // Only 10.200/16 outbound (not the hub); inbound 8080 only.
        _ => &["-i", "10.200.0.0/16", "-b", "8080"],
    };
    v.iter().map(|s| s.to_string()).collect()
}

/// Who answers a connect as `uid` from a pod of kind `i % 4` to the hub's
/// `port`: `proxy` (with the hub as original destination) or `upstream`.
fn expected(i: usize, uid: u32, port: u16) -> &'static str {
    match (i % 4, uid, port) {
        (0, 1337, _) => "upstream",
        (0, _, _) => "proxy",
        (1, _, _) => "upstream",
        (2, _, 81) => "upstream",
        (2, _, _) => "proxy",
        _ => "upstream",
    }
}

struct Node {
    pin: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.pin.exists() {
            let _ = Command::new(redirect_bin())
                .args([
                    "node",
                    "uninstall",
                    "--pin-dir",
                    &self.pin.display().to_string(),
                ])
                .output();
            let _ = std::fs::remove_dir_all(&self.pin);
        }
    }
}

fn redirect(args: &[&str]) -> Output {
    Command::new(redirect_bin()).args(args).output().unwrap()
}

fn add(node: &Node, fleet: &Fleet, i: usize) {
    let netns = fleet.netns_path(i).display().to_string();
    let pin = node.pin.display().to_string();
    let mut args = vec!["pod", "add", "--netns", &netns, "--pin-dir", &pin];
    let p = policy(i);
    args.extend(p.iter().map(String::as_str));
    let out = redirect(&args);
    assert!(out.status.success(), "pod add {i}: {}", stderr(&out));
}

fn check(fleet: &Fleet, i: usize, what: &str) {
    for (uid, port) in [(1000, 80), (1000, 81), (1337, 80)] {
        let to = format!("{HUB_IP}:{port}");
        let v: ClientView = fleet
            .connect(i, uid, std::slice::from_ref(&to))
            .unwrap()
            .remove(0);
        let r = v
            .reply
            .unwrap_or_else(|| panic!("{what}: pod {i} uid {uid} -> {to}: {:?}", v.error));
        assert_eq!(
            r.server.split('-').next().unwrap(),
            expected(i, uid, port),
            "{what}: pod {i} uid {uid} -> {to}"
        );
        if r.server.starts_with("proxy") {
            assert_eq!(
                r.server,
                format!("proxy-{i}"),
                "{what}: pod {i}: another pod's proxy"
            );
            assert_eq!(r.orig_dst.as_deref(), Some(to.as_str()), "{what}: pod {i}");
        }
    }
    // Inbound, from the hub to the pod's port 8080.
    let to = format!("{}:8080", Fleet::addr(i));
    let mut cmd = fleet.command(None, 0, &sample_bin().unwrap()).unwrap();
    let out = cmd.args(["connect", "--to", &to]).output().unwrap();
    let v: ClientView = serde_json::from_slice(&out.stdout).unwrap();
    match i % 4 {
        0 | 3 => {
            let r = v
                .reply
                .unwrap_or_else(|| panic!("{what}: inbound to pod {i}: {:?}", v.error));
            assert_eq!(r.server, format!("proxy-{i}"), "{what}: inbound to pod {i}");
            assert_eq!(r.orig_dst.as_deref(), Some(to.as_str()));
        }
        // Not captured: nothing listens on 8080 there.
        _ => assert!(
            v.reply.is_none(),
            "{what}: inbound to pod {i} captured: {v:?}"
        ),
    }
}

#[test]
fn thousand_pods_keep_their_own_policies_while_pods_come_and_go() {
    if !can_run() {
        return;
    }
    let n = pods();
    let mut fleet = Fleet::create(n).expect("fleet");
    let node = Node {
        pin: PathBuf::from("/sys/fs/bpf").join(format!("{}-node", fleet.name)),
    };
    let cg = fleet.cgroup.display().to_string();
    let out = redirect(&[
        "node",
        "install",
        "--cgroup",
        &cg,
        "--pin-dir",
        &node.pin.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for i in 0..n {
        add(&node, &fleet, i);
    }
    let out = redirect(&[
        "node",
        "status",
        "--json",
        "--pin-dir",
        &node.pin.display().to_string(),
    ]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["pods"], n as u64);

    // Spot checks: every policy kind, at the start, middle and end.
    let spots: Vec<usize> = [
        0,
        1,
        2,
        3,
        n / 2,
        n / 2 + 1,
        n / 2 + 2,
        n / 2 + 3,
        n - 4,
        n - 3,
        n - 2,
        n - 1,
    ]
    .to_vec();
    for &i in &spots {
        fleet.start_proxy(i).unwrap();
    }
    for &i in &spots {
        check(&fleet, i, "registered");
    }

    // A client loop in pod 0 while a tenth of the pods go and new ones come.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, wrong) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut client = fleet
        .command(Some(0), 1000, &sample_bin().unwrap())
        .unwrap();
    let to = format!("{HUB_IP}:80");
    client.args(["connect", "--to", &to]);
    let looper = {
        let (stop, done, wrong, to) = (stop.clone(), done.clone(), wrong.clone(), to.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let out = client.output().unwrap();
                let v: ClientView = serde_json::from_slice(&out.stdout).unwrap();
                let ok = v.reply.as_ref().is_some_and(|r| {
                    r.server == "proxy-0" && r.orig_dst.as_deref() == Some(to.as_str())
                });
                if !ok {
                    wrong.fetch_add(1, Ordering::Relaxed);
                    eprintln!("misdirected: {v:?}");
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let churn = (n / 10).max(4);
    let pin = node.pin.display().to_string();
    for i in (n - churn)..n {
        let netns = fleet.netns_path(i).display().to_string();
        let out = redirect(&["pod", "remove", "--netns", &netns, "--pin-dir", &pin]);
        assert!(out.status.success(), "pod remove {i}: {}", stderr(&out));
    }
    let first = fleet.grow(churn).unwrap();
    for i in first..first + churn {
        add(&node, &fleet, i);
    }
    stop.store(true, Ordering::Relaxed);
    looper.join().unwrap();
    assert!(done.load(Ordering::Relaxed) > 0);
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "misdirected connections");

    // The new pods have their policies; a removed pod is untouched.
    for i in [first, first + 1, first + 2, first + 3] {
        fleet.start_proxy(i).unwrap();
        check(&fleet, i, "added during churn");
    }
    let gone = n - 1;
    let v = fleet
        .connect(gone, 1000, &[format!("{HUB_IP}:80")])
        .unwrap()
        .remove(0);
    assert_eq!(
        v.reply.expect("reply").server,
        "upstream",
        "removed pod still captured"
    );
    for &i in &spots[..8] {
        check(&fleet, i, "after churn");
    }
    let out = redirect(&["node", "status", "--json", "--pin-dir", &pin]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["pods"], n as u64);
}

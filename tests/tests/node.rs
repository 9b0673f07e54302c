//! Node mode on a real kernel: the programs installed once on a cgroup every
//! pod is below, pods registered by network namespace with `pod add`.
//!
//! Each test installs a node of its own on its fixture pod's cgroup, with a
//! pin dir of its own, and uninstalls it at the end (also on failure).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use redirect_tests::{
    APP_PORT, Fixture, can_run,
    pod::{As, POD_IP, Side, UPSTREAM_IP},
    redirect_bin,
};

macro_rules! need_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

fn svc(port: u16) -> String {
    format!("{UPSTREAM_IP}:{port}")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fixture pod and a node install on its cgroup.
struct Node {
    f: Fixture,
    pin: PathBuf,
}

impl Node {
    /// A node install on a fresh fixture pod's cgroup; the pod is not
    /// registered yet.
    fn new() -> Node {
        let f = Fixture::new();
        let pin = PathBuf::from("/sys/fs/bpf").join(format!("{}-node", f.pod.name));
        let n = Node { f, pin };
        let out = n.install();
        assert!(out.status.success(), "node install: {}", stderr(&out));
        n
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(redirect_bin())
            .args(args)
            .output()
            .expect("running redirect")
    }

    fn pin(&self) -> String {
        self.pin.display().to_string()
    }

    fn netns(&self) -> String {
        self.f.pod.netns_path(Side::Pod).display().to_string()
    }

    fn install(&self) -> Output {
        let cg = self.f.pod.cgroup.display().to_string();
        self.run(&["node", "install", "--cgroup", &cg, "--pin-dir", &self.pin()])
    }

    /// `pod add` of the fixture's pod with `policy`.
    fn add(&self, policy: &[&str]) -> Output {
        self.add_netns(&self.netns(), policy)
    }

    fn add_netns(&self, netns: &str, policy: &[&str]) -> Output {
        let pin = self.pin();
        let mut args = vec!["pod", "add", "--netns", netns, "--pin-dir", &pin];
        args.extend_from_slice(policy);
        self.run(&args)
    }

    fn add_ok(&self, policy: &[&str]) {
        let out = self.add(policy);
        assert!(out.status.success(), "pod add {policy:?}: {}", stderr(&out));
    }

    fn remove(&self) -> Output {
        let (pin, netns) = (self.pin(), self.netns());
        self.run(&["pod", "remove", "--netns", &netns, "--pin-dir", &pin])
    }

    fn list(&self) -> serde_json::Value {
        let out = self.run(&["pod", "list", "--json", "--pin-dir", &self.pin()]);
        assert!(out.status.success(), "pod list: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn status(&self) -> serde_json::Value {
        let out = self.run(&["node", "status", "--json", "--pin-dir", &self.pin()]);
        assert!(out.status.success(), "node status: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Entries of a node policy map (hash maps; 0 for the tries).
fn count_any(map: &str, pin: &Path) -> usize {
    let path = pin.join("policy").join(map);
    let info = aya::maps::MapInfo::from_pin(&path).unwrap();
    let open =
        || aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(&path).unwrap()).unwrap();
    macro_rules! count {
        ($(($k:literal, $v:literal)),*) => {
            match (info.key_size(), info.value_size()) {
                $(($k, $v) => aya::maps::HashMap::<_, [u8; $k], [u8; $v]>::try_from(open())
                    .map(|h| h.keys().count())
                    .unwrap_or(0),)*
                _ => 0,
            }
        };
    }
    count!((8, 88), (24, 8), (16, 1), (24, 1), (32, 1))
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.pin.exists() {
            let _ = self.run(&["node", "uninstall", "--pin-dir", &self.pin()]);
            let _ = std::fs::remove_dir_all(&self.pin);
        }
    }
}

#[test]
fn registered_pod_is_captured_both_ways_and_removal_restores() {
    need_root!();
    let n = Node::new();
    // Installed, not registered: untouched.
    assert_eq!(n.f.who_answers(As::APP, &svc(80)), "upstream");
    assert_eq!(n.f.who_answers_in(&format!("{POD_IP}:{APP_PORT}")), "app");

    n.add_ok(&["-i", "*", "-b", "*"]);
    let v = n.f.connect(As::APP, &svc(80));
    let r = v.reply.expect("reply");
    assert_eq!(r.server, "proxy");
    assert_eq!(r.orig_dst.as_deref(), Some(svc(80).as_str()));
    // The application sees its real peer, the proxy the pod's address.
    assert_eq!(v.peer.as_deref(), Some(svc(80).as_str()));
    assert!(r.peer.starts_with(&format!("{POD_IP}:")), "{r:?}");
    // The proxy itself (UID 1337) is not captured.
    assert_eq!(n.f.who_answers(As::PROXY, &svc(80)), "upstream");
    // Inbound: steered to 15006 with the original destination.
    let v = n.f.connect_in(&format!("{POD_IP}:{APP_PORT}"));
    let r = v.reply.expect("inbound reply");
    assert_eq!(r.server, "proxy");
    assert_eq!(r.local, format!("{POD_IP}:{APP_PORT}"));
    assert_eq!(
        r.orig_dst.as_deref(),
        Some(format!("{POD_IP}:{APP_PORT}").as_str())
    );

    let list = n.list();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["netns"], n.netns());
    assert_eq!(list[0]["alive"], true);
    assert_eq!(list[0]["policy"]["inbound_ports"][0], "*");
    assert_eq!(n.status()["pods"], 1);
    let out = n.run(&["status", "--json", "--node", &n.pin()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["node"]["pods"], 1, "{st:#}");
    assert_eq!(st["pods"][0]["netns"], n.netns(), "{st:#}");

    let out = n.remove();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(n.f.who_answers(As::APP, &svc(80)), "upstream");
    assert_eq!(n.f.who_answers_in(&format!("{POD_IP}:{APP_PORT}")), "app");
    assert_eq!(n.list().as_array().unwrap().len(), 0);
    // Nothing of the pod is left in the node's policy maps.
    for map in redirect_common::map_names::POLICY {
        if map.contains("CLUDE_V") {
            continue; // tries: none written for this policy
        }
        assert_eq!(count_any(map, &n.pin), 0, "{map} still has entries");
    }
}

/// A process that joined the pod's network namespace but not its cgroup
/// (`nsenter -n`, a runtime helper) is captured: the programs are attached
/// above every pod and find the policy by namespace.
#[test]
fn process_in_pod_namespace_outside_pod_cgroup_is_captured() {
    need_root!();
    let n = Node::new();
    n.add_ok(&["-i", "*", "-b", "*"]);
    let other = n.f.pod.cgroup.join("other");
    std::fs::create_dir(&other).unwrap();
    struct Rmdir(PathBuf);
    impl Drop for Rmdir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _rm = Rmdir(other);
    let stranger = As {
        uid: 1000,
        gid: 1000,
        cgroup: Some("other"),
    };
    assert_eq!(n.f.who_answers(stranger, &svc(81)), "proxy");
}

#[test]
fn replace_swaps_the_policy_and_leaves_no_stale_entries() {
    need_root!();
    let n = Node::new();
    n.add_ok(&["-i", "*", "--exclude-ports", "81"]);
    assert_eq!(n.f.who_answers(As::APP, &svc(80)), "proxy");
    assert_eq!(n.f.who_answers(As::APP, &svc(81)), "upstream");
    let ports_before = count_any("PORTS", &n.pin);

    // Registered already: refused without --replace, nothing changes.
    let out = n.add(&["-i", "*"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already registered") && stderr(&out).contains("--replace"),
        "{}",
        stderr(&out)
    );
    assert_eq!(n.f.who_answers(As::APP, &svc(81)), "upstream");

    n.add_ok(&["--replace", "-i", "*", "--exclude-ports", "80,82"]);
    assert_eq!(n.f.who_answers(As::APP, &svc(80)), "upstream");
    assert_eq!(n.f.who_answers(As::APP, &svc(81)), "proxy");
    assert_eq!(n.f.who_answers(As::APP, &svc(82)), "upstream");
    // One pod, its new policy only.
    assert_eq!(count_any("CONFIGS", &n.pin), 1);
    assert_eq!(count_any("PORTS", &n.pin), ports_before + 1);
    let list = n.list();
    assert_eq!(
        list[0]["policy"]["exclude_ports"],
        serde_json::json!([80, 82])
    );
    assert!(
        !n.pin
            .join("pods")
            .read_dir()
            .unwrap()
            .any(|e| { e.unwrap().path().join("POD_NEW").exists() })
    );
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    need_root!();
    let n = Node::new();
    n.add_ok(&["-i", "*", "-b", "*"]);
    let before = n.list();
    let file = std::env::temp_dir().join(format!("{}-notns", n.f.pod.name));
    std::fs::write(&file, "x").unwrap();
    let cases: Vec<(String, &str)> = vec![
        ("/nonexistent/ns".into(), "no such file"),
        (file.display().to_string(), "not a namespace file"),
        ("/proc/self/ns/net".into(), "host's network namespace"),
        ("/proc/self/ns/uts".into(), "not a network namespace"),
    ];
    for (netns, why) in &cases {
        let out = n.add_netns(netns, &["-i", "*"]);
        assert!(!out.status.success(), "{netns}");
        let e = stderr(&out);
        assert!(
            e.contains(netns.as_str()) && e.contains(why),
            "{netns}: {e}"
        );
    }
    let _ = std::fs::remove_file(&file);

    // No node install there.
    let out = n.run(&[
        "pod",
        "add",
        "--netns",
        &n.netns(),
        "--pin-dir",
        "/sys/fs/bpf/no-such-node-install",
        "-i",
        "*",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not installed") && stderr(&out).contains("node install"),
        "{}",
        stderr(&out)
    );
    assert!(!Path::new("/sys/fs/bpf/no-such-node-install").exists());

    // Another pod with the same address: refused, naming the address and
    // the pod that has it.
    let other = Fixture::new();
    let other_ns = other.pod.netns_path(Side::Pod).display().to_string();
    let out = n.add_netns(&other_ns, &["-i", "*"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains(&POD_IP.to_string()) && e.contains(&n.netns()),
        "{e}"
    );

    // A bad policy flag: refused before anything is touched.
    let out = n.add_netns(&other_ns, &["-i", "*", "-x", "10.0.0.0/33"]);
    assert!(!out.status.success());

    assert_eq!(n.list(), before);
    assert_eq!(count_any("CONFIGS", &n.pin), 1);
}

#[test]
fn two_adds_of_one_pod_at_once_register_it_once() {
    need_root!();
    let n = Node::new();
    let (pin, netns) = (n.pin(), n.netns());
    let spawn = || {
        Command::new(redirect_bin())
            .args([
                "pod",
                "add",
                "--netns",
                &netns,
                "--pin-dir",
                &pin,
                "-i",
                "*",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(
        [a.status.success(), b.status.success()]
            .iter()
            .filter(|ok| **ok)
            .count(),
        1,
        "{} / {}",
        stderr(&a),
        stderr(&b)
    );
    let loser = if a.status.success() { &b } else { &a };
    assert!(
        stderr(loser).contains("already registered"),
        "{}",
        stderr(loser)
    );
    assert_eq!(count_any("CONFIGS", &n.pin), 1);
    assert_eq!(n.f.who_answers(As::APP, &svc(80)), "proxy");
}

/// Installing again (as an upgrade to a new binary does) keeps every pod
/// and replaces the programs with no second set left attached.
#[test]
fn reinstall_keeps_pods_and_leaves_one_set_of_programs() {
    need_root!();
    let n = Node::new();
    n.add_ok(&["-i", "*", "-b", "*"]);
    let gen1 = n.status()["generation"].as_u64().unwrap();
    let out = n.install();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 pod(s) kept"));
    assert_eq!(n.status()["generation"].as_u64().unwrap(), gen1 + 1);
    assert_eq!(n.f.who_answers(As::APP, &svc(80)), "proxy");
    assert_eq!(n.f.who_answers_in(&format!("{POD_IP}:{APP_PORT}")), "proxy");
    let cgroup = std::fs::File::open(&n.f.pod.cgroup).unwrap();
    for (_, attach, _) in redirect::apply::PROGRAMS {
        if attach.on_netns() {
            continue;
        }
        let ids = redirect::sys::prog_query(&cgroup, attach).unwrap();
        assert_eq!(ids.len(), 1, "{}: {ids:?}", attach.hook());
    }
    let netns = std::fs::File::open(n.netns()).unwrap();
    let ids = redirect::sys::prog_query(&netns, redirect::sys::AttachType::SkLookup).unwrap();
    assert_eq!(ids.len(), 1, "sk_lookup: {ids:?}");

    // Another cgroup or another size: refused, the install stays.
    let out = n.run(&[
        "node",
        "install",
        "--cgroup",
        &n.f.pod.cgroup.join("app").display().to_string(),
        "--pin-dir",
        &n.pin(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("node uninstall"), "{}", stderr(&out));
    assert_eq!(n.f.who_answers(As::APP, &svc(80)), "proxy");
}

/// A pod whose namespace is deleted leaves entries and a detached link
/// behind; `gc` removes them. The namespace here is one without a sidecar
/// or servers: only its registration matters.
#[test]
fn gc_removes_pods_whose_namespace_is_gone() {
    need_root!();
    let n = Node::new();
    n.add_ok(&["-i", "*", "-b", "*"]);
    let name = format!("{}-gone", n.f.pod.name);
    let ok = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
    };
    ok(&["netns", "add", &name]);
    struct DelNetns(String);
    impl Drop for DelNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }
    let guard = DelNetns(name.clone());
    ok(&["-n", &name, "link", "set", "lo", "up"]);
    ok(&[
        "-n", &name, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]);
    ok(&["-n", &name, "addr", "add", "10.201.0.9/24", "dev", "d0"]);
    let path = format!("/run/netns/{name}");
    let out = n.add_netns(&path, &["-i", "*"]);
    let added = out.status.success();
    drop(guard);
    assert!(added, "{}", stderr(&out));
    assert_eq!(n.list().as_array().unwrap().len(), 2);
    // The namespace goes once its last reference does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let l = n.list();
        if l.as_array().unwrap().iter().any(|p| p["alive"] == false) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{l}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let root = format!("/sys/fs/bpf/{}-root", n.f.pod.name);
    let out = n.run(&["gc", "--pin-dir", &n.pin(), "--pin-root", &root]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed 1 pod"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let l = n.list();
    assert_eq!(l.as_array().unwrap().len(), 1, "{l}");
    assert_eq!(l[0]["netns"], n.netns());
    assert_eq!(count_any("CONFIGS", &n.pin), 1);
    let own = l[0]["policy"]["local_addrs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a != &"127.0.0.1" && a != &"::1")
        .count();
    assert_eq!(
        count_any("POD_ADDRS", &n.pin),
        own,
        "the live pod's addresses only"
    );
    // The live pod is still captured.
    assert_eq!(n.f.who_answers(As::APP, &svc(80)), "proxy");
}

/// `sk_lookup` finds the pod by the address a connection arrives for: an
/// address the pod got after it was registered finds no pod, and the
/// connection is dropped (counted), never delivered uncaptured, until the
/// pod is registered again.
#[test]
fn inbound_to_an_address_added_later_is_dropped_until_registered_again() {
    need_root!();
    let n = Node::new();
    n.add_ok(&["-i", "*", "-b", "*"]);
    let out = Command::new("ip")
        .args([
            "-n",
            &n.f.pod.netns_name(Side::Pod),
            "addr",
            "add",
            "10.200.0.3/24",
            "dev",
            "eth0",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let late = format!("10.200.0.3:{APP_PORT}");
    let v = n.f.connect_in(&late);
    assert!(v.reply.is_none(), "delivered: {v:?}");
    assert!(
        n.status()["counters"]["inbound_unknown_addr"]
            .as_u64()
            .unwrap()
            > 0,
        "{}",
        n.status()
    );
    n.add_ok(&["--replace", "-i", "*", "-b", "*"]);
    let r = n.f.connect_in(&late).reply.expect("captured");
    assert_eq!(r.server, "proxy");
    assert_eq!(r.orig_dst.as_deref(), Some(late.as_str()));
}

/// The policy follows the namespace: a process of the pod's cgroup in
/// another network namespace is not the pod's, as iptables in the pod's
/// namespace would not see it either.
#[test]
fn pod_cgroup_process_in_another_namespace_is_not_captured() {
    need_root!();
    let n = Node::new();
    n.add_ok(&["-i", "*", "-b", "*"]);
    assert_eq!(n.f.who_answers(As::APP, &svc(80)), "proxy");
    // From the upstream namespace, in the pod's app cgroup.
    let v =
        n.f.pod
            .connect_from(Side::Upstream, As::APP, &svc(80), None)
            .unwrap();
    assert_eq!(v.reply.expect("reply").server, "upstream");
}

/// The same with a one-shot apply, attached to the pod's cgroup.
#[test]
fn one_shot_pod_cgroup_process_in_another_namespace_is_not_captured() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    assert_eq!(f.who_answers(As::APP, &svc(80)), "proxy");
    let v = f
        .pod
        .connect_from(Side::Upstream, As::APP, &svc(80), None)
        .unwrap();
    assert_eq!(v.reply.expect("reply").server, "upstream");
}

/// `pod add --dry-run` checks as `pod add` does and shows the entries,
/// changing nothing; `explain --registered` decides with the policy in
/// force for a registered pod, read back from the node's maps.
#[test]
fn dry_run_and_explain_take_a_registered_pod() {
    need_root!();
    let n = Node::new();
    let out = n.add(&[
        "--dry-run",
        "--json",
        "-i",
        "*",
        "-b",
        "*",
        "--exclude-ports",
        "81",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["registered"], false);
    assert_eq!(plan["maps"]["PORTS"]["entries"][0]["port"], 81, "{plan:#}");
    assert!(
        plan["maps"]["POD_ADDRS"]["entries"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(POD_IP.to_string())),
        "{plan:#}"
    );
    assert_eq!(n.list().as_array().unwrap().len(), 0);
    assert_eq!(count_any("CONFIGS", &n.pin), 0);
    assert_eq!(n.f.who_answers(As::APP, &svc(80)), "upstream");

    n.add_ok(&["-i", "*", "-b", "*", "--exclude-ports", "81"]);
    let out = n.add(&["--dry-run", "-i", "*"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already registered"),
        "{}",
        stderr(&out)
    );
    let explain = |uid: &str, dst: &str| -> serde_json::Value {
        let (netns, pin) = (n.netns(), n.pin());
        let out = n.run(&[
            "explain",
            "--registered",
            "--netns",
            &netns,
            "--node-pin-dir",
            &pin,
            "--uid",
            uid,
            "--dst",
            dst,
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(explain("1000", &svc(80))["action"], "redirect");
    assert_eq!(explain("1000", &svc(81))["action"], "pass");
    assert_eq!(explain("1337", &svc(80))["action"], "pass");
    // And the kernel agrees.
    assert_eq!(n.f.who_answers(As::APP, &svc(80)), "proxy");
    assert_eq!(n.f.who_answers(As::APP, &svc(81)), "upstream");
}

/// What `pod add` writes is what the maps give back: the entries read back
/// from the kernel's maps equal the ones recorded, for a policy using every
/// map.
#[test]
fn entries_written_are_the_entries_read_back() {
    need_root!();
    let n = Node::new();
    n.add_ok(&[
        "-i",
        "10.0.0.0/8,fd00::/8",
        "-x",
        "10.9.0.0/16,192.168.0.0/24,fd00:9::/32",
        "-o",
        "22,2222",
        "-q",
        "80,443",
        "-b",
        "8080,9090",
        "-u",
        "1337,1400",
        "-g",
        "1337",
        "--owner-groups-exclude",
        "5,6",
        "--service",
        "10.1.2.3:80,[fd00::3]:443",
    ]);
    let cookie = n.list()[0]["netns_cookie"].as_u64().unwrap();
    let recorded = redirect::pods::recorded(&n.pin, cookie).unwrap().sorted();
    let mut maps = redirect::entries::PolicyMaps::open(&n.pin.join("policy")).unwrap();
    let read = redirect::entries::PolicyEntries::read(&mut maps, cookie)
        .unwrap()
        .expect("the pod's policy");
    assert_eq!(read, recorded);
    assert_eq!(read.exclude_v4.len(), 2);
    assert_eq!(read.services.len(), 2);
    assert_eq!(read.proxy_uids, [1337, 1400]);
}

/// Pinned maps of another layout are refused, never reused: by `node
/// install` (its version, or a map's sizes) and by `pod add`.
#[test]
fn node_maps_of_another_layout_are_refused() {
    need_root!();
    let n = Node::new();
    n.add_ok(&["-i", "*"]);
    let layout_pin = n.pin.join("state").join(redirect_common::map_names::LAYOUT);
    let set_layout = |v: u64| {
        let map = redirect::apply::open_pinned(&layout_pin).unwrap();
        aya::maps::Array::<_, u64>::try_from(map)
            .unwrap()
            .set(0, v, 0)
            .unwrap();
    };
    set_layout(2);
    let out = n.install();
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("layout version 2") && e.contains("node uninstall"),
        "{e}"
    );
    let out = n.add(&["--replace", "-i", "*"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("layout version 2"),
        "{}",
        stderr(&out)
    );
    set_layout(redirect_common::STATE_LAYOUT);
    assert_eq!(n.f.who_answers(As::APP, &svc(80)), "proxy");

    // A policy map whose keys changed size.
    let ports = n.pin.join("policy").join(redirect_common::map_names::PORTS);
    let original = redirect::sys::obj_get(&ports, 0).unwrap();
    std::fs::remove_file(&ports).unwrap();
    let fake = redirect::sys::array_create("PORTS", 1, 4).unwrap();
    redirect::sys::obj_pin(&fake, &ports).unwrap();
    let out = n.install();
    std::fs::remove_file(&ports).unwrap();
    redirect::sys::obj_pin(&original, &ports).unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("map PORTS has 4-byte keys and 1-byte values"),
        "{}",
        stderr(&out)
    );
    let out = n.install();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(n.f.who_answers(As::APP, &svc(80)), "proxy");
}

/// An upgrade (`node install` again) while connections are being made and
/// while one waits for its proxy to ask: no connection escapes capture and
/// none loses its original destination.
#[test]
fn reinstall_under_traffic_has_no_gap_and_keeps_destinations() {
    need_root!();
    let mut n = Node::new();
    n.f.restart_outbound_proxy_with(&["--answer-delay-ms", "1500"]);
    n.add_ok(&["-i", "*"]);
    let slow_to = svc(81);
    std::thread::scope(|s| {
        let f = &n.f;
        let slow = s.spawn(|| f.connect(As::APP, &slow_to));
        std::thread::sleep(std::time::Duration::from_millis(300));
        for _ in 0..2 {
            let out = n.install();
            assert!(out.status.success(), "{}", stderr(&out));
        }
        let v = slow.join().unwrap();
        let r = v.reply.unwrap_or_else(|| panic!("{:?}", v.error));
        assert_eq!(r.server, "proxy");
        assert_eq!(r.orig_dst.as_deref(), Some(slow_to.as_str()));
    });
    n.f.restart_outbound_proxy_with(&[]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let f = &n.f;
        let stop = &stop;
        let looper = s.spawn(move || {
            let mut seen = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let to = svc(80);
                let v = f.connect(As::APP, &to);
                let r = v.reply.unwrap_or_else(|| panic!("{:?}", v.error));
                assert_eq!(r.server, "proxy", "escaped capture during an install");
                assert_eq!(r.orig_dst.as_deref(), Some(to.as_str()));
                seen += 1;
            }
            seen
        });
        for _ in 0..3 {
            let out = n.install();
            assert!(out.status.success(), "{}", stderr(&out));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(looper.join().unwrap() > 0);
    });
}

/// A `--replace` killed before or after its swap leaves its new record
/// beside the old one; the next `--replace` (or `pod remove`) finds which
/// one is in force, and no entry of the other is left behind.
#[test]
fn interrupted_replace_is_completed_by_the_next_one() {
    need_root!();
    let n = Node::new();
    n.add_ok(&["-i", "*", "--exclude-ports", "81"]);
    let ports_one_policy = count_any("PORTS", &n.pin);
    for (point, in_force_81) in [("before_swap", "upstream"), ("after_swap", "proxy")] {
        let (netns, pin) = (n.netns(), n.pin());
        let out = Command::new(redirect_bin())
            .args([
                "pod",
                "add",
                "--replace",
                "--netns",
                &netns,
                "--pin-dir",
                &pin,
                "-i",
                "*",
                "--exclude-ports",
                "82",
            ])
            .env("REDIRECT_TEST_HOOK_KILL_IN_REPLACE", point)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{point}: not killed");
        // Killed there: the old policy, or the new one, in force whole.
        assert_eq!(n.f.who_answers(As::APP, &svc(81)), in_force_81, "{point}");
        n.add_ok(&["--replace", "-i", "*", "--exclude-ports", "81"]);
        assert_eq!(n.f.who_answers(As::APP, &svc(81)), "upstream", "{point}");
        assert_eq!(n.f.who_answers(As::APP, &svc(82)), "proxy", "{point}");
        assert_eq!(
            count_any("PORTS", &n.pin),
            ports_one_policy,
            "{point}: stale entries"
        );
        assert_eq!(count_any("CONFIGS", &n.pin), 1);
    }
    let out = n.remove();
    assert!(out.status.success(), "{}", stderr(&out));
    for map in ["CONFIGS", "PORTS", "POD_ADDRS", "PROXY_UIDS", "LOCAL_V4"] {
        assert_eq!(count_any(map, &n.pin), 0, "{map}");
    }
}

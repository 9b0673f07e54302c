//! redirect as istio-init: the binary called `istio-iptables`, run in the
//! pod as Istio's init containers run it, with the argument lists Istio's
//! injector writes; `--cgroup auto`; `--run-validation`; and with a node
//! install, registration of its own network namespace.

use std::{
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use redirect_tests::{
    APP_PORT, Fixture, can_run,
    pod::{As, NET1_POD_IP, NET1_REMOTE, POD_IP, Side, UPSTREAM_IP},
    redirect_bin,
};

macro_rules! need_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

/// Root in the pod's `app/` cgroup: where an init container's process is
/// (a child cgroup of the pod's).
const INIT: As = As {
    uid: 0,
    gid: 0,
    cgroup: Some("app"),
};

/// The proxy's UID in `proxy/`: istio-validation runs as the proxy's UID.
const VALIDATION: As = As::PROXY;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A directory holding `istio-iptables`, a symlink to the redirect binary
/// (the name decides what it does); removed on drop.
struct IstioBin {
    dir: PathBuf,
}

impl IstioBin {
    fn new() -> IstioBin {
        let dir = std::env::temp_dir().join(format!(
            "rdt-istio-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        symlink(redirect_bin(), dir.join("istio-iptables")).unwrap();
        IstioBin { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("istio-iptables")
    }
}

impl Drop for IstioBin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `istio-iptables args` in the pod as `who`, with the fixture's pin
/// dir for a one-shot apply and `node` as the node install to look for.
fn istio_iptables(
    f: &Fixture,
    bin: &IstioBin,
    who: As,
    args: &[&str],
    env: &[(&str, &str)],
    node: &Path,
) -> Output {
    let mut cmd = f.pod.command(Side::Pod, who, &bin.path()).unwrap();
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("REDIRECT_PIN_DIR", &f.pin_dir)
        .env("REDIRECT_NODE_PIN_DIR", node)
        .envs(env.iter().copied());
    cmd.output().expect("running istio-iptables")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A node pin dir that does not exist: no node install.
fn no_node(f: &Fixture) -> PathBuf {
    PathBuf::from(format!("{}-no-node", f.pin_dir.display()))
}

fn upstream(port: u16) -> String {
    format!("{UPSTREAM_IP}:{port}")
}

/// The default sidecar's arguments.
const DEFAULT_ARGS: [&str; 17] = redirect::istio::INJECTED_DEFAULT_ARGS;

#[test]
fn injected_arguments_of_istio_releases_capture_the_pod() {
    need_root!();
    let bin = IstioBin::new();
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = DEFAULT_ARGS.to_vec();
        v.extend_from_slice(extra);
        v
    };
    // (release, arguments): what the injector writes for the istio-init
    // container, with default values and with the options it adds.
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("1.16-1.31 default", with(&[])),
        ("logAsJson", with(&["--log_as_json"])),
        ("1.24+ forceApplyIptables", with(&["--force-apply"])),
        ("1.27+ nativeNftables", with(&["--native-nftables"])),
        (
            "1.16 excludeOutboundPorts annotation, pflag's -p=",
            with(&["-o", "7,8,9", "-p=15001"]),
        ),
    ];
    for (release, args) in cases {
        let f = Fixture::new();
        let out = istio_iptables(&f, &bin, INIT, &args, &[], &no_node(&f));
        assert!(out.status.success(), "{release}: {}", text(&out));
        // Outbound captured, the proxy's own connections not.
        assert_eq!(f.who_answers(As::APP, &upstream(80)), "proxy", "{release}");
        assert_eq!(
            f.who_answers(As::PROXY, &upstream(80)),
            "upstream",
            "{release}"
        );
        // Inbound captured; the listed ports not.
        assert_eq!(
            f.who_answers_in(&format!("{POD_IP}:{APP_PORT}")),
            "proxy",
            "{release}"
        );
        // It applied to the pod's cgroup (found by --cgroup auto), at the
        // pin dir it was given.
        let st = f.status().expect("status");
        assert_eq!(
            st["pod"]["cgroup"].as_str().map(PathBuf::from),
            Some(f.pod.cgroup.canonicalize().unwrap()),
            "{release}: {st}"
        );
    }

    // pilot-agent's form, what the injector writes as the container's
    // arguments when the image's entrypoint is redirect.
    let f = Fixture::new();
    let mut cmd = f.pod.command(Side::Pod, INIT, &redirect_bin()).unwrap();
    let out = cmd
        .arg("istio-iptables")
        .args(DEFAULT_ARGS)
        .env("REDIRECT_PIN_DIR", &f.pin_dir)
        .env("REDIRECT_NODE_PIN_DIR", no_node(&f))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.who_answers(As::APP, &upstream(80)), "proxy");
    drop(f);

    // traffic-annotations.yaml.injected: listed CIDRs and ports only.
    let f = Fixture::new();
    let args = [
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "127.0.0.1/24,10.96.0.1/24",
        "-x",
        "10.96.0.2/24,10.96.0.3/24",
        "-b",
        "1,2,3",
        "-d",
        "15090,15021,4,5,6,15020",
        "-o",
        "7,8,9",
        "--log_output_level=default:info",
    ];
    let out = istio_iptables(&f, &bin, INIT, &args, &[], &no_node(&f));
    assert!(out.status.success(), "{}", text(&out));
    // The upstream is outside -i, the app's port not in -b.
    assert_eq!(f.who_answers(As::APP, &upstream(80)), "upstream");
    assert_eq!(f.who_answers_in(&format!("{POD_IP}:{APP_PORT}")), "app");
}

#[test]
fn the_environment_is_read_as_istio_iptables_reads_it() {
    need_root!();
    let bin = IstioBin::new();
    // No flags at all: the policy from the environment (istio's names).
    let f = Fixture::new();
    let env = [
        ("ISTIO_SERVICE_CIDR", "*"),
        ("ISTIO_INBOUND_PORTS", "*"),
        ("ISTIO_LOCAL_EXCLUDE_PORTS", "15090,15021,15020"),
        ("ISTIO_INBOUND_INTERCEPTION_MODE", "REDIRECT"),
        ("ISTIO_META_DNS_CAPTURE", "false"),
    ];
    let out = istio_iptables(&f, &bin, INIT, &[], &env, &no_node(&f));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.who_answers(As::APP, &upstream(80)), "proxy");
    assert_eq!(f.who_answers_in(&format!("{POD_IP}:{APP_PORT}")), "proxy");

    // A flag wins over its variable: -i '' captures nothing outbound.
    let f = Fixture::new();
    let out = istio_iptables(&f, &bin, INIT, &["-i", "", "-b", "*"], &env, &no_node(&f));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.who_answers(As::APP, &upstream(80)), "upstream");
    assert_eq!(f.who_answers_in(&format!("{POD_IP}:{APP_PORT}")), "proxy");
}

#[test]
fn what_is_not_implemented_is_refused_by_name_and_nothing_is_applied() {
    need_root!();
    let bin = IstioBin::new();
    let f = Fixture::new();
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["-m", "TPROXY"], vec![], "TPROXY"),
        (vec!["-c", "eth/1"], vec![], "--exclude-interfaces"),
        (vec!["-k", "net0ps2"], vec![], "--kube-virt-interfaces"),
        (
            vec![],
            vec![("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.0/8")],
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        ),
        (vec!["--no-such-flag"], vec![], "--no-such-flag"),
    ];
    for (extra, env, named) in cases {
        let mut args = DEFAULT_ARGS.to_vec();
        args.extend_from_slice(&extra);
        let out = istio_iptables(&f, &bin, INIT, &args, &env, &no_node(&f));
        assert!(!out.status.success(), "{extra:?} {env:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(named),
            "{extra:?} {env:?}: {}",
            text(&out)
        );
        assert!(!f.pin_dir.exists(), "{extra:?}: something was pinned");
    }
    // Nothing captured.
    assert_eq!(f.who_answers(As::APP, &upstream(80)), "upstream");
}

#[test]
fn dns_capture_takes_the_nameservers_of_resolv_conf() {
    need_root!();
    let bin = IstioBin::new();
    // What the init container reads is the pod's /etc/resolv.conf: here
    // the machine's, which the test process shares.
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let expected: Vec<String> = redirect::policy::resolv_conf_servers(&conf)
        .iter()
        .map(ToString::to_string)
        .collect();
    for (args, env) in [
        (vec![], vec![("ISTIO_META_DNS_CAPTURE", "true")]),
        (vec!["--redirect-dns"], vec![]),
    ] {
        let f = Fixture::new();
        let mut all = DEFAULT_ARGS.to_vec();
        all.extend_from_slice(&args);
        let out = istio_iptables(&f, &bin, INIT, &all, &env, &no_node(&f));
        assert!(out.status.success(), "{args:?} {env:?}: {}", text(&out));
        let status = f.status().expect("status");
        let dns = &status["policy"]["dns"];
        assert_eq!(dns["port"], 15053, "{status}");
        assert_eq!(dns["capture_all"], false, "{status}");
        assert_eq!(dns["servers"], serde_json::json!(expected), "{status}");
        // TCP is captured as before.
        assert_eq!(f.who_answers(As::APP, &upstream(80)), "proxy");
    }
}

#[test]
fn excluded_interfaces_from_the_flag_and_the_environment() {
    need_root!();
    let bin = IstioBin::new();
    for (args, env) in [
        (vec!["-c", "net1"], vec![]),
        (vec!["--istio-exclude-interfaces=eth7,net+"], vec![]),
        (vec![], vec![("ISTIO_EXCLUDE_INTERFACES", "net1")]),
    ] {
        let mut f = Fixture::new();
        f.pod
            .add_second_interface()
            .expect("the pod's second interface");
        let at = [format!("{NET1_REMOTE}:80")];
        let refs: Vec<&str> = at.iter().map(String::as_str).collect();
        f.pod
            .start_server(Side::Upstream, As::PROXY_LESS, "upstream-net1", &refs)
            .expect("upstream server on net1");
        let mut all = DEFAULT_ARGS.to_vec();
        all.extend_from_slice(&args);
        let out = istio_iptables(&f, &bin, INIT, &all, &env, &no_node(&f));
        assert!(out.status.success(), "{args:?} {env:?}: {}", text(&out));
        // Through net1: left alone, both ways; through eth0: captured.
        assert_eq!(
            f.who_answers(As::APP, &format!("{NET1_REMOTE}:80")),
            "upstream-net1",
            "{args:?} {env:?}"
        );
        assert_eq!(
            f.who_answers_in(&format!("{NET1_POD_IP}:{APP_PORT}")),
            "app",
            "{args:?} {env:?}"
        );
        assert_eq!(f.who_answers(As::APP, &upstream(80)), "proxy");
        assert_eq!(f.who_answers_in(&format!("{POD_IP}:{APP_PORT}")), "proxy");
        let status = f.status().expect("status");
        assert!(
            !status["policy"]["exclude_ifindexes"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{status}"
        );
    }
}

#[test]
fn validation_passes_when_captured_and_exits_126_otherwise() {
    need_root!();
    let bin = IstioBin::new();
    // istio-validation: the proxy's UID, listening on 15001 and 15006
    // itself (the proxy has not started yet).
    let f = Fixture::without_proxy();
    let mut validate = DEFAULT_ARGS.to_vec();
    validate.extend_from_slice(&[
        "--run-validation",
        "--skip-rule-apply",
        "--probe-timeout=1s",
    ]);
    let out = istio_iptables(&f, &bin, VALIDATION, &validate, &[], &no_node(&f));
    assert_eq!(out.status.code(), Some(126), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("validation"),
        "{}",
        text(&out)
    );

    // istio-init applies; validation passes.
    let out = istio_iptables(&f, &bin, INIT, &DEFAULT_ARGS, &[], &no_node(&f));
    assert!(out.status.success(), "{}", text(&out));
    let out = istio_iptables(&f, &bin, VALIDATION, &validate, &[], &no_node(&f));
    assert!(out.status.success(), "{}", text(&out));
}

/// `node uninstall` on drop.
struct NodeGuard(PathBuf);

impl Drop for NodeGuard {
    fn drop(&mut self) {
        let _ = Command::new(redirect_bin())
            .args(["node", "uninstall", "--pin-dir"])
            .arg(&self.0)
            .output();
    }
}

#[test]
fn with_a_node_install_it_registers_its_own_network_namespace() {
    need_root!();
    let bin = IstioBin::new();
    let mut f = Fixture::new();
    let node = PathBuf::from(format!("{}-node", f.pin_dir.display()));
    let _guard = NodeGuard(node.clone());
    let out = f.redirect(&[
        "node",
        "install",
        "--cgroup",
        &f.pod.cgroup.display().to_string(),
        "--pin-dir",
        &node.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let list = |f: &Fixture| -> serde_json::Value {
        let out = f.redirect(&[
            "pod",
            "list",
            "--json",
            "--pin-dir",
            &node.display().to_string(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(list(&f).as_array().unwrap().len(), 0);

    let out = istio_iptables(&f, &bin, INIT, &DEFAULT_ARGS, &[], &node);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!f.pin_dir.exists(), "applied one-shot besides registering");
    let pods = list(&f);
    assert_eq!(pods.as_array().unwrap().len(), 1, "{pods}");
    assert_eq!(f.who_answers(As::APP, &upstream(80)), "proxy");
    assert_eq!(f.who_answers(As::PROXY, &upstream(80)), "upstream");
    assert_eq!(f.who_answers_in(&format!("{POD_IP}:{APP_PORT}")), "proxy");

    // istio-validation against the node's programs.
    let mut validate = DEFAULT_ARGS.to_vec();
    validate.extend_from_slice(&[
        "--run-validation",
        "--skip-rule-apply",
        "--probe-timeout=1s",
    ]);
    f.pod.stop_server("proxy");
    let out = istio_iptables(&f, &bin, VALIDATION, &validate, &[], &node);
    assert!(out.status.success(), "{}", text(&out));
    f.start_proxy();

    // Running it again replaces the pod's policy; --cleanup-only removes it.
    let out = istio_iptables(&f, &bin, INIT, &["-i", "", "-b", "*"], &[], &node);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.who_answers(As::APP, &upstream(80)), "upstream");
    let out = istio_iptables(&f, &bin, INIT, &["--cleanup-only"], &[], &node);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(list(&f).as_array().unwrap().len(), 0);
    assert_eq!(f.who_answers_in(&format!("{POD_IP}:{APP_PORT}")), "app");
}

#[test]
fn cgroup_auto_finds_the_pod_from_a_private_cgroup_namespace() {
    need_root!();
    let f = Fixture::new();
    let mnt = std::env::temp_dir().join(format!("rdt-cg2-{}", std::process::id()));
    std::fs::create_dir_all(&mnt).unwrap();
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _rm = Rm(mnt.clone());
    let bin = redirect_bin();
    // As a container: its own cgroup namespace and mount namespace, cgroup2
    // mounted (showing its own cgroup only), the host's tree still mounted.
    let run = |hide_host: bool| -> Output {
        let host = redirect::fs::cgroup2_mount().unwrap();
        let script = format!(
            "{}mount -t cgroup2 none {} && exec {} apply --cgroup auto --dry-run --json -i '*'",
            if hide_host {
                format!("umount -l {} && ", host.display())
            } else {
                String::new()
            },
            mnt.display(),
            bin.display()
        );
        let mut cmd = f
            .pod
            .command(Side::Pod, INIT, Path::new("unshare"))
            .unwrap();
        cmd.args([
            "--cgroup",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ]);
        cmd.output().expect("unshare")
    };
    let out = run(false);
    assert!(out.status.success(), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        plan["cgroup"].as_str().map(PathBuf::from),
        Some(f.pod.cgroup.canonicalize().unwrap()),
        "{plan}"
    );
    // Without the host's tree the pod's cgroup cannot be seen: a clear error.
    let out = run(true);
    assert!(!out.status.success(), "{}", text(&out));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("--cgroup auto") && e.contains("mount the host's cgroup v2 tree"),
        "{e}"
    );
}

/// The capabilities the init container (and the node agent) are given in
/// deploy/: no CAP_SYS_ADMIN.
const CAPS: &str = "-all,+bpf,+perfmon,+net_admin";

#[test]
fn init_container_needs_only_bpf_perfmon_and_net_admin() {
    need_root!();
    let bin = IstioBin::new();
    let limited = |f: &Fixture, node: &Path| -> Output {
        let mut cmd = f
            .pod
            .command(Side::Pod, INIT, Path::new("setpriv"))
            .unwrap();
        cmd.args(["--bounding-set", CAPS])
            .arg(bin.path())
            .args(DEFAULT_ARGS)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("REDIRECT_PIN_DIR", &f.pin_dir)
            .env("REDIRECT_NODE_PIN_DIR", node);
        cmd.output().unwrap()
    };
    // One-shot, --cgroup auto.
    let f = Fixture::new();
    let out = limited(&f, &no_node(&f));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.who_answers(As::APP, &upstream(80)), "proxy");
    // Registering its own namespace with a node install (the node
    // installed by the agent, with the same capabilities).
    let mut f = Fixture::new();
    let node = PathBuf::from(format!("{}-node", f.pin_dir.display()));
    let _guard = NodeGuard(node.clone());
    let out = Command::new("setpriv")
        .args(["--bounding-set", CAPS])
        .arg(redirect_bin())
        .args(["node", "install", "--cgroup"])
        .arg(&f.pod.cgroup)
        .arg("--pin-dir")
        .arg(&node)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // A proxy listening before the init container ran (not a pod's
    // order) cannot be registered without CAP_SYS_PTRACE: said, and
    // inbound connections are refused (not delivered uncaptured) until it
    // listens again.
    let out = limited(&f, &node);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be borrowed"),
        "{}",
        text(&out)
    );
    assert!(
        f.who_answers_in(&format!("{POD_IP}:{APP_PORT}"))
            .contains("refused")
    );
    // The order of a pod's start: init containers, then the proxy, whose
    // listen() registers it.
    f.pod.stop_server("proxy");
    let out = limited(&f, &node);
    assert!(out.status.success(), "{}", text(&out));
    f.start_proxy();
    assert_eq!(f.who_answers(As::APP, &upstream(80)), "proxy");
    assert_eq!(f.who_answers_in(&format!("{POD_IP}:{APP_PORT}")), "proxy");
}

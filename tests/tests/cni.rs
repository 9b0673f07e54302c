//! `redirect-cni`, the chained CNI plugin, driven as a container runtime
//! drives it (environment, configuration on stdin, result on stdout) on
//! real pods and a real node install.

use std::{
    io::Write as _,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use redirect_tests::{
    APP_PORT, Fixture, can_run,
    pod::{As, POD_IP, Side, UPSTREAM_IP},
    redirect_bin,
};
use serde_json::{Value, json};

macro_rules! need_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

/// A node install on the fixture's pod cgroup and the plugin binary (a
/// symlink named redirect-cni); both removed on drop.
struct Node {
    f: Fixture,
    pin: PathBuf,
    plugin_dir: PathBuf,
}

impl Node {
    fn new() -> Node {
        let f = Fixture::new();
        let pin = PathBuf::from(format!("{}-node", f.pin_dir.display()));
        let plugin_dir = PathBuf::from(format!("/tmp/{}-cni", f.pod.name));
        std::fs::create_dir_all(&plugin_dir).unwrap();
        symlink(redirect_bin(), plugin_dir.join("redirect-cni")).unwrap();
        let n = Node { f, pin, plugin_dir };
        n.install();
        n
    }

    fn install(&self) {
        let out = self.f.redirect(&[
            "node",
            "install",
            "--cgroup",
            &self.f.pod.cgroup.display().to_string(),
            "--pin-dir",
            &self.pin.display().to_string(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
    }

    fn uninstall(&self) {
        let _ = self.f.redirect(&[
            "node",
            "uninstall",
            "--pin-dir",
            &self.pin.display().to_string(),
        ]);
    }

    /// Runs the plugin: `command` with `config` on stdin, for the pod's
    /// namespace (or `netns`), in Kubernetes namespace `ns`.
    fn cni(&self, command: &str, config: &Value, netns: Option<&Path>, ns: &str) -> Output {
        let netns = netns
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.f.pod.netns_path(Side::Pod));
        run_plugin(
            &self.plugin_dir.join("redirect-cni"),
            command,
            config,
            &netns,
            ns,
        )
    }

    fn pods(&self) -> usize {
        let out = self.f.redirect(&[
            "pod",
            "list",
            "--json",
            "--pin-dir",
            &self.pin.display().to_string(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array().unwrap().len()
    }

    /// The plugin's configuration as containerd hands it over: the
    /// conflist's entry, the previous plugin's result, and the pod's
    /// annotations in runtimeConfig.
    fn config(&self, annotations: Value) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "redirect-cni",
            "node_pin_dir": self.pin,
            "runtimeConfig": { "io.kubernetes.cri.pod-annotations": annotations },
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
                "ips": [{"address": "10.200.0.2/24", "interface": 0}],
            },
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.uninstall();
        let _ = std::fs::remove_dir_all(&self.plugin_dir);
    }
}

/// Runs the plugin at `plugin` as a runtime does: `command` for the pod
/// whose namespace is `netns`, in Kubernetes namespace `ns`, with `config`
/// on stdin.
fn run_plugin(plugin: &Path, command: &str, config: &Value, netns: &Path, ns: &str) -> Output {
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "0123456789abcdef")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=web-0"),
        )
        .env("CNI_PATH", plugin.parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn upstream(port: u16) -> String {
    format!("{UPSTREAM_IP}:{port}")
}

fn inbound() -> String {
    format!("{POD_IP}:{APP_PORT}")
}

/// What the injector sets on a pod it gave a sidecar.
fn sidecar() -> Value {
    json!({ "sidecar.istio.io/status": "{\"initContainers\":[\"istio-init\"]}" })
}

#[test]
fn version_lists_the_supported_versions() {
    need_root!();
    let n = Node::new();
    let out = n.cni("VERSION", &json!({"cniVersion": "1.0.0"}), None, "default");
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("0.4.0"))
    );
}

#[test]
fn add_registers_a_sidecar_pod_check_confirms_and_del_removes_it() {
    need_root!();
    let n = Node::new();
    let conf = n.config(sidecar());
    let out = n.cni("ADD", &conf, None, "default");
    assert!(out.status.success(), "{}", text(&out));
    // prevResult passed through.
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["ips"], conf["prevResult"]["ips"], "{result}");
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(n.pods(), 1);
    // istio-cni's defaults: everything captured, the proxy exempt, the
    // status, health and metrics ports excluded inbound.
    assert_eq!(n.f.who_answers(As::APP, &upstream(80)), "proxy");
    assert_eq!(n.f.who_answers(As::PROXY, &upstream(80)), "upstream");
    assert_eq!(n.f.who_answers_in(&inbound()), "proxy");
    let out = n.cni("CHECK", &conf, None, "default");
    assert!(out.status.success(), "{}", text(&out));
    // ADD again (a runtime retrying) replaces the policy.
    let out = n.cni("ADD", &conf, None, "default");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(n.pods(), 1);

    let out = n.cni("DEL", &conf, None, "default");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(n.pods(), 0);
    assert_eq!(n.f.who_answers(As::APP, &upstream(80)), "upstream");
    assert_eq!(n.f.who_answers_in(&inbound()), "app");
    // CHECK now fails: the pod should be registered.
    let out = n.cni("CHECK", &conf, None, "default");
    assert!(!out.status.success(), "{}", text(&out));
    // DEL of a pod it does not know, or whose namespace is gone, succeeds.
    let out = n.cni("DEL", &conf, None, "default");
    assert!(out.status.success(), "{}", text(&out));
    let out = n.cni(
        "DEL",
        &conf,
        Some(Path::new("/run/netns/rdt-gone")),
        "default",
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn annotations_override_the_defaults() {
    need_root!();
    let n = Node::new();
    let mut ann = sidecar();
    ann["traffic.sidecar.istio.io/excludeOutboundIPRanges"] = json!(format!("{UPSTREAM_IP}/32"));
    ann["traffic.sidecar.istio.io/includeInboundPorts"] = json!("");
    let out = n.cni("ADD", &n.config(ann), None, "default");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(n.f.who_answers(As::APP, &upstream(80)), "upstream");
    assert_eq!(n.f.who_answers_in(&inbound()), "app");

    // Plugin defaults from its configuration, under the annotations.
    let mut conf = n.config(sidecar());
    conf["include_outbound_ip_ranges"] = json!("");
    let out = n.cni("ADD", &conf, None, "default");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(n.f.who_answers(As::APP, &upstream(80)), "upstream");
    assert_eq!(n.f.who_answers_in(&inbound()), "proxy");
}

#[test]
fn pods_without_a_sidecar_or_in_excluded_namespaces_are_left_alone() {
    need_root!();
    let n = Node::new();
    let cases = [
        (json!({}), "default"),
        (sidecar(), "kube-system"),
        (
            json!({"sidecar.istio.io/status": "{}", "sidecar.istio.io/inject": "false"}),
            "default",
        ),
    ];
    for (ann, ns) in cases {
        let out = n.cni("ADD", &n.config(ann.clone()), None, ns);
        assert!(out.status.success(), "{ann} {ns}: {}", text(&out));
        let result: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(result["ips"][0]["address"], "10.200.0.2/24");
        assert_eq!(n.pods(), 0, "{ann} {ns}");
    }
    assert_eq!(n.f.who_answers(As::APP, &upstream(80)), "upstream");
}

#[test]
fn bad_input_and_a_missing_node_install_fail_with_a_cni_error() {
    need_root!();
    let n = Node::new();
    let error = |out: &Output| -> Value {
        assert!(!out.status.success(), "{}", text(out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
    };
    let mut ann = sidecar();
    ann["sidecar.istio.io/interceptionMode"] = json!("TPROXY");
    let e = error(&n.cni("ADD", &n.config(ann), None, "default"));
    assert_eq!(e["code"], 7);
    assert!(e["msg"].as_str().unwrap().contains("TPROXY"), "{e}");
    let mut ann = sidecar();
    ann["traffic.sidecar.istio.io/excludeOutboundIPRanges"] = json!("10.0.0.0/99");
    let e = error(&n.cni("ADD", &n.config(ann), None, "default"));
    assert!(e.to_string().contains("10.0.0.0/99"), "{e}");
    let e = error(&n.cni("ADD", &json!({"cniVersion": "0.2.0"}), None, "default"));
    assert_eq!(e["code"], 1);
    assert_eq!(n.pods(), 0);

    n.uninstall();
    let e = error(&n.cni("ADD", &n.config(sidecar()), None, "default"));
    assert!(e.to_string().contains("node mode is not installed"), "{e}");
    // DEL still succeeds.
    let out = n.cni("DEL", &n.config(sidecar()), None, "default");
    assert!(out.status.success(), "{}", text(&out));
}

/// Waits up to 20 s for `cond`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn installer_adds_the_plugin_keeps_it_there_and_takes_it_out_on_sigterm() {
    need_root!();
    let f = Fixture::new();
    let base = PathBuf::from(format!("/tmp/{}-install", f.pod.name));
    let (bin, conf) = (base.join("bin"), base.join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    let pin = PathBuf::from(format!("{}-node", f.pin_dir.display()));
    struct Cleanup(PathBuf, PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new(redirect_bin())
                .args(["node", "uninstall", "--pin-dir"])
                .arg(&self.0)
                .output();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let _cleanup = Cleanup(pin.clone(), base.clone());
    // The DaemonSet's command, before the pod network has a configuration.
    let mut agent = Command::new(redirect_bin())
        .args(["cni", "install", "--wait", "--cgroup"])
        .arg(&f.pod.cgroup)
        .arg("--node-pin-dir")
        .arg(&pin)
        .arg("--cni-bin-dir")
        .arg(&bin)
        .arg("--cni-conf-dir")
        .arg(&conf)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let plugin = bin.join("redirect-cni");
    wait_for("the plugin binary", || plugin.exists());
    let list = conf.join("10-containerd-net.conflist");
    let original = json!({"cniVersion": "1.0.0", "name": "containerd-net", "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]]}},
        {"type": "portmap", "capabilities": {"portMappings": true}}]});
    std::fs::write(&list, original.to_string()).unwrap();
    let entry = || -> Option<Value> {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&list).ok()?).ok()?;
        v["plugins"]
            .as_array()?
            .iter()
            .find(|p| p["type"] == "redirect-cni")
            .cloned()
    };
    wait_for("the conflist entry", || entry().is_some());
    let ours = entry().unwrap();
    assert_eq!(
        ours["capabilities"]["io.kubernetes.cri.pod-annotations"],
        true
    );
    assert_eq!(ours["exclude_namespaces"], json!(["kube-system"]));

    // The copied plugin, with its conflist entry as its configuration,
    // registers a pod with the node install the agent made.
    let mut conf_for_pod = ours.clone();
    conf_for_pod["cniVersion"] = json!("1.0.0");
    conf_for_pod["name"] = json!("containerd-net");
    conf_for_pod["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": sidecar()});
    let out = run_plugin(
        &plugin,
        "ADD",
        &conf_for_pod,
        &f.pod.netns_path(Side::Pod),
        "default",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.who_answers(As::APP, &upstream(80)), "proxy");

    // Another installer rewrites the file without us: we come back.
    std::fs::write(&list, original.to_string()).unwrap();
    wait_for("the entry put back", || entry().is_some());

    // SIGTERM: the plugin is taken out; node mode and the pod stay.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(agent.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status}: {err}");
    let now: Value = serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
    assert_eq!(now, original);
    assert!(!plugin.exists());
    assert_eq!(f.who_answers(As::APP, &upstream(80)), "proxy");
}

//! The image `cargo xtask image` builds (an OCI archive, no registry),
//! imported into a real containerd and run: under its three names, and as
//! the init container of a pod, with only the capabilities and mounts
//! deploy/ gives it.

use std::path::{Path, PathBuf};

use redirect_tests::{
    APP_PORT, Fixture, can_run,
    containerd::Containerd,
    pod::{As, POD_IP, Side, UPSTREAM_IP},
};

macro_rules! need_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn image() -> String {
    format!("docker.io/library/redirect:{VERSION}")
}

/// The archive `cargo xtask image` writes (`cargo xtask test` builds it
/// before the tests).
fn archive() -> PathBuf {
    let p = redirect_tests::target_dir().join(format!("image/redirect-{VERSION}.oci.tar"));
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask image` (cargo xtask test builds it)",
        p.display()
    );
    p
}

fn text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn started() -> Containerd {
    let c = Containerd::start().expect("containerd");
    c.import(&archive()).expect("import");
    c
}

#[test]
fn the_image_runs_under_its_three_names() {
    need_root!();
    let c = started();
    let image = image();
    let out = c.run(&[], &image, "rdt-v", &["redirect", "--version"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("redirect {VERSION}")
    );
    let out = c.run(&[], &image, "rdt-i", &["istio-iptables", "--help"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--istio-service-cidr"));
    let out = c.run(
        &["--env", "CNI_COMMAND=VERSION"],
        &image,
        "rdt-c",
        &["redirect-cni"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    // The entrypoint: Istio's injector writes `istio-iptables ARGS` as the
    // arguments of an image whose entrypoint is pilot-agent; here, redirect.
    let out = c.run(
        &[],
        &image,
        "rdt-e",
        &["redirect", "istio-iptables", "-m", "TPROXY"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TPROXY"),
        "{}",
        text(&out)
    );
}

/// Removes the init container's cgroups runc made (in every hierarchy; the
/// pod's v2 one is the fixture's, and stays for it).
struct InitCgroup(String);

impl Drop for InitCgroup {
    fn drop(&mut self) {
        redirect_tests::containerd::remove_cgroup(&self.0);
    }
}

#[test]
fn the_image_as_an_init_container_captures_its_pod() {
    need_root!();
    let mut f = Fixture::new();
    // A pod's order: the init container, then the proxy.
    f.pod.stop_server("proxy");
    let c = started();
    let cg2 = redirect::fs::cgroup2_mount().unwrap();
    let rel = f
        .pod
        .cgroup
        .strip_prefix(&cg2)
        .unwrap()
        .display()
        .to_string();
    let _cgroups = InitCgroup(rel.clone());
    let netns = format!("network:{}", f.pod.netns_path(Side::Pod).display());
    let cgroup = format!("/{rel}/istio-init");
    let bpffs = "type=bind,src=/sys/fs/bpf,dst=/sys/fs/bpf,options=rbind:rw".to_string();
    let host_cgroup = format!(
        "type=bind,src={},dst=/host/sys/fs/cgroup,options=rbind:ro",
        cg2.display()
    );
    let pin = format!("REDIRECT_PIN_DIR={}", f.pin_dir.display());
    let image = image();
    // As deploy/examples/istio-init-pod.yaml has it: BPF, PERFMON and
    // NET_ADMIN, bpffs and the host's cgroup v2 tree; Istio's arguments.
    let mut args = vec![
        "run",
        "--rm",
        "--with-ns",
        &netns,
        "--cgroup",
        &cgroup,
        "--cap-add",
        "CAP_BPF",
        "--cap-add",
        "CAP_PERFMON",
        "--cap-add",
        "CAP_NET_ADMIN",
        "--mount",
        &bpffs,
        "--mount",
        &host_cgroup,
        "--env",
        &pin,
        "--env",
        "REDIRECT_NODE_PIN_DIR=/sys/fs/bpf/rdt-no-node",
        &image,
        "rdt-init",
        "redirect",
        "istio-iptables",
    ];
    args.extend(redirect::istio::INJECTED_DEFAULT_ARGS);
    let out = c.ctr(&args);
    assert!(
        out.status.success(),
        "{}\ncontainerd: {}",
        text(&out),
        c.log()
    );
    f.start_proxy();
    assert_eq!(
        f.who_answers(As::APP, &format!("{UPSTREAM_IP}:80")),
        "proxy"
    );
    assert_eq!(
        f.who_answers(As::PROXY, &format!("{UPSTREAM_IP}:80")),
        "upstream"
    );
    assert_eq!(f.who_answers_in(&format!("{POD_IP}:{APP_PORT}")), "proxy");
    // Attached to the pod's cgroup (found by --cgroup auto; its path as
    // the container saw it is recorded, so compare ids).
    let st = f.status().expect("status");
    let id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&f.pod.cgroup).unwrap());
    assert_eq!(st["pod"]["cgroup_id"].as_u64(), Some(id), "{st}");
}

/// The entries of the archive's layer, `path -> link target` ("" for
/// files and directories), and the image's entrypoint and environment.
fn layer_and_config() -> (Vec<(String, String)>, serde_json::Value) {
    let script = r#"
import json, sys, tarfile
outer = tarfile.open(sys.argv[1])
blob = lambda d: outer.extractfile("blobs/sha256/" + d.split(":")[1]).read()
index = json.loads(outer.extractfile("index.json").read())
manifest = json.loads(blob(index["manifests"][0]["digest"]))
config = json.loads(blob(manifest["config"]["digest"]))
import io
layer = tarfile.open(fileobj=io.BytesIO(blob(manifest["layers"][0]["digest"])))
entries = [[m.name.rstrip("/"), m.linkname] for m in layer.getmembers()]
print(json.dumps({"entries": entries, "config": config["config"]}))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(archive())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e[0].as_str().unwrap().to_string(),
                e[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (entries, v["config"].clone())
}

#[test]
fn the_dockerfile_builds_what_the_archive_holds() {
    let (entries, config) = layer_and_config();
    let docker = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join("Dockerfile"),
    )
    .unwrap();
    let last = docker.rsplit("\nFROM ").next().unwrap();
    assert!(last.starts_with("scratch"), "the image's base: {last}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/redirect"])
    );
    assert!(
        last.contains(r#"ENTRYPOINT ["/usr/local/bin/redirect"]"#),
        "{last}"
    );
    assert_eq!(config["Env"], serde_json::json!(["PATH=/usr/local/bin"]));
    assert!(last.contains("ENV PATH=/usr/local/bin"), "{last}");
    for (path, link) in &entries {
        let layer_path = format!("/layer/{path}");
        let made = if !link.is_empty() {
            docker.contains(&format!("ln -s {link} {layer_path}"))
        } else {
            docker.contains(&layer_path)
        };
        assert!(made, "the Dockerfile does not make {path} ({link:?})");
    }
}

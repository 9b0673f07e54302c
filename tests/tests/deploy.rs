//! deploy/: the manifests pass the Kubernetes schemas (kubernetes-validate,
//! offline, strict), the injector template agrees with the example pod it
//! yields, and the commands they run are ones redirect accepts.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser as _;
use redirect::cli::{CniCommand, Command as Cmd};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The virtualenv `cargo xtask setup` makes (kubernetes-validate, PyYAML).
fn venv_bin(name: &str) -> PathBuf {
    let p = redirect_tests::target_dir()
        .join("tools/python/bin")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup` (it installs kubernetes-validate)",
        p.display()
    );
    p
}

/// The Kubernetes resources of deploy/, each checked against its schema.
const MANIFESTS: [&str; 2] = [
    "deploy/redirect-node.yaml",
    "deploy/examples/istio-init-pod.yaml",
];

#[test]
fn manifests_pass_the_kubernetes_schemas_strictly() {
    let out = Command::new(venv_bin("kubernetes-validate"))
        .arg("--strict")
        .args(MANIFESTS.iter().map(|m| root().join(m)))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // A resource without a schema only warns: not a pass.
    assert!(!text.contains("WARN"), "{text}");
    for m in MANIFESTS {
        assert!(
            text.lines()
                .any(|l| l.contains(m) && l.contains("passed for resource")),
            "{m}: {text}"
        );
    }
}

/// Runs a Python snippet with the virtualenv's interpreter (PyYAML) in the
/// repository root and returns its stdout.
fn python(script: &str) -> String {
    let out = Command::new(venv_bin("python"))
        .arg("-c")
        .arg(script)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_injector_template_yields_the_example_pod() {
    let out = python(
        r#"
import yaml
op = yaml.safe_load(open("deploy/istio-init-template.yaml"))
hook = op["spec"]["values"]["sidecarInjectorWebhook"]
assert "redirect-init" in hook["defaultTemplates"], hook["defaultTemplates"]
tmpl = yaml.safe_load(hook["templates"]["redirect-init"])["spec"]
pod = yaml.safe_load(open("deploy/examples/istio-init-pod.yaml"))["spec"]
ti = tmpl["initContainers"][0]
pi = [c for c in pod["initContainers"] if c["name"] == "istio-init"][0]
for k in ti:
    assert ti[k] == pi[k], (k, ti[k], pi[k])
vols = {v["name"]: v for v in pod["volumes"]}
for v in tmpl["volumes"]:
    assert vols[v["name"]] == v, v
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn the_commands_in_deploy_are_ones_redirect_takes() {
    // The DaemonSet's command, $(NODE_CGROUP) expanded as the kubelet does.
    let args = python(
        r#"
import yaml, json
ds = yaml.safe_load(open("deploy/redirect-node.yaml"))
c = ds["spec"]["template"]["spec"]["containers"][0]
env = {e["name"]: e["value"] for e in c.get("env", [])}
args = [a.replace("$(NODE_CGROUP)", env["NODE_CGROUP"]) for a in c["args"]]
print(json.dumps(c["command"] + args))
"#,
    );
    let argv: Vec<String> = serde_json::from_str(&args).unwrap();
    assert_eq!(argv[0], "/usr/local/bin/redirect", "the image's path");
    let cli = redirect::cli::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    match cli.command {
        Cmd::Cni(CniCommand::Install(a)) => {
            assert!(a.wait);
            assert_eq!(a.cgroup.as_deref(), Some(Path::new("/host/sys/fs/cgroup")));
        }
        other => panic!("{other:?}"),
    }

    // The example pod's istio-init: Istio's arguments, as pilot-agent's
    // subcommand.
    let args = python(
        r#"
import yaml, json
pod = yaml.safe_load(open("deploy/examples/istio-init-pod.yaml"))
c = [c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init"][0]
print(json.dumps(c["args"]))
"#,
    );
    let argv: Vec<String> = serde_json::from_str(&args).unwrap();
    assert_eq!(argv[0], "istio-iptables");
    let cli =
        redirect::istio::parse_istio_iptables(argv.iter().map(std::ffi::OsString::from), |_| None)
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    cli.istio.check().unwrap();
    cli.policy.to_spec().unwrap();
}

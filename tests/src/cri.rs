//! A Kubernetes node without the kubelet, for tests/tests/kubernetes.rs:
//! Debian's containerd (1.6) with its CRI plugin, driven over CRI as the
//! kubelet drives it, with Debian's `bridge`, `host-local` and `loopback`
//! CNI plugins and redirect installed by its own node agent (`redirect cni
//! install --cgroup`, what deploy/redirect-node.yaml runs), which chains
//! `redirect-cni` after them.
//!
//! Everything is the node's own: a network namespace (containerd runs in it,
//! so the bridge and the pods' gateway live there, not on the host), a
//! cgroup (the pods' parent, where node mode is attached), a pin dir, and a
//! directory with containerd's root, state, socket, the CNI dirs and the
//! IPAM state. Dropping the node removes the pods still there, stops
//! containerd, uninstalls redirect and removes all of it.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{containerd::remove_cgroup, redirect_bin, target_dir};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The pod network's subnet (in the node's own namespace, so every node
/// may use the same) and its gateway, the bridge's address.
pub const SUBNET: &str = "10.213.0.0/24";
pub const GATEWAY: &str = "10.213.0.1";

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The pause image (the CRI sandbox image) and the app image (busybox and
/// `redirect-sample`), as `cargo xtask test` writes them.
pub fn pause_image() -> String {
    format!("docker.io/library/redirect-test-pause:{VERSION}")
}
pub fn app_image() -> String {
    format!("docker.io/library/redirect-test-app:{VERSION}")
}

fn image_archive(name: &str) -> Result<PathBuf> {
    let p = target_dir().join(format!("image/{name}.oci.tar"));
    if !p.exists() {
        bail!(
            "{} is missing: run `cargo xtask image --test-images` (cargo xtask test writes it)",
            p.display()
        );
    }
    Ok(p)
}

/// The Python with the CRI client's packages, from `cargo xtask setup`.
fn python() -> Result<PathBuf> {
    let p = target_dir().join("tools/python/bin/python");
    if !p.exists() {
        bail!(
            "{} is missing: run `cargo xtask setup` (it installs the CRI client's packages)",
            p.display()
        );
    }
    Ok(p)
}

/// A pod sandbox made through CRI.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub id: String,
    /// Its address on the pod network.
    pub ip: String,
    /// The config it was made with (CreateContainer repeats it).
    config: Value,
}

/// The node.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    /// The pods' parent cgroup, relative to the hierarchies' roots.
    pub cgroup: String,
    pub pin_dir: PathBuf,
    containerd: Option<Child>,
    /// Pod sandboxes made and not removed yet.
    pods: Vec<String>,
    /// Processes started in the node's namespace.
    servers: Vec<Child>,
    /// Pod network namespaces seen (containerd removes them; if it did
    /// not, the drop does).
    netns_seen: Vec<PathBuf>,
}

impl Node {
    /// Sets the node up: its namespace, cgroup, CNI dirs with the bridge
    /// network, redirect's node agent, then containerd, and imports the
    /// test images.
    pub fn start() -> Result<Node> {
        let name = format!(
            "rdt-k8s-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = PathBuf::from("/tmp").join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        let mut node = Node {
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            cgroup: name.clone(),
            dir,
            name,
            containerd: None,
            pods: Vec::new(),
            servers: Vec::new(),
            netns_seen: Vec::new(),
        };
        node.set_up()?;
        Ok(node)
    }

    fn set_up(&mut self) -> Result<()> {
        let d = self.dir.clone();
        for sub in ["cni/bin", "cni/net.d", "logs", "ipam"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        ok(Command::new("ip").args(["netns", "add", &self.name]))?;
        ok(Command::new("ip").args(["-n", &self.name, "link", "set", "lo", "up"]))?;
        let cg2 = redirect::fs::cgroup2_mount().context("no cgroup2 mount")?;
        std::fs::create_dir_all(cg2.join(&self.cgroup))?;

        // The pod network, as a cluster's network plugin leaves it: the
        // reference plugins and a conflist.
        for plugin in ["bridge", "host-local", "loopback"] {
            let src = Path::new("/usr/lib/cni").join(plugin);
            if !src.exists() {
                bail!(
                    "{} is missing: cargo xtask setup installs containernetworking-plugins",
                    src.display()
                );
            }
            std::os::unix::fs::symlink(&src, d.join("cni/bin").join(plugin))?;
        }
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "rdt-pods",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                    "dataDir": d.join("ipam"),
                },
            }],
        });
        std::fs::write(
            d.join("cni/net.d/10-pods.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;

        // redirect's node agent: node mode on the pods' parent cgroup, the
        // plugin copied to the bin dir and chained in the conflist.
        let out = Command::new(redirect_bin())
            .args(["cni", "install", "--cni-bin-dir"])
            .arg(d.join("cni/bin"))
            .arg("--cni-conf-dir")
            .arg(d.join("cni/net.d"))
            .arg("--node-pin-dir")
            .arg(&self.pin_dir)
            .arg("--cgroup")
            .arg(cg2.join(&self.cgroup))
            .output()?;
        if !out.status.success() {
            bail!(
                "redirect cni install: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/net.d"
"#,
            d = d.display(),
            pause = pause_image(),
        );
        std::fs::write(d.join("config.toml"), config)?;
        // In the node's namespace with nsenter, not `ip netns exec`: that
        // one remounts /sys, and runc then finds no cgroup mounts.
        let log = std::fs::File::create(d.join("containerd.log"))?;
        self.containerd = Some(
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{}", self.name))
                .arg("containerd")
                .arg("--config")
                .arg(d.join("config.toml"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting containerd (cargo xtask setup installs it)")?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.cri("Version", json!({})).is_err() {
            if Instant::now() > deadline {
                bail!("containerd's CRI did not answer: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for image in ["redirect-test-pause", "redirect-test-app"] {
            let out = Command::new("ctr")
                .arg("--address")
                .arg(d.join("containerd.sock"))
                .args(["-n", "k8s.io", "images", "import"])
                .arg(image_archive(image)?)
                .output()?;
            if !out.status.success() {
                bail!(
                    "ctr images import: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Calls the CRI method (runtime.v1alpha2.RuntimeService) with the
    /// request as JSON; returns the response.
    pub fn cri(&self, method: &str, request: Value) -> Result<Value> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/cri.py");
        let mut child = Command::new(python()?)
            .arg(script)
            .arg(self.dir.join("containerd.sock"))
            .arg(method)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// RunPodSandbox: a pod `name` (namespace `default`) with
    /// `annotations`, in a cgroup below the node's, as the kubelet makes
    /// it; returns it with its address.
    pub fn run_pod(&mut self, name: &str, annotations: &BTreeMap<&str, &str>) -> Result<Pod> {
        let uid = format!("uid-{}-{name}", self.name);
        let logs = self.dir.join("logs").join(name);
        std::fs::create_dir_all(&logs)?;
        let config = json!({
            "metadata": {"name": name, "uid": uid, "namespace": "default", "attempt": 0},
            "hostname": name,
            "log_directory": logs,
            "annotations": annotations,
            "linux": {"cgroup_parent": format!("/{}/pod{uid}", self.cgroup)},
        });
        let r = self.cri("RunPodSandbox", json!({"config": config}))?;
        let id = r["pod_sandbox_id"]
            .as_str()
            .context("RunPodSandbox gave no id")?
            .to_string();
        self.pods.push(id.clone());
        let status = self.cri("PodSandboxStatus", json!({"pod_sandbox_id": id}))?;
        let ip = status["status"]["network"]["ip"]
            .as_str()
            .with_context(|| format!("pod {name} has no address: {status}"))?
            .to_string();
        Ok(Pod {
            name: name.into(),
            id,
            ip,
            config,
        })
    }

    /// CreateContainer + StartContainer: `command` from the app image, as
    /// `uid`; returns the container's id.
    pub fn run_container(
        &self,
        pod: &Pod,
        name: &str,
        uid: u32,
        command: &[&str],
    ) -> Result<String> {
        let r = self.cri(
            "CreateContainer",
            json!({
                "pod_sandbox_id": pod.id,
                "config": {
                    "metadata": {"name": name},
                    "image": {"image": app_image()},
                    "command": command,
                    "log_path": format!("{name}.log"),
                    "linux": {"security_context": {"run_as_user": {"value": uid}}},
                },
                "sandbox_config": pod.config,
            }),
        )?;
        let id = r["container_id"]
            .as_str()
            .context("CreateContainer gave no id")?
            .to_string();
        self.cri("StartContainer", json!({"container_id": id}))?;
        Ok(id)
    }

    /// A container's log (what its command printed), without CRI's
    /// per-line prefix.
    pub fn container_log(&self, pod: &Pod, name: &str) -> String {
        let text = std::fs::read_to_string(
            self.dir
                .join("logs")
                .join(&pod.name)
                .join(format!("{name}.log")),
        )
        .unwrap_or_default();
        text.lines()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until the container has printed `ready` (redirect-sample
    /// server does once it listens).
    pub fn wait_ready(&self, pod: &Pod, name: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.container_log(pod, name).lines().any(|l| l == "ready") {
            if Instant::now() > deadline {
                bail!(
                    "{}/{name} did not get ready: {}",
                    pod.name,
                    self.container_log(pod, name)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// ExecSync: `cmd` in the container (as its user); returns stdout, or
    /// an error with stderr if it failed.
    pub fn exec(&self, container: &str, cmd: &[&str]) -> Result<String> {
        let r = self.cri(
            "ExecSync",
            json!({"container_id": container, "cmd": cmd, "timeout": 60}),
        )?;
        let stdout = r["stdout"].as_str().unwrap_or("").to_string();
        if r["exit_code"].as_i64().unwrap_or(0) != 0 {
            bail!(
                "{cmd:?} exited with {}: {}{}",
                r["exit_code"],
                stdout,
                r["stderr"].as_str().unwrap_or("")
            );
        }
        Ok(stdout)
    }

    /// StopPodSandbox + RemovePodSandbox, as the kubelet deletes a pod.
    pub fn delete_pod(&mut self, pod: &Pod) -> Result<()> {
        self.cri("StopPodSandbox", json!({"pod_sandbox_id": pod.id}))?;
        self.cri("RemovePodSandbox", json!({"pod_sandbox_id": pod.id}))?;
        self.pods.retain(|p| p != &pod.id);
        Ok(())
    }

    /// Starts `redirect-sample ARGS` in the node's network namespace (not
    /// a pod's: the rest of the cluster) and waits for it to listen.
    pub fn serve(&mut self, args: &[&str]) -> Result<()> {
        let sample = crate::built_bin("redirect-sample")?;
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.name))
            .arg(sample)
            .arg("server")
            .args(args)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )?;
        self.servers.push(child);
        if line.trim() != "ready" {
            bail!("redirect-sample server {args:?} did not start: {line}");
        }
        Ok(())
    }

    /// `redirect-sample connect --to TO` from the node's namespace (a
    /// client elsewhere in the cluster); returns what it saw.
    pub fn connect_from_node(&self, to: &str) -> Result<Value> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.name))
            .arg(crate::built_bin("redirect-sample")?)
            .args(["connect", "--to", to])
            .output()?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("connect {to}: {}", String::from_utf8_lossy(&out.stderr)))
    }

    /// `redirect pod list --json` of the node install.
    pub fn registered(&mut self) -> Result<Vec<Value>> {
        let out = Command::new(redirect_bin())
            .args(["pod", "list", "--json", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()?;
        if !out.status.success() {
            bail!("pod list: {}", String::from_utf8_lossy(&out.stderr));
        }
        let pods: Vec<Value> = serde_json::from_slice(&out.stdout)?;
        for p in &pods {
            if let Some(n) = p["netns"].as_str() {
                let n = PathBuf::from(n);
                if !self.netns_seen.contains(&n) {
                    self.netns_seen.push(n);
                }
            }
        }
        Ok(pods)
    }
}

fn ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

impl Drop for Node {
    fn drop(&mut self) {
        for id in std::mem::take(&mut self.pods) {
            let _ = self.cri("StopPodSandbox", json!({"pod_sandbox_id": id}));
            let _ = self.cri("RemovePodSandbox", json!({"pod_sandbox_id": id}));
        }
        for mut s in std::mem::take(&mut self.servers) {
            let _ = s.kill();
            let _ = s.wait();
        }
        if let Some(mut c) = self.containerd.take() {
            // SAFETY: kill(2) on our child (nsenter execs containerd).
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        // runc's shims outlive containerd: those of pods not removed.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(format!("containerd-shim-runc-v2 .*{}", self.dir.display()))
            .output();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("root"))
            .output();
        let _ = Command::new(redirect_bin())
            .args(["cni", "uninstall", "--node", "--cni-bin-dir"])
            .arg(self.dir.join("cni/bin"))
            .arg("--cni-conf-dir")
            .arg(self.dir.join("cni/net.d"))
            .arg("--node-pin-dir")
            .arg(&self.pin_dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        for n in &self.netns_seen {
            if n.exists() {
                let _ = Command::new("umount").arg(n).output();
                let _ = std::fs::remove_file(n);
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
        remove_cgroup(&self.cgroup);
    }
}

//! Many light pods for the node-mode tests and the bench: each a network
//! namespace with its own veth to a shared hub namespace, routed point to
//! point as Calico does (a bridge takes at most 1,024 ports), one IPv4
//! address, and no processes until a test starts some. Every process of the fleet runs in the fleet's cgroup, below which
//! a node install is attached. Dropping the fleet kills its processes and
//! removes its namespaces and cgroup, also on failure.

use std::{
    ffi::CString,
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::peer::ClientView;
use anyhow::{Context as _, Result, bail};

/// The hub's address: the pods' gateway, where upstream services listen.
pub const HUB_IP: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 1);
/// Ports the hub's upstream server listens on.
pub const HUB_PORTS: [u16; 3] = [80, 81, 82];

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A fleet of pods.
pub struct Fleet {
    /// Unique name; namespaces are `<name>-hub` and `<name>-<i>`.
    pub name: String,
    /// The cgroup every process of the fleet runs in.
    pub cgroup: PathBuf,
    exe: PathBuf,
    /// Pod indices alive (created and not deleted).
    alive: Vec<bool>,
    children: Vec<Child>,
}

fn run(cmd: &str, args: &[&str], input: Option<&str>) -> Result<()> {
    let mut c = Command::new(cmd);
    c.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().with_context(|| format!("running {cmd}"))?;
    if let Some(text) = input {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Fleet {
    /// A hub with an upstream server (`upstream`, as root, on
    /// [`HUB_PORTS`]) and `n` pods.
    pub fn create(n: usize) -> Result<Fleet> {
        let name = format!(
            "rdt-f{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let cg2 = redirect::fs::cgroup2_mount().context("no cgroup v2 hierarchy is mounted")?;
        let mut fleet = Fleet {
            cgroup: cg2.join(&name),
            name,
            exe: crate::pod::sample_bin()?,
            alive: Vec::new(),
            children: Vec::new(),
        };
        // From here on, Drop cleans up whatever was made.
        std::fs::create_dir(&fleet.cgroup)
            .with_context(|| format!("creating cgroup {}", fleet.cgroup.display()))?;
        let hub = fleet.hub();
        run("ip", &["netns", "add", &hub], None)?;
        run(
            "ip",
            &["-n", &hub, "-b", "-"],
            Some(&format!("link set lo up\naddr add {HUB_IP}/32 dev lo\n")),
        )?;
        fleet.grow(n)?;
        let listen: Vec<String> = HUB_PORTS.iter().map(|p| format!("{HUB_IP}:{p}")).collect();
        fleet.start(None, 0, "upstream", &listen, &[])?;
        Ok(fleet)
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.name)
    }

    /// The namespace name of pod `i`.
    pub fn netns_name(&self, i: usize) -> String {
        format!("{}-{i}", self.name)
    }

    /// The namespace file of pod `i` (for `pod add --netns`).
    pub fn netns_path(&self, i: usize) -> PathBuf {
        PathBuf::from("/run/netns").join(self.netns_name(i))
    }

    /// The address of pod `i`.
    pub fn addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(HUB_IP) + 1 + i as u32)
    }

    /// Number of pods made so far (alive or deleted).
    pub fn len(&self) -> usize {
        self.alive.len()
    }

    /// Whether no pod was made.
    pub fn is_empty(&self) -> bool {
        self.alive.is_empty()
    }

    /// Makes `n` more pods; returns the first new index.
    pub fn grow(&mut self, n: usize) -> Result<usize> {
        let first = self.alive.len();
        let hub = self.hub();
        let mut netns = String::new();
        let mut hub_side = String::new();
        for i in first..first + n {
            let ns = self.netns_name(i);
            netns.push_str(&format!("netns add {ns}\n"));
            hub_side.push_str(&format!(
                "link add h{i} type veth peer name eth0 netns {ns}\nlink set h{i} up\n\
                 route add {}/32 dev h{i}\n",
                Self::addr(i)
            ));
        }
        // Counted alive from here, before any exists: Drop deletes their
        // namespaces (going on past those a failed batch did not make).
        self.alive.resize(first + n, true);
        run("ip", &["-b", "-"], Some(&netns))?;
        run("ip", &["-n", &hub, "-b", "-"], Some(&hub_side))?;
        for i in first..first + n {
            run(
                "ip",
                &["-n", &self.netns_name(i), "-b", "-"],
                Some(&format!(
                    "link set lo up\naddr add {}/32 dev eth0\nlink set eth0 up\n\
                     route add {HUB_IP}/32 dev eth0\nroute add default via {HUB_IP} dev eth0\n",
                    Self::addr(i)
                )),
            )?;
        }
        Ok(first)
    }

    /// Deletes pod `i`'s namespace (its veth goes with it).
    pub fn delete(&mut self, i: usize) -> Result<()> {
        if std::mem::replace(&mut self.alive[i], false) {
            run("ip", &["netns", "del", &self.netns_name(i)], None)?;
        }
        Ok(())
    }

    /// A command running `program` as `uid` (and GID `uid`) in pod `i`'s
    /// namespace (`None`: the hub's), in the fleet's cgroup.
    pub fn command(&self, pod: Option<usize>, uid: u32, program: &Path) -> Result<Command> {
        let ns = match pod {
            Some(i) => self.netns_name(i),
            None => self.hub(),
        };
        let netns = CString::new(PathBuf::from("/run/netns").join(ns).as_os_str().as_bytes())?;
        let procs = CString::new(self.cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
        let mut cmd = Command::new(program);
        crate::pod::enter(&mut cmd, Some(procs), netns, uid, uid);
        Ok(cmd)
    }

    /// Starts a sample server named `name` as `uid` in pod `pod` (`None`:
    /// the hub) on `listen`, with more `redirect-sample server` arguments; waits
    /// until it listens.
    pub fn start(
        &mut self,
        pod: Option<usize>,
        uid: u32,
        name: &str,
        listen: &[String],
        extra: &[&str],
    ) -> Result<()> {
        let mut cmd = self.command(pod, uid, &self.exe)?;
        cmd.arg("server").arg("--name").arg(name);
        for l in listen {
            cmd.arg("--listen").arg(l);
        }
        cmd.args(extra);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting sample server {name}"))?;
        let stdout = child.stdout.take().context("server stdout")?;
        self.children.push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("sample server {name} in pod {pod:?} did not start");
        }
        Ok(())
    }

    /// Starts the sample proxy (UID 1337) in pod `i` on 15001 and 15006.
    pub fn start_proxy(&mut self, i: usize) -> Result<()> {
        let listen = ["0.0.0.0:15001".to_string(), "0.0.0.0:15006".to_string()];
        self.start(Some(i), 1337, &format!("proxy-{i}"), &listen, &[])
    }

    /// Runs the sample client as `uid` in pod `i`, one connection to each
    /// of `targets`.
    pub fn connect(&self, i: usize, uid: u32, targets: &[String]) -> Result<Vec<ClientView>> {
        let mut cmd = self.command(Some(i), uid, &self.exe)?;
        cmd.arg("connect");
        for t in targets {
            cmd.arg("--to").arg(t);
        }
        let out = cmd.stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!(
                "sample client in pod {i}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("client printed {l:?}")))
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut batch = String::new();
        for (i, alive) in self.alive.iter().enumerate() {
            if *alive {
                batch.push_str(&format!("netns del {}\n", self.netns_name(i)));
            }
        }
        batch.push_str(&format!("netns del {}\n", self.hub()));
        // -force: go on past a namespace already gone.
        let _ = run("ip", &["-force", "-b", "-"], Some(&batch));
        for _ in 0..100 {
            match std::fs::remove_dir(&self.cgroup) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                Ok(()) => break,
            }
        }
    }
}

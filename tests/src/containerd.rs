//! A private containerd (Debian's, 1.6) for the tests: its own root, state
//! and socket under a temporary directory, the CRI plugin off, driven with
//! `ctr`. Its containers run in a cgroup of its own (ctr's default,
//! `/default/<id>`, would outlive the test). Dropping it stops the daemon
//! and removes the directory and the cgroups.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A running containerd.
pub struct Containerd {
    dir: PathBuf,
    child: Child,
    /// The cgroup its containers run below, relative to the hierarchies'
    /// roots.
    cgroup: String,
}

impl Containerd {
    /// Starts one and waits for its socket.
    pub fn start() -> Result<Containerd> {
        let name = format!(
            "rdt-ctrd-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = PathBuf::from("/tmp").join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n",
            d = dir.display()
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting containerd (is it installed? cargo xtask setup installs it)")?;
        let c = Containerd {
            dir,
            child,
            cgroup: name,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.socket().exists() {
            if Instant::now() > deadline {
                bail!("containerd did not start: {}", c.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(c)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr --address SOCK args`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("running ctr")
    }

    /// `ctr run --rm --cgroup /<ours>/<id> OPTIONS IMAGE ID ARGS`: a
    /// container run to its end, in this daemon's cgroup.
    pub fn run(&self, options: &[&str], image: &str, id: &str, args: &[&str]) -> Output {
        let cgroup = format!("/{}/{id}", self.cgroup);
        let mut all = vec!["run", "--rm", "--cgroup", &cgroup];
        all.extend_from_slice(options);
        all.extend([image, id]);
        all.extend_from_slice(args);
        self.ctr(&all)
    }

    /// `ctr images import FILE`.
    pub fn import(&self, archive: &Path) -> Result<()> {
        let out = self.ctr(&["images", "import", &archive.display().to_string()]);
        if !out.status.success() {
            bail!(
                "ctr images import: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        // Snapshots still mounted (a run that failed half-way) first.
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("root"))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
        remove_cgroup(&self.cgroup);
    }
}

/// Removes the cgroup `rel` (relative to the hierarchies' roots) and the
/// empty cgroups below it from the cgroup v2 hierarchy and every v1 one
/// (runc makes it in each, and removes only a container's own).
pub fn remove_cgroup(rel: &str) {
    fn remove(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    let mut roots: Vec<PathBuf> = redirect::fs::cgroup2_mount().into_iter().collect();
    if let Ok(v1) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(v1.flatten().map(|e| e.path()));
    }
    for root in roots {
        let dir = root.join(rel.trim_start_matches('/'));
        if dir != root && dir.is_dir() {
            remove(&dir);
        }
    }
}

//! A private containerd (Debian's, 1.6) for the tests: its own root, state
//! and socket under a temporary directory, the CRI plugin off, driven with
//! `ctr`. Dropping it stops the daemon and removes the directory.

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
}

impl Containerd {
    /// Starts one and waits for its socket.
    pub fn start() -> Result<Containerd> {
        let dir = PathBuf::from(format!(
            "/tmp/rdt-ctrd-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
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
        let c = Containerd { dir, child };
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
    }
}

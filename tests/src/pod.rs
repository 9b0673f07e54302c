//! A throwaway "pod" for the demo, the integration tests and the benchmarks:
//! its own network
//! namespace wired by a veth to a second namespace acting as the upstream
//! host, its own cgroup v2 subtree (`app/` and `proxy/` below it), and
//! helpers to start processes inside it as a given user. Everything is
//! removed on drop, also when a test panics.
//!
//! ```text
//!  pod netns  eth0 10.200.0.2/24 ──veth── eth0 10.200.0.1/24  upstream netns
//!                  fd00:200::2/64               fd00:200::1/64
//!             default via 10.200.0.1 /          lo: 10.201.0.1 .. 10.201.0.9
//!                         fd00:200::1               fd00:201::1 .. fd00:201::9
//! ```

use std::{
    ffi::CString,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use redirect::fs::cgroup2_mount;

use crate::{built_bin, peer::ClientView};

/// The pod's address.
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// The upstream host's address on the shared link.
pub const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// Extra upstream addresses `10.201.0.1 ..= 10.201.0.9` ("services" outside
/// the pod, reachable through the pod's default route).
pub fn upstream_extra(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, 0, i)
}
/// The pod's IPv6 address.
pub const POD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
/// The upstream host's IPv6 address on the shared link.
pub const UPSTREAM_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
/// Extra upstream IPv6 addresses `fd00:201::1 ..= fd00:201::9`.
pub fn upstream_extra6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, u16::from(i))
}
/// Number of extra upstream addresses.
pub const UPSTREAM_EXTRA: u8 = 9;

/// The pod's address on its second interface (`net1`, see
/// [`Pod::add_second_interface`]).
pub const NET1_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
/// The upstream host's address on the second link.
pub const NET1_UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 1);
/// An upstream address the pod reaches through `net1` (10.210.0.0/16 is
/// routed there), not through its default route.
pub const NET1_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 1);
/// A more specific route inside 10.210.0.0/16 that leaves through `eth0`.
pub const NET1_HOLE: Ipv4Addr = Ipv4Addr::new(10, 210, 7, 1);
/// The pod's IPv6 address on `net1`.
pub const NET1_POD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0, 2);
/// The upstream host's IPv6 address on the second link.
pub const NET1_UPSTREAM_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0, 1);
/// An upstream IPv6 address routed through `net1` (fd00:210::/64).
pub const NET1_REMOTE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 1);

/// The sample peers' binary (`tests/src/bin/redirect-sample.rs`), which
/// [`Pod::start_server`] and [`Pod::connect`] run inside the pod.
pub fn sample_bin() -> Result<PathBuf> {
    built_bin("redirect-sample")
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Who a process in the pod runs as, and in which part of the pod's cgroup.
#[derive(Clone, Copy, Debug)]
pub struct As {
    /// UID.
    pub uid: u32,
    /// Primary GID.
    pub gid: u32,
    /// Sub-cgroup of the pod (`"app"` or `"proxy"`), or `None` for none (stay
    /// where the caller is, outside the pod's cgroup).
    pub cgroup: Option<&'static str>,
}

impl As {
    /// The proxy: UID/GID 1337 in `proxy/`.
    pub const PROXY: As = As {
        uid: 1337,
        gid: 1337,
        cgroup: Some("proxy"),
    };
    /// Outside the pod's cgroup, as root (the upstream host's servers).
    pub const PROXY_LESS: As = As {
        uid: 0,
        gid: 0,
        cgroup: None,
    };
    /// An application: UID/GID 1000 in `app/`.
    pub const APP: As = As {
        uid: 1000,
        gid: 1000,
        cgroup: Some("app"),
    };
}

/// Which namespace to run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The pod.
    Pod,
    /// The upstream host.
    Upstream,
}

/// A throwaway pod. Dropping it kills its processes and removes its
/// namespaces and cgroups.
#[derive(Debug)]
pub struct Pod {
    /// Unique name (also of the namespaces, with `-pod` / `-up`).
    pub name: String,
    /// The pod's cgroup v2 directory (attach here).
    pub cgroup: PathBuf,
    children: Vec<(String, Child)>,
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Pod {
    /// Creates a pod named `<prefix>-<pid>-<n>`.
    pub fn create(prefix: &str) -> Result<Pod> {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let cg2 = cgroup2_mount().context("no cgroup v2 hierarchy is mounted")?;
        let mut pod = Pod {
            cgroup: cg2.join(&name),
            name,
            children: Vec::new(),
        };
        // From here on, Drop cleans whatever was created.
        pod.setup()?;
        Ok(pod)
    }

    fn setup(&mut self) -> Result<()> {
        let (p, u) = (self.netns_name(Side::Pod), self.netns_name(Side::Upstream));
        run("ip", &["netns", "add", &p])?;
        run("ip", &["netns", "add", &u])?;
        run(
            "ip",
            &[
                "-n", &p, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
                &u,
            ],
        )?;
        for (ns, addr, addr6) in [(&p, POD_IP, POD_IP6), (&u, UPSTREAM_IP, UPSTREAM_IP6)] {
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            // nodad: usable at once, no duplicate address detection wait.
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "-6",
                    "addr",
                    "add",
                    &format!("{addr6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        }
        run(
            "ip",
            &[
                "-n",
                &p,
                "route",
                "add",
                "default",
                "via",
                &UPSTREAM_IP.to_string(),
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &p,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &UPSTREAM_IP6.to_string(),
            ],
        )?;
        for i in 1..=UPSTREAM_EXTRA {
            let a = format!("{}/32", upstream_extra(i));
            run("ip", &["-n", &u, "addr", "add", &a, "dev", "lo"])?;
            let a6 = format!("{}/128", upstream_extra6(i));
            run(
                "ip",
                &["-n", &u, "-6", "addr", "add", &a6, "dev", "lo", "nodad"],
            )?;
        }
        for dir in [
            self.cgroup.clone(),
            self.cgroup.join("app"),
            self.cgroup.join("proxy"),
        ] {
            std::fs::create_dir(&dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
        Ok(())
    }

    /// Gives the pod a second interface, `net1` (as Multus would), linked to
    /// the upstream host: [`NET1_POD_IP`]/24 and [`NET1_POD_IP6`]/64 on it,
    /// 10.210.0.0/16 and fd00:210::/64 routed through it, but
    /// 10.210.7.0/24 ([`NET1_HOLE`]) back through `eth0`. The upstream host
    /// owns [`NET1_REMOTE`], [`NET1_HOLE`] and [`NET1_REMOTE6`].
    pub fn add_second_interface(&self) -> Result<()> {
        let (p, u) = (self.netns_name(Side::Pod), self.netns_name(Side::Upstream));
        run(
            "ip",
            &[
                "-n", &p, "link", "add", "net1", "type", "veth", "peer", "name", "net1", "netns",
                &u,
            ],
        )?;
        for (ns, addr, addr6) in [
            (&p, NET1_POD_IP, NET1_POD_IP6),
            (&u, NET1_UPSTREAM_IP, NET1_UPSTREAM_IP6),
        ] {
            let (a4, a6) = (format!("{addr}/24"), format!("{addr6}/64"));
            run("ip", &["-n", ns, "addr", "add", &a4, "dev", "net1"])?;
            run(
                "ip",
                &["-n", ns, "-6", "addr", "add", &a6, "dev", "net1", "nodad"],
            )?;
            run("ip", &["-n", ns, "link", "set", "net1", "up"])?;
        }
        let (via, via6) = (NET1_UPSTREAM_IP.to_string(), NET1_UPSTREAM_IP6.to_string());
        run(
            "ip",
            &[
                "-n",
                &p,
                "route",
                "add",
                "10.210.0.0/16",
                "via",
                &via,
                "dev",
                "net1",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &p,
                "route",
                "add",
                "10.210.7.0/24",
                "via",
                &UPSTREAM_IP.to_string(),
                "dev",
                "eth0",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &p,
                "-6",
                "route",
                "add",
                "fd00:210::/64",
                "via",
                &via6,
                "dev",
                "net1",
            ],
        )?;
        for a in [format!("{NET1_REMOTE}/32"), format!("{NET1_HOLE}/32")] {
            run("ip", &["-n", &u, "addr", "add", &a, "dev", "lo"])?;
        }
        let a6 = format!("{NET1_REMOTE6}/128");
        run(
            "ip",
            &["-n", &u, "-6", "addr", "add", &a6, "dev", "lo", "nodad"],
        )?;
        Ok(())
    }

    /// `ip netns` name of a side.
    pub fn netns_name(&self, side: Side) -> String {
        match side {
            Side::Pod => format!("{}-pod", self.name),
            Side::Upstream => format!("{}-up", self.name),
        }
    }

    /// The namespace file of a side (for `--netns`).
    pub fn netns_path(&self, side: Side) -> PathBuf {
        PathBuf::from("/run/netns").join(self.netns_name(side))
    }

    /// A command that runs `exe args` in `side`'s namespace as `who`. Joins
    /// the cgroup first, then the namespace (no `ip netns exec`: it would
    /// remount /sys and hide bpffs and cgroupfs).
    pub fn command(&self, side: Side, who: As, program: &Path) -> Result<Command> {
        let netns = CString::new(self.netns_path(side).as_os_str().as_bytes())?;
        let procs = match who.cgroup {
            Some(sub) => Some(CString::new(
                self.cgroup
                    .join(sub)
                    .join("cgroup.procs")
                    .as_os_str()
                    .as_bytes(),
            )?),
            None => None,
        };
        let mut cmd = Command::new(program);
        enter(&mut cmd, procs, netns, who.uid, who.gid);
        Ok(cmd)
    }

    /// Starts a sample server named `name` on `listen` addresses and waits
    /// until it is listening. It lives until the pod is dropped.
    pub fn start_server(&mut self, side: Side, who: As, name: &str, listen: &[&str]) -> Result<()> {
        self.start_server_with(side, who, name, listen, &[])
    }

    /// [`Pod::start_server`] with more `redirect-sample server` arguments
    /// (`extra`).
    pub fn start_server_with(
        &mut self,
        side: Side,
        who: As,
        name: &str,
        listen: &[&str],
        extra: &[&str],
    ) -> Result<()> {
        let mut cmd = self.command(side, who, &sample_bin()?)?;
        cmd.arg("server").arg("--name").arg(name);
        for l in listen {
            cmd.arg("--listen").arg(l);
        }
        cmd.args(extra);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting sample server {name}"))?;
        let stdout = child.stdout.take().context("server stdout")?;
        self.children.push((name.to_string(), child));
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let (_, mut child) = self.children.pop().expect("pushed above");
            let _ = child.kill();
            let out = child.wait_with_output();
            let err = out.map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string());
            bail!(
                "sample server {name} did not start: {}",
                err.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Kills every sample server started so far (the tests use it to take
    /// the proxy down).
    pub fn stop_servers(&mut self) {
        for (_, mut c) in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the sample servers named `name` (e.g. to restart the proxy).
    pub fn stop_server(&mut self, name: &str) {
        let (gone, kept): (Vec<_>, Vec<_>) = self.children.drain(..).partition(|(n, _)| n == name);
        self.children = kept;
        for (_, mut c) in gone {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs the sample client in the pod as `who`, connecting to `to`.
    pub fn connect(&self, who: As, to: &str, bind: Option<&str>) -> Result<ClientView> {
        self.connect_from(Side::Pod, who, to, bind)
    }

    /// Runs the sample client on `side` as `who`, connecting to `to`.
    pub fn connect_from(
        &self,
        side: Side,
        who: As,
        to: &str,
        bind: Option<&str>,
    ) -> Result<ClientView> {
        let mut views = self.connect_many(side, who, &[to], bind)?;
        views.pop().context("the sample client printed nothing")
    }

    /// Runs one sample client on `side` as `who` that connects to each of
    /// `targets` in turn; one view per target, in order.
    pub fn connect_many(
        &self,
        side: Side,
        who: As,
        targets: &[&str],
        bind: Option<&str>,
    ) -> Result<Vec<ClientView>> {
        self.connect_many_marked(side, who, targets, bind, None)
    }

    /// [`Pod::connect_many`], with `SO_MARK` `mark` set on every socket
    /// (`who` must be allowed to set it: root).
    pub fn connect_many_marked(
        &self,
        side: Side,
        who: As,
        targets: &[&str],
        bind: Option<&str>,
        mark: Option<u32>,
    ) -> Result<Vec<ClientView>> {
        let mut extra: Vec<String> = Vec::new();
        if let Some(b) = bind {
            extra.extend(["--bind".to_string(), b.to_string()]);
        }
        if let Some(m) = mark {
            extra.extend(["--mark".to_string(), m.to_string()]);
        }
        self.run_client(side, who, targets, &extra)
    }

    /// Connects from the pod as `who` with `SO_MARK` `mark` set on the
    /// socket (`who` must be allowed to set it: root).
    pub fn connect_marked(&self, who: As, to: &str, mark: u32) -> Result<ClientView> {
        let extra = ["--mark".to_string(), mark.to_string()];
        let mut v = self.run_client(Side::Pod, who, &[to], &extra)?;
        v.pop().context("the sample client printed nothing")
    }

    /// Runs the sample client in the pod as `who`, connecting to `to`, with
    /// more `redirect-sample connect` arguments (`extra`).
    pub fn connect_with(&self, who: As, to: &str, extra: &[&str]) -> Result<ClientView> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut v = self.run_client(Side::Pod, who, &[to], &extra)?;
        v.pop().context("the sample client printed nothing")
    }

    fn run_client(
        &self,
        side: Side,
        who: As,
        targets: &[&str],
        extra: &[String],
    ) -> Result<Vec<ClientView>> {
        let mut cmd = self.command(side, who, &sample_bin()?)?;
        cmd.arg("connect");
        for to in targets {
            cmd.arg("--to").arg(to);
        }
        cmd.args(extra);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .context("running the sample client")?;
        if !out.status.success() {
            bail!(
                "sample client failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let views = text
            .lines()
            .map(|l| {
                serde_json::from_str(l).with_context(|| format!("sample client printed {l:?}"))
            })
            .collect::<Result<Vec<ClientView>>>()?;
        if views.len() != targets.len() {
            bail!(
                "sample client answered {} of {} connections",
                views.len(),
                targets.len()
            );
        }
        Ok(views)
    }
}

/// Makes `cmd` join the cgroup whose `cgroup.procs` file is `procs` (if
/// any), then the network namespace file `netns`, then drop to `uid` and
/// `gid`, before it runs its program. (Not `ip netns exec`: it would remount
/// /sys and hide bpffs and cgroupfs.)
pub fn enter(cmd: &mut Command, procs: Option<CString>, netns: CString, uid: u32, gid: u32) {
    // SAFETY: only async-signal-safe libc calls on data prepared above.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return fail();
                }
                // "0" moves the writing process itself.
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if !ok {
                    return fail();
                }
            }
            let fd = libc::open(netns.as_ptr(), libc::O_RDONLY);
            if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return fail();
            }
            libc::close(fd);
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return fail();
            }
            Ok(())
        });
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.stop_servers();
        // Innermost first; a cgroup whose last process just died can stay
        // busy for a moment.
        for dir in [
            self.cgroup.join("app"),
            self.cgroup.join("proxy"),
            self.cgroup.clone(),
        ] {
            for _ in 0..50 {
                match std::fs::remove_dir(&dir) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    Ok(()) => break,
                }
            }
        }
        for side in [Side::Pod, Side::Upstream] {
            let _ = run("ip", &["netns", "del", &self.netns_name(side)]);
        }
    }
}

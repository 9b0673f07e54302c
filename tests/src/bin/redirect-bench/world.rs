//! One method's world: a throwaway pod with the bench proxy running in it,
//! and the policy of one size programmed the method's way. Everything it
//! creates (processes, rules, pins, files, namespaces, cgroups) goes away on
//! drop, also on an error or an interrupt.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use redirect_tests::pod::{As, Pod, Side, upstream_extra};
use serde::Serialize;

use crate::peer::{ClientReport, ProxyMode, schedstat_ns};

/// The address the application asks for when a policy captures it.
pub fn captured_target() -> SocketAddr {
    SocketAddr::from((upstream_extra(1), 80))
}

/// The proxy's address, where "direct" connects.
pub const DIRECT_TARGET: &str = "127.0.0.1:15001";

/// How outbound connections reach the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// No hook: the app connects to the proxy's port itself.
    Direct,
    /// istio-style `nat OUTPUT` rules, `iptables-legacy-restore`.
    IptablesLegacy,
    /// The same rules through `iptables-nft-restore`.
    IptablesNft,
    /// `redirect apply`.
    Redirect,
}

impl Method {
    /// Every method, in report order.
    pub const ALL: [Method; 4] = [
        Method::Direct,
        Method::IptablesLegacy,
        Method::IptablesNft,
        Method::Redirect,
    ];

    /// Stable name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Direct => "direct",
            Method::IptablesLegacy => "iptables-legacy",
            Method::IptablesNft => "iptables-nft",
            Method::Redirect => "redirect",
        }
    }

    /// The `iptables-*-restore` of an iptables method.
    pub fn restore_bin(self) -> Option<&'static str> {
        match self {
            Method::IptablesLegacy => Some("iptables-legacy-restore"),
            Method::IptablesNft => Some("iptables-nft-restore"),
            _ => None,
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM/SIGHUP set a flag instead of killing the harness, so the
/// guards get to clean up.
pub fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Fails once a signal asked the harness to stop.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes a file on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Removes a pin dir on drop (`redirect remove`, then by hand).
struct PinGuard {
    dir: PathBuf,
    redirect: PathBuf,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = Command::new(&self.redirect)
                .arg("remove")
                .arg("--pin-dir")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if self.dir.exists() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Paths of the programs the harness runs.
#[derive(Clone, Debug)]
pub struct Tools {
    /// This binary (proxy and client).
    pub bench: PathBuf,
    /// The `redirect` binary.
    pub redirect: PathBuf,
    /// The CPU the proxy and the client are pinned to (both on one CPU, so
    /// that where the scheduler puts them does not vary between runs).
    pub cpu: Option<usize>,
}

/// Pins the process `cmd` starts to `cpu`.
pub fn pin(cmd: &mut Command, cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    use std::os::unix::process::CommandExt as _;
    // SAFETY: only async-signal-safe libc calls on a local cpu_set_t.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A pod, its proxy and its policy. Field order is drop order: the proxy
/// dies before its cgroup goes, the pins before the pod.
pub struct World {
    proxy: Option<Proc>,
    pins: Option<PinGuard>,
    list_file: Option<TempFile>,
    /// The pod.
    pub pod: Pod,
    /// Its method.
    pub method: Method,
    tools: Tools,
}

/// N exclusion CIDRs, distinct /24s in 11.0.0.0/8 and up, none of which
/// covers the pod, the upstream or loopback, so iptables walks them all.
pub fn exclusion_cidrs(n: usize) -> Vec<String> {
    (0..n as u32)
        .map(|i| format!("{}.{}.{}.0/24", 11 + i / 65_536, (i / 256) % 256, i % 256))
        .collect()
}

/// The first of the other services' addresses: Kubernetes' default
/// ClusterIP range, 10.96.0.0/12, which holds 1,048,576 addresses, all
/// below the target's 10.201.0.1.
const SERVICE_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);

/// N services other than the target (`10.96.0.1:80`, `10.96.0.2:80`, ...),
/// then the target, last. `redirect iptables` sorts services by address;
/// these all sort below the target, so its rule stays the last one.
pub fn services(n: usize) -> Vec<SocketAddr> {
    assert!(n < (1 << 20) - 1, "10.96.0.0/12 holds the services");
    let mut v: Vec<SocketAddr> = (0..n as u32)
        .map(|i| SocketAddr::from((Ipv4Addr::from(SERVICE_BASE + 1 + i), 80)))
        .collect();
    v.push(captured_target());
    v
}

/// A policy, ready to program every method's way.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Entries besides the target (exclusion CIDRs, or other services).
    pub size: usize,
    /// `redirect apply` flags besides the list file.
    redirect_flags: Vec<String>,
    /// The flag that takes the list file.
    file_flag: &'static str,
    /// The list, one entry per line.
    list: String,
    /// `iptables-restore` input for the same policy.
    iptables: String,
}

impl Policy {
    /// istio's `-i '*'` with `n` exclusion CIDRs (`exclusion_cidrs`).
    pub fn exclusions(n: usize) -> Policy {
        let cidrs = exclusion_cidrs(n);
        let mut list = String::with_capacity(20 * n);
        for c in &cidrs {
            list.push_str(c);
            list.push('\n');
        }
        Policy {
            size: n,
            redirect_flags: vec!["-i".into(), "*".into()],
            file_flag: "--exclude-cidrs-file",
            list,
            iptables: istio_rules(&cidrs),
        }
    }

    /// No `-i`: only `services(n)` (n others, then the target) captured,
    /// one map entry each. The iptables rules are `redirect iptables
    /// --family 4 --services-file` for the same list: one `-A ISTIO_OUTPUT
    /// -d IP/32 -p tcp --dport P -j ISTIO_REDIRECT` per service, the
    /// target's last, so iptables walks all n others before it matches.
    pub fn services(n: usize, tools: &Tools) -> Result<Policy> {
        let svcs = services(n);
        let mut list = String::with_capacity(20 * svcs.len());
        list.push_str("# redirect-bench: other services, then the target\n");
        for s in &svcs {
            list.push_str(&s.to_string());
            list.push('\n');
        }
        let file = TempFile(std::env::temp_dir().join(format!(
            "redirect-bench-{}-services-{n}",
            std::process::id()
        )));
        std::fs::write(&file.0, &list)?;
        let out = Command::new(&tools.redirect)
            .args(["iptables", "--family", "4", "--services-file"])
            .arg(&file.0)
            .stdin(Stdio::null())
            .output()
            .context("running redirect iptables")?;
        if !out.status.success() {
            bail!(
                "redirect iptables: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let iptables = String::from_utf8(out.stdout).context("redirect iptables output")?;
        // The rules must be the ones described: one per service, the
        // target's last.
        let target = captured_target();
        let want_last = format!(
            "-A ISTIO_OUTPUT -d {}/32 -p tcp --dport {} -j ISTIO_REDIRECT",
            target.ip(),
            target.port()
        );
        let output_rules: Vec<&str> = iptables
            .lines()
            .filter(|l| l.starts_with("-A ISTIO_OUTPUT "))
            .collect();
        let per_service = output_rules
            .iter()
            .filter(|l| l.contains("-p tcp --dport") && l.ends_with("-j ISTIO_REDIRECT"))
            .count();
        anyhow::ensure!(
            output_rules.last() == Some(&want_last.as_str()) && per_service == svcs.len(),
            "redirect iptables did not render {} service rules ending with the target's \
             ({per_service} rules, last {:?})",
            svcs.len(),
            output_rules.last()
        );
        Ok(Policy {
            size: n,
            redirect_flags: Vec::new(),
            file_flag: "--services-file",
            list,
            iptables,
        })
    }
}

/// The istio-iptables `nat` table for `-i '*'` with default ports, owners
/// 1337, and `cidrs` excluded (as `ISTIO_OUTPUT ... RETURN` rules in front of
/// the capture rule), in iptables-restore form.
pub fn istio_rules(cidrs: &[String]) -> String {
    let mut s = String::with_capacity(64 * cidrs.len() + 2048);
    s.push_str(
        "*nat\n\
         :PREROUTING ACCEPT [0:0]\n\
         :INPUT ACCEPT [0:0]\n\
         :OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n\
         :ISTIO_INBOUND - [0:0]\n\
         :ISTIO_REDIRECT - [0:0]\n\
         :ISTIO_IN_REDIRECT - [0:0]\n\
         :ISTIO_OUTPUT - [0:0]\n\
         -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN\n\
         -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n\
         -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n\
         -A OUTPUT -j ISTIO_OUTPUT\n\
         -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN\n\
         -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT\n\
         -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN\n\
         -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n\
         -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT\n\
         -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN\n\
         -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN\n\
         -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n",
    );
    for c in cidrs {
        s.push_str("-A ISTIO_OUTPUT -d ");
        s.push_str(c);
        s.push_str(" -j RETURN\n");
    }
    s.push_str("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n");
    s
}

/// An empty `nat` table: restoring it flushes and deletes every chain.
pub const EMPTY_NAT: &str = "*nat\n\
     :PREROUTING ACCEPT [0:0]\n\
     :INPUT ACCEPT [0:0]\n\
     :OUTPUT ACCEPT [0:0]\n\
     :POSTROUTING ACCEPT [0:0]\n\
     COMMIT\n";

/// Runs `cmd` to completion, failing with its stderr.
pub fn run_ok(mut cmd: Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Starts the bench proxy with `cmd` (a command running this binary where
/// the proxy belongs: namespace, cgroup, user), pinned to `cpu`, and waits
/// until it listens.
pub fn start_proxy(mut cmd: Command, mode: ProxyMode, cpu: Option<usize>) -> Result<Proc> {
    cmd.arg("proxy")
        .arg("--mode")
        .arg(match mode {
            ProxyMode::Setup => "setup",
            ProxyMode::Echo => "echo",
        })
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    pin(&mut cmd, cpu);
    let mut child = Proc(cmd.spawn().context("starting the bench proxy")?);
    let stdout = child.0.stdout.take().context("proxy stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("the bench proxy did not start");
    }
    Ok(child)
}

/// Runs the bench client with `cmd` (a command running this binary as the
/// application, where it belongs) to `to` with `args`, pinned to `cpu`, and
/// returns its report, with the CPU time `proxy` spent meanwhile. Killed if
/// it outlives `limit` or the harness is interrupted.
pub fn run_client(
    mut cmd: Command,
    to: SocketAddr,
    args: &[String],
    proxy: Option<&Proc>,
    cpu: Option<usize>,
    limit: Duration,
) -> Result<ClientReport> {
    check_interrupted()?;
    cmd.arg("client")
        .arg("--to")
        .arg(to.to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    pin(&mut cmd, cpu);
    let proxy_stat = proxy.map(|p| format!("/proc/{}/schedstat", p.0.id()));
    let proxy_cpu0 = proxy_stat.as_deref().map_or(0, schedstat_ns);
    let mut child = Proc(cmd.spawn().context("starting the bench client")?);
    let t = Instant::now();
    loop {
        if child.0.try_wait()?.is_some() {
            break;
        }
        check_interrupted()?;
        if t.elapsed() > limit {
            bail!("the bench client ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read as _;
    if let Some(mut o) = child.0.stdout.take() {
        o.read_to_string(&mut out)?;
    }
    if let Some(mut e) = child.0.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    let status = child.0.wait()?;
    if !status.success() {
        bail!("bench client failed ({status}): {}", err.trim());
    }
    let mut rep: ClientReport =
        serde_json::from_str(out.trim()).with_context(|| format!("client printed {out:?}"))?;
    rep.proxy_cpu_ns = proxy_stat
        .as_deref()
        .map_or(0, schedstat_ns)
        .saturating_sub(proxy_cpu0);
    Ok(rep)
}

/// Feeds `rules` to `cmd`, an `iptables-*-restore` (`bin`) run in a pod's
/// namespace; returns the wall time of the process.
pub fn restore(mut cmd: Command, bin: &str, rules: &str) -> Result<Duration> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {bin}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(rules.as_bytes())?;
    drop(stdin);
    let out = child.wait_with_output()?;
    let d = t.elapsed();
    if !out.status.success() {
        bail!("{bin}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(d)
}

impl World {
    /// A fresh pod with the proxy running, nothing programmed yet.
    /// `port_range` narrows the pod's ephemeral port range.
    pub fn new(
        method: Method,
        tools: &Tools,
        mode: ProxyMode,
        port_range: Option<(u16, u16)>,
    ) -> Result<World> {
        check_interrupted()?;
        let pod = Pod::create("rbench")?;
        let mut w = World {
            proxy: None,
            pins: None,
            list_file: None,
            pod,
            method,
            tools: tools.clone(),
        };
        if let Some((lo, hi)) = port_range {
            let mut cmd = w.root_cmd("sysctl")?;
            cmd.arg("-q")
                .arg("-w")
                .arg(format!("net.ipv4.ip_local_port_range={lo} {hi}"));
            run_ok(cmd, "sysctl ip_local_port_range")?;
        }
        let cmd = w.pod.command(Side::Pod, As::PROXY, &w.tools.bench)?;
        w.proxy = Some(start_proxy(cmd, mode, w.tools.cpu)?);
        Ok(w)
    }

    /// Stops the bench proxy (to put another on its ports).
    pub fn stop_proxy(&mut self) {
        self.proxy = None;
    }

    /// A command run as root in the pod's network namespace (no cgroup).
    pub fn root_cmd(&self, program: &str) -> Result<Command> {
        self.pod
            .command(Side::Pod, As::PROXY_LESS, Path::new(program))
    }

    /// Where the application connects under this method.
    pub fn target(&self) -> SocketAddr {
        match self.method {
            Method::Direct => DIRECT_TARGET.parse().expect("valid"),
            _ => captured_target(),
        }
    }

    /// The pin dir, for `redirect`.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(&self.pod.name)
    }

    /// Programs `policy`; returns the wall time of the one process that
    /// does it (`iptables-*-restore` or `redirect apply`), or `None` for
    /// `direct`.
    pub fn apply(&mut self, policy: &Policy) -> Result<Option<Duration>> {
        check_interrupted()?;
        match self.method {
            Method::Direct => Ok(None),
            Method::IptablesLegacy | Method::IptablesNft => {
                self.restore(&policy.iptables).map(Some)
            }
            Method::Redirect => {
                let file = std::env::temp_dir().join(format!("{}-list", self.pod.name));
                std::fs::write(&file, &policy.list)?;
                self.list_file = Some(TempFile(file.clone()));
                self.pins = Some(PinGuard {
                    dir: self.pin_dir(),
                    redirect: self.tools.redirect.clone(),
                });
                let mut cmd = Command::new(&self.tools.redirect);
                cmd.arg("apply")
                    .arg("--cgroup")
                    .arg(&self.pod.cgroup)
                    .arg("--netns")
                    .arg(self.pod.netns_path(Side::Pod))
                    .arg("--pin-dir")
                    .arg(self.pin_dir())
                    .args(&policy.redirect_flags)
                    .arg(policy.file_flag)
                    .arg(&file);
                let t = Instant::now();
                run_ok(cmd, "redirect apply")?;
                Ok(Some(t.elapsed()))
            }
        }
    }

    /// Removes the policy; returns the wall time of the process that did it.
    pub fn remove(&mut self) -> Result<Option<Duration>> {
        match self.method {
            Method::Direct => Ok(None),
            Method::IptablesLegacy | Method::IptablesNft => self.restore(EMPTY_NAT).map(Some),
            Method::Redirect => {
                let mut cmd = Command::new(&self.tools.redirect);
                cmd.arg("remove").arg("--pin-dir").arg(self.pin_dir());
                let t = Instant::now();
                run_ok(cmd, "redirect remove")?;
                let d = t.elapsed();
                self.pins = None;
                self.list_file = None;
                Ok(Some(d))
            }
        }
    }

    fn restore(&self, rules: &str) -> Result<Duration> {
        let bin = self.method.restore_bin().expect("an iptables method");
        restore(self.root_cmd(bin)?, bin, rules)
    }

    /// Runs the bench client in the pod as the application (UID 1000 in
    /// `app/`) with `args`, and returns its report. Killed if it outlives
    /// `limit` or the harness is interrupted.
    pub fn client(&self, args: &[String], limit: Duration) -> Result<ClientReport> {
        let cmd = self.pod.command(Side::Pod, As::APP, &self.tools.bench)?;
        run_client(
            cmd,
            self.target(),
            args,
            self.proxy.as_ref(),
            self.tools.cpu,
            limit,
        )
    }

    /// A file under `/proc/sys` as seen from the pod's network namespace.
    pub fn proc_sys(&self, rel: &str) -> Option<String> {
        let mut cmd = self.root_cmd("cat").ok()?;
        cmd.arg(format!("/proc/{rel}"));
        let out = cmd.stdin(Stdio::null()).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// TIME_WAIT sockets in the pod (`/proc/net/sockstat`).
    pub fn time_wait(&self) -> Option<u64> {
        let s = self.proc_sys("net/sockstat")?;
        let line = s.lines().find(|l| l.starts_with("TCP:"))?;
        let mut it = line.split_whitespace();
        while let Some(w) = it.next() {
            if w == "tw" {
                return it.next()?.parse().ok();
            }
        }
        None
    }

    /// Conntrack entries of the pod's namespace.
    pub fn conntrack_count(&self) -> Option<u64> {
        self.proc_sys("sys/net/netfilter/nf_conntrack_count")?
            .parse()
            .ok()
    }

    /// `redirect status --json`.
    pub fn status_json(&self) -> Result<serde_json::Value> {
        let out = Command::new(&self.tools.redirect)
            .arg("status")
            .arg("--json")
            .arg("--pin-dir")
            .arg(self.pin_dir())
            .output()?;
        if !out.status.success() {
            bail!(
                "redirect status: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

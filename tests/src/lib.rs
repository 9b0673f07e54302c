//! Harness for the real-kernel integration tests in `tests/tests/`, and the
//! test fixtures the demo (`redirect-demo`) and the benchmarks
//! (`redirect-bench`) share with them: throwaway pods ([`pod`]) and the
//! sample peers ([`peer`], run as the `redirect-sample` binary). None of
//! this is in the `redirect` crate, which ships.
//!
//! Each test builds its own [`Fixture`]: a throwaway pod (netns + veth to an
//! upstream netns, its own cgroup), a sample proxy running as UID 1337 on
//! 15001/15006, sample upstream services, a pin dir of its own, and the real
//! `redirect` binary to apply policies. Dropping the fixture removes pins,
//! processes, namespaces and cgroups, also when the test panics.
//!
//! Tests need root and a kernel with cgroup BPF hooks. Without root they fail
//! under `CI=true`, and on a developer's machine they print that they are
//! skipped and pass.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::Context as _;
use redirect::layout::DEFAULT_PIN_ROOT;

use crate::{
    peer::ClientView,
    pod::{
        As, Pod, Side, UPSTREAM_EXTRA, UPSTREAM_IP, UPSTREAM_IP6, upstream_extra, upstream_extra6,
    },
};

pub mod containerd;
pub mod cri;
pub mod dns;
pub mod fleet;
pub mod haproxy;
pub mod peer;
pub mod pod;

/// Whether the tests can run here. Panics under `CI=true` when they cannot.
pub fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("integration tests need root (CI=true, so this is a failure, not a skip)");
    }
    eprintln!("SKIPPED: not root; the real-kernel tests need root (they would fail under CI=true)");
    false
}

/// Whether the suites run in node mode (`REDIRECT_TEST_MODE=node`, set by
/// `cargo xtask test` for its second pass): [`Fixture::apply`] then installs
/// a node on the pod's cgroup and registers the pod with `pod add`, and
/// [`Fixture::status`] reads the node's status.
pub fn node_mode() -> bool {
    std::env::var("REDIRECT_TEST_MODE").is_ok_and(|m| m == "node")
}

/// The `redirect` binary under test: `$REDIRECT_BIN` (set by `cargo xtask
/// test`), else `target/debug/redirect` next to the test executable.
pub fn redirect_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REDIRECT_BIN") {
        return PathBuf::from(p);
    }
    built_bin("redirect").unwrap_or_else(|e| panic!("{e:#}: run the tests with `cargo xtask test`"))
}

/// The build's target directory: `$CARGO_TARGET_DIR`, else the workspace's
/// `target/` (where `cargo xtask` writes the images and the tools
/// virtualenv).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("the tests crate is in the workspace")
                .join("target")
        })
}

/// The workspace binary `name` of the running build: next to the running
/// executable (a binary, `target/<profile>/`) or one directory up (a test
/// executable, `target/<profile>/deps/`).
pub fn built_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("own executable path")?;
    let dir = exe.parent().context("own executable's directory")?;
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .with_context(|| format!("{name} not built (looked next to {})", exe.display()))
}

/// Removes [`DEFAULT_PIN_ROOT`] when dropped if it did not exist when the
/// guard was made and is empty by then: for the demo and the tests, which
/// apply with default pin dirs and must leave nothing behind. (`apply` and
/// `remove` leave the root in place: another pod may be creating its pin
/// dir in it.)
pub struct DefaultRootCleanup {
    created_here: bool,
}

#[allow(clippy::new_without_default)] // notes the state of the machine now
impl DefaultRootCleanup {
    /// Notes whether the root exists now.
    pub fn new() -> DefaultRootCleanup {
        DefaultRootCleanup {
            created_here: !Path::new(DEFAULT_PIN_ROOT).exists(),
        }
    }
}

impl Drop for DefaultRootCleanup {
    fn drop(&mut self) {
        if self.created_here {
            // Fails, harmlessly, if anything is left in it.
            let _ = std::fs::remove_dir(DEFAULT_PIN_ROOT);
        }
    }
}

/// Service ports upstream listens on (on every upstream address).
pub const UPSTREAM_PORTS: [u16; 3] = [80, 81, 82];
/// Port of the application's own server inside the pod.
pub const APP_PORT: u16 = 8080;

/// One test's world.
pub struct Fixture {
    /// The pod.
    pub pod: Pod,
    /// This test's pin dir.
    pub pin_dir: PathBuf,
}

#[allow(clippy::new_without_default)] // creating a pod is not a default value
impl Fixture {
    /// A pod with upstream services on [`UPSTREAM_PORTS`] of every upstream
    /// address, the sample proxy (UID 1337) on 15001 and 15006, and an app
    /// server (UID 1000) on [`APP_PORT`] inside the pod.
    pub fn new() -> Fixture {
        let mut f = Fixture::without_proxy();
        f.start_proxy();
        f
    }

    /// [`Fixture::new`] without the sample proxy: ports 15001 and 15006 are
    /// free for another proxy (HAProxy, in `tests/tests/haproxy.rs`).
    pub fn without_proxy() -> Fixture {
        let pod = Pod::create("rdt").expect("creating the test pod");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&pod.name);
        let mut f = Fixture { pod, pin_dir };
        let mut upstream: Vec<String> = Vec::new();
        for port in UPSTREAM_PORTS {
            upstream.push(format!("{UPSTREAM_IP}:{port}"));
            upstream.push(format!("[{UPSTREAM_IP6}]:{port}"));
            for i in 1..=UPSTREAM_EXTRA {
                upstream.push(format!("{}:{port}", upstream_extra(i)));
                upstream.push(format!("[{}]:{port}", upstream_extra6(i)));
            }
        }
        let refs: Vec<&str> = upstream.iter().map(String::as_str).collect();
        f.pod
            .start_server(Side::Upstream, As::PROXY_LESS, "upstream", &refs)
            .expect("upstream server");
        f.pod
            .start_server(
                Side::Pod,
                As::APP,
                "app",
                &[&format!("0.0.0.0:{APP_PORT}"), &format!("[::]:{APP_PORT}")],
            )
            .expect("app server");
        f
    }

    /// Starts the sample proxy (UID 1337, `proxy/` cgroup) on 15001 and
    /// 15006, IPv4 and IPv6.
    pub fn start_proxy(&mut self) {
        self.pod
            .start_server(
                Side::Pod,
                As::PROXY,
                "proxy",
                &["0.0.0.0:15001", "0.0.0.0:15006", "[::]:15001", "[::]:15006"],
            )
            .expect("proxy server");
    }

    /// Replaces the sample proxy by one on 15001 only (IPv4 and IPv6) with
    /// more `redirect-sample server` arguments (`extra`), e.g. to make it ask
    /// `SO_ORIGINAL_DST` late.
    pub fn restart_outbound_proxy_with(&mut self, extra: &[&str]) {
        self.pod.stop_server("proxy");
        self.pod
            .start_server_with(
                Side::Pod,
                As::PROXY,
                "proxy",
                &["0.0.0.0:15001", "[::]:15001"],
                extra,
            )
            .expect("proxy server");
    }

    /// Runs `redirect <args>` and returns its output.
    pub fn redirect(&self, args: &[&str]) -> Output {
        Command::new(redirect_bin())
            .args(args)
            .output()
            .expect("running redirect")
    }

    /// `redirect apply` on this pod with `policy` flags; in node mode
    /// ([`node_mode`]), `node install` on the pod's cgroup (once, or again
    /// with `--max-connections`) and `pod add --replace`, at the same pin dir.
    pub fn apply(&self, policy: &[&str]) -> Output {
        if node_mode() {
            return self.apply_node(policy);
        }
        let cgroup = self.pod.cgroup.display().to_string();
        let netns = self.pod.netns_path(Side::Pod).display().to_string();
        let pin = self.pin_dir.display().to_string();
        let mut args = vec![
            "apply",
            "--cgroup",
            &cgroup,
            "--netns",
            &netns,
            "--pin-dir",
            &pin,
        ];
        args.extend_from_slice(policy);
        self.redirect(&args)
    }

    fn apply_node(&self, policy: &[&str]) -> Output {
        let cgroup = self.pod.cgroup.display().to_string();
        let netns = self.pod.netns_path(Side::Pod).display().to_string();
        let pin = self.pin_dir.display().to_string();
        let mut install = vec!["node", "install", "--cgroup", &cgroup, "--pin-dir", &pin];
        let mut add = vec![
            "pod",
            "add",
            "--replace",
            "--netns",
            &netns,
            "--pin-dir",
            &pin,
        ];
        let mut args = policy.iter();
        while let Some(a) = args.next() {
            if *a == "--max-connections" {
                install.push(a);
                install.extend(args.next());
            } else {
                add.push(a);
            }
        }
        if install.len() > 6 || !self.pin_dir.join("NODE").exists() {
            let out = self.redirect(&install);
            if !out.status.success() {
                return out;
            }
        }
        self.redirect(&add)
    }

    /// Undoes [`Fixture::apply`]: `remove`, or in node mode `pod remove`
    /// and `node uninstall`.
    pub fn remove(&self) -> Output {
        let pin = self.pin_dir.display().to_string();
        if node_mode() {
            let netns = self.pod.netns_path(Side::Pod).display().to_string();
            let out = self.redirect(&["pod", "remove", "--netns", &netns, "--pin-dir", &pin]);
            if !out.status.success() {
                return out;
            }
            return self.redirect(&["node", "uninstall", "--pin-dir", &pin]);
        }
        self.redirect(&["remove", "--pin-dir", &pin])
    }

    /// `apply` that must succeed.
    pub fn apply_ok(&self, policy: &[&str]) {
        let out = self.apply(policy);
        assert!(
            out.status.success(),
            "redirect apply {policy:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Connects from the pod as `who` to `to`; panics if the client could
    /// not run at all (a failed connect is reported in the view).
    pub fn connect(&self, who: As, to: &str) -> ClientView {
        self.pod.connect(who, to, None).expect("sample client")
    }

    /// Connects and returns the name of the server that answered, or
    /// `"error: ..."`.
    pub fn who_answers(&self, who: As, to: &str) -> String {
        let v = self.connect(who, to);
        match v.reply {
            Some(r) => r.server,
            None => format!("error: {}", v.error.unwrap_or_default()),
        }
    }

    /// Connects from the upstream host (outside the pod) to `to`, e.g. the
    /// pod's address: an inbound connection.
    pub fn connect_in(&self, to: &str) -> ClientView {
        self.pod
            .connect_from(Side::Upstream, As::PROXY_LESS, to, None)
            .expect("sample client")
    }

    /// Inbound [`Fixture::who_answers`].
    pub fn who_answers_in(&self, to: &str) -> String {
        let v = self.connect_in(to);
        match v.reply {
            Some(r) => r.server,
            None => format!("error: {}", v.error.unwrap_or_default()),
        }
    }

    /// `status --json` parsed, or `None` when it fails. In node mode, the
    /// node's status in the same shape: the pod's policy, the node's
    /// decisions, counters and connections.
    pub fn status(&self) -> Option<serde_json::Value> {
        if node_mode() {
            let out = self.redirect(&[
                "status",
                "--json",
                "--node",
                &self.pin_dir.display().to_string(),
            ]);
            if !out.status.success() {
                return None;
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
            let node = &v["node"];
            return Some(serde_json::json!({
                "generation": node["generation"],
                "policy": v["pods"][0]["policy"],
                "decisions": node["decisions"],
                "counters": node["counters"],
                "connections": node["connections"],
            }));
        }
        let out = self.redirect(&[
            "status",
            "--json",
            "--pin-dir",
            &self.pin_dir.display().to_string(),
        ]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("status JSON"))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if node_mode() && self.pin_dir.join("NODE").exists() {
            let pin = self.pin_dir.display().to_string();
            let _ = self.redirect(&["node", "uninstall", "--pin-dir", &pin]);
        }
        if self.pin_dir.exists() {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}

/// Entries left in `CONNS` and `TUPLES` of `f`'s pin dir once the pod's
/// connections have closed: sockets are released a moment after their
/// processes exit, so this waits up to 15 s for the count to reach zero.
pub fn state_entries_after_close(f: &Fixture) -> usize {
    use redirect_common::map_names;
    let state = f.pin_dir.join("state");
    let open = |name: &str| redirect::apply::open_pinned(&state.join(name)).unwrap();
    let tuples =
        aya::maps::HashMap::<_, redirect_common::TupleKey, u64>::try_from(open(map_names::TUPLES))
            .unwrap();
    let conns =
        aya::maps::HashMap::<_, u64, redirect_common::Conn>::try_from(open(map_names::CONNS))
            .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let n = tuples.keys().count() + conns.keys().count();
        if n == 0 || std::time::Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A process of some other owner: UID 2000 with GID `gid`, in `app/`.
pub fn other(uid: u32, gid: u32) -> As {
    As {
        uid,
        gid,
        cgroup: Some("app"),
    }
}

/// Fewer connections (or queries) where `REDIRECT_TEST_QUICK` is set: a tenth in `cargo
/// xtask test`'s node-mode pass (the state these tests stress is the same
/// code in both modes), or `1/N` with `REDIRECT_TEST_QUICK=N`, as `cargo
/// xtask vm-test` sets it where the kernel runs under software emulation
/// (there they check the kernel's behaviour, not volume); the full counts
/// in the first pass.
pub fn scaled(n: u64) -> u64 {
    match std::env::var("REDIRECT_TEST_QUICK") {
        Ok(v) => n / v.parse::<u64>().ok().filter(|d| *d > 1).unwrap_or(10),
        Err(_) => n,
    }
}

//! Real HAProxy (Debian's package, installed by `cargo xtask setup`) inside a
//! test pod: config in a temporary directory, run in the foreground (`-db`)
//! as a given user and cgroup through [`Pod::command`], its log (one line per
//! connection, in [`LOG_FORMAT`]) written to a file there. Dropping a
//! [`Haproxy`] kills it and removes the directory, also when a test panics.

use std::{
    fs::File,
    io::Read,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::pod::{As, Pod, Side};

/// The `haproxy` executable: the first one on `$PATH` or in the sbin
/// directories (tests may run with a `$PATH` without them), or `None`.
pub fn haproxy_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
}

/// The `ab` executable (apache2-utils), like [`haproxy_bin`].
pub fn ab_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/bin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join("ab"))
        .find(|p| p.is_file())
}

/// Whether HAProxy and `ab` are installed. Missing under `CI=true` is a
/// failure; elsewhere the tests print that they are skipped and pass.
pub fn installed() -> bool {
    let missing: Vec<&str> = [
        ("haproxy", haproxy_bin().is_none()),
        ("ab (apache2-utils)", ab_bin().is_none()),
    ]
    .into_iter()
    .filter_map(|(name, gone)| gone.then_some(name))
    .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!(
            "{} not installed (CI=true, so this is a failure, not a skip): run `cargo xtask setup`",
            missing.join(", ")
        );
    }
    eprintln!(
        "SKIPPED: {} not installed; `cargo xtask setup` installs them",
        missing.join(", ")
    );
    false
}

/// `haproxy -v`'s first line, e.g. `HAProxy version 2.6.12-1+deb12u4 ...`.
pub fn version() -> String {
    let bin = haproxy_bin().expect("haproxy installed");
    let out = std::process::Command::new(bin)
        .arg("-v")
        .output()
        .expect("haproxy -v");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Every connection HAProxy handled, one log line each (at its end), as
/// `key=value` fields [`LogLine::parse`] reads: the client, the address
/// HAProxy accepted on as it sees it (for a redirected connection: the
/// original destination, from `SO_ORIGINAL_DST`), the backend connection's
/// source and destination (`-` when it never got one), the termination
/// state and the bytes sent to the client.
pub const LOG_FORMAT: &str =
    "conn ci=%ci cp=%cp fi=%fi fp=%fp bi=%bi bp=%bp si=%si sp=%sp ts=%ts bytes=%B";

/// The `global` and `defaults` sections every test config starts with:
/// TCP mode, the log above to stdout, `maxconn` as given, short timeouts.
/// One thread: HAProxy drops a log line when two threads collide on the log
/// file descriptor (it prefers dropping to blocking), and the tests need
/// every line.
pub fn config_head(maxconn: u32) -> String {
    format!(
        "global\n\
         \x20   nbthread 1\n\
         \x20   maxconn {maxconn}\n\
         \x20   log stdout format raw local0 info\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   log global\n\
         \x20   log-format \"{LOG_FORMAT}\"\n\
         \x20   timeout connect 2s\n\
         \x20   timeout client 10s\n\
         \x20   timeout server 10s\n"
    )
}

/// A sidecar in the pod as Istio runs Envoy, here with HAProxy:
///
/// - `outbound` on `0.0.0.0:15001` and `[::]:15001` (IPv6-only), backend
///   `server orig 0.0.0.0:0`: connect to the original destination, which
///   HAProxy reads with `SO_ORIGINAL_DST`. HAProxy 2.6 asks only on IPv4
///   sockets; on IPv6 ones it takes the socket's own address, `[::1]:15001`,
///   and connects to itself (behind ip6tables REDIRECT too);
/// - `inbound` on `0.0.0.0:15006` and `[::]:15006`, backend `server app
///   127.0.0.1 source 127.0.0.6`: to the application on localhost, on the
///   port the client asked for (no port on the server line), from the
///   passthrough source Istio's inbound passthrough uses.
pub fn sidecar_config(maxconn: u32) -> String {
    format!(
        "{}\
         frontend outbound\n\
         \x20   bind 0.0.0.0:15001\n\
         \x20   bind [::]:15001 v6only\n\
         \x20   default_backend original_dst\n\
         backend original_dst\n\
         \x20   server orig 0.0.0.0:0\n\
         frontend inbound\n\
         \x20   bind 0.0.0.0:15006\n\
         \x20   bind [::]:15006 v6only\n\
         \x20   default_backend inbound_passthrough\n\
         backend inbound_passthrough\n\
         \x20   server app 127.0.0.1 source 127.0.0.6\n",
        config_head(maxconn)
    )
}

/// An HTTP server made of HAProxy alone: every request on `listen` is
/// answered `200` with `body` (and the connection closed, HTTP/1.0).
pub fn http_responder_config(listen: &[SocketAddr], body: &str) -> String {
    let binds: String = listen.iter().map(|a| format!("    bind {a}\n")).collect();
    format!(
        "global\n\
         \x20   maxconn 4096\n\
         defaults\n\
         \x20   mode http\n\
         \x20   timeout connect 2s\n\
         \x20   timeout client 10s\n\
         \x20   timeout server 10s\n\
         frontend web\n\
         {binds}\
         \x20   http-request return status 200 content-type text/plain string \"{body}\"\n"
    )
}

/// What one `ab` run reported.
#[derive(Clone, Debug, Default)]
pub struct AbRun {
    /// `Complete requests`.
    pub complete: u64,
    /// `Failed requests`.
    pub failed: u64,
    /// `Non-2xx responses` (0 when ab does not print the line).
    pub non_2xx: u64,
    /// `Requests per second`.
    pub rps: f64,
    /// It was still running at the deadline and was killed.
    pub timed_out: bool,
    /// Its exit status was not success.
    pub exit_failed: bool,
    /// stdout and stderr, for messages.
    pub output: String,
}

/// Runs `ab -q -r -s 5 -c concurrency -n requests url` on `side` of `pod`
/// as `who`; kills it at `deadline`.
pub fn ab(
    pod: &Pod,
    side: Side,
    who: As,
    url: &str,
    requests: u32,
    concurrency: u32,
    deadline: Instant,
) -> AbRun {
    let bin = ab_bin().expect("ab installed (see haproxy::installed)");
    let mut cmd = pod.command(side, who, &bin).expect("ab command");
    cmd.args(["-q", "-r", "-s", "5", "-c"])
        .arg(concurrency.to_string())
        .arg("-n")
        .arg(requests.to_string())
        .arg(url);
    let (out, timed_out) = output_until(&mut cmd, deadline);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |key: &str| -> Option<&str> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
    };
    AbRun {
        complete: value("Complete requests:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        failed: value("Failed requests:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        non_2xx: value("Non-2xx responses:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        rps: value("Requests per second:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        timed_out,
        exit_failed: !out.status.success(),
        output: text,
    }
}

/// Runs `cmd` to its end, or kills it at `deadline` (then `true`), with
/// its stdout and stderr collected (read while it runs, so a full pipe
/// cannot stall it).
pub fn output_until(cmd: &mut Command, deadline: Instant) -> (Output, bool) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            timed_out = true;
            break child.wait().expect("waiting for a killed child");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    };
    (out, timed_out)
}

/// One parsed log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// The client (`%ci:%cp`).
    pub client: Option<SocketAddr>,
    /// The accepting address as HAProxy sees it (`%fi:%fp`).
    pub frontend: Option<SocketAddr>,
    /// The backend connection's source (`%bi:%bp`).
    pub backend_source: Option<SocketAddr>,
    /// Where HAProxy connected (`%si:%sp`), `None` when it did not.
    pub server: Option<SocketAddr>,
    /// Termination state (`%ts`, `--` for a normal end).
    pub termination: String,
    /// Bytes sent to the client.
    pub bytes: u64,
    /// The line as HAProxy wrote it.
    pub raw: String,
}

impl LogLine {
    /// Parses one line written in [`LOG_FORMAT`]; `None` for other lines
    /// (HAProxy's own notices).
    pub fn parse(line: &str) -> Option<LogLine> {
        let rest = line.strip_prefix("conn ")?;
        let field = |key: &str| {
            rest.split(' ')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or("-")
        };
        let addr = |ip: &str, port: &str| -> Option<SocketAddr> {
            let ip: IpAddr = field(ip).parse().ok()?;
            Some(SocketAddr::new(ip, field(port).parse().ok()?))
        };
        Some(LogLine {
            client: addr("ci", "cp"),
            frontend: addr("fi", "fp"),
            backend_source: addr("bi", "bp"),
            server: addr("si", "sp"),
            termination: field("ts").to_string(),
            bytes: field("bytes").parse().unwrap_or(0),
            raw: line.to_string(),
        })
    }
}

/// A running HAProxy.
pub struct Haproxy {
    name: String,
    child: Option<Child>,
    dir: PathBuf,
}

impl Haproxy {
    /// Writes `config` to a fresh temporary directory and runs `haproxy -db`
    /// on it on `side` of `pod` as `who` (UID, GID and cgroup), with stdout
    /// (the log) and stderr in files there. Waits until something listens on
    /// every port of `listening` in that namespace; panics with HAProxy's
    /// stderr if it exits or takes more than 60 s (it can take seconds in a
    /// VM without acceleration).
    pub fn start(
        pod: &Pod,
        side: Side,
        who: As,
        name: &str,
        config: &str,
        listening: &[u16],
    ) -> Haproxy {
        let bin = haproxy_bin().expect("haproxy installed (see haproxy::installed)");
        let dir = std::env::temp_dir().join(format!("redirect-haproxy-{}-{name}", pod.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("haproxy temp dir");
        let mut h = Haproxy {
            name: name.to_string(),
            child: None,
            dir,
        };
        let cfg = h.dir.join("haproxy.cfg");
        std::fs::write(&cfg, config).expect("writing haproxy.cfg");
        let stdout = File::create(h.log_path()).expect("haproxy log file");
        let stderr = File::create(h.dir.join("stderr")).expect("haproxy stderr file");
        let mut cmd = pod.command(side, who, &bin).expect("haproxy command");
        cmd.arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        h.child = Some(cmd.spawn().expect("starting haproxy"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pid = h.child.as_ref().expect("spawned").id();
            if let Some(status) = h.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "haproxy {name} exited ({status}) before listening:\n{}",
                    h.stderr()
                );
            }
            let open = listening_ports(pid);
            if listening.iter().all(|p| open.contains(p)) {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy {name} not listening on {listening:?} after 60 s (it listens on {open:?}):\n{}",
                h.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The file HAProxy logs to (its stdout).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// HAProxy's stderr so far (alerts and warnings).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// The connections logged so far.
    pub fn log(&self) -> Vec<LogLine> {
        read_log(&self.log_path())
    }

    /// Waits until the log has not grown for 500 ms and holds at least `n`
    /// connections, or `timeout` passed; returns the log. (A HAProxy that
    /// loops writes without end: the log is only parsed once it rests.)
    pub fn log_settled(&self, n: usize, timeout: Duration) -> Vec<LogLine> {
        let deadline = Instant::now() + timeout;
        let size = || std::fs::metadata(self.log_path()).map_or(0, |m| m.len());
        let mut last = size();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = size();
            if now == last {
                let log = self.log();
                if log.len() >= n {
                    return log;
                }
            }
            if Instant::now() >= deadline {
                return self.log();
            }
            last = now;
        }
    }

    /// Kills HAProxy (idempotent).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read_log(path: &Path) -> Vec<LogLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(LogLine::parse)
        .collect()
}

/// TCP ports in `LISTEN` in the network namespace of process `pid`.
fn listening_ports(pid: u32) -> Vec<u16> {
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address is "ADDR:PORT" in hex; state 0A is LISTEN.
            if cols.len() > 3
                && cols[3] == "0A"
                && let Some(port) = cols[1]
                    .rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports
}

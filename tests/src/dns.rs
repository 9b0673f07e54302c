//! DNS fixtures for `tests/tests/dns.rs` (istio's `--redirect-dns`, rule 5):
//! real nameservers and real resolvers around a [`Fixture`]'s pod.
//!
//! - an upstream nameserver: dnsmasq in the upstream namespace on port 53
//!   of [`UPSTREAM_IP`], [`UPSTREAM_IP6`], `upstream_extra(1)` and
//!   `upstream_extra6(1)`, UDP and TCP, answering [`NAME`] with
//!   [`UPSTREAM_A`] / [`UPSTREAM_AAAA`] and [`FORWARDED_NAME`] with
//!   [`FORWARDED_A`];
//! - the mesh's DNS proxy: dnsmasq in the pod as the proxy (UID 1337) on
//!   `127.0.0.1:15053` and `[::1]:15053`, answering [`NAME`] differently
//!   ([`PROXY_A`] / [`PROXY_AAAA`]) and forwarding every other name to the
//!   upstream nameserver, as istio-agent's DNS proxy does;
//! - or a scripted proxy ([`Dns::start_fake_proxy`], Python) that collects a
//!   batch of queries and answers them in reverse order;
//! - the resolvers: `dig`, glibc (`getent`, in a private mount namespace
//!   with its own `/etc/resolv.conf`), and Python clients on connected and
//!   unconnected UDP sockets ([`Dns::python`]).
//!
//! Every process is started in a process group of its own and killed with
//! it, and the scratch directory removed, when the [`Dns`] is dropped (also
//! when the test panics). A [`Dns`] borrows its [`Fixture`], so it is
//! always dropped first, while the pod's cgroup and namespaces still exist.

use std::{
    ffi::CString,
    io::{BufRead as _, BufReader, Read as _},
    net::Ipv4Addr,
    os::unix::{
        ffi::OsStrExt as _,
        fs::PermissionsExt as _,
        process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{
    Fixture,
    pod::{As, Side, UPSTREAM_IP, UPSTREAM_IP6, enter, upstream_extra, upstream_extra6},
};

/// The name both nameservers answer, each with its own address.
pub const NAME: &str = "svc.test";
/// The upstream nameserver's answer for [`NAME`] (A).
pub const UPSTREAM_A: &str = "10.1.1.1";
/// The upstream nameserver's answer for [`NAME`] (AAAA).
pub const UPSTREAM_AAAA: &str = "fd00:1::1";
/// The DNS proxy's answer for [`NAME`] (A).
pub const PROXY_A: &str = "10.2.2.2";
/// The DNS proxy's answer for [`NAME`] (AAAA).
pub const PROXY_AAAA: &str = "fd00:2::2";
/// A name only the upstream nameserver knows: the DNS proxy forwards it.
pub const FORWARDED_NAME: &str = "other.test";
/// The upstream nameserver's answer for [`FORWARDED_NAME`].
pub const FORWARDED_A: &str = "10.1.1.9";
/// The DNS capture port (istio-agent's DNS proxy).
pub const DNS_PROXY_PORT: u16 = 15053;

/// The addresses the upstream nameserver listens on.
pub fn upstream_nameservers() -> Vec<String> {
    vec![
        UPSTREAM_IP.to_string(),
        UPSTREAM_IP6.to_string(),
        upstream_extra(1).to_string(),
        upstream_extra6(1).to_string(),
    ]
}

/// The absolute path of a tool `cargo xtask setup` installs. (Absolute:
/// the processes run as other users, to whom `root`'s own `PATH` entries,
/// such as a pyenv shim, may be closed.)
pub fn tool(name: &str) -> PathBuf {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} is not installed: run `cargo xtask setup`"))
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A process started by [`Dns`]: the leader of its own process group,
/// killed with its group when dropped.
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn kill(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            // Exited and reaped (none of these processes has children of
            // its own): its group id may belong to someone else by now.
            return;
        }
        // The group is this child's own (process_group(0) at spawn): only
        // processes this fixture started are in it.
        let pgid = self.child.id() as i32;
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// DNS servers and clients around one [`Fixture`]'s pod.
pub struct Dns<'a> {
    /// The fixture whose pod this runs in.
    pub f: &'a Fixture,
    daemons: Vec<Daemon>,
    dir: PathBuf,
}

impl<'a> Dns<'a> {
    /// No servers yet; a scratch directory of its own.
    pub fn new(f: &'a Fixture) -> Dns<'a> {
        let dir = std::env::temp_dir().join(format!(
            "rdt-dns-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).expect("creating the DNS scratch directory");
        // The resolvers run as other users and read files from here.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the scratch directory");
        Dns {
            f,
            daemons: Vec::new(),
            dir,
        }
    }

    /// [`Dns::new`] with the upstream nameserver and the DNS proxy
    /// (dnsmasq) running.
    pub fn with_servers(f: &'a Fixture) -> Dns<'a> {
        let mut d = Dns::new(f);
        d.start_upstream(53);
        d.start_proxy();
        d
    }

    /// Writes `text` to `name` in the scratch directory (mode 0644).
    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("writing a scratch file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        p
    }

    fn spawn(&mut self, name: &str, mut cmd: Command, stdout: bool) -> Option<ChildStdout> {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("daemon log file");
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stderr(file.try_clone().expect("log fd"));
        if stdout {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(file);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let out = child.stdout.take();
        self.daemons.push(Daemon {
            name: name.to_string(),
            child,
            log,
        });
        out
    }

    /// The log (stdout and stderr) of the process started as `name`.
    pub fn log(&self, name: &str) -> String {
        self.daemons
            .iter()
            .find(|d| d.name == name)
            .and_then(|d| std::fs::read_to_string(&d.log).ok())
            .unwrap_or_default()
    }

    fn dnsmasq(&self, side: Side, who: As, listen: &[String], port: u16) -> Command {
        let mut cmd = self
            .f
            .pod
            .command(side, who, &tool("dnsmasq"))
            .expect("dnsmasq command");
        cmd.args([
            "--conf-file=/dev/null",
            // Foreground, no fork per TCP query, no pid file, no user change.
            "--no-daemon",
            "--log-facility=-",
            "--log-queries",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--cache-size=0",
        ]);
        cmd.arg(format!("--port={port}"));
        for a in listen {
            cmd.arg(format!("--listen-address={a}"));
        }
        cmd
    }

    /// Starts the upstream nameserver (dnsmasq, root, in the upstream
    /// namespace) on `port` of [`upstream_nameservers`], UDP and TCP, and
    /// waits until it answers.
    pub fn start_upstream(&mut self, port: u16) {
        let listen = upstream_nameservers();
        let mut cmd = self.dnsmasq(Side::Upstream, As::PROXY_LESS, &listen, port);
        cmd.args([
            format!("--address=/{NAME}/{UPSTREAM_A}"),
            format!("--address=/{NAME}/{UPSTREAM_AAAA}"),
            format!("--address=/{FORWARDED_NAME}/{FORWARDED_A}"),
        ]);
        let name = format!("upstream-{port}");
        self.spawn(&name, cmd, false);
        for a in &listen {
            self.wait_answering(&name, Side::Upstream, a, port, UPSTREAM_A);
        }
    }

    /// Starts the mesh's DNS proxy (dnsmasq as [`As::PROXY`] in the pod) on
    /// `127.0.0.1:15053` and `[::1]:15053`, UDP and TCP: it answers
    /// [`NAME`] itself and forwards every other name to the upstream
    /// nameserver at [`UPSTREAM_IP`]. Waits until it answers.
    pub fn start_proxy(&mut self) {
        let listen = vec!["127.0.0.1".to_string(), "::1".to_string()];
        let mut cmd = self.dnsmasq(Side::Pod, As::PROXY, &listen, DNS_PROXY_PORT);
        cmd.args([
            format!("--address=/{NAME}/{PROXY_A}"),
            format!("--address=/{NAME}/{PROXY_AAAA}"),
            format!("--server={UPSTREAM_IP}"),
        ]);
        self.spawn("dns-proxy", cmd, false);
        for a in &listen {
            self.wait_answering("dns-proxy", Side::Pod, a, DNS_PROXY_PORT, PROXY_A);
        }
    }

    fn wait_answering(&mut self, name: &str, side: Side, addr: &str, port: u16, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Root outside the pod's cgroup: never captured.
            let d = self.dig_on(side, As::PROXY_LESS, addr, port, &[NAME, "A", "+time=1"]);
            if d.answers.iter().any(|a| a == want) {
                return;
            }
            let exited = self
                .daemons
                .iter_mut()
                .find(|d| d.name == name)
                .and_then(|d| d.child.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "{name} does not answer on {addr} port {port} (exited: {exited:?}); last dig:\n{}\nits log:\n{}",
                    d.text,
                    self.log(name)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `dig @server -p port args...` in the pod as `who`.
    pub fn dig(&self, who: As, server: &str, args: &[&str]) -> Dig {
        self.dig_on(Side::Pod, who, server, 53, args)
    }

    /// [`Dig`] on `side`, to `server` port `port`.
    pub fn dig_on(&self, side: Side, who: As, server: &str, port: u16, args: &[&str]) -> Dig {
        let mut cmd = self
            .f
            .pod
            .command(side, who, &tool("dig"))
            .expect("dig command");
        cmd.arg(format!("@{server}"))
            .args(["-p", &port.to_string()])
            .args(["+tries=1", "+time=2", "+nocookie"])
            .args(args);
        let out = cmd.stdin(Stdio::null()).output().expect("running dig");
        Dig::parse(&format!("dig @{server} -p {port} {}", args.join(" ")), &out)
    }

    /// Runs `getent args...` in the pod as `who`, in a private mount
    /// namespace where `/etc/resolv.conf` holds `resolv_conf` and
    /// `/etc/nsswitch.conf` resolves hosts with DNS only. glibc's resolver
    /// drops an answer whose source is not the nameserver it asked.
    pub fn getent(&self, who: As, resolv_conf: &str, args: &[&str]) -> Output {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let resolv = self.write_file(&format!("resolv-{n}.conf"), resolv_conf);
        let nss = self.write_file("nsswitch.conf", "hosts: dns\n");
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("path");
        let mounts = [
            (c(&resolv), c(Path::new("/etc/resolv.conf"))),
            (c(&nss), c(Path::new("/etc/nsswitch.conf"))),
        ];
        let root = c(Path::new("/"));
        let mut cmd = Command::new(tool("getent"));
        // SAFETY: only async-signal-safe libc calls on data prepared above.
        // Runs before `enter`'s hook (registered after it), still as root.
        unsafe {
            cmd.pre_exec(move || {
                let fail = || Err(std::io::Error::last_os_error());
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return fail();
                }
                let none = std::ptr::null();
                if libc::mount(
                    none,
                    root.as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return fail();
                }
                for (from, to) in &mounts {
                    if libc::mount(
                        from.as_ptr(),
                        to.as_ptr(),
                        none,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                    {
                        return fail();
                    }
                }
                Ok(())
            });
        }
        let netns = c(&self.f.pod.netns_path(Side::Pod));
        let procs = who
            .cgroup
            .map(|sub| c(&self.f.pod.cgroup.join(sub).join("cgroup.procs")));
        enter(&mut cmd, procs, netns, who.uid, who.gid);
        cmd.args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running getent")
    }

    /// Runs [`CLIENT`] in the pod as `who`: `python3 -c CLIENT mode spec`,
    /// and returns the JSON object it prints (or `{"error": ...}`).
    pub fn python(&self, who: As, mode: &str, spec: &serde_json::Value) -> serde_json::Value {
        let mut cmd = self
            .f
            .pod
            .command(Side::Pod, who, &tool("python3"))
            .expect("python3 command");
        cmd.args(["-c", CLIENT, mode, &spec.to_string()]);
        let out = cmd.stdin(Stdio::null()).output().expect("running python3");
        let text = String::from_utf8_lossy(&out.stdout);
        match text
            .lines()
            .last()
            .map(serde_json::from_str::<serde_json::Value>)
        {
            Some(Ok(v)) if out.status.success() => v,
            _ => serde_json::json!({
                "error": format!(
                    "python3 {mode} exited with {:?} (signal {:?}): {text}{}",
                    out.status.code(),
                    out.status.signal(),
                    String::from_utf8_lossy(&out.stderr)
                )
            }),
        }
    }

    /// Starts [`CLIENT`]'s `fakeproxy` as [`As::PROXY`] in the pod on
    /// `bind` port 15053 (UDP): it collects `batch` queries, answers them
    /// in reverse order (the k-th received gets the A record `10.3.3.k`),
    /// `batches` times, then prints what it did and exits. Waits until it
    /// is bound.
    pub fn start_fake_proxy(&mut self, bind: &str, batch: usize, batches: usize) -> FakeProxy {
        let spec = serde_json::json!({
            "bind": bind, "port": DNS_PROXY_PORT, "batch": batch, "batches": batches,
        });
        let mut cmd = self
            .f
            .pod
            .command(Side::Pod, As::PROXY, &tool("python3"))
            .expect("python3 command");
        cmd.args(["-c", CLIENT, "fakeproxy", &spec.to_string()]);
        let name = format!("fake-proxy-{}", SEQ.fetch_add(1, Ordering::Relaxed));
        let stdout = self.spawn(&name, cmd, true).expect("piped stdout");
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        assert_eq!(
            line.trim(),
            "ready",
            "fake proxy did not start: {}",
            self.log(&name)
        );
        FakeProxy { name, stdout }
    }

    /// Waits (up to 15 s) for a fake proxy to finish and returns what it
    /// printed: `{"answered": [{"id", "src", "answer"}...]}` in the order
    /// it answered, or `{"error": ...}`.
    pub fn finish_fake_proxy(&mut self, p: FakeProxy) -> serde_json::Value {
        let FakeProxy { name, mut stdout } = p;
        let i = self
            .daemons
            .iter()
            .position(|d| d.name == name)
            .expect("a fake proxy of this Dns");
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.daemons[i].child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                self.daemons[i].kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut rest = String::new();
        let _ = stdout.read_to_string(&mut rest);
        match rest.lines().last().map(serde_json::from_str) {
            Some(Ok(v)) => v,
            _ => serde_json::json!({
                "error": format!("fake proxy printed {rest:?}; log: {}", self.log(&name))
            }),
        }
    }
}

impl Drop for Dns<'_> {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            d.kill();
        }
        self.daemons.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running [`Dns::start_fake_proxy`].
pub struct FakeProxy {
    name: String,
    stdout: BufReader<ChildStdout>,
}

/// What one `dig` run showed.
#[derive(Debug, Clone)]
pub struct Dig {
    /// `dig` exited 0 (an answer came).
    pub ok: bool,
    /// The A and AAAA records of the answer section.
    pub answers: Vec<String>,
    /// The `;; SERVER:` line's address, e.g. `10.200.0.1#53`.
    pub server: Option<String>,
    /// The transport the `;; SERVER:` line names (`UDP`, `TCP`).
    pub transport: Option<String>,
    /// The command, its exit status, stdout and stderr, for messages.
    pub text: String,
}

impl Dig {
    fn parse(what: &str, out: &Output) -> Dig {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut answers = Vec::new();
        let mut in_answer = false;
        let mut server = None;
        let mut transport = None;
        for line in stdout.lines() {
            if line.starts_with(";; ") && line.ends_with("SECTION:") {
                in_answer = line == ";; ANSWER SECTION:";
                continue;
            }
            if let Some(rest) = line.strip_prefix(";; SERVER: ") {
                // "10.200.0.1#53(10.200.0.1) (UDP)"
                server = rest.split('(').next().map(str::to_string);
                transport = rest
                    .rsplit('(')
                    .next()
                    .map(|t| t.trim_end_matches(')').to_string());
                continue;
            }
            if line.is_empty() || line.starts_with(';') {
                in_answer = false;
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            if in_answer && f.len() == 5 && (f[3] == "A" || f[3] == "AAAA") {
                answers.push(f[4].to_string());
            }
        }
        Dig {
            ok: out.status.success(),
            answers,
            server,
            transport,
            text: format!("$ {what}\n{:?}\n{stdout}{stderr}", out.status),
        }
    }

    /// The run reported an answer from a source other than the server it
    /// asked (dig prints `reply from unexpected source`).
    pub fn unexpected_source(&self) -> bool {
        self.text.contains("unexpected source")
    }
}

/// The addresses `getent ahosts*` printed, deduplicated, in order.
pub fn getent_addresses(out: &Output) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(a) = l.split_whitespace().next()
            && !v.iter().any(|x| x == a)
        {
            v.push(a.to_string());
        }
    }
    v
}

/// The Python side: DNS clients on raw UDP sockets and a scripted DNS
/// proxy. `python3 -c CLIENT MODE SPEC_JSON`; prints one JSON object.
///
/// - `connected` `{family, server, port, name}`: `connect()`, then one query
///   with `send`/`recvfrom` and one with `send`/`recv`; reports
///   `getpeername`, `getsockname`, the `recvfrom` source, the ids and the
///   answers.
/// - `unconnected` `{family, queries: [{server, port, name}], rounds,
///   fresh_socket}`: per round, `sendto` every query (distinct ids) on one
///   socket (a new one each round with `fresh_socket`), then `recvfrom`
///   as many answers and match them by id; checks that each answer's
///   source is the server its query went to. Reports the first round's
///   answers, the number of rounds done and the first errors.
/// - `steps` `{family, name, steps}`: one UDP socket, then each step in
///   order, one result each (or `{"error": ...}`): `["rcvbuf", n]`,
///   `["timeout", s]`, `["connect", addr, port]` (its `getpeername`),
///   `["disconnect"]` (`connect(AF_UNSPEC)`), `["getpeername"]`,
///   `["send", id]`, `["sendto", addr, port, id]`, `["recvfrom"]` and
///   `["peek"]` (`MSG_PEEK`) (`{from, id, answers}`), `["recv"]` (no
///   address: `{id, answers}`), `["sleep", s]`.
/// - `fakeproxy` `{bind, port, batch, batches}`: see
///   [`Dns::start_fake_proxy`].
pub const CLIENT: &str = r#"
import ctypes, json, socket, struct, sys, time

def qname(name):
    return b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\0'

def query(qid, name, qtype=1):
    return struct.pack('!HHHHHH', qid, 0x0100, 1, 0, 0, 0) + qname(name) + struct.pack('!HH', qtype, 1)

def skip_name(m, i):
    while True:
        n = m[i]
        if n == 0:
            return i + 1
        if n & 0xc0 == 0xc0:
            return i + 2
        i += n + 1

def parse(m):
    qid, flags, qd, an, ns, ar = struct.unpack('!HHHHHH', m[:12])
    i = 12
    for _ in range(qd):
        i = skip_name(m, i) + 4
    out = []
    for _ in range(an):
        i = skip_name(m, i)
        t, c, ttl, rdl = struct.unpack('!HHIH', m[i:i + 10])
        i += 10
        rd = m[i:i + rdl]
        i += rdl
        if t == 1:
            out.append(socket.inet_ntop(socket.AF_INET, rd))
        elif t == 28:
            out.append(socket.inet_ntop(socket.AF_INET6, rd))
    return qid, out

def show(a):
    return '[%s]:%d' % (a[0], a[1]) if ':' in a[0] else '%s:%d' % (a[0], a[1])

def fam(spec):
    return socket.AF_INET6 if spec.get('family') == 6 else socket.AF_INET

def connected(spec):
    s = socket.socket(fam(spec), socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((spec['server'], spec.get('port', 53)))
    r = {'peer': show(s.getpeername()), 'local': show(s.getsockname())}
    s.send(query(0x1234, spec['name']))
    data, src = s.recvfrom(4096)
    r['from'] = show(src)
    r['id1'], r['answers1'] = parse(data)
    s.send(query(0x4321, spec['name']))
    r['id2'], r['answers2'] = parse(s.recv(4096))
    r['peer_after'] = show(s.getpeername())
    return r

def unconnected(spec):
    qs = spec['queries']
    rounds = spec.get('rounds', 1)
    s = None
    first, errors, nerr, done = [], [], 0, 0
    for rnd in range(rounds):
        if s is None or spec.get('fresh_socket'):
            if s is not None:
                s.close()
            s = socket.socket(fam(spec), socket.SOCK_DGRAM)
            s.settimeout(3)
        sent = {}
        for k, q in enumerate(qs):
            qid = (0x100 + rnd * len(qs) + k * 7919) & 0xffff
            dst = (q['server'], q.get('port', 53))
            sent[qid] = dst
            s.sendto(query(qid, q['name']), dst)
        for _ in qs:
            try:
                data, src = s.recvfrom(4096)
            except socket.timeout:
                nerr += 1
                if len(errors) < 10:
                    errors.append('round %d: timed out waiting for %s' % (rnd, sorted(sent)))
                break
            qid, answers = parse(data)
            if rnd == 0:
                first.append({'id': qid, 'from': show(src), 'answers': answers,
                              'to': show(sent[qid]) if qid in sent else None})
            want = sent.pop(qid, None)
            if want is None or show(src) != show(want):
                nerr += 1
                if len(errors) < 10:
                    errors.append('round %d: answer id %d from %s, its query went to %s'
                                  % (rnd, qid, show(src), show(want) if want else 'nowhere'))
        done += 1
        if nerr > 50:
            break
    return {'first': first, 'rounds': done, 'errors': errors, 'error_count': nerr}

def answer(q, ip):
    qid, flags, qd, an, ns, ar = struct.unpack('!HHHHHH', q[:12])
    end = skip_name(q, 12) + 4
    return (struct.pack('!HHHHHH', qid, 0x8180, 1, 1, 0, 0) + q[12:end]
            + b'\xc0\x0c' + struct.pack('!HHIH', 1, 1, 60, 4) + socket.inet_aton(ip))

def fakeproxy(spec):
    s = socket.socket(socket.AF_INET6 if ':' in spec['bind'] else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((spec['bind'], spec['port']))
    s.settimeout(10)
    print('ready', flush=True)
    done = []
    for _ in range(spec.get('batches', 1)):
        got = []
        while len(got) < spec['batch']:
            try:
                got.append(s.recvfrom(4096))
            except socket.timeout:
                return {'error': 'timed out with %d queries' % len(got), 'answered': done}
        for k in reversed(range(len(got))):
            q, src = got[k]
            ip = '10.3.3.%d' % (k + 1)
            s.sendto(answer(q, ip), src)
            done.append({'id': struct.unpack('!H', q[:2])[0], 'src': show(src), 'answer': ip})
    return {'answered': done}

def steps(spec):
    s = socket.socket(fam(spec), socket.SOCK_DGRAM)
    s.settimeout(3)
    out = []
    for st in spec['steps']:
        op = st[0]
        try:
            if op == 'rcvbuf':
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, st[1])
                r = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            elif op == 'connect':
                s.connect((st[1], st[2]))
                r = show(s.getpeername())
            elif op == 'disconnect':
                # connect(AF_UNSPEC), which Python's connect() cannot ask.
                libc = ctypes.CDLL(None, use_errno=True)
                sa = (ctypes.c_ushort * 8)(socket.AF_UNSPEC)
                r = libc.connect(s.fileno(), ctypes.byref(sa), ctypes.sizeof(sa))
                if r != 0:
                    raise OSError(ctypes.get_errno(), 'connect(AF_UNSPEC)')
            elif op == 'getpeername':
                r = show(s.getpeername())
            elif op == 'send':
                r = s.send(query(st[1], st[2] if len(st) > 2 else spec['name']))
            elif op == 'sendto':
                r = s.sendto(query(st[3], st[4] if len(st) > 4 else spec['name']), (st[1], st[2]))
            elif op in ('recvfrom', 'peek'):
                data, src = s.recvfrom(4096, socket.MSG_PEEK if op == 'peek' else 0)
                qid, answers = parse(data)
                r = {'from': show(src), 'id': qid, 'answers': answers}
            elif op == 'recv':
                qid, answers = parse(s.recv(4096))
                r = {'id': qid, 'answers': answers}
            elif op == 'timeout':
                s.settimeout(st[1])
                r = None
            elif op == 'sleep':
                time.sleep(st[1])
                r = None
            else:
                r = {'error': 'unknown step %r' % (op,)}
        except Exception as e:
            r = {'error': '%s: %s' % (type(e).__name__, e)}
        out.append(r)
    return {'steps': out}

mode, spec = sys.argv[1], json.loads(sys.argv[2])
try:
    r = {'connected': connected, 'unconnected': unconnected, 'fakeproxy': fakeproxy,
         'steps': steps}[mode](spec)
except Exception as e:
    r = {'error': '%s: %s' % (type(e).__name__, e)}
print(json.dumps(r), flush=True)
"#;

/// `[addr]:port` for IPv6, `addr:port` for IPv4, as [`CLIENT`] prints them.
pub fn sockaddr(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// `::ffff:a.b.c.d`.
pub fn mapped(v4: Ipv4Addr) -> String {
    format!("::ffff:{v4}")
}

//! Sample peers for the demo and the tests: a server that behaves like a
//! transparent proxy (accept, `SO_ORIGINAL_DST`, answer one line; over UDP,
//! answer each datagram with one), and a client that connects and reports
//! what it saw (`connect`: TCP; `probe`: TCP, and UDP with and without
//! `connect()`). Both speak one JSON line. The `redirect-sample` binary
//! (`server`, `connect`, `probe`) runs them in a pod.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

/// `redirect-sample server` arguments.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Name put in every answer (which listener got the connection).
    #[arg(long)]
    pub name: String,
    /// Addresses to listen on, TCP (repeatable).
    #[arg(long, required_unless_present = "udp")]
    pub listen: Vec<SocketAddr>,
    /// Addresses to receive UDP datagrams on (repeatable): each datagram
    /// is answered, from the address it was received at, with one datagram:
    /// a DNS answer header with the query's id, then the [`ServerView`]
    /// JSON line (no `SO_ORIGINAL_DST`: there is none for UDP).
    #[arg(long)]
    pub udp: Vec<SocketAddr>,
    /// Wait this long after accepting a connection before asking its
    /// `SO_ORIGINAL_DST`, as a busy proxy might (the client may have
    /// half-closed by then).
    #[arg(long, default_value = "0")]
    pub answer_delay_ms: u64,
    /// Before anything else, read the connection until the client's FIN or
    /// reset: the delay then counts from the client's close, and the
    /// answer is asked for strictly after it.
    #[arg(long)]
    pub answer_after_eof: bool,
    /// Also append what was seen of each connection, one JSON line each,
    /// to this file (the client may be gone before the answer is sent).
    #[arg(long)]
    pub log: Option<std::path::PathBuf>,
}

/// `redirect-sample connect` arguments.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Where to connect (repeatable: one connection each, in order, one JSON
    /// line each).
    #[arg(long, required = true)]
    pub to: Vec<SocketAddr>,
    /// Bind this source address first (port 0).
    #[arg(long)]
    pub bind: Option<IpAddr>,
    /// Set this SO_MARK on the socket before connecting (needs
    /// CAP_NET_ADMIN).
    #[arg(long)]
    pub mark: Option<u32>,
    /// Give up after this many milliseconds.
    #[arg(long, default_value = "3000")]
    pub timeout_ms: u64,
    /// Shut down the sending side right after connecting (a half-close,
    /// which sends the FIN at once), then read the answer.
    #[arg(long)]
    pub shutdown_write: bool,
    /// Bind this source port first (with the `--bind` address, or the
    /// wildcard address of the destination's family).
    #[arg(long)]
    pub bind_port: Option<u16>,
    /// Set SO_REUSEADDR before binding.
    #[arg(long)]
    pub reuseaddr: bool,
    /// Send a request line, then close at once without reading an answer:
    /// `close` (FIN) or `reset` (`SO_LINGER` 0, RST).
    #[arg(long, value_enum)]
    pub send_then: Option<EarlyClose>,
}

/// How `--send-then` ends the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EarlyClose {
    /// `close()`: a FIN.
    Close,
    /// `SO_LINGER` 0, then `close()`: a reset.
    Reset,
}

/// What a sample server saw of one connection.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerView {
    /// The server's `--name`.
    pub server: String,
    /// The accepted socket's local address.
    pub local: String,
    /// Its peer.
    pub peer: String,
    /// `SO_ORIGINAL_DST`, or `None` if the call failed.
    pub orig_dst: Option<String>,
    /// The error of the call, if it failed.
    pub orig_dst_error: Option<String>,
}

/// What the sample client saw.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientView {
    /// The connect succeeded and the server answered.
    pub ok: bool,
    /// Error text otherwise.
    pub error: Option<String>,
    /// `getsockname()` after connect.
    pub local: Option<String>,
    /// `getpeername()` after connect.
    pub peer: Option<String>,
    /// The server's answer.
    pub reply: Option<ServerView>,
}

/// Serves until killed. Prints `ready` once every listener is bound.
pub fn run_server(args: &ServerArgs) -> Result<()> {
    let mut listeners = Vec::new();
    for addr in &args.listen {
        listeners.push(listen(*addr).with_context(|| format!("listening on {addr}"))?);
    }
    let mut udp = Vec::new();
    for addr in &args.udp {
        udp.push(bind_udp(*addr).with_context(|| format!("UDP on {addr}"))?);
    }
    println!("ready");
    std::io::stdout().flush()?;
    let log = match &args.log {
        Some(p) => Some(std::sync::Arc::new(std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("--log {}", p.display()))?,
        ))),
        None => None,
    };
    let mut threads = Vec::new();
    for sock in udp {
        let name = args.name.clone();
        let log = log.clone();
        threads.push(std::thread::spawn(move || {
            serve_udp(&name, &sock, log.as_deref())
        }));
    }
    for l in listeners {
        let name = args.name.clone();
        let delay = Duration::from_millis(args.answer_delay_ms);
        let after_eof = args.answer_after_eof;
        let log = log.clone();
        threads.push(std::thread::spawn(move || {
            for stream in l.incoming().flatten() {
                if after_eof {
                    let _ = std::io::copy(&mut &stream, &mut std::io::sink());
                }
                std::thread::sleep(delay);
                let _ = answer(&name, stream, log.as_deref());
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// A listener on `addr`; IPv6 ones are IPv6-only, so `0.0.0.0:P` and
/// `[::]:P` can be listened on side by side, as a dual-stack proxy does.
fn listen(addr: SocketAddr) -> Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// A UDP socket bound to `addr` (IPv6-only for IPv6, as [`listen`]).
fn bind_udp(addr: SocketAddr) -> Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// Answers every datagram on `sock` with a [`ServerView`]: the socket's
/// own address and the datagram's source. The socket is bound to one
/// address, so the answer leaves from the address the datagram was sent
/// to (as a nameserver's does).
fn serve_udp(name: &str, sock: &UdpSocket, log: Option<&std::sync::Mutex<std::fs::File>>) {
    let local = sock
        .local_addr()
        .map_or_else(|e| format!("({e})"), |a| a.to_string());
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let view = ServerView {
            server: name.to_string(),
            local: local.clone(),
            peer: from.to_string(),
            orig_dst: None,
            orig_dst_error: None,
        };
        let Ok(mut line) = serde_json::to_string(&view) else {
            continue;
        };
        line.push('\n');
        if let Some(log) = log {
            let mut f = log.lock().unwrap_or_else(|e| e.into_inner());
            let _ = f.write_all(line.as_bytes());
        }
        let mut answer = dns_answer_header(&buf[..n]).to_vec();
        answer.extend_from_slice(line.as_bytes());
        let _ = sock.send_to(&answer, from);
    }
}

/// Length of a DNS message header.
const DNS_HEADER: usize = 12;

/// A DNS query for `probe.test. IN A` with id `id`, recursion desired.
fn dns_query(id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32);
    q.extend_from_slice(&id.to_be_bytes());
    // Flags (RD), one question, no records.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(b"\x05probe\x04test\x00");
    // QTYPE A, QCLASS IN.
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

/// The header of a DNS answer to `query`: its id (the first two bytes;
/// zero if shorter), QR and RA set, no question and no record. A sample
/// server's UDP answer is this header, then its JSON line: a resolver
/// (and redirect's kernel side, which pairs answers with queries by id)
/// sees a DNS answer to the query.
fn dns_answer_header(query: &[u8]) -> [u8; DNS_HEADER] {
    let mut h = [0u8; DNS_HEADER];
    if let [a, b, ..] = query {
        h[0] = *a;
        h[1] = *b;
    }
    h[2] = 0x81;
    h[3] = 0x80;
    h
}

fn answer(
    name: &str,
    mut stream: TcpStream,
    log: Option<&std::sync::Mutex<std::fs::File>>,
) -> Result<()> {
    let (orig_dst, orig_dst_error) = match redirect::original_dst(&stream) {
        Ok(a) => (Some(a.to_string()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    // A reset connection has no peer any more: say so rather than fail.
    let addr = |a: std::io::Result<SocketAddr>| match a {
        Ok(a) => a.to_string(),
        Err(e) => format!("({e})"),
    };
    let view = ServerView {
        server: name.to_string(),
        local: addr(stream.local_addr()),
        peer: addr(stream.peer_addr()),
        orig_dst,
        orig_dst_error,
    };
    let mut line = serde_json::to_string(&view)?;
    line.push('\n');
    if let Some(log) = log {
        let mut f = log.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all(line.as_bytes())?;
    }
    stream.write_all(line.as_bytes())?;
    Ok(())
}

fn set_mark(sock: &socket2::Socket, mark: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setsockopt with a u32 we own and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Connects to every `--to` in turn and prints one [`ClientView`] JSON line
/// for each.
pub fn print_connects(args: &ConnectArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for to in &args.to {
        let line = serde_json::to_string(&connect(args, *to))?;
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Connects once to `to` and describes what happened.
pub fn connect(args: &ConnectArgs, to: SocketAddr) -> ClientView {
    match try_connect(args, to) {
        Ok(v) => v,
        Err(e) => ClientView {
            ok: false,
            error: Some(format!("{e:#}")),
            local: None,
            peer: None,
            reply: None,
        },
    }
}

fn try_connect(args: &ConnectArgs, to: SocketAddr) -> Result<ClientView> {
    use socket2::{Domain, Socket, Type};
    let timeout = Duration::from_millis(args.timeout_ms);
    let sock = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    if args.bind.is_some() || args.bind_port.is_some() {
        let ip = args.bind.unwrap_or(match to {
            SocketAddr::V4(_) => IpAddr::from([0u8; 4]),
            SocketAddr::V6(_) => IpAddr::from([0u16; 8]),
        });
        let at = SocketAddr::new(ip, args.bind_port.unwrap_or(0));
        sock.set_reuse_address(args.reuseaddr)?;
        sock.bind(&at.into())
            .with_context(|| format!("bind {at}"))?;
    }
    if let Some(mark) = args.mark {
        set_mark(&sock, mark).with_context(|| format!("SO_MARK {mark:#x}"))?;
    }
    sock.connect_timeout(&to.into(), timeout)
        .with_context(|| format!("connect {to}"))?;
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(timeout))?;
    let local = stream.local_addr()?.to_string();
    let peer = stream.peer_addr()?.to_string();
    if let Some(how) = args.send_then {
        (&stream).write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        if how == EarlyClose::Reset {
            socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
        }
        drop(stream);
        return Ok(ClientView {
            ok: true,
            error: None,
            local: Some(local),
            peer: Some(peer),
            reply: None,
        });
    }
    if args.shutdown_write {
        stream
            .shutdown(std::net::Shutdown::Write)
            .context("shutdown(SHUT_WR)")?;
    }
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("reading the server's answer")?;
    let reply: ServerView =
        serde_json::from_str(line.trim()).with_context(|| format!("server answered {line:?}"))?;
    Ok(ClientView {
        ok: true,
        error: None,
        local: Some(local),
        peer: Some(peer),
        reply: Some(reply),
    })
}

/// One `redirect-sample probe` target: a protocol and an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// How to reach it.
    pub proto: Proto,
    /// Where.
    pub addr: SocketAddr,
}

/// How a probe reaches its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Proto {
    /// TCP: `connect()`, then read the server's line (as `connect` does).
    Tcp,
    /// UDP on an unconnected socket: `sendto()`, then `recvfrom()`.
    Udp,
    /// UDP on a connected socket: `connect()`, `getpeername()`, `send()`,
    /// then `recvfrom()`.
    UdpConnected,
}

impl Proto {
    /// The prefix of a [`Target`] (`tcp`, `udp`, `udp-connected`).
    pub const fn prefix(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::UdpConnected => "udp-connected",
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.proto.prefix(), self.addr)
    }
}

impl std::str::FromStr for Target {
    type Err = String;

    /// `tcp:ADDR`, `udp:ADDR` or `udp-connected:ADDR` (`[IPv6]:PORT`).
    fn from_str(s: &str) -> Result<Target, String> {
        let (proto, addr) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: not PROTO:ADDRESS:PORT"))?;
        let proto = [Proto::Tcp, Proto::Udp, Proto::UdpConnected]
            .into_iter()
            .find(|p| p.prefix() == proto)
            .ok_or_else(|| format!("{s:?}: the protocol is tcp, udp or udp-connected"))?;
        let addr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
        Ok(Target { proto, addr })
    }
}

/// `redirect-sample probe` arguments.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// What to reach, in order, one socket and one JSON line each:
    /// `tcp:ADDR`, `udp:ADDR` (unconnected: `sendto`, `recvfrom`) or
    /// `udp-connected:ADDR` (`connect`, `send`, `recvfrom`) (repeatable).
    /// Over UDP a DNS query is sent, and the answer must carry its id.
    #[arg(long, required = true)]
    pub to: Vec<Target>,
    /// Bind this source address first (port 0).
    #[arg(long)]
    pub bind: Option<IpAddr>,
    /// Set this SO_MARK on every socket (needs CAP_NET_ADMIN).
    #[arg(long)]
    pub mark: Option<u32>,
    /// Give up on a target after this many milliseconds (a UDP answer that
    /// never comes: `errno` 11, EAGAIN).
    #[arg(long, default_value = "3000")]
    pub timeout_ms: u64,
}

/// What a probe saw of one target.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeView {
    /// The target's protocol.
    pub proto: Proto,
    /// The target's address.
    pub to: String,
    /// The server answered.
    pub ok: bool,
    /// Error text otherwise.
    pub error: Option<String>,
    /// The OS error number of the failed call, if one failed.
    pub errno: Option<i32>,
    /// `getsockname()`: after connect (TCP, connected UDP) or after the
    /// send (unconnected UDP).
    pub local: Option<String>,
    /// `getpeername()` after connect (TCP, connected UDP).
    pub peer: Option<String>,
    /// UDP: the source address `recvfrom()` gave for the answer.
    pub reply_from: Option<String>,
    /// The server's answer.
    pub reply: Option<ServerView>,
}

/// Probes every `--to` in turn and prints one [`ProbeView`] JSON line for
/// each. Every UDP socket stays open until the last probe is done, so no
/// two of them have the same port: conntrack (under iptables) would take
/// a later one's datagrams for the earlier one's flow, NAT and all.
pub fn print_probes(args: &ProbeArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut open = Vec::new();
    for to in &args.to {
        let line = serde_json::to_string(&probe_keeping(args, *to, &mut open))?;
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Probes `to` once and describes what happened.
pub fn probe(args: &ProbeArgs, to: Target) -> ProbeView {
    probe_keeping(args, to, &mut Vec::new())
}

/// [`probe`], leaving a UDP socket open in `open`.
fn probe_keeping(args: &ProbeArgs, to: Target, open: &mut Vec<UdpSocket>) -> ProbeView {
    let failed = |e: anyhow::Error| ProbeView {
        proto: to.proto,
        to: to.addr.to_string(),
        ok: false,
        errno: e
            .chain()
            .find_map(|c| c.downcast_ref::<std::io::Error>())
            .and_then(std::io::Error::raw_os_error),
        error: Some(format!("{e:#}")),
        local: None,
        peer: None,
        reply_from: None,
        reply: None,
    };
    match to.proto {
        Proto::Tcp => {
            let connect_args = ConnectArgs {
                to: Vec::new(),
                bind: args.bind,
                mark: args.mark,
                timeout_ms: args.timeout_ms,
                shutdown_write: false,
                bind_port: None,
                reuseaddr: false,
                send_then: None,
            };
            match try_connect(&connect_args, to.addr) {
                Ok(v) => ProbeView {
                    proto: to.proto,
                    to: to.addr.to_string(),
                    ok: v.ok,
                    error: v.error,
                    errno: None,
                    local: v.local,
                    peer: v.peer,
                    reply_from: None,
                    reply: v.reply,
                },
                Err(e) => failed(e),
            }
        }
        Proto::Udp | Proto::UdpConnected => {
            try_udp(args, to.addr, to.proto == Proto::UdpConnected, open).unwrap_or_else(failed)
        }
    }
}

/// `setsockopt(level, name, 1)`.
fn set_int_opt(
    sock: &socket2::Socket,
    level: libc::c_int,
    name: libc::c_int,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with an int we own and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn try_udp(
    args: &ProbeArgs,
    to: SocketAddr,
    connected: bool,
    open: &mut Vec<UdpSocket>,
) -> Result<ProbeView> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(to), Type::DGRAM, None)?;
    // ICMP errors (port unreachable) end the wait at once, also on an
    // unconnected socket: no probe waits for its timeout for nothing.
    set_int_opt(&sock, libc::SOL_IP, libc::IP_RECVERR).context("IP_RECVERR")?;
    if to.is_ipv6() {
        set_int_opt(&sock, libc::SOL_IPV6, libc::IPV6_RECVERR).context("IPV6_RECVERR")?;
    }
    if let Some(ip) = args.bind {
        let at = SocketAddr::new(ip, 0);
        sock.bind(&at.into())
            .with_context(|| format!("bind {at}"))?;
    }
    if let Some(mark) = args.mark {
        set_mark(&sock, mark).with_context(|| format!("SO_MARK {mark:#x}"))?;
    }
    let sock: UdpSocket = sock.into();
    open.push(sock.try_clone().context("dup")?);
    sock.set_read_timeout(Some(Duration::from_millis(args.timeout_ms)))?;
    // A DNS query: redirect pairs the proxy's answers with queries by
    // their DNS id. One per process run and target, so that no two
    // probes of a run share one.
    static SEQ: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let id = (std::process::id() as u16)
        .wrapping_mul(0x9e37)
        .wrapping_add(SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let query = dns_query(id);
    let peer = if connected {
        sock.connect(to).with_context(|| format!("connect {to}"))?;
        let peer = sock.peer_addr().context("getpeername")?.to_string();
        sock.send(&query).with_context(|| format!("send to {to}"))?;
        Some(peer)
    } else {
        sock.send_to(&query, to)
            .with_context(|| format!("sendto {to}"))?;
        None
    };
    let local = sock.local_addr().context("getsockname")?.to_string();
    let mut buf = [0u8; 2048];
    let (n, from) = sock
        .recv_from(&mut buf)
        .context("reading the server's answer")?;
    let answer = &buf[..n];
    if answer.len() < DNS_HEADER || answer[..2] != id.to_be_bytes() {
        bail!("the answer is not a DNS answer to query id {id:#06x}: {answer:?}");
    }
    let text = String::from_utf8_lossy(&answer[DNS_HEADER..]);
    let reply: ServerView =
        serde_json::from_str(text.trim()).with_context(|| format!("server answered {text:?}"))?;
    Ok(ProbeView {
        proto: if connected {
            Proto::UdpConnected
        } else {
            Proto::Udp
        },
        to: to.to_string(),
        ok: true,
        error: None,
        errno: None,
        local: Some(local),
        peer,
        reply_from: Some(from.to_string()),
        reply: Some(reply),
    })
}

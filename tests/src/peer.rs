//! Sample peers for the demo and the tests: a server that behaves like a
//! transparent proxy (accept, `SO_ORIGINAL_DST`, answer one line), and a
//! client that connects and reports what it saw. Both speak one JSON line.
//! The `redirect-sample` binary (`server`, `connect`) runs them in a pod.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

/// `redirect-sample server` arguments.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Name put in every answer (which listener got the connection).
    #[arg(long)]
    pub name: String,
    /// Addresses to listen on (repeatable).
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddr>,
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

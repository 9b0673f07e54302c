//! Adversarial clients and a many-connection proxy for the real-kernel
//! tests of `tests/tests/lifetime.rs`: what real applications do that a
//! polite sample client does not (deferred Fast Open connects, tens of
//! thousands of back-to-back or concurrent connections). Each subcommand
//! prints one JSON line: its report.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::json;
use socket2::{Domain, Socket, Type};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One deferred Fast Open connect (`TCP_FASTOPEN_CONNECT` +
    /// `TCP_FASTOPEN_NO_COOKIE`: `connect()` returns at once, the SYN waits
    /// for the first write) to `--to`; meanwhile `--churn` other deferred
    /// connects to `--churn-to` are made and closed on the same CPU; after
    /// `--hold-ms` the first one writes and reads the proxy's answer line.
    TfoChurn {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        churn_to: SocketAddr,
        #[arg(long)]
        churn: u64,
        #[arg(long)]
        hold_ms: u64,
    },
    /// `--count` short connections back to back, alternating `--to4` and
    /// `--to6`: connect, send a byte, read one answer, close (after the
    /// proxy closed, unless `--app-closes-first`). Reports the failures and
    /// every connection slower than `--slow-ms`.
    Alternate {
        #[arg(long)]
        to4: SocketAddr,
        #[arg(long)]
        to6: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value = "1000")]
        slow_ms: u64,
        #[arg(long, default_value = "15000")]
        timeout_ms: u64,
        #[arg(long)]
        app_closes_first: bool,
    },
    /// Opens `--count` connections to each `--to` and keeps them open until
    /// standard input closes; prints the report once all are open (or
    /// failed).
    Hold {
        #[arg(long, required = true)]
        to: Vec<SocketAddr>,
        #[arg(long)]
        count: u64,
    },
    /// Run as root: creates a socket with real IDs `--real` and effective
    /// (and file system) IDs `--socket-as`, then connects to `--to` with
    /// effective IDs `--connect-as`, and prints the server's answer line.
    /// IDs are `UID:GID`.
    CredsConnect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        real: String,
        #[arg(long)]
        socket_as: String,
        #[arg(long)]
        connect_as: String,
    },
    /// A transparent proxy for many connections: asks every accepted
    /// connection's `SO_ORIGINAL_DST` at once and counts the answers. With
    /// `--keep`, keeps every connection open; otherwise reads a byte,
    /// answers the original destination and closes, after a random wait of
    /// up to `--hold-max-ms`. Prints `ready`, then its report to
    /// `--report` every 100 ms. With `--reuseport`, several such proxies
    /// share the ports (each holds fewer sockets than the open-file limit).
    Proxy {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        report: std::path::PathBuf,
        #[arg(long)]
        keep: bool,
        #[arg(long, default_value = "0")]
        hold_max_ms: u64,
        #[arg(long)]
        reuseport: bool,
    },
}

fn main() -> Result<()> {
    raise_fd_limit();
    match Cli::parse().cmd {
        Cmd::TfoChurn {
            to,
            churn_to,
            churn,
            hold_ms,
        } => tfo_churn(to, churn_to, churn, hold_ms),
        Cmd::Alternate {
            to4,
            to6,
            count,
            slow_ms,
            timeout_ms,
            app_closes_first,
        } => alternate(to4, to6, count, slow_ms, timeout_ms, app_closes_first),
        Cmd::Hold { to, count } => hold(&to, count),
        Cmd::CredsConnect {
            to,
            real,
            socket_as,
            connect_as,
        } => creds_connect(to, &real, &socket_as, &connect_as),
        Cmd::Proxy {
            listen,
            report,
            keep,
            hold_max_ms,
            reuseport,
        } => proxy(&listen, &report, keep, hold_max_ms, reuseport),
    }
}

/// Raises the soft limit on open files to the hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn setsockopt_int(sock: &Socket, level: i32, name: i32, v: i32) -> std::io::Result<()> {
    // SAFETY: setsockopt with an int we own and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&v as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A socket whose `connect()` to `to` returns at once without a SYN.
fn deferred_connect(to: SocketAddr) -> Result<Socket> {
    const TCP_FASTOPEN_CONNECT: i32 = 30;
    const TCP_FASTOPEN_NO_COOKIE: i32 = 34;
    let sock = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    setsockopt_int(&sock, libc::IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
        .context("TCP_FASTOPEN_CONNECT")?;
    setsockopt_int(&sock, libc::IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
        .context("TCP_FASTOPEN_NO_COOKIE")?;
    sock.connect(&to.into())
        .with_context(|| format!("deferred connect to {to}"))?;
    Ok(sock)
}

fn pin_to_cpu0() -> Result<()> {
    // SAFETY: a zeroed cpu_set_t with bit 0 set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn tfo_churn(to: SocketAddr, churn_to: SocketAddr, churn: u64, hold_ms: u64) -> Result<()> {
    pin_to_cpu0()?;
    let start = Instant::now();
    let first = deferred_connect(to)?;
    let peer_before_write = first.peer_addr().ok().and_then(|a| a.as_socket());
    let mut churn_errors = 0u64;
    for _ in 0..churn {
        match deferred_connect(churn_to) {
            Ok(s) => drop(s),
            Err(_) => churn_errors += 1,
        }
    }
    let churn_ms = start.elapsed().as_millis() as u64;
    if let Some(rest) = Duration::from_millis(hold_ms).checked_sub(start.elapsed()) {
        std::thread::sleep(rest);
    }
    let mut stream: TcpStream = first.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let outcome = (|| -> Result<serde_json::Value> {
        stream.write_all(b"x")?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        Ok(serde_json::from_str(line.trim())?)
    })();
    let (reply, error) = match outcome {
        Ok(v) => (v, None),
        Err(e) => (serde_json::Value::Null, Some(format!("{e:#}"))),
    };
    println!(
        "{}",
        json!({
            "reply": reply,
            "error": error,
            "peer_before_write": peer_before_write.map(|a| a.to_string()),
            "churn_ms": churn_ms,
            "churn_errors": churn_errors,
        })
    );
    Ok(())
}

fn alternate(
    to4: SocketAddr,
    to6: SocketAddr,
    count: u64,
    slow_ms: u64,
    timeout_ms: u64,
    app_closes_first: bool,
) -> Result<()> {
    let timeout = Duration::from_millis(timeout_ms);
    let mut failures = Vec::new();
    let mut slow = Vec::new();
    let mut wrong = 0u64;
    let start = Instant::now();
    for i in 0..count {
        let to = if i % 2 == 0 { to4 } else { to6 };
        let t = Instant::now();
        let mut local = None;
        let r = (|| -> Result<()> {
            let sock = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
            sock.connect_timeout(&to.into(), timeout)?;
            let mut s: TcpStream = sock.into();
            local = s.local_addr().ok();
            s.set_read_timeout(Some(timeout))?;
            s.write_all(b"x")?;
            let mut buf = [0u8; 128];
            let n = s.read(&mut buf)?;
            if !buf[..n].starts_with(to.to_string().as_bytes()) {
                wrong += 1;
            }
            if !app_closes_first {
                // Until the proxy's FIN: the proxy closes first.
                while s.read(&mut buf)? > 0 {}
            }
            Ok(())
        })();
        let ms = t.elapsed().as_millis() as u64;
        if let Err(e) = r {
            failures.push(json!({"i": i, "to": to.to_string(), "local": local.map(|l| l.to_string()), "error": format!("{e:#}"), "ms": ms}));
        } else if ms >= slow_ms {
            slow.push(json!({"i": i, "to": to.to_string(), "local": local.map(|l| l.to_string()), "ms": ms}));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "count": count,
            "failures": failures,
            "slow": slow,
            "wrong_destination": wrong,
            "rate": (count as f64 / secs).round(),
        })
    );
    Ok(())
}

fn hold(targets: &[SocketAddr], count: u64) -> Result<()> {
    let mut open = Vec::new();
    let mut refused = 0u64;
    let mut errors: Vec<String> = Vec::new();
    for to in targets {
        for _ in 0..count {
            let r = Socket::new(Domain::for_address(*to), Type::STREAM, None)
                .and_then(|s| s.connect(&(*to).into()).map(|()| s));
            match r {
                Ok(s) => open.push(s),
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => refused += 1,
                Err(e) => {
                    if errors.len() < 10 {
                        errors.push(format!("{to}: {e}"));
                    }
                }
            }
        }
    }
    println!(
        "{}",
        json!({"connected": open.len(), "refused_eperm": refused, "errors": errors})
    );
    std::io::stdout().flush()?;
    // Hold until the test closes our standard input.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(open);
    Ok(())
}

fn ids(s: &str) -> Result<(u32, u32)> {
    let (u, g) = s.split_once(':').context("IDs are UID:GID")?;
    Ok((u.parse()?, g.parse()?))
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc != 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn creds_connect(to: SocketAddr, real: &str, socket_as: &str, connect_as: &str) -> Result<()> {
    let (ruid, rgid) = ids(real)?;
    let (suid, sgid) = ids(socket_as)?;
    let (cuid, cgid) = ids(connect_as)?;
    const KEEP: libc::uid_t = libc::uid_t::MAX;
    // SAFETY: credential syscalls on this process; the saved UID stays 0 so
    // the effective IDs can be switched again for the connect.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        check(libc::setresgid(rgid, sgid, 0), "setresgid (socket)")?;
        check(libc::setresuid(ruid, suid, 0), "setresuid (socket)")?;
    }
    let sock = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    // SAFETY: as above.
    unsafe {
        check(libc::setresuid(KEEP, 0, KEEP), "back to effective root")?;
        check(libc::setresgid(KEEP, cgid, KEEP), "setresgid (connect)")?;
        check(libc::setresuid(KEEP, cuid, KEEP), "setresuid (connect)")?;
    }
    sock.connect_timeout(&to.into(), Duration::from_secs(3))
        .with_context(|| format!("connect {to}"))?;
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    println!("{}", line.trim());
    Ok(())
}

#[derive(Default)]
struct ProxyStats {
    accepted: AtomicU64,
    accepted_v6: AtomicU64,
    orig_ok: AtomicU64,
    orig_missing: AtomicU64,
    orig_self: AtomicU64,
}

fn proxy(
    listen: &[SocketAddr],
    report: &std::path::Path,
    keep: bool,
    hold_max_ms: u64,
    reuseport: bool,
) -> Result<()> {
    let stats = Arc::new(ProxyStats::default());
    let kept: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let closing: Arc<Mutex<Vec<(Instant, TcpStream)>>> = Arc::default();
    let mut listeners = Vec::new();
    for addr in listen {
        let sock = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
        if addr.is_ipv6() {
            sock.set_only_v6(true)?;
        }
        sock.set_reuse_address(true)?;
        if reuseport {
            sock.set_reuse_port(true)?;
        }
        sock.bind(&(*addr).into())
            .with_context(|| format!("bind {addr}"))?;
        sock.listen(4096)?;
        listeners.push(TcpListener::from(sock));
    }
    {
        let closing = closing.clone();
        std::thread::spawn(move || {
            loop {
                let now = Instant::now();
                // Dropping a stream closes it.
                closing.lock().unwrap().retain(|(t, _)| *t > now);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
    }
    for l in listeners {
        let (stats, kept, closing) = (stats.clone(), kept.clone(), closing.clone());
        std::thread::spawn(move || {
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            for stream in l.incoming() {
                let Ok(mut s) = stream else { continue };
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                if s.local_addr().is_ok_and(|a| a.is_ipv6()) {
                    stats.accepted_v6.fetch_add(1, Ordering::Relaxed);
                }
                let orig = redirect::original_dst(&s);
                let answer = match &orig {
                    Ok(a) if s.local_addr().is_ok_and(|l| l == *a) => {
                        stats.orig_self.fetch_add(1, Ordering::Relaxed);
                        format!("self {a}\n")
                    }
                    Ok(a) => {
                        stats.orig_ok.fetch_add(1, Ordering::Relaxed);
                        format!("{a}\n")
                    }
                    Err(e) => {
                        stats.orig_missing.fetch_add(1, Ordering::Relaxed);
                        format!("missing {e}\n")
                    }
                };
                if keep {
                    kept.lock().unwrap().push(s);
                    continue;
                }
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.read(&mut [0u8; 64]);
                let _ = s.write_all(answer.as_bytes());
                let wait = if hold_max_ms == 0 {
                    0
                } else {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed % hold_max_ms
                };
                if wait == 0 {
                    drop(s);
                } else {
                    closing
                        .lock()
                        .unwrap()
                        .push((Instant::now() + Duration::from_millis(wait), s));
                }
            }
        });
    }
    println!("ready");
    std::io::stdout().flush()?;
    loop {
        let line = json!({
            "accepted": stats.accepted.load(Ordering::Relaxed),
            "accepted_v6": stats.accepted_v6.load(Ordering::Relaxed),
            "orig_ok": stats.orig_ok.load(Ordering::Relaxed),
            "orig_missing": stats.orig_missing.load(Ordering::Relaxed),
            "orig_self": stats.orig_self.load(Ordering::Relaxed),
        });
        let tmp = report.with_extension("tmp");
        std::fs::write(&tmp, format!("{line}\n"))?;
        std::fs::rename(&tmp, report)?;
        std::thread::sleep(Duration::from_millis(100));
    }
}

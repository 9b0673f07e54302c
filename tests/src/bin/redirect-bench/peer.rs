//! The two workload processes, started inside the pod by the harness:
//!
//! - the proxy: accept, `getsockopt(SO_ORIGINAL_DST)` through
//!   [`redirect::original_dst`], then either a 1-byte reply and close
//!   (`setup`) or an echo loop (`echo`);
//! - the client: a single thread that opens connections one after the other
//!   (`setup`) or ping-pongs over one established connection (`rr`), records
//!   every latency and prints one JSON summary.
//!
//! The 1-byte reply says whether `SO_ORIGINAL_DST` answered (`b'1'`) or not
//! (`b'0'`), so the harness can check that every captured connection really
//! went through the proxy with its original destination, and that the
//! direct runs did not.

use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// What the proxy does with an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    /// `SO_ORIGINAL_DST`, 1-byte reply, close.
    Setup,
    /// `SO_ORIGINAL_DST`, 1-byte reply, then echo until the client closes.
    Echo,
}

/// `proxy` arguments.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Listen address.
    #[arg(long, default_value = "0.0.0.0:15001")]
    pub listen: SocketAddr,
    /// What to do per connection.
    #[arg(long, value_enum, default_value = "setup")]
    pub mode: ProxyMode,
}

/// What the client measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClientMode {
    /// New connection each time: connect, read the reply, read EOF, close.
    Setup,
    /// One established connection: `--size` bytes out, the same back.
    Rr,
}

/// `client` arguments.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Where the application connects.
    #[arg(long)]
    pub to: SocketAddr,
    /// What to measure.
    #[arg(long, value_enum, default_value = "setup")]
    pub mode: ClientMode,
    /// Stop after this many measured operations (connections or
    /// transactions); 0 means no limit.
    #[arg(long, default_value = "0")]
    pub count: u64,
    /// Stop after this many seconds (whichever comes first).
    #[arg(long, default_value = "5")]
    pub seconds: f64,
    /// Unmeasured operations first.
    #[arg(long, default_value = "200")]
    pub warmup: u64,
    /// Message size in `rr` mode.
    #[arg(long, default_value = "64")]
    pub size: usize,
    /// Give up after this many failed operations.
    #[arg(long, default_value = "100")]
    pub max_errors: u64,
    /// Bind this source address first (`IP_BIND_ADDRESS_NO_PORT`, as
    /// redirect's `bpf_bind` does); for profiling only.
    #[arg(long)]
    pub bind: Option<std::net::Ipv4Addr>,
}

/// Latency percentiles, nanoseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Slowest.
    pub max: u64,
    /// Mean.
    pub mean: u64,
}

/// What the client prints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientReport {
    /// Measured operations that succeeded.
    pub ops: u64,
    /// Wall time of the measured part, seconds.
    pub elapsed_s: f64,
    /// `ops / elapsed_s`.
    pub rate: f64,
    /// Per-operation latency.
    pub latency_ns: Latency,
    /// Operations slower than 100 ms (a lost SYN costs 1 s).
    pub slow_100ms: u64,
    /// Replies saying `SO_ORIGINAL_DST` answered.
    pub orig_dst_ok: u64,
    /// Replies saying it did not.
    pub orig_dst_missing: u64,
    /// Failed operations, by error kind.
    pub errors: BTreeMap<String, u64>,
    /// The first error, verbatim.
    pub first_error: Option<String>,
    /// CPU time of the client's thread over the measured part, ns
    /// (`/proc/thread-self/schedstat`).
    pub client_cpu_ns: u64,
    /// Operations before the measured part (the proxy's CPU time covers
    /// them too).
    pub warmup_ops: u64,
    /// CPU time of the proxy's thread over the client's run, ns (filled in
    /// by the harness; warm-up included).
    #[serde(default)]
    pub proxy_cpu_ns: u64,
}

/// CPU time a thread has run, ns (first field of `schedstat`).
pub fn schedstat_ns(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn own_cpu_ns() -> u64 {
    schedstat_ns("/proc/thread-self/schedstat")
}

/// Runs the proxy until killed. Prints `ready` once listening.
pub fn run_proxy(args: &ProxyArgs) -> Result<()> {
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("listening on {}", args.listen))?;
    println!("ready");
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        match args.mode {
            ProxyMode::Setup => {
                let _ = serve_setup(stream);
            }
            // One connection at a time, on this thread, so that the
            // harness's reading of this thread's CPU time covers it.
            ProxyMode::Echo => {
                let _ = serve_echo(stream);
            }
        }
    }
    Ok(())
}

fn status_byte(stream: &TcpStream) -> u8 {
    match redirect::original_dst(stream) {
        Ok(_) => b'1',
        Err(_) => b'0',
    }
}

fn serve_setup(mut stream: TcpStream) -> io::Result<()> {
    let b = status_byte(&stream);
    stream.write_all(&[b])
    // Dropped here: a normal close, so this side holds the TIME_WAIT.
}

fn serve_echo(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let b = status_byte(&stream);
    stream.write_all(&[b])?;
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

/// Runs the client and returns its report.
pub fn run_client(args: &ClientArgs) -> ClientReport {
    match args.mode {
        ClientMode::Setup => client_setup(args),
        ClientMode::Rr => client_rr(args),
    }
}

/// A connected socket, bound to `bind` first if given.
fn connect(to: SocketAddr, bind: Option<std::net::Ipv4Addr>) -> io::Result<TcpStream> {
    let Some(src) = bind else {
        return TcpStream::connect(to);
    };
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(to) = to else {
        return Err(io::Error::other("--bind needs an IPv4 destination"));
    };
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain syscalls; the fd is owned by the TcpStream from here on.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let src = sin(src, 0);
        let dst = sin(*to.ip(), to.port());
        if libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
            || libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), len) != 0
            || libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// One connection: connect, read the 1-byte reply, read EOF, close.
fn one_setup(to: SocketAddr, bind: Option<std::net::Ipv4Addr>) -> io::Result<u8> {
    let mut s = connect(to, bind)?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    let mut rest = [0u8; 8];
    let n = s.read(&mut rest)?;
    if n != 0 {
        return Err(io::Error::other("the proxy sent more than one byte"));
    }
    Ok(b[0])
}

struct Recorder {
    lat: Vec<u32>,
    report: ClientReport,
}

impl Recorder {
    fn new(capacity: u64) -> Recorder {
        Recorder {
            lat: Vec::with_capacity(capacity.min(4_000_000) as usize),
            report: ClientReport::default(),
        }
    }

    fn error(&mut self, e: &io::Error) {
        let kind = match e.raw_os_error() {
            Some(code) => format!("{:?} (errno {code})", e.kind()),
            None => format!("{:?}", e.kind()),
        };
        *self.report.errors.entry(kind).or_default() += 1;
        if self.report.first_error.is_none() {
            self.report.first_error = Some(e.to_string());
        }
    }

    fn n_errors(&self) -> u64 {
        self.report.errors.values().sum()
    }

    fn finish(mut self, elapsed: Duration, cpu_ns: u64) -> ClientReport {
        let r = &mut self.report;
        r.client_cpu_ns = cpu_ns;
        r.ops = self.lat.len() as u64;
        r.elapsed_s = elapsed.as_secs_f64();
        r.rate = if r.elapsed_s > 0.0 {
            r.ops as f64 / r.elapsed_s
        } else {
            0.0
        };
        r.slow_100ms = self.lat.iter().filter(|&&l| l >= 100_000_000).count() as u64;
        let mut v = self.lat;
        v.sort_unstable();
        if !v.is_empty() {
            let pick = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)] as u64;
            r.latency_ns = Latency {
                p50: pick(0.50),
                p90: pick(0.90),
                p99: pick(0.99),
                p999: pick(0.999),
                max: *v.last().expect("not empty") as u64,
                mean: (v.iter().map(|&x| x as u64).sum::<u64>()) / v.len() as u64,
            };
        }
        self.report
    }
}

fn nanos(d: Duration) -> u32 {
    u32::try_from(d.as_nanos()).unwrap_or(u32::MAX)
}

fn client_setup(args: &ClientArgs) -> ClientReport {
    let mut rec = Recorder::new(args.count.max(1000));
    for _ in 0..args.warmup {
        if let Err(e) = one_setup(args.to, args.bind) {
            rec.error(&e);
            if rec.n_errors() >= args.max_errors {
                return rec.finish(Duration::ZERO, 0);
            }
        }
    }
    rec.report.warmup_ops = args.warmup;
    let cpu0 = own_cpu_ns();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut t0 = start;
    loop {
        let r = one_setup(args.to, args.bind);
        let t1 = Instant::now();
        match r {
            Ok(b) => {
                rec.lat.push(nanos(t1 - t0));
                if b == b'1' {
                    rec.report.orig_dst_ok += 1;
                } else {
                    rec.report.orig_dst_missing += 1;
                }
            }
            Err(e) => {
                rec.error(&e);
                if rec.n_errors() >= args.max_errors {
                    break;
                }
            }
        }
        if (args.count > 0 && rec.lat.len() as u64 >= args.count) || t1 >= deadline {
            break;
        }
        t0 = t1;
    }
    let end = Instant::now();
    let cpu = own_cpu_ns().saturating_sub(cpu0);
    rec.finish(end - start, cpu)
}

fn client_rr(args: &ClientArgs) -> ClientReport {
    let mut rec = Recorder::new(args.count.max(100_000));
    let run = |rec: &mut Recorder| -> io::Result<(Duration, u64)> {
        let mut s = connect(args.to, args.bind)?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        if b[0] == b'1' {
            rec.report.orig_dst_ok += 1;
        } else {
            rec.report.orig_dst_missing += 1;
        }
        let msg = vec![0x5au8; args.size];
        let mut back = vec![0u8; args.size];
        for _ in 0..args.warmup {
            s.write_all(&msg)?;
            s.read_exact(&mut back)?;
        }
        rec.report.warmup_ops = args.warmup;
        let cpu0 = own_cpu_ns();
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(args.seconds);
        let mut t0 = start;
        loop {
            s.write_all(&msg)?;
            s.read_exact(&mut back)?;
            let t1 = Instant::now();
            rec.lat.push(nanos(t1 - t0));
            if (args.count > 0 && rec.lat.len() as u64 >= args.count) || t1 >= deadline {
                return Ok((t1 - start, own_cpu_ns().saturating_sub(cpu0)));
            }
            t0 = t1;
        }
    };
    match run(&mut rec) {
        Ok((elapsed, cpu)) => rec.finish(elapsed, cpu),
        Err(e) => {
            rec.error(&e);
            rec.finish(Duration::ZERO, 0)
        }
    }
}

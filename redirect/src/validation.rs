//! `--run-validation`: what Istio's `istio-validation` init container
//! checks before a pod's proxy starts, that connections are captured.
//!
//! Run as the proxy's UID, it listens on the outbound and inbound proxy
//! ports of the loopback address and connects, once a second, to
//! `127.0.0.6:PROBE_PORT` (`[::6]` where the pod's address is IPv6). The
//! proxy calling its own pod on a loopback address other than 127.0.0.1 is
//! sent to the inbound port (istio's rule 3a), so a listener accepts it and
//! reads `PROBE_PORT` as its original destination: capture is in force. If
//! that has not happened within the timeout, the check fails, and the
//! binary exits with 126 as istio-iptables does.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

/// The exit code istio-iptables uses when validation fails.
pub const EXIT_CODE: i32 = 126;

/// What to check.
#[derive(Clone, Debug)]
pub struct Probe {
    /// The outbound proxy port (`-p`), listened on.
    pub proxy_port: u16,
    /// The inbound capture port (`-z`), listened on.
    pub inbound_port: u16,
    /// The original port the probe connects to (`--iptables-probe-port`).
    pub probe_port: u16,
    /// How long to try (`--probe-timeout`).
    pub timeout: Duration,
    /// Probe over IPv6 (`[::1]`, `[::6]`).
    pub ipv6: bool,
}

/// Why validation failed.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// No listener could be made.
    #[error("no listener available on {addr}: {source}")]
    Listen {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// Nothing came through in time.
    #[error(
        "validation timeout: no connection to {target} reached a listener on port {proxy_port} \
         or {inbound_port} with its original destination within {timeout:?} ({last}); the \
         pod's traffic is not captured: is redirect applied (or the pod registered) and does \
         this run as the proxy's UID?"
    )]
    Timeout {
        /// The probe's destination.
        target: SocketAddr,
        /// The listeners' ports.
        proxy_port: u16,
        /// The listeners' ports.
        inbound_port: u16,
        /// The timeout.
        timeout: Duration,
        /// What the last attempt saw.
        last: String,
    },
}

impl Probe {
    /// Whether the namespace this runs in is IPv6 only: its first address
    /// that is neither loopback nor link-local is IPv6 (istio's host IP).
    pub fn host_is_ipv6() -> bool {
        let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills a list freed below.
        if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
            return false;
        }
        let mut v6 = false;
        let mut cur = addrs;
        while !cur.is_null() {
            // SAFETY: a node of the list getifaddrs returned.
            let ifa = unsafe { &*cur };
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() {
                continue;
            }
            // SAFETY: ifa_addr points to a sockaddr of its family.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: an AF_INET sockaddr.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !ip.is_link_local() {
                    v6 = false;
                    break;
                }
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 sockaddr.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if !ip.is_loopback() && (ip.segments()[0] & 0xffc0) != 0xfe80 {
                    v6 = true;
                    break;
                }
            }
        }
        // SAFETY: the list getifaddrs returned.
        unsafe { libc::freeifaddrs(addrs) };
        v6
    }

    /// Runs the check.
    pub fn run(&self) -> Result<(), ValidationError> {
        let (local, target): (IpAddr, IpAddr) = if self.ipv6 {
            (
                Ipv6Addr::LOCALHOST.into(),
                Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6).into(),
            )
        } else {
            (
                Ipv4Addr::LOCALHOST.into(),
                Ipv4Addr::new(127, 0, 0, 6).into(),
            )
        };
        let target = SocketAddr::new(target, self.probe_port);
        let listeners = [self.proxy_port, self.inbound_port]
            .into_iter()
            .map(|port| {
                let addr = SocketAddr::new(local, port);
                listen(addr).map_err(|source| ValidationError::Listen { addr, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let start = Instant::now();
        let mut last = String::from("no attempt");
        let mut _clients = Vec::new();
        while start.elapsed() < self.timeout {
            let left = self.timeout.saturating_sub(start.elapsed());
            match TcpStream::connect_timeout(&target, left.min(Duration::from_secs(1))) {
                Ok(c) => _clients.push(c),
                Err(e) => last = format!("connect: {e}"),
            }
            let round = Instant::now();
            while round.elapsed() < Duration::from_secs(1) && start.elapsed() < self.timeout {
                for l in &listeners {
                    match l.accept() {
                        Ok((s, _)) => match crate::original_dst(&s) {
                            Ok(orig) if orig.port() == self.probe_port => {
                                tracing::info!(%orig, "validation passed: connections are captured");
                                return Ok(());
                            }
                            Ok(orig) => last = format!("accepted, original destination {orig}"),
                            Err(e) => last = format!("accepted, no original destination: {e}"),
                        },
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => last = format!("accept: {e}"),
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Err(ValidationError::Timeout {
            target,
            proxy_port: self.proxy_port,
            inbound_port: self.inbound_port,
            timeout: self.timeout,
            last,
        })
    }
}

/// A non-blocking listener with `SO_REUSEADDR` and `SO_REUSEPORT`, as
/// istio's validator makes them (a proxy already there does not stop it).
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let family = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: socket(2); the fd is owned once.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let one: libc::c_int = 1;
    for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
        // SAFETY: an int option on our socket.
        let r = unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                opt,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: a sockaddr of the length given.
    if unsafe { libc::bind(raw, (&storage as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on our socket.
    if unsafe { libc::listen(raw, 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            (storage, size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            (storage, size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

//! Registering a proxy listener that was already listening when `apply` ran.
//!
//! Normally the `sock_ops` program registers the proxy's inbound listener
//! when the proxy calls `listen()` (the init-container order: apply, then the
//! proxy starts). When the proxy is already up (a node agent applying to a
//! running pod, or a re-apply after the state maps were removed), no
//! `listen()` will come: the loader finds the listening socket in the pod's
//! namespace, borrows it from its owner with `pidfd_getfd(2)` (root only,
//! the proxy is not involved) and puts it in the listener map itself.

use std::{
    fs,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};

use crate::netns;

/// A listening TCP socket found in the namespace.
#[derive(Debug)]
pub struct Found {
    /// IPv6 socket (else IPv4).
    pub ipv6: bool,
    /// The owner's pid.
    pub pid: u32,
    /// A duplicate of the socket, owned by the loader.
    pub fd: OwnedFd,
}

/// Socket inodes listening on `port` in the namespace, `(inode, ipv6)`.
///
/// Asked of the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`) for
/// listening sockets only: the kernel then walks its listening hash alone.
/// `/proc/net/tcp` walks every bucket of the established hash too (262,144
/// here, about 6 ms per read), which made up most of a `pod add`.
fn listening_inodes(netns_path: Option<&Path>, port: u16) -> Result<Vec<(u64, bool)>> {
    netns::in_netns(netns_path, move || {
        let mut out = Vec::new();
        for (family, ipv6, file) in [
            (libc::AF_INET, false, "tcp"),
            (libc::AF_INET6, true, "tcp6"),
        ] {
            match diag_listeners(family as u8, port) {
                Ok(inodes) => out.extend(inodes.into_iter().map(|i| (i, ipv6))),
                // No socket diagnostics for this family (tcp_diag not built
                // or not loadable): the slow way.
                Err(e) => {
                    tracing::debug!(error = %e, family, "sock_diag failed; reading /proc");
                    out.extend(proc_listeners(file, port).into_iter().map(|i| (i, ipv6)));
                }
            }
        }
        Ok(out)
    })
}

/// The inodes of the sockets listening on `port` in `/proc/net/<file>` of
/// this thread's namespace; none when the file is missing (no IPv6).
fn proc_listeners(file: &str, port: u16) -> Vec<u64> {
    // thread-self: this thread is the one inside the namespace.
    let Ok(text) = fs::read_to_string(format!("/proc/thread-self/net/{file}")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st ... uid timeout inode
        if f.len() < 10 || f[3] != "0A" {
            continue;
        }
        let Some((_, p)) = f[1].rsplit_once(':') else {
            continue;
        };
        if u16::from_str_radix(p, 16).ok() == Some(port)
            && let Ok(inode) = f[9].parse::<u64>()
        {
            out.push(inode);
        }
    }
    out
}

/// `struct inet_diag_sockid` (linux/inet_diag.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

/// `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCP_LISTEN: u8 = 10;

/// The inodes of the TCP sockets of `family` listening on `port` in this
/// thread's network namespace.
fn diag_listeners(family: u8, port: u16) -> std::io::Result<Vec<u64>> {
    use std::{io, mem::size_of, os::fd::AsRawFd as _};
    // SAFETY: socket(2); the fd is owned once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2).
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    #[repr(C)]
    struct Request {
        nlh: libc::nlmsghdr,
        req: InetDiagReqV2,
    }
    let request = Request {
        nlh: libc::nlmsghdr {
            nlmsg_len: size_of::<Request>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        req: InetDiagReqV2 {
            family,
            protocol: libc::IPPROTO_TCP as u8,
            states: 1 << TCP_LISTEN,
            id: InetDiagSockId {
                sport: port.to_be_bytes(),
                ..Default::default()
            },
            ..Default::default()
        },
    };
    // SAFETY: a plain struct of the size given; the kernel is the peer.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            (&request as *const Request).cast(),
            size_of::<Request>(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: recv(2) into a buffer of the length given.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= size_of::<libc::nlmsghdr>() {
            // SAFETY: at least a header's bytes; read unaligned.
            let nlh: libc::nlmsghdr = unsafe { std::ptr::read_unaligned(rest.as_ptr().cast()) };
            let len = nlh.nlmsg_len as usize;
            if len < size_of::<libc::nlmsghdr>() || len > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated sock_diag message",
                ));
            }
            let body = &rest[size_of::<libc::nlmsghdr>()..len];
            match nlh.nlmsg_type as i32 {
                libc::NLMSG_DONE => return Ok(out),
                libc::NLMSG_ERROR => {
                    let errno = body
                        .get(..4)
                        .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                        .unwrap_or(0);
                    if errno == 0 {
                        return Ok(out);
                    }
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ if body.len() >= size_of::<InetDiagMsg>() => {
                    // SAFETY: enough bytes for the struct; read unaligned.
                    let msg: InetDiagMsg =
                        unsafe { std::ptr::read_unaligned(body.as_ptr().cast()) };
                    if msg.state == TCP_LISTEN && u16::from_be_bytes(msg.id.sport) == port {
                        out.push(u64::from(msg.inode));
                    }
                }
                _ => {}
            }
            // Messages are 4-byte aligned.
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
    }
}

/// Finds the sockets listening on `port` in the namespace (at most one
/// IPv4 and one IPv6) and duplicates them. Empty when nothing listens yet.
pub fn find(netns_path: Option<&Path>, port: u16) -> Result<Vec<Found>> {
    let inodes = listening_inodes(netns_path, port)?;
    let mut out: Vec<Found> = Vec::new();
    if inodes.is_empty() {
        return Ok(out);
    }
    for proc in fs::read_dir("/proc").context("reading /proc")? {
        let Ok(proc) = proc else { continue };
        let Some(pid) = proc
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(proc.path().join("fd")) else {
            continue; // gone, or a kernel thread
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            let Some(&(_, ipv6)) = inodes.iter().find(|(i, _)| *i == inode) else {
                continue;
            };
            if out.iter().any(|f| f.ipv6 == ipv6) {
                continue;
            }
            let Some(num) = fd.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(fd) = borrow_fd(pid, num) {
                out.push(Found { ipv6, pid, fd });
            }
        }
    }
    for (_, ipv6) in &inodes {
        if !out.iter().any(|f| f.ipv6 == *ipv6) {
            tracing::warn!(
                port,
                ipv6,
                "a proxy listens on the inbound port already but its socket cannot be \
                 borrowed (finding and duplicating it takes CAP_SYS_PTRACE and the same PID \
                 namespace): inbound connections are refused until the proxy listens again \
                 (restart it)"
            );
        }
    }
    Ok(out)
}

/// `pidfd_getfd(pidfd_open(pid), fd)`: a duplicate of another process's fd.
fn borrow_fd(pid: u32, fd: i32) -> Option<OwnedFd> {
    // SAFETY: plain syscalls; every returned fd is owned exactly once.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
        if pidfd < 0 {
            return None;
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let dup = libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        );
        (dup >= 0).then(|| OwnedFd::from_raw_fd(dup as i32))
    }
}

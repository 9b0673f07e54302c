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
fn listening_inodes(netns_path: Option<&Path>, port: u16) -> Result<Vec<(u64, bool)>> {
    netns::in_netns(netns_path, move || {
        let mut out = Vec::new();
        for (file, ipv6) in [("tcp", false), ("tcp6", true)] {
            // thread-self: this thread is the one inside the namespace.
            let path = format!("/proc/thread-self/net/{file}");
            let Ok(text) = fs::read_to_string(&path) else {
                continue; // no IPv6 in this kernel
            };
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
                    out.push((inode, ipv6));
                }
            }
        }
        Ok(out)
    })
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

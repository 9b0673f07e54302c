//! Reading facts from a network namespace without entering it with the whole
//! process: a short-lived thread joins it (`setns` is per thread) and reads
//! the addresses it owns and the source address its routing picks.

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::policy::NetnsFacts;

/// Checks that `path` is a network namespace file (`/proc/PID/ns/net`,
/// `/run/netns/NAME`, ...) and returns it opened.
pub fn open_netns(path: &Path) -> Result<File> {
    let file = File::open(path)
        .with_context(|| format!("--netns {}: cannot open the namespace file", path.display()))?;
    // NS_GET_NSTYPE = _IO(0xb7, 0x3)
    const NS_GET_NSTYPE: libc::Ioctl = 0xb703;
    // SAFETY: ioctl on an fd we own, no argument.
    let ty = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if ty < 0 {
        bail!(
            "--netns {}: not a namespace file ({})",
            path.display(),
            io::Error::last_os_error()
        );
    }
    if ty != libc::CLONE_NEWNET {
        bail!(
            "--netns {}: a namespace, but not a network namespace",
            path.display()
        );
    }
    Ok(file)
}

/// Runs `f` on a thread that has joined the network namespace `netns` (or the
/// caller's own when `None`).
pub fn in_netns<T: Send + 'static>(
    netns: Option<&Path>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let mut file = netns.map(open_netns).transpose()?;
    // Already there (an init container registering its own namespace):
    // no setns, which would need CAP_SYS_ADMIN.
    if let (Some(f), Ok(own)) = (&file, std::fs::metadata("/proc/thread-self/ns/net"))
        && let Ok(m) = f.metadata()
        && (m.dev(), m.ino()) == (own.dev(), own.ino())
    {
        file = None;
    }
    let path: Option<PathBuf> = netns.map(Path::to_path_buf);
    std::thread::spawn(move || {
        if let Some(file) = file {
            // SAFETY: setns on a namespace fd we own; affects this thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!(
                    "--netns {}: cannot join it ({})",
                    path.unwrap_or_default().display(),
                    io::Error::last_os_error()
                );
            }
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace probe thread panicked"))?
}

/// Addresses the namespace owns, and its source address for the outside.
pub fn probe(netns: Option<&Path>) -> Result<NetnsFacts> {
    in_netns(netns, || {
        let interfaces = interfaces()?;
        let routes = crate::routes::main_routes(&interfaces)?;
        Ok(NetnsFacts {
            local_addrs: local_addrs()?,
            source_v4: source_v4(),
            source_v6: source_v6(),
            netns_cookie: netns_cookie()?,
            interfaces,
            routes,
        })
    })
}

/// The current namespace's interfaces, by name and ifindex.
pub fn interfaces() -> Result<Vec<(String, u32)>> {
    // SAFETY: if_nameindex allocates the list freed below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(io::Error::last_os_error()).context("if_nameindex");
    }
    let mut out = Vec::new();
    let mut cur = head;
    // SAFETY: the array ends with an all-zero entry.
    while unsafe { (*cur).if_index } != 0 {
        let e = unsafe { &*cur };
        // SAFETY: a NUL-terminated name of the list.
        let name = unsafe { std::ffi::CStr::from_ptr(e.if_name) };
        out.push((name.to_string_lossy().into_owned(), e.if_index));
        cur = unsafe { cur.add(1) };
    }
    // SAFETY: the list from if_nameindex, freed once.
    unsafe { libc::if_freenameindex(head) };
    out.sort();
    Ok(out)
}

/// Every address configured on an interface of the current namespace.
pub fn local_addrs() -> Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head`; freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error()).context("getifaddrs");
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: nodes of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

/// The source the routing picks for a destination outside the pod: a UDP
/// `connect()` only does the route lookup and sends nothing. `None` without a
/// route (for example a namespace with only `lo`).
pub fn source_v4() -> Option<Ipv4Addr> {
    let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
    // TEST-NET-2 (RFC 5737): documentation space, never a real peer.
    sock.connect("198.51.100.1:9").ok()?;
    match sock.local_addr().ok()? {
        SocketAddr::V4(a) if !a.ip().is_unspecified() => Some(*a.ip()),
        _ => None,
    }
}

/// The IPv6 counterpart of [`source_v4`] (a global source only).
pub fn source_v6() -> Option<Ipv6Addr> {
    let sock = UdpSocket::bind("[::]:0").ok()?;
    // 2001:db8::/32 (RFC 3849): documentation space, never a real peer.
    sock.connect("[2001:db8::1]:9").ok()?;
    match sock.local_addr().ok()? {
        SocketAddr::V6(a) if !a.ip().is_unspecified() => Some(*a.ip()),
        _ => None,
    }
}

/// The current namespace's cookie, as BPF programs read it with
/// `bpf_get_netns_cookie` (`SO_NETNS_COOKIE`, Linux 5.14+).
pub fn netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = UdpSocket::bind("0.0.0.0:0").context("probing the netns cookie: socket")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 we own, with its size.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error())
            .context("reading the network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14+)");
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_namespace() {
        let ifs = interfaces().unwrap();
        assert!(ifs.iter().any(|(n, i)| n == "lo" && *i == 1), "{ifs:?}");
    }
}

//! For proxies: recover a redirected connection's original destination.
//!
//! [`original_dst`] asks `getsockopt(SO_ORIGINAL_DST)`, the call every
//! transparent proxy makes behind iptables REDIRECT. Behind redirect, the
//! `cgroup/getsockopt` program answers the same call, so one function works
//! with both.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream},
    os::fd::AsRawFd,
};

/// `SO_ORIGINAL_DST` (`SOL_IP`) and `IP6T_SO_ORIGINAL_DST` (`SOL_IPV6`).
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The address the client connected to before it was redirected to this
/// (accepted) socket.
///
/// Works behind iptables/nftables REDIRECT (conntrack answers) and behind
/// redirect (its `cgroup/getsockopt` program answers). Errors are the
/// kernel's: `ENOENT` when the connection was not redirected,
/// `ENOPROTOOPT` when neither conntrack nor redirect is present.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let v6 = match stream.local_addr()? {
        SocketAddr::V4(_) => false,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_none(),
    };
    let fd = stream.as_raw_fd();
    if v6 {
        let sa: libc::sockaddr_in6 = getsockopt(fd, libc::SOL_IPV6)?;
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(sa.sin6_addr.s6_addr),
            u16::from_be(sa.sin6_port),
            sa.sin6_flowinfo,
            sa.sin6_scope_id,
        )))
    } else {
        let sa: libc::sockaddr_in = getsockopt(fd, libc::SOL_IP)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        )))
    }
}

fn getsockopt<T>(fd: libc::c_int, level: libc::c_int) -> io::Result<T> {
    let mut out = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `out` is a writable buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            out.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < size_of::<T>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "SO_ORIGINAL_DST returned {len} bytes, expected {}",
                size_of::<T>()
            ),
        ));
    }
    // SAFETY: zero-initialised plain C struct, filled by the kernel.
    Ok(unsafe { out.assume_init() })
}

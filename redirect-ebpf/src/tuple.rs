//! The 4-tuple key of one TCP connection, built the same way from either of
//! its two sockets: the application's (in `sock_ops` and `cgroup/getsockopt`)
//! and the proxy's accepted one (in `sock_ops`).

use aya_ebpf::bindings::bpf_sock;
use redirect_common::{AF_INET, AF_INET6, Conn, TupleKey, is_v4_mapped};

use crate::maps::{CONNS, TUPLES};

/// A socket's `(family, local, remote)` addresses as the key sees them:
/// network-order words, IPv4 in word 0. An IPv6 socket carrying IPv4
/// (mapped addresses) counts as IPv4, so both ends of one connection agree
/// on the key. `None` for other families.
#[inline(always)]
pub fn normalize(
    family: u32,
    local: [u32; 4],
    remote: [u32; 4],
) -> Option<(u16, [u32; 4], [u32; 4])> {
    if family == u32::from(AF_INET) {
        return Some((AF_INET, [local[0], 0, 0, 0], [remote[0], 0, 0, 0]));
    }
    if family != u32::from(AF_INET6) {
        return None;
    }
    if is_v4_mapped(remote) {
        Some((AF_INET, [local[3], 0, 0, 0], [remote[3], 0, 0, 0]))
    } else {
        Some((AF_INET6, local, remote))
    }
}

/// The ends of socket `sk` (a kernel-provided socket, possibly null) in
/// network namespace `netns`.
#[inline(always)]
pub fn ends_of(sk: *mut bpf_sock, netns: u64) -> Option<Ends> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: a non-null socket pointer from the kernel.
    let s = unsafe { &*sk };
    let (local, remote) = if s.family == u32::from(AF_INET6) {
        (s.src_ip6, s.dst_ip6)
    } else {
        ([s.src_ip4, 0, 0, 0], [s.dst_ip4, 0, 0, 0])
    };
    let (family, local, remote) = normalize(s.family, local, remote)?;
    Some(Ends {
        netns,
        family,
        local,
        remote,
        local_port: s.src_port as u16,
        remote_port: u16::from_be(s.dst_port as u16),
    })
}

/// The captured connection whose 4-tuple is `key`, with its application
/// socket's cookie.
#[inline(always)]
pub fn conn_by_tuple(key: &TupleKey) -> Option<(u64, *mut Conn)> {
    // SAFETY: a live map value, copied out.
    let cookie = unsafe { *TUPLES.get_ptr(key)? };
    Some((cookie, CONNS.get_ptr_mut(cookie)?))
}

/// One socket's view of its connection: addresses as [`normalize`] returns
/// them, ports in host order.
pub struct Ends {
    /// Network namespace cookie.
    pub netns: u64,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Local address.
    pub local: [u32; 4],
    /// Remote address.
    pub remote: [u32; 4],
    /// Local port.
    pub local_port: u16,
    /// Remote port.
    pub remote_port: u16,
}

impl Ends {
    /// The key of this connection; `client_is_local` says whether this is
    /// the client's socket (local = client) or the proxy's (remote = client).
    #[inline(always)]
    pub fn key(&self, client_is_local: bool) -> TupleKey {
        let (client_ip, client_port, proxy_ip, proxy_port) = if client_is_local {
            (self.local, self.local_port, self.remote, self.remote_port)
        } else {
            (self.remote, self.remote_port, self.local, self.local_port)
        };
        TupleKey {
            netns: self.netns,
            client_ip,
            proxy_ip,
            client_port,
            proxy_port,
            family: u32::from(self.family),
        }
    }
}

//! `cgroup/getpeername4` and `cgroup/getpeername6` (which also run for the
//! address `accept()` returns): each end of a captured connection sees what
//! it would see under iptables REDIRECT.
//!
//! - The application's socket (connected to a capture port) sees the peer it
//!   asked for: its connection's original destination (for a UDP socket
//!   connected to a nameserver DNS capture took, that nameserver).
//! - The proxy's accepted socket (bound to a capture port) sees the
//!   application's address, where the connection could not be made from it
//!   (IPv6, or a socket the application had bound to a wildcard address): the
//!   pod's address instead of the loopback address the packets carry.
//!
//! Every other socket is left alone after a port comparison.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{AF_INET, Config};

use crate::maps::{CONNS, dns_socket, pod_config, proxy_side_of, put_ip6};

/// What the socket should be shown as its peer: `(family, address words,
/// port)`, the port in network order (`None`: keep the kernel's).
#[inline(always)]
fn shown_peer(sa: &mut bpf_sock_addr) -> Option<(u16, [u32; 4], Option<u16>)> {
    // SAFETY: `sa` is this program's context.
    let cfg: &Config =
        pod_config(unsafe { bpf_get_netns_cookie((sa as *mut bpf_sock_addr).cast()) })?;
    // The kernel filled in the socket's real peer.
    if cfg.is_capture_port(u16::from_be(sa.user_port as u16)) {
        // SAFETY: `sa` is this program's context.
        let cookie = unsafe { bpf_get_socket_cookie((sa as *mut bpf_sock_addr).cast()) };
        if let Some(conn) = CONNS.get_ptr(cookie) {
            // SAFETY: a live map value, copied out.
            let orig = unsafe { (*conn).orig };
            return Some((orig.family, orig.ip, Some(orig.port_be)));
        }
        // A UDP socket whose connect() DNS capture took.
        let sk = unsafe { sa.__bindgen_anon_1.sk };
        let state = dns_socket(sk, false)?;
        // SAFETY: the socket's live storage, copied out.
        let peer = unsafe { (*state).connected };
        if peer.family == 0 {
            return None;
        }
        return Some((peer.family, peer.ip, Some(peer.port_be)));
    }
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    // SAFETY: the kernel's socket of this call.
    if !cfg.is_capture_port(unsafe { (*sk).src_port } as u16) {
        return None;
    }
    let side = proxy_side_of(sk)?;
    // SAFETY: a live storage slot, copied out.
    let (orig, shown) = unsafe { ((*side).orig, (*side).shown_peer) };
    if shown == [0; 4] {
        return None;
    }
    Some((orig.family, shown, None))
}

#[cgroup_sock_addr(getpeername4)]
pub fn redirect_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some((family, ip, port)) = shown_peer(sa)
        && family == AF_INET
    {
        sa.user_ip4 = ip[0];
        if let Some(port) = port {
            sa.user_port = u32::from(port);
        }
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn redirect_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    // An IPv6 socket carrying IPv4 sees the IPv4-mapped address.
    if let Some((family, ip, port)) = shown_peer(sa)
        && put_ip6(&mut sa.user_ip6, family, ip)
        && let Some(port) = port
    {
        sa.user_port = u32::from(port);
    }
    1
}

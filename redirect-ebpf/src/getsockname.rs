//! `cgroup/getsockname4` and `cgroup/getsockname6`: an application whose
//! captured connection could not be made from the pod's address (IPv6, where
//! the kernel cannot answer a loopback peer from it; or a socket the
//! application had already bound to a wildcard address and a port) still
//! sees the pod's address as its local address, as under iptables REDIRECT;
//! so does a UDP socket whose `connect()` to a nameserver DNS capture took.
//! The port is the real one. Other sockets are left alone after a port
//! comparison.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::AF_INET;

use crate::maps::{CONNS, dns_socket, pod_config, put_ip6};

/// The local address to show: `(family of the connection, address words)`.
#[inline(always)]
fn shown_local(sa: &mut bpf_sock_addr) -> Option<(u16, [u32; 4])> {
    // SAFETY: `sa` is this program's context.
    let cfg = pod_config(unsafe { bpf_get_netns_cookie((sa as *mut bpf_sock_addr).cast()) })?;
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    // SAFETY: the kernel's socket of this call; `dst_port` is network order.
    if !cfg.is_capture_port(u16::from_be(unsafe { (*sk).dst_port } as u16)) {
        return None;
    }
    // SAFETY: `sa` is this program's context.
    let cookie = unsafe { bpf_get_socket_cookie((sa as *mut bpf_sock_addr).cast()) };
    let (family, shown) = if let Some(conn) = CONNS.get_ptr(cookie) {
        // SAFETY: a live map value, copied out.
        unsafe { ((*conn).orig.family, (*conn).shown_src) }
    } else {
        // A UDP socket whose connect() DNS capture took.
        let state = dns_socket(sk, false)?;
        // SAFETY: the socket's live storage, copied out.
        unsafe { ((*state).connected.family, (*state).shown_src) }
    };
    if shown == [0; 4] {
        return None;
    }
    Some((family, shown))
}

#[cgroup_sock_addr(getsockname4)]
pub fn redirect_getsockname4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some((family, ip)) = shown_local(sa)
        && family == AF_INET
    {
        sa.user_ip4 = ip[0];
    }
    1
}

#[cgroup_sock_addr(getsockname6)]
pub fn redirect_getsockname6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some((family, ip)) = shown_local(sa) {
        put_ip6(&mut sa.user_ip6, family, ip);
    }
    1
}

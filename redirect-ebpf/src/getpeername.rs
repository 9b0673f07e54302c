//! `cgroup/getpeername4` and `cgroup/getpeername6`: an application whose
//! connect was captured still sees the peer it asked for, as under iptables
//! REDIRECT (NAT is invisible to it). The original destination is the
//! connection's hand-over entry, looked up with the socket as the client's
//! end: the proxy's own sockets never match, so their real peer stands.

use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::generated::bpf_get_netns_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{AF_INET, AF_INET6, OrigDst};

use crate::{
    maps::{CONFIG, v4_mapped},
    tuple,
};

/// The application-side original destination of the socket, if any.
#[inline(always)]
fn app_orig(sa: &mut bpf_sock_addr) -> Option<OrigDst> {
    // The kernel filled in the socket's real peer: a captured socket is
    // connected to a capture port, any other (the proxy's accepted sockets
    // among them) is left alone without a map lookup.
    let cfg = CONFIG.get(0)?;
    if !cfg.is_capture_port(u16::from_be(sa.user_port as u16)) {
        return None;
    }
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    // SAFETY: `sa` is this program's context.
    let netns = unsafe { bpf_get_netns_cookie((sa as *mut bpf_sock_addr).cast()) };
    tuple::handed_over(&tuple::ends_of(sk, netns)?, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn redirect_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(orig) = app_orig(sa)
        && orig.family == AF_INET
    {
        sa.user_ip4 = orig.ip[0];
        sa.user_port = orig.port_be as u32;
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn redirect_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(orig) = app_orig(sa) {
        // An IPv6 socket captured on its way to an IPv4-mapped address
        // sees that mapped address again.
        let ip = if orig.family == AF_INET {
            v4_mapped(orig.ip[0])
        } else if orig.family == AF_INET6 {
            orig.ip
        } else {
            return 1;
        };
        sa.user_ip6[0] = ip[0];
        sa.user_ip6[1] = ip[1];
        sa.user_ip6[2] = ip[2];
        sa.user_ip6[3] = ip[3];
        sa.user_port = orig.port_be as u32;
    }
    1
}

//! `cgroup/getpeername4`: an application whose connect was captured still sees
//! the peer it asked for, as under iptables REDIRECT (NAT is invisible to it).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use redirect_common::{AF_INET, orig_flags};

use crate::maps::orig_dst_of;

#[cgroup_sock_addr(getpeername4)]
pub fn redirect_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if let Some(orig) = orig_dst_of(sk) {
        let orig = unsafe { &*orig };
        if orig.family == AF_INET && orig.flags & orig_flags::PROXY_SIDE == 0 {
            sa.user_ip4 = orig.ip[0];
            sa.user_port = orig.port_be as u32;
        }
    }
    1
}

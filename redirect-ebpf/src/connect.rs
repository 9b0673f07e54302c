//! `cgroup/connect4`: decide every outbound IPv4 TCP connect with the shared
//! policy code and, when it is captured, rewrite the destination to the proxy.
//!
//! To be as transparent as iptables REDIRECT, a captured socket is also bound
//! (`bpf_bind`, port 0) to the source address the pod's routing would have
//! used for the original destination, so the application's `getsockname()`
//! shows the pod's address and the proxy sees the pod's address as its peer.

use aya_ebpf::{
    bindings::{bpf_sock_addr, sockaddr},
    helpers::{bpf_get_current_uid_gid, generated::bpf_bind},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{
    AF_INET, Action, Addr, Counter, OrigDst, Outbound, V4_LOCALHOST, decide_outbound,
};

use crate::{
    maps::{CONFIG, SockaddrIn, count, set_orig_dst},
    policy::KernelPolicy,
};

const IPPROTO_TCP: u32 = 6;
/// Returned to let the syscall proceed.
const ALLOW: i32 = 1;
/// Returned to fail the syscall with `EPERM`.
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid context for the program's lifetime.
    unsafe { connect4(ctx.sock_addr) }
}

#[inline(always)]
unsafe fn connect4(sa: *mut bpf_sock_addr) -> i32 {
    let sa = unsafe { &mut *sa };
    if sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return ALLOW;
    };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let bound_src_be = unsafe { (*sk).src_ip4 };
    let uid_gid = bpf_get_current_uid_gid();
    let dst_be = sa.user_ip4;
    let conn = Outbound {
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        bound_src: if bound_src_be == 0 {
            None
        } else {
            Some(Addr::V4(u32::from_be(bound_src_be)))
        },
        dst: Addr::V4(u32::from_be(dst_be)),
        dport: u16::from_be(sa.user_port as u16),
    };
    let verdict = decide_outbound(cfg, &KernelPolicy, &conn);
    count(verdict.rule as u32);
    let Action::Redirect(port) = verdict.action else {
        return ALLOW;
    };

    let orig = OrigDst {
        ip: [dst_be, 0, 0, 0],
        port_be: sa.user_port as u16,
        family: AF_INET,
        rule: verdict.rule as u16,
        flags: 0,
    };
    if set_orig_dst(sk, &orig).is_none() {
        count(Counter::StorageFailed as u32);
        return DENY;
    }

    if bound_src_be == 0 {
        // The source iptables would keep: the destination itself when the
        // namespace owns it, the route's source otherwise; none for 127/8,
        // where the kernel picks 127.0.0.1 as it would have.
        let src_be = if conn.dst.is_loopback_range() {
            0
        } else if verdict.over_lo {
            dst_be
        } else {
            cfg.source_v4
        };
        if src_be != 0 {
            let mut sin = SockaddrIn {
                family: AF_INET,
                port_be: 0,
                addr_be: src_be,
                zero: [0; 8],
            };
            let ret = unsafe {
                bpf_bind(
                    sa,
                    (&mut sin as *mut SockaddrIn).cast::<sockaddr>(),
                    core::mem::size_of::<SockaddrIn>() as i32,
                )
            };
            if ret != 0 {
                count(Counter::BindFailed as u32);
            }
        }
    }

    sa.user_ip4 = V4_LOCALHOST.to_be();
    sa.user_port = port.to_be() as u32;
    ALLOW
}

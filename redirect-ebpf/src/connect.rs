//! `cgroup/connect4` and `cgroup/connect6`: decide every outbound TCP connect
//! with the shared policy code and, when it is captured, rewrite the
//! destination to the proxy.
//!
//! To be as transparent as iptables REDIRECT, a captured socket is also bound
//! (`bpf_bind`, port 0) to the source address the pod's routing would have
//! used for the original destination, so the application's `getsockname()`
//! shows the pod's address and the proxy sees the pod's address as its peer.
//!
//! An IPv6 socket connecting to an IPv4-mapped address (`::ffff:a.b.c.d`)
//! makes an IPv4 connection: connect6 decides it as IPv4 (as iptables, not
//! ip6tables, would see it) and sends it to `::ffff:127.0.0.1`, so it cannot
//! bypass the IPv4 policy.

use aya_ebpf::{
    bindings::{bpf_sock_addr, sockaddr},
    helpers::{
        bpf_get_current_uid_gid,
        generated::{bpf_bind, bpf_get_current_ancestor_cgroup_id, bpf_get_socket_cookie},
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{
    AF_INET, AF_INET6, Action, Addr, Config, Counter, OrigDst, Outbound, V4_LOCALHOST,
    config_flags, decide_outbound, is_v4_mapped,
};

use crate::{
    maps::{CONFIG, PENDING, SockaddrIn, SockaddrIn6, count, v4_mapped},
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

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    unsafe { connect6(ctx.sock_addr) }
}

/// The connect as the decision sees it.
#[inline(always)]
fn outbound(
    cfg: &Config,
    sa: &bpf_sock_addr,
    bound_src: Option<Addr>,
    dst: Addr,
    port_be: u32,
) -> Outbound {
    let uid_gid = bpf_get_current_uid_gid();
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let in_proxy_cgroup = cfg.has(config_flags::HAS_CGROUP)
        && unsafe { bpf_get_current_ancestor_cgroup_id(cfg.proxy_cgroup_level as i32) }
            == cfg.proxy_cgroup_id;
    Outbound {
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        mark: unsafe { (*sk).mark },
        in_proxy_cgroup,
        bound_src,
        dst,
        dport: u16::from_be(port_be as u16),
    }
}

/// Decides; on redirect records the original destination in `PENDING` under
/// the socket's cookie, for `sock_ops` to move into `HANDOVER` once the ports
/// are known (later in this same `connect()`). `Ok(None)`: leave the connect
/// alone; `Ok(Some(port))`: rewrite it to `port`; `Err(())`: refuse it (not
/// recorded: never let it through uncaptured nor lose its destination).
#[inline(always)]
unsafe fn decide_and_store(
    sa: &bpf_sock_addr,
    cfg: &Config,
    conn: &Outbound,
    orig: OrigDst,
) -> Result<Option<(u16, bool)>, ()> {
    let verdict = decide_outbound(cfg, &KernelPolicy, conn);
    count(verdict.rule as u32);
    let Action::Redirect(port) = verdict.action else {
        return Ok(None);
    };
    let orig = OrigDst {
        rule: verdict.rule as u16,
        ..orig
    };
    // SAFETY: `sa` is this program's context.
    let cookie = unsafe { bpf_get_socket_cookie((sa as *const bpf_sock_addr).cast_mut().cast()) };
    if PENDING.insert(cookie, orig, 0).is_err() {
        count(Counter::StorageFailed as u32);
        return Err(());
    }
    Ok(Some((port, verdict.over_lo)))
}

/// The IPv4 source iptables would keep: the destination itself when the
/// namespace owns it, the route's source otherwise; none (0) for 127/8,
/// where the kernel picks 127.0.0.1 as it would have.
#[inline(always)]
fn source_v4(cfg: &Config, dst: &Addr, dst_be: u32, over_lo: bool) -> u32 {
    if dst.is_loopback_range() {
        0
    } else if over_lo {
        dst_be
    } else {
        cfg.source_v4
    }
}

/// `bpf_bind` to `addr` (a `SockaddrIn` or `SockaddrIn6`, port 0).
#[inline(always)]
unsafe fn bind_to<T>(sa: &mut bpf_sock_addr, mut addr: T) {
    let ret = unsafe {
        bpf_bind(
            sa,
            (&mut addr as *mut T).cast::<sockaddr>(),
            core::mem::size_of::<T>() as i32,
        )
    };
    if ret != 0 {
        count(Counter::BindFailed as u32);
    }
}

#[inline(always)]
unsafe fn bind4(sa: &mut bpf_sock_addr, src_be: u32) {
    let sin = SockaddrIn {
        family: AF_INET,
        port_be: 0,
        addr_be: src_be,
        zero: [0; 8],
    };
    unsafe { bind_to(sa, sin) }
}

#[inline(always)]
unsafe fn bind6(sa: &mut bpf_sock_addr, src: [u32; 4]) {
    let sin6 = SockaddrIn6 {
        family: AF_INET6,
        port_be: 0,
        flowinfo: 0,
        addr: src,
        scope_id: 0,
    };
    unsafe { bind_to(sa, sin6) }
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
    let dst_be = sa.user_ip4;
    let conn = outbound(
        cfg,
        sa,
        (bound_src_be != 0).then(|| Addr::V4(u32::from_be(bound_src_be))),
        Addr::V4(u32::from_be(dst_be)),
        sa.user_port,
    );
    let orig = OrigDst {
        ip: [dst_be, 0, 0, 0],
        port_be: sa.user_port as u16,
        family: AF_INET,
        rule: 0,
        flags: 0,
    };
    let (port, over_lo) = match unsafe { decide_and_store(sa, cfg, &conn, orig) } {
        Ok(Some(p)) => p,
        Ok(None) => return ALLOW,
        Err(()) => return DENY,
    };
    if bound_src_be == 0 {
        let src_be = source_v4(cfg, &conn.dst, dst_be, over_lo);
        if src_be != 0 {
            unsafe { bind4(sa, src_be) };
        }
    }
    sa.user_ip4 = V4_LOCALHOST.to_be();
    sa.user_port = port.to_be() as u32;
    ALLOW
}

#[inline(always)]
unsafe fn connect6(sa: *mut bpf_sock_addr) -> i32 {
    let sa = unsafe { &mut *sa };
    if sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return ALLOW;
    };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let bound = unsafe {
        [
            (*sk).src_ip6[0],
            (*sk).src_ip6[1],
            (*sk).src_ip6[2],
            (*sk).src_ip6[3],
        ]
    };
    let dst = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let unbound = bound == [0; 4];
    let conn = outbound(
        cfg,
        sa,
        (!unbound).then(|| Addr::from_ip6_words(bound)),
        Addr::from_ip6_words(dst),
        sa.user_port,
    );
    let mapped = is_v4_mapped(dst);
    let orig = if mapped {
        OrigDst {
            ip: [dst[3], 0, 0, 0],
            port_be: sa.user_port as u16,
            family: AF_INET,
            rule: 0,
            flags: 0,
        }
    } else {
        OrigDst {
            ip: dst,
            port_be: sa.user_port as u16,
            family: AF_INET6,
            rule: 0,
            flags: 0,
        }
    };
    let (port, over_lo) = match unsafe { decide_and_store(sa, cfg, &conn, orig) } {
        Ok(Some(p)) => p,
        Ok(None) => return ALLOW,
        Err(()) => return DENY,
    };
    let to = if mapped {
        if unbound {
            let src_be = source_v4(cfg, &conn.dst, dst[3], over_lo);
            if src_be != 0 {
                unsafe { bind6(sa, v4_mapped(src_be)) };
            }
        }
        v4_mapped(V4_LOCALHOST.to_be())
    } else {
        if unbound && !conn.dst.is_loopback_range() {
            let src = if over_lo { dst } else { cfg.source_v6 };
            if src != [0; 4] {
                unsafe { bind6(sa, src) };
            }
        }
        // ::1
        [0, 0, 0, 1u32.to_be()]
    };
    sa.user_ip6[0] = to[0];
    sa.user_ip6[1] = to[1];
    sa.user_ip6[2] = to[2];
    sa.user_ip6[3] = to[3];
    sa.user_port = port.to_be() as u32;
    ALLOW
}

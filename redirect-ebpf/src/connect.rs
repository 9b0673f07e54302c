//! `cgroup/connect4` and `cgroup/connect6`: decide every outbound TCP connect
//! with the shared policy code and, when it is captured, rewrite the
//! destination to the proxy.
//!
//! To be as transparent as iptables REDIRECT, a captured IPv4 socket is also
//! bound (`bpf_bind`, port 0) to the source address the pod's routing would
//! have used for the original destination, so the application's
//! `getsockname()` shows the pod's address and the proxy sees the pod's
//! address as its peer. Where that cannot be done, the connection runs from
//! the loopback address and the address iptables would show is recorded
//! (`Conn::shown_src`) for `getsockname.rs` and `getpeername.rs` to show:
//!
//! - IPv6: the kernel answers a segment from a non-loopback address to `::1`
//!   that no full socket takes (a `TIME_WAIT` socket's ACK, a reset) on the
//!   interface that address lives on, where `::1` is unreachable; the proxy's
//!   last FIN then stays unacknowledged, its socket stays in `LAST-ACK`, and
//!   a later connection reusing the port hangs in `SYN-SENT`. From `::1`
//!   every answer goes over `lo`.
//! - A socket the application had bound to a wildcard address and a port
//!   before `connect()`: it cannot be bound again.
//!
//! An IPv6 socket connecting to an IPv4-mapped address (`::ffff:a.b.c.d`)
//! makes an IPv4 connection: connect6 decides it as IPv4 (as iptables, not
//! ip6tables, would see it) and sends it to `::ffff:127.0.0.1`, so it cannot
//! bypass the IPv4 policy.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr, sockaddr},
    helpers::{
        bpf_get_current_uid_gid, bpf_probe_read_kernel,
        generated::{
            bpf_bind, bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie,
        },
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{
    AF_INET, AF_INET6, Action, Addr, Config, Conn, Counter, OrigDst, Outbound, TupleKey,
    V4_LOCALHOST, config_flags, conn_state, decide_outbound, is_v4_mapped,
};

use crate::{
    maps::{
        CONNS, SCRATCH, SockaddrIn, SockaddrIn6, TUPLES, V6_LOCALHOST_WORDS, count, pod_config,
        target_v4, target_v6, v4_mapped,
    },
    policy::KernelPolicy,
};

/// `BPF_NOEXIST`: insert only if the key is new.
const BPF_NOEXIST: u64 = 1;

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
/// Returned to let the syscall proceed.
pub const ALLOW: i32 = 1;
/// Returned to fail the syscall with `EPERM`.
pub const DENY: i32 = 0;

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

/// The connect as the decision sees it; `bound_src`: the socket's bound
/// address, unspecified (`0.0.0.0`, `::`) if none.
#[inline(always)]
pub fn outbound(
    cfg: &Config,
    sa: &bpf_sock_addr,
    bound_src: &Addr,
    dst: Addr,
    port_be: u32,
    udp: bool,
) -> Outbound {
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let (uid, gid) = if cfg.has(config_flags::OWNER_FROM_FILE) {
        socket_owner(cfg, sk)
    } else {
        let uid_gid = bpf_get_current_uid_gid();
        (uid_gid as u32, (uid_gid >> 32) as u32)
    };
    let in_proxy_cgroup = cfg.has(config_flags::HAS_CGROUP)
        && unsafe { bpf_get_current_ancestor_cgroup_id(cfg.proxy_cgroup_level as i32) }
            == cfg.proxy_cgroup_id;
    // Built in zeroed memory, field by field: a `None` built as a value
    // leaves its payload undefined, and the compiler may then copy any
    // register there (an uninitialised one, or the context pointer), which
    // the verifier refuses.
    // SAFETY: all-zero bytes are a valid `Outbound`.
    let mut o: Outbound = unsafe { core::mem::zeroed() };
    o.udp = udp;
    o.uid = uid;
    o.gid = gid;
    o.mark = unsafe { (*sk).mark };
    o.in_proxy_cgroup = in_proxy_cgroup;
    let unbound = match bound_src {
        Addr::V4(a) => *a == 0,
        Addr::V6(b) => *b == [0; 16],
    };
    if unbound {
        o.bound_src = None;
    } else {
        o.bound_src = Some(*bound_src);
    }
    o.dst = dst;
    o.dport = u16::from_be(port_be as u16);
    o
}

/// The owner iptables' `-m owner` sees: the file system UID and GID of the
/// credentials the socket's file was opened with
/// (`sk->sk_socket->file->f_cred`), read at the offsets the loader found in
/// the kernel's BTF. A socket without a file matches no owner, as in
/// iptables (`u32::MAX`, which no policy lists).
#[inline(always)]
fn socket_owner(cfg: &Config, sk: *mut bpf_sock) -> (u32, u32) {
    const NOBODY: (u32, u32) = (u32::MAX, u32::MAX);
    let path = &cfg.owner_path;
    // The verifier lets a program follow kernel pointers only as plain
    // numbers: store the socket pointer in a scratch map slot and read it
    // back as one (allowed to a privileged loader).
    let Some(slot) = SCRATCH.get_ptr_mut(0) else {
        return NOBODY;
    };
    // SAFETY: a per-CPU map slot of this program; volatile so the round
    // trip through memory is kept.
    let sk_addr = unsafe {
        core::ptr::write_volatile(slot, sk as u64);
        core::ptr::read_volatile(slot)
    };
    let read_ptr = |addr: u64| -> u64 {
        // SAFETY: bpf_probe_read_kernel checks the address itself.
        unsafe { bpf_probe_read_kernel(addr as *const u64) }.unwrap_or(0)
    };
    let socket = read_ptr(sk_addr + u64::from(path.sk_socket));
    if socket == 0 {
        return NOBODY;
    }
    let file = read_ptr(socket + u64::from(path.socket_file));
    if file == 0 {
        return NOBODY;
    }
    let cred = read_ptr(file + u64::from(path.file_cred));
    if cred == 0 {
        return NOBODY;
    }
    // SAFETY: as above.
    let read_id = |off: u16| unsafe {
        bpf_probe_read_kernel((cred + u64::from(off)) as *const u32).unwrap_or(u32::MAX)
    };
    (read_id(path.cred_fsuid), read_id(path.cred_fsgid))
}

/// Decides. `Ok(None)`: leave the connect alone; `Ok(Some((port,
/// over_lo)))`: capture it, to `port`.
#[inline(always)]
pub fn decide(cfg: &Config, conn: &Outbound) -> (Option<(u16, bool)>, u16) {
    let verdict = decide_outbound(cfg, &KernelPolicy { id: cfg.policy }, conn);
    count(verdict.rule as u32);
    match verdict.action {
        Action::Redirect(port) => (Some((port, verdict.over_lo)), verdict.rule as u16),
        Action::Pass => (None, verdict.rule as u16),
    }
}

/// Records a captured connection in `CONNS` under its socket's cookie.
/// `false` when `CONNS` is full (`--max-connections`): the connect must then
/// be refused, never let through uncaptured nor without its destination.
#[inline(always)]
fn record(sa: &bpf_sock_addr, orig: OrigDst, shown_src: [u32; 4]) -> bool {
    // SAFETY: `sa` is this program's context.
    let cookie = unsafe { bpf_get_socket_cookie((sa as *const bpf_sock_addr).cast_mut().cast()) };
    let conn = Conn {
        orig,
        shown_src,
        tuple: TupleKey::default(),
        state: 0,
    };
    if CONNS.insert(cookie, conn, BPF_NOEXIST).is_ok() {
        return true;
    }
    // Either full, or this socket connects again after a failed connect():
    // replace its entry (and unlist the 4-tuple of the failed attempt).
    let Some(old) = CONNS.get_ptr_mut(cookie) else {
        count(Counter::CapacityFull as u32);
        return false;
    };
    // SAFETY: a live map value of this socket, which is connecting.
    unsafe {
        if (*old).state & conn_state::JOINED != 0
            && TUPLES
                .get_ptr((*old).tuple)
                .is_some_and(|owner| *owner == cookie)
        {
            let _ = TUPLES.remove((*old).tuple);
        }
        *old = conn;
    }
    true
}

/// The IPv4 source iptables would keep: the destination itself when the
/// namespace owns it, the route's source otherwise; none (0) for 127/8,
/// where the kernel picks 127.0.0.1 as it would have.
#[inline(always)]
pub fn source_v4(cfg: &Config, dst: &Addr, dst_be: u32, over_lo: bool) -> u32 {
    if dst.is_loopback_range() {
        0
    } else if over_lo {
        dst_be
    } else {
        cfg.source_v4
    }
}

/// `bpf_bind` to `addr` (a `SockaddrIn` or `SockaddrIn6`, port 0); `false`
/// if the kernel refused.
#[inline(always)]
unsafe fn bind_to<T>(sa: &mut bpf_sock_addr, mut addr: T) -> bool {
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
    ret == 0
}

#[inline(always)]
unsafe fn bind4(sa: &mut bpf_sock_addr, src_be: u32) -> bool {
    let sin = SockaddrIn {
        family: AF_INET,
        port_be: 0,
        addr_be: src_be,
        zero: [0; 8],
    };
    unsafe { bind_to(sa, sin) }
}

#[inline(always)]
unsafe fn bind6(sa: &mut bpf_sock_addr, src: [u32; 4]) -> bool {
    let sin6 = SockaddrIn6 {
        family: AF_INET6,
        port_be: 0,
        flowinfo: 0,
        addr: src,
        scope_id: 0,
    };
    unsafe { bind_to(sa, sin6) }
}

/// Makes an IPv4 capture run from `src_be`, the source iptables would keep
/// (0: none), and returns the address to *show* as its local address where
/// it could not (0: the real one is right). A socket the application bound
/// to an address keeps it; one bound to a wildcard address and a port cannot
/// be bound again; otherwise `bpf_bind` (`mapped`: as `::ffff:a.b.c.d`, for
/// an IPv6 socket).
#[inline(always)]
pub unsafe fn ipv4_source(
    sa: &mut bpf_sock_addr,
    src_be: u32,
    bound_be: u32,
    bound_port: u32,
    mapped: bool,
) -> u32 {
    if bound_be != 0 || src_be == 0 {
        return 0;
    }
    let bound = bound_port == 0
        && unsafe {
            if mapped {
                bind6(sa, v4_mapped(src_be))
            } else {
                bind4(sa, src_be)
            }
        };
    if bound { 0 } else { src_be }
}

/// The policy of the pod whose network namespace the socket is in; `None`
/// (a namespace no pod registered: the host, a pod without a sidecar) means
/// hands off.
#[inline(always)]
pub fn sock_addr_pod(sa: &mut bpf_sock_addr) -> Option<&'static Config> {
    // SAFETY: `sa` is this program's context.
    pod_config(unsafe { bpf_get_netns_cookie((sa as *mut bpf_sock_addr).cast()) })
}

#[inline(always)]
unsafe fn connect4(sa: *mut bpf_sock_addr) -> i32 {
    let sa = unsafe { &mut *sa };
    if sa.protocol != IPPROTO_TCP && sa.protocol != IPPROTO_UDP {
        return ALLOW;
    }
    let Some(cfg) = sock_addr_pod(sa) else {
        return ALLOW;
    };
    if sa.protocol == IPPROTO_UDP {
        return unsafe { crate::dns::connect4(sa, cfg) };
    }
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let (bound_src_be, bound_port) = unsafe { ((*sk).src_ip4, (*sk).src_port) };
    let dst_be = sa.user_ip4;
    let conn = outbound(
        cfg,
        sa,
        &Addr::V4(u32::from_be(bound_src_be)),
        Addr::V4(u32::from_be(dst_be)),
        sa.user_port,
        false,
    );
    let (Some((port, over_lo)), rule) = decide(cfg, &conn) else {
        return ALLOW;
    };
    let orig = OrigDst {
        ip: [target_v4(dst_be), 0, 0, 0],
        port_be: sa.user_port as u16,
        family: AF_INET,
        rule,
        flags: 0,
    };
    let src_be = source_v4(cfg, &conn.dst, dst_be, over_lo);
    let shown_be = unsafe { ipv4_source(sa, src_be, bound_src_be, bound_port, false) };
    if !record(sa, orig, [shown_be, 0, 0, 0]) {
        return DENY;
    }
    sa.user_ip4 = V4_LOCALHOST.to_be();
    sa.user_port = port.to_be() as u32;
    ALLOW
}

#[inline(always)]
unsafe fn connect6(sa: *mut bpf_sock_addr) -> i32 {
    let sa = unsafe { &mut *sa };
    if sa.protocol != IPPROTO_TCP && sa.protocol != IPPROTO_UDP {
        return ALLOW;
    }
    let Some(cfg) = sock_addr_pod(sa) else {
        return ALLOW;
    };
    if sa.protocol == IPPROTO_UDP {
        return unsafe { crate::dns::connect6(sa, cfg) };
    }
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let (bound, bound_port) = unsafe {
        (
            [
                (*sk).src_ip6[0],
                (*sk).src_ip6[1],
                (*sk).src_ip6[2],
                (*sk).src_ip6[3],
            ],
            (*sk).src_port,
        )
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
        &Addr::from_ip6_words(bound),
        Addr::from_ip6_words(dst),
        sa.user_port,
        false,
    );
    let (Some((port, over_lo)), rule) = decide(cfg, &conn) else {
        return ALLOW;
    };
    let mapped = is_v4_mapped(dst);
    let to = if mapped {
        // An IPv4 connection: bound like connect4's (mapped addresses).
        let orig = OrigDst {
            ip: [target_v4(dst[3]), 0, 0, 0],
            port_be: sa.user_port as u16,
            family: AF_INET,
            rule,
            flags: 0,
        };
        let src_be = source_v4(cfg, &conn.dst, dst[3], over_lo);
        let bound_be = if unbound { 0 } else { bound[3] };
        let shown_be = unsafe { ipv4_source(sa, src_be, bound_be, bound_port, true) };
        if !record(sa, orig, [shown_be, 0, 0, 0]) {
            return DENY;
        }
        v4_mapped(V4_LOCALHOST.to_be())
    } else {
        // IPv6 runs from ::1 (see the module docs); show the pod's address.
        let orig = OrigDst {
            ip: target_v6(dst),
            port_be: sa.user_port as u16,
            family: AF_INET6,
            rule,
            flags: 0,
        };
        let shown = if !unbound || conn.dst.is_loopback_range() {
            [0; 4]
        } else if over_lo {
            dst
        } else {
            cfg.source_v6
        };
        if !record(sa, orig, shown) {
            return DENY;
        }
        V6_LOCALHOST_WORDS
    };
    sa.user_ip6[0] = to[0];
    sa.user_ip6[1] = to[1];
    sa.user_ip6[2] = to[2];
    sa.user_ip6[3] = to[3];
    sa.user_port = port.to_be() as u32;
    ALLOW
}

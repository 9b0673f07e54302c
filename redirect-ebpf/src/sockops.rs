//! `sockops`: carry a captured connection's original destination from the
//! application's socket to the proxy.
//!
//! 1. `TCP_CONNECT_CB` (client socket, before its SYN; ports are known): if
//!    connect4 left an original destination in `PENDING` under the socket's
//!    cookie, move it into the hand-over map under the connection's 4-tuple
//!    (plus netns cookie), and ask for state callbacks. The application's
//!    `getpeername()` and the proxy's `SO_ORIGINAL_DST` both read it there.
//! 2. `PASSIVE_ESTABLISHED_CB` (the proxy's new socket): mark the entry for
//!    its 4-tuple as claimed. The proxy's `SO_ORIGINAL_DST` reads the entry
//!    in place (`getsockopt.rs`): nothing is copied or allocated for the
//!    proxy's socket.
//! 3. `STATE_CB` → `TCP_CLOSE` (client socket): delete the entry. The client
//!    reaches `TCP_CLOSE` once both sides have finished (`TIME_WAIT`,
//!    `LAST_ACK` answered), or on a reset or a refused connect, so the entry
//!    outlives the proxy's use of it, as conntrack's does under REDIRECT.
//!    An entry the proxy never claimed counts as dropped.
//!
//! And for inbound capture (see `sk_lookup.rs`):
//!
//! 4. `TCP_LISTEN_CB`: a socket of the pod's namespace listening on the inbound
//!    capture port becomes the capture listener (a restarted proxy replaces
//!    it; the kernel drops a closed one). The proxy needs no privilege.
//! 5. `PASSIVE_ESTABLISHED_CB` without a hand-over entry: if the inbound rules
//!    capture this connection, `sk_lookup` steered it to the proxy, and its
//!    local address *is* the original destination: store it so
//!    `SO_ORIGINAL_DST` answers as it does after REDIRECT.
//!
//! So a hand-over entry lives exactly as long as the client's side of its
//! connection, a pending entry for the length of one `connect()` call, and
//! the inbound per-socket copies die with their sockets: nothing outlives
//! its connection.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
        BPF_TCP_CLOSE, bpf_sock_ops,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use redirect_common::{
    AF_INET, AF_INET6, Action, Addr, Config, Counter, Inbound, LISTENER_V4, LISTENER_V6, OrigDst,
    TupleKey, decide_inbound, orig_flags,
};

use crate::{
    maps::{CONFIG, HANDOVER, INBOUND_LISTENER, PENDING, count, set_orig_dst},
    policy::KernelPolicy,
    tuple::{self, Ends},
};

const AF_INET_U32: u32 = AF_INET as u32;

#[sock_ops]
pub fn redirect_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx, ops),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(ops),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(ops),
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                on_client_close(ops);
            }
        }
        _ => {}
    }
    0
}

/// `ops`'s addresses as [`tuple::normalize`] returns them.
#[inline(always)]
fn addrs(ops: *mut bpf_sock_ops) -> Option<(u16, [u32; 4], [u32; 4])> {
    let o = unsafe { &*ops };
    let (local, remote) = if o.family == u32::from(AF_INET6) {
        (o.local_ip6, o.remote_ip6)
    } else {
        ([o.local_ip4, 0, 0, 0], [o.remote_ip4, 0, 0, 0])
    };
    tuple::normalize(o.family, local, remote)
}

/// The hand-over key of `ops`'s connection. `client_is_local` says whether
/// `ops` is the client's socket or the proxy's.
#[inline(always)]
fn tuple(ops: *mut bpf_sock_ops, client_is_local: bool) -> Option<TupleKey> {
    let (family, local, remote) = addrs(ops)?;
    let o = unsafe { &*ops };
    let ends = Ends {
        netns: unsafe { bpf_get_netns_cookie(ops.cast()) },
        family,
        local,
        remote,
        local_port: o.local_port as u16,
        remote_port: u16::from_be((o.remote_port >> 16) as u16),
    };
    Some(ends.key(client_is_local))
}

#[inline(always)]
fn sk_of(ops: *mut bpf_sock_ops) -> *mut aya_ebpf::bindings::bpf_sock {
    unsafe { (*ops).__bindgen_anon_2.sk }
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext, ops: *mut bpf_sock_ops) {
    // SAFETY: `ops` is this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    let Some(pending) = PENDING.get_ptr(cookie) else {
        return;
    };
    // SAFETY: a live map value.
    let orig = unsafe { *pending };
    let _ = PENDING.remove(cookie);
    let Some(key) = tuple(ops, true) else {
        return;
    };
    if HANDOVER.insert(key, orig, 0).is_err() {
        count(Counter::HandoverFull as u32);
        return;
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

#[inline(always)]
fn on_passive_established(ops: *mut bpf_sock_ops) {
    let Some(key) = tuple(ops, false) else {
        return;
    };
    let Some(entry) = HANDOVER.get_ptr_mut(key) else {
        on_inbound_accepted(ops);
        return;
    };
    // SAFETY: a live map value; only this flag is written, in place.
    unsafe { (*entry).flags |= orig_flags::CLAIMED };
    count(Counter::HandoverTaken as u32);
}

#[inline(always)]
fn on_client_close(ops: *mut bpf_sock_ops) {
    let Some(key) = tuple(ops, true) else {
        return;
    };
    let Some(entry) = HANDOVER.get_ptr(key) else {
        return;
    };
    // SAFETY: a live map value.
    let claimed = unsafe { (*entry).flags } & orig_flags::CLAIMED != 0;
    if HANDOVER.remove(key).is_ok() && !claimed {
        count(Counter::HandoverDropped as u32);
    }
}

/// The pod's policy, if `ops`'s socket lives in the pod's namespace.
#[inline(always)]
fn pod_config(ops: *mut bpf_sock_ops) -> Option<&'static Config> {
    let cfg = CONFIG.get(0)?;
    if cfg.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ops.cast()) } != cfg.netns_cookie {
        return None;
    }
    Some(cfg)
}

#[inline(always)]
fn on_listen(ops: *mut bpf_sock_ops) {
    let Some(cfg) = pod_config(ops) else {
        return;
    };
    let o = unsafe { &*ops };
    if o.local_port != u32::from(cfg.inbound_port) {
        return;
    }
    let slot = if o.family == AF_INET_U32 {
        LISTENER_V4
    } else if o.family == u32::from(AF_INET6) {
        LISTENER_V6
    } else {
        return;
    };
    // SAFETY: `ops` is this program's context, a full TCP socket.
    if unsafe { INBOUND_LISTENER.update(slot, ops, BPF_ANY.into()) }.is_ok() {
        count(Counter::ListenerSet as u32);
    }
}

/// A passive connection with no hand-over entry: captured inbound?
#[inline(always)]
fn on_inbound_accepted(ops: *mut bpf_sock_ops) {
    let Some(cfg) = pod_config(ops) else {
        return;
    };
    let Some((family, local, remote)) = addrs(ops) else {
        return;
    };
    let (src, dst) = if family == AF_INET {
        (
            Addr::V4(u32::from_be(remote[0])),
            Addr::V4(u32::from_be(local[0])),
        )
    } else {
        (Addr::from_ip6_words(remote), Addr::from_ip6_words(local))
    };
    let port = unsafe { (*ops).local_port } as u16;
    let conn = Inbound {
        src,
        dst,
        dport: port,
    };
    let verdict = decide_inbound(cfg, &KernelPolicy, &conn);
    if let Action::Pass = verdict.action {
        return;
    }
    let orig = OrigDst {
        ip: local,
        port_be: port.to_be(),
        family,
        rule: verdict.rule as u16,
        flags: orig_flags::PROXY_SIDE,
    };
    let _ = set_orig_dst(sk_of(ops), &orig);
}

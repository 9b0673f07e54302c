//! `sockops`: carry a captured connection's original destination from the
//! application's socket to the proxy's.
//!
//! 1. `TCP_CONNECT_CB` (application socket, before its SYN; the ports are
//!    known from here on): if connect4 recorded the connection in `CONNS`
//!    under the socket's cookie, list it in `TUPLES` under its 4-tuple (plus
//!    netns cookie). A 4-tuple still listed for an older connection whose
//!    proxy side never came is reclaimed here.
//! 2. `PASSIVE_ESTABLISHED_CB` (the proxy's new socket): find the connection
//!    by its 4-tuple and copy the destination onto this socket
//!    (`ORIG_DST`), where `SO_ORIGINAL_DST` reads it for as long as the
//!    proxy holds the socket, whatever the application does meanwhile. The
//!    application's side keeps its entry until it releases its socket
//!    (`sock_release.rs`); whichever end is last removes it.
//!
//! And for inbound capture (see `sk_lookup.rs`):
//!
//! 3. `TCP_LISTEN_CB`: a socket of the pod's namespace listening on the inbound
//!    capture port becomes the capture listener (a restarted proxy replaces
//!    it; the kernel drops a closed one). The proxy needs no privilege.
//! 4. `PASSIVE_ESTABLISHED_CB` without a listed 4-tuple: if the inbound rules
//!    capture this connection, `sk_lookup` steered it to the proxy, and its
//!    local address *is* the original destination: store it so
//!    `SO_ORIGINAL_DST` answers as it does after REDIRECT.
//!
//! No state callbacks are asked for: a socket's state changes cost nothing
//! here.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, bpf_sock_ops,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use redirect_common::{
    AF_INET, AF_INET6, Action, Addr, Config, Counter, Inbound, LISTENER_V4, LISTENER_V6,
    ListenerKey, OrigDst, ProxySide, TupleKey, conn_state, decide_inbound, orig_flags,
};

use crate::{
    maps::{
        CONNS, INBOUND_LISTENER, TUPLES, conn_state_or, count, forget_conn,
        pod_config as config_of, set_proxy_side,
    },
    policy::KernelPolicy,
    tuple::{self, Ends},
};

const AF_INET_U32: u32 = AF_INET as u32;
/// `BPF_NOEXIST`: insert only if the key is new.
const BPF_NOEXIST: u64 = 1;

#[sock_ops]
pub fn redirect_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ops),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(ops),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(ops),
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
fn on_connect(ops: *mut bpf_sock_ops) {
    // SAFETY: `ops` is this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    let Some(conn) = CONNS.get_ptr_mut(cookie) else {
        return;
    };
    let Some(key) = tuple(ops, true) else {
        return;
    };
    // SAFETY: a live map value; only this socket's own connect writes it.
    unsafe { (*conn).tuple = key };
    // Usually the 4-tuple is new; only when it is not, look at who has it.
    if TUPLES.insert(key, cookie, BPF_NOEXIST).is_err() {
        reclaim_orphan(&key, cookie);
        if TUPLES.insert(key, cookie, BPF_ANY.into()).is_err() {
            count(Counter::TupleFailed as u32);
            return;
        }
    }
    conn_state_or(conn, conn_state::JOINED);
}

/// A 4-tuple the kernel handed to a new connection can still be listed for an
/// older one: an application socket released while established whose proxy
/// side never came (its listener's queue overflowed, say). That entry is
/// dead now; remove it.
#[inline(always)]
fn reclaim_orphan(key: &TupleKey, cookie: u64) {
    let Some((owner, old)) = tuple::conn_by_tuple(key) else {
        return;
    };
    // SAFETY: a live map value, read.
    let (state, tuple) = unsafe { ((*old).state, (*old).tuple) };
    if owner != cookie
        && tuple == *key
        && state & (conn_state::APP_RELEASED | conn_state::CLAIMED) == conn_state::APP_RELEASED
    {
        forget_conn(owner, old);
        count(Counter::OrphanReclaimed as u32);
    }
}

#[inline(always)]
fn on_passive_established(ops: *mut bpf_sock_ops) {
    let Some(key) = tuple(ops, false) else {
        return;
    };
    let Some((cookie, conn)) = tuple::conn_by_tuple(&key) else {
        on_inbound_accepted(ops);
        return;
    };
    // SAFETY: a live map value, copied out.
    let side = unsafe {
        ProxySide {
            orig: (*conn).orig,
            shown_peer: (*conn).shown_src,
        }
    };
    if set_proxy_side(sk_of(ops), &side).is_some() {
        count(Counter::HandoverTaken as u32);
    } else {
        count(Counter::StorageFailed as u32);
    }
    let old = conn_state_or(conn, conn_state::CLAIMED);
    if old & conn_state::APP_RELEASED != 0 {
        forget_conn(cookie, conn);
    }
}

/// The policy of the pod whose namespace `ops`'s socket lives in, with
/// that namespace's cookie.
#[inline(always)]
fn pod_config(ops: *mut bpf_sock_ops) -> Option<(u64, &'static Config)> {
    // SAFETY: `ops` is this program's context.
    let netns = unsafe { bpf_get_netns_cookie(ops.cast()) };
    Some((netns, config_of(netns)?))
}

#[inline(always)]
fn on_listen(ops: *mut bpf_sock_ops) {
    let Some((netns, cfg)) = pod_config(ops) else {
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
    let key = ListenerKey {
        netns,
        slot,
        reserved: 0,
    };
    // SAFETY: `ops` is this program's context, a full TCP socket.
    if INBOUND_LISTENER
        .update(key, unsafe { &mut *ops }, BPF_ANY.into())
        .is_ok()
    {
        count(Counter::ListenerSet as u32);
    }
}

/// A passive connection with no hand-over entry: captured inbound?
#[inline(always)]
fn on_inbound_accepted(ops: *mut bpf_sock_ops) {
    let Some((_, cfg)) = pod_config(ops) else {
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
    // The interface the connection arrived on is not known here: one that
    // `-c` kept from the proxy (sk_lookup passed it) is taken as captured,
    // and the application's socket gets its own address as original
    // destination, which is what conntrack answers for a connection nobody
    // redirected.
    let conn = Inbound {
        src,
        dst,
        dport: port,
        ifindex: 0,
    };
    let verdict = decide_inbound(cfg, &KernelPolicy { id: cfg.policy }, &conn);
    if let Action::Pass = verdict.action {
        return;
    }
    let side = ProxySide {
        orig: OrigDst {
            ip: local,
            port_be: port.to_be(),
            family,
            rule: verdict.rule as u16,
            flags: orig_flags::INBOUND,
        },
        shown_peer: [0; 4],
    };
    if set_proxy_side(sk_of(ops), &side).is_none() {
        count(Counter::StorageFailed as u32);
    }
}

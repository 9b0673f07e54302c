//! `cgroup/sock_release`: the application closes a socket. If connect4
//! captured it, its side of the connection ends here.
//!
//! - The proxy's socket already took its own copy of the destination
//!   (`CLAIMED`): nothing is needed any more, the entry goes.
//! - The connection was never established (the `connect()` never got as far
//!   as a SYN, was refused, or is abandoned in `SYN-SENT`): no proxy socket
//!   exists or ever will; the entry goes.
//! - It was established but the proxy's side of the handshake has not been
//!   processed yet (the final ACK is still queued, or the proxy's accept
//!   queue overflowed): the entry stays, so the proxy's socket still finds
//!   it when it comes; that socket then removes it. If none ever comes, the
//!   next connection that takes the same 4-tuple reclaims it.
//!
//! Deciding at release rather than at `TCP_CLOSE` is what keeps the
//! destination available to a proxy that asks after the application closed
//! or reset: the proxy's copy lives on its own socket.

use aya_ebpf::{
    bindings::{BPF_TCP_CLOSE, BPF_TCP_SYN_SENT},
    helpers::generated::bpf_get_socket_cookie,
    macros::cgroup_sock,
    programs::SockContext,
};
use redirect_common::{Counter, conn_state};

use crate::maps::{CONNS, conn_state_or, count, forget_conn};

#[cgroup_sock(sock_release)]
pub fn redirect_sock_release(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: the kernel hands this program a valid socket.
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    let Some(conn) = CONNS.get_ptr_mut(cookie) else {
        return 1;
    };
    let old = conn_state_or(conn, conn_state::APP_RELEASED);
    if old & conn_state::CLAIMED != 0 {
        forget_conn(cookie, conn);
        return 1;
    }
    // SAFETY: as above.
    let state = unsafe { (*sk).state };
    if old & conn_state::JOINED == 0 || state == BPF_TCP_SYN_SENT || state == BPF_TCP_CLOSE {
        if old & conn_state::JOINED != 0 {
            count(Counter::HandoverDropped as u32);
        }
        forget_conn(cookie, conn);
    } else {
        count(Counter::OrphanKept as u32);
    }
    1
}

//! `cgroup/getsockopt`: answer `getsockopt(SOL_IP, SO_ORIGINAL_DST)` and
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` with the original
//! destination, so an unmodified proxy (one that works behind iptables
//! REDIRECT) works unchanged. A proxy's accepted socket answers from its own
//! storage (written when its side of the handshake completed, outbound or
//! inbound), so it answers for as long as the proxy holds it. An
//! application's captured socket answers too, as conntrack does for it,
//! from its connection's entry under its 4-tuple.
//!
//! Every other call passes through untouched: the program does not write
//! `optlen`, `retval` or the buffer, so the kernel's own answer stands with
//! the caller's own buffer length.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sockopt},
    helpers::generated::bpf_get_netns_cookie,
    macros::cgroup_sockopt,
    programs::SockoptContext,
};
use redirect_common::{AF_INET, AF_INET6, Counter, OrigDst, SO_ORIGINAL_DST, SOL_IP, SOL_IPV6};

use crate::{
    maps::{SockaddrIn, SockaddrIn6, count, pod_config, proxy_side_of},
    tuple,
};

#[cgroup_sockopt(getsockopt)]
pub fn redirect_getsockopt(ctx: SockoptContext) -> i32 {
    let so = unsafe { &mut *ctx.sockopt };
    if so.optname != SO_ORIGINAL_DST || (so.level != SOL_IP && so.level != SOL_IPV6) {
        return 1;
    }
    let sk = unsafe { so.__bindgen_anon_1.sk };
    let orig = match proxy_side_of(sk) {
        // SAFETY: a live storage slot, copied out.
        Some(p) => unsafe { (*p).orig },
        None => match app_side(ctx.sockopt, sk) {
            Some(o) => o,
            None => {
                count(Counter::OrigDstMissing as u32);
                return 1;
            }
        },
    };
    let served = if so.level == SOL_IP && orig.family == AF_INET {
        write(
            so,
            SockaddrIn {
                family: AF_INET,
                port_be: orig.port_be,
                addr_be: orig.ip[0],
                zero: [0; 8],
            },
        )
    } else if so.level == SOL_IPV6 && orig.family == AF_INET6 {
        write(
            so,
            SockaddrIn6 {
                family: AF_INET6,
                port_be: orig.port_be,
                flowinfo: 0,
                addr: orig.ip,
                scope_id: 0,
            },
        )
    } else {
        false
    };
    if served {
        count(Counter::OrigDstServed as u32);
    }
    1
}

/// Writes `value` as the call's answer; `false` if the caller's buffer is
/// too small (or larger than a page and not shown to BPF): the kernel's
/// answer then stands.
#[inline(always)]
fn write<T>(so: &mut bpf_sockopt, value: T) -> bool {
    let len = core::mem::size_of::<T>();
    let start = unsafe { so.__bindgen_anon_2.optval } as *mut u8;
    let end = unsafe { so.__bindgen_anon_3.optval_end } as *mut u8;
    if unsafe { start.add(len) } > end {
        return false;
    }
    unsafe {
        core::ptr::write_unaligned(start.cast::<T>(), value);
        // Separate volatile stores: merged into one 8-byte store, they are
        // rejected by the verifier (see docs/aya-notes.md).
        core::ptr::write_volatile(&mut so.optlen, len as i32);
        core::ptr::write_volatile(&mut so.retval, 0);
    }
    true
}

/// The original destination of an application's captured socket `sk`,
/// from its connection's entry (found by 4-tuple: this hook has no socket
/// cookie).
#[inline(always)]
fn app_side(so: *mut bpf_sockopt, sk: *mut bpf_sock) -> Option<OrigDst> {
    // SAFETY: `so` is this program's context.
    let netns = unsafe { bpf_get_netns_cookie(so.cast()) };
    let cfg = pod_config(netns)?;
    let ends = tuple::ends_of(sk, netns)?;
    if !cfg.is_capture_port(ends.remote_port) {
        return None;
    }
    let (_, conn) = tuple::conn_by_tuple(&ends.key(true))?;
    // SAFETY: a live map value, copied out.
    Some(unsafe { (*conn).orig })
}

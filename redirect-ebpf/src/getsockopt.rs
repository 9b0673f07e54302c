//! `cgroup/getsockopt`: answer `getsockopt(SOL_IP, SO_ORIGINAL_DST)` from the
//! original destination stored on the socket, so an unmodified proxy (one that
//! works behind iptables REDIRECT) works unchanged.
//!
//! Every other call passes through untouched: the program does not write
//! `optlen`, `retval` or the buffer, so the kernel's own answer stands with
//! the caller's own buffer length.

use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};
use redirect_common::{AF_INET, Counter, SO_ORIGINAL_DST, SOL_IP};

use crate::maps::{SockaddrIn, count, orig_dst_of};

const SOCKADDR_IN_LEN: usize = core::mem::size_of::<SockaddrIn>();

#[cgroup_sockopt(getsockopt)]
pub fn redirect_getsockopt(ctx: SockoptContext) -> i32 {
    let so = unsafe { &mut *ctx.sockopt };
    if so.level != SOL_IP || so.optname != SO_ORIGINAL_DST {
        return 1;
    }
    let sk = unsafe { so.__bindgen_anon_1.sk };
    let Some(orig) = orig_dst_of(sk) else {
        count(Counter::OrigDstMissing as u32);
        return 1;
    };
    let orig = unsafe { &*orig };
    if orig.family != AF_INET {
        return 1;
    }
    let start = unsafe { so.__bindgen_anon_2.optval } as *mut u8;
    let end = unsafe { so.__bindgen_anon_3.optval_end } as *mut u8;
    if unsafe { start.add(SOCKADDR_IN_LEN) } > end {
        // Buffer too small (or larger than a page and not shown to BPF):
        // leave the kernel's answer.
        return 1;
    }
    let out = SockaddrIn {
        family: AF_INET,
        port_be: orig.port_be,
        addr_be: orig.ip[0],
        zero: [0; 8],
    };
    unsafe {
        core::ptr::write_unaligned(start.cast::<SockaddrIn>(), out);
        // Separate volatile stores: merged into one 8-byte store, they are
        // rejected by the verifier (see shared/AYA-NOTES.md).
        core::ptr::write_volatile(&mut so.optlen, SOCKADDR_IN_LEN as i32);
        core::ptr::write_volatile(&mut so.retval, 0);
    }
    count(Counter::OrigDstServed as u32);
    1
}

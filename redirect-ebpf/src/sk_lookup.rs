//! `sk_lookup` (attached to each pod's network namespace): inbound capture
//! without NAT.
//!
//! The pod is found by the address the connection arrives for
//! (`POD_ADDRS`): this hook cannot ask for its network namespace on the
//! kernels redirect supports. An address the pod did not have when it was
//! registered finds no pod: the connection is dropped and counted
//! (`inbound_unknown_addr`), never delivered uncaptured.
//!
//! For the first packet of every TCP connection arriving in the namespace,
//! decide with the shared inbound rules; a captured connection is handed to
//! the proxy's inbound listener (registered by `sockops.rs` when the proxy
//! called `listen()`). The connection keeps its real local address, so the
//! proxy's `getsockname()` is the original destination and no conntrack entry
//! is needed. With no listener registered, a captured connection is refused,
//! as iptables REDIRECT to a closed port refuses it: never delivered
//! uncaptured.

use aya_ebpf::{
    bindings::sk_action, helpers::bpf_probe_read_kernel, macros::sk_lookup,
    programs::SkLookupContext,
};
use redirect_common::{
    AF_INET, AF_INET6, Action, Addr, AddrKey, Counter, Inbound, LISTENER_V4, LISTENER_V6,
    ListenerKey, decide_inbound,
};

use crate::{
    maps::{INBOUND_LISTENER, POD_ADDRS, count, pod_config},
    policy::KernelPolicy,
};

const IPPROTO_TCP: u32 = 6;
const PASS: u32 = sk_action::SK_PASS;
const DROP: u32 = sk_action::SK_DROP;

#[sk_lookup]
pub fn redirect_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid context for the program's lifetime.
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP {
        return PASS;
    }
    let v6 = l.family == u32::from(AF_INET6);
    if !v6 && l.family != u32::from(AF_INET) {
        return PASS;
    }
    let (mut conn, local) = if v6 {
        let local = [
            l.local_ip6[0],
            l.local_ip6[1],
            l.local_ip6[2],
            l.local_ip6[3],
        ];
        (
            Inbound {
                src: Addr::from_ip6_words([
                    l.remote_ip6[0],
                    l.remote_ip6[1],
                    l.remote_ip6[2],
                    l.remote_ip6[3],
                ]),
                dst: Addr::from_ip6_words(local),
                dport: l.local_port as u16,
                ifindex: 0,
            },
            local,
        )
    } else {
        (
            Inbound {
                src: Addr::V4(u32::from_be(l.remote_ip4)),
                dst: Addr::V4(u32::from_be(l.local_ip4)),
                dport: l.local_port as u16,
                ifindex: 0,
            },
            [l.local_ip4, 0, 0, 0],
        )
    };
    // Connections to a loopback address are the pod's own (they never walk
    // PREROUTING), and loopback addresses are in every namespace.
    if conn.dst.is_loopback_range() {
        return PASS;
    }
    // This program runs only in registered pods' namespaces (it is attached
    // to each), and the address the connection arrives for says which pod.
    let key = AddrKey {
        ip: local,
        family: l.family,
        reserved: 0,
    };
    let Some(netns) = POD_ADDRS.get_ptr(key) else {
        count(Counter::InboundUnknownAddr as u32);
        return DROP;
    };
    // SAFETY: a map value, copied out.
    let netns = unsafe { *netns };
    let Some(cfg) = pod_config(netns) else {
        // Registered, but its policy is not in force (yet, or any more).
        return PASS;
    };
    if cfg.excludes_interfaces() {
        // The interface the packet arrived on (`-c`). The context's own
        // `ingress_ifindex` field exists only since Linux 5.17 (reading it
        // would keep the program from loading on older kernels), so it is
        // read from the kernel's context struct, at the offset the loader
        // found in BTF (it refuses `-c` on a kernel without the field).
        conn.ifindex = ingress_ifindex(ctx.lookup as *const u8, cfg.ifindex_offset);
    }
    let verdict = decide_inbound(cfg, &KernelPolicy { id: cfg.policy }, &conn);
    count(verdict.rule as u32);
    if let Action::Pass = verdict.action {
        return PASS;
    }
    let listener = |slot| ListenerKey {
        netns,
        slot,
        reserved: 0,
    };
    // IPv4: an IPv4 listener first; a dual-stack IPv6 one takes IPv4 too.
    if (!v6
        && INBOUND_LISTENER
            .redirect_sk_lookup(&ctx, listener(LISTENER_V4), 0)
            .is_ok())
        || INBOUND_LISTENER
            .redirect_sk_lookup(&ctx, listener(LISTENER_V6), 0)
            .is_ok()
    {
        return PASS;
    }
    count(Counter::InboundNoListener as u32);
    DROP
}

/// `ingress_ifindex` of the kernel's sk_lookup context at `lookup`, which
/// is `offset` bytes in (0 if it cannot be read). A function of its own:
/// inlined, the compiler left a register uninitialised on the IPv6 path,
/// which the verifier refused (`R6 !read_ok`).
#[inline(never)]
fn ingress_ifindex(lookup: *const u8, offset: u16) -> u32 {
    let at = lookup.wrapping_add(usize::from(offset));
    // SAFETY: bpf_probe_read_kernel checks the address itself.
    unsafe { bpf_probe_read_kernel(at as *const u32) }.unwrap_or(0)
}

//! DNS capture over UDP (istio's rule 5): `cgroup/sendmsg4/6` and the UDP
//! side of `cgroup/connect4/6` send captured queries to the DNS proxy;
//! `cgroup_skb/egress`, `cgroup_skb/ingress` and `cgroup/recvmsg4/6` show
//! each answer coming from the nameserver its query was sent to, as
//! conntrack's un-NAT does under iptables.
//!
//! UDP has no connection to hang the original destination on, and one
//! socket may have queries to several nameservers in flight (musl sends to
//! all of them at once). So the socket's [`DnsSocket`] (socket storage:
//! fixed size, freed with the socket) follows each query:
//!
//! 1. `sendmsg` (or `connect`) decides, rewrites the destination to the
//!    proxy and notes the nameserver (`pending`, or `connected`).
//! 2. As the datagram leaves, `egress` reads its DNS id and notes it, with
//!    that nameserver, in a slot of `queries` (the oldest is reused).
//! 3. As an answer from the proxy arrives, `ingress` finds the slot with its
//!    DNS id and queues the nameserver in `answers`, in the order the socket
//!    receives its datagrams.
//! 4. `recvmsg` takes the next queued nameserver and shows it as the
//!    answer's source (with nothing queued, a connected socket's peer).
//!
//! Steps 1 and 2 run in the same system call; 3 and 4 see the datagrams in
//! the socket's receive order. The limits are in `docs/semantics.md`.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_TCP_ESTABLISHED, bpf_sock, bpf_sock_addr},
    helpers::generated::bpf_sk_fullsock,
    macros::{cgroup_skb, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext},
};
use redirect_common::{
    AF_INET, AF_INET6, Addr, Config, Counter, DNS_ANSWER_SLOTS, DNS_QUERY_SLOTS, DnsPeer, DnsQuery,
    DnsSocket, V4_LOCALHOST, config_flags, is_v4_mapped,
};

use crate::{
    connect::{ALLOW, DENY, decide, ipv4_source, outbound, sock_addr_pod, source_v4},
    maps::{V6_LOCALHOST_WORDS, count, dns_socket, put_ip6, target_v4, target_v6, v4_mapped},
};

const IPPROTO_UDP: u8 = 17;

/// Forgets a socket's captured `connect()` (it connected elsewhere).
#[inline(always)]
fn forget_connected(sk: *mut bpf_sock) {
    if let Some(state) = dns_socket(sk, false) {
        // SAFETY: the socket's live storage.
        unsafe { (*state).connected = DnsPeer::default() };
    }
}

/// Forgets the nameserver of a `sendmsg()` that is not captured.
#[inline(always)]
fn forget_pending(sk: *mut bpf_sock) {
    if let Some(state) = dns_socket(sk, false) {
        // SAFETY: as above.
        unsafe { (*state).pending = DnsPeer::default() };
    }
}

/// The socket's DNS state, made if needed, with the pod's DNS port.
#[inline(always)]
fn state_of(sk: *mut bpf_sock, cfg: &Config) -> Option<*mut DnsSocket> {
    let Some(state) = dns_socket(sk, true) else {
        count(Counter::StorageFailed as u32);
        return None;
    };
    // SAFETY: the socket's live storage.
    unsafe { (*state).dns_port = cfg.dns_port };
    Some(state)
}

/// Decides a UDP datagram or connect to `dst`:`port_be` (network order) as
/// rule 5 does: the proxy port if captured, 0 if not. Only port 53 can be.
/// `bound`: the socket's bound address, unspecified if none.
///
/// A function of its own (a BPF-to-BPF call): inlined into the `sendmsg`
/// programs, the compiler packed a copy of the context pointer with other
/// values, which the verifier refuses.
#[inline(never)]
fn capture(cfg: &Config, sa: *mut bpf_sock_addr, bound: &Addr, dst: &Addr, port_be: u32) -> u32 {
    if !cfg.has(config_flags::DNS_CAPTURE) || u16::from_be(port_be as u16) != 53 {
        return 0;
    }
    // SAFETY: this program's context.
    let conn = outbound(cfg, unsafe { &*sa }, bound, *dst, port_be, true);
    decide(cfg, &conn).0.map_or(0, |(port, _)| u32::from(port))
}

/// The UDP side of `connect4`.
#[inline(always)]
pub unsafe fn connect4(sa: &mut bpf_sock_addr, cfg: &Config) -> i32 {
    let port_be = user_port(sa);
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let (bound_be, bound_port) = unsafe { ((*sk).src_ip4, (*sk).src_port) };
    let dst_be = sa.user_ip4;
    let dst = Addr::V4(u32::from_be(dst_be));
    let port = capture(cfg, sa, &Addr::V4(u32::from_be(bound_be)), &dst, port_be);
    if port == 0 {
        forget_connected(sk);
        return ALLOW;
    };
    let Some(state) = state_of(sk, cfg) else {
        return DENY;
    };
    let src_be = source_v4(cfg, &dst, dst_be, false);
    let shown = unsafe { ipv4_source(sa, src_be, bound_be, bound_port, false) };
    // SAFETY: the socket's live storage.
    unsafe {
        (*state).connected = peer4(dst_be, port_be);
        (*state).shown_src = [shown, 0, 0, 0];
    }
    sa.user_ip4 = V4_LOCALHOST.to_be();
    set_user_port(sa, u32::from((port as u16).to_be()));
    ALLOW
}

/// The UDP side of `connect6` (IPv4-mapped destinations as IPv4).
#[inline(always)]
pub unsafe fn connect6(sa: &mut bpf_sock_addr, cfg: &Config) -> i32 {
    let port_be = user_port(sa);
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let (bound, bound_port) = unsafe { (bound6(sk), (*sk).src_port) };
    let dst = user_ip6(sa);
    let unbound = bound == [0; 4];
    let to = Addr::from_ip6_words(dst);
    let port = capture(cfg, sa, &Addr::from_ip6_words(bound), &to, port_be);
    if port == 0 {
        forget_connected(sk);
        return ALLOW;
    };
    let Some(state) = state_of(sk, cfg) else {
        return DENY;
    };
    let (peer, proxy) = peer6(dst, port_be);
    let shown = if is_v4_mapped(dst) {
        let src_be = source_v4(cfg, &to, dst[3], false);
        let bound_be = if unbound { 0 } else { bound[3] };
        [
            unsafe { ipv4_source(sa, src_be, bound_be, bound_port, true) },
            0,
            0,
            0,
        ]
    } else if unbound {
        // From ::1, as TCP (see connect.rs); show the pod's address.
        cfg.source_v6
    } else {
        [0; 4]
    };
    // SAFETY: the socket's live storage.
    unsafe {
        (*state).connected = peer;
        (*state).shown_src = shown;
    }
    set_user_ip6(sa, proxy);
    set_user_port(sa, u32::from((port as u16).to_be()));
    ALLOW
}

#[inline(always)]
unsafe fn bound6(sk: *mut bpf_sock) -> [u32; 4] {
    unsafe {
        [
            (*sk).src_ip6[0],
            (*sk).src_ip6[1],
            (*sk).src_ip6[2],
            (*sk).src_ip6[3],
        ]
    }
}

/// `user_port`, read once: the compiler must not keep a pointer into the
/// context around (the verifier refuses a dereference of a moved context
/// pointer).
#[inline(always)]
fn user_port(sa: &bpf_sock_addr) -> u32 {
    // SAFETY: a field of this program's context.
    unsafe { core::ptr::read_volatile(&sa.user_port) }
}

#[inline(always)]
fn set_user_port(sa: &mut bpf_sock_addr, port: u32) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&mut sa.user_port, port) }
}

#[inline(always)]
fn user_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ]
}

#[inline(always)]
fn set_user_ip6(sa: &mut bpf_sock_addr, ip: [u32; 4]) {
    sa.user_ip6[0] = ip[0];
    sa.user_ip6[1] = ip[1];
    sa.user_ip6[2] = ip[2];
    sa.user_ip6[3] = ip[3];
}

/// The nameserver of a captured IPv4 query (the unspecified address as the
/// loopback one it goes to).
#[inline(always)]
fn peer4(dst_be: u32, port_be: u32) -> DnsPeer {
    DnsPeer {
        ip: [target_v4(dst_be), 0, 0, 0],
        port_be: port_be as u16,
        family: AF_INET,
    }
}

/// The nameserver of a captured query from an IPv6 socket, and the proxy
/// address it goes to: an IPv4-mapped destination is an IPv4 query.
#[inline(always)]
fn peer6(dst: [u32; 4], port_be: u32) -> (DnsPeer, [u32; 4]) {
    if is_v4_mapped(dst) {
        (peer4(dst[3], port_be), v4_mapped(V4_LOCALHOST.to_be()))
    } else {
        let peer = DnsPeer {
            ip: target_v6(dst),
            port_be: port_be as u16,
            family: AF_INET6,
        };
        (peer, V6_LOCALHOST_WORDS)
    }
}

/// Notes the nameserver of a captured `sendmsg()` for `egress`; `false` if
/// the socket's state could not be made.
#[inline(always)]
fn note_pending(sk: *mut bpf_sock, cfg: &Config, peer: DnsPeer) -> bool {
    let Some(state) = state_of(sk, cfg) else {
        return false;
    };
    // SAFETY: the socket's live storage.
    unsafe { (*state).pending = peer };
    true
}

#[cgroup_sock_addr(sendmsg4)]
pub fn redirect_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let port_be = user_port(sa);
    let Some(cfg) = sock_addr_pod(sa) else {
        return ALLOW;
    };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let bound_be = unsafe { (*sk).src_ip4 };
    let dst_be = sa.user_ip4;
    let port = capture(
        cfg,
        sa,
        &Addr::V4(u32::from_be(bound_be)),
        &Addr::V4(u32::from_be(dst_be)),
        port_be,
    );
    if port == 0 {
        forget_pending(sk);
        return ALLOW;
    };
    if !note_pending(sk, cfg, peer4(dst_be, port_be)) {
        return DENY;
    }
    sa.user_ip4 = V4_LOCALHOST.to_be();
    set_user_port(sa, u32::from((port as u16).to_be()));
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn redirect_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    let port_be = user_port(sa);
    let Some(cfg) = sock_addr_pod(sa) else {
        return ALLOW;
    };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let bound = unsafe { bound6(sk) };
    let dst = user_ip6(sa);
    let port = capture(
        cfg,
        sa,
        &Addr::from_ip6_words(bound),
        &Addr::from_ip6_words(dst),
        port_be,
    );
    if port == 0 {
        forget_pending(sk);
        return ALLOW;
    };
    let (peer, proxy) = peer6(dst, port_be);
    if !note_pending(sk, cfg, peer) {
        return DENY;
    }
    set_user_ip6(sa, proxy);
    set_user_port(sa, u32::from((port as u16).to_be()));
    ALLOW
}

/// The DNS id of `ctx`'s datagram (read from its network header) if it
/// goes to (`egress`) or comes from the DNS proxy, the loopback address at
/// `dns_port`.
#[inline(always)]
fn proxy_dns_id(ctx: &SkBuffContext, egress: bool, dns_port: u16) -> Option<u16> {
    let first: u8 = ctx.load(0).ok()?;
    let (udp, is_loopback) = match first >> 4 {
        4 => {
            let proto: u8 = ctx.load(9).ok()?;
            if proto != IPPROTO_UDP {
                return None;
            }
            let addr_be: u32 = ctx.load(if egress { 16 } else { 12 }).ok()?;
            (
                usize::from(first & 0xf) * 4,
                u32::from_be(addr_be) == V4_LOCALHOST,
            )
        }
        6 => {
            let next: u8 = ctx.load(6).ok()?;
            if next != IPPROTO_UDP {
                return None;
            }
            let addr: [u32; 4] = ctx.load(if egress { 24 } else { 8 }).ok()?;
            (40, addr == V6_LOCALHOST_WORDS)
        }
        _ => return None,
    };
    let port_be: u16 = ctx.load(udp + if egress { 2 } else { 0 }).ok()?;
    if !is_loopback || u16::from_be(port_be) != dns_port {
        return None;
    }
    ctx.load(udp + 8).ok()
}

/// The UDP socket sending or receiving `ctx`'s packet, and its DNS state.
#[inline(always)]
fn skb_state(ctx: &SkBuffContext) -> Option<(*mut bpf_sock, *mut DnsSocket)> {
    let skb: *mut __sk_buff = ctx.skb.skb;
    // SAFETY: the kernel's packet of this call.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a socket pointer of this packet.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    // SAFETY: checked for null first.
    if sk.is_null() || unsafe { (*sk).protocol } != u32::from(IPPROTO_UDP) {
        return None;
    }
    Some((sk, dns_socket(sk, false)?))
}

/// Whether UDP socket `sk` is connected now: a captured `connect()` it
/// undid (`connect(AF_UNSPEC)`, which no hook sees) no longer counts.
#[inline(always)]
fn is_connected(sk: *mut bpf_sock) -> bool {
    // SAFETY: a full socket of this call.
    unsafe { (*sk).state == BPF_TCP_ESTABLISHED }
}

#[cgroup_skb(egress)]
pub fn redirect_dns_egress(ctx: SkBuffContext) -> i32 {
    dns_egress(&ctx);
    1
}

/// Notes a query leaving for the DNS proxy, with the nameserver its
/// `sendmsg` (or `connect`) noted.
#[inline(always)]
fn dns_egress(ctx: &SkBuffContext) -> Option<()> {
    let (sk, state) = skb_state(ctx)?;
    // SAFETY: the socket's live storage.
    let id = proxy_dns_id(ctx, true, unsafe { (*state).dns_port })?;
    // SAFETY: as above.
    unsafe {
        let peer = if (*state).pending.family != 0 {
            let p = (*state).pending;
            (*state).pending = DnsPeer::default();
            p
        } else if (*state).connected.family != 0 && is_connected(sk) {
            (*state).connected
        } else {
            return None;
        };
        // Not atomic: two threads sending on one socket at once may take
        // the same slot (one answer then goes unmatched).
        let n = (*state).next_query;
        (*state).next_query = n.wrapping_add(1);
        let slot = (n as usize) & (DNS_QUERY_SLOTS - 1);
        *(*state).queries.as_mut_ptr().add(slot) = DnsQuery {
            peer,
            id,
            reserved: [0; 6],
        };
    }
    count(Counter::DnsQueryNoted as u32);
    Some(())
}

#[cgroup_skb(ingress)]
pub fn redirect_dns_ingress(ctx: SkBuffContext) -> i32 {
    dns_ingress(&ctx);
    1
}

/// Matches an answer from the DNS proxy to its query (the oldest noted with
/// its id) and queues that query's nameserver for `recvmsg`.
#[inline(always)]
fn dns_ingress(ctx: &SkBuffContext) -> Option<()> {
    let (_, state) = skb_state(ctx)?;
    // SAFETY: the socket's live storage.
    let id = proxy_dns_id(ctx, false, unsafe { (*state).dns_port })?;
    // SAFETY: as above.
    unsafe {
        let oldest = (*state).next_query as usize;
        let mut peer = DnsPeer::default();
        for i in 0..DNS_QUERY_SLOTS {
            let q = (*state)
                .queries
                .as_mut_ptr()
                .add((oldest + i) & (DNS_QUERY_SLOTS - 1));
            if (*q).peer.family != 0 && (*q).id == id {
                peer = (*q).peer;
                (*q).peer = DnsPeer::default();
                break;
            }
        }
        let n = (*state).answers_in;
        (*state).answers_in = n.wrapping_add(1);
        *(*state)
            .answers
            .as_mut_ptr()
            .add((n as usize) & (DNS_ANSWER_SLOTS - 1)) = peer;
    }
    Some(())
}

/// The nameserver to show as the source of a datagram from `port` (host
/// order) that the kernel shows coming from the loopback address.
#[inline(always)]
fn answer_source(sa: &mut bpf_sock_addr, port: u16) -> Option<DnsPeer> {
    let cfg = sock_addr_pod(sa)?;
    if !cfg.is_dns_port(port) {
        return None;
    }
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let state = dns_socket(sk, false)?;
    // SAFETY: the socket's live storage.
    let peer = unsafe {
        let (in_, out) = ((*state).answers_in, (*state).answers_out);
        if in_ != out {
            // The oldest answer still queued; if more than the queue holds
            // arrived unread, the oldest ones were overwritten: skip them.
            let out = if in_.wrapping_sub(out) > DNS_ANSWER_SLOTS as u32 {
                in_.wrapping_sub(DNS_ANSWER_SLOTS as u32)
            } else {
                out
            };
            (*state).answers_out = out.wrapping_add(1);
            *(*state)
                .answers
                .as_ptr()
                .add((out as usize) & (DNS_ANSWER_SLOTS - 1))
        } else if is_connected(sk) {
            (*state).connected
        } else {
            DnsPeer::default()
        }
    };
    if peer.family == 0 {
        count(Counter::DnsAnswerUnmatched as u32);
        return None;
    }
    count(Counter::DnsAnswerShown as u32);
    Some(peer)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn redirect_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    if u32::from_be(sa.user_ip4) != V4_LOCALHOST {
        return 1;
    }
    let port_be = user_port(sa);
    if let Some(peer) = answer_source(sa, u16::from_be(port_be as u16))
        && peer.family == AF_INET
    {
        sa.user_ip4 = peer.ip[0];
        set_user_port(sa, u32::from(peer.port_be));
    }
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn redirect_recvmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    let from = user_ip6(sa);
    if from != V6_LOCALHOST_WORDS && from != v4_mapped(V4_LOCALHOST.to_be()) {
        return 1;
    }
    let port_be = user_port(sa);
    if let Some(peer) = answer_source(sa, u16::from_be(port_be as u16))
        && (peer.family == AF_INET || peer.family == AF_INET6)
    {
        put_ip6(&mut sa.user_ip6, peer.family, peer.ip);
        set_user_port(sa, u32::from(peer.port_be));
    }
    1
}

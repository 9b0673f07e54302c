//! Every map of the object. Names and layouts are the contract in
//! `redirect_common::abi`; the loader sizes and fills them.

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    btf_maps::SkStorage,
    helpers::generated::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, SockHash},
};
use redirect_common::{
    AddrKey, BPF_F_NO_PREALLOC, Cidr4Key, Cidr6Key, Config, Conn, Counter, DEFAULT_CIDR_CAPACITY,
    DEFAULT_MAX_CONNECTIONS, DnsSocket, IdKey, Ip6Key, ListenerKey, PolicyServiceKey, PortKey,
    ProxySide, SET_CAPACITY, TupleKey,
};

// ---- policy: per pod, found by network namespace (the loader sizes them) ----

#[map]
pub static CONFIGS: HashMap<u64, Config> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

#[map]
pub static PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

#[map]
pub static PROXY_UIDS: HashMap<IdKey, u8> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

#[map]
pub static PROXY_GIDS: HashMap<IdKey, u8> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

#[map]
pub static EXCLUDE_V4: LpmTrie<Cidr4Key, u8> = LpmTrie::with_max_entries(DEFAULT_CIDR_CAPACITY, 0);

#[map]
pub static INCLUDE_V4: LpmTrie<Cidr4Key, u8> = LpmTrie::with_max_entries(DEFAULT_CIDR_CAPACITY, 0);

#[map]
pub static OWNER_GROUPS: HashMap<IdKey, u8> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

#[map]
pub static SERVICES: HashMap<PolicyServiceKey, u8> =
    HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

#[map]
pub static DNS_SERVERS: HashMap<PolicyServiceKey, u8> =
    HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

#[map]
pub static LOCAL_V4: HashMap<IdKey, u8> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

#[map]
pub static EXCLUDE_V6: LpmTrie<Cidr6Key, u8> = LpmTrie::with_max_entries(DEFAULT_CIDR_CAPACITY, 0);

#[map]
pub static INCLUDE_V6: LpmTrie<Cidr6Key, u8> = LpmTrie::with_max_entries(DEFAULT_CIDR_CAPACITY, 0);

#[map]
pub static LOCAL_V6: HashMap<Ip6Key, u8> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

#[map]
pub static EXCLUDED_IFACES: HashMap<IdKey, u8> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

#[map]
pub static ROUTES_V4: LpmTrie<Cidr4Key, u8> = LpmTrie::with_max_entries(DEFAULT_CIDR_CAPACITY, 0);

#[map]
pub static ROUTES_V6: LpmTrie<Cidr6Key, u8> = LpmTrie::with_max_entries(DEFAULT_CIDR_CAPACITY, 0);

#[map]
pub static POD_ADDRS: HashMap<AddrKey, u64> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

// ---- connection state and counters (kept across re-apply) ----

#[map]
pub static LAYOUT: Array<u64> = Array::with_max_entries(1, 0);

#[btf_map]
pub static ORIG_DST: SkStorage<ProxySide> = SkStorage::new();

#[btf_map]
pub static DNS_SOCKETS: SkStorage<DnsSocket> = SkStorage::new();

#[map]
pub static CONNS: HashMap<u64, Conn> =
    HashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS, BPF_F_NO_PREALLOC);

#[map]
pub static TUPLES: HashMap<TupleKey, u64> =
    HashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS, BPF_F_NO_PREALLOC);

#[map]
pub static INBOUND_LISTENER: SockHash<ListenerKey> =
    SockHash::with_max_entries(2 * SET_CAPACITY, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::TOTAL, 0);

// ---- scratch (neither policy nor state: not pinned) ----

/// One per-CPU word through which `connect.rs` turns the socket pointer into
/// a number it may follow with `bpf_probe_read_kernel`.
#[map]
pub static SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The policy of the pod whose network namespace has cookie `netns`.
#[inline(always)]
pub fn pod_config(netns: u64) -> Option<&'static Config> {
    // SAFETY: a map value, read while the program runs.
    CONFIGS.get_ptr(netns).map(|p| unsafe { &*p })
}

/// Adds one to counter `index` (a `Rule` or a `Counter`).
#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer while we run.
        unsafe { *slot += 1 };
    }
}

/// Raw pointer to the socket-storage map, for the helpers that take one.
#[inline(always)]
pub fn orig_dst_map() -> *mut core::ffi::c_void {
    core::ptr::addr_of!(ORIG_DST).cast_mut().cast()
}

/// Sets `bits` in `conn`'s state with an atomic OR and returns the state as
/// it was: of two ends racing, each sees whether the other came first.
#[inline(always)]
pub fn conn_state_or(conn: *mut Conn, bits: u64) -> u64 {
    // SAFETY: `conn` points at a live map value; the kernel supports 64-bit
    // atomic fetch-or on map values (BPF_ATOMIC | BPF_FETCH, 5.12+).
    unsafe {
        core::intrinsics::atomic_or::<u64, u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
            core::ptr::addr_of_mut!((*conn).state),
            bits,
        )
    }
}

/// Removes a connection: its `TUPLES` entry (if it has one and it is still
/// its own) and its `CONNS` entry.
#[inline(always)]
pub fn forget_conn(cookie: u64, conn: *const Conn) {
    // SAFETY: a live map value, read before it is deleted.
    let (state, tuple) = unsafe { ((*conn).state, (*conn).tuple) };
    if state & redirect_common::conn_state::JOINED != 0
        // SAFETY: a live map value, copied out.
        && TUPLES.get_ptr(tuple).is_some_and(|owner| unsafe { *owner } == cookie)
    {
        let _ = TUPLES.remove(tuple);
    }
    let _ = CONNS.remove(cookie);
}

/// The proxy-side record stored on socket `sk`; with `create`, a zeroed
/// slot is made if there is none. `None` if absent or not allocatable.
#[inline(always)]
fn storage(sk: *mut bpf_sock, create: bool) -> Option<*mut ProxySide> {
    if sk.is_null() {
        return None;
    }
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE.into()
    } else {
        0
    };
    // SAFETY: `sk` is a non-null socket pointer handed to us by the kernel.
    let p = unsafe { bpf_sk_storage_get(orig_dst_map(), sk.cast(), core::ptr::null_mut(), flags) };
    if p.is_null() { None } else { Some(p.cast()) }
}

/// The proxy-side record stored on socket `sk`, if any.
#[inline(always)]
pub fn proxy_side_of(sk: *mut bpf_sock) -> Option<*mut ProxySide> {
    storage(sk, false)
}

/// Stores `value` on socket `sk`, or `None` if the kernel could not
/// allocate the slot.
#[inline(always)]
pub fn set_proxy_side(sk: *mut bpf_sock, value: &ProxySide) -> Option<()> {
    let p = storage(sk, true)?;
    unsafe { *p = *value };
    Some(())
}

/// The DNS state of socket `sk`; with `create`, a zeroed one is made if
/// there is none. `None` if absent or not allocatable.
#[inline(always)]
pub fn dns_socket(sk: *mut bpf_sock, create: bool) -> Option<*mut DnsSocket> {
    if sk.is_null() {
        return None;
    }
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE.into()
    } else {
        0
    };
    let map = core::ptr::addr_of!(DNS_SOCKETS).cast_mut().cast();
    // SAFETY: `sk` is a non-null full socket pointer handed to us by the
    // kernel.
    let p = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), flags) };
    if p.is_null() { None } else { Some(p.cast()) }
}

/// `struct sockaddr_in6`, as `bpf_bind` takes it and
/// `IP6T_SO_ORIGINAL_DST` returns it.
#[repr(C)]
pub struct SockaddrIn6 {
    /// `AF_INET6`.
    pub family: u16,
    /// Port, network order.
    pub port_be: u16,
    /// Flow info, zero.
    pub flowinfo: u32,
    /// Address, network-order words.
    pub addr: [u32; 4],
    /// Scope id, zero.
    pub scope_id: u32,
}

/// Writes address `ip` of a connection of `family` into an IPv6 socket
/// address (`user_ip6`): an IPv4 connection's as `::ffff:a.b.c.d`. `false`
/// for an unknown family (nothing written).
#[inline(always)]
pub fn put_ip6(user_ip6: &mut [u32; 4], family: u16, ip: [u32; 4]) -> bool {
    let ip = if family == redirect_common::AF_INET {
        v4_mapped(ip[0])
    } else if family == redirect_common::AF_INET6 {
        ip
    } else {
        return false;
    };
    user_ip6[0] = ip[0];
    user_ip6[1] = ip[1];
    user_ip6[2] = ip[2];
    user_ip6[3] = ip[3];
    true
}

/// The IPv4 address (network order) a connect or send to `addr_be` goes
/// to: the kernel turns the unspecified address into 127.0.0.1 before
/// netfilter sees it, so that is the original destination iptables keeps.
#[inline(always)]
pub fn target_v4(addr_be: u32) -> u32 {
    if addr_be == 0 {
        redirect_common::V4_LOCALHOST.to_be()
    } else {
        addr_be
    }
}

/// `::1` as the words of `user_ip6` (network order).
pub const V6_LOCALHOST_WORDS: [u32; 4] = [0, 0, 0, 1u32.to_be()];

/// The IPv6 counterpart of [`target_v4`]: `::` goes to `::1`.
#[inline(always)]
pub fn target_v6(addr: [u32; 4]) -> [u32; 4] {
    if addr == [0; 4] {
        V6_LOCALHOST_WORDS
    } else {
        addr
    }
}

/// `::ffff:a.b.c.d` as network-order words, from `a.b.c.d` network order.
#[inline(always)]
pub fn v4_mapped(addr_be: u32) -> [u32; 4] {
    [0, 0, 0xffffu32.to_be(), addr_be]
}

/// `struct sockaddr_in`, as `bpf_bind` takes it and `SO_ORIGINAL_DST`
/// returns it.
#[repr(C)]
pub struct SockaddrIn {
    /// `AF_INET`.
    pub family: u16,
    /// Port, network order.
    pub port_be: u16,
    /// Address, network order.
    pub addr_be: u32,
    /// Padding, zero.
    pub zero: [u8; 8],
}

//! Every map of the object. Names and layouts are the contract in
//! `redirect_common::abi`; the loader sizes and fills them.

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    btf_maps::SkStorage,
    helpers::generated::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockMap},
};
use redirect_common::{
    BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC, Config, Counter, DEFAULT_CIDR_CAPACITY,
    DEFAULT_SERVICE_CAPACITY, HANDOVER_CAPACITY, OrigDst, PENDING_CAPACITY, PORT_COUNT,
    SET_CAPACITY, ServiceKey, TupleKey,
};

// ---- policy (replaced as a whole on re-apply) ----

#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
pub static PORTS: Array<u8> = Array::with_max_entries(PORT_COUNT, 0);

#[map]
pub static PROXY_UIDS: HashMap<u32, u8> = HashMap::with_max_entries(SET_CAPACITY, 0);

#[map]
pub static PROXY_GIDS: HashMap<u32, u8> = HashMap::with_max_entries(SET_CAPACITY, 0);

#[map]
pub static EXCLUDE_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(DEFAULT_CIDR_CAPACITY, 0);

#[map]
pub static INCLUDE_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(DEFAULT_CIDR_CAPACITY, 0);

#[map]
pub static OWNER_GROUPS: HashMap<u32, u8> = HashMap::with_max_entries(SET_CAPACITY, 0);

#[map]
pub static SERVICES: HashMap<ServiceKey, u8> =
    HashMap::with_max_entries(DEFAULT_SERVICE_CAPACITY, BPF_F_NO_PREALLOC);

#[map]
pub static LOCAL_V4: HashMap<u32, u8> = HashMap::with_max_entries(SET_CAPACITY, 0);

#[map]
pub static EXCLUDE_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(DEFAULT_CIDR_CAPACITY, 0);

#[map]
pub static INCLUDE_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(DEFAULT_CIDR_CAPACITY, 0);

#[map]
pub static LOCAL_V6: HashMap<[u32; 4], u8> = HashMap::with_max_entries(SET_CAPACITY, 0);

// ---- connection state and counters (kept across re-apply) ----

#[btf_map]
pub static ORIG_DST: SkStorage<OrigDst> = SkStorage::new();

#[map]
pub static PENDING: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(PENDING_CAPACITY, BPF_F_NO_COMMON_LRU);

#[map]
pub static HANDOVER: HashMap<TupleKey, OrigDst> = HashMap::with_max_entries(HANDOVER_CAPACITY, 0);

#[map]
pub static INBOUND_LISTENER: SockMap = SockMap::with_max_entries(2, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::TOTAL, 0);

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

/// The original destination stored on socket `sk`; with `create`, a zeroed
/// slot is made if there is none. `None` if absent or not allocatable.
#[inline(always)]
fn storage(sk: *mut bpf_sock, create: bool) -> Option<*mut OrigDst> {
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

/// The original destination stored on socket `sk`, if any.
#[inline(always)]
pub fn orig_dst_of(sk: *mut bpf_sock) -> Option<*mut OrigDst> {
    storage(sk, false)
}

/// Stores `value` on socket `sk`, or `None` if the kernel could not
/// allocate the slot.
#[inline(always)]
pub fn set_orig_dst(sk: *mut bpf_sock, value: &OrigDst) -> Option<()> {
    let p = storage(sk, true)?;
    unsafe { *p = *value };
    Some(())
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

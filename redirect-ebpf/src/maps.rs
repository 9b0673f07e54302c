//! Every map of the object. Names and layouts are the contract in
//! `redirect_common::abi`; the loader sizes and fills them.

use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray},
};
use redirect_common::{
    Config, Counter, DEFAULT_CIDR_CAPACITY, HANDOVER_CAPACITY, OrigDst, PORT_COUNT, SET_CAPACITY,
    TupleKey,
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
pub static LOCAL_V4: HashMap<u32, u8> = HashMap::with_max_entries(SET_CAPACITY, 0);

// ---- connection state and counters (kept across re-apply) ----

#[btf_map]
pub static ORIG_DST: SkStorage<OrigDst> = SkStorage::new();

#[map]
pub static HANDOVER: HashMap<TupleKey, OrigDst> = HashMap::with_max_entries(HANDOVER_CAPACITY, 0);

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

/// The original destination stored on socket `sk`, if any.
#[inline(always)]
pub fn orig_dst_of(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<*mut OrigDst> {
    if sk.is_null() {
        return None;
    }
    let p = unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(
            orig_dst_map(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    };
    if p.is_null() { None } else { Some(p.cast()) }
}

/// Stores `value` on socket `sk` (creating the slot), or `None` if the
/// kernel could not allocate it.
#[inline(always)]
pub fn set_orig_dst(sk: *mut aya_ebpf::bindings::bpf_sock, value: &OrigDst) -> Option<()> {
    if sk.is_null() {
        return None;
    }
    let p = unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(
            orig_dst_map(),
            sk.cast(),
            core::ptr::null_mut(),
            aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    };
    if p.is_null() {
        return None;
    }
    unsafe { *(p.cast::<OrigDst>()) = *value };
    Some(())
}

//! The redirect kernel programs, one file per hook (after Merbridge's `bpf/`
//! layout): `connect.rs` (`cgroup/connect4`, `connect6`), `getpeername.rs`
//! and `getsockname.rs` (`cgroup/getpeername4/6`, `getsockname4/6`: what the
//! application and the proxy are shown), `sockops.rs` (`sockops`),
//! `sock_release.rs` (`cgroup/sock_release`), `getsockopt.rs`
//! (`cgroup/getsockopt`), `sk_lookup.rs` (`sk_lookup`, inbound), `dns.rs`
//! (DNS capture over UDP: `cgroup/sendmsg4/6`, `recvmsg4/6`,
//! `cgroup_skb/egress` and `ingress`, and `connect4/6`'s UDP side). Maps and the
//! glue to the shared decision code live in `maps.rs` and `policy.rs`; the
//! 4-tuple key, built alike by both ends of a connection, in `tuple.rs`. The
//! decision itself is in `redirect-common`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// 64-bit atomic fetch-or on map values (see `maps::conn_state_or`): core's
// atomics have no read-modify-write operations for this target.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod dns;
#[cfg(target_arch = "bpf")]
mod getpeername;
#[cfg(target_arch = "bpf")]
mod getsockname;
#[cfg(target_arch = "bpf")]
mod getsockopt;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod sk_lookup;
#[cfg(target_arch = "bpf")]
mod sock_release;
#[cfg(target_arch = "bpf")]
mod sockops;
#[cfg(target_arch = "bpf")]
mod tuple;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// Built for the host (e.g. by `cargo clippy --workspace`), this crate is empty.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

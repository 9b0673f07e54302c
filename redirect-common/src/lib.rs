//! Types and logic shared by the `redirect` eBPF programs and user space.
//!
//! Everything here is `no_std` and free of allocation so that the kernel programs
//! (built for `bpfel-unknown-none`) and the user-space loader, `redirect explain`
//! and the tests all run the *same* code:
//!
//! - [`abi`]: the `#[repr(C)]` layouts of map keys and values, map names and
//!   constants, i.e. the contract between the loader and the kernel programs;
//! - [`policy`]: the redirection decision itself, a pure function of a
//!   connection and a policy, written rule by rule after the iptables rule set
//!   it reproduces (see `docs/semantics.md`).
#![no_std]
#![deny(missing_docs)]

pub mod abi;
pub mod policy;

pub use abi::*;
pub use policy::*;

//! redirect: service-mesh traffic redirection with eBPF instead of iptables.
//!
//! For proxy authors, this crate's one public function that needs no
//! privileges and no eBPF toolchain is [`original_dst`]: depend on it with
//! `default-features = false`. It answers the same way behind iptables
//! REDIRECT and behind redirect.
//!
//! With the default `loader` feature the crate also holds the loader behind
//! the `redirect` binary: [`policy`] (flags → validated policy), [`apply`]
//! (load, attach, pin, remove), [`layout`] (what lives where in a pin dir),
//! [`lock`] (one apply at a time per pin dir), [`pod_record`] (which pod a
//! pin dir belongs to), [`status`], [`explain`] (one connection's
//! decision), [`render`] (the equivalent istio-iptables rules), [`plan`]
//! (`apply --dry-run`), [`istio`] (istio-iptables' command line),
//! [`validation`] (its `--run-validation` check), [`cgroup`]
//! (`--cgroup auto`), [`cni`] (the `redirect-cni` plugin).

mod orig_dst;
pub use orig_dst::original_dst;

#[cfg(feature = "loader")]
pub mod apply;
#[cfg(feature = "loader")]
pub mod blob;
#[cfg(feature = "loader")]
pub mod btf;
#[cfg(feature = "loader")]
pub mod cgroup;
#[cfg(feature = "loader")]
pub mod cli;
#[cfg(feature = "loader")]
pub mod cni;
#[cfg(feature = "loader")]
pub mod cni_install;
#[cfg(feature = "loader")]
pub mod entries;
#[cfg(feature = "loader")]
pub mod explain;
#[cfg(feature = "loader")]
pub mod fs;
#[cfg(feature = "loader")]
pub mod istio;
#[cfg(feature = "loader")]
pub mod layout;
#[cfg(feature = "loader")]
pub mod listener;
#[cfg(feature = "loader")]
pub mod lock;
#[cfg(feature = "loader")]
pub mod netns;
#[cfg(feature = "loader")]
pub mod node;
#[cfg(feature = "loader")]
pub mod plan;
#[cfg(feature = "loader")]
pub mod pod_record;
#[cfg(feature = "loader")]
pub mod pods;
#[cfg(feature = "loader")]
pub mod policy;
#[cfg(feature = "loader")]
pub mod render;
pub mod routes;
#[cfg(feature = "loader")]
pub mod state;
#[cfg(feature = "loader")]
pub mod status;
#[cfg(feature = "loader")]
pub mod sys;
#[cfg(feature = "loader")]
pub mod validation;

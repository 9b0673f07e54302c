//! The floor of any design on redirect's hooks: the same hooks with
//! programs that only return "go on" (two instructions each), attached to a
//! `direct` pod. What such a pod costs over plain `direct` is what the
//! kernel charges for running the hooks at all, before any program does
//! work; redirect cannot be cheaper than that.

use std::{
    fs::File,
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use redirect::{
    apply::PROGRAMS,
    sys::{AttachType, link_create, obj_pin},
};
use redirect_tests::pod::Side;

const BPF_PROG_LOAD: libc::c_long = 5;

/// `enum bpf_prog_type` of the program for `attach`.
fn prog_type(attach: AttachType) -> u32 {
    match attach {
        AttachType::SockOps => 13,    // BPF_PROG_TYPE_SOCK_OPS
        AttachType::GetSockopt => 25, // BPF_PROG_TYPE_CGROUP_SOCKOPT
        AttachType::SkLookup => 30,   // BPF_PROG_TYPE_SK_LOOKUP
        AttachType::Connect4 | AttachType::Connect6 => 18, // CGROUP_SOCK_ADDR
        AttachType::GetPeerName4 | AttachType::GetPeerName6 => 18,
        AttachType::GetSockName4 | AttachType::GetSockName6 => 18,
        AttachType::SockRelease => 9, // BPF_PROG_TYPE_CGROUP_SOCK
        AttachType::SkbIngress | AttachType::SkbEgress => 8, // BPF_PROG_TYPE_CGROUP_SKB
        AttachType::SendMsg4 | AttachType::SendMsg6 => 18,
        AttachType::RecvMsg4 | AttachType::RecvMsg6 => 18,
    }
}

/// `r0 = 1; exit`: "allow" for the cgroup hooks, `SK_PASS` for `sk_lookup`,
/// and a plain return for `sock_ops` (whose `reply` stays 0, so the
/// kernel's defaults apply).
const RETURN_ONE: [u8; 16] = [
    0xb7, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // BPF_MOV64_IMM(R0, 1)
    0x95, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // BPF_EXIT
];

/// Loads the no-op program for `attach`.
fn load(attach: AttachType) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&prog_type(attach).to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes()); // insn_cnt
    attr[8..16].copy_from_slice(&(RETURN_ONE.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[68..72].copy_from_slice(&(attach as u32).to_ne_bytes()); // expected_attach_type
    // SAFETY: `attr` is a zeroed bpf_attr of the size passed; the pointers
    // in it outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

/// No-op programs attached to one pod, at redirect's hooks, and pinned as
/// `prog_<hook>` in [`NoopHooks::pin_dir`] (so their run-time statistics
/// can be read like redirect's). Detached and unpinned when dropped (the
/// links themselves are not pinned).
pub struct NoopHooks {
    _links: Vec<OwnedFd>,
    pin_dir: PathBuf,
}

impl NoopHooks {
    /// Attaches a no-op program at each of redirect's hooks of `pod`.
    pub fn attach(pod: &redirect_tests::pod::Pod) -> Result<NoopHooks> {
        let cgroup =
            File::open(&pod.cgroup).with_context(|| format!("opening {}", pod.cgroup.display()))?;
        let netns_path = pod.netns_path(Side::Pod);
        let netns =
            File::open(&netns_path).with_context(|| format!("opening {}", netns_path.display()))?;
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(format!("{}-noop", pod.name));
        std::fs::create_dir_all(&pin_dir)
            .with_context(|| format!("creating {}", pin_dir.display()))?;
        let mut hooks = NoopHooks {
            _links: Vec::new(),
            pin_dir,
        };
        for (_, attach, short) in PROGRAMS {
            let prog = load(attach).with_context(|| format!("loading a no-op {short} program"))?;
            let pin = hooks.pin_dir.join(format!("prog_{short}"));
            obj_pin(&prog, &pin).with_context(|| format!("pinning {}", pin.display()))?;
            let target = if attach.on_netns() { &netns } else { &cgroup };
            let link = link_create(&prog, target, attach)
                .with_context(|| format!("attaching the no-op {short} program"))?;
            hooks._links.push(link);
        }
        Ok(hooks)
    }

    /// Where the programs are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

impl Drop for NoopHooks {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

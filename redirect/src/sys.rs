//! The few `bpf(2)` commands aya 0.14 does not expose the way the loader needs
//! them: creating a cgroup link for any attach type (aya cannot turn a
//! `cgroup/getsockopt` link into a pinnable `FdLink`), pinning and opening
//! objects, reading a link's info for `status`, creating a plain array map
//! from user space (the pin dir's pod record), and asking which programs are
//! attached to a cgroup or a network namespace.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// Cgroup attach types used by redirect (`enum bpf_attach_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    /// `BPF_CGROUP_INET_INGRESS`.
    SkbIngress = 0,
    /// `BPF_CGROUP_INET_EGRESS`.
    SkbEgress = 1,
    /// `BPF_CGROUP_SOCK_OPS`.
    SockOps = 3,
    /// `BPF_CGROUP_INET4_CONNECT`.
    Connect4 = 10,
    /// `BPF_CGROUP_INET6_CONNECT`.
    Connect6 = 11,
    /// `BPF_CGROUP_UDP4_SENDMSG`.
    SendMsg4 = 14,
    /// `BPF_CGROUP_UDP6_SENDMSG`.
    SendMsg6 = 15,
    /// `BPF_CGROUP_UDP4_RECVMSG`.
    RecvMsg4 = 19,
    /// `BPF_CGROUP_UDP6_RECVMSG`.
    RecvMsg6 = 20,
    /// `BPF_CGROUP_GETSOCKOPT`.
    GetSockopt = 21,
    /// `BPF_CGROUP_INET4_GETPEERNAME`.
    GetPeerName4 = 29,
    /// `BPF_CGROUP_INET6_GETPEERNAME`.
    GetPeerName6 = 30,
    /// `BPF_CGROUP_INET4_GETSOCKNAME`.
    GetSockName4 = 31,
    /// `BPF_CGROUP_INET6_GETSOCKNAME`.
    GetSockName6 = 32,
    /// `BPF_CGROUP_INET_SOCK_RELEASE`.
    SockRelease = 34,
    /// `BPF_SK_LOOKUP` (attached to a network namespace, not a cgroup).
    SkLookup = 36,
}

impl AttachType {
    /// The hook's name as `bpftool` and the docs write it.
    pub fn hook(self) -> &'static str {
        match self {
            Self::SkbIngress => "cgroup_skb/ingress",
            Self::SkbEgress => "cgroup_skb/egress",
            Self::SendMsg4 => "cgroup/sendmsg4",
            Self::SendMsg6 => "cgroup/sendmsg6",
            Self::RecvMsg4 => "cgroup/recvmsg4",
            Self::RecvMsg6 => "cgroup/recvmsg6",
            Self::SockOps => "sock_ops",
            Self::Connect4 => "cgroup/connect4",
            Self::Connect6 => "cgroup/connect6",
            Self::GetSockopt => "cgroup/getsockopt",
            Self::GetPeerName4 => "cgroup/getpeername4",
            Self::GetPeerName6 => "cgroup/getpeername6",
            Self::GetSockName4 => "cgroup/getsockname4",
            Self::GetSockName6 => "cgroup/getsockname6",
            Self::SockRelease => "cgroup/sock_release",
            Self::SkLookup => "sk_lookup",
        }
    }

    /// Whether the hook attaches to a network namespace (else a cgroup).
    pub fn on_netns(self) -> bool {
        matches!(self, Self::SkLookup)
    }
}

/// `union bpf_attr`, large enough for every command used here; unused
/// bytes stay zero as the kernel requires.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised bpf_attr of the size we pass.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn fd_result(ret: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor that we now own.
    unsafe { OwnedFd::from_raw_fd(ret as i32) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt as _;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `BPF_LINK_CREATE`: attach `prog` to `target` (a cgroup directory, or a
/// network namespace file for [`AttachType::SkLookup`]) as a link. Links
/// always allow other programs beside them.
pub fn link_create(prog: impl AsFd, target: impl AsFd, attach: AttachType) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, prog.as_fd().as_raw_fd() as u32);
    attr.put_u32(4, target.as_fd().as_raw_fd() as u32);
    attr.put_u32(8, attach as u32);
    bpf(BPF_LINK_CREATE, &mut attr).map(fd_result)
}

/// `BPF_LINK_DETACH`: detach `link` now (5.9+). A link detached this way
/// stays a valid object (and pin) attached to nothing. Unpinning alone
/// detaches only once the kernel frees the link, a moment later.
pub fn link_detach(link: impl AsFd) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_fd().as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// `BPF_LINK_UPDATE`: make `link` run `prog` instead of its program, in one
/// step (nothing is ever unattached in between).
pub fn link_update(link: impl AsFd, prog: impl AsFd) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_fd().as_raw_fd() as u32);
    attr.put_u32(4, prog.as_fd().as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// `BPF_MAP_UPDATE_ELEM`: `map[key] = value` (both exactly the map's sizes).
pub fn map_update(map: impl AsFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, map.as_fd().as_raw_fd() as u32);
    attr.put_u64(8, key.as_ptr() as u64);
    attr.put_u64(16, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// `BPF_MAP_LOOKUP_ELEM`: `value = map[key]` (`value` exactly the map's
/// value size).
pub fn map_lookup(map: impl AsFd, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, map.as_fd().as_raw_fd() as u32);
    attr.put_u64(8, key.as_ptr() as u64);
    attr.put_u64(16, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(|_| ())
}

/// `BPF_OBJ_PIN`: pin a program, map or link at `path` on a bpffs.
pub fn obj_pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let cpath = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, cpath.as_ptr() as u64);
    attr.put_u32(8, fd.as_fd().as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// `BPF_OBJ_GET`: open a pinned object (`flags`: `file_flags`, 0 for read-write).
pub fn obj_get(path: &Path, flags: u32) -> io::Result<OwnedFd> {
    let cpath = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, cpath.as_ptr() as u64);
    attr.put_u32(12, flags);
    bpf(BPF_OBJ_GET, &mut attr).map(fd_result)
}

/// `BPF_MAP_CREATE` of a `BPF_MAP_TYPE_ARRAY` with `u32` keys: a map made by
/// the loader itself, not by the eBPF object. `name` is cut to the kernel's 15
/// characters.
pub fn array_create(name: &str, value_size: u32, max_entries: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, BPF_MAP_TYPE_ARRAY);
    attr.put_u32(4, 4);
    attr.put_u32(8, value_size);
    attr.put_u32(12, max_entries);
    // map_name[16] at offset 28, NUL-terminated.
    for (i, b) in name.bytes().take(15).enumerate() {
        attr.0[28 + i] = b;
    }
    bpf(BPF_MAP_CREATE, &mut attr).map(fd_result)
}

/// `BPF_PROG_QUERY`: ids of the programs attached directly to `target` (a
/// cgroup directory, or a network namespace file for
/// [`AttachType::SkLookup`]) at `attach`, links included.
pub fn prog_query(target: impl AsFd, attach: AttachType) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = Attr::new();
    attr.put_u32(0, target.as_fd().as_raw_fd() as u32);
    attr.put_u32(4, attach as u32);
    attr.put_u64(16, ids.as_mut_ptr() as u64);
    attr.put_u32(24, ids.len() as u32);
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = u32::from_ne_bytes(attr.0[24..28].try_into().unwrap()) as usize;
    ids.truncate(count.min(64));
    Ok(ids)
}

/// What a link is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkTarget {
    /// A cgroup, by id (its inode number on cgroupfs).
    Cgroup(u64),
    /// A network namespace, by inode number.
    Netns(u32),
}

impl std::fmt::Display for LinkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkTarget::Cgroup(id) => write!(f, "cgroup {id}"),
            LinkTarget::Netns(ino) => write!(f, "netns {ino}"),
        }
    }
}

/// What `status` shows of an attached link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// Link id (as `bpftool link` lists it).
    pub id: u32,
    /// Id of the attached program.
    pub prog_id: u32,
    /// What it is attached to.
    pub target: LinkTarget,
    /// Raw attach type.
    pub attach_type: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a cgroup or netns link.
pub fn link_info(link: impl AsFd) -> io::Result<LinkInfo> {
    // struct bpf_link_info { u32 type, id, prog_id; union { struct { u64
    // cgroup_id; u32 attach_type; } cgroup; struct { u32 netns_ino; u32
    // attach_type; } netns; ... } } (union at offset 16).
    const BPF_LINK_TYPE_NETNS: u32 = 5;
    let mut info = [0u8; 64];
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_fd().as_raw_fd() as u32);
    attr.put_u32(4, info.len() as u32);
    attr.put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap());
    let (target, attach_type) = if u32_at(0) == BPF_LINK_TYPE_NETNS {
        (LinkTarget::Netns(u32_at(16)), u32_at(20))
    } else {
        (
            LinkTarget::Cgroup(u64::from_ne_bytes(info[16..24].try_into().unwrap())),
            u32_at(24),
        )
    };
    Ok(LinkInfo {
        id: u32_at(4),
        prog_id: u32_at(8),
        target,
        attach_type,
    })
}

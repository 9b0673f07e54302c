//! Checks on the filesystems redirect works with: the cgroup v2 hierarchy
//! (found from `/proc/mounts`, never assumed) and bpffs for the pins.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// The mount point of the cgroup v2 hierarchy, from `/proc/mounts`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// Checks that `path` is a directory of the cgroup v2 hierarchy.
pub fn check_cgroup(path: &Path) -> Result<()> {
    let hint = match cgroup2_mount() {
        Some(m) => format!("cgroup v2 is mounted at {}", m.display()),
        None => "no cgroup v2 hierarchy is mounted on this machine".to_string(),
    };
    if !path.is_dir() {
        bail!("--cgroup {}: no such directory ({hint})", path.display());
    }
    let magic = fs_magic(path).with_context(|| format!("--cgroup {}", path.display()))?;
    if magic != CGROUP2_SUPER_MAGIC {
        bail!(
            "--cgroup {}: not a cgroup v2 directory ({hint})",
            path.display()
        );
    }
    Ok(())
}

/// Whether `path` is a directory of a cgroup v2 hierarchy.
pub fn is_cgroup2_dir(path: &Path) -> bool {
    path.is_dir()
        && fs_magic(path)
            .map(|m| m == CGROUP2_SUPER_MAGIC)
            .unwrap_or(false)
}

/// Whether `path` is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    fs_magic(path).map(|m| m == BPF_FS_MAGIC).unwrap_or(false)
}

/// Makes sure `pin_dir` can be created on a bpffs: mounts bpffs at
/// `/sys/fs/bpf` when the pin dir is under it and nothing is mounted there.
/// Returns an error naming the problem otherwise. Creates nothing else.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(());
    }
    let default = Path::new(DEFAULT_BPFFS);
    if pin_dir.starts_with(default) && default.is_dir() && !is_bpffs(default) {
        tracing::info!("mounting bpffs at {DEFAULT_BPFFS}");
        let src = CString::new("bpf").unwrap();
        let target = CString::new(DEFAULT_BPFFS).unwrap();
        // SAFETY: plain mount(2) with valid strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "--pin-dir {}: {DEFAULT_BPFFS} is not a bpf filesystem and mounting one failed ({})",
                pin_dir.display(),
                io::Error::last_os_error()
            );
        }
        return Ok(());
    }
    bail!(
        "--pin-dir {}: not on a bpf filesystem (mount one with `mount -t bpf bpf {DEFAULT_BPFFS}` \
         and pick a directory under it)",
        pin_dir.display()
    )
}

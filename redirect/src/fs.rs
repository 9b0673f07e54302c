//! Checks on the filesystems redirect works with: the cgroup v2 hierarchy
//! (found from `/proc/mounts`, never assumed) and bpffs for the pins; and
//! the loader's own directories, made 0700 whatever the umask.

use std::{
    ffi::CString,
    io,
    os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _},
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

/// Mode of every directory the loader creates.
pub const DIR_MODE: u32 = 0o700;

/// Creates the directory `dir` with mode 0700 whatever the umask: `mkdir`
/// (which the umask can only narrow), then an explicit `chmod`. Fails if it
/// exists.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new().mode(DIR_MODE).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
}

/// Creates `dir` and its missing parents, each 0700 whatever the umask.
/// Returns the directories created, outermost first (empty if `dir` was
/// there). A directory another process creates meanwhile is not an error.
pub fn create_private_dir_all(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|p| !p.exists()).collect();
    let mut created = Vec::new();
    for d in missing.into_iter().rev() {
        match create_private_dir(d) {
            Ok(()) => created.push(d.to_path_buf()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

/// Undoes the octal escapes of `/proc/self/mountinfo` (`\040` for a space).
fn unescape_mount_path(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&out),
    ))
}

/// The mount points of bpf filesystems, from `/proc/self/mountinfo` text.
fn bpffs_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            let mount_point = before.split_whitespace().nth(4)?;
            (after.split_whitespace().next()? == "bpf").then(|| unescape_mount_path(mount_point))
        })
        .collect()
}

/// Refuses a pin dir that is the root of a bpf filesystem (a mount point,
/// or `/sys/fs/bpf` where apply would mount one): its contents are shared
/// with every other user of bpffs, and the mount point itself cannot be
/// removed, so `remove` could not finish.
pub fn refuse_bpffs_root(pin_dir: &Path) -> Result<()> {
    let canon = pin_dir.canonicalize().ok();
    let path = canon.as_deref().unwrap_or(pin_dir);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| bpffs_mount_points(&m))
        .unwrap_or_default();
    if path == Path::new(DEFAULT_BPFFS) || mounts.iter().any(|m| m == path) {
        bail!(
            "--pin-dir {}: the root of a bpf filesystem (a mount point); redirect needs a \
             directory of its own below it, such as {}/redirect/NAME",
            pin_dir.display(),
            path.display()
        );
    }
    Ok(())
}

/// Whether `path` is the mount point of a bpf filesystem.
pub fn is_bpffs_mount_point(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| bpffs_mount_points(&m).contains(&canon))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_bpf_entries() {
        let text = "\
25 1 0:22 / /sys rw,nosuid - sysfs sysfs rw
30 25 0:26 / /sys/fs/bpf rw,nosuid,nodev - bpf bpf rw,mode=700
31 25 0:27 /sub /run/my\\040bpf rw - bpf bpf rw
32 25 0:28 / /run/x rw shared:1 - tmpfs tmpfs rw
";
        assert_eq!(
            bpffs_mount_points(text),
            vec![PathBuf::from("/sys/fs/bpf"), PathBuf::from("/run/my bpf")]
        );
    }

    #[test]
    fn bpffs_root_is_refused() {
        for p in ["/sys/fs/bpf", "/sys/fs/bpf/", "/sys/fs/bpf/."] {
            let e = refuse_bpffs_root(Path::new(p)).unwrap_err().to_string();
            assert!(
                e.contains("--pin-dir") && e.contains("root of a bpf"),
                "{e}"
            );
        }
        assert!(refuse_bpffs_root(Path::new("/sys/fs/bpf/redirect/x")).is_ok());
    }

    #[test]
    fn private_dirs_ignore_the_umask() {
        let base = std::env::temp_dir().join(format!("redirect-fs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        // SAFETY: umask has no preconditions; restored below.
        let old = unsafe { libc::umask(0) };
        let made = create_private_dir_all(&base.join("a/b"));
        unsafe { libc::umask(old) };
        let made = made.unwrap();
        assert_eq!(made, vec![base.clone(), base.join("a"), base.join("a/b")]);
        for d in &made {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        assert!(
            create_private_dir_all(&base.join("a/b"))
                .unwrap()
                .is_empty()
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}

//! `--cgroup auto`: the cgroup of the pod this process runs in, found by
//! an init container itself.
//!
//! A container's own cgroup is a child of its pod's cgroup (containerd and
//! CRI-O, systemd and cgroupfs drivers alike), so the pod's cgroup is the
//! parent of the process's own. Where the container has a cgroup namespace
//! of its own (the default with cgroup v2), `/proc/self/cgroup` says `/` and
//! the container's cgroup2 mount shows only its own cgroup. The host's tree
//! must then be mounted in the container too (a `hostPath` volume): the
//! directory of the container's own cgroup is found in it by its id (the
//! inode number of the cgroup's directory, the same in every mount of the
//! hierarchy), and its parent is the pod's cgroup.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// A cgroup v2 mount, from `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// The cgroup the mount shows at its mount point, relative to this
    /// process's cgroup namespace (`/`, or `/..` and below for a mount made
    /// outside the namespace).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
}

/// The cgroup v2 mounts listed in a `mountinfo` text.
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<Cgroup2Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options [optional...] - type source super-options
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut f = left.split_whitespace();
            let (_, _, _) = (f.next()?, f.next()?, f.next()?);
            let root = unescape(f.next()?);
            let mount_point = PathBuf::from(unescape(f.next()?));
            Some(Cgroup2Mount { root, mount_point })
        })
        .collect()
}

/// `mountinfo` escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroup v2 path (relative to its cgroup namespace), from
/// the `0::` line of a `/proc/self/cgroup` text.
pub fn own_cgroup_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// Directories searched at most while looking for the own cgroup.
const MAX_DIRS: usize = 200_000;

/// The pod's cgroup: the parent of this process's own cgroup, in a cgroup
/// v2 mount where that parent is visible.
pub fn pod_cgroup_of_self() -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let proc_cgroup =
        fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    pod_cgroup(&cgroup2_mounts(&mountinfo), &proc_cgroup)
}

/// [`pod_cgroup_of_self`] from the given mounts and `/proc/self/cgroup`.
pub fn pod_cgroup(mounts: &[Cgroup2Mount], proc_cgroup: &str) -> Result<PathBuf> {
    let own = own_cgroup_path(proc_cgroup).context(
        "--cgroup auto: this process is in no cgroup v2 (no 0:: line in /proc/self/cgroup)",
    )?;
    if mounts.is_empty() {
        bail!("--cgroup auto: no cgroup v2 hierarchy is mounted here; give --cgroup DIR");
    }
    // The own cgroup's directory in a mount of the namespace's root.
    let rel = own.trim_start_matches('/');
    let own_dir = mounts
        .iter()
        .filter(|m| m.root == "/")
        .map(|m| m.mount_point.join(rel))
        .find(|p| p.is_dir())
        .with_context(|| {
            format!(
                "--cgroup auto: this process's cgroup ({own}) is in no cgroup v2 mount here; \
                 give --cgroup DIR"
            )
        })?;
    let meta = fs::metadata(&own_dir).with_context(|| format!("{}", own_dir.display()))?;
    let (dev, ino) = (meta.dev(), meta.ino());
    // Where its parent is visible: the same directory when the mount shows
    // the tree above it, else a search of every mount by id.
    if own_dir.parent().is_some()
        && mounts
            .iter()
            .any(|m| own_dir.starts_with(&m.mount_point) && own_dir != m.mount_point)
    {
        return Ok(own_dir.parent().unwrap().to_path_buf());
    }
    let mut seen = 0usize;
    for m in mounts {
        if let Some(found) = find_by_inode(&m.mount_point, dev, ino, &mut seen)?
            && found != m.mount_point
            && let Some(parent) = found.parent()
        {
            return Ok(parent.to_path_buf());
        }
    }
    bail!(
        "--cgroup auto: this process's cgroup is the root of every cgroup v2 mount here (a \
         cgroup namespace of its own), so its pod's cgroup is not visible: mount the host's \
         cgroup v2 tree into the container (a hostPath volume of the host's cgroup2 mount) or \
         give --cgroup DIR"
    )
}

/// The directory under `root` whose device and inode are `dev`, `ino`.
fn find_by_inode(root: &Path, dev: u64, ino: u64, seen: &mut usize) -> Result<Option<PathBuf>> {
    let mut queue = std::collections::VecDeque::from([root.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        let Ok(meta) = fs::symlink_metadata(&dir) else {
            continue; // removed meanwhile
        };
        if meta.dev() != dev {
            return Ok(None); // another hierarchy (or not cgroup2)
        }
        if meta.ino() == ino {
            return Ok(Some(dir));
        }
        *seen += 1;
        if *seen > MAX_DIRS {
            bail!("--cgroup auto: more than {MAX_DIRS} cgroups searched; give --cgroup DIR");
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                queue.push_back(e.path());
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed() {
        let text = "\
30 23 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
31 23 0:27 / /sys/fs/cgroup/cpu rw shared:10 - cgroup cgroup rw,cpu
900 800 0:26 /../.. /host/sys/fs/cgroup rw master:9 - cgroup2 cgroup2 rw
901 800 0:26 / /with\\040space rw - cgroup2 none rw
";
        let m = cgroup2_mounts(text);
        assert_eq!(
            m,
            vec![
                Cgroup2Mount {
                    root: "/".into(),
                    mount_point: "/sys/fs/cgroup/unified".into()
                },
                Cgroup2Mount {
                    root: "/../..".into(),
                    mount_point: "/host/sys/fs/cgroup".into()
                },
                Cgroup2Mount {
                    root: "/".into(),
                    mount_point: "/with space".into()
                },
            ]
        );
    }

    #[test]
    fn own_path_is_the_unified_line() {
        let text = "12:cpu,cpuacct:/kubepods/x\n0::/kubepods/burstable/pod1/ctr\n";
        assert_eq!(
            own_cgroup_path(text).as_deref(),
            Some("/kubepods/burstable/pod1/ctr")
        );
        assert_eq!(own_cgroup_path("12:cpu:/x\n"), None);
    }

    #[test]
    fn no_mount_or_no_line_is_an_error_naming_the_fix() {
        let e = pod_cgroup(&[], "0::/a\n").unwrap_err().to_string();
        assert!(e.contains("give --cgroup DIR"), "{e}");
        let e = pod_cgroup(
            &[Cgroup2Mount {
                root: "/".into(),
                mount_point: "/nonexistent-rdt".into(),
            }],
            "1:name=x:/\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no 0:: line"), "{e}");
    }
}

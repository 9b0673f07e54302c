//! The pod a pin dir belongs to, recorded in the pin dir itself.
//!
//! bpffs holds only BPF objects and directories, so the record is a BPF map:
//! a one-entry array made by the loader (not by the eBPF object, and read by
//! no program), pinned as `<pin-dir>/POD`. It holds the cgroup id (the inode
//! of the cgroup v2 directory) and the network namespace's cookie, which
//! decide whether two applies are for the same pod, and, to name the pod in
//! messages, the cgroup's path, the namespace's inode (what `status` and
//! `bpftool` show for `sk_lookup`) and the namespace file given.

use std::{
    fmt,
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, MapData};
use serde::Serialize;

use crate::{layout::POD_PIN, sys};

/// Bytes of one record.
const SIZE: usize = 512;
/// First 8 bytes of a record of this layout.
const MAGIC: [u8; 8] = *b"rdpod001";
/// Room for the cgroup path, then for the namespace path.
const CGROUP_PATH: std::ops::Range<usize> = 64..320;
const NETNS_PATH: std::ops::Range<usize> = 320..512;

/// Which pod a pin dir belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodRecord {
    /// The cgroup's id (inode number of its cgroup v2 directory).
    pub cgroup_id: u64,
    /// The cgroup v2 directory (as resolved at apply, cut to 255 bytes).
    pub cgroup: String,
    /// The network namespace's cookie (never reused while the machine runs).
    pub netns_cookie: u64,
    /// The network namespace's inode number.
    pub netns_inode: u64,
    /// The namespace file given to apply, or `the loader's own`.
    pub netns: String,
}

impl PodRecord {
    /// The pod of an apply: its open cgroup directory and namespace file
    /// (`netns_path` `None`: the loader's own namespace).
    pub fn of(
        cgroup_path: &Path,
        cgroup: &File,
        netns_path: Option<&Path>,
        netns: &File,
        netns_cookie: u64,
    ) -> Result<PodRecord> {
        let cg = cgroup.metadata().context("fstat on the cgroup directory")?;
        let ns = netns.metadata().context("fstat on the namespace file")?;
        let resolved = cgroup_path
            .canonicalize()
            .unwrap_or_else(|_| PathBuf::from(cgroup_path));
        Ok(PodRecord {
            cgroup_id: cg.ino(),
            cgroup: resolved.display().to_string(),
            netns_cookie,
            netns_inode: ns.ino(),
            netns: netns_path.map_or_else(
                || "the loader's own".to_string(),
                |p| p.display().to_string(),
            ),
        })
    }

    /// Whether `other` is the same pod: same cgroup, same namespace.
    pub fn same_pod(&self, other: &PodRecord) -> bool {
        self.cgroup_id == other.cgroup_id && self.netns_cookie == other.netns_cookie
    }

    fn encode(&self) -> [u8; SIZE] {
        let mut b = [0u8; SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..16].copy_from_slice(&self.cgroup_id.to_ne_bytes());
        b[16..24].copy_from_slice(&self.netns_cookie.to_ne_bytes());
        b[24..32].copy_from_slice(&self.netns_inode.to_ne_bytes());
        put_str(&mut b[CGROUP_PATH], &self.cgroup);
        put_str(&mut b[NETNS_PATH], &self.netns);
        b
    }

    fn decode(b: &[u8; SIZE]) -> Result<PodRecord> {
        if b[0..8] != MAGIC {
            bail!("not a pod record of this version of redirect");
        }
        let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().unwrap());
        Ok(PodRecord {
            cgroup_id: u64_at(8),
            netns_cookie: u64_at(16),
            netns_inode: u64_at(24),
            cgroup: get_str(&b[CGROUP_PATH]),
            netns: get_str(&b[NETNS_PATH]),
        })
    }

    /// Creates the record's map, writes it and pins it as `<pin_dir>/POD`.
    pub fn pin(&self, pin_dir: &Path) -> Result<PathBuf> {
        let path = pin_dir.join(POD_PIN);
        let fd = sys::array_create("redirect_pod", SIZE as u32, 1)
            .context("creating the pod record map")?;
        let mut map = aya::maps::Map::from_map_data(
            MapData::from_fd(fd).context("opening the pod record map")?,
        )?;
        Array::<&mut MapData, [u8; SIZE]>::try_from(&mut map)?
            .set(0, self.encode(), 0)
            .context("writing the pod record")?;
        // Pinned once written: nobody sees an empty record.
        map.pin(&path)
            .with_context(|| format!("pinning the pod record {}", path.display()))?;
        Ok(path)
    }

    /// The record pinned in `pin_dir`, if there is one.
    pub fn read(pin_dir: &Path) -> Result<Option<PodRecord>> {
        let path = pin_dir.join(POD_PIN);
        if !path.exists() {
            return Ok(None);
        }
        let array = Array::<_, [u8; SIZE]>::try_from(crate::apply::open_pinned(&path)?)
            .with_context(|| format!("{}: not a pod record", path.display()))?;
        let raw = array
            .get(&0, 0)
            .with_context(|| format!("reading the pod record {}", path.display()))?;
        PodRecord::decode(&raw)
            .with_context(|| format!("{}", path.display()))
            .map(Some)
    }
}

impl fmt::Display for PodRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cgroup {} (id {}), netns {} (inode {}, cookie {})",
            self.cgroup, self.cgroup_id, self.netns, self.netns_inode, self.netns_cookie
        )
    }
}

fn put_str(dst: &mut [u8], s: &str) {
    // Leave room for a NUL; cut on a character boundary.
    let mut end = s.len().min(dst.len() - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    dst[..end].copy_from_slice(&s.as_bytes()[..end]);
}

fn get_str(src: &[u8]) -> String {
    let end = src.iter().position(|b| *b == 0).unwrap_or(src.len());
    String::from_utf8_lossy(&src[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> PodRecord {
        PodRecord {
            cgroup_id: 4242,
            cgroup: "/sys/fs/cgroup/kubepods/pod1".into(),
            netns_cookie: 7,
            netns_inode: 4026532246,
            netns: "/run/netns/pod1".into(),
        }
    }

    #[test]
    fn round_trip() {
        let r = rec();
        assert_eq!(PodRecord::decode(&r.encode()).unwrap(), r);
        let long = PodRecord {
            cgroup: "é".repeat(300),
            ..rec()
        };
        let back = PodRecord::decode(&long.encode()).unwrap();
        assert_eq!(back.cgroup, "é".repeat(127), "cut on a character boundary");
        assert!(PodRecord::decode(&[0; SIZE]).is_err());
    }

    #[test]
    fn same_pod_is_cgroup_and_netns() {
        let r = rec();
        assert!(r.same_pod(&PodRecord {
            cgroup: "/elsewhere".into(),
            netns: "/proc/1/ns/net".into(),
            ..rec()
        }));
        assert!(!r.same_pod(&PodRecord {
            cgroup_id: 1,
            ..rec()
        }));
        assert!(!r.same_pod(&PodRecord {
            netns_cookie: 8,
            ..rec()
        }));
        let text = r.to_string();
        assert!(
            text.contains("/sys/fs/cgroup/kubepods/pod1")
                && text.contains("id 4242")
                && text.contains("/run/netns/pod1"),
            "{text}"
        );
    }
}

//! Node mode: the programs loaded and attached once for the node, each pod
//! a set of map entries ([`crate::pods`]).
//!
//! ```text
//! <node pin dir>/                  default /sys/fs/bpf/redirect/node
//!   NODE                           the node record: cgroup, capacities
//!   state/                         connection state (as a one-shot pin dir's)
//!   policy/                        one set of policy maps for every pod
//!   gen-<N>/                       programs and their cgroup links, complete
//!   pods/<netns cookie>/POD        a pod's record: namespace, policy entries
//!   pods/<netns cookie>/link_sk_lookup   sk_lookup attached to its namespace
//! ```
//!
//! `node install` builds a new generation of programs on the pinned maps,
//! attaches it next to the old one, moves every pod's `sk_lookup` link to the
//! new program (`BPF_LINK_UPDATE`: never unattached), marks it complete and
//! retires the old one: running it again, or with a new binary, keeps every
//! pod's policy and every open connection's original destination.

use std::{
    fs::{self, File},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::{EbpfLoader, maps::Array};
use redirect_common::{OwnerPath, STATE_LAYOUT, map_names};
use serde::Serialize;

use crate::{
    apply::{EBPF_OBJECT, Layout, PROGRAMS, detach_pinned_link, load_and_pin, open_pinned},
    blob,
    fs::{check_cgroup, create_private_dir, ensure_bpffs, refuse_bpffs_root},
    lock::PinDirLock,
    sys::{self, AttachType},
};

/// Where `node install` pins by default.
pub const DEFAULT_NODE_PIN_DIR: &str = "/sys/fs/bpf/redirect/node";
/// Pods a node install takes by default.
pub const DEFAULT_MAX_PODS: u32 = 1024;
/// Most pods a node install may be sized for.
pub const MAX_PODS_LIMIT: u32 = 1 << 16;

/// Node-wide entries a pod's policy may use on average, per map: the pools
/// the node's policy maps are sized to (`--max-pods` times these). One pod
/// may use more as long as the pool has room.
pub const PER_POD: [(&str, u32); 11] = [
    (map_names::CONFIGS, 1),
    (map_names::POD_ADDRS, 8),
    (map_names::PORTS, 32),
    (map_names::PROXY_UIDS, 4),
    (map_names::PROXY_GIDS, 4),
    (map_names::OWNER_GROUPS, 4),
    (map_names::SERVICES, 16),
    (map_names::DNS_SERVERS, 4),
    (map_names::LOCAL_V4, 8),
    (map_names::LOCAL_V6, 8),
    (map_names::EXCLUDED_IFACES, 2),
];

/// Least entries of the node's `SERVICES` map, whatever `--max-pods`: as
/// many services as a one-shot apply takes by default (one pod may list
/// 100,000).
pub const MIN_SERVICES: u32 = redirect_common::DEFAULT_SERVICE_CAPACITY;

/// The node's policy maps and their sizes for `max_pods` pods.
pub fn pool_sizes(max_pods: u32) -> Vec<(&'static str, u32)> {
    PER_POD
        .iter()
        .map(|(name, per_pod)| {
            let n = max_pods.saturating_mul(*per_pod);
            (
                *name,
                if *name == map_names::SERVICES {
                    n.max(MIN_SERVICES)
                } else {
                    n
                },
            )
        })
        .collect()
}

/// The node's pin layout.
#[derive(Clone, Debug)]
pub struct NodeLayout {
    /// Generations, state, as a one-shot pin dir's.
    pub layout: Layout,
}

impl NodeLayout {
    /// The layout rooted at `root`.
    pub fn new(root: &Path) -> NodeLayout {
        NodeLayout {
            layout: Layout::new(root),
        }
    }
    /// The node pin dir.
    pub fn root(&self) -> &Path {
        self.layout.root()
    }
    /// The node record.
    pub fn record(&self) -> PathBuf {
        self.root().join("NODE")
    }
    /// The node-wide policy maps.
    pub fn policy_dir(&self) -> PathBuf {
        self.root().join("policy")
    }
    /// The pods' directories.
    pub fn pods_dir(&self) -> PathBuf {
        self.root().join("pods")
    }
    /// The directory of the pod whose namespace has cookie `netns`.
    pub fn pod_dir(&self, netns: u64) -> PathBuf {
        self.pods_dir().join(netns.to_string())
    }
    /// The newest complete generation's directory, if any.
    pub fn current_gen(&self) -> Result<Option<PathBuf>> {
        for g in self.layout.generations()?.iter().rev() {
            if self.layout.complete_marker(*g).exists() {
                return Ok(Some(self.layout.gen_dir(*g)));
            }
        }
        Ok(None)
    }
    /// The cookies of the registered pods.
    pub fn pods(&self) -> Result<Vec<u64>> {
        let dir = self.pods_dir();
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            if let Some(c) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
                out.push(c);
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

/// What a node install is for: recorded at the first install.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeRecord {
    /// The cgroup the programs are attached to (its inode number).
    pub cgroup_id: u64,
    /// Its path, as given to the first install.
    pub cgroup: String,
    /// Pods the policy maps are sized for.
    pub max_pods: u32,
    /// The cookie of the network namespace `node install` ran in: the
    /// host's (the installer runs with the host network), which `pod add`
    /// refuses. 0 for a record from before it was kept.
    pub host_netns: u64,
    /// Where a socket's credentials are in this kernel's structs (`None`: no
    /// BTF; owners are then the task's real IDs).
    #[serde(skip)]
    pub owner_path: Option<OwnerPath>,
}

impl NodeRecord {
    const MAGIC: &'static [u8; 8] = b"rdnode02";
    /// The record before `host_netns` was kept (no such field).
    const MAGIC_01: &'static [u8; 8] = b"rdnode01";

    fn to_bytes(&self) -> Vec<u8> {
        let mut b = Self::MAGIC.to_vec();
        b.extend_from_slice(&self.host_netns.to_le_bytes());
        b.extend_from_slice(&self.cgroup_id.to_le_bytes());
        b.extend_from_slice(&self.max_pods.to_le_bytes());
        match &self.owner_path {
            Some(p) => {
                b.push(1);
                b.extend_from_slice(bytemuck::bytes_of(p));
            }
            None => {
                b.push(0);
                b.extend_from_slice(&[0; size_of::<OwnerPath>()]);
            }
        }
        b.extend_from_slice(self.cgroup.as_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Result<NodeRecord> {
        let (host_netns, b) = match b.get(..8) {
            Some(m) if m == Self::MAGIC && b.len() >= 16 => (
                u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
                &b[16..],
            ),
            Some(m) if m == Self::MAGIC_01 => (0, &b[8..]),
            _ => bail!("not a node record of this version of redirect"),
        };
        let fixed = 8 + 4 + 1 + size_of::<OwnerPath>();
        if b.len() < fixed {
            bail!("a truncated node record");
        }
        let owner_path = (b[12] == 1).then(|| bytemuck::pod_read_unaligned(&b[13..fixed]));
        Ok(NodeRecord {
            cgroup_id: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            max_pods: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            host_netns,
            owner_path,
            cgroup: String::from_utf8_lossy(&b[fixed..]).into_owned(),
        })
    }

    /// The record of the node install at `layout`, if there is one.
    pub fn read(layout: &NodeLayout) -> Result<Option<NodeRecord>> {
        let path = layout.record();
        if !path.exists() {
            return Ok(None);
        }
        NodeRecord::from_bytes(&blob::read(&path)?)
            .with_context(|| format!("{}", path.display()))
            .map(Some)
    }
}

/// `node install` arguments.
#[derive(Clone, Debug)]
pub struct InstallRequest {
    /// The cgroup every pod is below (or the cgroup v2 root).
    pub cgroup: PathBuf,
    /// The node pin dir.
    pub pin_dir: PathBuf,
    /// Connection-state capacity (first install only).
    pub max_connections: Option<u32>,
    /// Pods the policy maps are sized for (first install only).
    pub max_pods: Option<u32>,
    /// How long to wait for another node or pod operation.
    pub lock_timeout: Duration,
}

/// What `node install` did.
#[derive(Clone, Debug, Serialize)]
pub struct InstallReport {
    /// The generation now in force.
    pub generation: u64,
    /// Generations retired.
    pub replaced: Vec<u64>,
    /// Registered pods moved to the new programs.
    pub pods: usize,
}

/// Loads and attaches the programs for the node (or replaces them with this
/// binary's, keeping every pod and connection).
pub fn install(req: &InstallRequest) -> Result<InstallReport> {
    check_cgroup(&req.cgroup)?;
    if let Some(n) = req.max_pods
        && !(1..=MAX_PODS_LIMIT).contains(&n)
    {
        bail!("--max-pods {n}: must be between 1 and {MAX_PODS_LIMIT}");
    }
    refuse_bpffs_root(&req.pin_dir)?;
    ensure_bpffs(&req.pin_dir)?;
    let cgroup = File::open(&req.cgroup)
        .with_context(|| format!("--cgroup {}: cannot open", req.cgroup.display()))?;
    let cgroup_id = cgroup.metadata()?.ino();
    let lock = PinDirLock::acquire(&req.pin_dir, true, req.lock_timeout)?
        .context("the node pin dir vanished while it was being created")?;
    let node = NodeLayout::new(&req.pin_dir);
    let record = match NodeRecord::read(&node)? {
        Some(r) => {
            if r.cgroup_id != cgroup_id {
                bail!(
                    "the node install at {} is attached to cgroup {} (id {}), not {}: \
                     `redirect node uninstall` first to move it",
                    node.root().display(),
                    r.cgroup,
                    r.cgroup_id,
                    req.cgroup.display()
                );
            }
            if let Some(n) = req.max_pods
                && n != r.max_pods
            {
                bail!(
                    "--max-pods {n}: the node install at {} is sized for {} pods and pinned \
                     maps cannot be resized; install again without --max-pods, or \
                     `redirect node uninstall` first",
                    node.root().display(),
                    r.max_pods
                );
            }
            r
        }
        None => NodeRecord {
            cgroup_id,
            cgroup: req
                .cgroup
                .canonicalize()
                .unwrap_or_else(|_| req.cgroup.clone())
                .display()
                .to_string(),
            max_pods: req.max_pods.unwrap_or(DEFAULT_MAX_PODS),
            host_netns: crate::netns::netns_cookie()?,
            owner_path: crate::btf::owner_path()
                .inspect_err(|e| {
                    tracing::warn!(
                        "owners are matched by the real UID/GID of the task calling connect(), \
                         not by the credentials the socket was opened with as iptables does: {e:#}"
                    )
                })
                .ok(),
        },
    };
    let capacity = crate::state::check(&node.layout.state_dir(), req.max_connections, true)?;
    crate::state::check_sizes(&node.policy_dir(), &crate::state::POLICY_SIZES, true)?;
    let old = node.layout.generations()?;
    let generation = old.last().map_or(1, |g| g + 1);
    let mut made: Vec<PathBuf> = Vec::new();
    let result = (|| {
        for dir in [node.layout.state_dir(), node.policy_dir(), node.pods_dir()] {
            if !dir.exists() {
                create_private_dir(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                made.push(dir);
            }
        }
        let gen_dir = node.layout.gen_dir(generation);
        create_private_dir(&gen_dir)
            .with_context(|| format!("cannot create {}", gen_dir.display()))?;
        made.push(gen_dir.clone());
        let pods = load_and_attach(&node, &record, &cgroup, &gen_dir, capacity)?;
        if !node.record().exists() {
            blob::pin(&node.record(), "redirect_node", &record.to_bytes())?;
        }
        sys::obj_pin(
            sys::obj_get(&gen_dir.join("prog_sockops"), 0)?,
            &node.layout.complete_marker(generation),
        )
        .context("pinning the completion marker")?;
        Ok::<_, anyhow::Error>(pods)
    })();
    let pods = match result {
        Ok(p) => p,
        Err(e) => {
            // Pods moved to this generation's sk_lookup go back to the old
            // one (best effort; the old generation is still complete).
            if let Ok(Some(prev)) = node.current_gen() {
                let _ = relink_pods(&node, &prev);
            }
            for d in made.iter().rev() {
                let _ = retire_dir(d);
            }
            return Err(e);
        }
    };
    for g in &old {
        retire_dir(&node.layout.gen_dir(*g))
            .with_context(|| format!("detaching the previous generation {g}"))?;
    }
    drop(lock);
    Ok(InstallReport {
        generation,
        replaced: old,
        pods,
    })
}

/// Loads the programs on the node's maps, pins them in `gen_dir`, attaches
/// the cgroup hooks and moves the pods' sk_lookup links to the new program.
/// Returns how many pods were moved.
fn load_and_attach(
    node: &NodeLayout,
    record: &NodeRecord,
    cgroup: &File,
    gen_dir: &Path,
    capacity: u32,
) -> Result<usize> {
    let mut loader = EbpfLoader::new();
    let state = node.layout.state_dir();
    let policy = node.policy_dir();
    let paths: Vec<(&str, PathBuf)> = map_names::STATE
        .iter()
        .map(|n| (*n, state.join(n)))
        .chain(map_names::POLICY.iter().map(|n| (*n, policy.join(n))))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    for (name, n) in pool_sizes(record.max_pods) {
        loader.map_max_entries(name, n);
    }
    loader.map_max_entries(map_names::INBOUND_LISTENER, 2 * record.max_pods);
    loader.map_max_entries(map_names::CONNS, capacity);
    loader.map_max_entries(map_names::TUPLES, capacity);
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (maps) into the kernel")?;
    Array::<_, u64>::try_from(
        ebpf.map_mut(map_names::LAYOUT)
            .context("map LAYOUT missing")?,
    )?
    .set(0, STATE_LAYOUT, 0)
    .context("writing LAYOUT")?;
    let mut moved = 0;
    for (name, attach, short) in PROGRAMS {
        let prog = load_and_pin(&mut ebpf, name, attach, gen_dir, short)?;
        if attach == AttachType::SkLookup {
            // Attached per pod, to its namespace: move the pods there now.
            moved = relink_pods(node, gen_dir)?;
            continue;
        }
        let fd = prog.fd().context("program fd")?;
        let link = sys::link_create(fd, cgroup, attach).with_context(|| {
            format!(
                "attaching {} to cgroup {} (kernel without cgroup bpf links or this hook?)",
                attach.hook(),
                record.cgroup
            )
        })?;
        sys::obj_pin(&link, &gen_dir.join(format!("link_{short}")))
            .with_context(|| format!("pinning the {} link", attach.hook()))?;
    }
    Ok(moved)
}

/// Points every registered pod's sk_lookup link at the sk_lookup program
/// pinned in `gen_dir`. Returns how many were moved.
fn relink_pods(node: &NodeLayout, gen_dir: &Path) -> Result<usize> {
    let prog = sys::obj_get(&gen_dir.join("prog_sk_lookup"), 0)
        .context("opening the sk_lookup program")?;
    let mut n = 0;
    for cookie in node.pods()? {
        let link = node.pod_dir(cookie).join("link_sk_lookup");
        let Ok(fd) = sys::obj_get(&link, 0) else {
            continue;
        };
        match sys::link_update(&fd, &prog) {
            Ok(()) => n += 1,
            // A pod whose namespace is gone: its link is detached; gc.
            Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("moving {} to the new program", link.display()));
            }
        }
    }
    Ok(n)
}

/// Detaches every link pinned directly in `dir`, then removes it.
pub fn retire_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("link_"))
        {
            detach_pinned_link(&p)?;
        }
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// Detaches and removes the node install and every pod registered in it.
/// Returns how many pods it had.
pub fn uninstall(pin_dir: &Path, lock_timeout: Duration) -> Result<usize> {
    let node = NodeLayout::new(pin_dir);
    let Some(lock) = PinDirLock::acquire(pin_dir, false, lock_timeout)? else {
        bail!("{}: no node install there", pin_dir.display());
    };
    if !node.record().exists() && node.layout.generations()?.is_empty() {
        bail!("{}: no node install there", pin_dir.display());
    }
    // Connect and sk_lookup first: nothing is redirected once the rest goes.
    let pods = node.pods()?;
    for cookie in &pods {
        retire_dir(&node.pod_dir(*cookie))?;
    }
    for g in node.layout.generations()? {
        retire_dir(&node.layout.gen_dir(g))?;
    }
    for dir in [node.pods_dir(), node.policy_dir(), node.layout.state_dir()] {
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    let record = node.record();
    if record.exists() {
        fs::remove_file(&record).with_context(|| format!("unpinning {}", record.display()))?;
    }
    fs::remove_dir(pin_dir).with_context(|| {
        format!(
            "removing {} (it holds something redirect did not put there)",
            pin_dir.display()
        )
    })?;
    drop(lock);
    Ok(pods.len())
}

/// What `node status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    /// The node pin dir.
    pub pin_dir: String,
    /// Its record.
    pub node: NodeRecord,
    /// The generation in force.
    pub generation: Option<u64>,
    /// Pods registered.
    pub pods: usize,
    /// Captured outbound connections open now, and the capacity.
    pub connections: Option<crate::status::Connections>,
    /// Decisions by rule, summed over CPUs.
    pub decisions: std::collections::BTreeMap<String, u64>,
    /// Other counters, summed over CPUs.
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// The node install at `pin_dir`.
pub fn status(pin_dir: &Path) -> Result<NodeStatus> {
    let node = NodeLayout::new(pin_dir);
    let Some(record) = NodeRecord::read(&node)? else {
        bail!(
            "{}: node mode is not installed there (`redirect node install --cgroup DIR`)",
            pin_dir.display()
        );
    };
    let generation = node.current_gen()?.and_then(|d| {
        d.file_name()?
            .to_str()?
            .strip_prefix("gen-")?
            .parse::<u64>()
            .ok()
    });
    let (decisions, counters) = crate::status::counters(&node.layout.state_dir())?;
    Ok(NodeStatus {
        pin_dir: pin_dir.display().to_string(),
        node: record,
        generation,
        pods: node.pods()?.len(),
        connections: crate::status::connections(&node.layout.state_dir())?,
        decisions,
        counters,
    })
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "node install  {}", self.pin_dir)?;
        writeln!(
            f,
            "attached to   cgroup {} (id {})",
            self.node.cgroup, self.node.cgroup_id
        )?;
        match self.generation {
            Some(g) => writeln!(f, "generation    {g}")?,
            None => writeln!(f, "generation    none complete")?,
        }
        writeln!(f, "pods          {} of {}", self.pods, self.node.max_pods)?;
        if let Some(c) = &self.connections {
            writeln!(f, "connections   {} open of {}", c.open, c.capacity)?;
        }
        for (k, v) in self.decisions.iter().chain(&self.counters) {
            if *v != 0 {
                writeln!(f, "  {k:<24} {v}")?;
            }
        }
        Ok(())
    }
}

/// Opens the node's policy maps; fails with what to do if node mode is not
/// installed at `pin_dir`.
pub fn installed(pin_dir: &Path) -> Result<(NodeLayout, NodeRecord, PathBuf)> {
    let node = NodeLayout::new(pin_dir);
    let record = NodeRecord::read(&node)?;
    let current = node.current_gen()?;
    match (record, current) {
        (Some(r), Some(g)) => Ok((node, r, g)),
        _ => bail!(
            "node mode is not installed at {}: run `redirect node install --cgroup DIR` first \
             (or give the --pin-dir it was installed with)",
            pin_dir.display()
        ),
    }
}

/// Opens a pinned map of the node (for the tests and `status`).
pub fn open_policy_map(node: &NodeLayout, name: &str) -> Result<aya::maps::Map> {
    open_pinned(&node.policy_dir().join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let r = NodeRecord {
            cgroup_id: 42,
            cgroup: "/sys/fs/cgroup/kubepods".into(),
            max_pods: 1000,
            host_netns: 7,
            owner_path: Some(OwnerPath {
                sk_socket: 1,
                socket_file: 2,
                file_cred: 3,
                cred_fsuid: 4,
                cred_fsgid: 5,
                reserved: [0; 3],
            }),
        };
        assert_eq!(NodeRecord::from_bytes(&r.to_bytes()).unwrap(), r);
        let none = NodeRecord {
            owner_path: None,
            ..r.clone()
        };
        assert_eq!(NodeRecord::from_bytes(&none.to_bytes()).unwrap(), none);
        assert!(NodeRecord::from_bytes(b"rdnode01").is_err());
        // A record from before the host's namespace was kept reads as 0.
        let mut old = b"rdnode01".to_vec();
        old.extend_from_slice(&r.to_bytes()[16..]);
        assert_eq!(
            NodeRecord::from_bytes(&old).unwrap(),
            NodeRecord {
                host_netns: 0,
                ..r.clone()
            }
        );
    }
}

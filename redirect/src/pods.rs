//! `pod add`, `pod remove`, `pod list` and `gc`: pods of a node install,
//! each a set of map entries found by its network namespace.
//!
//! A pod is registered by its namespace cookie. `pod add` validates
//! everything, then pins the pod's record (namespace and policy entries),
//! writes its entries, attaches the node's `sk_lookup` program to its
//! namespace and, last, writes its `CONFIGS` entry: from that one map
//! update on, its connections are captured. `--replace` writes the new
//! entries under a new policy id and swaps the `CONFIGS` entry, so a
//! connection is decided by the old policy or the new one, never a mix of
//! them. `pod remove` deletes the `CONFIGS` entry first. Pod operations and
//! node installs take the node pin dir's lock: one at a time.

use std::{
    fs::{self, File},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::SockHash;
use redirect_common::{LISTENER_V4, LISTENER_V6, ListenerKey, config_flags, map_names};
use serde::Serialize;

use crate::{
    apply::{detach_pinned_link, open_pinned, register_listeners},
    blob,
    entries::{PolicyEntries, PolicyMaps, new_policy_id},
    fs::create_private_dir,
    lock::PinDirLock,
    netns,
    node::{NodeLayout, installed, retire_dir},
    policy::PolicySpec,
    status::PolicyStatus,
    sys::{self, AttachType},
};

/// The record of a registered pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntry {
    /// The namespace's inode number.
    pub netns_inode: u64,
    /// The namespace file given to `pod add`.
    pub netns: String,
    /// The pod's policy entries.
    pub entries: PolicyEntries,
}

impl PodEntry {
    const MAGIC: &'static [u8; 8] = b"rdnpod01";

    fn to_bytes(&self) -> Vec<u8> {
        let mut b = Self::MAGIC.to_vec();
        b.extend_from_slice(&self.netns_inode.to_le_bytes());
        b.extend_from_slice(&(self.netns.len() as u32).to_le_bytes());
        b.extend_from_slice(self.netns.as_bytes());
        b.extend_from_slice(&self.entries.to_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Result<PodEntry> {
        if b.len() < 20 || &b[..8] != Self::MAGIC {
            bail!("not a pod record of this version of redirect");
        }
        let netns_inode = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let n = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")) as usize;
        let Some(path) = b.get(20..20 + n) else {
            bail!("pod record cut short");
        };
        Ok(PodEntry {
            netns_inode,
            netns: String::from_utf8_lossy(path).into_owned(),
            entries: PolicyEntries::from_bytes(&b[20 + n..])?,
        })
    }

    /// The pod's namespace cookie.
    pub fn cookie(&self) -> u64 {
        self.entries.netns()
    }
}

/// Name of a pod's record in its directory.
pub const RECORD: &str = "POD";
/// A replacement record, pinned before the swap and renamed over
/// [`RECORD`] after it; found by a later operation only if one was
/// interrupted in between.
const RECORD_NEW: &str = "POD_NEW";

fn read_record(path: &Path) -> Result<PodEntry> {
    PodEntry::from_bytes(&blob::read(path)?).with_context(|| format!("{}", path.display()))
}

/// `pod add` arguments.
#[derive(Clone, Debug)]
pub struct AddRequest {
    /// The pod's network namespace file.
    pub netns: PathBuf,
    /// The node pin dir.
    pub pin_dir: PathBuf,
    /// The policy.
    pub policy: PolicySpec,
    /// Replace the policy of a pod already registered.
    pub replace: bool,
    /// As `apply --allow-no-proxy-exemption`.
    pub allow_no_proxy_exemption: bool,
    /// How long to wait for another node or pod operation.
    pub lock_timeout: Duration,
}

/// What `pod add` did.
#[derive(Clone, Debug, Serialize)]
pub struct AddReport {
    /// The pod's namespace cookie.
    pub netns_cookie: u64,
    /// Whether an earlier policy was replaced.
    pub replaced: bool,
}

/// Opens `path` as a network namespace other than the host's: the one
/// `redirect` runs in (a node agent's or a CNI plugin's) or, where it can be
/// read, PID 1's.
fn pod_netns(path: &Path) -> Result<File> {
    if !path.exists() {
        bail!("--netns {}: no such file", path.display());
    }
    netns::open_netns(path)
}

/// Refuses the host's network namespace: the one `node install` ran in
/// (recorded), or for a record from before that was kept, the loader's own
/// and PID 1's. A pod's init container registering its own namespace is
/// thereby not mistaken for the host.
fn refuse_host(
    path: &Path,
    file: &File,
    cookie: u64,
    record: &crate::node::NodeRecord,
) -> Result<()> {
    let host = |what: &str| {
        anyhow::anyhow!(
            "--netns {}: that is the host's network namespace ({what}); a pod in it (host \
             network) cannot be captured without capturing the node",
            path.display()
        )
    };
    if record.host_netns != 0 {
        if cookie == record.host_netns {
            return Err(host("the one `node install` ran in"));
        }
        return Ok(());
    }
    let ns = file.metadata()?;
    for h in ["/proc/self/ns/net", "/proc/1/ns/net"] {
        if let Ok(m) = fs::metadata(h)
            && (ns.dev(), ns.ino()) == (m.dev(), m.ino())
        {
            return Err(host(h));
        }
    }
    Ok(())
}

/// What `pod add --dry-run` reports.
#[derive(Clone, Debug, Serialize)]
pub struct AddPlan {
    /// The namespace file (checked and probed).
    pub netns: String,
    /// Its cookie.
    pub netns_cookie: u64,
    /// The node install.
    pub pin_dir: String,
    /// Whether the pod is registered already (then `--replace` is needed).
    pub registered: bool,
    /// What its entries would be.
    pub maps: crate::plan::MapsPlan,
}

impl std::fmt::Display for AddPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "dry run: inputs checked; nothing written or attached")?;
        writeln!(
            f,
            "netns       {} (cookie {})",
            self.netns, self.netns_cookie
        )?;
        writeln!(
            f,
            "node        {}{}",
            self.pin_dir,
            if self.registered {
                " (registered already: --replace would replace its policy)"
            } else {
                ""
            }
        )?;
        writeln!(f, "entries")?;
        write!(f, "{}", self.maps)
    }
}

/// Checks `req` as [`add`] does (but for the lock) and says what it would
/// write.
pub fn plan(req: &AddRequest) -> Result<AddPlan> {
    let (file, facts) = check_pod_input(req)?;
    let (node, record, _) = installed(&req.pin_dir)?;
    refuse_host(&req.netns, &file, facts.netns_cookie, &record)?;
    let mut maps = PolicyMaps::open(&node.policy_dir())?;
    let entries = entries_for(req, &facts, &record)?;
    check_addrs(&node, &mut maps, &entries, &req.netns)?;
    let registered = node.pod_dir(facts.netns_cookie).exists();
    if registered && !req.replace {
        bail!(already(&req.netns, facts.netns_cookie));
    }
    Ok(AddPlan {
        netns: req.netns.display().to_string(),
        netns_cookie: facts.netns_cookie,
        pin_dir: req.pin_dir.display().to_string(),
        registered,
        maps: crate::plan::maps_plan_of(&entries, &facts),
    })
}

fn already(netns: &Path, cookie: u64) -> String {
    format!(
        "--netns {}: this pod is already registered (netns cookie {cookie}); give \
         --replace to replace its policy, or `redirect pod remove` it first",
        netns.display()
    )
}

/// The checks of the inputs alone: exemption, namespace, address counts.
fn check_pod_input(req: &AddRequest) -> Result<(File, crate::policy::NetnsFacts)> {
    if !req.allow_no_proxy_exemption {
        req.policy.check_proxy_exemption()?;
    }
    let netns_file = pod_netns(&req.netns)?;
    let facts = netns::probe(Some(&req.netns))?;
    for v4 in [true, false] {
        let n = facts
            .local_addrs
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .count();
        if n > redirect_common::SET_CAPACITY as usize {
            bail!(
                "--netns {}: it owns {n} IPv{} addresses, more than redirect tracks ({})",
                req.netns.display(),
                if v4 { 4 } else { 6 },
                redirect_common::SET_CAPACITY
            );
        }
    }
    Ok((netns_file, facts))
}

/// The pod's entries under a new policy id, with the node's owner path.
fn entries_for(
    req: &AddRequest,
    facts: &crate::policy::NetnsFacts,
    record: &crate::node::NodeRecord,
) -> Result<PolicyEntries> {
    crate::policy::warn_absent_interfaces(&req.policy, facts);
    let mut entries = PolicyEntries::new(&req.policy, facts, new_policy_id()?);
    entries.config = crate::btf::with_ifindex_offset(entries.config)?;
    if let Some(path) = record.owner_path {
        entries.config.owner_path = path;
        entries.config.flags |= config_flags::OWNER_FROM_FILE;
    }
    Ok(entries)
}

/// Refuses addresses another registered pod has.
fn check_addrs(
    node: &NodeLayout,
    maps: &mut PolicyMaps,
    entries: &PolicyEntries,
    netns: &Path,
) -> Result<()> {
    for a in entries.pod_addrs() {
        if let Some(other) = maps.pod_of_addr(a)?
            && other != entries.netns()
        {
            bail!(
                "--netns {}: address {a} belongs to another registered pod ({}); two pods \
                 of a node cannot share an address",
                netns.display(),
                describe(node, other)
            );
        }
    }
    Ok(())
}

/// The policy in force for the pod registered for namespace `netns`, read
/// back from the node's maps.
pub fn policy_in_force(pin_dir: &Path, netns: &Path) -> Result<PolicyEntries> {
    let (node, _, _) = installed(pin_dir)?;
    pod_netns(netns)?;
    let cookie = netns::probe(Some(netns))?.netns_cookie;
    let mut maps = PolicyMaps::open(&node.policy_dir())?;
    PolicyEntries::read(&mut maps, cookie)?.with_context(|| {
        format!(
            "--netns {}: no pod registered for it in the node install at {}",
            netns.display(),
            pin_dir.display()
        )
    })
}

/// The policy entries recorded for the pod with namespace cookie `cookie`
/// (what `pod remove` deletes).
pub fn recorded(pin_dir: &Path, cookie: u64) -> Result<PolicyEntries> {
    let node = NodeLayout::new(pin_dir);
    Ok(read_record(&node.pod_dir(cookie).join(RECORD))?.entries)
}

/// Registers one pod with its policy.
pub fn add(req: &AddRequest) -> Result<AddReport> {
    let (netns_file, facts) = check_pod_input(req)?;
    installed(&req.pin_dir)?;
    let lock = PinDirLock::acquire(&req.pin_dir, false, req.lock_timeout)?
        .context("the node pin dir vanished")?;
    // Read under the lock: an install or uninstall may have run meanwhile.
    let (node, record, gen_dir) = installed(&req.pin_dir)?;
    crate::state::check_version(&node.layout.state_dir(), true)?;
    refuse_host(&req.netns, &netns_file, facts.netns_cookie, &record)?;
    let cookie = facts.netns_cookie;
    let pod_dir = node.pod_dir(cookie);
    let mut maps = PolicyMaps::open(&node.policy_dir())?;
    let old = if pod_dir.exists() {
        if !req.replace {
            bail!(already(&req.netns, cookie));
        }
        Some(current_record(&pod_dir, &mut maps)?)
    } else {
        None
    };
    let entries = entries_for(req, &facts, &record)?;
    check_addrs(&node, &mut maps, &entries, &req.netns)?;
    let pod = PodEntry {
        netns_inode: netns_file.metadata()?.ino(),
        netns: req.netns.display().to_string(),
        entries,
    };
    let report = match old {
        None => add_new(&node, &gen_dir, &netns_file, &mut maps, &pod, &req.netns)?,
        Some(old) => replace(&node, &mut maps, &old, &pod)?,
    };
    drop(lock);
    Ok(report)
}

fn add_new(
    node: &NodeLayout,
    gen_dir: &Path,
    netns_file: &File,
    maps: &mut PolicyMaps,
    pod: &PodEntry,
    netns_path: &Path,
) -> Result<AddReport> {
    let pod_dir = node.pod_dir(pod.cookie());
    create_private_dir(&pod_dir).with_context(|| format!("cannot create {}", pod_dir.display()))?;
    let result = (|| {
        blob::pin(&pod_dir.join(RECORD), "redirect_pod", &pod.to_bytes())?;
        let prog = sys::obj_get(&gen_dir.join("prog_sk_lookup"), 0)
            .context("opening the node's sk_lookup program")?;
        let link =
            sys::link_create(&prog, netns_file, AttachType::SkLookup).with_context(|| {
                format!(
                    "attaching sk_lookup to the network namespace {}",
                    netns_path.display()
                )
            })?;
        sys::obj_pin(&link, &pod_dir.join("link_sk_lookup"))
            .context("pinning the sk_lookup link")?;
        let listeners = SockHash::<_, ListenerKey>::try_from(open_pinned(
            &node.layout.state_dir().join(map_names::INBOUND_LISTENER),
        )?)?;
        register_listeners(
            listeners,
            Some(netns_path),
            pod.cookie(),
            pod.entries.config.inbound_port,
        )?;
        // Last: the pod's CONFIGS entry puts the policy in force.
        pod.entries.write(maps)
    })();
    if let Err(e) = result {
        let _ = pod.entries.delete(maps, &[]);
        let _ = forget_listeners(node, pod.cookie());
        let _ = retire_dir(&pod_dir);
        return Err(e);
    }
    Ok(AddReport {
        netns_cookie: pod.cookie(),
        replaced: false,
    })
}

fn replace(
    node: &NodeLayout,
    maps: &mut PolicyMaps,
    old: &PodEntry,
    pod: &PodEntry,
) -> Result<AddReport> {
    let pod_dir = node.pod_dir(pod.cookie());
    let new_record = pod_dir.join(RECORD_NEW);
    if new_record.exists() {
        fs::remove_file(&new_record)?;
    }
    blob::pin(&new_record, "redirect_pod", &pod.to_bytes())?;
    let old_addrs: Vec<IpAddr> = old.entries.pod_addrs().collect();
    let new_addrs: Vec<IpAddr> = pod.entries.pod_addrs().collect();
    test_hook("before_swap");
    if let Err(e) = pod.entries.write(maps) {
        // Put the old policy back in force, whatever the write got to.
        let _ = pod.entries.delete(maps, &old_addrs);
        let _ = old.entries.write(maps);
        let _ = fs::remove_file(&new_record);
        return Err(e);
    }
    test_hook("after_swap");
    // The new policy is in force (the CONFIGS swap was the write's last
    // step): the old entries go, but for the addresses the pod still has.
    old.entries.delete(maps, &new_addrs)?;
    fs::rename(&new_record, pod_dir.join(RECORD))
        .with_context(|| format!("replacing the record in {}", pod_dir.display()))?;
    Ok(AddReport {
        netns_cookie: pod.cookie(),
        replaced: true,
    })
}

/// The record in force in a pod's directory: an interrupted `--replace`
/// may have left a new one beside it; whichever names the policy in
/// `CONFIGS` is the one in force, the other's entries are stale.
fn current_record(pod_dir: &Path, maps: &mut PolicyMaps) -> Result<PodEntry> {
    let record = read_record(&pod_dir.join(RECORD))?;
    let new_path = pod_dir.join(RECORD_NEW);
    if !new_path.exists() {
        return Ok(record);
    }
    let Ok(new) = read_record(&new_path) else {
        fs::remove_file(&new_path)?;
        return Ok(record);
    };
    let swapped = maps.config_of(new.cookie())?.map(|c| c.policy) == Some(new.entries.policy());
    if swapped {
        // The replacement came into force: the old entries are stale.
        let keep: Vec<IpAddr> = new.entries.pod_addrs().collect();
        record.entries.delete(maps, &keep)?;
        fs::rename(&new_path, pod_dir.join(RECORD))?;
        Ok(new)
    } else {
        // It never did: its entries are.
        let keep: Vec<IpAddr> = record.entries.pod_addrs().collect();
        new.entries.delete(maps, &keep)?;
        fs::remove_file(&new_path)?;
        Ok(record)
    }
}

/// Test hook, in debug builds only (the integration tests run a debug
/// build): with `REDIRECT_TEST_HOOK_KILL_IN_REPLACE=<point>` the loader
/// kills itself with SIGKILL at that point of a `--replace`
/// (`before_swap`, `after_swap`), as a replace interrupted there would be.
#[cfg(debug_assertions)]
fn test_hook(point: &str) {
    if std::env::var("REDIRECT_TEST_HOOK_KILL_IN_REPLACE").is_ok_and(|p| p == point) {
        // SAFETY: kill(2) on our own pid.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

#[cfg(not(debug_assertions))]
fn test_hook(_point: &str) {}

/// Removes the listener entries of the pod with cookie `netns`.
fn forget_listeners(node: &NodeLayout, netns: u64) -> Result<()> {
    let mut map = SockHash::<_, ListenerKey>::try_from(open_pinned(
        &node.layout.state_dir().join(map_names::INBOUND_LISTENER),
    )?)?;
    for slot in [LISTENER_V4, LISTENER_V6] {
        let _ = map.remove(&ListenerKey {
            netns,
            slot,
            reserved: 0,
        });
    }
    Ok(())
}

/// A pod named for messages: its namespace file and inode, or its cookie.
fn describe(node: &NodeLayout, cookie: u64) -> String {
    match read_record(&node.pod_dir(cookie).join(RECORD)) {
        Ok(r) => format!(
            "netns {} (inode {}, cookie {cookie})",
            r.netns, r.netns_inode
        ),
        Err(_) => format!("netns cookie {cookie}"),
    }
}

/// Unregisters the pod in the namespace `netns` (a path), or with the
/// namespace cookie `cookie` (for a pod whose namespace is gone).
pub fn remove(
    pin_dir: &Path,
    netns: Option<&Path>,
    cookie: Option<u64>,
    lock_timeout: Duration,
) -> Result<u64> {
    let (node, _, _) = installed(pin_dir)?;
    let cookie = match (netns, cookie) {
        (_, Some(c)) => c,
        (Some(path), None) => {
            pod_netns(path)?;
            netns::probe(Some(path))?.netns_cookie
        }
        (None, None) => {
            bail!("which pod? Give --netns PATH (or --cookie N for one whose namespace is gone)")
        }
    };
    let lock =
        PinDirLock::acquire(pin_dir, false, lock_timeout)?.context("the node pin dir vanished")?;
    let pod_dir = node.pod_dir(cookie);
    if !pod_dir.exists() {
        bail!(
            "{}: no pod registered with netns cookie {cookie}",
            match netns {
                Some(p) => format!("--netns {}", p.display()),
                None => "--cookie".to_string(),
            }
        );
    }
    remove_pod(&node, cookie)?;
    drop(lock);
    Ok(cookie)
}

/// Removes one pod (the node lock held).
fn remove_pod(node: &NodeLayout, cookie: u64) -> Result<()> {
    let pod_dir = node.pod_dir(cookie);
    let mut maps = PolicyMaps::open(&node.policy_dir())?;
    // Both records, if a --replace was interrupted: delete() leaves a
    // CONFIGS entry of another policy alone, so the one in force goes too.
    for name in [RECORD_NEW, RECORD] {
        let path = pod_dir.join(name);
        if path.exists()
            && let Ok(r) = read_record(&path)
        {
            r.entries.delete(&mut maps, &[])?;
        }
    }
    let link = pod_dir.join("link_sk_lookup");
    if link.exists() {
        detach_pinned_link(&link)?;
    }
    forget_listeners(node, cookie)?;
    fs::remove_dir_all(&pod_dir).with_context(|| format!("removing {}", pod_dir.display()))
}

/// One registered pod, as `pod list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PodInfo {
    /// Namespace cookie.
    pub netns_cookie: u64,
    /// Namespace file given to `pod add`.
    pub netns: String,
    /// Namespace inode.
    pub netns_inode: u64,
    /// Whether the namespace still exists (its sk_lookup link is attached).
    pub alive: bool,
    /// The policy.
    pub policy: PolicyStatus,
}

/// Whether the pod's sk_lookup link is still attached to a namespace.
fn alive(pod_dir: &Path) -> bool {
    let Ok(fd) = sys::obj_get(&pod_dir.join("link_sk_lookup"), 0) else {
        return false;
    };
    matches!(sys::link_info(&fd), Ok(i) if i.target != sys::LinkTarget::Netns(0))
}

/// Every registered pod.
pub fn list(pin_dir: &Path) -> Result<Vec<PodInfo>> {
    let (node, _, _) = installed(pin_dir)?;
    let mut out = Vec::new();
    for cookie in node.pods()? {
        let dir = node.pod_dir(cookie);
        let Ok(r) = read_record(&dir.join(RECORD)) else {
            continue;
        };
        out.push(PodInfo {
            netns_cookie: cookie,
            netns: r.netns.clone(),
            netns_inode: r.netns_inode,
            alive: alive(&dir),
            policy: PolicyStatus::of(&r.entries),
        });
    }
    Ok(out)
}

/// What `gc` removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// Pods of the node install whose namespace is gone.
    pub pods: Vec<u64>,
    /// One-shot pin dirs whose cgroup and namespace are gone.
    pub pin_dirs: Vec<String>,
}

/// Removes the node's pods whose network namespace no longer exists and,
/// under `one_shot_root`, one-shot pin dirs whose cgroup and namespace are
/// both gone.
pub fn gc(pin_dir: &Path, one_shot_root: &Path, lock_timeout: Duration) -> Result<GcReport> {
    let mut report = GcReport::default();
    if let Ok((node, _, _)) = installed(pin_dir) {
        let lock = PinDirLock::acquire(pin_dir, false, lock_timeout)?
            .context("the node pin dir vanished")?;
        for cookie in node.pods()? {
            if !alive(&node.pod_dir(cookie)) {
                remove_pod(&node, cookie)?;
                report.pods.push(cookie);
            }
        }
        drop(lock);
    }
    if one_shot_root.is_dir() {
        for e in fs::read_dir(one_shot_root)? {
            let dir = e?.path();
            if dir == pin_dir || !dir.join("state").is_dir() {
                continue;
            }
            if one_shot_gone(&dir) {
                crate::apply::remove(&dir, lock_timeout)?;
                report.pin_dirs.push(dir.display().to_string());
            }
        }
    }
    Ok(report)
}

/// Whether every link of a one-shot pin dir is attached to nothing (its
/// cgroup and namespace are gone), and it has at least one.
fn one_shot_gone(dir: &Path) -> bool {
    let layout = crate::apply::Layout::new(dir);
    let Ok(gens) = layout.generations() else {
        return false;
    };
    let mut any = false;
    for g in gens {
        for (_, _, short) in crate::apply::PROGRAMS {
            let Ok(fd) = sys::obj_get(&layout.gen_dir(g).join(format!("link_{short}")), 0) else {
                continue;
            };
            match sys::link_info(&fd) {
                Ok(i)
                    if matches!(
                        i.target,
                        sys::LinkTarget::Cgroup(0) | sys::LinkTarget::Netns(0)
                    ) =>
                {
                    any = true
                }
                _ => return false,
            }
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::NetnsFacts;

    #[test]
    fn record_round_trip() {
        let facts = NetnsFacts {
            local_addrs: vec!["10.0.0.2".parse().unwrap()],
            netns_cookie: 4096,
            ..Default::default()
        };
        let p = PodEntry {
            netns_inode: 4026532000,
            netns: "/run/netns/pod-é".into(),
            entries: PolicyEntries::new(&PolicySpec::default(), &facts, 5),
        };
        let back = PodEntry::from_bytes(&p.to_bytes()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.cookie(), 4096);
        assert!(PodEntry::from_bytes(&p.to_bytes()[..30]).is_err());
    }
}

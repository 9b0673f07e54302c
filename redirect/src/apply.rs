//! `apply` and `remove`: load the programs, fill the policy maps, attach to a
//! cgroup and pin everything so redirection outlives the loader.
//!
//! Pin layout under the pin dir (see [`crate::layout`] and `docs/design.md`):
//!
//! ```text
//! <pin-dir>/POD       the pod it belongs to (cgroup id, netns cookie)
//! <pin-dir>/state/    LAYOUT ORIG_DST CONNS TUPLES     kept across re-apply
//!                     COUNTERS INBOUND_LISTENER
//! <pin-dir>/gen-<N>/  CONFIG PORTS ... (policy maps)   one per apply
//!                     prog_* link_*                    programs and links
//!                     complete                         pinned last
//! ```
//!
//! Only one `apply` or `remove` works on a pin dir at a time
//! ([`crate::lock`]); a second one waits. A re-apply builds `gen-<N+1>`
//! completely, attaches it next to `gen-<N>` (both sets of programs share
//! the state maps and agree on every decision already made), marks it
//! complete, then unpins `gen-<N>` (and any generation an interrupted apply
//! left incomplete), which detaches it. No connection escapes in between.
//! Any failure removes what this run created and leaves the previous state
//! exactly as it was.

use std::{
    fs::{self, File},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, SockHash},
    programs::Program,
};
use redirect_common::{ListenerKey, map_names, program_names};

pub use crate::layout::Layout;
use crate::{
    entries::{PolicyEntries, PolicyMaps, new_policy_id},
    fs::{check_cgroup, create_private_dir, ensure_bpffs, is_bpffs_mount_point, refuse_bpffs_root},
    layout::{DEFAULT_PIN_ROOT, old_default_in_use},
    lock::PinDirLock,
    netns,
    pod_record::PodRecord,
    policy::{NetnsFacts, PolicySpec},
    sys::{self, AttachType},
};

/// The compiled eBPF object (built by `build.rs`).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect-ebpf"));

/// Programs in attach order, with their hook and short pin name. Connect4 and
/// sk_lookup come last so nothing is redirected before the hand-over path,
/// the release path and the listener registration are in place.
pub const PROGRAMS: [(&str, AttachType, &str); 16] = [
    (program_names::SOCK_OPS, AttachType::SockOps, "sockops"),
    (
        program_names::SOCK_RELEASE,
        AttachType::SockRelease,
        "sock_release",
    ),
    (
        program_names::GETSOCKOPT,
        AttachType::GetSockopt,
        "getsockopt",
    ),
    (
        program_names::GETPEERNAME4,
        AttachType::GetPeerName4,
        "getpeername4",
    ),
    (
        program_names::GETPEERNAME6,
        AttachType::GetPeerName6,
        "getpeername6",
    ),
    (
        program_names::GETSOCKNAME4,
        AttachType::GetSockName4,
        "getsockname4",
    ),
    (
        program_names::GETSOCKNAME6,
        AttachType::GetSockName6,
        "getsockname6",
    ),
    (
        program_names::DNS_EGRESS,
        AttachType::SkbEgress,
        "dns_egress",
    ),
    (
        program_names::DNS_INGRESS,
        AttachType::SkbIngress,
        "dns_ingress",
    ),
    (program_names::RECVMSG4, AttachType::RecvMsg4, "recvmsg4"),
    (program_names::RECVMSG6, AttachType::RecvMsg6, "recvmsg6"),
    (program_names::SK_LOOKUP, AttachType::SkLookup, "sk_lookup"),
    (program_names::SENDMSG4, AttachType::SendMsg4, "sendmsg4"),
    (program_names::SENDMSG6, AttachType::SendMsg6, "sendmsg6"),
    (program_names::CONNECT4, AttachType::Connect4, "connect4"),
    (program_names::CONNECT6, AttachType::Connect6, "connect6"),
];

/// What to apply, where.
#[derive(Clone, Debug)]
pub struct ApplyRequest {
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    /// The pod's network namespace (default: the loader's own).
    pub netns: Option<PathBuf>,
    /// Where to pin (on bpffs).
    pub pin_dir: PathBuf,
    /// The policy.
    pub policy: PolicySpec,
    /// Capacity of the connection state maps (captured outbound connections
    /// open at once); `None`: the default on a new pin dir, what is there on
    /// a re-apply.
    pub max_connections: Option<u32>,
    /// Apply a policy that captures outbound traffic with nothing exempting
    /// the proxy's own connections (which then loop back to it).
    pub allow_no_proxy_exemption: bool,
    /// How long to wait for another `apply` or `remove` on the same pin dir.
    pub lock_timeout: Duration,
}

/// What an apply did.
#[derive(Clone, Debug)]
pub struct ApplyReport {
    /// Generation number now active.
    pub generation: u64,
    /// Generations replaced (detached and unpinned).
    pub replaced: Vec<u64>,
    /// Facts read from the namespace.
    pub facts: NetnsFacts,
}

/// Something this run made in the pin dir, undone in reverse order if the
/// run fails.
#[derive(Debug)]
enum Made {
    /// A directory only this run wrote into: removed with its contents.
    Dir(PathBuf),
    /// The pin dir itself: removed only if empty once the rest is undone.
    PinDir(PathBuf),
    /// A pinned object.
    Pin(PathBuf),
}

impl Made {
    fn undo(&self) {
        let r = match self {
            Made::Dir(d) => fs::remove_dir_all(d),
            Made::PinDir(d) => fs::remove_dir(d),
            Made::Pin(p) => fs::remove_file(p),
        };
        if let Err(e) = r {
            tracing::warn!("rollback: cannot remove {self:?}: {e}");
        }
    }
}

/// Validates everything, then loads, fills, attaches and pins. On any error
/// nothing of this run stays behind and a previous apply keeps working.
pub fn apply(req: &ApplyRequest) -> Result<ApplyReport> {
    // 1. Validate every input before touching the kernel.
    if !req.allow_no_proxy_exemption {
        req.policy.check_proxy_exemption()?;
    }
    check_cgroup(&req.cgroup)?;
    let facts = netns::probe(req.netns.as_deref())?;
    refuse_bpffs_root(&req.pin_dir)?;
    ensure_bpffs(&req.pin_dir)?;
    let cgroup = File::open(&req.cgroup)
        .with_context(|| format!("--cgroup {}: cannot open", req.cgroup.display()))?;
    let netns_path = req
        .netns
        .clone()
        .unwrap_or_else(|| PathBuf::from("/proc/self/ns/net"));
    let netns_file = netns::open_netns(&netns_path)?;
    for v4 in [true, false] {
        if facts
            .local_addrs
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .count()
            > redirect_common::SET_CAPACITY as usize
        {
            bail!(
                "the network namespace owns more than {} IPv{} addresses, more than redirect tracks",
                redirect_common::SET_CAPACITY,
                if v4 { 4 } else { 6 }
            );
        }
    }
    let pod = PodRecord::of(
        &req.cgroup,
        &cgroup,
        req.netns.as_deref(),
        &netns_file,
        facts.netns_cookie,
    )?;

    if req.pin_dir.parent() == Some(Path::new(DEFAULT_PIN_ROOT)) && old_default_in_use() {
        tracing::warn!(
            "{DEFAULT_PIN_ROOT} holds an apply by an older redirect (its default pin dir); \
             if it is for this pod too, both are attached: remove it with \
             `redirect remove --pin-dir {DEFAULT_PIN_ROOT}`"
        );
    }

    // 2. One apply or remove at a time on this pin dir; from here on the
    //    pin dir's contents are ours to read and change.
    let lock = PinDirLock::acquire(&req.pin_dir, true, req.lock_timeout)?
        .context("the pin dir vanished while it was being created")?;
    let layout = Layout::new(&req.pin_dir);
    let mut made: Vec<Made> = Vec::new();
    if lock.created().last().map(PathBuf::as_path) == Some(layout.root()) {
        made.push(Made::PinDir(layout.root().to_path_buf()));
    }
    let result = (|| {
        if let Some(pin) = claim_for_pod(&layout, &pod)? {
            made.push(Made::Pin(pin));
        }
        let capacity = crate::state::check(&layout.state_dir(), req.max_connections, false)?;
        let old = layout.generations()?;
        let generation = old.last().map_or(1, |g| g + 1);
        let state = layout.state_dir();
        if !state.exists() {
            create_private_dir(&state)
                .with_context(|| format!("--pin-dir: cannot create {}", state.display()))?;
            made.push(Made::Dir(state));
        }
        let gen_dir = layout.gen_dir(generation);
        create_private_dir(&gen_dir)
            .with_context(|| format!("--pin-dir: cannot create {}", gen_dir.display()))?;
        made.push(Made::Dir(gen_dir.clone()));
        install(
            req,
            &facts,
            (&cgroup, &netns_file),
            &layout,
            generation,
            capacity,
        )?;
        Ok::<_, anyhow::Error>((generation, old))
    })();

    let (generation, old) = match result {
        Ok(r) => r,
        Err(err) => {
            // Links and programs of this run were dropped with `install`'s
            // locals; removing the pins releases the last references.
            for m in made.iter().rev() {
                m.undo();
            }
            return Err(err);
        }
    };

    // 3. The new generation is attached and complete: retire the old ones,
    //    complete or left incomplete by an interrupted apply.
    for g in &old {
        retire(&layout.gen_dir(*g))
            .with_context(|| format!("detaching the previous generation {g}"))?;
    }
    drop(lock);
    Ok(ApplyReport {
        generation,
        replaced: old,
        facts,
    })
}

/// Makes sure the pin dir is this pod's ([`check_pod`]) and pins the pod
/// record if it has none yet (its path is returned, for the rollback).
fn claim_for_pod(layout: &Layout, pod: &PodRecord) -> Result<Option<PathBuf>> {
    if check_pod(layout, pod)? {
        return Ok(None);
    }
    pod.pin(layout.root()).map(Some)
}

/// Checks that the pin dir may take a generation for `pod`: its pod record
/// names the same cgroup and network namespace, or it has none and nothing
/// in it is attached to another cgroup or namespace (a pin dir of a version
/// of redirect that kept no record). Returns whether a record is there.
pub fn check_pod(layout: &Layout, pod: &PodRecord) -> Result<bool> {
    let refuse = |theirs: &dyn std::fmt::Display| -> anyhow::Error {
        anyhow::anyhow!(
            "--pin-dir {pin}: it belongs to another pod ({theirs}); this apply is for {pod}. \
             Give each pod its own pin dir (the default, without --pin-dir, is one per \
             cgroup), or detach the other pod first with `redirect remove --pin-dir {pin}`",
            pin = layout.root().display(),
        )
    };
    if let Some(recorded) = PodRecord::read(layout.root())? {
        if !recorded.same_pod(pod) {
            return Err(refuse(&recorded));
        }
        return Ok(true);
    }
    // No record: a new pin dir, or one applied by a version of redirect
    // that kept none. Its links say where it is attached.
    for g in layout.generations()?.iter().rev() {
        let dir = layout.gen_dir(*g);
        for (_, attach, short) in PROGRAMS {
            let Ok(link) = sys::obj_get(&dir.join(format!("link_{short}")), 0) else {
                continue;
            };
            let Ok(info) = sys::link_info(link.as_fd()) else {
                continue;
            };
            let other = match info.target {
                // The kernel reports id 0 once the cgroup is gone.
                sys::LinkTarget::Cgroup(0) => Some(format!(
                    "{} attached to a cgroup that no longer exists",
                    attach.hook()
                )),
                sys::LinkTarget::Cgroup(id) if id != pod.cgroup_id => {
                    Some(format!("{} attached to cgroup id {id}", attach.hook()))
                }
                sys::LinkTarget::Netns(ino) if u64::from(ino) != pod.netns_inode => {
                    Some(format!("{} attached to netns inode {ino}", attach.hook()))
                }
                _ => None,
            };
            if let Some(other) = other {
                return Err(refuse(&other));
            }
        }
    }
    Ok(false)
}

/// Loads the object, fills and pins the policy maps, loads, attaches and pins
/// the programs. Returns only when everything is in place.
fn install(
    req: &ApplyRequest,
    facts: &NetnsFacts,
    (cgroup, netns_file): (&File, &File),
    layout: &Layout,
    generation: u64,
    capacity: u32,
) -> Result<()> {
    let gen_dir = &layout.gen_dir(generation);
    let state = layout.state_dir();
    let mut loader = EbpfLoader::new();
    let state_paths: Vec<(&str, PathBuf)> = map_names::STATE
        .iter()
        .map(|n| (*n, state.join(n)))
        .collect();
    for (name, path) in &state_paths {
        loader.map_pin_path(name, path.as_path());
    }
    crate::policy::warn_absent_interfaces(&req.policy, facts);
    let mut entries = PolicyEntries::new(&req.policy, facts, new_policy_id()?);
    entries.config = crate::btf::with_owner_path(entries.config);
    entries.config = crate::btf::with_ifindex_offset(entries.config)?;
    // Size each policy map to this one pod: a hash map's bucket array is
    // allocated up front even though its entries are not.
    for (name, n) in entries.counts() {
        let n = u32::try_from(n.max(1)).with_context(|| format!("{name}: too many entries"))?;
        loader.map_max_entries(name, n);
    }
    loader.map_max_entries(map_names::CONNS, capacity);
    loader.map_max_entries(map_names::TUPLES, capacity);
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (maps) into the kernel")?;
    Array::<_, u64>::try_from(map_mut(&mut ebpf, map_names::LAYOUT)?)?
        .set(0, redirect_common::STATE_LAYOUT, 0)
        .context("writing LAYOUT")?;

    let mut policy = PolicyMaps::take(&mut ebpf)?;
    entries.write(&mut policy)?;
    policy.pin(gen_dir)?;

    let mut links: Vec<OwnedFd> = Vec::new();
    for (name, attach, short) in PROGRAMS {
        let prog = load_and_pin(&mut ebpf, name, attach, gen_dir, short)?;
        let fd = prog.fd().context("program fd")?;
        let link = if attach.on_netns() {
            sys::link_create(fd, netns_file, attach).with_context(|| {
                format!(
                    "attaching {} to the network namespace (kernel without sk_lookup, 5.9+?)",
                    attach.hook()
                )
            })?
        } else {
            sys::link_create(fd, cgroup, attach).with_context(|| {
                format!(
                    "attaching {} to cgroup {} (kernel without cgroup bpf links or this hook?)",
                    attach.hook(),
                    req.cgroup.display()
                )
            })?
        };
        sys::obj_pin(&link, &gen_dir.join(format!("link_{short}")))
            .with_context(|| format!("pinning the {} link", attach.hook()))?;
        links.push(link);
        test_hook_after_link(links.len());
        if attach == AttachType::SockOps {
            // From here on sock_ops registers new listeners; register one
            // that is already listening before sk_lookup starts steering.
            register_running_listener(
                &mut ebpf,
                req.netns.as_deref(),
                facts.netns_cookie,
                req.policy.inbound_port,
            )?;
        }
    }
    // Last step: the generation is complete. Any pinned object will do as
    // the marker; the CONFIGS map is at hand.
    policy.pin_one(map_names::CONFIGS, &layout.complete_marker(generation))?;
    Ok(())
}

/// Loads program `name` of `ebpf` (for hook `attach`) into the kernel and
/// pins it as `<gen_dir>/prog_<short>`.
pub fn load_and_pin<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
    attach: AttachType,
    gen_dir: &Path,
    short: &str,
) -> Result<&'a mut Program> {
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?;
    let loaded = match prog {
        Program::SockOps(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        Program::SkLookup(p) => p.load(),
        _ => bail!("program {name} has an unexpected type"),
    };
    loaded.with_context(|| {
        format!(
            "the kernel refused to load the {} program (does this kernel support the hook?)",
            attach.hook()
        )
    })?;
    prog.pin(gen_dir.join(format!("prog_{short}")))
        .with_context(|| format!("pinning program {name}"))?;
    Ok(prog)
}

/// Test hook, in debug builds only (the integration tests run a debug
/// build): with `REDIRECT_TEST_HOOK_KILL_AFTER_LINKS=N` in the environment,
/// the loader kills itself with SIGKILL right after pinning its N-th link,
/// as an apply interrupted there would be: no rollback, no completion
/// marker. Release builds have no such hook.
#[cfg(debug_assertions)]
fn test_hook_after_link(pinned: usize) {
    let kill_after = std::env::var("REDIRECT_TEST_HOOK_KILL_AFTER_LINKS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    if kill_after == Some(pinned) {
        // SAFETY: kill(2) on our own pid.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

#[cfg(not(debug_assertions))]
fn test_hook_after_link(_pinned: usize) {}

/// Puts a proxy listener that was up before this apply into the listener
/// map (of a loaded object).
fn register_running_listener(
    ebpf: &mut Ebpf,
    netns: Option<&Path>,
    netns_cookie: u64,
    port: u16,
) -> Result<()> {
    let map = SockHash::<_, ListenerKey>::try_from(map_mut(ebpf, map_names::INBOUND_LISTENER)?)?;
    register_listeners(map, netns, netns_cookie, port)
}

/// Puts a proxy listener of the namespace `netns` (cookie `netns_cookie`)
/// that listens on `port` already into the listener map.
pub fn register_listeners<T: std::borrow::BorrowMut<MapData>>(
    mut map: SockHash<T, ListenerKey>,
    netns: Option<&Path>,
    netns_cookie: u64,
    port: u16,
) -> Result<()> {
    let found = crate::listener::find(netns, port)
        .context("looking for a proxy already listening on the inbound port")?;
    for found in found {
        let slot = if found.ipv6 {
            redirect_common::LISTENER_V6
        } else {
            redirect_common::LISTENER_V4
        };
        let key = ListenerKey {
            netns: netns_cookie,
            slot,
            reserved: 0,
        };
        map.insert(key, found.fd.as_raw_fd(), 0)
            .context("registering the running proxy's inbound listener")?;
        tracing::info!(
            pid = found.pid,
            port,
            ipv6 = found.ipv6,
            "registered a running inbound listener"
        );
    }
    Ok(())
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

/// Detaches one generation: its connect and sk_lookup links first, so that
/// no connection is redirected once the hand-over and getsockopt programs
/// start going, then everything else. Each link is detached before it is
/// unpinned (unpinning alone detaches it only when the kernel frees it, a
/// moment later): when this returns, none of its programs runs any more.
fn retire(dir: &Path) -> Result<()> {
    let shorts = PROGRAMS.iter().map(|(_, _, short)| *short);
    let (first, rest): (Vec<&str>, Vec<&str>) =
        shorts.partition(|s| ["connect4", "connect6", "sk_lookup"].contains(s));
    for short in first.into_iter().chain(rest) {
        let link = dir.join(format!("link_{short}"));
        if link.exists() {
            detach_pinned_link(&link)?;
            fs::remove_file(&link).with_context(|| format!("unpinning {}", link.display()))?;
        }
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// Detaches the link pinned at `path` (see [`retire`]). A link whose cgroup
/// or namespace is gone is already detached.
pub fn detach_pinned_link(path: &Path) -> Result<()> {
    let fd = sys::obj_get(path, 0).with_context(|| format!("opening {}", path.display()))?;
    match sys::link_detach(&fd) {
        Ok(()) => Ok(()),
        // ENOLINK: already detached (its target is gone).
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("detaching {}", path.display())),
    }
}

/// Detaches and unpins everything applied at `pin_dir`, complete
/// generations and incomplete ones alike, waiting up to `lock_timeout` for
/// a running `apply` or `remove` there to finish.
pub fn remove(pin_dir: &Path, lock_timeout: Duration) -> Result<Vec<u64>> {
    let nothing = || {
        anyhow::anyhow!(
            "--pin-dir {}: nothing applied there (no gen-* or state directory)",
            pin_dir.display()
        )
    };
    let Some(lock) = PinDirLock::acquire(pin_dir, false, lock_timeout)? else {
        return Err(nothing());
    };
    let layout = Layout::new(pin_dir);
    let gens = layout.generations()?;
    if gens.is_empty() && !layout.state_dir().exists() && !layout.pod_record().exists() {
        return Err(nothing());
    }
    for g in &gens {
        retire(&layout.gen_dir(*g))?;
    }
    let state = layout.state_dir();
    if state.exists() {
        fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    }
    let pod = layout.pod_record();
    if pod.exists() {
        fs::remove_file(&pod).with_context(|| format!("unpinning {}", pod.display()))?;
    }
    if pin_dir == Path::new(DEFAULT_PIN_ROOT) && fs::read_dir(pin_dir)?.next().is_some() {
        // The default pin dir of older versions, now also the root of the
        // per-pod pin dirs: those stay.
        return Ok(gens);
    }
    if is_bpffs_mount_point(pin_dir) {
        // Applied by a version that took a bpffs root as a pin dir: what
        // redirect put there is gone, the mount point stays.
        tracing::warn!(
            "{} is a bpffs mount point: left in place",
            pin_dir.display()
        );
        return Ok(gens);
    }
    fs::remove_dir(pin_dir).with_context(|| {
        format!(
            "removing {} (it holds something redirect did not put there)",
            pin_dir.display()
        )
    })?;
    drop(lock);
    Ok(gens)
}

/// Opens a pinned map (read-write, as root).
pub fn open_pinned(path: &Path) -> Result<aya::maps::Map> {
    let data = MapData::from_pin(path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    aya::maps::Map::from_map_data(data)
        .with_context(|| format!("reading pinned map {}", path.display()))
}

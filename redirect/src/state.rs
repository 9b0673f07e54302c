//! The connection-state maps (`<pin-dir>/state/`): kept across re-apply, so
//! a new generation picks up the connections of the old one. Before they
//! are reused, their layout is checked: aya reuses a pinned map by name
//! without comparing key or value sizes, and a map of another layout would
//! be read as garbage by the new programs.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, MapInfo};
use redirect_common::{
    AddrKey, Cidr4Key, Cidr6Key, Config, Conn, DEFAULT_MAX_CONNECTIONS, IdKey, Ip6Key, ListenerKey,
    PolicyServiceKey, PortKey, ProxySide, STATE_LAYOUT, TupleKey, map_names,
};

/// Key and value size of every state map, as this build's programs use them.
pub const SIZES: [(&str, u32, u32); 6] = [
    (map_names::LAYOUT, 4, 8),
    (map_names::ORIG_DST, 4, size_of::<ProxySide>() as u32),
    (map_names::CONNS, 8, size_of::<Conn>() as u32),
    (map_names::TUPLES, size_of::<TupleKey>() as u32, 8),
    (map_names::COUNTERS, 4, 8),
    (
        map_names::INBOUND_LISTENER,
        size_of::<ListenerKey>() as u32,
        4,
    ),
];

/// Key and value size of every policy map: checked before a node install
/// reuses its pinned policy maps (a one-shot apply makes new ones).
pub const POLICY_SIZES: [(&str, u32, u32); 17] = [
    (map_names::CONFIGS, 8, size_of::<Config>() as u32),
    (map_names::POD_ADDRS, size_of::<AddrKey>() as u32, 8),
    (map_names::PORTS, size_of::<PortKey>() as u32, 1),
    (map_names::PROXY_UIDS, size_of::<IdKey>() as u32, 1),
    (map_names::PROXY_GIDS, size_of::<IdKey>() as u32, 1),
    (map_names::OWNER_GROUPS, size_of::<IdKey>() as u32, 1),
    (map_names::SERVICES, size_of::<PolicyServiceKey>() as u32, 1),
    (map_names::EXCLUDE_V4, 4 + size_of::<Cidr4Key>() as u32, 1),
    (map_names::INCLUDE_V4, 4 + size_of::<Cidr4Key>() as u32, 1),
    (map_names::LOCAL_V4, size_of::<IdKey>() as u32, 1),
    (map_names::EXCLUDE_V6, 4 + size_of::<Cidr6Key>() as u32, 1),
    (map_names::INCLUDE_V6, 4 + size_of::<Cidr6Key>() as u32, 1),
    (map_names::LOCAL_V6, size_of::<Ip6Key>() as u32, 1),
    (
        map_names::DNS_SERVERS,
        size_of::<PolicyServiceKey>() as u32,
        1,
    ),
    (map_names::EXCLUDED_IFACES, size_of::<IdKey>() as u32, 1),
    (map_names::ROUTES_V4, 4 + size_of::<Cidr4Key>() as u32, 1),
    (map_names::ROUTES_V6, 4 + size_of::<Cidr6Key>() as u32, 1),
];

/// What a user runs to remove pinned maps of another layout: the command
/// of the version that made them.
fn undo_hint(state_dir: &Path, node: bool) -> String {
    let root = state_dir.parent().unwrap_or(state_dir).display();
    if node {
        format!("`redirect node uninstall --pin-dir {root}`")
    } else {
        format!("`redirect remove --pin-dir {root}`")
    }
}

/// Checks only the layout version of the state maps in `state_dir` (one map
/// read): what `pod add` checks before writing a node's maps.
pub fn check_version(state_dir: &Path, node: bool) -> Result<()> {
    let version = Array::<_, u64>::try_from(crate::apply::open_pinned(
        &state_dir.join(map_names::LAYOUT),
    )?)?
    .get(&0, 0)
    .context("reading the LAYOUT map")?;
    if version != STATE_LAYOUT {
        bail!(
            "{}: state layout version {version}, this build uses {STATE_LAYOUT}. These maps were \
             made by another version of redirect: remove them with that version ({}), then \
             install again",
            state_dir.display(),
            undo_hint(state_dir, node)
        );
    }
    Ok(())
}

/// Checks pinned maps in `dir` against `sizes` (those present).
pub fn check_sizes(dir: &Path, sizes: &[(&str, u32, u32)], node: bool) -> Result<()> {
    for (name, key, value) in sizes {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading the pinned map {}", path.display()))?;
        if info.key_size() != *key || info.value_size() != *value {
            bail!(
                "{}: map {name} has {}-byte keys and {}-byte values, this build uses {key} and \
                 {value}. It was made by another version of redirect: remove it with that \
                 version ({}), then install again",
                dir.display(),
                info.key_size(),
                info.value_size(),
                undo_hint(dir, node)
            );
        }
    }
    Ok(())
}

/// Largest `--max-connections`: the hash buckets alone (16 bytes a slot,
/// rounded up to a power of two, in each of the two maps) stay under 256 MiB.
pub const MAX_CONNECTIONS_LIMIT: u32 = 1 << 23;

/// Checks the state maps already pinned in `state_dir` (if any) against this
/// build's layout and the requested capacity. Returns the capacity the
/// state maps have or will have.
pub fn check(state_dir: &Path, requested: Option<u32>, node: bool) -> Result<u32> {
    if let Some(n) = requested
        && !(1..=MAX_CONNECTIONS_LIMIT).contains(&n)
    {
        bail!("--max-connections {n}: must be between 1 and {MAX_CONNECTIONS_LIMIT}");
    }
    let pinned: Vec<&str> = SIZES
        .iter()
        .map(|(name, ..)| *name)
        .filter(|name| state_dir.join(name).exists())
        .collect();
    if pinned.is_empty() {
        return Ok(requested.unwrap_or(DEFAULT_MAX_CONNECTIONS));
    }
    let refuse = |why: String| -> anyhow::Error {
        anyhow::anyhow!(
            "{}: {why}. These state maps were made by another version of redirect: \
             remove them with that version ({}), or delete the directory (open captured \
             connections lose their original destination); then {} again",
            state_dir.display(),
            undo_hint(state_dir, node),
            if node { "install" } else { "apply" }
        )
    };
    let layout = state_dir.join(map_names::LAYOUT);
    if !layout.exists() {
        return Err(refuse(
            "no LAYOUT map (a layout older than version 2)".into(),
        ));
    }
    let version = Array::<_, u64>::try_from(crate::apply::open_pinned(&layout)?)?
        .get(&0, 0)
        .context("reading the LAYOUT map")?;
    if version != STATE_LAYOUT {
        return Err(refuse(format!(
            "state layout version {version}, this build uses {STATE_LAYOUT}"
        )));
    }
    for (name, key, value) in SIZES {
        let path = state_dir.join(name);
        if !path.exists() {
            return Err(refuse(format!("map {name} is missing")));
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading the pinned map {}", path.display()))?;
        if info.key_size() != key || info.value_size() != value {
            return Err(refuse(format!(
                "map {name} has {}-byte keys and {}-byte values, this build uses {key} and {value}",
                info.key_size(),
                info.value_size()
            )));
        }
    }
    let have = MapInfo::from_pin(state_dir.join(map_names::CONNS))
        .context("reading the pinned CONNS map")?
        .max_entries();
    if let Some(n) = requested
        && n != have
    {
        bail!(
            "--max-connections {n}: the state maps at {} hold {have}; a pinned map cannot \
             be resized. Apply again without --max-connections (or with {have}) to keep \
             them, or `redirect remove` first (open captured connections lose their \
             original destination)",
            state_dir.display()
        );
    }
    Ok(have)
}

//! A pod's policy as policy-map entries: the one place that turns a policy
//! into what the maps hold ([`PolicyEntries::new`]), writes it
//! ([`PolicyEntries::write`]), reads it back ([`PolicyEntries::read`]),
//! removes it ([`PolicyEntries::delete`]) and stores it in a pod record
//! ([`PolicyEntries::to_bytes`]). `apply`, `pod add`, `apply --dry-run`,
//! `status` and `explain` all go through it.
//!
//! Every entry but the pod's [`Config`] is keyed by the policy's id
//! ([`Config::policy`]); the `Config` itself is keyed by the pod's network
//! namespace cookie and written last, so that a pod's policy comes into
//! force, or is replaced, with one map update.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use redirect_common::{
    AF_INET, AF_INET6, AddrKey, CIDR_KEY_POLICY_BITS, Cidr4Key, Cidr6Key, Config, IdKey, Ip6Key,
    PolicyServiceKey, PortKey, ServiceKey, cidr_key, ip6_bytes, ip6_words, map_names,
};

use crate::policy::{Include, NetnsFacts, PolicySpec};

/// A pod's policy as the entries of the policy maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntries {
    /// `CONFIGS[netns cookie]`; its `policy` keys everything else.
    pub config: Config,
    /// `PORTS`: `(port, flags)` for each port with a flag.
    pub ports: Vec<(u16, u8)>,
    /// `PROXY_UIDS`.
    pub proxy_uids: Vec<u32>,
    /// `PROXY_GIDS`.
    pub proxy_gids: Vec<u32>,
    /// `OWNER_GROUPS`.
    pub owner_groups: Vec<u32>,
    /// `SERVICES`.
    pub services: Vec<ServiceKey>,
    /// `DNS_SERVERS`: each nameserver DNS capture takes, as `address:53`.
    pub dns_servers: Vec<ServiceKey>,
    /// `EXCLUDE_V4`: `(address, prefix)`.
    pub exclude_v4: Vec<(Ipv4Addr, u8)>,
    /// `INCLUDE_V4`.
    pub include_v4: Vec<(Ipv4Addr, u8)>,
    /// `EXCLUDE_V6`.
    pub exclude_v6: Vec<(Ipv6Addr, u8)>,
    /// `INCLUDE_V6`.
    pub include_v6: Vec<(Ipv6Addr, u8)>,
    /// `LOCAL_V4`: the namespace's IPv4 addresses.
    pub local_v4: Vec<Ipv4Addr>,
    /// `LOCAL_V6`: its IPv6 addresses.
    pub local_v6: Vec<Ipv6Addr>,
    /// `EXCLUDED_IFACES`: the ifindexes of the excluded interfaces.
    pub excluded_ifaces: Vec<u32>,
    /// `ROUTES_V4`: `(address, prefix, 1 if it leaves through an excluded
    /// interface else 0)`.
    pub routes_v4: Vec<(Ipv4Addr, u8, u8)>,
    /// `ROUTES_V6`.
    pub routes_v6: Vec<(Ipv6Addr, u8, u8)>,
}

/// The policy maps of one object or one node, by name.
pub struct PolicyMaps {
    maps: BTreeMap<&'static str, Map>,
}

impl PolicyMaps {
    /// The policy maps of a loaded object (taken out of it).
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<PolicyMaps> {
        let mut maps = BTreeMap::new();
        for name in map_names::POLICY {
            let map = ebpf
                .take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))?;
            maps.insert(name, map);
        }
        Ok(PolicyMaps { maps })
    }

    /// The policy maps pinned in `dir`.
    pub fn open(dir: &Path) -> Result<PolicyMaps> {
        let mut maps = BTreeMap::new();
        for name in map_names::POLICY {
            maps.insert(name, crate::apply::open_pinned(&dir.join(name))?);
        }
        Ok(PolicyMaps { maps })
    }

    /// Pins map `name` at `path`.
    pub fn pin_one(&self, name: &str, path: &Path) -> Result<()> {
        self.maps
            .get(name)
            .with_context(|| format!("policy map {name} missing"))?
            .pin(path)
            .with_context(|| format!("pinning map {name} at {}", path.display()))
    }

    /// Pins every map in `dir`.
    pub fn pin(&self, dir: &Path) -> Result<()> {
        for (name, map) in &self.maps {
            map.pin(dir.join(name))
                .with_context(|| format!("pinning map {name} in {}", dir.display()))?;
        }
        Ok(())
    }

    fn get(&mut self, name: &str) -> Result<&mut Map> {
        self.maps
            .get_mut(name)
            .with_context(|| format!("policy map {name} missing"))
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> Result<HashMap<&mut MapData, K, V>> {
        HashMap::try_from(self.get(name)?).with_context(|| format!("map {name}"))
    }

    fn trie<K: aya::Pod>(&mut self, name: &str) -> Result<LpmTrie<&mut MapData, K, u8>> {
        LpmTrie::try_from(self.get(name)?).with_context(|| format!("map {name}"))
    }

    /// The policy of the pod whose namespace has cookie `netns`, if any.
    pub fn config_of(&mut self, netns: u64) -> Result<Option<Config>> {
        let configs = self.hash::<u64, Config>(map_names::CONFIGS)?;
        match configs.get(&netns, 0) {
            Ok(c) => Ok(Some(c)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading CONFIGS"),
        }
    }

    /// The namespace cookie of the pod `addr` belongs to, if any.
    pub fn pod_of_addr(&mut self, addr: IpAddr) -> Result<Option<u64>> {
        let pods = self.hash::<AddrKey, u64>(map_names::POD_ADDRS)?;
        match pods.get(&addr_key(addr), 0) {
            Ok(c) => Ok(Some(c)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading POD_ADDRS"),
        }
    }

    /// Every pod's namespace cookie with its policy.
    pub fn configs(&mut self) -> Result<Vec<(u64, Config)>> {
        let configs = self.hash::<u64, Config>(map_names::CONFIGS)?;
        configs
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .context("reading CONFIGS")
    }
}

/// A new policy id: random, never 0.
pub fn new_policy_id() -> Result<u64> {
    let mut b = [0u8; 8];
    loop {
        // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            return Err(std::io::Error::last_os_error()).context("getrandom");
        }
        let id = u64::from_ne_bytes(b);
        if id != 0 {
            return Ok(id);
        }
    }
}

/// The `POD_ADDRS` key of `addr`.
pub fn addr_key(addr: IpAddr) -> AddrKey {
    match addr {
        IpAddr::V4(a) => AddrKey {
            ip: [u32::from_ne_bytes(a.octets()), 0, 0, 0],
            family: u32::from(AF_INET),
            reserved: 0,
        },
        IpAddr::V6(a) => AddrKey {
            ip: ip6_words(&a.octets()),
            family: u32::from(AF_INET6),
            reserved: 0,
        },
    }
}

fn trie4(policy: u64, a: Ipv4Addr, prefix: u8) -> Key<Cidr4Key> {
    Key::new(
        CIDR_KEY_POLICY_BITS + u32::from(prefix),
        cidr_key(policy, a.octets()),
    )
}

fn trie6(policy: u64, a: Ipv6Addr, prefix: u8) -> Key<Cidr6Key> {
    Key::new(
        CIDR_KEY_POLICY_BITS + u32::from(prefix),
        cidr_key(policy, a.octets()),
    )
}

fn id_key(policy: u64, id: u32) -> IdKey {
    IdKey {
        policy,
        id,
        reserved: 0,
    }
}

/// Whether a map error is "no such entry" (deleting what is not there).
fn not_found(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::KeyNotFound)
        || matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

impl PolicyEntries {
    /// The entries of `spec` for a namespace with `facts`, under policy id
    /// `policy`.
    pub fn new(spec: &PolicySpec, facts: &NetnsFacts, policy: u64) -> PolicyEntries {
        let mut config = spec.config(facts);
        config.policy = policy;
        let include: &[_] = match &spec.include_cidrs {
            Include::All => &[],
            Include::List(l) => l,
        };
        let mut local_v4 = Vec::new();
        let mut local_v6 = Vec::new();
        for a in &facts.local_addrs {
            match a {
                IpAddr::V4(a) => local_v4.push(*a),
                IpAddr::V6(a) => local_v6.push(*a),
            }
        }
        let (mut routes_v4, mut routes_v6) = (Vec::new(), Vec::new());
        for (c, excluded) in crate::policy::route_entries(spec, facts) {
            match c.addr {
                IpAddr::V4(a) => routes_v4.push((a, c.prefix, u8::from(excluded))),
                IpAddr::V6(a) => routes_v6.push((a, c.prefix, u8::from(excluded))),
            }
        }
        PolicyEntries {
            config,
            excluded_ifaces: spec.excluded_ifindexes(facts),
            routes_v4,
            routes_v6,
            ports: spec.port_entries(),
            proxy_uids: spec.proxy_uids.clone(),
            proxy_gids: spec.proxy_gids.clone(),
            owner_groups: spec.owner_group_ids().to_vec(),
            services: spec.service_keys().collect(),
            dns_servers: spec.dns_server_keys().collect(),
            exclude_v4: PolicySpec::v4_cidrs(&spec.exclude_cidrs).collect(),
            include_v4: PolicySpec::v4_cidrs(include).collect(),
            exclude_v6: PolicySpec::v6_cidrs(&spec.exclude_cidrs).collect(),
            include_v6: PolicySpec::v6_cidrs(include).collect(),
            local_v4,
            local_v6,
        }
    }

    /// The maps of `ip:port` keys and their entries.
    fn service_lists(&self) -> [(&'static str, &Vec<ServiceKey>); 2] {
        [
            (map_names::SERVICES, &self.services),
            (map_names::DNS_SERVERS, &self.dns_servers),
        ]
    }

    /// The maps of ids (UIDs, GIDs, ifindexes) and their entries.
    fn id_lists(&self) -> [(&'static str, &Vec<u32>); 4] {
        [
            (map_names::PROXY_UIDS, &self.proxy_uids),
            (map_names::PROXY_GIDS, &self.proxy_gids),
            (map_names::OWNER_GROUPS, &self.owner_groups),
            (map_names::EXCLUDED_IFACES, &self.excluded_ifaces),
        ]
    }

    /// The `ROUTES_V4` and `ROUTES_V6` prefixes that leave through an
    /// excluded interface (`excluded`) or not, as `prefix/len`, in address
    /// order (IPv4 first).
    pub fn routes_through(&self, excluded: bool) -> Vec<String> {
        let v = u8::from(excluded);
        let mut v4: Vec<_> = self.routes_v4.iter().filter(|r| r.2 == v).collect();
        let mut v6: Vec<_> = self.routes_v6.iter().filter(|r| r.2 == v).collect();
        v4.sort_unstable();
        v6.sort_unstable();
        v4.into_iter()
            .map(|(a, p, _)| format!("{a}/{p}"))
            .chain(v6.into_iter().map(|(a, p, _)| format!("{a}/{p}")))
            .collect()
    }

    /// The policy id.
    pub fn policy(&self) -> u64 {
        self.config.policy
    }

    /// The pod's namespace cookie.
    pub fn netns(&self) -> u64 {
        self.config.netns_cookie
    }

    /// The addresses `sk_lookup` finds the pod by: its own, loopback left
    /// out.
    pub fn pod_addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self
            .local_v4
            .iter()
            .filter(|a| !a.is_loopback())
            .map(|a| IpAddr::V4(*a));
        let v6 = self
            .local_v6
            .iter()
            .filter(|a| !a.is_loopback())
            .map(|a| IpAddr::V6(*a));
        v4.chain(v6)
    }

    /// Entries per map (the `CONFIGS` entry counts one), to size the maps of
    /// a one-shot apply.
    pub fn counts(&self) -> Vec<(&'static str, usize)> {
        vec![
            (map_names::CONFIGS, 1),
            (map_names::POD_ADDRS, self.pod_addrs().count()),
            (map_names::PORTS, self.ports.len()),
            (map_names::PROXY_UIDS, self.proxy_uids.len()),
            (map_names::PROXY_GIDS, self.proxy_gids.len()),
            (map_names::OWNER_GROUPS, self.owner_groups.len()),
            (map_names::SERVICES, self.services.len()),
            (map_names::DNS_SERVERS, self.dns_servers.len()),
            (map_names::LOCAL_V4, self.local_v4.len()),
            (map_names::LOCAL_V6, self.local_v6.len()),
            (map_names::EXCLUDED_IFACES, self.excluded_ifaces.len()),
        ]
    }

    /// Writes every entry under the policy id and the pod's addresses, then,
    /// last, the pod's `CONFIGS` entry: from that one update on, the policy
    /// is in force. On error, some entries may be written: undo with
    /// [`PolicyEntries::delete`].
    pub fn write(&self, maps: &mut PolicyMaps) -> Result<()> {
        let id = self.policy();
        let mut ports = maps.hash::<PortKey, u8>(map_names::PORTS)?;
        for (port, flags) in &self.ports {
            let key = PortKey {
                policy: id,
                port: *port,
                reserved: [0; 3],
            };
            ports
                .insert(key, flags, 0)
                .context(full(map_names::PORTS))?;
        }
        for (name, ids) in self.id_lists() {
            let mut set = maps.hash::<IdKey, u8>(name)?;
            for x in ids {
                set.insert(id_key(id, *x), 1, 0).context(full(name))?;
            }
        }
        let mut trie = maps.trie::<Cidr4Key>(map_names::ROUTES_V4)?;
        for (a, p, v) in &self.routes_v4 {
            trie.insert(&trie4(id, *a, *p), v, 0)
                .with_context(|| format!("writing ROUTES_V4 ({a}/{p})"))?;
        }
        let mut trie = maps.trie::<Cidr6Key>(map_names::ROUTES_V6)?;
        for (a, p, v) in &self.routes_v6 {
            trie.insert(&trie6(id, *a, *p), v, 0)
                .with_context(|| format!("writing ROUTES_V6 ({a}/{p})"))?;
        }
        for (name, list) in self.service_lists() {
            let mut services = maps.hash::<PolicyServiceKey, u8>(name)?;
            for s in list {
                let key = PolicyServiceKey {
                    policy: id,
                    service: *s,
                    reserved: 0,
                };
                services.insert(key, 1, 0).context(full(name))?;
            }
        }
        for (name, list) in [
            (map_names::EXCLUDE_V4, &self.exclude_v4),
            (map_names::INCLUDE_V4, &self.include_v4),
        ] {
            let mut trie = maps.trie::<Cidr4Key>(name)?;
            for (a, p) in list {
                trie.insert(&trie4(id, *a, *p), 1, 0)
                    .with_context(|| format!("writing {name} ({a}/{p})"))?;
            }
        }
        for (name, list) in [
            (map_names::EXCLUDE_V6, &self.exclude_v6),
            (map_names::INCLUDE_V6, &self.include_v6),
        ] {
            let mut trie = maps.trie::<Cidr6Key>(name)?;
            for (a, p) in list {
                trie.insert(&trie6(id, *a, *p), 1, 0)
                    .with_context(|| format!("writing {name} ({a}/{p})"))?;
            }
        }
        let mut local = maps.hash::<IdKey, u8>(map_names::LOCAL_V4)?;
        for a in &self.local_v4 {
            local
                .insert(id_key(id, u32::from_ne_bytes(a.octets())), 1, 0)
                .context(full(map_names::LOCAL_V4))?;
        }
        let mut local6 = maps.hash::<Ip6Key, u8>(map_names::LOCAL_V6)?;
        for a in &self.local_v6 {
            let key = Ip6Key {
                policy: id,
                ip: ip6_words(&a.octets()),
            };
            local6
                .insert(key, 1, 0)
                .context(full(map_names::LOCAL_V6))?;
        }
        let netns = self.netns();
        let mut pods = maps.hash::<AddrKey, u64>(map_names::POD_ADDRS)?;
        for a in self.pod_addrs() {
            pods.insert(addr_key(a), netns, 0)
                .context(full(map_names::POD_ADDRS))?;
        }
        let mut configs = maps.hash::<u64, Config>(map_names::CONFIGS)?;
        configs
            .insert(netns, self.config, 0)
            .context(full(map_names::CONFIGS))?;
        Ok(())
    }

    /// Removes every entry of this policy: first the pod's `CONFIGS` entry
    /// (if it still names this policy: the pod is then no longer captured),
    /// then its addresses (those still pointing at this pod, but for
    /// `keep_addrs`), then the rest. Entries already gone are skipped.
    pub fn delete(&self, maps: &mut PolicyMaps, keep_addrs: &[IpAddr]) -> Result<()> {
        let id = self.policy();
        let netns = self.netns();
        if maps.config_of(netns)?.is_some_and(|c| c.policy == id) {
            let mut configs = maps.hash::<u64, Config>(map_names::CONFIGS)?;
            ignore_missing(configs.remove(&netns), map_names::CONFIGS)?;
        }
        let addrs: Vec<IpAddr> = self
            .pod_addrs()
            .filter(|a| !keep_addrs.contains(a))
            .collect();
        for a in addrs {
            if maps.pod_of_addr(a)? == Some(netns) {
                let mut pods = maps.hash::<AddrKey, u64>(map_names::POD_ADDRS)?;
                ignore_missing(pods.remove(&addr_key(a)), map_names::POD_ADDRS)?;
            }
        }
        let mut ports = maps.hash::<PortKey, u8>(map_names::PORTS)?;
        for (port, _) in &self.ports {
            let key = PortKey {
                policy: id,
                port: *port,
                reserved: [0; 3],
            };
            ignore_missing(ports.remove(&key), map_names::PORTS)?;
        }
        for (name, ids) in self.id_lists() {
            let mut set = maps.hash::<IdKey, u8>(name)?;
            for x in ids {
                ignore_missing(set.remove(&id_key(id, *x)), name)?;
            }
        }
        let mut trie = maps.trie::<Cidr4Key>(map_names::ROUTES_V4)?;
        for (a, p, _) in &self.routes_v4 {
            ignore_missing(trie.remove(&trie4(id, *a, *p)), map_names::ROUTES_V4)?;
        }
        let mut trie = maps.trie::<Cidr6Key>(map_names::ROUTES_V6)?;
        for (a, p, _) in &self.routes_v6 {
            ignore_missing(trie.remove(&trie6(id, *a, *p)), map_names::ROUTES_V6)?;
        }
        for (name, list) in self.service_lists() {
            let mut services = maps.hash::<PolicyServiceKey, u8>(name)?;
            for s in list {
                let key = PolicyServiceKey {
                    policy: id,
                    service: *s,
                    reserved: 0,
                };
                ignore_missing(services.remove(&key), name)?;
            }
        }
        for (name, list) in [
            (map_names::EXCLUDE_V4, &self.exclude_v4),
            (map_names::INCLUDE_V4, &self.include_v4),
        ] {
            let mut trie = maps.trie::<Cidr4Key>(name)?;
            for (a, p) in list {
                ignore_missing(trie.remove(&trie4(id, *a, *p)), name)?;
            }
        }
        for (name, list) in [
            (map_names::EXCLUDE_V6, &self.exclude_v6),
            (map_names::INCLUDE_V6, &self.include_v6),
        ] {
            let mut trie = maps.trie::<Cidr6Key>(name)?;
            for (a, p) in list {
                ignore_missing(trie.remove(&trie6(id, *a, *p)), name)?;
            }
        }
        let mut local = maps.hash::<IdKey, u8>(map_names::LOCAL_V4)?;
        for a in &self.local_v4 {
            let key = id_key(id, u32::from_ne_bytes(a.octets()));
            ignore_missing(local.remove(&key), map_names::LOCAL_V4)?;
        }
        let mut local6 = maps.hash::<Ip6Key, u8>(map_names::LOCAL_V6)?;
        for a in &self.local_v6 {
            let key = Ip6Key {
                policy: id,
                ip: ip6_words(&a.octets()),
            };
            ignore_missing(local6.remove(&key), map_names::LOCAL_V6)?;
        }
        Ok(())
    }

    /// Reads back the policy in force for the pod with namespace cookie
    /// `netns`, by walking every policy map for its policy id (`None` if
    /// the pod has none). Costs a walk of every map: for `status`,
    /// `explain` and the tests, not for the hot path of `pod add`.
    pub fn read(maps: &mut PolicyMaps, netns: u64) -> Result<Option<PolicyEntries>> {
        let Some(config) = maps.config_of(netns)? else {
            return Ok(None);
        };
        let id = config.policy;
        let mut e = PolicyEntries {
            config,
            ..Default::default()
        };
        for entry in maps.hash::<PortKey, u8>(map_names::PORTS)?.iter() {
            let (k, v) = entry.context("reading PORTS")?;
            if k.policy == id {
                e.ports.push((k.port, v));
            }
        }
        e.ports.sort_unstable();
        for (name, out) in [
            (map_names::PROXY_UIDS, &mut e.proxy_uids),
            (map_names::PROXY_GIDS, &mut e.proxy_gids),
            (map_names::OWNER_GROUPS, &mut e.owner_groups),
            (map_names::EXCLUDED_IFACES, &mut e.excluded_ifaces),
        ] {
            for k in maps.hash::<IdKey, u8>(name)?.keys() {
                let k = k.with_context(|| format!("reading {name}"))?;
                if k.policy == id {
                    out.push(k.id);
                }
            }
            out.sort_unstable();
        }
        // The first UID and GID lead (the decision reads them from CONFIGS).
        for (out, has, first) in [
            (
                &mut e.proxy_uids,
                config.has(redirect_common::config_flags::HAS_UIDS),
                config.first_uid,
            ),
            (
                &mut e.proxy_gids,
                config.has(redirect_common::config_flags::HAS_GIDS),
                config.first_gid,
            ),
        ] {
            if has && let Some(i) = out.iter().position(|x| *x == first) {
                let x = out.remove(i);
                out.insert(0, x);
            }
        }
        for (name, out) in [
            (map_names::SERVICES, &mut e.services),
            (map_names::DNS_SERVERS, &mut e.dns_servers),
        ] {
            for k in maps.hash::<PolicyServiceKey, u8>(name)?.keys() {
                let k = k.with_context(|| format!("reading {name}"))?;
                if k.policy == id {
                    out.push(k.service);
                }
            }
            sort_services(out);
        }
        for (name, out) in [
            (map_names::EXCLUDE_V4, &mut e.exclude_v4),
            (map_names::INCLUDE_V4, &mut e.include_v4),
        ] {
            for k in maps.trie::<Cidr4Key>(name)?.keys() {
                let k = k.with_context(|| format!("reading {name}"))?;
                let data = k.data();
                if data[..8] == id.to_be_bytes() {
                    let a = Ipv4Addr::new(data[8], data[9], data[10], data[11]);
                    out.push((a, (k.prefix_len() - CIDR_KEY_POLICY_BITS) as u8));
                }
            }
            out.sort_unstable();
        }
        for (name, out) in [
            (map_names::EXCLUDE_V6, &mut e.exclude_v6),
            (map_names::INCLUDE_V6, &mut e.include_v6),
        ] {
            for k in maps.trie::<Cidr6Key>(name)?.keys() {
                let k = k.with_context(|| format!("reading {name}"))?;
                let data = k.data();
                if data[..8] == id.to_be_bytes() {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(&data[8..]);
                    out.push((
                        Ipv6Addr::from(b),
                        (k.prefix_len() - CIDR_KEY_POLICY_BITS) as u8,
                    ));
                }
            }
            out.sort_unstable();
        }
        for entry in maps.trie::<Cidr4Key>(map_names::ROUTES_V4)?.iter() {
            let (k, v) = entry.context("reading ROUTES_V4")?;
            let data = k.data();
            if data[..8] == id.to_be_bytes() {
                let a = Ipv4Addr::new(data[8], data[9], data[10], data[11]);
                e.routes_v4
                    .push((a, (k.prefix_len() - CIDR_KEY_POLICY_BITS) as u8, v));
            }
        }
        e.routes_v4.sort_unstable();
        for entry in maps.trie::<Cidr6Key>(map_names::ROUTES_V6)?.iter() {
            let (k, v) = entry.context("reading ROUTES_V6")?;
            let data = k.data();
            if data[..8] == id.to_be_bytes() {
                let mut b = [0u8; 16];
                b.copy_from_slice(&data[8..]);
                e.routes_v6.push((
                    Ipv6Addr::from(b),
                    (k.prefix_len() - CIDR_KEY_POLICY_BITS) as u8,
                    v,
                ));
            }
        }
        e.routes_v6.sort_unstable();
        for k in maps.hash::<IdKey, u8>(map_names::LOCAL_V4)?.keys() {
            let k = k.context("reading LOCAL_V4")?;
            if k.policy == id {
                e.local_v4.push(Ipv4Addr::from(k.id.to_ne_bytes()));
            }
        }
        e.local_v4.sort_unstable();
        for k in maps.hash::<Ip6Key, u8>(map_names::LOCAL_V6)?.keys() {
            let k = k.context("reading LOCAL_V6")?;
            if k.policy == id {
                e.local_v6.push(Ipv6Addr::from(ip6_bytes(k.ip)));
            }
        }
        e.local_v6.sort_unstable();
        Ok(Some(e))
    }

    /// The same entries in the order [`PolicyEntries::read`] returns them.
    pub fn sorted(mut self) -> PolicyEntries {
        self.ports.sort_unstable();
        for (out, has, first) in [
            (
                &mut self.proxy_uids,
                self.config.has(redirect_common::config_flags::HAS_UIDS),
                self.config.first_uid,
            ),
            (
                &mut self.proxy_gids,
                self.config.has(redirect_common::config_flags::HAS_GIDS),
                self.config.first_gid,
            ),
        ] {
            out.sort_unstable();
            out.dedup();
            if has && let Some(i) = out.iter().position(|x| *x == first) {
                let x = out.remove(i);
                out.insert(0, x);
            }
        }
        self.owner_groups.sort_unstable();
        self.owner_groups.dedup();
        self.excluded_ifaces.sort_unstable();
        self.excluded_ifaces.dedup();
        self.routes_v4.sort_unstable();
        self.routes_v6.sort_unstable();
        sort_services(&mut self.services);
        self.services.dedup();
        sort_services(&mut self.dns_servers);
        self.dns_servers.dedup();
        for l in [&mut self.exclude_v4, &mut self.include_v4] {
            l.sort_unstable();
            l.dedup();
        }
        for l in [&mut self.exclude_v6, &mut self.include_v6] {
            l.sort_unstable();
            l.dedup();
        }
        self.local_v4.sort_unstable();
        self.local_v4.dedup();
        self.local_v6.sort_unstable();
        self.local_v6.dedup();
        self
    }

    /// The entries as bytes, for a pod record.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(256);
        w.extend_from_slice(MAGIC);
        w.extend_from_slice(bytemuck::bytes_of(&self.config));
        let len = |w: &mut Vec<u8>, n: usize| w.extend_from_slice(&(n as u32).to_le_bytes());
        len(&mut w, self.ports.len());
        for (p, f) in &self.ports {
            w.extend_from_slice(&p.to_le_bytes());
            w.push(*f);
        }
        for ids in [
            &self.proxy_uids,
            &self.proxy_gids,
            &self.owner_groups,
            &self.excluded_ifaces,
        ] {
            len(&mut w, ids.len());
            for x in ids {
                w.extend_from_slice(&x.to_le_bytes());
            }
        }
        for list in [&self.services, &self.dns_servers] {
            len(&mut w, list.len());
            for s in list {
                w.extend_from_slice(bytemuck::bytes_of(s));
            }
        }
        for l in [&self.exclude_v4, &self.include_v4] {
            len(&mut w, l.len());
            for (a, p) in l {
                w.extend_from_slice(&a.octets());
                w.push(*p);
            }
        }
        for l in [&self.exclude_v6, &self.include_v6] {
            len(&mut w, l.len());
            for (a, p) in l {
                w.extend_from_slice(&a.octets());
                w.push(*p);
            }
        }
        len(&mut w, self.local_v4.len());
        for a in &self.local_v4 {
            w.extend_from_slice(&a.octets());
        }
        len(&mut w, self.local_v6.len());
        for a in &self.local_v6 {
            w.extend_from_slice(&a.octets());
        }
        len(&mut w, self.routes_v4.len());
        for (a, p, v) in &self.routes_v4 {
            w.extend_from_slice(&a.octets());
            w.extend_from_slice(&[*p, *v]);
        }
        len(&mut w, self.routes_v6.len());
        for (a, p, v) in &self.routes_v6 {
            w.extend_from_slice(&a.octets());
            w.extend_from_slice(&[*p, *v]);
        }
        w
    }

    /// Entries from [`PolicyEntries::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<PolicyEntries> {
        let mut r = Reader { b, at: 0 };
        if r.take(MAGIC.len())? != MAGIC {
            bail!("not a policy record of this version of redirect");
        }
        let config: Config = bytemuck::pod_read_unaligned(r.take(size_of::<Config>())?);
        let mut e = PolicyEntries {
            config,
            ..Default::default()
        };
        for _ in 0..r.len()? {
            let p = u16::from_le_bytes(r.array()?);
            let [f] = r.array()?;
            e.ports.push((p, f));
        }
        for ids in [
            &mut e.proxy_uids,
            &mut e.proxy_gids,
            &mut e.owner_groups,
            &mut e.excluded_ifaces,
        ] {
            for _ in 0..r.len()? {
                ids.push(u32::from_le_bytes(r.array()?));
            }
        }
        for list in [&mut e.services, &mut e.dns_servers] {
            for _ in 0..r.len()? {
                list.push(bytemuck::pod_read_unaligned(
                    r.take(size_of::<ServiceKey>())?,
                ));
            }
        }
        for l in [&mut e.exclude_v4, &mut e.include_v4] {
            for _ in 0..r.len()? {
                let a: [u8; 4] = r.array()?;
                let [p] = r.array()?;
                l.push((Ipv4Addr::from(a), p));
            }
        }
        for l in [&mut e.exclude_v6, &mut e.include_v6] {
            for _ in 0..r.len()? {
                let a: [u8; 16] = r.array()?;
                let [p] = r.array()?;
                l.push((Ipv6Addr::from(a), p));
            }
        }
        for _ in 0..r.len()? {
            e.local_v4.push(Ipv4Addr::from(r.array::<4>()?));
        }
        for _ in 0..r.len()? {
            e.local_v6.push(Ipv6Addr::from(r.array::<16>()?));
        }
        for _ in 0..r.len()? {
            let a: [u8; 4] = r.array()?;
            let [p, v] = r.array()?;
            e.routes_v4.push((Ipv4Addr::from(a), p, v));
        }
        for _ in 0..r.len()? {
            let a: [u8; 16] = r.array()?;
            let [p, v] = r.array()?;
            e.routes_v6.push((Ipv6Addr::from(a), p, v));
        }
        if r.at != b.len() {
            bail!("policy record: {} bytes too many", b.len() - r.at);
        }
        Ok(e)
    }
}

/// Sorts `ip:port` keys as [`PolicyEntries::read`] returns them.
fn sort_services(list: &mut [ServiceKey]) {
    list.sort_unstable_by_key(|s| (s.family, s.ip.map(u32::from_be), s.port));
}

/// First bytes of a policy record.
const MAGIC: &[u8; 8] = b"rdpol003";

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len());
        let Some(end) = end else {
            bail!("policy record cut short at byte {}", self.at);
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn len(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
}

fn full(name: &'static str) -> String {
    format!(
        "writing {name} (\"argument list too long\" means it is full: a node install's maps \
         hold --max-pods times a share per pod)"
    )
}

fn ignore_missing(r: Result<(), aya::maps::MapError>, name: &str) -> Result<()> {
    match r {
        Err(e) if !not_found(&e) => Err(e).with_context(|| format!("removing from {name}")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::policy::{Cidr, InboundPorts, OwnerGroups};

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn spec() -> PolicySpec {
        PolicySpec::default()
    }

    proptest! {
        /// The record bytes give back exactly the entries they were made of,
        /// whatever the policy.
        #[test]
        fn record_round_trip(
            uids in proptest::collection::vec(any::<u32>(), 0..5),
            ports in proptest::collection::vec(any::<u16>(), 0..20),
            v4 in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..10),
            v6 in proptest::collection::vec((any::<u128>(), 0u8..=128), 0..10),
            groups in proptest::collection::vec(any::<u32>(), 0..4),
            policy in 1u64..,
        ) {
            let mut s = spec();
            s.proxy_uids = uids;
            s.exclude_ports = ports.clone();
            s.inbound_ports = InboundPorts::List(ports);
            s.exclude_cidrs = v4
                .iter()
                .map(|(a, p)| cidr(&format!("{}/{p}", Ipv4Addr::from(*a))))
                .chain(v6.iter().map(|(a, p)| cidr(&format!("{}/{p}", Ipv6Addr::from(*a)))))
                .collect();
            s.owner_groups = OwnerGroups::Exclude(groups);
            s.exclude_interfaces = vec!["net1".into(), "eth+".into()];
            let facts = NetnsFacts {
                local_addrs: vec!["10.1.2.3".parse().unwrap(), "fd00::5".parse().unwrap()],
                netns_cookie: 77,
                interfaces: vec![("lo".into(), 1), ("eth0".into(), 2), ("net1".into(), 9)],
                routes: v4
                    .iter()
                    .map(|(a, p)| crate::policy::Route {
                        dst: cidr(&format!("{}/{p}", Ipv4Addr::from(*a))),
                        dev: Some(if p % 2 == 0 { "net1" } else { "eth0" }.into()),
                        metric: 0,
                    })
                    .collect(),
                ..Default::default()
            };
            let e = PolicyEntries::new(&s, &facts, policy);
            prop_assert_eq!(&e.excluded_ifaces, &vec![2, 9]);
            prop_assert!(!e.routes_v4.is_empty() && !e.routes_v6.is_empty());
            prop_assert_eq!(PolicyEntries::from_bytes(&e.to_bytes()).unwrap(), e);
        }
    }

    #[test]
    fn cut_records_are_refused() {
        let e = PolicyEntries::new(&spec(), &NetnsFacts::default(), 9);
        let b = e.to_bytes();
        for n in [0, 7, 8, 50, b.len() - 1] {
            assert!(PolicyEntries::from_bytes(&b[..n]).is_err(), "{n}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(PolicyEntries::from_bytes(&longer).is_err());
    }
}

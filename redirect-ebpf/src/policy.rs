//! The kernel's view of the policy: [`PolicyMaps`] over the BPF maps, so the
//! shared decision code in `redirect_common::policy` runs unchanged here.

use aya_ebpf::maps::lpm_trie::Key;
use redirect_common::{
    AF_INET, AF_INET6, Addr, CIDR_KEY_POLICY_BITS, Cidr4Key, Cidr6Key, IdKey, Ip6Key, PolicyMaps,
    PolicyServiceKey, PortKey, ServiceKey, cidr_key, ip6_words,
};

use crate::maps::{
    DNS_SERVERS, EXCLUDE_V4, EXCLUDE_V6, EXCLUDED_IFACES, INCLUDE_V4, INCLUDE_V6, LOCAL_V4,
    LOCAL_V6, OWNER_GROUPS, PORTS, PROXY_GIDS, PROXY_UIDS, ROUTES_V4, ROUTES_V6, SERVICES,
};

/// One pod's policy as stored in this object's maps: its entries are those
/// under [`redirect_common::Config::policy`].
pub struct KernelPolicy {
    /// The policy id.
    pub id: u64,
}

impl KernelPolicy {
    #[inline(always)]
    fn id_key(&self, id: u32) -> IdKey {
        IdKey {
            policy: self.id,
            id,
            reserved: 0,
        }
    }

    #[inline(always)]
    fn key4(&self, a: u32) -> Key<Cidr4Key> {
        Key::new(
            CIDR_KEY_POLICY_BITS + 32,
            cidr_key(self.id, a.to_be_bytes()),
        )
    }

    #[inline(always)]
    fn key6(&self, b: &[u8; 16]) -> Key<Cidr6Key> {
        Key::new(CIDR_KEY_POLICY_BITS + 128, cidr_key(self.id, *b))
    }
}

impl PolicyMaps for KernelPolicy {
    #[inline(always)]
    fn port_flags(&self, port: u16) -> u8 {
        // Zeroed whole, then filled: built as a literal, its 6 reserved
        // bytes became a call to `memset`, one call frame more in the UDP
        // decision, which Linux 6.1's combined stack limit does not leave.
        // SAFETY: all-zero bytes are a valid `PortKey`.
        let mut key: PortKey = unsafe { core::mem::zeroed() };
        key.policy = self.id;
        key.port = port;
        // SAFETY: a map value, copied out.
        PORTS.get_ptr(key).map_or(0, |p| unsafe { *p })
    }

    #[inline(always)]
    fn is_proxy_uid(&self, uid: u32) -> bool {
        PROXY_UIDS.get_ptr(self.id_key(uid)).is_some()
    }

    #[inline(always)]
    fn is_proxy_gid(&self, gid: u32) -> bool {
        PROXY_GIDS.get_ptr(self.id_key(gid)).is_some()
    }

    #[inline(always)]
    fn cidr_excluded(&self, dst: &Addr) -> bool {
        match dst {
            Addr::V4(a) => EXCLUDE_V4.get(self.key4(*a)).is_some(),
            Addr::V6(b) => EXCLUDE_V6.get(self.key6(b)).is_some(),
        }
    }

    #[inline(always)]
    fn cidr_included(&self, dst: &Addr) -> bool {
        match dst {
            Addr::V4(a) => INCLUDE_V4.get(self.key4(*a)).is_some(),
            Addr::V6(b) => INCLUDE_V6.get(self.key6(b)).is_some(),
        }
    }

    #[inline(always)]
    fn is_local_addr(&self, dst: &Addr) -> bool {
        match dst {
            Addr::V4(a) => LOCAL_V4.get_ptr(self.id_key(a.to_be())).is_some(),
            Addr::V6(b) => LOCAL_V6
                .get_ptr(Ip6Key {
                    policy: self.id,
                    ip: ip6_words(b),
                })
                .is_some(),
        }
    }

    #[inline(always)]
    fn is_owner_group(&self, gid: u32) -> bool {
        OWNER_GROUPS.get_ptr(self.id_key(gid)).is_some()
    }

    #[inline(always)]
    fn is_dns_server(&self, dst: &Addr) -> bool {
        DNS_SERVERS.get_ptr(self.service_key(dst, 53)).is_some()
    }

    #[inline(always)]
    fn is_excluded_interface(&self, ifindex: u32) -> bool {
        EXCLUDED_IFACES.get_ptr(self.id_key(ifindex)).is_some()
    }

    #[inline(always)]
    fn routed_via_excluded_interface(&self, dst: &Addr) -> bool {
        let v = match dst {
            Addr::V4(a) => ROUTES_V4.get(self.key4(*a)),
            Addr::V6(b) => ROUTES_V6.get(self.key6(b)),
        };
        v.is_some_and(|v| *v != 0)
    }

    #[inline(always)]
    fn is_service(&self, dst: &Addr, port: u16) -> bool {
        SERVICES.get_ptr(self.service_key(dst, port)).is_some()
    }
}

impl KernelPolicy {
    /// `dst:port` as a key of this policy's `SERVICES` or `DNS_SERVERS`.
    #[inline(always)]
    fn service_key(&self, dst: &Addr, port: u16) -> PolicyServiceKey {
        let service = match dst {
            Addr::V4(a) => ServiceKey {
                ip: [a.to_be(), 0, 0, 0],
                port,
                family: AF_INET,
            },
            Addr::V6(b) => ServiceKey {
                ip: ip6_words(b),
                port,
                family: AF_INET6,
            },
        };
        PolicyServiceKey {
            policy: self.id,
            service,
            reserved: 0,
        }
    }
}

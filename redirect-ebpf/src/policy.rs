//! The kernel's view of the policy: [`PolicyMaps`] over the BPF maps, so the
//! shared decision code in `redirect_common::policy` runs unchanged here.

use aya_ebpf::maps::lpm_trie::Key;
use redirect_common::{AF_INET, AF_INET6, Addr, PolicyMaps, ServiceKey, ip6_words};

use crate::maps::{
    EXCLUDE_V4, EXCLUDE_V6, INCLUDE_V4, INCLUDE_V6, LOCAL_V4, LOCAL_V6, OWNER_GROUPS, PORTS,
    PROXY_GIDS, PROXY_UIDS, SERVICES,
};

/// The policy as stored in this object's maps.
pub struct KernelPolicy;

impl PolicyMaps for KernelPolicy {
    #[inline(always)]
    fn port_flags(&self, port: u16) -> u8 {
        PORTS.get(port as u32).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn is_proxy_uid(&self, uid: u32) -> bool {
        PROXY_UIDS.get_ptr(uid).is_some()
    }

    #[inline(always)]
    fn is_proxy_gid(&self, gid: u32) -> bool {
        PROXY_GIDS.get_ptr(gid).is_some()
    }

    #[inline(always)]
    fn cidr_excluded(&self, dst: &Addr) -> bool {
        match dst {
            Addr::V4(a) => EXCLUDE_V4.get(Key::new(32, a.to_be_bytes())).is_some(),
            Addr::V6(b) => EXCLUDE_V6.get(Key::new(128, *b)).is_some(),
        }
    }

    #[inline(always)]
    fn cidr_included(&self, dst: &Addr) -> bool {
        match dst {
            Addr::V4(a) => INCLUDE_V4.get(Key::new(32, a.to_be_bytes())).is_some(),
            Addr::V6(b) => INCLUDE_V6.get(Key::new(128, *b)).is_some(),
        }
    }

    #[inline(always)]
    fn is_local_addr(&self, dst: &Addr) -> bool {
        match dst {
            Addr::V4(a) => LOCAL_V4.get_ptr(a.to_be()).is_some(),
            Addr::V6(b) => LOCAL_V6.get_ptr(ip6_words(b)).is_some(),
        }
    }

    #[inline(always)]
    fn is_owner_group(&self, gid: u32) -> bool {
        OWNER_GROUPS.get_ptr(gid).is_some()
    }

    #[inline(always)]
    fn is_service(&self, dst: &Addr, port: u16) -> bool {
        let key = match dst {
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
        SERVICES.get_ptr(key).is_some()
    }
}

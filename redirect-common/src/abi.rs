//! The contract between the loader and the kernel programs: map names, the
//! layout of every map key and value, and the constants both sides agree on.
//!
//! Byte order is stated per field. As a rule, addresses are kept exactly as the
//! kernel hands them to BPF programs (network order, in the `u32` words of
//! `user_ip4` / `user_ip6`), so the hot path never converts them.

/// Names of the maps in the eBPF object, as user space looks them up.
///
/// The policy maps hold the policies of any number of pods. A pod is found
/// by its network namespace's cookie (`bpf_get_netns_cookie`) in
/// [`CONFIGS`]; its [`super::Config::policy`] id prefixes every key of its
/// entries in the other policy maps, so a pod's policy is replaced by
/// writing entries under a new id and then swapping its `CONFIGS` entry.
/// A one-shot `apply` fills a set of policy maps of its own with one pod; a
/// node install keeps one set for every pod of the node.
pub mod map_names {
    /// `HashMap<u64, Config>` (no preallocation): each pod's scalar policy
    /// under its network namespace's cookie. A socket of a namespace that
    /// is not here is never touched.
    pub const CONFIGS: &str = "CONFIGS";
    /// `HashMap<PortKey, u8>` (no preallocation): [`super::port_flags`] bits
    /// of the ports a pod's policy names (every other port has none).
    pub const PORTS: &str = "PORTS";
    /// `HashMap<IdKey, u8>`: the proxy's UIDs.
    pub const PROXY_UIDS: &str = "PROXY_UIDS";
    /// `HashMap<IdKey, u8>`: the proxy's GIDs.
    pub const PROXY_GIDS: &str = "PROXY_GIDS";
    /// `LpmTrie<[u8; 12], u8>`: outbound CIDRs that are never captured; the
    /// key is the policy id (big-endian) then the address, the prefix 64
    /// plus the CIDR's.
    pub const EXCLUDE_V4: &str = "EXCLUDE_V4";
    /// `LpmTrie<[u8; 12], u8>`: outbound CIDRs that are captured.
    pub const INCLUDE_V4: &str = "INCLUDE_V4";
    /// `HashMap<IdKey, u8>`: the IPv4 addresses the pod's network namespace
    /// owns (network order), used to tell which destinations are routed over
    /// `lo`.
    pub const LOCAL_V4: &str = "LOCAL_V4";
    /// `HashMap<IdKey, u8>`: the owner-group filter's GIDs.
    pub const OWNER_GROUPS: &str = "OWNER_GROUPS";
    /// `HashMap<PolicyServiceKey, u8>`: explicitly listed services
    /// (`ip:port`).
    pub const SERVICES: &str = "SERVICES";
    /// `HashMap<PolicyServiceKey, u8>`: the nameservers DNS capture takes
    /// (rule 5), each as `address:53`.
    pub const DNS_SERVERS: &str = "DNS_SERVERS";
    /// `LpmTrie<[u8; 24], u8>`: IPv6 outbound CIDRs that are never captured
    /// (policy id, then the address).
    pub const EXCLUDE_V6: &str = "EXCLUDE_V6";
    /// `LpmTrie<[u8; 24], u8>`: IPv6 outbound CIDRs that are captured.
    pub const INCLUDE_V6: &str = "INCLUDE_V6";
    /// `HashMap<Ip6Key, u8>`: the IPv6 addresses the namespace owns (the
    /// words of `user_ip6`, network order).
    pub const LOCAL_V6: &str = "LOCAL_V6";
    /// `HashMap<IdKey, u8>`: the ifindexes of the interfaces `-c`
    /// excludes (in the pod's network namespace, when the policy was
    /// applied): inbound connections arriving on them are not captured.
    pub const EXCLUDED_IFACES: &str = "EXCLUDED_IFACES";
    /// `LpmTrie<[u8; 12], u8>`, with `-c`: the pod's IPv4 routes (policy id,
    /// then the prefix) when the policy was applied, each with 1 if it
    /// leaves through an excluded interface, else 0. Its local addresses
    /// and 127.0.0.0/8 are routes through `lo`.
    pub const ROUTES_V4: &str = "ROUTES_V4";
    /// `LpmTrie<[u8; 24], u8>`: the IPv6 counterpart of [`ROUTES_V4`].
    pub const ROUTES_V6: &str = "ROUTES_V6";
    /// `HashMap<AddrKey, u64>` (no preallocation): each pod's own addresses
    /// (loopback left out) under which its network namespace's cookie is
    /// found. `sk_lookup` cannot ask for the namespace it runs in (not
    /// before Linux 6.18), so it finds the pod by the address a connection
    /// arrives for.
    pub const POD_ADDRS: &str = "POD_ADDRS";
    /// `SkStorage<ProxySide>`: on a proxy's accepted socket, the original
    /// destination of its connection (and, for an outbound capture, the
    /// client address to show). Written when the proxy's side of the
    /// handshake completes; lives and dies with that socket, so it answers
    /// as long as the proxy holds the socket, whatever the application did.
    pub const ORIG_DST: &str = "ORIG_DST";
    /// `SkStorage<DnsSocket>`: on an application's UDP socket that sent a
    /// captured DNS query, the nameservers its queries went to, so that the
    /// answers are shown coming from them. Fixed size, freed with the
    /// socket.
    pub const DNS_SOCKETS: &str = "DNS_SOCKETS";
    /// `HashMap<u64, Conn>` (no preallocation): every captured outbound
    /// connection under its application socket's cookie, from `connect4`
    /// until the application releases the socket (or, for a connection whose
    /// proxy side has not yet been accepted, until it has). Its size is the
    /// capacity (`--max-connections`): a `connect()` beyond it fails with
    /// `EPERM`, so no connection can reach the proxy without its destination.
    pub const CONNS: &str = "CONNS";
    /// `HashMap<TupleKey, u64>` (no preallocation): the application socket's
    /// cookie under the connection's 4-tuple, from `TCP_CONNECT_CB` (the first
    /// moment the ports are known) until its [`CONNS`] entry goes. The proxy's
    /// new socket finds its connection here.
    pub const TUPLES: &str = "TUPLES";
    /// `Array<u64>`, one entry: [`super::STATE_LAYOUT`], so that a pin from
    /// another layout is recognised and refused instead of silently reused.
    pub const LAYOUT: &str = "LAYOUT";
    /// `PerCpuArray<u64>`: counters, indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `SockHash<ListenerKey>`: each pod's inbound capture listener, under
    /// its network namespace's cookie and a slot ([`super::LISTENER_V4`],
    /// [`super::LISTENER_V6`]). The `sock_ops` program puts it there when the
    /// proxy calls `listen()` on the inbound port, so the proxy needs no
    /// privilege and a restarted proxy takes over by itself; the kernel
    /// drops the entry when the socket closes.
    pub const INBOUND_LISTENER: &str = "INBOUND_LISTENER";

    /// Maps whose content is the policy: a one-shot apply makes a new set
    /// each time; a node install keeps one set.
    pub const POLICY: [&str; 17] = [
        CONFIGS,
        POD_ADDRS,
        PORTS,
        PROXY_UIDS,
        PROXY_GIDS,
        OWNER_GROUPS,
        SERVICES,
        DNS_SERVERS,
        EXCLUDE_V4,
        INCLUDE_V4,
        LOCAL_V4,
        EXCLUDE_V6,
        INCLUDE_V6,
        LOCAL_V6,
        EXCLUDED_IFACES,
        ROUTES_V4,
        ROUTES_V6,
    ];
    /// Maps that hold connection state and counters: kept across re-apply so
    /// that connections in flight during a re-apply keep their original
    /// destination.
    pub const STATE: [&str; 7] = [
        LAYOUT,
        ORIG_DST,
        DNS_SOCKETS,
        CONNS,
        TUPLES,
        COUNTERS,
        INBOUND_LISTENER,
    ];
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// `cgroup/connect4`: decides and rewrites outbound IPv4 connects.
    pub const CONNECT4: &str = "redirect_connect4";
    /// `cgroup/getpeername4`: shows the application its original peer.
    pub const GETPEERNAME4: &str = "redirect_getpeername4";
    /// `cgroup/connect6`: decides and rewrites outbound IPv6 connects
    /// (IPv4-mapped destinations are decided as IPv4).
    pub const CONNECT6: &str = "redirect_connect6";
    /// `cgroup/getpeername6`: the IPv6 counterpart of [`GETPEERNAME4`].
    pub const GETPEERNAME6: &str = "redirect_getpeername6";
    /// `sockops`: hands the original destination over to the proxy's socket.
    pub const SOCK_OPS: &str = "redirect_sockops";
    /// `cgroup/getsockopt`: answers `SO_ORIGINAL_DST`.
    pub const GETSOCKOPT: &str = "redirect_getsockopt";
    /// `cgroup/getsockname4`: shows the application the pod's address as its
    /// local address where the connection could not be made from it.
    pub const GETSOCKNAME4: &str = "redirect_getsockname4";
    /// `cgroup/getsockname6`: the IPv6 counterpart of [`GETSOCKNAME4`].
    pub const GETSOCKNAME6: &str = "redirect_getsockname6";
    /// `cgroup/sock_release`: ends the application's side of a captured
    /// connection when the application closes its socket.
    pub const SOCK_RELEASE: &str = "redirect_sock_release";
    /// `sk_lookup` (on the pod's network namespace): steers captured inbound
    /// connections to the proxy's listener.
    pub const SK_LOOKUP: &str = "redirect_sk_lookup";
    /// `cgroup_skb/egress`: notes the DNS id of each captured query as it
    /// leaves, with the nameserver it was for.
    pub const DNS_EGRESS: &str = "redirect_dns_egress";
    /// `cgroup_skb/ingress`: matches each answer from the DNS proxy to its
    /// query by DNS id, in the order the socket receives them.
    pub const DNS_INGRESS: &str = "redirect_dns_ingress";
    /// `cgroup/recvmsg4`: shows a DNS answer coming from the nameserver
    /// its query was sent to.
    pub const RECVMSG4: &str = "redirect_recvmsg4";
    /// `cgroup/recvmsg6`: the IPv6 counterpart of [`RECVMSG4`].
    pub const RECVMSG6: &str = "redirect_recvmsg6";
    /// `cgroup/sendmsg4`: decides and rewrites each UDP datagram sent with
    /// an address (DNS capture).
    pub const SENDMSG4: &str = "redirect_sendmsg4";
    /// `cgroup/sendmsg6`: the IPv6 counterpart of [`SENDMSG4`].
    pub const SENDMSG6: &str = "redirect_sendmsg6";
    /// All programs, in the order they are attached.
    pub const ALL: [&str; 16] = [
        SOCK_OPS,
        SOCK_RELEASE,
        GETSOCKOPT,
        GETPEERNAME4,
        GETPEERNAME6,
        GETSOCKNAME4,
        GETSOCKNAME6,
        DNS_EGRESS,
        DNS_INGRESS,
        RECVMSG4,
        RECVMSG6,
        SK_LOOKUP,
        SENDMSG4,
        SENDMSG6,
        CONNECT4,
        CONNECT6,
    ];
}

/// Bits of a port's flags ([`map_names::PORTS`]).
pub mod port_flags {
    /// Destination port in the exclude-outbound-ports list (rule 1).
    pub const OUT_EXCLUDE: u8 = 1 << 0;
    /// Destination port in the include-outbound-ports list (rule 8).
    pub const OUT_INCLUDE: u8 = 1 << 1;
    /// Inbound port in the exclude-inbound-ports list (inbound rule 2).
    pub const IN_EXCLUDE: u8 = 1 << 2;
    /// Inbound port in the inbound-ports list (inbound rule 3).
    pub const IN_INCLUDE: u8 = 1 << 3;
}

/// Bits of [`Config::flags`].
pub mod config_flags {
    /// The proxy UID list is not empty; [`super::Config::first_uid`] is valid.
    pub const HAS_UIDS: u16 = 1 << 0;
    /// The proxy GID list is not empty; [`super::Config::first_gid`] is valid.
    pub const HAS_GIDS: u16 = 1 << 1;
    /// Include outbound CIDRs is `*`: capture everything not excluded.
    pub const INCLUDE_ALL: u16 = 1 << 2;
    /// An include-outbound-CIDR trie (IPv4 or IPv6) has entries.
    pub const HAS_INCLUDE_CIDRS: u16 = 1 << 3;
    /// An exclude-outbound-CIDR trie (IPv4 or IPv6) has entries.
    pub const HAS_EXCLUDE_CIDRS: u16 = 1 << 4;
    /// Inbound ports `*`: capture every inbound port not excluded.
    pub const INBOUND_ALL: u16 = 1 << 5;
    /// Inbound ports is a non-empty list ([`super::port_flags::IN_INCLUDE`]).
    pub const INBOUND_LIST: u16 = 1 << 6;
    /// Explicit services are listed ([`super::map_names::SERVICES`]).
    pub const HAS_SERVICES: u16 = 1 << 7;
    /// Owner-group filter: capture only the listed GIDs.
    pub const OWNER_GROUPS_INCLUDE: u16 = 1 << 8;
    /// Owner-group filter: capture all but the listed GIDs.
    pub const OWNER_GROUPS_EXCLUDE: u16 = 1 << 9;
    /// An include-outbound CIDR is a loopback address (127.0.0.0/8, `::1`):
    /// istio-iptables then leaves out the per-owner "`-o lo` and not this
    /// owner → RETURN" rules (3b), so loopback traffic of other owners walks
    /// on to the include rules.
    pub const LOOPBACK_INCLUDE: u16 = 1 << 10;
    /// Sockets marked [`super::Config::proxy_mark`] are the proxy's.
    pub const HAS_MARK: u16 = 1 << 11;
    /// Tasks in the cgroup [`super::Config::proxy_cgroup_id`] (or below) are
    /// the proxy's.
    pub const HAS_CGROUP: u16 = 1 << 12;
    /// [`super::Config::owner_path`] is filled in: a socket's owner is the
    /// file system UID and GID of the credentials its file was opened with
    /// (`sk->sk_socket->file->f_cred`), as iptables' owner match reads
    /// them. Without it, the real UID and GID of the task calling
    /// `connect()`.
    pub const OWNER_FROM_FILE: u16 = 1 << 13;
    /// DNS capture (rule 5): TCP and UDP to port 53 of the policy's
    /// nameservers go to [`super::Config::dns_port`].
    pub const DNS_CAPTURE: u16 = 1 << 14;
    /// With [`DNS_CAPTURE`]: to any address (`--capture-all-dns`).
    pub const DNS_CAPTURE_ALL: u16 = 1 << 15;
}

/// `SOL_IP`, the level of `SO_ORIGINAL_DST`.
pub const SOL_IP: i32 = 0;
/// `SOL_IPV6`, the level of `IP6T_SO_ORIGINAL_DST` (same number, 80).
pub const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (netfilter's `getsockopt` option, value 80).
pub const SO_ORIGINAL_DST: i32 = 80;
/// `AF_INET`.
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;
/// Size of the port flag array.
pub const PORT_COUNT: u32 = 65_536;
/// Default capacity of each CIDR trie (no preallocation: memory follows use).
pub const DEFAULT_CIDR_CAPACITY: u32 = 1 << 20;
/// Default capacity of [`map_names::CONNS`] and [`map_names::TUPLES`]: the
/// captured outbound connections open at once. 131,072 covers every 4-tuple
/// the default ephemeral port range (28,232 ports) allows to both capture
/// ports from both families. Entries are allocated as they are used; the
/// kernel preallocates only the hash buckets (16 bytes per slot).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1 << 17;
/// Version of the layout of the state maps ([`map_names::STATE`]): bumped
/// whenever a key or value there changes, so that a pin of another layout is
/// refused rather than reused.
pub const STATE_LAYOUT: u64 = 6;
/// Capacity of the service map in the object; the loader sizes it to the
/// list.
pub const DEFAULT_SERVICE_CAPACITY: u32 = 1 << 17;
/// `BPF_F_NO_PREALLOC`: hash map entries are allocated as they are added.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Slot of [`map_names::INBOUND_LISTENER`] for an IPv4 listener.
pub const LISTENER_V4: u32 = 0;
/// Slot for an IPv6 (possibly dual-stack) listener.
pub const LISTENER_V6: u32 = 1;
/// Most UIDs, GIDs, owner groups or local addresses (of each family) one
/// pod's policy may list.
pub const SET_CAPACITY: u32 = 1024;

/// The scalar part of a pod's policy ([`map_names::CONFIGS`]).
///
/// Ports are in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Config {
    /// Where captured outbound TCP goes (istio `-p`, 15001).
    pub proxy_port: u16,
    /// Where captured inbound TCP goes (istio `-z`, 15006).
    pub inbound_port: u16,
    /// The proxy's tunnel port, never captured (15008).
    pub tunnel_port: u16,
    /// [`config_flags`] bits.
    pub flags: u16,
    /// First proxy UID (the iptables rules for it come first and decide every
    /// connection routed over `lo`).
    pub first_uid: u32,
    /// First proxy GID, likewise.
    pub first_gid: u32,
    /// The source address (network order) the pod's routing picks for
    /// non-local destinations, or 0 if unknown. Redirected sockets are bound
    /// to it so the application and the proxy see the addresses iptables
    /// REDIRECT would give them.
    pub source_v4: u32,
    /// Where captured DNS goes (15053), with [`config_flags::DNS_CAPTURE`].
    pub dns_port: u16,
    /// With `-c` (excluded interfaces): where the kernel's `sk_lookup`
    /// context (`struct bpf_sk_lookup_kern`) keeps `ingress_ifindex`, read
    /// from BTF by the loader (`sk_lookup` reads it there rather than from
    /// its context fields, which have it only since Linux 5.17). Nonzero
    /// if and only if the policy excludes interfaces
    /// ([`Config::excludes_interfaces`]).
    pub ifindex_offset: u16,
    /// Cookie of the pod's network namespace (`SO_NETNS_COOKIE`): only a
    /// listener opened there becomes the inbound capture socket.
    pub netns_cookie: u64,
    /// The IPv6 source the pod's routing picks for outside destinations
    /// (words of `user_ip6`, network order), or all zero if none.
    pub source_v6: [u32; 4],
    /// The proxy's cgroup v2 id (`--proxy-cgroup`), with
    /// [`config_flags::HAS_CGROUP`].
    pub proxy_cgroup_id: u64,
    /// The proxy's socket mark (`--proxy-mark`), with
    /// [`config_flags::HAS_MARK`].
    pub proxy_mark: u32,
    /// Depth of the proxy's cgroup below the cgroup v2 root (the root is 0),
    /// for `bpf_get_current_ancestor_cgroup_id`.
    pub proxy_cgroup_level: u32,
    /// Where the socket's credentials are in the running kernel's structs,
    /// with [`config_flags::OWNER_FROM_FILE`].
    pub owner_path: OwnerPath,
    /// Id of this policy's entries in the other policy maps (nonzero).
    pub policy: u64,
}

/// Byte offsets of the fields from a `struct sock` to the credentials its
/// file was opened with, read from the running kernel's BTF by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct OwnerPath {
    /// `struct sock` → `sk_socket`.
    pub sk_socket: u16,
    /// `struct socket` → `file`.
    pub socket_file: u16,
    /// `struct file` → `f_cred`.
    pub file_cred: u16,
    /// `struct cred` → `fsuid`.
    pub cred_fsuid: u16,
    /// `struct cred` → `fsgid`.
    pub cred_fsgid: u16,
    /// Padding, zero.
    pub reserved: [u16; 3],
}

// The layout both sides agree on (no padding, checked by the Pod derives).
const _: () = assert!(core::mem::size_of::<Config>() == 88);
const _: () = assert!(core::mem::size_of::<PortKey>() == 16);
const _: () = assert!(core::mem::size_of::<IdKey>() == 16);
const _: () = assert!(core::mem::size_of::<Ip6Key>() == 24);
const _: () = assert!(core::mem::size_of::<PolicyServiceKey>() == 32);
const _: () = assert!(core::mem::size_of::<AddrKey>() == 24);
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 16);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);
const _: () = assert!(core::mem::size_of::<Conn>() == 96);
const _: () = assert!(core::mem::size_of::<DnsSocket>() == 840);
const _: () = assert!(core::mem::size_of::<ProxySide>() == 40);

impl Config {
    /// Whether a [`config_flags`] bit is set.
    #[inline(always)]
    pub const fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Whether `port` (host order) is one a captured connection is sent to:
    /// the outbound proxy port, or the inbound one (rule 3a). A captured
    /// connection's proxy end is bound to it and its application end is
    /// connected to it; no other socket has a hand-over entry.
    #[inline(always)]
    pub const fn is_capture_port(&self, port: u16) -> bool {
        port == self.proxy_port || port == self.inbound_port || self.is_dns_port(port)
    }

    /// Whether the policy excludes interfaces (`-c`).
    #[inline(always)]
    pub const fn excludes_interfaces(&self) -> bool {
        self.ifindex_offset != 0
    }

    /// Whether `port` is where DNS capture sends queries (never with DNS
    /// capture off).
    pub const fn is_dns_port(&self, port: u16) -> bool {
        self.flags & config_flags::DNS_CAPTURE != 0 && port == self.dns_port
    }
}

/// The original destination of a redirected connection: in [`Conn`] for the
/// application's side of an outbound capture, in [`ProxySide`] on the proxy's
/// socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct OrigDst {
    /// Address in network order; IPv4 uses word 0.
    pub ip: [u32; 4],
    /// Port in network order, as in `sockaddr_in`.
    pub port_be: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// The [`crate::policy::Rule`] that redirected it, as a number.
    pub rule: u16,
    /// [`orig_flags`] bits.
    pub flags: u16,
}

/// Bits of [`OrigDst::flags`].
pub mod orig_flags {
    /// Captured inbound (steered by `sk_lookup`), not outbound.
    pub const INBOUND: u16 = 1 << 0;
}

/// A captured outbound connection as the application's side knows it
/// ([`map_names::CONNS`], under the application socket's cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Conn {
    /// Where the application connected.
    pub orig: OrigDst,
    /// The local address iptables REDIRECT would have given the application's
    /// socket (network-order words, IPv4 in word 0), when the connection
    /// could not be made from it (IPv6, or a socket the application had
    /// already bound to a wildcard address): `getsockname` and the proxy's
    /// `accept`/`getpeername` show it. All zero: the real address is right.
    pub shown_src: [u32; 4],
    /// The connection's 4-tuple, once `TCP_CONNECT_CB` has seen it
    /// ([`conn_state::JOINED`]).
    pub tuple: TupleKey,
    /// [`conn_state`] bits, set with atomic OR.
    pub state: u64,
}

/// Bits of [`Conn::state`]. Both ends of a connection set their bit with an
/// atomic OR and look at the other's in the value it returns, so exactly
/// one of them, the last, deletes the entry.
pub mod conn_state {
    /// `TCP_CONNECT_CB` has put the 4-tuple in [`super::Conn::tuple`] and
    /// in `TUPLES`.
    pub const JOINED: u64 = 1 << 0;
    /// The proxy's accepted socket has its own copy ([`super::ProxySide`]).
    pub const CLAIMED: u64 = 1 << 1;
    /// The application has released (closed) its socket.
    pub const APP_RELEASED: u64 = 1 << 2;
}

/// What a proxy's accepted socket carries in [`map_names::ORIG_DST`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ProxySide {
    /// The original destination.
    pub orig: OrigDst,
    /// The client address to show as the socket's peer (`accept`,
    /// `getpeername`), as [`Conn::shown_src`]; all zero: the real one.
    pub shown_peer: [u32; 4],
}

/// A nameserver as a UDP socket's DNS state remembers it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct DnsPeer {
    /// Address in network order; IPv4 in word 0.
    pub ip: [u32; 4],
    /// Port in network order.
    pub port_be: u16,
    /// `AF_INET` or `AF_INET6`; 0: none.
    pub family: u16,
}

/// A captured query on its way: its DNS id and where the application sent
/// it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct DnsQuery {
    /// The nameserver; family 0: a free slot.
    pub peer: DnsPeer,
    /// The query's DNS id (as on the wire).
    pub id: u16,
    /// Padding, zero.
    pub reserved: [u8; 6],
}

/// Queries a UDP socket may have in flight, per socket, whose answers are
/// still to be matched: the oldest slot is reused when more are sent.
pub const DNS_QUERY_SLOTS: usize = 16;
/// Matched answers waiting in a socket's receive queue to be read, per
/// socket (a power of two).
pub const DNS_ANSWER_SLOTS: usize = 16;

/// What [`map_names::DNS_SOCKETS`] keeps on an application's UDP socket
/// with captured DNS. The sending path notes each query (`pending` or
/// `connected`, then a slot of `queries` by DNS id); the receiving path
/// matches each answer to its slot as it arrives and queues the nameserver
/// in `answers`, which `recvmsg` takes in the same order as the socket's
/// datagrams. Fixed size: a socket that sends millions of queries reuses
/// the same slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct DnsSocket {
    /// The nameserver of a captured `connect()`.
    pub connected: DnsPeer,
    /// The nameserver of the `sendmsg()` under way (with an address).
    pub pending: DnsPeer,
    /// Queries sent, waiting for their answers.
    pub queries: [DnsQuery; DNS_QUERY_SLOTS],
    /// Nameservers of the answers received and not yet read (family 0: an
    /// answer that matched no query).
    pub answers: [DnsPeer; DNS_ANSWER_SLOTS],
    /// Next slot of `queries` to use.
    pub next_query: u32,
    /// Answers queued in `answers` so far (its tail).
    pub answers_in: u32,
    /// Answers taken from `answers` so far (its head).
    pub answers_out: u32,
    /// The pod's [`Config::dns_port`] when the socket's state was made:
    /// answers come from there.
    pub dns_port: u16,
    /// Padding, zero.
    pub reserved: u16,
    /// For a captured `connect()`: the local address to show where the
    /// socket could not be bound to the pod's (as [`Conn::shown_src`]).
    pub shown_src: [u32; 4],
}

/// Key of the tuple map: one TCP connection, from the client's side.
///
/// The client's socket writes it (local = client, remote = proxy listener) and
/// the proxy's accepted socket reads it (its remote = client, local =
/// listener). The network namespace cookie keeps keys of different pods
/// apart when one map serves many.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TupleKey {
    /// `bpf_get_netns_cookie` of the connection's network namespace.
    pub netns: u64,
    /// Client address, network order (IPv4 in word 0).
    pub client_ip: [u32; 4],
    /// Proxy listener address, network order.
    pub proxy_ip: [u32; 4],
    /// Client port, host order.
    pub client_port: u16,
    /// Proxy listener port, host order.
    pub proxy_port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
}

/// Key of the service map: one `ip:port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceKey {
    /// Address, network-order words; IPv4 in word 0, the rest zero.
    pub ip: [u32; 4],
    /// Port, host order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
}

/// Key of [`map_names::PORTS`]: one port of one policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PortKey {
    /// [`Config::policy`].
    pub policy: u64,
    /// Port, host order.
    pub port: u16,
    /// Zero.
    pub reserved: [u16; 3],
}

/// Key of the id and IPv4 address sets ([`map_names::PROXY_UIDS`],
/// `PROXY_GIDS`, `OWNER_GROUPS`, `LOCAL_V4`): one id of one policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct IdKey {
    /// [`Config::policy`].
    pub policy: u64,
    /// The UID or GID, or the IPv4 address (network order).
    pub id: u32,
    /// Zero.
    pub reserved: u32,
}

/// Key of [`map_names::LOCAL_V6`]: one IPv6 address of one policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Ip6Key {
    /// [`Config::policy`].
    pub policy: u64,
    /// Address, network-order words.
    pub ip: [u32; 4],
}

/// Key of [`map_names::SERVICES`]: one service of one policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyServiceKey {
    /// [`Config::policy`].
    pub policy: u64,
    /// The service.
    pub service: ServiceKey,
    /// Zero.
    pub reserved: u32,
}

/// Key of [`map_names::POD_ADDRS`]: an address a pod owns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AddrKey {
    /// Address, network-order words; IPv4 in word 0, the rest zero.
    pub ip: [u32; 4],
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
    /// Zero.
    pub reserved: u32,
}

/// Key of [`map_names::INBOUND_LISTENER`]: one listener slot of one pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ListenerKey {
    /// The pod's network namespace cookie.
    pub netns: u64,
    /// [`LISTENER_V4`] or [`LISTENER_V6`].
    pub slot: u32,
    /// Zero.
    pub reserved: u32,
}

/// Key bytes of the IPv4 CIDR tries: the policy id (big-endian), then the
/// address; its prefix length is 64 plus the CIDR's.
pub type Cidr4Key = [u8; 12];
/// Key bytes of the IPv6 CIDR tries, likewise.
pub type Cidr6Key = [u8; 24];

/// The trie key bytes of `addr` (network order) under policy `policy`.
#[inline(always)]
pub fn cidr_key<const A: usize, const K: usize>(policy: u64, addr: [u8; A]) -> [u8; K] {
    let mut k = [0u8; K];
    let p = policy.to_be_bytes();
    let mut i = 0;
    while i < 8 {
        k[i] = p[i];
        i += 1;
    }
    let mut j = 0;
    while j < A && 8 + j < K {
        k[8 + j] = addr[j];
        j += 1;
    }
    k
}

/// Bits of the policy id before the address in a CIDR trie key.
pub const CIDR_KEY_POLICY_BITS: u32 = 64;

/// Indices of the counter array beyond the per-rule ones.
///
/// Counters `0 .. Rule::COUNT` count decisions by [`crate::policy::Rule`];
/// these follow.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `bpf_bind` to the pod's source address failed; the connection was still
    /// redirected, and the application and the proxy are shown the pod's
    /// address.
    BindFailed = crate::policy::Rule::COUNT,
    /// A captured `connect()` was refused (`EPERM`) because `CONNS` holds
    /// `--max-connections` connections already, as iptables drops packets
    /// when conntrack is full: never let through uncaptured, never without
    /// its destination.
    CapacityFull,
    /// The proxy's copy of the original destination could not be allocated
    /// (the kernel is out of memory): that proxy socket gets `ENOENT`.
    StorageFailed,
    /// `SO_ORIGINAL_DST` answered.
    OrigDstServed,
    /// `SO_ORIGINAL_DST` asked on a socket with no recorded destination.
    OrigDstMissing,
    /// Connections whose proxy side took its copy of the destination.
    HandoverTaken,
    /// Connections the application released before they were established
    /// (refused, unreachable, abandoned in `SYN-SENT`): no proxy socket
    /// ever existed for them.
    HandoverDropped,
    /// Established connections the application released before the proxy's
    /// side of the handshake was processed: kept until it is, or until the
    /// 4-tuple is used again.
    OrphanKept,
    /// Kept connections whose proxy side never came, removed when a new
    /// connection took their 4-tuple.
    OrphanReclaimed,
    /// `TUPLES` refused an entry (cannot happen while it is as large as
    /// `CONNS`): that connection's proxy side gets `ENOENT`.
    TupleFailed,
    /// The proxy's inbound listener was (re)registered.
    ListenerSet,
    /// A captured inbound connection found no proxy listener: refused, as a
    /// REDIRECT to a closed port is.
    InboundNoListener,
    /// An inbound connection in a registered pod's namespace arrived for an
    /// address the pod did not have when it was registered: dropped (the
    /// pod's policy cannot be found from it), never let through uncaptured.
    /// Registering the pod again (`pod add --replace`) learns its addresses.
    InboundUnknownAddr,
    /// A captured DNS query over UDP left with its id noted (rule 5).
    DnsQueryNoted,
    /// A DNS answer was shown coming from the nameserver its query went to.
    DnsAnswerShown,
    /// An answer from the DNS proxy matched no noted query (the socket sent
    /// it there itself, or more than [`super::DNS_QUERY_SLOTS`] queries were
    /// in flight): shown as it came.
    DnsAnswerUnmatched,
}

impl Counter {
    /// Number of counter slots (rules plus the extra counters).
    pub const TOTAL: u32 = Counter::DnsAnswerUnmatched as u32 + 1;
    /// All extra counters, in index order.
    pub const ALL: [Counter; 16] = [
        Counter::BindFailed,
        Counter::CapacityFull,
        Counter::StorageFailed,
        Counter::OrigDstServed,
        Counter::OrigDstMissing,
        Counter::HandoverTaken,
        Counter::HandoverDropped,
        Counter::OrphanKept,
        Counter::OrphanReclaimed,
        Counter::TupleFailed,
        Counter::ListenerSet,
        Counter::InboundNoListener,
        Counter::InboundUnknownAddr,
        Counter::DnsQueryNoted,
        Counter::DnsAnswerShown,
        Counter::DnsAnswerUnmatched,
    ];

    /// Stable snake_case name, as `redirect status --json` prints it.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::BindFailed => "bind_failed",
            Counter::CapacityFull => "capacity_full",
            Counter::StorageFailed => "storage_failed",
            Counter::OrigDstServed => "orig_dst_served",
            Counter::OrigDstMissing => "orig_dst_missing",
            Counter::HandoverTaken => "handover_taken",
            Counter::HandoverDropped => "handover_dropped",
            Counter::OrphanKept => "orphan_kept",
            Counter::OrphanReclaimed => "orphan_reclaimed",
            Counter::TupleFailed => "tuple_failed",
            Counter::ListenerSet => "listener_set",
            Counter::InboundNoListener => "inbound_no_listener",
            Counter::InboundUnknownAddr => "inbound_unknown_addr",
            Counter::DnsQueryNoted => "dns_query_noted",
            Counter::DnsAnswerShown => "dns_answer_shown",
            Counter::DnsAnswerUnmatched => "dns_answer_unmatched",
        }
    }
}

// SAFETY: plain `#[repr(C)]` data without padding (checked by the bytemuck
// derives above), valid for any bit pattern.
#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::TupleKey {}
    unsafe impl aya::Pod for super::Conn {}
    unsafe impl aya::Pod for super::ProxySide {}
    unsafe impl aya::Pod for super::DnsSocket {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::IdKey {}
    unsafe impl aya::Pod for super::Ip6Key {}
    unsafe impl aya::Pod for super::PolicyServiceKey {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::ListenerKey {}
}

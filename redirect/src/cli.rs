//! Command-line interface. Policy flags keep istio-iptables' short names so
//! `redirect apply` can stand in for `istio-iptables` in an init container;
//! each also has a readable long name, and istio-iptables' own long name as
//! an alias. [`crate::istio`] holds the rest of istio-iptables' flags.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    layout::default_pin_dir,
    policy::{
        DnsCapture, OwnerGroups, PolicyError, PolicySpec, parse_cidrs, parse_dns_servers,
        parse_ids, parse_inbound_ports, parse_include, parse_interfaces, parse_mark, parse_port,
        parse_ports, parse_services, resolv_conf_servers, resolve_proxy_cgroup,
    },
};

/// Service-mesh traffic redirection with eBPF instead of iptables.
#[derive(Debug, Parser)]
#[command(
    name = "redirect",
    version,
    about,
    long_about = None,
    after_help = "Called as istio-iptables (a symlink or copy), or as `redirect istio-iptables \
                  ARGS` (pilot-agent's form, what Istio's injector writes), it takes \
                  istio-iptables' command line and environment. Called as redirect-cni, it is \
                  a chained CNI plugin."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate, load, attach to a cgroup, pin, and exit. Re-running replaces
    /// the previous policy with no gap.
    Apply(Box<ApplyArgs>),
    /// Detach and unpin everything applied at a pin dir.
    Remove(RemoveArgs),
    /// Show what is attached, the policy in force and the counters.
    Status(StatusArgs),
    /// Say what redirect does with one TCP connection (redirect to which
    /// port, or pass) and which rule decided, with the kernel's decision
    /// code.
    Explain(Box<ExplainArgs>),
    /// Print the nat table istio-iptables would install for the same policy
    /// flags, as iptables-restore input.
    Iptables(Box<IptablesArgs>),
    /// Node mode: the programs loaded and attached once for the node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Node mode: register, replace, remove and list pods (each a network
    /// namespace with its own policy).
    #[command(subcommand)]
    Pod(PodCommand),
    /// Node agent: put the redirect-cni plugin into the node's CNI
    /// configuration (and node mode in place), or take it out.
    #[command(subcommand)]
    Cni(CniCommand),
    /// Remove what dead pods left: node-mode pods whose network namespace is
    /// gone, and one-shot pin dirs (under /sys/fs/bpf/redirect) whose cgroup
    /// and namespace are gone.
    Gc(GcArgs),
}

/// `cni` subcommands.
#[derive(Debug, Subcommand)]
pub enum CniCommand {
    /// Copy this binary to the CNI bin dir as redirect-cni and append the
    /// plugin to the runtime's conflist (the first configuration file of
    /// the conf dir); with --cgroup, install node mode first.
    Install(CniInstallArgs),
    /// Take the plugin out of every conflist and remove its binary; with
    /// --node, uninstall node mode too.
    Uninstall(CniUninstallArgs),
}

/// Where the node's CNI files are.
#[derive(Debug, Args, Clone)]
pub struct CniDirs {
    /// The CNI bin dir (the host's /opt/cni/bin, mounted into the
    /// installer's container).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The CNI configuration dir (the host's /etc/cni/net.d).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The node install the plugin registers pods with.
    #[arg(long, default_value = crate::node::DEFAULT_NODE_PIN_DIR)]
    pub node_pin_dir: PathBuf,
}

/// `cni install` arguments.
#[derive(Debug, Args)]
pub struct CniInstallArgs {
    /// The files.
    #[command(flatten)]
    pub dirs: CniDirs,
    /// Install node mode on this cgroup first (the parent cgroup of every
    /// pod, e.g. the kubepods cgroup), as `node install --cgroup` does.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Kubernetes namespaces whose pods are never registered
    /// (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "kube-system")]
    pub exclude_namespaces: Vec<String>,
    /// Stay running (a DaemonSet's container): wait for the pod network's
    /// configuration to appear, put the plugin back when the file is
    /// rewritten without it, and on SIGTERM or SIGINT take the plugin out
    /// again (node mode stays: pods keep their capture across an upgrade).
    #[arg(long)]
    pub wait: bool,
}

/// `cni uninstall` arguments.
#[derive(Debug, Args)]
pub struct CniUninstallArgs {
    /// The files.
    #[command(flatten)]
    pub dirs: CniDirs,
    /// Uninstall node mode too (every pod loses its capture).
    #[arg(long)]
    pub node: bool,
}

/// `node` subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Load the programs and attach them to a cgroup every pod is below
    /// (the kubepods cgroup, or the cgroup v2 root). Running it again, or
    /// with a new binary, replaces the programs with no gap and keeps every
    /// pod and open connection.
    Install(NodeInstallArgs),
    /// Detach and remove the node install and every pod registered in it.
    Uninstall(NodePinArgs),
    /// Show the node install: cgroup, pods, connections, counters.
    Status(NodeStatusArgs),
}

/// The node pin dir.
#[derive(Debug, Args)]
pub struct NodePinArgs {
    /// bpffs directory of the node install.
    #[arg(long, default_value = crate::node::DEFAULT_NODE_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Seconds to wait for another node or pod operation.
    #[arg(long, value_name = "SECONDS", default_value = "120")]
    pub lock_timeout: u64,
}

/// `node install` arguments.
#[derive(Debug, Args)]
pub struct NodeInstallArgs {
    /// The cgroup v2 directory every pod's processes are below.
    #[arg(long)]
    pub cgroup: PathBuf,
    /// Where to pin.
    #[command(flatten)]
    pub node: NodePinArgs,
    /// Captured outbound connections open at once on the node (default
    /// 131072; set at the first install).
    #[arg(long, value_name = "N")]
    pub max_connections: Option<u32>,
    /// Pods the node's policy maps are sized for (default 1024; set at the
    /// first install).
    #[arg(long, value_name = "N")]
    pub max_pods: Option<u32>,
}

/// `node status` arguments.
#[derive(Debug, Args)]
pub struct NodeStatusArgs {
    /// bpffs directory of the node install.
    #[arg(long, default_value = crate::node::DEFAULT_NODE_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `pod` subcommands.
#[derive(Debug, Subcommand)]
pub enum PodCommand {
    /// Register a pod (its network namespace) with its policy: every policy
    /// flag `apply` takes.
    Add(Box<PodAddArgs>),
    /// Unregister a pod.
    Remove(PodRemoveArgs),
    /// List the registered pods and their policies.
    List(NodeStatusArgs),
}

/// `pod add` arguments.
#[derive(Debug, Args)]
pub struct PodAddArgs {
    /// The pod's network namespace file (/proc/PID/ns/net, /run/netns/NAME,
    /// the path a CNI plugin is given).
    #[arg(long)]
    pub netns: PathBuf,
    /// Replace the policy of a pod already registered (atomically: each
    /// connection is decided by the old policy or the new one).
    #[arg(long)]
    pub replace: bool,
    /// As for `apply`.
    #[arg(long)]
    pub allow_no_proxy_exemption: bool,
    /// Check every input and print the entries that would be written;
    /// change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: print JSON.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// The node install.
    #[command(flatten)]
    pub node: NodePinArgs,
    /// The policy.
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// `pod remove` arguments.
#[derive(Debug, Args)]
pub struct PodRemoveArgs {
    /// The pod's network namespace file.
    #[arg(long, required_unless_present = "cookie")]
    pub netns: Option<PathBuf>,
    /// The pod's network namespace cookie (as `pod list` shows it), for a
    /// pod whose namespace is gone.
    #[arg(long, conflicts_with = "netns")]
    pub cookie: Option<u64>,
    /// The node install.
    #[command(flatten)]
    pub node: NodePinArgs,
}

/// `gc` arguments.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// The node install.
    #[command(flatten)]
    pub node: NodePinArgs,
    /// Where one-shot applies made their default pin dirs.
    #[arg(long, default_value = crate::layout::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
}

/// `apply --pin-dir`.
#[derive(Debug, Args)]
pub struct PinDirArgs {
    /// bpffs directory holding the pinned programs, links and maps, one per
    /// pod [default: /sys/fs/bpf/redirect/cgroup-<id of --cgroup>].
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
}

impl PinDirArgs {
    /// The pin dir given, or the default one of the pod in `cgroup`.
    pub fn resolve(&self, cgroup: &std::path::Path) -> anyhow::Result<PathBuf> {
        match &self.pin_dir {
            Some(p) => Ok(p.clone()),
            None => default_pin_dir(cgroup),
        }
    }
}

/// Which pod `status` and `remove` are about: its pin dir, or its cgroup
/// (whose default pin dir `apply` used).
#[derive(Debug, Args)]
pub struct WhichPod {
    /// The pin dir given to `apply --pin-dir`.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// The pod's cgroup v2 directory, when `apply` ran without --pin-dir
    /// (its pin dir is /sys/fs/bpf/redirect/cgroup-<cgroup id>).
    #[arg(long, conflicts_with = "pin_dir")]
    pub cgroup: Option<PathBuf>,
}

impl WhichPod {
    /// The pin dir: `--pin-dir`, or the default one of `--cgroup`.
    pub fn resolve(&self) -> anyhow::Result<PathBuf> {
        match (&self.pin_dir, &self.cgroup) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(cg)) => default_pin_dir(cg).map_err(|e| {
                e.context(
                    "finding the pin dir from --cgroup (if the cgroup is gone, give --pin-dir: \
                     /sys/fs/bpf/redirect/cgroup-<id it had>)",
                )
            }),
            (None, None) => anyhow::bail!(
                "which pod? Give --cgroup DIR (the pod's cgroup, when apply ran without \
                 --pin-dir) or --pin-dir DIR (the pin dir given to apply)"
            ),
        }
    }
}

/// `remove` arguments.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// Which pod.
    #[command(flatten)]
    pub pod: WhichPod,
    /// Seconds to wait for an apply or remove already running on the same
    /// pin dir.
    #[arg(long, value_name = "SECONDS", default_value = "120")]
    pub lock_timeout: u64,
}

/// `status` arguments.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Which pod.
    #[command(flatten)]
    pub pod: WhichPod,
    /// Show the node install at this pin dir and its pods instead (no
    /// value: /sys/fs/bpf/redirect/node). Without --pin-dir or --cgroup,
    /// status shows the node install at that default when there is one.
    #[arg(long, value_name = "PIN_DIR", num_args = 0..=1,
          default_missing_value = crate::node::DEFAULT_NODE_PIN_DIR,
          conflicts_with_all = ["pin_dir", "cgroup"])]
    pub node: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `apply` arguments.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The pod's cgroup v2 directory; programs attach there and apply to
    /// every process below it. `auto`: the parent of this process's own
    /// cgroup (an init container's pod), found in a cgroup v2 mount that
    /// shows it (with a cgroup namespace of its own, the host's tree must be
    /// mounted in the container); `./auto` for a directory named auto.
    #[arg(long)]
    pub cgroup: PathBuf,
    /// The pod's network namespace file (e.g. /proc/PID/ns/net or
    /// /run/netns/NAME); default: the loader's own.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Where to pin.
    #[command(flatten)]
    pub pin: PinDirArgs,
    /// Check every input and print what would be attached and written to
    /// the maps; load, attach, pin and mount nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// With --dry-run: print JSON.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// Captured outbound connections open at once (default 131072, set when
    /// the pin dir is first applied). Beyond it, a captured connect() fails
    /// with EPERM. Memory follows use: about 270 bytes per open connection
    /// in the maps (and 290 on the proxy's socket), plus 32 bytes per slot
    /// for the hash buckets
    #[arg(long, value_name = "N")]
    pub max_connections: Option<u32>,
    /// Apply even though outbound traffic is captured and nothing (no proxy
    /// UID, GID, mark or cgroup) exempts the proxy's own connections, which
    /// then loop back to the proxy.
    #[arg(long)]
    pub allow_no_proxy_exemption: bool,
    /// Seconds to wait for an apply or remove already running on the same
    /// pin dir.
    #[arg(long, value_name = "SECONDS", default_value = "120")]
    pub lock_timeout: u64,
    /// The policy.
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// istio-iptables' other flags (interception mode, validation, flags
    /// with no meaning without iptables...).
    #[command(flatten, next_help_heading = "istio-iptables' other flags")]
    pub istio: crate::istio::IstioArgs,
}

/// The ids of every [`PolicyArgs`] argument (its field names), which
/// `explain --pin-dir` excludes. A unit test keeps the list complete.
pub const POLICY_ARG_IDS: [&str; 23] = [
    "proxy_port",
    "inbound_capture_port",
    "tunnel_port",
    "proxy_uid",
    "proxy_gid",
    "include_cidrs",
    "exclude_cidrs",
    "exclude_cidrs_file",
    "include_ports",
    "exclude_ports",
    "inbound_ports",
    "exclude_inbound_ports",
    "exclude_interfaces",
    "proxy_mark",
    "proxy_cgroup",
    "owner_groups_include",
    "owner_groups_exclude",
    "service",
    "services_file",
    "redirect_dns",
    "capture_all_dns",
    "dns_servers",
    "resolv_conf",
];

/// `explain --direction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DirectionArg {
    /// A connect() from inside the pod.
    Out,
    /// A connection arriving at the pod.
    In,
}

/// `explain` arguments.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Take the policy in force at this pin dir (read back from the pinned
    /// maps, with the pod addresses recorded there) instead of policy flags.
    #[arg(long, conflicts_with_all = POLICY_ARG_IDS)]
    pub pin_dir: Option<PathBuf>,
    /// Take the policy in force for the pod registered (node mode) for
    /// --netns, read back from the node's maps, instead of policy flags.
    #[arg(long, requires = "netns", conflicts_with_all = POLICY_ARG_IDS, conflicts_with = "pin_dir")]
    pub registered: bool,
    /// With --registered: the node install.
    #[arg(long, default_value = crate::node::DEFAULT_NODE_PIN_DIR)]
    pub node_pin_dir: PathBuf,
    /// Outbound (a connect() from the pod) or inbound (arriving at the pod).
    #[arg(long, value_enum, default_value = "out")]
    pub direction: DirectionArg,
    /// Outbound: UID of the task calling connect() [default: 0].
    #[arg(long)]
    pub uid: Option<u32>,
    /// Outbound: its GID [default: 0].
    #[arg(long)]
    pub gid: Option<u32>,
    /// Outbound: the socket's mark (SO_MARK), decimal or 0x hex [default: 0].
    #[arg(long, value_parser = parse_mark_arg)]
    pub mark: Option<u32>,
    /// Outbound: the cgroup v2 directory of the task calling connect()
    /// (matters with --proxy-cgroup) [default: outside the proxy's cgroup].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Outbound: the address the socket was bound to before connect(), if
    /// any. Inbound: the peer's address (required).
    #[arg(long)]
    pub src: Option<IpAddr>,
    /// The destination asked for, IP:PORT.
    #[arg(long)]
    pub dst: SocketAddr,
    /// A UDP datagram (a DNS query) rather than a TCP connect; outbound
    /// only. Only DNS capture (--redirect-dns) ever takes UDP.
    #[arg(long)]
    pub udp: bool,
    /// Inbound: the interface the connection arrives on, by name (as
    /// --netns has it) or ifindex; matters with --exclude-interfaces.
    #[arg(long = "in-interface")]
    pub in_interface: Option<String>,
    /// An address the pod's network namespace owns (repeatable or
    /// comma-separated). Default: none besides 127.0.0.0/8, or with
    /// --pin-dir the addresses recorded there.
    #[arg(long = "local-addr", value_delimiter = ',')]
    pub local_addr: Vec<IpAddr>,
    /// Read the pod's addresses from this network namespace file instead.
    #[arg(long, conflicts_with = "local_addr")]
    pub netns: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The policy.
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// `explain --mark`: decimal or `0x` hex, 0 for none.
fn parse_mark_arg(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse::<u32>(),
    };
    parsed.map_err(|_| "not a mark (a number, decimal or 0x hex)".to_string())
}

/// `iptables --family`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FamilyArg {
    /// IPv4 only (input for iptables-restore).
    #[value(name = "4")]
    V4,
    /// IPv6 only (input for ip6tables-restore).
    #[value(name = "6")]
    V6,
    /// IPv4 then IPv6, each after a comment naming its tool.
    Both,
}

/// `iptables` arguments.
#[derive(Debug, Args)]
pub struct IptablesArgs {
    /// Which rule set.
    #[arg(long, value_enum, default_value = "both")]
    pub family: FamilyArg,
    /// istio-iptables' `-k`: virtual interfaces (a VM in the pod) whose
    /// traffic goes to the outbound proxy port. Rendered only: `apply`
    /// refuses it, as it needs NAT.
    #[arg(short = 'k', long = "kube-virt-interfaces", default_value = "")]
    pub kube_virt_interfaces: String,
    /// The policy.
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// The policy flags (istio-iptables compatible).
#[derive(Debug, Args, Clone)]
pub struct PolicyArgs {
    /// Port captured outbound TCP goes to.
    #[arg(
        short = 'p',
        long = "proxy-port",
        visible_alias = "envoy-port",
        default_value = "15001"
    )]
    pub proxy_port: String,
    /// Port captured inbound TCP goes to, and where the proxy's calls to its
    /// own pod go (rule 3a).
    #[arg(short = 'z', long = "inbound-capture-port", default_value = "15006")]
    pub inbound_capture_port: String,
    /// The proxy's tunnel port, never captured.
    #[arg(
        short = 'e',
        long = "tunnel-port",
        visible_alias = "inbound-tunnel-port",
        default_value = "15008"
    )]
    pub tunnel_port: String,
    /// Proxy UIDs (comma-separated): their traffic is never captured.
    #[arg(short = 'u', long = "proxy-uid", default_value = "1337")]
    pub proxy_uid: String,
    /// Proxy GIDs (comma-separated).
    #[arg(short = 'g', long = "proxy-gid", default_value = "1337")]
    pub proxy_gid: String,
    /// Outbound CIDRs to capture: `*` for all, a list, or empty for none.
    #[arg(
        short = 'i',
        long = "include-cidrs",
        visible_alias = "istio-service-cidr",
        default_value = ""
    )]
    pub include_cidrs: String,
    /// Outbound CIDRs never captured.
    #[arg(
        short = 'x',
        long = "exclude-cidrs",
        visible_alias = "istio-service-exclude-cidr",
        default_value = ""
    )]
    pub exclude_cidrs: String,
    /// A file of further exclude CIDRs, one per line (`#` comments allowed),
    /// for lists too long for a command line.
    #[arg(long = "exclude-cidrs-file")]
    pub exclude_cidrs_file: Option<PathBuf>,
    /// Outbound destination ports always captured.
    #[arg(
        short = 'q',
        long = "include-ports",
        visible_alias = "istio-outbound-ports",
        default_value = ""
    )]
    pub include_ports: String,
    /// Outbound destination ports never captured.
    #[arg(
        short = 'o',
        long = "exclude-ports",
        visible_alias = "istio-local-outbound-ports-exclude",
        default_value = ""
    )]
    pub exclude_ports: String,
    /// Inbound ports to capture: `*` for all (minus `-d`), a list, or empty
    /// for none.
    #[arg(
        short = 'b',
        long = "inbound-ports",
        visible_alias = "istio-inbound-ports",
        default_value = ""
    )]
    pub inbound_ports: String,
    /// Inbound ports never captured when `-b '*'` (ssh, the proxy's health
    /// and metrics ports...).
    #[arg(
        short = 'd',
        long = "exclude-inbound-ports",
        visible_alias = "istio-local-exclude-ports",
        default_value = ""
    )]
    pub exclude_inbound_ports: String,
    /// Interfaces (comma-separated names) whose traffic is never captured:
    /// inbound connections arriving on them, and outbound ones whose route
    /// (as it was at apply time) leaves through them.
    #[arg(
        short = 'c',
        long = "exclude-interfaces",
        visible_alias = "istio-exclude-interfaces",
        default_value = ""
    )]
    pub exclude_interfaces: String,
    /// Sockets carrying this mark (SO_MARK, e.g. 0x1) are the proxy's and
    /// never captured. Setting a mark needs CAP_NET_ADMIN in the proxy.
    #[arg(long = "proxy-mark")]
    pub proxy_mark: Option<String>,
    /// Every process in this cgroup v2 directory (or below) is the proxy's,
    /// whatever its UID. The proxy needs no privilege: the loader places it.
    #[arg(long = "proxy-cgroup")]
    pub proxy_cgroup: Option<PathBuf>,
    /// Owner-group filter: capture only traffic of these GIDs
    /// (comma-separated, numeric).
    #[arg(long = "owner-groups-include", default_value = "")]
    pub owner_groups_include: String,
    /// Owner-group filter: capture traffic of every GID except these.
    #[arg(long = "owner-groups-exclude", default_value = "")]
    pub owner_groups_exclude: String,
    /// Explicit services to capture, IP:PORT ([IPv6]:PORT), repeatable or
    /// comma-separated: one map entry each, any number at the same cost.
    #[arg(long = "service")]
    pub service: Vec<String>,
    /// A file of further services, one IP:PORT per line (`#` comments).
    #[arg(long = "services-file")]
    pub services_file: Option<PathBuf>,
    /// DNS capture (istio's rule 5): TCP and UDP to port 53 of the pod's
    /// nameservers go to the DNS proxy on 15053 (istio-agent's), except the
    /// proxy's own.
    #[arg(long = "redirect-dns", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false",
          value_parser = crate::istio::parse_go_bool)]
    pub redirect_dns: bool,
    /// With --redirect-dns: DNS to any address, not only to the
    /// nameservers.
    #[arg(long = "capture-all-dns", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false",
          value_parser = crate::istio::parse_go_bool)]
    pub capture_all_dns: bool,
    /// With --redirect-dns: the nameservers (comma-separated) [default:
    /// those of --resolv-conf].
    #[arg(long = "dns-servers")]
    pub dns_servers: Option<String>,
    /// The resolv.conf whose nameservers --redirect-dns takes (the pod's:
    /// in an init container, its own).
    #[arg(long = "resolv-conf", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
}

/// A policy flag problem, or an unreadable CIDR file.
#[derive(Debug, thiserror::Error)]
pub enum PolicyArgsError {
    /// A bad value.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A list file cannot be read.
    #[error("{flag} {path}: {source}")]
    File {
        /// The flag.
        flag: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A list file is not a list: too large, a line too long, not text.
    #[error("{flag} {path}: {why}")]
    BadFile {
        /// The flag.
        flag: &'static str,
        /// The file.
        path: String,
        /// What is wrong, and the limit.
        why: String,
    },
}

/// Most bytes a list file (`--exclude-cidrs-file`, `--services-file`) may
/// hold: a million IPv6 CIDRs with comments fit.
pub const MAX_LIST_FILE_BYTES: u64 = 64 << 20;
/// Longest line of a list file.
pub const MAX_LIST_LINE_BYTES: usize = 4096;

/// A list file (one entry per line, `#` comments, blank lines ignored) as
/// the comma-separated list the flag parsers take. Reads at most
/// [`MAX_LIST_FILE_BYTES`], in lines of at most [`MAX_LIST_LINE_BYTES`], so
/// a wrong file (`/dev/zero`, a disk image) is refused at once.
fn read_list_file(flag: &'static str, path: &std::path::Path) -> Result<String, PolicyArgsError> {
    let file = std::fs::File::open(path).map_err(|source| PolicyArgsError::File {
        flag,
        path: path.display().to_string(),
        source,
    })?;
    read_list(
        flag,
        path,
        std::io::BufReader::new(file),
        MAX_LIST_FILE_BYTES,
        MAX_LIST_LINE_BYTES,
    )
}

/// [`read_list_file`] on any reader, with the limits given.
fn read_list(
    flag: &'static str,
    path: &std::path::Path,
    mut reader: impl std::io::BufRead,
    max_bytes: u64,
    max_line: usize,
) -> Result<String, PolicyArgsError> {
    use std::io::{BufRead as _, Read as _};
    let bad = |why: String| PolicyArgsError::BadFile {
        flag,
        path: path.display().to_string(),
        why,
    };
    let mut entries: Vec<String> = Vec::new();
    let (mut total, mut number) = (0u64, 0usize);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(max_line as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|source| PolicyArgsError::File {
                flag,
                path: path.display().to_string(),
                source,
            })?;
        if n == 0 {
            break;
        }
        number += 1;
        total += n as u64;
        if total > max_bytes {
            return Err(bad(format!(
                "more than {} MiB, the most a list file may hold",
                max_bytes >> 20
            )));
        }
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        if body.len() > max_line {
            return Err(bad(format!(
                "line {number} is longer than {max_line} bytes, the longest line a list file \
                 may have"
            )));
        }
        let text = std::str::from_utf8(body)
            .map_err(|_| bad(format!("line {number} is not UTF-8 text")))?;
        let entry = text.split('#').next().unwrap_or("").trim();
        if !entry.is_empty() {
            entries.push(entry.to_string());
        }
    }
    Ok(entries.join(","))
}

impl PolicyArgs {
    /// Validates every flag and builds the policy.
    pub fn to_spec(&self) -> Result<PolicySpec, PolicyArgsError> {
        let mut exclude_cidrs = parse_cidrs("--exclude-cidrs", &self.exclude_cidrs)?;
        if let Some(path) = &self.exclude_cidrs_file {
            let list = read_list_file("--exclude-cidrs-file", path)?;
            exclude_cidrs.extend(parse_cidrs("--exclude-cidrs-file", &list)?);
            exclude_cidrs.sort();
            exclude_cidrs.dedup();
        }
        Ok(PolicySpec {
            proxy_port: parse_port("--proxy-port", &self.proxy_port)?,
            inbound_port: parse_port("--inbound-capture-port", &self.inbound_capture_port)?,
            tunnel_port: parse_port("--tunnel-port", &self.tunnel_port)?,
            proxy_uids: parse_ids("--proxy-uid", &self.proxy_uid)?,
            proxy_gids: parse_ids("--proxy-gid", &self.proxy_gid)?,
            include_cidrs: parse_include("--include-cidrs", &self.include_cidrs)?,
            exclude_cidrs,
            include_ports: parse_ports("--include-ports", &self.include_ports)?,
            exclude_ports: parse_ports("--exclude-ports", &self.exclude_ports)?,
            inbound_ports: parse_inbound_ports("--inbound-ports", &self.inbound_ports)?,
            exclude_inbound_ports: parse_ports(
                "--exclude-inbound-ports",
                &self.exclude_inbound_ports,
            )?,
            proxy_mark: self
                .proxy_mark
                .as_deref()
                .map(|m| parse_mark("--proxy-mark", m))
                .transpose()?,
            proxy_cgroup: self
                .proxy_cgroup
                .as_deref()
                .map(|p| resolve_proxy_cgroup("--proxy-cgroup", p))
                .transpose()?,
            owner_groups: self.owner_groups()?,
            services: self.services()?,
            dns: self.dns()?,
            exclude_interfaces: parse_interfaces("--exclude-interfaces", &self.exclude_interfaces)?,
        })
    }

    fn dns(&self) -> Result<Option<DnsCapture>, PolicyArgsError> {
        if !self.redirect_dns {
            return Ok(None);
        }
        let servers = match &self.dns_servers {
            Some(list) => parse_dns_servers("--dns-servers", list)?,
            None => {
                let text = std::fs::read_to_string(&self.resolv_conf).map_err(|source| {
                    PolicyArgsError::File {
                        flag: "--resolv-conf",
                        path: self.resolv_conf.display().to_string(),
                        source,
                    }
                })?;
                let servers = resolv_conf_servers(&text);
                if servers.len() > crate::policy::MAX_DNS_SERVERS {
                    return Err(PolicyError::TooMany {
                        flag: "--resolv-conf",
                        count: servers.len(),
                        max: crate::policy::MAX_DNS_SERVERS,
                    }
                    .into());
                }
                servers
            }
        };
        Ok(Some(DnsCapture {
            capture_all: self.capture_all_dns,
            servers,
        }))
    }

    fn owner_groups(&self) -> Result<OwnerGroups, PolicyArgsError> {
        let include = parse_ids("--owner-groups-include", &self.owner_groups_include)?;
        let exclude = parse_ids("--owner-groups-exclude", &self.owner_groups_exclude)?;
        Ok(match (include.is_empty(), exclude.is_empty()) {
            (true, true) => OwnerGroups::All,
            (false, true) => OwnerGroups::Include(include),
            (true, false) => OwnerGroups::Exclude(exclude),
            (false, false) => {
                return Err(PolicyError::Conflict {
                    a: "--owner-groups-include",
                    b: "--owner-groups-exclude",
                }
                .into());
            }
        })
    }

    fn services(&self) -> Result<Vec<std::net::SocketAddr>, PolicyArgsError> {
        let mut all = parse_services("--service", &self.service.join(","))?;
        if let Some(path) = &self.services_file {
            let list = read_list_file("--services-file", path)?;
            all.extend(parse_services("--services-file", &list)?);
            all.sort();
            all.dedup();
        }
        if all.len() > crate::policy::MAX_SERVICES {
            return Err(PolicyError::TooMany {
                flag: "--service",
                count: all.len(),
                max: crate::policy::MAX_SERVICES,
            }
            .into());
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Include;

    fn parse(args: &[&str]) -> Result<PolicySpec, String> {
        let mut full = vec!["redirect", "apply", "--cgroup", "/x"];
        full.extend_from_slice(args);
        let cli = Cli::try_parse_from(full).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Apply(a) => a.policy.to_spec().map_err(|e| e.to_string()),
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_are_istio_defaults() {
        assert_eq!(parse(&[]).unwrap(), PolicySpec::default());
    }

    #[test]
    fn istio_init_style_invocation() {
        // As the istio sidecar injector passes them, empty values included.
        let spec = parse(&crate::istio::INJECTED_DEFAULT_ARGS);
        // The whole injected list, -m and the log level included, is taken.
        let with_mode = spec.unwrap();
        let spec = parse(&[
            "-p",
            "15001",
            "-z",
            "15006",
            "-u",
            "1337",
            "-i",
            "*",
            "-x",
            "",
            "-b",
            "*",
            "-d",
            "15090,15021,15020",
        ])
        .unwrap();
        assert_eq!(spec.inbound_ports, crate::policy::InboundPorts::All);
        assert_eq!(spec.exclude_inbound_ports, vec![15020, 15021, 15090]);
        assert_eq!(spec, with_mode);
        let spec = parse(&[
            "-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-x", "",
        ])
        .unwrap();
        assert_eq!(spec.include_cidrs, Include::All);
        assert!(spec.exclude_cidrs.is_empty());
    }

    #[test]
    fn short_and_long_names_agree() {
        let a = parse(&[
            "-i",
            "10.0.0.0/8",
            "-x",
            "10.1.0.0/16",
            "-q",
            "80",
            "-o",
            "22",
            "-g",
            "7",
        ]);
        let b = parse(&[
            "--include-cidrs",
            "10.0.0.0/8",
            "--istio-service-exclude-cidr",
            "10.1.0.0/16",
            "--include-ports",
            "80",
            "--istio-local-outbound-ports-exclude",
            "22",
            "--proxy-gid",
            "7",
        ]);
        assert_eq!(a.unwrap(), b.unwrap());
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = parse(&["-p", "70000"]).unwrap_err();
        assert!(e.contains("--proxy-port") && e.contains("70000"), "{e}");
        let e = parse(&["-p", "0"]).unwrap_err();
        assert!(e.contains("--proxy-port"), "{e}");
        let e = parse(&["-x", "10.0.0.0/40"]).unwrap_err();
        assert!(
            e.contains("--exclude-cidrs") && e.contains("10.0.0.0/40"),
            "{e}"
        );
        let e = parse(&["-i", "not-a-cidr"]).unwrap_err();
        assert!(e.contains("--include-cidrs"), "{e}");
        let e = parse(&["--bogus"]).unwrap_err();
        assert!(e.contains("--bogus"), "{e}");
    }

    #[test]
    fn dns_capture_flags() {
        assert_eq!(parse(&[]).unwrap().dns, None);
        // --capture-all-dns alone does nothing, as in istio-iptables.
        assert_eq!(parse(&["--capture-all-dns"]).unwrap().dns, None);
        let d = parse(&[
            "--redirect-dns",
            "--dns-servers",
            "10.96.0.10, fd00::a,10.96.0.10",
        ])
        .unwrap()
        .dns
        .unwrap();
        assert!(!d.capture_all);
        assert_eq!(
            d.servers,
            ["10.96.0.10", "fd00::a"].map(|a| a.parse::<std::net::IpAddr>().unwrap())
        );
        let dir = std::env::temp_dir().join(format!("rdt-resolv-{}", std::process::id()));
        std::fs::write(
            &dir,
            "search default.svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\noptions ndots:5\n",
        )
        .unwrap();
        let d = parse(&[
            "--redirect-dns=true",
            "--capture-all-dns",
            "--resolv-conf",
            dir.to_str().unwrap(),
        ])
        .unwrap()
        .dns
        .unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert!(d.capture_all);
        assert_eq!(
            d.servers,
            ["10.96.0.10", "fe80::1"].map(|a| a.parse::<std::net::IpAddr>().unwrap())
        );
        let e = parse(&["--redirect-dns", "--dns-servers", "10.96.0.0/12"]).unwrap_err();
        assert!(
            e.contains("--dns-servers") && e.contains("10.96.0.0/12"),
            "{e}"
        );
        let e = parse(&[
            "--redirect-dns",
            "--resolv-conf",
            "/nonexistent/resolv.conf",
        ])
        .unwrap_err();
        assert!(
            e.contains("--resolv-conf") && e.contains("/nonexistent"),
            "{e}"
        );
        let spec = parse(&["--redirect-dns", "--dns-servers", "10.96.0.10"]).unwrap();
        assert_eq!(spec.dns_server_keys().count(), 1);
    }

    #[test]
    fn pin_dir_excludes_every_policy_flag() {
        let cmd = PolicyArgs::augment_args(clap::Command::new("x"));
        let ids: Vec<&str> = cmd.get_arguments().map(|a| a.get_id().as_str()).collect();
        assert_eq!(
            ids, POLICY_ARG_IDS,
            "a new policy flag must be added to POLICY_ARG_IDS, or `explain --pin-dir` \
             silently ignores it"
        );
        let e = Cli::try_parse_from([
            "redirect",
            "explain",
            "--dst",
            "1.1.1.1:80",
            "--pin-dir",
            "/p",
            "-i",
            "*",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--pin-dir") && e.contains("--include-cidrs"),
            "{e}"
        );
        assert!(!e.contains("--proxy-port"), "{e}");
        // Defaults do not count as given.
        assert!(
            Cli::try_parse_from([
                "redirect",
                "explain",
                "--dst",
                "1.1.1.1:80",
                "--pin-dir",
                "/p"
            ])
            .is_ok()
        );
    }

    #[test]
    fn new_commands_parse() {
        let cli =
            Cli::try_parse_from(["redirect", "iptables", "--family", "6", "-q", "80"]).unwrap();
        let Command::Iptables(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.family, FamilyArg::V6);
        assert_eq!(a.policy.to_spec().unwrap().include_ports, vec![80]);
        let cli = Cli::try_parse_from(["redirect", "iptables"]).unwrap();
        let Command::Iptables(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.family, FamilyArg::Both);
        assert!(Cli::try_parse_from(["redirect", "iptables", "--family", "5"]).is_err());

        let cli = Cli::try_parse_from([
            "redirect",
            "explain",
            "--dst",
            "10.0.0.1:80",
            "--local-addr",
            "10.1.0.2,10.1.0.3",
            "--local-addr",
            "10.1.0.4",
        ])
        .unwrap();
        let Command::Explain(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.local_addr.len(), 3);
        assert_eq!(a.direction, DirectionArg::Out);
        let e = Cli::try_parse_from(["redirect", "explain", "--dst", "10.0.0.1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--dst") && e.contains("10.0.0.1"), "{e}");
        let e = Cli::try_parse_from(["redirect", "explain", "--dst", "1.1.1.1:1", "--uid", "x"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--uid") && e.contains("'x'"), "{e}");

        // --json on apply only with --dry-run.
        assert!(Cli::try_parse_from(["redirect", "apply", "--cgroup", "/x", "--json"]).is_err());
        let cli =
            Cli::try_parse_from(["redirect", "apply", "--cgroup", "/x", "--dry-run", "--json"])
                .unwrap();
        let Command::Apply(a) = cli.command else {
            panic!()
        };
        assert!(a.dry_run && a.json);
    }

    #[test]
    fn cidr_file() {
        let dir = std::env::temp_dir().join(format!("redirect-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cidrs");
        std::fs::write(&file, "# comment\n10.0.0.0/8\n\n192.168.1.0/24 # lab\n").unwrap();
        let spec = parse(&[
            "-x",
            "1.1.1.1",
            "--exclude-cidrs-file",
            file.to_str().unwrap(),
        ]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(spec.unwrap().exclude_cidrs.len(), 3);
        let e = parse(&["--exclude-cidrs-file", "/nonexistent/x"]).unwrap_err();
        assert!(e.contains("/nonexistent/x"), "{e}");
    }

    #[test]
    fn list_files_are_bounded() {
        // /dev/zero has no end and no newline: refused after one line.
        let t = std::time::Instant::now();
        for flag in ["--exclude-cidrs-file", "--services-file"] {
            let e = parse(&[flag, "/dev/zero"]).unwrap_err();
            assert!(
                e.contains(flag) && e.contains("/dev/zero") && e.contains("4096 bytes"),
                "{e}"
            );
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        let p = std::path::Path::new("list");
        let read = |text: &[u8], max: u64, line: usize| {
            read_list("--services-file", p, text, max, line).map_err(|e| e.to_string())
        };
        assert_eq!(read(b"a\n# c\n\n b # d\nc", 100, 10).unwrap(), "a,b,c");
        let e = read(b"10.0.0.0/8\n10.1.0.0/16\n", 20, 100).unwrap_err();
        assert!(
            e.contains("--services-file list") && e.contains("the most a list file"),
            "{e}"
        );
        // A line of exactly the limit is fine, one byte more is not.
        assert!(read(b"0123456789\n", 100, 10).is_ok());
        let e = read(b"ok\n0123456789a\n", 100, 10).unwrap_err();
        assert!(e.contains("line 2 is longer than 10 bytes"), "{e}");
        let e = read(b"\xff\n", 100, 10).unwrap_err();
        assert!(e.contains("line 1 is not UTF-8"), "{e}");
    }

    #[test]
    fn status_and_remove_need_a_pod() {
        for cmd in ["status", "remove"] {
            let cli = Cli::try_parse_from(["redirect", cmd]).unwrap();
            let pod = match cli.command {
                Command::Status(a) => a.pod,
                Command::Remove(a) => a.pod,
                _ => unreachable!(),
            };
            let e = pod.resolve().unwrap_err().to_string();
            assert!(e.contains("--cgroup") && e.contains("--pin-dir"), "{e}");
            let cli = Cli::try_parse_from(["redirect", cmd, "--pin-dir", "/p"]).unwrap();
            let pod = match cli.command {
                Command::Status(a) => a.pod,
                Command::Remove(a) => a.pod,
                _ => unreachable!(),
            };
            assert_eq!(pod.resolve().unwrap(), PathBuf::from("/p"));
            let e = Cli::try_parse_from(["redirect", cmd, "--pin-dir", "/p", "--cgroup", "/c"])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--cgroup") && e.contains("--pin-dir"), "{e}");
            let cli =
                Cli::try_parse_from(["redirect", cmd, "--cgroup", "/nonexistent/cg"]).unwrap();
            let pod = match cli.command {
                Command::Status(a) => a.pod,
                Command::Remove(a) => a.pod,
                _ => unreachable!(),
            };
            let e = format!("{:#}", pod.resolve().unwrap_err());
            assert!(e.contains("/nonexistent/cg"), "{e}");
        }
    }
}

//! istio-iptables' command line: the binary called `istio-iptables` (a
//! symlink or copy of `redirect`) takes what Istio's injector passes to the
//! `istio-init` and `istio-validation` containers, and `redirect apply`
//! takes the same flags.
//!
//! The policy flags are [`crate::cli::PolicyArgs`] (istio's short and long
//! names); [`IstioArgs`] holds the rest: the interception mode, the flags
//! that only mean something with iptables (accepted and logged as not
//! needed), validation, and the logging flags pilot-agent adds. Flags that
//! ask for something redirect does not do yet fail with a message naming
//! them.
//!
//! Called as `istio-iptables`, the environment is read as istio-iptables
//! 1.21 and later read it ([`env_args`]): each flag from its name upper-cased
//! with `-` as `_` (`ISTIO_SERVICE_CIDR` for `--istio-service-cidr`; not
//! `--envoy-port`), a few from a second name (`ISTIO_META_DNS_CAPTURE`,
//! `INVALID_DROP`, `ISTIO_DUAL_STACK`), which wins over the first; a flag on
//! the command line wins over both; a variable set to the empty string is
//! set (to "", or false). The owner-group filter is read from
//! `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]` only, as istio has no flag for it.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use clap::{Args, Parser};

use crate::cli::PolicyArgs;

/// `istio-iptables`: redirect standing in for Istio's istio-iptables (the
/// `istio-init` and `istio-validation` init containers).
///
/// With a node install (`redirect node install`), registers the network
/// namespace it runs in (or --network-namespace) with this policy;
/// without one, applies the policy one-shot to its pod's cgroup
/// (--cgroup, default auto: the parent of its own cgroup).
#[derive(Debug, Parser)]
#[command(name = "istio-iptables", version, args_override_self = true)]
pub struct IstioIptablesCli {
    /// The policy (istio-iptables' flags).
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// istio-iptables' other flags.
    #[command(flatten)]
    pub istio: IstioArgs,
    /// Check everything and print what would be done; apply nothing.
    #[arg(short = 'n', long = "dry-run", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub dry_run: bool,
    /// Without a node install: the pod's cgroup v2 directory, or auto (env
    /// REDIRECT_CGROUP).
    #[arg(long, default_value = "auto")]
    pub cgroup: PathBuf,
    /// Without a node install: the pin dir [default: per cgroup] (env
    /// REDIRECT_PIN_DIR).
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// The node install to register with, when there is one (env
    /// REDIRECT_NODE_PIN_DIR).
    #[arg(long, default_value = crate::node::DEFAULT_NODE_PIN_DIR)]
    pub node_pin_dir: PathBuf,
    /// Seconds to wait for another apply or pod operation.
    #[arg(long, value_name = "SECONDS", default_value = "120")]
    pub lock_timeout: u64,
}

/// The arguments Istio's injector gives the `istio-init` container with
/// default values (after `istio-iptables`), unchanged from Istio 1.16 to
/// 1.31 (`hello.yaml.injected` in istio's injector tests).
pub const INJECTED_DEFAULT_ARGS: [&str; 17] = [
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
    "--log_output_level=default:info",
];

/// redirect's own settings of `istio-iptables`, from the environment too
/// (an init container's arguments are the injector's).
const REDIRECT_ENV: [(&str, &str); 3] = [
    ("cgroup", "REDIRECT_CGROUP"),
    ("pin-dir", "REDIRECT_PIN_DIR"),
    ("node-pin-dir", "REDIRECT_NODE_PIN_DIR"),
];

/// The owner-group filter istio-iptables reads from the environment only:
/// `(include, exclude)` as `--owner-groups-include/-exclude` take them
/// (`*`, istio's default include, is everyone: empty).
pub fn owner_groups_env(get: impl Fn(&str) -> Option<String>) -> (String, String) {
    let include = get("ISTIO_OUTBOUND_OWNER_GROUPS").unwrap_or_default();
    let include = if include.trim() == "*" {
        String::new()
    } else {
        include
    };
    (
        include,
        get("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE").unwrap_or_default(),
    )
}

/// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`: redirect implements istio's
/// default (127.0.0.1/32) only.
pub fn check_loopback_env(get: impl Fn(&str) -> Option<String>) -> Result<()> {
    match get("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR") {
        Some(v) if !v.is_empty() && v != "127.0.0.1/32" => bail!(
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR={v}: only istio's default, 127.0.0.1/32, is \
             implemented"
        ),
        _ => Ok(()),
    }
}

/// The full argument list `istio-iptables` parses: the program name, the
/// flags the environment sets, then the command line's own (which win).
pub fn istio_argv(
    argv: impl IntoIterator<Item = OsString>,
    get: impl Fn(&str) -> Option<String> + Copy,
) -> Vec<OsString> {
    let mut argv = argv.into_iter();
    let mut out: Vec<OsString> = argv.next().into_iter().collect();
    out.extend(env_args(get));
    for (flag, var) in REDIRECT_ENV {
        if let Some(v) = get(var) {
            out.push(format!("--{flag}={v}").into());
        }
    }
    out.extend(argv);
    out
}

/// Parses `istio-iptables`' command line (see [`istio_argv`]) and fills in
/// istio's defaults that depend on other values: `-u` empty is the UID of
/// `$ENVOY_USER` (istio-proxy) or 1337, `-g` unset is `-u`'s value, and the
/// owner groups come from the environment.
pub fn parse_istio_iptables(
    argv: impl IntoIterator<Item = OsString>,
    get: impl Fn(&str) -> Option<String> + Copy,
) -> Result<IstioIptablesCli, clap::Error> {
    use clap::{CommandFactory as _, FromArgMatches as _, parser::ValueSource};
    let matches = IstioIptablesCli::command().try_get_matches_from(istio_argv(argv, get))?;
    let gid_unset = matches.value_source("proxy_gid") == Some(ValueSource::DefaultValue);
    let uid_unset = matches.value_source("proxy_uid") == Some(ValueSource::DefaultValue);
    let mut cli = IstioIptablesCli::from_arg_matches(&matches)?;
    if uid_unset || cli.policy.proxy_uid.is_empty() {
        cli.policy.proxy_uid = default_proxy_uid(get("ENVOY_USER"));
    }
    if gid_unset || cli.policy.proxy_gid.is_empty() {
        cli.policy.proxy_gid = cli.policy.proxy_uid.clone();
    }
    let (include, exclude) = owner_groups_env(get);
    cli.policy.owner_groups_include = include;
    cli.policy.owner_groups_exclude = exclude;
    Ok(cli)
}

/// istio-iptables' flags besides the policy's.
#[derive(Debug, Args, Clone, Default)]
pub struct IstioArgs {
    /// Inbound interception mode: REDIRECT (what redirect does, without
    /// NAT). TPROXY is not implemented and is refused.
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        default_value = ""
    )]
    pub interception_mode: String,
    /// istio-iptables `-k`: interfaces whose traffic is treated as outbound.
    /// Not implemented yet: refused unless empty.
    #[arg(short = 'k', long = "kube-virt-interfaces", default_value = "")]
    pub kube_virt_interfaces: String,
    /// TPROXY only (not needed).
    #[arg(
        short = 't',
        long = "istio-inbound-tproxy-mark",
        default_value = "1337"
    )]
    pub tproxy_mark: String,
    /// TPROXY only (not needed).
    #[arg(
        short = 'r',
        long = "istio-inbound-tproxy-route-table",
        default_value = "133"
    )]
    pub tproxy_route_table: String,
    /// With --run-validation: the original port the probe connects to.
    #[arg(long = "iptables-probe-port", default_value = "15002")]
    pub probe_port: u16,
    /// With --run-validation: how long to wait for the probe (Go duration:
    /// 5s, 500ms, 1m).
    #[arg(long = "probe-timeout", default_value = "5s", value_parser = parse_go_duration)]
    pub probe_timeout: Duration,
    /// Apply nothing (with --run-validation: only check what is in force).
    #[arg(long = "skip-rule-apply", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub skip_rule_apply: bool,
    /// Check that capture works: as the proxy's UID, connect to
    /// 127.0.0.6:PROBE_PORT while listening on the proxy's ports, and pass
    /// when a listener reads that original port (exit 126 otherwise).
    #[arg(long = "run-validation", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub run_validation: bool,
    /// iptables' conntrack INVALID drop (not needed: no NAT, no conntrack).
    #[arg(long = "drop-invalid", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub drop_invalid: bool,
    /// IPv4 and IPv6 rules (not needed: redirect always does both).
    #[arg(long = "dual-stack", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub dual_stack: bool,
    /// The pod's network namespace file (as `--netns`).
    #[arg(long = "network-namespace", default_value = "")]
    pub network_namespace: String,
    /// Run as a CNI plugin (not needed).
    #[arg(long = "cni-mode", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub cni_mode: bool,
    /// Reconcile rules in place (not needed: applying again always replaces
    /// the policy with no gap).
    #[arg(long = "reconcile", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub reconcile: bool,
    /// Remove what an earlier run applied, and apply nothing.
    #[arg(long = "cleanup-only", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub cleanup_only: bool,
    /// Apply even if in place (not needed: applying always replaces).
    #[arg(long = "force-apply", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub force_apply: bool,
    /// nftables instead of iptables (not needed).
    #[arg(long = "native-nftables", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub native_nftables: bool,
    /// The iptables binary (not needed).
    #[arg(long = "force-iptables-binary", default_value = "")]
    pub force_iptables_binary: String,
    /// The iptables version, istio 1.20-1.21 (not needed).
    #[arg(long = "iptables-version", default_value = "")]
    pub iptables_version: String,
    /// iptables-restore input format, istio up to 1.23 (not needed).
    #[arg(short = 'f', long = "restore-format", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "true", value_parser = parse_go_bool)]
    pub restore_format: bool,
    /// iptables trace rules, istio up to 1.25 (not needed).
    #[arg(long = "iptables-trace-logging", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub iptables_trace_logging: bool,
    /// Log level per scope, as pilot-agent takes it (`default:info`): the
    /// `default` scope's level (debug, info, warn, error, none) sets
    /// redirect's unless REDIRECT_LOG is set.
    #[arg(long = "log_output_level", default_value = "")]
    pub log_output_level: String,
    /// pilot-agent logging flag (accepted; redirect logs text).
    #[arg(long = "log_as_json", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub log_as_json: bool,
    /// pilot-agent logging flag (accepted; redirect logs to stderr).
    #[arg(long = "log_target", default_value = "")]
    pub log_target: String,
    /// pilot-agent logging flag (accepted, not needed).
    #[arg(long = "log_stacktrace_level", default_value = "")]
    pub log_stacktrace_level: String,
    /// pilot-agent logging flag (accepted, not needed).
    #[arg(long = "log_caller", default_value = "")]
    pub log_caller: String,
}

/// Go's `strconv.ParseBool`, which pflag uses.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true or false)")),
    }
}

/// A Go duration (`5s`, `500ms`, `1m30s`, `2h`, `0`).
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (for example 5s, 500ms, 1m)");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

/// The long flags whose value is a Go bool (for the environment).
const BOOL_FLAGS: [&str; 15] = [
    "skip-rule-apply",
    "run-validation",
    "redirect-dns",
    "capture-all-dns",
    "drop-invalid",
    "dual-stack",
    "cni-mode",
    "reconcile",
    "cleanup-only",
    "force-apply",
    "native-nftables",
    "restore-format",
    "iptables-trace-logging",
    "dry-run",
    "log_as_json",
];

/// istio-iptables' flags that read an environment variable (every one but
/// `--envoy-port` and pilot-agent's logging flags), by long name.
const ENV_FLAGS: [&str; 34] = [
    "inbound-capture-port",
    "inbound-tunnel-port",
    "proxy-uid",
    "proxy-gid",
    "istio-inbound-interception-mode",
    "istio-inbound-ports",
    "istio-local-exclude-ports",
    "istio-exclude-interfaces",
    "istio-service-cidr",
    "istio-service-exclude-cidr",
    "istio-outbound-ports",
    "istio-local-outbound-ports-exclude",
    "kube-virt-interfaces",
    "istio-inbound-tproxy-mark",
    "istio-inbound-tproxy-route-table",
    "dry-run",
    "iptables-probe-port",
    "probe-timeout",
    "skip-rule-apply",
    "run-validation",
    "redirect-dns",
    "drop-invalid",
    "dual-stack",
    "capture-all-dns",
    "network-namespace",
    "cni-mode",
    "reconcile",
    "cleanup-only",
    "force-apply",
    "native-nftables",
    "force-iptables-binary",
    "iptables-version",
    "restore-format",
    "iptables-trace-logging",
];

/// Second variables, read after the first (so they win over it).
const ADDITIONAL_ENV: [(&str, &str); 3] = [
    ("redirect-dns", "ISTIO_META_DNS_CAPTURE"),
    ("drop-invalid", "INVALID_DROP"),
    ("dual-stack", "ISTIO_DUAL_STACK"),
];

/// The environment variable of a flag: its name upper-cased, `-` as `_`.
pub fn env_name(flag: &str) -> String {
    flag.to_ascii_uppercase().replace('-', "_")
}

/// The flags the environment sets, as `--name=value` arguments to put
/// before the command line's own (where a later one wins).
pub fn env_args(get: impl Fn(&str) -> Option<String>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut push = |flag: &str, value: String| {
        let value = if BOOL_FLAGS.contains(&flag) {
            // pflag sets false when the value does not parse.
            parse_go_bool(&value).unwrap_or(false).to_string()
        } else {
            value
        };
        out.push(OsString::from(format!("--{flag}={value}")));
    };
    for flag in ENV_FLAGS {
        if let Some(v) = get(&env_name(flag)) {
            push(flag, v);
        }
    }
    for (flag, var) in ADDITIONAL_ENV {
        if let Some(v) = get(var) {
            push(flag, v);
        }
    }
    out
}

/// The proxy UID istio-iptables uses when `-u` is empty: that of the user
/// `$ENVOY_USER` (default istio-proxy) if it exists, else 1337.
pub fn default_proxy_uid(envoy_user: Option<String>) -> String {
    let name = envoy_user.unwrap_or_else(|| "istio-proxy".into());
    let Ok(c) = std::ffi::CString::new(name) else {
        return "1337".into();
    };
    // SAFETY: getpwnam with a valid C string; the result is read at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        "1337".into()
    } else {
        // SAFETY: non-null result of getpwnam.
        unsafe { (*pw).pw_uid }.to_string()
    }
}

/// The `default` scope's level in a pilot-agent `--log_output_level`
/// (`default:info,grpc:none`; a bare `debug` sets every scope), as a
/// tracing filter.
pub fn log_filter(spec: &str) -> Option<&'static str> {
    let level = spec
        .split(',')
        .find_map(|part| match part.split_once(':') {
            Some(("default", l)) => Some(l),
            None if !part.is_empty() => Some(part),
            _ => None,
        })?;
    Some(match level.trim() {
        "debug" => "debug",
        "info" => "info",
        "warn" => "warn",
        "error" => "error",
        "fatal" | "none" => "off",
        _ => return None,
    })
}

impl IstioArgs {
    /// Refuses what redirect does not do (naming the flag), and logs the
    /// flags it does not need.
    pub fn check(&self) -> Result<()> {
        match self.interception_mode.as_str() {
            "" | "REDIRECT" => {}
            "TPROXY" => bail!(
                "-m/--istio-inbound-interception-mode TPROXY: TPROXY interception is not \
                 implemented; use REDIRECT (redirect keeps the client's address without it: \
                 inbound connections are handed to the proxy with no NAT)"
            ),
            other => tracing::warn!(
                mode = other,
                "-m: unknown interception mode, treated as REDIRECT as istio-iptables does"
            ),
        }
        if !self.kube_virt_interfaces.is_empty() {
            bail!(
                "-k/--kube-virt-interfaces {:?}: not possible without NAT. Traffic from a VM \
                 in the pod is forwarded through the pod's namespace to other hosts; no socket \
                 hook sees a forwarded packet (sk_lookup runs only for packets delivered \
                 locally), so sending it to the proxy means rewriting its destination, which \
                 is what iptables REDIRECT does. Keep istio-iptables for pods running VMs \
                 (see docs/semantics.md)",
                self.kube_virt_interfaces
            );
        }
        let not_needed: [(&str, bool); 11] = [
            ("--drop-invalid (no NAT, no conntrack)", self.drop_invalid),
            (
                "--dual-stack (IPv4 and IPv6 are always captured)",
                self.dual_stack,
            ),
            ("--cni-mode", self.cni_mode),
            (
                "--reconcile (applying again replaces the policy with no gap)",
                self.reconcile,
            ),
            (
                "--force-apply (applying again replaces the policy)",
                self.force_apply,
            ),
            ("--native-nftables", self.native_nftables),
            (
                "--force-iptables-binary",
                !self.force_iptables_binary.is_empty(),
            ),
            ("--iptables-version", !self.iptables_version.is_empty()),
            ("--restore-format=false", !self.restore_format),
            ("--iptables-trace-logging", self.iptables_trace_logging),
            ("--log_as_json (redirect logs text)", self.log_as_json),
        ];
        for (flag, given) in not_needed {
            if given {
                tracing::info!("{flag}: accepted, not needed by redirect");
            }
        }
        if self.tproxy_mark != "1337" || self.tproxy_route_table != "133" {
            tracing::info!("-t/-r: TPROXY settings, not needed by redirect");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_bools_and_durations() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(t), Ok(true));
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(f), Ok(false));
        }
        assert!(parse_go_bool("yes").is_err());
        assert_eq!(parse_go_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_go_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert!(parse_go_duration("5").is_err());
        assert!(parse_go_duration("").is_err());
        assert!(parse_go_duration("5x").is_err());
    }

    #[test]
    fn environment_names_and_order() {
        assert_eq!(env_name("istio-service-cidr"), "ISTIO_SERVICE_CIDR");
        let env = |k: &str| match k {
            "ISTIO_SERVICE_CIDR" => Some("*".to_string()),
            "INBOUND_CAPTURE_PORT" => Some(String::new()),
            "REDIRECT_DNS" => Some("true".to_string()),
            "ISTIO_META_DNS_CAPTURE" => Some("false".to_string()),
            "DRY_RUN" => Some(String::new()),
            "ENVOY_PORT" => Some("1".to_string()),
            _ => None,
        };
        let args: Vec<String> = env_args(env)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--inbound-capture-port=",
                "--istio-service-cidr=*",
                "--dry-run=false",
                "--redirect-dns=true",
                "--redirect-dns=false",
            ]
        );
    }

    fn parse(args: &[&str], env: &[(&str, &str)]) -> IstioIptablesCli {
        let argv = std::iter::once("istio-iptables")
            .chain(args.iter().copied())
            .map(OsString::from);
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        parse_istio_iptables(argv, get).unwrap()
    }

    #[test]
    fn injected_lists_parse_and_defaults_follow_istio() {
        let c = parse(&INJECTED_DEFAULT_ARGS, &[]);
        assert_eq!(c.policy.include_cidrs, "*");
        assert_eq!(c.policy.exclude_cidrs, "");
        assert_eq!(c.policy.exclude_inbound_ports, "15090,15021,15020");
        assert_eq!(c.istio.interception_mode, "REDIRECT");
        assert_eq!(
            (c.policy.proxy_uid.as_str(), c.policy.proxy_gid.as_str()),
            ("1337", "1337")
        );
        assert_eq!(c.cgroup, PathBuf::from("auto"));
        // The webhook's runAsUser override: -g follows -u.
        let c = parse(&["-u", "1234"], &[]);
        assert_eq!(
            (c.policy.proxy_uid.as_str(), c.policy.proxy_gid.as_str()),
            ("1234", "1234")
        );
        let c = parse(&["-u", "1234", "-g", "5"], &[]);
        assert_eq!(c.policy.proxy_gid, "5");
        // Environment: a flag wins; the second variable wins over the first.
        let c = parse(
            &["-i", "10.0.0.0/8"],
            &[
                ("ISTIO_SERVICE_CIDR", "*"),
                ("PROXY_GID", "7"),
                ("ISTIO_INBOUND_PORTS", "*"),
            ],
        );
        assert_eq!(c.policy.include_cidrs, "10.0.0.0/8");
        assert_eq!(c.policy.proxy_gid, "7");
        assert_eq!(c.policy.inbound_ports, "*");
        let c = parse(
            &[],
            &[
                ("REDIRECT_DNS", "false"),
                ("ISTIO_META_DNS_CAPTURE", "true"),
            ],
        );
        assert!(c.policy.redirect_dns);
        let c = parse(
            &["--redirect-dns=false"],
            &[("ISTIO_META_DNS_CAPTURE", "true")],
        );
        assert!(!c.policy.redirect_dns);
        // ENVOY_PORT is not read (istio 1.21+); the owner groups are.
        let c = parse(
            &[],
            &[
                ("ENVOY_PORT", "1"),
                ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "20,30"),
            ],
        );
        assert_eq!(c.policy.proxy_port, "15001");
        assert_eq!(c.policy.owner_groups_exclude, "20,30");
        assert_eq!(c.policy.owner_groups_include, "");
        // redirect's own settings.
        let c = parse(&[], &[("REDIRECT_CGROUP", "/sys/fs/cgroup/x")]);
        assert_eq!(c.cgroup, PathBuf::from("/sys/fs/cgroup/x"));
        // Accepted flags of other releases.
        parse(
            &[
                "--run-validation",
                "--skip-rule-apply",
                "--log_as_json",
                "--force-apply",
                "--native-nftables",
                "--iptables-version=1.8",
                "-f=false",
                "--cni-mode",
                "--iptables-probe-port=15002",
                "--probe-timeout=5s",
                "--drop-invalid",
                "--dual-stack",
                "--reconcile",
                "-t",
                "1337",
                "-r",
                "133",
                "-n",
            ],
            &[],
        );
    }

    #[test]
    fn log_levels() {
        assert_eq!(log_filter("default:info"), Some("info"));
        assert_eq!(log_filter("default:debug,grpc:none"), Some("debug"));
        assert_eq!(log_filter("grpc:none,default:none"), Some("off"));
        assert_eq!(log_filter("warn"), Some("warn"));
        assert_eq!(log_filter("grpc:debug"), None);
        assert_eq!(log_filter(""), None);
    }

    #[test]
    fn unsupported_modes_are_named() {
        let tproxy = IstioArgs {
            interception_mode: "TPROXY".into(),
            ..Default::default()
        };
        assert!(tproxy.check().unwrap_err().to_string().contains("TPROXY"));
        let ok = IstioArgs {
            interception_mode: "REDIRECT".into(),
            drop_invalid: true,
            restore_format: true,
            tproxy_mark: "1337".into(),
            tproxy_route_table: "133".into(),
            ..Default::default()
        };
        ok.check().unwrap();
    }
}

//! `redirect-cni`: a chained CNI plugin (spec 1.0.0; 0.3.x and 0.4.0
//! configurations too) that registers a pod with the node install, the
//! way istio-cni programs a pod's iptables rules.
//!
//! The runtime runs it after the plugins that set the pod's network up
//! (`bridge`, `host-local`...), with `CNI_COMMAND`, `CNI_NETNS`, `CNI_ARGS`
//! in the environment and the network configuration on stdin. The pod's
//! annotations come in `runtimeConfig` under
//! `io.kubernetes.cri.pod-annotations`, which containerd fills in when the
//! plugin declares that capability in the conflist. A pod is registered
//! when it has Istio's sidecar (`sidecar.istio.io/status`), with the policy
//! Istio's annotations ask for over this plugin's defaults, as istio-cni
//! derives it. ADD passes `prevResult` through; DEL succeeds for pods it
//! does not know; CHECK checks the pod is registered if it should be.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::{cli::PolicyArgs, node::DEFAULT_NODE_PIN_DIR};

/// The CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The runtime-config key containerd fills with the pod's annotations.
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// A CNI error: its code (spec section "Error"), message and details.
#[derive(Debug, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    /// The spec's error code (4: invalid environment, 6: decoding failure,
    /// 7: invalid configuration, 11: try again later, 999: other).
    pub code: u32,
    /// What went wrong.
    pub msg: String,
    /// More.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl std::fmt::Display) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.to_string(),
        }
    }

    /// The error as the spec wants it on stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

fn default_node_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_NODE_PIN_DIR)
}

fn default_exclude_namespaces() -> Vec<String> {
    vec!["kube-system".into()]
}

fn string(s: &str) -> String {
    s.to_string()
}

/// The plugin's configuration (its entry in the conflist). Every key is
/// optional; the policy keys are the defaults a pod's annotations
/// override, istio-cni's unless changed.
#[derive(Clone, Debug, Deserialize)]
pub struct PluginConfig {
    /// `cniVersion` of the configuration.
    #[serde(rename = "cniVersion", default = "cni_version_default")]
    pub cni_version: String,
    /// The previous plugin's result, passed through.
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Value>,
    /// Runtime configuration (the pod's annotations).
    #[serde(rename = "runtimeConfig", default)]
    pub runtime_config: BTreeMap<String, Value>,
    /// The node install to register pods with.
    #[serde(default = "default_node_pin_dir")]
    pub node_pin_dir: PathBuf,
    /// Namespaces whose pods are never registered.
    #[serde(default = "default_exclude_namespaces")]
    pub exclude_namespaces: Vec<String>,
    /// The proxy's UIDs (`-u`).
    #[serde(default = "uid_default")]
    pub proxy_uid: String,
    /// The proxy's GIDs (`-g`).
    #[serde(default = "uid_default")]
    pub proxy_gid: String,
    /// The outbound proxy port (`-p`).
    #[serde(default = "proxy_port_default")]
    pub proxy_port: String,
    /// The inbound capture port (`-z`).
    #[serde(default = "inbound_port_default")]
    pub inbound_capture_port: String,
    /// Default of `traffic.sidecar.istio.io/includeOutboundIPRanges`.
    #[serde(default = "star")]
    pub include_outbound_ip_ranges: String,
    /// Default of `traffic.sidecar.istio.io/excludeOutboundIPRanges`.
    #[serde(default)]
    pub exclude_outbound_ip_ranges: String,
    /// Default of `traffic.sidecar.istio.io/includeInboundPorts`.
    #[serde(default = "star")]
    pub include_inbound_ports: String,
    /// Default of `traffic.sidecar.istio.io/excludeInboundPorts` (15020,
    /// 15021 and 15090 are always added, as istio-cni adds them).
    #[serde(default)]
    pub exclude_inbound_ports: String,
    /// Default of `traffic.sidecar.istio.io/includeOutboundPorts`.
    #[serde(default)]
    pub include_outbound_ports: String,
    /// Default of `traffic.sidecar.istio.io/excludeOutboundPorts` (istio-cni:
    /// the status port, 15020).
    #[serde(default = "status_port")]
    pub exclude_outbound_ports: String,
    /// Seconds to wait for another node or pod operation.
    #[serde(default = "lock_timeout_default")]
    pub lock_timeout: u64,
}

fn cni_version_default() -> String {
    string("1.0.0")
}
fn uid_default() -> String {
    string("1337")
}
fn proxy_port_default() -> String {
    string("15001")
}
fn inbound_port_default() -> String {
    string("15006")
}
fn star() -> String {
    string("*")
}
fn status_port() -> String {
    string("15020")
}
fn lock_timeout_default() -> u64 {
    30
}

/// Parses the configuration from stdin.
pub fn parse_config(stdin: &[u8]) -> Result<PluginConfig, CniError> {
    let conf: PluginConfig = serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(6, "cannot decode the network configuration", e))?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            1,
            format!(
                "cniVersion {} is not supported (supported: {})",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
            "",
        ));
    }
    Ok(conf)
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS`.
pub fn k8s_args(cni_args: &str) -> (Option<String>, Option<String>) {
    let get = |key: &str| {
        cni_args
            .split(';')
            .find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key))
            .map(|(_, v)| v.to_string())
    };
    (get("K8S_POD_NAMESPACE"), get("K8S_POD_NAME"))
}

/// Istio's annotations this plugin reads.
pub mod annotation {
    /// Set by the injector on pods it gave a sidecar.
    pub const STATUS: &str = "sidecar.istio.io/status";
    /// `"false"`: no sidecar.
    pub const INJECT: &str = "sidecar.istio.io/inject";
    /// REDIRECT, TPROXY or NONE.
    pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
    /// `-i`.
    pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
    /// `-x`.
    pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
    /// `-b`.
    pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
    /// `-d`.
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
    /// `-q`.
    pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
    /// `-o`.
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
    /// `-c`.
    pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
    /// `-k` (not implemented).
    pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
    /// `-k` (not implemented).
    pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
}

/// What to do with a pod.
#[derive(Debug)]
pub enum Decision {
    /// Leave it alone, and why.
    Skip(String),
    /// Register it with this policy.
    Register(Box<PolicyArgs>),
}

impl PluginConfig {
    /// The pod's annotations (empty when the runtime gave none).
    pub fn annotations(&self) -> BTreeMap<String, String> {
        self.runtime_config
            .get(ANNOTATIONS_CAPABILITY)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether and how to register the pod in namespace `namespace` with
    /// these annotations.
    pub fn decide(
        &self,
        namespace: Option<&str>,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Decision, CniError> {
        use annotation as a;
        if let Some(ns) = namespace
            && self.exclude_namespaces.iter().any(|n| n == ns)
        {
            return Ok(Decision::Skip(format!("namespace {ns} is excluded")));
        }
        if let Some(v) = annotations.get(a::INJECT)
            && crate::istio::parse_go_bool(v) == Ok(false)
        {
            return Ok(Decision::Skip(format!("{}: {v}", a::INJECT)));
        }
        if !annotations.contains_key(a::STATUS) {
            return Ok(Decision::Skip(format!(
                "no {} annotation (no sidecar)",
                a::STATUS
            )));
        }
        match annotations
            .get(a::INTERCEPTION_MODE)
            .map(String::as_str)
            .unwrap_or("REDIRECT")
        {
            "REDIRECT" => {}
            "NONE" => return Ok(Decision::Skip(format!("{}: NONE", a::INTERCEPTION_MODE))),
            "TPROXY" => {
                return Err(CniError::new(
                    7,
                    format!("{}: TPROXY is not implemented", a::INTERCEPTION_MODE),
                    "use REDIRECT: redirect hands inbound connections to the proxy without NAT",
                ));
            }
            other => {
                return Err(CniError::new(
                    7,
                    format!(
                        "{}: {other:?} is not REDIRECT, TPROXY or NONE",
                        a::INTERCEPTION_MODE
                    ),
                    "",
                ));
            }
        }
        for key in [a::KUBEVIRT_INTERFACES, a::REROUTE_VIRTUAL_INTERFACES] {
            if annotations.get(key).is_some_and(|v| !v.is_empty()) {
                return Err(CniError::new(
                    7,
                    format!(
                        "{key}: traffic from a VM in the pod is forwarded, not delivered to a \
                         socket: sending it to the proxy needs NAT, which redirect does not do \
                         (see docs/semantics.md); keep istio-cni for pods running VMs"
                    ),
                    "",
                ));
            }
        }
        let get = |key: &str, default: &str| {
            annotations
                .get(key)
                .cloned()
                .unwrap_or_else(|| default.to_string())
        };
        // istio-cni adds the status, health and metrics ports to the
        // excluded inbound ports whatever the annotation says.
        let mut exclude_inbound: Vec<String> =
            get(a::EXCLUDE_INBOUND_PORTS, &self.exclude_inbound_ports)
                .split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect();
        for p in ["15020", "15021", "15090"] {
            if !exclude_inbound.iter().any(|e| e == p) {
                exclude_inbound.push(p.to_string());
            }
        }
        let policy = PolicyArgs {
            proxy_port: self.proxy_port.clone(),
            inbound_capture_port: self.inbound_capture_port.clone(),
            tunnel_port: "15008".into(),
            proxy_uid: self.proxy_uid.clone(),
            proxy_gid: self.proxy_gid.clone(),
            include_cidrs: get(
                a::INCLUDE_OUTBOUND_IP_RANGES,
                &self.include_outbound_ip_ranges,
            ),
            exclude_cidrs: get(
                a::EXCLUDE_OUTBOUND_IP_RANGES,
                &self.exclude_outbound_ip_ranges,
            ),
            exclude_cidrs_file: None,
            include_ports: get(a::INCLUDE_OUTBOUND_PORTS, &self.include_outbound_ports),
            exclude_ports: get(a::EXCLUDE_OUTBOUND_PORTS, &self.exclude_outbound_ports),
            inbound_ports: get(a::INCLUDE_INBOUND_PORTS, &self.include_inbound_ports),
            exclude_inbound_ports: exclude_inbound.join(","),
            exclude_interfaces: get(a::EXCLUDE_INTERFACES, ""),
            proxy_mark: None,
            proxy_cgroup: None,
            owner_groups_include: String::new(),
            owner_groups_exclude: String::new(),
            service: Vec::new(),
            services_file: None,
            // DNS capture is istio-cni's too (ISTIO_META_DNS_CAPTURE in the
            // pod); not derived here yet.
            redirect_dns: false,
            capture_all_dns: false,
            dns_servers: None,
            resolv_conf: "/etc/resolv.conf".into(),
        };
        // Bad values name the flag; say which annotation (or default) it was.
        policy.to_spec().map_err(|e| {
            CniError::new(
                7,
                "the pod's policy (its traffic.sidecar.istio.io annotations over the plugin's \
                 defaults) is invalid",
                e,
            )
        })?;
        Ok(Decision::Register(Box::new(policy)))
    }

    /// How long to wait for another node or pod operation.
    pub fn lock_timeout(&self) -> Duration {
        Duration::from_secs(self.lock_timeout)
    }
}

/// ADD's output: the previous result passed through (or an empty result),
/// in the configuration's version.
pub fn add_result(conf: &PluginConfig) -> Value {
    let mut result = conf
        .prev_result
        .clone()
        .unwrap_or_else(|| json!({"interfaces": [], "ips": []}));
    if let Some(m) = result.as_object_mut() {
        m.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    result
}

/// VERSION's output.
pub fn version_result() -> Value {
    json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: Value) -> PluginConfig {
        let mut base =
            json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "redirect-cni"});
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        parse_config(base.to_string().as_bytes()).unwrap()
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn istio_cni_defaults_and_annotations() {
        let c = conf(json!({}));
        let Decision::Register(p) = c
            .decide(Some("default"), &ann(&[(annotation::STATUS, "{}")]))
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(p.include_cidrs, "*");
        assert_eq!(p.inbound_ports, "*");
        assert_eq!(p.exclude_inbound_ports, "15020,15021,15090");
        assert_eq!(p.exclude_ports, "15020");
        let Decision::Register(p) = c
            .decide(
                Some("default"),
                &ann(&[
                    (annotation::STATUS, "{}"),
                    (annotation::INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8"),
                    (annotation::EXCLUDE_INBOUND_PORTS, "22,15021"),
                    (annotation::EXCLUDE_OUTBOUND_PORTS, "3306"),
                    (annotation::EXCLUDE_INTERFACES, "net1,net2"),
                ]),
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(p.exclude_interfaces, "net1,net2");
        assert_eq!(p.include_cidrs, "10.0.0.0/8");
        assert_eq!(p.exclude_inbound_ports, "22,15021,15020,15090");
        assert_eq!(p.exclude_ports, "3306");
    }

    #[test]
    fn pods_without_a_sidecar_or_excluded_are_skipped() {
        let c = conf(json!({"exclude_namespaces": ["kube-system", "infra"]}));
        for (ns, a) in [
            ("default", ann(&[])),
            ("infra", ann(&[(annotation::STATUS, "{}")])),
            (
                "default",
                ann(&[(annotation::STATUS, "{}"), (annotation::INJECT, "false")]),
            ),
            (
                "default",
                ann(&[
                    (annotation::STATUS, "{}"),
                    (annotation::INTERCEPTION_MODE, "NONE"),
                ]),
            ),
        ] {
            assert!(
                matches!(c.decide(Some(ns), &a).unwrap(), Decision::Skip(_)),
                "{ns} {a:?}"
            );
        }
    }

    #[test]
    fn bad_input_names_the_problem() {
        let c = conf(json!({}));
        let e = c
            .decide(
                None,
                &ann(&[
                    (annotation::STATUS, "{}"),
                    (annotation::INTERCEPTION_MODE, "TPROXY"),
                ]),
            )
            .unwrap_err();
        assert!(e.to_string().contains("TPROXY"), "{e}");
        let e = c
            .decide(
                None,
                &ann(&[
                    (annotation::STATUS, "{}"),
                    (annotation::EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/99"),
                ]),
            )
            .unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/99"), "{e}");
        let e = c
            .decide(
                None,
                &ann(&[
                    (annotation::STATUS, "{}"),
                    (annotation::EXCLUDE_INTERFACES, "net/1"),
                ]),
            )
            .unwrap_err();
        assert!(e.to_string().contains("net/1"), "{e}");
        let e = c
            .decide(
                None,
                &ann(&[
                    (annotation::STATUS, "{}"),
                    (annotation::KUBEVIRT_INTERFACES, "net0ps2"),
                ]),
            )
            .unwrap_err();
        assert!(e.to_string().contains("NAT"), "{e}");
        let e = parse_config(br#"{"cniVersion": "0.2.0"}"#).unwrap_err();
        assert!(e.to_string().contains("0.2.0"), "{e}");
        assert_eq!(parse_config(b"{").unwrap_err().code, 6);
    }

    #[test]
    fn prev_result_passes_through_and_args_parse() {
        let c = conf(
            json!({"cniVersion": "0.4.0", "prevResult": {"cniVersion": "0.4.0", "ips": [{"address": "10.1.0.5/24"}]}}),
        );
        let r = add_result(&c);
        assert_eq!(r["ips"][0]["address"], "10.1.0.5/24");
        assert_eq!(r["cniVersion"], "0.4.0");
        assert_eq!(
            k8s_args(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=x"
            ),
            (Some("ns1".into()), Some("web-0".into()))
        );
    }
}

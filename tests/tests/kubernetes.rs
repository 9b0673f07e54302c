//! End to end on a real container runtime: Debian's containerd 1.6 with its
//! CRI plugin, driven over CRI as the kubelet drives it, the reference
//! `bridge`/`host-local`/`loopback` CNI plugins, and redirect installed by
//! its node agent (`redirect cni install --cgroup`), which chains
//! `redirect-cni` after them (redirect_tests::cri). Pods are sandboxes with
//! Istio's annotations and containers from a locally built image; nothing
//! comes from a registry.

use std::collections::BTreeMap;

use redirect_tests::{
    can_run,
    cri::{GATEWAY, Node, Pod},
};
use serde_json::Value;

macro_rules! need_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

const SAMPLE: &str = "/usr/local/bin/redirect-sample";
/// What the injector puts on a pod it gave a sidecar.
const SIDECAR_STATUS: &str =
    r#"{"initContainers":null,"containers":["istio-proxy"],"volumes":["istio-envoy"]}"#;

/// `redirect-sample connect --to TO` in the container; what it saw.
fn connect(node: &Node, container: &str, to: &str) -> Value {
    let out = node
        .exec(container, &[SAMPLE, "connect", "--to", to])
        .unwrap_or_else(|e| panic!("connect {to}: {e:#}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("connect {to}: {e}: {out}"))
}

/// Which server answered, and the original destination it read.
fn answer(v: &Value) -> (String, String) {
    assert_eq!(v["ok"], true, "{v}");
    let r = &v["reply"];
    (
        r["server"].as_str().unwrap_or("").to_string(),
        r["orig_dst"].as_str().unwrap_or("none").to_string(),
    )
}

/// A pod with a proxy (UID 1337, listening on 15001 and 15006 like Envoy)
/// and an app (UID 1000, serving on 8080) when `meshed`; the app alone
/// otherwise. Returns the pod and its app and proxy containers.
fn pod(
    node: &mut Node,
    name: &str,
    annotations: &BTreeMap<&str, &str>,
    meshed: bool,
) -> (Pod, String, Option<String>) {
    let pod = node.run_pod(name, annotations).expect("RunPodSandbox");
    let proxy = meshed.then(|| {
        let id = node
            .run_container(
                &pod,
                "istio-proxy",
                1337,
                &[
                    SAMPLE,
                    "server",
                    "--name",
                    &format!("{name}-proxy"),
                    "--listen",
                    "0.0.0.0:15001",
                    "--listen",
                    "0.0.0.0:15006",
                ],
            )
            .expect("proxy container");
        node.wait_ready(&pod, "istio-proxy").unwrap();
        id
    });
    let app = node
        .run_container(
            &pod,
            "app",
            1000,
            &[
                SAMPLE,
                "server",
                "--name",
                &format!("{name}-app"),
                "--listen",
                "0.0.0.0:8080",
            ],
        )
        .expect("app container");
    node.wait_ready(&pod, "app").unwrap();
    (pod, app, proxy)
}

/// A meshed pod and a plain one on one node: the meshed pod's outbound and
/// inbound connections reach its proxy with their original destination,
/// its proxy's own and its annotation-excluded ones do not, the plain pod
/// is left alone, and deleting the meshed pod unregisters it (CNI DEL)
/// and leaves nothing behind.
#[test]
fn pods_on_containerd_through_cri_and_the_cni_chain() {
    need_root!();
    let mut node = Node::start().unwrap_or_else(|e| panic!("starting the node: {e:#}"));
    // The rest of the cluster: a service behind the pods' gateway (the
    // bridge gets its address with the first pod).
    let svc = format!("{GATEWAY}:8080");
    let svc_excluded = format!("{GATEWAY}:9090");
    node.serve(&[
        "--name",
        "upstream",
        "--listen",
        "0.0.0.0:8080",
        "--listen",
        "0.0.0.0:9090",
    ])
    .unwrap();

    let meshed: BTreeMap<&str, &str> = [
        ("sidecar.istio.io/status", SIDECAR_STATUS),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "9090"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "8081"),
    ]
    .into();
    let (web, web_app, web_proxy) = pod(&mut node, "web", &meshed, true);
    let web_proxy = web_proxy.unwrap();
    let (plain, plain_app, _) = pod(&mut node, "plain", &BTreeMap::new(), false);

    // CNI ADD registered the meshed pod only, with its annotations'
    // policy over the plugin's defaults.
    let pods = node.registered().unwrap();
    assert_eq!(
        pods.len(),
        1,
        "only the sidecar pod is registered: {pods:?}"
    );
    let policy = &pods[0]["policy"];
    assert_eq!(policy["proxy_uids"][0], 1337, "{policy}");
    assert!(
        policy["exclude_ports"]
            .as_array()
            .unwrap()
            .contains(&9090.into()),
        "excludeOutboundPorts: {policy}"
    );
    assert!(
        policy["exclude_inbound_ports"]
            .as_array()
            .unwrap()
            .contains(&8081.into()),
        "excludeInboundPorts: {policy}"
    );

    // Outbound: the app's connection reaches the proxy, which reads where
    // it was going.
    assert_eq!(
        answer(&connect(&node, &web_app, &svc)),
        ("web-proxy".into(), svc.clone()),
        "the app's outbound connection"
    );
    // To another pod, too.
    let to_plain = format!("{}:8080", plain.ip);
    assert_eq!(
        answer(&connect(&node, &web_app, &to_plain)),
        ("web-proxy".into(), to_plain.clone()),
        "pod to pod"
    );
    // An annotation's excluded port goes out directly.
    assert_eq!(
        answer(&connect(&node, &web_app, &svc_excluded)).0,
        "upstream"
    );
    // The proxy's own connections (UID 1337) go out untouched.
    assert_eq!(
        answer(&connect(&node, &web_proxy, &svc)).0,
        "upstream",
        "the proxy's own connection"
    );

    // Inbound: a connection to the pod's port reaches the proxy's inbound
    // listener with the pod's address and port as its destination.
    let to_web = format!("{}:8080", web.ip);
    assert_eq!(
        answer(&node.connect_from_node(&to_web).unwrap()),
        ("web-proxy".into(), to_web.clone()),
        "inbound"
    );

    // The plain pod: neither its outbound nor its inbound connections are
    // touched.
    assert_eq!(answer(&connect(&node, &plain_app, &svc)).0, "upstream");
    assert_eq!(
        answer(&node.connect_from_node(&to_plain).unwrap()).0,
        "plain-app"
    );

    // Deleting the pod (StopPodSandbox, RemovePodSandbox): CNI DEL
    // unregisters it and its namespace is gone.
    let netns = pods[0]["netns"].as_str().unwrap().to_string();
    node.delete_pod(&web).unwrap();
    assert_eq!(
        node.registered().unwrap().len(),
        0,
        "the deleted pod is unregistered"
    );
    assert!(
        !std::path::Path::new(&netns).exists(),
        "{netns} outlived its pod"
    );
    // The plain pod still works, and a new meshed pod is captured again.
    assert_eq!(answer(&connect(&node, &plain_app, &svc)).0, "upstream");
    let (web2, web2_app, _) = pod(&mut node, "web2", &meshed, true);
    assert_eq!(
        answer(&connect(&node, &web2_app, &svc)),
        ("web2-proxy".into(), svc.clone())
    );
    // Every pod gone: nothing registered, every address back in the pool
    // (the whole chain's DEL ran).
    node.delete_pod(&web2).unwrap();
    node.delete_pod(&plain).unwrap();
    assert_eq!(node.registered().unwrap().len(), 0);
    let leases: Vec<_> = std::fs::read_dir(node.dir.join("ipam/rdt-pods"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("10."))
        .collect();
    assert!(leases.is_empty(), "addresses still leased: {leases:?}");
}

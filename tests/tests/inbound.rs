//! Inbound capture on a real kernel, without NAT: connections from outside
//! the pod are steered by `sk_lookup` to the proxy's listener on 15006 and
//! keep their real local address; the proxy registers its listener just by
//! calling `listen()` as an unprivileged user.

use redirect_tests::{
    APP_PORT, Fixture, can_run,
    pod::{As, POD_IP, Side, UPSTREAM_IP},
};

macro_rules! need_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

/// Ports of a second application server in the pod (beside [`APP_PORT`]):
/// an ssh-like port to exclude, another service, and the tunnel port.
const SSH: u16 = 2222;
const OTHER: u16 = 9090;
const TUNNEL: u16 = 15008;

fn pod(port: u16) -> String {
    format!("{POD_IP}:{port}")
}

fn fixture() -> Fixture {
    let mut f = Fixture::new();
    let listen: Vec<String> = [SSH, OTHER, TUNNEL]
        .iter()
        .map(|p| format!("0.0.0.0:{p}"))
        .collect();
    let refs: Vec<&str> = listen.iter().map(String::as_str).collect();
    f.pod
        .start_server(Side::Pod, As::APP, "app2", &refs)
        .expect("second app server");
    f
}

#[test]
fn all_ports_captured_except_excluded_and_tunnel() {
    need_root!();
    let f = fixture();
    // Before apply: the app answers.
    assert_eq!(f.who_answers_in(&pod(APP_PORT)), "app");

    f.apply_ok(&["-b", "*", "-d", &SSH.to_string()]);
    let v = f.connect_in(&pod(APP_PORT));
    let reply = v.reply.clone().unwrap_or_else(|| panic!("{v:?}"));
    assert_eq!(reply.server, "proxy", "{v:?}");
    // No NAT: the proxy's socket keeps the address the client asked for,
    // SO_ORIGINAL_DST answers it, and the peer is the real client.
    assert_eq!(reply.local, pod(APP_PORT), "{v:?}");
    assert_eq!(reply.orig_dst.as_deref(), Some(pod(APP_PORT).as_str()));
    assert!(reply.peer.starts_with(&format!("{UPSTREAM_IP}:")), "{v:?}");
    // The client sees the peer it asked for.
    assert_eq!(v.peer.as_deref(), Some(pod(APP_PORT).as_str()));

    assert_eq!(f.who_answers_in(&pod(OTHER)), "proxy");
    // Excluded port and tunnel port: straight to the app.
    assert_eq!(f.who_answers_in(&pod(SSH)), "app2");
    assert_eq!(f.who_answers_in(&pod(TUNNEL)), "app2");
    // From inside the pod, nothing walks the inbound rules.
    assert_eq!(f.who_answers(As::APP, &pod(APP_PORT)), "app");

    // The proxy was listening before apply: the loader registered it.
    let st = f.status().expect("status");
    assert!(
        st["decisions"]["inbound_all"].as_u64().unwrap() >= 2,
        "{st}"
    );
    assert!(
        st["decisions"]["inbound_excluded_port"].as_u64().unwrap() >= 1,
        "{st}"
    );
    assert!(
        st["decisions"]["inbound_tunnel"].as_u64().unwrap() >= 1,
        "{st}"
    );
}

#[test]
fn listed_ports_only() {
    need_root!();
    let f = fixture();
    f.apply_ok(&["-b", &format!("{APP_PORT},{TUNNEL}")]);
    let v = f.connect_in(&pod(APP_PORT));
    let reply = v.reply.unwrap_or_else(|| panic!("{:?}", v.error));
    assert_eq!(reply.server, "proxy");
    assert_eq!(reply.orig_dst.as_deref(), Some(pod(APP_PORT).as_str()));
    assert_eq!(f.who_answers_in(&pod(OTHER)), "app2");
    // The tunnel port is never captured, even when listed.
    assert_eq!(f.who_answers_in(&pod(TUNNEL)), "app2");
}

#[test]
fn no_inbound_ports_capture_nothing() {
    need_root!();
    let f = fixture();
    f.apply_ok(&["-i", "*"]);
    assert_eq!(f.who_answers_in(&pod(APP_PORT)), "app");
    assert_eq!(f.who_answers_in(&pod(OTHER)), "app2");
}

#[test]
fn proxy_restart_resumes_capture_and_nothing_leaks_meanwhile() {
    need_root!();
    let mut f = fixture();
    f.apply_ok(&["-b", "*"]);
    assert_eq!(f.who_answers_in(&pod(APP_PORT)), "proxy");

    f.pod.stop_server("proxy");
    // No proxy: refused, as REDIRECT to a closed port is; never delivered
    // to the app uncaptured.
    let down = f.who_answers_in(&pod(APP_PORT));
    assert!(down.starts_with("error"), "{down}");
    let st = f.status().expect("status");
    assert!(
        st["counters"]["inbound_no_listener"].as_u64().unwrap() >= 1,
        "{st}"
    );

    // The proxy comes back (unprivileged, UID 1337) and registers itself by
    // listening: capture resumes with no re-apply.
    f.start_proxy();
    let v = f.connect_in(&pod(APP_PORT));
    let reply = v.reply.unwrap_or_else(|| panic!("{:?}", v.error));
    assert_eq!(reply.server, "proxy");
    assert_eq!(reply.orig_dst.as_deref(), Some(pod(APP_PORT).as_str()));
    let st = f.status().expect("status");
    // One IPv4 and one IPv6 listener.
    assert_eq!(st["counters"]["listener_set"].as_u64(), Some(2), "{st}");
}

#[test]
fn proxy_started_after_apply_registers_itself() {
    need_root!();
    let mut f = fixture();
    f.pod.stop_server("proxy");
    f.apply_ok(&["-b", "*"]);
    let down = f.who_answers_in(&pod(APP_PORT));
    assert!(down.starts_with("error"), "{down}");
    // The init-container order: apply, then the proxy starts.
    f.start_proxy();
    assert_eq!(f.who_answers_in(&pod(APP_PORT)), "proxy");
    let st = f.status().expect("status");
    // One IPv4 and one IPv6 listener.
    assert_eq!(st["counters"]["listener_set"].as_u64(), Some(2), "{st}");
}

#[test]
fn proxy_forwarding_from_passthrough_source_is_not_recaptured() {
    need_root!();
    let f = fixture();
    f.apply_ok(&["-b", "*", "-i", "*"]);
    // The proxy hands an inbound connection to the app from 127.0.0.6, to
    // the pod address or to localhost: neither inbound nor outbound capture.
    for to in [pod(APP_PORT), format!("127.0.0.1:{APP_PORT}")] {
        let v = f
            .pod
            .connect(As::PROXY, &to, Some("127.0.0.6"))
            .expect("client");
        let reply = v.reply.unwrap_or_else(|| panic!("{to}: {:?}", v.error));
        assert_eq!(reply.server, "app", "{to}");
        assert!(reply.peer.starts_with("127.0.0.6:"), "{to}: {reply:?}");
    }
    // An app calling its own pod address: not captured either (rule 3b).
    assert_eq!(f.who_answers(As::APP, &pod(APP_PORT)), "app");
}

#[test]
fn listener_in_another_namespace_cannot_take_over() {
    need_root!();
    let mut f = fixture();
    f.pod.stop_server("proxy");
    f.apply_ok(&["-b", "*"]);
    f.start_proxy();
    assert_eq!(f.who_answers_in(&pod(APP_PORT)), "proxy");
    // A process of the pod's cgroup listening on 15006 in *another*
    // namespace (here the upstream one) must not replace the pod's listener.
    f.pod
        .start_server(Side::Upstream, As::PROXY, "impostor", &["0.0.0.0:15006"])
        .expect("impostor");
    assert_eq!(f.who_answers_in(&pod(APP_PORT)), "proxy");
    let st = f.status().expect("status");
    // One IPv4 and one IPv6 listener.
    assert_eq!(st["counters"]["listener_set"].as_u64(), Some(2), "{st}");
}

#[test]
fn reapply_changes_inbound_policy_and_remove_restores() {
    need_root!();
    let f = fixture();
    f.apply_ok(&["-b", "*"]);
    assert_eq!(f.who_answers_in(&pod(APP_PORT)), "proxy");
    // Re-apply with the app's port excluded: the new generation decides,
    // the registered listener carries over.
    f.apply_ok(&["-b", "*", "-d", &APP_PORT.to_string()]);
    assert_eq!(f.who_answers_in(&pod(APP_PORT)), "app");
    assert_eq!(f.who_answers_in(&pod(OTHER)), "proxy");
    let out = f.remove();
    assert!(out.status.success());
    // Nothing steers any more: the app answers on its own ports.
    assert_eq!(f.who_answers_in(&pod(OTHER)), "app2");
}

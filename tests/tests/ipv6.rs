//! IPv6 and dual stack on a real kernel: connect6, getpeername6,
//! `IP6T_SO_ORIGINAL_DST`, IPv6 CIDRs, `::1`, inbound over IPv6, and an IPv6
//! socket connecting to an IPv4-mapped address, which must be decided as
//! IPv4 (no bypass).

use redirect_tests::{
    APP_PORT, Fixture, can_run, other,
    pod::{As, POD_IP6, Side, upstream_extra6},
};

macro_rules! need_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

fn svc6(i: u8, port: u16) -> String {
    format!("[{}]:{port}", upstream_extra6(i))
}

#[test]
fn v6_capture_with_original_destination() {
    need_root!();
    let f = Fixture::new();
    assert_eq!(f.who_answers(As::APP, &svc6(1, 80)), "upstream");
    f.apply_ok(&["-i", "*"]);
    let v = f.connect(As::APP, &svc6(1, 80));
    let reply = v.reply.clone().unwrap_or_else(|| panic!("{v:?}"));
    assert_eq!(reply.server, "proxy", "{v:?}");
    assert_eq!(reply.local, "[::1]:15001", "{v:?}");
    // IP6T_SO_ORIGINAL_DST answers the IPv6 destination.
    assert_eq!(reply.orig_dst.as_deref(), Some(svc6(1, 80).as_str()));
    // The app sees the peer it asked for, from its pod address; the proxy
    // sees the app's socket as its peer.
    assert_eq!(v.peer.as_deref(), Some(svc6(1, 80).as_str()));
    let local = v.local.clone().unwrap();
    assert!(local.starts_with(&format!("[{POD_IP6}]:")), "{v:?}");
    assert_eq!(reply.peer, local);
    // The proxy itself is exempt over IPv6 too.
    assert_eq!(f.who_answers(As::PROXY, &svc6(1, 80)), "upstream");
}

#[test]
fn v4_mapped_destination_is_decided_as_ipv4() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "10.201.0.0/24", "-x", "10.201.0.2/32"]);
    // An AF_INET6 socket to ::ffff:10.201.0.1: captured by the IPv4 include
    // list, and the proxy (an IPv4 connection) learns the IPv4 destination.
    let v = f.connect(As::APP, "[::ffff:10.201.0.1]:80");
    let reply = v.reply.clone().unwrap_or_else(|| panic!("{v:?}"));
    assert_eq!(reply.server, "proxy", "{v:?}");
    assert_eq!(reply.orig_dst.as_deref(), Some("10.201.0.1:80"));
    assert_eq!(reply.local, "127.0.0.1:15001");
    assert_eq!(v.peer.as_deref(), Some("[::ffff:10.201.0.1]:80"));
    assert_eq!(
        v.local
            .as_deref()
            .map(|l| l.starts_with("[::ffff:10.200.0.2]:")),
        Some(true),
        "{v:?}"
    );
    // The IPv4 exclude list applies to the mapped form too.
    assert_eq!(f.who_answers(As::APP, "[::ffff:10.201.0.2]:80"), "upstream");
    // And the IPv4 loopback rules.
    assert_eq!(
        f.who_answers(As::APP, &format!("[::ffff:127.0.0.1]:{APP_PORT}")),
        "app"
    );
}

#[test]
fn v6_loopback_is_not_captured() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    assert_eq!(f.who_answers(As::APP, &format!("[::1]:{APP_PORT}")), "app");
    // The app calling its own pod address over IPv6 (rule 3b).
    assert_eq!(
        f.who_answers(As::APP, &format!("[{POD_IP6}]:{APP_PORT}")),
        "app"
    );
}

#[test]
fn v6_proxy_to_own_pod_address_goes_to_the_inbound_port() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    // Rule 3a over IPv6: the proxy calling the pod's own address.
    let to = format!("[{POD_IP6}]:{APP_PORT}");
    let v = f.connect(As::PROXY, &to);
    let reply = v.reply.unwrap_or_else(|| panic!("{:?}", v.error));
    assert_eq!(reply.server, "proxy");
    assert_eq!(reply.local, "[::1]:15006");
    assert_eq!(reply.orig_dst.as_deref(), Some(to.as_str()));
}

#[test]
fn v6_cidrs() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "fd00:201::/125", "-x", "fd00:201::2/128"]);
    assert_eq!(f.who_answers(As::APP, &svc6(1, 80)), "proxy");
    assert_eq!(f.who_answers(As::APP, &svc6(2, 80)), "upstream");
    assert_eq!(f.who_answers(As::APP, &svc6(9, 80)), "upstream");
    // IPv6 CIDRs say nothing about IPv4.
    assert_eq!(f.who_answers(As::APP, "10.201.0.1:80"), "upstream");
    // The owner rules hold for IPv6 as for IPv4.
    assert_eq!(f.who_answers(other(2000, 1337), &svc6(1, 80)), "upstream");
    let st = f.status().expect("status");
    let ex = st["policy"]["exclude_cidrs"].as_array().unwrap();
    assert!(ex.iter().any(|c| c == "fd00:201::2/128"), "{st}");
}

#[test]
fn v6_inbound_capture() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-b", "*"]);
    let to = format!("[{POD_IP6}]:{APP_PORT}");
    let v = f
        .pod
        .connect_from(Side::Upstream, As::PROXY_LESS, &to, None)
        .unwrap();
    let reply = v.reply.unwrap_or_else(|| panic!("{:?}", v.error));
    assert_eq!(reply.server, "proxy");
    assert_eq!(reply.local, to);
    assert_eq!(reply.orig_dst.as_deref(), Some(to.as_str()));
}

//! redirect with a real third-party transparent proxy: HAProxy from Debian
//! (2.6 on bookworm), run inside the pod as UID 1337 in `proxy/` in place of
//! the sample proxy, configured as a sidecar (see
//! [`haproxy::sidecar_config`]). Outbound it connects to the original
//! destination it reads with `SO_ORIGINAL_DST` (`server orig 0.0.0.0:0`);
//! when that call fails, HAProxy falls back to the address it accepted on,
//! 127.0.0.1:15001, and connects to itself, again and again until its
//! connection limit is used up. The tests below check that never happens,
//! from HAProxy's own log of every connection.
//!
//! HAProxy 2.6 asks `SO_ORIGINAL_DST` on IPv4 sockets only (its IPv6
//! listeners take the socket's own address), behind iptables as behind
//! redirect, so outbound IPv6 is covered here by an IPv6 socket connecting
//! to an IPv4-mapped address; inbound, where HAProxy needs no original
//! destination, is IPv4 and IPv6.

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use redirect_tests::{
    APP_PORT, Fixture, can_run,
    haproxy::{self, AbRun, Haproxy, LogLine},
    peer::ClientView,
    pod::{As, POD_IP, POD_IP6, Side, UPSTREAM_IP, UPSTREAM_IP6, sample_bin, upstream_extra},
};

macro_rules! need_haproxy {
    () => {
        if !can_run() || !haproxy::installed() {
            return;
        }
    };
}

/// HAProxy's connection limit in the pod (`global maxconn`): far above
/// what the tests need at once, and what a self-connection loop uses up.
const MAXCONN: u32 = 1000;
/// Port of the upstream HTTP server (another HAProxy) for `ab`.
const WEB_PORT: u16 = 8000;
/// A second application port, to show HAProxy's inbound side forwards to
/// the port the client asked for.
const APP2_PORT: u16 = 9090;

fn svc(i: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(upstream_extra(i)), port)
}

/// The pod with HAProxy as its sidecar (and no sample proxy).
fn sidecar(f: &Fixture) -> Haproxy {
    let h = Haproxy::start(
        &f.pod,
        Side::Pod,
        As::PROXY,
        "sidecar",
        &haproxy::sidecar_config(MAXCONN),
        &[15001, 15006],
    );
    eprintln!("{}", haproxy::version());
    h
}

/// Log lines in which HAProxy talked to itself: accepted from a loopback
/// client on a proxy port, or connected to one. None may exist.
fn self_connections(log: &[LogLine]) -> Vec<&LogLine> {
    let proxy_port = |a: Option<SocketAddr>| a.is_some_and(|a| [15001, 15006].contains(&a.port()));
    log.iter()
        .filter(|l| proxy_port(l.server) || proxy_port(l.frontend))
        .collect()
}

fn counter(f: &Fixture, name: &str) -> u64 {
    let st = f.status().expect("redirect status");
    st["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}: {st}"))
}

/// The app (UID 1000) connects to upstream services over IPv4 and, from an
/// IPv6 socket, to an IPv4-mapped address; each answer comes from the
/// upstream server, which HAProxy reached at the original destination.
#[test]
fn outbound_through_haproxy_reaches_the_original_destination() {
    need_haproxy!();
    let f = Fixture::without_proxy();
    let h = sidecar(&f);
    f.apply_ok(&["-i", "*"]);

    let targets = [
        (svc(1, 80).to_string(), svc(1, 80)),
        (svc(2, 81).to_string(), svc(2, 81)),
        (svc(9, 82).to_string(), svc(9, 82)),
        (format!("[::ffff:{}]:80", upstream_extra(3)), svc(3, 80)),
    ];
    for (to, dst) in &targets {
        let v = f.connect(As::APP, to);
        let reply = v
            .reply
            .as_ref()
            .unwrap_or_else(|| panic!("{to}: {v:?}\n{}", h.stderr()));
        assert_eq!(reply.server, "upstream", "{to}: {v:?}");
        // Where HAProxy connected is the upstream's local address.
        assert_eq!(reply.local, dst.to_string(), "{to}: {v:?}");
        // Upstream sees HAProxy's own connection, from the pod, not
        // redirected (UID 1337 is exempt): no original destination there.
        assert!(reply.peer.starts_with(&format!("{POD_IP}:")), "{v:?}");
        assert_eq!(reply.orig_dst, None, "{v:?}");
        // The app sees the peer it asked for.
        assert_eq!(v.peer.as_deref(), Some(to.as_str()), "{v:?}");
    }

    let log = h.log_settled(targets.len(), Duration::from_secs(10));
    assert_eq!(log.len(), targets.len(), "{log:#?}");
    for (_, dst) in &targets {
        let l = log
            .iter()
            .find(|l| l.server == Some(*dst))
            .unwrap_or_else(|| panic!("HAProxy never connected to {dst}: {log:#?}"));
        // HAProxy's view of the connection it accepted: the original
        // destination (SO_ORIGINAL_DST), from the app in the pod.
        assert_eq!(l.frontend, Some(*dst), "{l:?}");
        assert_eq!(l.client.map(|c| c.ip()), Some(IpAddr::V4(POD_IP)), "{l:?}");
        assert_eq!(l.termination, "--", "{l:?}");
    }
    assert!(self_connections(&log).is_empty(), "{log:#?}");
    assert_eq!(counter(&f, "orig_dst_served"), targets.len() as u64);
    assert_eq!(counter(&f, "orig_dst_missing"), 0);
}

/// A client outside the pod connects to the app's ports over IPv4 and
/// IPv6; `sk_lookup` hands the connection to HAProxy's inbound listener,
/// which forwards it to the app on localhost from 127.0.0.6, on the port the
/// client asked for. HAProxy's own connection is not captured again.
#[test]
fn inbound_through_haproxy_reaches_the_app() {
    need_haproxy!();
    let mut f = Fixture::without_proxy();
    f.pod
        .start_server(
            Side::Pod,
            As::APP,
            "app2",
            &[
                &format!("0.0.0.0:{APP2_PORT}"),
                &format!("[::]:{APP2_PORT}"),
            ],
        )
        .expect("second app server");
    let h = sidecar(&f);
    f.apply_ok(&["-i", "*", "-b", "*"]);

    let cases = [
        (SocketAddr::new(IpAddr::V4(POD_IP), APP_PORT), "app"),
        (SocketAddr::new(IpAddr::V4(POD_IP), APP2_PORT), "app2"),
        (SocketAddr::new(IpAddr::V6(POD_IP6), APP_PORT), "app"),
        (SocketAddr::new(IpAddr::V6(POD_IP6), APP2_PORT), "app2"),
    ];
    for (to, server) in &cases {
        let v = f.connect_in(&to.to_string());
        let reply = v
            .reply
            .as_ref()
            .unwrap_or_else(|| panic!("{to}: {v:?}\n{}", h.stderr()));
        assert_eq!(reply.server, *server, "{to}: {v:?}");
        assert_eq!(reply.local, format!("127.0.0.1:{}", to.port()), "{v:?}");
        assert!(reply.peer.starts_with("127.0.0.6:"), "{v:?}");
        assert_eq!(v.peer, Some(to.to_string()), "{v:?}");
    }

    let log = h.log_settled(cases.len(), Duration::from_secs(10));
    assert_eq!(log.len(), cases.len(), "{log:#?}");
    for (to, _) in &cases {
        let l = log
            .iter()
            .find(|l| l.frontend == Some(*to))
            .unwrap_or_else(|| panic!("HAProxy never accepted {to}: {log:#?}"));
        let client = if to.is_ipv4() {
            IpAddr::V4(UPSTREAM_IP)
        } else {
            IpAddr::V6(UPSTREAM_IP6)
        };
        assert_eq!(l.client.map(|c| c.ip()), Some(client), "{l:?}");
        assert_eq!(
            l.server,
            Some(SocketAddr::new([127, 0, 0, 1].into(), to.port())),
            "{l:?}"
        );
        assert_eq!(
            l.backend_source.map(|s| s.ip()),
            Some(IpAddr::from([127, 0, 0, 6])),
            "{l:?}"
        );
        assert_eq!(l.termination, "--", "{l:?}");
    }
    let st = f.status().expect("status");
    assert_eq!(st["decisions"]["inbound_all"], 4, "{st}");
    // HAProxy asks on its IPv4 sockets only. (The sample app servers ask
    // too, on HAProxy's unredirected connections to them: those count as
    // `orig_dst_missing`.)
    assert_eq!(st["counters"]["orig_dst_served"], 2, "{st}");
}

/// Apps that connect, send a request and close at once (`--send-then
/// close`) or reset (`--send-then reset`), many at a time, while `ab` keeps
/// a request/response load going through HAProxy. By the time HAProxy asks
/// `SO_ORIGINAL_DST` the app's socket may be gone; the answer must still be
/// the original destination, or HAProxy connects to itself.
fn early_close_storm(how: &str) {
    const APPS: usize = 8;
    const PER_APP: usize = 400;
    const AB_BATCH: u32 = 500;
    let f = Fixture::without_proxy();
    let web_addr = svc(1, WEB_PORT);
    let _web = Haproxy::start(
        &f.pod,
        Side::Upstream,
        As::PROXY_LESS,
        "web",
        &haproxy::http_responder_config(&[web_addr], "upstream"),
        &[WEB_PORT],
    );
    let h = sidecar(&f);
    f.apply_ok(&["-i", "*"]);

    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    let storm_done = AtomicBool::new(false);
    let (storm, load): (Vec<Vec<ClientView>>, Vec<AbRun>) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            // Batches until the storm is over, at least one after it began.
            let mut runs = Vec::new();
            loop {
                let over = storm_done.load(Ordering::Relaxed);
                runs.push(haproxy::ab(
                    &f.pod,
                    Side::Pod,
                    As::APP,
                    &format!("http://{web_addr}/"),
                    AB_BATCH,
                    10,
                    deadline,
                ));
                if over || Instant::now() >= deadline {
                    return runs;
                }
            }
        });
        let apps: Vec<_> = (0..APPS)
            .map(|app| {
                let f = &f;
                s.spawn(move || {
                    let targets: Vec<String> = (0..PER_APP)
                        .map(|n| svc(((app + n) % 9 + 1) as u8, 80).to_string())
                        .collect();
                    send_then(f, how, &targets, deadline)
                })
            })
            .collect();
        let storm = apps
            .into_iter()
            .map(|a| a.join().expect("storm thread"))
            .collect();
        storm_done.store(true, Ordering::Relaxed);
        (storm, load.join().expect("load thread"))
    });
    let elapsed = start.elapsed();

    let storm: Vec<ClientView> = storm.into_iter().flatten().collect();
    let failed: Vec<&ClientView> = storm.iter().filter(|v| !v.ok).collect();
    let requests: u64 = load.iter().map(|r| r.complete).sum();
    let load_failed: u64 = load.iter().map(|r| r.failed + r.non_2xx).sum();
    let mut rps: Vec<f64> = load.iter().map(|r| r.rps).collect();
    rps.sort_by(f64::total_cmp);
    eprintln!(
        "send-then {how}: {} connections from {APPS} apps, ab {requests} requests in {} runs \
         ({load_failed} failed; requests/s per run: min {:.0}, median {:.0}, max {:.0}), \
         in {elapsed:.1?}",
        storm.len(),
        load.len(),
        rps[0],
        rps[rps.len() / 2],
        rps[rps.len() - 1],
    );

    let expected = storm.len() + requests as usize;
    let log = h.log_settled(expected, Duration::from_secs(30));
    let mut ends = std::collections::BTreeMap::<&str, usize>::new();
    for l in &log {
        *ends.entry(l.termination.as_str()).or_default() += 1;
    }
    eprintln!(
        "HAProxy logged {} connections, termination states {ends:?}; redirect counters {:?}",
        log.len(),
        f.status().map(|s| s["counters"].clone())
    );
    let loops = self_connections(&log);
    assert!(
        loops.is_empty(),
        "HAProxy connected to itself {} times (of {} logged connections), e.g. {:#?}",
        loops.len(),
        log.len(),
        &loops[..loops.len().min(5)]
    );
    assert_eq!(counter(&f, "orig_dst_missing"), 0);
    // Every connection reached HAProxy and got its original destination
    // (ab may open a few more connections than it counts requests).
    assert!(log.len() >= expected, "{} of {expected} logged", log.len());
    assert!(counter(&f, "orig_dst_served") >= expected as u64);
    // Every connection HAProxy handled was for an upstream address.
    let stray: Vec<&LogLine> = log
        .iter()
        .filter(|l| !l.frontend.is_some_and(is_upstream))
        .collect();
    assert!(stray.is_empty(), "{:#?}", &stray[..stray.len().min(5)]);
    assert!(
        failed.is_empty(),
        "{} early-close connects failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(
        load.iter().all(|r| !r.timed_out && !r.exit_failed) && load_failed == 0,
        "the concurrent load did not go through: {:#?}",
        load
    );
    assert!(requests >= u64::from(AB_BATCH), "{load:#?}");
}

fn is_upstream(a: SocketAddr) -> bool {
    (1..=9).any(|i| a.ip() == IpAddr::V4(upstream_extra(i)))
}

/// One app process: connects to each of `targets` in turn, sends a request
/// and closes (`how`: `close` or `reset`); killed at `deadline` (its
/// connections so far are returned, and one failed view for the rest).
fn send_then(f: &Fixture, how: &str, targets: &[String], deadline: Instant) -> Vec<ClientView> {
    let mut cmd = f
        .pod
        .command(Side::Pod, As::APP, &sample_bin().expect("redirect-sample"))
        .expect("sample client command");
    cmd.args(["connect", "--send-then", how]);
    for t in targets {
        cmd.arg("--to").arg(t);
    }
    let (out, timed_out) = haproxy::output_until(&mut cmd, deadline);
    assert!(
        timed_out || out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut views: Vec<ClientView> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if views.len() < targets.len() {
        views.push(ClientView {
            ok: false,
            error: Some(format!(
                "killed at the deadline after {} of {} connections",
                views.len(),
                targets.len()
            )),
            local: None,
            peer: None,
            reply: None,
        });
    }
    views
}

#[test]
fn send_then_close_under_load_never_loops() {
    need_haproxy!();
    early_close_storm("close");
}

#[test]
fn send_then_reset_under_load_never_loops() {
    need_haproxy!();
    early_close_storm("reset");
}

//! DNS capture (istio's `--redirect-dns`, rule 5) on a real kernel, with
//! real resolvers and nameservers: dnsmasq as the upstream nameserver (in
//! the upstream namespace) and as the mesh's DNS proxy (in the pod, as the
//! proxy's UID, on 15053), `dig`, glibc's resolver (`getent`) and Python
//! clients on raw UDP sockets (`redirect_tests::dns`).
//!
//! As under iptables: the application's queries, UDP and TCP, to port 53 of
//! a listed nameserver (or of any address with `--capture-all-dns`) reach
//! the DNS proxy, and the application sees the answer come from the
//! nameserver it asked (`recvfrom`'s source, `getpeername`), which glibc and
//! dig check; the proxy's own queries go out untouched; other UDP ports
//! never move.
//!
//! `REDIRECT_TEST_DNS_BACKEND=iptables-legacy` (or `iptables-nft`) runs the
//! same tests with istio's own rules instead, as `redirect iptables`
//! renders them, loaded into the pod's namespace: a check that what this
//! file expects is what iptables does.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    sync::Mutex,
};

use redirect_tests::{
    Fixture, can_run,
    dns::{
        DNS_PROXY_PORT, Dig, Dns, FORWARDED_A, FORWARDED_NAME, NAME, PROXY_A, PROXY_AAAA,
        UPSTREAM_A, UPSTREAM_AAAA, getent_addresses, mapped, sockaddr,
    },
    other,
    pod::{As, POD_IP, POD_IP6, Side, UPSTREAM_IP, UPSTREAM_IP6, upstream_extra, upstream_extra6},
    redirect_bin, scaled, state_entries_after_close,
};
use serde_json::{Value, json};

macro_rules! need_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

/// `Some("legacy")` or `Some("nft")` when the tests run against real
/// iptables (`REDIRECT_TEST_DNS_BACKEND`), `None` for redirect.
fn iptables_backend() -> Option<&'static str> {
    match std::env::var("REDIRECT_TEST_DNS_BACKEND").as_deref() {
        Err(_) | Ok("") | Ok("redirect") => None,
        Ok("iptables-legacy") => Some("legacy"),
        Ok("iptables-nft") => Some("nft"),
        Ok(other) => panic!(
            "REDIRECT_TEST_DNS_BACKEND={other}: want redirect, iptables-legacy or iptables-nft"
        ),
    }
}

/// Applies `policy` to the pod: with redirect ([`Fixture::apply_ok`], one
/// shot or node mode), or as istio's iptables rules.
fn apply(f: &Fixture, policy: &[&str]) {
    let Some(backend) = iptables_backend() else {
        f.apply_ok(policy);
        return;
    };
    for family in ["4", "6"] {
        let mut args = vec!["iptables", "--family", family];
        args.extend_from_slice(policy);
        let out = Command::new(redirect_bin())
            .args(&args)
            .output()
            .expect("redirect iptables");
        assert!(
            out.status.success(),
            "redirect {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        restore(f, backend, family, &String::from_utf8_lossy(&out.stdout));
    }
}

/// Undoes [`apply`].
fn remove(f: &Fixture) {
    let Some(backend) = iptables_backend() else {
        let out = f.remove();
        assert!(
            out.status.success(),
            "redirect remove: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    };
    for family in ["4", "6"] {
        restore(f, backend, family, "*nat\nCOMMIT\n*raw\nCOMMIT\n");
    }
}

fn restore(f: &Fixture, backend: &str, family: &str, script: &str) {
    // iptables-legacy-restore fails when another holds the xtables lock.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _lock = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cmd = match family {
        "4" => format!("iptables-{backend}-restore"),
        _ => format!("ip6tables-{backend}-restore"),
    };
    let mut child = Command::new("ip")
        .args(["netns", "exec", &f.pod.netns_name(Side::Pod), &cmd])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ip netns exec iptables-restore");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("writing the rules");
    let out = child.wait_with_output().expect("iptables-restore");
    assert!(
        out.status.success(),
        "{cmd}: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--dns-servers` for the upstream nameserver, IPv4 and IPv6.
fn upstream_servers() -> String {
    format!("{UPSTREAM_IP},{UPSTREAM_IP6}")
}

/// dig answered `want` (only), said it asked `server` port 53 over
/// `transport`, and saw no reply from another source.
#[track_caller]
fn assert_dig(d: &Dig, want: &str, server: &str, transport: &str) {
    assert!(d.ok, "no answer:\n{}", d.text);
    assert_eq!(d.answers, [want], "{}", d.text);
    assert_eq!(
        d.server.as_deref(),
        Some(format!("{server}#53").as_str()),
        "{}",
        d.text
    );
    assert_eq!(d.transport.as_deref(), Some(transport), "{}", d.text);
    assert!(!d.unexpected_source(), "{}", d.text);
}

/// One application query per transport and family: `(server, type, dig
/// flags, transport)`.
fn queries() -> Vec<(String, &'static str, &'static [&'static str], &'static str)> {
    let (v4, v6) = (UPSTREAM_IP.to_string(), UPSTREAM_IP6.to_string());
    vec![
        (v4.clone(), "A", &[], "UDP"),
        (v4, "A", &["+tcp"], "TCP"),
        (v6.clone(), "AAAA", &[], "UDP"),
        (v6.clone(), "AAAA", &["+tcp"], "TCP"),
        // An A query over IPv6: the family of the transport, not of the
        // question, picks [::1]:15053.
        (v6, "A", &[], "UDP"),
    ]
}

fn want(qtype: &str, proxy: bool) -> &'static str {
    match (qtype, proxy) {
        ("A", true) => PROXY_A,
        ("A", false) => UPSTREAM_A,
        (_, true) => PROXY_AAAA,
        (_, false) => UPSTREAM_AAAA,
    }
}

/// Runs [`queries`] as `who` and checks who answered.
#[track_caller]
fn check_queries(d: &Dns, who: As, by_proxy: bool) {
    for (server, qtype, flags, transport) in queries() {
        let mut args = vec![NAME, qtype];
        args.extend_from_slice(flags);
        let r = d.dig(who, &server, &args);
        assert_dig(&r, want(qtype, by_proxy), &server, transport);
    }
}

/// The fixtures themselves, and what holds with no DNS capture: the
/// application's queries reach the upstream nameserver, also with TCP
/// capture on (`-i '*'` takes TCP only: UDP to port 53 never goes to
/// 15001), and the DNS proxy answers differently when asked directly.
#[test]
fn without_dns_capture_queries_reach_the_nameserver() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    check_queries(&d, As::APP, false);
    for a in ["127.0.0.1", "::1"] {
        let r = d.dig_on(Side::Pod, As::APP, a, DNS_PROXY_PORT, &[NAME]);
        assert_eq!(r.answers, [PROXY_A], "{}", r.text);
    }

    apply(&f, &["-i", "*"]);
    for server in [UPSTREAM_IP.to_string(), UPSTREAM_IP6.to_string()] {
        assert_dig(
            &d.dig(As::APP, &server, &[NAME]),
            UPSTREAM_A,
            &server,
            "UDP",
        );
    }
    let v = d.python(
        As::APP,
        "connected",
        &json!({"family": 4, "server": UPSTREAM_IP.to_string(), "name": NAME}),
    );
    assert_eq!(v["from"], sockaddr(&UPSTREAM_IP.to_string(), 53), "{v}");
    assert_eq!(v["answers1"], json!([UPSTREAM_A]), "{v}");
}

/// The application's queries, UDP and TCP, IPv4 and IPv6, to a listed
/// nameserver are answered by the DNS proxy, and dig sees the answer come
/// from the nameserver (its `;; SERVER:` line, no "reply from unexpected
/// source"). TCP to port 53 goes to 15053 although `-i '*'` sends other TCP
/// to 15001 (rule 5 comes before rule 9). After `remove`, the nameserver
/// answers again.
#[test]
fn app_queries_reach_the_dns_proxy_and_answers_come_from_the_nameserver() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    apply(
        &f,
        &[
            "-i",
            "*",
            "--redirect-dns",
            "--dns-servers",
            &upstream_servers(),
        ],
    );
    check_queries(&d, As::APP, true);
    // Another application UID, GID and cgroup are captured alike.
    check_queries(&d, other(2000, 2000), true);

    remove(&f);
    check_queries(&d, As::APP, false);
}

/// The proxy's own queries (its UID, or any UID with its GID) go to the
/// nameserver; so the DNS proxy can forward what it does not answer itself:
/// the application's query for a name only upstream knows comes back with
/// upstream's answer, which it could not if the proxy's forwarded query
/// were captured again (it would loop to itself).
#[test]
fn proxy_own_queries_are_not_captured() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    apply(
        &f,
        &["--redirect-dns", "--dns-servers", &upstream_servers()],
    );
    check_queries(&d, As::PROXY, false);
    check_queries(&d, other(2000, 1337), false);

    for server in [UPSTREAM_IP.to_string(), UPSTREAM_IP6.to_string()] {
        for flags in [&[][..], &["+tcp"][..]] {
            let mut args = vec![FORWARDED_NAME, "A"];
            args.extend_from_slice(flags);
            let r = d.dig(As::APP, &server, &args);
            let transport = if flags.is_empty() { "UDP" } else { "TCP" };
            assert_dig(&r, FORWARDED_A, &server, transport);
        }
    }
    // The forwarded queries reached upstream from the pod's address.
    let log = d.log("upstream-53");
    assert!(
        log.contains(&format!("query[A] {FORWARDED_NAME} from {POD_IP}")),
        "upstream's log:\n{log}"
    );
}

/// A proxy exempted by its cgroup alone (no UID or GID owner): its own
/// queries go out, and the app's answers come from the nameserver. A
/// difference from istio's rules, whose conntrack zones key on the proxy's
/// UID and GID: without them the app's answers come from 127.0.0.1:15053
/// (unconnected) or never (connected) under iptables; redirect needs no
/// zones (docs/semantics.md).
#[test]
fn proxy_exempted_by_its_cgroup_alone() {
    need_root!();
    if iptables_backend().is_some() {
        // The difference itself: see the doc comment.
        return;
    }
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    let proxy_cgroup = f.pod.cgroup.join("proxy").display().to_string();
    apply(
        &f,
        &[
            "-u",
            "",
            "-g",
            "",
            "--proxy-cgroup",
            &proxy_cgroup,
            "--redirect-dns",
            "--dns-servers",
            &upstream_servers(),
        ],
    );
    check_queries(&d, As::APP, true);
    check_queries(&d, As::PROXY, false);
    let v4 = UPSTREAM_IP.to_string();
    assert_dig(
        &d.dig(As::APP, &v4, &[FORWARDED_NAME, "A"]),
        FORWARDED_A,
        &v4,
        "UDP",
    );
}

/// Only the listed nameservers are captured (`--dns-servers`); with
/// `--capture-all-dns` every address's port 53 is.
#[test]
fn only_listed_nameservers_are_captured_unless_capture_all() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    let (v4, v6) = (UPSTREAM_IP.to_string(), UPSTREAM_IP6.to_string());
    let (x4, x6) = (
        upstream_extra(1).to_string(),
        upstream_extra6(1).to_string(),
    );
    apply(
        &f,
        &["--redirect-dns", "--dns-servers", &format!("{x4},{x6}")],
    );
    for (server, by_proxy) in [(&v4, false), (&v6, false), (&x4, true), (&x6, true)] {
        for (flags, transport) in [(&[][..], "UDP"), (&["+tcp"][..], "TCP")] {
            let mut args = vec![NAME, "A"];
            args.extend_from_slice(flags);
            let r = d.dig(As::APP, server, &args);
            assert_dig(&r, want("A", by_proxy), server, transport);
        }
    }

    apply(
        &f,
        &[
            "--redirect-dns",
            "--capture-all-dns",
            "--dns-servers",
            &format!("{x4},{x6}"),
        ],
    );
    check_queries(&d, As::APP, true);
    for server in [&x4, &x6] {
        assert_dig(&d.dig(As::APP, server, &[NAME]), PROXY_A, server, "UDP");
    }
    // Still not the proxy's own.
    check_queries(&d, As::PROXY, false);
}

/// An excluded outbound port 53 (`-o 53`, rule 1, TCP and UDP) comes before
/// DNS capture.
#[test]
fn excluded_port_53_is_not_captured() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    apply(
        &f,
        &["-i", "*", "-o", "53", "--redirect-dns", "--capture-all-dns"],
    );
    check_queries(&d, As::APP, false);
}

/// A nameserver on a loopback address (a node-local cache such as
/// 127.0.0.53): rule 3b passes the application's loopback TCP except to
/// port 53 when DNS capture is on, and never UDP, so its queries to it are
/// captured, UDP and TCP. Nothing listens there: uncaptured, they fail.
#[test]
fn loopback_nameserver_is_captured() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    let lo = "127.0.0.53";
    assert!(!d.dig(As::APP, lo, &[NAME]).ok);
    apply(&f, &["-i", "*", "--redirect-dns", "--dns-servers", lo]);
    assert_dig(&d.dig(As::APP, lo, &[NAME]), PROXY_A, lo, "UDP");
    assert_dig(&d.dig(As::APP, lo, &[NAME, "+tcp"]), PROXY_A, lo, "TCP");
    // The proxy's own are not: nothing answers them.
    for flags in [&[NAME][..], &[NAME, "+tcp"][..]] {
        let r = d.dig(As::PROXY, lo, flags);
        assert!(!r.ok && r.answers.is_empty(), "{}", r.text);
    }
}

/// A resolv.conf naming the upstream nameserver's IPv4 address, with
/// glibc's retries cut short so that a dropped answer fails fast.
fn resolv_v4() -> String {
    format!("nameserver {UPSTREAM_IP}\noptions timeout:1 attempts:1\n")
}

/// glibc's resolver takes an answer only from the nameserver it asked
/// (its source address and port), so getting the DNS proxy's answer through
/// `getaddrinfo` shows the source is rewritten: over UDP (one query, and A
/// and AAAA in flight at once on one socket), over TCP (`use-vc`), and to an
/// IPv6 nameserver. The proxy's own lookups get upstream's answer.
#[test]
fn glibc_resolver_gets_the_proxy_answer() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    let run = |who: As, resolv: &str, args: &[&str]| {
        let out = d.getent(who, resolv, args);
        let got = getent_addresses(&out);
        let msg = format!(
            "getent {args:?} with\n{resolv}exited {:?}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (got, msg)
    };
    let resolv = resolv_v4();
    let (got, msg) = run(As::APP, &resolv, &["ahostsv4", NAME]);
    assert_eq!(got, [UPSTREAM_A], "before apply: {msg}");

    apply(
        &f,
        &["--redirect-dns", "--dns-servers", &upstream_servers()],
    );
    let tcp = format!("{resolv}options use-vc\n");
    let v6 = format!("nameserver {UPSTREAM_IP6}\noptions timeout:1 attempts:1\n");
    let cases: [(&str, &[&str], &[&str]); 5] = [
        (&resolv, &["ahostsv4", NAME], &[PROXY_A]),
        (&resolv, &["ahostsv6", NAME], &[PROXY_AAAA]),
        (&resolv, &["ahosts", NAME], &[PROXY_AAAA, PROXY_A]),
        (&tcp, &["ahosts", NAME], &[PROXY_AAAA, PROXY_A]),
        (&v6, &["ahosts", NAME], &[PROXY_AAAA, PROXY_A]),
    ];
    for (resolv, args, want) in cases {
        let (mut got, msg) = run(As::APP, resolv, args);
        got.sort();
        let mut want = want.to_vec();
        want.sort();
        assert_eq!(got, want, "{msg}");
    }
    let (got, msg) = run(As::PROXY, &resolv, &["ahostsv4", NAME]);
    assert_eq!(got, [UPSTREAM_A], "the proxy: {msg}");
}

/// `--resolv-conf FILE` instead of `--dns-servers`: its nameservers are the
/// ones captured.
#[test]
fn nameservers_from_resolv_conf() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    let file = d.write_file(
        "pod-resolv.conf",
        &format!("search svc.cluster.local\nnameserver {UPSTREAM_IP}\noptions ndots:5\n"),
    );
    apply(
        &f,
        &[
            "--redirect-dns",
            "--resolv-conf",
            &file.display().to_string(),
        ],
    );
    let v4 = UPSTREAM_IP.to_string();
    assert_dig(&d.dig(As::APP, &v4, &[NAME]), PROXY_A, &v4, "UDP");
    assert_dig(&d.dig(As::APP, &v4, &[NAME, "+tcp"]), PROXY_A, &v4, "TCP");
    // Not listed there: not captured.
    let x4 = upstream_extra(1).to_string();
    assert_dig(&d.dig(As::APP, &x4, &[NAME]), UPSTREAM_A, &x4, "UDP");
    let v6 = UPSTREAM_IP6.to_string();
    assert_dig(&d.dig(As::APP, &v6, &[NAME]), UPSTREAM_A, &v6, "UDP");
    let out = d.getent(As::APP, &resolv_v4(), &["ahostsv4", NAME]);
    assert_eq!(getent_addresses(&out), [PROXY_A], "{out:?}");
}

/// `(family, server as the socket addresses it)`: IPv4, IPv6, and an
/// IPv4-mapped address on an AF_INET6 socket (decided and sent as IPv4).
fn families() -> Vec<(u8, String)> {
    vec![
        (4, UPSTREAM_IP.to_string()),
        (6, UPSTREAM_IP6.to_string()),
        (6, mapped(UPSTREAM_IP)),
    ]
}

#[track_caller]
fn no_error(v: &Value) {
    assert!(v.get("error").is_none(), "{v}");
}

/// Connected UDP (what glibc and dig use): `getpeername`, `recvfrom`'s
/// source and `recv` show the nameserver, and the answers are the proxy's.
#[test]
fn connected_udp_shows_the_nameserver() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    apply(
        &f,
        &["--redirect-dns", "--dns-servers", &upstream_servers()],
    );
    for (who, answer) in [(As::APP, PROXY_A), (As::PROXY, UPSTREAM_A)] {
        for (family, server) in families() {
            let v = d.python(
                who,
                "connected",
                &json!({"family": family, "server": server, "name": NAME}),
            );
            no_error(&v);
            let ns = sockaddr(&server, 53);
            assert_eq!(v["peer"], ns, "getpeername: {v}");
            assert_eq!(v["from"], ns, "recvfrom's source: {v}");
            assert_eq!(v["peer_after"], ns, "{v}");
            assert_eq!((&v["id1"], &v["id2"]), (&json!(0x1234), &json!(0x4321)));
            assert_eq!(v["answers1"], json!([answer]), "{v}");
            assert_eq!(v["answers2"], json!([answer]), "{v}");
        }
    }
}

/// The application's connected UDP socket keeps the local address the
/// route to the nameserver gives, the pod's, as under iptables REDIRECT
/// (which rewrites packets, not the socket).
#[test]
fn connected_udp_local_address_is_the_pod_address() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    apply(
        &f,
        &["--redirect-dns", "--dns-servers", &upstream_servers()],
    );
    let pod = [
        format!("{POD_IP}:"),
        format!("[{POD_IP6}]:"),
        format!("[{}]:", mapped(POD_IP)),
    ];
    for ((family, server), local) in families().into_iter().zip(pod) {
        let v = d.python(
            As::APP,
            "connected",
            &json!({"family": family, "server": server, "name": NAME}),
        );
        no_error(&v);
        assert_eq!(v["answers1"], json!([PROXY_A]), "{v}");
        let got = v["local"].as_str().unwrap_or_default();
        assert!(
            got.starts_with(&local),
            "getsockname {got}, want {local}*: {v}"
        );
    }
}

/// Unconnected UDP: `sendto` the nameserver, `recvfrom` shows the answer
/// coming from it.
#[test]
fn unconnected_udp_answer_comes_from_the_server_asked() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    apply(
        &f,
        &["--redirect-dns", "--dns-servers", &upstream_servers()],
    );
    for (who, answer) in [(As::APP, PROXY_A), (As::PROXY, UPSTREAM_A)] {
        for (family, server) in families() {
            let v = d.python(
                who,
                "unconnected",
                &json!({"family": family, "queries": [{"server": server, "name": NAME}]}),
            );
            no_error(&v);
            assert_eq!(v["error_count"], 0, "{v}");
            let a = &v["first"][0];
            assert_eq!(a["from"], sockaddr(&server, 53), "{v}");
            assert_eq!(a["answers"], json!([answer]), "{v}");
        }
    }
}

/// Two queries in flight on one unconnected socket to two nameservers, which
/// the proxy answers in reverse order: each answer comes back labelled with
/// the server its own query went to (matched by DNS id), IPv4, IPv6 and
/// IPv4-mapped, over several rounds on the same socket.
#[test]
fn answers_out_of_order_keep_their_own_server() {
    need_root!();
    let f = Fixture::new();
    let mut d = Dns::new(&f);
    // Upstream answers what escapes capture, with its own address.
    d.start_upstream(53);
    let servers = format!(
        "{UPSTREAM_IP},{},{UPSTREAM_IP6},{}",
        upstream_extra(1),
        upstream_extra6(1)
    );
    apply(&f, &["--redirect-dns", "--dns-servers", &servers]);
    let rounds = 5;
    let cases = [
        (
            "127.0.0.1",
            4,
            [UPSTREAM_IP.to_string(), upstream_extra(1).to_string()],
        ),
        (
            "::1",
            6,
            [UPSTREAM_IP6.to_string(), upstream_extra6(1).to_string()],
        ),
        (
            "127.0.0.1",
            6,
            [mapped(UPSTREAM_IP), mapped(upstream_extra(1))],
        ),
    ];
    for (bind, family, [a, b]) in cases {
        let proxy = d.start_fake_proxy(bind, 2, rounds);
        let v = d.python(
            As::APP,
            "unconnected",
            &json!({
                "family": family, "rounds": rounds,
                "queries": [{"server": a, "name": NAME}, {"server": b, "name": NAME}],
            }),
        );
        let p = d.finish_fake_proxy(proxy);
        let ctx = format!("{family} via {bind}: client {v}\nproxy {p}");
        no_error(&v);
        assert!(p.get("error").is_none(), "{ctx}");
        assert_eq!(v["rounds"], rounds, "{ctx}");
        assert_eq!(v["error_count"], 0, "{ctx}");
        // Reverse order: the second query's answer (10.3.3.2) arrives first.
        let first = &v["first"];
        assert_eq!(first[0]["from"], sockaddr(&b, 53), "{ctx}");
        assert_eq!(first[0]["answers"], json!(["10.3.3.2"]), "{ctx}");
        assert_eq!(first[1]["from"], sockaddr(&a, 53), "{ctx}");
        assert_eq!(first[1]["answers"], json!(["10.3.3.1"]), "{ctx}");
        assert_eq!(
            p["answered"].as_array().map(Vec::len),
            Some(2 * rounds),
            "{ctx}"
        );
    }
}

/// Thousands of queries on one socket, alternating two nameservers with two
/// in flight at a time, then hundreds of sockets with one query each: every
/// answer is labelled with its own server, nothing stalls (per-socket state
/// stays bounded and goes with the socket), and no connection state is left
/// once they are closed.
#[test]
fn many_queries_on_one_socket_and_many_sockets() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    let servers = format!(
        "{UPSTREAM_IP},{},{UPSTREAM_IP6},{}",
        upstream_extra(1),
        upstream_extra6(1)
    );
    apply(&f, &["--redirect-dns", "--dns-servers", &servers]);
    let cases = [
        (4, [UPSTREAM_IP.to_string(), upstream_extra(1).to_string()]),
        (
            6,
            [UPSTREAM_IP6.to_string(), upstream_extra6(1).to_string()],
        ),
        (6, [mapped(UPSTREAM_IP), mapped(upstream_extra(1))]),
    ];
    for (family, [a, b]) in cases {
        for (rounds, fresh) in [(scaled(2000), false), (scaled(300), true)] {
            let v = d.python(
                As::APP,
                "unconnected",
                &json!({
                    "family": family, "rounds": rounds, "fresh_socket": fresh,
                    "queries": [{"server": a, "name": NAME}, {"server": b, "name": NAME}],
                }),
            );
            let ctx = format!("{family} {a} {b} fresh {fresh}: {v}");
            no_error(&v);
            assert_eq!(v["rounds"], rounds, "{ctx}");
            assert_eq!(v["error_count"], 0, "{ctx}");
            assert_eq!(v["first"][0]["answers"], json!([PROXY_A]), "{ctx}");
        }
    }
    // TCP queries too, then nothing of any connection is left.
    for _ in 0..20 {
        let v4 = UPSTREAM_IP.to_string();
        assert_dig(&d.dig(As::APP, &v4, &[NAME, "+tcp"]), PROXY_A, &v4, "TCP");
    }
    if iptables_backend().is_none() {
        assert_eq!(state_entries_after_close(&f), 0);
    }
}

/// UDP to any port but 53 is never redirected, even with every address's
/// DNS and all TCP captured: a nameserver on port 5300 answers itself, and
/// its answers come from where they came from.
#[test]
fn udp_to_other_ports_is_never_redirected() {
    need_root!();
    let f = Fixture::new();
    let mut d = Dns::with_servers(&f);
    d.start_upstream(5300);
    apply(&f, &["-i", "*", "--redirect-dns", "--capture-all-dns"]);
    for (family, server) in families() {
        for mode in ["connected", "unconnected"] {
            let v = d.python(
                As::APP,
                mode,
                &json!({
                    "family": family, "server": server, "port": 5300, "name": NAME,
                    "queries": [{"server": server, "port": 5300, "name": NAME}],
                }),
            );
            no_error(&v);
            let (from, answers) = match mode {
                "connected" => (&v["from"], &v["answers1"]),
                _ => (&v["first"][0]["from"], &v["first"][0]["answers"]),
            };
            assert_eq!(*from, sockaddr(&server, 5300), "{mode}: {v}");
            assert_eq!(*answers, json!([UPSTREAM_A]), "{mode}: {v}");
        }
    }
    let r = d.dig_on(Side::Pod, As::APP, &UPSTREAM_IP.to_string(), 5300, &[NAME]);
    assert!(r.ok && !r.unexpected_source(), "{}", r.text);
    assert_eq!(r.answers, [UPSTREAM_A], "{}", r.text);
    // Port 53 of the same server is captured: the test is not vacuous.
    let v4 = UPSTREAM_IP.to_string();
    assert_dig(&d.dig(As::APP, &v4, &[NAME]), PROXY_A, &v4, "UDP");
}

/// Runs the Python client's `steps` mode (one UDP socket of `family`, the
/// steps in order) as the application; one result per step.
fn steps(d: &Dns, family: u8, steps: Value) -> Vec<Value> {
    let v = d.python(
        As::APP,
        "steps",
        &json!({"family": family, "name": NAME, "steps": steps}),
    );
    no_error(&v);
    v["steps"].as_array().cloned().unwrap_or_default()
}

/// The `from` of each `recvfrom` step's result, as `(id, from)`.
fn sources(results: &[Value]) -> Vec<(u64, String)> {
    results
        .iter()
        .filter(|r| r.get("from").is_some())
        .map(|r| {
            (
                r["id"].as_u64().unwrap_or_default(),
                r["from"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The answers of `got` not shown from the server their query was `sent`
/// to (by id), as `id: shown, asked`.
fn misattributed(got: &[(u64, String)], sent: &[(String, u16)]) -> Vec<String> {
    got.iter()
        .filter_map(|(id, from)| {
            let asked = sent
                .iter()
                .find(|(_, i)| u64::from(*i) == *id)
                .map(|(s, _)| sockaddr(s, 53));
            (asked.as_deref() != Some(from.as_str()))
                .then(|| format!("{id}: shown {from}, asked {asked:?}"))
        })
        .collect()
}

/// The two listed nameservers of the ordering tests, and `--dns-servers`
/// with them.
fn two_servers() -> (String, String, String) {
    let (a, b) = (UPSTREAM_IP.to_string(), upstream_extra(1).to_string());
    let list = format!("{a},{b},{UPSTREAM_IP6},{}", upstream_extra6(1));
    (a, b, list)
}

/// One socket connected to a nameserver, then elsewhere (not DNS), then to
/// an unlisted address's port 53, then disconnected (`AF_UNSPEC`) and used
/// unconnected, also straight to the DNS proxy's own port: each answer
/// shows where it came from as the application addressed it.
#[test]
fn reconnecting_and_disconnecting_a_udp_socket() {
    need_root!();
    let f = Fixture::new();
    let mut d = Dns::with_servers(&f);
    d.start_upstream(5300);
    let (a, b, list) = two_servers();
    apply(&f, &["--redirect-dns", "--dns-servers", &list]);
    let unlisted = upstream_extra(2).to_string();
    let r = steps(
        &d,
        4,
        json!([
            ["connect", a, 53],
            ["send", 1],
            ["recvfrom"],
            ["connect", a, 5300],
            ["send", 2],
            ["recvfrom"],
            ["connect", unlisted, 53],
            ["connect", b, 53],
            ["send", 3],
            ["recvfrom"],
            ["disconnect"],
            ["sendto", a, 53, 4],
            ["recvfrom"],
            ["sendto", "127.0.0.1", DNS_PROXY_PORT, 5],
            ["recvfrom"],
            ["sendto", a, 5300, 6],
            ["recvfrom"],
            ["sendto", b, 53, 7],
            ["recvfrom"],
        ]),
    );
    let ctx = format!("{r:#?}");
    let want = [
        (0, json!(sockaddr(&a, 53))),
        (
            2,
            json!({"from": sockaddr(&a, 53), "id": 1, "answers": [PROXY_A]}),
        ),
        (3, json!(sockaddr(&a, 5300))),
        (
            5,
            json!({"from": sockaddr(&a, 5300), "id": 2, "answers": [UPSTREAM_A]}),
        ),
        (6, json!(sockaddr(&unlisted, 53))),
        (7, json!(sockaddr(&b, 53))),
        (
            9,
            json!({"from": sockaddr(&b, 53), "id": 3, "answers": [PROXY_A]}),
        ),
        (10, json!(0)),
        (
            12,
            json!({"from": sockaddr(&a, 53), "id": 4, "answers": [PROXY_A]}),
        ),
        (
            14,
            json!({"from": "127.0.0.1:15053", "id": 5, "answers": [PROXY_A]}),
        ),
        (
            16,
            json!({"from": sockaddr(&a, 5300), "id": 6, "answers": [UPSTREAM_A]}),
        ),
        (
            18,
            json!({"from": sockaddr(&b, 53), "id": 7, "answers": [PROXY_A]}),
        ),
    ];
    for (i, w) in want {
        assert_eq!(r.get(i), Some(&w), "step {i}: {ctx}");
    }
}

/// musl's resolver sends the same query (the same id) to every nameserver
/// at once on one socket and takes the first answer from any of them. Both
/// answers come back, each from one of the nameservers, one from each.
/// (Under iptables each is from the server that answered it; redirect
/// tells queries apart by id only, so with equal ids the first answer is
/// shown from the server asked first, which musl accepts all the same.)
#[test]
fn same_query_to_every_nameserver_as_musl_sends_it() {
    need_root!();
    let f = Fixture::new();
    let mut d = Dns::new(&f);
    d.start_upstream(53);
    let (a, b, list) = two_servers();
    apply(&f, &["--redirect-dns", "--dns-servers", &list]);
    let proxy = d.start_fake_proxy("127.0.0.1", 2, 1);
    let r = steps(
        &d,
        4,
        json!([
            ["sendto", a, 53, 77],
            ["sendto", b, 53, 77],
            ["recvfrom"],
            ["recvfrom"]
        ]),
    );
    let p = d.finish_fake_proxy(proxy);
    let ctx = format!("{r:#?}\nproxy {p}");
    let mut got: Vec<String> = sources(&r).into_iter().map(|(_, s)| s).collect();
    got.sort();
    let mut want = vec![sockaddr(&a, 53), sockaddr(&b, 53)];
    want.sort();
    assert_eq!(got, want, "{ctx}");
}

/// Reading an answer with `MSG_PEEK` first, then for real, shows the same
/// source both times, and the next answer's own; as under iptables, where
/// the source is in the datagram.
#[test]
#[ignore = "known difference (docs/semantics.md, DNS capture): a MSG_PEEK takes the answer's queued nameserver as a read does"]
fn peeked_answer_shows_the_same_source_as_the_read() {
    need_root!();
    let f = Fixture::new();
    let mut d = Dns::new(&f);
    d.start_upstream(53);
    let (a, b, list) = two_servers();
    apply(&f, &["--redirect-dns", "--dns-servers", &list]);
    let proxy = d.start_fake_proxy("127.0.0.1", 2, 1);
    let r = steps(
        &d,
        4,
        json!([
            ["sendto", a, 53, 1],
            ["sendto", b, 53, 2],
            ["peek"],
            ["recvfrom"],
            ["peek"],
            ["recvfrom"],
        ]),
    );
    let p = d.finish_fake_proxy(proxy);
    // Reverse order: b's answer (id 2) first.
    let (na, nb) = (sockaddr(&a, 53), sockaddr(&b, 53));
    assert_eq!(
        sources(&r),
        [(2, nb.clone()), (2, nb), (1, na.clone()), (1, na)],
        "(id, source) of peek, read, peek, read; proxy {p}"
    );
}

/// Alternating between two nameservers on one unconnected socket in an
/// order with no short period, so that answers shown from the wrong one of
/// the two cannot pass by chance: `(server, id)` per query.
fn pattern(a: &str, b: &str, n: u16, first_id: u16) -> Vec<(String, u16)> {
    (0..n)
        .map(|i| {
            let s = if i % 3 == 0 { b } else { a };
            (s.to_string(), first_id + i)
        })
        .collect()
}

/// After one answer read with `recv()` (no address asked, so nobody sees
/// its source), later answers read with `recvfrom()` on the same socket
/// still show their own nameserver, as under iptables.
#[test]
#[ignore = "known difference (docs/semantics.md, DNS capture): an answer read without its address leaves its nameserver queued, shifting later ones"]
fn answer_read_without_its_address_leaves_later_sources_right() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    let (a, b, list) = two_servers();
    apply(&f, &["--redirect-dns", "--dns-servers", &list]);
    let mut st = vec![json!(["sendto", a, 53, 1]), json!(["recv"])];
    let queries = pattern(&a, &b, 40, 100);
    for (server, id) in &queries {
        st.push(json!(["sendto", server, 53, id]));
        st.push(json!(["recvfrom"]));
    }
    let r = steps(&d, 4, json!(st));
    let got = sources(&r);
    assert_eq!(got.len(), queries.len(), "answers missing: {r:?}");
    let wrong = misattributed(&got, &queries);
    assert!(
        wrong.is_empty(),
        "{} of {} answers after the recv() shown from the wrong server: {wrong:#?}",
        wrong.len(),
        got.len()
    );
}

/// Answers that arrive while the application's receive buffer is full are
/// dropped by the kernel. The application reads what was kept, each from
/// its own nameserver, and every later answer on that socket too, as under
/// iptables (a forwarder that keeps its upstream sockets would otherwise
/// reject them all after one burst).
#[test]
#[ignore = "known difference (docs/semantics.md, DNS capture): an answer dropped after it was matched shifts later ones"]
fn answers_dropped_on_a_full_receive_buffer_leave_later_sources_right() {
    need_root!();
    let f = Fixture::new();
    let d = Dns::with_servers(&f);
    let (a, b, list) = two_servers();
    apply(&f, &["--redirect-dns", "--dns-servers", &list]);
    // The smallest buffer holds two or three answers of 40.
    let mut st = vec![json!(["rcvbuf", 1]), json!(["timeout", 0.3])];
    let burst = pattern(&a, &b, 40, 200);
    for (server, id) in &burst {
        st.push(json!(["sendto", server, 53, id]));
    }
    st.push(json!(["sleep", 0.5]));
    for _ in 0..5 {
        st.push(json!(["recvfrom"]));
    }
    st.push(json!(["timeout", 3]));
    let after = pattern(&a, &b, 40, 300);
    for (server, id) in &after {
        st.push(json!(["sendto", server, 53, id]));
        st.push(json!(["recvfrom"]));
    }
    let r = steps(&d, 4, json!(st));
    let got = sources(&r);
    let kept = got.iter().filter(|(id, _)| *id < 300).count();
    assert!(
        (1..40).contains(&kept),
        "the burst was not cut by the buffer ({kept} answers kept): {r:?}"
    );
    assert_eq!(got.len(), kept + after.len(), "answers missing: {r:?}");
    let sent: Vec<(String, u16)> = burst.into_iter().chain(after).collect();
    let wrong = misattributed(&got, &sent);
    assert!(
        wrong.is_empty(),
        "{} of {} answers ({kept} kept of the burst, then 40 one at a time) shown from the wrong server: {wrong:#?}",
        wrong.len(),
        got.len()
    );
}

//! Who owns a socket, on a real kernel: iptables' `-m owner` matches the
//! file system UID and GID of the credentials the socket's file was opened
//! with, not the real IDs of whoever calls `connect()`; redirect reads the
//! same credentials (`sk->sk_socket->file->f_cred`).

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use redirect_tests::{
    Fixture, can_run,
    pod::{As, Side, upstream_extra},
    redirect_bin,
};

const ADVERSARY: &str = env!("CARGO_BIN_EXE_redirect-adversary");

/// One way of holding credentials: the real IDs, the effective (and file
/// system) IDs when the socket is created, and when it connects.
struct Creds {
    name: &'static str,
    real: &'static str,
    socket_as: &'static str,
    connect_as: &'static str,
    /// Who answers with the default policy (`-u 1337 -g 1337`, `-i '*'`),
    /// as iptables decides.
    expected: &'static str,
}

const CASES: [Creds; 6] = [
    Creds {
        name: "plain app",
        real: "1000:1000",
        socket_as: "1000:1000",
        connect_as: "1000:1000",
        expected: "proxy",
    },
    Creds {
        name: "real UID 1337, effective 1000",
        real: "1337:1000",
        socket_as: "1000:1000",
        connect_as: "1000:1000",
        expected: "proxy",
    },
    Creds {
        name: "setuid-1337 binary run by UID 1000",
        real: "1000:1000",
        socket_as: "1337:1000",
        connect_as: "1337:1000",
        expected: "upstream",
    },
    Creds {
        name: "socket opened as 1337, connect() as 1000",
        real: "1000:1000",
        socket_as: "1337:1000",
        connect_as: "1000:1000",
        expected: "upstream",
    },
    Creds {
        name: "real GID 1337, effective 1000",
        real: "1000:1337",
        socket_as: "1000:1000",
        connect_as: "1000:1000",
        expected: "proxy",
    },
    Creds {
        name: "setgid-1337 binary run by UID 1000",
        real: "1000:1000",
        socket_as: "1000:1337",
        connect_as: "1000:1337",
        expected: "upstream",
    },
];

/// Who answered a connection made with `c`'s credentials.
fn who_answers(f: &Fixture, c: &Creds, to: &str) -> String {
    let root_in_app = As {
        uid: 0,
        gid: 0,
        cgroup: Some("app"),
    };
    let out = f
        .pod
        .command(Side::Pod, root_in_app, std::path::Path::new(ADVERSARY))
        .unwrap()
        .args(["creds-connect", "--to", to, "--real", c.real])
        .args(["--socket-as", c.socket_as, "--connect-as", c.connect_as])
        .output()
        .unwrap();
    if !out.status.success() {
        return format!("error: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    reply["server"].as_str().unwrap_or("?").to_string()
}

/// Each way of holding credentials is decided as iptables decides it.
#[test]
fn owner_is_the_credentials_the_socket_was_opened_with() {
    if !can_run() {
        return;
    }
    let f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    let to = format!("{}:80", upstream_extra(1));
    let mut wrong = Vec::new();
    for c in &CASES {
        let got = who_answers(&f, c, &to);
        if got != c.expected {
            wrong.push(format!("{}: {got}, iptables: {}", c.name, c.expected));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    let st = f.status().unwrap();
    assert_eq!(st["counters"]["orig_dst_missing"], 0, "{st}");
}

/// The expectations above, checked against real iptables (legacy) with the
/// rules `redirect iptables` renders for the same policy, in the same pod.
#[test]
fn owner_expectations_match_real_iptables() {
    if !can_run() {
        return;
    }
    let f = Fixture::new();
    let rules = Command::new(redirect_bin())
        .args(["iptables", "--family", "4", "-i", "*"])
        .output()
        .unwrap();
    assert!(rules.status.success());
    let ns = f.pod.netns_name(Side::Pod);
    let mut restore = Command::new("ip")
        .args(["netns", "exec", &ns, "iptables-legacy-restore"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("iptables-legacy-restore (cargo xtask setup installs iptables)");
    restore
        .stdin
        .take()
        .unwrap()
        .write_all(&rules.stdout)
        .unwrap();
    assert!(restore.wait().unwrap().success());
    let to = format!("{}:80", upstream_extra(1));
    for c in &CASES {
        assert_eq!(
            who_answers(&f, c, &to),
            c.expected,
            "{} under iptables",
            c.name
        );
    }
}

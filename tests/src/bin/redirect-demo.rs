//! `redirect-demo`: the whole path in one command, on a throwaway pod
//! (`cargo xtask demo` builds and runs it, as root).
//!
//! It builds a pod (netns + cgroup) wired to an upstream host, starts a
//! sample proxy (UID 1337) and an upstream service, applies redirection with
//! `redirect apply -i '*' -b '*'` (the real `redirect` binary, next to this
//! one), lets an application (UID 1000) connect to the service, prints what
//! the application and the proxy saw, shows `redirect status`, and removes
//! it all.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use redirect_tests::{
    DefaultRootCleanup, built_bin,
    peer::ServerView,
    pod::{As, POD_IP, Pod, Side, UPSTREAM_IP, upstream_extra},
};

fn main() {
    if let Err(err) = run() {
        eprintln!("redirect-demo: error: {err:#}");
        std::process::exit(1);
    }
}

/// Runs the demo, printing to stdout.
fn run() -> Result<()> {
    let redirect = built_bin("redirect")
        .context("the redirect binary (cargo build --package redirect --bin redirect)")?;
    let root = DefaultRootCleanup::new();
    let mut pod = Pod::create("redirect-demo")?;
    // The pin dir apply picks without --pin-dir: one per pod's cgroup.
    let pins = Pins(redirect::layout::default_pin_dir(&pod.cgroup)?);
    let result = demo(&redirect, &mut pod, &pins.0);
    // Pins first (detaches), then the pod, then the default root if the
    // demo made it; also on a panic (e.g. stdout closed), through the
    // guards' Drop.
    drop(pins);
    drop(pod);
    drop(root);
    println!("\ncleaned up: pins, pod namespaces and cgroups removed");
    result
}

/// Removes the demo's pins when dropped.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs `redirect args` and returns what it printed; its stderr (warnings,
/// `REDIRECT_LOG`) goes to ours.
fn redirect(bin: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("redirect {} failed: {}", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn print_orig_dst(reply: &ServerView) {
    println!(
        "  {} getsockopt(SO_ORIGINAL_DST) = {}",
        reply.server,
        reply
            .orig_dst
            .as_deref()
            .unwrap_or_else(|| reply.orig_dst_error.as_deref().unwrap_or("?"))
    );
}

fn demo(bin: &Path, pod: &mut Pod, pin_dir: &Path) -> Result<()> {
    let service = format!("{}:80", upstream_extra(1));
    println!(
        "pod {} : netns {}, cgroup {}",
        pod.name,
        pod.netns_name(Side::Pod),
        pod.cgroup.display()
    );
    pod.start_server(
        Side::Upstream,
        As::PROXY_LESS,
        "upstream",
        &[&format!("{UPSTREAM_IP}:80"), &service],
    )?;
    pod.start_server(
        Side::Pod,
        As::PROXY,
        "sample-proxy",
        &["0.0.0.0:15001", "0.0.0.0:15006"],
    )?;
    pod.start_server(Side::Pod, As::APP, "app", &["0.0.0.0:8080"])?;
    let app_addr = format!("{POD_IP}:8080");

    let before = pod.connect(As::APP, &service, None)?;
    println!(
        "\nwithout redirect, app (uid 1000) -> {service}: answered by {}",
        before
            .reply
            .as_ref()
            .map_or("nobody", |r| r.server.as_str())
    );

    let cgroup = pod.cgroup.display().to_string();
    let netns = pod.netns_path(Side::Pod).display().to_string();
    println!("\n$ redirect apply --cgroup {cgroup} --netns {netns} -i '*' -b '*'");
    let applied = redirect(
        bin,
        &[
            "apply", "--cgroup", &cgroup, "--netns", &netns, "-i", "*", "-b", "*",
        ],
    )?;
    println!(
        "{}; the loader is done, the pins keep it attached",
        applied.trim_end()
    );
    if !pin_dir.exists() {
        bail!("apply did not pin at {}", pin_dir.display());
    }

    let after = pod.connect(As::APP, &service, None)?;
    let reply = after
        .reply
        .as_ref()
        .context("no answer through the proxy")?;
    println!("\nwith redirect, app (uid 1000) -> {service}:");
    println!(
        "  app   getsockname {}  getpeername {}",
        after.local.as_deref().unwrap_or("?"),
        after.peer.as_deref().unwrap_or("?")
    );
    println!(
        "  {} accepted on {} from {}",
        reply.server, reply.local, reply.peer
    );
    print_orig_dst(reply);

    let inbound = pod.connect_from(Side::Upstream, As::PROXY_LESS, &app_addr, None)?;
    let reply = inbound
        .reply
        .as_ref()
        .context("no answer to the inbound connection")?;
    println!("\nwith redirect, a client outside the pod -> {app_addr} (the app's port):");
    println!(
        "  {} accepted on {} from {} (no NAT: the local address is kept)",
        reply.server, reply.local, reply.peer
    );
    print_orig_dst(reply);

    let proxy_own = pod.connect(As::PROXY, &service, None)?;
    println!(
        "\nproxy (uid 1337) -> {service}: answered by {} (its own traffic is exempt)",
        proxy_own
            .reply
            .as_ref()
            .map_or("nobody", |r| r.server.as_str())
    );

    println!("\n$ redirect status --cgroup {cgroup}");
    print!("{}", redirect(bin, &["status", "--cgroup", &cgroup])?);
    println!("\n$ redirect remove --cgroup {cgroup}");
    print!("{}", redirect(bin, &["remove", "--cgroup", &cgroup])?);
    Ok(())
}

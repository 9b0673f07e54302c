//! `apply` run twice, concurrently, for two pods, interrupted, or given bad
//! input, on a real kernel: what is attached afterwards (asked of the
//! kernel, not of the pin dir) is always what the pin dir and the exit
//! statuses say. Every test builds and removes its own pods, pins and
//! mounts, also when it fails.

use std::{
    fs::File,
    io::Read as _,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _, process::ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use redirect::{apply::PROGRAMS, status::INCOMPLETE_INTERRUPTED, sys};
use redirect_tests::{
    APP_PORT, DefaultRootCleanup, Fixture, can_run,
    pod::{As, Side, upstream_extra, upstream_extra6},
    redirect_bin,
};

macro_rules! need_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

fn v4() -> String {
    format!("{}:80", upstream_extra(1))
}

fn v6() -> String {
    format!("[{}]:80", upstream_extra6(1))
}

/// The app's port at the pod's address, from outside.
fn inbound() -> String {
    format!("{}:{APP_PORT}", redirect_tests::pod::POD_IP)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `apply` arguments for `f`'s pod with `f`'s pin dir, then `extra`.
fn apply_args(f: &Fixture, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "apply",
        "--cgroup",
        &f.pod.cgroup.display().to_string(),
        "--netns",
        &f.pod.netns_path(Side::Pod).display().to_string(),
        "--pin-dir",
        &f.pin_dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Number of programs the kernel has attached to `f`'s pod, per hook of
/// [`PROGRAMS`]: to its cgroup, or to its namespace for `sk_lookup`.
fn attached(f: &Fixture) -> Vec<(&'static str, usize)> {
    let cgroup = File::open(&f.pod.cgroup).unwrap();
    let netns = File::open(f.pod.netns_path(Side::Pod)).unwrap();
    PROGRAMS
        .iter()
        .map(|(_, attach, _)| {
            let target = if attach.on_netns() { &netns } else { &cgroup };
            let ids = sys::prog_query(target, *attach).unwrap();
            (attach.hook(), ids.len())
        })
        .collect()
}

/// Whether every hook of `f`'s pod has `n` programs attached. Unpinning a
/// link detaches it a moment later (the kernel frees the pin's inode after
/// an RCU grace period), so this waits up to 15 s (a loaded TCG VM is slow) for the count to settle.
fn each_hook_has(f: &Fixture, n: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if attached(f).iter().all(|(_, c)| *c == n) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether exactly one program is attached at every hook of `f`'s pod.
fn one_each(f: &Fixture) -> bool {
    each_hook_has(f, 1)
}

/// Whether nothing is attached at any hook of `f`'s pod.
fn none_attached(f: &Fixture) -> bool {
    each_hook_has(f, 0)
}

/// The `gen-*` directories in `f`'s pin dir.
fn gen_dirs(pin_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(pin_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("gen-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The generation an `apply` said it applied.
fn applied_generation(out: &Output) -> u64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .strip_prefix("applied generation ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no generation in {}", text(out)))
}

/// Runs every command at once and returns their outputs, in order.
fn concurrently(runs: Vec<Vec<String>>) -> Vec<Output> {
    let children: Vec<_> = runs
        .iter()
        .map(|args| {
            Command::new(redirect_bin())
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// The cgroup id of `f`'s pod: the inode number of its cgroup directory.
fn cgroup_id(f: &Fixture) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&f.pod.cgroup).unwrap())
}

/// `f`'s pod is captured, IPv4 and IPv6.
fn assert_captured(f: &Fixture, why: &str) {
    assert_eq!(f.who_answers(As::APP, &v4()), "proxy", "IPv4, {why}");
    assert_eq!(f.who_answers(As::APP, &v6()), "proxy", "IPv6, {why}");
}

/// 1. Concurrent applies on one pin dir, fresh and then re-applying: every
///    run waits its turn and exits 0 with a generation of its own, and in
///    the end exactly one generation is pinned and attached (one program per
///    hook, as the kernel reports it), complete, and capturing.
#[test]
fn concurrent_applies_serialize() {
    need_root!();
    let f = Fixture::new();
    const RUNS: u64 = 8;
    let mut next = 1;
    for round in 0..6 {
        let runs = (0..RUNS)
            .map(|i| apply_args(&f, &["-i", "*", "-x", &format!("192.0.2.{i}/32")]))
            .collect();
        let outs = concurrently(runs);
        let mut gens: Vec<u64> = outs
            .iter()
            .map(|o| {
                assert!(o.status.success(), "round {round}: {}", text(o));
                applied_generation(o)
            })
            .collect();
        gens.sort_unstable();
        assert_eq!(
            gens,
            (next..next + RUNS).collect::<Vec<_>>(),
            "round {round}: each run applied a generation of its own, one after the other"
        );
        next += RUNS;
        let last = next - 1;
        assert_eq!(
            gen_dirs(&f.pin_dir),
            vec![format!("gen-{last}")],
            "round {round}"
        );
        assert!(one_each(&f), "round {round}: {:?}", attached(&f));
        let st = f.status().expect("status");
        assert_eq!(st["generation"], last, "round {round}");
        assert_eq!(st["complete"], true, "round {round}");
        assert_eq!(st["incomplete"].as_array().unwrap().len(), 0);
        assert_captured(&f, &format!("round {round}"));
    }
}

/// 1. `remove` takes the same lock: racing with applies, it either runs
///    before some of them or after all of them, and what the kernel has
///    attached always matches the pin dir.
#[test]
fn remove_serializes_with_applies() {
    need_root!();
    let f = Fixture::new();
    let pin = f.pin_dir.display().to_string();
    for round in 0..6 {
        f.apply_ok(&["-i", "*"]);
        let mut runs: Vec<Vec<String>> = (0..4)
            .map(|i| apply_args(&f, &["-i", "*", "-x", &format!("192.0.2.{i}/32")]))
            .collect();
        // The remove starts in the middle of the applies.
        runs.insert(
            2,
            vec!["remove".to_string(), "--pin-dir".to_string(), pin.clone()],
        );
        let outs = concurrently(runs);
        for o in &outs {
            // Something was applied when each run started, and every run
            // waits for the others: none fails.
            assert!(o.status.success(), "round {round}: {}", text(o));
        }
        if f.pin_dir.exists() {
            assert_eq!(gen_dirs(&f.pin_dir).len(), 1, "round {round}");
            assert!(one_each(&f), "round {round}: {:?}", attached(&f));
            assert_captured(&f, &format!("round {round}"));
        } else {
            assert!(none_attached(&f), "round {round}: {:?}", attached(&f));
            assert_eq!(f.who_answers(As::APP, &v4()), "upstream");
        }
    }
}

/// 2. A pin dir records its pod, and refuses a generation for another pod,
///    naming both; also in a pin dir without a record (made by an older
///    redirect), from what its links are attached to.
#[test]
fn pin_dir_belongs_to_one_pod() {
    need_root!();
    let a = Fixture::new();
    let b = Fixture::new();
    a.apply_ok(&["-i", "*"]);
    let a_id = cgroup_id(&a);
    let b_id = cgroup_id(&b);

    // Pod B into A's pin dir.
    let mut args = apply_args(&b, &["-i", "*"]);
    let pin_at = args.iter().position(|a| a == "--pin-dir").unwrap() + 1;
    args[pin_at] = a.pin_dir.display().to_string();
    let out = b.redirect(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "belongs to another pod".to_string(),
        a.pod.cgroup.display().to_string(),
        format!("id {a_id}"),
        a.pod.netns_path(Side::Pod).display().to_string(),
        b.pod.cgroup.display().to_string(),
        format!("id {b_id}"),
        b.pod.netns_path(Side::Pod).display().to_string(),
    ] {
        assert!(err.contains(&needle), "error does not name {needle}: {err}");
    }
    assert!(none_attached(&b), "{:?}", attached(&b));
    assert_eq!(b.who_answers(As::APP, &v4()), "upstream");
    assert!(one_each(&a));
    assert_captured(&a, "after the refused apply");
    assert_eq!(gen_dirs(&a.pin_dir), vec!["gen-1"]);
    let st = a.status().unwrap();
    assert_eq!(st["pod"]["cgroup_id"], a_id);
    assert_eq!(st["pod"]["cgroup"], a.pod.cgroup.display().to_string());
    assert_eq!(
        st["pod"]["netns"],
        a.pod.netns_path(Side::Pod).display().to_string()
    );

    // Without the record, as an older redirect left it: the links tell.
    std::fs::remove_file(a.pin_dir.join("POD")).unwrap();
    let out = b.redirect(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("belongs to another pod") && err.contains(&format!("cgroup id {a_id}")),
        "{err}"
    );
    assert!(none_attached(&b));
    // The same pod may re-apply; the record is written again.
    a.apply_ok(&["-i", "*"]);
    assert_eq!(a.status().unwrap()["pod"]["cgroup_id"], a_id);

    // status and remove keep working.
    let out = a.redirect(&["remove", "--pin-dir", &a.pin_dir.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!a.pin_dir.exists());
    assert!(none_attached(&a));
}

/// 3. Without --pin-dir each pod gets its own pin dir, named after its
///    cgroup id: two pods applied with default flags are both captured, and
///    removing one (found by --cgroup) leaves the other captured.
#[test]
fn default_pin_dirs_keep_pods_apart() {
    need_root!();
    // Dropped last: removes the default root if this test made it.
    let _root = DefaultRootCleanup::new();
    let mut a = Fixture::new();
    let mut b = Fixture::new();
    for f in [&mut a, &mut b] {
        // The fixture removes its pin dir when dropped.
        f.pin_dir = PathBuf::from(format!("/sys/fs/bpf/redirect/cgroup-{}", cgroup_id(f)));
    }
    let mut outs = Vec::new();
    for f in [&a, &b] {
        let cg = f.pod.cgroup.display().to_string();
        let ns = f.pod.netns_path(Side::Pod).display().to_string();
        let out = f.redirect(&["apply", "--cgroup", &cg, "--netns", &ns, "-i", "*"]);
        assert!(out.status.success(), "{}", text(&out));
        outs.push(out);
    }
    for (f, out) in [&a, &b].into_iter().zip(&outs) {
        assert_captured(f, "both pods applied");
        assert!(one_each(f), "{:?}", attached(f));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("at {}", f.pin_dir.display())),
            "{}",
            text(out)
        );
        assert!(f.pin_dir.join("gen-1").is_dir());
        let cg = f.pod.cgroup.display().to_string();
        let out = f.redirect(&["status", "--json", "--cgroup", &cg]);
        assert!(out.status.success(), "{}", text(&out));
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(st["pin_dir"], f.pin_dir.display().to_string());
    }
    // Neither --pin-dir nor --cgroup: a clear error.
    for cmd in ["status", "remove"] {
        let out = a.redirect(&[cmd]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--cgroup") && err.contains("--pin-dir"),
            "{err}"
        );
    }
    let out = a.redirect(&["remove", "--cgroup", &a.pod.cgroup.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!a.pin_dir.exists());
    assert!(none_attached(&a));
    assert_eq!(a.who_answers(As::APP, &v4()), "upstream");
    assert!(one_each(&b));
    assert_captured(&b, "after the other pod was removed");
}

/// A directory that is removed (with its contents) when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// 4. Directories the loader creates are 0700 whatever the umask; pins get
///    no group or other bits either.
#[test]
fn loader_directories_are_private_whatever_the_umask() {
    need_root!();
    let mut f = Fixture::new();
    let parent = PathBuf::from("/sys/fs/bpf").join(format!("{}-parent", f.pod.name));
    let _guard = RemoveDir(parent.clone());
    f.pin_dir = parent.join("pin");
    let mut cmd = Command::new(redirect_bin());
    cmd.args(apply_args(&f, &["-i", "*"]));
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    for dir in [
        parent.clone(),
        f.pin_dir.clone(),
        f.pin_dir.join("state"),
        f.pin_dir.join("gen-1"),
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    for dir in [
        f.pin_dir.clone(),
        f.pin_dir.join("state"),
        f.pin_dir.join("gen-1"),
    ] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            assert_eq!(mode(&p) & 0o077, 0, "{}", p.display());
        }
    }
    assert_captured(&f, "applied under umask 000");
}

/// 5. An apply killed between two links (the test hook of debug builds
///    stands in for a SIGKILL) leaves IPv4 and inbound capture attached but
///    not IPv6. `status` says so; the next apply replaces it with a
///    complete generation; `remove` removes an incomplete one too.
#[test]
fn interrupted_apply_shows_and_is_completed() {
    need_root!();
    let f = Fixture::new();
    let interrupted = |after: usize, policy: &[&str]| {
        let out = Command::new(redirect_bin())
            .args(apply_args(&f, policy))
            .env("REDIRECT_TEST_HOOK_KILL_AFTER_LINKS", after.to_string())
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGKILL),
            "the test hook did not kill the loader (a release build?): {}",
            text(&out)
        );
    };
    // Every link but connect6's.
    interrupted(PROGRAMS.len() - 1, &["-i", "*", "-b", "*"]);
    let st = f.status().expect("status of an incomplete pin dir");
    assert_eq!(st["complete"], false);
    assert_eq!(st["generation"], 1);
    let inc = &st["incomplete"][0];
    assert_eq!(inc["generation"], 1);
    assert_eq!(inc["state"], INCOMPLETE_INTERRUPTED);
    assert_eq!(inc["missing"], serde_json::json!(["cgroup/connect6"]));
    let out = f.redirect(&["status", "--pin-dir", &f.pin_dir.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("incomplete (apply interrupted): run apply again or remove"),
        "{shown}"
    );
    // Half attached, as status says: IPv4 and inbound captured, IPv6 not.
    assert_eq!(f.who_answers(As::APP, &v4()), "proxy");
    assert_eq!(f.who_answers(As::APP, &v6()), "upstream");
    assert_eq!(f.who_answers_in(&inbound()), "proxy");
    // explain --pin-dir wants a complete generation.
    let out = f.redirect(&[
        "explain",
        "--pin-dir",
        &f.pin_dir.display().to_string(),
        "--dst",
        "10.0.0.1:80",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no complete generation"));

    f.apply_ok(&["-i", "*", "-b", "*"]);
    let st = f.status().unwrap();
    assert_eq!(st["complete"], true);
    assert_eq!(st["generation"], 2);
    assert_eq!(st["incomplete"].as_array().unwrap().len(), 0);
    assert_eq!(gen_dirs(&f.pin_dir), vec!["gen-2"]);
    assert!(one_each(&f), "{:?}", attached(&f));
    assert_captured(&f, "after completing");
    assert_eq!(f.who_answers_in(&inbound()), "proxy");

    // An interrupted re-apply: generation 2 stays in force and is shown;
    // generation 3 is listed as incomplete.
    interrupted(3, &["-i", "*", "-x", "192.0.2.1/32"]);
    let st = f.status().unwrap();
    assert_eq!(
        (st["generation"].as_u64(), st["complete"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(st["incomplete"][0]["generation"], 3);
    assert_eq!(st["policy"]["exclude_cidrs"].as_array().unwrap().len(), 0);
    // remove takes both.
    let out = f.redirect(&["remove", "--pin-dir", &f.pin_dir.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 2 generation(s)"));
    assert!(!f.pin_dir.exists());
    assert!(none_attached(&f), "{:?}", attached(&f));
}

/// A bpffs mounted for one test, unmounted (which drops its pins) and
/// removed when dropped.
struct BpffsMount(PathBuf);

impl BpffsMount {
    fn new(name: &str) -> BpffsMount {
        let dir = std::env::temp_dir().join(format!("{name}-bpffs"));
        std::fs::create_dir_all(&dir).unwrap();
        let m = BpffsMount(dir);
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&m.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        m
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// 6. A pin dir at the root of a bpffs is refused (`remove` could not
///    remove a mount point), by apply and by its dry run.
#[test]
fn bpffs_root_is_refused_as_pin_dir() {
    need_root!();
    let mut f = Fixture::new();
    let mount = BpffsMount::new(&f.pod.name);
    // A new bpffs may hold the kernel's own `maps.debug` and `progs.debug`.
    let listing = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = listing(&mount.0);
    for root in ["/sys/fs/bpf".to_string(), mount.0.display().to_string()] {
        f.pin_dir = PathBuf::from(&root);
        for dry in [true, false] {
            if root == "/sys/fs/bpf" && !dry {
                // Only the dry run there: a build without the check would
                // really pin into the shared root.
                continue;
            }
            let mut args = apply_args(&f, &["-i", "*"]);
            if dry {
                args.push("--dry-run".to_string());
            }
            let out = f.redirect(&args.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(!out.status.success(), "{root} dry {dry}: {}", text(&out));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("--pin-dir") && err.contains("root of a bpf filesystem"),
                "{err}"
            );
        }
    }
    assert_eq!(listing(&mount.0), before, "nothing pinned at the root");
    assert!(none_attached(&f));
    // A directory below the root is fine.
    f.pin_dir = mount.0.join("pod");
    f.apply_ok(&["-i", "*"]);
    assert_captured(&f, "pin dir below a bpffs root");
}

/// 6. Outbound capture with nothing exempting the proxy would loop the
///    proxy's own connections back to it: refused unless overridden.
#[test]
fn no_proxy_exemption_is_refused_unless_allowed() {
    need_root!();
    let f = Fixture::new();
    let out = f.apply(&["-i", "*", "-u", "", "-g", ""]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exempts no proxy") && err.contains("--allow-no-proxy-exemption"),
        "{err}"
    );
    assert!(!f.pin_dir.exists());
    assert!(none_attached(&f));
    // Inbound only: nothing outbound to exempt.
    f.apply_ok(&["-b", "*", "-u", "", "-g", ""]);
    // Overridden: applied, and the proxy's own connection loops back.
    f.apply_ok(&["-i", "*", "-u", "", "-g", "", "--allow-no-proxy-exemption"]);
    assert_eq!(f.who_answers(As::PROXY, &v4()), "proxy");
}

/// 6. Output into a closed pipe (`redirect status | head -3`): the process
///    ends quietly, by SIGPIPE, without a panic. The pipe's read end is
///    closed before the command writes, so the outcome does not depend on
///    timing.
fn run_into_closed_pipe(args: &[&str]) -> Output {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) into an array of two.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: we own both ends; the read end goes at once.
    unsafe { libc::close(fds[0]) };
    let write_end =
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
    Command::new(redirect_bin())
        .args(args)
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn assert_quiet_sigpipe(out: &Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{what}: {}",
        text(out)
    );
}

#[test]
fn status_into_a_closed_pipe_is_quiet() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    let pin = f.pin_dir.display().to_string();
    for json in [false, true] {
        let mut args = vec!["status", "--pin-dir", &pin];
        if json {
            args.push("--json");
        }
        assert_quiet_sigpipe(&run_into_closed_pipe(&args), &format!("{args:?}"));
    }
}

/// The same with commands that print without a pod (no root needed).
#[test]
fn printing_into_a_closed_pipe_is_quiet() {
    for args in [
        &["iptables", "-i", "*"][..],
        &["explain", "-i", "*", "--dst", "10.0.0.1:80"][..],
    ] {
        assert_quiet_sigpipe(&run_into_closed_pipe(args), &format!("{args:?}"));
    }
}

/// 6. A list file that never ends (`/dev/zero`) is refused at once, naming
///    the file and the limit (no root needed: the flags are read first).
#[test]
fn endless_list_files_are_refused() {
    for flag in ["--exclude-cidrs-file", "--services-file"] {
        let mut cmd = Command::new(redirect_bin());
        cmd.args(["apply", "--cgroup", "/nonexistent", flag, "/dev/zero"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setrlimit is async-signal-safe. A reader without a bound
        // runs out of its 1 GiB of address space, not of the machine's.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 1 << 30,
                    rlim_max: 1 << 30,
                };
                libc::setrlimit(libc::RLIMIT_AS, &limit);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            // The refusal comes after 4 KiB; the deadline only turns a hang
            // into a failure, and is wide because a loaded TCG VM can take
            // seconds just to start a debug binary (CI failed at 5 s). An
            // unbounded reader ends on the 1 GiB limit with another error,
            // which the message check below catches.
            if t.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{flag} /dev/zero: still reading after 120 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!status.success());
        assert!(
            err.contains(flag) && err.contains("/dev/zero") && err.contains("4096 bytes"),
            "{err}"
        );
    }
}

/// State maps pinned by another layout are refused with what to do, never
/// reused: aya would reuse a pinned map by name whatever its key and value
/// sizes. The layout version is checked, and each state map's sizes.
#[test]
fn state_maps_of_another_layout_are_refused() {
    need_root!();
    let f = Fixture::new();
    f.apply_ok(&["-i", "*"]);
    let state = f.pin_dir.join("state");
    let layout_pin = state.join(redirect_common::map_names::LAYOUT);
    let set_layout = |v: u64| {
        let map = redirect::apply::open_pinned(&layout_pin).unwrap();
        aya::maps::Array::<_, u64>::try_from(map)
            .unwrap()
            .set(0, v, 0)
            .unwrap();
    };

    // An older layout version.
    set_layout(1);
    let out = f.apply(&["-i", "*"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("layout version 1"), "{err}");
    assert!(err.contains("redirect remove --pin-dir"), "{err}");
    assert_eq!(f.status().unwrap()["generation"], 1);
    assert_captured(&f, "after a refused re-apply");
    set_layout(redirect_common::STATE_LAYOUT);

    // The right version, but a state map whose values changed size.
    let counters = state.join(redirect_common::map_names::COUNTERS);
    let original = sys::obj_get(&counters, 0).unwrap();
    std::fs::remove_file(&counters).unwrap();
    let fake = sys::array_create("COUNTERS", 16, 32).unwrap();
    sys::obj_pin(&fake, &counters).unwrap();
    let out = f.apply(&["-i", "*"]);
    std::fs::remove_file(&counters).unwrap();
    sys::obj_pin(&original, &counters).unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("map COUNTERS has 4-byte keys and 16-byte values"),
        "{err}"
    );
    assert_captured(&f, "after a refused re-apply");

    // Back as it was: the re-apply goes through.
    f.apply_ok(&["-i", "*"]);
    assert_eq!(f.status().unwrap()["generation"], 2);
}

//! `cargo xtask vm-test`: the real-kernel integration tests again, inside a
//! VM booting another kernel (by default the one Debian's `linux-image-amd64`
//! points at: 6.1 on bookworm; `--kernel-package`, repeatable, picks others).
//!
//! No disk image: the VM's root is this machine's `/`, shared read-only over
//! 9p, so the test binaries built here run unchanged. A tiny initramfs
//! (busybox, and the kernel's 9p, virtio and veth modules, uncompressed,
//! unless it builds them in) mounts it, gives it writable `/tmp` and `/run`,
//! bpffs and a cgroup v2 hierarchy, and runs the tests in a chroot. QEMU runs
//! under software emulation (TCG): KVM is not usable inside this VM (nested
//! MSR errors). Each test's time is in the log (libtest's `--report-time`),
//! and printed also when the VM is stopped for taking too long.
//!
//! The tests that load iptables rules are skipped in the VM: its kernel's
//! netfilter modules are not loaded there. The VM sets `REDIRECT_TEST_QUICK`
//! to [`QUICK_DIVISOR`], which makes the many-connection tests of `lifetime`
//! use 1/40 of their connections (the full counts run on the host kernel).

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{apt_install, env_cargo, output, root, run, target_dir};

/// Test targets of `redirect-tests` that run in the VM: those whose outcome
/// depends on the kernel (hooks, helpers, maps, the socket layer). The
/// command-line and deployment suites (`istio_init`, `cni`, `deploy`,
/// `image`, `kubernetes`) drive the same programs, `node_scale` the same
/// ones as `node` a thousand times, and `apply_safety` tests the loader's
/// locking and rollback, which no kernel changes: they run on the host only
/// (under emulation `istio_init` alone took seven minutes, `apply_safety`'s
/// forty-eight concurrent applies about as long, and CI has two VM runs to
/// fit).
const TESTS: [&str; 9] = [
    "inbound",
    "ipv6",
    "exemptions",
    "outbound",
    "lifetime",
    "owner",
    "node",
    "dns",
    "interfaces",
];
/// Tests skipped in the VM: those that need iptables, and the DNS tests
/// of the policy (which queries are captured, from which owner, to which
/// nameserver), whose kernel paths the ones left run too (dig over UDP and
/// TCP, glibc, connected UDP, answers to two servers out of order, a
/// disconnected socket): under emulation each DNS test takes half a minute
/// to two, and the host runs them all in both modes.
const SKIP: [&str; 14] = [
    "same_view_as_iptables_redirect",
    "owner_expectations_match_real_iptables",
    "without_dns_capture_queries_reach_the_nameserver",
    "proxy_own_queries_are_not_captured",
    "only_listed_nameservers_are_captured_unless_capture_all",
    "excluded_port_53_is_not_captured",
    "loopback_nameserver_is_captured",
    "nameservers_from_resolv_conf",
    "connected_udp_local_address_is_the_pod_address",
    "unconnected_udp_answer_comes_from_the_server_asked",
    "many_queries_on_one_socket_and_many_sockets",
    "udp_to_other_ports_is_never_redirected",
    "same_query_to_every_nameserver_as_musl_sends_it",
    "proxy_exempted_by_its_cgroup_alone",
];
/// Modules the VM needs: the 9p root over virtio-pci, and veth for the
/// tests' pods. The initramfs loads them after the modules each depends on;
/// those built into the kernel (`modules.builtin`) are skipped.
const MODULES: [&str; 4] = ["virtio_pci", "9pnet_virtio", "9p", "veth"];
/// `REDIRECT_TEST_QUICK` in the VM: `lifetime`'s many-connection tests
/// make 1/40 of their connections there (under emulation a tenth took nine
/// of the VM's twenty minutes; they check the kernel's behaviour there, the
/// full counts run on the host).
const QUICK_DIVISOR: u32 = 40;
/// How long the whole VM run may take.
const TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// Runs the VM tests on each of `packages` (Debian kernel image packages,
/// or meta-packages standing for the one they depend on; default
/// `linux-image-amd64`), one VM after the other; only `suites` of
/// [`TESTS`] if any are named.
pub fn run_tests(mut packages: Vec<String>, node_mode: bool, suites: &[String]) -> Result<()> {
    prerequisites()?;
    if packages.is_empty() {
        packages.push("linux-image-amd64".into());
    }
    if let Some(unknown) = suites.iter().find(|s| !TESTS.contains(&s.as_str())) {
        bail!("--suite {unknown}: the VM runs only {TESTS:?}");
    }
    let mut tests = build_tests()?;
    if !suites.is_empty() {
        tests.retain(|(name, _)| suites.contains(name));
    }
    if node_mode {
        // Node mode's own suite (node) runs in the one-shot VM run.
        tests.retain(|(name, _)| crate::NODE_MODE_SUITES.contains(&name.as_str()));
    }
    let mut failed = Vec::new();
    for package in &packages {
        if let Err(e) = run_on(package, &tests, node_mode) {
            eprintln!("vm-test: {package}: {e:#}");
            failed.push(package.as_str());
        }
    }
    if !failed.is_empty() {
        bail!("vm-test failed on {failed:?}");
    }
    Ok(())
}

fn run_on(package: &str, tests: &[(String, PathBuf)], node_mode: bool) -> Result<()> {
    let package = image_package(package)?;
    let kdir = fetch_kernel(&package)?;
    let version = kernel_version(&kdir)?;
    let initrd = build_initrd(&kdir, &version)?;
    write_script(&kdir, tests, node_mode)?;
    let log = kdir.join("vm-test.log");
    eprintln!(
        "xtask: booting {version} (TCG) and running the tests; log: {}",
        log.display()
    );
    let start = Instant::now();
    let booted = boot(&kdir, &version, &initrd, &log);
    // What ran, with each test's time, also when the VM was stopped.
    show_progress(&log);
    booted?;
    check(&log, &version, tests)?;
    println!(
        "vm-test: every test passed on Linux {version} ({} min in the VM)",
        start.elapsed().as_secs() / 60
    );
    Ok(())
}

fn prerequisites() -> Result<()> {
    let mut missing = Vec::new();
    if output("qemu-system-x86_64", &["--version"]).is_none() {
        missing.push("qemu-system-x86");
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("busybox-static");
    }
    if output("cpio", &["--version"]).is_none() {
        missing.push("cpio");
    }
    // Newer Debian kernels compress their modules.
    if output("xz", &["--version"]).is_none() {
        missing.push("xz-utils");
    }
    if output("zstd", &["--version"]).is_none() {
        missing.push("zstd");
    }
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    Ok(())
}

/// The image package `package` stands for: the `linux-image-*` package a
/// meta-package (`linux-image-amd64`, `linux-image-6.12-amd64`) depends on,
/// or `package` itself.
fn image_package(package: &str) -> Result<String> {
    let find = || {
        let deps = output("apt-cache", &["depends", package])?;
        Some(
            deps.lines()
                .filter_map(|l| l.trim().strip_prefix("Depends: "))
                .find(|d| d.starts_with("linux-image-"))
                .unwrap_or(package)
                .to_string(),
        )
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    find().with_context(|| format!("apt-cache knows no package {package}"))
}

/// Downloads and unpacks the kernel package under `target/vm/<package>/`.
fn fetch_kernel(package: &str) -> Result<PathBuf> {
    let base = target_dir().join("vm");
    let kdir = base.join(package);
    if kdir.join("boot").is_dir() {
        return Ok(kdir);
    }
    fs::create_dir_all(&base)?;
    eprintln!("xtask: downloading {package}");
    let download = |base: &Path| {
        run(Command::new("apt-get")
            .current_dir(base)
            .args(["download", package]))
    };
    if download(&base).is_err() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        download(&base)?;
    }
    let deb = fs::read_dir(&base)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                base.display()
            )
        })?;
    let partial = base.join(format!("{package}.partial"));
    let _ = fs::remove_dir_all(&partial);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    fs::rename(&partial, &kdir)?;
    let _ = fs::remove_file(&deb);
    Ok(kdir)
}

fn kernel_version(kdir: &Path) -> Result<String> {
    let modules = kdir.join("lib/modules");
    fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .next()
        .with_context(|| format!("no kernel version under {}", modules.display()))
}

/// Host directories the tests need (the checkout and the target dir) that
/// the VM's fresh `/tmp` or `/run` would hide: a checkout under `/tmp`, as
/// CI's clean clone may be. The init script carries them over the tmpfs
/// with bind mounts.
fn hidden_by_tmpfs() -> Vec<PathBuf> {
    let mut keep: Vec<PathBuf> = [root(), target_dir()]
        .into_iter()
        .filter(|p| p.starts_with("/tmp") || p.starts_with("/run"))
        .collect();
    keep.sort();
    keep.dedup();
    // A directory inside another kept one comes along with it.
    let all = keep.clone();
    keep.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
    keep
}

/// The init script: load `mods` (in `/mods`, in this order), mount the
/// shared root, prepare it (keeping `keep` visible under the new `/tmp` and
/// `/run`), run the tests.
///
/// The root is mounted with `cache=loose`: it is read-only and does not
/// change during the run, and without a page cache every start of a
/// (debug, 70 MB) `redirect` read it over 9p again; with it, the suites
/// took a third of the time on 6.1 (`exemptions` 187 s, then 74 s).
fn init_script(mods: &[String], keep: &[PathBuf]) -> String {
    let mods: Vec<String> = mods.iter().map(|m| format!("/mods/{m}.ko")).collect();
    let mut save = String::new();
    let mut restore = String::new();
    for (i, p) in keep.iter().enumerate() {
        let p = p.display();
        save.push_str(&format!(
            "mkdir -p /keep/{i} && mount -o bind '/mnt/root{p}' /keep/{i}\n"
        ));
        restore.push_str(&format!(
            "mkdir -p '/mnt/root{p}' && mount -o bind /keep/{i} '/mnt/root{p}' || echo \"=== could not keep {p}\"\n"
        ));
    }
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {mods}; do insmod $m || echo "insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=524288 hostroot /mnt/root || echo "=== mount of the host root failed"
mount -t 9p -o trans=virtio,version=9p2000.L,ro kernel /mnt/k || echo "=== mount of the kernel dir failed"
R=/mnt/root
{save}mount -t tmpfs tmp $R/tmp
mount -t tmpfs run $R/run
{restore}mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mount -t bpf bpf $R/sys/fs/bpf
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
echo "=== VM kernel $(uname -r)"
cp /mnt/k/vm-test.sh $R/tmp/vm-test.sh
chroot $R /bin/sh /tmp/vm-test.sh
poweroff -f
"#,
        mods = mods.join(" "),
    )
}

fn build_initrd(kdir: &Path, version: &str) -> Result<PathBuf> {
    let dir = kdir.join("initrd");
    let _ = fs::remove_dir_all(&dir);
    for sub in ["bin", "dev", "proc", "sys", "mnt/root", "mnt/k", "mods"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    fs::copy("/bin/busybox", dir.join("bin/busybox")).context("copying /bin/busybox")?;
    let mods = copy_modules(&kdir.join("lib/modules").join(version), &dir.join("mods"))
        .with_context(|| format!("Linux {version} cannot boot the VM"))?;
    let init = dir.join("init");
    fs::write(&init, init_script(&mods, &hidden_by_tmpfs()))?;
    run(Command::new("chmod").arg("+x").arg(&init))?;
    let out = kdir.join("initrd.gz");
    run(Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet | gzip > \"$0\"")
        .arg(&out)
        .current_dir(&dir))?;
    Ok(out)
}

/// Writes [`MODULES`] and the modules they depend on, uncompressed, to
/// `dest/<name>.ko`; returns their names in loading order. `moddir` is the
/// kernel's `lib/modules/<version>`, whose modules may be `.ko`, `.ko.xz` or
/// `.ko.zst` (busybox's insmod takes only plain ones).
fn copy_modules(moddir: &Path, dest: &Path) -> Result<Vec<String>> {
    let builtin = fs::read_to_string(moddir.join("modules.builtin"))
        .with_context(|| format!("reading {}/modules.builtin", moddir.display()))?;
    let builtin: HashSet<String> = builtin.lines().filter_map(module_name).collect();
    let mut files = HashMap::new();
    let mut dirs = vec![moddir.join("kernel")];
    while let Some(d) = dirs.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Some(name) = path.to_str().and_then(module_name) {
                files.insert(name, path);
            }
        }
    }
    let mut order = Vec::new();
    for m in MODULES {
        add_module(m, &files, &builtin, dest, &mut order)?;
    }
    Ok(order)
}

/// Adds module `name` to `order` and writes it to `dest` after the modules
/// it depends on, unless it is there already or built in.
fn add_module(
    name: &str,
    files: &HashMap<String, PathBuf>,
    builtin: &HashSet<String>,
    dest: &Path,
    order: &mut Vec<String>,
) -> Result<()> {
    if builtin.contains(name) || order.iter().any(|m| m == name) {
        return Ok(());
    }
    let path = files.get(name).with_context(|| {
        format!(
            "the VM needs kernel module {name}, which this kernel neither ships \
             as a module nor builds in (modules.builtin)"
        )
    })?;
    let ko = decompress(path)?;
    for dep in depends(&ko) {
        add_module(&dep, files, builtin, dest, order)?;
    }
    fs::write(dest.join(format!("{name}.ko")), ko)?;
    order.push(name.to_string());
    Ok(())
}

/// The module name of a path like `kernel/fs/9p/9p.ko.xz` (`-` read as `_`,
/// as the kernel does), if it names a module.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} -dc {}", path.display()))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed: {}", path.display(), out.status);
    }
    Ok(out.stdout)
}

/// The modules a module needs loaded first: its `depends=` modinfo string.
fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let value = ko[at + key.len()..]
        .split(|&b| b == 0)
        .next()
        .unwrap_or_default();
    String::from_utf8_lossy(value)
        .split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect()
}

/// Builds the `redirect` binary and the integration test executables;
/// returns `(name, executable)` for each of [`TESTS`].
fn build_tests() -> Result<Vec<(String, PathBuf)>> {
    run(Command::new(env_cargo()).current_dir(root()).args([
        "build",
        "--package",
        "redirect",
        "--bin",
        "redirect",
    ]))?;
    let out = Command::new(env_cargo())
        .current_dir(root())
        .args([
            "test",
            "--package",
            "redirect-tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("building the test executables")?;
    if !out.status.success() {
        bail!("building the test executables failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if TESTS.contains(&name) && msg["target"]["kind"][0] == "test" {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if found.len() != TESTS.len() {
        bail!("expected the test executables {TESTS:?}, cargo built {found:?}");
    }
    Ok(found)
}

fn write_script(kdir: &Path, tests: &[(String, PathBuf)], node_mode: bool) -> Result<()> {
    let bin = target_dir().join("debug/redirect");
    let skips: String = SKIP.iter().map(|s| format!(" --skip {s}")).collect();
    let mut script = format!(
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export CI=true HOME=/tmp REDIRECT_BIN={}\n\
         export REDIRECT_TEST_QUICK={QUICK_DIVISOR}\n\
         cd {}\n",
        bin.display(),
        root().display()
    );
    for (name, exe) in tests {
        // In node mode, the suites `cargo xtask test` runs twice run in
        // node mode here, without the tests about one-shot apply itself.
        let (env, extra) = if node_mode && crate::NODE_MODE_SUITES.contains(&name.as_str()) {
            let extra: String = crate::ONE_SHOT_ONLY
                .iter()
                .map(|s| format!(" --skip {s}"))
                .collect();
            ("REDIRECT_TEST_MODE=node ", extra)
        } else {
            ("", String::new())
        };
        script.push_str(&format!(
            "echo \"=== TEST {name}{mode}\"\n{env}RUSTC_BOOTSTRAP=1 {} --test-threads 1 -Z unstable-options --report-time{skips}{extra}\necho \"=== RESULT {name} $?\"\n",
            exe.display(),
            mode = if env.is_empty() { "" } else { " (node mode)" },
        ));
    }
    fs::write(kdir.join("vm-test.sh"), script)?;
    Ok(())
}

fn boot(kdir: &Path, version: &str, initrd: &Path, log: &Path) -> Result<()> {
    let kernel = kdir.join("boot").join(format!("vmlinuz-{version}"));
    let logfile = fs::File::create(log)?;
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "3072", "-smp", "2"])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=kernel,security_model=none,readonly=on",
            kdir.display()
        ))
        .stdin(Stdio::null())
        .stdout(logfile.try_clone()?)
        .stderr(logfile)
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("qemu exited with {status}; see {}", log.display());
            }
            return Ok(());
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the VM did not finish in {TIMEOUT:?}; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Prints the suites and tests the VM ran (libtest's `--report-time`
/// gives each its time), and the one it was in when the log ends.
fn show_progress(log: &Path) {
    let Ok(text) = fs::read_to_string(log) else {
        return;
    };
    for line in text.lines() {
        if line.starts_with("===") || line.starts_with("test ") {
            println!("{line}");
        }
    }
}

fn check(log: &Path, version: &str, tests: &[(String, PathBuf)]) -> Result<()> {
    let text = fs::read_to_string(log)?;
    if !text.contains(&format!("=== VM kernel {version}")) {
        bail!("the VM did not reach the tests; see {}", log.display());
    }
    let mut failed = Vec::new();
    for (name, _) in tests {
        if !text.contains(&format!("=== RESULT {name} 0")) {
            failed.push(name.as_str());
        }
    }
    if !failed.is_empty() {
        bail!(
            "tests failed on {version}: {failed:?}; see {}",
            log.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/fs/9p/9p.ko").as_deref(), Some("9p"));
        assert_eq!(
            module_name("kernel/net/9p/9pnet_virtio.ko.xz").as_deref(),
            Some("9pnet_virtio")
        );
        assert_eq!(
            module_name("kernel/sound/snd-hda-core.ko.zst").as_deref(),
            Some("snd_hda_core")
        );
        assert_eq!(module_name("kernel/fs/9p/9p.o"), None);
    }

    #[test]
    fn depends_reads_the_modinfo_string() {
        let ko = b"\x7fELF\0license=GPL\0depends=9pnet,netfs\0retpoline=Y\0";
        assert_eq!(depends(ko), ["9pnet", "netfs"]);
        assert!(depends(b"\0depends=\0name=veth\0").is_empty());
    }
}

//! `cargo xtask vm-test`: the real-kernel integration tests again, inside a
//! VM booting another kernel (by default the one Debian's `linux-image-amd64`
//! points at: 6.1 on bookworm).
//!
//! No disk image: the VM's root is this machine's `/`, shared read-only over
//! 9p, so the test binaries built here run unchanged. A tiny initramfs
//! (busybox and the 9p/virtio modules of the kernel under test) mounts it,
//! gives it writable `/tmp` and `/run`, bpffs and a cgroup v2 hierarchy, and
//! runs the tests in a chroot. QEMU runs under software emulation (TCG): KVM
//! is not usable inside this VM (nested MSR errors), and TCG is fast enough
//! for the suite (about 3 minutes).
//!
//! The tests that load iptables rules are skipped in the VM: its kernel's
//! netfilter modules are not loaded there. The VM sets `REDIRECT_TEST_QUICK`,
//! which makes the many-connection tests of `lifetime` use a tenth of their
//! connections (the full counts run on the host kernel).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{apt_install, env_cargo, output, root, run, target_dir};

/// Test targets of `redirect-tests` that run in the VM.
const TESTS: [&str; 7] = [
    "inbound",
    "ipv6",
    "exemptions",
    "outbound",
    "lifetime",
    "owner",
    "apply_safety",
];
/// Tests that need iptables (skipped in the VM).
const SKIP: [&str; 2] = [
    "same_view_as_iptables_redirect",
    "owner_expectations_match_real_iptables",
];
/// Modules the initramfs loads, in dependency order, to mount the 9p root.
const BOOT_MODULES: [&str; 10] = [
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "fs/netfs/netfs",
    "fs/fscache/fscache",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/9p/9p",
];
/// How long the whole VM run may take.
const TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// Runs the VM tests against `package` (a Debian kernel image package;
/// default: what `linux-image-amd64` depends on).
pub fn run_tests(package: Option<String>) -> Result<()> {
    prerequisites()?;
    let package = match package {
        Some(p) => p,
        None => default_kernel_package()?,
    };
    let kdir = fetch_kernel(&package)?;
    let version = kernel_version(&kdir)?;
    let initrd = build_initrd(&kdir, &version)?;
    let tests = build_tests()?;
    write_script(&kdir, &tests)?;
    let log = kdir.join("vm-test.log");
    eprintln!(
        "xtask: booting {version} (TCG) and running the tests; log: {}",
        log.display()
    );
    boot(&kdir, &version, &initrd, &log)?;
    check(&log, &version, &tests)
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
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    Ok(())
}

fn default_kernel_package() -> Result<String> {
    let find = || {
        output("apt-cache", &["depends", "linux-image-amd64"])?
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|d| d.starts_with("linux-image-") && d.ends_with("-amd64"))
            .map(str::to_string)
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    find().context("cannot tell which kernel linux-image-amd64 points at (apt-cache depends)")
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

/// The init script: mount the shared root, prepare it (keeping `keep`
/// visible under the new `/tmp` and `/run`), run the tests.
fn init_script(version: &str, keep: &[PathBuf]) -> String {
    let mods: Vec<String> = BOOT_MODULES
        .iter()
        .map(|m| format!("/mods/{}.ko", m.rsplit('/').next().unwrap_or(m)))
        .collect();
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
mount -t 9p -o trans=virtio,version=9p2000.L,ro hostroot /mnt/root || echo "=== mount of the host root failed"
mount -t 9p -o trans=virtio,version=9p2000.L,ro kernel /mnt/k || echo "=== mount of the kernel dir failed"
R=/mnt/root
{save}mount -t tmpfs tmp $R/tmp
mount -t tmpfs run $R/run
{restore}mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mount -t bpf bpf $R/sys/fs/bpf
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
insmod /mnt/k/lib/modules/{version}/kernel/drivers/net/veth.ko
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
    let kmods = kdir.join("lib/modules").join(version).join("kernel");
    for m in BOOT_MODULES {
        let src = kmods.join(format!("{m}.ko"));
        let name = src.file_name().context("module name")?.to_owned();
        fs::copy(&src, dir.join("mods").join(name))
            .with_context(|| format!("copying {} (is it built as a module?)", src.display()))?;
    }
    let init = dir.join("init");
    fs::write(&init, init_script(version, &hidden_by_tmpfs()))?;
    run(Command::new("chmod").arg("+x").arg(&init))?;
    let out = kdir.join("initrd.gz");
    run(Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet | gzip > \"$0\"")
        .arg(&out)
        .current_dir(&dir))?;
    Ok(out)
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

fn write_script(kdir: &Path, tests: &[(String, PathBuf)]) -> Result<()> {
    let bin = target_dir().join("debug/redirect");
    let skips: String = SKIP.iter().map(|s| format!(" --skip {s}")).collect();
    let mut script = format!(
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export CI=true HOME=/tmp REDIRECT_BIN={}\n\
         export REDIRECT_TEST_QUICK=1\n\
         cd {}\n",
        bin.display(),
        root().display()
    );
    for (name, exe) in tests {
        script.push_str(&format!(
            "echo \"=== TEST {name}\"\n{} --test-threads 1{skips}\necho \"=== RESULT {name} $?\"\n",
            exe.display()
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
    let start = std::time::Instant::now();
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

fn check(log: &Path, version: &str, tests: &[(String, PathBuf)]) -> Result<()> {
    let text = fs::read_to_string(log)?;
    for line in text.lines() {
        if line.starts_with("===") || line.starts_with("test ") {
            println!("{line}");
        }
    }
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
    println!("vm-test: every test passed on Linux {version}");
    Ok(())
}

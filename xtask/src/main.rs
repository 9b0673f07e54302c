//! `cargo xtask`: everything that is not plain cargo.
//!
//! - `setup`: install what the build needs and a fresh machine lacks (the
//!   nightly `rust-src` component and `bpf-linker` 0.10.4, and through
//!   apt-get iproute2, iptables, haproxy and apache2-utils);
//! - `demo`: setup, build `redirect` and the demo, run the demo
//!   (`tests/src/bin/redirect-demo.rs`, root);
//! - `test`: setup, build, run every test of the workspace, including the
//!   real-kernel integration tests (root);
//! - `bench`: build in release mode, run the benchmarks, write
//!   `docs/benchmarks.md` and `docs/bench/` (root; `--quick` for CI);
//! - `vm-test`: the real-kernel tests again in a VM booting other kernels
//!   (root; Debian's `linux-image-amd64`, 6.1 on bookworm, by default;
//!   `--kernel-package` picks others, such as `linux-image-6.12-amd64`);
//! - `docs`: regenerate what the docs show from the code (the pin layout in
//!   `docs/design.md`); a test of the `redirect` crate fails until it is run.

mod bench;
mod image;
mod vm;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// The bpf-linker release that works with this toolchain (it loads rustc's own
/// LLVM; newer ones need a system LLVM 22).
const BPF_LINKER_VERSION: &str = "0.10.4";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing build and test prerequisites.
    Setup,
    /// Build and run the demo (needs root).
    Demo,
    /// Build and run all tests, real-kernel ones included (needs root).
    Test {
        /// Extra arguments passed to `cargo test` (after `--`: to the harness).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks and write docs/benchmarks.md (needs root).
    Bench {
        /// Tiny sizes, to check the harness (CI); writes to target/bench-quick/.
        #[arg(long)]
        quick: bool,
        /// Report directory (default: docs/, or target/bench-quick/ with --quick).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Do not measure: rewrite the report from its results.json.
        #[arg(long)]
        render_only: bool,
    },
    /// Run the real-kernel tests in a VM booting another kernel (needs root).
    VmTest {
        /// Debian kernel package to boot; repeat it to test several kernels,
        /// one after the other. A meta-package (`linux-image-6.12-amd64`)
        /// stands for the image it depends on. Default: `linux-image-amd64`.
        #[arg(long)]
        kernel_package: Vec<String>,
        /// Run only the suites `cargo xtask test` runs twice, in node mode
        /// (every pod registered with `pod add` in a node install).
        #[arg(long)]
        node_mode: bool,
        /// Run only this suite (repeat for several); default: all of them.
        #[arg(long)]
        suite: Vec<String>,
    },
    /// Regenerate the pin layout in docs/design.md from the code.
    Docs,
    /// Build the container image as an OCI archive, with no registry and no
    /// container tool: a static (musl) redirect, also named istio-iptables
    /// and redirect-cni, on an empty base. Import it with `ctr -n k8s.io
    /// images import FILE`.
    Image {
        /// The archive [default: target/image/redirect-VERSION.oci.tar].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write the end-to-end test's pause and app images
        /// (target/image/redirect-test-{pause,app}.oci.tar; `cargo xtask
        /// test` writes them).
        #[arg(long)]
        test_images: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::Demo => {
            setup()?;
            require_root("the demo")?;
            // The demo drives the real `redirect` binary and runs the sample
            // peers (`redirect-sample`) in its pod: all three side by side.
            cargo(&[
                "build",
                "--package",
                "redirect",
                "--bin",
                "redirect",
                "--package",
                "redirect-tests",
                "--bin",
                "redirect-demo",
                "--bin",
                "redirect-sample",
            ])?;
            run(&mut Command::new(target_dir().join("debug/redirect-demo")))
        }
        Cmd::Test { args } => {
            setup()?;
            require_root("the integration tests")?;
            cargo(&["build", "--workspace", "--bins"])?;
            // tests/tests/image.rs runs the image in containerd;
            // tests/tests/kubernetes.rs runs pods of the test images in it.
            build_image(None)?;
            build_test_images()?;
            let bin = target_dir().join("debug/redirect");
            let mut cmd = Command::new(env_cargo());
            cmd.current_dir(root())
                .args(["test", "--workspace"])
                .args(&args)
                .env("REDIRECT_BIN", &bin);
            run(&mut cmd)?;
            if !args.is_empty() {
                // A chosen test: run once, in one-shot mode.
                return Ok(());
            }
            // The real-kernel suites again, every pod registered in a node
            // install (`pod add`) instead of applied one-shot.
            eprintln!("xtask: the real-kernel suites again in node mode");
            let mut node = Command::new(env_cargo());
            node.current_dir(root())
                .args(["test", "-p", "redirect-tests"]);
            for t in NODE_MODE_SUITES {
                node.args(["--test", t]);
            }
            node.arg("--");
            for t in ONE_SHOT_ONLY {
                node.args(["--skip", t]);
            }
            // The many-connection tests of `lifetime` with a tenth of their
            // connections (as in the VM): the connection state they stress is
            // the same code in both modes, and the full counts ran above; the
            // full counts again would add ten minutes to CI.
            run(node
                .env("REDIRECT_BIN", &bin)
                .env("REDIRECT_TEST_MODE", "node")
                .env("REDIRECT_TEST_QUICK", "1"))
        }
        Cmd::Bench {
            quick,
            out,
            render_only: false,
        } => bench::run(quick, out),
        Cmd::Bench { quick, out, .. } => bench::render_only(quick, out),
        Cmd::VmTest {
            kernel_package,
            node_mode,
            suite,
        } => {
            setup()?;
            require_root("the VM tests")?;
            vm::run_tests(kernel_package, node_mode, &suite)
        }
        Cmd::Docs => docs(),
        Cmd::Image { out, test_images } => {
            build_image(out)?;
            if test_images {
                build_test_images()?;
            }
            Ok(())
        }
    }
}

/// Suites `cargo xtask test` runs a second time in node mode.
const NODE_MODE_SUITES: [&str; 10] = [
    "inbound",
    "outbound",
    "ipv6",
    "exemptions",
    "owner",
    "lifetime",
    "differential",
    "haproxy",
    "dns",
    "interfaces",
];

/// Tests of those suites about one-shot `apply` itself (its flags, its
/// generations, its links, its pin dir), which node mode has not: node
/// mode's own are in `tests/tests/node.rs`.
const ONE_SHOT_ONLY: [&str; 3] = [
    "bad_input_fails_and_attaches_nothing",
    "reapply_replaces_without_gap",
    "state_persists_after_loader_exits_and_remove_restores",
];

/// Rewrites the generated blocks of the docs: the test that checks them
/// rewrites them instead when `REDIRECT_UPDATE_DOCS` is set.
fn docs() -> Result<()> {
    let design = root().join("docs/design.md");
    let before = std::fs::read_to_string(&design)?;
    run(Command::new(env_cargo())
        .current_dir(root())
        .args([
            "test",
            "--quiet",
            "--package",
            "redirect",
            "--test",
            "design_doc",
        ])
        .env("REDIRECT_UPDATE_DOCS", "1"))?;
    let after = std::fs::read_to_string(&design)?;
    eprintln!(
        "xtask: docs/design.md {}",
        if before == after {
            "was up to date"
        } else {
            "rewritten"
        }
    );
    Ok(())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn env_cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new(env_cargo()).current_dir(root()).args(args))
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn require_root(what: &str) -> Result<()> {
    if output("id", &["-u"]).as_deref().map(str::trim) != Some("0") {
        bail!("{what} load eBPF programs and create namespaces: run as root");
    }
    Ok(())
}

fn setup() -> Result<()> {
    // The eBPF side builds with nightly + rust-src (-Z build-std=core).
    let toolchains = output("rustup", &["toolchain", "list"])
        .context("rustup is required (the eBPF build runs `rustup run nightly cargo`)")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly toolchain with rust-src");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    } else {
        let installed = output(
            "rustup",
            &["component", "list", "--toolchain", "nightly", "--installed"],
        )
        .unwrap_or_default();
        if !installed.lines().any(|l| l.starts_with("rust-src")) {
            eprintln!("xtask: adding rust-src to the nightly toolchain");
            run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))?;
        }
    }

    let linker = output("bpf-linker", &["--version"]).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION}");
        run(Command::new(env_cargo()).args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ]))?;
    }

    // iproute2 builds the test pods; iptables is the reference the tests
    // compare against; HAProxy is the real third-party proxy the `haproxy`
    // tests run behind redirect, and apache2-utils' `ab` loads it.
    let mut missing = Vec::new();
    if output("ip", &["-V"]).is_none() {
        missing.push("iproute2");
    }
    if output("iptables", &["--version"]).is_none() {
        missing.push("iptables");
    }
    if output("haproxy", &["-v"]).is_none() {
        missing.push("haproxy");
    }
    if output("ab", &["-V"]).is_none() {
        missing.push("apache2-utils");
    }
    // setpriv (util-linux) runs the capability test; python3-venv holds
    // kubernetes-validate, which checks deploy/ against the Kubernetes
    // schemas it bundles (offline).
    if output("setpriv", &["--version"]).is_none() {
        missing.push("util-linux");
    }
    if output("python3", &["-c", "import venv, ensurepip"]).is_none() {
        missing.push("python3-venv");
    }
    // The image test runs the image in a real containerd (with runc); the
    // end-to-end test runs pods in it through CRI, on the reference CNI
    // plugins, from images holding busybox.
    if output("containerd", &["--version"]).is_none() {
        missing.push("containerd");
    }
    if !Path::new("/usr/lib/cni/bridge").exists() {
        missing.push("containernetworking-plugins");
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("busybox-static");
    }
    // DNS capture is checked with real resolvers and servers: glibc's
    // (`getent`), dig (bind9-dnsutils) and dnsmasq (as the upstream
    // nameserver and as a stand-in for the mesh's DNS proxy).
    if output("dig", &["-v"]).is_none() {
        missing.push("bind9-dnsutils");
    }
    if output("dnsmasq", &["--version"]).is_none() {
        missing.push("dnsmasq-base");
    }
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    python_tools()
}

/// `cargo xtask image`.
fn build_image(out: Option<PathBuf>) -> Result<()> {
    setup()?;
    let installed = output("rustup", &["target", "list", "--installed"]).unwrap_or_default();
    if !installed.lines().any(|l| l.trim() == image::TARGET) {
        eprintln!("xtask: installing the {} target", image::TARGET);
        run(Command::new("rustup").args(["target", "add", image::TARGET]))?;
    }
    cargo(&[
        "build",
        "--release",
        "--target",
        image::TARGET,
        "--package",
        "redirect",
        "--bin",
        "redirect",
    ])?;
    let version = env!("CARGO_PKG_VERSION");
    let binary = target_dir().join(image::TARGET).join("release/redirect");
    let out = out.unwrap_or_else(|| target_dir().join(format!("image/redirect-{version}.oci.tar")));
    image::write(&binary, &out, "redirect", version)?;
    println!("{} (image redirect:{version})", out.display());
    Ok(())
}

/// The end-to-end test's images, around the debug `redirect-sample`.
fn build_test_images() -> Result<()> {
    cargo(&[
        "build",
        "--package",
        "redirect-tests",
        "--bin",
        "redirect-sample",
    ])?;
    let dir = target_dir().join("image");
    image::write_test_images(
        &target_dir().join("debug/redirect-sample"),
        &dir,
        env!("CARGO_PKG_VERSION"),
    )?;
    println!(
        "{}/{{{},{}}}.oci.tar (the end-to-end test's images)",
        dir.display(),
        image::TEST_PAUSE,
        image::TEST_APP
    );
    Ok(())
}

/// What the virtualenv holds (PyPI): kubernetes-validate for the deploy
/// test; gRPC, protobuf and kubernetes-cri's CRI messages for the
/// end-to-end test's CRI client (tests/tools/cri.py). kubernetes-cri is
/// installed without its dependency on grpcio-tools, which it does not
/// use.
const PYTHON_TOOLS: [&str; 3] = [
    "kubernetes-validate==1.37.0",
    "grpcio==1.85.3",
    "protobuf==7.36.2",
];
const PYTHON_NO_DEPS: [&str; 1] = ["kubernetes-cri==0.1.3"];

/// A virtualenv under target/tools/python with [`PYTHON_TOOLS`], for
/// tests/tests/deploy.rs and tests/tests/kubernetes.rs.
fn python_tools() -> Result<()> {
    let venv = target_dir().join("tools/python");
    let stamp = venv.join("redirect-tools");
    let want = format!("{PYTHON_TOOLS:?} {PYTHON_NO_DEPS:?}");
    if fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(());
    }
    eprintln!("xtask: installing {want} in {}", venv.display());
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q"])
        .args(PYTHON_TOOLS))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--no-deps"])
        .args(PYTHON_NO_DEPS))?;
    fs::write(stamp, want)?;
    Ok(())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    eprintln!("xtask: installing {} with apt-get", packages.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

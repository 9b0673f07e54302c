//! `redirect-bench`: the benchmark harness behind `cargo xtask bench`.
//!
//! - `run`: builds throwaway pods, one per method (direct, iptables REDIRECT
//!   with the legacy and nft backends, redirect), runs every scenario and
//!   prints raw samples as JSON (root);
//! - `proxy`, `client`: the workload, started inside a pod by `run`.
//!
//! `cargo xtask bench` builds this in release mode, runs it, and writes the
//! report (`docs/benchmarks.md`, `docs/bench/`).

mod harness;
mod node;
mod noop;
mod peer;
mod world;

use std::{io::Write as _, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "redirect-bench",
    about = "redirect vs iptables REDIRECT benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the scenarios and write raw results as JSON (needs root).
    Run {
        /// Tiny sizes: checks that the harness works (CI).
        #[arg(long)]
        quick: bool,
        /// Where to write the JSON (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The `redirect` binary (default: next to this one).
        #[arg(long)]
        redirect_bin: Option<PathBuf>,
        /// Only these scenarios (comma-separated: setup, floor, scaling,
        /// services, rr, wrap, occupancy, peak, node).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Pin the proxy and the client to this CPU (default: the last one).
        #[arg(long)]
        cpu: Option<usize>,
        /// Do not pin them.
        #[arg(long, conflicts_with = "cpu")]
        no_pin: bool,
    },
    /// One method's pod and policy, and the setup client for a while: for
    /// profiling (run `perf record -a` alongside). Prints the report.
    Profile {
        /// direct, iptables-legacy, iptables-nft or redirect.
        #[arg(long, default_value = "redirect")]
        method: String,
        /// Exclusion CIDRs (with --services: services ahead of the target).
        #[arg(long, default_value = "0")]
        size: usize,
        /// A service policy (no `-i`, `--size` other services, then the
        /// target) instead of exclusions.
        #[arg(long)]
        services: bool,
        /// How long the client runs.
        #[arg(long, default_value = "10")]
        seconds: f64,
        /// The `redirect` binary (default: next to this one).
        #[arg(long)]
        redirect_bin: Option<PathBuf>,
        /// Pin the proxy and the client to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
        /// More client arguments (after `--`).
        #[arg(last = true)]
        client_args: Vec<String>,
    },
    /// The bench proxy (runs inside a pod).
    Proxy(peer::ProxyArgs),
    /// The bench client (runs inside a pod); prints one JSON report.
    Client(peer::ClientArgs),
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Proxy(args) => peer::run_proxy(&args),
        Cmd::Client(args) => {
            let rep = peer::run_client(&args);
            serde_json::to_string(&rep)
                .map_err(anyhow::Error::from)
                .and_then(|s| Ok(writeln!(std::io::stdout(), "{s}")?))
        }
        Cmd::Run {
            quick,
            out,
            redirect_bin,
            only,
            cpu,
            no_pin,
        } => {
            let last = std::thread::available_parallelism().map_or(0, |n| n.get() - 1);
            let cpu = if no_pin {
                None
            } else {
                Some(cpu.unwrap_or(last))
            };
            run(quick, out, redirect_bin, only, cpu)
        }
        Cmd::Profile {
            method,
            size,
            services,
            seconds,
            redirect_bin,
            cpu,
            client_args,
        } => tools(redirect_bin, cpu)
            .and_then(|t| harness::profile(&t, &method, size, services, seconds, &client_args)),
    };
    if let Err(e) = r {
        eprintln!("redirect-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn tools(redirect_bin: Option<PathBuf>, cpu: Option<usize>) -> Result<world::Tools> {
    world::catch_signals();
    let bench = std::env::current_exe().context("own path")?;
    let redirect = redirect_bin.unwrap_or_else(|| bench.with_file_name("redirect"));
    anyhow::ensure!(
        redirect.exists(),
        "{} not found (build it, or pass --redirect-bin)",
        redirect.display()
    );
    Ok(world::Tools {
        bench,
        redirect,
        cpu,
    })
}

fn run(
    quick: bool,
    out: Option<PathBuf>,
    redirect_bin: Option<PathBuf>,
    only: Vec<String>,
    cpu: Option<usize>,
) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "the benchmarks create namespaces and load eBPF programs: run as root"
    );
    let tools = tools(redirect_bin, cpu)?;
    let plan = harness::Plan::new(quick);
    let results = harness::run(&plan, &tools, &harness::Only(only))?;
    let json = serde_json::to_string_pretty(&results)?;
    match out {
        Some(p) => std::fs::write(&p, json).with_context(|| format!("writing {}", p.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}

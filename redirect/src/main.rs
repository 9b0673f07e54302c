//! The `redirect` binary: a thin CLI over the `redirect` library.

use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Parser as _;
use redirect::{
    apply::{self, ApplyRequest},
    cli::{Cli, Command, FamilyArg, NodeCommand, PodCommand},
    explain, node, plan, pods,
    render::{self, Family},
    status,
};

fn main() {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`redirect status
    // | head -3`) would fail with EPIPE and `println!` panic. Take the
    // default action back: the process ends quietly, as other tools do.
    // SAFETY: called first thing, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REDIRECT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(err) = run(cli) {
        eprintln!("redirect: error: {err:#}");
        std::process::exit(1);
    }
}

fn run_node(cmd: NodeCommand) -> Result<()> {
    match cmd {
        NodeCommand::Install(args) => {
            let req = node::InstallRequest {
                cgroup: args.cgroup,
                pin_dir: args.node.pin_dir.clone(),
                max_connections: args.max_connections,
                max_pods: args.max_pods,
                lock_timeout: Duration::from_secs(args.node.lock_timeout),
            };
            let r = node::install(&req)?;
            println!(
                "installed generation {} at {} ({} pod(s) kept{})",
                r.generation,
                args.node.pin_dir.display(),
                r.pods,
                if r.replaced.is_empty() {
                    String::new()
                } else {
                    format!(", replaced {:?}", r.replaced)
                }
            );
        }
        NodeCommand::Uninstall(args) => {
            let n = node::uninstall(&args.pin_dir, Duration::from_secs(args.lock_timeout))?;
            println!(
                "uninstalled {} ({n} pod(s) removed)",
                args.pin_dir.display()
            );
        }
        NodeCommand::Status(args) => {
            let st = node::status(&args.pin_dir)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{st}");
            }
        }
    }
    Ok(())
}

fn print_pods(list: &[pods::PodInfo]) {
    println!("{:<20} {:<40} inbound / outbound", "netns cookie", "netns");
    for p in list {
        let join = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(",")
            }
        };
        println!(
            "{:<20} {:<40} {} / {}{}",
            p.netns_cookie,
            format!("{} (inode {})", p.netns, p.netns_inode),
            join(&p.policy.inbound_ports),
            join(&p.policy.include_cidrs),
            if p.alive {
                ""
            } else {
                "  [namespace gone: gc]"
            },
        );
    }
}

fn run_pod(cmd: PodCommand) -> Result<()> {
    match cmd {
        PodCommand::Add(args) => {
            let req = pods::AddRequest {
                netns: args.netns.clone(),
                pin_dir: args.node.pin_dir,
                policy: args.policy.to_spec()?,
                replace: args.replace,
                allow_no_proxy_exemption: args.allow_no_proxy_exemption,
                lock_timeout: Duration::from_secs(args.node.lock_timeout),
            };
            if args.dry_run {
                let plan = pods::plan(&req)?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&plan)?);
                } else {
                    print!("{plan}");
                }
                return Ok(());
            }
            let r = pods::add(&req)?;
            println!(
                "{} pod {} (netns cookie {})",
                if r.replaced {
                    "replaced the policy of"
                } else {
                    "added"
                },
                args.netns.display(),
                r.netns_cookie
            );
        }
        PodCommand::Remove(args) => {
            let cookie = pods::remove(
                &args.node.pin_dir,
                args.netns.as_deref(),
                args.cookie,
                Duration::from_secs(args.node.lock_timeout),
            )?;
            println!("removed pod with netns cookie {cookie}");
        }
        PodCommand::List(args) => {
            let list = pods::list(&args.pin_dir)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_pods(&list);
            }
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Apply(mut args) => {
            let policy = args.policy.to_spec()?;
            if args.cgroup.as_os_str() == "auto" {
                args.cgroup = redirect::cgroup::pod_cgroup_of_self()?;
                tracing::info!(cgroup = %args.cgroup.display(), "--cgroup auto: the pod's cgroup");
            }
            let pin_dir = args.pin.resolve(&args.cgroup)?;
            let req = ApplyRequest {
                cgroup: args.cgroup,
                netns: args.netns,
                pin_dir,
                policy,
                max_connections: args.max_connections,
                allow_no_proxy_exemption: args.allow_no_proxy_exemption,
                lock_timeout: Duration::from_secs(args.lock_timeout),
            };
            if args.dry_run {
                let plan = tokio::task::spawn_blocking(move || plan::plan(&req))
                    .await
                    .context("dry-run task")??;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&plan)?);
                } else {
                    print!("{plan}");
                }
                return Ok(());
            }
            let pin_dir = req.pin_dir.clone();
            let report = tokio::task::spawn_blocking(move || apply::apply(&req))
                .await
                .context("apply task")??;
            tracing::info!(?report, "applied");
            println!(
                "applied generation {} at {}{}",
                report.generation,
                pin_dir.display(),
                if report.replaced.is_empty() {
                    String::new()
                } else {
                    format!(" (replaced {:?})", report.replaced)
                }
            );
        }
        Command::Remove(args) => {
            let pin_dir = args.pod.resolve()?;
            let timeout = Duration::from_secs(args.lock_timeout);
            let gens = {
                let pin_dir = pin_dir.clone();
                tokio::task::spawn_blocking(move || apply::remove(&pin_dir, timeout))
                    .await
                    .context("remove task")??
            };
            println!(
                "removed {} generation(s) from {}",
                gens.len(),
                pin_dir.display()
            );
        }
        Command::Status(args) => {
            let default_node = std::path::Path::new(node::DEFAULT_NODE_PIN_DIR);
            let node_dir = match &args.node {
                Some(p) => Some(p.clone()),
                None if args.pod.pin_dir.is_none()
                    && args.pod.cgroup.is_none()
                    && default_node.exists() =>
                {
                    Some(default_node.to_path_buf())
                }
                None => None,
            };
            if let Some(dir) = node_dir {
                let st = node::status(&dir)?;
                let pods = pods::list(&dir)?;
                if args.json {
                    let v = serde_json::json!({ "node": st, "pods": pods });
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print!("{st}");
                    print_pods(&pods);
                }
                return Ok(());
            }
            let st = status::status(&args.pod.resolve()?)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{st}");
            }
        }
        Command::Explain(args) => {
            let e = explain::run(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                print!("{e}");
            }
        }
        Command::Iptables(args) => {
            let spec = args.policy.to_spec()?;
            print!(
                "{}",
                match args.family {
                    FamilyArg::V4 => render::render(&spec, Family::V4),
                    FamilyArg::V6 => render::render(&spec, Family::V6),
                    FamilyArg::Both => render::render_both(&spec),
                }
            );
        }
        Command::Node(cmd) => run_node(cmd)?,
        Command::Pod(cmd) => run_pod(cmd)?,
        Command::Gc(args) => {
            let r = pods::gc(
                &args.node.pin_dir,
                &args.pin_root,
                Duration::from_secs(args.node.lock_timeout),
            )?;
            println!(
                "removed {} pod(s) whose network namespace is gone, {} one-shot pin dir(s) \
                 whose cgroup and namespace are gone",
                r.pods.len(),
                r.pin_dirs.len()
            );
        }
    }
    Ok(())
}

//! The `redirect` binary: a thin CLI over the `redirect` library.

use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Parser as _;
use redirect::{
    apply::{self, ApplyRequest},
    cli::{Cli, CniCommand, Command, FamilyArg, NodeCommand, PodCommand},
    cni, explain, istio, node, plan, pods,
    render::{self, Family},
    status, validation,
};

fn main() {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`redirect status
    // | head -3`) would fail with EPIPE and `println!` panic. Take the
    // default action back: the process ends quietly, as other tools do.
    // SAFETY: called first thing, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // The name decides: called istio-iptables (a symlink or a copy), it
    // takes istio-iptables' command line and environment.
    let name = std::env::args_os()
        .next()
        .map(|a| {
            std::path::Path::new(&a)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    // pilot-agent's form too: `redirect istio-iptables ARGS` (what Istio's
    // injector writes as the istio-init container's arguments).
    let subcommand = std::env::args_os().nth(1);
    if name == "istio-iptables" || subcommand.as_deref() == Some("istio-iptables".as_ref()) {
        std::process::exit(istio_iptables_main(name != "istio-iptables"));
    }
    if name == "redirect-cni" {
        std::process::exit(cni_main());
    }
    init_tracing("warn");
    let cli = Cli::parse();
    if let Err(err) = run(cli) {
        eprintln!("redirect: error: {err:#}");
        std::process::exit(1);
    }
}

/// Logs to stderr at `REDIRECT_LOG`'s filter, else at `default`.
fn init_tracing(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REDIRECT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// `istio-iptables`: exit code 0, 1 on an error, 126 when validation fails.
fn istio_iptables_main(as_subcommand: bool) -> i32 {
    let env = |k: &str| std::env::var(k).ok();
    let argv = std::env::args_os().skip(usize::from(as_subcommand));
    let cli = match istio::parse_istio_iptables(argv, env) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_tracing(istio::log_filter(&cli.istio.log_output_level).unwrap_or("info"));
    match run_istio_iptables(cli) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("istio-iptables (redirect): error: {err:#}");
            if err.downcast_ref::<validation::ValidationError>().is_some() {
                tracing::error!(
                    "validation failed; workload is not ready for Istio: capture is not in force"
                );
                validation::EXIT_CODE
            } else {
                1
            }
        }
    }
}

/// What `istio-iptables` does: register the pod with the node install if
/// there is one, else apply one-shot to its cgroup; then validate if asked.
fn run_istio_iptables(cli: istio::IstioIptablesCli) -> Result<()> {
    istio::check_loopback_env(|k| std::env::var(k).ok())?;
    let netns = (!cli.istio.network_namespace.is_empty())
        .then(|| std::path::PathBuf::from(&cli.istio.network_namespace));
    let node_installed = node::installed(&cli.node_pin_dir).is_ok();
    let probe = validation::Probe {
        proxy_port: policy_port(&cli.policy.proxy_port, "--envoy-port")?,
        inbound_port: policy_port(&cli.policy.inbound_capture_port, "--inbound-capture-port")?,
        probe_port: cli.istio.probe_port,
        timeout: cli.istio.probe_timeout,
        ipv6: validation::Probe::host_is_ipv6(),
    };
    let (run_validation, skip) = (cli.istio.run_validation, cli.istio.skip_rule_apply);
    let mut istio_args = cli.istio.clone();
    // Validated below, once, whichever way the rules were applied.
    istio_args.run_validation = false;
    let command = if node_installed {
        let netns = netns.unwrap_or_else(|| "/proc/self/ns/net".into());
        tracing::info!(netns = %netns.display(), node = %cli.node_pin_dir.display(),
            "a node install is present: registering the pod's network namespace");
        if cli.istio.cleanup_only {
            Command::Pod(PodCommand::Remove(redirect::cli::PodRemoveArgs {
                netns: Some(netns),
                cookie: None,
                node: redirect::cli::NodePinArgs {
                    pin_dir: cli.node_pin_dir,
                    lock_timeout: cli.lock_timeout,
                },
            }))
        } else {
            Command::Pod(PodCommand::Add(Box::new(redirect::cli::PodAddArgs {
                netns,
                replace: true,
                allow_no_proxy_exemption: false,
                dry_run: cli.dry_run,
                json: false,
                node: redirect::cli::NodePinArgs {
                    pin_dir: cli.node_pin_dir,
                    lock_timeout: cli.lock_timeout,
                },
                policy: cli.policy,
            })))
        }
    } else if cli.istio.cleanup_only {
        let cgroup = resolve_cgroup(cli.cgroup)?;
        Command::Remove(redirect::cli::RemoveArgs {
            pod: redirect::cli::WhichPod {
                pin_dir: cli.pin_dir,
                cgroup: Some(cgroup),
            },
            lock_timeout: cli.lock_timeout,
        })
    } else {
        Command::Apply(Box::new(redirect::cli::ApplyArgs {
            cgroup: cli.cgroup,
            netns,
            pin: redirect::cli::PinDirArgs {
                pin_dir: cli.pin_dir,
            },
            dry_run: cli.dry_run,
            json: false,
            istio: istio_args,
            max_connections: None,
            allow_no_proxy_exemption: false,
            lock_timeout: cli.lock_timeout,
            policy: cli.policy,
        }))
    };
    cli.istio.check()?;
    if skip {
        tracing::info!("--skip-rule-apply: nothing applied");
    } else {
        run(Cli { command })?;
    }
    if run_validation && !cli.dry_run {
        probe.run()?;
    }
    Ok(())
}

/// `redirect cni install|uninstall`.
fn run_cni(cmd: CniCommand) -> Result<()> {
    use redirect::cni_install as ci;
    match cmd {
        CniCommand::Install(args) => {
            let dirs = &args.dirs;
            if let Some(cgroup) = &args.cgroup {
                let r = node::install(&node::InstallRequest {
                    cgroup: cgroup.clone(),
                    pin_dir: dirs.node_pin_dir.clone(),
                    max_connections: None,
                    max_pods: None,
                    lock_timeout: Duration::from_secs(120),
                })?;
                tracing::info!(
                    generation = r.generation,
                    pods = r.pods,
                    "node mode installed"
                );
            }
            let mut config = serde_json::Map::new();
            config.insert(
                "node_pin_dir".into(),
                dirs.node_pin_dir.display().to_string().into(),
            );
            config.insert(
                "exclude_namespaces".into(),
                serde_json::to_value(&args.exclude_namespaces)?,
            );
            let exe = std::fs::read_link("/proc/self/exe").context("finding this binary")?;
            let bin = ci::copy_binary(&exe, &dirs.cni_bin_dir)?;
            println!("installed {}", bin.display());
            if !args.wait {
                let conf = ci::add_to_conflist(&dirs.cni_conf_dir, &config)?;
                println!("added {} to {}", ci::PLUGIN_TYPE, conf.display());
                return Ok(());
            }
            // Stay: signals are taken synchronously by this (only) thread.
            // SAFETY: signal-set calls on a local set.
            let set = unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTERM);
                libc::sigaddset(&mut set, libc::SIGINT);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                set
            };
            let mut warned = false;
            loop {
                if !ci::in_conflist(&dirs.cni_conf_dir) {
                    match ci::add_to_conflist(&dirs.cni_conf_dir, &config) {
                        Ok(conf) => {
                            println!("added {} to {}", ci::PLUGIN_TYPE, conf.display());
                            warned = false;
                        }
                        Err(e) if !warned => {
                            tracing::warn!("{e:#}; waiting");
                            warned = true;
                        }
                        Err(_) => {}
                    }
                }
                if !bin.exists() {
                    ci::copy_binary(&exe, &dirs.cni_bin_dir)?;
                }
                let timeout = libc::timespec {
                    tv_sec: 1,
                    tv_nsec: 0,
                };
                // SAFETY: waits for a signal of the blocked set.
                let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
                if sig > 0 {
                    tracing::info!(signal = sig, "stopping: taking the plugin out");
                    break;
                }
            }
            let changed = ci::remove_from_conflists(&dirs.cni_conf_dir)?;
            ci::remove_binary(&dirs.cni_bin_dir)?;
            println!("removed {} from {changed:?}", ci::PLUGIN_TYPE);
        }
        CniCommand::Uninstall(args) => {
            let dirs = &args.dirs;
            let changed = ci::remove_from_conflists(&dirs.cni_conf_dir)?;
            ci::remove_binary(&dirs.cni_bin_dir)?;
            println!("removed {} from {changed:?}", ci::PLUGIN_TYPE);
            if args.node && node::installed(&dirs.node_pin_dir).is_ok() {
                let n = node::uninstall(&dirs.node_pin_dir, Duration::from_secs(120))?;
                println!("uninstalled node mode ({n} pod(s) removed)");
            }
        }
    }
    Ok(())
}

/// `redirect-cni`: a CNI plugin's exit code; errors as JSON on stdout.
fn cni_main() -> i32 {
    init_tracing("info");
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut version = "1.0.0".to_string();
    let result = (|| -> Result<Option<serde_json::Value>, cni::CniError> {
        if command == "VERSION" {
            return Ok(Some(cni::version_result()));
        }
        let mut stdin = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut stdin).map_err(|e| {
            cni::CniError {
                code: 6,
                msg: "cannot read the network configuration".into(),
                details: e.to_string(),
            }
        })?;
        let conf = cni::parse_config(&stdin)?;
        version = conf.cni_version.clone();
        match command.as_str() {
            "ADD" => cni_add(&conf).map(Some),
            "DEL" => cni_del(&conf).map(|()| None),
            "CHECK" => cni_check(&conf).map(|()| None),
            other => Err(cni::CniError {
                code: 4,
                msg: format!("CNI_COMMAND {other:?}: not ADD, DEL, CHECK or VERSION"),
                details: String::new(),
            }),
        }
    })();
    match result {
        Ok(out) => {
            if let Some(out) = out {
                println!("{out}");
            }
            0
        }
        Err(e) => {
            tracing::error!(code = e.code, "{e}");
            println!("{}", e.to_json(&version));
            1
        }
    }
}

fn cni_error(code: u32, msg: impl Into<String>, details: impl std::fmt::Display) -> cni::CniError {
    cni::CniError {
        code,
        msg: msg.into(),
        details: format!("{details:#}"),
    }
}

/// `CNI_NETNS`, required.
fn cni_netns() -> Result<std::path::PathBuf, cni::CniError> {
    match std::env::var("CNI_NETNS") {
        Ok(p) if !p.is_empty() => Ok(p.into()),
        _ => Err(cni_error(4, "CNI_NETNS is not set", "")),
    }
}

/// The pod's namespace and name from `CNI_ARGS`, and what to do with it.
fn cni_decide(conf: &cni::PluginConfig) -> Result<(String, cni::Decision), cni::CniError> {
    let (ns, name) = cni::k8s_args(&std::env::var("CNI_ARGS").unwrap_or_default());
    let pod = format!(
        "{}/{}",
        ns.as_deref().unwrap_or("?"),
        name.as_deref().unwrap_or("?")
    );
    Ok((pod, conf.decide(ns.as_deref(), &conf.annotations())?))
}

fn cni_add(conf: &cni::PluginConfig) -> Result<serde_json::Value, cni::CniError> {
    let (pod, decision) = cni_decide(conf)?;
    let policy = match decision {
        cni::Decision::Skip(why) => {
            tracing::info!(pod, "not registered: {why}");
            return Ok(cni::add_result(conf));
        }
        cni::Decision::Register(p) => p,
    };
    let netns = cni_netns()?;
    node::installed(&conf.node_pin_dir).map_err(|e| {
        cni_error(
            999,
            format!("pod {pod}: cannot register it: node mode is not installed"),
            e,
        )
    })?;
    let req = pods::AddRequest {
        netns,
        pin_dir: conf.node_pin_dir.clone(),
        policy: policy
            .to_spec()
            .map_err(|e| cni_error(7, "invalid policy", e))?,
        replace: true,
        allow_no_proxy_exemption: false,
        lock_timeout: conf.lock_timeout(),
    };
    let r = pods::add(&req)
        .map_err(|e| cni_error(999, format!("pod {pod}: registering it failed"), e))?;
    tracing::info!(
        pod,
        netns_cookie = r.netns_cookie,
        replaced = r.replaced,
        "registered"
    );
    Ok(cni::add_result(conf))
}

/// The cookie of `CNI_NETNS` if it names a namespace registered with the
/// node install.
fn cni_registered(conf: &cni::PluginConfig) -> Result<Option<u64>, cni::CniError> {
    let Ok(netns) = cni_netns() else {
        return Ok(None);
    };
    if !netns.exists() {
        return Ok(None);
    }
    let facts = redirect::netns::probe(Some(&netns))
        .map_err(|e| cni_error(999, format!("CNI_NETNS {}", netns.display()), e))?;
    let node = node::NodeLayout::new(&conf.node_pin_dir);
    Ok(node
        .pod_dir(facts.netns_cookie)
        .exists()
        .then_some(facts.netns_cookie))
}

fn cni_del(conf: &cni::PluginConfig) -> Result<(), cni::CniError> {
    if node::installed(&conf.node_pin_dir).is_err() {
        tracing::info!("no node install: nothing to remove");
        return Ok(());
    }
    match cni_registered(conf)? {
        Some(cookie) => {
            pods::remove(&conf.node_pin_dir, None, Some(cookie), conf.lock_timeout())
                .map_err(|e| cni_error(999, "removing the pod failed", e))?;
            tracing::info!(netns_cookie = cookie, "removed");
        }
        None => {
            // Not registered, or its namespace is gone already: remove
            // whatever pods lost their namespace.
            let gone = std::path::Path::new("/nonexistent");
            let r = pods::gc(&conf.node_pin_dir, gone, conf.lock_timeout())
                .map_err(|e| cni_error(999, "removing dead pods failed", e))?;
            tracing::info!(removed = ?r.pods, "pod not registered");
        }
    }
    Ok(())
}

fn cni_check(conf: &cni::PluginConfig) -> Result<(), cni::CniError> {
    let (pod, decision) = cni_decide(conf)?;
    if let cni::Decision::Register(_) = decision {
        node::installed(&conf.node_pin_dir)
            .map_err(|e| cni_error(999, "node mode is not installed", e))?;
        if cni_registered(conf)?.is_none() {
            return Err(cni_error(
                999,
                format!("pod {pod} should be registered and is not"),
                "",
            ));
        }
    }
    Ok(())
}

/// `--cgroup`, with `auto` resolved.
fn resolve_cgroup(cgroup: std::path::PathBuf) -> Result<std::path::PathBuf> {
    if cgroup.as_os_str() == "auto" {
        let found = redirect::cgroup::pod_cgroup_of_self()?;
        tracing::info!(cgroup = %found.display(), "--cgroup auto: the pod's cgroup");
        Ok(found)
    } else {
        Ok(cgroup)
    }
}

fn policy_port(value: &str, flag: &'static str) -> Result<u16> {
    Ok(redirect::policy::parse_port(flag, value)?)
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
            args.istio.check()?;
            let policy = args.policy.to_spec()?;
            args.cgroup = resolve_cgroup(args.cgroup)?;
            if args.netns.is_none() && !args.istio.network_namespace.is_empty() {
                args.netns = Some(args.istio.network_namespace.clone().into());
            }
            let probe = args.istio.run_validation.then(|| validation::Probe {
                proxy_port: policy.proxy_port,
                inbound_port: policy.inbound_port,
                probe_port: args.istio.probe_port,
                timeout: args.istio.probe_timeout,
                ipv6: validation::Probe::host_is_ipv6(),
            });
            if args.istio.cleanup_only {
                let pin_dir = args.pin.resolve(&args.cgroup)?;
                let timeout = Duration::from_secs(args.lock_timeout);
                let shown = pin_dir.display().to_string();
                let gens = tokio::task::spawn_blocking(move || apply::remove(&pin_dir, timeout))
                    .await
                    .context("remove task")??;
                println!(
                    "--cleanup-only: removed {} generation(s) from {shown}",
                    gens.len()
                );
                return Ok(());
            }
            if args.istio.skip_rule_apply {
                tracing::info!("--skip-rule-apply: nothing applied");
                if let Some(p) = probe {
                    p.run()?;
                }
                return Ok(());
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
            if let Some(p) = probe {
                tokio::task::spawn_blocking(move || p.run())
                    .await
                    .context("validation task")??;
            }
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
            let virt = redirect::policy::parse_interfaces(
                "--kube-virt-interfaces",
                &args.kube_virt_interfaces,
            )?;
            print!(
                "{}",
                match args.family {
                    FamilyArg::V4 => render::render_virt(&spec, Family::V4, &virt),
                    FamilyArg::V6 => render::render_virt(&spec, Family::V6, &virt),
                    FamilyArg::Both => render::render_both_virt(&spec, &virt),
                }
            );
        }
        Command::Node(cmd) => run_node(cmd)?,
        Command::Pod(cmd) => run_pod(cmd)?,
        Command::Cni(cmd) => run_cni(cmd)?,
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

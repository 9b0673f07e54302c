//! Node mode: one node install, pods registered by `redirect pod add`.
//!
//! A fleet of light pods (`redirect_tests::fleet`: network namespaces with
//! a veth to a routed hub, processes in the fleet's cgroup) with a node
//! install attached to the fleet's cgroup. Three measurements:
//!
//! - **pod add / pod remove**: wall time of the real commands, each on a
//!   fresh pod of the fleet, with N pods already registered, next to
//!   `iptables-*-restore` loading the same istio table into a fresh pod's
//!   namespace (and an empty table to remove it), the methods taking turns;
//! - **kernel memory**: `memlock` summed over every map and program pinned
//!   under the node's pin dir (pod records included; links carry none),
//!   with no pod registered (the node's fixed cost) and with N;
//! - **connection setup** in one pod of a node with the most pods
//!   registered, and in the only pod of a second node (and of a third, the
//!   control: two nodes alike show the noise), in turns, as scenario 1.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use redirect_tests::fleet::{Fleet, HUB_IP};
use serde::Serialize;

use crate::{
    harness::{Plan, ProgCost, active_gen_dir, check_client, fdinfo, prog_cost_of, setup_args},
    peer::{ClientReport, ProxyMode},
    world::{
        EMPTY_NAT, Method, Proc, Tools, check_interrupted, istio_rules, restore, run_client,
        run_ok, start_proxy,
    },
};

/// The policy every pod is registered with: scenario 1's, istio's `-i '*'`
/// with the default ports and proxy owner 1337.
pub const POLICY: [&str; 2] = ["-i", "*"];

/// One pod added and removed.
#[derive(Clone, Debug, Serialize)]
pub struct NodeOp {
    /// Pods registered before the add.
    pub registered: usize,
    /// `redirect` (`pod add` / `pod remove`), `iptables-legacy` or
    /// `iptables-nft` (`-restore` of the istio table / of an empty one).
    pub method: &'static str,
    /// Repetition (the methods take turns within one).
    pub rep: usize,
    /// Wall time of the process that registers the pod, seconds.
    pub add_s: f64,
    /// Wall time of the process that unregisters it, seconds.
    pub remove_s: f64,
}

/// Kernel memory of a node install.
#[derive(Clone, Debug, Serialize)]
pub struct NodeMemory {
    /// Pods registered.
    pub registered: usize,
    /// When: `registered` (right after the last add) or `after-churn`
    /// (after the add/remove cycles at this size).
    pub when: &'static str,
    /// `memlock` of every pinned map and program, bytes.
    pub bytes: u64,
    /// Of which maps.
    pub maps_bytes: u64,
    /// Of which programs.
    pub progs_bytes: u64,
    /// Pinned links (no `memlock` of their own).
    pub links: u64,
    /// `memlock` per pinned name (`CONFIGS`, `POD` for every pod record
    /// added up, `prog_connect4`, ...).
    pub by_name: BTreeMap<String, u64>,
}

/// One connection-setup measurement in node mode.
#[derive(Clone, Debug, Serialize)]
pub struct NodeSetupSample {
    /// Pods registered on the measured pod's node.
    pub size: usize,
    /// `one-pod`, `many-pods` or `control` (a second one-pod node).
    pub method: &'static str,
    /// Round (the three take turns).
    pub round: usize,
    /// What the client measured.
    pub report: ClientReport,
}

/// Everything the node scenario measured.
#[derive(Clone, Debug, Serialize)]
pub struct NodeResults {
    /// Pods registered at each measured size.
    pub levels: Vec<usize>,
    /// `pod add` flags.
    pub policy: String,
    /// The node installs' `--max-pods`.
    pub max_pods: u32,
    /// Pod add and remove times.
    pub ops: Vec<NodeOp>,
    /// Memory at 0 pods and at each size.
    pub memory: Vec<NodeMemory>,
    /// Connection setup, one pod vs many registered.
    pub setup: Vec<NodeSetupSample>,
    /// BPF program time of the connection setup of `one-pod` (size 1) and
    /// `many-pods` (size: its pods), after the rounds, in turns (ABBA).
    pub prog_cost: Vec<ProgCost>,
}

/// A node install on a fleet's cgroup, uninstalled (and its pin dir
/// removed) on drop.
struct NodeInstall {
    pin: PathBuf,
    redirect: PathBuf,
}

impl NodeInstall {
    fn install(fleet: &Fleet, tools: &Tools, max_pods: u32) -> Result<NodeInstall> {
        check_interrupted()?;
        // The guard first: an install that fails half-way is removed too.
        let node = NodeInstall {
            pin: PathBuf::from("/sys/fs/bpf").join(format!("{}-node", fleet.name)),
            redirect: tools.redirect.clone(),
        };
        let mut cmd = Command::new(&tools.redirect);
        cmd.args(["node", "install", "--cgroup"])
            .arg(&fleet.cgroup)
            .arg("--pin-dir")
            .arg(&node.pin)
            .arg("--max-pods")
            .arg(max_pods.to_string());
        run_ok(cmd, "redirect node install")?;
        Ok(node)
    }

    /// `redirect pod add` of `fleet`'s pod `i`; its wall time.
    fn add(&self, fleet: &Fleet, i: usize) -> Result<Duration> {
        check_interrupted()?;
        let mut cmd = Command::new(&self.redirect);
        cmd.args(["pod", "add", "--netns"])
            .arg(fleet.netns_path(i))
            .arg("--pin-dir")
            .arg(&self.pin)
            .args(POLICY);
        let t = Instant::now();
        run_ok(cmd, "redirect pod add")?;
        Ok(t.elapsed())
    }

    /// `redirect pod remove` of `fleet`'s pod `i`; its wall time.
    fn remove(&self, fleet: &Fleet, i: usize) -> Result<Duration> {
        let mut cmd = Command::new(&self.redirect);
        cmd.args(["pod", "remove", "--netns"])
            .arg(fleet.netns_path(i))
            .arg("--pin-dir")
            .arg(&self.pin);
        let t = Instant::now();
        run_ok(cmd, "redirect pod remove")?;
        Ok(t.elapsed())
    }

    /// Pods registered, from `redirect node status --json`.
    fn pods(&self) -> Result<u64> {
        let out = Command::new(&self.redirect)
            .args(["node", "status", "--json", "--pin-dir"])
            .arg(&self.pin)
            .stdin(Stdio::null())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "redirect node status: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v["pods"].as_u64().context("node status without pods")
    }

    /// `memlock` of everything pinned under the node's pin dir.
    fn memory(&self, registered: usize, when: &'static str) -> Result<NodeMemory> {
        let mut m = NodeMemory {
            registered,
            when,
            bytes: 0,
            maps_bytes: 0,
            progs_bytes: 0,
            links: 0,
            by_name: BTreeMap::new(),
        };
        let mut seen = BTreeSet::new();
        pinned_memory(&self.pin, &mut seen, &mut m)?;
        m.bytes = m.maps_bytes + m.progs_bytes;
        Ok(m)
    }
}

impl Drop for NodeInstall {
    fn drop(&mut self) {
        if self.pin.exists() {
            let _ = Command::new(&self.redirect)
                .args(["node", "uninstall", "--pin-dir"])
                .arg(&self.pin)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if self.pin.exists() {
            let _ = std::fs::remove_dir_all(&self.pin);
        }
    }
}

/// Adds up the `memlock` of the maps and programs pinned under `dir`, each
/// object once (a generation's `complete` marker is its `sockops` program
/// pinned again: it comes last, so the program counts as `prog_sockops`),
/// and counts the links.
fn pinned_memory(dir: &Path, seen: &mut BTreeSet<(char, u64)>, m: &mut NodeMemory) -> Result<()> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|e| (e.file_name() == "complete", e.file_name()));
    for e in entries {
        let path = e.path();
        if e.file_type()?.is_dir() {
            pinned_memory(&path, seen, m)?;
            continue;
        }
        let Some(info) = fdinfo(&path)? else {
            continue;
        };
        // A link's fdinfo names its program too: links first.
        let (kind, id) = if let Some(id) = info.get("link_id") {
            ('l', *id)
        } else if let Some(id) = info.get("map_id") {
            ('m', *id)
        } else if let Some(id) = info.get("prog_id") {
            ('p', *id)
        } else {
            continue;
        };
        if !seen.insert((kind, id)) {
            continue;
        }
        let memlock = info.get("memlock").copied().unwrap_or(0);
        match kind {
            'm' => m.maps_bytes += memlock,
            'p' => m.progs_bytes += memlock,
            _ => m.links += 1,
        }
        if kind != 'l' {
            let name = e.file_name().to_string_lossy().into_owned();
            *m.by_name.entry(name).or_default() += memlock;
        }
    }
    Ok(())
}

/// An `iptables-*-restore` of `rules` into `fleet`'s pod `i`; its wall
/// time.
fn ipt_restore(fleet: &Fleet, i: usize, m: Method, rules: &str) -> Result<Duration> {
    check_interrupted()?;
    let bin = m.restore_bin().expect("an iptables method");
    restore(fleet.command(Some(i), 0, Path::new(bin))?, bin, rules)
}

/// The node scenario (see the module's documentation).
pub fn run(plan: &Plan, tools: &Tools) -> Result<NodeResults> {
    let levels = plan.node_levels.clone();
    let most = *levels.last().context("no node sizes")?;
    let max_pods = redirect::node::DEFAULT_MAX_PODS.max(most as u32 + 1);
    // Pods 0..most are registered in turn; each add/remove cycle takes a
    // fresh one from `most` on.
    let methods = [
        Method::Redirect,
        Method::IptablesLegacy,
        Method::IptablesNft,
    ];
    let fresh = methods.len() * plan.node_reps * levels.len();
    eprintln!("bench: node mode, a fleet of {} pods", most + fresh);
    let fleet = Fleet::create(most + fresh)?;
    let node = NodeInstall::install(&fleet, tools, max_pods)?;
    let one = Fleet::create(1)?;
    let one_node = NodeInstall::install(&one, tools, max_pods)?;
    let control = Fleet::create(1)?;
    let control_node = NodeInstall::install(&control, tools, max_pods)?;

    let mut r = NodeResults {
        levels: levels.clone(),
        policy: POLICY
            .iter()
            .map(|a| if *a == "*" { "'*'" } else { a })
            .collect::<Vec<_>>()
            .join(" "),
        max_pods,
        ops: Vec::new(),
        memory: vec![node.memory(0, "registered")?],
        setup: Vec::new(),
        prog_cost: Vec::new(),
    };
    let istio = istio_rules(&[]);
    let mut registered = 0;
    let mut next = most;
    for &level in &levels {
        eprintln!("bench: node mode, {level} pods registered");
        while registered < level {
            node.add(&fleet, registered)?;
            registered += 1;
        }
        anyhow::ensure!(
            node.pods()? == level as u64,
            "node status does not count {level} pods"
        );
        r.memory.push(node.memory(level, "registered")?);
        for rep in 0..plan.node_reps {
            let mut order = methods.to_vec();
            if rep % 2 == 1 {
                order.reverse();
            }
            for m in order {
                let pod = next;
                next += 1;
                let (add, remove) = match m {
                    Method::Redirect => (node.add(&fleet, pod)?, node.remove(&fleet, pod)?),
                    _ => (
                        ipt_restore(&fleet, pod, m, &istio)?,
                        ipt_restore(&fleet, pod, m, EMPTY_NAT)?,
                    ),
                };
                r.ops.push(NodeOp {
                    registered: level,
                    method: m.name(),
                    rep,
                    add_s: add.as_secs_f64(),
                    remove_s: remove.as_secs_f64(),
                });
            }
        }
        r.memory.push(node.memory(level, "after-churn")?);
    }

    // Connection setup: pod 0 of each node, the three in turns.
    one_node.add(&one, 0)?;
    control_node.add(&control, 0)?;
    let arms: [(&'static str, &Fleet, usize); 3] = [
        ("one-pod", &one, 1),
        ("many-pods", &fleet, most),
        ("control", &control, 1),
    ];
    let mut proxies = Vec::new();
    for (_, f, _) in arms {
        proxies.push(start_proxy(
            f.command(Some(0), 1337, &tools.bench)?,
            ProxyMode::Setup,
            tools.cpu,
        )?);
    }
    let to = SocketAddr::from((HUB_IP, 80));
    let args = setup_args(plan, plan.setup_count, plan.setup_seconds, plan.warmup);
    let limit = Duration::from_secs_f64(plan.setup_seconds * 3.0 + 60.0);
    eprintln!("bench: node mode, connection setup with 1 and {most} pods registered");
    for round in 0..plan.node_setup_rounds {
        let mut order: Vec<usize> = (0..arms.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for k in order {
            let (name, f, size) = arms[k];
            let cmd = f.command(Some(0), 1000, &tools.bench)?;
            let report = run_client(cmd, to, &args, Some(&proxies[k]), tools.cpu, limit)?;
            check_client(true, name, &report, "node mode, setup")?;
            r.setup.push(NodeSetupSample {
                size,
                method: name,
                round,
                report,
            });
        }
    }
    // The programs' own time, one pod vs many: the statistics on for one
    // measurement at a time, the two nodes in turns (ABBA).
    let nodes = [&one_node, &node];
    for k in [0, 1, 1, 0] {
        let (name, f, size) = arms[k];
        let dir = active_gen_dir(&nodes[k].pin)?;
        let cost = prog_cost_of(&dir, size, || {
            let cmd = f.command(Some(0), 1000, &tools.bench)?;
            let report = run_client(cmd, to, &args, Some(&proxies[k]), tools.cpu, limit)?;
            check_client(true, name, &report, "node mode, program cost")?;
            Ok(report)
        })?;
        r.prog_cost.push(cost);
    }
    drop::<Vec<Proc>>(proxies);
    Ok(r)
}

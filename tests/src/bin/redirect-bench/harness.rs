//! The scenarios. Every measurement runs the same bench client against the
//! same bench proxy in a throwaway pod per method; the methods take turns
//! (ABCD DCBA ...) so that drift on a shared machine hits them alike. The
//! harness prints raw samples as JSON; `cargo xtask bench` turns them into
//! ratios, tables and plots.

use std::{
    collections::BTreeMap,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use redirect_common::map_names;
use redirect_tests::pod::Side;
use serde::Serialize;

use crate::{
    node::NodeResults,
    noop::NoopHooks,
    peer::{ClientReport, ProxyMode},
    world::{Method, Policy, Proc, Tools, World},
};

/// Sizes and repetitions of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// `--quick`.
    pub quick: bool,
    /// Scenario 1 (setup at size 0): rounds.
    pub setup_rounds: usize,
    /// Connections per measurement (setup and scaling).
    pub setup_count: u64,
    /// ...or this many seconds, whichever comes first.
    pub setup_seconds: f64,
    /// Unmeasured connections before each measurement.
    pub warmup: u64,
    /// Scenario 3 sizes (besides 0, which scenario 1 measures).
    pub sweep_sizes: Vec<usize>,
    /// Scenario 3 rounds per size.
    pub sweep_rounds: usize,
    /// Scenario 3, services: other services ahead of the target (0: the
    /// target alone).
    pub service_sizes: Vec<usize>,
    /// Scenario 3, services: rounds per size.
    pub service_rounds: usize,
    /// Scenario 2 rounds.
    pub rr_rounds: usize,
    /// Scenario 2 seconds per measurement.
    pub rr_seconds: f64,
    /// Scenario 4: apply/remove cycles per size and method.
    pub apply_reps: usize,
    /// Ephemeral-port wrap: connections per method.
    pub wrap_count: u64,
    /// Ephemeral-port range used there (`None`: the kernel default).
    pub wrap_port_range: Option<(u16, u16)>,
    /// Scenario 5: connections before the occupancy check.
    pub occupancy_count: u64,
    /// Scenario 5: captured connections held open at once for the memory
    /// peak (half IPv4, half IPv6).
    pub peak_count: u64,
    /// Node mode: pods registered at each measured size, ascending.
    pub node_levels: Vec<usize>,
    /// Node mode: pod add/remove cycles per size and method.
    pub node_reps: usize,
    /// Node mode: connection-setup rounds.
    pub node_setup_rounds: usize,
}

impl Plan {
    /// The full run (about 5 minutes on 2 cores) or the CI check.
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                setup_rounds: 2,
                setup_count: 300,
                setup_seconds: 1.0,
                warmup: 50,
                sweep_sizes: vec![100],
                sweep_rounds: 2,
                service_sizes: vec![0, 100],
                service_rounds: 2,
                rr_rounds: 2,
                rr_seconds: 0.2,
                apply_reps: 1,
                wrap_count: 1500,
                // 500 ports: the quick run wraps them too.
                wrap_port_range: Some((40_000, 40_499)),
                occupancy_count: 3000,
                peak_count: 1000,
                node_levels: vec![1, 10],
                node_reps: 2,
                node_setup_rounds: 2,
            }
        } else {
            Plan {
                quick,
                setup_rounds: 9,
                setup_count: 2500,
                setup_seconds: 1.0,
                warmup: 200,
                sweep_sizes: vec![10, 100, 1_000, 10_000, 100_000],
                sweep_rounds: 5,
                service_sizes: vec![0, 100, 1_000, 10_000, 100_000],
                service_rounds: 9,
                rr_rounds: 7,
                rr_seconds: 1.0,
                apply_reps: 3,
                wrap_count: 100_000,
                wrap_port_range: None,
                occupancy_count: 1_000_000,
                peak_count: 100_000,
                node_levels: vec![1, 100, 1000],
                node_reps: 15,
                node_setup_rounds: 15,
            }
        }
    }
}

/// One client run.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Exclusion CIDRs in the policy (`setup`, `rr`), or services ahead of
    /// the target (`services`).
    pub size: usize,
    /// How the connection reached the proxy.
    pub method: Method,
    /// Round number (methods take turns within a round).
    pub round: usize,
    /// What the client measured.
    pub report: ClientReport,
}

/// One apply and removal.
#[derive(Clone, Debug, Serialize)]
pub struct ApplySample {
    /// Exclusion CIDRs in the policy, or services ahead of the target.
    pub size: usize,
    /// Method.
    pub method: Method,
    /// Repetition.
    pub rep: usize,
    /// Wall time of the programming process, seconds.
    pub apply_s: f64,
    /// Wall time of the removal, seconds.
    pub remove_s: f64,
}

/// One BPF map, from `/proc/self/fdinfo` of its pin.
#[derive(Clone, Debug, Serialize)]
pub struct MapMem {
    /// `bpf_map_type`.
    pub map_type: u32,
    /// Capacity.
    pub max_entries: u64,
    /// `memlock:` (the kernel's own accounting of the map's memory).
    pub memlock: u64,
}

/// Kernel memory of a programmed policy.
#[derive(Clone, Debug, Serialize)]
pub struct MemorySample {
    /// Exclusion CIDRs in the policy, or services ahead of the target.
    pub size: usize,
    /// Method.
    pub method: Method,
    /// Sum over `maps` (redirect) or the rule blob (iptables-legacy).
    pub bytes: u64,
    /// Per map, for redirect.
    pub maps: BTreeMap<String, MapMem>,
    /// What `bytes` is.
    pub what: String,
}

/// One run that wraps the ephemeral port range.
#[derive(Clone, Debug, Serialize)]
pub struct WrapSample {
    /// Method.
    pub method: Method,
    /// Ephemeral range in the pod.
    pub port_range: String,
    /// What the client saw.
    pub report: ClientReport,
    /// TIME_WAIT sockets in the pod right after.
    pub time_wait: Option<u64>,
    /// Conntrack entries in the pod right after.
    pub conntrack: Option<u64>,
}

/// Map occupancy after many connections.
#[derive(Clone, Debug, Serialize)]
pub struct Occupancy {
    /// Connections opened and closed.
    pub connections: u64,
    /// What the client saw.
    pub report: ClientReport,
    /// `TUPLES` entries afterwards (must be 0).
    pub tuples_entries: u64,
    /// `CONNS` entries afterwards (must be 0).
    pub conns_entries: u64,
    /// TIME_WAIT sockets in the pod afterwards.
    pub time_wait: Option<u64>,
    /// `redirect status --json` counters afterwards.
    pub counters: serde_json::Value,
    /// `redirect status --json` decisions afterwards.
    pub decisions: serde_json::Value,
}

/// The machine.
#[derive(Clone, Debug, Serialize)]
pub struct Meta {
    /// UTC time of the start.
    pub date: String,
    /// `uname -r`.
    pub kernel: String,
    /// Online CPUs.
    pub cpus: usize,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// `nf_conntrack_max` (global).
    pub conntrack_max: Option<String>,
    /// `nf_conntrack_buckets`.
    pub conntrack_buckets: Option<String>,
    /// Default ephemeral range of a new namespace.
    pub port_range: Option<String>,
    /// `tcp_max_tw_buckets` of a new namespace.
    pub max_tw_buckets: Option<String>,
    /// `iptables-legacy --version`, `iptables-nft --version`.
    pub iptables: Vec<String>,
    /// The CPU the proxy and the client were pinned to.
    pub pinned_cpu: Option<usize>,
}

/// Everything a run produced.
#[derive(Clone, Debug, Serialize)]
pub struct Results {
    /// The machine.
    pub meta: Meta,
    /// The plan.
    pub plan: Plan,
    /// Scenarios 1 and 3: connection setup.
    pub setup: Vec<Sample>,
    /// Scenario 2: request/response.
    pub rr: Vec<Sample>,
    /// Scenario 3, services: connection setup with N services ahead of the
    /// target, no `-i`.
    pub services: Vec<Sample>,
    /// Scenario 4.
    pub apply: Vec<ApplySample>,
    /// Scenario 4, the service policies.
    pub services_apply: Vec<ApplySample>,
    /// Scenario 5, memory.
    pub memory: Vec<MemorySample>,
    /// Scenario 5, memory of the service policies.
    pub services_memory: Vec<MemorySample>,
    /// Scenario 1 again: direct, direct with no-op programs at redirect's
    /// hooks, and redirect, in turns.
    pub floor: Vec<FloorSample>,
    /// The floor scenario's no-op programs, measured like [`ProgCost`]: their
    /// run time is the statistics' own cost per run.
    pub noop_prog_cost: Option<ProgCost>,
    /// Scenarios 1 and 3: BPF program time of redirect's connection setup.
    pub prog_cost: Vec<ProgCost>,
    /// The same, for the service policies.
    pub services_prog_cost: Vec<ProgCost>,
    /// Ephemeral port wrap.
    pub wrap: Vec<WrapSample>,
    /// Scenario 5, occupancy.
    pub occupancy: Option<Occupancy>,
    /// Scenario 5, connection-state memory at 0 and with many connections
    /// open.
    pub peak: Option<Peak>,
    /// Node mode: pod add/remove time, memory per pod, connection setup
    /// with one pod and with many registered.
    pub node: Option<NodeResults>,
}

/// Kernel memory of redirect's connection state, empty and at a peak.
#[derive(Clone, Debug, Serialize)]
pub struct Peak {
    /// Captured connections held open at the peak.
    pub connections: u64,
    /// How many of them reached the proxy with their destination.
    pub with_destination: u64,
    /// `CONNS` and `TUPLES` (memlock, bytes) right after apply.
    pub maps_empty: BTreeMap<String, u64>,
    /// The same at the peak.
    pub maps_peak: BTreeMap<String, u64>,
    /// The same after every connection closed.
    pub maps_after: BTreeMap<String, u64>,
    /// Socket storage charged to the proxy's accepted sockets at the peak
    /// (`ss -m` "o", option memory), summed.
    pub proxy_storage_peak: u64,
    /// The same summed over as many sockets with no storage (the kernel's
    /// baseline option memory), for comparison.
    pub proxy_sockets: u64,
}

fn cmd_out(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn meta(tools: &Tools) -> Result<Meta> {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    // A namespace's defaults, seen from a fresh pod.
    let w = World::new(Method::Direct, tools, ProxyMode::Setup, None)?;
    let port_range = w
        .proc_sys("sys/net/ipv4/ip_local_port_range")
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join("-"));
    let max_tw_buckets = w.proc_sys("sys/net/ipv4/tcp_max_tw_buckets");
    drop(w);
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    Ok(Meta {
        date: cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
        kernel: cmd_out("uname", &["-r"]).unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        conntrack_max: read("/proc/sys/net/netfilter/nf_conntrack_max"),
        conntrack_buckets: read("/proc/sys/net/netfilter/nf_conntrack_buckets"),
        port_range,
        max_tw_buckets,
        iptables: ["iptables-legacy", "iptables-nft"]
            .iter()
            .filter_map(|b| cmd_out(b, &["--version"]))
            .collect(),
        pinned_cpu: tools.cpu,
    })
}

/// Which scenarios to run (all by default).
#[derive(Clone, Debug)]
pub struct Only(pub Vec<String>);

impl Only {
    fn has(&self, s: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|x| x == s)
    }
}

/// Runs the plan.
pub fn run(plan: &Plan, tools: &Tools, only: &Only) -> Result<Results> {
    let mut r = Results {
        meta: meta(tools)?,
        plan: plan.clone(),
        setup: Vec::new(),
        rr: Vec::new(),
        services: Vec::new(),
        apply: Vec::new(),
        services_apply: Vec::new(),
        memory: Vec::new(),
        services_memory: Vec::new(),
        floor: Vec::new(),
        noop_prog_cost: None,
        prog_cost: Vec::new(),
        services_prog_cost: Vec::new(),
        wrap: Vec::new(),
        occupancy: None,
        peak: None,
        node: None,
    };
    if only.has("setup") {
        eprintln!("bench: scenario 1, connection setup, no exclusions");
        let out = Out {
            setup: &mut r.setup,
            apply: &mut r.apply,
            memory: &mut r.memory,
            prog_cost: &mut r.prog_cost,
        };
        setup_at(plan, tools, &Policy::exclusions(0), plan.setup_rounds, out)?;
    }
    if only.has("floor") {
        eprintln!("bench: the hooks' floor: no-op programs at redirect's hooks");
        floor(plan, tools, &mut r.floor, &mut r.noop_prog_cost)?;
    }
    if only.has("scaling") {
        for &size in &plan.sweep_sizes {
            eprintln!("bench: scenario 3, connection setup, {size} exclusion CIDRs");
            let out = Out {
                setup: &mut r.setup,
                apply: &mut r.apply,
                memory: &mut r.memory,
                prog_cost: &mut r.prog_cost,
            };
            setup_at(
                plan,
                tools,
                &Policy::exclusions(size),
                plan.sweep_rounds,
                out,
            )?;
        }
    }
    if only.has("services") {
        for &size in &plan.service_sizes {
            eprintln!("bench: scenario 3, connection setup, {size} services ahead of the target");
            let out = Out {
                setup: &mut r.services,
                apply: &mut r.services_apply,
                memory: &mut r.services_memory,
                prog_cost: &mut r.services_prog_cost,
            };
            let policy = Policy::services(size, tools)?;
            setup_at(plan, tools, &policy, plan.service_rounds, out)?;
        }
    }
    if only.has("rr") {
        eprintln!("bench: scenario 2, request/response over one connection");
        rr(plan, tools, &mut r)?;
    }
    if only.has("wrap") {
        eprintln!(
            "bench: ephemeral port wrap, {} connections per method",
            plan.wrap_count
        );
        wrap(plan, tools, &mut r)?;
    }
    if only.has("occupancy") {
        eprintln!(
            "bench: scenario 5, map occupancy after {} connections",
            plan.occupancy_count
        );
        r.occupancy = Some(occupancy(plan, tools)?);
    }
    if only.has("peak") {
        eprintln!(
            "bench: scenario 5, connection-state memory with {} connections open",
            plan.peak_count
        );
        r.peak = Some(peak(plan, tools)?);
    }
    if only.has("node") {
        eprintln!(
            "bench: node mode, pod add/remove, memory and setup with up to {} pods",
            plan.node_levels.last().copied().unwrap_or(0)
        );
        r.node = Some(crate::node::run(plan, tools)?);
    }
    Ok(r)
}

/// Methods in round `round`'s order: forward, then backward (ABCD DCBA).
fn turn(round: usize) -> Vec<Method> {
    let mut m = Method::ALL.to_vec();
    if round % 2 == 1 {
        m.reverse();
    }
    m
}

pub fn setup_args(plan: &Plan, count: u64, seconds: f64, warmup: u64) -> Vec<String> {
    let _ = plan;
    vec![
        "--mode".into(),
        "setup".into(),
        "--count".into(),
        count.to_string(),
        "--seconds".into(),
        seconds.to_string(),
        "--warmup".into(),
        warmup.to_string(),
    ]
}

fn check_report(w: &World, rep: &ClientReport, what: &str) -> Result<()> {
    check_client(w.method != Method::Direct, w.method.name(), rep, what)
}

/// Fails a client run in which nothing succeeded, or where a captured
/// connection (`captured`) reached the proxy without its original
/// destination, or a direct one with one; says how many operations failed.
pub fn check_client(captured: bool, name: &str, rep: &ClientReport, what: &str) -> Result<()> {
    let errors: u64 = rep.errors.values().sum();
    anyhow::ensure!(
        rep.ops > 0,
        "{what}, {name}: no operation succeeded ({:?})",
        rep.first_error
    );
    if captured {
        anyhow::ensure!(
            rep.orig_dst_missing == 0,
            "{what}, {name}: {} connections reached the proxy without an original destination",
            rep.orig_dst_missing
        );
    } else {
        anyhow::ensure!(
            rep.orig_dst_ok == 0,
            "{what}, {name}: SO_ORIGINAL_DST answered on a direct connection"
        );
    }
    if errors > 0 {
        eprintln!(
            "bench: {what}, {name}: {errors} failed operations ({:?})",
            rep.first_error
        );
    }
    Ok(())
}

/// Where one policy's samples go.
struct Out<'a> {
    setup: &'a mut Vec<Sample>,
    apply: &'a mut Vec<ApplySample>,
    memory: &'a mut Vec<MemorySample>,
    prog_cost: &'a mut Vec<ProgCost>,
}

/// One connection-setup measurement of the floor scenario.
#[derive(Clone, Debug, Serialize)]
pub struct FloorSample {
    /// Exclusion CIDRs in redirect's policy: always 0 (the shape of
    /// [`Sample`], for the report's tools).
    pub size: usize,
    /// `direct`, `noop-hooks` (direct plus a no-op program at each of
    /// redirect's hooks) or `redirect`.
    pub method: &'static str,
    /// Round number (the three take turns within a round).
    pub round: usize,
    /// What the client measured.
    pub report: ClientReport,
}

/// The floor: what running redirect's hooks costs before any program does
/// work. Three pods with the policy of scenario 1 (`direct` has none):
/// `direct`, `direct` with [`NoopHooks`] attached, and `redirect`, measured
/// in turns like scenario 1.
fn floor(
    plan: &Plan,
    tools: &Tools,
    out: &mut Vec<FloorSample>,
    noop_cost: &mut Option<ProgCost>,
) -> Result<()> {
    let direct = World::new(Method::Direct, tools, ProxyMode::Setup, None)?;
    let hooked = World::new(Method::Direct, tools, ProxyMode::Setup, None)?;
    let hooks = NoopHooks::attach(&hooked.pod)?;
    let mut redirect = World::new(Method::Redirect, tools, ProxyMode::Setup, None)?;
    redirect.apply(&Policy::exclusions(0))?;
    let worlds = [
        ("direct", &direct),
        ("noop-hooks", &hooked),
        ("redirect", &redirect),
    ];
    let args = setup_args(plan, plan.setup_count, plan.setup_seconds, plan.warmup);
    let limit = Duration::from_secs_f64(plan.setup_seconds * 3.0 + 60.0);
    for round in 0..plan.setup_rounds {
        let mut order = worlds.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for (name, w) in order {
            let report = w.client(&args, limit)?;
            check_report(w, &report, &format!("floor, {name}"))?;
            out.push(FloorSample {
                size: 0,
                method: name,
                round,
                report,
            });
        }
    }
    *noop_cost = Some(prog_cost(&hooked, hooks.pin_dir(), &args, limit, 0)?);
    drop(hooks);
    Ok(())
}

/// Where redirect's connection setup spends its BPF time: one more setup
/// measurement on redirect's pod with the kernel's run-time statistics on
/// (`BPF_ENABLE_STATS`, only for that measurement: they cost two clock
/// reads per program run), then each program's runs and run time.
#[derive(Clone, Debug, Serialize)]
pub struct ProgCost {
    /// Exclusion CIDRs in the policy, or services ahead of the target.
    pub size: usize,
    /// Connections made during the measurement, warm-up included (the
    /// programs run for those too).
    pub connections: u64,
    /// Client and proxy CPU time per connection in that measurement, ns.
    pub cpu_ns_per_conn: f64,
    /// One entry per attached program.
    pub programs: Vec<ProgRun>,
}

/// One program's share of a [`ProgCost`] measurement.
#[derive(Clone, Debug, Serialize)]
pub struct ProgRun {
    /// The hook, as `status` names it (`sockops`, `connect4`...).
    pub program: String,
    /// Runs during the measurement.
    pub runs: u64,
    /// Their total run time, nanoseconds (helpers they call included).
    pub run_ns: u64,
}

/// The directory of the active generation's pins under redirect pin dir
/// `pin_dir`.
pub fn active_gen_dir(pin_dir: &Path) -> Result<PathBuf> {
    let layout = redirect::apply::Layout::new(pin_dir);
    let active = *layout
        .generations()?
        .last()
        .context("no generation applied")?;
    Ok(layout.gen_dir(active))
}

/// Runs and run time (ns) of the programs pinned as `prog_<hook>` in `dir`,
/// by hook name.
fn prog_counters(dir: &Path) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for (_, _, short) in redirect::apply::PROGRAMS {
        let path = dir.join(format!("prog_{short}"));
        let info = aya::programs::ProgramInfo::from_pin(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let ns = info.run_time().as_nanos() as u64;
        out.insert(short.to_string(), (info.run_count(), ns));
    }
    Ok(out)
}

/// See [`ProgCost`]: one setup measurement on `w` with the statistics on,
/// reading the programs pinned in `prog_dir`.
fn prog_cost(
    w: &World,
    prog_dir: &Path,
    args: &[String],
    limit: Duration,
    size: usize,
) -> Result<ProgCost> {
    prog_cost_of(prog_dir, size, || {
        let report = w.client(args, limit)?;
        check_report(w, &report, &format!("program cost, size {size}"))?;
        Ok(report)
    })
}

/// See [`ProgCost`]: the setup measurement `measure` with the statistics
/// on, reading the programs pinned in `prog_dir`.
pub fn prog_cost_of(
    prog_dir: &Path,
    size: usize,
    measure: impl FnOnce() -> Result<ClientReport>,
) -> Result<ProgCost> {
    let before = prog_counters(prog_dir)?;
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics (BPF_ENABLE_STATS)")?;
    let report = measure();
    drop(stats);
    let report = report?;
    let after = prog_counters(prog_dir)?;
    let programs = after
        .iter()
        .map(|(name, &(runs, ns))| {
            let (runs0, ns0) = before.get(name).copied().unwrap_or_default();
            ProgRun {
                program: name.clone(),
                runs: runs.saturating_sub(runs0),
                run_ns: ns.saturating_sub(ns0),
            }
        })
        .collect();
    Ok(ProgCost {
        size,
        connections: report.ops + report.warmup_ops,
        // The client's CPU time covers the measured part, the proxy's the
        // warm-up too.
        cpu_ns_per_conn: report.client_cpu_ns as f64 / report.ops as f64
            + report.proxy_cpu_ns as f64 / (report.ops + report.warmup_ops) as f64,
        programs,
    })
}

fn setup_at(plan: &Plan, tools: &Tools, policy: &Policy, rounds: usize, r: Out<'_>) -> Result<()> {
    let size = policy.size;
    let mut worlds = Vec::new();
    let mut first_apply = BTreeMap::new();
    for m in Method::ALL {
        let mut w = World::new(m, tools, ProxyMode::Setup, None)?;
        if let Some(d) = w.apply(policy)? {
            first_apply.insert(m, d);
        }
        if let Some(mem) = memory(&w, size)? {
            r.memory.push(mem);
        }
        worlds.push(w);
    }
    let args = setup_args(plan, plan.setup_count, plan.setup_seconds, plan.warmup);
    let limit = Duration::from_secs_f64(plan.setup_seconds * 3.0 + 60.0);
    for round in 0..rounds {
        for m in turn(round) {
            let w = worlds
                .iter()
                .find(|w| w.method == m)
                .expect("one per method");
            let report = w.client(&args, limit)?;
            check_report(w, &report, &format!("setup, size {size}"))?;
            r.setup.push(Sample {
                size,
                method: m,
                round,
                report,
            });
        }
    }
    if let Some(w) = worlds.iter().find(|w| w.method == Method::Redirect) {
        let dir = active_gen_dir(&w.pin_dir())?;
        r.prog_cost.push(prog_cost(w, &dir, &args, limit, size)?);
    }
    // Scenario 4: removal of the policy measured above, then more cycles.
    for rep in 0..plan.apply_reps {
        for w in worlds.iter_mut() {
            let apply = if rep == 0 {
                first_apply.get(&w.method).copied()
            } else {
                w.apply(policy)?
            };
            let remove = w.remove()?;
            if let (Some(a), Some(d)) = (apply, remove) {
                r.apply.push(ApplySample {
                    size,
                    method: w.method,
                    rep,
                    apply_s: a.as_secs_f64(),
                    remove_s: d.as_secs_f64(),
                });
            }
        }
    }
    Ok(())
}

fn rr(plan: &Plan, tools: &Tools, r: &mut Results) -> Result<()> {
    let mut worlds = Vec::new();
    for m in Method::ALL {
        let mut w = World::new(m, tools, ProxyMode::Echo, None)?;
        w.apply(&Policy::exclusions(0))?;
        worlds.push(w);
    }
    let args: Vec<String> = vec![
        "--mode".into(),
        "rr".into(),
        "--seconds".into(),
        plan.rr_seconds.to_string(),
        "--warmup".into(),
        "1000".into(),
    ];
    let limit = Duration::from_secs_f64(plan.rr_seconds * 3.0 + 60.0);
    for round in 0..plan.rr_rounds {
        for m in turn(round) {
            let w = worlds
                .iter()
                .find(|w| w.method == m)
                .expect("one per method");
            let report = w.client(&args, limit)?;
            check_report(w, &report, "request/response")?;
            r.rr.push(Sample {
                size: 0,
                method: m,
                round,
                report,
            });
        }
    }
    Ok(())
}

fn wrap(plan: &Plan, tools: &Tools, r: &mut Results) -> Result<()> {
    for m in Method::ALL {
        let mut w = World::new(m, tools, ProxyMode::Setup, plan.wrap_port_range)?;
        w.apply(&Policy::exclusions(0))?;
        let port_range = w
            .proc_sys("sys/net/ipv4/ip_local_port_range")
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join("-"))
            .unwrap_or_default();
        let mut args = setup_args(plan, plan.wrap_count, 600.0, 0);
        args.extend(["--max-errors".into(), "100000".into()]);
        let report = w.client(&args, Duration::from_secs(900))?;
        check_report(&w, &report, "port wrap")?;
        r.wrap.push(WrapSample {
            method: m,
            port_range,
            time_wait: w.time_wait(),
            conntrack: w.conntrack_count(),
            report,
        });
    }
    Ok(())
}

fn occupancy(plan: &Plan, tools: &Tools) -> Result<Occupancy> {
    let mut w = World::new(Method::Redirect, tools, ProxyMode::Setup, None)?;
    w.apply(&Policy::exclusions(0))?;
    let args = setup_args(plan, plan.occupancy_count, 3600.0, 0);
    let report = w.client(&args, Duration::from_secs(1800))?;
    check_report(&w, &report, "occupancy")?;
    let state = w.pin_dir().join("state");
    let tuples = redirect::apply::open_pinned(&state.join(map_names::TUPLES))?;
    let tuples = aya::maps::HashMap::<_, redirect_common::TupleKey, u64>::try_from(tuples)?;
    let conns = redirect::apply::open_pinned(&state.join(map_names::CONNS))?;
    let conns = aya::maps::HashMap::<_, u64, redirect_common::Conn>::try_from(conns)?;
    // The last connection's sockets are released a moment after the client
    // exits: give it up to 3 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let (tuples_entries, conns_entries) = loop {
        let counts = (tuples.keys().count() as u64, conns.keys().count() as u64);
        if counts == (0, 0) || std::time::Instant::now() >= deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let st = w.status_json()?;
    Ok(Occupancy {
        connections: report.ops,
        report,
        tuples_entries,
        conns_entries,
        time_wait: w.time_wait(),
        counters: st["counters"].clone(),
        decisions: st["decisions"].clone(),
    })
}

/// `profile`: one method's pod with `size` exclusion CIDRs (or, with
/// `services`, `size` services ahead of the target), and the setup client
/// for `seconds`.
pub fn profile(
    tools: &Tools,
    method: &str,
    size: usize,
    services: bool,
    seconds: f64,
    extra: &[String],
) -> Result<()> {
    let m = Method::ALL
        .into_iter()
        .find(|m| m.name() == method)
        .with_context(|| format!("unknown method {method}"))?;
    let mut w = World::new(m, tools, ProxyMode::Setup, None)?;
    let policy = if services {
        Policy::services(size, tools)?
    } else {
        Policy::exclusions(size)
    };
    w.apply(&policy)?;
    eprintln!("bench: pod {} ready, client runs {seconds} s", w.pod.name);
    let plan = Plan::new(false);
    let mut args = setup_args(&plan, 0, seconds, 200);
    args.extend_from_slice(extra);
    let report = w.client(&args, Duration::from_secs_f64(seconds + 60.0))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// `memlock` of the connection-state maps.
fn state_memory(w: &World) -> Result<BTreeMap<String, u64>> {
    let mut maps = BTreeMap::new();
    map_memory(&w.pin_dir().join("state"), &mut maps)?;
    Ok(maps
        .into_iter()
        .filter(|(n, _)| n == map_names::CONNS || n == map_names::TUPLES)
        .map(|(n, m)| (n, m.memlock))
        .collect())
}

/// Sum of the option memory (`ss -m` "o") of the pod's TCP sockets bound to
/// local port `port`, and their number.
fn option_memory(w: &World, port: u16) -> Result<(u64, u64)> {
    let mut cmd = w.root_cmd("ss")?;
    cmd.args(["-tmnH", "state", "established"])
        .arg(format!("( sport = :{port} )"));
    let out = cmd.output().context("running ss")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut sum, mut n) = (0, 0);
    for line in text.lines() {
        if let Some(skmem) = line.split("skmem:(").nth(1) {
            n += 1;
            for f in skmem.trim_end_matches(')').split(',') {
                if let Some(v) = f.strip_prefix('o') {
                    sum += v.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    Ok((sum, n))
}

/// Scenario 5, peak: connection-state memory right after apply, with
/// `peak_count` captured connections open at once (the redirect-adversary
/// tool's `hold` clients and `proxy --keep`, spread over processes to stay
/// under the open-file limit), and after they closed.
fn peak(plan: &Plan, tools: &Tools) -> Result<Peak> {
    let adversary = tools.bench.with_file_name("redirect-adversary");
    let mut w = World::new(
        Method::Redirect,
        tools,
        ProxyMode::Setup,
        Some((1024, 65535)),
    )?;
    w.apply(&Policy::exclusions(0))?;
    let maps_empty = state_memory(&w)?;
    w.stop_proxy();
    let per_proxy = 15_000u64;
    let proxies = plan.peak_count.div_ceil(per_proxy).max(1);
    let report_dir = std::env::temp_dir().join(format!("{}-peak", w.pod.name));
    std::fs::create_dir_all(&report_dir)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&report_dir, std::fs::Permissions::from_mode(0o777))?;
    }
    let _cleanup = TempDir(report_dir.clone());
    let mut running = Vec::new();
    let mut reports = Vec::new();
    for i in 0..proxies {
        let report = report_dir.join(format!("proxy-{i}.json"));
        let mut cmd = w
            .pod
            .command(Side::Pod, redirect_tests::pod::As::PROXY, &adversary)?;
        cmd.args([
            "proxy",
            "--keep",
            "--reuseport",
            "--listen",
            "0.0.0.0:15001",
        ])
        .args(["--listen", "[::]:15001", "--report"])
        .arg(&report)
        .stdin(std::process::Stdio::null());
        let (child, line) = spawn_first_line(cmd, "redirect-adversary proxy")?;
        if line.trim() != "ready" {
            anyhow::bail!("redirect-adversary proxy did not start");
        }
        running.push(child);
        reports.push(report);
    }
    let half = plan.peak_count / 2;
    let per_client = half.div_ceil(per_proxy).max(1);
    let targets = ["10.201.0.1:80", "[fd00:201::1]:80"];
    let mut holders = Vec::new();
    for to in targets {
        for c in 0..per_client {
            // Equal shares; the last client takes the remainder.
            let share = half / per_client;
            let count = if c + 1 == per_client {
                half - share * c
            } else {
                share
            };
            let mut cmd = w
                .pod
                .command(Side::Pod, redirect_tests::pod::As::APP, &adversary)?;
            cmd.args(["hold", "--to", to, "--count"])
                .arg(count.to_string())
                .stdin(std::process::Stdio::piped());
            let (child, line) = spawn_first_line(cmd, "redirect-adversary hold")?;
            let r: serde_json::Value = serde_json::from_str(line.trim())
                .with_context(|| format!("hold printed {line:?}"))?;
            if r["connected"].as_u64() != Some(count) {
                anyhow::bail!("peak: a client opened {r} of {count} connections");
            }
            holders.push(child);
        }
    }
    let total = |key: &str| -> u64 {
        reports
            .iter()
            .filter_map(|r| std::fs::read_to_string(r).ok())
            .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|v| v[key].as_u64().unwrap_or(0))
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while total("accepted") < 2 * half && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let maps_peak = state_memory(&w)?;
    let (proxy_storage_peak, proxy_sockets) = option_memory(&w, 15001)?;
    let with_destination = total("orig_ok");
    drop(holders);
    drop(running);
    // Sockets are released a moment after their processes exit.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut maps_after = state_memory(&w)?;
    while maps_after
        .values()
        .zip(maps_empty.values())
        .any(|(a, e)| a > e)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
        maps_after = state_memory(&w)?;
    }
    Ok(Peak {
        connections: 2 * half,
        with_destination,
        maps_empty,
        maps_peak,
        maps_after,
        proxy_storage_peak,
        proxy_sockets,
    })
}

/// Starts `cmd` and reads the first line it prints (its "ready" or its
/// report); the process is killed when the returned guard drops.
fn spawn_first_line(mut cmd: std::process::Command, what: &str) -> Result<(Proc, String)> {
    cmd.stdout(std::process::Stdio::piped());
    let mut child = Proc(cmd.spawn().with_context(|| format!("starting {what}"))?);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().context("stdout")?),
        &mut line,
    )?;
    Ok((child, line))
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kernel memory of the programmed policy: the BPF maps of a redirect pin
/// dir, or iptables-legacy's rule blob. `None` for the others.
fn memory(w: &World, size: usize) -> Result<Option<MemorySample>> {
    match w.method {
        Method::Redirect => {
            let mut maps = BTreeMap::new();
            map_memory(&w.pin_dir(), &mut maps)?;
            let bytes = maps.values().map(|m| m.memlock).sum();
            Ok(Some(MemorySample {
                size,
                method: w.method,
                bytes,
                maps,
                what: "sum of memlock over every pinned map (policy and state)".into(),
            }))
        }
        Method::IptablesLegacy => {
            let netns = w.pod.netns_path(Side::Pod);
            let bytes = ipt_blob_size(&netns)?;
            Ok(Some(MemorySample {
                size,
                method: w.method,
                bytes,
                maps: BTreeMap::new(),
                what: "nat table rule blob (IPT_SO_GET_INFO size), without per-CPU counters".into(),
            }))
        }
        _ => Ok(None),
    }
}

fn map_memory(dir: &Path, out: &mut BTreeMap<String, MapMem>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let path = e.path();
        if e.file_type()?.is_dir() {
            map_memory(&path, out)?;
            continue;
        }
        let Some(info) = fdinfo(&path)? else {
            continue;
        };
        let field = |k: &str| info.get(k).copied();
        if let (Some(map_type), Some(memlock)) = (field("map_type"), field("memlock")) {
            let name = path
                .strip_prefix(dir.parent().unwrap_or(dir))
                .unwrap_or(&path)
                .display()
                .to_string();
            // gen-N/ differs between runs; keep the map's own name.
            let name = name.rsplit('/').next().unwrap_or(&name).to_string();
            out.insert(
                name,
                MapMem {
                    map_type: map_type as u32,
                    max_entries: field("max_entries").unwrap_or(0),
                    memlock,
                },
            );
        }
    }
    Ok(())
}

/// The numeric fields of `/proc/self/fdinfo` of the BPF object pinned at
/// `path` (`map_type`, `memlock`, `map_id`, `prog_type`, `prog_id`,
/// `link_type`, ...); `None` if it cannot be opened as one.
pub fn fdinfo(path: &Path) -> Result<Option<BTreeMap<String, u64>>> {
    let Ok(fd) = redirect::sys::obj_get(path, 0) else {
        return Ok(None);
    };
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    Ok(Some(
        info.lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_string(), v.trim().parse::<u64>().ok()?))
            })
            .collect(),
    ))
}

/// `struct ipt_getinfo`.
#[repr(C)]
struct IptGetinfo {
    name: [u8; 32],
    valid_hooks: u32,
    hook_entry: [u32; 5],
    underflow: [u32; 5],
    num_entries: u32,
    size: u32,
}

/// Size of iptables-legacy's `nat` blob in the namespace `netns`.
fn ipt_blob_size(netns: &Path) -> Result<u64> {
    let netns: PathBuf = netns.to_path_buf();
    std::thread::spawn(move || -> Result<u64> {
        let f = std::fs::File::open(&netns)?;
        // SAFETY: plain syscalls on fds this thread owns; setns(CLONE_NEWNET)
        // affects this thread only, which ends right after.
        unsafe {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            let s = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
            if s < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            let mut info: IptGetinfo = std::mem::zeroed();
            info.name[..3].copy_from_slice(b"nat");
            let mut len = std::mem::size_of::<IptGetinfo>() as libc::socklen_t;
            // IPT_SO_GET_INFO = IPT_BASE_CTL = 64.
            let rc = libc::getsockopt(
                s,
                libc::IPPROTO_IP,
                64,
                (&mut info as *mut IptGetinfo).cast(),
                &mut len,
            );
            let err = std::io::Error::last_os_error();
            libc::close(s);
            if rc != 0 {
                return Err(anyhow::Error::from(err).context("IPT_SO_GET_INFO"));
            }
            let _ = (info.valid_hooks, info.hook_entry, info.underflow);
            let _ = info.num_entries;
            Ok(info.size as u64)
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the netns thread panicked"))?
}

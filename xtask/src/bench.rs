//! `cargo xtask bench [--quick] [--out DIR]`: builds the bench harness and
//! `redirect` in release mode, runs every scenario (`redirect-bench run`),
//! runs the criterion micro-benchmark of the decision function, and writes
//! the report:
//!
//! - `DIR/benchmarks.md`: tables, ratios with their spread, targets met or
//!   missed, plots;
//! - `DIR/bench/results.json`: the raw samples, the summary and the
//!   micro-benchmark;
//! - `DIR/bench/results.csv`: one row per measured value;
//! - `DIR/bench/*.svg`: the plots.
//!
//! `DIR` is `docs/` for a full run and `target/bench-quick/` for `--quick`,
//! so a CI run never overwrites the committed results. A hand-written
//! `DIR/bench/notes.md`, if present, is included verbatim as the analysis.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{cargo, env_cargo, require_root, root, setup, target_dir};

/// Methods, in report order.
const METHODS: [&str; 4] = ["direct", "iptables-legacy", "iptables-nft", "redirect"];
const IPTABLES: [&str; 2] = ["iptables-legacy", "iptables-nft"];
const COLORS: [&str; 4] = ["#555555", "#d95f02", "#7570b3", "#1b9e77"];

fn color(method: &str) -> &'static str {
    METHODS
        .iter()
        .position(|m| *m == method)
        .map_or("#000000", |i| COLORS[i])
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Runs the whole benchmark.
pub fn run(quick: bool, out: Option<PathBuf>) -> Result<()> {
    setup()?;
    require_root("the benchmarks")?;
    let out = out.unwrap_or_else(|| default_out(quick));
    let data_dir = out.join("bench");
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;

    cargo(&[
        "build",
        "--release",
        "--package",
        "redirect",
        "--bin",
        "redirect",
        "--package",
        "redirect-tests",
        "--bin",
        "redirect-bench",
        "--bin",
        "redirect-adversary",
        // The node scenario's fleet runs its hub's upstream server.
        "--bin",
        "redirect-sample",
    ])?;

    // Ctrl-C reaches the harness too; it removes its pods and exits. Wait
    // for it instead of dying first. (A handler, not SIG_IGN: handlers are
    // reset in the child at exec.)
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_sigint as *const () as libc::sighandler_t);
    }

    let raw_path = data_dir.join("raw.json");
    let bin = target_dir().join("release/redirect-bench");
    let mut cmd = Command::new(&bin);
    cmd.arg("run").arg("--out").arg(&raw_path);
    if quick {
        cmd.arg("--quick");
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted (the harness removed its pods)");
    }
    if !status.success() {
        bail!("{} failed: {status}", bin.display());
    }
    let text = std::fs::read_to_string(&raw_path)?;
    std::fs::remove_file(&raw_path)?;
    let mut results: Value = serde_json::from_str(&text).context("the harness's JSON")?;

    let micro = micro_bench(quick)?;
    results["micro"] = micro;
    render(results, &out)
}

/// `--render-only`: rewrites the report from `DIR/bench/results.json` (to
/// pick up a new `notes.md` or a report change without measuring again).
pub fn render_only(quick: bool, out: Option<PathBuf>) -> Result<()> {
    let out = out.unwrap_or_else(|| default_out(quick));
    let path = out.join("bench/results.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    render(serde_json::from_str(&text)?, &out)
}

fn default_out(quick: bool) -> PathBuf {
    if quick {
        target_dir().join("bench-quick")
    } else {
        root().join("docs")
    }
}

/// Summary, plots, CSV, JSON and markdown from raw results.
fn render(mut results: Value, out: &Path) -> Result<()> {
    let data_dir = out.join("bench");
    let summary = summarize(&results);
    results["summary"] = summary;

    let notes = std::fs::read_to_string(data_dir.join("notes.md")).ok();
    let svgs = plots(&results);
    for (name, svg) in &svgs {
        std::fs::write(data_dir.join(name), svg)?;
    }
    std::fs::write(
        data_dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(data_dir.join("results.csv"), csv(&results))?;
    let md = markdown(&results, notes.as_deref());
    std::fs::write(out.join("benchmarks.md"), md)?;
    check_outputs(out)?;
    eprintln!(
        "xtask: wrote {}, {}/results.{{json,csv}} and {} plots",
        out.join("benchmarks.md").display(),
        data_dir.display(),
        svgs.len()
    );
    Ok(())
}

/// Runs the criterion benchmark and collects its medians (ns).
fn micro_bench(quick: bool) -> Result<Value> {
    let mut cmd = Command::new(env_cargo());
    cmd.current_dir(root())
        .args(["bench", "--package", "redirect-common", "--bench", "decide"]);
    if quick {
        cmd.args(["--", "--quick"]);
    }
    let status = cmd.status().context("running cargo bench")?;
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    if !status.success() {
        bail!("cargo bench failed: {status}");
    }
    let dir = target_dir().join("criterion/decide_outbound");
    let mut cases = BTreeMap::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let est = e.path().join("new/estimates.json");
        let Ok(text) = std::fs::read_to_string(&est) else {
            continue;
        };
        let v: Value = serde_json::from_str(&text)?;
        cases.insert(
            e.file_name().to_string_lossy().into_owned(),
            json!({
                "median_ns": v["median"]["point_estimate"],
                "low_ns": v["median"]["confidence_interval"]["lower_bound"],
                "high_ns": v["median"]["confidence_interval"]["upper_bound"],
            }),
        );
    }
    Ok(json!({ "quick": quick, "cases": cases }))
}

// ---------------------------------------------------------------- statistics

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The `q` quantile of `v` (linear between the closest ranks).
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = q * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// Median with its min–max.
fn spread(v: &[f64]) -> Value {
    json!({ "median": median(v), "min": min(v), "max": max(v), "n": v.len() })
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// Samples of one scenario for (size, method), by round.
fn samples<'a>(r: &'a Value, key: &str, size: u64, method: &str) -> BTreeMap<u64, &'a Value> {
    arr(&r[key])
        .iter()
        .filter(|s| s["size"].as_u64() == Some(size) && s["method"] == method)
        .map(|s| (s["round"].as_u64().unwrap_or(0), &s["report"]))
        .collect()
}

/// Seconds per operation of a client report (1 / rate).
fn cost(rep: &Value) -> f64 {
    1.0 / f(&rep["rate"])
}

/// CPU time of client and proxy per operation, ns (the proxy's share
/// averaged over warm-up and measured operations).
fn cpu(rep: &Value) -> f64 {
    let ops = f(&rep["ops"]);
    let all = ops + rep["warmup_ops"].as_f64().unwrap_or(0.0);
    f(&rep["client_cpu_ns"]) / ops + f(&rep["proxy_cpu_ns"]) / all
}

/// Paired per-round ratios cpu(a) / cpu(b).
fn paired_cpu(r: &Value, key: &str, size: u64, a: &str, b: &str) -> Vec<f64> {
    let sa = samples(r, key, size, a);
    let sb = samples(r, key, size, b);
    sa.iter()
        .filter_map(|(round, ra)| sb.get(round).map(|rb| cpu(ra) / cpu(rb)))
        .collect()
}

/// Paired per-round ratios cost(a) / cost(b).
fn paired(r: &Value, key: &str, size: u64, a: &str, b: &str) -> Vec<f64> {
    let sa = samples(r, key, size, a);
    let sb = samples(r, key, size, b);
    sa.iter()
        .filter_map(|(round, ra)| sb.get(round).map(|rb| cost(ra) / cost(rb)))
        .collect()
}

fn sizes(r: &Value, key: &str) -> Vec<u64> {
    let mut s: Vec<u64> = arr(&r[key])
        .iter()
        .filter_map(|s| s["size"].as_u64())
        .collect();
    s.sort_unstable();
    s.dedup();
    s
}

fn method_stats(r: &Value, key: &str, size: u64, method: &str) -> Value {
    let s = samples(r, key, size, method);
    let rates: Vec<f64> = s.values().map(|x| f(&x["rate"])).collect();
    let p50: Vec<f64> = s.values().map(|x| f(&x["latency_ns"]["p50"])).collect();
    let p99: Vec<f64> = s.values().map(|x| f(&x["latency_ns"]["p99"])).collect();
    let cpus: Vec<f64> = s.values().map(|x| cpu(x)).collect();
    let errors: u64 = s
        .values()
        .map(|x| {
            x["errors"]
                .as_object()
                .map_or(0, |o| o.values().filter_map(Value::as_u64).sum())
        })
        .sum();
    json!({
        "rate": spread(&rates),
        "p50_ns": spread(&p50),
        "p99_ns": spread(&p99),
        "cpu_ns_per_op": spread(&cpus),
        "errors": errors,
    })
}

/// Per size of one setup sweep (`setup` or `services`): every method's
/// statistics and the paired ratios.
fn setup_summary(r: &Value, key: &str) -> Value {
    let mut setup = serde_json::Map::new();
    for size in sizes(r, key) {
        let mut per = serde_json::Map::new();
        for m in METHODS {
            per.insert(m.into(), method_stats(r, key, size, m));
        }
        let mut ratios = serde_json::Map::new();
        ratios.insert(
            "redirect/direct".into(),
            spread(&paired(r, key, size, "redirect", "direct")),
        );
        for ipt in IPTABLES {
            ratios.insert(
                format!("{ipt}/redirect"),
                spread(&paired(r, key, size, ipt, "redirect")),
            );
            ratios.insert(
                format!("{ipt}/direct"),
                spread(&paired(r, key, size, ipt, "direct")),
            );
        }
        let mut cpu_ratios = serde_json::Map::new();
        cpu_ratios.insert(
            "redirect/direct".into(),
            spread(&paired_cpu(r, key, size, "redirect", "direct")),
        );
        for ipt in IPTABLES {
            cpu_ratios.insert(
                format!("{ipt}/redirect"),
                spread(&paired_cpu(r, key, size, ipt, "redirect")),
            );
        }
        setup.insert(
            size.to_string(),
            json!({ "methods": per, "cost_ratios": ratios, "cpu_ratios": cpu_ratios }),
        );
    }
    Value::Object(setup)
}

/// Apply and removal times per size and method (`apply` or
/// `services_apply`).
fn apply_summary(r: &Value, key: &str) -> Value {
    let mut apply = serde_json::Map::new();
    for size in sizes(r, key) {
        let mut per = serde_json::Map::new();
        for m in METHODS {
            let s: Vec<&Value> = arr(&r[key])
                .iter()
                .filter(|a| a["size"].as_u64() == Some(size) && a["method"] == m)
                .collect();
            if s.is_empty() {
                continue;
            }
            let ap: Vec<f64> = s.iter().map(|a| f(&a["apply_s"])).collect();
            let rm: Vec<f64> = s.iter().map(|a| f(&a["remove_s"])).collect();
            per.insert(
                m.into(),
                json!({ "apply_s": spread(&ap), "remove_s": spread(&rm) }),
            );
        }
        apply.insert(size.to_string(), Value::Object(per));
    }
    Value::Object(apply)
}

fn summarize(r: &Value) -> Value {
    let mut rr = serde_json::Map::new();
    for m in METHODS {
        rr.insert(m.into(), method_stats(r, "rr", 0, m));
    }
    let mut rr_ratios = serde_json::Map::new();
    rr_ratios.insert(
        "redirect/direct".into(),
        spread(&paired(r, "rr", 0, "redirect", "direct")),
    );
    for ipt in IPTABLES {
        rr_ratios.insert(
            format!("{ipt}/redirect"),
            spread(&paired(r, "rr", 0, ipt, "redirect")),
        );
    }
    let mut rr_cpu = serde_json::Map::new();
    rr_cpu.insert(
        "redirect/direct".into(),
        spread(&paired_cpu(r, "rr", 0, "redirect", "direct")),
    );
    for ipt in IPTABLES {
        rr_cpu.insert(
            format!("{ipt}/redirect"),
            spread(&paired_cpu(r, "rr", 0, ipt, "redirect")),
        );
    }
    let targets = targets(r);
    json!({
        "setup": setup_summary(r, "setup"),
        "services": setup_summary(r, "services"),
        "rr": { "methods": rr, "cost_ratios": rr_ratios, "cpu_ratios": rr_cpu },
        "apply": apply_summary(r, "apply"),
        "services_apply": apply_summary(r, "services_apply"),
        "targets": targets,
        "node": node_summary(&r["node"]),
    })
}

// ---------------------------------------------------------------- node mode

/// The node scenario's methods for pod add/remove, in report order.
const NODE_METHODS: [&str; 3] = ["redirect", "iptables-legacy", "iptables-nft"];
/// The node scenario's connection-setup arms, in report order.
const NODE_ARMS: [&str; 3] = ["one-pod", "many-pods", "control"];
/// Node-mode targets: pod add and remove at most 5 ms, at most 64 KiB per
/// pod.
const NODE_OP_LIMIT_S: f64 = 0.005;
const NODE_POD_MEMORY_LIMIT: f64 = 65536.0;

/// The node scenario's pod add/remove samples of one size and method.
fn node_ops<'a>(n: &'a Value, level: u64, method: &str) -> Vec<&'a Value> {
    arr(&n["ops"])
        .iter()
        .filter(|o| o["registered"].as_u64() == Some(level) && o["method"] == method)
        .collect()
}

/// Per-repetition ratios `k` (`add_s`, `remove_s`) of method `a` over `b`.
fn node_op_ratios(n: &Value, level: u64, k: &str, a: &str, b: &str) -> Vec<f64> {
    let by_rep = |m: &str| -> BTreeMap<u64, f64> {
        node_ops(n, level, m)
            .iter()
            .map(|o| (o["rep"].as_u64().unwrap_or(0), f(&o[k])))
            .collect()
    };
    let (sa, sb) = (by_rep(a), by_rep(b));
    sa.iter()
        .filter_map(|(rep, x)| sb.get(rep).map(|y| x / y))
        .collect()
}

/// Per-round ratios of the setup arms `a` over `b` (cost, or CPU with
/// `use_cpu`).
fn node_arm_ratios(n: &Value, a: &str, b: &str, use_cpu: bool) -> Vec<f64> {
    let by_round = |m: &str| -> BTreeMap<u64, &Value> {
        arr(&n["setup"])
            .iter()
            .filter(|s| s["method"] == m)
            .map(|s| (s["round"].as_u64().unwrap_or(0), &s["report"]))
            .collect()
    };
    let (sa, sb) = (by_round(a), by_round(b));
    let measure = if use_cpu { cpu } else { cost };
    sa.iter()
        .filter_map(|(round, x)| sb.get(round).map(|y| measure(x) / measure(y)))
        .collect()
}

/// Pods registered on the node of setup arm `arm`.
fn node_arm_size(n: &Value, arm: &str) -> Option<u64> {
    arr(&n["setup"])
        .iter()
        .find(|s| s["method"] == arm)
        .and_then(|s| s["size"].as_u64())
}

/// The node scenario: pod add/remove times and ratios per size, memory per
/// pod, connection setup with one pod and with many, and its targets.
/// `Null` when the run had no node scenario.
fn node_summary(n: &Value) -> Value {
    if !n.is_object() {
        return Value::Null;
    }
    let levels: Vec<u64> = arr(&n["levels"]).iter().filter_map(Value::as_u64).collect();
    let mut ops = serde_json::Map::new();
    for &level in &levels {
        let mut per = serde_json::Map::new();
        for m in NODE_METHODS {
            let s = node_ops(n, level, m);
            let add: Vec<f64> = s.iter().map(|o| f(&o["add_s"])).collect();
            let rm: Vec<f64> = s.iter().map(|o| f(&o["remove_s"])).collect();
            per.insert(
                m.into(),
                json!({ "add_s": spread(&add), "remove_s": spread(&rm) }),
            );
        }
        let mut ratios = serde_json::Map::new();
        for ipt in IPTABLES {
            ratios.insert(
                format!("redirect/{ipt}"),
                json!({
                    "add": spread(&node_op_ratios(n, level, "add_s", "redirect", ipt)),
                    "remove": spread(&node_op_ratios(n, level, "remove_s", "redirect", ipt)),
                }),
            );
        }
        ops.insert(
            level.to_string(),
            json!({ "methods": per, "ratios": ratios }),
        );
    }

    // Memory: the node with no pod, then per size.
    let mem = |level: u64, when: &str| {
        arr(&n["memory"])
            .iter()
            .find(|m| m["registered"].as_u64() == Some(level) && m["when"] == when)
    };
    let fixed = mem(0, "registered");
    let mut memory = serde_json::Map::new();
    for &level in levels.iter().filter(|&&l| l > 0) {
        let (Some(base), Some(at)) = (fixed, mem(level, "registered")) else {
            continue;
        };
        let delta = f(&at["bytes"]) - f(&base["bytes"]);
        let mut per_name = serde_json::Map::new();
        for (name, b) in at["by_name"].as_object().into_iter().flatten() {
            let d = f(b) - base["by_name"][name].as_f64().unwrap_or(0.0);
            if d != 0.0 {
                per_name.insert(name.clone(), json!(d / level as f64));
            }
        }
        memory.insert(
            level.to_string(),
            json!({
                "bytes": at["bytes"],
                "after_churn": mem(level, "after-churn").map(|m| m["bytes"].clone()),
                "delta": delta,
                "per_pod": delta / level as f64,
                "per_pod_by_name": per_name,
                "links": at["links"],
            }),
        );
    }

    // Connection setup.
    let mut arms = serde_json::Map::new();
    for arm in NODE_ARMS {
        if let Some(size) = node_arm_size(n, arm) {
            let mut st = method_stats(n, "setup", size, arm);
            st["size"] = json!(size);
            arms.insert(arm.into(), st);
        }
    }
    let mut cost_ratios = serde_json::Map::new();
    let mut cpu_ratios = serde_json::Map::new();
    for a in ["many-pods", "control"] {
        let k = format!("{a}/one-pod");
        cost_ratios.insert(k.clone(), spread(&node_arm_ratios(n, a, "one-pod", false)));
        cpu_ratios.insert(k, spread(&node_arm_ratios(n, a, "one-pod", true)));
    }

    // Targets.
    let worst_op = |k: &str| {
        let worst = levels
            .iter()
            .map(|&l| {
                (
                    l,
                    f(&ops[&l.to_string()]["methods"]["redirect"][k]["median"]),
                )
            })
            .filter(|(_, x)| x.is_finite())
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match worst {
            Some((l, x)) => json!({ "registered": l, "median_s": x, "met": x <= NODE_OP_LIMIT_S }),
            None => json!({ "met": null }),
        }
    };
    let worst_mem = memory
        .iter()
        .map(|(l, m)| (l.clone(), f(&m["per_pod"])))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    let memory_target = match worst_mem {
        Some((l, x)) => json!({
            "registered": l.parse::<u64>().ok(),
            "per_pod": x,
            "fixed": fixed.map(|m| m["bytes"].clone()),
            "met": x <= NODE_POD_MEMORY_LIMIT,
        }),
        None => json!({ "met": null }),
    };
    // Within the noise: the median ratio many-pods/one-pod no farther from
    // 1 than the middle half of the rounds of two nodes alike
    // (control/one-pod, its quartiles) reaches, in wall time and in CPU
    // time.
    let within = |use_cpu: bool| {
        let many = node_arm_ratios(n, "many-pods", "one-pod", use_cpu);
        let control = node_arm_ratios(n, "control", "one-pod", use_cpu);
        let noise = (quantile(&control, 0.25) - 1.0)
            .abs()
            .max((quantile(&control, 0.75) - 1.0).abs());
        let ok =
            (!many.is_empty() && !control.is_empty()).then(|| (median(&many) - 1.0).abs() <= noise);
        (spread(&many), spread(&control), noise, ok)
    };
    let (ratio, control, noise, wall_ok) = within(false);
    let (cpu_ratio, cpu_control, cpu_noise, cpu_ok) = within(true);
    let setup_target = json!({
        "ratio": ratio,
        "control": control,
        "noise": noise,
        "cpu_ratio": cpu_ratio,
        "cpu_control": cpu_control,
        "cpu_noise": cpu_noise,
        "met": wall_ok.zip(cpu_ok).map(|(a, b)| a && b),
    });
    // BPF program time per connection, by node (its pods registered).
    let mut prog = serde_json::Map::new();
    for x in arr(&n["prog_cost"]) {
        let Some(size) = x["size"].as_u64() else {
            continue;
        };
        let e = prog
            .entry(size.to_string())
            .or_insert_with(|| json!({ "connections": 0.0, "programs": {} }));
        e["connections"] = json!(f(&e["connections"]) + f(&x["connections"]));
        for p in arr(&x["programs"]) {
            let name = p["program"].as_str().unwrap_or("?");
            let q = &mut e["programs"][name];
            let (runs, ns) = (
                q["runs"].as_f64().unwrap_or(0.0) + f(&p["runs"]),
                q["run_ns"].as_f64().unwrap_or(0.0) + f(&p["run_ns"]),
            );
            *q = json!({ "runs": runs, "run_ns": ns });
        }
    }
    for e in prog.values_mut() {
        let total: f64 = e["programs"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(_, p)| f(&p["run_ns"]))
            .sum();
        e["ns_per_conn"] = json!(total / f(&e["connections"]).max(1.0));
    }
    json!({
        "levels": levels,
        "ops": ops,
        "prog_cost": prog,
        "memory": { "fixed": fixed.map(|m| m["bytes"].clone()), "by_level": memory },
        "setup": { "methods": arms, "cost_ratios": cost_ratios, "cpu_ratios": cpu_ratios },
        "targets": {
            "pod_add_5ms": worst_op("add_s"),
            "pod_remove_5ms": worst_op("remove_s"),
            "memory_per_pod_64k": memory_target,
            "setup_flat": setup_target,
        },
    })
}

/// "N pods", "1 pod".
fn pods(n: u64) -> String {
    format!("{} pod{}", fmt_size(n), if n == 1 { "" } else { "s" })
}

/// The "Node mode" section of the report.
fn node_section(w: &mut String, r: &Value) {
    let n = &r["node"];
    let s = &r["summary"]["node"];
    if !s.is_object() {
        return;
    }
    let levels: Vec<u64> = arr(&s["levels"]).iter().filter_map(Value::as_u64).collect();
    let most = levels.last().copied().unwrap_or(0);
    let _ = writeln!(
        w,
        "## Node mode\n\n\
         One node install (`redirect node install --max-pods {}`) attached \
         to the cgroup of a fleet of light pods (`tests/src/fleet.rs`: each \
         pod a network namespace with its own veth to a routed hub and one \
         IPv4 address, every process in the fleet's cgroup). Each pod is \
         registered with `redirect pod add --netns /run/netns/<pod> \
         --pin-dir <node> {}`: scenario 1's policy (istio's capture-all, \
         proxy owner 1337).\n\n\
         - **Programming one pod**: wall time of the real `redirect pod add` \
         and `redirect pod remove` (release build, process start included), \
         each on a fresh pod, with N pods already registered, {} cycles at \
         each N. Next to them, in turns (redirect, legacy, nft, then the \
         other way round), `iptables-legacy-restore` and \
         `iptables-nft-restore` load scenario 1's istio `nat` table into a \
         fresh pod's namespace, and an empty `nat` table to remove it: what \
         iptables costs per pod. Ratios are per cycle, median (min–max).\n\
         - **Memory**: `memlock` (the kernel's own accounting, from \
         `/proc/self/fdinfo`) summed over every map and program pinned under \
         the node's pin dir: state and policy maps, programs, and each \
         pod's record `pods/<cookie>/POD`. It is taken with no pod registered \
         (the node's fixed cost) and with N; per pod = (memory at N − memory \
         at 0) / N. Each pod's `sk_lookup` link is pinned too, but links \
         carry no `memlock`. The node's hash maps are made without \
         preallocation, and for those the kernel's `memlock` counts the \
         entries in use, not the capacity: it follows use.\n\
         - **Connection setup**: scenario 1's client and proxy in pod 0 of \
         three nodes, in turns, {} rounds of {} connections: `one-pod` (a node with that pod \
         alone), `many-pods` (the node above, {} registered) and `control` \
         (a second one-pod node: how far two nodes alike differ in this run, \
         the noise).\n",
        n["max_pods"],
        n["policy"].as_str().unwrap_or("?"),
        r["plan"]["node_reps"],
        r["plan"]["node_setup_rounds"],
        r["plan"]["setup_count"],
        pods(most),
    );
    if let Some(date) = r["meta"]["node_date"].as_str() {
        let _ = writeln!(
            w,
            "This section was measured again on its own (`redirect-bench run --only node`, \
             spliced into results.json) on {date}, after `pod add` stopped reading \
             `/proc/net/tcp`; the rest of the report is from the run above.\n"
        );
    }

    // Targets.
    let t = &s["targets"];
    let _ = writeln!(w, "| target | measured | |\n|---|---|---|");
    for (k, what) in [
        ("pod_add_5ms", "`pod add`"),
        ("pod_remove_5ms", "`pod remove`"),
    ] {
        let x = &t[k];
        let _ = writeln!(
            w,
            "| {what} median at most 5 ms with 1 to {} registered | worst median {} (with {} registered) | {} |",
            pods(most),
            x["median_s"].as_f64().map_or("–".into(), fmt_s),
            x["registered"].as_u64().map_or("?".into(), pods),
            met(&x["met"])
        );
    }
    let mt = &t["memory_per_pod_64k"];
    let _ = writeln!(
        w,
        "| kernel memory per additional pod at most 64 KiB | worst {} per pod (with {} registered); the node's fixed cost {} | {} |",
        mt["per_pod"].as_f64().map_or("–".into(), fmt_bytes),
        mt["registered"].as_u64().map_or("?".into(), pods),
        mt["fixed"].as_f64().map_or("–".into(), fmt_bytes),
        met(&mt["met"])
    );
    let st = &t["setup_flat"];
    let noise = |k: &str| {
        st[k]
            .as_f64()
            .map_or("–".into(), |x| format!("±{:.1} %", x * 100.0))
    };
    let _ = writeln!(
        w,
        "| connection setup with {} registered costs what it costs with one, within the noise: the median cost ratio many-pods/one-pod no farther from 1 than the quartiles of control/one-pod (two nodes alike, same rounds), in wall time and in CPU time | wall time: many-pods/one-pod {}, control/one-pod {} (noise {}); CPU: {}, control {} (noise {}) | {} |\n",
        pods(most),
        fmt_ratio(&st["ratio"]),
        fmt_ratio(&st["control"]),
        noise("noise"),
        fmt_ratio(&st["cpu_ratio"]),
        fmt_ratio(&st["cpu_control"]),
        noise("cpu_noise"),
        met(&st["met"])
    );

    // Pod add / remove.
    let table = |w: &mut String, k: &str, ratio: &str, what: &str| {
        let _ = writeln!(
            w,
            "| pods registered | redirect {what} | iptables-legacy-restore | iptables-nft-restore | redirect/legacy | redirect/nft |\n\
             |---|---|---|---|---|---|"
        );
        for &l in &levels {
            let x = &s["ops"][l.to_string()];
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} |",
                fmt_size(l),
                fmt_spread(&x["methods"]["redirect"][k], fmt_s),
                fmt_spread(&x["methods"]["iptables-legacy"][k], fmt_s),
                fmt_spread(&x["methods"]["iptables-nft"][k], fmt_s),
                fmt_ratio(&x["ratios"]["redirect/iptables-legacy"][ratio]),
                fmt_ratio(&x["ratios"]["redirect/iptables-nft"][ratio]),
            );
        }
        let _ = writeln!(w);
    };
    let _ = writeln!(
        w,
        "### Programming one pod\n\n\
         Adding (`redirect pod add`; the istio table restored):\n"
    );
    table(w, "add_s", "add", "pod add");
    let _ = writeln!(
        w,
        "Removing (`redirect pod remove`; an empty `nat` table restored):\n"
    );
    table(w, "remove_s", "remove", "pod remove");
    let _ = writeln!(w, "![pod add and remove](bench/node.svg)\n");

    // Memory.
    let m = &s["memory"];
    let _ = writeln!(
        w,
        "### Kernel memory\n\n\
         With no pod registered the node install takes **{}** (maps and \
         programs): the hash buckets of `CONNS` and `TUPLES` as in scenario \
         5, those of the policy maps sized for `--max-pods`, and the \
         programs.\n\n\
         | pods registered | all maps and programs | over the empty node | per pod | after the {} add/remove cycles at this size |\n\
         |---|---|---|---|---|",
        m["fixed"].as_f64().map_or("–".into(), fmt_bytes),
        r["plan"]["node_reps"],
    );
    for (l, x) in sorted_sizes(&m["by_level"]) {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} |",
            fmt_size(l),
            fmt_bytes(f(&x["bytes"])),
            fmt_bytes(f(&x["delta"])),
            fmt_bytes(f(&x["per_pod"])),
            x["after_churn"].as_f64().map_or("–".into(), fmt_bytes),
        );
    }
    if let Some((l, x)) = sorted_sizes(&m["by_level"]).last() {
        let _ = writeln!(
            w,
            "\nPer pod with {} registered, by pinned object (`POD`: the pod's \
             record):\n\n| object | bytes per pod |\n|---|---|",
            pods(*l)
        );
        for (name, b) in x["per_pod_by_name"].as_object().into_iter().flatten() {
            let _ = writeln!(w, "| `{name}` | {:.0} |", f(b));
        }
    }
    let _ = writeln!(w);

    // Connection setup.
    let _ = writeln!(
        w,
        "### Connection setup with one pod and with {} registered\n\n\
         | node | pods registered | conn/s median (min–max) | latency p50 | latency p99 | CPU per connection (client + proxy) | errors |\n\
         |---|---|---|---|---|---|---|",
        pods(most)
    );
    for arm in NODE_ARMS {
        let y = &s["setup"]["methods"][arm];
        if y.is_null() {
            continue;
        }
        let _ = writeln!(
            w,
            "| {arm} | {} | {} | {} | {} | {} | {} |",
            y["size"].as_u64().map_or("?".into(), fmt_size),
            fmt_spread(&y["rate"], fmt_rate),
            fmt_ns(f(&y["p50_ns"]["median"])),
            fmt_ns(f(&y["p99_ns"]["median"])),
            fmt_ns(f(&y["cpu_ns_per_op"]["median"])),
            y["errors"]
        );
    }
    ratio_table(w, &s["setup"]);
    let pc = &s["prog_cost"];
    let (Some(one), Some(many)) = (pc.get("1"), pc.get(most.to_string())) else {
        return;
    };
    let _ = writeln!(
        w,
        "The programs' own time, one pod vs {}: after the rounds, two \
         more measurements per node, in turns (ABBA), with the kernel's BPF \
         run-time statistics on (`BPF_ENABLE_STATS`, as in [Where \
         redirect's time goes](#where-redirects-time-goes)); {} and {} \
         connections in all.\n\n\
         | program | runs per connection | ns per run, one pod | ns per run, {} |\n\
         |---|---|---|---|",
        pods(most),
        f(&one["connections"]),
        f(&many["connections"]),
        pods(most),
    );
    let per_run = |e: &Value, name: &str| {
        let p = &e["programs"][name];
        f(&p["run_ns"]) / f(&p["runs"]).max(1.0)
    };
    for (name, p) in one["programs"].as_object().into_iter().flatten() {
        let runs = f(&p["runs"]);
        if runs == 0.0 {
            continue;
        }
        let _ = writeln!(
            w,
            "| {name} | {:.2} | {:.0} | {:.0} |",
            runs / f(&one["connections"]).max(1.0),
            per_run(one, name),
            per_run(many, name),
        );
    }
    let _ = writeln!(
        w,
        "| **all, ns per connection** | | **{:.0}** | **{:.0}** |\n",
        f(&one["ns_per_conn"]),
        f(&many["ns_per_conn"]),
    );
}

/// The two setup sweeps: key of the samples, and what their size counts.
const SWEEPS: [(&str, &str); 2] = [("setup", "CIDRs"), ("services", "other services")];

/// Flat within 5 %: redirect/direct at each size of sweep `key` (from
/// `from` up) over redirect/direct at the smallest of those sizes; relative
/// to direct measured alongside, because the machine drifts between sizes.
fn flat(r: &Value, key: &str, from: u64) -> Value {
    let szs: Vec<u64> = sizes(r, key).into_iter().filter(|&s| s >= from).collect();
    let norm = |s: u64| median(&paired(r, key, s, "redirect", "direct"));
    match (szs.first(), szs.last()) {
        (Some(&lo), Some(&hi)) if lo < hi => {
            let base = norm(lo);
            let devs: BTreeMap<String, f64> = szs
                .iter()
                .map(|&s| (s.to_string(), norm(s) / base - 1.0))
                .collect();
            let worst = devs.values().copied().map(f64::abs).fold(0.0, f64::max);
            json!({ "from": lo, "to": hi, "relative_to_smallest": devs, "worst": worst, "met": worst <= 0.05 })
        }
        _ => json!({ "met": null, "note": format!("needs two sizes of {from} or more") }),
    }
}

/// A 100,000-entry policy of `key` (`apply`, `services_apply`) applied by
/// redirect in under 1 s.
fn apply_100k(r: &Value, key: &str) -> Value {
    let v: Vec<f64> = arr(&r[key])
        .iter()
        .filter(|a| a["size"].as_u64() == Some(100_000) && a["method"] == "redirect")
        .map(|a| f(&a["apply_s"]))
        .collect();
    if v.is_empty() {
        json!({ "met": null, "note": "no 100,000-entry run (quick mode)" })
    } else {
        json!({ "apply_s": spread(&v), "met": median(&v) < 1.0 })
    }
}

/// The targets for redirect, each with what was measured.
fn targets(r: &Value) -> Value {
    // 1. Within 2 % of direct for connection setup at every size of both
    // sweeps.
    let mut worst: Option<(&str, u64, f64)> = None;
    let mut worst_cpu: Option<(&str, u64, f64)> = None;
    let mut by_size = serde_json::Map::new();
    for (key, unit) in SWEEPS {
        let mut per_size = serde_json::Map::new();
        for s in sizes(r, key) {
            let m = median(&paired(r, key, s, "redirect", "direct"));
            per_size.insert(s.to_string(), json!(m));
            if worst.is_none_or(|(_, _, w)| m > w) {
                worst = Some((unit, s, m));
            }
            let c = median(&paired_cpu(r, key, s, "redirect", "direct"));
            if worst_cpu.is_none_or(|(_, _, w)| c > w) {
                worst_cpu = Some((unit, s, c));
            }
        }
        by_size.insert(unit.into(), Value::Object(per_size));
    }
    let within_2 = worst.map(|(_, _, w)| w <= 1.02);
    let at = |x: Option<(&str, u64, f64)>| {
        x.map(|(unit, s, w)| json!({"unit": unit, "size": s, "ratio": w}))
    };
    json!({
        "within_2pct_of_direct": {
            "redirect/direct by size": by_size,
            "worst": at(worst),
            "worst_cpu": at(worst_cpu),
            "met": within_2,
        },
        // 2. Flat within 5 % from 10 to 100,000 entries. The service sweep
        // has no 10-service size; it is judged over all its sizes, from the
        // target alone (1 entry) up.
        "flat_within_5pct": flat(r, "setup", 10),
        "flat_within_5pct_services": flat(r, "services", 0),
        // 3. A 100,000-entry policy applied in under 1 s.
        "apply_100k_under_1s": apply_100k(r, "apply"),
        "apply_100k_services_under_1s": apply_100k(r, "services_apply"),
    })
}

// ---------------------------------------------------------------- formatting

fn fmt_rate(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else if x >= 1000.0 {
        format!("{:.2}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

fn fmt_ns(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.2} s", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} ms", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} µs", x / 1e3)
    } else {
        format!("{x:.1} ns")
    }
}

fn fmt_s(x: f64) -> String {
    fmt_ns(x * 1e9)
}

fn fmt_bytes(x: f64) -> String {
    if x >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", x / 1024.0 / 1024.0)
    } else if x >= 1024.0 {
        format!("{:.1} KiB", x / 1024.0)
    } else {
        format!("{x:.0} B")
    }
}

fn fmt_size(s: u64) -> String {
    let t = s.to_string();
    let mut out = String::new();
    for (i, c) in t.chars().enumerate() {
        if i > 0 && (t.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1.012 (1.004–1.020)`.
fn fmt_ratio(v: &Value) -> String {
    if v["n"].as_u64().unwrap_or(0) == 0 {
        return "–".into();
    }
    format!(
        "{:.3} ({:.3}–{:.3})",
        f(&v["median"]),
        f(&v["min"]),
        f(&v["max"])
    )
}

fn fmt_spread(v: &Value, fmt: fn(f64) -> String) -> String {
    if v["n"].as_u64().unwrap_or(0) == 0 {
        return "–".into();
    }
    format!(
        "{} ({}–{})",
        fmt(f(&v["median"])),
        fmt(f(&v["min"])),
        fmt(f(&v["max"]))
    )
}

fn met(v: &Value) -> &'static str {
    match v.as_bool() {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

fn markdown(r: &Value, notes: Option<&str>) -> String {
    let s = &r["summary"];
    let meta = &r["meta"];
    let plan = &r["plan"];
    let quick = plan["quick"].as_bool().unwrap_or(false);
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Generated by `cargo xtask bench{}`; do not edit by hand (the analysis \
         section comes from `docs/bench/notes.md`). Raw samples: \
         [bench/results.json](bench/results.json), [bench/results.csv](bench/results.csv).\n",
        if quick { " --quick" } else { "" }
    );
    if quick {
        let _ = writeln!(
            w,
            "> **Quick run**: tiny sizes, only checks that the harness works. \
             Do not read anything into these numbers.\n"
        );
    }
    let _ = writeln!(
        w,
        "Run on {}, Linux {}, {} CPUs ({}), a VM: other work on the host can \
         move absolute numbers between runs; the methods take turns within \
         each round (ABCD, then DCBA) so that drift hits them alike, and \
         ratios are taken per round. {}; conntrack table: `nf_conntrack_max` \
         {}, {} buckets; ephemeral ports {} in a new namespace.\n",
        meta["date"].as_str().unwrap_or("?"),
        meta["kernel"].as_str().unwrap_or("?"),
        meta["cpus"],
        meta["cpu_model"].as_str().unwrap_or("?"),
        arr(&meta["iptables"])
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(", "),
        meta["conntrack_max"].as_str().unwrap_or("?"),
        meta["conntrack_buckets"].as_str().unwrap_or("?"),
        meta["port_range"].as_str().unwrap_or("?"),
    );

    // Targets.
    let t = &s["targets"];
    let _ = writeln!(w, "## Targets for redirect\n");
    let _ = writeln!(w, "| target | measured | |");
    let _ = writeln!(w, "|---|---|---|");
    let worst = &t["within_2pct_of_direct"]["worst"];
    let worst_cpu = &t["within_2pct_of_direct"]["worst_cpu"];
    let where_ = |x: &Value| {
        format!(
            "{} {}",
            x["size"].as_u64().map_or("?".into(), fmt_size),
            x["unit"].as_str().unwrap_or("CIDRs")
        )
    };
    let _ = writeln!(
        w,
        "| connection setup within 2 % of direct at every policy size, both sweeps (cost ratio redirect/direct ≤ 1.02) | worst median ratio {:.3} at {} (CPU time: worst {:.3} at {}) | {} |",
        f(&worst["ratio"]),
        where_(worst),
        f(&worst_cpu["ratio"]),
        where_(worst_cpu),
        met(&t["within_2pct_of_direct"]["met"])
    );
    for (k, unit, extra) in [
        ("flat_within_5pct", "CIDRs", ""),
        (
            "flat_within_5pct_services",
            "other services",
            "; the service sweep has no 10-service size, so its smallest policy, the target alone (1 entry), is the base",
        ),
    ] {
        let flat = &t[k];
        if flat.is_null() {
            continue;
        }
        let _ = writeln!(
            w,
            "| cost flat within 5 % from {} to {} {unit} (redirect/direct at each size over redirect/direct at the smallest{extra}) | worst deviation {} | {} |",
            flat["from"].as_u64().map_or("10".into(), fmt_size),
            flat["to"].as_u64().map_or("100,000".into(), fmt_size),
            flat["worst"]
                .as_f64()
                .map_or("–".into(), |x| format!("{:.1} %", x * 100.0)),
            met(&flat["met"])
        );
    }
    for (k, what) in [
        ("apply_100k_under_1s", "100,000-CIDR"),
        (
            "apply_100k_services_under_1s",
            "100,001-service (100,000 others + the target)",
        ),
    ] {
        let ap = &t[k];
        if ap.is_null() {
            continue;
        }
        let _ = writeln!(
            w,
            "| {what} policy applied in under 1 s | {} | {} |",
            if ap["apply_s"].is_object() {
                format!("median {}", fmt_spread(&ap["apply_s"], fmt_s))
            } else {
                "–".into()
            },
            met(&ap["met"])
        );
    }
    let _ = writeln!(w);
    if let Some(nt) = s["node"]["targets"].as_object() {
        let met_n = nt.values().filter(|x| x["met"] == true).count();
        let measured = nt.values().filter(|x| x["met"].is_boolean()).count();
        let _ = writeln!(
            w,
            "Node mode has targets of its own (pod add and remove time, memory \
             per pod, connection setup with many pods registered): {met_n} of \
             {measured} met, see [Node mode](#node-mode).\n"
        );
    }

    let _ = writeln!(w, "## How it is measured\n");
    let _ = writeln!(
        w,
        "Each measurement runs the same bench client against the same bench proxy \
         (`tests/src/bin/redirect-bench/`) in a throwaway pod per method \
         (`redirect_tests::pod`: a network namespace with a veth to an upstream \
         namespace, a cgroup with `app/` and `proxy/`). The client runs as UID \
         1000 in `app/`, the proxy as UID 1337 in `proxy/`, single-threaded \
         accept loop on `0.0.0.0:15001`. Every pod is new for each policy size. \
         {}\n\n\
         - **direct**: no rules and no programs; the client connects to \
         `127.0.0.1:15001` itself. The floor.\n\
         - **iptables-legacy**, **iptables-nft**: the istio-iptables `nat` table \
         for `-i '*'` (owner rules for 1337, `127.0.0.1` RETURN, then N \
         `-A ISTIO_OUTPUT -d <cidr> -j RETURN` exclusion rules, then \
         `-j ISTIO_REDIRECT`), loaded with `iptables-legacy-restore` / \
         `iptables-nft-restore` in the pod's namespace. The client connects to \
         `10.201.0.1:80`, outside the pod.\n\
         - **redirect**: `redirect apply -i '*' --exclude-cidrs-file <N cidrs>` \
         on the pod's cgroup; the client connects to `10.201.0.1:80`.\n\n\
         The N exclusion CIDRs are distinct /24s from 11.0.0.0 up; none covers \
         the destination, so iptables walks all of them for every new \
         connection. The service policies of section 3.2 (no `-i`, N other \
         services, then the target) are described there. The proxy answers every connection with one byte saying \
         whether `SO_ORIGINAL_DST` answered; the harness fails the run if a \
         captured connection reached the proxy without its original \
         destination, or a direct one with one. Connections close normally \
         (no `SO_LINGER`): the proxy closes first and holds the TIME_WAIT.\n\n\
         Connection setup: the client loops `connect` → read the 1-byte reply → \
         read EOF → `close`, one connection at a time; per measurement {} \
         connections or {} s, whichever comes first, after {} unmeasured ones. \
         Cost = wall time / connections. Ratios are cost ratios per round \
         (above 1: the numerator is slower), reported as median (min–max) over \
         the rounds. CPU cost is the CPU time of the client's and the proxy's \
         threads (`/proc/.../schedstat`, which includes the kernel work done \
         in their context, loopback softirqs mostly) per connection: less \
         sensitive than wall time to other load on the machine, so it is \
         shown next to it; the targets are judged on wall time.\n",
        match meta["pinned_cpu"].as_u64() {
            Some(c) => format!(
                "The client and the proxy are both pinned to CPU {c}: with one \
                 connection at a time, whether the scheduler puts them on one \
                 CPU or two changes the rate by up to 2x, and an unpinned first \
                 run swung between the two from one measurement to the next. \
                 On one CPU, the rate is the inverse of the whole per-connection \
                 cost (client, proxy, and the kernel's loopback work in their \
                 context)."
            ),
            None => "The client and the proxy are not pinned to CPUs.".into(),
        },
        plan["setup_count"],
        plan["setup_seconds"],
        plan["warmup"]
    );

    // Scenario 1.
    let _ = writeln!(
        w,
        "## 1. Connection setup, istio default policy (no exclusions)\n"
    );
    setup_table(w, &s["setup"]["0"]);
    let _ = writeln!(w, "![connection setup latency](bench/setup.svg)\n");
    prog_cost_section(w, r, &s["setup"]["0"]);
    floor_section(w, r);

    // Scenario 2.
    let _ = writeln!(
        w,
        "## 2. Request/response over one established connection\n\n\
         One connection through the proxy, 64-byte messages echoed back, one \
         outstanding, `TCP_NODELAY`; {} rounds of {} s. Under iptables every \
         packet goes through conntrack (and NAT on the established flow); \
         under redirect and direct, nothing.\n",
        plan["rr_rounds"], plan["rr_seconds"]
    );
    let _ = writeln!(
        w,
        "| method | transactions/s median (min–max) | p50 | p99 | CPU per transaction (client + proxy) | errors |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    for m in METHODS {
        let x = &s["rr"]["methods"][m];
        let _ = writeln!(
            w,
            "| {m} | {} | {} | {} | {} | {} |",
            fmt_spread(&x["rate"], fmt_rate),
            fmt_ns(f(&x["p50_ns"]["median"])),
            fmt_ns(f(&x["p99_ns"]["median"])),
            fmt_ns(f(&x["cpu_ns_per_op"]["median"])),
            x["errors"]
        );
    }
    ratio_table(w, &s["rr"]);
    let _ = writeln!(w, "![request/response](bench/rr.svg)\n");

    // Scenario 3.
    let _ = writeln!(
        w,
        "## 3. Scaling: connection setup with N policy entries\n\n\
         Two sweeps, each with every method measured at every size, in turns, \
         as in scenario 1. Rates are medians over the rounds; ratios are \
         per-round cost ratios, median (min–max).\n"
    );
    let _ = writeln!(
        w,
        "### 3.1 N exclusion CIDRs\n\n\
         istio's `-i '*'` with N exclusion CIDRs; none covers the destination. \
         {} rounds per size (size 0, which is scenario 1: {}).\n",
        plan["sweep_rounds"], plan["setup_rounds"]
    );
    sweep_table(w, r, "setup", "CIDRs");
    let _ = writeln!(
        w,
        "![scaling](bench/scaling.svg)\n\n![scaling, ratios](bench/scaling_ratio.svg)\n"
    );
    for size in sizes(r, "setup").into_iter().filter(|&x| x > 0) {
        let _ = writeln!(
            w,
            "<details><summary>{} CIDRs: latency</summary>\n",
            fmt_size(size)
        );
        setup_table(w, &s["setup"][size.to_string()]);
        let _ = writeln!(w, "</details>\n");
    }
    if !sizes(r, "services").is_empty() {
        let _ = writeln!(
            w,
            "### 3.2 N services\n\n\
             No `-i`: the policy captures only the services it lists, N other \
             services and then the target `10.201.0.1:80`, **last** (N + 1 entries). \
             iptables: one `-A ISTIO_OUTPUT -d IP/32 -p tcp --dport P -j \
             ISTIO_REDIRECT` rule per service (`redirect iptables --family 4 \
             --services-file`), the target's rule last, so iptables walks all N \
             other services' rules before the target's matches, for every new \
             connection; there is no capture-all rule at the end. redirect: `redirect apply --services-file`, \
             one entry per service in a hash map. The other services are \
             `10.96.0.1:80`, `10.96.0.2:80`, ... (Kubernetes' default ClusterIP \
             range). {} rounds per size.\n",
            plan["service_rounds"]
        );
        sweep_table(w, r, "services", "other services");
        let _ = writeln!(
            w,
            "![scaling with services](bench/scaling_services.svg)\n\n\
             ![scaling with services, ratios](bench/scaling_services_ratio.svg)\n"
        );
        for size in sizes(r, "services") {
            let _ = writeln!(
                w,
                "<details><summary>{} other services: latency</summary>\n",
                fmt_size(size)
            );
            setup_table(w, &s["services"][size.to_string()]);
            let _ = writeln!(w, "</details>\n");
        }
    }

    // Scenario 4.
    let _ = writeln!(
        w,
        "## 4. Apply and removal time\n\n\
         Wall time of the one process that programs the policy \
         (`iptables-*-restore` fed the whole table on stdin, in the pod's \
         namespace; `redirect apply` with the CIDRs or services in a file) and \
         of the one that removes it (restoring an empty `nat` table; `redirect \
         remove`), process start included, median (min–max) of {} cycles per \
         size. The policies are those of scenario 3.\n",
        plan["apply_reps"]
    );
    apply_table(w, &s["apply"], "CIDRs");
    let _ = writeln!(w, "![apply time](bench/apply.svg)\n");
    if sorted_sizes(&s["services_apply"])
        .iter()
        .any(|(_, per)| per.as_object().is_some_and(|o| !o.is_empty()))
    {
        let _ = writeln!(w, "Service policies (N other services, then the target):\n");
        apply_table(w, &s["services_apply"], "other services");
        let _ = writeln!(w, "![apply time, services](bench/apply_services.svg)\n");
    }

    // Scenario 5.
    let _ = writeln!(
        w,
        "## 5. Memory and map occupancy\n\n\
         redirect: the sum of `memlock` (the kernel's own accounting, from \
         `/proc/self/fdinfo` of each pinned map) over every map of the pin dir, \
         policy and state maps alike, right after apply. iptables-legacy: the \
         size of the `nat` table's rule blob (`IPT_SO_GET_INFO`), without the \
         per-CPU rule counters (16 B per rule per CPU). iptables-nft: not \
         measured. Conntrack entries are extra, per connection (see the port \
         wrap below).\n"
    );
    memory_table(w, r, "memory", "CIDRs", "EXCLUDE_V4");
    if !arr(&r["services_memory"]).is_empty() {
        let _ = writeln!(
            w,
            "\nService policies (N other services, then the target):\n"
        );
        memory_table(w, r, "services_memory", "other services", "SERVICES");
    }
    if let Some(largest) = arr(&r["memory"])
        .iter()
        .filter(|m| m["method"] == "redirect")
        .max_by_key(|m| m["size"].as_u64())
    {
        let _ = writeln!(
            w,
            "\nredirect's maps at {} CIDRs:\n\n| map | type | max entries | memlock |\n|---|---|---|---|",
            fmt_size(largest["size"].as_u64().unwrap_or(0))
        );
        for (name, m) in largest["maps"].as_object().into_iter().flatten() {
            let _ = writeln!(
                w,
                "| {name} | {} | {} | {} |",
                map_type(m["map_type"].as_u64().unwrap_or(0)),
                m["max_entries"],
                fmt_bytes(f(&m["memlock"]))
            );
        }
    }
    let _ = writeln!(w, "\n![memory](bench/memory.svg)\n");
    if let Some(occ) = r["occupancy"].as_object() {
        let he = occ["tuples_entries"].as_u64().unwrap_or(u64::MAX);
        let pe = occ["conns_entries"].as_u64().unwrap_or(u64::MAX);
        let c = &occ["counters"];
        let _ = writeln!(
            w,
            "Occupancy: {} connections opened and closed through redirect, \
             one at a time, at {} conn/s. Afterwards `TUPLES` holds **{} \
             entries** and `CONNS` **{}** ({}); counters: `handover_taken` {}, \
             `handover_dropped` {}, `orphan_kept` {}, `capacity_full` {}, \
             `orig_dst_served` {}, `orig_dst_missing` {}, `storage_failed` {}, \
             `bind_failed` {}. Each proxy socket carries its own copy of the \
             destination (`ORIG_DST` socket storage), freed with the socket. \
             TIME_WAIT sockets in the pod afterwards: {}.\n",
            fmt_size(occ["connections"].as_u64().unwrap_or(0)),
            fmt_rate(f(&occ["report"]["rate"])),
            he,
            pe,
            if he == 0 && pe == 0 {
                "back to zero, as required"
            } else {
                "NOT back to zero"
            },
            c["handover_taken"],
            c["handover_dropped"],
            c["orphan_kept"],
            c["capacity_full"],
            c["orig_dst_served"],
            c["orig_dst_missing"],
            c["storage_failed"],
            c["bind_failed"],
            occ["time_wait"],
        );
    }
    if let Some(p) = r["peak"].as_object() {
        let n = p["connections"].as_u64().unwrap_or(0);
        let get = |k: &str, m: &str| p[k][m].as_u64().unwrap_or(0);
        let per = |m: &str| {
            (get("maps_peak", m).saturating_sub(get("maps_empty", m))) as f64 / n.max(1) as f64
        };
        let storage = p["proxy_storage_peak"].as_u64().unwrap_or(0);
        let _ = writeln!(
            w,
            "Connection state, empty and at a peak: {} captured connections held \
             open at once (half IPv4, half IPv6; {} of them reached the proxy with \
             their destination), with the default `--max-connections` (131,072).\n\n\
             | map | right after apply | {} open | after they closed | per open connection |\n\
             |---|---|---|---|---|",
            fmt_size(n),
            fmt_size(p["with_destination"].as_u64().unwrap_or(0)),
            fmt_size(n),
        );
        for m in ["CONNS", "TUPLES"] {
            let _ = writeln!(
                w,
                "| `{m}` | {} | {} | {} | {:.0} B |",
                fmt_bytes(get("maps_empty", m) as f64),
                fmt_bytes(get("maps_peak", m) as f64),
                fmt_bytes(get("maps_after", m) as f64),
                per(m),
            );
        }
        let _ = writeln!(
            w,
            "| `ORIG_DST` (socket storage on the proxy's sockets, `ss -m` option memory) | 0 | {} | 0 | {:.0} B |\n\n\
             Right after apply, each map holds only its hash buckets (16 bytes a \
             slot, for 131,072 slots); entries are allocated as connections open \
             and freed as they close. Nothing is preallocated for the maximum.\n",
            fmt_bytes(storage as f64),
            storage as f64 / p["proxy_sockets"].as_u64().unwrap_or(1).max(1) as f64,
        );
    }

    node_section(w, r);

    // Port wrap.
    let _ = writeln!(
        w,
        "## Ephemeral port wrap with the proxy holding TIME_WAIT\n\n\
         One run per method of {} connections, one at a time, normal closes \
         (the proxy closes first, so each connection leaves a TIME_WAIT socket \
         on the proxy's side for 60 s), far more than the ephemeral range, so \
         client ports come round again while their previous connection is \
         still in TIME_WAIT.\n",
        fmt_size(plan["wrap_count"].as_u64().unwrap_or(0))
    );
    let _ = writeln!(
        w,
        "| method | port range | conn/s | p50 | p99 | p99.9 | max | > 100 ms | errors | TIME_WAIT after | conntrack entries after |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|");
    for x in arr(&r["wrap"]) {
        let rep = &x["report"];
        let l = &rep["latency_ns"];
        let errors: u64 = rep["errors"]
            .as_object()
            .map_or(0, |o| o.values().filter_map(Value::as_u64).sum());
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x["method"].as_str().unwrap_or("?"),
            x["port_range"].as_str().unwrap_or("?"),
            fmt_rate(f(&rep["rate"])),
            fmt_ns(f(&l["p50"])),
            fmt_ns(f(&l["p99"])),
            fmt_ns(f(&l["p999"])),
            fmt_ns(f(&l["max"])),
            rep["slow_100ms"],
            errors,
            x["time_wait"],
            x["conntrack"],
        );
    }
    let _ = writeln!(w);

    // Micro.
    let _ = writeln!(
        w,
        "## Micro-benchmark: the decision function\n\n\
         `cargo bench -p redirect-common --bench decide` (criterion{}): \
         `decide_outbound` over a user-space `PolicyMaps` (flag array for \
         ports, hash sets for owners and local addresses, one hash set per \
         prefix length for CIDRs). It measures the decision logic, not the \
         kernel's map lookups.\n",
        if quick { ", `--quick`" } else { "" }
    );
    let _ = writeln!(w, "| case | median | 95 % interval |\n|---|---|---|");
    for (k, v) in r["micro"]["cases"].as_object().into_iter().flatten() {
        let _ = writeln!(
            w,
            "| {k} | {} | {}–{} |",
            fmt_ns(f(&v["median_ns"])),
            fmt_ns(f(&v["low_ns"])),
            fmt_ns(f(&v["high_ns"]))
        );
    }
    let _ = writeln!(w);

    if let Some(n) = notes {
        let _ = writeln!(
            w,
            "## Analysis (hand-written, from `docs/bench/notes.md`)\n"
        );
        let _ = writeln!(w, "{}", n.trim());
        let _ = writeln!(w);
    }
    o
}

/// The floor scenario: `direct`, `direct` with no-op programs at redirect's
/// hooks, and `redirect`, in turns.
fn floor_section(w: &mut String, r: &Value) {
    if arr(&r["floor"]).is_empty() {
        return;
    }
    let _ = writeln!(
        w,
        "### The hooks themselves: no-op programs\n\n\
         Is the gap the hooks or the work? A third pod, `noop-hooks`, is \
         `direct` with a program that only returns (`r0 = 1; exit`) at each \
         of redirect's hooks. The three are measured in turns, {} \
         rounds, as above.\n",
        r["plan"]["setup_rounds"]
    );
    let _ = writeln!(
        w,
        "| method | conn/s median (min–max) | CPU per connection (client + proxy) |"
    );
    let _ = writeln!(w, "|---|---|---|");
    for m in FLOOR_METHODS {
        let x = method_stats(r, "floor", 0, m);
        let _ = writeln!(
            w,
            "| {m} | {} | {} |",
            fmt_spread(&x["rate"], fmt_rate),
            fmt_ns(f(&x["cpu_ns_per_op"]["median"]))
        );
    }
    let _ = writeln!(
        w,
        "\n| ratio | wall-time cost, median (min–max) | CPU cost, median (min–max) |"
    );
    let _ = writeln!(w, "|---|---|---|");
    for (a, b) in [
        ("noop-hooks", "direct"),
        ("redirect", "direct"),
        ("redirect", "noop-hooks"),
    ] {
        let _ = writeln!(
            w,
            "| {a}/{b} | {} | {} |",
            fmt_ratio(&spread(&paired(r, "floor", 0, a, b))),
            fmt_ratio(&spread(&paired_cpu(r, "floor", 0, a, b)))
        );
    }
    let _ = writeln!(w);
}

/// The pods of the floor scenario, in report order.
const FLOOR_METHODS: [&str; 3] = ["direct", "noop-hooks", "redirect"];

/// BPF program time per connection of one [`ProgCost`] entry (the
/// harness's `prog_cost` / `services_prog_cost`), ns.
fn prog_ns_per_conn(x: &Value) -> f64 {
    let conns = f(&x["connections"]).max(1.0);
    arr(&x["programs"])
        .iter()
        .map(|p| f(&p["run_ns"]))
        .sum::<f64>()
        / conns
}

/// "Where the time goes": redirect's BPF program time per connection, by
/// program at size 0 and in total at every size of both sweeps, next to
/// the CPU gap to direct measured in the rounds (`setup0`: the summary of
/// scenario 1).
fn prog_cost_section(w: &mut String, r: &Value, setup0: &Value) {
    let Some(base) = arr(&r["prog_cost"]).iter().find(|x| x["size"] == 0) else {
        return;
    };
    let conns = f(&base["connections"]).max(1.0);
    let _ = writeln!(
        w,
        "### Where redirect's time goes\n\n\
         One more measurement of redirect after the rounds ({} connections), \
         with the kernel's BPF run-time statistics on (`BPF_ENABLE_STATS`) \
         for it alone: each program's runs and run time, helpers included \
         (`bpf_bind`, map updates). The statistics add two clock reads to \
         every run; the no-op programs of the next section, measured the \
         same way, show how much, and the last column takes it out.\n",
        base["connections"]
    );
    // The no-op programs of the floor scenario, measured the same way:
    // their time per run is what the statistics themselves add.
    let noop: BTreeMap<String, f64> = arr(&r["noop_prog_cost"]["programs"])
        .iter()
        .filter(|p| f(&p["runs"]) > 0.0)
        .map(|p| {
            (
                p["program"].as_str().unwrap_or("").to_string(),
                f(&p["run_ns"]) / f(&p["runs"]),
            )
        })
        .collect();
    let _ = writeln!(
        w,
        "| program | runs per connection | ns per run | no-op program, ns per run | ns per connection | net of the no-op's, ns per connection |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    let mut total_net = 0.0;
    for p in arr(&base["programs"]) {
        let runs = f(&p["runs"]);
        if runs == 0.0 {
            continue;
        }
        let name = p["program"].as_str().unwrap_or("?");
        let per_conn = f(&p["run_ns"]) / conns;
        let (noop_run, net) = match noop.get(name) {
            Some(&n) => (format!("{n:.0}"), per_conn - n * runs / conns),
            None => ("–".into(), per_conn),
        };
        total_net += net;
        let _ = writeln!(
            w,
            "| {name} | {:.2} | {:.0} | {noop_run} | {per_conn:.0} | {net:.0} |",
            runs / conns,
            f(&p["run_ns"]) / runs,
        );
    }
    let total = prog_ns_per_conn(base);
    let _ = writeln!(
        w,
        "| **all** | | | | **{total:.0}** | **{total_net:.0}** |\n"
    );
    let gap = f(&setup0["methods"]["redirect"]["cpu_ns_per_op"]["median"])
        - f(&setup0["methods"]["direct"]["cpu_ns_per_op"]["median"]);
    let direct = f(&setup0["methods"]["direct"]["cpu_ns_per_op"]["median"]);
    if gap > 0.0 && direct > 0.0 {
        let rest = if noop.is_empty() {
            format!("The programs' own time is {total:.0} ns, the statistics' overhead included.")
        } else {
            format!(
                "The programs' own work, net of what a no-op program costs \
                 under the statistics, is {total_net:.0} ns."
            )
        };
        let _ = writeln!(
            w,
            "In the rounds above, redirect cost {gap:.0} ns of CPU time per \
             connection more than direct (medians; direct: {direct:.0} ns), so \
             the 2 % target allows {:.0} ns. {rest}\n",
            direct * 0.02
        );
    }
    let _ = writeln!(
        w,
        "BPF program time per connection as the policy grows:\n\n\
         | size | exclusion CIDRs: all programs | connect4 per run | services: all programs | connect4 per run |\n\
         |---|---|---|---|---|"
    );
    let by_size = |key: &str| -> BTreeMap<u64, (f64, f64)> {
        arr(&r[key])
            .iter()
            .filter_map(|x| {
                let connect = arr(&x["programs"])
                    .iter()
                    .find(|p| p["program"] == "connect4")
                    .map_or(0.0, |p| f(&p["run_ns"]) / f(&p["runs"]).max(1.0));
                Some((x["size"].as_u64()?, (prog_ns_per_conn(x), connect)))
            })
            .collect()
    };
    let cidrs = by_size("prog_cost");
    let svcs = by_size("services_prog_cost");
    let mut all: Vec<u64> = cidrs.keys().chain(svcs.keys()).copied().collect();
    all.sort_unstable();
    all.dedup();
    let cell = |m: &BTreeMap<u64, (f64, f64)>, k: u64| {
        m.get(&k)
            .map_or(("–".to_string(), "–".to_string()), |(t, c)| {
                (format!("{t:.0} ns"), format!("{c:.0} ns"))
            })
    };
    for k in all {
        let (a, b) = cell(&cidrs, k);
        let (c, d) = cell(&svcs, k);
        let _ = writeln!(w, "| {} | {a} | {b} | {c} | {d} |", fmt_size(k));
    }
    let _ = writeln!(w);
}

fn sorted_sizes(v: &Value) -> Vec<(u64, &Value)> {
    let mut out: Vec<(u64, &Value)> = v
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, x)| k.parse().ok().map(|k| (k, x)))
        .collect();
    out.sort_by_key(|(k, _)| *k);
    out
}

fn map_type(t: u64) -> &'static str {
    match t {
        1 => "hash",
        2 => "array",
        6 => "percpu_array",
        9 => "lru_hash",
        11 => "lpm_trie",
        15 => "sockmap",
        24 => "sk_storage",
        _ => "other",
    }
}

/// One size's per-method table and ratios (an entry of `summary.setup` or
/// `summary.services`).
fn setup_table(w: &mut String, x: &Value) {
    let _ = writeln!(
        w,
        "| method | conn/s median (min–max) | latency p50 | latency p99 | CPU per connection (client + proxy) | errors |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    for m in METHODS {
        let y = &x["methods"][m];
        let _ = writeln!(
            w,
            "| {m} | {} | {} | {} | {} | {} |",
            fmt_spread(&y["rate"], fmt_rate),
            fmt_ns(f(&y["p50_ns"]["median"])),
            fmt_ns(f(&y["p99_ns"]["median"])),
            fmt_ns(f(&y["cpu_ns_per_op"]["median"])),
            y["errors"]
        );
    }
    ratio_table(w, x);
}

/// One sweep (`setup`, `services`): a row per size.
fn sweep_table(w: &mut String, r: &Value, key: &str, unit: &str) {
    let _ = writeln!(
        w,
        "| {unit} | direct conn/s | iptables-legacy conn/s | iptables-nft conn/s | redirect conn/s | redirect/direct | legacy/redirect | nft/redirect | redirect/direct, CPU |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|");
    for size in sizes(r, key) {
        let x = &r["summary"][key][size.to_string()];
        let rate = |m: &str| fmt_rate(f(&x["methods"][m]["rate"]["median"]));
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_size(size),
            rate("direct"),
            rate("iptables-legacy"),
            rate("iptables-nft"),
            rate("redirect"),
            fmt_ratio(&x["cost_ratios"]["redirect/direct"]),
            fmt_ratio(&x["cost_ratios"]["iptables-legacy/redirect"]),
            fmt_ratio(&x["cost_ratios"]["iptables-nft/redirect"]),
            fmt_ratio(&x["cpu_ratios"]["redirect/direct"]),
        );
    }
    let _ = writeln!(w);
}

/// Apply and removal times, a row per size (`summary.apply` or
/// `summary.services_apply`).
fn apply_table(w: &mut String, x: &Value, unit: &str) {
    let _ = writeln!(
        w,
        "| {unit} | iptables-legacy apply | iptables-nft apply | redirect apply | iptables-legacy remove | iptables-nft remove | redirect remove |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|");
    for (size, per) in sorted_sizes(x) {
        let cell = |m: &str, k: &str| fmt_spread(&per[m][k], fmt_s);
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} |",
            fmt_size(size),
            cell("iptables-legacy", "apply_s"),
            cell("iptables-nft", "apply_s"),
            cell("redirect", "apply_s"),
            cell("iptables-legacy", "remove_s"),
            cell("iptables-nft", "remove_s"),
            cell("redirect", "remove_s"),
        );
    }
    let _ = writeln!(w);
}

/// Memory per size (`memory`, `services_memory`), with the one map that
/// holds the list.
fn memory_table(w: &mut String, r: &Value, key: &str, unit: &str, map: &str) {
    let _ = writeln!(
        w,
        "| {unit} | redirect, all maps | of which {map} | iptables-legacy rule blob |"
    );
    let _ = writeln!(w, "|---|---|---|---|");
    let mut mem_sizes: Vec<u64> = arr(&r[key])
        .iter()
        .filter_map(|m| m["size"].as_u64())
        .collect();
    mem_sizes.sort_unstable();
    mem_sizes.dedup();
    for size in &mem_sizes {
        let find = |m: &str| {
            arr(&r[key])
                .iter()
                .find(|x| x["size"].as_u64() == Some(*size) && x["method"] == m)
        };
        let red = find("redirect");
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} |",
            fmt_size(*size),
            red.map_or("–".into(), |x| fmt_bytes(f(&x["bytes"]))),
            red.map_or("–".into(), |x| fmt_bytes(f(&x["maps"][map]["memlock"]))),
            find("iptables-legacy").map_or("–".into(), |x| fmt_bytes(f(&x["bytes"]))),
        );
    }
}

/// Wall-time and CPU cost ratios of one summary entry.
fn ratio_table(w: &mut String, x: &Value) {
    let _ = writeln!(
        w,
        "\n| ratio | wall-time cost, median (min–max) | CPU cost, median (min–max) |\n|---|---|---|"
    );
    for (k, v) in x["cost_ratios"].as_object().into_iter().flatten() {
        let _ = writeln!(
            w,
            "| {k} | {} | {} |",
            fmt_ratio(v),
            x["cpu_ratios"].get(k).map_or("–".into(), fmt_ratio)
        );
    }
    let _ = writeln!(w);
}

// ---------------------------------------------------------------------- CSV

fn csv(r: &Value) -> String {
    let mut o = String::from("scenario,size,method,round,metric,value\n");
    for key in ["setup", "floor", "rr", "services"] {
        for s in arr(&r[key]) {
            let rep = &s["report"];
            let mut row = |metric: &str, v: &Value| {
                let _ = writeln!(
                    o,
                    "{key},{},{},{},{metric},{}",
                    s["size"],
                    s["method"].as_str().unwrap_or(""),
                    s["round"],
                    v
                );
            };
            row("ops", &rep["ops"]);
            row("elapsed_s", &rep["elapsed_s"]);
            row("rate_per_s", &rep["rate"]);
            for p in ["p50", "p90", "p99", "p999", "max", "mean"] {
                row(&format!("latency_{p}_ns"), &rep["latency_ns"][p]);
            }
            row("slow_100ms", &rep["slow_100ms"]);
        }
    }
    for (key, a) in ["apply", "services_apply"]
        .into_iter()
        .flat_map(|key| arr(&r[key]).iter().map(move |a| (key, a)))
    {
        for k in ["apply_s", "remove_s"] {
            let _ = writeln!(
                o,
                "{key},{},{},{},{k},{}",
                a["size"],
                a["method"].as_str().unwrap_or(""),
                a["rep"],
                a[k]
            );
        }
    }
    for (key, m) in ["memory", "services_memory"]
        .into_iter()
        .flat_map(|key| arr(&r[key]).iter().map(move |m| (key, m)))
    {
        let _ = writeln!(
            o,
            "{key},{},{},0,bytes,{}",
            m["size"],
            m["method"].as_str().unwrap_or(""),
            m["bytes"]
        );
    }
    for (key, x) in ["prog_cost", "services_prog_cost"]
        .into_iter()
        .flat_map(|key| arr(&r[key]).iter().map(move |x| (key, x)))
    {
        let _ = writeln!(
            o,
            "{key},{},redirect,0,connections,{}",
            x["size"], x["connections"]
        );
        for p in arr(&x["programs"]) {
            let name = p["program"].as_str().unwrap_or("");
            let _ = writeln!(
                o,
                "{key},{},redirect,0,{name}_runs,{}",
                x["size"], p["runs"]
            );
            let _ = writeln!(
                o,
                "{key},{},redirect,0,{name}_run_ns,{}",
                x["size"], p["run_ns"]
            );
        }
    }
    for x in arr(&r["wrap"]) {
        let rep = &x["report"];
        let method = x["method"].as_str().unwrap_or("");
        let mut row = |metric: &str, v: &Value| {
            let _ = writeln!(o, "wrap,0,{method},0,{metric},{v}");
        };
        row("ops", &rep["ops"]);
        row("rate_per_s", &rep["rate"]);
        row("latency_p99_ns", &rep["latency_ns"]["p99"]);
        row("latency_max_ns", &rep["latency_ns"]["max"]);
        row("slow_100ms", &rep["slow_100ms"]);
        row("time_wait", &x["time_wait"]);
        row("conntrack", &x["conntrack"]);
    }
    if let Some(occ) = r["occupancy"].as_object() {
        let _ = writeln!(
            o,
            "occupancy,0,redirect,0,connections,{}",
            occ["connections"]
        );
        let _ = writeln!(
            o,
            "occupancy,0,redirect,0,tuples_entries,{}",
            occ["tuples_entries"]
        );
        let _ = writeln!(
            o,
            "occupancy,0,redirect,0,conns_entries,{}",
            occ["conns_entries"]
        );
    }
    for (k, v) in r["micro"]["cases"].as_object().into_iter().flatten() {
        let _ = writeln!(o, "micro,0,{k},0,median_ns,{}", v["median_ns"]);
    }
    // Node mode: size is the number of pods registered.
    let n = &r["node"];
    for x in arr(&n["ops"]) {
        for k in ["add_s", "remove_s"] {
            let _ = writeln!(
                o,
                "node_ops,{},{},{},{k},{}",
                x["registered"],
                x["method"].as_str().unwrap_or(""),
                x["rep"],
                x[k]
            );
        }
    }
    for x in arr(&n["memory"]) {
        let _ = writeln!(
            o,
            "node_memory,{},redirect,0,{}_bytes,{}",
            x["registered"],
            x["when"].as_str().unwrap_or("").replace('-', "_"),
            x["bytes"]
        );
    }
    for x in arr(&n["setup"]) {
        let rep = &x["report"];
        let method = x["method"].as_str().unwrap_or("");
        let mut row = |metric: &str, v: &Value| {
            let _ = writeln!(
                o,
                "node_setup,{},{method},{},{metric},{v}",
                x["size"], x["round"]
            );
        };
        row("ops", &rep["ops"]);
        row("rate_per_s", &rep["rate"]);
        row("latency_p50_ns", &rep["latency_ns"]["p50"]);
        row("latency_p99_ns", &rep["latency_ns"]["p99"]);
        row("cpu_ns_per_op", &json!(cpu(rep)));
    }
    o
}

// ---------------------------------------------------------------------- SVG

/// One line of a chart: a label, a color, and (x index, median, min, max).
struct Series {
    label: String,
    color: &'static str,
    dash: bool,
    points: Vec<(usize, f64, f64, f64)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const W: f64 = 720.0;
const H: f64 = 400.0;
const L: f64 = 80.0;
const R: f64 = 190.0;
const T: f64 = 40.0;
const B: f64 = 60.0;

fn svg_open(title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="{W}" height="{H}" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="22" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"##,
        (L + W - R) / 2.0,
        esc(title)
    );
    s
}

fn nice_max(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 {
        return 1.0;
    }
    let e = 10f64.powf(x.log10().floor());
    for m in [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0] {
        if m * e >= x {
            return m * e;
        }
    }
    10.0 * e
}

/// A chart over categorical x labels, linear (from 0 or `ymin`) or log y.
#[allow(clippy::too_many_arguments)] // one call per plot, each argument named at the call
fn line_chart(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    xs: &[String],
    series: &[Series],
    log: bool,
    yfmt: fn(f64) -> String,
    ymin_fixed: Option<f64>,
) -> String {
    let mut s = svg_open(title);
    let all: Vec<f64> = series
        .iter()
        .flat_map(|x| x.points.iter().flat_map(|p| [p.2, p.3]))
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .collect();
    let (mut lo, mut hi) = (min(&all), max(&all));
    if all.is_empty() {
        (lo, hi) = (0.1, 1.0);
    }
    let (ylo, yhi) = if log {
        (
            10f64.powf(lo.log10().floor()),
            10f64.powf(hi.log10().ceil().max(lo.log10().floor() + 1.0)),
        )
    } else {
        let lo = ymin_fixed.unwrap_or(0.0).min(lo);
        (lo, nice_max(hi))
    };
    let pw = W - L - R;
    let ph = H - T - B;
    let ymap = |v: f64| {
        let t = if log {
            (v.log10() - ylo.log10()) / (yhi.log10() - ylo.log10())
        } else {
            (v - ylo) / (yhi - ylo)
        };
        T + ph * (1.0 - t)
    };
    let n = xs.len().max(1);
    let xmap = |i: usize| L + pw * (i as f64 + 0.5) / n as f64;
    // Axes and grid.
    let ticks: Vec<f64> = if log {
        let mut v = Vec::new();
        let mut t = ylo;
        while t <= yhi * 1.0001 {
            v.push(t);
            t *= 10.0;
        }
        v
    } else {
        (0..=5)
            .map(|i| ylo + (yhi - ylo) * i as f64 / 5.0)
            .collect()
    };
    for t in &ticks {
        let y = ymap(*t);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            L + pw,
            L - 6.0,
            y + 4.0,
            esc(&yfmt(*t))
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="#000"/><line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="#000"/>"##,
        T + ph,
        T + ph,
        L + pw,
        T + ph
    );
    for (i, x) in xs.iter().enumerate() {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"##,
            xmap(i),
            T + ph + 18.0,
            esc(x)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"##,
        L + pw / 2.0,
        H - 14.0,
        esc(xlabel)
    );
    let _ = writeln!(
        s,
        r##"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"##,
        T + ph / 2.0,
        T + ph / 2.0,
        esc(ylabel)
    );
    // Series.
    for (k, se) in series.iter().enumerate() {
        let pts: Vec<String> = se
            .points
            .iter()
            .filter(|p| p.1.is_finite() && (!log || p.1 > 0.0))
            .map(|p| format!("{:.1},{:.1}", xmap(p.0), ymap(p.1)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{}/>"##,
            pts.join(" "),
            se.color,
            if se.dash {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            }
        );
        for p in &se.points {
            if !(p.1.is_finite() && (!log || p.2 > 0.0)) {
                continue;
            }
            let x = xmap(p.0);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{}"/><circle cx="{x:.1}" cy="{:.1}" r="3" fill="{}"/>"##,
                ymap(p.2),
                ymap(p.3),
                se.color,
                ymap(p.1),
                se.color
            );
        }
        let ly = T + 10.0 + 20.0 * k as f64;
        let lx = W - R + 15.0;
        let _ = writeln!(
            s,
            r##"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2"{}/><text x="{}" y="{}">{}</text>"##,
            lx + 20.0,
            se.color,
            if se.dash {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            },
            lx + 26.0,
            ly + 4.0,
            esc(&se.label)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" font-size="10" fill="#666">points: median; bars: min–max over rounds</text>"##,
        W - R + 15.0,
        T + 10.0 + 20.0 * series.len() as f64 + 10.0
    );
    s.push_str("</svg>\n");
    s
}

/// The two plots of one sweep: conn/s per method, and cost relative to
/// direct.
fn sweep_plots(r: &Value, key: &str, what: &str, prefix: &str) -> Vec<(String, String)> {
    let s = &r["summary"][key];
    let szs = sizes(r, key);
    if szs.is_empty() {
        return Vec::new();
    }
    let xs: Vec<String> = szs.iter().map(|&x| fmt_size(x)).collect();
    let mut out = Vec::new();
    let series: Vec<Series> = METHODS
        .iter()
        .map(|m| Series {
            label: (*m).into(),
            color: color(m),
            dash: false,
            points: szs
                .iter()
                .enumerate()
                .map(|(i, sz)| {
                    let v = &s[sz.to_string()]["methods"][m]["rate"];
                    (i, f(&v["median"]), f(&v["min"]), f(&v["max"]))
                })
                .collect(),
        })
        .collect();
    out.push((
        format!("{prefix}.svg"),
        line_chart(
            &format!("Connection setup vs {what}"),
            &format!("{what} in the policy"),
            "connections/s (log)",
            &xs,
            &series,
            true,
            fmt_rate,
            None,
        ),
    ));
    let mut series = vec![Series {
        label: "redirect/direct".into(),
        color: color("redirect"),
        dash: false,
        points: Vec::new(),
    }];
    for ipt in IPTABLES {
        series.push(Series {
            label: format!("{ipt}/direct"),
            color: color(ipt),
            dash: false,
            points: Vec::new(),
        });
    }
    for (i, sz) in szs.iter().enumerate() {
        for se in series.iter_mut() {
            let v = &s[sz.to_string()]["cost_ratios"][&se.label];
            se.points
                .push((i, f(&v["median"]), f(&v["min"]), f(&v["max"])));
        }
    }
    out.push((
        format!("{prefix}_ratio.svg"),
        line_chart(
            &format!("Connection setup cost relative to direct, {what}"),
            &format!("{what} in the policy"),
            "cost / cost of direct (log)",
            &xs,
            &series,
            true,
            |x| format!("{x:.1}x"),
            None,
        ),
    ));
    out
}

/// Apply and removal times of `summary[key]`.
fn apply_plot(s: &Value, what: &str) -> Option<String> {
    let ap = sorted_sizes(s);
    if ap.is_empty() {
        return None;
    }
    let axs: Vec<String> = ap.iter().map(|(k, _)| fmt_size(*k)).collect();
    let mut series = Vec::new();
    for m in ["iptables-legacy", "iptables-nft", "redirect"] {
        for (k, label) in [("apply_s", "apply"), ("remove_s", "remove")] {
            series.push(Series {
                label: format!("{m} {label}"),
                color: color(m),
                dash: k == "remove_s",
                points: ap
                    .iter()
                    .enumerate()
                    .map(|(i, (_, per))| {
                        let v = &per[m][k];
                        (i, f(&v["median"]), f(&v["min"]), f(&v["max"]))
                    })
                    .collect(),
            });
        }
    }
    Some(line_chart(
        &format!("Time to program / remove a policy, {what}"),
        &format!("{what} in the policy"),
        "seconds (log)",
        &axs,
        &series,
        true,
        fmt_s,
        None,
    ))
}

fn plots(r: &Value) -> Vec<(String, String)> {
    let s = &r["summary"];
    let mut out = sweep_plots(r, "setup", "exclusion CIDRs", "scaling");
    out.extend(sweep_plots(
        r,
        "services",
        "other services",
        "scaling_services",
    ));
    // Setup latency at size 0: p50 and p99 per method, as two series over
    // the methods.
    let ms: Vec<String> = METHODS.iter().map(|m| (*m).to_string()).collect();
    let lat = |k: &str, c: &'static str| Series {
        label: format!("latency {k}"),
        color: c,
        dash: false,
        points: METHODS
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let v = &s["setup"]["0"]["methods"][m][format!("{k}_ns")];
                (i, f(&v["median"]), f(&v["min"]), f(&v["max"]))
            })
            .collect(),
    };
    out.push((
        "setup.svg".into(),
        line_chart(
            "Connection setup latency, no exclusions",
            "method",
            "latency per connection",
            &ms,
            &[lat("p50", "#1b9e77"), lat("p99", "#d95f02")],
            false,
            fmt_ns,
            Some(0.0),
        ),
    ));
    // Request/response.
    let rr = Series {
        label: "transactions/s".into(),
        color: "#1b9e77",
        dash: false,
        points: METHODS
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let v = &s["rr"]["methods"][m]["rate"];
                (i, f(&v["median"]), f(&v["min"]), f(&v["max"]))
            })
            .collect(),
    };
    out.push((
        "rr.svg".into(),
        line_chart(
            "Request/response over one connection",
            "method",
            "transactions/s",
            &ms,
            &[rr],
            false,
            fmt_rate,
            Some(0.0),
        ),
    ));
    // Apply time.
    for (key, what, name) in [
        ("apply", "exclusion CIDRs", "apply.svg"),
        ("services_apply", "other services", "apply_services.svg"),
    ] {
        if let Some(svg) = apply_plot(&s[key], what) {
            out.push((name.into(), svg));
        }
    }
    // Memory.
    let mut msz: Vec<u64> = arr(&r["memory"])
        .iter()
        .filter_map(|m| m["size"].as_u64())
        .collect();
    msz.sort_unstable();
    msz.dedup();
    let mxs: Vec<String> = msz.iter().map(|&x| fmt_size(x)).collect();
    let series: Vec<Series> = ["iptables-legacy", "redirect"]
        .iter()
        .map(|m| Series {
            label: match *m {
                "redirect" => "redirect, all maps".into(),
                _ => "iptables-legacy rule blob".into(),
            },
            color: color(m),
            dash: false,
            points: msz
                .iter()
                .enumerate()
                .filter_map(|(i, sz)| {
                    arr(&r["memory"])
                        .iter()
                        .find(|x| x["size"].as_u64() == Some(*sz) && x["method"] == *m)
                        .map(|x| {
                            let b = f(&x["bytes"]);
                            (i, b, b, b)
                        })
                })
                .collect(),
        })
        .collect();
    if let Some(svg) = node_plot(&s["node"]) {
        out.push(("node.svg".into(), svg));
    }
    out.push((
        "memory.svg".into(),
        line_chart(
            "Kernel memory of the policy",
            "exclusion CIDRs in the policy",
            "bytes (log)",
            &mxs,
            &series,
            true,
            fmt_bytes,
            None,
        ),
    ));
    out
}

/// Pod add and remove time against the pods registered, next to the
/// iptables restores of the same policy.
fn node_plot(n: &Value) -> Option<String> {
    let ops = sorted_sizes(&n["ops"]);
    if ops.is_empty() {
        return None;
    }
    let xs: Vec<String> = ops.iter().map(|(k, _)| fmt_size(*k)).collect();
    let mut series = Vec::new();
    for m in NODE_METHODS {
        for (k, label) in [("add_s", "add"), ("remove_s", "remove")] {
            series.push(Series {
                label: format!("{m} {label}"),
                color: color(m),
                dash: k == "remove_s",
                points: ops
                    .iter()
                    .enumerate()
                    .map(|(i, (_, x))| {
                        let v = &x["methods"][m][k];
                        (i, f(&v["median"]), f(&v["min"]), f(&v["max"]))
                    })
                    .collect(),
            });
        }
    }
    Some(line_chart(
        "Programming one pod: redirect pod add/remove vs iptables-restore",
        "pods already registered on the node",
        "seconds (log)",
        &xs,
        &series,
        true,
        fmt_s,
        None,
    ))
}

/// Checks that a report directory is complete.
fn check_outputs(out: &Path) -> Result<()> {
    for f in [
        "benchmarks.md",
        "bench/results.json",
        "bench/results.csv",
        "bench/scaling.svg",
    ] {
        let p = out.join(f);
        if !p.exists() {
            bail!("{} was not written", p.display());
        }
    }
    Ok(())
}

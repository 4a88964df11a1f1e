//! `flamewatch latency`: a latency probe on one function of one target,
//! through the engine. Stages: attach (engine, target, probe) → trial
//! (is the function called too often for the budget?) → collect (governed
//! ticks until the duration, a signal or the target's exit) → detach →
//! files: `<stem>.latency.json`, and with a budget the slow-call profile
//! `<stem>.slow.{svg,folded,json}` (kind `slow`, through [`finish`]).

use std::{
    fmt::Write as _,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    compact_timestamp,
    finish::{self, Window},
    record::engine_options,
    round3, sanitize, SessionError, SessionKind,
};
use crate::{
    config::LatencyConfig,
    engine::{Engine, EngineOptions, Want},
    probes::{Bucket, Latency, Location, ProbeId},
    render,
    target::Target,
    unwind,
};

/// How long the rate of calls is measured before the session commits.
const TRIAL: Duration = Duration::from_millis(500);
/// Fewer calls than this in an interval say nothing about the cost.
const MIN_CALLS: u64 = 20;
/// Intervals over budget in a row before a probe is taken off.
const OVER_BUDGET_TICKS: u32 = 3;

/// A probe refused: the function is called too often for the budget.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{function}` is called {calls_per_s:.0} times/s; at {:.2} µs per call (entry + return probes) \
     that is {pct:.1} % of the target's CPU, over the {budget_pct:.1} % budget (--max-overhead)",
    cost_ns / 1e3
)]
pub struct Refused {
    /// The function.
    pub function: String,
    /// Its measured call rate.
    pub calls_per_s: f64,
    /// Calibrated cost per call, ns.
    pub cost_ns: f64,
    /// What probing it costs, percent of the target's CPU.
    pub pct: f64,
    /// The budget.
    pub budget_pct: f64,
}

/// What a latency session produced.
pub struct Outcome {
    /// The report as printed (histogram and quantiles).
    pub text: String,
    /// Files written.
    pub files: Vec<String>,
    /// The latency file's content.
    pub report: LatencyReport,
}

/// `<stem>.latency.json`.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    /// Format version.
    pub version: u32,
    /// The process.
    pub target: Target,
    /// The function as asked for.
    pub function: String,
    /// The binary it is in.
    pub binary: String,
    /// Its file offset.
    pub offset: u64,
    /// When the probe was attached (RFC 3339).
    pub started_at: String,
    /// Seconds probed.
    pub duration_s: f64,
    /// Calls timed.
    pub count: u64,
    /// Calls per second.
    pub calls_per_s: f64,
    /// Mean duration, ns.
    pub mean_ns: u64,
    /// Median, ns.
    pub p50_ns: u64,
    /// 90th percentile, ns.
    pub p90_ns: u64,
    /// 99th percentile, ns.
    pub p99_ns: u64,
    /// 99.9th percentile, ns.
    pub p999_ns: u64,
    /// Longest call, ns.
    pub max_ns: u64,
    /// The budget, ns (with `--budget`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_ns: Option<u64>,
    /// Calls over the budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub over_budget: Option<u64>,
    /// The same, percent of the calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub over_budget_pct: Option<f64>,
    /// The histogram's non-empty buckets (log-linear: 16 per power of two).
    pub buckets: Vec<Bucket>,
    /// What probing cost.
    pub probe: ProbeCost,
    /// The slow-call profile's files (with `--budget`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_profile: Option<SlowProfile>,
    /// What may make the figures less than exact.
    pub warnings: Vec<String>,
}

/// The probes' cost and the governor's decision.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeCost {
    /// Calibrated cost of entry + return per call, ns.
    pub cost_ns_per_call: f64,
    /// Calls × cost over the target's CPU time, percent.
    pub overhead_pct: f64,
    /// The overhead budget, percent.
    pub budget_pct: f64,
    /// What the governor decided.
    pub decision: String,
    /// Returns without a recorded entry.
    pub unmatched_returns: u64,
    /// Calls nested deeper than the per-thread stack (not timed).
    pub too_deep: u64,
    /// Entries lost (in-flight map full).
    pub lost_entries: u64,
}

/// Files of the slow-call profile.
#[derive(Debug, Clone, Serialize)]
pub struct SlowProfile {
    /// CPU samples taken past the budget.
    pub samples: u64,
    /// Seconds blocked past the budget (off-CPU traced; else 0): with
    /// it, the profile counts wall time in µs, its blocked stacks marked
    /// `[off-cpu]`.
    pub off_cpu_s: f64,
    /// Flamegraph.
    pub svg: String,
    /// Folded stacks.
    pub folded: String,
    /// Its summary.
    pub json: String,
}

/// Runs the latency session of `config` on `target` at `location`.
pub async fn latency(
    config: &LatencyConfig,
    target: Target,
    location: Location,
    mut stop: watch::Receiver<bool>,
) -> Result<Outcome, SessionError> {
    let pid = target.pid;
    let record = config.record_config();
    let dwarf = unwind::choose(record.unwind, pid).dwarf;
    let budget_ns = config.budget.map_or(0, |b| b.as_nanos() as u64);
    // Off-CPU time only matters to the slow-call profile.
    let off_cpu = budget_ns > 0 && config.off_cpu;
    let mut engine = Engine::start(EngineOptions {
        off_cpu,
        ..engine_options(&record, dwarf)
    })?;
    let want = Want {
        hz: if budget_ns > 0 { config.freq_hz } else { 0 },
        off_cpu,
        ..Want::default()
    };
    let admission = engine.admit().await;
    engine.add_target(target.clone(), want)?;
    drop(admission);
    let cost_ns = engine.probe_cost_ns()?;
    let started_at = SystemTime::now();
    let id = engine.add_probe(pid, &location, budget_ns)?;
    let decision = match trial(&mut engine, id, pid, cost_ns, config, &location) {
        Ok(d) => d,
        Err(refused) => {
            engine.shutdown();
            return Err(refused.into());
        }
    };
    info!(
        pid,
        comm = %target.comm,
        "probing {} in {} (offset {:#x}): {decision}",
        location.spec,
        location.binary.display(),
        location.offset
    );
    engine.announce(pid);
    let mut warnings = collect(&mut engine, id, pid, cost_ns, config, &mut stop).await?;
    engine.final_tick()?;
    let now = SystemTime::now();
    let lat = engine.probe_latency(id).unwrap_or_default();
    let window = Window::take(&engine, pid, started_at, now, false);
    engine.shutdown();
    let label = config.label.clone().unwrap_or_else(|| sanitize(&target.comm));
    let stem = format!("{label}-{pid}-{}", compact_timestamp(started_at));
    let duration = now.duration_since(started_at).unwrap_or_default();
    let cpu = window
        .as_ref()
        .map_or(0, |w| w.intervals.iter().map(|i| i.cpu_ns).sum::<u64>());
    let slow = match (window, budget_ns > 0) {
        (Some(w), true) => tokio::task::block_in_place(|| slow_profile(w, &record, off_cpu, started_at))?,
        _ => None,
    };
    if slow
        .as_ref()
        .is_some_and(|s| s.samples == 0 && s.off_cpu_s == 0.0)
    {
        warnings.push(
            "no CPU sample was taken and no block seen past the budget: the slow-call profile is empty"
                .into(),
        );
    }
    warn_counts(&lat, &mut warnings);
    let report = LatencyReport {
        version: 1,
        target,
        function: location.spec.clone(),
        binary: location.binary.display().to_string(),
        offset: location.offset,
        started_at: humantime::format_rfc3339_seconds(started_at).to_string(),
        duration_s: round3(duration.as_secs_f64()),
        count: lat.count,
        calls_per_s: round3(lat.count as f64 / duration.as_secs_f64().max(1e-9)),
        mean_ns: lat.mean_ns().round() as u64,
        p50_ns: lat.quantile(0.5),
        p90_ns: lat.quantile(0.9),
        p99_ns: lat.quantile(0.99),
        p999_ns: lat.quantile(0.999),
        max_ns: lat.max_ns,
        budget_ns: (budget_ns > 0).then_some(budget_ns),
        over_budget: (budget_ns > 0).then_some(lat.over_budget),
        over_budget_pct: (budget_ns > 0).then(|| round3(lat.over_budget_pct())),
        buckets: lat.nonempty(),
        probe: ProbeCost {
            cost_ns_per_call: cost_ns.round(),
            overhead_pct: round3(pct(lat.count, cost_ns, cpu)),
            budget_pct: config.max_overhead_pct,
            decision,
            unmatched_returns: lat.unmatched,
            too_deep: lat.too_deep,
            lost_entries: lat.lost,
        },
        slow_profile: slow,
        warnings,
    };
    let path = config.output.join(format!("{stem}.latency.json"));
    let json = serde_json::to_string_pretty(&report).map_err(render::RenderError::from)?;
    render::write_file(&path, json.as_bytes())?;
    let mut files = vec![path.display().to_string()];
    if let Some(s) = &report.slow_profile {
        files.extend(
            [s.svg.clone(), s.folded.clone(), s.json.clone()]
                .into_iter()
                .filter(|f| !f.is_empty()),
        );
    }
    Ok(Outcome {
        text: render_text(&report, &lat),
        files,
        report,
    })
}

/// Probing cost, percent of the target's CPU time `cpu_ns`.
fn pct(calls: u64, cost_ns: f64, cpu_ns: u64) -> f64 {
    if cpu_ns == 0 {
        return 0.0;
    }
    100.0 * calls as f64 * cost_ns / cpu_ns as f64
}

/// Measures the call rate for [`TRIAL`] and refuses a function whose
/// probes alone would cost more than the budget. Returns the decision.
fn trial(
    engine: &mut Engine,
    id: ProbeId,
    pid: u32,
    cost_ns: f64,
    config: &LatencyConfig,
    location: &Location,
) -> Result<String, Refused> {
    let (t0, cpu0) = (Instant::now(), cpu_ns(pid));
    let calls0 = engine.probe_latency(id).map_or(0, |l| l.count);
    tokio::task::block_in_place(|| std::thread::sleep(TRIAL));
    let calls = engine.probe_latency(id).map_or(0, |l| l.count) - calls0;
    let cpu = cpu_ns(pid).saturating_sub(cpu0);
    let rate = calls as f64 / t0.elapsed().as_secs_f64();
    let p = pct(calls, cost_ns, cpu);
    let budget = config.max_overhead_pct;
    // A 100 % budget takes any cost (benchmarks measure it that way).
    if calls >= MIN_CALLS && p > budget && budget < 100.0 {
        engine.remove_probe(id);
        return Err(Refused {
            function: location.spec.clone(),
            calls_per_s: rate,
            cost_ns,
            pct: p,
            budget_pct: budget,
        });
    }
    Ok(format!(
        "probing: {rate:.0} calls/s × {:.2} µs = {p:.2} % of the target's CPU (budget {budget:.1} %)",
        cost_ns / 1e3
    ))
}

/// CPU time of every thread of `pid` so far, ns (schedstat: exact).
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Ticks the engine until the session ends; a probe whose cost stays
/// over the budget is taken off (the report says so).
async fn collect(
    engine: &mut Engine,
    id: ProbeId,
    pid: u32,
    cost_ns: f64,
    config: &LatencyConfig,
    stop: &mut watch::Receiver<bool>,
) -> Result<Vec<String>, SessionError> {
    let start = Instant::now();
    let interval = config.record_config().drain_interval;
    let mut warnings = Vec::new();
    let (mut calls0, mut cpu0, mut over) = (engine.probe_latency(id).map_or(0, |l| l.count), cpu_ns(pid), 0);
    loop {
        let remaining = config.duration.map(|d| d.saturating_sub(start.elapsed()));
        if remaining.is_some_and(|r| r.is_zero()) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(remaining.map_or(interval, |r| r.min(interval))) => {}
            _ = stop.changed() => {
                info!("stopping on signal");
                break;
            }
        }
        engine.tick()?;
        if engine.slot(pid).is_none_or(|s| s.exited_at.is_some()) {
            break;
        }
        let (calls, cpu) = (engine.probe_latency(id).map_or(0, |l| l.count), cpu_ns(pid));
        let p = pct(calls - calls0, cost_ns, cpu.saturating_sub(cpu0));
        (calls0, cpu0) = (calls, cpu);
        over = if calls >= MIN_CALLS && p > config.max_overhead_pct && config.max_overhead_pct < 100.0 {
            over + 1
        } else {
            0
        };
        if over >= OVER_BUDGET_TICKS {
            let w = format!(
                "probes taken off after {:.0} s: they cost {p:.1} % of the target's CPU, over the {:.1} % budget",
                start.elapsed().as_secs_f64(),
                config.max_overhead_pct
            );
            warn!(pid, "{w}");
            warnings.push(w);
            engine.remove_probe(id);
            break;
        }
    }
    Ok(warnings)
}

/// The slow-call profile: the window's slow samples, finished as a
/// session of kind `slow`; with `off_cpu`, a wall-clock profile of the
/// late part of the calls (their CPU samples and their blocked time).
fn slow_profile(
    mut window: Window,
    record: &crate::config::RecordConfig,
    off_cpu: bool,
    started_at: SystemTime,
) -> Result<Option<SlowProfile>, SessionError> {
    slow_only(&mut window);
    let config;
    let record = if off_cpu {
        config = slow_config(record);
        &config
    } else {
        record
    };
    let spec = finish::Spec {
        config: record,
        kind: SessionKind::Slow,
        started_at,
    };
    let report = finish::finish(window, &spec)?;
    let f = &report.summary.files;
    Ok(Some(SlowProfile {
        samples: report.summary.sampling.samples,
        off_cpu_s: report.summary.off_cpu.as_ref().map_or(0.0, |o| o.blocked_s),
        svg: f.svg.clone(),
        folded: f.folded.clone(),
        json: f.json.clone(),
    }))
}

/// Keeps only what a window's late calls did: their CPU samples and the
/// late part of their blocks.
pub fn slow_only(w: &mut Window) {
    for i in &mut w.intervals {
        i.cpu = std::mem::take(&mut i.slow);
        i.off = std::mem::take(&mut i.slow_off);
    }
    w.still_blocked.clear();
    w.still_blocked_off = Default::default();
}

/// The settings of a slow-call profile that traced off-CPU time: a wall
/// profile (CPU samples and blocked time, in µs; blocked stacks marked).
pub fn slow_config(record: &crate::config::RecordConfig) -> crate::config::RecordConfig {
    crate::config::RecordConfig {
        mode: crate::config::Mode::Wall,
        ..record.clone()
    }
}

fn warn_counts(lat: &Latency, warnings: &mut Vec<String>) {
    if lat.too_deep > 0 {
        warnings.push(format!(
            "{} calls nested deeper than {} on a thread were not timed",
            lat.too_deep,
            flamewatch_common::probe::MAX_CALL_DEPTH
        ));
    }
    if lat.lost > 0 {
        warnings.push(format!("{} calls lost: the in-flight table was full", lat.lost));
    }
}

/// A duration for people: `2.03 ms`.
pub fn human_ns(ns: u64) -> String {
    let v = ns as f64;
    if v >= 1e9 {
        format!("{:.2} s", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2} ms", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.2} µs", v / 1e3)
    } else {
        format!("{ns} ns")
    }
}

/// The terminal report: a power-of-two histogram in µs (as bcc's
/// funclatency draws it) and the quantiles.
pub fn render_text(r: &LatencyReport, lat: &Latency) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} (pid {}): {} calls of {} in {:.1} s ({:.1}/s)",
        r.target.comm, r.target.pid, r.count, r.function, r.duration_s, r.calls_per_s
    );
    out.push_str(&log2_histogram(lat));
    let _ = writeln!(
        out,
        "mean {}  p50 {}  p90 {}  p99 {}  p999 {}  max {}",
        human_ns(r.mean_ns),
        human_ns(r.p50_ns),
        human_ns(r.p90_ns),
        human_ns(r.p99_ns),
        human_ns(r.p999_ns),
        human_ns(r.max_ns)
    );
    if let (Some(b), Some(n), Some(p)) = (r.budget_ns, r.over_budget, r.over_budget_pct) {
        let _ = writeln!(out, "over budget ({}): {n} calls, {p:.2} %", human_ns(b));
    }
    let _ = writeln!(out, "{}", r.probe.decision);
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

/// Power-of-two rows of µs, from the first non-empty to the last.
fn log2_histogram(lat: &Latency) -> String {
    let mut rows = [0u64; 64];
    for b in lat.nonempty() {
        let us = b.low_ns / 1000;
        let row = if us == 0 {
            0
        } else {
            64 - us.leading_zeros() as usize
        };
        rows[row.min(63)] += b.count;
    }
    let Some(first) = rows.iter().position(|&n| n > 0) else {
        return "     usecs               : count    distribution\n".into();
    };
    let last = rows.iter().rposition(|&n| n > 0).unwrap_or(first);
    let peak = rows.iter().copied().max().unwrap_or(1).max(1);
    let mut out = String::from("     usecs               : count    distribution\n");
    for (row, &n) in rows.iter().enumerate().take(last + 1).skip(first) {
        let (lo, hi) = if row == 0 {
            (0, 1)
        } else {
            (1u64 << (row - 1), (1u64 << row) - 1)
        };
        let stars = (n * 40).div_ceil(peak) as usize;
        let _ = writeln!(out, "{lo:>10} -> {hi:<10} : {n:<8} |{:<40}|", "*".repeat(stars));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that the terminal histogram draws power-of-two rows of µs with
    /// the peak row full.
    #[test]
    fn histogram_rows() {
        let mut lat = Latency::default();
        for _ in 0..90 {
            lat.record(2_000_000);
        }
        for _ in 0..10 {
            lat.record(30_000_000);
        }
        let text = log2_histogram(&lat);
        assert!(text.contains("1024 -> 2047"), "{text}");
        assert!(text.contains("16384 -> 32767"), "{text}");
        assert!(text.contains(&format!("|{}|", "*".repeat(40))), "{text}");
        assert_eq!(human_ns(2_030_000), "2.03 ms");
    }
}

//! Profiling sessions: attach to the targets, drain the kernel's aggregates
//! every interval, stop on time, on signal or when every target is gone, then
//! symbolize and write one report per target.

use std::{
    collections::HashMap,
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    aggregate::{BuildOptions, Profile, RawProfile},
    bpf,
    config::RecordConfig,
    governor::{
        budget, calibrate,
        cost::{self, BpfStats, IntervalInput},
        Decision, Governor, GovernorConfig, Observation,
    },
    render::{self, flamegraph, folded, summary, RenderError},
    sampling::{period_for, Sampler, SamplingError},
    symbolize::{self, MapsCache},
    target::{self, Target},
    unwind::{self, consumer::Consumer},
};

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The kernel side failed.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// The eBPF object failed to load.
    #[error(transparent)]
    Bpf(#[from] bpf::BpfError),
    /// Writing a report failed.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// Other sessions use the target's overhead budget.
    #[error(transparent)]
    Budget(#[from] budget::BudgetError),
    /// The output folder cannot be created.
    #[error("cannot create output folder {path}: {source}")]
    Output {
        /// Folder.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Why a session was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// `flamewatch record`.
    OnDemand,
}

impl SessionKind {
    /// Name used in summaries and ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnDemand => "on-demand",
        }
    }
}

/// A written report.
#[derive(Debug, Clone)]
pub struct Report {
    /// The summary (also written as JSON).
    pub summary: summary::Summary,
}

/// `20261122T031500Z` for file names and ids.
pub fn compact_timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace(['-', ':'], "")
}

/// Per-target state kept during the session.
struct Tracked {
    target: Target,
    threads_at_start: usize,
    exited_after: Option<Duration>,
    thread_names: HashMap<u32, String>,
    governor: Governor,
    claim: budget::Claim,
    /// Counters at the end of the previous interval.
    last_cpu_ns: u64,
    last_samples: u64,
    last_dwarf_samples: u64,
    /// Session totals for the summary.
    overhead_ns: f64,
    cpu_ns: u64,
    max_pct: f64,
    hz_seconds: f64,
    covered_s: f64,
    paused_s: f64,
    timeline: Vec<summary::TimelinePoint>,
}

/// Live progress: a rewritten status line on a terminal, else a log line
/// every few seconds.
struct Progress {
    tty: bool,
    last_log: Instant,
}

impl Progress {
    fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last_log: Instant::now(),
        }
    }

    fn update(&mut self, elapsed: Duration, limit: Option<Duration>, samples: u64, hz: &str, pct: f64) {
        let limit = limit.map_or_else(|| "∞".to_owned(), |d| format!("{:.0}s", d.as_secs_f64()));
        let line = format!(
            "recording {:.0}s / {limit}  samples {samples}  rate {hz} Hz  overhead {pct:.2}%",
            elapsed.as_secs_f64()
        );
        if self.tty {
            eprint!("\r\x1b[K{line}");
            let _ = std::io::stderr().flush();
        } else if self.last_log.elapsed() >= Duration::from_secs(5) {
            self.last_log = Instant::now();
            info!("{line}");
        }
    }

    fn finish(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

/// Name of the sampling program (for its run-time statistics).
const SAMPLE_PROG: &str = "flamewatch_sample";

/// Runs one recording session over `targets` until `config.duration`
/// elapses, `stop` turns true, or every target has exited.
pub async fn record(
    config: &RecordConfig,
    targets: Vec<Target>,
    kind: SessionKind,
    mut stop: watch::Receiver<bool>,
) -> Result<Vec<Report>, SessionError> {
    std::fs::create_dir_all(&config.output).map_err(|source| SessionError::Output {
        path: config.output.clone(),
        source,
    })?;
    let started_at = SystemTime::now();
    let registry = budget::Registry::system();
    // Refuse before touching anything when other sessions use the budget.
    let mut budgets = HashMap::new();
    for t in &targets {
        budgets.insert(t.pid, registry.available(t.pid, config.max_overhead_pct)?);
    }
    let base_period_ns = period_for(config.freq_hz);
    let mut maps = MapsCache::default();
    for t in &targets {
        // Mappings first: a target that exits at once is still symbolized.
        let _ = maps.capture(t.pid);
    }
    let choices: HashMap<u32, unwind::Choice> = targets
        .iter()
        .map(|t| (t.pid, unwind::choose(config.unwind, t.pid)))
        .collect();
    let any_dwarf = choices.values().any(|c| c.dwarf);
    let _stats = BpfStats::enable();
    let mut ebpf = bpf::load(any_dwarf)?;
    let mut sampler = Sampler::new(&mut ebpf)?;
    sampler.set_stack_window(config.stack_window)?;
    let consumer = if any_dwarf {
        let ring = ebpf
            .take_map("STACK_SAMPLES")
            .ok_or(bpf::BpfError::MissingMap("STACK_SAMPLES"))?;
        let ring = aya::maps::RingBuf::try_from(ring).map_err(|source| bpf::BpfError::Map {
            name: "STACK_SAMPLES",
            source,
        })?;
        Some(Consumer::start(ring).map_err(|source| SessionError::Output {
            path: "unwinder thread".into(),
            source,
        })?)
    } else {
        None
    };
    let prog_stats = |ebpf: &aya::Ebpf| cost::program_stats(ebpf).remove(SAMPLE_PROG).unwrap_or_default();
    let calibration =
        tokio::task::block_in_place(|| calibrate::calibration(sampler.prog_fd(), || prog_stats(&ebpf)));

    let mut tracked = Vec::new();
    for t in targets {
        let mut governor = Governor::new(GovernorConfig {
            budget_pct: budgets[&t.pid],
            ceiling_hz: config.freq_hz,
            min_hz: 1,
        });
        let hz = governor.start_with_estimate(calibration.cost_per_hz_pct());
        if hz < config.freq_hz {
            info!(
                pid = t.pid,
                "starting at {hz} Hz: {} Hz is predicted over the {:.1} % budget",
                config.freq_hz,
                governor.budget_pct()
            );
        }
        let session_id = session_id(kind, started_at, t.pid);
        let choice = &choices[&t.pid];
        let threads = sampler.add_target(&t, config.kernel_stacks, choice.dwarf, period_for(hz))?;
        info!(pid = t.pid, comm = %t.comm, threads, "sampling at {hz} Hz, unwinding with {}: {}",
              if choice.dwarf { "DWARF" } else { "frame pointers" }, choice.reason);
        tracked.push(Tracked {
            claim: registry.claim(t.pid, &session_id, hz),
            target: t,
            threads_at_start: threads,
            exited_after: None,
            thread_names: HashMap::new(),
            governor,
            last_cpu_ns: 0,
            last_samples: 0,
            last_dwarf_samples: 0,
            overhead_ns: 0.0,
            cpu_ns: 0,
            max_pct: 0.0,
            hz_seconds: 0.0,
            covered_s: 0.0,
            paused_s: 0.0,
            timeline: Vec::new(),
        });
    }

    let start = Instant::now();
    let mut raw = RawProfile::default();
    let mut progress = Progress::new();
    let mut last_tick = Instant::now();
    let mut last_prog = prog_stats(&ebpf);
    let mut last_agent_cpu = cost::process_cpu_ns();
    let mut last_unwind_cpu = 0u64;
    let (mut housekeeping_ns, mut bpf_run) = (0u64, cost::ProgStats::default());
    loop {
        let remaining = config.duration.map(|d| d.saturating_sub(start.elapsed()));
        if remaining.is_some_and(|r| r.is_zero()) {
            break;
        }
        let wait = remaining.map_or(config.drain_interval, |r| r.min(config.drain_interval));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {
                info!("stopping on signal");
                break;
            }
        }
        let mut processing_ns = 0;
        cost::timed(&mut processing_ns, || sampler.drain(&mut raw))?;
        let dt = last_tick.elapsed().as_secs_f64();
        last_tick = Instant::now();
        let prog = prog_stats(&ebpf);
        let prog_delta = prog.since(last_prog);
        last_prog = prog;
        bpf_run.run_ns += prog_delta.run_ns;
        bpf_run.runs += prog_delta.runs;
        // The unwinder's CPU time grows with the DWARF sampling rate.
        let unwind_cpu = consumer.as_ref().map_or(0, |c| {
            c.shared().cpu_ns.load(std::sync::atomic::Ordering::Relaxed)
        });
        let unwind_ns = unwind_cpu.saturating_sub(last_unwind_cpu);
        last_unwind_cpu = unwind_cpu;
        let agent_cpu = cost::process_cpu_ns();
        housekeeping_ns += agent_cpu
            .saturating_sub(last_agent_cpu)
            .saturating_sub(processing_ns + unwind_ns);
        last_agent_cpu = agent_cpu;

        // Samples of each target this interval (for attributing shared costs).
        let interval: Vec<(u64, u64, u64)> = tracked
            .iter()
            .map(|t| {
                let st = sampler.target_stats(t.target.pid).unwrap_or_default();
                let dwarf = st.dwarf_samples.saturating_sub(t.last_dwarf_samples);
                (st.samples.saturating_sub(t.last_samples), st.samples, dwarf)
            })
            .collect();
        let all_samples: u64 = interval.iter().map(|(d, _, _)| d).sum::<u64>().max(1);
        let all_dwarf: u64 = interval.iter().map(|(_, _, d)| d).sum::<u64>().max(1);
        let elapsed = start.elapsed().as_secs_f64();
        let mut status = (0u64, Vec::new(), 0.0f64);
        for (t, (samples, total_samples, dwarf_samples)) in tracked.iter_mut().zip(interval) {
            t.last_dwarf_samples += dwarf_samples;
            if t.exited_after.is_some() {
                continue;
            }
            let pid = t.target.pid;
            let cpu = sampler.target_cpu_ns(pid);
            let cpu_delta = cpu.saturating_sub(t.last_cpu_ns);
            t.last_cpu_ns = cpu;
            t.last_samples = total_samples;
            let hz = t.governor.hz();
            let c = cost::overhead(
                IntervalInput {
                    target_cpu_ns: cpu_delta,
                    samples,
                    bpf_ns: (samples as f64 * prog_delta.mean_ns()) as u64,
                    processing_ns: processing_ns * samples / all_samples
                        + unwind_ns * dwarf_samples / all_dwarf,
                },
                calibration.interrupt_ns,
            );
            t.overhead_ns += (c.bpf_ns + c.interrupt_ns + c.processing_ns) as f64;
            t.cpu_ns += cpu_delta;
            t.max_pct = t.max_pct.max(c.overhead_pct);
            t.hz_seconds += hz as f64 * dt;
            t.covered_s += dt;
            if hz == 0 {
                t.paused_s += dt;
            }
            t.timeline.push(summary::TimelinePoint {
                t: round3(elapsed),
                hz,
                pct: round3(c.overhead_pct),
            });
            status.0 += total_samples;
            status.1.push(hz.to_string());
            status.2 = status.2.max(c.overhead_pct);

            if !t.target.is_alive() {
                let after = start.elapsed();
                warn!(
                    pid,
                    "target exited after {:.1} s; reporting what was collected",
                    after.as_secs_f64()
                );
                t.exited_after = Some(after);
                sampler.remove_target(pid);
                continue;
            }
            let _ = maps.capture(pid);
            if config.per_thread {
                remember_thread_names(t);
            }
            // Other sessions on this target may have started or ended.
            if let Ok(available) = registry.available(pid, config.max_overhead_pct) {
                t.governor.set_budget(available);
            }
            let decision = t.governor.observe(Observation {
                hz,
                overhead_pct: c.overhead_pct,
                target_cpu_ns: cpu_delta,
            });
            apply(&mut sampler, t, decision, hz, c.overhead_pct)?;
            t.claim.update(round3(c.overhead_pct), t.governor.hz());
        }
        progress.update(
            start.elapsed(),
            config.duration,
            status.0,
            &status.1.join(","),
            status.2,
        );
        if tracked.iter().all(|t| t.exited_after.is_some()) {
            break;
        }
    }
    progress.finish();
    let elapsed = start.elapsed();

    sampler.drain_all(&mut raw)?;
    let child_process_samples = sampler.foreign_samples();
    let stats: HashMap<u32, _> = tracked
        .iter()
        .filter_map(|t| Some((t.target.pid, sampler.target_stats(t.target.pid)?)))
        .collect();
    // Detach before the (CPU-heavy) symbolization: the targets stop paying now.
    drop(sampler);
    let (unwind_stats, unwinder_cpu_ns) = match consumer {
        Some(c) => {
            let shared = c.shared().clone();
            let rest = tokio::task::block_in_place(|| c.finish());
            raw.merge(rest);
            let stats = shared.stats.lock().map(|s| s.clone()).unwrap_or_default();
            (stats, shared.cpu_ns.load(std::sync::atomic::Ordering::Relaxed))
        }
        None => (HashMap::new(), 0),
    };
    drop(ebpf);

    let pids: Vec<u32> = tracked.iter().map(|t| t.target.pid).collect();
    let symbols = tokio::task::block_in_place(|| symbolize::symbolize(&raw, &maps, &pids));
    let agent_cpu_pct = round3(100.0 * housekeeping_ns as f64 / elapsed.as_nanos().max(1) as f64);

    let mut reports = Vec::new();
    for t in &tracked {
        let pid = t.target.pid;
        let label = config.label.clone().unwrap_or_else(|| sanitize(&t.target.comm));
        let stem = format!("{label}-{pid}-{}", compact_timestamp(started_at));
        let opts = BuildOptions {
            process_name: t.target.comm.clone(),
            per_thread: config.per_thread,
            thread_names: t.thread_names.clone(),
        };
        let profile = Profile::build(&raw, pid, &symbols, &opts);
        let duration = t.exited_after.unwrap_or(elapsed);
        let st = stats.get(&pid).copied().unwrap_or_default();
        let mut warnings = Vec::new();
        if let Some(after) = t.exited_after {
            warnings.push(format!(
                "target exited after {:.1} s; the report covers that time",
                after.as_secs_f64()
            ));
        }
        if st.map_full > 0 {
            warnings.push(format!("{} samples lost: aggregation map full", st.map_full));
        }
        let collisions = st.user_stack_collisions + st.kernel_stack_collisions;
        if collisions > 0 {
            warnings.push(format!(
                "{collisions} stacks lost to stack-map collisions (shown as [lost … stack])"
            ));
        }
        if t.paused_s > 0.0 {
            warnings.push(format!(
                "sampling was paused for {:.0} s: even 1 Hz cost more than the {:.1} % budget",
                t.paused_s, config.max_overhead_pct
            ));
        }
        let overhead = summary::OverheadInfo {
            budget_pct: config.max_overhead_pct,
            measured_pct: round3(if t.cpu_ns == 0 {
                0.0
            } else {
                100.0 * t.overhead_ns / t.cpu_ns as f64
            }),
            max_pct: round3(t.max_pct),
            agent_cpu_pct,
            interrupt_ns_per_sample: calibration.interrupt_ns.round(),
            bpf_ns_per_sample: bpf_run.mean_ns().round(),
            paused_s: round3(t.paused_s),
            timeline: t.timeline.clone(),
        };
        let effective_hz = if t.covered_s > 0.0 {
            round3(t.hz_seconds / t.covered_s)
        } else {
            t.governor.hz() as f64
        };
        let report = write_report(
            &config.output,
            &stem,
            &t.target,
            &profile,
            ReportMeta {
                kind,
                started_at,
                duration,
                requested_hz: config.freq_hz,
                effective_hz,
                base_period_ns,
                kernel_stacks: config.kernel_stacks,
                per_thread: config.per_thread,
                threads_at_start: t.threads_at_start,
                child_process_samples,
                lost_samples: st.map_full,
                stack_errors: summary::StackErrors {
                    user_collisions: st.user_stack_collisions,
                    user_errors: st.user_stack_errors,
                    kernel_collisions: st.kernel_stack_collisions,
                    kernel_errors: st.kernel_stack_errors,
                },
                unwind: {
                    let choice = &choices[&pid];
                    let u = unwind_stats.get(&pid).copied().unwrap_or_default();
                    summary::UnwindInfo {
                        mode: if choice.dwarf { "dwarf" } else { "fp" }.into(),
                        requested: format!("{:?}", config.unwind).to_lowercase(),
                        reason: choice.reason.clone(),
                        executable: choice.executable.clone(),
                        stack_window: config.stack_window,
                        dwarf_samples: u.samples,
                        complete: u.complete,
                        truncated_window: u.truncated_window,
                        truncated_error: u.truncated_error,
                        no_user_stack: u.no_user_stack,
                        lost: st.dwarf_lost,
                        // Shared by the DWARF targets in proportion to their samples.
                        unwinder_cpu_s: round3(
                            unwinder_cpu_ns as f64 / 1e9 * u.samples as f64
                                / unwind_stats.values().map(|s| s.samples).sum::<u64>().max(1) as f64,
                        ),
                    }
                },
                overhead,
                top_n: config.top_functions,
                warnings,
            },
        )?;
        reports.push(report);
    }
    Ok(reports)
}

/// Carries out a governor decision, logging each change of rate.
fn apply(
    sampler: &mut Sampler,
    t: &Tracked,
    decision: Decision,
    was: u64,
    pct: f64,
) -> Result<(), SessionError> {
    let pid = t.target.pid;
    let budget = t.governor.budget_pct();
    match decision {
        Decision::Keep => {}
        Decision::SetRate(hz) => {
            info!(
                pid,
                "sampling rate {was} -> {hz} Hz (overhead {pct:.2} %, budget {budget:.1} %)"
            );
            sampler.set_period(pid, period_for(hz))?;
        }
        Decision::Pause => {
            warn!(
                pid,
                "pausing sampling: even {was} Hz costs {pct:.2} % (budget {budget:.1} %); will probe again"
            );
            sampler.pause(pid);
        }
        Decision::Resume(hz) => {
            info!(pid, "resuming sampling at {hz} Hz to measure the cost again");
            sampler.resume(pid, period_for(hz))?;
        }
    }
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `<kind>_<UTC timestamp>_<pid>`.
pub fn session_id(kind: SessionKind, started_at: SystemTime, pid: u32) -> String {
    format!("{}_{}_{}", kind.as_str(), compact_timestamp(started_at), pid)
}

fn remember_thread_names(t: &mut Tracked) {
    if let Ok(tids) = target::threads(t.target.pid) {
        for tid in tids {
            if let std::collections::hash_map::Entry::Vacant(e) = t.thread_names.entry(tid) {
                if let Some(name) = target::thread_comm(t.target.pid, tid) {
                    e.insert(name);
                }
            }
        }
    }
}

/// Everything about a report that is not the profile itself.
pub struct ReportMeta {
    /// Session kind.
    pub kind: SessionKind,
    /// Wall-clock start.
    pub started_at: SystemTime,
    /// Length covered.
    pub duration: Duration,
    /// Requested rate.
    pub requested_hz: u64,
    /// Time-weighted mean rate.
    pub effective_hz: f64,
    /// Period of the requested rate (the unit of folded counts).
    pub base_period_ns: u64,
    /// Kernel stacks on.
    pub kernel_stacks: bool,
    /// Per-thread towers.
    pub per_thread: bool,
    /// Threads attached at start.
    pub threads_at_start: usize,
    /// Samples of forked children of the targets.
    pub child_process_samples: u64,
    /// Samples lost before aggregation.
    pub lost_samples: u64,
    /// Stack errors.
    pub stack_errors: summary::StackErrors,
    /// Unwinding.
    pub unwind: summary::UnwindInfo,
    /// Cost and governor timeline.
    pub overhead: summary::OverheadInfo,
    /// Length of `top_functions`.
    pub top_n: usize,
    /// Warnings for the summary.
    pub warnings: Vec<String>,
}

/// Writes `<stem>.folded`, `.svg` and `.json` into `dir`.
pub fn write_report(
    dir: &Path,
    stem: &str,
    target: &Target,
    profile: &Profile,
    meta: ReportMeta,
) -> Result<Report, SessionError> {
    let total = profile.total();
    let duration_s = (meta.duration.as_secs_f64() * 1000.0).round() / 1000.0;
    let folded_text = folded::render(profile, meta.base_period_ns);
    let title = flamegraph::Title {
        title: format!("{} (pid {}): on-CPU", target.comm, target.pid),
        subtitle: format!(
            "{} session, {:.1} s at {:.0} Hz (requested {}), {} samples, overhead {:.2} %",
            meta.kind.as_str(),
            duration_s,
            meta.effective_hz,
            meta.requested_hz,
            total.samples,
            meta.overhead.measured_pct
        ),
        count_name: "samples".into(),
    };
    let svg = flamegraph::render(&folded_text, &title, false)?;
    let path = |ext: &str| dir.join(format!("{stem}.{ext}"));
    let files = summary::Files {
        svg: path("svg").display().to_string(),
        folded: path("folded").display().to_string(),
        json: path("json").display().to_string(),
    };
    render::write_file(&path("folded"), folded_text.as_bytes())?;
    render::write_file(&path("svg"), &svg)?;
    let summary = summary::Summary {
        version: summary::VERSION,
        session: summary::SessionInfo {
            id: format!(
                "{}_{}_{}",
                meta.kind.as_str(),
                compact_timestamp(meta.started_at),
                target.pid
            ),
            kind: meta.kind.as_str().to_owned(),
            started_at: humantime::format_rfc3339_seconds(meta.started_at).to_string(),
            duration_s,
        },
        targets: vec![target.clone()],
        sampling: summary::SamplingInfo {
            requested_hz: meta.requested_hz,
            effective_hz: meta.effective_hz,
            samples: total.samples,
            lost_samples: meta.lost_samples,
            sampled_cpu_s: (total.period_ns as f64 / 1e6).round() / 1e3,
            kernel_stacks: meta.kernel_stacks,
            per_thread: meta.per_thread,
            threads_at_start: meta.threads_at_start,
            child_process_samples: meta.child_process_samples,
            stack_errors: meta.stack_errors,
            unwind: meta.unwind,
        },
        overhead: meta.overhead,
        top_functions: profile.top_functions(meta.top_n),
        files,
        warnings: meta.warnings,
    };
    render::write_file(
        &path("json"),
        summary.to_json().map_err(RenderError::from)?.as_bytes(),
    )?;
    Ok(Report { summary })
}

/// Keeps a comm usable as a file name.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_owned();
    if s.is_empty() {
        "target".to_owned()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that file-name timestamps are compact UTC.
    #[test]
    fn timestamps() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_317_300);
        assert_eq!(compact_timestamp(t), "20261122T031500Z");
    }

    /// Test that process names are made safe for file names.
    #[test]
    fn sanitize_names() {
        assert_eq!(sanitize("logcaster"), "logcaster");
        assert_eq!(sanitize("kworker/0:1"), "kworker_0_1");
        assert_eq!(sanitize("..x"), "x");
        assert_eq!(sanitize(""), "target");
    }
}

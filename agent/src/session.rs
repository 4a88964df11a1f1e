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

use crate::tcp::{summary::TcpSummary, TcpOptions, TcpTracker};
use crate::{
    aggregate::{frames_for, BuildOptions, Profile, RawProfile},
    bpf,
    config::RecordConfig,
    config::{Format, Mode},
    governor::{
        budget, calibrate,
        cost::{self, BpfStats, IntervalInput},
        Decision, Governor, GovernorConfig, Observation,
    },
    offcpu::{self, OffCpuTracer},
    render::{self, flamegraph, folded, pprof, summary, RenderError},
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
    /// Off-CPU tracing failed.
    #[error(transparent)]
    OffCpu(#[from] offcpu::OffCpuError),
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
    /// `flamewatch record`, or `flamewatch trigger` to a daemon.
    OnDemand,
    /// From a schedule (a baseline).
    Scheduled,
    /// Started by an alert.
    Emergency,
}

impl SessionKind {
    /// Name used in summaries and ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnDemand => "on-demand",
            Self::Scheduled => "scheduled",
            Self::Emergency => "emergency",
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
    /// Off-CPU program time on this target's switches, at the last interval.
    last_off_prog_ns: u64,
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

/// Running sessions' latest interval, by target pid: what the daemon's
/// Prometheus metrics show while a session runs.
static LIVE: std::sync::Mutex<Option<HashMap<u32, crate::export::SessionView>>> = std::sync::Mutex::new(None);

/// The latest interval of every running session, by target pid.
pub fn live() -> HashMap<u32, crate::export::SessionView> {
    LIVE.lock()
        .map(|l| l.clone().unwrap_or_default())
        .unwrap_or_default()
}

fn publish(pid: u32, view: Option<crate::export::SessionView>) {
    if let Ok(mut live) = LIVE.lock() {
        let map = live.get_or_insert_with(HashMap::new);
        match view {
            Some(v) => map.insert(pid, v),
            None => map.remove(&pid),
        };
    }
}

/// Name of the sampling program (for its run-time statistics).
const SAMPLE_PROG: &str = "flamewatch_sample";
/// Name of the off-CPU program.
const OFFCPU_PROG: &str = "flamewatch_offcpu";

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
    // Until our claims are written, sessions starting now wait for us.
    let admission = registry.admit().await;
    let mut budgets = HashMap::new();
    for t in &targets {
        budgets.insert(t.pid, registry.available(t.pid, config.max_overhead_pct, None)?);
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
    // TCP state tracking for the summary's `tcp` section. Not essential to a
    // profile: if it cannot attach, say why and profile without it.
    let mut tcp = TcpTracker::new(&mut ebpf, TcpOptions::default())
        .inspect_err(|e| warn!("TCP tracking unavailable: {e}"))
        .ok();
    let (mut last_tcp_prog, mut last_tcp_processing) = (cost::ProgStats::default(), 0u64);
    let mut last_tcp_events = HashMap::<u32, u64>::new();
    sampler.set_stack_window(config.stack_window)?;
    let mut offcpu = if config.mode.off_cpu() {
        Some(OffCpuTracer::attach(
            &mut ebpf,
            config.min_block.as_nanos() as u64,
        )?)
    } else {
        None
    };
    // The consumer unwinds DWARF samples and joins off-CPU begins with ends.
    let consumer = if any_dwarf || offcpu.is_some() {
        let ring = ebpf
            .take_map("STACK_SAMPLES")
            .ok_or(bpf::BpfError::MissingMap("STACK_SAMPLES"))?;
        let ring = aya::maps::RingBuf::try_from(ring).map_err(|source| bpf::BpfError::Map {
            name: "STACK_SAMPLES",
            source,
        })?;
        // DWARF targets' off-CPU blocks end in their own ring.
        let ends = match offcpu {
            Some(_) => {
                let map = ebpf
                    .take_map("OFFCPU_ENDS")
                    .ok_or(bpf::BpfError::MissingMap("OFFCPU_ENDS"))?;
                Some(
                    aya::maps::RingBuf::try_from(map).map_err(|source| bpf::BpfError::Map {
                        name: "OFFCPU_ENDS",
                        source,
                    })?,
                )
            }
            None => None,
        };
        let min_block_ns = config.min_block.as_nanos() as u64;
        Some(
            Consumer::start(ring, ends, min_block_ns).map_err(|source| SessionError::Output {
                path: "unwinder thread".into(),
                source,
            })?,
        )
    } else {
        None
    };
    let prog_stats = |ebpf: &aya::Ebpf| cost::program_stats(ebpf).remove(SAMPLE_PROG).unwrap_or_default();
    let calibration = tokio::task::block_in_place(|| {
        sampler.as_calibration_target(|fd| calibrate::calibration(fd, || prog_stats(&ebpf)))
    });

    let mut tracked = Vec::new();
    let mut idle_at_start = HashMap::new();
    for t in targets {
        let mut governor = Governor::new(GovernorConfig {
            budget_pct: budgets[&t.pid],
            ceiling_hz: config.freq_hz,
            min_hz: 1,
        });
        let hz = governor.start_with_estimate(calibration.cost_per_hz_pct());
        // Reserved in our claim until the first interval measures it.
        let predicted_pct = if config.mode.on_cpu() {
            (hz as f64 * calibration.cost_per_hz_pct()).min(governor.budget_pct())
        } else {
            0.0
        };
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
        if let Some(Err(e)) = tcp.as_mut().map(|tcp| tcp.add_target(t.pid)) {
            warn!(pid = t.pid, "TCP tracking of this target failed: {e}");
        }
        let period = config.mode.on_cpu().then(|| period_for(hz));
        let threads = sampler.add_target(&t, config.kernel_stacks, choice.dwarf, period)?;
        if let Some(o) = offcpu.as_mut() {
            let (begins, idle) = o.add_target(t.pid, config.stack_window as usize)?;
            if let Some(Ok(mut seeded)) = consumer.as_ref().map(|c| c.shared().seeded.lock()) {
                seeded.extend(begins);
            }
            idle_at_start.extend(idle);
        }
        let cpu0 = sampler.target_cpu_ns(t.pid);
        let what = match config.mode {
            Mode::Cpu => format!("sampling at {hz} Hz"),
            Mode::Offcpu => "tracing off-CPU time".to_owned(),
            Mode::Wall => format!("sampling at {hz} Hz and tracing off-CPU time"),
        };
        info!(pid = t.pid, comm = %t.comm, threads, "{what}, unwinding with {}: {}",
              if choice.dwarf { "DWARF" } else { "frame pointers" }, choice.reason);
        tracked.push(Tracked {
            claim: registry.claim(t.pid, &session_id, predicted_pct, hz),
            target: t,
            threads_at_start: threads,
            exited_after: None,
            thread_names: HashMap::new(),
            governor,
            last_cpu_ns: cpu0,
            last_samples: 0,
            last_dwarf_samples: 0,
            last_off_prog_ns: 0,
            overhead_ns: 0.0,
            cpu_ns: 0,
            max_pct: 0.0,
            hz_seconds: 0.0,
            covered_s: 0.0,
            paused_s: 0.0,
            timeline: Vec::new(),
        });
    }
    drop(admission);

    let start = Instant::now();
    let start_mono_ns = cost::monotonic_ns();
    let mut raw = RawProfile::default();
    let mut off_raw = RawProfile::default();
    let off_prog_stats = |ebpf: &aya::Ebpf| cost::program_stats(ebpf).remove(OFFCPU_PROG).unwrap_or_default();
    let mut last_off_prog = off_prog_stats(&ebpf);
    let mut off_machine_ns = 0u64;
    let mut off_every = 1u64;
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
        if let Some(o) = offcpu.as_mut() {
            cost::timed(&mut processing_ns, || o.drain(&mut off_raw));
        }
        // The sched_switch program runs on every context switch of the
        // machine. Each target pays the run time on its own switches (the
        // program times that path); the rest runs for other processes and
        // is reported as the machine's cost.
        let off_prog = off_prog_stats(&ebpf);
        let off_ns = off_prog.since(last_off_prog).run_ns;
        last_off_prog = off_prog;
        let mut off_target_ns: HashMap<u32, u64> = HashMap::new();
        if let Some(o) = offcpu.as_ref() {
            for t in tracked.iter_mut() {
                let total = sampler.slot(t.target.pid).map_or(0, |slot| o.stats(slot).prog_ns);
                off_target_ns.insert(t.target.pid, total.saturating_sub(t.last_off_prog_ns));
                t.last_off_prog_ns = total;
            }
        }
        off_machine_ns += off_ns.saturating_sub(off_target_ns.values().sum());
        let dt = last_tick.elapsed().as_secs_f64();
        last_tick = Instant::now();
        let prog = prog_stats(&ebpf);
        let prog_delta = prog.since(last_prog);
        last_prog = prog;
        bpf_run.run_ns += prog_delta.run_ns;
        bpf_run.runs += prog_delta.runs;
        // The unwinder's CPU time grows with the DWARF sampling rate; the
        // one-time loading of unwind tables does not, and is housekeeping.
        let unwind_cpu = consumer.as_ref().map_or(0, |c| {
            let s = c.shared();
            let relaxed = std::sync::atomic::Ordering::Relaxed;
            s.cpu_ns.load(relaxed).saturating_sub(s.setup_ns.load(relaxed))
        });
        let unwind_ns = unwind_cpu.saturating_sub(last_unwind_cpu);
        last_unwind_cpu = unwind_cpu;
        let agent_cpu = cost::process_cpu_ns();
        housekeeping_ns += agent_cpu
            .saturating_sub(last_agent_cpu)
            .saturating_sub(processing_ns + unwind_ns);
        last_agent_cpu = agent_cpu;

        // TCP counters. Each target is charged, for its own TCP events, the
        // TCP programs' mean run time and the agent's event decoding.
        let (tcp_mean_ns, tcp_processing_ns) = tcp.as_mut().map_or((0.0, 0), |tcp| {
            if let Err(e) = tokio::task::block_in_place(|| tcp.poll()) {
                warn!("TCP tracking: {e}");
            }
            let (prog, _) = tcp.program_stats();
            let delta = prog.since(last_tcp_prog);
            last_tcp_prog = prog;
            let processing = tcp.processing_ns();
            let processing_delta = processing.saturating_sub(last_tcp_processing);
            last_tcp_processing = processing;
            (delta.mean_ns(), processing_delta)
        });
        // Charged to the targets below: not housekeeping as well.
        housekeeping_ns = housekeeping_ns.saturating_sub(tcp_processing_ns);
        let tcp_deltas: HashMap<u32, u64> = tracked
            .iter()
            .map(|t| {
                let pid = t.target.pid;
                let events = tcp.as_ref().map_or(0, |tcp| tcp.events(pid));
                (
                    pid,
                    events.saturating_sub(last_tcp_events.insert(pid, events).unwrap_or(0)),
                )
            })
            .collect();
        let all_tcp_events = tcp_deltas.values().sum::<u64>().max(1);

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
        let mut worst_off_pct = 0.0f64;
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
            // Without CPU sampling there is no rate to govern.
            let hz = if config.mode.on_cpu() { t.governor.hz() } else { 0 };
            let tcp_delta = tcp_deltas.get(&pid).copied().unwrap_or(0);
            let c = cost::overhead(
                IntervalInput {
                    target_cpu_ns: cpu_delta,
                    samples,
                    bpf_ns: (samples as f64 * prog_delta.mean_ns()) as u64
                        + (tcp_delta as f64 * tcp_mean_ns) as u64
                        + off_target_ns.get(&pid).copied().unwrap_or(0),
                    processing_ns: processing_ns * samples / all_samples
                        + unwind_ns * dwarf_samples / all_dwarf
                        + tcp_processing_ns * tcp_delta / all_tcp_events,
                },
                calibration.interrupt_ns,
            );
            t.overhead_ns += (c.bpf_ns + c.interrupt_ns + c.processing_ns) as f64;
            t.cpu_ns += cpu_delta;
            t.max_pct = t.max_pct.max(c.overhead_pct);
            t.hz_seconds += hz as f64 * dt;
            t.covered_s += dt;
            if hz == 0 && config.mode.on_cpu() {
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
                if let Some(o) = offcpu.as_mut() {
                    // The pid may be reused by an unrelated process.
                    o.remove_target(pid)?;
                }
                continue;
            }
            let _ = maps.capture(pid);
            // pprof labels every sample with its thread's name.
            if config.per_thread || config.mode == Mode::Wall || config.writes(Format::Pprof) {
                remember_thread_names(t);
            }
            // Other sessions on this target may have started or ended.
            if let Ok(available) = registry.available(pid, config.max_overhead_pct, Some(&t.claim)) {
                t.governor.set_budget(available);
            }
            if config.mode.on_cpu() {
                let decision = t.governor.observe(Observation {
                    hz,
                    overhead_pct: c.overhead_pct,
                    target_cpu_ns: cpu_delta,
                });
                apply(&mut sampler, t, decision, hz, c.overhead_pct)?;
            }
            if cpu_delta >= crate::governor::MIN_SIGNAL_CPU_NS {
                let off = off_target_ns.get(&pid).copied().unwrap_or(0);
                worst_off_pct = worst_off_pct.max(100.0 * off as f64 / cpu_delta as f64);
            }
            t.claim.update(round3(c.overhead_pct), t.governor.hz());
            let lost = sampler.target_stats(pid).map_or(0, |s| s.map_full + s.dwarf_lost);
            publish(
                pid,
                Some(crate::export::SessionView {
                    overhead_pct: c.overhead_pct,
                    hz: hz as f64,
                    lost_samples: lost,
                }),
            );
        }
        if let Some(o) = offcpu.as_mut() {
            // Off-CPU cost grows with how often the targets block: trace 1
            // switch-out in N. Off-CPU may use the budget alone (offcpu
            // mode) or half of it (wall mode, beside CPU sampling).
            let budget = tracked
                .iter()
                .map(|t| t.governor.budget_pct())
                .fold(f64::MAX, f64::min);
            let share = if config.mode == Mode::Offcpu {
                budget
            } else {
                budget / 2.0
            };
            let next = offcpu_every(off_every, worst_off_pct, share);
            if next != off_every {
                info!(
                    "off-CPU tracing costs {worst_off_pct:.2} % (share of budget {share:.1} %): \
                       recording 1 switch-out in {next}"
                );
                o.set_sample_every(next)?;
                off_every = next;
            }
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
    for t in &tracked {
        publish(t.target.pid, None);
    }
    // TCP counters and TIME_WAIT now at the very end, then detach.
    let tcp_summaries: HashMap<u32, TcpSummary> = tcp.as_mut().map_or_else(HashMap::new, |tcp| {
        if let Err(e) = tokio::task::block_in_place(|| tcp.poll()) {
            warn!("TCP tracking: {e}");
        }
        tracked
            .iter()
            .filter_map(|t| Some((t.target.pid, tcp.summary(t.target.pid)?)))
            .collect()
    });
    if let Some(tcp) = tcp {
        tcp.detach(&mut ebpf);
    }

    sampler.drain_all(&mut raw)?;
    let pids: Vec<u32> = tracked.iter().map(|t| t.target.pid).collect();
    let off_stats: HashMap<u32, flamewatch_common::offcpu::OffStats> =
        offcpu.as_ref().map_or_else(HashMap::new, |o| {
            pids.iter()
                .filter_map(|&pid| Some((pid, o.stats(sampler.slot(pid)?))))
                .collect()
        });
    if let Some(o) = offcpu.as_mut() {
        o.drain(&mut off_raw);
    }
    let child_process_samples = sampler.foreign_samples();
    let stats: HashMap<u32, _> = tracked
        .iter()
        .filter_map(|t| Some((t.target.pid, sampler.target_stats(t.target.pid)?)))
        .collect();
    let mut leaf_stats: HashMap<u32, _> = pids.iter().map(|&pid| (pid, sampler.leaf_stats(pid))).collect();
    // Detach before the (CPU-heavy) symbolization: the targets stop paying now.
    drop(sampler);
    let (unwind_stats, unwinder_cpu_ns, mut begins) = match consumer {
        Some(c) => {
            let shared = c.shared().clone();
            let rest = tokio::task::block_in_place(|| c.finish());
            raw.merge(rest.cpu);
            off_raw.merge(rest.off);
            let stats = shared.stats.lock().map(|s| s.clone()).unwrap_or_default();
            (
                stats,
                shared.cpu_ns.load(std::sync::atomic::Ordering::Relaxed),
                rest.begins,
            )
        }
        None => (HashMap::new(), 0, Default::default()),
    };
    // Threads still blocked now: their time so far counts, and they are
    // listed (a deadlock shows here, even with no switch at all).
    let still_blocked = offcpu.as_ref().map_or_else(Vec::new, |o| {
        let now = cost::monotonic_ns();
        tokio::task::block_in_place(|| {
            offcpu::still_blocked(
                o,
                &mut begins,
                &pids,
                &idle_at_start,
                (start_mono_ns, now),
                config.min_block.as_nanos() as u64,
                config.stack_window as usize,
                &mut off_raw,
            )
        })
    });
    for (pid, st) in leaf_stats.iter_mut() {
        *st += offcpu.as_ref().map(|o| o.leaf_stats(*pid)).unwrap_or_default();
    }
    drop(offcpu);
    drop(ebpf);

    let mut all_raw = raw.clone();
    all_raw.merge(off_raw.clone());
    let want_pprof = config.writes(Format::Pprof);
    let symbols = tokio::task::block_in_place(|| symbolize::symbolize(&all_raw, &maps, &pids));
    let kernel_image = want_pprof.then(symbolize::kernel_image).unwrap_or_default();
    let agent_cpu_pct = round3(100.0 * housekeeping_ns as f64 / elapsed.as_nanos().max(1) as f64);

    let mut reports = Vec::new();
    for t in &tracked {
        let pid = t.target.pid;
        let label = config.label.clone().unwrap_or_else(|| sanitize(&t.target.comm));
        let stem = format!("{label}-{pid}-{}", compact_timestamp(started_at));
        let mut thread_names = t.thread_names.clone();
        for b in still_blocked.iter().filter(|b| b.pid == pid) {
            thread_names.entry(b.tid).or_insert_with(|| b.comm.clone());
        }
        let opts = BuildOptions {
            process_name: t.target.comm.clone(),
            // Wall profiles answer "what did each thread spend its time on".
            per_thread: config.per_thread || config.mode == Mode::Wall,
            thread_names,
            leaf_marker: None,
        };
        let profile = match config.mode {
            Mode::Cpu => Profile::build(&raw, pid, &symbols, &opts),
            Mode::Offcpu => Profile::build(&off_raw, pid, &symbols, &opts),
            Mode::Wall => {
                let mut p = Profile::build(&raw, pid, &symbols, &opts);
                let marked = BuildOptions {
                    leaf_marker: Some("[off-cpu]".into()),
                    ..opts.clone()
                };
                p.add_raw(&off_raw, pid, &symbols, &marked);
                p
            }
        };
        let off_cpu = config.mode.off_cpu().then(|| {
            let os = off_stats.get(&pid).copied().unwrap_or_default();
            let blocked_threads = still_blocked
                .iter()
                .filter(|b| b.pid == pid)
                .map(|b| summary::BlockedThreadInfo {
                    tid: b.tid,
                    comm: b.comm.clone(),
                    state: b.state.to_string(),
                    wchan: b.wchan.clone(),
                    blocked_s: round3(b.blocked_s),
                    since: if b.before_session {
                        "before session"
                    } else {
                        "session"
                    }
                    .into(),
                    stack: frames_for(
                        &b.key,
                        &symbols,
                        &BuildOptions {
                            per_thread: false,
                            ..opts.clone()
                        },
                    )
                    .iter()
                    .skip(1)
                    .map(|f| f.to_string())
                    .collect(),
                })
                .collect();
            let in_profile = Profile::build(&off_raw, pid, &symbols, &opts).total();
            summary::OffCpuInfo {
                // Shared by the session's targets; the same figure in each report.
                other_processes_cpu_pct: round3(
                    100.0 * off_machine_ns as f64 / elapsed.as_nanos().max(1) as f64,
                ),
                min_block_us: config.min_block.as_secs_f64() * 1e6,
                blocks: in_profile.samples,
                blocked_s: round3(in_profile.period_ns as f64 / 1e9),
                short_blocks: os.short,
                sample_every: off_every,
                lost: os.lost + os.start_full,
                blocked_threads,
            }
        });
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
        let stack_errors = st.user_stack_errors + st.kernel_stack_errors;
        if stack_errors > 0 {
            warnings.push(format!(
                "{stack_errors} stacks could not be read by the kernel (counted in sampling.stack_errors)"
            ));
        }
        if st.dwarf_lost > 0 {
            warnings.push(format!(
                "{} DWARF samples lost: the stack ring buffer was full (the agent fell behind)",
                st.dwarf_lost
            ));
        }
        warnings.extend(leaf_stats[&pid].warning());
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
        let pprof = if want_pprof {
            let profile = pprof::build(&pprof::Input {
                pid,
                exe: t.target.exe.as_deref(),
                mode: config.mode,
                cpu: &raw,
                off_cpu: &off_raw,
                symbols: &symbols,
                maps: &maps,
                kernel: &kernel_image,
                thread_names: &opts.thread_names,
                started_at,
                duration,
                period_ns: base_period_ns,
                comments: vec![
                    format!("flamewatch {}", env!("CARGO_PKG_VERSION")),
                    format!(
                        "{} (pid {pid}), {} session {}, mode {}, requested {} Hz, effective {effective_hz} Hz",
                        t.target.comm,
                        kind.as_str(),
                        session_id(kind, started_at, pid),
                        format!("{:?}", config.mode).to_lowercase(),
                        config.freq_hz,
                    ),
                ],
            });
            Some(pprof::encode(&profile)?)
        } else {
            None
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
                        leaf_checked: leaf_stats[&pid].checked,
                        leaf_fixups: leaf_stats[&pid].fixups,
                        mid_stack_gaps: leaf_stats[&pid].mid_stack_gaps,
                        leaf_rbp_reused: leaf_stats[&pid].rbp_reused,
                    }
                },
                overhead,
                mode: config.mode,
                cpu_weight: Profile::build(&raw, pid, &symbols, &opts).total(),
                off_cpu,
                top_n: config.top_functions,
                warnings,
                tcp: tcp_summaries.get(&pid).cloned(),
                formats: config.formats.clone(),
                pprof,
            },
        )?;
        reports.push(report);
    }
    // The folder's index.html lists every session in it, this one included.
    // A convenience: failing to write it does not fail the session.
    if let Err(e) = render::html::refresh(&config.output) {
        warn!("cannot write the index of {}: {e}", config.output.display());
    }
    Ok(reports)
}

/// Largest off-CPU sampling divisor.
const MAX_OFFCPU_EVERY: u64 = 1024;

/// The next 1-in-N off-CPU sampling: over its share of the budget, N grows
/// to the power of two predicted to land at 80 % of it (cost ∝ 1/N); well
/// under (40 %), N halves; in between it holds.
fn offcpu_every(every: u64, pct: f64, share: f64) -> u64 {
    if pct > share {
        let factor = (pct / (0.8 * share)).ceil().max(2.0) as u64;
        (every * factor.next_power_of_two()).min(MAX_OFFCPU_EVERY)
    } else if pct < 0.4 * share && every > 1 {
        every / 2
    } else {
        every
    }
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
    /// What the profile measures.
    pub mode: Mode,
    /// CPU samples of the target (and the CPU time they stand for).
    pub cpu_weight: crate::aggregate::Weight,
    /// Off-CPU summary.
    pub off_cpu: Option<summary::OffCpuInfo>,
    /// Length of `top_functions`.
    pub top_n: usize,
    /// Warnings for the summary.
    pub warnings: Vec<String>,
    /// TCP activity of the target (when TCP tracking was on).
    pub tcp: Option<TcpSummary>,
    /// Files to write.
    pub formats: Vec<Format>,
    /// The gzipped pprof profile, when [`Format::Pprof`] is asked for.
    pub pprof: Option<Vec<u8>>,
}

/// Writes the files of `meta.formats` into `dir`: `<stem>.folded`, `.svg`,
/// `.pb.gz` (pprof) and `.json`.
pub fn write_report(
    dir: &Path,
    stem: &str,
    target: &Target,
    profile: &Profile,
    meta: ReportMeta,
) -> Result<Report, SessionError> {
    let total = meta.cpu_weight;
    let duration_s = (meta.duration.as_secs_f64() * 1000.0).round() / 1000.0;
    // CPU profiles count samples (at the requested rate); off-CPU and wall
    // profiles count time, in microseconds.
    let (what, unit, base) = match meta.mode {
        Mode::Cpu => ("on-CPU", "samples", meta.base_period_ns),
        Mode::Offcpu => ("off-CPU (time blocked)", "µs", 1_000),
        Mode::Wall => ("wall clock (on- and off-CPU, per thread)", "µs", 1_000),
    };
    let folded_text = folded::render(profile, base);
    let rate = if meta.mode.on_cpu() {
        format!(
            " at {:.0} Hz (requested {}), {} samples",
            meta.effective_hz, meta.requested_hz, total.samples
        )
    } else {
        String::new()
    };
    let blocked = meta.off_cpu.as_ref().map_or_else(String::new, |o| {
        format!(", {:.1} s blocked in {} blocks", o.blocked_s, o.blocks)
    });
    let title = flamegraph::Title {
        title: format!("{} (pid {}): {what}", target.comm, target.pid),
        subtitle: format!(
            "{} session, {:.1} s{rate}{blocked}, overhead {:.2} %",
            meta.kind.as_str(),
            duration_s,
            meta.overhead.measured_pct
        ),
        count_name: unit.into(),
    };
    let path = |ext: &str| dir.join(format!("{stem}.{ext}"));
    let wants = |f: Format| meta.formats.contains(&f);
    // Paths of the files written; the others stay empty.
    let mut files = summary::Files::default();
    if wants(Format::Folded) {
        render::write_file(&path("folded"), folded_text.as_bytes())?;
        files.folded = path("folded").display().to_string();
    }
    if wants(Format::Svg) {
        let svg = flamegraph::render(&folded_text, &title, false)?;
        render::write_file(&path("svg"), &svg)?;
        files.svg = path("svg").display().to_string();
    }
    if let Some(bytes) = &meta.pprof {
        // `.pb.gz`, as `go tool pprof` names its own profiles.
        render::write_file(&path("pb.gz"), bytes)?;
        files.pprof = path("pb.gz").display().to_string();
    }
    if wants(Format::Json) {
        files.json = path("json").display().to_string();
    }
    let summary = summary::Summary {
        version: summary::VERSION,
        session: summary::SessionInfo {
            id: session_id(meta.kind, meta.started_at, target.pid),
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
        mode: format!("{:?}", meta.mode).to_lowercase(),
        off_cpu: meta.off_cpu,
        overhead: meta.overhead,
        top_functions: profile.top_functions(meta.top_n),
        tcp: meta.tcp,
        files,
        warnings: meta.warnings,
    };
    if wants(Format::Json) {
        render::write_file(
            &path("json"),
            summary.to_json().map_err(RenderError::from)?.as_bytes(),
        )?;
    }
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

    /// Test that off-CPU sampling backs off fast over budget, returns
    /// gently, and holds in between.
    #[test]
    fn offcpu_sampling_steps() {
        assert_eq!(offcpu_every(1, 67.0, 5.0), 32);
        assert_eq!(offcpu_every(32, 4.0, 5.0), 32);
        assert_eq!(offcpu_every(32, 1.0, 5.0), 16);
        assert_eq!(offcpu_every(1, 1.0, 5.0), 1);
        assert_eq!(offcpu_every(512, 90.0, 5.0), MAX_OFFCPU_EVERY);
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

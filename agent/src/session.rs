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
    render::{self, flamegraph, folded, summary, RenderError},
    sampling::{period_for, Sampler, SamplingError},
    symbolize::{self, MapsCache},
    target::{self, Target},
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
    /// `flamewatch record` or `flamewatch trigger`.
    OnDemand,
    /// From a schedule.
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
}

/// Live progress: a rewritten status line on a terminal, else a log line
/// every few seconds.
struct Progress {
    tty: bool,
    last_log: Instant,
}

impl Progress {
    fn new() -> Self {
        Self { tty: std::io::stderr().is_terminal(), last_log: Instant::now() }
    }

    fn update(&mut self, elapsed: Duration, limit: Option<Duration>, samples: u64, hz: u64) {
        let limit = limit.map_or_else(|| "∞".to_owned(), |d| format!("{:.0}s", d.as_secs_f64()));
        let line = format!(
            "recording {:.0}s / {limit}  samples {samples}  rate {hz} Hz",
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
    let period_ns = period_for(config.freq_hz);
    let mut maps = MapsCache::default();
    for t in &targets {
        // Mappings first: a target that exits at once is still symbolized.
        let _ = maps.capture(t.pid);
    }
    let mut ebpf = bpf::load()?;
    let mut sampler = Sampler::new(&mut ebpf, period_ns)?;
    let mut tracked = Vec::new();
    for t in targets {
        let threads = sampler.add_target(&t, config.kernel_stacks)?;
        info!(pid = t.pid, comm = %t.comm, threads, "sampling at {} Hz", config.freq_hz);
        tracked.push(Tracked { target: t, threads_at_start: threads, exited_after: None, thread_names: HashMap::new() });
    }

    let started_at = SystemTime::now();
    let start = Instant::now();
    let mut raw = RawProfile::default();
    let mut progress = Progress::new();
    let mut tick = tokio::time::interval(config.drain_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
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
        sampler.drain(&mut raw)?;
        for t in tracked.iter_mut().filter(|t| t.exited_after.is_none()) {
            if t.target.is_alive() {
                let _ = maps.capture(t.target.pid);
                if config.per_thread {
                    remember_thread_names(t);
                }
            } else {
                let after = start.elapsed();
                warn!(pid = t.target.pid, "target exited after {:.1} s; reporting what was collected", after.as_secs_f64());
                t.exited_after = Some(after);
                sampler.remove_target(t.target.pid);
            }
        }
        let samples: u64 = tracked.iter().filter_map(|t| sampler.target_stats(t.target.pid)).map(|s| s.samples).sum();
        progress.update(start.elapsed(), config.duration, samples, config.freq_hz);
        if tracked.iter().all(|t| t.exited_after.is_some()) {
            break;
        }
    }
    progress.finish();
    let elapsed = start.elapsed();

    sampler.drain_all(&mut raw)?;
    let stats: HashMap<u32, _> = tracked
        .iter()
        .filter_map(|t| Some((t.target.pid, sampler.target_stats(t.target.pid)?)))
        .collect();
    // Detach before the (CPU-heavy) symbolization: the targets stop paying now.
    drop(sampler);
    drop(ebpf);

    let pids: Vec<u32> = tracked.iter().map(|t| t.target.pid).collect();
    let symbols = tokio::task::block_in_place(|| symbolize::symbolize(&raw, &maps, &pids));

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
            warnings.push(format!("target exited after {:.1} s; the report covers that time", after.as_secs_f64()));
        }
        if st.map_full > 0 {
            warnings.push(format!("{} samples lost: aggregation map full", st.map_full));
        }
        let collisions = st.user_stack_collisions + st.kernel_stack_collisions;
        if collisions > 0 {
            warnings.push(format!("{collisions} stacks lost to stack-map collisions (shown as [lost … stack])"));
        }
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
                base_period_ns: period_ns,
                kernel_stacks: config.kernel_stacks,
                per_thread: config.per_thread,
                threads_at_start: t.threads_at_start,
                lost_samples: st.map_full,
                stack_errors: summary::StackErrors {
                    user_collisions: st.user_stack_collisions,
                    user_errors: st.user_stack_errors,
                    kernel_collisions: st.kernel_stack_collisions,
                    kernel_errors: st.kernel_stack_errors,
                },
                top_n: config.top_functions,
                warnings,
            },
        )?;
        reports.push(report);
    }
    Ok(reports)
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
    /// Period of the requested rate (the unit of folded counts).
    pub base_period_ns: u64,
    /// Kernel stacks on.
    pub kernel_stacks: bool,
    /// Per-thread towers.
    pub per_thread: bool,
    /// Threads attached at start.
    pub threads_at_start: usize,
    /// Samples lost before aggregation.
    pub lost_samples: u64,
    /// Stack errors.
    pub stack_errors: summary::StackErrors,
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
    // The rate is constant within a session until the governor exists; its
    // time-weighted mean is then the requested rate.
    let effective_hz = meta.requested_hz as f64;
    let folded_text = folded::render(profile, meta.base_period_ns);
    let title = flamegraph::Title {
        title: format!("{} (pid {}): on-CPU", target.comm, target.pid),
        subtitle: format!(
            "{} session, {:.1} s at {} Hz, {} samples",
            meta.kind.as_str(),
            duration_s,
            meta.requested_hz,
            total.samples
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
            id: format!("{}_{}_{}", meta.kind.as_str(), compact_timestamp(meta.started_at), target.pid),
            kind: meta.kind.as_str().to_owned(),
            started_at: humantime::format_rfc3339_seconds(meta.started_at).to_string(),
            duration_s,
        },
        targets: vec![target.clone()],
        sampling: summary::SamplingInfo {
            requested_hz: meta.requested_hz,
            effective_hz,
            samples: total.samples,
            lost_samples: meta.lost_samples,
            sampled_cpu_s: (total.period_ns as f64 / 1e6).round() / 1e3,
            kernel_stacks: meta.kernel_stacks,
            per_thread: meta.per_thread,
            threads_at_start: meta.threads_at_start,
            stack_errors: meta.stack_errors,
        },
        top_functions: profile.top_functions(meta.top_n),
        files,
        warnings: meta.warnings,
    };
    render::write_file(&path("json"), summary.to_json().map_err(RenderError::from)?.as_bytes())?;
    Ok(Report { summary })
}

/// Keeps a comm usable as a file name.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .collect();
    let s = s.trim_start_matches('.').to_owned();
    if s.is_empty() { "target".to_owned() } else { s }
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

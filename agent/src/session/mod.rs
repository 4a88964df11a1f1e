//! Sessions: windows over the engine.
//!
//! A session (on-demand, scheduled, emergency, or `flamewatch record`
//! itself) asks the engine for a rate on a target for a while, then reads
//! the intervals of its time window from the target's flight recorder and
//! finishes: merge → symbolize → build the profile → render → hand the
//! report to the sinks. The stages:
//!
//! - [`record`]: `flamewatch record` — admit, attach, collect (governed),
//!   detach, then finish each target's window;
//! - [`finish`]: a [`finish::Window`] of one target → its report files.

pub mod finish;
pub mod latency;
mod progress;
pub mod record;

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

pub use record::record;

use crate::{
    aggregate::Profile,
    config::{Format, Mode},
    engine::EngineError,
    governor::budget,
    render::{self, flamegraph, folded, summary, RenderError},
    target::Target,
};

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The engine (the kernel side) failed.
    #[error(transparent)]
    Engine(EngineError),
    /// Writing a report failed.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// Other sessions use the target's overhead budget.
    #[error(transparent)]
    Budget(#[from] budget::BudgetError),
    /// A function called too often for the overhead budget.
    #[error(transparent)]
    Refused(#[from] latency::Refused),
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
    /// The slow-call profile of a latency probe: samples taken while a
    /// probed call had run past its budget (`<stem>.slow.*`).
    Slow,
}

impl SessionKind {
    /// Name used in summaries and ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnDemand => "on-demand",
            Self::Scheduled => "scheduled",
            Self::Emergency => "emergency",
            Self::Slow => "slow",
        }
    }
}

/// A written report.
#[derive(Debug, Clone)]
pub struct Report {
    /// The summary (also written as JSON).
    pub summary: summary::Summary,
    /// Folded stacks of the recorder's healthy stretch before the window,
    /// and their samples (emergencies: the differential's baseline).
    pub baseline: Option<(String, u64)>,
}

/// `20261122T031500Z` for file names and ids.
pub fn compact_timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace(['-', ':'], "")
}

impl From<EngineError> for SessionError {
    fn from(e: EngineError) -> Self {
        match e {
            // A refusal, not a failure: callers tell the two apart.
            EngineError::Budget(b) => Self::Budget(b),
            e => Self::Engine(e),
        }
    }
}

impl From<crate::sampling::SamplingError> for SessionError {
    fn from(e: crate::sampling::SamplingError) -> Self {
        Self::Engine(e.into())
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `<kind>_<UTC timestamp>_<pid>`.
pub fn session_id(kind: SessionKind, started_at: SystemTime, pid: u32) -> String {
    format!("{}_{}_{}", kind.as_str(), compact_timestamp(started_at), pid)
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
    /// Memory summary (memory and heap modes).
    pub memory: Option<crate::memory::report::MemoryInfo>,
    /// Length of `top_functions`.
    pub top_n: usize,
    /// Warnings for the summary.
    pub warnings: Vec<String>,
    /// TCP activity of the target (when TCP tracking was on).
    pub tcp: Option<crate::tcp::summary::TcpSummary>,
    /// Files to write.
    pub formats: Vec<Format>,
    /// The gzipped pprof profile, when [`Format::Pprof`] is asked for.
    pub pprof: Option<Vec<u8>>,
    /// The recorder window covered (daemon sessions).
    pub window: Option<summary::WindowInfo>,
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
        Mode::Memory => ("resident memory growth (new anonymous pages)", "bytes", 1),
        Mode::Heap => ("live heap (sampled allocations still allocated)", "bytes", 1),
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
    }) + &meta
        .memory
        .as_ref()
        .map_or_else(String::new, crate::memory::report::subtitle);
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
        memory: meta.memory,
        overhead: meta.overhead,
        top_functions: profile.top_functions(meta.top_n),
        tcp: meta.tcp,
        window: meta.window,
        files,
        warnings: meta.warnings,
    };
    if wants(Format::Json) {
        render::write_file(
            &path("json"),
            summary.to_json().map_err(RenderError::from)?.as_bytes(),
        )?;
    }
    Ok(Report {
        summary,
        baseline: None,
    })
}

/// Keeps a comm usable as a file name.
pub(crate) fn sanitize(name: &str) -> String {
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

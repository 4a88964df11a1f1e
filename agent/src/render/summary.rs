//! The JSON summary written next to each flamegraph: what was profiled, how,
//! and the hottest functions. `version` changes only on breaking changes.

use serde::Serialize;

use crate::{aggregate::FunctionShare, target::Target};

/// Schema version of the summary.
pub const VERSION: u32 = 1;

/// The whole summary document.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Schema version.
    pub version: u32,
    /// The session that produced it.
    pub session: SessionInfo,
    /// The processes profiled.
    pub targets: Vec<Target>,
    /// Sampling settings and counters.
    pub sampling: SamplingInfo,
    /// What was profiled: `cpu`, `offcpu` or `wall`.
    pub mode: String,
    /// Off-CPU time (offcpu and wall modes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_cpu: Option<OffCpuInfo>,
    /// Memory growth or live heap (memory and heap modes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::memory::report::MemoryInfo>,
    /// What the profiling cost the target, and how the governor steered.
    pub overhead: OverheadInfo,
    /// Functions with the most self time.
    pub top_functions: Vec<FunctionShare>,
    /// TCP activity of the target: transitions, connections, resets,
    /// TIME_WAIT entered and now (absent when TCP tracking was unavailable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<crate::tcp::summary::TcpSummary>,
    /// The time window of the flight recorder this profile covers (daemon
    /// sessions; an emergency's reaches back before its alert).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowInfo>,
    /// Paths of the files written.
    pub files: Files,
    /// Things the reader should know (target exited early, lost stacks…).
    pub warnings: Vec<String>,
}

/// The window of the recorder a profile covers.
#[derive(Debug, Clone, Serialize)]
pub struct WindowInfo {
    /// Start, RFC 3339 UTC (the oldest interval included).
    pub from: String,
    /// End, RFC 3339 UTC.
    pub to: String,
    /// When the alert that asked for it fired (emergencies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_at: Option<String>,
    /// Samples taken before the alert fired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before_alert_samples: Option<u64>,
    /// Samples taken from the alert on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_alert_samples: Option<u64>,
}

/// Identity and timing of a session.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    /// Unique id, `<kind>_<UTC timestamp>_<pid>`.
    pub id: String,
    /// `on-demand`, `scheduled` or `emergency`.
    pub kind: String,
    /// Start, RFC 3339 UTC.
    pub started_at: String,
    /// Length actually recorded, seconds.
    pub duration_s: f64,
}

/// Sampling settings and what they produced.
#[derive(Debug, Clone, Serialize)]
pub struct SamplingInfo {
    /// `--freq`.
    pub requested_hz: u64,
    /// Time-weighted mean of the rate actually used.
    pub effective_hz: f64,
    /// Samples in the profile.
    pub samples: u64,
    /// Samples dropped before aggregation (aggregation map full).
    pub lost_samples: u64,
    /// CPU time the samples stand for, seconds (sum of their periods).
    pub sampled_cpu_s: f64,
    /// Kernel stacks recorded.
    pub kernel_stacks: bool,
    /// One tower per thread.
    pub per_thread: bool,
    /// Threads the events were opened on at start (later ones inherit).
    pub threads_at_start: usize,
    /// Samples that hit processes forked by the targets (they inherit the
    /// sampling events; not profiled, counted so their cost is visible).
    pub child_process_samples: u64,
    /// Samples whose stacks could not be recorded (still counted, shown as
    /// `[lost … stack]` frames).
    pub stack_errors: StackErrors,
    /// How user stacks were unwound.
    pub unwind: UnwindInfo,
}

/// How user stacks were unwound, and how well.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UnwindInfo {
    /// `fp` (frame pointers, in the kernel) or `dwarf` (.eh_frame, from
    /// stack copies).
    pub mode: String,
    /// What was asked for (`auto`, `fp`, `dwarf`).
    pub requested: String,
    /// Why this mode.
    pub reason: String,
    /// Frame pointer check of the executable, when made.
    pub executable: Option<ExecutableCheck>,
    /// Bytes of user stack copied per DWARF sample.
    pub stack_window: u32,
    /// DWARF samples unwound in userspace.
    pub dwarf_samples: u64,
    /// Of those, stacks that reached their outermost frame.
    pub complete: u64,
    /// Stacks cut short by the window (partial stacks are still used).
    pub truncated_window: u64,
    /// Stacks cut short by an unwinding failure (still used).
    pub truncated_error: u64,
    /// DWARF samples without a readable user stack.
    pub no_user_stack: u64,
    /// DWARF samples lost because the ring buffer was full.
    pub lost: u64,
    /// CPU time the agent spent unwinding, seconds.
    pub unwinder_cpu_s: f64,
    /// Frame-pointer samples (and off-CPU blocks) whose leaf was checked
    /// by the leaf fix-up.
    pub leaf_checked: u64,
    /// Of those, stacks whose leaf had set up no frame: its caller, which
    /// the frame-pointer walk skips, was inserted from the stack.
    pub leaf_fixups: u64,
    /// Frame-pointer stacks passing through a function with no frame at its
    /// call site (libc calling back into the program): the caller of that
    /// function is missing, a known gap the fix-up does not repair.
    pub mid_stack_gaps: u64,
    /// Fixed-up stacks whose leaf had reused `rbp` for data (glibc's
    /// select()): beyond the leaf's caller they are lost (`[truncated
    /// stack]`), a known gap.
    pub leaf_rbp_reused: u64,
    /// The leaf fix-up was on (`--no-leaf-fixup` turns it off).
    pub leaf_fixup: bool,
    /// `--unwind auto` on a frame-pointer target: samples whose
    /// frame-pointer walk (after the leaf fix-up) was compared with a DWARF
    /// walk of the same sample (1 in 16; see `fp_agreement_pct`).
    pub fp_compared: u64,
    /// Of those, the same stack both ways.
    pub fp_agreed: u64,
    /// `fp_agreed` in percent of `fp_compared` (null when none were
    /// compared). Under 80 % (over at least 50 samples) switches the target
    /// to DWARF: `mode` then says `dwarf` and `reason` why.
    pub fp_agreement_pct: Option<f64>,
}

/// Whether an executable's functions set up frame pointers.
#[derive(Debug, Clone, Serialize)]
pub struct ExecutableCheck {
    /// The file.
    pub path: String,
    /// Verdict.
    pub frame_pointers: bool,
    /// Functions examined.
    pub functions_checked: usize,
    /// Of which set up a frame pointer.
    pub with_frame_pointer: usize,
}

/// Off-CPU time of a session (offcpu and wall modes).
#[derive(Debug, Clone, Default, Serialize)]
pub struct OffCpuInfo {
    /// What the sched_switch program cost on other processes' context
    /// switches, percent of one core (the targets' own share is in
    /// `overhead`).
    pub other_processes_cpu_pct: f64,
    /// Shortest block recorded, µs.
    pub min_block_us: f64,
    /// Blocks recorded.
    pub blocks: u64,
    /// Time blocked in them, seconds (plus the part of still-open blocks
    /// inside the session).
    pub blocked_s: f64,
    /// Blocks shorter than the minimum (not in the profile).
    pub short_blocks: u64,
    /// Blocks lost (maps or ring buffers full).
    pub lost: u64,
    /// 1 switch-out in N was traced at the end (the governor raises N when
    /// blocking often makes off-CPU tracing cost more than its share).
    pub sample_every: u64,
    /// Threads still blocked at the end, longest first.
    pub blocked_threads: Vec<BlockedThreadInfo>,
}

/// A thread still blocked when the session ended.
#[derive(Debug, Clone, Serialize)]
pub struct BlockedThreadInfo {
    /// Thread id.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// Scheduler state (S: sleeping, D: uninterruptible).
    pub state: String,
    /// Kernel function it waits in.
    pub wchan: String,
    /// How long it has been blocked, seconds.
    pub blocked_s: f64,
    /// `session` (the switch was seen) or `before session`.
    pub since: String,
    /// Its stack, root first.
    pub stack: Vec<String>,
}

/// What profiling cost the target (see `governor::cost` for the formula).
#[derive(Debug, Clone, Default, Serialize)]
pub struct OverheadInfo {
    /// Budget, percent of the target's CPU time.
    pub budget_pct: f64,
    /// Overhead over the whole session.
    pub measured_pct: f64,
    /// Highest overhead of one interval.
    pub max_pct: f64,
    /// The agent's own CPU use outside sample processing, percent of one
    /// core (fixed housekeeping; not charged to the target's budget).
    pub agent_cpu_pct: f64,
    /// Calibrated per-sample cost not seen by BPF statistics, ns.
    pub interrupt_ns_per_sample: f64,
    /// Mean run time of the sampling program, ns.
    pub bpf_ns_per_sample: f64,
    /// Seconds sampling was paused because even 1 Hz was over budget.
    pub paused_s: f64,
    /// One point per interval.
    pub timeline: Vec<TimelinePoint>,
}

/// The rate and cost of one governor interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// Seconds since the session started (end of the interval).
    pub t: f64,
    /// Rate in force during the interval (0: paused).
    pub hz: u64,
    /// Overhead of the interval, percent of target CPU.
    pub pct: f64,
}

/// Counts of stacks the kernel could not record.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StackErrors {
    /// User stack: stack map bucket taken by another stack.
    pub user_collisions: u64,
    /// User stack: other failures.
    pub user_errors: u64,
    /// Kernel stack: collisions.
    pub kernel_collisions: u64,
    /// Kernel stack: other failures.
    pub kernel_errors: u64,
}

/// Output files. A format that was not asked for (`--format`) has an empty
/// path here and no key in the JSON.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Files {
    /// Flamegraph.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub svg: String,
    /// Folded stacks.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub folded: String,
    /// This summary.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub json: String,
    /// pprof profile (gzipped profile.proto).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pprof: String,
    /// Differential flamegraph of the window after the alert against the
    /// part before it (emergencies), normalized to the two totals.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub before_after_svg: String,
}

impl Files {
    /// Paths of the files written, in a fixed order (svg, folded, json,
    /// pprof).
    pub fn written(&self) -> Vec<String> {
        [
            &self.svg,
            &self.folded,
            &self.json,
            &self.pprof,
            &self.before_after_svg,
        ]
        .into_iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect()
    }
}

impl Summary {
    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{tests as agg, BuildOptions, Profile};

    /// Test that the summary of a known profile matches the golden file.
    #[test]
    fn summary_golden() {
        let opts = BuildOptions {
            process_name: "demo".into(),
            ..Default::default()
        };
        let profile = Profile::build(&agg::raw(), 100, &agg::FakeSymbols, &opts);
        let total = profile.total();
        let summary = Summary {
            version: VERSION,
            session: SessionInfo {
                id: "on-demand_20261122T030000Z_100".into(),
                kind: "on-demand".into(),
                started_at: "2026-11-22T03:00:00Z".into(),
                duration_s: 1.01,
            },
            targets: vec![Target {
                pid: 100,
                comm: "demo".into(),
                exe: Some("/usr/bin/demo".into()),
                start_time: 0,
            }],
            sampling: SamplingInfo {
                requested_hz: 99,
                effective_hz: 99.0,
                samples: total.samples,
                lost_samples: 0,
                sampled_cpu_s: total.period_ns as f64 / 1e9,
                kernel_stacks: true,
                per_thread: false,
                threads_at_start: 2,
                child_process_samples: 0,
                stack_errors: StackErrors {
                    user_collisions: 1,
                    ..Default::default()
                },
                unwind: UnwindInfo {
                    mode: "fp".into(),
                    requested: "auto".into(),
                    reason: "the executable keeps frame pointers".into(),
                    stack_window: 16384,
                    ..Default::default()
                },
            },
            mode: "cpu".into(),
            off_cpu: None,
            memory: None,
            overhead: OverheadInfo {
                budget_pct: 5.0,
                measured_pct: 0.31,
                max_pct: 0.35,
                agent_cpu_pct: 0.2,
                interrupt_ns_per_sample: 28_000.0,
                bpf_ns_per_sample: 1_500.0,
                paused_s: 0.0,
                timeline: vec![TimelinePoint {
                    t: 1.0,
                    hz: 99,
                    pct: 0.31,
                }],
            },
            top_functions: profile.top_functions(20),
            tcp: Some(crate::tcp::summary::tests::server_closing_first()),
            files: Files {
                svg: "flamegraphs/demo-100-20261122T030000Z.svg".into(),
                folded: "flamegraphs/demo-100-20261122T030000Z.folded".into(),
                json: "flamegraphs/demo-100-20261122T030000Z.json".into(),
                // Not asked for: no `pprof` key, so the golden file stands.
                pprof: String::new(),
                before_after_svg: String::new(),
            },
            window: None,
            warnings: vec![],
        };
        crate::render::assert_golden("demo.json", &summary.to_json().expect("json"));
    }
}

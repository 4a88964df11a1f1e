//! The single home of every default. clap reads its defaults from here, and
//! `watch` (later) reads the same structure from TOML.

use std::{path::PathBuf, time::Duration};

use crate::unwind::UnwindMode;

/// Settings of one profiling session (`flamewatch record`).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordConfig {
    /// Requested sampling frequency in Hz (a ceiling once the governor runs).
    pub freq_hz: u64,
    /// Session length; `None` runs until Ctrl-C (or until every target exits).
    pub duration: Option<Duration>,
    /// Folder the reports are written to.
    pub output: PathBuf,
    /// Prefix of the report file names; the target's comm when unset.
    pub label: Option<String>,
    /// Add a frame per thread under the process frame.
    pub per_thread: bool,
    /// Record kernel stacks too.
    pub kernel_stacks: bool,
    /// How often the kernel's aggregation maps are drained into userspace.
    pub drain_interval: Duration,
    /// Functions listed in the summary's `top_functions`.
    pub top_functions: usize,
    /// Overhead budget, percent of the target's CPU time.
    pub max_overhead_pct: f64,
    /// How user stacks are unwound.
    pub unwind: UnwindMode,
    /// Bytes of user stack copied per sample in DWARF mode.
    pub stack_window: u32,
}

impl Default for RecordConfig {
    fn default() -> Self {
        Self {
            freq_hz: 99,
            duration: Some(Duration::from_secs(30)),
            output: PathBuf::from("flamegraphs"),
            label: None,
            per_thread: false,
            kernel_stacks: true,
            drain_interval: Duration::from_secs(1),
            top_functions: 25,
            max_overhead_pct: 5.0,
            unwind: UnwindMode::Auto,
            stack_window: flamewatch_common::DEFAULT_STACK_WINDOW as u32,
        }
    }
}

/// Highest sampling frequency accepted: the cpu-clock event's period is
/// clamped by the kernel to 10 µs (perf_swevent_set_period), i.e. 100 kHz.
pub const MAX_FREQ_HZ: u64 = 100_000;

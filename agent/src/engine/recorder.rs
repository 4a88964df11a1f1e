//! The flight recorder: a bounded ring of per-interval aggregates of one
//! target, so that a window of the recent past (the minute before an alert,
//! `trigger --since 5m`, a healthy baseline) is a merge, not a new session.
//!
//! Bounded twice: by age (`history`, default 10 min) and by bytes (an
//! estimate of the interval's heap size); the oldest interval goes first.

use std::{
    collections::VecDeque,
    time::{Duration, SystemTime},
};

use flamewatch_common::{offcpu::OffStats, TargetStats};

use crate::{
    aggregate::{RawProfile, RawSampleKey, StackSlot, Weight},
    governor::cost::ProgStats,
    render::summary::TimelinePoint,
    unwind::{check::FpCheckStats, leaf::LeafStats, UnwindStats},
};

/// What one drain interval recorded of one target.
#[derive(Debug, Clone)]
pub struct Interval {
    /// Start of the interval (the previous drain).
    pub from: SystemTime,
    /// End of the interval (this drain).
    pub to: SystemTime,
    /// On-CPU samples, weighted by their periods.
    pub cpu: RawProfile,
    /// Off-CPU blocks (blocks and nanoseconds).
    pub off: RawProfile,
    /// Slow-call samples (also in `cpu`): taken while a probed call of the
    /// thread had run past its budget.
    pub slow: RawProfile,
    /// The late part of blocks inside a probed call past its budget (also
    /// in `off`): the slow-call profile's off-CPU side.
    pub slow_off: RawProfile,
    /// Sampling rate in force (0: paused or not sampling).
    pub hz: u64,
    /// Whether CPU sampling was wanted (so a 0 rate is a pause).
    pub cpu_wanted: bool,
    /// Target CPU time in the interval, ns.
    pub cpu_ns: u64,
    /// What profiling cost the target, ns.
    pub overhead_ns: f64,
    /// The same, percent of its CPU time.
    pub overhead_pct: f64,
    /// Sampling counters of the interval.
    pub stats: TargetStats,
    /// DWARF unwinding counters of the interval.
    pub unwind: UnwindStats,
    /// Off-CPU counters of the interval.
    pub off_stats: OffStats,
    /// 1-in-N off-CPU sampling in force.
    pub off_every: u64,
    /// Off-CPU program time spent on other processes' switches, ns
    /// (machine-wide, the same in every target's interval).
    pub off_machine_ns: u64,
    /// The agent's own housekeeping CPU, ns (agent-wide).
    pub housekeeping_ns: u64,
    /// Sampling program runs (all targets).
    pub bpf_run: ProgStats,
    /// This target's share of the unwinder's CPU time, ns.
    pub unwinder_ns: u64,
    /// What the leaf fix-up did to the interval's frame-pointer stacks.
    pub leaf: LeafStats,
    /// `--unwind auto`'s check of frame-pointer stacks in the interval.
    pub fp_check: FpCheckStats,
    /// A short interval recorded between two ticks (a window closing):
    /// its data counts, its rate and overhead are not a timeline point.
    pub tail: bool,
    /// Estimated heap bytes of this record.
    pub bytes: usize,
    /// Memory records (memory and heap profiles).
    pub mem: crate::memory::MemDrain,
}

impl Default for Interval {
    fn default() -> Self {
        Self {
            from: SystemTime::UNIX_EPOCH,
            to: SystemTime::UNIX_EPOCH,
            cpu: RawProfile::default(),
            off: RawProfile::default(),
            slow: RawProfile::default(),
            slow_off: RawProfile::default(),
            hz: 0,
            cpu_wanted: false,
            cpu_ns: 0,
            overhead_ns: 0.0,
            overhead_pct: 0.0,
            stats: TargetStats::default(),
            unwind: UnwindStats::default(),
            off_stats: OffStats::default(),
            off_every: 1,
            off_machine_ns: 0,
            housekeeping_ns: 0,
            bpf_run: ProgStats::default(),
            unwinder_ns: 0,
            leaf: LeafStats::default(),
            fp_check: FpCheckStats::default(),
            tail: true,
            bytes: 0,
            mem: crate::memory::MemDrain::default(),
        }
    }
}

impl Interval {
    /// Length in seconds.
    pub fn seconds(&self) -> f64 {
        self.to
            .duration_since(self.from)
            .unwrap_or_default()
            .as_secs_f64()
    }

    /// Estimates the heap bytes held (keys, stacks, map overhead).
    pub fn estimate_bytes(&mut self) {
        let per = |raw: &RawProfile| -> usize {
            raw.samples
                .keys()
                .map(|k| key_bytes(k) + std::mem::size_of::<(RawSampleKey, Weight)>() + 16)
                .sum()
        };
        self.bytes = std::mem::size_of::<Self>()
            + per(&self.cpu)
            + per(&self.off)
            + per(&self.mem.faults)
            + per(&self.mem.extends)
            + per(&self.mem.allocs)
            + per(&self.slow)
            + per(&self.slow_off);
    }
}

fn key_bytes(k: &RawSampleKey) -> usize {
    let slot = |s: &StackSlot| match s {
        StackSlot::Frames(ips) | StackSlot::Truncated(ips) => ips.len() * 8 + 16,
        StackSlot::Named(names) => names.iter().map(|n| n.len() + 32).sum(),
        StackSlot::Lost(_) | StackSlot::Absent => 0,
    };
    slot(&k.user) + slot(&k.kernel)
}

/// The bounded ring of one target.
#[derive(Debug)]
pub struct Recorder {
    intervals: VecDeque<Interval>,
    max_age: Duration,
    max_bytes: usize,
    bytes: usize,
    /// Intervals evicted for the byte limit (not for age): the history is
    /// then shorter than `max_age`.
    pub evicted_for_bytes: u64,
}

impl Recorder {
    /// A ring keeping `max_age` of intervals in at most `max_bytes`.
    pub fn new(max_age: Duration, max_bytes: usize) -> Self {
        Self {
            intervals: VecDeque::new(),
            max_age,
            max_bytes,
            bytes: 0,
            evicted_for_bytes: 0,
        }
    }

    /// Appends an interval, evicting the oldest beyond the limits.
    pub fn push(&mut self, mut interval: Interval) {
        interval.estimate_bytes();
        self.bytes += interval.bytes;
        let newest = interval.to;
        self.intervals.push_back(interval);
        while let Some(front) = self.intervals.front() {
            let too_old = newest.duration_since(front.to).unwrap_or_default() > self.max_age;
            let too_big = self.bytes > self.max_bytes && self.intervals.len() > 1;
            if !(too_old || too_big) {
                break;
            }
            if too_big && !too_old {
                self.evicted_for_bytes += 1;
            }
            let gone = self.intervals.pop_front().expect("front exists");
            self.bytes -= gone.bytes;
        }
    }

    /// The intervals overlapping `[from, to]`, oldest first.
    pub fn window(&self, from: SystemTime, to: SystemTime) -> Vec<Interval> {
        self.intervals
            .iter()
            .filter(|i| i.to > from && i.from < to)
            .cloned()
            .collect()
    }

    /// Start of the oldest interval kept.
    #[cfg(test)]
    pub fn oldest(&self) -> Option<SystemTime> {
        self.intervals.front().map(|i| i.from)
    }

    /// Estimated bytes held.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Intervals held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.intervals.len()
    }
}

/// A window's intervals, merged: what a session's report is made of.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    /// On-CPU samples.
    pub cpu: RawProfile,
    /// Off-CPU blocks.
    pub off: RawProfile,
    /// Seconds covered by intervals.
    pub covered_s: f64,
    /// Rate x seconds (for the time-weighted mean rate).
    pub hz_seconds: f64,
    /// Seconds CPU sampling was wanted but paused by the governor.
    pub paused_s: f64,
    /// Profiling cost, ns, and the target's CPU time, ns.
    pub overhead_ns: f64,
    /// Target CPU time, ns.
    pub cpu_ns: u64,
    /// Highest interval overhead, percent.
    pub max_pct: f64,
    /// Rate and overhead per interval, seconds from the window's start.
    pub timeline: Vec<TimelinePoint>,
    /// Sampling counters.
    pub stats: TargetStats,
    /// Unwinding counters.
    pub unwind: UnwindStats,
    /// Off-CPU counters.
    pub off_stats: OffStats,
    /// Latest 1-in-N off-CPU sampling.
    pub off_every: u64,
    /// Off-CPU program time on other processes, ns.
    pub off_machine_ns: u64,
    /// Agent housekeeping, ns.
    pub housekeeping_ns: u64,
    /// Sampling program runs.
    pub bpf_run: ProgStats,
    /// Unwinder CPU, ns.
    pub unwinder_ns: u64,
    /// Leaf fix-ups.
    pub leaf: LeafStats,
    /// `--unwind auto`'s check.
    pub fp_check: FpCheckStats,
    /// Latest rate.
    pub last_hz: u64,
    /// Memory records of the window.
    pub mem: crate::memory::MemCollected,
}

impl Collected {
    /// Merges `intervals` (oldest first); `start` is the window's start, the
    /// origin of the timeline.
    pub fn merge(intervals: &[Interval], start: SystemTime) -> Self {
        let mut c = Self {
            off_every: 1,
            ..Self::default()
        };
        for i in intervals {
            let dt = i.seconds();
            c.cpu.merge(i.cpu.clone());
            c.off.merge(i.off.clone());
            c.covered_s += dt;
            c.hz_seconds += i.hz as f64 * dt;
            if i.cpu_wanted && i.hz == 0 {
                c.paused_s += dt;
            }
            c.overhead_ns += i.overhead_ns;
            c.cpu_ns += i.cpu_ns;
            if !i.tail {
                c.max_pct = c.max_pct.max(i.overhead_pct);
                c.timeline.push(TimelinePoint {
                    t: round3(i.to.duration_since(start).unwrap_or_default().as_secs_f64()),
                    hz: i.hz,
                    pct: round3(i.overhead_pct),
                });
            }
            add_stats(&mut c.stats, &i.stats);
            add_unwind(&mut c.unwind, &i.unwind);
            add_off(&mut c.off_stats, &i.off_stats);
            c.off_every = i.off_every;
            c.off_machine_ns += i.off_machine_ns;
            c.housekeeping_ns += i.housekeeping_ns;
            c.bpf_run.runs += i.bpf_run.runs;
            c.bpf_run.run_ns += i.bpf_run.run_ns;
            c.unwinder_ns += i.unwinder_ns;
            c.leaf += i.leaf;
            c.fp_check += i.fp_check;
            c.last_hz = i.hz;
            c.mem.add(i);
        }
        c
    }

    /// Measured overhead, percent of the target's CPU.
    pub fn measured_pct(&self) -> f64 {
        if self.cpu_ns == 0 {
            0.0
        } else {
            100.0 * self.overhead_ns / self.cpu_ns as f64
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `a - b` of cumulative sampling counters (a slot's counters only grow).
pub fn stats_since(a: &TargetStats, b: &TargetStats) -> TargetStats {
    TargetStats {
        samples: a.samples.saturating_sub(b.samples),
        period_ns: a.period_ns.saturating_sub(b.period_ns),
        user_stack_collisions: a.user_stack_collisions.saturating_sub(b.user_stack_collisions),
        user_stack_errors: a.user_stack_errors.saturating_sub(b.user_stack_errors),
        kernel_stack_collisions: a
            .kernel_stack_collisions
            .saturating_sub(b.kernel_stack_collisions),
        kernel_stack_errors: a.kernel_stack_errors.saturating_sub(b.kernel_stack_errors),
        map_full: a.map_full.saturating_sub(b.map_full),
        dwarf_samples: a.dwarf_samples.saturating_sub(b.dwarf_samples),
        dwarf_lost: a.dwarf_lost.saturating_sub(b.dwarf_lost),
        dwarf_stack_unreadable: a.dwarf_stack_unreadable.saturating_sub(b.dwarf_stack_unreadable),
        fp_checks: a.fp_checks.saturating_sub(b.fp_checks),
        fp_checks_lost: a.fp_checks_lost.saturating_sub(b.fp_checks_lost),
    }
}

fn add_stats(a: &mut TargetStats, b: &TargetStats) {
    a.samples += b.samples;
    a.period_ns += b.period_ns;
    a.user_stack_collisions += b.user_stack_collisions;
    a.user_stack_errors += b.user_stack_errors;
    a.kernel_stack_collisions += b.kernel_stack_collisions;
    a.kernel_stack_errors += b.kernel_stack_errors;
    a.map_full += b.map_full;
    a.dwarf_samples += b.dwarf_samples;
    a.dwarf_lost += b.dwarf_lost;
    a.dwarf_stack_unreadable += b.dwarf_stack_unreadable;
    a.fp_checks += b.fp_checks;
    a.fp_checks_lost += b.fp_checks_lost;
}

/// `a - b` of cumulative unwinding counters.
pub fn unwind_since(a: &UnwindStats, b: &UnwindStats) -> UnwindStats {
    UnwindStats {
        samples: a.samples.saturating_sub(b.samples),
        complete: a.complete.saturating_sub(b.complete),
        truncated_window: a.truncated_window.saturating_sub(b.truncated_window),
        truncated_error: a.truncated_error.saturating_sub(b.truncated_error),
        no_user_stack: a.no_user_stack.saturating_sub(b.no_user_stack),
    }
}

fn add_unwind(a: &mut UnwindStats, b: &UnwindStats) {
    a.samples += b.samples;
    a.complete += b.complete;
    a.truncated_window += b.truncated_window;
    a.truncated_error += b.truncated_error;
    a.no_user_stack += b.no_user_stack;
}

/// `a - b` of cumulative off-CPU counters.
pub fn off_since(a: &OffStats, b: &OffStats) -> OffStats {
    OffStats {
        blocks: a.blocks.saturating_sub(b.blocks),
        short: a.short.saturating_sub(b.short),
        unsampled: a.unsampled.saturating_sub(b.unsampled),
        blocked_ns: a.blocked_ns.saturating_sub(b.blocked_ns),
        start_full: a.start_full.saturating_sub(b.start_full),
        lost: a.lost.saturating_sub(b.lost),
        prog_ns: a.prog_ns.saturating_sub(b.prog_ns),
    }
}

fn add_off(a: &mut OffStats, b: &OffStats) {
    a.blocks += b.blocks;
    a.short += b.short;
    a.unsampled += b.unsampled;
    a.blocked_ns += b.blocked_ns;
    a.start_full += b.start_full;
    a.lost += b.lost;
    a.prog_ns += b.prog_ns;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::tests::sample;

    fn interval(at_s: u64, samples: u64) -> Interval {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut cpu = RawProfile::default();
        let (k, w) = sample(1, &[0x1000, 0x2000 + at_s], None, samples);
        cpu.add(k, w);
        Interval {
            from: t0 + Duration::from_secs(at_s),
            to: t0 + Duration::from_secs(at_s + 1),
            cpu,
            hz: 19,
            cpu_wanted: true,
            cpu_ns: 1_000_000_000,
            overhead_ns: 1_000_000.0,
            overhead_pct: 0.1,
            tail: false,
            ..Interval::default()
        }
    }

    /// Test that the ring drops intervals older than its history.
    #[test]
    fn evicts_by_age() {
        let mut r = Recorder::new(Duration::from_secs(10), usize::MAX);
        for s in 0..30 {
            r.push(interval(s, 1));
        }
        assert_eq!(r.len(), 11);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(r.oldest(), Some(t0 + Duration::from_secs(19)));
    }

    /// Test that the ring holds its byte limit, evicting the oldest first.
    #[test]
    fn evicts_by_bytes() {
        let one = {
            let mut i = interval(0, 1);
            i.estimate_bytes();
            i.bytes
        };
        let mut r = Recorder::new(Duration::from_secs(3600), one * 5);
        for s in 0..100 {
            r.push(interval(s, 1));
        }
        assert!(r.bytes() <= one * 5, "{} > {}", r.bytes(), one * 5);
        assert_eq!(r.len(), 5);
        assert!(r.evicted_for_bytes >= 95);
    }

    /// Test that a window merges exactly the intervals it overlaps, with
    /// time-weighted rate and overhead.
    #[test]
    fn window_merges_overlapping_intervals() {
        let mut r = Recorder::new(Duration::from_secs(3600), usize::MAX);
        for s in 0..10 {
            r.push(interval(s, 2));
        }
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let w = r.window(t0 + Duration::from_secs(3), t0 + Duration::from_secs(6));
        assert_eq!(w.len(), 3);
        let c = Collected::merge(&w, t0 + Duration::from_secs(3));
        assert_eq!(c.cpu.samples.values().map(|w| w.samples).sum::<u64>(), 6);
        assert!((c.covered_s - 3.0).abs() < 1e-9);
        assert!((c.hz_seconds / c.covered_s - 19.0).abs() < 1e-9);
        assert!((c.measured_pct() - 0.1).abs() < 1e-9);
        assert_eq!(c.timeline.len(), 3);
        assert_eq!(c.timeline[0].t, 1.0);
    }
}

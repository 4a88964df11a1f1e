//! What profiling cost a target in one interval.
//!
//! ```text
//! overhead % = 100 × (bpf_ns + samples × interrupt_ns + processing_ns) / target_cpu_ns
//! ```
//! - `bpf_ns`: run time of our programs for this target's samples and events
//!   (the kernel's BPF run-time statistics, enabled while the agent runs);
//! - `samples × interrupt_ns`: the cost of taking a sample that the kernel
//!   does not report (timer interrupt, perf core; tens of µs in a VM),
//!   calibrated at start by [`super::calibrate`];
//! - `processing_ns`: agent CPU time that grows with the rate (draining,
//!   unwinding, event processing), measured around that work;
//! - `target_cpu_ns`: the target's own CPU time in the interval, from the
//!   counts of our per-thread cpu-clock events.
//!
//! The agent's remaining CPU time (fixed housekeeping) is reported as
//! `agent_cpu_pct` and does not count against the budget: it does not grow
//! with the rate, and counting it would starve a quiet target of samples.

use std::{collections::HashMap, os::fd::OwnedFd};

use aya::Ebpf;
use serde::Serialize;

/// Inputs of one interval for one target.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct IntervalInput {
    /// Target CPU time in the interval.
    pub target_cpu_ns: u64,
    /// Samples taken of the target.
    pub samples: u64,
    /// In-kernel run time of our programs attributed to the target.
    pub bpf_ns: u64,
    /// Agent CPU time spent on this target's samples and events.
    pub processing_ns: u64,
}

/// The cost of one interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct IntervalCost {
    /// What profiling cost the target, percent of its CPU time.
    pub overhead_pct: f64,
    /// The parts, in nanoseconds.
    pub bpf_ns: u64,
    /// Estimated interrupt cost.
    pub interrupt_ns: u64,
    /// Agent processing.
    pub processing_ns: u64,
}

/// Applies the formula of this module.
pub fn overhead(input: IntervalInput, interrupt_ns_per_sample: f64) -> IntervalCost {
    let interrupt_ns = (input.samples as f64 * interrupt_ns_per_sample).round() as u64;
    let total = input.bpf_ns + interrupt_ns + input.processing_ns;
    let overhead_pct = if input.target_cpu_ns == 0 {
        0.0
    } else {
        100.0 * total as f64 / input.target_cpu_ns as f64
    };
    IntervalCost {
        overhead_pct,
        bpf_ns: input.bpf_ns,
        interrupt_ns,
        processing_ns: input.processing_ns,
    }
}

/// Keeps the kernel's BPF run-time statistics on while it lives. The kernel
/// ties them to a file descriptor, so they end with the agent even after
/// SIGKILL, and the `kernel.bpf_stats_enabled` sysctl is never touched.
pub struct BpfStats {
    _fd: Option<OwnedFd>,
}

impl BpfStats {
    /// Turns the statistics on (or logs why not: the estimate then lacks
    /// the programs' own run time, which is small next to the interrupt).
    pub fn enable() -> Self {
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Self { _fd: Some(fd) },
            Err(e) => {
                tracing::warn!("cannot enable BPF run-time statistics: {e}");
                Self { _fd: None }
            }
        }
    }
}

/// Run time and run count of a program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgStats {
    /// Total run time, ns.
    pub run_ns: u64,
    /// Number of runs.
    pub runs: u64,
}

impl ProgStats {
    /// The difference since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            run_ns: self.run_ns.saturating_sub(earlier.run_ns),
            runs: self.runs.saturating_sub(earlier.runs),
        }
    }

    /// Mean run time, ns.
    pub fn mean_ns(self) -> f64 {
        if self.runs == 0 {
            0.0
        } else {
            self.run_ns as f64 / self.runs as f64
        }
    }
}

/// Statistics of every loaded program of `ebpf`, by name.
pub fn program_stats(ebpf: &Ebpf) -> HashMap<String, ProgStats> {
    ebpf.programs()
        .filter_map(|(name, prog)| {
            let info = prog.info().ok()?;
            Some((
                name.to_owned(),
                ProgStats {
                    run_ns: info.run_time().as_nanos() as u64,
                    runs: info.run_count(),
                },
            ))
        })
        .collect()
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of the calling thread.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of the whole agent (all threads).
pub fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// Monotonic wall time.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Measures the CPU time of a piece of agent work done on this thread.
pub fn timed<T>(processing_ns: &mut u64, work: impl FnOnce() -> T) -> T {
    let start = thread_cpu_ns();
    let out = work();
    *processing_ns += thread_cpu_ns().saturating_sub(start);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test the overhead formula on numbers measured on these VMs: 999
    /// samples/s at ~25 µs of interrupt and 2 µs of BPF on a busy thread is
    /// about 2.7 % of its CPU.
    #[test]
    fn formula() {
        let cost = overhead(
            IntervalInput {
                target_cpu_ns: 1_000_000_000,
                samples: 999,
                bpf_ns: 999 * 2_000,
                processing_ns: 0,
            },
            25_000.0,
        );
        assert!((cost.overhead_pct - 2.697).abs() < 0.001, "{cost:?}");
        assert_eq!(cost.interrupt_ns, 24_975_000);
    }

    /// Test that an interval without target CPU time costs 0 % (not NaN).
    #[test]
    fn idle_interval() {
        let cost = overhead(IntervalInput::default(), 25_000.0);
        assert_eq!(cost.overhead_pct, 0.0);
    }

    /// Test that agent processing counts against the target.
    #[test]
    fn processing_counts() {
        let cost = overhead(
            IntervalInput {
                target_cpu_ns: 100_000_000,
                samples: 0,
                bpf_ns: 0,
                processing_ns: 1_000_000,
            },
            25_000.0,
        );
        assert!((cost.overhead_pct - 1.0).abs() < 1e-9);
    }

    /// Test that `timed` charges the CPU time of the work it wraps, and the
    /// process clock covers it.
    #[test]
    fn clocks_advance() {
        let mut spent = 0;
        timed(&mut spent, || {
            // Burn 5 ms of this thread's CPU (not wall time: the test may be
            // descheduled on a busy machine).
            let start = thread_cpu_ns();
            while thread_cpu_ns() - start < 5_000_000 {}
        });
        assert!((5_000_000..1_000_000_000).contains(&spent), "{spent}");
        assert!(process_cpu_ns() >= spent);
    }
}

//! Calibrating the per-sample cost the kernel does not report.
//!
//! BPF run-time statistics cover our program, but not the timer interrupt,
//! the perf core around it, and the cache damage done to the interrupted
//! code: on these VMs that is 20–30 µs a sample, ten times the program.
//! So the agent measures it: a calibration loop on one of its own threads
//! runs fixed blocks of cache-touching work, alternately without and with a
//! cpu-clock event sampling it at 2 kHz through our program (the agent's
//! process is a target meanwhile, so the program takes a target's whole
//! path). The slowdown per sample, minus the program's own mean run time,
//! is the interrupt cost.
//!
//! Wall time (not thread CPU time) is measured, because kernels built with
//! IRQ_TIME_ACCOUNTING do not charge interrupt time to the interrupted task;
//! medians over interleaved blocks filter out preemption by other work.
//! The result is cached per boot in /run/flamewatch/calibration.json.

use std::{
    os::fd::RawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::cost::{monotonic_ns, ProgStats};
use crate::sampling::ThreadEvent;

/// Used when calibration fails: the middle of what was measured here.
pub const DEFAULT_INTERRUPT_NS: f64 = 30_000.0;
/// Sampling period of the calibration (2 kHz).
const PERIOD_NS: u64 = 500_000;
/// Length of one block of work.
const BLOCK: Duration = Duration::from_millis(20);
/// Off/on pairs of blocks.
const ROUNDS: usize = 32;
/// Working set of the calibration loop: enough to feel cache pollution.
const WORKING_SET: usize = 1 << 20;

/// The result of a calibration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Per-sample cost not seen by BPF statistics, ns.
    pub interrupt_ns: f64,
    /// Whole measured slowdown per sample, ns.
    pub per_sample_ns: f64,
    /// Mean run time of the sampling program during calibration, ns.
    pub bpf_ns: f64,
}

impl Calibration {
    /// Cost of sampling at 1 Hz, in percent of the target's CPU, before
    /// anything is measured on the target (the governor's first guess).
    pub fn cost_per_hz_pct(&self) -> f64 {
        self.per_sample_ns * 1e-9 * 100.0
    }

    fn fallback() -> Self {
        Self {
            interrupt_ns: DEFAULT_INTERRUPT_NS,
            per_sample_ns: DEFAULT_INTERRUPT_NS + 2_000.0,
            bpf_ns: 2_000.0,
        }
    }
}

/// Version of the calibration method: a cached result of another method
/// (an older agent's) is measured again.
const METHOD: u32 = 2;

#[derive(Serialize, Deserialize)]
struct Cached {
    #[serde(default)]
    method: u32,
    boot_id: String,
    kernel: String,
    calibration: Calibration,
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Cache file of the calibration.
pub fn cache_path() -> PathBuf {
    PathBuf::from("/run/flamewatch/calibration.json")
}

/// The cached calibration of this boot, or a fresh one (then cached).
/// `prog_fd` is the loaded sampling program; `stats` reads its statistics.
pub fn calibration(prog_fd: RawFd, stats: impl Fn() -> ProgStats) -> Calibration {
    let boot_id = read_trimmed("/proc/sys/kernel/random/boot_id");
    let kernel = read_trimmed("/proc/sys/kernel/osrelease");
    if let Some(c) = load(&cache_path(), &boot_id, &kernel) {
        debug!("calibration from cache: {:.1} µs/sample", c.interrupt_ns / 1e3);
        return c;
    }
    let c = match measure(prog_fd, stats) {
        Ok(c) => c,
        Err(e) => {
            warn!(
                "calibration failed ({e}); assuming {:.0} µs per sample",
                DEFAULT_INTERRUPT_NS / 1e3
            );
            return Calibration::fallback();
        }
    };
    info!(
        "calibrated sampling cost: {:.1} µs per sample ({:.1} µs interrupt, {:.1} µs BPF)",
        c.per_sample_ns / 1e3,
        c.interrupt_ns / 1e3,
        c.bpf_ns / 1e3
    );
    save(
        &cache_path(),
        &Cached {
            method: METHOD,
            boot_id,
            kernel,
            calibration: c,
        },
    );
    c
}

fn load(path: &Path, boot_id: &str, kernel: &str) -> Option<Calibration> {
    let cached: Cached = serde_json::from_str(&crate::fsafe::read_nofollow(path).ok()?).ok()?;
    (cached.method == METHOD && cached.boot_id == boot_id && cached.kernel == kernel)
        .then_some(cached.calibration)
}

fn save(path: &Path, cached: &Cached) {
    let Some(dir) = path.parent() else { return };
    let result = crate::fsafe::create_dir(dir)
        .map_err(std::io::Error::other)
        .and_then(|_| serde_json::to_vec(cached).map_err(std::io::Error::other))
        .and_then(|bytes| crate::render::write_file(path, &bytes).map_err(std::io::Error::other));
    if let Err(e) = result {
        debug!("cannot cache calibration in {}: {e}", path.display());
    }
}

/// Cache-touching work: a pseudo-random walk through `mem`.
struct Work {
    mem: Vec<u64>,
    x: u64,
}

impl Work {
    fn new() -> Self {
        Self {
            mem: vec![1; WORKING_SET / 8],
            x: 88172645463325252,
        }
    }

    fn run(&mut self, iterations: u64) {
        let n = self.mem.len() as u64;
        let mut x = self.x;
        for i in 0..iterations {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let j = (x % n) as usize;
            self.mem[j] = self.mem[j].wrapping_add(i);
            x = x.wrapping_add(self.mem[(j * 7) % self.mem.len()]);
        }
        self.x = std::hint::black_box(x);
    }

    /// Iterations that take about `BLOCK`.
    fn size_block(&mut self) -> u64 {
        let mut n = 1_000u64;
        loop {
            let t = monotonic_ns();
            self.run(n);
            let dt = monotonic_ns() - t;
            if dt >= BLOCK.as_nanos() as u64 / 4 {
                return n * BLOCK.as_nanos() as u64 / dt.max(1);
            }
            n *= 4;
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn measure(prog_fd: RawFd, stats: impl Fn() -> ProgStats) -> std::io::Result<Calibration> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    let mut work = Work::new();
    let n = work.size_block();
    work.run(n); // warm the working set
    let (mut off, mut on, mut per_sample, mut bpf) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = monotonic_ns();
        work.run(n);
        off.push((monotonic_ns() - t) as f64);

        let before = stats();
        let event = ThreadEvent::open(tid, PERIOD_NS, prog_fd)?;
        let t = monotonic_ns();
        work.run(n);
        let dt = (monotonic_ns() - t) as f64;
        drop(event);
        let runs = stats().since(before);
        on.push(dt);
        if runs.runs > 0 {
            per_sample.push(runs.runs as f64);
            bpf.push(runs.mean_ns());
        }
    }
    if per_sample.len() < ROUNDS / 2 {
        return Err(std::io::Error::other("the calibration thread was not sampled"));
    }
    let samples = median(per_sample);
    // Each sampled block against the unsampled one just before it: slow
    // drifts of the machine's speed (other tenants of a VM host) cancel.
    let extra = median(on.iter().zip(&off).map(|(on, off)| on - off).collect()).max(0.0);
    let per_sample_ns = extra / samples;
    let bpf_ns = median(bpf);
    // Below 1 µs is below what any interrupt costs: noise.
    let interrupt_ns = (per_sample_ns - bpf_ns).clamp(1_000.0, 500_000.0);
    Ok(Calibration {
        interrupt_ns,
        per_sample_ns: interrupt_ns + bpf_ns,
        bpf_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that the cache is used only for the same boot, kernel and method.
    #[test]
    fn cache_matches_boot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let c = Calibration {
            interrupt_ns: 25_000.0,
            per_sample_ns: 27_000.0,
            bpf_ns: 2_000.0,
        };
        save(
            &path,
            &Cached {
                method: METHOD,
                boot_id: "b1".into(),
                kernel: "k".into(),
                calibration: c,
            },
        );
        assert_eq!(load(&path, "b1", "k"), Some(c));
        assert_eq!(load(&path, "b2", "k"), None);
        assert_eq!(load(&path, "b1", "k2"), None);
        // An older agent's file, without the method.
        std::fs::write(
            &path,
            r#"{"boot_id":"b1","kernel":"k","calibration":{"interrupt_ns":1.0,"per_sample_ns":2.0,"bpf_ns":1.0}}"#,
        )
        .unwrap();
        assert_eq!(load(&path, "b1", "k"), None);
    }

    /// Test that the per-Hz cost is in percent of the target's CPU.
    #[test]
    fn cost_per_hz() {
        let c = Calibration {
            interrupt_ns: 28_000.0,
            per_sample_ns: 30_000.0,
            bpf_ns: 2_000.0,
        };
        // 1000 samples/s x 30 µs = 3 %.
        assert!((c.cost_per_hz_pct() * 1000.0 - 3.0).abs() < 1e-9);
    }

    /// Test that the medians ignore a minority of disturbed blocks.
    #[test]
    fn median_is_robust() {
        assert_eq!(median(vec![10.0, 11.0, 10.5, 500.0, 10.2]), 10.5);
    }
}

//! `cargo xtask bench heap`: what heap mode costs a malloc-heavy target.
//!
//! The target is `mallocloop-fp` (64-byte malloc+free pairs as fast as it
//! goes, counted every second). Paired runs, ratios to the baseline run
//! right before each profiled one, medians over the rounds:
//! - heap mode at the default sampling (512 KiB) and the default budget
//!   (5 %: the governor duty-cycles the probes);
//! - the same with the budget lifted (`--max-overhead 100`): the probes on
//!   all the time, the raw cost of trapping every call;
//! - every-call tracing as bcc's memleak does it (`--heap-sample-bytes 1`:
//!   every allocation's stack recorded and its pointer tracked);
//! - a second mallocloop beside a heap-mode target, not a target itself:
//!   its speed against the same pair without any profiler (should be 1).
//!
//! The per-hit probe costs are the ones the agent calibrates and logs.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};

/// A running mallocloop and the `ops` lines it printed.
struct Loop {
    child: Child,
    ops: Arc<Mutex<Vec<f64>>>,
}

impl Loop {
    fn start(targets: &Path, seconds: f64) -> Result<Self> {
        let mut child = Command::new(targets.join("mallocloop-fp"))
            .args(["--seconds", &format!("{}", seconds + 2.0)])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting mallocloop-fp")?;
        let out = child.stdout.take().context("piped")?;
        let ops = Arc::new(Mutex::new(Vec::new()));
        let seen = ops.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(n) = line
                    .strip_prefix("ops ")
                    .and_then(|n| n.trim().parse::<f64>().ok())
                {
                    seen.lock().unwrap().push(n);
                }
            }
        });
        Ok(Self { child, ops })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Median ops/s after the first `skip` seconds.
    fn finish(mut self, skip: usize) -> f64 {
        let _ = self.child.wait();
        let v: Vec<f64> = self.ops.lock().unwrap().iter().skip(skip).copied().collect();
        if v.is_empty() {
            return f64::NAN;
        }
        super::median(v)
    }
}

/// Runs one pair (a target, and `beside` a non-target next to it) for
/// `seconds`, with `agent_args` profiling the target (none: baseline).
/// Returns (target ops/s, non-target ops/s, agent stderr).
fn run_once(
    targets: &Path,
    agent: &Path,
    seconds: f64,
    agent_args: Option<&[&str]>,
    beside: bool,
) -> Result<(f64, Option<f64>, String)> {
    let target = Loop::start(targets, seconds)?;
    let other = if beside {
        Some(Loop::start(targets, seconds)?)
    } else {
        None
    };
    let mut stderr = String::new();
    let out_dir = std::env::temp_dir().join(format!("flamewatch-bench-heap-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir)?;
    let mut profiler = None;
    if let Some(args) = agent_args {
        let pid = target.pid().to_string();
        let mut cmd = Command::new(agent);
        cmd.args(["record", "--pid", &pid, "--mode", "heap", "--output"])
            .arg(&out_dir)
            .args(["--duration", &format!("{}s", seconds + 1.0), "--format", "json"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        profiler = Some(cmd.spawn().context("starting flamewatch")?);
    }
    // Skip the first two seconds (start-up, calibration, attach).
    let skip = 2;
    std::thread::sleep(Duration::from_millis(100));
    let t = target.finish(skip);
    let o = other.map(|o| o.finish(skip));
    if let Some(p) = profiler {
        let out = p.wait_with_output()?;
        stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    Ok((t, o, stderr))
}

/// The calibrated per-hit costs from the agent's log line.
fn probe_costs(stderr: &str) -> Option<(f64, f64)> {
    let line = stderr.lines().find(|l| l.contains("ns per entry hit"))?;
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok())
        .collect();
    Some((*nums.first()?, *nums.get(1)?))
}

/// Entry point.
pub fn run(rounds: usize, seconds: f64, agent: &Path, targets: &Path) -> Result<()> {
    let seconds = seconds.max(6.0);
    let configs: [(&str, &[&str]); 3] = [
        ("heap mode, 512 KiB mean, 5 % budget (default)", &[]),
        (
            "heap mode, 512 KiB mean, budget lifted (probes always on)",
            &["--max-overhead", "100"],
        ),
        (
            "every-call tracing, bcc memleak style (--heap-sample-bytes 1)",
            &["--heap-sample-bytes", "1", "--max-overhead", "100"],
        ),
    ];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut beside_ratios = Vec::new();
    let mut costs = None;
    let mut baseline_ops = Vec::new();
    for round in 0..rounds {
        for (i, (label, args)) in configs.iter().enumerate() {
            let (base, _, _) = run_once(targets, agent, seconds, None, false)?;
            let (with, _, err) = run_once(targets, agent, seconds, Some(args), false)?;
            costs = costs.or_else(|| probe_costs(&err));
            baseline_ops.push(base);
            let r = with / base.max(1.0);
            println!("round {round}: {label}: {with:.0} vs {base:.0} ops/s, ratio {r:.3}");
            ratios[i].push(r);
        }
        // Side by side: both loops in each run; only the first is a target.
        let (_, b0, _) = run_once(targets, agent, seconds, None, true)?;
        let (_, b1, _) = run_once(targets, agent, seconds, Some(&["--max-overhead", "100"]), true)?;
        let r = b1.unwrap_or(0.0) / b0.unwrap_or(1.0).max(1.0);
        println!("round {round}: non-target beside a heap-mode target: ratio {r:.3}");
        beside_ratios.push(r);
    }
    println!();
    println!(
        "malloc-heavy target (mallocloop-fp, 64-byte malloc+free pairs), {rounds} rounds of {seconds} s:"
    );
    println!(
        "  baseline: {:.0} malloc+free pairs/s (median)",
        super::median(baseline_ops)
    );
    if let Some((e, r)) = costs {
        println!(
            "  calibrated per-hit cost: entry probe {e:.0} ns, return probe {r:.0} ns (free: an entry probe)"
        );
    }
    for ((label, _), r) in configs.iter().zip(ratios) {
        println!("  {label}: throughput ratio {:.3} (median)", super::median(r));
    }
    println!(
        "  non-target malloc loop beside a heap-mode target (same binary and libc): ratio {:.3} (median)",
        super::median(beside_ratios)
    );
    Ok(())
}

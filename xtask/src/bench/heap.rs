//! `cargo xtask bench heap`: what heap mode costs a malloc-heavy target.
//!
//! The target is `mallocloop-fp` (64-byte malloc+free pairs as fast as it
//! goes, counted every second). Paired runs, ratios to the baseline run
//! right before each profiled one, medians over the rounds:
//! - heap mode at the default sampling (512 KiB) and the default budget
//!   (5 %: the governor duty-cycles the probes);
//! - the same with `--max-overhead 100`: the duty cycle keeps the probes'
//!   cost within the target's CPU time (trapping every call of a tight
//!   malloc loop costs hundreds of times the call, so even then the probes
//!   are mostly detached);
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
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// A running mallocloop and the `ops` lines it printed, with when.
struct Loop {
    child: Child,
    ops: Arc<Mutex<Vec<(Instant, f64)>>>,
}

impl Loop {
    fn start(targets: &Path, seconds: f64) -> Result<Self> {
        let mut child = Command::new(targets.join("mallocloop-fp"))
            .args(["--seconds", &format!("{seconds}")])
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
                    seen.lock().unwrap().push((Instant::now(), n));
                }
            }
        });
        Ok(Self { child, ops })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Mean ops/s of the seconds that ended in `(from, to]`: a mean, not
    /// a median, so that a second at a fraction of the speed counts.
    fn finish(mut self, from: Instant, to: Instant) -> f64 {
        let _ = self.child.wait();
        let v: Vec<f64> = self
            .ops
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t > from && *t <= to)
            .map(|(_, n)| *n)
            .collect();
        if v.is_empty() {
            return f64::NAN;
        }
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Runs one pair (a target, and `beside` a non-target next to it) for
/// `seconds` from when the agent (if `agent_args`) has attached. Returns
/// (target ops/s, non-target ops/s, agent stderr up to the attach).
fn run_once(
    targets: &Path,
    agent: &Path,
    seconds: f64,
    agent_args: Option<&[&str]>,
    beside: bool,
) -> Result<(f64, Option<f64>, String)> {
    // Long enough for the agent's start (load, calibration) and the window.
    let life = seconds + 6.0;
    let target = Loop::start(targets, life)?;
    let other = if beside {
        Some(Loop::start(targets, life)?)
    } else {
        None
    };
    let mut attached_at = Instant::now() + Duration::from_secs(2);
    let mut stderr = String::new();
    let out_dir = std::env::temp_dir().join(format!("flamewatch-bench-heap-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir)?;
    let mut profiler = None;
    if let Some(args) = agent_args {
        let pid = target.pid().to_string();
        let mut child = Command::new(agent)
            .args(["record", "--pid", &pid, "--mode", "heap", "--output"])
            .arg(&out_dir)
            .args(["--duration", &format!("{}s", seconds + 0.5), "--format", "json"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting flamewatch")?;
        // The window starts when the agent says the target is attached.
        let err = child.stderr.take().context("piped")?;
        let mut reader = BufReader::new(err);
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            stderr.push_str(&line);
            if line.contains("registered") {
                attached_at = Instant::now();
                break;
            }
            line.clear();
        }
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
        });
        profiler = Some(child);
    }
    let to = attached_at + Duration::from_secs_f64(seconds);
    let t = target.finish(attached_at, to);
    let o = other.map(|o| o.finish(attached_at, to));
    if let Some(mut p) = profiler {
        let _ = p.wait();
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
            "heap mode, 512 KiB mean, --max-overhead 100 (duty cycle within one CPU)",
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

//! `cargo xtask bench …`: speed lives here, measured side by side in one run.
//!
//! `overhead`: a CPU-bound target's throughput alone, with flamewatch, and
//! with `perf record -g` at the same rates. Every profiled run is paired
//! with a baseline run right before it, and the ratio of each pair is taken,
//! so drift on the machine cancels out; the median ratio over the rounds is
//! reported, beside the governor's own estimate. A second ratio uses
//! operations per CPU-second of the target, immune to preemption by other
//! work on the machine (it still sees interrupt and cache costs).

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

mod attach;
mod dashboard;
mod heap;
mod probes;
mod tcp;

/// One way of running the target.
#[derive(Clone, Copy, Debug)]
enum Profiler {
    None,
    Flamewatch {
        hz: u64,
        budget: Option<f64>,
        unwind: &'static str,
        mode: &'static str,
        /// The leaf fix-up on (off: `--no-leaf-fixup`).
        leaf: bool,
    },
    /// `perf record -e sched:sched_switch -g`: perf's way to see off-CPU stacks.
    PerfSched,
    Perf {
        hz: u64,
        dwarf: bool,
    },
}

impl Profiler {
    fn label(self) -> String {
        let base = self.base_label();
        match self {
            Self::Flamewatch { leaf: false, .. } => format!("{base}, --no-leaf-fixup"),
            _ => base,
        }
    }

    fn base_label(self) -> String {
        let unwind = |u: &str| {
            if u == "auto" {
                String::new()
            } else {
                format!(", --unwind {u}")
            }
        };
        match self {
            Self::None => "baseline (no profiler)".into(),
            Self::Flamewatch {
                mode: "offcpu",
                budget,
                ..
            } => {
                format!("flamewatch --mode offcpu, {} % budget", budget.unwrap_or(5.0))
            }
            Self::Flamewatch { hz, mode: "wall", .. } => format!("flamewatch --mode wall {hz} Hz"),
            Self::Flamewatch {
                hz,
                budget: None,
                unwind: u,
                ..
            } => format!("flamewatch {hz} Hz{}", unwind(u)),
            Self::Flamewatch {
                hz,
                budget: Some(b),
                unwind: u,
                ..
            } => {
                format!("flamewatch {hz} Hz, {b} % budget{}", unwind(u))
            }
            Self::PerfSched => "perf record -e sched:sched_switch -g".into(),
            Self::Perf { hz, dwarf: false } => format!("perf record -g {hz} Hz"),
            Self::Perf { hz, dwarf: true } => format!("perf --call-graph dwarf {hz} Hz"),
        }
    }
}

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    ops_per_s: f64,
    ops_per_cpu_s: f64,
    /// Ratios to the paired baseline run.
    ratio: f64,
    cpu_ratio: f64,
    estimate_pct: Option<f64>,
    effective_hz: Option<f64>,
    /// DWARF samples unwound and the unwinder's CPU seconds.
    unwound: Option<(f64, f64)>,
    profiler_cpu_s: Option<f64>,
    profiler_maxrss_kib: Option<i64>,
}

/// Entry point of `cargo xtask bench`.
pub fn run(which: &str, rounds: usize, seconds: f64, agent: &Path, targets: &Path) -> Result<()> {
    match which {
        "attach" => return attach::run(rounds, agent, targets),
        "heap" => return heap::run(rounds, seconds, agent, targets),
        "dashboard" => return dashboard::run(rounds, seconds, agent, targets),
        "probes" => return probes::run(rounds, seconds, agent, targets),
        // `--seconds` is the soak's length here (30 min by default).
        "soak" => return attach::soak(if seconds > 60.0 { seconds / 60.0 } else { 30.0 }, agent, targets),
        _ => {}
    }
    crate::setup::packages(&[("perf", "linux-perf")])?;
    let max_rate: u64 = std::fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100_000);
    match which {
        "overhead" => {
            let perf_high = 20_000.min(max_rate);
            let fw = |hz, budget| Profiler::Flamewatch {
                hz,
                budget,
                unwind: "auto",
                mode: "cpu",
                leaf: true,
            };
            // The leaf fix-up's cost: frame pointers with and without it.
            let fp = |leaf| Profiler::Flamewatch {
                hz: 999,
                budget: None,
                unwind: "fp",
                mode: "cpu",
                leaf,
            };
            let results = compare(
                "overhead",
                &targets.join("throughput-fp"),
                &[],
                &[
                    fw(99, None),
                    Profiler::Perf { hz: 99, dwarf: false },
                    fw(999, None),
                    fp(true),
                    fp(false),
                    Profiler::Perf {
                        hz: 999,
                        dwarf: false,
                    },
                    fw(20_000, Some(5.0)),
                    Profiler::Perf {
                        hz: perf_high,
                        dwarf: false,
                    },
                ],
                rounds,
                seconds,
                agent,
            )?;
            side_by_side(
                &results,
                fp(true),
                fp(false),
                "leaf fix-up at 999 Hz (--unwind fp)",
            );
            side_by_side(
                &results,
                fw(999, None),
                fp(true),
                "--unwind auto's check at 999 Hz (1 sample in 16 also copied and unwound with DWARF)",
            );
            Ok(())
        }
        "unwind" => {
            let fw = |hz, unwind| Profiler::Flamewatch {
                hz,
                budget: Some(100.0),
                unwind,
                mode: "cpu",
                leaf: true,
            };
            compare(
                "unwind (production build, no frame pointers; budget lifted to 100 % to measure the raw cost)",
                &targets.join("throughput"),
                &[],
                &[
                    fw(99, "fp"),
                    fw(99, "dwarf"),
                    Profiler::Perf { hz: 99, dwarf: true },
                    fw(999, "fp"),
                    fw(999, "dwarf"),
                    Profiler::Perf { hz: 999, dwarf: true },
                ],
                rounds,
                seconds,
                agent,
            )
            .map(drop)
        }
        "tcp" => tcp::run(seconds, agent, targets),
        "offcpu" => {
            let fw = |mode, budget| Profiler::Flamewatch {
                hz: 99,
                budget,
                unwind: "auto",
                mode,
                leaf: true,
            };
            compare(
                "off-CPU (sleepspin: ~50 µs of work / 50 µs sleep, thousands of context switches/s)",
                &targets.join("sleepspin-fp"),
                &["--spin-iters", "100000", "--sleep-us", "50"],
                &[
                    fw("offcpu", Some(5.0)),
                    fw("offcpu", Some(100.0)),
                    fw("wall", Some(5.0)),
                    Profiler::PerfSched,
                ],
                rounds,
                seconds,
                agent,
            )
            .map(drop)
        }
        other => {
            bail!("unknown benchmark '{other}' (available: overhead, unwind, offcpu, tcp, attach, soak)")
        }
    }
}

/// The `q` quantile (0..=1) of `v`, interpolated.
fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let x = q * (v.len() - 1) as f64;
    let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (x - lo as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A target process that lives through a whole comparison, its operation
/// counters in a file both sides map: windows with and without a profiler
/// are taken in the same process, so they compare the same code on the
/// same physical pages (separate processes of the same program differ by
/// several percent on this VM, more than what is measured).
struct Target {
    child: Child,
    counters: *const std::sync::atomic::AtomicU64,
    path: std::path::PathBuf,
}

/// Time between a profiler's attaching and its measured window: both
/// profilers start by reading the target's files and symbols, once.
const SETTLE: Duration = Duration::from_secs(1);

/// Slots of the counter file: one 64-bit counter every 64 bytes.
const COUNTER_SLOTS: usize = 64;

impl Target {
    fn start(program: &Path, args: &[&str], work: &Path) -> Result<Self> {
        let path = work.join("counters");
        std::fs::write(&path, vec![0u8; 4096])?;
        let mut child = Command::new(program)
            .args(args)
            .args(["--seconds", "1000000", "--counter"])
            .arg(&path)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        // The banner: the file is mapped, the workers run.
        let mut banner = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut banner)?;
        let file = std::fs::File::open(&path)?;
        // SAFETY: a shared read-only mapping of a 4 KiB file we created; it is
        // only read through atomics, as the target writes it with atomics.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            bail!("mmap {}: {}", path.display(), std::io::Error::last_os_error());
        }
        // Warm up: caches, page faults, the CPU's clocks.
        std::thread::sleep(Duration::from_secs(1));
        Ok(Self {
            child,
            counters: map.cast(),
            path,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Operations done so far, all threads.
    fn ops(&self) -> u64 {
        (0..COUNTER_SLOTS)
            // SAFETY: slot * 8 words stays inside the 4 KiB mapping.
            .map(|slot| unsafe { &*self.counters.add(slot * 8) }.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// CPU time of all the target's threads, seconds (from the scheduler's
    /// nanosecond clock, not the 10 ms ticks of /proc/PID/stat).
    fn cpu_s(&self) -> f64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return f64::NAN;
        };
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .sum::<f64>()
            / 1e9
    }

    /// Throughput over the next `seconds`: per wall second and per CPU second.
    fn window(&self, seconds: f64) -> (f64, f64) {
        let (ops0, cpu0, t0) = (self.ops(), self.cpu_s(), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let (ops1, cpu1, t1) = (self.ops(), self.cpu_s(), Instant::now());
        let ops = (ops1 - ops0) as f64;
        (ops / (t1 - t0).as_secs_f64(), ops / (cpu1 - cpu0).max(1e-9))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in start, signalling our child.
        unsafe {
            libc::munmap(self.counters as *mut libc::c_void, 4096);
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The throughput ratios of one configuration over the rounds.
#[derive(Clone, Debug)]
struct Ratios {
    label: String,
    median: f64,
    p25: f64,
    p75: f64,
    /// Median of the ratios of operations per CPU-second.
    cpu: f64,
    /// Median of the governor's overhead estimate, percent.
    estimate: Option<f64>,
}

/// Prints `a` beside `b` (both measured in the same run): their median
/// ratios to the baseline, the difference, and whether it is within the
/// noise (the wider of their p25-p75 spreads).
fn side_by_side(results: &[Ratios], a: Profiler, b: Profiler, what: &str) {
    let find = |p: Profiler| results.iter().find(|r| r.label == p.label());
    let (Some(a), Some(b)) = (find(a), find(b)) else {
        return;
    };
    let cost = (b.median - a.median) * 100.0;
    let noise = (a.p75 - a.p25).max(b.p75 - b.p25) * 100.0;
    println!(
        "  {what}: ratio {:.4} ({}) vs {:.4} ({}): costs {cost:.2} points of throughput \
         ({:.2} per CPU-second: ratio/CPU {:.4} vs {:.4}; governor's estimate {} vs {}), \
         noise (wider p25-p75) {noise:.2} points: {}",
        a.median,
        a.label,
        b.median,
        b.label,
        (b.cpu - a.cpu) * 100.0,
        a.cpu,
        b.cpu,
        a.estimate.map_or("-".into(), |e| format!("{e:.2} %")),
        b.estimate.map_or("-".into(), |e| format!("{e:.2} %")),
        if cost.abs() <= noise {
            "within noise"
        } else {
            "OUTSIDE the noise"
        }
    );
}

/// Measures `profiled` configurations against paired baseline windows of
/// one long-lived `target` process and prints the table. Returns each
/// configuration's ratios.
fn compare(
    title: &str,
    target: &Path,
    target_args: &[&str],
    profiled: &[Profiler],
    rounds: usize,
    seconds: f64,
    agent: &Path,
) -> Result<Vec<Ratios>> {
    let configs: Vec<Profiler> = std::iter::once(Profiler::None)
        .chain(profiled.iter().copied())
        .collect();
    let work = std::env::temp_dir().join(format!("flamewatch-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    println!(
        "{title} benchmark: {} {}, {seconds} s windows, {rounds} rounds; one target process throughout, \
         each profiled window (from 1 s after the profiler attached) between two baseline windows",
        target.display(),
        target_args.join(" ")
    );
    let process = Target::start(target, target_args, &work)?;
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); configs.len()];
    let baseline = || measure(Profiler::None, &process, agent, &work, seconds).context("baseline");
    for round in 1..=rounds {
        // Every profiled window sits between two baseline windows, and is
        // judged against their mean: a drift of the machine's speed cancels
        // within each sandwich. The configurations take turns going first.
        let mut before = baseline()?;
        let n = configs.len() - 1;
        for k in 0..n {
            let i = 1 + (k + round - 1) % n;
            let config = configs[i];
            let mut run = measure(config, &process, agent, &work, seconds)
                .with_context(|| format!("round {round}, {}", config.label()))?;
            let after = baseline()?;
            let base = Run {
                ops_per_s: (before.ops_per_s + after.ops_per_s) / 2.0,
                ops_per_cpu_s: (before.ops_per_cpu_s + after.ops_per_cpu_s) / 2.0,
                ratio: 1.0,
                cpu_ratio: 1.0,
                ..Run::default()
            };
            run.ratio = run.ops_per_s / base.ops_per_s;
            run.cpu_ratio = run.ops_per_cpu_s / base.ops_per_cpu_s;
            eprintln!(
                "  round {round}: {:<48} {:>12.0} ops/s, baseline {:>12.0}: ratio {:.4}",
                config.label(),
                run.ops_per_s,
                base.ops_per_s,
                run.ratio
            );
            results[0].push(base);
            results[i].push(run);
            before = after;
        }
    }
    drop(process);
    let _ = std::fs::remove_dir_all(&work);

    println!();
    println!(
        "{:<48} {:>12} {:>7} {:>15} {:>9} {:>9} {:>9} {:>7} {:>12} {:>9} {:>13}",
        "configuration",
        "ops/s median",
        "ratio",
        "ratio p25-p75",
        "ratio/CPU",
        "slowdown",
        "estimate",
        "eff. Hz",
        "profiler CPU",
        "max RSS",
        "unwound/s/core"
    );
    let mut verdicts = Vec::new();
    let mut ratios = Vec::new();
    for (config, runs) in configs.iter().zip(&results) {
        let ops = median(runs.iter().map(|r| r.ops_per_s).collect());
        let ratio = median(runs.iter().map(|r| r.ratio).collect());
        let cpu_ratio = median(runs.iter().map(|r| r.cpu_ratio).collect());
        // The spread of the pairs: on a shared VM single runs vary by
        // several percent, and the median is only as good as this.
        let spread = format!(
            "{:.3}-{:.3}",
            quantile(runs.iter().map(|r| r.ratio).collect(), 0.25),
            quantile(runs.iter().map(|r| r.ratio).collect(), 0.75)
        );
        ratios.push(Ratios {
            label: config.label(),
            median: ratio,
            p25: quantile(runs.iter().map(|r| r.ratio).collect(), 0.25),
            p75: quantile(runs.iter().map(|r| r.ratio).collect(), 0.75),
            cpu: cpu_ratio,
            estimate: {
                let e: Vec<f64> = runs.iter().filter_map(|r| r.estimate_pct).collect();
                (!e.is_empty()).then(|| median(e))
            },
        });
        let slowdown = (1.0 - ratio) * 100.0;
        let est = runs.iter().filter_map(|r| r.estimate_pct).collect::<Vec<_>>();
        let est = (!est.is_empty()).then(|| median(est));
        let hz = runs.iter().filter_map(|r| r.effective_hz).collect::<Vec<_>>();
        let hz = (!hz.is_empty()).then(|| median(hz));
        let cpu = runs.iter().filter_map(|r| r.profiler_cpu_s).collect::<Vec<_>>();
        let cpu = (!cpu.is_empty()).then(|| median(cpu) / seconds * 100.0);
        let rss = runs.iter().filter_map(|r| r.profiler_maxrss_kib).max();
        let unwound: (f64, f64) = runs
            .iter()
            .filter_map(|r| r.unwound)
            .fold((0.0, 0.0), |(n, s), (dn, ds)| (n + dn, s + ds));
        let per_core = (unwound.1 > 0.0).then(|| unwound.0 / unwound.1);
        let opt =
            |v: Option<f64>, unit: &str, prec: usize| v.map_or("-".into(), |v| format!("{v:.prec$}{unit}"));
        println!(
            "{:<48} {:>12.0} {:>7.4} {:>15} {:>9.4} {:>9} {:>9} {:>7} {:>12} {:>9} {:>13}",
            config.label(),
            ops,
            ratio,
            if matches!(config, Profiler::None) {
                "-".into()
            } else {
                spread
            },
            cpu_ratio,
            if matches!(config, Profiler::None) {
                "-".into()
            } else {
                format!("{slowdown:.2} %")
            },
            opt(est, " %", 2),
            opt(hz, "", 0),
            opt(cpu, " % core", 2),
            rss.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            opt(per_core, "", 0),
        );
        if let Profiler::Flamewatch { hz: req, budget, .. } = *config {
            let goal = match budget {
                Some(b) if b <= 5.0 => 0.95,
                None if req <= 99 => 0.995,
                _ => 0.0,
            };
            if goal > 0.0 {
                verdicts.push(format!(
                    "{}: ratio {ratio:.4} {} goal {goal}",
                    config.label(),
                    if ratio >= goal { "meets" } else { "MISSES" }
                ));
            }
            if let Some(est) = est {
                let ok = est >= slowdown - 1.0;
                verdicts.push(format!(
                    "{}: estimate {est:.2} % vs measured {slowdown:.2} %: {}",
                    config.label(),
                    if ok {
                        "within 1 point (or above)"
                    } else {
                        "UNDER-REPORTS by more than 1 point"
                    }
                ));
            }
        }
    }
    println!();
    for v in verdicts {
        println!("  {v}");
    }
    Ok(ratios)
}

/// One window of the running target under `config`: the profiler is
/// attached, the window measured, the profiler stopped (SIGINT, as an
/// engineer would) and its report read.
fn measure(config: Profiler, target: &Target, agent: &Path, work: &Path, seconds: f64) -> Result<Run> {
    let pid = target.pid();
    let out_dir = work.join("run");
    let mut profiler: Option<Child> = match config {
        Profiler::None => None,
        Profiler::Flamewatch {
            hz,
            budget,
            unwind,
            mode,
            leaf,
        } => {
            let mut cmd = Command::new(agent);
            cmd.args([
                "record",
                "--mode",
                mode,
                "--unwind",
                unwind,
                "--pid",
                &pid.to_string(),
                "--freq",
                &hz.to_string(),
                "--duration",
                "forever",
            ])
            .arg("--output")
            .arg(&out_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            if let Some(b) = budget {
                cmd.args(["--max-overhead", &b.to_string()]);
            }
            if !leaf {
                cmd.arg("--no-leaf-fixup");
            }
            let mut agent = cmd.spawn().context("starting flamewatch")?;
            // Logged once every target is attached, in every mode.
            wait_for_line(
                agent.stderr.take().context("stderr")?,
                "unwinding with",
                Duration::from_secs(20),
            )?;
            // What is measured is the steady state, not the start.
            std::thread::sleep(SETTLE);
            Some(agent)
        }
        Profiler::Perf { .. } | Profiler::PerfSched => {
            let data = work.join("perf.data");
            let _ = std::fs::remove_file(&data);
            let args: Vec<String> = match config {
                Profiler::Perf { hz, dwarf: true } => {
                    vec!["--call-graph".into(), "dwarf".into(), "-F".into(), hz.to_string()]
                }
                Profiler::Perf { hz, dwarf: false } => vec!["-g".into(), "-F".into(), hz.to_string()],
                _ => vec!["-e".into(), "sched:sched_switch".into(), "-g".into()],
            };
            let perf = Command::new("perf")
                .arg("record")
                .args(&args)
                .args(["-p", &pid.to_string(), "-o"])
                .arg(&data)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("starting perf")?;
            // perf opens its events within milliseconds; wait for its file.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !data.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(SETTLE);
            Some(perf)
        }
    };
    let (ops_per_s, ops_per_cpu_s) = target.window(seconds);
    let mut run = Run {
        ops_per_s,
        ops_per_cpu_s,
        ..Run::default()
    };
    if let Some(p) = profiler.take() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
        let (stdout, usage) = wait_rusage(p)?;
        run.profiler_cpu_s = Some(usage.0);
        run.profiler_maxrss_kib = Some(usage.1);
        if let Some(json) = stdout.lines().find(|l| l.ends_with(".json")) {
            let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
            run.estimate_pct = summary["overhead"]["measured_pct"].as_f64();
            run.effective_hz = summary["sampling"]["effective_hz"].as_f64();
            let u = &summary["sampling"]["unwind"];
            if let (Some(n), Some(cpu)) = (u["dwarf_samples"].as_f64(), u["unwinder_cpu_s"].as_f64()) {
                if n > 0.0 {
                    run.unwound = Some((n, cpu));
                }
            }
        }
        // The next window starts on a machine that is done with this one.
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    Ok(run)
}

/// Reads `stream` until a line contains `needle`, then keeps draining it in
/// the background (so the child never blocks on a full pipe).
fn wait_for_line(stream: impl std::io::Read + Send + 'static, needle: &str, timeout: Duration) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = needle.to_owned();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        let mut sent = false;
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            if !sent && line.contains(&wanted) {
                let _ = tx.send(());
                sent = true;
            }
            line.clear();
        }
    });
    rx.recv_timeout(timeout)
        .map_err(|_| anyhow::anyhow!("flamewatch printed no '{needle}' line within {timeout:?}"))
}

/// Waits for a child; returns its stdout and (CPU seconds, max RSS KiB).
fn wait_rusage(mut child: Child) -> Result<(String, (f64, i64))> {
    let mut stdout = String::new();
    if let Some(mut s) = child.stdout.take() {
        std::io::Read::read_to_string(&mut s, &mut stdout)?;
    }
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child, writing into locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    if pid < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((stdout, (tv(usage.ru_utime) + tv(usage.ru_stime), usage.ru_maxrss)))
}

//! `cargo xtask bench attach` and `cargo xtask bench soak`: what the
//! long-lived engine buys — how fast a trigger is answered, how soon
//! `record` samples, what the idle daemon costs — and that a daemon left
//! running does not grow.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::median;

/// A child killed (SIGINT, then SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(program: &Path, args: &[&str]) -> Result<Proc> {
    Ok(Proc(
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?,
    ))
}

/// What a process holds: BPF programs, BPF maps, descriptors, threads, RSS.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Held {
    /// BPF program descriptors.
    pub progs: usize,
    /// BPF map descriptors.
    pub maps: usize,
    /// All descriptors.
    pub fds: usize,
    /// Threads.
    pub threads: usize,
    /// Resident memory, MiB.
    pub rss_mib: f64,
}

/// Reads what `pid` holds from /proc.
pub fn held(pid: u32) -> Held {
    let mut h = Held::default();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            h.fds += 1;
            match std::fs::read_link(e.path()).map(|l| l.display().to_string()) {
                Ok(l) if l == "anon_inode:bpf-prog" => h.progs += 1,
                Ok(l) if l == "anon_inode:bpf-map" => h.maps += 1,
                _ => {}
            }
        }
    }
    h.threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    h.rss_mib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0);
    h
}

/// CPU time of every thread of `pid`, seconds (scheduler clock).
fn cpu_s(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
                .sum::<f64>()
                / 1e9
        })
        .unwrap_or(0.0)
}

/// A `watch` daemon over `pids`, writing into `dir`, once its socket answers.
fn daemon(agent: &Path, dir: &Path, pids: &[u32], extra: &str) -> Result<(Proc, PathBuf)> {
    let socket = dir.join("control.sock");
    let mut config = format!(
        "output = {:?}\ncontrol_socket = {:?}\nmetrics_addr = \"off\"\n",
        dir.display().to_string(),
        socket.display().to_string()
    );
    for pid in pids {
        config += &format!("[[target]]\npid = {pid}\n{extra}\n");
    }
    let path = dir.join("watch.toml");
    std::fs::write(&path, config)?;
    let d = spawn(
        agent,
        &["watch", "--config", path.to_str().context("utf-8 path")?],
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline {
            bail!("the daemon did not open {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((d, socket))
}

/// Runs `flamewatch trigger` and returns its wall time and the summary.
fn trigger(agent: &Path, socket: &Path, pid: u32, args: &[&str]) -> Result<(Duration, serde_json::Value)> {
    let t0 = Instant::now();
    let out = Command::new(agent)
        .args(["trigger", "--pid", &pid.to_string(), "--control-socket"])
        .arg(socket)
        .args(args)
        .output()?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!(
            "trigger {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let json = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.ends_with(".json"))
        .context("no summary printed")?
        .to_owned();
    Ok((took, serde_json::from_str(&std::fs::read_to_string(json)?)?))
}

/// Time from starting `record` to its perf events sampling the target (the
/// "sampling at" line; a busy target is sampled within one period of it).
fn record_start(agent: &Path, pid: u32, work: &Path) -> Result<Duration> {
    let t0 = Instant::now();
    let mut child = Command::new(agent)
        .args([
            "record",
            "--pid",
            &pid.to_string(),
            "--duration",
            "1s",
            "--output",
        ])
        .arg(work)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut at = None;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        if at.is_none() && line.contains("sampling at") {
            at = Some(t0.elapsed());
        }
    }
    child.wait()?;
    at.context("record never said it was sampling")
}

/// `cargo xtask bench attach`.
pub fn run(rounds: usize, agent: &Path, targets: &Path) -> Result<()> {
    let work = tempdir("attach")?;
    let busy = spawn(&targets.join("hotpaths-fp"), &["--seconds", "100000"])?;
    let (port, health) = (crate::free_port()?.to_string(), crate::free_port()?.to_string());
    let idle = spawn(
        &targets.join("logcaster"),
        &["--port", &port, "--health-port", &health],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let rounds = rounds.max(20);

    let starts: Vec<f64> = (0..rounds)
        .map(|_| record_start(agent, busy.0.id(), &work).map(|d| d.as_secs_f64() * 1e3))
        .collect::<Result<_>>()?;

    let (d, socket) = daemon(agent, &work, &[busy.0.id(), idle.0.id()], "")?;
    // Idle: continuous profiling of both targets, no session.
    std::thread::sleep(Duration::from_secs(5));
    let (c0, t0) = (cpu_s(d.0.id()), Instant::now());
    std::thread::sleep(Duration::from_secs(30));
    let idle_pct = 100.0 * (cpu_s(d.0.id()) - c0) / t0.elapsed().as_secs_f64();
    let mut boost = Vec::new();
    let mut share = Vec::new();
    let mut since = Vec::new();
    for _ in 0..rounds {
        let cpu0 = cpu_s(busy.0.id());
        let (took, s) = trigger(agent, &socket, busy.0.id(), &["--duration", "1s", "--freq", "99"])?;
        let cpu = cpu_s(busy.0.id()) - cpu0;
        boost.push(took.as_secs_f64());
        let samples = s["sampling"]["samples"].as_f64().unwrap_or(0.0);
        // 99 Hz of the target's CPU time while the trigger ran (on a busy
        // machine the busy target gets less than its core).
        share.push(100.0 * samples / (99.0 * cpu.min(took.as_secs_f64())).max(1.0));
        let (took, _) = trigger(agent, &socket, busy.0.id(), &["--since", "30s"])?;
        since.push(took.as_secs_f64());
    }
    let held = held(d.0.id());
    drop(d);
    println!(
        "\nbench attach ({rounds} rounds, medians; this machine: {} cores)",
        num_cpus()
    );
    println!("| measure | value | goal |");
    println!("|---|---|---|");
    println!(
        "| `record` start to first sample (calibration cached) | {:.0} ms | ≤ 100 ms |",
        median(starts)
    );
    println!(
        "| `trigger --duration 1s` returns | {:.2} s | ≤ 1.5 s |",
        median(boost)
    );
    println!(
        "| samples of that trigger, of 99 Hz x the target's CPU time | {:.0} % | ≥ 90 % |",
        median(share)
    );
    println!(
        "| `trigger --since 30s` returns | {:.2} s | ≤ 0.5 s |",
        median(since)
    );
    println!("| daemon CPU, 2 targets at continuous 19 Hz, idle | {idle_pct:.2} % of a core | ≤ 0.5 % |");
    println!(
        "| daemon after the rounds | {} BPF programs, {} maps, {} fds, {} threads, {:.1} MiB RSS | |",
        held.progs, held.maps, held.fds, held.threads, held.rss_mib
    );
    Ok(())
}

/// `cargo xtask bench soak`: two targets, a 10 s schedule of 5 s sessions,
/// for `minutes`; what the daemon holds, sampled every 2 s.
pub fn soak(minutes: f64, agent: &Path, targets: &Path) -> Result<()> {
    let work = tempdir("soak")?;
    let a = spawn(&targets.join("hotpaths-fp"), &["--seconds", "100000"])?;
    let (port, health) = (crate::free_port()?.to_string(), crate::free_port()?.to_string());
    let b = spawn(
        &targets.join("logcaster"),
        &["--port", &port, "--health-port", &health],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let schedule = "[[target.schedule]]\ncron = \"*/10 * * * * *\"\nduration = \"5s\"\nfreq_hz = 99\n";
    let (d, _socket) = daemon(agent, &work, &[a.0.id(), b.0.id()], schedule)?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(minutes * 60.0);
    let mut samples: Vec<(f64, Held)> = Vec::new();
    let mut last_print = 0.0;
    println!("| minute | BPF programs | maps | fds | threads | RSS MiB | sessions written |");
    println!("|---|---|---|---|---|---|---|");
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(2));
        let t = start.elapsed().as_secs_f64() / 60.0;
        let h = held(d.0.id());
        if h.fds == 0 {
            bail!("the daemon exited during the soak");
        }
        samples.push((t, h));
        if t - last_print >= 1.0 || Instant::now() >= end {
            last_print = t;
            let written = std::fs::read_dir(&work)
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                        .count()
                })
                .unwrap_or(0);
            println!(
                "| {t:.1} | {} | {} | {} | {} | {:.1} | {written} |",
                h.progs, h.maps, h.fds, h.threads, h.rss_mib
            );
        }
    }
    drop(d);
    report_soak(&samples)
}

/// Flatness after warm-up (minute 2), as the engine issue asks.
fn report_soak(samples: &[(f64, Held)]) -> Result<()> {
    let after: Vec<&Held> = samples
        .iter()
        .filter(|(t, _)| *t >= 2.0)
        .map(|(_, h)| h)
        .collect();
    let (Some(first), Some(last)) = (after.first(), after.last()) else {
        println!("(shorter than the 2-minute warm-up: nothing to compare)");
        return Ok(());
    };
    let range = |f: &dyn Fn(&Held) -> usize| {
        let v: Vec<usize> = after.iter().map(|h| f(h)).collect();
        (*v.iter().min().unwrap_or(&0), *v.iter().max().unwrap_or(&0))
    };
    let progs = range(&|h| h.progs);
    let maps = range(&|h| h.maps);
    let fds = range(&|h| h.fds);
    let threads = range(&|h| h.threads);
    let growth = last.rss_mib - first.rss_mib;
    println!(
        "\nafter warm-up: BPF programs {}..{}, maps {}..{}, fds {}..{}, threads {}..{}; RSS {:.1} -> {:.1} MiB ({growth:+.1} MiB)",
        progs.0, progs.1, maps.0, maps.1, fds.0, fds.1, threads.0, threads.1, first.rss_mib, last.rss_mib
    );
    if progs.0 != progs.1 || maps.0 != maps.1 {
        bail!("the daemon's BPF programs or maps changed between sessions and gaps");
    }
    if growth > 8.0 {
        bail!("RSS grew {growth:.1} MiB after warm-up (want at most 8)");
    }
    Ok(())
}

fn tempdir(what: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("flamewatch-bench-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

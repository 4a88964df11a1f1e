//! `cargo xtask bench probes`: what latency probes (uprobe at entry,
//! uretprobe at return) cost.
//!
//! - Throughput of a CPU-bound target (callrate) calling the probed
//!   function 1 000 and 100 000 times a second, probed (budget lifted to
//!   100 % so the cost shows) against a baseline run right before it; the
//!   median ratio over the rounds, and the per-call cost it implies, beside
//!   the agent's calibrated cost and what the governor decides at the
//!   default budget (probe, or refuse).
//! - Other processes untouched: a process calling the C library's `rand_r`
//!   100 000 times a second while another process's `rand_r` is probed,
//!   against the same without the probe (the ratio should be ≥ 0.99).

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

/// Children killed when a run ends, however it ends.
struct Guard(Vec<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A callrate started and waiting for SIGUSR1 (or running, without `wait`).
fn callrate(targets: &Path, rate: u64, seconds: f64, libc: bool, wait: bool) -> Result<(Child, u32)> {
    let mut cmd = Command::new(targets.join("callrate"));
    cmd.args(["--rate", &rate.to_string(), "--seconds", &seconds.to_string()]);
    if libc {
        cmd.arg("--libc");
    }
    if wait {
        cmd.arg("--wait-start");
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().context("starting callrate")?;
    let mut banner = String::new();
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    out.read_line(&mut banner)?;
    child.stdout = Some(out.into_inner());
    let pid = child.id();
    Ok((child, pid))
}

/// Its `units_per_s` once it is done.
fn units_per_s(child: &mut Child) -> Result<f64> {
    let mut text = String::new();
    child.stdout.take().context("stdout")?.read_to_string(&mut text)?;
    child.wait()?;
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix("units_per_s=")?.parse().ok())
        .context("callrate printed no units_per_s")
}

fn start(child: u32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child as i32, libc::SIGUSR1) };
}

/// The agent probing `function` of `pid`; returns it once "probing" is
/// logged, or its refusal line if it exits first.
fn probe(
    agent: &Path,
    pid: u32,
    function: &str,
    budget: &str,
    seconds: f64,
    out: &Path,
) -> Result<(Child, Option<String>)> {
    let mut fw = Command::new(agent)
        .args(["latency", "--pid", &pid.to_string(), "--function", function])
        .args(["--max-overhead", budget, "--duration", &format!("{seconds}s")])
        .arg("--output")
        .arg(out)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting flamewatch latency")?;
    let (tx, rx) = mpsc::channel();
    let stderr = fw.stderr.take().context("stderr")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("probing ") || line.starts_with("flamewatch:") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(90))
        .context("flamewatch latency did not start")?;
    let refused = line.starts_with("flamewatch:").then_some(line);
    Ok((fw, refused))
}

/// SIGINT, then wait: the agent detaches and writes its files.
fn stop(agent: &mut Child) -> Result<()> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGINT) };
    agent.wait()?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The governor's decision at the default budget, and the calibrated cost.
fn decision(agent: &Path, targets: &Path, rate: u64, work: &Path) -> Result<(String, Option<f64>)> {
    let (child, pid) = callrate(targets, rate, 30.0, false, false)?;
    let guard = Guard(vec![child]);
    let (mut fw, refused) = probe(agent, pid, "probed_call", "5", 2.0, work)?;
    if let Some(r) = refused {
        let _ = fw.wait();
        return Ok((format!("refused: {}", r.trim_start_matches("flamewatch: ")), None));
    }
    let mut text = String::new();
    fw.stdout.take().context("stdout")?.read_to_string(&mut text)?;
    fw.wait()?;
    drop(guard);
    let json = text
        .lines()
        .find(|l| l.ends_with(".latency.json"))
        .context("no latency.json")?;
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
    Ok((
        v["probe"]["decision"].as_str().unwrap_or_default().to_owned(),
        v["probe"]["cost_ns_per_call"].as_f64(),
    ))
}

/// One paired round at `rate`: baseline and probed units/s.
fn pair(agent: &Path, targets: &Path, rate: u64, seconds: f64, work: &Path) -> Result<(f64, f64, f64)> {
    let (mut base, pid) = callrate(targets, rate, seconds, false, true)?;
    start(pid);
    let u0 = units_per_s(&mut base)?;
    let (child, pid) = callrate(targets, rate, seconds, false, true)?;
    let mut guard = Guard(vec![child]);
    let (fw, refused) = probe(agent, pid, "probed_call", "100", seconds + 30.0, work)?;
    if let Some(r) = refused {
        bail!("probing refused even at a 100 % budget: {r}");
    }
    guard.0.push(fw);
    start(pid);
    let u1 = units_per_s(&mut guard.0[0])?;
    // The agent ends with its target, detaching first (a killed one's
    // probes are torn down by the kernel while the next run attaches).
    guard.0[1].wait()?;
    let calls = rate as f64 * u1 / u0;
    Ok((u0, u1, calls))
}

/// One paired round of the bystander: its units/s without and with another
/// process's `rand_r` probed.
fn bystander(agent: &Path, targets: &Path, seconds: f64, work: &Path) -> Result<(f64, f64)> {
    let rate = 100_000;
    let (target, tpid) = callrate(targets, rate, 600.0, true, false)?;
    let mut guard = Guard(vec![target]);
    let (mut other, opid) = callrate(targets, rate, seconds, true, true)?;
    start(opid);
    let u0 = units_per_s(&mut other)?;
    let (fw, refused) = probe(agent, tpid, "libc:rand_r", "100", seconds + 30.0, work)?;
    if let Some(r) = refused {
        bail!("probing refused: {r}");
    }
    guard.0.push(fw);
    let (mut other, opid) = callrate(targets, rate, seconds, true, true)?;
    start(opid);
    let u1 = units_per_s(&mut other)?;
    stop(&mut guard.0[1])?;
    Ok((u0, u1))
}

/// Entry point.
pub fn run(rounds: usize, seconds: f64, agent: &Path, targets: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("flamewatch-bench-probes-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = measure_all(rounds, seconds, agent, targets, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure_all(rounds: usize, seconds: f64, agent: &Path, targets: &Path, work: &Path) -> Result<()> {
    println!("probes: entry + return uprobes on a function called N times a second by a CPU-bound target");
    println!("({rounds} paired rounds of {seconds} s, medians; probed runs with --max-overhead 100 to show the cost)\n");
    println!(
        "{:>12}  {:>10}  {:>14}  {:>13}  governor at the default 5 % budget",
        "calls/s", "ratio", "cost/call µs", "calibrated µs"
    );
    for rate in [1_000u64, 100_000] {
        let (mut ratios, mut costs) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (u0, u1, calls) = pair(agent, targets, rate, seconds, work)?;
            ratios.push(u1 / u0);
            // The share of time lost, over the calls made in it.
            costs.push((1.0 - u1 / u0) / calls * 1e6);
        }
        let (decision, calibrated) = decision(agent, targets, rate, work)?;
        println!(
            "{rate:>12}  {:>10.4}  {:>14.2}  {:>13}  {decision}",
            median(ratios),
            median(costs),
            calibrated.map_or("-".into(), |c| format!("{:.2}", c / 1e3)),
        );
    }
    let mut ratios = Vec::new();
    for _ in 0..rounds {
        let (u0, u1) = bystander(agent, targets, seconds, work)?;
        ratios.push(u1 / u0);
    }
    let r = median(ratios.clone());
    println!(
        "\nother processes untouched: a process calling rand_r 100 000 times/s while another's rand_r is probed: \
         ratio {r:.4} (rounds {}) {}",
        ratios.iter().map(|x| format!("{x:.4}")).collect::<Vec<_>>().join(" "),
        if r >= 0.99 { "ok (≥ 0.99)" } else { "UNDER 0.99" }
    );
    Ok(())
}

//! `cargo xtask bench tcp`: how many TCP state transitions per second the
//! TCP tracking follows without losing an event, and what one costs in the
//! kernel.
//!
//! LogCaster's stand-in runs its `timewait` incident (the server closes
//! every connection first) while its load client churns connections at
//! growing rates. Both are targets of `flamewatch tcp`, so both ends'
//! transitions are attributed (10 per connection). Each rate runs twice:
//! counters only (TIME_WAIT entries go through the ring buffer), and with
//! `--events`, where every transition and reset travels through the ring
//! buffer to the agent. Reported per run: connections/s, attributed
//! transitions/s, events lost (ring buffer or agent queue full), and the
//! programs' mean run time per run from the kernel's BPF statistics.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
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

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `key=value` numbers of a line.
fn fields(line: &str) -> HashMap<String, f64> {
    line.split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// What one run measured.
#[derive(Debug, Default, Clone, Copy)]
struct Measure {
    connections_per_s: f64,
    transitions_per_s: f64,
    lost: f64,
    ns_per_run: f64,
    runs: f64,
    skipped: f64,
}

/// One run: a fresh server, a held client, the agent, `seconds` of load.
fn measure(
    agent: &Path,
    targets: &Path,
    rate: u64,
    detail: bool,
    seconds: f64,
    work: &Path,
) -> Result<Measure> {
    let (port, health) = (free_port()?, free_port()?);
    let mut guard = Guard(Vec::new());
    let mut server = Command::new(targets.join("logcaster"))
        .args(["--port", &port.to_string(), "--health-port", &health.to_string()])
        .args(["--incident", "timewait", "--workers", "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting logcaster")?;
    let mut banner = String::new();
    BufReader::new(server.stdout.take().context("stdout")?).read_line(&mut banner)?;
    let server_pid = server.id();
    guard.0.push(server);

    // Held at the starting line so that it is a target before it connects.
    let mut client = Command::new("sh")
        .arg("-c")
        .arg(r#"read go && exec "$0" "$@""#)
        .arg(targets.join("logcaster-load"))
        .args(["--port", &port.to_string(), "--connections", "4", "--churn"])
        .args(["--rate", &rate.to_string(), "--duration", &seconds.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting logcaster-load")?;
    let client_pid = client.id();
    let mut client_in = client.stdin.take().context("stdin")?;
    let mut client_out = client.stdout.take().context("stdout")?;
    guard.0.push(client);

    let out_path = work.join(format!("tcp-{rate}-{detail}.out"));
    let mut cmd = Command::new(agent);
    cmd.args([
        "tcp",
        "--pid",
        &server_pid.to_string(),
        "--pid",
        &client_pid.to_string(),
    ]);
    if detail {
        cmd.arg("--events");
    }
    let mut fw = cmd
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(Stdio::piped())
        .spawn()
        .context("starting flamewatch tcp")?;
    let ready = wait_for_lines(fw.stderr.take().context("stderr")?, "tracking TCP", 2);
    let fw_pid = fw.id();
    guard.0.push(fw);
    ready
        .recv_timeout(Duration::from_secs(30))
        .context("flamewatch tcp did not start")?;

    client_in.write_all(b"go\n")?;
    drop(client_in);
    let mut report = String::new();
    client_out.read_to_string(&mut report)?;
    let load = fields(report.lines().last().unwrap_or_default());
    // One more poll of the agent after the last connection.
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(fw_pid as i32, libc::SIGINT) };
    if let Some(fw) = guard.0.last_mut() {
        let status = fw.wait()?;
        if !status.success() {
            bail!("flamewatch tcp failed ({status})");
        }
    }
    let out = std::fs::read_to_string(&out_path)?;
    let _ = std::fs::remove_file(&out_path);
    let last = |prefix: &str, pid: Option<u32>| -> HashMap<String, f64> {
        out.lines()
            .rev()
            .filter(|l| l.starts_with(prefix))
            .find(|l| pid.is_none_or(|p| l.contains(&format!(" pid={p} "))))
            .map(fields)
            .unwrap_or_default()
    };
    let (s, c, p) = (
        last("tcp ", Some(server_pid)),
        last("tcp ", Some(client_pid)),
        last("tcp-programs ", None),
    );
    let get = |m: &HashMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    let duration = get(&load, "duration_s").max(1e-9);
    Ok(Measure {
        connections_per_s: get(&load, "connects") / duration,
        transitions_per_s: (get(&s, "transitions") + get(&c, "transitions")) / duration,
        lost: get(&s, "lost_events") + get(&c, "lost_events"),
        ns_per_run: get(&p, "ns_per_run"),
        runs: get(&p, "runs"),
        skipped: get(&p, "skipped_runs"),
    })
}

/// A channel that fires once `needle` appeared on `count` lines of `stream`
/// (which is drained in the background afterwards).
fn wait_for_lines(
    stream: impl std::io::Read + Send + 'static,
    needle: &'static str,
    count: usize,
) -> std::sync::mpsc::Receiver<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let (mut line, mut seen) = (String::new(), 0);
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            if line.contains(needle) {
                seen += 1;
                if seen == count {
                    let _ = tx.send(());
                }
            }
            line.clear();
        }
    });
    rx
}

/// Entry point of `cargo xtask bench tcp`.
pub fn run(seconds: f64, agent: &Path, targets: &Path) -> Result<()> {
    let work = std::env::temp_dir().join(format!("flamewatch-bench-tcp-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    println!(
        "tcp benchmark: logcaster (timewait incident) and logcaster-load --churn, both targets of \
         `flamewatch tcp`; {seconds} s per run; rate 0 = as fast as the client goes"
    );
    println!();
    println!(
        "{:<26} {:>9} {:>10} {:>14} {:>7} {:>12} {:>10} {:>8}",
        "mode", "rate", "conn/s", "transitions/s", "lost", "prog runs", "ns/run", "skipped"
    );
    // Best zero-loss run per mode: (transitions/s, skipped runs, runs).
    let mut best: HashMap<bool, (f64, f64, f64)> = HashMap::new();
    let mut costs = Vec::new();
    for detail in [false, true] {
        for rate in [1000u64, 2000, 4000, 8000, 0] {
            let m = measure(agent, targets, rate, detail, seconds, &work)
                .with_context(|| format!("rate {rate}, detail {detail}"))?;
            println!(
                "{:<26} {:>9} {:>10.0} {:>14.0} {:>7} {:>12} {:>10.0} {:>8}",
                if detail {
                    "every event to the agent"
                } else {
                    "counters (+ TIME_WAIT)"
                },
                if rate == 0 {
                    "max".to_owned()
                } else {
                    rate.to_string()
                },
                m.connections_per_s,
                m.transitions_per_s,
                m.lost,
                m.runs,
                m.ns_per_run,
                m.skipped
            );
            if m.lost == 0.0 {
                let b = best.entry(detail).or_default();
                if m.transitions_per_s > b.0 {
                    *b = (m.transitions_per_s, m.skipped, m.runs);
                }
            }
            costs.push((detail, m.ns_per_run));
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    println!();
    for detail in [false, true] {
        let label = if detail {
            "every event to the agent"
        } else {
            "counters"
        };
        let ns: Vec<f64> = costs.iter().filter(|c| c.0 == detail).map(|c| c.1).collect();
        let (rate, skipped, runs) = best.get(&detail).copied().unwrap_or_default();
        println!(
            "  {label}: sustained {rate:.0} attributed transitions/s with zero lost events \
             (the kernel skipped {skipped:.0} of {runs:.0} program runs: another BPF program was \
             running on that CPU); {:.0}-{:.0} ns per program run in the kernel",
            ns.iter().copied().fold(f64::INFINITY, f64::min),
            ns.iter().copied().fold(0.0, f64::max),
        );
    }
    Ok(())
}

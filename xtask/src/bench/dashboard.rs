//! `cargo xtask bench dashboard`: what an open dashboard costs the daemon.
//!
//! One daemon watches a CPU-bound target (`hotpaths-fp`) with its listener
//! on loopback. Windows of `--seconds` alternate: no client, then a
//! dashboard open — what the page does when loaded (the page and its
//! scripts, `/api/targets`, the history of each chart, `/api/sessions`),
//! then its Server-Sent Events stream read as it comes, plus the refresh of
//! `/api/targets` the page makes after events. The daemon's CPU time
//! (utime + stime of its process) is compared window by window; medians.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// The charts the page draws per target.
const METRICS: &[&str] = &["cpu_pct", "rss_mb", "threads", "fds", "time_wait"];

/// Kills its children on drop.
struct Guard(Vec<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One HTTP/1.1 GET; the status and body length.
fn get(addr: &str, path: &str) -> Result<(u16, usize)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, buf.len()))
}

/// The daemon's CPU seconds so far (utime + stime, all its threads).
fn cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((f[11].parse::<f64>()? + f[12].parse::<f64>()?) / hz)
}

/// A dashboard opened: the page's loads, then its event stream read until
/// `stop`, refreshing `/api/targets` after events (at most every 500 ms, as
/// the page does). Returns the bytes of events read.
fn open_dashboard(addr: String, stop: Arc<AtomicBool>, bytes: Arc<AtomicU64>) -> Result<()> {
    for path in [
        "/",
        "/assets/app.js",
        "/assets/app.css",
        "/assets/uplot.js",
        "/assets/uplot.css",
        "/api/targets",
        "/api/sessions",
    ] {
        let (status, _) = get(&addr, path)?;
        if status != 200 {
            bail!("GET {path}: {status}");
        }
    }
    for m in METRICS {
        get(
            &addr,
            &format!("/api/targets/hotpaths-fp/series?metric={m}&since=3600s"),
        )?;
    }
    let mut s = TcpStream::connect(&addr)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    write!(
        s,
        "GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    )?;
    let mut buf = [0u8; 16384];
    let mut last_refresh = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => bail!("the event stream ended"),
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
                if last_refresh.elapsed() >= Duration::from_millis(500) {
                    get(&addr, "/api/targets")?;
                    last_refresh = Instant::now();
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The daemon, once its listener answers with the target in it.
fn start_daemon(agent: &Path, pid: u32, work: &Path, port: u16) -> Result<(Child, String)> {
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(agent)
        .args(["watch", "--pid", &pid.to_string(), "--metrics-addr", &addr])
        .arg("--output")
        .arg(work.join("out"))
        .arg("--control-socket")
        .arg(work.join("control.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting flamewatch watch")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if get(&addr, "/api/targets").is_ok_and(|(s, n)| s == 200 && n > 200) {
            return Ok((child, addr));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("the daemon's listener did not come up on {addr}")
}

/// Entry point.
pub fn run(rounds: usize, seconds: f64, agent: &Path, targets: &Path) -> Result<()> {
    let work = std::env::temp_dir().join(format!("flamewatch-bench-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = measure(rounds, seconds, agent, targets, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn measure(rounds: usize, seconds: f64, agent: &Path, targets: &Path, work: &Path) -> Result<()> {
    let target = Command::new(targets.join("hotpaths-fp"))
        .args(["--ratio", "2:1", "--seconds", "100000"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting hotpaths-fp")?;
    let pid = target.id();
    let mut guard = Guard(vec![target]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let (daemon, addr) = start_daemon(agent, pid, work, port)?;
    let dpid = daemon.id();
    guard.0.push(daemon);
    // Past the start-up work (calibration, first discovery).
    std::thread::sleep(Duration::from_secs(5));
    let window = Duration::from_secs_f64(seconds);
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let mut events = 0;
    for _ in 0..rounds {
        let c0 = cpu_s(dpid)?;
        std::thread::sleep(window);
        off.push(100.0 * (cpu_s(dpid)? - c0) / seconds);

        let (stop, bytes) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let c0 = cpu_s(dpid)?;
        let client = {
            let (addr, stop, bytes) = (addr.clone(), stop.clone(), bytes.clone());
            std::thread::spawn(move || open_dashboard(addr, stop, bytes))
        };
        std::thread::sleep(window);
        let c1 = cpu_s(dpid)?;
        stop.store(true, Ordering::Relaxed);
        client
            .join()
            .map_err(|_| anyhow::anyhow!("the client panicked"))??;
        on.push(100.0 * (c1 - c0) / seconds);
        events += bytes.load(Ordering::Relaxed);
    }
    let (m_off, m_on) = (super::median(off.clone()), super::median(on.clone()));
    let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" ");
    println!("dashboard: the daemon's CPU (% of a core) watching hotpaths-fp, {rounds} rounds of {seconds} s each way");
    println!("  no client:        {m_off:6.2} %   (rounds {})", fmt(&off));
    println!(
        "  dashboard open:   {m_on:6.2} %   (rounds {}; {} KiB of events read)",
        fmt(&on),
        events / 1024
    );
    let more = m_on - m_off;
    println!(
        "  an open dashboard costs {more:.2} % of a core more: {}",
        if more <= 0.5 {
            "ok (≤ 0.5 %)"
        } else {
            "OVER 0.5 %"
        }
    );
    Ok(())
}

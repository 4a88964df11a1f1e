//! `watch` with latency probes (`[[target.probe]]`): the game-server
//! preset probes its frame function; its frame rules fire on the
//! frame-spike incident, their emergency is a slow-call profile, and the
//! agent's p99 on /metrics matches the server's own.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use flamewatch_e2e::*;
use serde_json::Value;

/// GET over plain HTTP/1.0: the body.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text.split_once("\r\n\r\n")?.1.to_owned())
}

fn alerts(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("alerts.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn find_alert(dir: &Path, rule: &str, status: &str) -> Option<Value> {
    alerts(dir)
        .into_iter()
        .find(|a| a["rule"] == rule && a["status"] == status)
}

/// The value of the first /metrics line starting with `series` (its name
/// and labels, up to a label that follows).
fn metric(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `promtool check metrics` (its lint included) accepts `body`.
fn promtool_passes(body: &str) {
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian prometheus)");
    check.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool: {said}");
}

/// `flamewatch watch` on a config of `body` (after the output folder and
/// control socket in `dir`), written to `dir/flamewatch.toml`.
fn watch(dir: &Path, body: &str) -> TestProcess {
    let config = dir.join("flamewatch.toml");
    let text = format!(
        "output = {:?}\ncontrol_socket = {:?}\n{body}",
        dir.display().to_string(),
        dir.join("control.sock").display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    let mut daemon = Command::new(flamewatch_bin());
    daemon
        .args(["watch", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    TestProcess::spawn(daemon)
}

/// The game-server preset watching pid `pid`, metrics on `addr`, short
/// emergency profiles.
fn preset_config(pid: u32, addr: &str) -> String {
    let preset = std::fs::read_to_string(workspace_root().join("configs/game-server.toml")).unwrap();
    format!(
        "metrics_addr = {addr:?}\n{}\n[emergency]\nduration = \"6s\"\n",
        preset.replace("process = \"game-server\"", &format!("pid = {pid}"))
    )
}

/// Test that the game server's frame-spike incident, watched with its
/// preset, fires the frame p99 and frame-drop rules, that the p99 rule's
/// emergency is a slow-call profile led by physics_step, and that the
/// agent's p99 of the frame function (/metrics) is within 5 % of the
/// server's own frame_p99_us.
#[test]
fn frame_spike_rules_and_slow_profile() {
    if !privileged("frame_spike_rules_and_slow_profile") {
        return;
    }
    let _turn = cpu_bound_turn();
    let dir = output_dir();
    let port = free_udp_port();
    let mut cmd = Command::new(target_bin("game-server"));
    cmd.args(["--port", &port.to_string()]);
    cmd.args([
        "--incident",
        "frame-spike",
        "--incident-after",
        "6",
        "--duration",
        "32",
    ]);
    let (mut game, output) = TestProcess::spawn_ready_captured(cmd);
    let addr = format!("127.0.0.1:{}", free_tcp_port());
    let _daemon = watch(dir.path(), &preset_config(game.pid(), &addr));
    // Poll /metrics until the server exits: the last p99 before it went is
    // over (nearly) all its frames.
    let labels = ["function=\"game_tick\"", "percentile=\"99\""];
    let (mut agent_p99_s, mut body) = (None, String::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && game.child_mut().try_wait().ok().flatten().is_none() {
        if let Some(b) = http_get(&addr, "/metrics") {
            if let Some(v) = metric(&b, "flamewatch_function_duration_percentile_seconds", &labels) {
                (agent_p99_s, body) = (Some(v), b);
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(wait_until(Duration::from_secs(3), || output
        .stdout()
        .contains("summary ")));
    let summary = output
        .stdout()
        .lines()
        .find(|l| l.starts_with("summary "))
        .map(numeric_fields)
        .expect("summary line");
    let own_p99_us = summary["frame_p99_us"];
    let agent_p99_us = agent_p99_s.expect("p99 of game_tick on /metrics") * 1e6;
    eprintln!("frame p99: server {own_p99_us} µs, agent {agent_p99_us:.0} µs; summary {summary:?}");
    assert!(
        (agent_p99_us - own_p99_us).abs() <= 0.05 * own_p99_us,
        "agent p99 {agent_p99_us:.0} µs vs the server's {own_p99_us} µs"
    );
    let bucket = "flamewatch_function_duration_seconds_bucket{le=\"0.0167\"";
    assert!(
        body.contains(bucket) && body.contains("flamewatch_target_over_budget_percent{"),
        "{body}"
    );
    promtool_passes(&body);
    let fired = find_alert(dir.path(), "frame_p99", "firing").expect("frame_p99 fired");
    assert_eq!(fired["metric"], "latency_p99_ms", "{fired:#}");
    assert!(fired["value"].as_f64().unwrap() > 16.7, "{fired:#}");
    assert!(
        find_alert(dir.path(), "frame_drops", "firing").is_some(),
        "{:#?}",
        alerts(dir.path())
    );
    assert!(
        wait_until(Duration::from_secs(30), || find_alert(
            dir.path(),
            "frame_p99",
            "profile"
        )
        .is_some()),
        "{:#?}",
        alerts(dir.path())
    );
    let profile = find_alert(dir.path(), "frame_p99", "profile").unwrap();
    let svg = profile["profile"]["svg"].as_str().unwrap();
    assert!(
        svg.ends_with(".slow.svg") && Path::new(svg).exists(),
        "{profile:#}"
    );
    let slow = read_json(Path::new(profile["profile"]["json"].as_str().unwrap()));
    assert_eq!(slow["session"]["kind"], "slow", "{slow:#}");
    // A wall profile: what late frames did on CPU, and where they waited
    // (`[off-cpu]` stacks). The spike is CPU work in physics_step.
    let folded = read_folded(Path::new(slow["files"]["folded"].as_str().unwrap()));
    let on_cpu: Vec<_> = folded
        .iter()
        .filter(|(s, _)| s.last().is_some_and(|f| f != "[off-cpu]"))
        .cloned()
        .collect();
    let share = |name: &str| share_through(&on_cpu, name);
    let physics = share("physics_step");
    eprintln!(
        "slow-call profile: {} samples, physics_step {physics:.1} % of its on-CPU time, {} s blocked",
        slow["sampling"]["samples"], slow["off_cpu"]["blocked_s"]
    );
    // ~90 % in a long run; a profile of 13-40 samples (off-CPU tracing
    // shares the budget with sampling) is ±8 points at 1σ.
    assert!(physics >= 60.0, "{folded:?}");
    for other in [
        "serialize_snapshot",
        "ai_update",
        "network_poll",
        "update_sessions",
    ] {
        assert!(share(other) < physics, "{other}: {folded:?}");
    }
}

/// `framelat` (2 ms ticks at 60 Hz, every 10th 30 ms), ready.
fn framelat() -> TestProcess {
    let mut cmd = Command::new(target_bin("framelat"));
    cmd.args(["--frames", "100000"]);
    TestProcess::spawn_ready(cmd)
}

/// The count of `tick` calls of `pid` on /metrics.
fn tick_count(addr: &str, pid: u32) -> Option<f64> {
    let body = http_get(addr, "/metrics")?;
    let pid = format!("pid=\"{pid}\"");
    metric(
        &body,
        "flamewatch_function_duration_seconds_count{",
        &[&pid, "function=\"tick\""],
    )
}

/// Test that a probe of a target watched by name is attached to its
/// process, gives the target's latency metrics, and is attached again to
/// the process that replaces it, the old process's series removed.
#[test]
fn probe_follows_restart() {
    if !privileged("probe_follows_restart") {
        return;
    }
    let _turn = cpu_bound_turn();
    let dir = output_dir();
    let addr = format!("127.0.0.1:{}", free_tcp_port());
    let first = framelat();
    let p1 = first.pid();
    let _daemon = watch(
        dir.path(),
        &format!(
            "metrics_addr = {addr:?}\n[[target]]\nprocess = \"framelat\"\n\
             [[target.probe]]\nfunction = \"tick\"\nbudget = \"16.7ms\"\n"
        ),
    );
    assert!(
        wait_until(Duration::from_secs(20), || tick_count(&addr, p1)
            .is_some_and(|n| n > 60.0)),
        "ticks of pid {p1} counted"
    );
    // An interval's worth of frames after the first read: 2 ms p50, 60/s.
    std::thread::sleep(Duration::from_secs(3));
    let body = http_get(&addr, "/metrics").unwrap();
    let pid = format!("pid=\"{p1}\"");
    let p50 = 1e3 * metric(&body, "flamewatch_target_latency_p50_seconds{", &[&pid]).expect("p50");
    let rate = metric(&body, "flamewatch_target_calls_per_second{", &[&pid]).expect("calls/s");
    let over = metric(&body, "flamewatch_target_over_budget_percent{", &[&pid]).expect("over budget");
    eprintln!("framelat pid {p1}: p50 {p50} ms, {rate} calls/s, {over} % over budget");
    assert!((p50 - 2.0).abs() < 0.2, "p50 {p50} ms");
    assert!((45.0..=75.0).contains(&rate), "{rate} calls/s");
    assert!((0.0..=25.0).contains(&over), "{over} %");
    drop(first);
    let second = framelat();
    let p2 = second.pid();
    assert!(
        wait_until(Duration::from_secs(20), || tick_count(&addr, p2)
            .is_some_and(|n| n > 60.0)),
        "ticks of the new pid {p2} counted"
    );
    assert_eq!(tick_count(&addr, p1), None, "the old pid's series are removed");
}

/// The count of `function` calls of `pid` on /metrics.
fn call_count(addr: &str, pid: u32, function: &str) -> Option<f64> {
    let body = http_get(addr, "/metrics")?;
    let (pid, function) = (format!("pid=\"{pid}\""), format!("function=\"{function}\""));
    metric(
        &body,
        "flamewatch_function_duration_seconds_count{",
        &[&pid, &function],
    )
}

/// Test that a probe too costly for the budget (a function called 20 000
/// times a second: ~50 % of the target's CPU at ~26 µs a call) is duty-cycled, not left on: a `probe_duty_cycled`
/// record naming its cycle, the target's speed back near its own between
/// attached intervals, and calls still counted after it (it is attached
/// again).
#[test]
fn costly_probe_is_duty_cycled() {
    if !privileged("costly_probe_is_duty_cycled") {
        return;
    }
    let _turn = cpu_bound_turn();
    let dir = output_dir();
    let mut cmd = Command::new(target_bin("callrate"));
    cmd.args(["--rate", "20000", "--seconds", "120"]);
    let target = TestProcess::spawn_ready(cmd);
    let addr = format!("127.0.0.1:{}", free_tcp_port());
    let _daemon = watch(
        dir.path(),
        &format!(
            "metrics_addr = {addr:?}\n[[target]]\npid = {}\n[[target.probe]]\nfunction = \"probed_call\"\n",
            target.pid()
        ),
    );
    let mut record = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            record = find_alert(dir.path(), "probe_duty_cycled", "firing");
            record.is_some()
        }),
        "a probe_duty_cycled record: {:?}",
        alerts(dir.path())
    );
    let record = record.unwrap();
    let message = record["message"].as_str().unwrap_or_default();
    eprintln!("{message}");
    let every: u32 = message
        .split("attached one interval in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{record:#}"));
    assert!((2..=60).contains(&every), "{message}");
    assert!(find_alert(dir.path(), "probe_removed", "firing").is_none());
    // Attached again for an interval of each cycle: calls keep coming.
    let before = call_count(&addr, target.pid(), "probed_call").expect("counted");
    assert!(
        // Intervals run late on a loaded machine: two cycles' time.
        wait_until(Duration::from_secs(2 * u64::from(every) + 10), || {
            call_count(&addr, target.pid(), "probed_call").is_some_and(|n| n > before)
        }),
        "calls counted again after {before} (attached one interval in {every})"
    );
}

/// Test that a watched target's frames late on a lock (`framelat --lock`:
/// every 10th tick waits ~30 ms for a mutex another thread holds asleep)
/// make a slow-call emergency that shows the lock: a wall profile most of
/// whose time is `wait_for_assets` blocked in the mutex, `[off-cpu]`.
#[test]
fn lock_late_frames_slow_emergency_shows_the_lock() {
    if !privileged("lock_late_frames_slow_emergency_shows_the_lock") {
        return;
    }
    let _turn = cpu_bound_turn();
    let dir = output_dir();
    let mut cmd = Command::new(target_bin("framelat"));
    cmd.args(["--lock", "--frames", "100000"]);
    let target = TestProcess::spawn_ready(cmd);
    let _daemon = watch(
        dir.path(),
        &format!(
            "[emergency]\nduration = \"5s\"\n\
             [[target]]\npid = {}\n[[target.probe]]\nfunction = \"tick\"\nbudget = \"16.7ms\"\n\
             [[target.rule]]\nname = \"frame_drops\"\nseverity = \"critical\"\nkind = \"threshold\"\n\
             metric = \"over_budget_pct\"\nabove = 5\nfor_s = 0\n",
            target.pid()
        ),
    );
    assert!(
        wait_until(Duration::from_secs(40), || find_alert(
            dir.path(),
            "frame_drops",
            "profile"
        )
        .is_some()),
        "{:#?}",
        alerts(dir.path())
    );
    let profile = find_alert(dir.path(), "frame_drops", "profile").unwrap();
    let slow = read_json(Path::new(profile["profile"]["json"].as_str().unwrap()));
    assert_eq!(slow["session"]["kind"], "slow", "{slow:#}");
    let folded = read_folded(Path::new(slow["files"]["folded"].as_str().unwrap()));
    let total: u64 = folded.iter().map(|(_, n)| n).sum();
    let waiting: u64 = folded
        .iter()
        .filter(|(s, _)| {
            s.iter().any(|f| f == "wait_for_assets")
                && s.iter()
                    .any(|f| f.contains("mutex_lock") || f.contains("lll_lock"))
                && s.last().is_some_and(|f| f == "[off-cpu]")
        })
        .map(|(_, n)| n)
        .sum();
    eprintln!(
        "slow emergency: {} s blocked, in the mutex {waiting} of {total} µs",
        slow["off_cpu"]["blocked_s"]
    );
    assert!(
        waiting as f64 >= 0.8 * total as f64,
        "wait_for_assets blocked in the mutex: {waiting} of {total} µs: {folded:?}"
    );
}

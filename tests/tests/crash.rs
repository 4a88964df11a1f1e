//! Crash, abort and OOM capture end to end: LogCaster's NULL dereference
//! and the game server's failed assertion in `watch` (alerts with the
//! stack, the report, every sink), a leaker killed by the OOM killer in a
//! memory-limited cgroup, and `record` on a target that crashes.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use flamewatch_e2e::*;
use serde_json::Value;

/// A watch config of `targets` writing into `dir`.
fn write_config(dir: &Path, targets: &str) -> PathBuf {
    let path = dir.join("flamewatch.toml");
    let text = format!(
        "output = {:?}\ncontrol_socket = {:?}\nmetrics_addr = \"off\"\n{targets}\n",
        dir.display().to_string(),
        dir.join("control.sock").display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The daemon of `config`, once its control socket is up and its first
/// discovery pass is done.
fn daemon(dir: &Path, config: &Path, extra: &[&str]) -> TestProcess {
    let mut cmd = Command::new(flamewatch_bin());
    cmd.args(["watch", "--config", config.to_str().unwrap()])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let d = TestProcess::spawn(cmd);
    let socket = dir.join("control.sock");
    assert!(
        wait_until(Duration::from_secs(15), || socket.exists()),
        "control socket"
    );
    // The engine adds the target in the first pass; its first tick follows.
    std::thread::sleep(Duration::from_secs(2));
    d
}

fn alerts(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("alerts.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The first firing alert of `rule`, waiting up to `timeout`.
fn wait_alert(dir: &Path, rule: &str, timeout: Duration) -> Option<Value> {
    let mut found = None;
    wait_until(timeout, || {
        found = alerts(dir)
            .into_iter()
            .find(|a| a["rule"] == rule && a["status"] == "firing");
        found.is_some()
    });
    found
}

/// The frames of an alert's or report's `stack` (innermost first).
fn frames(v: &Value) -> Vec<String> {
    v["stack"]
        .as_array()
        .map(|a| a.iter().filter_map(|f| f.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Whether `callee` is directly under `caller` in an innermost-first stack.
fn called_by(stack: &[String], callee: &str, caller: &str) -> bool {
    stack.windows(2).any(|w| w[0] == callee && w[1] == caller)
}

/// Sends LogCaster one well-formed and one malformed line (no "LEVEL:").
fn send_malformed_line(port: u16) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"INFO: fine\nthis line has no level\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
}

/// LogCaster (the target program `program`, copied as `name` so that the
/// daemon follows it by name) with the crash incident.
fn crashing_logcaster(dir: &Path, program: &str, name: &str, port: u16) -> TestProcess {
    let bin = dir.join(name);
    std::fs::copy(target_bin(program), &bin).unwrap();
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--port",
        &port.to_string(),
        "--health-port",
        &free_tcp_port().to_string(),
        "--incident",
        "crash",
    ]);
    TestProcess::spawn_ready(cmd)
}

/// Test that LogCaster's crash incident, watched by name, raises a
/// `crashed` emergency within 5 s whose stack has the parser under its
/// caller, with the report written and linked, to the JSONL file, the
/// webhook and Alertmanager.
#[test]
fn logcaster_crash_alert() {
    if !privileged("logcaster_crash_alert") {
        return;
    }
    let dir = output_dir();
    let name = format!("lcx{}", std::process::id() % 100_000);
    let port = free_tcp_port();
    let server = crashing_logcaster(dir.path(), "logcaster", &name, port);
    let (hook, hooked) = http_receiver("/alerts");
    let (am, am_bodies) = http_receiver("");
    let config = write_config(dir.path(), &format!("[[target]]\nprocess = {name:?}\n"));
    let _d = daemon(dir.path(), &config, &["--webhook", &hook, "--alertmanager", &am]);
    let crashed_at = Instant::now();
    send_malformed_line(port);
    let status = server.wait_with_timeout(Duration::from_secs(5));
    assert_eq!(
        status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
        Some(libc::SIGSEGV),
        "the server crashed"
    );
    let alert = wait_alert(dir.path(), "crashed", Duration::from_secs(8)).expect("a crashed alert");
    let after = crashed_at.elapsed();
    assert!(after <= Duration::from_secs(5), "alert after {after:?}");
    eprintln!("crashed alert {after:?} after the malformed line");
    assert_eq!(alert["severity"], "emergency", "{alert:#}");
    let stack = frames(&alert);
    assert_eq!(
        stack.first().map(String::as_str),
        Some("parse_level"),
        "{alert:#}"
    );
    assert!(called_by(&stack, "parse_level", "ingest_line"), "{stack:?}");
    assert!(
        alert["message"].as_str().unwrap().contains("SIGSEGV"),
        "{alert:#}"
    );
    let report_path = PathBuf::from(alert["profile"]["crash"].as_str().expect("profile.crash"));
    let report = read_json(&report_path);
    assert_eq!(report["signal_name"], "SIGSEGV");
    assert_eq!(report["fault_address"], "0x0", "the NULL dereference's address");
    assert!(
        report["thread"].as_str().unwrap().starts_with("worker-"),
        "{report:#}"
    );
    assert!(called_by(&frames(&report), "parse_level", "ingest_line"));
    let text = std::fs::read_to_string(report_path.with_extension("txt")).unwrap();
    assert!(text.contains("#1  ingest_line"), "{text}");
    assert!(
        wait_until(Duration::from_secs(5), || hooked
            .lock()
            .unwrap()
            .iter()
            .any(|b| b["rule"] == "crashed" && b["stack"][0] == "parse_level")),
        "the webhook got the alert with its stack"
    );
    assert!(
        wait_until(Duration::from_secs(5), || am_bodies.lock().unwrap().iter().any(
            |b| {
                b.as_array().is_some_and(|a| {
                    a.iter().any(|x| {
                        x["labels"]["alertname"] == "crashed" && x["annotations"]["crash_report"].is_string()
                    })
                })
            }
        )),
        "Alertmanager got the alert with the report"
    );
}

/// Test that the game server's abort incident is captured as SIGABRT with
/// the asserting system (resolve_contacts, under physics_step) in the stack.
#[test]
fn game_server_abort_alert() {
    if !privileged("game_server_abort_alert") {
        return;
    }
    let dir = output_dir();
    let mut cmd = Command::new(target_bin("game-server"));
    cmd.args([
        "--port",
        &free_udp_port().to_string(),
        "--incident",
        "abort",
        "--incident-after",
        "5",
    ]);
    let server = TestProcess::spawn_ready(cmd);
    let config = write_config(dir.path(), &format!("[[target]]\npid = {}\n", server.pid()));
    let _d = daemon(dir.path(), &config, &[]);
    let status = server.wait_with_timeout(Duration::from_secs(20));
    assert_eq!(
        status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
        Some(libc::SIGABRT),
        "the server aborted"
    );
    let alert = wait_alert(dir.path(), "crashed", Duration::from_secs(5)).expect("a crashed alert");
    assert!(
        alert["message"].as_str().unwrap().contains("SIGABRT"),
        "{alert:#}"
    );
    let stack = frames(&alert);
    assert!(called_by(&stack, "resolve_contacts", "physics_step"), "{stack:?}");
    let report = read_json(Path::new(alert["profile"]["crash"].as_str().unwrap()));
    assert_eq!(report["signal"], 6);
    assert!(
        report.get("fault_address").is_none(),
        "an abort has no fault address"
    );
    // The flight recorder's minute before the abort, the tick loop in it.
    assert!(report["profile_samples"].as_u64().unwrap() > 0, "{report:#}");
    let profile = report["profile"].as_array().unwrap();
    assert!(
        profile
            .iter()
            .any(|s| s["stack"].as_str().unwrap().contains("physics_step")),
        "{report:#}"
    );
}

/// A memory cgroup limited to `bytes`, removed when dropped: cgroup v2
/// when its memory controller is there, else the v1 memory hierarchy.
struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    fn new(name: &str, bytes: u64) -> Self {
        let v2 = Path::new("/sys/fs/cgroup");
        let v2_memory =
            std::fs::read_to_string(v2.join("cgroup.controllers")).is_ok_and(|c| c.contains("memory"));
        let (dir, limit) = if v2_memory {
            (v2.join(name), "memory.max")
        } else {
            (v2.join("memory").join(name), "memory.limit_in_bytes")
        };
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        std::fs::write(dir.join(limit), bytes.to_string()).unwrap();
        if v2_memory {
            // No swap to escape to.
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        }
        Self { dir }
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Empty once its process was killed and reaped.
        let _ = wait_until(Duration::from_secs(5), || std::fs::remove_dir(&self.dir).is_ok());
    }
}

/// Test that a leaker in a cgroup with `memory.max` 64 MiB, killed by the
/// OOM killer, raises an `oom_killed` emergency.
#[test]
fn oom_kill_alert() {
    if !privileged("oom_kill_alert") {
        return;
    }
    let dir = output_dir();
    let cgroup = MemoryCgroup::new(&format!("flamewatch-oom-{}", std::process::id()), 64 << 20);
    let mut cmd = Command::new(target_bin("leaker"));
    cmd.stdin(Stdio::piped());
    let mut leaker = TestProcess::spawn_ready(cmd);
    cgroup.add(leaker.pid());
    let config = write_config(dir.path(), &format!("[[target]]\npid = {}\n", leaker.pid()));
    let _d = daemon(dir.path(), &config, &[]);
    let mut stdin = leaker.child_mut().stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    let started = Instant::now();
    let status = leaker.wait_with_timeout(Duration::from_secs(20));
    assert_eq!(
        status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
        Some(libc::SIGKILL),
        "the OOM killer killed it"
    );
    let alert = wait_alert(dir.path(), "oom_killed", Duration::from_secs(5)).expect("an oom_killed alert");
    assert_eq!(alert["severity"], "emergency");
    assert!(
        alert["message"].as_str().unwrap().contains("OOM killer"),
        "{alert:#}"
    );
    let report = read_json(Path::new(alert["profile"]["crash"].as_str().unwrap()));
    let rss = report["anon_rss_bytes"].as_u64().unwrap();
    assert!(
        (32 << 20..=64 << 20).contains(&rss),
        "anonymous memory {rss} at the kill"
    );
    eprintln!(
        "killed {:?} after the leak began, {} MiB",
        started.elapsed(),
        rss >> 20
    );
}

/// Test that `record` on a target that crashes mid-session prints the crash
/// stack, writes the crash report, and still writes its profile: DWARF
/// unwinding (LogCaster as shipped) and frame pointers (`logcaster-fp`).
#[test]
fn record_prints_crash_stack() {
    if !privileged("record_prints_crash_stack") {
        return;
    }
    for (bin, unwind) in [("logcaster", "DWARF"), ("logcaster-fp", "frame pointers")] {
        let dir = output_dir();
        let port = free_tcp_port();
        let server = crashing_logcaster(dir.path(), bin, bin, port);
        let out = record_until_crash(server.pid(), port, &dir.path().join("out"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("crashed: SIGSEGV (SEGV_MAPERR) at 0x0"),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("unwound by {unwind}:")),
            "{bin}: {stderr}"
        );
        assert!(
            stderr.contains("#0  parse_level\n  #1  ingest_line"),
            "{bin}: {stderr}"
        );
        let reports = printed_files(&out.stdout, "crash.json");
        assert_eq!(reports.len(), 1, "{}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(read_json(&reports[0])["kind"], "crashed");
        let svg = printed_files(&out.stdout, "svg");
        assert!(svg.iter().any(|p| p.exists()), "the session's flamegraph");
        drop(server);
    }
}

/// `flamewatch record` of `pid` into `out_dir`, sending the malformed line
/// once it is attached; its output once the session ended with its target.
fn record_until_crash(pid: u32, port: u16, out_dir: &Path) -> std::process::Output {
    let pid = pid.to_string();
    let mut cmd = Command::new(flamewatch_bin());
    cmd.args(["record", "--pid", &pid, "--duration", "30s", "--output"])
        .arg(out_dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let rec = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    send_malformed_line(port);
    let started = Instant::now();
    let out = rec.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the session ends with its target"
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Test that a target exiting with a non-zero status raises an `exited`
/// emergency with that status, and one exiting with 0 raises none.
#[test]
fn failed_exit_alert() {
    if !privileged("failed_exit_alert") {
        return;
    }
    let dir = output_dir();
    let shell = |status: u32| {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("echo ready; sleep 8; exit {status}")]);
        TestProcess::spawn_ready(cmd)
    };
    let (failing, clean) = (shell(3), shell(0));
    let config = write_config(
        dir.path(),
        &format!(
            "[[target]]\npid = {}\n[[target]]\npid = {}\n",
            failing.pid(),
            clean.pid()
        ),
    );
    let _d = daemon(dir.path(), &config, &[]);
    assert!(failing.wait_with_timeout(Duration::from_secs(15)).is_some());
    assert!(clean.wait_with_timeout(Duration::from_secs(5)).is_some());
    let alert = wait_alert(dir.path(), "exited", Duration::from_secs(5)).expect("an exited alert");
    assert_eq!(alert["value"], 3.0, "{alert:#}");
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("exited with status 3"),
        "{alert:#}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let exited: Vec<_> = alerts(dir.path())
        .into_iter()
        .filter(|a| a["rule"] == "exited")
        .collect();
    assert_eq!(exited.len(), 1, "only the failing one: {exited:#?}");
}

//! The stand-ins' leak incidents, profiled where they have no frame
//! pointers (DWARF stacks for memory events): LogCaster's search results
//! never freed (case 2) and the game server's replay histories kept after
//! their players leave.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use flamewatch_e2e::*;
use serde_json::Value;

/// These tests measure shares of bytes: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A leaking LogCaster (as shipped: no frame pointers) under search load,
/// with its load generator.
fn leaking_logcaster() -> (TestProcess, TestProcess) {
    leaking_logcaster_after("0")
}

/// The same, leaking after `after` seconds.
fn leaking_logcaster_after(after: &str) -> (TestProcess, TestProcess) {
    let (port, health) = (free_tcp_port(), free_tcp_port());
    let mut cmd = Command::new(target_bin("logcaster"));
    cmd.args(["--port", &port.to_string(), "--health-port", &health.to_string()])
        .args(["--incident", "leak", "--incident-after", after]);
    let server = TestProcess::spawn_ready(cmd);
    let mut load = Command::new(target_bin("logcaster-load"));
    load.args(["--port", &port.to_string()])
        .args([
            "--connections",
            "2",
            "--rate",
            "200",
            "--search-rate",
            "20",
            "--duration",
            "150",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    (server, TestProcess::spawn(load))
}

/// The alert records written so far.
fn alerts(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("alerts.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits for an alert record of `rule` with `status`.
fn wait_alert(dir: &Path, timeout: Duration, rule: &str, status: &str) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(a) = alerts(dir)
            .into_iter()
            .find(|a| a["rule"] == rule && a["status"] == status)
        {
            return Some(a);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// `flamewatch watch` of the LogCaster preset aimed at `pid`, writing into
/// `dir`, with `emergency` settings.
fn watch_logcaster(dir: &Path, pid: u32, emergency: &str) -> TestProcess {
    watch_logcaster_with(dir, pid, "", emergency, "heap")
}

/// The same, with `target_extra` tables of the target (schedules), and the
/// leak rule's emergency a `profile` memory profile (the preset's: heap).
fn watch_logcaster_with(
    dir: &Path,
    pid: u32,
    target_extra: &str,
    emergency: &str,
    profile: &str,
) -> TestProcess {
    let preset = std::fs::read_to_string(workspace_root().join("configs/logcaster.toml"))
        .unwrap()
        .replace("profile = \"heap\"", &format!("profile = {profile:?}"));
    let config = dir.join("flamewatch.toml");
    let text = format!(
        "output = {:?}\ncontrol_socket = {:?}\nmetrics_addr = \"off\"\n{}\n{target_extra}\n[emergency]\n{emergency}\n",
        dir.display().to_string(),
        dir.join("control.sock").display().to_string(),
        preset.replace("process = \"logcaster\"", &format!("pid = {pid}")),
    );
    std::fs::write(&config, text).unwrap();
    let mut cmd = Command::new(flamewatch_bin());
    cmd.args(["watch", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    TestProcess::spawn(cmd)
}

/// Test that `record --mode heap` on the leaking LogCaster, which has no
/// frame pointers, gives `search_logs` at least 70 % of the in-use bytes
/// (DWARF stacks of the sampled allocations), and that `--mode memory`
/// unwinds its page faults through the leak's callers.
#[test]
fn logcaster_leak_record_names_search_logs() {
    if !privileged("logcaster_leak_record_names_search_logs") {
        return;
    }
    let _serial = serial();
    let (server, _load) = leaking_logcaster();
    std::thread::sleep(Duration::from_secs(2));
    let heap = record(
        server.pid(),
        &["--mode", "heap", "--duration", "8s", "--format", "folded,json"],
    );
    let share = share_through(&heap.stacks, "search_logs");
    eprintln!("logcaster leak, heap mode: search_logs {share:.1} % of in-use bytes");
    assert!(share >= 70.0, "search_logs {share:.1} %: {:?}", heap.stacks);
    let growth = record(
        server.pid(),
        &["--mode", "memory", "--duration", "6s", "--format", "folded,json"],
    );
    let m = &growth.summary["memory"];
    assert!(m["dwarf_copies"].as_u64().unwrap_or(0) > 0, "{m:#}");
    let through = share_through(&growth.stacks, "answer_search");
    let handled = share_through(&growth.stacks, "handle_request");
    let share = share_through(&growth.stacks, "search_logs");
    eprintln!(
        "logcaster leak, memory mode: search_logs {share:.1} %, answer_search {through:.1} %, \
         handle_request {handled:.1} % of growth bytes; {m}"
    );
    // Without DWARF stacks the faults in libc (malloc, memcpy, strndup)
    // lose their callers: nearly every byte has them here. The log
    // buffer's own first touches (ingest_line, 3-12 % with the load's
    // pace) are the rest of handle_request's; the search's reply and
    // results lead.
    assert!(
        handled >= 95.0,
        "handle_request {handled:.1} %: {:?}",
        growth.stacks
    );
    assert!(
        through >= 60.0,
        "answer_search {through:.1} %: {:?}",
        growth.stacks
    );
    // Growth is first touch: the freed reply buffer's pages, which the
    // leaked results reuse, are answer_search's (search_logs 9-34 % of the
    // growth bytes measured); the leaker's own first touches still show.
    assert!(share > 2.0, "search_logs {share:.1} %: {:?}", growth.stacks);
}

/// Test that LogCaster's leak incident, watched with its preset (whose leak
/// rule takes heap profiles), gets a memory alert and a linked memory profile whose top
/// user function is `search_logs` (at least 70 % of the in-use bytes), and
/// that the record says there is no differential when no healthy memory
/// profile was taken.
#[test]
fn logcaster_leak_alert_profile_names_search_logs() {
    if !privileged("logcaster_leak_alert_profile_names_search_logs") {
        return;
    }
    let _serial = serial();
    let dir = output_dir();
    let (server, _load) = leaking_logcaster();
    let _d = watch_logcaster(dir.path(), server.pid(), "duration = \"8s\"");
    wait_alert(dir.path(), Duration::from_secs(75), "memory_growth", "firing")
        .expect("memory_growth within 75 s");
    let profile = wait_alert(dir.path(), Duration::from_secs(40), "memory_growth", "profile")
        .expect("the memory profile linked");
    let json = PathBuf::from(profile["profile"]["json"].as_str().unwrap());
    let summary = read_json(&json);
    assert_eq!(summary["mode"], "heap", "{summary}");
    let stacks = read_folded(&json.with_extension("folded"));
    let share = share_through(&stacks, "search_logs");
    eprintln!("logcaster leak alert, heap emergency: search_logs {share:.1} % of in-use bytes");
    assert!(share >= 70.0, "search_logs {share:.1} %: {stacks:?}");
    assert!(profile["profile"]["diff_svg"].is_null(), "{profile}");
    let msg = profile["message"].as_str().unwrap();
    assert!(msg.contains("no healthy heap profile"), "{msg}");
}

/// Test that the game server's leak incident (no frame pointers) gets a
/// memory profile naming `spawn_player`, which allocates and touches the
/// replay history that outlives its player, for at least 70 % of growth.
#[test]
fn game_server_leak_names_the_history_keeper() {
    if !privileged("game_server_leak_names_the_history_keeper") {
        return;
    }
    let _serial = serial();
    let mut cmd = Command::new(target_bin("game-server"));
    cmd.args(["--port", &free_udp_port().to_string()])
        .args([
            "--incident",
            "leak",
            "--churn",
            "20",
            "--players",
            "200",
            "--duration",
            "60",
        ])
        .args(["--report-every", "100"]);
    let server = TestProcess::spawn_ready(cmd);
    std::thread::sleep(Duration::from_secs(1));
    let r = record(
        server.pid(),
        &["--mode", "memory", "--duration", "6s", "--format", "folded,json"],
    );
    let share = share_through(&r.stacks, "spawn_player(bool)");
    eprintln!("game server leak, memory mode: spawn_player {share:.1} % of growth bytes");
    assert!(share >= 70.0, "spawn_player {share:.1} %: {:?}", r.stacks);
    assert!(
        total_pct(&r.summary, "spawn_player(bool)") >= 70.0,
        "{:#}",
        r.summary["top_functions"]
    );
}

/// Test that a memory emergency profile gets a differential against the
/// target's last healthy memory profile: a scheduled growth profile taken
/// before LogCaster starts leaking.
#[test]
fn memory_emergency_diffs_against_a_healthy_memory_profile() {
    if !privileged("memory_emergency_diffs_against_a_healthy_memory_profile") {
        return;
    }
    let _serial = serial();
    let dir = output_dir();
    let (server, _load) = leaking_logcaster_after("20");
    let schedule = "[[target.schedule]]\ncron = \"*/8 * * * * *\"\nduration = \"3s\"\nmemory = \"growth\"\n";
    let _d = watch_logcaster_with(dir.path(), server.pid(), schedule, "duration = \"4s\"", "growth");
    wait_alert(dir.path(), Duration::from_secs(90), "memory_growth", "firing")
        .expect("memory_growth within 90 s");
    let profile = wait_alert(dir.path(), Duration::from_secs(40), "memory_growth", "profile")
        .expect("the memory profile linked");
    let summary = read_json(Path::new(profile["profile"]["json"].as_str().unwrap()));
    assert_eq!(summary["mode"], "memory", "{summary}");
    let diff = profile["profile"]["diff_svg"]
        .as_str()
        .unwrap_or_else(|| panic!("a differential: {profile}"));
    let svg = std::fs::read_to_string(diff).unwrap();
    assert!(svg.contains("<svg") && svg.contains("baseline"), "{diff}");
    // The baseline is a healthy memory profile (scheduled), not the leak.
    let baseline = svg.split("baseline ").nth(1).unwrap_or_default();
    assert!(
        baseline.contains("-baseline-"),
        "{}",
        &baseline[..baseline.len().min(200)]
    );
}

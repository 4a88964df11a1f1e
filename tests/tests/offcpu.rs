//! Off-CPU and wall-clock profiles end to end: the LogCaster deadlock, and
//! a thread that sleeps half of its time.

use std::{process::Command, time::Duration};

use flamewatch_e2e::*;
use serde_json::Value;

/// These tests measure time shares: run them one at a time, so one test's
/// load (LogCaster and its clients) does not add run-queue waits to another.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A LogCaster whose buffer and stats locks deadlock after `after` seconds,
/// with clients sending lines (a worker must be inside the buffer lock).
fn deadlocked_logcaster(after: &str) -> (TestProcess, TestProcess) {
    let (port, health) = (free_tcp_port(), free_tcp_port());
    let mut server = Command::new(target_bin("logcaster"));
    server.args([
        "--port",
        &port.to_string(),
        "--health-port",
        &health.to_string(),
        "--incident",
        "deadlock",
        "--incident-after",
        after,
    ]);
    let server = TestProcess::spawn_ready(server);
    let mut load = Command::new(target_bin("logcaster-load"));
    load.args([
        "--port",
        &port.to_string(),
        "--connections",
        "4",
        "--rate",
        "2000",
        "--duration",
        "30",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    (server, TestProcess::spawn(load))
}

fn blocked<'a>(summary: &'a Value, comm_prefix: &str) -> Vec<&'a Value> {
    summary["off_cpu"]["blocked_threads"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["comm"].as_str().unwrap().starts_with(comm_prefix))
        .collect()
}

fn through_lock(stack: &[String]) -> bool {
    stack
        .iter()
        .any(|f| f.contains("pthread_mutex_lock") || f.contains("lll_lock_wait") || f.contains("futex_wait"))
}

/// Test that LogCaster's deadlock shows in an off-CPU profile: at least 90 %
/// of the workers' blocked time is in stacks through the mutex / futex wait,
/// and the deadlocked stats thread and a worker are listed as still blocked
/// for about the whole session, with their lock stacks.
#[test]
fn deadlock_offcpu() {
    if !privileged("deadlock_offcpu") {
        return;
    }
    let _serial = serial();
    // The incident at 0.5 s: the stats thread's first wakeup (1 s after
    // start) closes the inversion, a few hundred ms into the session, so
    // almost all of the session is the deadlock (before it, workers wait
    // in recv and nap under the lock: blocked time not through the lock).
    let (server, _load) = deadlocked_logcaster("0.5");
    std::thread::sleep(Duration::from_millis(300));
    let r = record(server.pid(), &["--mode", "offcpu", "--duration", "8s"]);
    assert_eq!(r.summary["mode"], "offcpu");
    let workers: Vec<&(Vec<String>, u64)> = r
        .stacks
        .iter()
        .filter(|(s, _)| s.iter().any(|f| f == "worker_main"))
        .collect();
    let total: u64 = workers.iter().map(|(_, n)| n).sum();
    let locked: u64 = workers
        .iter()
        .filter(|(s, _)| through_lock(s))
        .map(|(_, n)| n)
        .sum();
    assert!(total > 0, "worker blocked time recorded: {:?}", r.stacks);
    assert!(
        locked * 10 >= total * 9,
        "locked {locked} of {total} µs\n{:#?}",
        r.stacks
    );
    let stats = blocked(&r.summary, "stats");
    assert_eq!(stats.len(), 1, "{:#}", r.summary["off_cpu"]);
    // The other half of the inversion blocked first; workers that came to
    // the buffer lock later queue behind it.
    let mut stuck_workers = blocked(&r.summary, "worker");
    assert!(!stuck_workers.is_empty(), "{:#}", r.summary["off_cpu"]);
    stuck_workers.sort_by(|a, b| {
        b["blocked_s"]
            .as_f64()
            .unwrap()
            .total_cmp(&a["blocked_s"].as_f64().unwrap())
    });
    let duration = r.summary["session"]["duration_s"].as_f64().unwrap();
    for t in stats.iter().chain(stuck_workers.iter().take(1)) {
        let s = t["blocked_s"].as_f64().unwrap();
        // Deadlocked a few hundred ms into the session (at the stats
        // thread's wakeup 1 s after the server started).
        assert!(s > duration - 1.5 && s <= duration + 0.5, "{t:#}");
        let stack: Vec<String> = serde_json::from_value(t["stack"].clone()).unwrap();
        assert!(through_lock(&stack), "{t:#}");
    }
}

/// Test that a session started after the deadlock still finds the stuck
/// threads (no context switch will ever come): from /proc, with their stacks
/// and a blocked time longer than the session.
#[test]
fn deadlock_before_session() {
    if !privileged("deadlock_before_session") {
        return;
    }
    let _serial = serial();
    let (server, _load) = deadlocked_logcaster("0.5");
    std::thread::sleep(Duration::from_secs(3));
    let r = record(server.pid(), &["--mode", "offcpu", "--duration", "2s"]);
    let stats = blocked(&r.summary, "stats");
    assert_eq!(stats.len(), 1, "{:#}", r.summary["off_cpu"]);
    let t = stats[0];
    assert_eq!(t["since"], "before session", "{t:#}");
    assert!(t["blocked_s"].as_f64().unwrap() >= 2.0, "{t:#}");
    let stack: Vec<String> = serde_json::from_value(t["stack"].clone()).unwrap();
    assert!(
        stack
            .iter()
            .any(|f| f.contains("pthread_mutex_lock") || f.contains("lll_lock_wait")),
        "{t:#}"
    );
    assert!(
        stack.iter().any(|f| f.ends_with("_[k]")),
        "kernel frames from /proc: {t:#}"
    );
    // And its time is in the off-CPU profile.
    assert!(
        r.stacks
            .iter()
            .any(|(s, _)| s.iter().any(|f| f == "stats_main" || f.contains("stats"))),
        "{:?}",
        r.stacks
    );
}

/// Test that a thread spinning 10 ms and sleeping 10 ms in turn splits about
/// 50/50 (±5 points) between spinning on CPU and sleeping off CPU in a wall
/// profile, and that the profile accounts for the session's wall time.
#[test]
fn wall_splits_sleep_and_spin() {
    if !privileged("wall_splits_sleep_and_spin") {
        return;
    }
    let _serial = serial();
    let mut cmd = Command::new(target_bin("sleepspin-fp"));
    cmd.args(["--spin-us", "10000", "--sleep-us", "10000", "--seconds", "30"]);
    let target = TestProcess::spawn_ready(cmd);
    let r = record(
        target.pid(),
        &["--mode", "wall", "--duration", "4s", "--freq", "199"],
    );
    assert_eq!(r.summary["mode"], "wall");
    let off_cpu = |s: &[String]| s.last().is_some_and(|f| f == "[off-cpu]");
    // On CPU in spin_phase vs off CPU in nanosleep; time spent waiting for a
    // CPU (preempted, which other tests on this machine cause) is neither.
    let spin: u64 = r
        .stacks
        .iter()
        .filter(|(s, _)| !off_cpu(s) && s.iter().any(|f| f == "spin_phase"))
        .map(|(_, n)| n)
        .sum();
    let sleep: u64 = r
        .stacks
        .iter()
        .filter(|(s, _)| off_cpu(s) && s.iter().any(|f| f.contains("nanosleep")))
        .map(|(_, n)| n)
        .sum();
    let sleep_pct = 100.0 * sleep as f64 / (sleep + spin) as f64;
    assert!(
        (sleep_pct - 50.0).abs() <= 5.0,
        "sleep {sleep} µs, spin {spin} µs: {sleep_pct}% asleep"
    );
    // Per thread: the tower is under the thread's frame.
    assert!(
        r.stacks.iter().all(|(s, _)| s[1].starts_with("sleepspin")),
        "{:?}",
        &r.stacks[..3]
    );
    // All of the session's wall time is accounted for (one thread).
    let total: u64 = r.stacks.iter().map(|(_, n)| n).sum();
    let seconds = total as f64 / 1e6;
    let duration = r.summary["session"]["duration_s"].as_f64().unwrap();
    assert!((seconds - duration).abs() < 0.5, "{seconds} s of {duration} s");
}

/// Test that blocks shorter than --min-block are counted but left out.
#[test]
fn min_block_filters_short_blocks() {
    if !privileged("min_block_filters_short_blocks") {
        return;
    }
    let _serial = serial();
    let mut cmd = Command::new(target_bin("sleepspin-fp"));
    cmd.args(["--spin-us", "200", "--sleep-us", "100", "--seconds", "30"]);
    let target = TestProcess::spawn_ready(cmd);
    let r = record(
        target.pid(),
        &["--mode", "offcpu", "--duration", "2s", "--min-block", "5ms"],
    );
    let o = &r.summary["off_cpu"];
    assert!(o["short_blocks"].as_u64().unwrap() > 1000, "{o:#}");
    assert!(o["blocks"].as_u64().unwrap() < 50, "{o:#}");
}

/// Test that `--mode offcpu` finds a thread blocked in a mutex, with the
/// lock in its stack (the kernel matrix's check: no timing bounds, which
/// a qemu guest without KVM cannot keep).
#[test]
fn mutex_blocked_thread_found() {
    if !privileged("mutex_blocked_thread_found") {
        return;
    }
    let _serial = serial();
    let (server, _load) = deadlocked_logcaster("0.5");
    std::thread::sleep(Duration::from_millis(1500));
    let r = record(server.pid(), &["--mode", "offcpu", "--duration", "3s"]);
    assert_eq!(r.summary["mode"], "offcpu");
    let stats = blocked(&r.summary, "stats");
    assert_eq!(stats.len(), 1, "{:#}", r.summary["off_cpu"]);
    let stack: Vec<String> = serde_json::from_value(stats[0]["stack"].clone()).unwrap();
    assert!(through_lock(&stack), "{:#}", stats[0]);
    let locked = r
        .stacks
        .iter()
        .any(|(s, _)| s.iter().any(|f| f == "worker_main") && through_lock(s));
    assert!(locked, "a worker's blocked time through the lock: {:?}", r.stacks);
}

//! How the daemon follows its targets: every process of a name under one
//! target (a pre-fork server), a pid reused by a later process, a target
//! that never appears; and a target with thousands of threads.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use flamewatch_e2e::*;
use serde_json::Value;

/// Tests that fork on purpose (pid reuse) or count processes run one at a
/// time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// GET over plain HTTP/1.0: the body.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text.split_once("\r\n\r\n")?.1.to_owned())
}

/// The pids of `metric`'s series under target `target` on /metrics.
fn pids_of(addr: &str, metric: &str, target: &str) -> Vec<u32> {
    let body = http_get(addr, "/metrics").unwrap_or_default();
    let mut pids: Vec<u32> = body
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| l.contains(&format!("target=\"{target}\"")))
        .filter_map(|l| l.split("pid=\"").nth(1)?.split('"').next()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// `flamewatch watch ARGS` writing into `dir`, with its metrics on `metrics`.
fn daemon(dir: &Path, metrics: &str, args: &[&str]) -> TestProcess {
    let mut cmd = Command::new(flamewatch_bin());
    cmd.arg("watch")
        .args(args)
        .args(["--metrics-addr", metrics, "--output"])
        .arg(dir)
        .arg("--control-socket")
        .arg(dir.join("control.sock"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    TestProcess::spawn(cmd)
}

fn alerts(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("alerts.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn count(dir: &Path, rule: &str, status: &str) -> usize {
    alerts(dir)
        .iter()
        .filter(|a| a["rule"] == rule && a["status"] == status)
        .count()
}

/// The children of `pid` (from /proc/*/stat's ppid).
fn children(pid: u32) -> Vec<u32> {
    let mut kids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
            after.split_whitespace().nth(1) == Some(&pid.to_string())
        })
        .collect();
    kids.sort_unstable();
    kids
}

/// nginx's master, in a process group of its own with its workers: all of
/// them are killed when dropped (a killed master leaves its workers running).
struct Nginx(TestProcess);

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; -pgid names the group.
        unsafe { libc::kill(-(self.0.pid() as i32), libc::SIGKILL) };
    }
}

/// nginx (Debian's nginx-light) with a master and `workers` workers on a
/// free loopback port, its files in `dir`.
fn nginx(dir: &Path, workers: u32) -> Nginx {
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            "worker_processes {workers};\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{ worker_connections 64; }}\nhttp {{\n\
             access_log off;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
             server {{ listen 127.0.0.1:{}; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
            free_tcp_port()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-e")
        .arg(dir.join("error.log"))
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0);
    let master = TestProcess::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(10), || children(master.pid()).len()
            == workers as usize),
        "nginx workers: {:?}",
        std::fs::read_to_string(dir.join("error.log"))
    );
    Nginx(master)
}

/// Test that `watch --process nginx` watches the master and both workers
/// under the one target `nginx`, each with its own metrics, and follows a
/// worker the master replaces without calling it a restart.
#[test]
fn every_process_of_a_name_is_watched() {
    if !privileged("every_process_of_a_name_is_watched") {
        return;
    }
    let _turn = serial();
    let dir = output_dir();
    let nginx = nginx(dir.path(), 2);
    let master = &nginx.0;
    let mut expected = children(master.pid());
    expected.push(master.pid());
    expected.sort_unstable();
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let _d = daemon(dir.path(), &metrics, &["--process", "nginx"]);
    let metric = "flamewatch_target_cpu_percent";
    let mut seen = Vec::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            seen = pids_of(&metrics, metric, "nginx");
            seen == expected
        }),
        "pids under target nginx: {seen:?}, want {expected:?}"
    );
    for m in ["flamewatch_target_rss_bytes", "flamewatch_target_threads"] {
        assert_eq!(pids_of(&metrics, m, "nginx"), expected, "{m}");
    }
    // The master replaces a killed worker: the new one joins, the old one
    // leaves, and the target neither restarted nor went away.
    let killed = children(master.pid())[0];
    Command::new("kill")
        .args(["-9", &killed.to_string()])
        .status()
        .unwrap();
    let mut now = Vec::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let kids = children(master.pid());
            now = pids_of(&metrics, metric, "nginx");
            kids.len() == 2
                && !now.contains(&killed)
                && now.len() == 3
                && kids.iter().all(|k| now.contains(k))
        }),
        "after killing worker {killed}: {now:?} (workers {:?})",
        children(master.pid())
    );
    assert_eq!(
        count(dir.path(), "target_restarted", "firing"),
        0,
        "{:?}",
        alerts(dir.path())
    );
    assert_eq!(
        count(dir.path(), "target_gone", "firing"),
        0,
        "{:?}",
        alerts(dir.path())
    );
}

/// Spawns `sleep 300` until it gets pid `want` (set through ns_last_pid;
/// other processes may take it first).
fn sleeper_with_pid(want: u32) -> Option<TestProcess> {
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (want - 1).to_string()).unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("300");
        let p = TestProcess::spawn(cmd);
        if p.pid() == want {
            return Some(p);
        }
    }
    None
}

/// Test that a watched pid taken over by a later process is not mistaken
/// for the target: the target is reported gone (not restarted), the later
/// process is not watched, and a trigger for the pid says why.
#[test]
fn reused_pid_is_not_the_target() {
    if !privileged("reused_pid_is_not_the_target") {
        return;
    }
    let _turn = serial();
    let dir = output_dir();
    let mut cmd = Command::new("sleep");
    cmd.arg("300");
    let first = TestProcess::spawn(cmd);
    let pid = first.pid();
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let _d = daemon(dir.path(), &metrics, &["--pid", &pid.to_string()]);
    let metric = "flamewatch_target_cpu_percent";
    assert!(
        wait_until(Duration::from_secs(15), || pids_of(&metrics, metric, "sleep")
            == [pid]),
        "watched pid {pid}"
    );
    drop(first);
    let second = sleeper_with_pid(pid).expect("a later process with the same pid");
    assert!(
        wait_until(Duration::from_secs(15), || count(
            dir.path(),
            "target_gone",
            "firing"
        ) == 1),
        "target_gone for pid {pid}: {:?}",
        alerts(dir.path())
    );
    // A few intervals later the new process is still not the target.
    std::thread::sleep(Duration::from_secs(6));
    assert!(pids_of(&metrics, metric, "sleep").is_empty());
    assert_eq!(
        count(dir.path(), "target_restarted", "firing"),
        0,
        "{:?}",
        alerts(dir.path())
    );
    let out = flamewatch(&[
        "trigger",
        "--pid",
        &pid.to_string(),
        "--duration",
        "1s",
        "--control-socket",
        dir.path().join("control.sock").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("pid {pid} now belongs to a later process")) && err.trim().lines().count() == 1,
        "{err}"
    );
    drop(second);
}

/// Test that a configured target that never appears is reported once as
/// `target_missing`, and resolved when it starts.
#[test]
fn missing_target_reported_once() {
    if !privileged("missing_target_reported_once") {
        return;
    }
    let dir = output_dir();
    let _d = daemon(dir.path(), "off", &["--process", "fw-late-proc"]);
    assert!(
        wait_until(Duration::from_secs(25), || count(
            dir.path(),
            "target_missing",
            "firing"
        ) == 1),
        "target_missing: {:?}",
        alerts(dir.path())
    );
    let missing = alerts(dir.path())
        .into_iter()
        .find(|a| a["rule"] == "target_missing")
        .unwrap();
    assert!(
        missing["message"].as_str().unwrap().contains("fw-late-proc"),
        "{missing}"
    );
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(count(dir.path(), "target_missing", "firing"), 1);
    // It starts at last: a copy of sleep under that name.
    let bin = dir.path().join("fw-late-proc");
    std::fs::copy("/bin/sleep", &bin).unwrap();
    let mut cmd = Command::new(&bin);
    cmd.arg("300");
    let _late = TestProcess::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(15), || count(
            dir.path(),
            "target_missing",
            "resolved"
        ) == 1),
        "resolved when found: {:?}",
        alerts(dir.path())
    );
}

/// Test that a 3000-thread target is profiled (one perf event per thread)
/// and its one busy thread found.
#[test]
fn three_thousand_threads() {
    if !privileged("three_thousand_threads") {
        return;
    }
    let _turn = cpu_bound_turn();
    let mut cmd = Command::new(target_bin("manythreads"));
    cmd.args(["--threads", "3000", "--seconds", "120"]);
    let target = TestProcess::spawn_ready(cmd);
    let busy_tid: u32 = target
        .banner
        .split("busy_tid=")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .expect("banner names the busy thread");
    let r = record(
        target.pid(),
        &["--duration", "4s", "--per-thread", "--format", "svg,folded,json"],
    );
    assert_eq!(r.summary["sampling"]["threads_at_start"].as_u64(), Some(3000));
    let total: u64 = r.stacks.iter().map(|(_, n)| n).sum();
    let busy: u64 = r
        .stacks
        .iter()
        .filter(|(s, _)| s.get(1).is_some_and(|t| t == &format!("busy-worker/{busy_tid}")))
        .filter(|(s, _)| s.iter().any(|f| f == "busy_worker"))
        .map(|(_, n)| n)
        .sum();
    assert!(total > 100, "{total} samples");
    assert!(busy * 10 >= total * 9, "busy thread: {busy} of {total} samples");
}

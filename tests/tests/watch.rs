//! `flamewatch watch` end to end: alerts from the LogCaster incidents, the
//! emergency profiles they start, restarts, webhooks, flapping, schedules
//! and on-demand triggers.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use flamewatch_e2e::*;
use serde_json::Value;

/// The LogCaster preset with its target replaced by `target` (a `pid = N`
/// or `process = "name"` line).
fn logcaster_config(dir: &Path, target: &str) -> PathBuf {
    let preset = std::fs::read_to_string(workspace_root().join("configs/logcaster.toml")).unwrap();
    write_config(dir, &preset.replace("process = \"logcaster\"", target))
}

/// A config of `tables` (top-level keys may come first) writing into
/// `dir`, with short emergency profiles.
fn write_config(dir: &Path, tables: &str) -> PathBuf {
    let path = dir.join("flamewatch.toml");
    let text = format!(
        "output = {:?}\ncontrol_socket = {:?}\nmetrics_addr = \"off\"\n{tables}\n[emergency]\nduration = \"4s\"\n",
        dir.display().to_string(),
        dir.join("control.sock").display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A critical `cpu_high` rule of the target above it: over 80 % for `for_s` s.
fn cpu_high_rule(for_s: u32) -> String {
    format!(
        "[[target.rule]]\nname = \"cpu_high\"\nseverity = \"critical\"\nkind = \"threshold\"\n\
         metric = \"cpu_pct\"\nabove = 80\nfor_s = {for_s}\n"
    )
}

/// The daemon of `config` (writing into `dir`), once it serves its control
/// socket and has found its targets; with that socket.
fn daemon_ready(dir: &Path, config: &Path) -> (TestProcess, PathBuf) {
    let d = daemon(config, &[]);
    let socket = dir.join("control.sock");
    assert!(
        wait_until(Duration::from_secs(10), || socket.exists()),
        "control socket"
    );
    // The socket opens before the first interval finds the target.
    std::thread::sleep(Duration::from_secs(2));
    (d, socket)
}

/// `flamewatch trigger` of a `duration` profile of `pid`, in the background.
fn trigger(pid: &str, duration: &str, socket: &Path) -> std::process::Child {
    Command::new(flamewatch_bin())
        .args([
            "trigger",
            "--pid",
            pid,
            "--duration",
            duration,
            "--control-socket",
        ])
        .arg(socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn daemon(config: &Path, extra_args: &[&str]) -> TestProcess {
    let mut cmd = Command::new(flamewatch_bin());
    cmd.args(["watch", "--config", config.to_str().unwrap()])
        .args(extra_args)
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

/// Waits for an alert record matching `pred`.
fn wait_alert(dir: &Path, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(a) = alerts(dir).into_iter().find(&pred) {
            return Some(a);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

fn rule_is(a: &Value, rule: &str, status: &str) -> bool {
    a["rule"] == rule && a["status"] == status
}

/// LogCaster with `incident`, and clients (`load` arguments).
struct Logcaster {
    server: TestProcess,
    _load: Option<TestProcess>,
}

fn logcaster(bin: &Path, port: u16, incident: &[&str], load: &[&str]) -> Logcaster {
    let health = free_tcp_port();
    let mut cmd = Command::new(bin);
    cmd.args(["--port", &port.to_string(), "--health-port", &health.to_string()])
        .args(incident);
    let server = TestProcess::spawn_ready(cmd);
    let load = (!load.is_empty()).then(|| {
        let mut cmd = Command::new(target_bin("logcaster-load"));
        cmd.args(["--port", &port.to_string()])
            .args(load)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        TestProcess::spawn(cmd)
    });
    Logcaster { server, _load: load }
}

/// Test that LogCaster's busy loop raises the CPU alert within 15 s of the
/// incident, and that its emergency profile shows the spinning accept loop
/// in select().
#[test]
fn busy_loop_alert_and_emergency_profile() {
    if !privileged("busy_loop_alert_and_emergency_profile") {
        return;
    }
    let _turn = cpu_bound_turn();
    let dir = output_dir();
    // The incident begins 3 s after the server starts (within the spawn).
    let incident = Instant::now() + Duration::from_secs(3);
    let lc = logcaster(
        &target_bin("logcaster"),
        free_tcp_port(),
        &["--incident", "busy-loop", "--incident-after", "3"],
        &["--connections", "2", "--rate", "200", "--duration", "60"],
    );
    let config = logcaster_config(dir.path(), &format!("pid = {}", lc.server.pid()));
    let _d = daemon(&config, &[]);
    // Under emulation (the kernel matrix's guests) everything is slower.
    let slow = std::env::var_os("FLAMEWATCH_TEST_SLOW").is_some();
    let slack = Duration::from_secs(if slow { 30 } else { 0 });
    let alert = wait_alert(dir.path(), Duration::from_secs(30) + slack, |a| {
        rule_is(a, "cpu_high", "firing")
    })
    .expect("cpu_high fired");
    let after = Instant::now().checked_duration_since(incident);
    // The preset's rule needs 10 s above 80 %: an alert sooner would not be
    // the incident's (polling adds up to 0.5 s; a tick of slack).
    assert!(
        after.is_some_and(|a| a >= Duration::from_secs(9) && a <= Duration::from_secs(15) + slack),
        "alert {after:?} after the incident (want 10-15 s)"
    );
    assert_eq!(alert["severity"], "critical");
    assert_eq!(alert["target"]["pid"].as_u64(), Some(u64::from(lc.server.pid())));
    // The spinning thread is the main one (the accept loop), not a worker.
    let busiest = &alert["top_threads"][0];
    assert_eq!(
        busiest["tid"].as_u64(),
        Some(u64::from(lc.server.pid())),
        "{alert:#}"
    );
    assert!(busiest["cpu_pct"].as_f64().unwrap_or(0.0) > 80.0, "{alert:#}");
    assert!(
        alert["message"].as_str().unwrap().contains("busiest threads"),
        "{alert:#}"
    );
    let profile = wait_alert(dir.path(), Duration::from_secs(40) + slack, |a| {
        rule_is(a, "cpu_high", "profile")
    })
    .expect("emergency profile linked");
    let summary = read_json(Path::new(profile["profile"]["json"].as_str().unwrap()));
    assert_eq!(summary["session"]["kind"], "emergency");
    // From the stacks: under emulation the guest kernel's many functions
    // can push accept_loop (little self time) out of top_functions.
    let stacks = read_folded(Path::new(summary["files"]["folded"].as_str().unwrap()));
    for f in ["accept_loop", "__GI___select"] {
        assert!(
            share_through(&stacks, f) > 60.0,
            "{f}: {:.1} %; {:#}",
            share_through(&stacks, f),
            summary["top_functions"]
        );
    }
    assert!(Path::new(profile["profile"]["svg"].as_str().unwrap()).exists());
}

/// Test that LogCaster's search-result leak raises the memory-growth alert
/// within 60 s of the incident, stating its rate.
#[test]
fn leak_memory_alert() {
    if !privileged("leak_memory_alert") {
        return;
    }
    let dir = output_dir();
    let lc = logcaster(
        &target_bin("logcaster"),
        free_tcp_port(),
        &["--incident", "leak"],
        &[
            "--connections",
            "2",
            "--rate",
            "200",
            "--search-rate",
            "20",
            "--duration",
            "120",
        ],
    );
    let config = logcaster_config(dir.path(), &format!("pid = {}", lc.server.pid()));
    let _d = daemon(&config, &[]);
    let alert = wait_alert(dir.path(), Duration::from_secs(60), |a| {
        rule_is(a, "memory_growth", "firing")
    })
    .expect("memory_growth within 60 s");
    let msg = alert["message"].as_str().unwrap();
    assert!(
        msg.starts_with("RSS growing") && msg.contains("MB/min") && msg.contains("limit in"),
        "{msg}"
    );
}

/// `memshape --shape SHAPE` for `seconds`, once it runs.
fn memshape(shape: &str, seconds: u32) -> TestProcess {
    let mut cmd = Command::new(target_bin("memshape"));
    cmd.args([
        "--shape",
        shape,
        "--mb-per-s",
        "5",
        "--seconds",
        &seconds.to_string(),
    ]);
    TestProcess::spawn_ready(cmd)
}

/// Test that with the generic rules (no preset) a 5 MB/s leak is alerted
/// within 60 s: a steep, clean climb does not wait for the 120 s window.
#[test]
fn generic_rules_catch_a_fast_leak() {
    if !privileged("generic_rules_catch_a_fast_leak") {
        return;
    }
    let dir = output_dir();
    let leak = memshape("leak", 90);
    let started = Instant::now();
    let config = write_config(dir.path(), &format!("[[target]]\npid = {}\n", leak.pid()));
    let _d = daemon(&config, &[]);
    let alert = wait_alert(dir.path(), Duration::from_secs(60), |a| {
        rule_is(a, "memory_growth", "firing")
    })
    .expect("memory_growth within 60 s of a 5 MB/s leak");
    let msg = alert["message"].as_str().unwrap();
    // 5 MiB/s = 315 MB/min.
    assert!(msg.starts_with("RSS growing 3"), "{msg}");
    eprintln!(
        "a 5 MB/s leak alerted after {:.0} s: {msg}",
        started.elapsed().as_secs_f64()
    );
    // Its emergency profile is a memory profile: where the new pages come from.
    let profile = wait_alert(dir.path(), Duration::from_secs(30), |a| {
        rule_is(a, "memory_growth", "profile")
    })
    .expect("the leak's memory profile linked");
    let json = PathBuf::from(profile["profile"]["json"].as_str().unwrap());
    let summary = read_json(&json);
    assert_eq!(summary["mode"], "memory", "{summary}");
    let stacks = read_folded(&json.with_extension("folded"));
    let total: u64 = stacks.iter().map(|(_, n)| n).sum();
    let leaking: u64 = stacks
        .iter()
        .filter(|(s, _)| s.iter().any(|f| f == "touch" || f == "keep_leaking"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        total > 0 && leaking * 10 >= total * 8,
        "leaking stacks {leaking} of {total} bytes: {stacks:?}"
    );
}

/// Test that a warm-up to 300 MB followed by a flat line, and a sawtooth
/// (5 MB/s for 8 s, then all returned, every 10 s), raise no memory alert
/// over 3 minutes with the generic rules.
#[test]
fn warm_up_and_sawtooth_no_memory_alert() {
    if !privileged("warm_up_and_sawtooth_no_memory_alert") {
        return;
    }
    let dir = output_dir();
    let warm = memshape("warmup", 200);
    let saw = memshape("sawtooth", 200);
    let config = write_config(
        dir.path(),
        &format!(
            "[[target]]\npid = {}\n[[target]]\npid = {}\n",
            warm.pid(),
            saw.pid()
        ),
    );
    let _d = daemon(&config, &[]);
    std::thread::sleep(Duration::from_secs(180));
    let rss = rss_kib(warm.pid()).unwrap_or(0);
    assert!(rss > 250 * 1024, "the warm-up filled its cache: {rss} KiB");
    let fired: Vec<Value> = alerts(dir.path())
        .into_iter()
        .filter(|a| a["rule"] == "memory_growth")
        .collect();
    assert!(fired.is_empty(), "{fired:#?}");
}

/// Test that a steady LogCaster (same load, no leak) raises no memory
/// alert in two minutes.
#[test]
fn steady_server_no_memory_alert() {
    if !privileged("steady_server_no_memory_alert") {
        return;
    }
    let dir = output_dir();
    let lc = logcaster(
        &target_bin("logcaster"),
        free_tcp_port(),
        &[],
        &[
            "--connections",
            "2",
            "--rate",
            "200",
            "--search-rate",
            "20",
            "--duration",
            "130",
        ],
    );
    let config = logcaster_config(dir.path(), &format!("pid = {}", lc.server.pid()));
    let _d = daemon(&config, &[]);
    std::thread::sleep(Duration::from_secs(120));
    let memory: Vec<Value> = alerts(dir.path())
        .into_iter()
        .filter(|a| a["rule"] == "memory_growth")
        .collect();
    assert!(memory.is_empty(), "{memory:#?}");
}

/// Test that LogCaster's server-side closes raise the TIME_WAIT alert, and
/// that it names port 9999.
#[test]
fn timewait_alert_names_port() {
    if !privileged("timewait_alert_names_port") {
        return;
    }
    let dir = output_dir();
    // The incident's documented port.
    let lc = logcaster(
        &target_bin("logcaster"),
        9999,
        &["--incident", "timewait"],
        &[
            "--connections",
            "4",
            "--rate",
            "1000",
            "--churn",
            "--duration",
            "60",
        ],
    );
    let config = logcaster_config(dir.path(), &format!("pid = {}", lc.server.pid()));
    let _d = daemon(&config, &[]);
    let alert = wait_alert(dir.path(), Duration::from_secs(45), |a| {
        rule_is(a, "time_wait", "firing")
    })
    .expect("time_wait fired");
    assert!(
        alert["message"].as_str().unwrap().contains("port 9999"),
        "{alert:#}"
    );
    // The port's own count, from the kernel, is in the evidence.
    assert!(alert["value"].as_f64().unwrap_or(0.0) > 0.0, "{alert:#}");
    drop(lc);
}

/// Test that LogCaster's lock-order deadlock raises the stuck alert with the
/// blocked threads' stacks as evidence, and an off-CPU emergency profile.
#[test]
fn deadlock_stuck_alert() {
    if !privileged("deadlock_stuck_alert") {
        return;
    }
    let dir = output_dir();
    let lc = logcaster(
        &target_bin("logcaster"),
        free_tcp_port(),
        &["--incident", "deadlock", "--incident-after", "2"],
        &["--connections", "4", "--rate", "1000", "--duration", "60"],
    );
    let config = logcaster_config(dir.path(), &format!("pid = {}", lc.server.pid()));
    let _d = daemon(&config, &[]);
    let alert = wait_alert(dir.path(), Duration::from_secs(30), |a| {
        rule_is(a, "stuck", "firing")
    })
    .expect("stuck fired");
    assert_eq!(alert["severity"], "emergency");
    let blocked = alert["blocked"].as_array().expect("blocked evidence");
    assert!(!blocked.is_empty() && blocked.len() <= 5, "{alert:#}");
    let on_lock = blocked.iter().filter(|b| {
        b["stack"].as_array().unwrap().iter().any(|f| {
            let f = f.as_str().unwrap();
            f.contains("pthread_mutex_lock") || f.contains("lll_lock_wait") || f.contains("futex")
        })
    });
    assert!(on_lock.count() >= 2, "{alert:#}");
    let profile = wait_alert(dir.path(), Duration::from_secs(40), |a| {
        rule_is(a, "stuck", "profile")
    })
    .expect("off-CPU profile linked");
    let summary = read_json(Path::new(profile["profile"]["json"].as_str().unwrap()));
    assert_eq!(summary["mode"], "offcpu");
}

/// Test that a target that restarts is found again within 2 s (the alert
/// stream says so, and the webhook receives it), that a target that is
/// gone is reported once, not in a loop, and that its return after a while
/// away is a restart too, which resolves the `target_gone` record.
#[test]
fn restart_followed_and_webhook() {
    if !privileged("restart_followed_and_webhook") {
        return;
    }
    let dir = output_dir();
    // A name no other test uses: the daemon follows it by name.
    let name = format!("lcr{}", std::process::id() % 100_000);
    let bin = dir.path().join(&name);
    std::fs::copy(target_bin("logcaster"), &bin).unwrap();
    let port = free_tcp_port();
    let first = logcaster(&bin, port, &[], &[]);
    let (url, bodies) = http_receiver("/alerts");
    let config = logcaster_config(dir.path(), &format!("process = {name:?}"));
    let _d = daemon(&config, &["--webhook", &url]);
    std::thread::sleep(Duration::from_secs(3));
    let old = first.server.pid();
    drop(first);
    let second = logcaster(&bin, port, &[], &[]);
    let restarted = Instant::now();
    let alert = wait_alert(dir.path(), Duration::from_secs(5), |a| {
        a["rule"] == "target_restarted"
    })
    .expect("restart reported");
    assert!(
        restarted.elapsed() <= Duration::from_secs(3),
        "found again within 2 s (+ polling)"
    );
    assert_eq!(
        alert["target"]["pid"].as_u64(),
        Some(u64::from(second.server.pid()))
    );
    assert!(alert["message"]
        .as_str()
        .unwrap()
        .contains(&format!("pid {old} -> {}", second.server.pid())));
    assert!(
        wait_until(Duration::from_secs(10), || bodies
            .lock()
            .unwrap()
            .iter()
            .any(|b| b["rule"] == "target_restarted")),
        "webhook received the alert"
    );
    let second_pid = second.server.pid();
    drop(second);
    std::thread::sleep(Duration::from_secs(6));
    let gone = alerts(dir.path())
        .into_iter()
        .filter(|a| a["rule"] == "target_gone")
        .count();
    assert_eq!(gone, 1, "gone is reported once");
    let third = logcaster(&bin, port, &[], &[]);
    let back = wait_alert(dir.path(), Duration::from_secs(5), |a| {
        a["rule"] == "target_restarted" && a["target"]["pid"].as_u64() == Some(u64::from(third.server.pid()))
    })
    .expect("the return after a gap is a restart");
    let message = back["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("pid {} -> {}", second_pid, third.server.pid()))
            && message.contains("s away"),
        "{back:#}"
    );
    assert!(
        alerts(dir.path())
            .iter()
            .any(|a| rule_is(a, "target_gone", "resolved")),
        "target_gone resolved when it is back"
    );
}

/// Test that a metric flapping across its threshold (2 s above, 3 s below)
/// for 20 s yields one alert, not one per flap.
#[test]
fn flapping_metric_one_alert() {
    if !privileged("flapping_metric_one_alert") {
        return;
    }
    let _turn = cpu_bound_turn();
    let dir = output_dir();
    let mut cmd = Command::new(target_bin("sleepspin"));
    // 3 s below: two whole 1 s samples at ~0 % however the phases fall
    // against the daemon's ticks, so clear_s = 1 is met in every flap (with
    // 2 s, a phase often gave one clear sample between two partial ones).
    cmd.args(["--spin-us", "2000000", "--sleep-us", "3000000", "--seconds", "60"]);
    let target = TestProcess::spawn_ready(cmd);
    let config = write_config(
        dir.path(),
        &format!(
            "[[target]]\npid = {}\n[[target.rule]]\nname = \"cpu_flap\"\nseverity = \"warning\"\nkind = \"threshold\"\n\
             metric = \"cpu_pct\"\nabove = 50\nfor_s = 1\nclear_s = 1\ncooldown_s = 300\n",
            target.pid()
        ),
    );
    let _d = daemon(&config, &[]);
    std::thread::sleep(Duration::from_secs(20));
    let fired = alerts(dir.path())
        .into_iter()
        .filter(|a| rule_is(a, "cpu_flap", "firing"))
        .count();
    let resolved = alerts(dir.path())
        .into_iter()
        .filter(|a| rule_is(a, "cpu_flap", "resolved"))
        .count();
    assert_eq!(fired, 1, "one alert while flapping");
    assert!(resolved >= 1, "each flap clears it (and does not fire again)");
}

/// Test that `flamewatch trigger` asks the running daemon for a profile and
/// prints its files, and that a scheduled baseline lets the emergency
/// profile come with a differential flamegraph.
#[test]
fn trigger_schedule_and_differential() {
    if !privileged("trigger_schedule_and_differential") {
        return;
    }
    let _turn = cpu_bound_turn();
    let dir = output_dir();
    let lc = logcaster(
        &target_bin("logcaster"),
        free_tcp_port(),
        &["--incident", "busy-loop", "--incident-after", "12"],
        &["--connections", "2", "--rate", "500", "--duration", "60"],
    );
    let config = write_config(
        dir.path(),
        &format!(
            "[[target]]\npid = {}\n\
             [[target.schedule]]\ncron = \"*/5 * * * * *\"\nduration = \"2s\"\n{}",
            lc.server.pid(),
            cpu_high_rule(3)
        ),
    );
    let _d = daemon(&config, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let out = flamewatch(&[
        "trigger",
        "--pid",
        &lc.server.pid().to_string(),
        "--duration",
        "2s",
        "--control-socket",
        dir.path().join("control.sock").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let svg = printed_files(&out.stdout, "svg");
    assert_eq!(svg.len(), 1);
    assert!(svg[0].exists());
    let summary = read_json(&printed_files(&out.stdout, "json")[0]);
    assert_eq!(summary["session"]["kind"], "on-demand");
    // Baselines every 5 s; the incident at 12 s gets an emergency profile
    // with a differential against the latest baseline.
    let profile = wait_alert(dir.path(), Duration::from_secs(40), |a| {
        rule_is(a, "cpu_high", "profile")
    })
    .expect("emergency profile");
    let diff = profile["profile"]["diff_svg"]
        .as_str()
        .expect("differential flamegraph");
    assert!(std::fs::read_to_string(diff).unwrap().contains("<svg"));
    let baselines = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("-baseline-")
        })
        .count();
    assert!(baselines >= 3, "scheduled baselines written: {baselines} files");
    // Asking for a process the daemon does not watch is refused (exit 2).
    let out = flamewatch(&[
        "trigger",
        "--pid",
        "1",
        "--duration",
        "1s",
        "--control-socket",
        dir.path().join("control.sock").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// Test that the daemon runs at most three sessions at once: of four
/// profiles asked for together, three are written and the fourth is
/// refused with a reason (exit status 2).
#[test]
fn at_most_three_sessions() {
    if !privileged("at_most_three_sessions") {
        return;
    }
    let _turn = cpu_bound_turn();
    let dir = output_dir();
    let mut cmd = Command::new(target_bin("hotpaths"));
    cmd.args(["--seconds", "60"]);
    let target = TestProcess::spawn_ready(cmd);
    let config = write_config(dir.path(), &format!("[[target]]\npid = {}\n", target.pid()));
    let (_d, socket) = daemon_ready(dir.path(), &config);
    let pid = target.pid().to_string();
    let triggers: Vec<std::process::Child> = (0..4).map(|_| trigger(&pid, "4s", &socket)).collect();
    let outs: Vec<std::process::Output> = triggers
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let ok = outs.iter().filter(|o| o.status.success()).count();
    let refused: Vec<String> = outs
        .iter()
        .filter(|o| !o.status.success())
        .map(|o| {
            assert_eq!(o.status.code(), Some(2));
            String::from_utf8_lossy(&o.stderr).into_owned()
        })
        .collect();
    assert_eq!(ok, 3, "three sessions ran; refused: {refused:?}");
    assert_eq!(refused.len(), 1);
    assert!(refused[0].contains("sessions"), "{}", refused[0]);
}

/// Test that an emergency profile that finds every session slot taken is
/// deferred, not lost: it starts once the running session ends, while its
/// alert still fires.
#[test]
fn deferred_emergency_starts_when_a_slot_frees() {
    if !privileged("deferred_emergency_starts_when_a_slot_frees") {
        return;
    }
    let _turn = cpu_bound_turn();
    let dir = output_dir();
    let lc = logcaster(
        &target_bin("logcaster"),
        free_tcp_port(),
        &["--incident", "busy-loop", "--incident-after", "3"],
        &["--connections", "2", "--rate", "200", "--duration", "60"],
    );
    let pid = lc.server.pid().to_string();
    // One session slot, so the on-demand profile below takes it.
    let config = write_config(
        dir.path(),
        &format!("max_sessions = 1\n[[target]]\npid = {pid}\n{}", cpu_high_rule(2)),
    );
    let (_d, socket) = daemon_ready(dir.path(), &config);
    let mut holder = trigger(&pid, "12s", &socket);
    wait_alert(dir.path(), Duration::from_secs(30), |a| {
        rule_is(a, "cpu_high", "firing")
    })
    .expect("cpu_high fired");
    assert!(
        holder.try_wait().unwrap().is_none(),
        "the alert fired while the on-demand profile held the only slot"
    );
    assert!(
        !alerts(dir.path())
            .iter()
            .any(|a| rule_is(a, "cpu_high", "profile")),
        "no emergency profile while the slot is taken"
    );
    let out = holder.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let profile = wait_alert(dir.path(), Duration::from_secs(30), |a| {
        rule_is(a, "cpu_high", "profile")
    })
    .expect("the deferred emergency profile ran once the slot freed");
    let summary = read_json(Path::new(profile["profile"]["json"].as_str().unwrap()));
    assert_eq!(summary["session"]["kind"], "emergency");
    assert!(
        total_pct(&summary, "accept_loop") > 60.0,
        "{:#}",
        summary["top_functions"]
    );
}

/// Test the control socket's lifecycle: a second `flamewatch watch` on the
/// socket of a running one exits 2 with one line and leaves it serving; a
/// socket left by a killed (SIGKILL) daemon is replaced by the next one;
/// a daemon stopped by SIGINT removes its socket.
#[test]
fn control_socket_lifecycle() {
    if !privileged("control_socket_lifecycle") {
        return;
    }
    let dir = output_dir();
    let mut sleeper = Command::new("sleep");
    sleeper.arg("120");
    let target = TestProcess::spawn(sleeper);
    let config = write_config(dir.path(), &format!("[[target]]\npid = {}\n", target.pid()));
    let (first, socket) = daemon_ready(dir.path(), &config);
    let logs = output_dir();
    let log = logs.path().join("second.log");
    let mut cmd = Command::new(flamewatch_bin());
    cmd.args(["watch", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let status = TestProcess::spawn(cmd)
        .wait_with_timeout(Duration::from_secs(20))
        .expect("the second daemon exits");
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("another `flamewatch watch` is running"),
        "{stderr}"
    );
    let answers = || std::os::unix::net::UnixStream::connect(&socket).is_ok();
    assert!(answers(), "the first daemon still serves its socket");
    first.signal(libc::SIGKILL);
    assert!(first.wait_with_timeout(Duration::from_secs(10)).is_some());
    assert!(
        socket.exists() && !answers(),
        "a killed daemon leaves a dead socket"
    );
    let (next, _) = daemon_ready(dir.path(), &config);
    assert!(
        wait_until(Duration::from_secs(10), answers),
        "the next daemon replaced the stale socket"
    );
    next.signal(libc::SIGINT);
    assert!(next.wait_with_timeout(Duration::from_secs(20)).is_some());
    assert!(!socket.exists(), "a stopped daemon removes its socket");
}

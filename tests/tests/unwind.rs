//! Complete stacks for binaries without frame pointers: DWARF unwinding of
//! stack copies, end to end.

use std::process::Command;

use flamewatch_e2e::*;

fn shared_leaf_target() -> TestProcess {
    // The production-like build: -O2, no frame pointers.
    let mut cmd = Command::new(target_bin("hotpaths"));
    cmd.args(["--shared-leaf", "--ratio", "3:1", "--seconds", "60"]);
    TestProcess::spawn_ready(cmd)
}

/// Test that on an -O2 binary without frame pointers, a 3:1 split reached
/// through one shared leaf is recovered (±5 points) with its callers, and
/// that `auto` chose DWARF for that reason.
#[test]
fn dwarf_recovers_callers() {
    if !privileged("dwarf_recovers_callers") {
        return;
    }
    let target = shared_leaf_target();
    let r = record(target.pid(), &["--duration", "5s", "--freq", "199"]);
    let u = &r.summary["sampling"]["unwind"];
    assert_eq!(u["mode"], "dwarf", "{u:#}");
    assert_eq!(u["requested"], "auto");
    assert_eq!(u["executable"]["frame_pointers"], false, "{u:#}");
    let a = share_through(&r.stacks, "path_a");
    let b = share_through(&r.stacks, "path_b");
    assert!(
        (a - 75.0).abs() <= 5.0 && (b - 25.0).abs() <= 5.0,
        "path_a {a}%, path_b {b}%\n{:?}",
        r.stacks
    );
    assert!(
        share_through(&r.stacks, "main") >= 95.0,
        "callers down to main: {:?}",
        r.stacks
    );
    assert!(self_pct(&r.summary, "shared_leaf") > 90.0);
    let complete = u["complete"].as_f64().unwrap() / u["dwarf_samples"].as_f64().unwrap();
    assert!(complete >= 0.95, "{u:#}");
}

/// Test that the same target with `--unwind fp` loses the stack beyond the
/// leaf's caller: the leaf fix-up brings back `path_a` (the return address
/// at rsp), but without frame pointers `main` is gone. This is what the
/// DWARF unwinder fixes.
#[test]
fn frame_pointers_lose_callers() {
    if !privileged("frame_pointers_lose_callers") {
        return;
    }
    let target = shared_leaf_target();
    let r = record(target.pid(), &["--duration", "3s", "--unwind", "fp"]);
    let u = &r.summary["sampling"]["unwind"];
    assert_eq!(u["mode"], "fp");
    let a = share_through(&r.stacks, "path_a");
    let main = share_through(&r.stacks, "main");
    assert!(
        main < 20.0,
        "fp unwinding should not reach main here: path_a {a}%, main {main}%"
    );
    assert!(
        (a - 75.0).abs() <= 10.0 && u["leaf_fixups"].as_u64() > Some(0),
        "the leaf fix-up finds the leaf's caller: path_a {a}%\n{u:#}"
    );
}

/// Test that a CPU-bound pure-Python script run by the system's python3
/// (no frame pointers) unwinds through the interpreter loop to Py_RunMain
/// for at least 90 % of samples.
#[test]
fn python_reaches_py_runmain() {
    if !privileged("python_reaches_py_runmain") {
        return;
    }
    let script = workspace_root().join("tests/targets/busy.py");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(&script).arg("60");
    let target = TestProcess::spawn_ready(cmd);
    let r = record(target.pid(), &["--duration", "4s", "--freq", "199"]);
    assert_eq!(r.summary["sampling"]["unwind"]["mode"], "dwarf");
    let runmain = share_through(&r.stacks, "Py_RunMain");
    let eval = share_through(&r.stacks, "_PyEval_EvalFrameDefault");
    assert!(runmain >= 90.0, "Py_RunMain in {runmain}% of samples");
    assert!(eval >= 90.0, "interpreter loop in {eval}% of samples");
}

/// Test that a stack window too small to hold the stack is counted as
/// truncation, and the partial stacks are still in the profile.
#[test]
fn small_window_truncates_visibly() {
    if !privileged("small_window_truncates_visibly") {
        return;
    }
    let target = shared_leaf_target();
    let r = record(
        target.pid(),
        &["--duration", "3s", "--unwind", "dwarf", "--stack-window", "512"],
    );
    let u = &r.summary["sampling"]["unwind"];
    let truncated = u["truncated_window"].as_u64().unwrap();
    assert!(truncated * 2 > u["dwarf_samples"].as_u64().unwrap(), "{u:#}");
    assert!(share_through(&r.stacks, "[truncated stack]") > 50.0);
    assert!(
        self_pct(&r.summary, "shared_leaf") > 90.0,
        "partial stacks still counted"
    );
}

/// Test that the production-like game server (-O2, no frame pointers) is
/// unwound down to `main` for at least 95 % of samples, with its systems in
/// `top_functions`, its C++ names demangled, and its inlined helper shown
/// as a frame under the function it was inlined into.
#[test]
fn game_server_full_stacks() {
    if !privileged("game_server_full_stacks") {
        return;
    }
    let mut cmd = Command::new(target_bin("game-server"));
    cmd.args(["--port", &free_udp_port().to_string(), "--players", "1500"]);
    let target = TestProcess::spawn_ready(cmd);
    let r = record(target.pid(), &["--duration", "4s", "--freq", "499"]);
    assert_eq!(r.summary["sampling"]["unwind"]["mode"], "dwarf");
    let main = share_through(&r.stacks, "main");
    assert!(
        main >= 95.0,
        "main in {main}% of samples\n{:?}",
        &r.stacks[..r.stacks.len().min(10)]
    );
    for system in ["physics_step", "ai_update", "serialize_snapshot"] {
        assert!(
            total_pct(&r.summary, system) > 1.0,
            "{system} in top_functions: {:#}",
            r.summary["top_functions"]
        );
    }
    let frames = || r.stacks.iter().flat_map(|(s, _)| s.iter());
    assert!(
        frames().all(|f| !f.starts_with("_Z")),
        "mangled names: {:?}",
        frames().filter(|f| f.starts_with("_Z")).collect::<Vec<_>>()
    );
    // A C++ function (mangled _Z15rebuild_bucketsv), demangled.
    assert!(
        frames().any(|f| f == "rebuild_buckets()"),
        "rebuild_buckets() in the stacks"
    );
    // put_varint is always inlined: no symbol of its own, only debug info.
    let inlined = r.stacks.iter().any(|(s, _)| {
        s.iter()
            .position(|f| f == "serialize_snapshot")
            .is_some_and(|i| s[i + 1..].iter().any(|f| f == "put_varint"))
    });
    assert!(inlined, "serialize_snapshot;…;put_varint in the stacks");
}

/// `flamewatch record --pid PID ARGS` into a temporary folder: its summary,
/// folded stacks and stderr (the log).
fn record_with_log(pid: u32, args: &[&str]) -> (serde_json::Value, Vec<(Vec<String>, u64)>, String) {
    let dir = output_dir();
    let pid = pid.to_string();
    let mut all = vec!["record", "--pid", &pid, "--output", dir.path().to_str().unwrap()];
    all.extend_from_slice(args);
    let out = flamewatch(&all);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    let summary = read_json(&printed_files(&out.stdout, "json")[0]);
    let stacks = read_folded(&printed_files(&out.stdout, "folded")[0]);
    (summary, stacks, log)
}

/// The switch's log lines.
fn switch_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("unwinding with DWARF from now on"))
        .collect()
}

/// Test that `--unwind auto` on a frame-pointer build checks its choice on
/// 1 sample in 16, finds frame pointers (with the leaf fix-up) agreeing
/// with DWARF, and keeps them.
#[test]
fn auto_check_keeps_agreeing_frame_pointers() {
    if !privileged("auto_check_keeps_agreeing_frame_pointers") {
        return;
    }
    let _turn = cpu_bound_turn();
    let mut cmd = Command::new(target_bin("leafcall-fp"));
    cmd.args(["--mode", "own", "--seconds", "60"]);
    let target = TestProcess::spawn_ready(cmd);
    let (summary, _, log) = record_with_log(target.pid(), &["--duration", "4s", "--freq", "999"]);
    let u = &summary["sampling"]["unwind"];
    assert_eq!(u["mode"], "fp", "{u:#}");
    let compared = u["fp_compared"].as_f64().unwrap();
    let samples = summary["sampling"]["samples"].as_f64().unwrap();
    assert!(compared >= 50.0, "{u:#}");
    // 1 in 16 per CPU (a sample without a user stack is not compared).
    assert!(
        (samples / 24.0..=samples / 12.0).contains(&compared),
        "{compared} compared of {samples} samples"
    );
    let pct = u["fp_agreement_pct"].as_f64().unwrap();
    assert!(pct >= 90.0, "agreement {pct} %\n{u:#}");
    assert!(switch_lines(&log).is_empty(), "{log}");
}

/// Test that a binary whose framed cold functions fool `auto`'s prologue
/// count, but whose hot path keeps no frames, is found out by the check:
/// the walks disagree, the target switches to DWARF (one log line with the
/// numbers), and the profile then has the whole hot path.
#[test]
fn auto_check_switches_a_decoy_to_dwarf() {
    if !privileged("auto_check_switches_a_decoy_to_dwarf") {
        return;
    }
    let _turn = cpu_bound_turn();
    let mut cmd = Command::new(target_bin("fpdecoy"));
    cmd.args(["--seconds", "60"]);
    let target = TestProcess::spawn_ready(cmd);
    let (summary, stacks, log) = record_with_log(target.pid(), &["--duration", "10s", "--freq", "999"]);
    let u = &summary["sampling"]["unwind"];
    assert_eq!(
        u["executable"]["frame_pointers"], true,
        "the decoy fools the count: {u:#}"
    );
    assert_eq!(u["mode"], "dwarf", "{u:#}");
    assert!(
        u["reason"].as_str().unwrap().starts_with("switched to DWARF"),
        "{u:#}"
    );
    let pct = u["fp_agreement_pct"].as_f64().unwrap();
    assert!(pct < 50.0 && u["fp_compared"].as_u64() >= Some(50), "{u:#}");
    let lines = switch_lines(&log);
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("checked samples"), "{}", lines[0]);
    assert!(u["dwarf_samples"].as_u64() > Some(0), "{u:#}");
    // Frame pointers never reach hot_outer here (see `--unwind fp` below):
    // what does comes from DWARF, after the switch. It needs 50 compared
    // samples, 1 in 16 (800 samples); it must come within twice that.
    let before_switch: u64 = stacks
        .iter()
        .filter(|(s, _)| s.iter().any(|f| f == "hot_inner") && !s.iter().any(|f| f == "hot_outer"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        before_switch <= 1600,
        "{before_switch} frame-pointer samples\n{stacks:?}"
    );
    let whole = share_through(&stacks, "hot_outer");
    let main = share_through(&stacks, "main");
    assert!(
        whole >= 50.0 && main >= 50.0,
        "hot_outer {whole:.1} %, main {main:.1} %\n{stacks:?}"
    );
    let fp = record(
        target.pid(),
        &["--duration", "2s", "--freq", "999", "--unwind", "fp"],
    );
    assert!(
        share_through(&fp.stacks, "hot_outer") < 10.0,
        "frame pointers lose hot_outer: {:?}",
        fp.stacks
    );
}

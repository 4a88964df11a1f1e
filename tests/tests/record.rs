//! `flamewatch record` end to end: real BPF, real targets.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use flamewatch_e2e::*;

fn hotpaths(args: &[&str]) -> TestProcess {
    let mut cmd = Command::new(target_bin("hotpaths-fp"));
    cmd.args(args);
    TestProcess::spawn_ready(cmd)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Test that a 3:1 CPU split between two hot paths is recorded within ±5
/// points, with the callers (`main`) in the stacks.
#[test]
fn three_to_one_split() {
    if !privileged("three_to_one_split") {
        return;
    }
    let target = hotpaths(&["--ratio", "3:1"]);
    let out_dir = output_dir();
    let pid = target.pid().to_string();
    let out = flamewatch(&[
        "record",
        "--pid",
        &pid,
        "--duration",
        "5s",
        "--freq",
        "199",
        "--output",
        out_dir.path().to_str().unwrap(),
        "--label",
        "split",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = printed_files(&out.stdout, "json");
    let svg = printed_files(&out.stdout, "svg");
    let folded = printed_files(&out.stdout, "folded");
    assert_eq!(
        (json.len(), svg.len(), folded.len()),
        (1, 1, 1),
        "three paths printed"
    );
    assert!(json[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with(&format!("split-{pid}-")));
    let summary = read_json(&json[0]);
    let samples = summary["sampling"]["samples"].as_u64().unwrap();
    assert!(samples > 500, "5 s at 199 Hz of a busy thread: {samples} samples");
    let a = self_pct(&summary, "hot_a");
    let b = self_pct(&summary, "hot_b");
    assert!((a - 75.0).abs() <= 5.0, "hot_a {a}% (want 75 ± 5)\n{summary:#}");
    assert!((b - 25.0).abs() <= 5.0, "hot_b {b}% (want 25 ± 5)");
    assert!(
        total_pct(&summary, "main") > 95.0,
        "main is the root of the target's stacks"
    );
    let stacks = read_folded(&folded[0]);
    assert!(
        stacks.iter().any(|(s, _)| s.ends_with(&[
            "main".into(),
            "worker".into(),
            "path_a".into(),
            "hot_a".into()
        ])),
        "full stacks main;worker;path_a;hot_a: {stacks:?}"
    );
    let svg_text = std::fs::read_to_string(&svg[0]).unwrap();
    assert!(svg_text.contains("hot_a") && svg_text.contains(&format!("pid {pid}")));
}

/// Test that `--process NAME` finds the target by name, and that threads
/// created after the session started are sampled too (inherited events).
#[test]
fn by_name_and_late_threads() {
    if !privileged("by_name_and_late_threads") {
        return;
    }
    // A unique name so concurrent tests' targets do not match.
    let dir = output_dir();
    let name = format!("fw-name-{}", std::process::id() % 100_000);
    let bin = dir.path().join(&name);
    std::fs::copy(target_bin("hotpaths-fp"), &bin).unwrap();
    let mut cmd = Command::new(&bin);
    cmd.args(["--late-threads", "1", "--late-after", "1.5"]);
    let target = TestProcess::spawn_ready(cmd);
    let out = flamewatch(&[
        "record",
        "--process",
        &name,
        "--duration",
        "4s",
        "--per-thread",
        "--output",
        dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = printed_files(&out.stdout, "json");
    assert_eq!(json.len(), 1);
    let summary = read_json(&json[0]);
    assert_eq!(
        summary["targets"][0]["pid"].as_u64(),
        Some(u64::from(target.pid()))
    );
    // main and the sleeping starter; the late worker does not exist yet.
    assert_eq!(summary["sampling"]["threads_at_start"].as_u64(), Some(2));
    let stacks = read_folded(&printed_files(&out.stdout, "folded")[0]);
    let late: u64 = stacks
        .iter()
        .filter(|(s, _)| s[1].starts_with("late-worker/"))
        .map(|(_, n)| n)
        .sum();
    let total: u64 = stacks.iter().map(|(_, n)| n).sum();
    // The late thread ran ~2.5 of the 4 s on the second core.
    assert!(
        late * 5 > total,
        "late thread sampled: {late} of {total}\n{stacks:?}"
    );
}

/// Test that a stripped production binary (no symbols, no frame pointers)
/// is still profiled usefully: frames are `module+0x<start of the
/// function>` (from .eh_frame_hdr, which stripping keeps), so the 3:1 split
/// shows on the functions that hot_a and hot_b are in the unstripped copy,
/// and libc's frames keep their names.
#[test]
fn stripped_binary_frames_per_function() {
    if !privileged("stripped_binary_frames_per_function") {
        return;
    }
    // Function addresses of the same build before stripping (gcc's PIE
    // layout maps .text at file offset = address).
    let nm = Command::new("nm")
        .arg(target_bin("hotpaths"))
        .output()
        .expect("nm (binutils)");
    let symbols = String::from_utf8_lossy(&nm.stdout).into_owned();
    let address_of = |name: &str| {
        symbols
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3 && f[2] == name).then(|| u64::from_str_radix(f[0], 16).unwrap())
            })
            .unwrap_or_else(|| panic!("{name} in nm output"))
    };
    let frame = |name: &str| format!("hotpaths-stripped+{:#x}", address_of(name));
    let mut cmd = Command::new(target_bin("hotpaths-stripped"));
    cmd.args(["--ratio", "3:1"]);
    let target = TestProcess::spawn_ready(cmd);
    let r = record(target.pid(), &["--duration", "4s", "--freq", "199"]);
    let a = self_pct(&r.summary, &frame("hot_a"));
    let b = self_pct(&r.summary, &frame("hot_b"));
    assert!(
        (a - 75.0).abs() <= 5.0 && (b - 25.0).abs() <= 5.0,
        "hot_a {a} %, hot_b {b} % (want 75/25 ± 5)\n{:#}",
        r.summary["top_functions"]
    );
    let main = frame("main");
    let libc_then_main = r.stacks.iter().any(|(s, _)| {
        s.windows(2)
            .any(|w| w[0] == "__libc_start_call_main" && w[1] == main)
    });
    assert!(libc_then_main, "__libc_start_call_main;{main} in the stacks");
}

/// Test that bad input gets one clear line on stderr and exit status 2.
#[test]
fn bad_input_exits_2() {
    if !privileged("bad_input_exits_2") {
        return;
    }
    let cases: &[(&[&str], &str)] = &[
        (&["record", "--pid", "4194311"], "no process with pid 4194311"),
        (&["record", "--pid", "2"], "kernel thread"),
        (
            &["record", "--process", "no-such-process-xyz"],
            "no running process named",
        ),
        (
            &["record", "--pid", "1", "--duration", "soon"],
            "duration = \"soon\"",
        ),
        (&["record", "--pid", "1", "--freq", "0"], "--freq"),
        (&["record", "--pid", "1", "--freq", "abc"], "--freq"),
        (&["record", "--duration", "1s"], "--pid"),
        (&["record", "--pid", "1", "--unwind", "sideways"], "--unwind"),
    ];
    for (args, message) in cases {
        let out = flamewatch(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(message),
            "{args:?}: stderr lacks {message:?}: {}",
            stderr(&out)
        );
        assert_eq!(
            stderr(&out).trim_end().lines().count(),
            1,
            "{args:?}: one line: {}",
            stderr(&out)
        );
    }
}

/// Test that without root (or CAP_BPF+CAP_PERFMON) the agent says so and exits 2.
#[test]
fn not_root_exits_2() {
    if !privileged("not_root_exits_2") {
        return;
    }
    let target = hotpaths(&["--seconds", "10"]);
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(flamewatch_bin())
        .args(["record", "--pid", &target.pid().to_string(), "--duration", "1s"])
        .output()
        .expect("setpriv (util-linux)");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("root"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim_end().lines().count(), 1, "{}", stderr(&out));
}

/// Test that a target exiting mid-session still gets its report, a warning,
/// and exit status 0 — without waiting for the full duration.
#[test]
fn target_exits_mid_session() {
    if !privileged("target_exits_mid_session") {
        return;
    }
    let target = hotpaths(&["--seconds", "2"]);
    let dir = output_dir();
    let start = Instant::now();
    let out = flamewatch(&[
        "record",
        "--pid",
        &target.pid().to_string(),
        "--duration",
        "20s",
        "--output",
        dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "session ends when the target does"
    );
    let summary = read_json(&printed_files(&out.stdout, "json")[0]);
    assert!(summary["sampling"]["samples"].as_u64().unwrap() > 50);
    assert!(
        summary["warnings"][0].as_str().unwrap().contains("exited"),
        "{summary:#}"
    );
    // Symbolized from the mappings captured while it lived.
    assert!(self_pct(&summary, "hot_a") > 50.0, "{summary:#}");
}

/// Test that SIGTERM mid-session detaches everything, writes the report and
/// exits 0, and that no program of the agent stays loaded.
#[test]
fn sigterm_detaches_and_reports() {
    if !privileged("sigterm_detaches_and_reports") {
        return;
    }
    let target = hotpaths(&[]);
    let dir = output_dir();
    let mut agent = flamewatch_spawn(&[
        "record",
        "--pid",
        &target.pid().to_string(),
        "--duration",
        "60s",
        "--output",
        dir.path().to_str().unwrap(),
    ]);
    let mut progs = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            progs = bpf_programs_held_by(agent.pid());
            !progs.is_empty()
        }),
        "agent loaded its programs"
    );
    // Programs load before calibration and the first sample: give it 3 s,
    // so a loaded machine still has ~200 samples at 99 Hz to report.
    std::thread::sleep(Duration::from_secs(3));
    agent.signal(libc::SIGTERM);
    let status = agent.child_mut().wait().expect("agent exits");
    assert!(status.success(), "exit status {status:?}");
    let mut stdout = String::new();
    std::io::Read::read_to_string(agent.child_mut().stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let json = printed_files(stdout.as_bytes(), "json");
    assert_eq!(json.len(), 1, "report written: {stdout}");
    let samples = read_json(&json[0])["sampling"]["samples"].as_u64().unwrap();
    assert!(samples > 50, "{samples} samples reported");
    let loaded = loaded_program_ids();
    assert!(
        progs.iter().all(|id| !loaded.contains(id)),
        "programs {progs:?} still loaded"
    );
}

/// Test that even SIGKILL leaves no program loaded: everything hangs off
/// file descriptors, nothing is pinned.
#[test]
fn sigkill_leaves_nothing_loaded() {
    if !privileged("sigkill_leaves_nothing_loaded") {
        return;
    }
    let target = hotpaths(&[]);
    let dir = output_dir();
    let mut agent = flamewatch_spawn(&[
        "record",
        "--pid",
        &target.pid().to_string(),
        "--duration",
        "60s",
        "--output",
        dir.path().to_str().unwrap(),
    ]);
    let mut progs = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        progs = bpf_programs_held_by(agent.pid());
        !progs.is_empty()
    }));
    agent.signal(libc::SIGKILL);
    agent.child_mut().wait().expect("agent exits");
    // Freed asynchronously (RCU) after the last reference goes.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let loaded = loaded_program_ids();
            progs.iter().all(|id| !loaded.contains(id))
        }),
        "programs {progs:?} outlived the agent"
    );
}

/// Test that on the frame-pointer game server with the `hot-path`
/// incident, the known function comes first in `top_functions`.
#[test]
fn game_server_hot_path_first() {
    if !privileged("game_server_hot_path_first") {
        return;
    }
    let mut cmd = Command::new(target_bin("game-server-fp"));
    cmd.args(["--port", &free_udp_port().to_string(), "--incident", "hot-path"]);
    let target = TestProcess::spawn_ready(cmd);
    let dir = output_dir();
    let out = flamewatch(&[
        "record",
        "--pid",
        &target.pid().to_string(),
        "--duration",
        "4s",
        "--output",
        dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = read_json(&printed_files(&out.stdout, "json")[0]);
    assert_eq!(
        summary["top_functions"][0]["name"], "hot_path_pathfinding",
        "{:#}",
        summary["top_functions"]
    );
    assert!(self_pct(&summary, "hot_path_pathfinding") > 50.0);
}

//! `flamewatch latency` end to end: real uprobes on real targets, checked
//! against the targets' own measurements.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use flamewatch_e2e::*;

/// The agent running in the background, its output collected.
struct Agent {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

fn collect(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<String>> {
    let into = Arc::new(Mutex::new(String::new()));
    let sink = into.clone();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            sink.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    into
}

impl Agent {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(flamewatch_bin())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting flamewatch");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the probe is attached ("probing …" in the log).
    fn wait_probing(&mut self) {
        let ready = wait_until(Duration::from_secs(90), || {
            self.stderr().contains("probing ") || self.child.try_wait().ok().flatten().is_some()
        });
        assert!(ready && self.stderr().contains("probing "), "{}", self.stderr());
    }

    /// Waits for it to exit; its status and stdout.
    fn finish(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let done = wait_until(timeout, || self.child.try_wait().ok().flatten().is_some());
        if !done {
            let _ = self.child.kill();
            panic!("agent did not finish: {}", self.stderr());
        }
        let status = self.child.wait().unwrap();
        // The reader threads drain what is left.
        std::thread::sleep(Duration::from_millis(200));
        let out = self.stdout.lock().unwrap().clone();
        (status, out)
    }
}

/// What a framelat run probed by `flamewatch latency` on `tick` (16.7 ms
/// budget) gave: the agent's stdout and the loop's own frame times, ns.
struct FramesProbed {
    stdout: String,
    own: Vec<u64>,
    _dir: tempfile::TempDir,
}

/// Runs `binary` (a framelat build) with `target_args` for `frames`
/// frames, probed from its first frame with `agent_args` added.
fn probe_frames(binary: &str, target_args: &[&str], frames: &str, agent_args: &[&str]) -> FramesProbed {
    let dir = output_dir();
    let frames_file = dir.path().join("frames.txt");
    let mut cmd = Command::new(target_bin(binary));
    cmd.args(target_args).args([
        "--wait-start",
        "--frames",
        frames,
        "--out",
        frames_file.to_str().unwrap(),
    ]);
    let target = TestProcess::spawn_ready(cmd);
    let pid = target.pid().to_string();
    let mut args = vec![
        "latency",
        "--pid",
        &pid,
        "--function",
        "tick",
        "--budget",
        "16.7ms",
    ];
    args.extend(["--duration", "60s", "--output", dir.path().to_str().unwrap()]);
    args.extend(agent_args);
    let mut agent = Agent::start(&args);
    agent.wait_probing();
    target.signal(libc::SIGUSR1);
    let stderr = agent.stderr.clone();
    let (status, stdout) = agent.finish(Duration::from_secs(60));
    assert!(status.success(), "{}", stderr.lock().unwrap());
    let own = std::fs::read_to_string(&frames_file)
        .expect("the target wrote its frame times")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    FramesProbed {
        stdout,
        own,
        _dir: dir,
    }
}

/// The `q` quantile of sorted values, by the rank the agent uses.
fn quantile(sorted: &[u64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
    sorted[rank - 1] as f64
}

fn within(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want
}

/// Test that a 60 Hz loop whose every 10th tick takes 30 ms instead of 2 ms
/// is measured as the loop measures itself (count within 3 %, p50 and p99
/// within 5 %, over-budget share within 1 point), and that the slow-call
/// flamegraph gives the slow system at least 80 % of its samples.
#[test]
fn frame_latency_matches_own_measurement() {
    if !privileged("frame_latency_matches_own_measurement") {
        return;
    }
    let _turn = cpu_bound_turn();
    let FramesProbed {
        stdout,
        mut own,
        _dir,
    } = probe_frames("framelat-fp", &[], "600", &[]);
    own.sort_unstable();
    let own_over = 100.0 * own.iter().filter(|&&t| t > 16_700_000).count() as f64 / own.len() as f64;

    let json = printed_files(stdout.as_bytes(), "json");
    let lat = json
        .iter()
        .find(|p| p.to_str().unwrap().ends_with(".latency.json"))
        .expect(&stdout);
    let r = read_json(lat);
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert!(
        within(f("count"), own.len() as f64, 0.03),
        "count {} vs {}",
        f("count"),
        own.len()
    );
    assert!(
        within(f("p50_ns"), quantile(&own, 0.5), 0.05),
        "p50 {} vs {}",
        f("p50_ns"),
        quantile(&own, 0.5)
    );
    assert!(
        within(f("p99_ns"), quantile(&own, 0.99), 0.05),
        "p99 {} vs {}",
        f("p99_ns"),
        quantile(&own, 0.99)
    );
    assert!(
        (f("over_budget_pct") - own_over).abs() <= 1.0,
        "over {} vs {own_over}",
        f("over_budget_pct")
    );
    for k in ["mean_ns", "p90_ns", "p999_ns", "max_ns", "over_budget"] {
        assert!(f(k) > 0.0, "{k}: {r}");
    }
    assert!(!r["buckets"].as_array().unwrap().is_empty());
    assert!(
        stdout.contains("p99") && stdout.contains("distribution"),
        "{stdout}"
    );

    // The slow-call profile: what late frames were doing.
    let slow_json = json
        .iter()
        .find(|p| p.to_str().unwrap().ends_with(".slow.json"))
        .expect(&stdout);
    assert_eq!(read_json(slow_json)["session"]["kind"], "slow");
    let folded = printed_files(stdout.as_bytes(), "folded");
    assert!(folded[0].to_str().unwrap().ends_with(".slow.folded"));
    assert!(printed_files(stdout.as_bytes(), "svg")[0]
        .to_str()
        .unwrap()
        .ends_with(".slow.svg"));
    // A wall profile (µs): the late frames' CPU samples and, were they to
    // block, their blocked time.
    let stacks = read_folded(&folded[0]);
    let total: u64 = stacks.iter().map(|(_, n)| n).sum();
    let slow: u64 = stacks
        .iter()
        .filter(|(s, _)| s.iter().any(|f| f.starts_with("physics_step")))
        .map(|(_, n)| n)
        .sum();
    let samples = r["slow_profile"]["samples"].as_u64().unwrap_or(0);
    eprintln!("slow-call profile: {samples} CPU samples, physics_step {slow} of {total} µs");
    // Under emulation (the kernel matrix's guests without KVM) fewer CPU
    // samples land in late frames (9 seen on 6.1); and a late frame also
    // waits in emulated page faults and clock reads outside the step.
    let emulated = std::env::var_os("FLAMEWATCH_TEST_SLOW").is_some();
    let floor = if emulated { 5 } else { 10 };
    assert!(
        samples >= floor,
        "slow-call samples: {samples} (want {floor}): {r}"
    );
    let want = if emulated { 0.6 } else { 0.8 };
    assert!(
        slow as f64 >= want * total as f64,
        "physics_step {slow} of {total} (want {want}): {stacks:?}"
    );
}

/// Test that frames late on a lock show the lock: the slow-call profile
/// holds the late part of their blocked time (within 10 % of what the
/// loop measured itself past the budget), at least 80 % of it through
/// `wait_for_assets` and blocked in the mutex, marked `[off-cpu]`.
#[test]
fn slow_frames_late_on_a_lock_show_the_lock() {
    if !privileged("slow_frames_late_on_a_lock_show_the_lock") {
        return;
    }
    let _turn = cpu_bound_turn();
    // Every block recorded (a budget this low samples 1 switch-out in N of
    // a target that mostly sleeps): the sum is then exact.
    let FramesProbed { stdout, own, _dir } =
        probe_frames("framelat", &["--lock"], "300", &["--max-overhead", "25"]);
    let late_s: f64 = own
        .iter()
        .map(|&t| t.saturating_sub(16_700_000) as f64 / 1e9)
        .sum();
    assert!(late_s > 0.2, "the fixture's frames were late by {late_s} s only");

    let json = printed_files(stdout.as_bytes(), "json");
    let lat = json
        .iter()
        .find(|p| p.to_str().unwrap().ends_with(".latency.json"))
        .expect(&stdout);
    let r = read_json(lat);
    let off_s = r["slow_profile"]["off_cpu_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("{r}"));
    assert!(
        within(off_s, late_s, 0.10),
        "blocked past the budget: agent {off_s} s, the loop's own {late_s} s"
    );
    let folded = printed_files(stdout.as_bytes(), "folded");
    let stacks = read_folded(&folded[0]);
    let total: u64 = stacks.iter().map(|(_, n)| n).sum();
    let through = |want: &dyn Fn(&Vec<String>) -> bool| -> u64 {
        stacks.iter().filter(|(s, _)| want(s)).map(|(_, n)| n).sum()
    };
    let waiting = through(&|s| {
        s.iter().any(|f| f.starts_with("wait_for_assets"))
            && s.iter()
                .any(|f| f.contains("mutex_lock") || f.contains("lll_lock"))
            && s.last().is_some_and(|f| f == "[off-cpu]")
    });
    eprintln!(
        "blocked past the budget: agent {off_s} s, own {late_s} s; in the mutex {waiting} of {total} µs"
    );
    assert!(
        waiting as f64 >= 0.8 * total as f64,
        "wait_for_assets blocked in the mutex: {waiting} of {total} µs: {stacks:?}"
    );
}

/// Test that an unknown function, or a library the target does not map, is
/// bad input: exit status 2 and one line naming it (and the binary).
#[test]
fn unknown_function_is_bad_input() {
    if !privileged("unknown_function_is_bad_input") {
        return;
    }
    let mut cmd = Command::new(target_bin("framelat-fp"));
    cmd.args(["--wait-start"]);
    let target = TestProcess::spawn_ready(cmd);
    let pid = target.pid().to_string();
    for (function, named) in [
        ("no_such_function", "framelat-fp"),
        ("libc:no_such_function", "libc"),
        ("libnothere:malloc", "libnothere"),
    ] {
        let out = flamewatch(&["latency", "--pid", &pid, "--function", function]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{function}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("flamewatch:")).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        let symbol = function.rsplit(':').next().unwrap();
        assert!(
            lines[0].contains(named) && (lines[0].contains(symbol) || named == "libnothere"),
            "{stderr}"
        );
    }
}

/// The address of `symbol` of `lib` in `pid`'s memory (load bias + vaddr).
fn symbol_address(pid: u32, lib: &str, symbol: &str) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let (base, path) = maps
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = *f.get(5)?;
            let name = Path::new(path).file_name()?.to_str()?;
            (name.starts_with(lib) && u64::from_str_radix(f[2], 16).ok()? == 0).then(|| {
                let start = u64::from_str_radix(f[0].split('-').next().unwrap(), 16).unwrap();
                (start, path.to_owned())
            })
        })
        .expect("library mapped");
    let nm = Command::new("nm")
        .args(["-D", "--defined-only", &path])
        .output()
        .expect("nm");
    let vaddr = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[2].split('@').next() == Some(symbol))
                .then(|| u64::from_str_radix(f[0], 16).unwrap())
        })
        .expect("symbol in the library");
    base + vaddr
}

/// The first byte of code at `addr` of `pid`.
fn code_byte(pid: u32, addr: u64) -> u8 {
    use std::os::unix::fs::FileExt as _;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut b = [0u8];
    mem.read_exact_at(&mut b, addr).unwrap();
    b[0]
}

/// Test that probing a shared-library function of one process leaves every
/// other process running that library untouched: the breakpoint (int3) is
/// in the target's copy of the function only, and only its calls count.
#[test]
fn other_processes_untouched() {
    if !privileged("other_processes_untouched") {
        return;
    }
    let spawn = || {
        let mut cmd = Command::new(target_bin("callrate"));
        cmd.args(["--libc", "--rate", "1000", "--seconds", "30"]);
        TestProcess::spawn_ready(cmd)
    };
    let (target, other) = (spawn(), spawn());
    let (t, o) = (target.pid(), other.pid());
    let (ta, oa) = (
        symbol_address(t, "libc", "rand_r"),
        symbol_address(o, "libc", "rand_r"),
    );
    assert_ne!(code_byte(t, ta), 0xcc, "not probed yet");
    let dir = output_dir();
    let pid = t.to_string();
    let mut agent = Agent::start(&[
        "latency",
        "--pid",
        &pid,
        "--function",
        "libc:rand_r",
        "--max-overhead",
        "50",
        "--duration",
        "4s",
        "--output",
        dir.path().to_str().unwrap(),
    ]);
    agent.wait_probing();
    assert_eq!(code_byte(t, ta), 0xcc, "the target's rand_r has the breakpoint");
    assert_ne!(code_byte(o, oa), 0xcc, "the other process's rand_r has none");
    let stderr = agent.stderr.clone();
    let (status, stdout) = agent.finish(Duration::from_secs(60));
    assert!(status.success(), "{}", stderr.lock().unwrap());
    assert_ne!(code_byte(t, ta), 0xcc, "detached");
    let lat = printed_files(stdout.as_bytes(), "json");
    let r = read_json(&lat[0]);
    let rate = r["calls_per_s"].as_f64().unwrap();
    // One process's calls (~1000/s, give or take the machine), not two.
    assert!(rate > 400.0 && rate < 1800.0, "calls/s {rate}: {r}");
}

/// Test that a function called 100 000 times a second is timed from the
/// first attachment on, in three attachments in a row: no call is left
/// without its return (`too_deep` 0), and every attachment counts calls.
/// The entry probe used to be attached before the return probe: the ~10
/// calls entered between the two filled the thread's 8-deep call stack and
/// no later call was timed (zero calls in 2 runs of 4).
#[test]
fn fast_calls_timed_from_the_first_attachment() {
    if !privileged("fast_calls_timed_from_the_first_attachment") {
        return;
    }
    let _turn = cpu_bound_turn();
    let mut cmd = Command::new(target_bin("callrate"));
    cmd.args(["--rate", "100000", "--seconds", "60"]);
    let target = TestProcess::spawn_ready(cmd);
    let pid = target.pid().to_string();
    for round in 0..3 {
        let dir = output_dir();
        let mut agent = Agent::start(&[
            "latency",
            "--pid",
            &pid,
            "--function",
            "probed_call",
            "--max-overhead",
            "100",
            "--duration",
            "2s",
            "--output",
            dir.path().to_str().unwrap(),
        ]);
        agent.wait_probing();
        let stderr = agent.stderr.clone();
        let (status, stdout) = agent.finish(Duration::from_secs(60));
        assert!(status.success(), "{}", stderr.lock().unwrap());
        let r = read_json(&printed_files(stdout.as_bytes(), "json")[0]);
        let (count, deep) = (
            r["count"].as_u64().unwrap(),
            r["probe"]["too_deep"].as_u64().unwrap(),
        );
        eprintln!(
            "round {round}: {count} calls timed, {deep} too deep, {} unmatched",
            r["probe"]["unmatched_returns"]
        );
        assert_eq!(deep, 0, "calls left without their return: {r}");
        // Probed, the loop makes 15 000-50 000 calls a second here.
        assert!(count >= 10_000, "round {round}: {count} calls timed in 2 s: {r}");
    }
}

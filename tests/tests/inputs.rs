//! The bad-input table of the README ("Bad input"), walked against the
//! real binary: every flag, config value, control request and target state
//! in it is answered with exit status 2 (or an error reply) and one line
//! naming the value; none panics.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use flamewatch_e2e::{flamewatch, output_dir, privileged, wait_until, TestProcess};

/// Bad flags: (arguments, text the error must contain).
const FLAGS: &[(&[&str], &str)] = &[
    (&["record"], "--pid"),
    (&["record", "--pid", "1", "--process", "x"], "cannot be used with"),
    (&["record", "--pid", "abc"], "abc"),
    (&["record", "--pid", "0"], "'0'"),
    (&["record", "--pid", "1", "--freq", "0"], "'0'"),
    (&["record", "--pid", "1", "--freq", "200000"], "200000"),
    (&["record", "--pid", "1", "--duration", "soon"], "soon"),
    (&["record", "--pid", "1", "--duration", "1e20"], "1e20"),
    (&["record", "--pid", "1", "--duration", "-3"], "-3"),
    (&["record", "--pid", "1", "--label", "../etc"], "../etc"),
    (
        &["record", "--pid", "1", "--max-overhead", "0"],
        "max-overhead = 0",
    ),
    (
        &["record", "--pid", "1", "--max-overhead", "150"],
        "max-overhead = 150",
    ),
    (&["record", "--pid", "1", "--format", "svg,png"], "png"),
    (&["record", "--pid", "1", "--stack-window", "100"], "100"),
    (&["record", "--pid", "1", "--min-block", "1000000y"], "min-block"),
    (&["trigger", "--pid", "1", "--since", "2d"], "2d"),
    (
        &["watch", "--pid", "1", "--metrics-addr", "localhost", "--check"],
        "localhost",
    ),
    (
        &["watch", "--pid", "1", "--webhook", "ftp://u:pw@h/", "--check"],
        "ftp://***@h/",
    ),
    (&["watch", "--check"], "nothing to watch"),
    (
        &["watch", "--config", "/nonexistent/fw.toml", "--check"],
        "/nonexistent/fw.toml",
    ),
];

const RULE: &str = "[[target]]\nprocess = \"x\"\n[[target.rule]]\nname = \"hot\"\nseverity = \"warning\"\n";

/// Bad config files: (text, text the error must contain: file:line: key).
fn configs() -> Vec<(String, &'static str)> {
    let rule = |body: &str| format!("{RULE}{body}\n");
    vec![
        ("intervl = \"5s\"\n".into(), "c.toml:1: unknown field `intervl`"),
        ("max_sessions = 0\n".into(), "c.toml:1: max_sessions = 0"),
        (
            "max_overhead_pct = -3\n".into(),
            "c.toml:1: max_overhead_pct = -3",
        ),
        (
            "max_overhead_pct = 500\n".into(),
            "c.toml:1: max_overhead_pct = 500",
        ),
        ("max_overhead_pct = \"five\"\n".into(), "c.toml:1: invalid type"),
        ("interval = \"0s\"\n".into(), "c.toml:1: interval = \"0s\""),
        (
            "\n[emergency]\nfreq_hz = 0\n".into(),
            "c.toml:3: emergency.freq_hz = 0",
        ),
        (
            "[retention]\nmax_sessions = 0\n".into(),
            "c.toml:2: retention.max_sessions = 0",
        ),
        ("[[[\n".into(), "c.toml:1:"),
        (
            rule("kind = \"threshold\"\nmetric = \"cpu_pct\"\nabove = 1\nfor_s = -4"),
            "c.toml:9: rule \"hot\" of x: for_s = -4",
        ),
        (
            rule("kind = \"threshold\"\nmetric = \"cpu_pct\"\nabove = 1\nsigma = 3"),
            "c.toml:9: unknown field `sigma`",
        ),
        (
            rule("kind = \"zscore\"\nmetric = \"fds\"\nwindow_s = 7200"),
            "c.toml:8: rule \"hot\" of x: window_s = 7200",
        ),
        (rule("kind = \"nope\""), "c.toml:"),
        (
            "[[target]]\nprocess = \"x\"\n[[target.schedule]]\ncron = \"often\"\n".into(),
            "often",
        ),
        (
            format!("{TARGET}{}", probe("function = \"a:\"")),
            "c.toml:4: target.probe.function = \"a:\"",
        ),
        (
            format!("{TARGET}{}", probe("function = \"f\"\nbudget = \"soon\"")),
            "c.toml:5: budget = \"soon\"",
        ),
        (
            format!(
                "{TARGET}{}",
                (0..9)
                    .map(|k| probe(&format!("function = \"f{k}\"")))
                    .collect::<String>()
            ),
            "c.toml:4: target.probe.function = 9 probes: must be at most 8",
        ),
        (
            format!("{TARGET}{}", probe("function = \"f\"").repeat(2)),
            "c.toml:4: target.probe.function = \"f\": probed twice",
        ),
        (
            format!(
                "{TARGET}[[target.rule]]\nname = \"late\"\nseverity = \"warning\"\nkind = \"threshold\"\n\
                 metric = \"latency_p99_ms\"\nabove = 5\n"
            ),
            "c.toml:7: rule \"late\" of x: metric = \"latency_p99_ms\"",
        ),
    ]
}

const TARGET: &str = "[[target]]\nprocess = \"x\"\n";

fn probe(body: &str) -> String {
    format!("[[target.probe]]\n{body}\n")
}

/// Bad control requests: (line, text the error reply must contain).
const REQUESTS: &[(&str, &str)] = &[
    (r#"{"pid":1,"duration_s":5,"sped":1}"#, "unknown field `sped`"),
    (r#"{"pid":1,"duration_s":-5}"#, "duration_s = -5"),
    (r#"{"pid":1,"duration_s":1e300}"#, "duration_s = 1e300"),
    (r#"{"pid":1,"duration_s":5,"freq_hz":0}"#, "freq_hz = 0"),
    (r#"{"pid":1,"duration_s":5,"wait_s":1000}"#, "wait_s = 1000"),
    ("hello", "bad request"),
];

/// Runs the agent with `args`, checking exit status 2 and one stderr line
/// that contains `want` (and no panic).
fn refused(args: &[&str], want: &str) {
    let out = flamewatch(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.contains(want), "{args:?}: {stderr:?} lacks {want:?}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
}

/// Test that every bad flag of the table exits 2 with one line naming it.
#[test]
fn bad_flags() {
    for (args, want) in FLAGS {
        refused(args, want);
    }
}

/// Test that every bad config of the table exits 2 with one line naming
/// the file, the line and the key, under `watch --check` and plain `watch`.
#[test]
fn bad_configs() {
    let dir = output_dir();
    let path = dir.path().join("c.toml");
    let path = path.to_str().unwrap();
    for (text, want) in configs() {
        std::fs::write(path, &text).unwrap();
        refused(&["watch", "--pid", "1", "--config", path, "--check"], want);
        refused(&["watch", "--pid", "1", "--config", path], want);
    }
}

/// Test that `watch --check` prints the effective config (the preset's
/// rules merged) as TOML and exits 0 without starting anything.
#[test]
fn check_prints_effective_config() {
    let dir = output_dir();
    let socket = dir.path().join("never.sock");
    let out = flamewatch(&[
        "watch",
        "--process",
        "logcaster",
        "--control-socket",
        socket.to_str().unwrap(),
        "--check",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("[[target.rule]]") && stdout.contains("process = \"logcaster\""),
        "{stdout}"
    );
    assert!(!socket.exists(), "--check started the daemon");
}

/// A child that has exited and is not reaped: a zombie, reaped on drop.
struct Zombie(std::process::Child);

impl Zombie {
    fn new() -> Self {
        let child = Command::new("true").spawn().unwrap();
        let stat = format!("/proc/{}/stat", child.id());
        let zombie = wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&stat)
                .is_ok_and(|s| s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        });
        assert!(zombie, "no zombie");
        Self(child)
    }
}

impl Drop for Zombie {
    fn drop(&mut self) {
        let _ = self.0.wait();
    }
}

/// Test that targets that cannot be profiled are refused by their state,
/// exit 2, one line: gone, a zombie, a kernel thread, a thread id, an
/// unknown name.
#[test]
fn bad_target_states() {
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id().to_string();
    gone.wait().unwrap();
    refused(
        &["record", "--pid", &gone_pid, "--duration", "1s"],
        "no process with pid",
    );
    let zombie = Zombie::new();
    let zpid = zombie.0.id().to_string();
    refused(&["record", "--pid", &zpid, "--duration", "1s"], "zombie");
    refused(&["tcp", "--pid", &zpid, "--duration", "1s"], "zombie");
    refused(&["record", "--pid", "2", "--duration", "1s"], "kernel thread");
    // A thread of this test process: its id is in /proc, but not a process.
    let (tx, rx) = std::sync::mpsc::channel();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() }).unwrap();
        let _ = wait.recv();
    });
    let tid = rx.recv().unwrap().to_string();
    refused(
        &["record", "--pid", &tid, "--duration", "1s"],
        "is a thread of process",
    );
    done.send(()).unwrap();
    thread.join().unwrap();
    refused(
        &["record", "--process", "no-such-proc-fw", "--duration", "1s"],
        "no-such-proc-fw",
    );
}

/// Sends one raw line to the control socket; the reply line.
fn ask(socket: &Path, line: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{line}: reply {reply:?}: {e}"))
}

/// Test that every bad control request of the table gets an error reply
/// naming the field and value, and the daemon keeps running.
#[test]
fn bad_control_requests() {
    if !privileged("bad_control_requests") {
        return;
    }
    let dir = output_dir();
    let socket = dir.path().join("control.sock");
    let mut sleeper = Command::new("sleep");
    sleeper.arg("600");
    let target = TestProcess::spawn(sleeper);
    let mut cmd = Command::new(flamewatch_e2e::flamewatch_bin());
    cmd.args([
        "watch",
        "--pid",
        &target.pid().to_string(),
        "--metrics-addr",
        "off",
        "--output",
    ])
    .arg(dir.path())
    .arg("--control-socket")
    .arg(&socket)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut daemon = TestProcess::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(20), || socket.exists()),
        "control socket"
    );
    for (line, want) in REQUESTS {
        let reply = ask(&socket, line);
        assert_eq!(reply["ok"], false, "{line}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(want) && !error.contains('\n'),
            "{line}: {error:?} lacks {want:?}"
        );
    }
    let long = format!(r#"{{"process":"{}","duration_s":5}}"#, "a".repeat(100_000));
    let reply = ask(&socket, &long);
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("longer than"),
        "{reply}"
    );
    assert!(
        daemon.child_mut().try_wait().unwrap().is_none(),
        "the daemon died"
    );
}

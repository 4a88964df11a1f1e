//! Helpers for flamewatch's privileged end-to-end tests: the target programs,
//! processes that are killed when a test ends, running the agent, reading
//! its reports, and the kernel's list of loaded BPF programs.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// Path of a target program built by build.rs (e.g. `hotpaths-fp`).
pub fn target_bin(name: &str) -> PathBuf {
    let path = Path::new(env!("FLAMEWATCH_TARGETS_DIR")).join(name);
    assert!(path.exists(), "target program {} was not built", path.display());
    path
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The agent binary: `FLAMEWATCH_BIN`, else target/release/flamewatch
/// (`cargo xtask test` builds it first).
pub fn flamewatch_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("FLAMEWATCH_BIN") {
        return bin.into();
    }
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from);
    let bin = target_dir.join("release/flamewatch");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo xtask test` (it builds the agent), or set FLAMEWATCH_BIN",
        bin.display()
    );
    bin
}

/// Whether privileged (real BPF) tests can run. As root: yes. Not root and
/// `CI` unset: prints why and returns false so the test is skipped. Not root
/// in CI: fails, because CI must run them for real.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: privileged tests must run as root in CI"
    );
    eprintln!("SKIPPED {test}: needs root to load eBPF programs (run `sudo cargo xtask test`)");
    false
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct TestProcess {
    child: Child,
    /// First line it printed, when [`TestProcess::spawn_ready`] waited for it.
    pub banner: String,
}

impl TestProcess {
    /// Starts `cmd` with stdout piped, and waits for its first line of output
    /// (targets print one when they are ready).
    pub fn spawn_ready(mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped");
        let mut reader = BufReader::new(stdout);
        let mut banner = String::new();
        reader.read_line(&mut banner).expect("target prints a banner");
        // Keep draining so the target never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                line.clear();
            }
        });
        Self { child, banner }
    }

    /// Starts `cmd` without waiting for anything.
    pub fn spawn(mut cmd: Command) -> Self {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Self {
            child,
            banner: String::new(),
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for it to exit, with a timeout; returns its output if it had
    /// piped stdout/stderr.
    pub fn wait_with_timeout(mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The underlying child.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for TestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the agent with `args` to completion.
pub fn flamewatch(args: &[&str]) -> Output {
    Command::new(flamewatch_bin())
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .output()
        .expect("running flamewatch")
}

/// Starts the agent with `args` in the background (stdout/stderr piped).
pub fn flamewatch_spawn(args: &[&str]) -> TestProcess {
    let mut cmd = Command::new(flamewatch_bin());
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    TestProcess::spawn(cmd)
}

/// The paths flamewatch printed on stdout, by extension.
pub fn printed_files(stdout: &[u8], ext: &str) -> Vec<PathBuf> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| l.ends_with(&format!(".{ext}")))
        .map(PathBuf::from)
        .collect()
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `self_pct` of `name` in a summary's `top_functions` (0 when absent).
pub fn self_pct(summary: &Value, name: &str) -> f64 {
    function_field(summary, name, "self_pct")
}

/// `total_pct` of `name` in a summary's `top_functions` (0 when absent).
pub fn total_pct(summary: &Value, name: &str) -> f64 {
    function_field(summary, name, "total_pct")
}

fn function_field(summary: &Value, name: &str, field: &str) -> f64 {
    summary["top_functions"]
        .as_array()
        .expect("top_functions")
        .iter()
        .find(|f| f["name"] == name)
        .and_then(|f| f[field].as_f64())
        .unwrap_or(0.0)
}

/// Folded stacks as (frames, count).
pub fn read_folded(path: &Path) -> Vec<(Vec<String>, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|line| {
            let (stack, count) = line.rsplit_once(' ')?;
            Some((stack.split(';').map(str::to_owned).collect(), count.parse().ok()?))
        })
        .collect()
}

/// Ids of BPF programs loaded in the kernel whose name starts with
/// `flamewatch` (the kernel keeps 15 characters of a name).
pub fn loaded_flamewatch_programs() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("flamewatch")))
        .map(|p| p.id())
        .collect()
}

/// Waits until `cond` holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh output folder for one test.
pub fn output_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("flamewatch-test-")
        .tempdir()
        .expect("temp dir")
}

/// Ids of the BPF programs a process holds open (from /proc/PID/fdinfo):
/// exactly the programs that must disappear when it exits.
pub fn bpf_programs_held_by(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut ids: Vec<u32> = dir
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Ids of every BPF program loaded in the kernel.
pub fn loaded_program_ids() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect()
}

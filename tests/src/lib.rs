//! Helpers for flamewatch's privileged end-to-end tests: the target programs,
//! processes that are killed when a test ends, running the agent, reading
//! its reports, and the kernel's list of loaded BPF programs.

pub mod browser;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

/// Held by the tests that keep a core busy or whose assertions need their
/// target to get a whole core on time (an alert 10 s into a busy loop).
/// This VM has two cores and libtest runs two tests at once: two CPU-bound
/// tests together starve each other's targets and shift the timings they
/// check, so they take turns. Other tests run beside them as usual.
pub fn cpu_bound_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    // A test that failed while holding it poisons it; the next one may go.
    TURN.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

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
    // Straight to stderr, past libtest's capture: `cargo xtask test` counts
    // these lines.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr().lock(),
        format!("SKIPPED {test}: needs root to load eBPF programs (run `sudo cargo xtask test`)\n")
            .as_bytes(),
    );
    false
}

/// Spawns `cmd`. A program the test has just copied (to give it a unique
/// name) can fail with ETXTBSY: another test thread that forks in the
/// moment between the copy's open and close holds its write descriptor
/// until it execs (rust-lang/rust#114554). That window is microseconds,
/// so spawning again shortly after succeeds.
fn spawn_retrying(cmd: &mut Command) -> Child {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("spawning {cmd:?}: {e}"),
        }
    }
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
        let mut child = spawn_retrying(&mut cmd);
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
        let child = spawn_retrying(&mut cmd);
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

/// What one `flamewatch record` run left: its summary, folded stacks,
/// every path it printed, and the folder (deleted when dropped).
pub struct Recorded {
    /// The JSON summary.
    pub summary: Value,
    /// The folded stacks (empty when `folded` was not among the formats).
    pub stacks: Vec<(Vec<String>, u64)>,
    /// Every path printed on stdout.
    pub printed: Vec<PathBuf>,
    /// The output folder.
    pub dir: tempfile::TempDir,
}

/// Runs `flamewatch record --pid PID --output <temp dir> ARGS`, which must
/// succeed, and reads what it wrote.
pub fn record(pid: u32, args: &[&str]) -> Recorded {
    let dir = output_dir();
    let pid = pid.to_string();
    let mut all = vec!["record", "--pid", &pid, "--output", dir.path().to_str().unwrap()];
    all.extend_from_slice(args);
    let out = flamewatch(&all);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    let stacks = printed_files(&out.stdout, "folded")
        .first()
        .map(|f| read_folded(f))
        .unwrap_or_default();
    Recorded {
        summary: read_json(&printed_files(&out.stdout, "json")[0]),
        stacks,
        printed,
        dir,
    }
}

/// A minimal HTTP server on loopback recording the JSON bodies POSTed to
/// it (a webhook, Alertmanager's receiver); returns its URL (`path` on it).
pub fn http_receiver(path: &str) -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}{path}", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok() {
                if let Ok(v) = serde_json::from_slice(&body) {
                    seen.lock().unwrap().push(v);
                }
            }
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (url, bodies)
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

/// Percent of the samples of folded `stacks` with a frame named `function`
/// (its total share, whether or not `top_functions` lists it).
pub fn share_through(stacks: &[(Vec<String>, u64)], function: &str) -> f64 {
    let total: u64 = stacks.iter().map(|(_, n)| n).sum();
    let with: u64 = stacks
        .iter()
        .filter(|(s, _)| s.iter().any(|f| f == function))
        .map(|(_, n)| n)
        .sum();
    100.0 * with as f64 / total.max(1) as f64
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

// ---- Helpers for the target stand-ins (logcaster, game-server): free
// ports, /proc readings, TIME_WAIT counts, captured output. ----

/// A TCP port nobody listens on, for a target to listen on. It is picked
/// below the ephemeral range when there is room, so that client sockets of
/// tests running meanwhile cannot take it before the target binds it.
pub fn free_tcp_port() -> u16 {
    free_port(|port| std::net::TcpListener::bind(("0.0.0.0", port)).is_ok())
}

/// A UDP port nobody is bound to (see [`free_tcp_port`]).
pub fn free_udp_port() -> u16 {
    free_port(|port| std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok())
}

fn free_port(available: impl Fn(u16) -> bool) -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    if ephemeral_low >= 12000 {
        // A cheap pseudo-random walk, different per process and per call.
        let mut x = u64::from(std::process::id()) << 32
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos().into())
            ^ CALLS
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let span = u64::from(ephemeral_low - 10000);
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = 10000 + (x % span) as u16;
            if available(port) {
                return port;
            }
        }
    }
    // No room below the ephemeral range: let the kernel pick one.
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port();
    assert!(available(port), "port {port} is free");
    port
}

/// A process's resident set size in KiB (VmRSS); None once it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The fields of a /proc `stat` file after the command name (which may hold
/// spaces): `[0]` is the state, `[11]` utime, `[12]` stime.
fn stat_fields(path: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

fn stat_cpu_seconds(path: &str) -> Option<f64> {
    let f = stat_fields(path)?;
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks_per_second())
}

/// CPU time (user + system) a process has used, in seconds, from
/// /proc/PID/stat; None once it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// Cores a process keeps busy over `interval` (1.0: one core all the time),
/// from its CPU time before and after.
pub fn cpu_cores_over(pid: u32, interval: Duration) -> f64 {
    let start = Instant::now();
    let before = cpu_seconds(pid).expect("process is alive");
    std::thread::sleep(interval);
    let after = cpu_seconds(pid).expect("process is alive");
    (after - before) / start.elapsed().as_secs_f64()
}

/// One thread of a process, as /proc/PID/task/TID shows it.
#[derive(Clone, Debug)]
pub struct ThreadInfo {
    /// Thread id.
    pub tid: u32,
    /// Its name (`comm`).
    pub name: String,
    /// Scheduler state: R, S, D, ...
    pub state: char,
    /// Kernel function it sleeps in ("0" when running or unreadable).
    pub wchan: String,
    /// Number of the system call it is blocked in, when readable.
    pub syscall: Option<i64>,
    /// CPU time it has used, in seconds.
    pub cpu_seconds: f64,
}

impl ThreadInfo {
    /// Whether it sleeps in a futex wait (as a thread parked in
    /// pthread_mutex_lock does).
    pub fn in_futex_wait(&self) -> bool {
        // futex(2) is system call 202 on x86_64 and 98 on aarch64.
        let futex_nr = if cfg!(target_arch = "aarch64") { 98 } else { 202 };
        self.state == 'S' && (self.wchan.contains("futex") || self.syscall == Some(futex_nr))
    }
}

/// The threads of a process (empty once it is gone).
pub fn threads(pid: u32) -> Vec<ThreadInfo> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut threads: Vec<ThreadInfo> = dir
        .filter_map(|e| {
            let tid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let base = format!("/proc/{pid}/task/{tid}");
            let fields = stat_fields(&format!("{base}/stat"))?;
            Some(ThreadInfo {
                tid,
                name: std::fs::read_to_string(format!("{base}/comm"))
                    .ok()?
                    .trim()
                    .to_owned(),
                state: fields.first()?.chars().next()?,
                wchan: std::fs::read_to_string(format!("{base}/wchan")).unwrap_or_default(),
                syscall: std::fs::read_to_string(format!("{base}/syscall"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse().ok()),
                cpu_seconds: stat_cpu_seconds(&format!("{base}/stat"))?,
            })
        })
        .collect();
    threads.sort_by_key(|t| t.tid);
    threads
}

/// TCP sockets in TIME_WAIT, counted by `ss -Htan state time-wait FILTER`
/// (e.g. `( sport = :9999 )`).
pub fn time_wait_count(filter: &str) -> usize {
    let out = Command::new("ss")
        .args(["-Htan", "state", "time-wait", filter])
        .output()
        .expect("running ss (iproute2)");
    assert!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// TIME_WAIT sockets whose local port is `port`: those of the side that
/// closed first, when a server listening on `port` did.
pub fn time_wait_on_local_port(port: u16) -> usize {
    time_wait_count(&format!("( sport = :{port} )"))
}

/// TIME_WAIT sockets whose remote port is `port`: those of clients of a
/// server on `port` that closed first.
pub fn time_wait_on_remote_port(port: u16) -> usize {
    time_wait_count(&format!("( dport = :{port} )"))
}

/// Everything a process printed after its banner, collected in the
/// background by [`TestProcess::spawn_ready_captured`].
#[derive(Clone, Default)]
pub struct Captured {
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Captured {
    /// Stdout so far (after the banner).
    pub fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn collect_into(stream: impl std::io::Read + Send + 'static, into: std::sync::Arc<std::sync::Mutex<String>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            into.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push_str(&line);
            line.clear();
        }
    });
}

impl TestProcess {
    /// Like [`TestProcess::spawn_ready`] (waits for the banner line), but
    /// keeps everything it prints afterwards on stdout and stderr.
    pub fn spawn_ready_captured(mut cmd: Command) -> (Self, Captured) {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let captured = Captured::default();
        collect_into(child.stderr.take().expect("piped"), captured.stderr.clone());
        let mut reader = BufReader::new(child.stdout.take().expect("piped"));
        let mut banner = String::new();
        reader.read_line(&mut banner).expect("target prints a banner");
        collect_into(reader, captured.stdout.clone());
        (Self { child, banner }, captured)
    }
}

/// Least-squares slope of `(x, y)` points (0 with fewer than two).
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x / n, sy + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// The `key=value` pairs of a line (such as the targets' report lines),
/// values that parse as numbers only.
pub fn numeric_fields(line: &str) -> std::collections::HashMap<String, f64> {
    line.split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Seconds a thread has spent running on a CPU and waiting on a run queue
/// for one, from /proc/PID/task/TID/schedstat (None when the kernel does not
/// keep them). Together they tell a thread that never sleeps (busy) from one
/// that sleeps, whatever the machine's load.
pub fn thread_sched_seconds(pid: u32, tid: u32) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    let (run, wait) = (fields.next()??, fields.next()??);
    Some((run as f64 / 1e9, wait as f64 / 1e9))
}

/// Over `interval`, the share of wall time a thread spent on a CPU, and the
/// share it spent runnable (on a CPU or waiting for one): ~1 for a thread
/// that never sleeps, even when a loaded machine gives it less CPU.
pub fn thread_busy_over(pid: u32, tid: u32, interval: Duration) -> (f64, f64) {
    let start = Instant::now();
    let (run0, wait0) = thread_sched_seconds(pid, tid).expect("schedstat of a live thread");
    std::thread::sleep(interval);
    let (run1, wait1) = thread_sched_seconds(pid, tid).expect("schedstat of a live thread");
    let wall = start.elapsed().as_secs_f64();
    ((run1 - run0) / wall, (run1 - run0 + wait1 - wait0) / wall)
}

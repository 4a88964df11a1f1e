//! `cargo xtask matrix`: the end-to-end smoke on each kernel our users run.
//! Debian 12's 6.1 and 6.12 boot under qemu through virtme-ng (TCG: nested
//! KVM is not available, `--disable-kvm`); the guest sees the host's files,
//! so it runs the host-built agent and end-to-end test binaries. The host
//! kernel runs the same tests directly.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{build_agent, build_target_programs, cargo, root, target_dir};

/// Debian kernels of the matrix (`linux-image-<release>` packages); the host
/// kernel is the third member.
pub const KERNELS: &[&str] = &["6.1.0-57-amd64", "6.12.107+deb12-amd64"];

/// The smoke: (test binary, test name). Frame-pointer and DWARF record
/// splits, TIME_WAIT attribution against `ss`, a thread blocked in a mutex
/// found off CPU, a busy-loop alert with its emergency profile, memory
/// growth and heap profiles, and a latency probe against the fixture's own
/// frame times.
const SMOKE: &[(&str, &str)] = &[
    ("kernels", "doctor_on_this_kernel"),
    ("kernels", "two_to_one_frame_pointers"),
    ("kernels", "two_to_one_dwarf"),
    ("tcp", "tcp_counts_200_server_closes"),
    ("offcpu", "mutex_blocked_thread_found"),
    ("watch", "busy_loop_alert_and_emergency_profile"),
    ("memory", "memory_mode_names_the_keeper"),
    ("memory", "heap_mode_inuse_names_the_keeper"),
    ("latency", "frame_latency_matches_own_measurement"),
];

/// Runs the smoke on every kernel of the matrix; fails if any test fails
/// on any kernel. Prints the time per kernel.
pub fn matrix() -> Result<()> {
    let agent = build_agent()?;
    build_target_programs()?;
    let bins = test_binaries()?;
    let mut failures = Vec::new();
    let mut times = Vec::new();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    for kernel in std::iter::once(None).chain(KERNELS.iter().map(Some)) {
        let name = kernel.map_or(format!("host {host}"), |k| k.to_string());
        let started = Instant::now();
        // The guest's console drops lines under load: the script writes
        // its output to a file of the shared read-write folder instead.
        let log = target_dir()
            .join("tmp")
            .join(format!("matrix-{}.log", kernel.map_or("host", |k| k)));
        std::fs::create_dir_all(log.parent().expect("in target/tmp"))?;
        let _ = std::fs::remove_file(&log);
        // The script goes in a file: virtme-ng passes --exec on the kernel
        // command line, where a long one is cut off and the guest hangs.
        let script = log.with_extension("sh");
        std::fs::write(&script, guest_script(&agent, &bins, &log, kernel.is_some())?)?;
        let run = format!("sh {}", script.display());
        match kernel {
            None => {
                Command::new("sh").args(["-c", &run]).status()?;
            }
            Some(release) => boot(release, &run)?,
        }
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        print!("{output}");
        // The script's last line is the verdict.
        let ok = output.lines().any(|l| l.trim() == "MATRIX_OK");
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "xtask matrix: {name}: {} in {secs:.0} s",
            if ok { "passed" } else { "FAILED" }
        );
        times.push((name.clone(), ok, secs));
        if !ok {
            failures.push(name);
        }
    }
    for (name, ok, secs) in &times {
        eprintln!(
            "xtask matrix: {name:28} {:6} {secs:6.0} s",
            if *ok { "ok" } else { "FAILED" }
        );
    }
    if !failures.is_empty() {
        bail!("the kernel matrix failed on {}", failures.join(", "));
    }
    Ok(())
}

/// The shell script the guest (or the host) runs: `flamewatch doctor`, then
/// each smoke test; `MATRIX_OK` last if all passed.
fn guest_script(agent: &Path, bins: &[(String, PathBuf)], log: &Path, guest: bool) -> Result<String> {
    let mut script = format!(
        "exec > {} 2>&1; cd {}; fail=0; uname -r; {} doctor",
        log.display(),
        root().display(),
        agent.display()
    );
    // A guest without KVM runs several times slower than the host: the
    // tests' time limits get that slack (FLAMEWATCH_TEST_SLOW).
    if guest {
        script.push_str("; export FLAMEWATCH_TEST_SLOW=1");
    }
    for (binary, test) in SMOKE {
        let path = bins
            .iter()
            .find(|(name, _)| name == binary)
            .map(|(_, p)| p)
            .with_context(|| format!("no test binary {binary}"))?;
        script.push_str(&format!(
            "; echo \"== {binary}::{test}\"; FLAMEWATCH_BIN={} {} {test} --exact --test-threads 1 --nocapture || fail=1",
            agent.display(),
            path.display()
        ));
    }
    script.push_str("; [ $fail = 0 ] && echo MATRIX_OK");
    Ok(script)
}

/// Boots `/boot/vmlinuz-<release>` under qemu and runs `script` (virtme-ng
/// does not pass the guest's exit status through every version: the
/// script's last line is the verdict).
fn boot(release: &str, script: &str) -> Result<()> {
    let kernel = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    if !kernel.exists() {
        bail!("{} missing: run `cargo xtask setup`", kernel.display());
    }
    // The console to a file, stdin closed: with a pipe for the console the
    // guest stalled (qemu idle for minutes); with a file it boots in seconds.
    let console = target_dir().join("tmp").join(format!("matrix-{release}.console"));
    // The TSC as clock source: qemu's emulated TSC follows the host's clock,
    // while the default it picks under TCG, the HPET, turns every
    // clock_gettime into a trapped MMIO read (the latency fixture's frames
    // then spent most of their time reading the clock).
    let status = Command::new("vng")
        .args(["--disable-kvm", "--cpus", "2", "--memory", "2G"])
        // Single-threaded TCG: under multi-threaded TCG a 6.12 guest
        // panicked now and then ("Oops: int3" in syscall_trace_enter while
        // a tracepoint was detached and the kernel patched its own text
        // under the other vCPU). One host thread for both vCPUs runs the
        // guest at about half speed: the busy-loop alert and the latency
        // slow profile do not yet meet their bounds there.
        .arg("--qemu-opts=-accel tcg,thread=single")
        .args(["--append", "clocksource=tsc tsc=reliable", "-r"])
        .arg(&kernel)
        .arg("--rwdir")
        .arg(target_dir().join("tmp"))
        .args(["--exec", script])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console)?)
        .stderr(std::fs::File::create(console.with_extension("console-stderr"))?)
        .status()
        .context("vng (virtme-ng): run `cargo xtask setup`")?;
    if !status.success() {
        eprintln!("xtask matrix: vng {status}; console in {}", console.display());
    }
    Ok(())
}

/// The end-to-end test binaries, built (release, like the agent) and
/// named by test target.
fn test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let out = cargo()
        .args([
            "test",
            "--release",
            "-p",
            "flamewatch-e2e",
            "--no-run",
            "--message-format=json",
        ])
        .output()?;
    if !out.status.success() {
        bail!("building the end-to-end tests failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str()) {
            bins.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    Ok(bins)
}

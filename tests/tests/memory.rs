//! Memory profiles end to end: resident-memory growth (`--mode memory`) and
//! live heap (`--mode heap`) of a target with two allocators at the same
//! byte rate, one keeping its memory and one freeing it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use flamewatch_e2e::*;
use serde_json::Value;

/// These tests measure shares of bytes: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The two-allocator fixture, each allocator at `rate` MB/s.
fn memleak(rate: &str) -> TestProcess {
    let mut cmd = Command::new(target_bin("memleak-fp"));
    cmd.args(["--rate", rate, "--seconds", "60"]);
    TestProcess::spawn_ready(cmd)
}

/// `go tool pprof ARGS -top -cum FILE`: cum% by function name.
fn pprof_cum(file: &Path, sample_index: &str) -> std::collections::HashMap<String, f64> {
    let out = Command::new("go")
        .args([
            "tool",
            "pprof",
            &format!("-sample_index={sample_index}"),
            "-top",
            "-cum",
        ])
        .arg(file)
        .output()
        .expect("running `go tool pprof` (Debian golang-go; `cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "go tool pprof: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let cum = cols.get(4)?.trim_end_matches('%').parse::<f64>().ok()?;
            Some((cols.get(5..)?.join(" "), cum))
        })
        .collect()
}

fn pprof_file(printed: &[PathBuf]) -> PathBuf {
    printed
        .iter()
        .find(|p| p.to_string_lossy().ends_with(".pb.gz"))
        .expect("a pprof file")
        .clone()
}

/// Test that memory mode gives the allocator that keeps its memory at least
/// 80 % of the growth bytes (flamegraph and summary), weighted by page size.
#[test]
fn memory_mode_names_the_keeper() {
    if !privileged("memory_mode_names_the_keeper") {
        return;
    }
    let _serial = serial();
    let target = memleak("4");
    std::thread::sleep(Duration::from_millis(500));
    let r = record(
        target.pid(),
        &[
            "--mode",
            "memory",
            "--duration",
            "6s",
            "--format",
            "folded,json,pprof",
        ],
    );
    let m: &Value = &r.summary["memory"];
    assert_eq!(r.summary["mode"], "memory", "{:#}", r.summary);
    assert_eq!(m["kind"], "growth");
    assert_eq!(m["page_size"], 4096);
    // 6 s at 4 MB/s kept: about 24 MiB of new pages.
    let bytes = m["bytes"].as_u64().unwrap();
    assert!((8 << 20..64 << 20).contains(&bytes), "{bytes} bytes: {m:#}");
    let keeper = share_through(&r.stacks, "keep_block");
    let churner = share_through(&r.stacks, "churn_block");
    assert!(
        keeper >= 80.0,
        "keeper {keeper:.1} %, churner {churner:.1} %: {:?}",
        r.stacks
    );
    assert!(
        total_pct(&r.summary, "keep_block") >= 80.0 || keeper >= 80.0,
        "{:#}",
        r.summary["top_functions"]
    );
    let cum = pprof_cum(&pprof_file(&r.printed), "space");
    assert!(cum.get("keep_block").copied().unwrap_or(0.0) >= 80.0, "{cum:?}");
}

/// Test that heap mode gives the keeper at least 80 % of the in-use bytes
/// and the freeing allocator under 10 %, in the flamegraph and in `go tool
/// pprof -sample_index=inuse_space`; both allocate, so alloc_space shows
/// both.
#[test]
fn heap_mode_inuse_names_the_keeper() {
    if !privileged("heap_mode_inuse_names_the_keeper") {
        return;
    }
    let _serial = serial();
    let target = memleak("8");
    std::thread::sleep(Duration::from_millis(500));
    let r = record(
        target.pid(),
        &[
            "--mode",
            "heap",
            "--duration",
            "8s",
            "--format",
            "folded,json,pprof",
            "--leak-age",
            "2s",
            // The fixture sleeps between allocations: the probes' traps are
            // a large share of its little CPU time, and the default budget
            // would duty-cycle them. This test is about attribution.
            "--max-overhead",
            "100",
        ],
    );
    let m: &Value = &r.summary["memory"];
    assert_eq!(m["kind"], "heap", "{:#}", r.summary);
    assert_eq!(m["allocator"], "glibc", "{m:#}");
    assert!(m["sampled"].as_u64().unwrap() >= 10, "{m:#}");
    let keeper = share_through(&r.stacks, "keep_block");
    let churner = share_through(&r.stacks, "churn_block");
    assert!(keeper >= 80.0, "keeper {keeper:.1} %: {:?}\n{m:#}", r.stacks);
    assert!(churner < 10.0, "churner {churner:.1} %: {:?}", r.stacks);
    let file = pprof_file(&r.printed);
    let inuse = pprof_cum(&file, "inuse_space");
    assert!(
        inuse.get("keep_block").copied().unwrap_or(0.0) >= 80.0,
        "{inuse:?}"
    );
    assert!(
        inuse.get("churn_block").copied().unwrap_or(0.0) < 10.0,
        "{inuse:?}"
    );
    let alloc = pprof_cum(&file, "alloc_space");
    assert!(
        alloc.get("churn_block").copied().unwrap_or(0.0) >= 20.0,
        "{alloc:?}"
    );
    // Every live allocation is listed with its age; the keeper's oldest
    // are past the 2 s leak age.
    let live = m["live"].as_array().expect("live allocations");
    let first = &live[0];
    assert!(
        first["stack"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "keep_block"),
        "{first:#}"
    );
    assert!(first["oldest_s"].as_f64().unwrap() >= 2.0, "{first:#}");
    assert!(m["leaked_bytes"].as_u64().unwrap() > 0, "{m:#}");
}

/// The first byte of `symbol` of the libc mapped by `pid`, as that
/// process sees it (a uprobe replaces it with int3, 0xcc, in the address
/// spaces it is installed in).
fn first_byte(pid: u32, symbol: &str) -> u8 {
    use std::io::{Read as _, Seek as _};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let (base, path) = maps
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let path = *cols.get(5)?;
            (path.contains("/libc.so") && cols[2] == "00000000").then(|| {
                let start = u64::from_str_radix(cols[0].split('-').next().unwrap(), 16).unwrap();
                (start, path.to_owned())
            })
        })
        .expect("libc mapped");
    let nm = Command::new("nm")
        .args(["-D", "--defined-only", &path])
        .output()
        .expect("nm (binutils)");
    let value = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() == 3 && cols[2].split("@").next() == Some(symbol))
                .then(|| u64::from_str_radix(cols[0], 16).unwrap())
        })
        .expect("symbol in libc");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    mem.seek(std::io::SeekFrom::Start(base + value)).unwrap();
    let mut b = [0u8];
    mem.read_exact(&mut b).unwrap();
    b[0]
}

/// Test that heap mode's probes are installed in the target only: malloc
/// and free start with a breakpoint in the target's address space and are
/// untouched in another process running the same executable and libc.
#[test]
fn heap_mode_probes_only_the_target() {
    if !privileged("heap_mode_probes_only_the_target") {
        return;
    }
    let _serial = serial();
    let target = memleak("4");
    let other = memleak("4");
    let before = first_byte(other.pid(), "malloc");
    assert_ne!(before, 0xcc);
    let dir = output_dir();
    let pid = target.pid().to_string();
    let agent = flamewatch_spawn(&[
        "record",
        "--pid",
        &pid,
        "--mode",
        "heap",
        "--duration",
        "4s",
        "--output",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        wait_until(Duration::from_secs(10), || first_byte(target.pid(), "malloc")
            == 0xcc),
        "no breakpoint on the target's malloc"
    );
    for f in ["malloc", "free"] {
        assert_ne!(
            first_byte(other.pid(), f),
            0xcc,
            "{f} of the other process has a breakpoint"
        );
    }
    assert_eq!(first_byte(target.pid(), "free"), 0xcc);
    let status = agent
        .wait_with_timeout(Duration::from_secs(30))
        .expect("agent ends");
    assert!(status.success());
    // Detached at the end: the target's code is as it was.
    assert_eq!(first_byte(target.pid(), "malloc"), before);
}

//! Checks of the kernel matrix (`cargo xtask matrix` runs them on Debian
//! 12's 6.1 and 6.12 under qemu, and on the host): a 2:1 split recorded
//! through frame pointers and through DWARF, and `flamewatch doctor`.

use std::process::Command;

use flamewatch_e2e::*;

/// Records `binary` running hot_a:hot_b at 2:1 and returns hot_a's share of
/// the two paths' samples, and both self shares (under qemu without KVM a
/// part of the samples land in the emulated kernel's timer code).
fn two_to_one(binary: &str) -> (f64, f64, f64) {
    let mut cmd = Command::new(target_bin(binary));
    cmd.args(["--ratio", "2:1"]);
    let target = TestProcess::spawn_ready(cmd);
    let out_dir = output_dir();
    let pid = target.pid().to_string();
    let out = flamewatch(&[
        "record",
        "--pid",
        &pid,
        "--duration",
        "3s",
        "--freq",
        "199",
        "--output",
        out_dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json = printed_files(&out.stdout, "json");
    let summary = read_json(&json[0]);
    let samples = summary["sampling"]["samples"].as_u64().unwrap();
    assert!(samples > 100, "3 s at 199 Hz of a busy thread: {samples} samples");
    let (a, b) = (self_pct(&summary, "hot_a"), self_pct(&summary, "hot_b"));
    assert!(a + b > 60.0, "the two paths are most of the profile: {a} + {b}");
    (100.0 * a / (a + b), a, b)
}

/// Test that a 2:1 split is recorded within 5 points through frame pointers.
#[test]
fn two_to_one_frame_pointers() {
    if !privileged("two_to_one_frame_pointers") {
        return;
    }
    let (split, a, b) = two_to_one("hotpaths-fp");
    eprintln!(
        "frame pointers: hot_a {a:.1}% hot_b {b:.1}%: split {split:.1}:{:.1}",
        100.0 - split
    );
    assert!(
        (split - 66.7).abs() <= 5.0,
        "hot_a {split}% of the two paths (want 66.7 ± 5)"
    );
}

/// Test that a 2:1 split is recorded within 5 points through DWARF (a
/// binary built without frame pointers).
#[test]
fn two_to_one_dwarf() {
    if !privileged("two_to_one_dwarf") {
        return;
    }
    let (split, a, b) = two_to_one("hotpaths");
    eprintln!(
        "DWARF: hot_a {a:.1}% hot_b {b:.1}%: split {split:.1}:{:.1}",
        100.0 - split
    );
    assert!(
        (split - 66.7).abs() <= 5.0,
        "hot_a {split}% of the two paths (want 66.7 ± 5)"
    );
}

/// Test that `flamewatch doctor` finds every feature flamewatch needs on
/// this kernel, and every program passes the verifier.
#[test]
fn doctor_on_this_kernel() {
    if !privileged("doctor_on_this_kernel") {
        return;
    }
    let out = flamewatch(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(out.status.success());
    for line in text
        .lines()
        .filter(|l| l.starts_with("program ") || l.starts_with("tracepoint "))
    {
        assert!(line.contains(" yes "), "{line}");
    }
    // Sampling, off-CPU, 3 TCP, 5 crash capture (signal, fault, OOM,
    // exit_group, process exit), 3 memory growth (fault, mmap, brk), 7 heap
    // (malloc, calloc, realloc, memalign, posix_memalign, free, return), 2
    // latency (entry, return).
    assert_eq!(
        text.lines().filter(|l| l.starts_with("program ")).count(),
        22,
        "{text}"
    );
}

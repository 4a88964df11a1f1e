//! `--format pprof` end to end: what we write is read by the real
//! `go tool pprof` (Debian golang-go), and agrees with our own summary.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use flamewatch_e2e::*;
use serde_json::Value;

/// Runs `go tool pprof ARGS` and returns its stdout.
fn go_pprof(args: &[&str]) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .output()
        .expect("running `go tool pprof` (Debian golang-go; `cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "go tool pprof {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// One row of `pprof -top`.
#[derive(Debug)]
struct TopRow {
    flat_pct: f64,
    cum_pct: f64,
    name: String,
}

/// The rows of `pprof -top` (flat, flat%, sum%, cum, cum%, name).
fn top(file: &Path, extra: &[&str]) -> Vec<TopRow> {
    let mut args = extra.to_vec();
    args.extend(["-top", file.to_str().unwrap()]);
    let text = go_pprof(&args);
    let pct = |s: &str| s.trim_end_matches('%').parse::<f64>().ok();
    text.lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            Some(TopRow {
                flat_pct: pct(cols.get(1)?)?,
                cum_pct: pct(cols.get(4)?)?,
                name: cols.get(5..)?.join(" "),
            })
        })
        .collect()
}

/// The lines of a section of `pprof -raw` (`Samples`, `Locations`,
/// `Mappings`).
fn raw_section(raw: &str, name: &str) -> Vec<String> {
    raw.lines()
        .skip_while(|l| l.trim_end() != name)
        .skip(1)
        .take_while(|l| !matches!(l.trim_end(), "Samples:" | "Locations" | "Mappings"))
        .map(str::to_owned)
        .collect()
}

/// The GNU build id of an ELF file, as readelf prints it.
fn readelf_build_id(path: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(path)
        .output()
        .expect("readelf (binutils)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_owned))
        .unwrap_or_else(|| panic!("{} has no build id", path.display()))
}

/// The one pprof file a run printed.
fn pprof_file(r: &Recorded) -> PathBuf {
    let files: Vec<&PathBuf> = r
        .printed
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(".pb.gz"))
        .collect();
    assert_eq!(files.len(), 1, "one pprof file printed: {:?}", r.printed);
    files[0].clone()
}

/// Checks that `pprof -top` puts the summary's hottest functions first, in
/// the same order, with the same self and total shares (±1 point).
fn top_matches_summary(r: &Recorded) -> Vec<TopRow> {
    let rows = top(&pprof_file(r), &[]);
    let ours: Vec<&Value> = r.summary["top_functions"]
        .as_array()
        .expect("top_functions")
        .iter()
        .filter(|f| f["self_pct"].as_f64().unwrap() >= 5.0)
        .collect();
    assert!(
        ours.len() >= 2,
        "two hot functions: {:#}",
        r.summary["top_functions"]
    );
    for (i, f) in ours.iter().enumerate() {
        let row = &rows[i];
        assert_eq!(row.name, f["name"], "pprof -top row {i}: {rows:#?}");
        let (self_pct, total_pct) = (f["self_pct"].as_f64().unwrap(), f["total_pct"].as_f64().unwrap());
        assert!((row.flat_pct - self_pct).abs() <= 1.0, "{row:?} vs {f}");
        assert!((row.cum_pct - total_pct).abs() <= 1.0, "{row:?} vs {f}");
    }
    let main = rows
        .iter()
        .find(|r| r.name == "main")
        .expect("main in pprof -top");
    assert!(
        (main.cum_pct - total_pct(&r.summary, "main")).abs() <= 1.0,
        "{main:?}"
    );
    rows
}

/// Checks the Mappings of `pprof -raw`: the target's binary first, with its
/// real build id, and the kernel's mapping when there are kernel frames.
fn mappings_have_build_ids(r: &Recorded, exe: &Path) -> String {
    let raw = go_pprof(&["-raw", pprof_file(r).to_str().unwrap()]);
    let mappings = raw_section(&raw, "Mappings");
    let first = mappings.first().expect("mappings");
    let build_id = readelf_build_id(exe);
    assert!(
        first.contains(exe.to_str().unwrap()) && first.contains(&build_id),
        "main binary first, with build id {build_id}: {mappings:#?}"
    );
    assert!(first.contains("[FN]"), "symbolized by us: {first}");
    assert!(
        mappings.iter().any(|m| m.contains("libc.so")),
        "libc's mapping: {mappings:#?}"
    );
    let locations = raw_section(&raw, "Locations");
    if locations.iter().any(|l| l.contains("_[k]")) {
        let kernel = mappings
            .iter()
            .find(|m| m.contains("[kernel.kallsyms]"))
            .unwrap_or_else(|| panic!("kernel frames need the kernel's mapping: {mappings:#?}"));
        assert!(
            kernel
                .split_whitespace()
                .any(|w| w.len() == 40 && w.bytes().all(|b| b.is_ascii_hexdigit())),
            "kernel build id: {kernel}"
        );
    }
    // Process and thread are labels, not frames.
    let pid = r.summary["targets"][0]["pid"].as_u64().unwrap();
    assert!(raw.contains(&format!("pid:[{pid}]")), "pid label");
    assert!(raw.contains("tid:["), "tid label");
    raw
}

/// `pprof -traces` has a stack, leaf first, with these frames in a row.
fn traces_contain(file: &Path, frames: &[&str]) -> bool {
    let text = go_pprof(&["-traces", file.to_str().unwrap()]);
    text.split("-----------+")
        .map(|block| {
            block
                .lines()
                .filter(|l| !l.contains(':') && !l.trim().is_empty())
                .map(|l| l.split_whitespace().last().unwrap_or("").to_owned())
                .collect::<Vec<_>>()
        })
        .any(|stack| stack.windows(frames.len()).any(|w| w == frames))
}

/// Test that a frame-pointer target's pprof profile, written beside the
/// SVG, folded stacks and summary, reads in `go tool pprof`: `-top` matches
/// our top_functions, `-raw` has the real mappings with build ids and the
/// thread labels, `-traces` the full stacks.
#[test]
fn pprof_matches_summary() {
    if !privileged("pprof_matches_summary") {
        return;
    }
    let mut cmd = Command::new(target_bin("hotpaths-fp"));
    cmd.args(["--ratio", "3:1"]);
    let target = TestProcess::spawn_ready(cmd);
    let r = record(
        target.pid(),
        &[
            "--duration",
            "5s",
            "--freq",
            "199",
            "--format",
            "svg,folded,json,pprof",
        ],
    );
    for ext in ["svg", "folded", "json", "pb.gz"] {
        assert!(
            r.printed
                .iter()
                .any(|p| p.to_string_lossy().ends_with(ext) && p.exists()),
            "{ext} written and printed: {:?}",
            r.printed
        );
    }
    assert_eq!(r.summary["files"]["pprof"], pprof_file(&r).to_str().unwrap());
    let rows = top_matches_summary(&r);
    assert_eq!(rows[0].name, "hot_a", "{rows:#?}");
    mappings_have_build_ids(&r, &target_bin("hotpaths-fp"));
    assert!(
        traces_contain(&pprof_file(&r), &["hot_a", "path_a", "worker", "main"]),
        "leaf-first stacks"
    );
}

/// Test that a production (no frame pointers, DWARF-unwound) target gets
/// the same pprof treatment, and that `--format json,pprof` writes only
/// those two files.
#[test]
fn pprof_of_dwarf_target() {
    if !privileged("pprof_of_dwarf_target") {
        return;
    }
    let mut cmd = Command::new(target_bin("hotpaths"));
    cmd.args(["--ratio", "3:1"]);
    let target = TestProcess::spawn_ready(cmd);
    let r = record(
        target.pid(),
        &["--duration", "5s", "--freq", "199", "--format", "json,pprof"],
    );
    assert_eq!(r.summary["sampling"]["unwind"]["mode"], "dwarf");
    assert_eq!(r.printed.len(), 2, "{:?}", r.printed);
    let written: Vec<_> = std::fs::read_dir(r.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".svg") || n.ends_with(".folded"))
        .collect();
    assert!(written.is_empty(), "no svg or folded: {written:?}");
    assert!(r.summary["files"].get("svg").is_none(), "{}", r.summary["files"]);
    top_matches_summary(&r);
    mappings_have_build_ids(&r, &target_bin("hotpaths"));
    assert!(
        traces_contain(&pprof_file(&r), &["hot_b", "path_b", "worker", "main"]),
        "complete DWARF-unwound stacks"
    );
}

/// Test that a wall profile's pprof keeps on-CPU and off-CPU time apart
/// (cpu, off-cpu, and their sum wall, the default), each adding up to the
/// summary's figures.
#[test]
fn pprof_of_wall_profile() {
    if !privileged("pprof_of_wall_profile") {
        return;
    }
    let mut cmd = Command::new(target_bin("sleepspin-fp"));
    cmd.args(["--spin-us", "10000", "--sleep-us", "10000", "--seconds", "30"]);
    let target = TestProcess::spawn_ready(cmd);
    let r = record(
        target.pid(),
        &[
            "--mode",
            "wall",
            "--duration",
            "3s",
            "--freq",
            "199",
            "--format",
            "json,pprof",
        ],
    );
    let raw = go_pprof(&["-raw", pprof_file(&r).to_str().unwrap()]);
    let samples = raw_section(&raw, "Samples:");
    assert_eq!(
        samples[0].trim(),
        "samples/count cpu/nanoseconds off-cpu/nanoseconds wall/nanoseconds[dflt]"
    );
    let mut sums = [0f64; 4];
    for line in &samples[1..] {
        let cols: Vec<f64> = line
            .split(':')
            .next()
            .unwrap()
            .split_whitespace()
            .map_while(|c| c.parse().ok())
            .collect();
        if cols.len() == 4 {
            for (s, c) in sums.iter_mut().zip(cols) {
                *s += c;
            }
        }
    }
    let s = &r.summary;
    let cpu_s = s["sampling"]["sampled_cpu_s"].as_f64().unwrap();
    let blocked_s = s["off_cpu"]["blocked_s"].as_f64().unwrap();
    assert!((sums[1] / 1e9 - cpu_s).abs() < 0.01, "cpu {sums:?} vs {cpu_s}");
    assert!(
        (sums[2] / 1e9 - blocked_s).abs() < 0.01,
        "off-cpu {sums:?} vs {blocked_s}"
    );
    assert_eq!(sums[3], sums[1] + sums[2], "wall = cpu + off-cpu");
    let cpu_top = top(&pprof_file(&r), &["-sample_index=cpu"]);
    assert_eq!(cpu_top[0].name, "spin_phase", "{cpu_top:#?}");
    // Off CPU, every thread waits in the scheduler: sleeping in nanosleep,
    // or preempted when other tests load the machine.
    let off_top = top(&pprof_file(&r), &["-sample_index=off-cpu"]);
    assert!(
        off_top[0].name.contains("schedule") && off_top[0].flat_pct > 90.0,
        "{off_top:#?}"
    );
    assert!(
        off_top
            .iter()
            .any(|r| r.name.contains("nanosleep") && r.cum_pct > 0.0),
        "off CPU in nanosleep: {off_top:#?}"
    );
}

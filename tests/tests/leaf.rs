//! The leaf fix-up of frame-pointer stacks (issue 14): a sample in a
//! function that set up no frame keeps that function's caller, in every
//! output (folded stacks, flamegraph, pprof).

use std::{path::Path, process::Command};

use flamewatch_e2e::*;

/// Share (percent) of the samples whose stack contains `frame`.
fn share_with(stacks: &[(Vec<String>, u64)], frame: &str) -> f64 {
    let total: u64 = stacks.iter().map(|(_, n)| n).sum();
    let with: u64 = stacks
        .iter()
        .filter(|(s, _)| s.iter().any(|f| f == frame))
        .map(|(_, n)| n)
        .sum();
    100.0 * with as f64 / total.max(1) as f64
}

/// Share (percent) of the samples in which `caller` is over a frame for
/// which `callee` holds (through `leaf_once`, inlined into the callers).
fn share_calling(stacks: &[(Vec<String>, u64)], caller: &str, callee: impl Fn(&str) -> bool) -> f64 {
    let total: u64 = stacks.iter().map(|(_, n)| n).sum();
    let with: u64 = stacks
        .iter()
        .filter(|(s, _)| {
            s.iter().position(|f| f == caller).is_some_and(|at| {
                let below: Vec<&String> = s[at + 1..].iter().filter(|f| *f != "leaf_once").collect();
                below.first().is_some_and(|f| callee(f))
            })
        })
        .map(|(_, n)| n)
        .sum();
    100.0 * with as f64 / total.max(1) as f64
}

/// The flamegraph's share of `frame`: the sum of the percentages in the
/// titles of its boxes (`name (N samples, P%)`).
fn svg_share(svg: &Path, frame: &str) -> f64 {
    let text = std::fs::read_to_string(svg).unwrap();
    let prefix = format!("<title>{frame} (");
    text.match_indices(&prefix)
        .filter_map(|(at, _)| {
            let rest = &text[at + prefix.len()..];
            let inner = &rest[..rest.find(")</title>")?];
            inner
                .rsplit(", ")
                .next()?
                .trim_end_matches('%')
                .parse::<f64>()
                .ok()
        })
        .sum()
}

/// `cum%` of `frame` in `go tool pprof -top`.
fn pprof_cum(file: &Path, frame: &str) -> f64 {
    let out = Command::new("go")
        .args(["tool", "pprof", "-top", file.to_str().unwrap()])
        .output()
        .expect("running `go tool pprof` (Debian golang-go; `cargo xtask setup` installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.get(5..)?.join(" ") == frame).then(|| cols[4].trim_end_matches('%').parse().ok())?
        })
        .next()
        .unwrap_or_else(|| panic!("{frame} not in pprof -top:\n{text}"))
}

fn file_with(r: &Recorded, ext: &str) -> std::path::PathBuf {
    r.printed
        .iter()
        .find(|p| p.to_string_lossy().ends_with(ext))
        .unwrap_or_else(|| panic!("no {ext} among {:?}", r.printed))
        .clone()
}

/// Records the frame-pointer build of `leafcall` in `mode` and checks that
/// its leaf's two callers split 2:1 (±5 points) in the folded stacks, the
/// flamegraph and `pprof -top`, each directly over a leaf for which
/// `is_leaf` holds; returns the recording.
fn callers_split_2_to_1(mode: &str, extra: &[&str], is_leaf: impl Fn(&str) -> bool) -> Recorded {
    let mut cmd = Command::new(target_bin("leafcall-fp"));
    cmd.args(["--mode", mode, "--seconds", "60"]);
    let target = TestProcess::spawn_ready(cmd);
    let mut args = vec!["--duration", "4s", "--format", "svg,folded,json,pprof"];
    args.extend_from_slice(extra);
    let r = record(target.pid(), &args);
    let u = &r.summary["sampling"]["unwind"];
    assert_eq!(u["mode"], "fp", "{u:#}");
    let (svg, pb) = (file_with(&r, ".svg"), file_with(&r, ".pb.gz"));
    for (caller, want) in [("alpha_work", 200.0 / 3.0), ("beta_work", 100.0 / 3.0)] {
        let folded = share_with(&r.stacks, caller);
        let over_leaf = share_calling(&r.stacks, caller, &is_leaf);
        let flame = svg_share(&svg, caller);
        let pprof = pprof_cum(&pb, caller);
        for (what, got) in [
            ("folded", folded),
            ("folded, over the leaf", over_leaf),
            ("flamegraph", flame),
            ("pprof -top cum%", pprof),
        ] {
            assert!(
                (got - want).abs() <= 5.0,
                "{caller} in {got:.1} % of {what} (want {want:.1} %)\nunwind {u:#}\n{:?}",
                &r.stacks[..r.stacks.len().min(12)]
            );
        }
    }
    let (checked, fixups) = (
        u["leaf_checked"].as_f64().unwrap(),
        u["leaf_fixups"].as_f64().unwrap(),
    );
    assert!(fixups >= 0.9 * checked && checked > 0.0, "{u:#}");
    r
}

/// Test that a program's own hot leaf (`churn`, no frame even at
/// -fno-omit-frame-pointer) called from two callers 2:1 keeps its callers,
/// with the right split, under frame-pointer unwinding.
#[test]
fn own_leaf_keeps_its_callers() {
    if !privileged("own_leaf_keeps_its_callers") {
        return;
    }
    let _turn = cpu_bound_turn();
    let r = callers_split_2_to_1("own", &["--freq", "499"], |f| f == "churn");
    assert!(
        self_pct(&r.summary, "churn") > 90.0,
        "{:#}",
        r.summary["top_functions"]
    );
}

/// Test that a hot libc `memset` (libc keeps no frame pointers) called from
/// two callers 2:1 keeps its callers, with the right split.
#[test]
fn libc_memset_keeps_its_callers() {
    if !privileged("libc_memset_keeps_its_callers") {
        return;
    }
    let _turn = cpu_bound_turn();
    callers_split_2_to_1("memset", &["--freq", "499"], |f| f.contains("memset"));
}

/// Test that off-CPU stacks, whose leaf is a libc syscall wrapper
/// (clock_nanosleep), keep the wrapper's callers: blocked time splits 2:1.
#[test]
fn offcpu_syscall_wrapper_keeps_its_callers() {
    if !privileged("offcpu_syscall_wrapper_keeps_its_callers") {
        return;
    }
    callers_split_2_to_1("sleep", &["--mode", "offcpu", "--no-kernel"], |f| {
        f.contains("nanosleep")
    });
}

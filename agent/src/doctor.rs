//! `flamewatch doctor`: what this kernel supports, probed at run time, and
//! what flamewatch does without what it lacks.

use std::{fmt::Write as _, path::Path};

use aya::{
    maps::MapType,
    programs::{PerfEvent, Program, TracePoint},
};

use crate::layout::{kernel_release, layouts, Feature};

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// What was probed.
    pub feature: String,
    /// Whether this kernel has it.
    pub ok: bool,
    /// `ok`: what it serves; otherwise what flamewatch does without it.
    pub note: String,
}

fn row(feature: impl Into<String>, ok: bool, yes: &str, no: &str) -> Row {
    Row {
        feature: feature.into(),
        ok,
        note: if ok { yes } else { no }.to_owned(),
    }
}

/// Probes this kernel (needs root for the BPF probes).
pub fn probe() -> Vec<Row> {
    let mut rows = vec![
        row(
            "BTF (/sys/kernel/btf/vmlinux)",
            Path::new("/sys/kernel/btf/vmlinux").exists(),
            "present; not required (layouts come from tracefs, no CO-RE)",
            "not required: layouts come from tracefs",
        ),
        row(
            "BPF ring buffer (5.8+)",
            map_supported(MapType::RingBuf),
            "DWARF stack copies, TCP events, off-CPU ends, eBPF logs",
            "the eBPF object cannot load: flamewatch does not run",
        ),
        row(
            "BPF stack trace maps",
            map_supported(MapType::StackTrace),
            "frame-pointer stacks (stack ids)",
            "the eBPF object cannot load: flamewatch does not run",
        ),
        row(
            "stack ids with build ids",
            stack_build_id_supported(),
            "available; unused (build ids are read from the files)",
            "unused: build ids are read from the files",
        ),
        row(
            "uprobes (/sys/bus/event_source/devices/uprobe)",
            Path::new("/sys/bus/event_source/devices/uprobe/type").exists(),
            "function probes (`latency`, `[[target.probe]]`), heap profiles",
            "`latency`, `[[target.probe]]` and `--mode heap` cannot attach; the rest works",
        ),
    ];
    let layouts = layouts();
    for feature in Feature::ALL {
        let missing = layouts.missing(feature);
        rows.push(Row {
            feature: format!("tracepoint {} ({})", feature.tracepoint(), feature.name()),
            ok: missing.is_none(),
            note: match missing {
                None => "layout read from tracefs".to_owned(),
                Some(why) => format!("{}; {why}", without(feature)),
            },
        });
    }
    rows.extend(program_rows());
    rows
}

/// What flamewatch does without `feature`.
fn without(feature: Feature) -> &'static str {
    match feature {
        Feature::TcpStates => "no TCP section in record; `tcp` exits 2",
        Feature::TcpResetsReceived => "resets received not counted",
        Feature::TcpResetsSent => "resets sent not counted; a TIME_WAIT entry ended by a RST stays counted",
        Feature::OffCpu => "--mode offcpu and wall exit with an error; CPU profiles work",
        Feature::CrashSignals => "crashes and aborts are not captured (no `crashed` alert)",
        Feature::FaultAddresses => "crash reports carry no fault address",
        Feature::OomKills => "OOM kills are not captured (no `oom_killed` alert)",
        Feature::ExitCodes | Feature::ProcessExits => "failed exits are not captured (no `exited` alert)",
        Feature::MemoryFaults => "--mode memory exits with an error; heap and CPU profiles work",
        Feature::MemoryMmap => "memory profiles lack the mmap view of heap extensions",
        Feature::MemoryBrk => "memory profiles lack the brk view of heap extensions",
    }
}

fn map_supported(map_type: MapType) -> bool {
    aya::sys::is_map_supported(map_type).unwrap_or(false)
}

/// Creates a one-entry stack map with `BPF_F_STACK_BUILD_ID` (aya's probe
/// knows no flags).
fn stack_build_id_supported() -> bool {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_STACK_TRACE: u32 = 7;
    const BPF_F_STACK_BUILD_ID: u32 = 1 << 5;
    // bpf_attr's map_create: type, key size, value size (one 32-byte
    // bpf_stack_build_id), max entries, flags; the rest zero.
    let mut attr = [0u32; 32];
    attr[..5].copy_from_slice(&[BPF_MAP_TYPE_STACK_TRACE, 4, 32, 1, BPF_F_STACK_BUILD_ID]);
    // SAFETY: attr is a valid, zero-padded bpf_attr of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: a descriptor we own.
    unsafe { libc::close(fd as libc::c_int) };
    true
}

/// Loads the eBPF object and each program through the verifier.
fn program_rows() -> Vec<Row> {
    let mut ebpf = match crate::bpf::load(false) {
        Ok(ebpf) => ebpf,
        Err(e) => {
            return vec![row(
                "eBPF object loads",
                false,
                "",
                &format!("flamewatch does not run: {e}"),
            )]
        }
    };
    let mut rows = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        let result = match program {
            Program::PerfEvent(p) => PerfEvent::load(p).map_err(|e| e.to_string()),
            Program::TracePoint(p) => TracePoint::load(p).map_err(|e| e.to_string()),
            Program::UProbe(p) => aya::programs::UProbe::load(p).map_err(|e| e.to_string()),
            _ => Err("unexpected program type".to_owned()),
        };
        let name = format!("program {name} verifies");
        rows.push(match result {
            Ok(()) => row(name, true, "loaded", ""),
            Err(e) => row(name, false, "", &format!("its feature is off: {}", one_line(&e))),
        });
    }
    rows.sort_by(|a, b| a.feature.cmp(&b.feature));
    rows
}

/// The error in one short line: for a verifier log, its verdict (the
/// statement before "verification time", e.g. `invalid func unknown#158`).
fn one_line(text: &str) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.split_once(" Verifier output:") {
        Some((head, log)) => {
            let verdict = log.split(" verification time").next().unwrap_or(log);
            let verdict = verdict.rsplit(": ").next().unwrap_or(verdict);
            let tail: String = verdict
                .chars()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!("{head}; verifier: {tail}")
        }
        None => text,
    }
}

/// The report: a header line and one aligned line per row.
pub fn render(release: &str, rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.feature.len()).max().unwrap_or(0);
    let mut out = format!("flamewatch doctor: kernel {release}\n");
    let _ = writeln!(out, "{:width$}  ok   what flamewatch does", "feature");
    for r in rows {
        let ok = if r.ok { "yes" } else { "NO" };
        let _ = writeln!(out, "{:width$}  {ok:3}  {}", r.feature, r.note);
    }
    out
}

/// Runs the probes and prints the report.
pub fn run() -> String {
    render(&kernel_release(), &probe())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that the report aligns its columns and marks what is missing.
    #[test]
    fn report_layout() {
        let rows = [
            row("ring buffer", true, "used", "x"),
            row("a longer feature name", false, "", "degrades"),
        ];
        let text = render("6.1.0-57-amd64", &rows);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines[0], "flamewatch doctor: kernel 6.1.0-57-amd64");
        assert_eq!(lines[2], "ring buffer            yes  used");
        assert_eq!(lines[3], "a longer feature name  NO   degrades");
    }

    /// Test that a verifier log is cut down to its verdict.
    #[test]
    fn verifier_log_one_line() {
        let e = "load failed (os error 22). Verifier output: 0: (bf) r6 = r1\n 322: (85) call unknown#158\ninvalid func unknown#158\nverification time 9 usec";
        assert_eq!(
            one_line(e),
            "load failed (os error 22).; verifier: (85) call unknown#158 invalid func unknown#158"
        );
    }

    /// Test that this machine's kernel (the development one) has every
    /// feature flamewatch uses, when run as root.
    #[test]
    fn this_kernel_supports_everything_used() {
        if crate::target::missing_privileges().is_some() {
            eprintln!("not root: skipped");
            return;
        }
        let rows = probe();
        let failing: Vec<_> = rows
            .iter()
            .filter(|r| !r.ok && !r.feature.starts_with("BTF"))
            .collect();
        assert!(failing.is_empty(), "{failing:?}");
        assert!(rows
            .iter()
            .any(|r| r.feature == "program flamewatch_offcpu verifies"));
    }
}

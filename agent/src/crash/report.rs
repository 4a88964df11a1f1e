//! The crash report: `<stem>.crash.json` (the [`Crash`] as JSON) and
//! `<stem>.crash.txt` (the same for people: what happened, the backtrace,
//! the heaviest stacks of the minute before, the last metrics).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use super::{Crash, CrashError};
use crate::session::compact_timestamp;

/// Stacks of the last minute's profile kept in a report.
pub const MAX_PROFILE_STACKS: usize = 50;

/// The files of a written report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashFiles {
    /// `<stem>.crash.json`.
    pub json: PathBuf,
    /// `<stem>.crash.txt`.
    pub text: PathBuf,
}

/// `<name>-<pid>-<time>`, as session reports are named.
pub fn stem(crash: &Crash) -> String {
    format!(
        "{}-{}-{}",
        crate::session::sanitize(&crash.comm),
        crash.pid,
        compact_timestamp(crash.at)
    )
}

/// Writes both files into `dir` (created if needed), without following
/// symlinks (a temporary file renamed into place).
pub fn write(dir: &Path, crash: &Crash) -> Result<CrashFiles, CrashError> {
    let stem = stem(crash);
    let files = CrashFiles {
        json: dir.join(format!("{stem}.crash.json")),
        text: dir.join(format!("{stem}.crash.txt")),
    };
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| CrashError::Write { path, source }
    };
    crate::fsafe::create_dir(dir).map_err(|e| CrashError::Write {
        path: dir.to_owned(),
        source: std::io::Error::other(e),
    })?;
    let json = serde_json::to_vec_pretty(crash).map_err(|e| CrashError::Write {
        path: files.json.clone(),
        source: e.into(),
    })?;
    crate::fsafe::write_atomic(&files.json, &json).map_err(err(&files.json))?;
    crate::fsafe::write_atomic(&files.text, text(crash).as_bytes()).map_err(err(&files.text))?;
    Ok(files)
}

/// The readable report.
pub fn text(c: &Crash) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", c.headline());
    let _ = writeln!(s, "time: {}", c.time);
    if let Some(sig) = &c.signal_name {
        let _ = writeln!(
            s,
            "signal: {sig}{}",
            c.code
                .as_ref()
                .map_or_else(String::new, |code| format!(" ({code})"))
        );
    }
    if let Some(a) = &c.fault_address {
        let _ = writeln!(s, "fault address: {a}");
    }
    if let Some(code) = c.exit_code {
        let _ = writeln!(s, "exit status: {code}");
    }
    let _ = writeln!(s, "thread: {} (tid {})", c.thread, c.tid);
    s.push('\n');
    s.push_str(&backtrace(c));
    if !c.kernel_stack.is_empty() {
        let _ = writeln!(s, "\nkernel stack:");
        for (i, f) in c.kernel_stack.iter().enumerate() {
            let _ = writeln!(s, "  #{i:<2} {f}");
        }
    }
    let _ = writeln!(
        s,
        "\nCPU profile of the last {:.0} s ({} samples), heaviest stacks:",
        c.profile_seconds, c.profile_samples
    );
    for f in &c.profile {
        let _ = writeln!(s, "  {:>6}  {}", f.samples, f.stack);
    }
    if !c.metrics.is_empty() {
        let _ = writeln!(s, "\nlast metrics:");
        for (k, v) in &c.metrics {
            let _ = writeln!(s, "  {k} = {v}");
        }
    }
    s
}

/// The stack as a numbered backtrace, innermost first (what `record`
/// prints).
pub fn backtrace(c: &Crash) -> String {
    let mut s = String::new();
    if c.stack.is_empty() {
        let _ = writeln!(s, "no stack ({})", c.unwind);
        return s;
    }
    let _ = writeln!(
        s,
        "stack of thread {} (tid {}), unwound by {}:",
        c.thread, c.tid, c.unwind
    );
    for (i, f) in c.stack.iter().enumerate() {
        let _ = writeln!(s, "  #{i:<2} {f}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crash::{CrashKind, FoldedStack};

    fn crash() -> Crash {
        Crash {
            kind: CrashKind::Crashed,
            time: "2026-12-01T20:00:00Z".into(),
            at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000),
            pid: 42,
            comm: "logcaster".into(),
            tid: 43,
            thread: "worker".into(),
            signal: Some(11),
            signal_name: Some("SIGSEGV".into()),
            code: Some("SEGV_MAPERR".into()),
            fault_address: Some("0x0".into()),
            exit_code: None,
            anon_rss_bytes: None,
            unwind: "frame pointers".into(),
            stack: vec!["parse_line".into(), "handle_client".into()],
            kernel_stack: Vec::new(),
            profile_seconds: 60.0,
            profile_samples: 10,
            profile: vec![FoldedStack {
                stack: "logcaster;main".into(),
                samples: 10,
            }],
            metrics: [("cpu_pct".to_owned(), 3.5)].into(),
        }
    }

    /// Test that a report is written as both files, the JSON with the
    /// stack innermost first and the text with the headline and backtrace.
    #[test]
    fn writes_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let files = write(dir.path(), &crash()).unwrap();
        assert!(files.json.to_string_lossy().ends_with(".crash.json"));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&files.json).unwrap()).unwrap();
        assert_eq!(v["kind"], "crashed");
        assert_eq!(v["stack"][0], "parse_line");
        assert_eq!(v["metrics"]["cpu_pct"], 3.5);
        let text = std::fs::read_to_string(&files.text).unwrap();
        assert!(
            text.starts_with("logcaster (pid 42) crashed: SIGSEGV (SEGV_MAPERR) at 0x0"),
            "{text}"
        );
        assert!(text.contains("#0  parse_line\n  #1  handle_client"), "{text}");
    }
}

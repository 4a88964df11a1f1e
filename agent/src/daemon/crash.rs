//! Crash, OOM-kill and failed-exit alerts: each crash the engine captured
//! of a watched process becomes a report (`<stem>.crash.json` and `.txt`
//! in the output folder) and an emergency alert (`crashed`, `oom_killed`
//! or `exited`) to every sink, with the stack in the record and the report
//! linked as `profile.crash`. The alert resolves when the target is back
//! (a new process found for it).

use std::collections::BTreeMap;

use tracing::warn;

use super::{follow::alert_target, Daemon};
use crate::{
    alerts::{AlertRecord, ProfileLinks, Rule, Status, MAX_STACK_FRAMES},
    crash::{report, Crash, CrashKind},
    detect::{Check, Finding, Severity},
    metrics::{Metric, TargetMetrics},
    target::Target,
};

/// Crash alerts still firing (their target has not come back), bounded
/// by the watched targets: one per target at most.
#[derive(Debug, Default)]
pub(super) struct OpenCrashes {
    /// (watched index, the firing record).
    open: Vec<(usize, AlertRecord)>,
}

/// The pseudo-rule of a crash alert.
fn crash_rule(kind: CrashKind) -> Rule {
    Rule {
        name: kind.rule().into(),
        severity: Severity::Emergency,
        persist_s: 0.0,
        clear_s: 0.0,
        cooldown_s: 0.0,
        check: Check::Threshold {
            metric: Metric::CpuPct,
            above: None,
            below: None,
            for_s: 0.0,
        },
    }
}

/// What the alert judged: the signal, the memory, or the status.
fn finding(c: &Crash) -> Finding {
    let (metric, value) = match c.kind {
        CrashKind::Crashed => ("signal", f64::from(c.signal.unwrap_or(0))),
        CrashKind::OomKilled => ("anon_rss_bytes", c.anon_rss_bytes.unwrap_or(0) as f64),
        CrashKind::Exited => ("exit_code", f64::from(c.exit_code.unwrap_or(0))),
    };
    Finding {
        metric: metric.into(),
        value,
        threshold: 0.0,
        message: c.headline(),
    }
}

/// The latest value of every metric of a target.
fn last_metrics(m: &TargetMetrics) -> BTreeMap<String, f64> {
    m.series
        .iter()
        .filter_map(|(k, s)| Some((k.name().to_owned(), s.last()?)))
        .collect()
}

/// The alert record of a crash whose report is `files`.
pub fn crash_record(c: &Crash, files: Option<&report::CrashFiles>) -> AlertRecord {
    let target = Target {
        pid: c.pid,
        comm: c.comm.clone(),
        exe: None,
        start_time: 0,
    };
    let mut record = AlertRecord::new(
        Status::Firing,
        alert_target(&target),
        &crash_rule(c.kind),
        &finding(c),
    );
    record.stack = c.stack.iter().take(MAX_STACK_FRAMES).cloned().collect();
    if let Some(f) = files {
        record.profile = Some(ProfileLinks {
            crash: Some(f.json.display().to_string()),
            ..ProfileLinks::default()
        });
    }
    record
}

impl Daemon {
    /// Reports the crashes the engine captured (called after each drain,
    /// and before a gone target's history is cleared, so the report still
    /// has its last metrics), and resolves the crash alerts of targets that
    /// are back.
    pub(super) fn crashes(&mut self) {
        self.resolve_crashes();
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        for mut crash in engine.take_crashes() {
            let Some(i) = self.watched_index(crash.pid) else {
                continue;
            };
            crash.metrics = last_metrics(&self.watched[i].metrics);
            let files = match report::write(&self.config.output, &crash) {
                Ok(f) => Some(f),
                Err(e) => {
                    warn!(pid = crash.pid, "{e}");
                    None
                }
            };
            let record = crash_record(&crash, files.as_ref());
            self.sinks.emit(&record);
            self.open_crashes.open.retain(|(j, _)| *j != i);
            self.open_crashes.open.push((i, record));
        }
    }

    /// The watched target whose process (live or just gone) is `pid`.
    fn watched_index(&self, pid: u32) -> Option<usize> {
        self.watched.iter().position(|w| {
            w.process.as_ref().is_some_and(|p| p.pid == pid)
                || w.gone.as_ref().is_some_and(|(p, _)| p.pid == pid)
        })
    }

    /// Resolves the crash alerts of targets running again as a new process.
    fn resolve_crashes(&mut self) {
        let open = std::mem::take(&mut self.open_crashes.open);
        for (i, mut record) in open {
            match self.watched[i].process.as_ref() {
                Some(p) if p.pid != record.target.pid => {
                    record.status = Status::Resolved;
                    record.time = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
                    record.message = format!("{} is back as pid {}", record.target.comm, p.pid);
                    record.stack.clear();
                    self.sinks.emit(&record);
                }
                _ => self.open_crashes.open.push((i, record)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that a crash's alert record is an emergency of rule `crashed`
    /// with the stack innermost first and the report linked as
    /// `profile.crash` (and no flamegraph link).
    #[test]
    fn crash_alert_record() {
        let c = Crash {
            kind: CrashKind::Crashed,
            time: "t".into(),
            at: std::time::SystemTime::now(),
            pid: 7,
            comm: "logcaster".into(),
            tid: 8,
            thread: "worker".into(),
            signal: Some(11),
            signal_name: Some("SIGSEGV".into()),
            code: Some("SEGV_MAPERR".into()),
            fault_address: Some("0x0".into()),
            exit_code: None,
            anon_rss_bytes: None,
            unwind: "DWARF".into(),
            stack: vec!["parse_line".into(), "worker_main".into()],
            kernel_stack: Vec::new(),
            profile_seconds: 0.0,
            profile_samples: 0,
            profile: Vec::new(),
            metrics: BTreeMap::new(),
        };
        let files = report::CrashFiles {
            json: "/o/x.crash.json".into(),
            text: "/o/x.crash.txt".into(),
        };
        let r = crash_record(&c, Some(&files));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["rule"], "crashed");
        assert_eq!(v["severity"], "emergency");
        assert_eq!(v["stack"][0], "parse_line");
        assert_eq!(v["profile"]["crash"], "/o/x.crash.json");
        assert!(v["profile"].get("svg").is_none(), "{v}");
        assert!(v["message"].as_str().unwrap().contains("SIGSEGV"), "{v}");
    }
}

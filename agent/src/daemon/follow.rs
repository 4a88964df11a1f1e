//! Following the targets: find each configured process, notice when it
//! restarts or goes away, and add it to or remove it from the engine.

use std::time::Instant;

use tracing::{info, warn};

use super::{Daemon, Watched};
use crate::{
    alerts::{AlertRecord, AlertTarget, Rule, Status},
    detect::{Check, Finding, Severity},
    engine::{EngineError, Want},
    export::TargetLabels,
    metrics::Metric,
    target::Target,
};

/// Rule name of the record saying a target came back with a new pid.
pub const TARGET_RESTARTED: &str = "target_restarted";
/// Rule name of the record saying a target is gone (resolved when it is back).
pub const TARGET_GONE: &str = "target_gone";

/// The pseudo-rule of the daemon's own records about targets.
pub(super) fn event_rule(name: &str) -> Rule {
    Rule {
        name: name.into(),
        severity: Severity::Warning,
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

/// Metric labels of a target: its watched name and pid.
pub(super) fn target_labels(w: &Watched, t: &Target) -> TargetLabels {
    TargetLabels {
        target: w.spec.process.clone().unwrap_or_else(|| t.comm.clone()),
        pid: t.pid.to_string(),
    }
}

/// The target of an alert record.
pub(super) fn alert_target(t: &Target) -> AlertTarget {
    AlertTarget {
        pid: t.pid,
        comm: t.comm.clone(),
    }
}

impl Daemon {
    /// Finds the target's process, says so when it restarted or is gone.
    pub(super) fn follow(&mut self, i: usize) {
        let w = &mut self.watched[i];
        if w.process.as_ref().is_some_and(Target::is_alive) {
            return;
        }
        // A crash of the process is reported before its history goes.
        self.crashes();
        let w = &mut self.watched[i];
        let old = w.process.take();
        if let Some(old) = &old {
            self.forget_process(i, old);
        }
        let found = self.watched[i].resolve();
        match (old, found) {
            (old, Some(new)) => self.found(i, old, new),
            (Some(old), None) => {
                let f = Finding {
                    metric: "pid".into(),
                    value: f64::from(old.pid),
                    threshold: 0.0,
                    message: format!(
                        "{} (pid {}) is gone; waiting for it to come back",
                        old.comm, old.pid
                    ),
                };
                self.sinks.emit(&AlertRecord::new(
                    Status::Firing,
                    alert_target(&old),
                    &event_rule(TARGET_GONE),
                    &f,
                ));
                self.watched[i].gone = Some((old, Instant::now()));
            }
            // Still gone (reported once), or never seen yet.
            (None, None) => {}
        }
    }

    /// The process of target `i` is gone: its sessions end with what they
    /// have, its alerts resolve, the engine lets it go.
    fn forget_process(&mut self, i: usize, old: &Target) {
        self.end_sessions_of(old.pid);
        let w = &self.watched[i];
        self.exporter.remove_target(&target_labels(w, old));
        self.sampler.forget(old.pid);
        if let Some(engine) = self.engine.as_mut() {
            engine.remove_target(old.pid);
        }
        // The old process's firing alerts end with it (Alertmanager would
        // otherwise keep them open); its history is not the next process's.
        self.resolve_all(i, old, "the process is gone");
        let w = &mut self.watched[i];
        w.metrics.clear();
        w.states.clear();
        // An emergency profile of the old process is no longer wanted.
        w.deferred = None;
    }

    /// Target `i` has a (new) process: add it to the engine, and report a
    /// restart when it had one before.
    fn found(&mut self, i: usize, old: Option<Target>, new: Target) {
        self.add_to_engine(&new);
        let w = &mut self.watched[i];
        let gone = w.gone.take();
        let previous = old.map(|o| (o, None)).or(gone.map(|(o, at)| (o, Some(at))));
        if let Some((prev, gone_at)) = previous {
            let after = gone_at.map_or_else(String::new, |at| {
                format!(" after {:.0} s away", at.elapsed().as_secs_f64())
            });
            let f = Finding {
                metric: "pid".into(),
                value: f64::from(new.pid),
                threshold: f64::from(prev.pid),
                message: format!("{} restarted: pid {} -> {}{after}", new.comm, prev.pid, new.pid),
            };
            if gone_at.is_some() {
                let mut back = AlertRecord::new(
                    Status::Resolved,
                    alert_target(&prev),
                    &event_rule(TARGET_GONE),
                    &f,
                );
                back.message = format!("{} is back as pid {}", prev.comm, new.pid);
                self.sinks.emit(&back);
            }
            self.sinks.emit(&AlertRecord::new(
                Status::Firing,
                alert_target(&new),
                &event_rule(TARGET_RESTARTED),
                &f,
            ));
        } else {
            info!(pid = new.pid, "watching {} (pid {})", new.comm, new.pid);
        }
        self.watched[i].process = Some(new);
    }

    /// Adds a process to the engine at the continuous rate (or only
    /// registered, for TCP tracking and sessions, when continuous profiling
    /// is off or other agents use its budget).
    fn add_to_engine(&mut self, t: &Target) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let want = Want {
            hz: self.config.continuous_hz,
            ..Want::default()
        };
        match engine.add_target(t.clone(), want) {
            Ok(_) => engine.announce(t.pid),
            Err(EngineError::Budget(e)) => {
                warn!(pid = t.pid, "no continuous profiling: {e}");
                if let Err(e) = engine.add_target(t.clone(), Want::default()) {
                    warn!(pid = t.pid, "cannot follow this target in the kernel: {e}");
                }
            }
            Err(e) => warn!(pid = t.pid, "cannot follow this target in the kernel: {e}"),
        }
    }
}

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

/// Rule name of the record saying a configured target was not found (once;
/// resolved when it appears).
pub const TARGET_MISSING: &str = "target_missing";

/// At most this many processes of one name are watched under one target (a
/// pre-fork server's master and its workers). More are left alone, said once.
pub const MAX_PIDS_PER_TARGET: usize = 64;

/// How long after the start a configured target may take to appear before
/// it is reported missing (an agent started just before its server).
const MISSING_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

impl Daemon {
    /// The slots of target group `g`: its leader first.
    pub(super) fn members(&self, g: usize) -> Vec<usize> {
        (0..self.watched.len())
            .filter(|&i| self.watched[i].group == g)
            .collect()
    }

    /// Follows every configured target.
    pub(super) fn follow_all(&mut self) {
        let groups = self.watched.iter().map(|w| w.group).max().map_or(0, |g| g + 1);
        for g in 0..groups {
            self.follow_group(g);
        }
    }

    /// Finds every process of target group `g`: members that exited are let
    /// go, new ones (a restart, a new worker) are added; the target is
    /// reported gone when its last process went, restarted when a process
    /// came after that, and missing when none was ever found.
    fn follow_group(&mut self, g: usize) {
        let members = self.members(g);
        let leader = members[0];
        let dead: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&i| self.watched[i].process.as_ref().is_some_and(|p| !p.is_alive()))
            .collect();
        if !dead.is_empty() {
            // A crash of the process is reported before its history goes.
            self.crashes();
        }
        let mut lost = Vec::new();
        for i in dead {
            let Some(p) = self.watched[i].process.take() else {
                continue;
            };
            if p.pid_reused() {
                info!(
                    pid = p.pid,
                    "pid {} of {} now belongs to a later process", p.pid, p.comm
                );
            }
            self.forget_process(i, &p);
            lost.push(p);
        }
        let known: Vec<u32> = members
            .iter()
            .filter_map(|&i| self.watched[i].process.as_ref().map(|p| p.pid))
            .collect();
        let fresh: Vec<Target> = self.watched[leader]
            .resolve()
            .into_iter()
            .filter(|t| !known.contains(&t.pid))
            .collect();
        let remaining = known.len();
        if remaining > 0 {
            for old in &lost {
                info!(
                    pid = old.pid,
                    "{}: pid {} exited; {remaining} still watched",
                    self.group_name(leader),
                    old.pid
                );
            }
        }
        let mut previous = (remaining == 0 && !fresh.is_empty())
            .then(|| {
                let lost_now = lost.first().cloned().map(|o| (o, None));
                lost_now.or_else(|| self.watched[leader].gone.take().map(|(o, at)| (o, Some(at))))
            })
            .flatten();
        let any_fresh = !fresh.is_empty();
        for t in fresh {
            let Some(i) = self.free_slot(g, leader, &t) else {
                break;
            };
            self.found(i, leader, previous.take(), t);
        }
        if remaining == 0 && !any_fresh {
            self.none_found(leader, lost);
        }
    }

    /// Target `leader`'s group has no process now: it is gone (said once)
    /// or, never found, missing (said once, after a grace period).
    fn none_found(&mut self, leader: usize, lost: Vec<Target>) {
        if let Some(old) = lost.into_iter().next() {
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
            self.watched[leader].gone = Some((old, Instant::now()));
            return;
        }
        let w = &self.watched[leader];
        if w.ever_found || w.missing_reported || self.start.elapsed() < MISSING_AFTER {
            return;
        }
        let name = self.group_name(leader);
        let f = Finding {
            metric: "pid".into(),
            value: 0.0,
            threshold: 0.0,
            message: format!(
                "{} not found after {} s; watching for it",
                w.spec.describe(),
                MISSING_AFTER.as_secs()
            ),
        };
        warn!("{}", f.message);
        let target = AlertTarget {
            pid: w.spec.pid.unwrap_or(0),
            comm: name,
        };
        self.sinks.emit(&AlertRecord::new(
            Status::Firing,
            target,
            &event_rule(TARGET_MISSING),
            &f,
        ));
        self.watched[leader].missing_reported = true;
    }

    /// The watched name of group `leader`.
    fn group_name(&self, leader: usize) -> String {
        let spec = &self.watched[leader].spec;
        spec.process.clone().unwrap_or_else(|| spec.describe())
    }

    /// A slot of group `g` for process `t`: a free one, or a new member
    /// while the group has fewer than [`MAX_PIDS_PER_TARGET`].
    fn free_slot(&mut self, g: usize, leader: usize, t: &Target) -> Option<usize> {
        let members = self.members(g);
        if let Some(&i) = members.iter().find(|&&i| self.watched[i].process.is_none()) {
            return Some(i);
        }
        if members.len() >= MAX_PIDS_PER_TARGET {
            if !self.watched[leader].over_limit_reported {
                warn!(
                    pid = t.pid,
                    "{}: more than {MAX_PIDS_PER_TARGET} processes; pid {} and later ones are not watched",
                    self.group_name(leader),
                    t.pid
                );
                self.watched[leader].over_limit_reported = true;
            }
            return None;
        }
        let member = self.watched[leader].member();
        self.watched.push(member);
        Some(self.watched.len() - 1)
    }

    /// The process of target `i` is gone: its sessions end with what they
    /// have, its alerts resolve, the engine lets it go.
    fn forget_process(&mut self, i: usize, old: &Target) {
        self.end_sessions_of(old.pid);
        let w = &self.watched[i];
        self.exporter.remove_target(&target_labels(w, old));
        if let Some(d) = &self.dashboard {
            d.remove(old.pid);
        }
        self.sampler.forget(old.pid);
        self.detach_probes(i, old);
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

    /// Slot `i` of group `leader` has a (new) process: add it to the
    /// engine, and report a restart when the group had a process before
    /// (`previous`, with when it was reported gone).
    fn found(&mut self, i: usize, leader: usize, previous: Option<(Target, Option<Instant>)>, new: Target) {
        self.add_to_engine(&new);
        let l = &mut self.watched[leader];
        l.ever_found = true;
        if l.spec.process.is_none() {
            // A pid target is that process: a later one reusing its pid is not.
            l.pinned_start = Some(new.start_time);
        }
        if std::mem::take(&mut l.missing_reported) {
            let f = Finding {
                metric: "pid".into(),
                value: f64::from(new.pid),
                threshold: 0.0,
                message: format!("{} appeared as pid {}", l.spec.describe(), new.pid),
            };
            self.sinks.emit(&AlertRecord::new(
                Status::Resolved,
                alert_target(&new),
                &event_rule(TARGET_MISSING),
                &f,
            ));
        }
        if let Some((prev, gone_at)) = previous {
            self.restarted(prev, gone_at, &new);
        } else {
            let n = self.members(self.watched[leader].group).len();
            info!(
                pid = new.pid,
                "watching {} (pid {}; {n} process(es) of this target)", new.comm, new.pid
            );
        }
        self.attach_probes(i, &new);
        self.watched[i].process = Some(new);
    }

    /// Says that `prev` came back as `new` (resolving its `target_gone`
    /// when that was reported).
    fn restarted(&mut self, prev: Target, gone_at: Option<Instant>, new: &Target) {
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
            alert_target(new),
            &event_rule(TARGET_RESTARTED),
            &f,
        ));
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

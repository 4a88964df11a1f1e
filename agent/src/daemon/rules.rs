//! Metrics and rules: sample a target's metrics (/proc, and the engine's
//! TCP tracker), evaluate its rules, and turn their transitions into alert
//! records; critical alerts ask for an emergency profile.

use std::time::SystemTime;

use super::{
    follow::{alert_target, target_labels},
    Daemon,
};
use crate::{
    aggregate::{frames_for, BuildOptions, RawProfile, RawSampleKey, Weight},
    alerts::{AlertRecord, BlockedEvidence, Rule, Status, ThreadCpu, Transition},
    detect::{Check, Context, Finding, Severity},
    export::{RuleLabels, SessionView},
    metrics::Metric,
    offcpu::blocked,
    symbolize::{self, MapsCache},
    target::Target,
};

impl Daemon {
    /// Metrics and rules of target `i`, whose process is `process`.
    pub(super) async fn rules(&mut self, i: usize, process: &Target) {
        let now = self.now();
        // TCP receive queues come from the tracker's dump, not from
        // /proc/PID/net/tcp (a walk of the kernel's whole TCP hash).
        let tcp_queue = self
            .engine
            .as_ref()
            .and_then(|e| e.tcp()?.recv_queue(process.pid));
        self.sampler.no_tcp_queues = tcp_queue.is_some();
        let Some(mut sample) = self.sampler.sample(process.pid) else {
            return;
        };
        sample.recv_queue_bytes += tcp_queue.unwrap_or(0);
        let tcp = self.engine.as_ref().and_then(|e| {
            let t = e.tcp()?;
            Some((t.summary(process.pid)?, t.rates(process.pid)?))
        });
        let mut values = vec![
            (Metric::CpuPct, sample.cpu_pct),
            (Metric::RssBytes, sample.rss_bytes),
            (Metric::Threads, sample.threads as f64),
            (Metric::Fds, sample.fds as f64),
            (Metric::CtxSwitchesPerS, sample.ctx_switches_per_s),
            (Metric::RecvQueueBytes, sample.recv_queue_bytes as f64),
        ];
        let mut ctx = Context {
            threads: sample.blocked.clone(),
            ..Context::default()
        };
        if let Some((summary, rates)) = &tcp {
            values.extend([
                (Metric::TcpEstablished, summary.established_now as f64),
                (Metric::TimeWait, summary.time_wait_now as f64),
                (Metric::TimeWaitPerS, rates.time_wait_per_s),
                (Metric::ResetsPerS, rates.resets_per_s),
            ]);
            ctx.top_time_wait_port = summary.top_ports.first().map(|p| (p.local_port, p.time_wait));
        }
        values.extend(self.probe_values(i, process));
        let labels = target_labels(&self.watched[i], process);
        self.exporter.set_target(&labels, &values);
        if let Some(d) = &self.dashboard {
            if !d.has_rules(&labels.target) {
                d.set_rules(&labels.target, rule_lines(&self.watched[i].spec.rules));
            }
            d.tick(&labels.target, process.pid, &process.comm, &values);
        }
        let view = self.engine.as_ref().and_then(|e| {
            let slot = e.slot(process.pid)?;
            Some(SessionView {
                overhead_pct: slot.last_pct,
                hz: slot.hz() as f64,
                lost_samples: e.lost_samples(process.pid),
            })
        });
        self.exporter.set_session(
            &labels,
            view.unwrap_or_default(),
            tcp.as_ref().map_or(0, |(s, _)| s.lost_events),
        );
        let w = &mut self.watched[i];
        w.metrics.record(now, &values);
        w.top_threads = sample.top_threads;
        // Evaluate every rule first, then act (acting needs the daemon).
        let mut transitions = Vec::new();
        for rule in &w.spec.rules {
            let finding = rule.check.evaluate(&w.metrics, &ctx);
            let state = w.states.entry(rule.name.clone()).or_default();
            if let Some(t) = state.step(rule, now, finding) {
                transitions.push((rule.clone(), t, state.last_finding().cloned()));
            }
        }
        for (rule, transition, last) in transitions {
            self.watched[i].last_alert_change = Some(SystemTime::now());
            self.exporter.alert(
                &rule_labels(&labels.target, &rule),
                matches!(transition, Transition::Fire(_)),
            );
            match transition {
                Transition::Fire(f) => self.fire(i, process, &rule, &f).await,
                Transition::Resolve => self.sinks.emit(&resolved(
                    process,
                    &rule,
                    last.as_ref(),
                    format!("{} cleared", rule.name),
                )),
            }
        }
    }

    /// Emits a `resolved` record for every alert of `process` that fires.
    pub(super) fn resolve_all(&mut self, i: usize, process: &Target, why: &str) {
        let w = &self.watched[i];
        for rule in &w.spec.rules {
            let Some(state) = w.states.get(&rule.name).filter(|s| s.is_firing()) else {
                continue;
            };
            let record = resolved(
                process,
                rule,
                state.last_finding(),
                format!("{} cleared: {why}", rule.name),
            );
            self.exporter
                .alert(&rule_labels(&target_labels(w, process).target, rule), false);
            self.sinks.emit(&record);
        }
    }

    /// An alert fires: record it, with evidence, and start the emergency
    /// profile for critical ones.
    async fn fire(&mut self, i: usize, process: &Target, rule: &Rule, f: &Finding) {
        let alert_at = SystemTime::now();
        let mut record = AlertRecord::new(Status::Firing, alert_target(process), rule, f);
        if f.metric == Metric::CpuPct.name() {
            self.busiest_threads(i, &mut record);
        }
        if matches!(rule.check, Check::Stuck { .. }) {
            let pid = process.pid;
            record.blocked = tokio::task::spawn_blocking(move || blocked_evidence(pid))
                .await
                .unwrap_or_default();
        }
        self.sinks.emit(&record);
        if rule.severity < Severity::Critical {
            return;
        }
        if self.watched[i]
            .last_emergency
            .is_some_and(|t| t.elapsed() < self.config.emergency.cooldown)
        {
            tracing::info!(
                pid = process.pid,
                "emergency profile skipped: one ran within the cooldown"
            );
            return;
        }
        self.emergency(i, process, rule, record, alert_at);
    }

    /// Which threads burn the CPU: a spinning accept loop is not a busy
    /// worker pool.
    fn busiest_threads(&self, i: usize, record: &mut AlertRecord) {
        record.top_threads = self.watched[i]
            .top_threads
            .iter()
            .filter(|(_, _, pct)| *pct >= 1.0)
            .take(3)
            .map(|(tid, comm, pct)| ThreadCpu {
                tid: *tid,
                comm: comm.clone(),
                cpu_pct: (pct * 10.0).round() / 10.0,
            })
            .collect();
        if !record.top_threads.is_empty() {
            let threads: Vec<String> = record
                .top_threads
                .iter()
                .map(|t| format!("{} (tid {}) {:.0} %", t.comm, t.tid, t.cpu_pct))
                .collect();
            record.message = format!("{}; busiest threads: {}", record.message, threads.join(", "));
        }
    }
}

/// Metric labels of one rule of a target.
/// The thresholds of `rules` that a chart can draw.
pub(super) fn rule_lines(rules: &[Rule]) -> Vec<crate::dashboard::RuleLine> {
    let line = |r: &Rule, metric: Metric, value: f64, side: &'static str| crate::dashboard::RuleLine {
        rule: r.name.clone(),
        metric: metric.name().to_owned(),
        value,
        side,
        severity: format!("{:?}", r.severity).to_lowercase(),
    };
    let mut lines = Vec::new();
    for r in rules {
        match &r.check {
            Check::Threshold {
                metric, above, below, ..
            } => {
                lines.extend(above.map(|v| line(r, *metric, v, "above")));
                lines.extend(below.map(|v| line(r, *metric, v, "below")));
            }
            Check::TimeWait { above, .. } => lines.push(line(r, Metric::TimeWait, *above, "above")),
            _ => {}
        }
    }
    lines
}

pub(super) fn rule_labels(target: &str, rule: &Rule) -> RuleLabels {
    RuleLabels {
        target: target.to_owned(),
        rule: rule.name.clone(),
        severity: format!("{:?}", rule.severity).to_lowercase(),
    }
}

/// The `resolved` record of `rule`, with the last finding it fired on.
pub(super) fn resolved(
    process: &Target,
    rule: &Rule,
    last: Option<&Finding>,
    message: String,
) -> AlertRecord {
    let none = Finding {
        metric: String::new(),
        value: 0.0,
        threshold: 0.0,
        message: String::new(),
    };
    let mut record = AlertRecord::new(
        Status::Resolved,
        alert_target(process),
        rule,
        last.unwrap_or(&none),
    );
    record.message = message;
    record
}

/// The five longest-blocked threads of `pid`, with their stacks.
fn blocked_evidence(pid: u32) -> Vec<BlockedEvidence> {
    let mut threads = blocked::snapshot(pid, flamewatch_common::DEFAULT_STACK_WINDOW);
    threads.sort_by(|a, b| b.idle_ms.unwrap_or(0.0).total_cmp(&a.idle_ms.unwrap_or(0.0)));
    threads.truncate(5);
    let mut maps = MapsCache::default();
    let _ = maps.capture(pid);
    let mut raw = RawProfile::default();
    let keys: Vec<RawSampleKey> = threads
        .iter()
        .map(|b| RawSampleKey {
            tgid: pid,
            tid: b.tid,
            user: b.user_slot(),
            kernel: b.kernel_slot(),
        })
        .collect();
    for k in &keys {
        raw.add(
            k.clone(),
            Weight {
                samples: 1,
                period_ns: 1,
            },
        );
    }
    let symbols = symbolize::symbolize(&raw, &maps, &[pid]);
    let opts = BuildOptions {
        process_name: String::new(),
        ..BuildOptions::default()
    };
    threads
        .iter()
        .zip(&keys)
        .map(|(b, k)| BlockedEvidence {
            tid: b.tid,
            comm: b.comm.clone(),
            blocked_s: (b.idle_ms.unwrap_or(0.0) / 1e3 * 10.0).round() / 10.0,
            stack: frames_for(k, &symbols, &opts)
                .iter()
                .skip(1)
                .map(|f| f.to_string())
                .collect(),
        })
        .collect()
}

//! `flamewatch watch`: the daemon left running beside production processes.
//!
//! Every interval (1 s) it finds its targets (following restarts), samples
//! their metrics (/proc, and the TCP tracker in the kernel), evaluates their
//! rules, and turns findings into alert records. Critical and emergency
//! alerts start an emergency profile (a stuck target gets an off-CPU one);
//! schedules start baseline profiles; `flamewatch trigger` starts on-demand
//! ones. Profiles are the same sessions as `flamewatch record`, under the
//! same per-target overhead budget, at most `max_sessions` at once.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    str::FromStr as _,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use tokio::{
    sync::{oneshot, watch},
    task::JoinSet,
};
use tracing::{info, warn};

use crate::{
    aggregate::{frames_for, BuildOptions, RawProfile, RawSampleKey, Weight},
    alerts::{
        sinks::Sinks, AlertRecord, AlertState, AlertTarget, BlockedEvidence, ProfileLinks, Rule, Status,
        ThreadCpu, Transition,
    },
    bpf,
    config::{Mode, RecordConfig, TargetConfig, WatchConfig},
    control::{self, Reply},
    detect::{Check, Context, Finding, Severity},
    export::{Exporter, RuleLabels, SessionLabels, TargetLabels},
    metrics::{Metric, ProcSampler, TargetMetrics},
    offcpu::blocked,
    render::{self, flamegraph},
    session::{self, Report, SessionKind},
    symbolize::{self, MapsCache},
    target::{self, Target},
    tcp::{TcpOptions, TcpTracker},
};

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Nothing to watch.
    #[error("nothing to watch: give --process/--pid or targets in the config")]
    NoTargets,
    /// A target is configured without a name or pid.
    #[error("a [[target]] needs `process` or `pid`")]
    BadTarget,
    /// A schedule does not parse.
    #[error("schedule '{cron}' of {target}: {source}")]
    Schedule {
        /// Expression.
        cron: String,
        /// Target.
        target: String,
        /// Cause.
        #[source]
        source: cron::error::Error,
    },
    /// The control socket cannot be opened.
    #[error("control socket {path}: {source}")]
    Control {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What a finished session reports back to the loop.
struct SessionDone {
    target: usize,
    pid: u32,
    kind: SessionKind,
    result: Result<Vec<Report>, String>,
    /// The firing alert that started it (emergencies).
    alert: Option<AlertRecord>,
    /// Where to answer (on-demand sessions).
    reply: Option<oneshot::Sender<Reply>>,
}

/// An emergency profile waiting for a session slot or budget.
struct Deferred {
    /// The firing alert's rule.
    rule: Rule,
    /// Its firing record (the profile record is built from it).
    record: AlertRecord,
    /// Not retried before this (a budget refusal is retried after a pause).
    not_before: Instant,
}

/// Wait before asking again for a budget that refused an emergency profile.
const DEFERRED_RETRY: Duration = Duration::from_secs(5);

/// Rule name of the record saying a target came back with a new pid.
pub const TARGET_RESTARTED: &str = "target_restarted";
/// Rule name of the record saying a target is gone (resolved when it is back).
pub const TARGET_GONE: &str = "target_gone";

/// The pseudo-rule of the daemon's own records about targets.
fn event_rule(name: &str) -> Rule {
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

/// One watched process.
struct Watched {
    spec: TargetConfig,
    /// The live process, when there is one.
    process: Option<Target>,
    metrics: TargetMetrics,
    states: HashMap<String, AlertState>,
    /// The process that went away (reported once as `target_gone`) and
    /// when: its return, however late, is a restart.
    gone: Option<(Target, Instant)>,
    last_emergency: Option<Instant>,
    /// An emergency profile that could not start yet (every session slot
    /// taken, or the shared budget used up): it starts when it can, as long
    /// as its alert still fires.
    deferred: Option<Deferred>,
    schedules: Vec<(cron::Schedule, Duration, u64, DateTime<Utc>)>,
    /// Folded stacks of the latest baseline (for differential flamegraphs).
    baseline: Option<PathBuf>,
    /// The busiest threads at the latest sample: (tid, name, CPU %).
    top_threads: Vec<(u32, String, f64)>,
}

impl Watched {
    /// Finds (or re-finds) the process.
    fn resolve(&self) -> Option<Target> {
        match (&self.spec.process, self.spec.pid) {
            (Some(name), _) => target::find_by_name(name).into_iter().next(),
            (None, Some(pid)) => Target::from_pid(pid).ok().filter(Target::is_alive),
            _ => None,
        }
    }
}

/// The daemon.
pub struct Daemon {
    config: WatchConfig,
    sinks: Sinks,
    watched: Vec<Watched>,
    sampler: ProcSampler,
    tcp: Option<(aya::Ebpf, TcpTracker)>,
    sessions: JoinSet<SessionDone>,
    start: Instant,
    exporter: std::sync::Arc<Exporter>,
    /// The agent's own process, for its CPU and memory.
    self_sampler: ProcSampler,
}

/// A built-in or generic rule set for `spec` when it has none.
fn with_rules(mut spec: TargetConfig) -> TargetConfig {
    if spec.rules.is_empty() {
        let preset = spec.process.as_deref().and_then(crate::config::preset);
        match preset {
            Some(p) => {
                spec.rules = p.rules;
                if spec.schedules.is_empty() {
                    spec.schedules = p.schedules;
                }
            }
            None => spec.rules = crate::config::default_rules(),
        }
    }
    spec
}

impl Daemon {
    /// Prepares the daemon for `config`.
    pub fn new(config: WatchConfig) -> Result<Self, DaemonError> {
        if config.targets.is_empty() {
            return Err(DaemonError::NoTargets);
        }
        let mut watched = Vec::new();
        for spec in config.targets.iter().cloned().map(with_rules) {
            if spec.process.is_none() && spec.pid.is_none() {
                return Err(DaemonError::BadTarget);
            }
            let mut schedules = Vec::new();
            for s in &spec.schedules {
                let parsed = cron::Schedule::from_str(&s.cron).map_err(|source| DaemonError::Schedule {
                    cron: s.cron.clone(),
                    target: spec.describe(),
                    source,
                })?;
                let next = parsed.upcoming(Utc).next().unwrap_or_else(Utc::now);
                schedules.push((parsed, s.duration, s.freq_hz, next));
            }
            watched.push(Watched {
                spec,
                process: None,
                metrics: TargetMetrics::default(),
                states: HashMap::new(),
                gone: None,
                last_emergency: None,
                deferred: None,
                schedules,
                baseline: None,
                top_threads: Vec::new(),
            });
        }
        let sinks = Sinks::new(
            &config.alerts_path(),
            config.webhook.clone(),
            config.alertmanager.clone(),
        )
        .with_rotation(&config.retention);
        Ok(Self {
            config,
            sinks,
            watched,
            sampler: ProcSampler::default(),
            tcp: None,
            sessions: JoinSet::new(),
            start: Instant::now(),
            exporter: std::sync::Arc::new(Exporter::new()),
            self_sampler: ProcSampler::default(),
        })
    }

    /// Runs until `stop` turns true, listening for `flamewatch trigger` on
    /// `socket`.
    pub async fn run(mut self, socket: &Path, mut stop: watch::Receiver<bool>) -> Result<(), DaemonError> {
        std::fs::create_dir_all(&self.config.output).ok();
        if self.config.metrics_addr != "off" {
            // Validated when the configuration was read.
            if let Ok(addr) = self.config.metrics_addr.parse() {
                if let Err(e) = crate::export::serve(addr, self.exporter.clone()).await {
                    warn!("cannot serve metrics on {addr}: {e}");
                }
            }
        }
        let mut control = control::serve(socket).map_err(|source| DaemonError::Control {
            path: socket.display().to_string(),
            source,
        })?;
        // TCP counters for every target, all the time (cheap: a tracepoint on
        // TCP state changes). Without them the TCP rules stay silent.
        self.tcp = match bpf::load(false).map_err(|e| e.to_string()).and_then(|mut ebpf| {
            TcpTracker::new(&mut ebpf, TcpOptions::default())
                .map(|t| (ebpf, t))
                .map_err(|e| e.to_string())
        }) {
            Ok(t) => Some(t),
            Err(e) => {
                warn!("TCP tracking unavailable: {e}");
                None
            }
        };
        info!(
            "watching {} (alerts to {}, profiles to {})",
            self.watched
                .iter()
                .map(|w| w.spec.describe())
                .collect::<Vec<_>>()
                .join(", "),
            self.config.alerts_path().display(),
            self.config.output.display()
        );
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.step(&stop).await,
                Some((req, reply)) = control.recv() => self.on_demand(req, reply, &stop),
                Some(done) = self.sessions.join_next(), if !self.sessions.is_empty() => {
                    if let Ok(done) = done {
                        self.finished(done);
                    }
                }
                _ = stop.changed() => break,
            }
        }
        info!("stopping: waiting for running sessions to write their reports");
        while let Some(done) = self.sessions.join_next().await {
            if let Ok(done) = done {
                self.finished(done);
            }
        }
        if let Some((mut ebpf, tcp)) = self.tcp.take() {
            tcp.detach(&mut ebpf);
        }
        Ok(())
    }

    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// One interval: targets, metrics, rules, schedules.
    async fn step(&mut self, stop: &watch::Receiver<bool>) {
        let now = self.now();
        if let Some((_, tcp)) = self.tcp.as_mut() {
            if let Err(e) = tokio::task::block_in_place(|| tcp.poll()) {
                warn!("TCP tracking: {e}");
            }
        }
        for i in 0..self.watched.len() {
            self.follow(i);
            let Some(process) = self.watched[i].process.clone() else {
                continue;
            };
            let Some(sample) = self.sampler.sample(process.pid) else {
                continue;
            };
            let tcp = self
                .tcp
                .as_ref()
                .and_then(|(_, t)| Some((t.summary(process.pid)?, t.rates(process.pid)?)));
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
            let labels = target_labels(&self.watched[i], &process);
            self.exporter.set_target(&labels, &values);
            let view = session::live().get(&process.pid).copied().unwrap_or_default();
            self.exporter
                .set_session(&labels, view, tcp.as_ref().map_or(0, |(s, _)| s.lost_events));
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
                self.exporter.alert(
                    &rule_labels(&labels.target, &rule),
                    matches!(transition, Transition::Fire(_)),
                );
                match transition {
                    Transition::Fire(f) => self.fire(i, &process, &rule, &f, stop).await,
                    Transition::Resolve => self.sinks.emit(&resolved(
                        &process,
                        &rule,
                        last.as_ref(),
                        format!("{} cleared", rule.name),
                    )),
                }
            }
            // Before the schedules: an emergency takes a freed slot first.
            self.deferred(i, &process, stop);
            self.schedules(i, &process, stop);
        }
        if let Some(me) = self.self_sampler.sample(std::process::id()) {
            let failed = self
                .sinks
                .webhook_stats
                .failed
                .load(std::sync::atomic::Ordering::Relaxed);
            self.exporter.set_agent(me.cpu_pct, me.rss_bytes, failed);
        }
        self.exporter.set_sessions_running(self.sessions.len());
        // The index shows the folder's alerts: rewrite it when they changed.
        render::html::refresh_if_alerts_changed(&self.config.output);
    }

    /// Finds the target's process, says so when it restarted or is gone.
    fn follow(&mut self, i: usize) {
        let w = &mut self.watched[i];
        if w.process.as_ref().is_some_and(Target::is_alive) {
            return;
        }
        let old = w.process.take();
        if let Some(old) = &old {
            self.exporter.remove_target(&target_labels(w, old));
            self.sampler.forget(old.pid);
            if let Some((_, tcp)) = self.tcp.as_mut() {
                tcp.remove_target(old.pid);
            }
            // The old process's firing alerts end with it (Alertmanager
            // would otherwise keep them open); its history is not the
            // next process's.
            self.resolve_all(i, old, "the process is gone");
            let w = &mut self.watched[i];
            w.metrics.clear();
            w.states.clear();
            // An emergency profile of the old process is no longer wanted.
            w.deferred = None;
        }
        let w = &mut self.watched[i];
        let found = w.resolve();
        match (old, found) {
            (old, Some(new)) => {
                if let Some((_, tcp)) = self.tcp.as_mut() {
                    if let Err(e) = tcp.add_target(new.pid) {
                        warn!(pid = new.pid, "TCP tracking of this target failed: {e}");
                    }
                }
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
                w.gone = Some((old, Instant::now()));
            }
            // Still gone (reported once), or never seen yet.
            (None, None) => {}
        }
    }

    /// Emits a `resolved` record for every alert of `process` that fires.
    fn resolve_all(&mut self, i: usize, process: &Target, why: &str) {
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
    async fn fire(
        &mut self,
        i: usize,
        process: &Target,
        rule: &Rule,
        f: &Finding,
        stop: &watch::Receiver<bool>,
    ) {
        let mut record = AlertRecord::new(Status::Firing, alert_target(process), rule, f);
        if f.metric == Metric::CpuPct.name() {
            // Which threads burn it: a spinning accept loop is not a busy
            // worker pool.
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
        let stuck = matches!(rule.check, Check::Stuck { .. });
        if stuck {
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
            info!(
                pid = process.pid,
                "emergency profile skipped: one ran within the cooldown"
            );
            return;
        }
        self.emergency(i, process, rule, record, stop);
    }

    /// Starts the emergency profile of `rule`'s alert, or defers it when
    /// every session slot is taken.
    fn emergency(
        &mut self,
        i: usize,
        process: &Target,
        rule: &Rule,
        record: AlertRecord,
        stop: &watch::Receiver<bool>,
    ) {
        if self.sessions.len() >= self.config.max_sessions {
            info!(
                pid = process.pid,
                "emergency profile of {} deferred: {} sessions already running (max_sessions); \
                 it starts when one ends, if the alert still fires",
                rule.name,
                self.sessions.len()
            );
            self.watched[i].deferred = Some(Deferred {
                rule: rule.clone(),
                record,
                not_before: Instant::now(),
            });
            return;
        }
        let stuck = matches!(rule.check, Check::Stuck { .. });
        let config = RecordConfig {
            freq_hz: self.config.emergency.freq_hz,
            duration: Some(self.config.emergency.duration),
            // Stuck threads do not run: their off-CPU stacks are the story.
            mode: if stuck { Mode::Offcpu } else { Mode::Cpu },
            ..self.session_config(&format!("{}-emergency", sanitize(&process.comm)))
        };
        // The cooldown starts with a session that runs (see `finished`).
        if self.start_session(
            i,
            process,
            SessionKind::Emergency,
            config,
            Some(record),
            None,
            stop,
        ) {
            self.watched[i].last_emergency = Some(Instant::now());
        }
    }

    /// Starts target `i`'s deferred emergency profile once a slot is free,
    /// or drops it when its alert no longer fires.
    fn deferred(&mut self, i: usize, process: &Target, stop: &watch::Receiver<bool>) {
        let w = &mut self.watched[i];
        let Some(d) = w.deferred.as_ref() else { return };
        if !w.states.get(&d.rule.name).is_some_and(AlertState::is_firing) {
            info!(
                pid = process.pid,
                "deferred emergency profile of {} dropped: the alert resolved first", d.rule.name
            );
            w.deferred = None;
            return;
        }
        if Instant::now() < d.not_before || self.sessions.len() >= self.config.max_sessions {
            return;
        }
        let d = w.deferred.take().expect("checked above");
        self.emergency(i, process, &d.rule, d.record, stop);
    }

    fn session_config(&self, label: &str) -> RecordConfig {
        RecordConfig {
            output: self.config.output.clone(),
            label: Some(label.to_owned()),
            max_overhead_pct: self.config.max_overhead_pct,
            formats: self.config.session_formats(),
            ..RecordConfig::default()
        }
    }

    /// Starts a session unless `max_sessions` already run; says whether it did.
    #[allow(clippy::too_many_arguments)]
    fn start_session(
        &mut self,
        i: usize,
        process: &Target,
        kind: SessionKind,
        config: RecordConfig,
        alert: Option<AlertRecord>,
        reply: Option<oneshot::Sender<Reply>>,
        stop: &watch::Receiver<bool>,
    ) -> bool {
        if self.sessions.len() >= self.config.max_sessions {
            let why = format!("{} sessions already running (max_sessions)", self.sessions.len());
            warn!(pid = process.pid, "{} profile not started: {why}", kind.as_str());
            if let Some(reply) = reply {
                let _ = reply.send(Reply {
                    error: Some(why),
                    ..Reply::default()
                });
            }
            return false;
        }
        info!(
            pid = process.pid,
            "{} profile of {}: starting",
            kind.as_str(),
            process.comm
        );
        self.exporter.session_started(&SessionLabels {
            target: target_labels(&self.watched[i], process).target,
            kind: kind.as_str().to_owned(),
        });
        let (target, stop) = (process.clone(), stop.clone());
        let pid = target.pid;
        self.sessions.spawn(async move {
            let result = session::record(&config, vec![target], kind, stop)
                .await
                .map_err(|e| e.to_string());
            SessionDone {
                target: i,
                pid,
                kind,
                result,
                alert,
                reply,
            }
        });
        true
    }

    /// Scheduled baselines that are due.
    fn schedules(&mut self, i: usize, process: &Target, stop: &watch::Receiver<bool>) {
        let now = Utc::now();
        let due: Vec<(Duration, u64)> = self.watched[i]
            .schedules
            .iter_mut()
            .filter(|s| s.3 <= now)
            .map(|s| {
                s.3 =
                    s.0.upcoming(Utc)
                        .next()
                        .unwrap_or(now + chrono::Duration::days(1));
                (s.1, s.2)
            })
            .collect();
        for (duration, freq_hz) in due {
            let config = RecordConfig {
                freq_hz,
                duration: Some(duration),
                ..self.session_config(&format!("{}-baseline", sanitize(&process.comm)))
            };
            self.start_session(i, process, SessionKind::Scheduled, config, None, None, stop);
        }
    }

    /// `flamewatch trigger`.
    fn on_demand(
        &mut self,
        req: control::Request,
        reply: oneshot::Sender<Reply>,
        stop: &watch::Receiver<bool>,
    ) {
        let found = self.watched.iter().position(|w| {
            w.process.as_ref().is_some_and(|p| {
                req.pid == Some(p.pid)
                    || req
                        .process
                        .as_deref()
                        .is_some_and(|n| n == p.comm || w.spec.process.as_deref() == Some(n))
            })
        });
        let Some(i) = found else {
            let what = req
                .process
                .clone()
                .unwrap_or_else(|| format!("pid {}", req.pid.unwrap_or(0)));
            let _ = reply.send(Reply {
                error: Some(format!("{what} is not a running watched target")),
                ..Reply::default()
            });
            return;
        };
        let Some(process) = self.watched[i].process.clone() else {
            return;
        };
        let config = RecordConfig {
            duration: Some(Duration::from_secs_f64(req.duration_s.max(1.0))),
            ..self.session_config(&format!("{}-trigger", sanitize(&process.comm)))
        };
        self.start_session(
            i,
            &process,
            SessionKind::OnDemand,
            config,
            None,
            Some(reply),
            stop,
        );
    }

    /// A session finished: answer, link its files, keep baselines.
    fn finished(&mut self, done: SessionDone) {
        let reports = match done.result {
            Ok(r) => r,
            Err(e) => {
                warn!(pid = done.pid, "{} profile failed: {e}", done.kind.as_str());
                // Refused (no budget left, say): not a profile that counts
                // for the cooldown; it is asked for again after a pause
                // while its alert fires.
                if done.kind == SessionKind::Emergency {
                    let w = &mut self.watched[done.target];
                    w.last_emergency = None;
                    let rule = done
                        .alert
                        .as_ref()
                        .and_then(|a| w.spec.rules.iter().find(|r| r.name == a.rule));
                    if let (Some(rule), Some(record)) = (rule.cloned(), done.alert) {
                        w.deferred = Some(Deferred {
                            rule,
                            record,
                            not_before: Instant::now() + DEFERRED_RETRY,
                        });
                    }
                }
                if let Some(reply) = done.reply {
                    let _ = reply.send(Reply {
                        error: Some(e),
                        ..Reply::default()
                    });
                }
                return;
            }
        };
        let files: Vec<String> = reports.iter().flat_map(|r| r.summary.files.written()).collect();
        let w = &mut self.watched[done.target];
        match done.kind {
            SessionKind::Scheduled => {
                if let Some(r) = reports.first() {
                    w.baseline = Some(PathBuf::from(&r.summary.files.folded));
                }
            }
            SessionKind::Emergency => {
                if let (Some(mut alert), Some(r)) = (done.alert, reports.first()) {
                    // Baselines are on-CPU profiles: an off-CPU emergency
                    // profile (a stuck target) has nothing to be diffed with.
                    let diff_svg = w
                        .baseline
                        .as_deref()
                        .filter(|_| r.summary.mode == "cpu")
                        .and_then(|b| differential(b, &r.summary.files.folded));
                    alert.status = Status::Profile;
                    alert.time = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
                    alert.message = format!("emergency profile of {}: {}", alert.rule, r.summary.files.svg);
                    alert.profile = Some(ProfileLinks {
                        svg: r.summary.files.svg.clone(),
                        json: r.summary.files.json.clone(),
                        diff_svg,
                    });
                    self.sinks.emit(&alert);
                }
            }
            SessionKind::OnDemand => {
                // A profile taken while nothing fires shows the healthy
                // target: as good a baseline as a scheduled one, and newer.
                if let (false, Some(r)) = (w.states.values().any(AlertState::is_firing), reports.first()) {
                    w.baseline = Some(PathBuf::from(&r.summary.files.folded));
                }
            }
        }
        // The session wrote the index already; the differential flamegraph
        // and the profile record came after it.
        render::html::refresh_later(&self.config.output);
        crate::retention::prune_later(
            &self.config.output,
            &self.config.retention,
            &self.config.alerts_path(),
            self.watched
                .iter()
                .filter_map(|w| w.baseline.as_ref().map(|b| b.display().to_string()))
                .collect(),
        );
        if let Some(reply) = done.reply {
            let _ = reply.send(Reply {
                ok: true,
                error: None,
                files,
            });
        }
    }
}

/// Metric labels of one rule of a target.
fn rule_labels(target: &str, rule: &Rule) -> RuleLabels {
    RuleLabels {
        target: target.to_owned(),
        rule: rule.name.clone(),
        severity: format!("{:?}", rule.severity).to_lowercase(),
    }
}

/// The `resolved` record of `rule`, with the last finding it fired on.
fn resolved(process: &Target, rule: &Rule, last: Option<&Finding>, message: String) -> AlertRecord {
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

/// Metric labels of a target: its watched name and pid.
fn target_labels(w: &Watched, t: &Target) -> TargetLabels {
    TargetLabels {
        target: w.spec.process.clone().unwrap_or_else(|| t.comm.clone()),
        pid: t.pid.to_string(),
    }
}

fn alert_target(t: &Target) -> AlertTarget {
    AlertTarget {
        pid: t.pid,
        comm: t.comm.clone(),
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes `<folded stem>.diff.svg`: `after` against the baseline `before`.
fn differential(before: &Path, after: &str) -> Option<String> {
    let b = std::fs::read_to_string(before).ok()?;
    let a = std::fs::read_to_string(after).ok()?;
    let title = flamegraph::Title {
        title: "differential: emergency vs latest baseline".into(),
        // The file name: the baseline sits beside it, and the picture may be
        // shared without the machine's paths.
        subtitle: format!(
            "red grew, blue shrank; baseline {}",
            before.file_name().map_or_else(
                || before.display().to_string(),
                |n| n.to_string_lossy().into_owned()
            )
        ),
        count_name: "samples".into(),
    };
    let svg = flamegraph::render_diff(&b, &a, &title).ok()?;
    let path = PathBuf::from(after.trim_end_matches(".folded").to_owned() + ".diff.svg");
    render::write_file(&path, &svg).ok()?;
    Some(path.display().to_string())
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

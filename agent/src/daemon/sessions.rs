//! Profiles of the daemon, as windows over the engine's flight recorder.
//!
//! A session asks the engine for a higher rate on its target for a while
//! (the boost), and when it ends takes its window from the recorder: an
//! on-demand `trigger --since 5m` is a window of the past and ends at once;
//! an emergency reaches `emergency.pre` back before its alert. Finishing
//! (symbolize, render, write) runs on a blocking thread; at most
//! `max_sessions` sessions collect or finish at once.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use chrono::Utc;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{follow::target_labels, Daemon};
use crate::{
    alerts::{AlertRecord, AlertState, ProfileLinks, Rule, Status},
    config::{Mode, RecordConfig},
    control::{self, Reply},
    detect::Check,
    engine::{Want, WantId},
    export::SessionLabels,
    metrics::Metric,
    render::{self, flamegraph},
    session::{
        finish::{self, Window},
        sanitize, Report, SessionError, SessionKind,
    },
    target::Target,
};

/// Longest healthy stretch of the recorder used as a baseline.
const BASELINE_SPAN: Duration = Duration::from_secs(300);
/// A recorder baseline with fewer samples than this gives way to the latest
/// healthy on-demand or scheduled profile, when there is one.
const MIN_BASELINE_SAMPLES: u64 = 100;
/// Longest a trigger may ask to wait for its target.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// What a finished session reports back to the loop.
pub(super) struct SessionDone {
    target: usize,
    pid: u32,
    kind: SessionKind,
    result: Result<Report, SessionError>,
    /// The firing alert that started it (emergencies).
    alert: Option<AlertRecord>,
    /// Where to answer (on-demand sessions).
    reply: Option<oneshot::Sender<Reply>>,
}

/// An emergency profile waiting for a session slot.
pub(super) struct Deferred {
    /// The firing alert's rule.
    rule: Rule,
    /// Its firing record (the profile record is built from it).
    record: AlertRecord,
    /// When it fired.
    alert_at: SystemTime,
}

/// A trigger for a configured target that is not running yet.
pub(super) struct PendingTrigger {
    req: control::Request,
    reply: oneshot::Sender<Reply>,
    deadline: Instant,
}

/// A session collecting: its window is open until `until`.
pub(super) struct Active {
    target: usize,
    pid: u32,
    kind: SessionKind,
    config: RecordConfig,
    /// When it was asked for (its id and file names).
    started_at: SystemTime,
    /// Start of its window (may be in the past).
    from: SystemTime,
    until: Instant,
    alert_at: Option<SystemTime>,
    /// Its boost of the target's rate.
    want: Option<WantId>,
    alert: Option<AlertRecord>,
    reply: Option<oneshot::Sender<Reply>>,
    /// The healthy part of the recorder before the window (emergencies).
    baseline_from: Option<SystemTime>,
}

/// What a new session is.
struct Start {
    kind: SessionKind,
    config: RecordConfig,
    from: SystemTime,
    duration: Duration,
    alert_at: Option<SystemTime>,
    alert: Option<AlertRecord>,
    reply: Option<oneshot::Sender<Reply>>,
}

fn refuse(reply: Option<oneshot::Sender<Reply>>, why: String) {
    if let Some(reply) = reply {
        let _ = reply.send(Reply {
            error: Some(why),
            ..Reply::default()
        });
    }
}

impl Daemon {
    /// Sessions collecting or finishing.
    pub(super) fn sessions_running(&self) -> usize {
        self.active.len() + self.finishing.len()
    }

    /// The sessions collecting now, for the dashboard.
    pub(super) fn session_views(&self) -> Vec<crate::dashboard::SessionView> {
        let now = Instant::now();
        self.active
            .iter()
            .map(|a| {
                let length = a.config.duration.unwrap_or_default().as_secs_f64().max(1e-3);
                let left = a.until.saturating_duration_since(now).as_secs_f64();
                crate::dashboard::SessionView {
                    target: self.group_target(a.target),
                    pid: a.pid,
                    kind: a.kind.as_str().to_owned(),
                    progress_pct: (100.0 * (1.0 - left / length)).clamp(0.0, 100.0),
                    hz: self
                        .engine
                        .as_ref()
                        .and_then(|e| e.slot(a.pid))
                        .map_or(0.0, |s| s.hz() as f64),
                    left_s: left,
                }
            })
            .collect()
    }

    /// The target name of slot `i`.
    fn group_target(&self, i: usize) -> String {
        let spec = &self.watched[i].spec;
        spec.process.clone().unwrap_or_else(|| {
            self.watched[i]
                .process
                .as_ref()
                .map_or_else(|| spec.describe(), |p| p.comm.clone())
        })
    }

    /// When the next session's window closes.
    pub(super) fn next_end(&self) -> Option<Instant> {
        self.active.iter().map(|a| a.until).min()
    }

    fn session_config(&self, label: &str) -> RecordConfig {
        RecordConfig {
            output: self.config.output.clone(),
            label: Some(label.to_owned()),
            max_overhead_pct: self.config.max_overhead_pct,
            formats: self.config.session_formats(),
            leaf_fixup: self.config.leaf_fixup,
            ..RecordConfig::default()
        }
    }

    /// Starts a session unless `max_sessions` already run; says whether it did.
    fn start(&mut self, i: usize, process: &Target, s: Start) -> bool {
        if self.sessions_running() >= self.config.max_sessions {
            let why = format!(
                "{} sessions already running (max_sessions)",
                self.sessions_running()
            );
            warn!(
                pid = process.pid,
                "{} profile not started: {why}",
                s.kind.as_str()
            );
            refuse(s.reply, why);
            return false;
        }
        let Some(engine) = self.engine.as_mut() else {
            refuse(s.reply, "the engine is not running".into());
            return false;
        };
        if let Some(kind) = s.config.mode.memory() {
            if let Err(e) = engine.want_memory(process.pid, Some(kind)) {
                warn!(
                    pid = process.pid,
                    "{} memory profile not started: {e}",
                    s.kind.as_str()
                );
                refuse(s.reply, e.to_string());
                return false;
            }
        }
        info!(
            pid = process.pid,
            "{} profile of {}: starting",
            s.kind.as_str(),
            process.comm
        );
        self.exporter.session_started(&SessionLabels {
            target: target_labels(&self.watched[i], process).target,
            kind: s.kind.as_str().to_owned(),
        });
        let want = (!s.duration.is_zero()).then(|| {
            engine.want(
                process.pid,
                Want {
                    hz: if s.config.mode.on_cpu() {
                        s.config.freq_hz
                    } else {
                        0
                    },
                    off_cpu: s.config.mode.off_cpu(),
                    thread_names: s.config.writes(crate::config::Format::Pprof),
                },
            )
        });
        let baseline_from = s.alert_at.map(|_| {
            let span_start = s.from.checked_sub(BASELINE_SPAN).unwrap_or(s.from);
            // Healthy: after the last alert transition before this one.
            let w = &self.watched[i];
            w.last_alert_change
                .filter(|t| *t < s.from && *t > span_start)
                .unwrap_or(span_start)
        });
        if let Some(d) = &self.dashboard {
            d.session_event(
                "started",
                &target_labels(&self.watched[i], process).target,
                process.pid,
                s.kind.as_str(),
                &[],
            );
        }
        self.active.push(Active {
            target: i,
            pid: process.pid,
            kind: s.kind,
            config: s.config,
            started_at: SystemTime::now(),
            from: s.from,
            until: Instant::now() + s.duration,
            alert_at: s.alert_at,
            want,
            alert: s.alert,
            reply: s.reply,
            baseline_from,
        });
        true
    }

    /// Ends the sessions whose window has closed (`all`: every session, as
    /// the daemon stops).
    pub(super) fn end_due(&mut self, all: bool) {
        let now = Instant::now();
        let due: Vec<usize> = (0..self.active.len())
            .filter(|&k| all || self.active[k].until <= now)
            .collect();
        self.end(due);
    }

    /// Ends the sessions of `pid` now (its process went away).
    pub(super) fn end_sessions_of(&mut self, pid: u32) {
        let of: Vec<usize> = (0..self.active.len())
            .filter(|&k| self.active[k].pid == pid)
            .collect();
        self.end(of);
    }

    /// Closes the windows of the sessions at `indices`: the engine records
    /// up to now, each window is taken and finished on a blocking thread.
    fn end(&mut self, mut indices: Vec<usize>) {
        if indices.is_empty() {
            return;
        }
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        if let Err(e) = engine.flush() {
            warn!("draining the kernel's aggregates: {e}");
        }
        indices.sort_unstable();
        let to = SystemTime::now();
        for k in indices.into_iter().rev() {
            let a = self.active.remove(k);
            let mut window = Window::take(engine, a.pid, a.from, to, a.config.mode.off_cpu());
            if let Some(id) = a.want {
                engine.unwant(a.pid, id);
            }
            // Memory tracing stays while another session of the pid (an
            // emergency during a scheduled baseline) still records it.
            let others = self
                .active
                .iter()
                .any(|o| o.pid == a.pid && o.config.mode.memory().is_some());
            if a.config.mode.memory().is_some() && !others {
                if let Err(e) = engine.want_memory(a.pid, None) {
                    warn!(pid = a.pid, "ending the memory profile: {e}");
                }
            }
            if a.kind == SessionKind::Slow {
                // Only the samples taken past a budget; a CPU baseline is
                // no baseline for them.
                if let Some(w) = window.as_mut() {
                    crate::session::latency::slow_only(w);
                }
            } else if let (Some(w), Some(bf)) = (window.as_mut(), a.baseline_from) {
                w.baseline = engine.window(a.pid, bf, a.from);
            }
            let Some(mut window) = window else {
                refuse(a.reply, "the target is no longer followed".into());
                continue;
            };
            window.alert_at = a.alert_at;
            window.show_window = true;
            let (target, pid, kind, alert, reply) = (a.target, a.pid, a.kind, a.alert, a.reply);
            let (config, started_at) = (a.config, a.started_at);
            self.finishing.spawn_blocking(move || {
                let spec = finish::Spec {
                    config: &config,
                    kind,
                    started_at,
                };
                let result = finish::finish(window, &spec);
                // Symbolization's memory (debug info, line tables) goes back
                // to the system, not only to the allocator: the daemon's RSS
                // stays flat between sessions.
                // SAFETY: malloc_trim has no preconditions.
                unsafe { libc::malloc_trim(0) };
                SessionDone {
                    target,
                    pid,
                    kind,
                    result,
                    alert,
                    reply,
                }
            });
        }
    }

    /// Starts the emergency profile of `rule`'s alert, or defers it when
    /// every session slot is taken.
    pub(super) fn emergency(
        &mut self,
        i: usize,
        process: &Target,
        rule: &Rule,
        record: AlertRecord,
        alert_at: SystemTime,
    ) {
        if self.sessions_running() >= self.config.max_sessions {
            info!(
                pid = process.pid,
                "emergency profile of {} deferred: {} sessions already running (max_sessions); \
                 it starts when one ends, if the alert still fires",
                rule.name,
                self.sessions_running()
            );
            self.watched[i].deferred = Some(Deferred {
                rule: rule.clone(),
                record,
                alert_at,
            });
            return;
        }
        if slow_rule(rule) && self.has_budget_probe(i) {
            self.slow_emergency(i, process, record, alert_at);
            return;
        }
        let stuck = matches!(rule.check, Check::Stuck { .. });
        let leak = match rule.check {
            Check::MemoryGrowth { profile, .. } => Some(profile.unwrap_or(self.config.emergency.memory_mode)),
            _ => None,
        };
        // Stuck threads do not run: their off-CPU stacks are the story. A
        // leak's story is where its memory comes from.
        let mode = match (stuck, leak) {
            (true, _) => Mode::Offcpu,
            (_, Some(memory)) => memory.mode(),
            _ => Mode::Cpu,
        };
        let config = RecordConfig {
            freq_hz: self.config.emergency.freq_hz,
            duration: Some(self.config.emergency.duration),
            mode,
            ..self.session_config(&format!("{}-emergency", sanitize(&process.comm)))
        };
        let stuck = stuck || leak.is_some();
        // Off-CPU time and memory are traced from now; CPU samples reach back.
        let from = if stuck {
            SystemTime::now()
        } else {
            alert_at
                .checked_sub(self.config.emergency.pre)
                .unwrap_or(alert_at)
        };
        let started = self.start(
            i,
            process,
            Start {
                kind: SessionKind::Emergency,
                config,
                from,
                duration: self.config.emergency.duration,
                alert_at: (!stuck).then_some(alert_at),
                alert: Some(record),
                reply: None,
            },
        );
        // The cooldown starts with a session that runs.
        if started {
            self.watched[i].last_emergency = Some(Instant::now());
        }
    }

    /// A late-call rule's emergency: a slow-call profile (kind `slow`,
    /// `<stem>.slow.svg`), what probed calls did once past their budget,
    /// reaching back `emergency.pre` like a CPU one. A wall profile: the
    /// calls' CPU samples and, from the alert on (off-CPU tracing is not
    /// continuous), the late part of their blocks, so a frame late on a
    /// lock shows the lock.
    fn slow_emergency(&mut self, i: usize, process: &Target, record: AlertRecord, alert_at: SystemTime) {
        let config = crate::session::latency::slow_config(&RecordConfig {
            freq_hz: self.config.emergency.freq_hz,
            duration: Some(self.config.emergency.duration),
            ..self.session_config(&format!("{}-emergency", sanitize(&process.comm)))
        });
        let start = Start {
            kind: SessionKind::Slow,
            config,
            from: alert_at
                .checked_sub(self.config.emergency.pre)
                .unwrap_or(alert_at),
            duration: self.config.emergency.duration,
            alert_at: Some(alert_at),
            alert: Some(record),
            reply: None,
        };
        if self.start(i, process, start) {
            self.watched[i].last_emergency = Some(Instant::now());
        }
    }

    /// Starts target `i`'s deferred emergency profile once a slot is free,
    /// or drops it when its alert no longer fires.
    pub(super) fn deferred(&mut self, i: usize, process: &Target) {
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
        if self.sessions_running() >= self.config.max_sessions {
            return;
        }
        let Some(d) = self.watched[i].deferred.take() else {
            return;
        };
        self.emergency(i, process, &d.rule, d.record, d.alert_at);
    }

    /// Scheduled baselines of group `leader` that are due, each of the
    /// group's busiest process.
    pub(super) fn schedules(&mut self, leader: usize) {
        let Some(i) = self.busiest(self.watched[leader].group) else {
            return;
        };
        let Some(process) = self.watched[i].process.clone() else {
            return;
        };
        let now = Utc::now();
        let due: Vec<(Duration, u64, Option<crate::config::MemoryMode>)> = self.watched[leader]
            .schedules
            .iter_mut()
            .filter(|s| s.3 <= now)
            .map(|s| {
                s.3 =
                    s.0.upcoming(Utc)
                        .next()
                        .unwrap_or(now + chrono::Duration::days(1));
                (s.1, s.2, s.4)
            })
            .collect();
        for (duration, freq_hz, memory) in due {
            let config = RecordConfig {
                freq_hz,
                duration: Some(duration),
                mode: memory.map_or(Mode::Cpu, crate::config::MemoryMode::mode),
                ..self.session_config(&format!("{}-baseline", sanitize(&process.comm)))
            };
            let start = Start {
                kind: SessionKind::Scheduled,
                config,
                from: SystemTime::now(),
                duration,
                alert_at: None,
                alert: None,
                reply: None,
            };
            self.start(i, &process, start);
        }
    }

    /// The running slot a trigger asks for: the one of its pid, or the
    /// busiest process of the target it names.
    fn trigger_slot(&self, req: &control::Request) -> Option<usize> {
        let running = |i: &usize| self.watched[*i].process.is_some() && self.watched[*i].matches(req);
        let by_pid = (0..self.watched.len())
            .filter(running)
            .find(|&i| req.pid.is_some() && self.watched[i].process.as_ref().map(|p| p.pid) == req.pid);
        by_pid.or_else(|| {
            let g = (0..self.watched.len())
                .find(running)
                .map(|i| self.watched[i].group)?;
            self.busiest(g)
        })
    }

    /// Why a trigger's target cannot be profiled now: not running, or its
    /// pid taken by a later process.
    fn not_running(&self, req: &control::Request) -> String {
        let reused = req.pid.and_then(|pid| {
            let w = self
                .watched
                .iter()
                .find(|w| w.spec.pid == Some(pid) && w.pinned_start.is_some())?;
            let now = Target::from_pid(pid).ok()?;
            (Some(now.start_time) != w.pinned_start).then(|| {
                format!(
                    "pid {pid} now belongs to a later process ({}), not the one watched",
                    now.comm
                )
            })
        });
        reused.unwrap_or_else(|| format!("{} is not a running watched target", describe(req)))
    }

    /// `flamewatch trigger`.
    pub(super) fn on_demand(&mut self, req: control::Request, reply: oneshot::Sender<Reply>) {
        let Some(i) = self.trigger_slot(&req) else {
            let configured = self.watched.iter().any(|w| w.matches(&req));
            let wait = Duration::try_from_secs_f64(req.wait_s.unwrap_or(0.0))
                .unwrap_or_default()
                .min(MAX_WAIT);
            if configured && !wait.is_zero() {
                let deadline = Instant::now() + wait;
                self.pending.push(PendingTrigger { req, reply, deadline });
            } else {
                refuse(Some(reply), self.not_running(&req));
            }
            return;
        };
        let Some(process) = self.watched[i].process.clone() else {
            return;
        };
        let freq_hz = req
            .freq_hz
            .unwrap_or(RecordConfig::default().freq_hz)
            .clamp(1, crate::config::MAX_FREQ_HZ);
        let mut config = RecordConfig {
            freq_hz,
            ..self.session_config(&format!("{}-trigger", sanitize(&process.comm)))
        };
        if req.pprof && !config.formats.contains(&crate::config::Format::Pprof) {
            config.formats.push(crate::config::Format::Pprof);
        }
        let now = SystemTime::now();
        let (from, duration) = match req.since_s.and_then(|s| Duration::try_from_secs_f64(s).ok()) {
            // A window of the past: answered at once from the recorder.
            Some(since) => (now.checked_sub(since).unwrap_or(now), Duration::ZERO),
            // Checked by the control layer.
            None => (now, req.duration().unwrap_or(Duration::from_secs(30))),
        };
        // A window the recorder cannot hold would lose its start.
        if duration > self.config.history {
            let why = format!(
                "a {} session is longer than the flight recorder's history ({}); raise `history`",
                humantime::format_duration(duration),
                humantime::format_duration(self.config.history)
            );
            refuse(Some(reply), why);
            return;
        }
        let start = Start {
            kind: SessionKind::OnDemand,
            config: RecordConfig {
                duration: Some(duration),
                ..config
            },
            from,
            duration,
            alert_at: None,
            alert: None,
            reply: Some(reply),
        };
        if self.start(i, &process, start) && duration.is_zero() {
            self.end_due(false);
        }
    }

    /// Triggers waiting for their target: started once it runs, refused
    /// when their wait is over.
    pub(super) fn pending_triggers(&mut self) {
        let now = Instant::now();
        for p in std::mem::take(&mut self.pending) {
            let running = self
                .watched
                .iter()
                .any(|w| w.process.is_some() && w.matches(&p.req));
            if running {
                self.on_demand(p.req, p.reply);
            } else if now >= p.deadline {
                refuse(Some(p.reply), self.not_running(&p.req));
            } else {
                self.pending.push(p);
            }
        }
    }

    /// A session finished: answer, link its files, keep baselines.
    pub(super) fn finished(&mut self, done: SessionDone) {
        let report = match done.result {
            Ok(r) => r,
            Err(e) => {
                warn!(pid = done.pid, "{} profile failed: {e}", done.kind.as_str());
                refuse(done.reply, e.to_string());
                return;
            }
        };
        let files = report.summary.files.written();
        if let Some(d) = &self.dashboard {
            let target = self.group_target(done.target);
            d.session_event("finished", &target, done.pid, done.kind.as_str(), &files);
        }
        let w = &mut self.watched[done.target];
        let firing = w.states.values().any(AlertState::is_firing);
        // Before this profile may become the baseline itself.
        let baseline = w.baseline.as_ref().map(|b| b.display().to_string());
        match done.kind {
            // A profile taken while nothing fires shows the healthy target:
            // as good a baseline as a scheduled one, and newer.
            SessionKind::Scheduled => keep_baseline(w, &report, firing),
            SessionKind::OnDemand if !firing => keep_baseline(w, &report, firing),
            SessionKind::OnDemand => {}
            SessionKind::Emergency | SessionKind::Slow => {
                if let Some(alert) = done.alert {
                    let record = if matches!(report.summary.mode.as_str(), "memory" | "heap") {
                        memory_profile_record(alert, &report, w.memory_baseline.as_ref())
                    } else {
                        profile_record(alert, &report, w.baseline.as_deref())
                    };
                    self.sinks.emit(&record);
                }
            }
        }
        // The differential flamegraph and the profile record came after
        // the session's files.
        render::html::refresh_later(&self.config.output);
        // Baselines stay: pruning must not break a later differential.
        crate::retention::prune_later(
            &self.config.output,
            &self.config.retention,
            &self.config.alerts_path(),
            self.watched
                .iter()
                .flat_map(|w| w.baseline.iter().chain(w.memory_baseline.iter().map(|(_, b)| b)))
                .map(|b| b.display().to_string())
                .collect(),
        );
        if let Some(reply) = done.reply {
            let _ = reply.send(Reply {
                ok: true,
                error: None,
                files,
                baseline,
            });
        }
    }
}

/// Keeps a scheduled or on-demand profile as the target's baseline of its
/// kind: CPU profiles for CPU emergencies (scheduled ones even while an
/// alert fires, as before), memory profiles (growth or heap) for memory
/// ones, only when nothing fires (a profile of the leak is no baseline).
fn keep_baseline(w: &mut super::Watched, report: &Report, firing: bool) {
    let folded = PathBuf::from(&report.summary.files.folded);
    match report.summary.mode.as_str() {
        "cpu" => w.baseline = Some(folded),
        "memory" | "heap" if !firing => w.memory_baseline = Some((report.summary.mode.clone(), folded)),
        _ => {}
    }
}

/// The `profile` record of a memory emergency: its files and the
/// differential against the latest healthy memory profile of the same
/// kind. The flight recorder holds no memory events (memory is traced only
/// while a memory profile runs), so without such a profile there is no
/// differential, and the record says so.
fn memory_profile_record(
    mut alert: AlertRecord,
    report: &Report,
    baseline: Option<&(String, PathBuf)>,
) -> AlertRecord {
    let files = &report.summary.files;
    let same = baseline.filter(|(mode, _)| *mode == report.summary.mode);
    let diff_svg = same.and_then(|(_, b)| differential(b, &files.folded, "bytes"));
    alert.status = Status::Profile;
    alert.time = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    alert.message = match (&diff_svg, same) {
        (Some(_), _) => format!("emergency {} profile of {}: {}", report.summary.mode, alert.rule, files.svg),
        (None, Some(_)) => format!(
            "emergency {} profile of {}: {} (the differential against the healthy one failed)",
            report.summary.mode, alert.rule, files.svg
        ),
        (None, None) => format!(
            "emergency {} profile of {}: {} (no differential: no healthy {} profile of this target was taken)",
            report.summary.mode, alert.rule, files.svg, report.summary.mode
        ),
    };
    alert.profile = Some(ProfileLinks {
        svg: files.svg.clone(),
        json: files.json.clone(),
        diff_svg,
        crash: None,
    });
    alert
}

/// The `profile` record of an emergency: its files and the differential
/// against a baseline — the recorder's healthy minutes before the window
/// when they hold enough samples, else the latest healthy profile.
fn profile_record(mut alert: AlertRecord, report: &Report, file_baseline: Option<&Path>) -> AlertRecord {
    let files = &report.summary.files;
    let recorder = report
        .baseline
        .as_ref()
        .filter(|(_, samples)| *samples >= MIN_BASELINE_SAMPLES || file_baseline.is_none())
        .map(|(path, _)| PathBuf::from(path));
    // Baselines are on-CPU profiles: an off-CPU emergency profile (a stuck
    // target) has nothing to be diffed with.
    let diff_svg = recorder
        .or_else(|| file_baseline.map(Path::to_path_buf))
        .filter(|_| report.summary.mode == "cpu")
        .and_then(|b| differential(&b, &files.folded, "samples"));
    alert.status = Status::Profile;
    alert.time = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    alert.message = format!("emergency profile of {}: {}", alert.rule, files.svg);
    alert.profile = Some(ProfileLinks {
        svg: files.svg.clone(),
        json: files.json.clone(),
        diff_svg,
        crash: None,
    });
    alert
}

/// Whether `rule` watches how late a probed function's calls are: its
/// emergency is a slow-call profile.
fn slow_rule(rule: &Rule) -> bool {
    let late = |m: &Metric| {
        matches!(
            m,
            Metric::LatencyP99Ms | Metric::LatencyMaxMs | Metric::OverBudgetPct
        )
    };
    match &rule.check {
        Check::Threshold { metric, .. } | Check::Zscore { metric, .. } => late(metric),
        _ => false,
    }
}

fn describe(req: &control::Request) -> String {
    req.process
        .clone()
        .unwrap_or_else(|| format!("pid {}", req.pid.unwrap_or(0)))
}

/// Writes `<folded stem>.diff.svg`: `after` against the baseline `before`,
/// normalized to the two profiles' totals (`count_name`: what they count).
fn differential(before: &Path, after: &str, count_name: &str) -> Option<String> {
    let b = std::fs::read_to_string(before).ok()?;
    let a = std::fs::read_to_string(after).ok()?;
    let title = flamegraph::Title {
        title: "differential: emergency vs the healthy baseline".into(),
        // The file name: the baseline sits beside it, and the picture may be
        // shared without the machine's paths.
        subtitle: format!(
            "red grew, blue shrank (normalized to each profile's total); baseline {}",
            before.file_name().map_or_else(
                || before.display().to_string(),
                |n| n.to_string_lossy().into_owned()
            )
        ),
        count_name: count_name.into(),
    };
    let svg = flamegraph::render_diff(&b, &a, &title).ok()?;
    let path = PathBuf::from(after.trim_end_matches(".folded").to_owned() + ".diff.svg");
    render::write_file(&path, &svg).ok()?;
    Some(path.display().to_string())
}

//! `flamewatch watch`: the daemon left running beside production processes.
//!
//! One engine for the daemon's life (the eBPF object loaded once, programs
//! attached once); the daemon is a loop of small parts:
//!
//! - [`follow`]: find the targets (following restarts) → engine add/remove;
//! - the drain tick: the engine records one interval of every target into
//!   its flight recorder (continuous profiling at `continuous_hz`);
//! - [`rules`]: sample metrics, evaluate rules, emit alert records;
//! - [`sessions`]: start, boost and finish profiles (on-demand, scheduled,
//!   emergency) as windows over the recorder, at most `max_sessions` at once;
//! - the control socket, bound after the first discovery pass.

mod crash;
mod follow;
mod probes;
mod rules;
mod sessions;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    str::FromStr as _,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use chrono::{DateTime, Utc};
use tokio::{sync::watch, task::JoinSet};
use tracing::{info, warn};

use crate::{
    alerts::{sinks::Sinks, AlertState},
    config::{TargetConfig, WatchConfig},
    control,
    dashboard::Dashboard,
    engine::{Engine, EngineError, EngineOptions},
    export::Exporter,
    metrics::{ProcSampler, TargetMetrics},
    target::Target,
};

pub use follow::TARGET_RESTARTED;
pub use probes::{PROBE_DUTY_CYCLED, PROBE_REMOVED};
use sessions::{Active, Deferred, PendingTrigger, SessionDone};

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
    /// The control socket cannot be opened (or another daemon holds it).
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// How often the engine drains the kernel into the flight recorders.
const DRAIN: Duration = Duration::from_secs(1);

/// A schedule: when, how long, at what rate, next run.
/// A schedule: when, for how long, at what rate, its next time, and the
/// memory profile it takes instead of a CPU one.
type Schedule = (
    cron::Schedule,
    Duration,
    u64,
    DateTime<Utc>,
    Option<crate::config::MemoryMode>,
);

/// One watched process: a slot of a target group. A configured target is a
/// group of slots, one per process of its name (the first, its leader,
/// always exists and keeps the target's own state: gone, missing, schedules).
struct Watched {
    spec: TargetConfig,
    /// Index of the configured target this slot belongs to.
    group: usize,
    /// The live process, when there is one.
    process: Option<Target>,
    metrics: TargetMetrics,
    states: HashMap<String, AlertState>,
    /// The process that went away (reported once as `target_gone`) and
    /// when: its return, however late, is a restart.
    gone: Option<(Target, Instant)>,
    last_emergency: Option<Instant>,
    /// An emergency profile that could not start yet (every session slot
    /// taken): it starts when it can, as long as its alert still fires.
    deferred: Option<Deferred>,
    schedules: Vec<Schedule>,
    /// Folded stacks of the latest healthy profile (for differentials).
    baseline: Option<PathBuf>,
    /// The latest healthy memory profile: its mode (`memory`, `heap`) and
    /// folded stacks, for memory emergencies' differentials.
    memory_baseline: Option<(String, PathBuf)>,
    /// When an alert of this target last fired or resolved: the recorder is
    /// healthy after that (baselines come from there).
    last_alert_change: Option<SystemTime>,
    /// The busiest threads at the latest sample: (tid, name, CPU %).
    top_threads: Vec<(u32, String, f64)>,
    /// The latency probes attached to its process (`[[target.probe]]`).
    probes: Vec<probes::Attached>,
    /// Leader: a process of the target was found once.
    ever_found: bool,
    /// Leader: `target_missing` was reported (resolved when found).
    missing_reported: bool,
    /// Leader: more processes than [`follow::MAX_PIDS_PER_TARGET`] was said.
    over_limit_reported: bool,
    /// Leader of a pid target: the start time of its process (a later
    /// process reusing the pid is not the target).
    pinned_start: Option<u64>,
}

impl Watched {
    /// The leader slot of configured target `group`.
    fn new(spec: TargetConfig, group: usize, schedules: Vec<Schedule>) -> Self {
        Self {
            spec,
            group,
            process: None,
            metrics: TargetMetrics::default(),
            states: HashMap::new(),
            gone: None,
            last_emergency: None,
            deferred: None,
            schedules,
            baseline: None,
            memory_baseline: None,
            last_alert_change: None,
            top_threads: Vec::new(),
            probes: Vec::new(),
            ever_found: false,
            missing_reported: false,
            over_limit_reported: false,
            pinned_start: None,
        }
    }

    /// A further slot of this leader's group (schedules stay with the leader).
    fn member(&self) -> Self {
        Self::new(self.spec.clone(), self.group, Vec::new())
    }

    /// Every live process of the target, by pid.
    fn resolve(&self) -> Vec<Target> {
        match (&self.spec.process, self.spec.pid) {
            (Some(name), _) => crate::target::find_by_name(name),
            (None, Some(pid)) => Target::from_pid(pid)
                .ok()
                .filter(Target::is_alive)
                .filter(|t| self.pinned_start.is_none_or(|s| s == t.start_time))
                .into_iter()
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether `req` names this target's process.
    fn matches(&self, req: &control::Request) -> bool {
        let by_process = self
            .process
            .as_ref()
            .is_some_and(|p| req.pid == Some(p.pid) || req.process.as_deref().is_some_and(|n| n == p.comm));
        by_process
            || req
                .process
                .as_deref()
                .is_some_and(|n| self.spec.process.as_deref() == Some(n))
            || req.pid.is_some_and(|pid| self.spec.pid == Some(pid))
    }
}

/// The daemon.
pub struct Daemon {
    config: WatchConfig,
    sinks: Sinks,
    watched: Vec<Watched>,
    sampler: ProcSampler,
    engine: Option<Engine>,
    /// Sessions collecting (their window is still open).
    active: Vec<Active>,
    /// Sessions being symbolized and written.
    finishing: JoinSet<SessionDone>,
    /// Triggers for a configured target that is not running yet.
    pending: Vec<PendingTrigger>,
    start: Instant,
    exporter: std::sync::Arc<Exporter>,
    /// The agent's own process, for its CPU and memory.
    self_sampler: ProcSampler,
    /// The live dashboard (served with /metrics), and its profile requests.
    dashboard: Option<Arc<Dashboard>>,
    asks: Option<tokio::sync::mpsc::Receiver<crate::dashboard::ProfileAsk>>,
    dashboard_token: Option<String>,
    /// Crash alerts firing until their target is back.
    open_crashes: crash::OpenCrashes,
}

/// A built-in or generic rule set for `spec` when it has none.
fn with_rules(spec: TargetConfig) -> TargetConfig {
    spec.with_preset()
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
                schedules.push((parsed, s.duration, s.freq_hz, next, s.memory));
            }
            let group = watched.len();
            watched.push(Watched::new(spec, group, schedules));
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
            engine: None,
            active: Vec::new(),
            finishing: JoinSet::new(),
            pending: Vec::new(),
            start: Instant::now(),
            exporter: std::sync::Arc::new(Exporter::new()),
            // Its own TCP queues are nobody's concern (and cost a walk of
            // the kernel's TCP hash to read).
            self_sampler: ProcSampler::without_tcp_queues(),
            dashboard: None,
            asks: None,
            dashboard_token: None,
            open_crashes: crash::OpenCrashes::default(),
        })
    }

    /// The dashboard requires `token` (checked by the caller).
    pub fn with_dashboard_token(mut self, token: Option<String>) -> Self {
        self.dashboard_token = token;
        self
    }

    /// Starts the dashboard: every record and interval goes to it too.
    fn start_dashboard(&mut self) -> Arc<Dashboard> {
        let (d, asks) = Dashboard::new(self.config.output.clone(), self.dashboard_token.clone());
        let d = Arc::new(d);
        self.sinks.dashboard = Some(d.clone());
        self.dashboard = Some(d.clone());
        self.asks = Some(asks);
        d
    }

    fn engine_options(&self) -> EngineOptions {
        let record = crate::config::RecordConfig::default();
        EngineOptions {
            kernel_stacks: record.kernel_stacks,
            stack_window: record.stack_window,
            min_block_ns: record.min_block.as_nanos() as u64,
            unwind: record.unwind,
            budget_pct: self.config.max_overhead_pct,
            // Targets come later: any of them may need stack copies.
            dwarf_ring: true,
            leaf_fixup: self.config.leaf_fixup,
            // A stuck target's emergency profile is an off-CPU one.
            off_cpu: true,
            // Triggers may ask for any rate.
            max_hz: None,
            tcp: true,
            history: self.config.history,
            history_bytes: usize::try_from(self.config.history_max_bytes).unwrap_or(usize::MAX),
            // Emergency memory profiles (issue 16, part 3) size these.
            // A memory_growth alert's emergency is a memory profile (the
            // tables are sized for it at load).
            memory: Some(crate::memory::MemoryOptions::default()),
        }
    }

    /// Runs until `stop` turns true, listening for `flamewatch trigger` on
    /// `socket`.
    pub async fn run(mut self, socket: &Path, mut stop: watch::Receiver<bool>) -> Result<(), DaemonError> {
        if self.config.metrics_addr != "off" {
            // Validated when the configuration was read.
            if let Ok(addr) = self.config.metrics_addr.parse() {
                let dashboard = self.start_dashboard();
                if let Err(e) = crate::export::serve(addr, self.exporter.clone(), Some(dashboard)).await {
                    warn!("cannot serve metrics on {addr}: {e}");
                }
            }
        }
        // The socket's lock first: a second daemon is refused before it
        // loads anything.
        let listener = control::Listener::bind(socket)?;
        let mut engine = Engine::start(self.engine_options())?;
        engine.start_tcp();
        engine.start_crash_capture();
        self.engine = Some(engine);
        // The first discovery pass before serving: a trigger that comes as
        // soon as the socket exists finds its running target.
        self.follow_all();
        let mut control = listener.serve()?;
        info!(
            "watching {} (alerts to {}, profiles to {}; continuous profiling at {} Hz, {} of history)",
            self.config
                .targets
                .iter()
                .map(TargetConfig::describe)
                .collect::<Vec<_>>()
                .join(", "),
            self.config.alerts_path().display(),
            self.config.output.display(),
            self.config.continuous_hz,
            humantime::format_duration(self.config.history),
        );
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain = tokio::time::interval(DRAIN);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_end = self.next_end();
            tokio::select! {
                _ = drain.tick() => self.drain(),
                _ = tick.tick() => self.step().await,
                _ = tokio::time::sleep_until(next_end.unwrap_or_else(far_future).into()), if next_end.is_some() => {
                    self.end_due(false);
                }
                Some((req, reply)) = control.recv() => self.on_demand(req, reply),
                Some((req, reply)) = next_ask(&mut self.asks) => self.on_demand(req, reply),
                Some(done) = self.finishing.join_next(), if !self.finishing.is_empty() => {
                    if let Ok(done) = done {
                        self.finished(done);
                    }
                }
                _ = stop.changed() => break,
            }
        }
        info!("stopping: writing the reports of running sessions");
        self.end_due(true);
        while let Some(done) = self.finishing.join_next().await {
            if let Ok(done) = done {
                self.finished(done);
            }
        }
        if let Some(engine) = self.engine.take() {
            engine.shutdown();
        }
        // Dropping `control` removes the socket, if it is still ours.
        drop(control);
        Ok(())
    }

    /// Whether slot `i` is its group's leader (the first slot).
    fn is_leader(&self, i: usize) -> bool {
        self.watched[..i].iter().all(|w| w.group != self.watched[i].group)
    }

    /// The slot of group `g` whose process used the most CPU at the latest
    /// sample (a pre-fork server's busy worker, not its idle master).
    fn busiest(&self, g: usize) -> Option<usize> {
        let cpu = |i: usize| {
            self.watched[i]
                .metrics
                .get(crate::metrics::Metric::CpuPct)
                .and_then(crate::metrics::Series::last)
                .unwrap_or(0.0)
        };
        self.members(g)
            .into_iter()
            .filter(|&i| self.watched[i].process.is_some())
            .max_by(|&a, &b| cpu(a).total_cmp(&cpu(b)).then(b.cmp(&a)))
    }

    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// The engine records an interval of every target.
    fn drain(&mut self) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        match engine.tick() {
            Ok(gone) => {
                for pid in gone {
                    info!(pid, "target process exited");
                }
            }
            Err(e) => warn!("draining the kernel's aggregates: {e}"),
        }
        self.crashes();
    }

    /// One interval: targets, metrics, rules, schedules.
    async fn step(&mut self) {
        self.follow_all();
        for i in 0..self.watched.len() {
            let Some(process) = self.watched[i].process.clone() else {
                continue;
            };
            self.rules(i, &process).await;
            // Before the schedules: an emergency takes a freed slot first.
            self.deferred(i, &process);
        }
        let leaders: Vec<usize> = (0..self.watched.len()).filter(|&i| self.is_leader(i)).collect();
        for leader in leaders {
            self.schedules(leader);
        }
        self.pending_triggers();
        if let Some(me) = self.self_sampler.sample(std::process::id()) {
            let failed = self
                .sinks
                .webhook_stats
                .failed
                .load(std::sync::atomic::Ordering::Relaxed);
            self.exporter.set_agent(me.cpu_pct, me.rss_bytes, failed);
        }
        self.exporter.set_sessions_running(self.sessions_running());
        if let Some(d) = &self.dashboard {
            d.set_sessions(self.session_views());
        }
        // The index shows the folder's alerts: rewrite it when they changed.
        crate::render::html::refresh_if_alerts_changed(&self.config.output);
    }
}

/// The next profile request of the dashboard (never, without one).
async fn next_ask(
    asks: &mut Option<tokio::sync::mpsc::Receiver<crate::dashboard::ProfileAsk>>,
) -> Option<crate::dashboard::ProfileAsk> {
    match asks {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

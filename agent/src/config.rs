//! The single home of every default. clap reads its defaults from here, and
//! `watch` (later) reads the same structure from TOML.

use std::{path::PathBuf, time::Duration};

use crate::unwind::UnwindMode;

pub mod latency;

pub use latency::LatencyConfig;

/// Settings of one profiling session (`flamewatch record`).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordConfig {
    /// Requested sampling frequency in Hz (a ceiling once the governor runs).
    pub freq_hz: u64,
    /// Session length; `None` runs until Ctrl-C (or until every target exits).
    pub duration: Option<Duration>,
    /// Folder the reports are written to.
    pub output: PathBuf,
    /// Prefix of the report file names; the target's comm when unset.
    pub label: Option<String>,
    /// Add a frame per thread under the process frame.
    pub per_thread: bool,
    /// Record kernel stacks too.
    pub kernel_stacks: bool,
    /// How often the kernel's aggregation maps are drained into userspace.
    pub drain_interval: Duration,
    /// Functions listed in the summary's `top_functions`.
    pub top_functions: usize,
    /// Overhead budget, percent of the target's CPU time.
    pub max_overhead_pct: f64,
    /// How user stacks are unwound.
    pub unwind: UnwindMode,
    /// Bytes of user stack copied per sample in DWARF mode.
    pub stack_window: u32,
    /// Insert the callers frame-pointer walks skip (`--no-leaf-fixup`
    /// turns it off, e.g. to measure its cost).
    pub leaf_fixup: bool,
    /// What to profile: on-CPU samples, off-CPU time, or both (wall).
    pub mode: Mode,
    /// Shortest block recorded off CPU (as bcc offcputime's --min-block-time).
    pub min_block: Duration,
    /// Files written per target (`--format`), in the order given.
    pub formats: Vec<Format>,
    /// Heap mode: mean bytes between two sampled allocations.
    pub heap_sample_bytes: u64,
    /// Heap mode: live allocations older than this are "probably leaked".
    pub leak_age: Duration,
}

impl RecordConfig {
    /// Whether `format` is among the files to write.
    pub fn writes(&self, format: Format) -> bool {
        self.formats.contains(&format)
    }
}

/// A file written per target (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Interactive flamegraph (inferno).
    Svg,
    /// Folded stacks, one line per stack.
    Folded,
    /// The JSON summary.
    Json,
    /// gzipped pprof `profile.proto`, for `go tool pprof` and its kin.
    Pprof,
}

/// What a profile measures (`--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Where the CPU time goes (sampled stacks).
    Cpu,
    /// Where threads wait (blocked time by stack).
    Offcpu,
    /// Both, per thread: what each thread spent its wall-clock time on.
    Wall,
    /// Resident-memory growth by stack (new anonymous pages; brk/mmap).
    Memory,
    /// Live heap allocations by allocating stack (allocator uprobes).
    Heap,
}

impl Mode {
    /// Samples on-CPU stacks.
    pub fn on_cpu(self) -> bool {
        matches!(self, Self::Cpu | Self::Wall)
    }

    /// Traces off-CPU time.
    pub fn off_cpu(self) -> bool {
        matches!(self, Self::Offcpu | Self::Wall)
    }

    /// The memory profile it records, if any.
    pub fn memory(self) -> Option<crate::memory::MemKind> {
        match self {
            Self::Memory => Some(crate::memory::MemKind::Growth),
            Self::Heap => Some(crate::memory::MemKind::Heap),
            _ => None,
        }
    }
}

/// Smallest and largest `--heap-sample-bytes`.
/// 1 samples every allocation (what bcc's memleak traces).
pub const HEAP_SAMPLE_BYTES: std::ops::RangeInclusive<u64> = 1..=(1 << 30);

/// Checks a heap sampling mean (`--heap-sample-bytes`).
pub fn check_heap_sample_bytes(v: u64) -> Result<u64, ConfigError> {
    if HEAP_SAMPLE_BYTES.contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::Invalid {
            what: "heap-sample-bytes".into(),
            value: v.to_string(),
            why: format!(
                "must be between {} and {} bytes",
                HEAP_SAMPLE_BYTES.start(),
                HEAP_SAMPLE_BYTES.end()
            ),
        })
    }
}

impl Default for RecordConfig {
    fn default() -> Self {
        Self {
            freq_hz: 99,
            duration: Some(Duration::from_secs(30)),
            output: PathBuf::from("flamegraphs"),
            label: None,
            per_thread: false,
            kernel_stacks: true,
            drain_interval: Duration::from_secs(1),
            top_functions: 25,
            max_overhead_pct: 5.0,
            unwind: UnwindMode::Auto,
            stack_window: flamewatch_common::DEFAULT_STACK_WINDOW as u32,
            leaf_fixup: true,
            mode: Mode::Cpu,
            min_block: Duration::from_millis(1),
            formats: vec![Format::Svg, Format::Folded, Format::Json],
            heap_sample_bytes: 512 * 1024,
            leak_age: Duration::from_secs(30),
        }
    }
}

/// Highest sampling frequency accepted: the cpu-clock event's period is
/// clamped by the kernel to 10 µs (perf_swevent_set_period), i.e. 100 kHz.
pub const MAX_FREQ_HZ: u64 = 100_000;

/// Settings of TCP tracking (`flamewatch tcp`, and the `tcp` section of
/// `record` summaries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConfig {
    /// How long to watch; `None` runs until Ctrl-C (or every target exits).
    pub duration: Option<Duration>,
    /// How often the table is redrawn (and the kernel's counters read).
    pub refresh: Duration,
    /// Ports listed per target by TIME_WAIT count.
    pub top_ports: usize,
    /// Print every transition and reset of the targets (detail events).
    pub events: bool,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            duration: None,
            refresh: Duration::from_secs(1),
            top_ports: 5,
            events: false,
        }
    }
}

/// Settings of the daemon (`flamewatch watch`), read from TOML.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// Folder of profiles and the alert stream.
    pub output: PathBuf,
    /// Alert records (JSON lines); `<output>/alerts.jsonl` when unset.
    pub alerts: Option<PathBuf>,
    /// URL the alert records are POSTed to.
    pub webhook: Option<String>,
    /// Overhead budget of every session, percent of the target's CPU.
    pub max_overhead_pct: f64,
    /// Profiling sessions at once, all targets together.
    pub max_sessions: usize,
    /// How often metrics are read and rules evaluated.
    #[serde(with = "humantime_serde_opt")]
    pub interval: Duration,
    /// Emergency sessions (started by critical and emergency alerts).
    pub emergency: EmergencyConfig,
    /// Where `flamewatch trigger` finds the daemon.
    pub control_socket: PathBuf,
    /// Prometheus `/metrics` and dashboard address ("off" to disable);
    /// loopback by default.
    pub metrics_addr: String,
    /// File holding the bearer token the dashboard and `/metrics` require;
    /// needed to serve beyond loopback.
    pub dashboard_token: Option<PathBuf>,
    /// Alertmanager base URL, e.g. `http://127.0.0.1:9093`.
    pub alertmanager: Option<String>,
    /// Files written per session, e.g. `["svg", "folded", "json", "pprof"]`.
    /// svg, folded and json are always written: baselines, differential
    /// flamegraphs and alert links are made of them.
    pub formats: Vec<Format>,
    /// Continuous profiling: every target is sampled all the time at this
    /// rate into its flight recorder (0 turns it off). Counts against the
    /// target's budget like any session.
    pub continuous_hz: u64,
    /// How much of the past each target's flight recorder keeps.
    #[serde(with = "humantime_serde_opt")]
    pub history: Duration,
    /// Memory cap of each target's flight recorder, bytes (the oldest
    /// intervals go first).
    pub history_max_bytes: u64,
    /// The processes to watch.
    #[serde(rename = "target")]
    pub targets: Vec<TargetConfig>,
    /// How much of the output folder and alert stream is kept.
    pub retention: RetentionConfig,
    /// The leaf fix-up of frame-pointer stacks (`leaf_fixup = false` turns
    /// it off; see `flamewatch record --no-leaf-fixup`).
    pub leaf_fixup: bool,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            output: RecordConfig::default().output,
            alerts: None,
            webhook: None,
            max_overhead_pct: RecordConfig::default().max_overhead_pct,
            max_sessions: 3,
            interval: Duration::from_secs(1),
            emergency: EmergencyConfig::default(),
            control_socket: PathBuf::from(crate::control::SOCKET),
            metrics_addr: "127.0.0.1:9464".into(),
            dashboard_token: None,
            alertmanager: None,
            formats: RecordConfig::default().formats,
            continuous_hz: 19,
            history: Duration::from_secs(600),
            history_max_bytes: 16 << 20,
            targets: Vec::new(),
            retention: RetentionConfig::default(),
            leaf_fixup: RecordConfig::default().leaf_fixup,
        }
    }
}

impl WatchConfig {
    /// The files each session writes: svg, folded and json (the daemon's
    /// baselines, diffs and alert links need them), then the other
    /// configured formats.
    pub fn session_formats(&self) -> Vec<Format> {
        let mut formats = RecordConfig::default().formats;
        for f in &self.formats {
            if !formats.contains(f) {
                formats.push(*f);
            }
        }
        formats
    }

    /// Where alert records go.
    pub fn alerts_path(&self) -> PathBuf {
        self.alerts
            .clone()
            .unwrap_or_else(|| self.output.join("alerts.jsonl"))
    }
}

/// Emergency profiling.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmergencyConfig {
    /// Session length.
    #[serde(with = "humantime_serde_opt")]
    pub duration: Duration,
    /// Sampling ceiling (still governed by the budget).
    pub freq_hz: u64,
    /// At most one emergency session per target within this time.
    #[serde(with = "humantime_serde_opt")]
    pub cooldown: Duration,
    /// How far before the alert an emergency profile reaches back into the
    /// flight recorder.
    #[serde(with = "humantime_serde_opt")]
    pub pre: Duration,
    /// What a `memory_growth` alert's emergency profile is: `growth` (new
    /// resident pages by stack, cheap) or `heap` (live allocations by
    /// allocating stack, allocator uprobes).
    pub memory_mode: MemoryMode,
}

/// The memory profile of a `memory_growth` emergency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    /// `record --mode memory`.
    #[default]
    Growth,
    /// `record --mode heap`.
    Heap,
}

impl MemoryMode {
    /// The record mode it runs.
    pub fn mode(self) -> Mode {
        match self {
            Self::Growth => Mode::Memory,
            Self::Heap => Mode::Heap,
        }
    }
}

impl Default for EmergencyConfig {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(30),
            freq_hz: 499,
            cooldown: Duration::from_secs(600),
            pre: Duration::from_secs(60),
            memory_mode: MemoryMode::Growth,
        }
    }
}

/// One watched process.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Process name (comm or executable name); followed across restarts.
    #[serde(default)]
    pub process: Option<String>,
    /// Or a pid (not followed: a new process has a new pid).
    #[serde(default)]
    pub pid: Option<u32>,
    /// Rules evaluated every interval.
    #[serde(default, rename = "rule")]
    pub rules: Vec<crate::alerts::Rule>,
    /// Baseline profiles on a schedule.
    #[serde(default, rename = "schedule")]
    pub schedules: Vec<ScheduleConfig>,
    /// Latency probes on its functions (at most
    /// [`latency::MAX_PROBES_PER_TARGET`]), on every process of the target.
    #[serde(default, rename = "probe", skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<latency::ProbeSpec>,
}

impl TargetConfig {
    /// How the target is named in logs.
    pub fn describe(&self) -> String {
        match (&self.process, self.pid) {
            (Some(p), _) => p.clone(),
            (None, Some(pid)) => format!("pid {pid}"),
            (None, None) => "?".into(),
        }
    }
}

/// A scheduled (baseline) profile.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// When, as a cron expression with seconds: `0 */15 * * * *` is every
    /// 15 minutes.
    pub cron: String,
    /// For how long.
    #[serde(with = "humantime_serde_opt", default = "default_schedule_duration")]
    pub duration: Duration,
    /// Sampling ceiling.
    #[serde(default = "default_schedule_freq")]
    pub freq_hz: u64,
    /// A memory profile instead of a CPU one (`growth` or `heap`): the
    /// healthy baseline of memory emergencies' differentials.
    #[serde(default)]
    pub memory: Option<MemoryMode>,
}

fn default_schedule_duration() -> Duration {
    Duration::from_secs(30)
}

fn default_schedule_freq() -> u64 {
    RecordConfig::default().freq_hz
}

/// Durations in TOML as humantime strings (`"30s"`, `"10m"`).
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// What the output folder keeps (`[retention]`): the newest sessions within
/// every limit, and the alert stream rotated at a size. A session is the
/// files sharing a stem (`<stem>.svg`, `.folded`, `.json`, `.pb.gz`,
/// `.diff.svg`); the oldest go first, except the profiles of alerts that
/// still fire.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Sessions kept at most.
    pub max_sessions: usize,
    /// Bytes of session files kept at most.
    pub max_bytes: u64,
    /// Sessions older than this go.
    #[serde(with = "humantime_serde_opt")]
    pub max_age: Duration,
    /// alerts.jsonl is rotated (to alerts.jsonl.1) when it would grow past this.
    pub alerts_max_bytes: u64,
    /// Rotated alert files kept (alerts.jsonl.1 … .N).
    pub alerts_keep: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            max_sessions: 1000,
            max_bytes: 2 << 30,
            max_age: Duration::from_secs(14 * 24 * 3600),
            alerts_max_bytes: 64 << 20,
            alerts_keep: 5,
        }
    }
}

impl RetentionConfig {
    /// Checks that every limit is positive (and the age at most a year).
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_duration("retention.max_age", self.max_age, false)?;
        let counts = [
            ("retention.max_sessions", self.max_sessions as u64),
            ("retention.max_bytes", self.max_bytes),
            ("retention.alerts_max_bytes", self.alerts_max_bytes),
            ("retention.alerts_keep", self.alerts_keep as u64),
        ];
        for (what, value) in counts {
            if value == 0 {
                return Err(ConfigError::Range {
                    what: what.into(),
                    value: "0".into(),
                    range: "positive",
                });
            }
        }
        Ok(())
    }
}

/// Longest duration accepted anywhere (sessions, intervals, cooldowns,
/// ages): a year. Longer ones would overflow the clocks they are added to;
/// `forever` is the way to say "until Ctrl-C".
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Errors of a configuration's values (the TOML file and the flags share them).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A duration that must not be zero is.
    #[error("{what} = {value:?}: must be longer than zero")]
    Zero {
        /// The setting.
        what: String,
        /// Its value as given.
        value: String,
    },
    /// A duration past [`MAX_DURATION`].
    #[error("{what} = {value:?}: longer than the maximum of 365 days")]
    TooLong {
        /// The setting.
        what: String,
        /// Its value as given.
        value: String,
    },
    /// A number out of its range.
    #[error("{what} = {value}: must be {range}")]
    Range {
        /// The setting.
        what: String,
        /// Its value.
        value: String,
        /// The accepted range, in words.
        range: &'static str,
    },
    /// A value that does not parse or make sense (a malformed duration,
    /// percentage, label, address).
    #[error("{what} = {value:?}: {why}")]
    Invalid {
        /// The setting.
        what: String,
        /// Its value as given.
        value: String,
        /// What is wrong, and what would do.
        why: String,
    },
    /// Neither flags nor file name a process.
    #[error("nothing to watch: give --process NAME, --pid PID or a --config with [[target]]s")]
    NoTargets,
}

impl ConfigError {
    /// The setting's key as written in TOML (the last part of its name).
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Zero { what, .. } | Self::TooLong { what, .. } | Self::Range { what, .. } => Some(what),
            Self::Invalid { what, .. } => Some(what),
            Self::NoTargets => None,
        }
        .map(|w| w.rsplit(['.', ' ']).next().unwrap_or(w))
    }
}

/// Errors of loading a `--config` file: each names the file, the line and
/// the key, in one line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, a wrong type.
    #[error("{path}:{line}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// 1-based line of the error.
        line: usize,
        /// toml's message, on one line, with a suggestion for unknown keys.
        message: String,
    },
    /// A value out of its range.
    #[error("{path}:{line}: {source}")]
    Value {
        /// The file.
        path: String,
        /// 1-based line of the key (0 when not found).
        line: usize,
        /// The value's error.
        source: ConfigError,
    },
    /// A flag's value (no file involved).
    #[error(transparent)]
    Flag(#[from] ConfigError),
}

/// Parses and validates a config file's text; `path` names it in errors.
pub fn parse(path: &str, text: &str) -> Result<WatchConfig, LoadError> {
    let config: WatchConfig = toml::from_str(text).map_err(|e| {
        let start = e.span().map_or(0, |s| s.start);
        // An unknown key's span is its table's: point at the key itself.
        let line = unknown_key(e.message())
            .and_then(|k| key_line_from(text, k, start))
            .unwrap_or_else(|| line_of(text, start));
        LoadError::Syntax {
            path: path.into(),
            line,
            message: syntax_message(e.message()),
        }
    })?;
    config.validate().map_err(|source| LoadError::Value {
        path: path.into(),
        line: source.key().map_or(0, |k| key_line(text, k)),
        source,
    })?;
    Ok(config)
}

/// Reads, parses and validates a config file.
pub fn load(path: &std::path::Path) -> Result<WatchConfig, LoadError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&shown, &text)
}

/// 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Line of the first `key = …` (0 when absent: the value is a default or
/// came from a preset).
fn key_line(text: &str, key: &str) -> usize {
    key_line_from(text, key, 0).unwrap_or(0)
}

/// Line of the first `key = …` at or after byte `from`.
fn key_line_from(text: &str, key: &str, from: usize) -> Option<usize> {
    let first = line_of(text, from);
    text.lines()
        .enumerate()
        .skip(first - 1)
        .find(|(_, l)| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|(i, _)| i + 1)
}

/// The key of serde's "unknown field `x`, …".
fn unknown_key(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split('`').next()
}

/// toml's message on one line; for an unknown key, the closest valid one.
fn syntax_message(message: &str) -> String {
    let one = message.split_whitespace().collect::<Vec<_>>().join(" ");
    match suggestion(&one) {
        Some(s) => format!("{one}; did you mean `{s}`?"),
        None => one,
    }
}

/// From "unknown field `x`, expected one of `a`, `b`" (serde's words),
/// the valid key closest to `x`, if close enough to be a typo.
fn suggestion(message: &str) -> Option<String> {
    let key = unknown_key(message)?;
    let expected = message.split_once("expected")?.1;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        // Jaro-Winkler weighs shared prefixes: `freq` is `freq_hz`, not `pre`.
        .map(|cand| (strsim::jaro_winkler(key, cand), cand))
        .filter(|&(score, _)| score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_owned())
}

/// Checks a duration setting: at most [`MAX_DURATION`], and not zero
/// unless `zero_ok`.
pub fn check_duration(what: &str, d: Duration, zero_ok: bool) -> Result<Duration, ConfigError> {
    let value = humantime::format_duration(d).to_string();
    if d.is_zero() && !zero_ok {
        return Err(ConfigError::Zero {
            what: what.into(),
            value,
        });
    }
    if d > MAX_DURATION {
        return Err(ConfigError::TooLong {
            what: what.into(),
            value,
        });
    }
    Ok(d)
}

/// Checks an overhead budget: a percentage in (0, 100].
pub fn check_pct(what: &str, v: f64) -> Result<f64, ConfigError> {
    if v.is_finite() && v > 0.0 && v <= 100.0 {
        return Ok(v);
    }
    Err(ConfigError::Range {
        what: what.into(),
        // Debug: 1e300 stays short (Display writes every digit).
        value: format!("{v:?}"),
        range: "a percentage in (0, 100]",
    })
}

/// Checks a sampling frequency: 1 ..= [`MAX_FREQ_HZ`].
pub fn check_freq(what: &str, hz: u64) -> Result<u64, ConfigError> {
    if hz == 0 || hz > MAX_FREQ_HZ {
        return Err(ConfigError::Range {
            what: what.into(),
            value: hz.to_string(),
            range: "between 1 and 100000 Hz",
        });
    }
    Ok(hz)
}

impl WatchConfig {
    /// Checks every value a TOML file can set (the flags are checked by
    /// clap with the same functions): a zero interval, a zero or endless
    /// session, a zero rate would otherwise fail later, as a panic.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_duration("interval", self.interval, false)?;
        check_duration("emergency.duration", self.emergency.duration, false)?;
        check_duration("emergency.cooldown", self.emergency.cooldown, true)?;
        check_freq("emergency.freq_hz", self.emergency.freq_hz)?;
        check_pct("max_overhead_pct", self.max_overhead_pct)?;
        if self.max_sessions == 0 {
            return Err(ConfigError::Range {
                what: "max_sessions".into(),
                value: "0".into(),
                range: "at least 1",
            });
        }
        if self.interval < MIN_INTERVAL {
            return Err(ConfigError::Range {
                what: "interval".into(),
                value: humantime::format_duration(self.interval).to_string(),
                range: "at least 100ms",
            });
        }
        check_duration("emergency.pre", self.emergency.pre, true)?;
        check_duration("history", self.history, true)?;
        if self.continuous_hz != 0 {
            check_freq("continuous_hz", self.continuous_hz)?;
        }
        if self.history_max_bytes == 0 {
            return Err(ConfigError::Range {
                what: "history_max_bytes".into(),
                value: "0".into(),
                range: "positive",
            });
        }
        check_metrics_addr(&self.metrics_addr)?;
        for (what, url) in [("webhook", &self.webhook), ("alertmanager", &self.alertmanager)] {
            if let Some(url) = url {
                check_url(what, url)?;
            }
        }
        for t in &self.targets {
            t.validate()?;
        }
        self.retention.validate()
    }

    /// The configuration the daemon runs: every target without rules gets
    /// its preset's (or the generic rules), as `watch --check` shows it.
    pub fn effective(&self) -> WatchConfig {
        let mut config = self.clone();
        config.targets = config
            .targets
            .into_iter()
            .map(TargetConfig::with_preset)
            .collect();
        config
    }
}

/// Shortest metrics interval: a tenth of a second (the history holds
/// [`crate::metrics::MAX_POINTS`] points, an hour at that rate).
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// `IP:PORT` or `off`.
pub fn check_metrics_addr(addr: &str) -> Result<(), ConfigError> {
    if addr == "off" || addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        what: "metrics_addr".into(),
        value: addr.into(),
        why: "want IP:PORT or \"off\"".into(),
    })
}

/// An http(s) URL (shown redacted in the error: it may hold credentials).
pub fn check_url(what: &str, text: &str) -> Result<(), ConfigError> {
    match url::Url::parse(text) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(ConfigError::Invalid {
            what: what.into(),
            value: crate::alerts::redact_url(text),
            why: "want an http:// or https:// URL".into(),
        }),
    }
}

impl TargetConfig {
    /// Checks the target: a name or a pid, its rules and schedules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let who = self.describe();
        match (&self.process, self.pid) {
            (None, None) => {
                return Err(ConfigError::Invalid {
                    what: "target".into(),
                    value: who,
                    why: "give exactly one of `process` or `pid`".into(),
                })
            }
            (Some(p), None) if p.is_empty() || p.len() > 255 || p.contains('/') => {
                return Err(ConfigError::Invalid {
                    what: "target.process".into(),
                    value: p.clone(),
                    why: "a process name: 1 to 255 characters, no '/'".into(),
                })
            }
            (None, Some(0)) => {
                return Err(ConfigError::Range {
                    what: "target.pid".into(),
                    value: "0".into(),
                    range: "a pid (at least 1)",
                })
            }
            _ => {}
        }
        for r in &self.rules {
            r.validate(&who)?;
        }
        for s in &self.schedules {
            let what = format!("schedule {:?} of {who}", s.cron);
            if s.cron.parse::<cron::Schedule>().is_err() {
                return Err(ConfigError::Invalid {
                    what: format!("{what}: cron"),
                    value: s.cron.clone(),
                    why: "not a cron expression with seconds, e.g. \"0 */15 * * * *\"".into(),
                });
            }
            check_duration(&format!("{what}: duration"), s.duration, false)?;
            check_freq(&format!("{what}: freq_hz"), s.freq_hz)?;
        }
        self.validate_probes()
    }

    /// At most [`latency::MAX_PROBES_PER_TARGET`] probes, each on a
    /// function written `SYMBOL` or `LIB:SYMBOL`, none twice.
    fn validate_probes(&self) -> Result<(), ConfigError> {
        let n = self.probes.len();
        if n > latency::MAX_PROBES_PER_TARGET {
            return Err(ConfigError::Range {
                what: "target.probe.function".into(),
                value: format!("{n} probes"),
                range: "at most 8 [[target.probe]] per target",
            });
        }
        self.rules_have_probes()?;
        for (k, p) in self.probes.iter().enumerate() {
            p.validate()?;
            if self.probes[..k].iter().any(|q| q.function == p.function) {
                return Err(ConfigError::Invalid {
                    what: "target.probe.function".into(),
                    value: p.function.clone(),
                    why: "probed twice in one target".into(),
                });
            }
        }
        Ok(())
    }

    /// A rule on a probe metric needs a probe (and `over_budget_pct` the
    /// first probe's budget): it would never fire otherwise. Presets are
    /// merged later, with their probes, so a target's own rules are checked.
    fn rules_have_probes(&self) -> Result<(), ConfigError> {
        use crate::{detect::Check, metrics::Metric};
        let budget = self.probes.first().is_some_and(|p| p.budget.is_some());
        for r in &self.rules {
            let metric = match &r.check {
                Check::Threshold { metric, .. } | Check::Zscore { metric, .. } => *metric,
                _ => continue,
            };
            let needs = match metric {
                Metric::OverBudgetPct => !budget,
                Metric::LatencyP50Ms | Metric::LatencyP99Ms | Metric::LatencyMaxMs | Metric::CallsPerS => {
                    self.probes.is_empty()
                }
                _ => false,
            };
            if needs {
                return Err(ConfigError::Invalid {
                    what: format!("rule {:?} of {}: metric", r.name, self.describe()),
                    value: metric.name().into(),
                    why: "read from the target's first [[target.probe]] (over_budget_pct: one with a budget); add one"
                        .into(),
                });
            }
        }
        Ok(())
    }

    /// The target with its preset's rules (and schedules) when it has no
    /// rules of its own; the generic rules without a preset.
    pub fn with_preset(mut self) -> TargetConfig {
        if self.rules.is_empty() {
            match self.process.as_deref().and_then(preset) {
                Some(p) => {
                    self.rules = p.rules;
                    if self.schedules.is_empty() {
                        self.schedules = p.schedules;
                    }
                    // The preset's rules read its probes' metrics.
                    if self.probes.is_empty() {
                        self.probes = p.probes;
                    }
                }
                None => self.rules = default_rules(),
            }
        }
        self
    }
}

/// Checks a time in seconds (rules' `for_s`, `window_s`, `persist_s` …):
/// finite, at least 0, at most [`MAX_DURATION`].
pub fn check_seconds(what: &str, v: f64) -> Result<f64, ConfigError> {
    check_range(
        what,
        v,
        0.0,
        MAX_DURATION.as_secs_f64(),
        "seconds in [0, 31536000]",
    )
}

/// Checks a number setting: finite and within `lo ..= hi`.
pub fn check_range(what: &str, v: f64, lo: f64, hi: f64, range: &'static str) -> Result<f64, ConfigError> {
    if v.is_finite() && v >= lo && v <= hi {
        return Ok(v);
    }
    Err(ConfigError::Range {
        what: what.into(),
        // Debug: 1e300 stays short (Display writes every digit).
        value: format!("{v:?}"),
        range,
    })
}

/// Built-in presets, by process name (the files in configs/).
pub const PRESETS: &[(&str, &str)] = &[
    ("logcaster", include_str!("../../configs/logcaster.toml")),
    ("game-server", include_str!("../../configs/game-server.toml")),
];

/// Rules for a process without a preset: the generic anomalies.
pub fn default_rules() -> Vec<crate::alerts::Rule> {
    toml::from_str::<WatchConfig>(include_str!("../../configs/default.toml"))
        .expect("configs/default.toml is valid (tested)")
        .targets
        .remove(0)
        .rules
}

/// The preset of `name`, if there is one: its target section.
pub fn preset(name: &str) -> Option<TargetConfig> {
    let text = PRESETS.iter().find(|(n, _)| *n == name)?.1;
    let config: WatchConfig = toml::from_str(text).expect("presets are valid (tested)");
    config.targets.into_iter().next()
}

#[cfg(test)]
mod watch_tests {
    use super::*;

    /// Test that the presets and the default rules parse, each with rules.
    #[test]
    fn presets_parse() {
        for (name, _) in PRESETS {
            let t = preset(name).expect("preset");
            assert_eq!(t.process.as_deref(), Some(*name));
            assert!(t.rules.len() >= 3, "{name}");
            assert!(!t.schedules.is_empty());
            for s in &t.schedules {
                assert!(s.cron.parse::<cron::Schedule>().is_ok(), "{}", s.cron);
            }
        }
        assert!(default_rules().len() >= 3);
    }

    /// Test that a config with unknown keys is refused (typos are errors).
    #[test]
    fn unknown_keys_refused() {
        assert!(toml::from_str::<WatchConfig>("outptu = 'x'").is_err());
        let c: WatchConfig = toml::from_str("interval = '2s'\n[emergency]\nduration = '5s'").unwrap();
        assert_eq!(c.interval, Duration::from_secs(2));
        assert_eq!(c.emergency.duration, Duration::from_secs(5));
        assert_eq!(c.emergency.freq_hz, 499);
    }

    fn load_err(text: &str) -> String {
        let e = parse("c.toml", text).expect_err(text).to_string();
        assert!(!e.contains('\n'), "{e}");
        e
    }

    const RULE: &str =
        "[[target]]\nprocess = \"x\"\n[[target.rule]]\nname = \"hot\"\nseverity = \"warning\"\n";

    /// Test that unknown keys, and keys of another rule kind, are refused
    /// naming the file, the line and the key, with the closest valid key.
    #[test]
    fn unknown_keys_name_line_and_suggest() {
        let e = load_err("max_sessions = 2\nintervl = \"5s\"\n");
        assert!(
            e.starts_with("c.toml:2: unknown field `intervl`") && e.ends_with("did you mean `interval`?"),
            "{e}"
        );
        let e = load_err(&format!(
            "{RULE}kind = \"threshold\"\nmetric = \"cpu_pct\"\nabove = 1\nsigma = 3\n"
        ));
        assert!(
            e.starts_with("c.toml:9: unknown field `sigma`") && e.contains("`for_s`"),
            "{e}"
        );
        let e = load_err(&format!(
            "{RULE}kind = \"threshold\"\nmetric = \"cpu_pct\"\nabove = 1\nfor = 3\n"
        ));
        assert!(e.contains("did you mean `for_s`?"), "{e}");
        let e = load_err("[emergency]\nfreq = 3\n");
        assert!(
            e.starts_with("c.toml:2:") && e.contains("did you mean `freq_hz`?"),
            "{e}"
        );
        let e = load_err("interval = \"5s\"\ninterval = \"6s\"\n");
        assert!(e.starts_with("c.toml:2:"), "{e}");
    }

    /// Test that `[[target.probe]]` loads a function and a fractional
    /// budget, and refuses a malformed function, a bad or zero budget, an
    /// unknown key, the same function twice, more than 8 probes, and a rule
    /// on a probe metric without the probe, each in one line with the file,
    /// the line and the key.
    #[test]
    fn target_probes_checked() {
        let t = "[[target]]\nprocess = \"x\"\n";
        let probe = |body: &str| format!("[[target.probe]]\n{body}\n");
        let ok = parse(
            "c.toml",
            &format!("{t}{}", probe("function = \"libc:malloc\"\nbudget = \"16.7ms\"")),
        )
        .unwrap();
        let p = &ok.targets[0].probes[0];
        assert_eq!(p.function, "libc:malloc");
        assert_eq!(p.budget.unwrap().as_micros(), 16_700);
        let text = toml::to_string(&ok).unwrap();
        assert_eq!(parse("x", &text).unwrap(), ok, "{text}");
        let cases = [
            (
                probe("function = \"a:\""),
                "c.toml:4: target.probe.function = \"a:\"",
            ),
            (probe("function = \"f\"\nbudget = \"soon\""), "c.toml:5:"),
            (probe("function = \"f\"\nbudget = \"0ms\""), "c.toml:5:"),
            (probe("function = \"f\"\nbudget = \"2h\""), "c.toml:5:"),
            (
                probe("function = \"f\"\nbudgt = \"2ms\""),
                "c.toml:5: unknown field `budgt`",
            ),
            (probe("budget = \"2ms\""), "c.toml:3: missing field `function`"),
            (
                probe("function = \"f\"").repeat(2),
                "c.toml:4: target.probe.function = \"f\": probed twice",
            ),
        ];
        for (body, want) in cases {
            let e = load_err(&format!("{t}{body}"));
            assert!(e.starts_with(want), "{e} (want {want})");
        }
        let rule = "[[target.rule]]\nname = \"late\"\nseverity = \"warning\"\nkind = \"threshold\"\n";
        let e = load_err(&format!("{t}{rule}metric = \"latency_p99_ms\"\nabove = 5\n"));
        assert!(
            e.starts_with("c.toml:7: rule \"late\" of x: metric = \"latency_p99_ms\""),
            "{e}"
        );
        let unbudgeted = probe("function = \"f\"");
        let e = load_err(&format!(
            "{t}{unbudgeted}{rule}metric = \"over_budget_pct\"\nabove = 5\n"
        ));
        assert!(e.starts_with("c.toml:9:") && e.contains("over_budget_pct"), "{e}");
        parse(
            "c.toml",
            &format!("{t}{unbudgeted}{rule}metric = \"calls_per_s\"\nabove = 5\n"),
        )
        .unwrap();
        let nine: String = (0..9).map(|k| probe(&format!("function = \"f{k}\""))).collect();
        let e = load_err(&format!("{t}{nine}"));
        assert!(e.starts_with("c.toml:4:") && e.contains("at most 8"), "{e}");
    }

    /// Test that values out of range are refused at load naming line and
    /// key: max_sessions = 0, max_overhead_pct -3 and 500, for_s = -4,
    /// NaN, a rule window past the history, a bad cron, a bad URL.
    #[test]
    fn ranges_checked_at_load() {
        let rule = |body: &str| format!("{RULE}{body}");
        let cases = [
            ("max_sessions = 0".to_owned(), "c.toml:1: max_sessions = 0"),
            (
                "max_overhead_pct = -3.0".into(),
                "c.toml:1: max_overhead_pct = -3",
            ),
            (
                "max_overhead_pct = 500.0".into(),
                "c.toml:1: max_overhead_pct = 500",
            ),
            ("max_overhead_pct = nan".into(), "max_overhead_pct = NaN"),
            ("interval = \"10ms\"".into(), "c.toml:1: interval = 10ms"),
            ("continuous_hz = 1000000".into(), "continuous_hz"),
            ("metrics_addr = \"localhost\"".into(), "c.toml:1: metrics_addr"),
            ("webhook = \"ftp://u:pw@h/\"".into(), "webhook = \"ftp://***@h/\""),
            (
                rule("kind = \"threshold\"\nmetric = \"cpu_pct\"\nabove = 1\nfor_s = -4"),
                "c.toml:9: rule \"hot\" of x: for_s = -4",
            ),
            (
                rule("kind = \"threshold\"\nmetric = \"cpu_pct\"\nfor_s = 4"),
                "needs `above` or `below`",
            ),
            (
                rule("kind = \"zscore\"\nmetric = \"fds\"\nwindow_s = 7200"),
                "c.toml:8: rule \"hot\" of x: window_s = 7200",
            ),
            (
                rule("kind = \"zscore\"\nmetric = \"fds\"\nsigma = 0"),
                "sigma = 0",
            ),
            (
                rule("persist_s = -1.0\nkind = \"time_wait\""),
                "c.toml:6: rule \"hot\" of x: persist_s = -1",
            ),
            (rule("kind = \"memory_growth\"\nmin_r2 = 2"), "min_r2 = 2"),
            ("[[target]]\npid = 0".into(), "target.pid = 0"),
            ("[[target]]\n".into(), "exactly one of `process` or `pid`"),
            (
                "[[target]]\nprocess = \"x\"\n[[target.schedule]]\ncron = \"often\"".into(),
                "cron",
            ),
        ];
        for (text, want) in cases {
            let e = load_err(&text);
            assert!(e.contains(want), "{text}:\n  {e}\n  wants {want}");
        }
    }

    /// Test that the effective config (presets merged) prints as TOML that
    /// loads back to itself.
    #[test]
    fn effective_config_round_trips() {
        let mut c = WatchConfig::default();
        c.targets.push(TargetConfig {
            process: Some("logcaster".into()),
            pid: None,
            rules: Vec::new(),
            schedules: Vec::new(),
            probes: Vec::new(),
        });
        let e = c.effective();
        assert!(!e.targets[0].rules.is_empty() && !e.targets[0].schedules.is_empty());
        let text = toml::to_string(&e).unwrap();
        assert_eq!(parse("x", &text).unwrap(), e);
    }

    /// Test that `[retention]` parses over its defaults, and that zero
    /// limits are refused.
    #[test]
    fn retention_section() {
        let d = RetentionConfig::default();
        assert_eq!(WatchConfig::default().retention, d);
        assert_eq!((d.max_sessions, d.max_bytes, d.alerts_keep), (1000, 2 << 30, 5));
        assert_eq!(d.max_age, Duration::from_secs(14 * 86400));
        let c: WatchConfig = toml::from_str("[retention]\nmax_sessions = 10\nmax_age = '2d'").unwrap();
        assert_eq!(c.retention.max_sessions, 10);
        assert_eq!(c.retention.max_age, Duration::from_secs(2 * 86400));
        assert_eq!(c.retention.max_bytes, d.max_bytes);
        c.validate().unwrap();
        for bad in [
            "max_sessions = 0",
            "max_bytes = 0",
            "max_age = '0s'",
            "alerts_keep = 0",
            "alerts_max_bytes = 0",
        ] {
            let c: WatchConfig = toml::from_str(&format!("[retention]\n{bad}")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("retention."), "{bad}: {err}");
        }
        assert!(toml::from_str::<WatchConfig>("[retention]\nmax_session = 1").is_err());
    }

    /// Test that the leaf fix-up is on by default and `leaf_fixup = false`
    /// turns it off in TOML.
    #[test]
    fn leaf_fixup_key() {
        assert!(WatchConfig::default().leaf_fixup && RecordConfig::default().leaf_fixup);
        let c: WatchConfig = toml::from_str("leaf_fixup = false").unwrap();
        assert!(!c.leaf_fixup);
        c.validate().unwrap();
        assert!(toml::from_str::<WatchConfig>("leaf_fixup = 3").is_err());
    }

    /// Test that the watch config's `formats` add to the svg, folded and
    /// json every daemon session writes, and that unknown formats are refused.
    #[test]
    fn watch_formats() {
        assert_eq!(
            WatchConfig::default().session_formats(),
            RecordConfig::default().formats
        );
        let c: WatchConfig = toml::from_str("formats = ['pprof', 'json']").unwrap();
        assert_eq!(
            c.session_formats(),
            [Format::Svg, Format::Folded, Format::Json, Format::Pprof]
        );
        assert!(toml::from_str::<WatchConfig>("formats = ['png']").is_err());
    }
}

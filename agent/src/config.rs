//! The single home of every default. clap reads its defaults from here, and
//! `watch` (later) reads the same structure from TOML.

use std::{path::PathBuf, time::Duration};

use crate::unwind::UnwindMode;

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
    /// What to profile: on-CPU samples, off-CPU time, or both (wall).
    pub mode: Mode,
    /// Shortest block recorded off CPU (as bcc offcputime's --min-block-time).
    pub min_block: Duration,
    /// Files written per target (`--format`), in the order given.
    pub formats: Vec<Format>,
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
}

impl Mode {
    /// Samples on-CPU stacks.
    pub fn on_cpu(self) -> bool {
        self != Self::Offcpu
    }

    /// Traces off-CPU time.
    pub fn off_cpu(self) -> bool {
        self != Self::Cpu
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
            mode: Mode::Cpu,
            min_block: Duration::from_millis(1),
            formats: vec![Format::Svg, Format::Folded, Format::Json],
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
    /// Prometheus `/metrics` address ("off" to disable); loopback by default.
    pub metrics_addr: String,
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
            alertmanager: None,
            formats: RecordConfig::default().formats,
            continuous_hz: 19,
            history: Duration::from_secs(600),
            history_max_bytes: 16 << 20,
            targets: Vec::new(),
            retention: RetentionConfig::default(),
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
}

impl Default for EmergencyConfig {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(30),
            freq_hz: 499,
            cooldown: Duration::from_secs(600),
            pre: Duration::from_secs(60),
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
        if !(self.max_overhead_pct > 0.0 && self.max_overhead_pct <= 100.0) {
            return Err(ConfigError::Range {
                what: "max_overhead_pct".into(),
                value: self.max_overhead_pct.to_string(),
                range: "in (0, 100]",
            });
        }
        if self.max_sessions == 0 {
            return Err(ConfigError::Range {
                what: "max_sessions".into(),
                value: "0".into(),
                range: "at least 1",
            });
        }
        for t in &self.targets {
            for s in &t.schedules {
                let what = format!("schedule {:?} of {}", s.cron, t.describe());
                check_duration(&format!("{what}: duration"), s.duration, false)?;
                check_freq(&format!("{what}: freq_hz"), s.freq_hz)?;
            }
        }
        self.retention.validate()
    }
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

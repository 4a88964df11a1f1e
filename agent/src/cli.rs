//! Command line. Defaults come from [`RecordConfig::default`]; clap only
//! parses and validates.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

pub mod latency;

pub use latency::LatencyArgs;

use crate::{
    config::{
        check_duration, check_pct, ConfigError, Format, LoadError, Mode, RecordConfig, TargetConfig,
        TcpConfig, WatchConfig, MAX_FREQ_HZ,
    },
    unwind::UnwindMode,
};

/// flamewatch: an eBPF profiler agent for production processes.
#[derive(Debug, Parser)]
#[command(name = "flamewatch", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Profile running processes' CPU stacks into a flamegraph.
    Record(RecordArgs),
    /// Watch running processes' TCP connections live: opened, closed,
    /// resets, TIME_WAIT entered and now, by port.
    Tcp(TcpArgs),
    /// Run the agent: watch processes, raise alerts, profile on schedules
    /// and emergencies.
    Watch(WatchArgs),
    /// Ask a running `flamewatch watch` for a profile now.
    Trigger(TriggerArgs),
    /// Report what this kernel supports (BTF, ring buffer, stack maps,
    /// uprobes, the tracepoints, each program through the verifier) and
    /// what flamewatch does without what it lacks.
    Doctor,
    /// Time every call of one function of a running process (uprobes at
    /// entry and return): histogram, quantiles, calls over a budget, and a
    /// flamegraph of what the calls did once they were late.
    Latency(LatencyArgs),
}

/// `flamewatch watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// TOML configuration (see configs/ for the presets).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A process to watch by name (repeatable); followed across restarts.
    /// LogCaster and the game server have built-in presets.
    #[arg(long = "process", value_name = "NAME")]
    pub processes: Vec<String>,
    /// A process to watch by pid (repeatable).
    #[arg(long = "pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,
    /// Folder for profiles and alerts (default: from the config, or flamegraphs/).
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Alert records, JSON lines (default: <output>/alerts.jsonl).
    #[arg(long, value_name = "FILE")]
    pub alerts: Option<PathBuf>,
    /// POST every alert record to this URL.
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// Overhead budget of profiling sessions, percent of the target's CPU.
    #[arg(long, value_name = "PCT", value_parser = parse_pct)]
    pub max_overhead: Option<f64>,
    /// Control socket for `flamewatch trigger` (root only).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Serve Prometheus metrics on /metrics at this address ("off": don't;
    /// default 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// File with the bearer token the dashboard and /metrics require
    /// (needed to serve beyond loopback).
    #[arg(long, value_name = "FILE")]
    pub dashboard_token: Option<PathBuf>,
    /// Send alerts to this Alertmanager (base URL).
    #[arg(long, value_name = "URL")]
    pub alertmanager: Option<String>,
    /// Files written per session, e.g. `svg,folded,json,pprof` (svg, folded
    /// and json are always written: baselines, differential flamegraphs and
    /// alert links are made of them). Default: from the config.
    #[arg(long = "format", value_name = "FORMATS", value_enum, value_delimiter = ',')]
    pub formats: Vec<Format>,
    /// Validate the configuration and print the effective one (presets
    /// merged) as TOML, without starting anything.
    #[arg(long)]
    pub check: bool,
}

impl WatchArgs {
    /// The configuration: the file (if any, validated), then the flags
    /// over it, validated again with the same checks.
    pub fn to_config(&self) -> Result<WatchConfig, LoadError> {
        let mut config = match &self.config {
            Some(path) => crate::config::load(path)?,
            None => WatchConfig::default(),
        };
        let target = |process: Option<String>, pid: Option<u32>| TargetConfig {
            process,
            pid,
            rules: Vec::new(),
            schedules: Vec::new(),
            probes: Vec::new(),
        };
        config
            .targets
            .extend(self.processes.iter().map(|p| target(Some(p.clone()), None)));
        config
            .targets
            .extend(self.pids.iter().map(|&p| target(None, Some(p))));
        self.apply_flags(&mut config);
        config.validate()?;
        if config.targets.is_empty() {
            return Err(ConfigError::NoTargets.into());
        }
        Ok(config)
    }

    /// The flags given, over `config`.
    fn apply_flags(&self, config: &mut WatchConfig) {
        if let Some(o) = &self.output {
            config.output = o.clone();
        }
        if let Some(a) = &self.alerts {
            config.alerts = Some(a.clone());
        }
        if let Some(w) = &self.webhook {
            config.webhook = Some(w.clone());
        }
        if let Some(m) = self.max_overhead {
            config.max_overhead_pct = m;
        }
        if let Some(c) = &self.control_socket {
            config.control_socket = c.clone();
        }
        if let Some(m) = &self.metrics_addr {
            config.metrics_addr = m.clone();
        }
        if let Some(a) = &self.alertmanager {
            config.alertmanager = Some(a.clone());
        }
        if let Some(t) = &self.dashboard_token {
            config.dashboard_token = Some(t.clone());
        }
        if !self.formats.is_empty() {
            config.formats = dedup(&self.formats);
        }
    }
}

/// `flamewatch trigger`.
#[derive(Debug, Args)]
pub struct TriggerArgs {
    #[command(flatten)]
    pub targets: TargetArgs,
    /// Session length.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration,
          default_value_t = DurationArg(RecordConfig::default().duration))]
    pub duration: DurationArg,
    /// Instead of a new session: the last DURATION of the daemon's flight
    /// recorder, answered at once (e.g. `--since 5m`).
    #[arg(long, value_name = "DURATION", value_parser = parse_since, conflicts_with = "duration")]
    pub since: Option<std::time::Duration>,
    /// Sampling rate of the session (a ceiling: the governor keeps the budget).
    #[arg(long, value_name = "HZ", value_parser = clap::value_parser!(u64).range(1..=crate::config::MAX_FREQ_HZ))]
    pub freq: Option<u64>,
    /// How long to wait for a configured target that is still starting.
    #[arg(long, value_name = "DURATION", value_parser = parse_since, default_value = "5s")]
    pub wait: std::time::Duration,
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value_os_t = WatchConfig::default().control_socket)]
    pub control_socket: PathBuf,
}

/// A bounded duration (`--since`, `--wait`): at most a day.
fn parse_since(text: &str) -> Result<std::time::Duration, ConfigError> {
    let d = humantime::parse_duration(text).map_err(|e| invalid("duration", text, e))?;
    if d > std::time::Duration::from_secs(86_400) {
        return Err(ConfigError::Range {
            what: "duration".into(),
            value: text.into(),
            range: "at most 24h",
        });
    }
    Ok(d)
}

/// A value that does not parse, with what would.
fn invalid(what: &str, text: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        what: what.into(),
        value: text.into(),
        why: why.to_string(),
    }
}

/// Which processes to attach to.
#[derive(Debug, Args, Clone)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// Process id to profile (repeatable).
    #[arg(long = "pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,
    /// Process name (comm or executable basename) to profile; every matching
    /// process is profiled (repeatable).
    #[arg(long = "process", value_name = "NAME")]
    pub processes: Vec<String>,
}

/// `flamewatch record`.
#[derive(Debug, Args)]
pub struct RecordArgs {
    #[command(flatten)]
    pub targets: TargetArgs,
    /// How long to record (e.g. 30s, 2m, 1h30m); `0`/`forever` runs until Ctrl-C.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration,
          default_value_t = DurationArg(RecordConfig::default().duration))]
    pub duration: DurationArg,
    /// Sampling frequency in Hz (per thread, of on-CPU time).
    #[arg(long, value_name = "HZ",
          value_parser = clap::value_parser!(u64).range(1..=MAX_FREQ_HZ),
          default_value_t = RecordConfig::default().freq_hz)]
    pub freq: u64,
    /// Output folder.
    #[arg(long, value_name = "DIR", default_value_os_t = RecordConfig::default().output)]
    pub output: PathBuf,
    /// Prefix of the output files (default: the target's name).
    #[arg(long, value_name = "NAME", value_parser = parse_label)]
    pub label: Option<String>,
    /// One flamegraph tower per thread.
    #[arg(long, default_value_t = RecordConfig::default().per_thread)]
    pub per_thread: bool,
    /// Do not record kernel stacks.
    #[arg(long)]
    pub no_kernel: bool,
    /// Most the profiling may cost the target, in percent of its CPU time;
    /// the sampling rate is lowered (never raised past --freq) to stay under.
    #[arg(long, value_name = "PCT", value_parser = parse_pct,
          default_value_t = RecordConfig::default().max_overhead_pct)]
    pub max_overhead: f64,
    /// How to unwind user stacks: `auto` uses DWARF (.eh_frame) for targets
    /// whose executable has no frame pointers, `fp` walks frame pointers in
    /// the kernel (cheapest), `dwarf` always copies the stack for unwinding.
    #[arg(long, value_enum, default_value_t = RecordConfig::default().unwind)]
    pub unwind: UnwindMode,
    /// Bytes of user stack copied per sample in DWARF mode (deeper stacks
    /// need more; truncated stacks are counted in the summary).
    #[arg(long, value_name = "BYTES",
          value_parser = clap::value_parser!(u32).range(512..=flamewatch_common::MAX_STACK_WINDOW as i64),
          default_value_t = RecordConfig::default().stack_window)]
    pub stack_window: u32,
    /// Do not insert the callers frame-pointer walks skip (a leaf function
    /// without a frame hides its caller): for measuring the fix-up's cost.
    #[arg(long)]
    pub no_leaf_fixup: bool,
    /// `cpu`: where CPU time goes; `offcpu`: where threads wait (blocked
    /// time by stack); `wall`: both, per thread, in one graph; `memory`:
    /// resident-memory growth by stack (new anonymous pages, in bytes);
    /// `heap`: live allocations by allocating stack (allocator uprobes on
    /// the target only, sampled by bytes).
    #[arg(long, value_enum, default_value_t = RecordConfig::default().mode)]
    pub mode: Mode,
    /// Shortest off-CPU block recorded (offcpu and wall modes).
    #[arg(long, value_name = "DURATION", value_parser = parse_min_block,
          default_value_t = MinBlock(RecordConfig::default().min_block))]
    pub min_block: MinBlock,
    /// Files to write per target, comma-separated: `svg` (flamegraph),
    /// `folded`, `json` (summary), `pprof` (gzipped profile.proto, for
    /// `go tool pprof`).
    #[arg(long = "format", value_name = "FORMATS", value_enum, value_delimiter = ',',
          default_values_t = RecordConfig::default().formats)]
    pub formats: Vec<Format>,
    /// Heap mode: mean bytes allocated between two sampled allocations (a
    /// Poisson process, as tcmalloc's and ddprof's).
    #[arg(long, value_name = "BYTES", value_parser = parse_heap_sample_bytes,
          default_value_t = RecordConfig::default().heap_sample_bytes)]
    pub heap_sample_bytes: u64,
    /// Heap mode: live allocations older than this are "probably leaked".
    #[arg(long, value_name = "DURATION", value_parser = parse_leak_age,
          default_value_t = MinBlock(RecordConfig::default().leak_age))]
    pub leak_age: MinBlock,
}

/// `--heap-sample-bytes`: bytes, with an optional KiB/MiB suffix.
fn parse_heap_sample_bytes(text: &str) -> Result<u64, ConfigError> {
    let t = text.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("KiB").or_else(|| t.strip_suffix('K')) {
        (n, 1024)
    } else if let Some(n) = t.strip_suffix("MiB").or_else(|| t.strip_suffix('M')) {
        (n, 1024 * 1024)
    } else {
        (t, 1)
    };
    let v: u64 = num.trim().parse().map_err(|_| {
        invalid(
            "heap-sample-bytes",
            text,
            "not a size; examples: 524288, 512KiB, 1MiB",
        )
    })?;
    crate::config::check_heap_sample_bytes(v.saturating_mul(mult))
}

/// `--leak-age`: a positive duration.
fn parse_leak_age(text: &str) -> Result<MinBlock, ConfigError> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| invalid("leak-age", text, format!("{e}; examples: 30s, 5m")))?;
    check_duration("leak-age", d, false).map(MinBlock)
}

/// A `--min-block` duration, possibly zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinBlock(pub Duration);

impl std::fmt::Display for MinBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A duration, possibly zero (`0`, `500us`, `1ms`).
fn parse_min_block(text: &str) -> Result<MinBlock, ConfigError> {
    if text.trim() == "0" {
        return Ok(MinBlock(Duration::ZERO));
    }
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| invalid("min-block", text, format!("{e}; examples: 0, 500us, 1ms")))?;
    check_duration("min-block", d, true).map(MinBlock)
}

/// A percentage in (0, 100], `%` allowed (`--max-overhead`).
pub fn parse_pct(text: &str) -> Result<f64, ConfigError> {
    let v: f64 = text
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| invalid("max-overhead", text, "not a percentage"))?;
    check_pct("max-overhead", v)
}

/// A parsed `--duration`: `None` means until interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationArg(pub Option<Duration>);

impl std::fmt::Display for DurationArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(d) => write!(f, "{}", humantime::format_duration(d)),
            None => f.write_str("forever"),
        }
    }
}

/// Parses `30s`, `2m`, `1h30m`, `500ms`; `0` and `forever` mean no limit.
pub fn parse_duration(text: &str) -> Result<DurationArg, ConfigError> {
    let text = text.trim();
    if text == "forever" || text == "0" {
        return Ok(DurationArg(None));
    }
    let bad = |why: &str| invalid("duration", text, format!("{why}; examples: 30s, 2m, 1h30m"));
    // A bare number is seconds, as in `perf record -- sleep N` habits.
    let parsed = match text.parse::<f64>() {
        // try_: from_secs_f64 panics past u64::MAX seconds (1e20).
        Ok(secs) if secs.is_finite() && secs > 0.0 => {
            Duration::try_from_secs_f64(secs).map_err(|_| bad(TOO_LONG))
        }
        Ok(_) => Err(bad("must be positive")),
        Err(_) => humantime::parse_duration(text).map_err(|e| bad(&e.to_string())),
    }?;
    check_duration("duration", parsed, true).map_err(|_| bad(TOO_LONG))?;
    if parsed.is_zero() {
        return Ok(DurationArg(None));
    }
    Ok(DurationArg(Some(parsed)))
}

const TOO_LONG: &str = "longer than the maximum of 365 days; `forever` runs until Ctrl-C";

/// Labels become file names: keep them to a safe character set.
fn parse_label(text: &str) -> Result<String, ConfigError> {
    if text.is_empty()
        || !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || text.starts_with('.')
    {
        return Err(invalid(
            "label",
            text,
            "use letters, digits, '-', '_' and '.' (it names files)",
        ));
    }
    Ok(text.to_owned())
}

/// `flamewatch tcp`.
#[derive(Debug, Args)]
pub struct TcpArgs {
    #[command(flatten)]
    pub targets: TargetArgs,
    /// How long to watch (e.g. 30s, 2m); `0`/`forever` runs until Ctrl-C.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration,
          default_value_t = DurationArg(TcpConfig::default().duration))]
    pub duration: DurationArg,
    /// Also print every state change and reset of the targets' sockets.
    #[arg(long, default_value_t = TcpConfig::default().events)]
    pub events: bool,
}

impl TcpArgs {
    /// The settings these arguments ask for.
    pub fn to_config(&self) -> TcpConfig {
        TcpConfig {
            duration: self.duration.0,
            events: self.events,
            ..TcpConfig::default()
        }
    }
}

impl RecordArgs {
    /// The session settings these arguments ask for.
    pub fn to_config(&self) -> RecordConfig {
        RecordConfig {
            freq_hz: self.freq,
            duration: self.duration.0,
            output: self.output.clone(),
            label: self.label.clone(),
            per_thread: self.per_thread,
            kernel_stacks: !self.no_kernel,
            max_overhead_pct: self.max_overhead,
            unwind: self.unwind,
            stack_window: self.stack_window,
            leaf_fixup: !self.no_leaf_fixup,
            mode: self.mode,
            min_block: self.min_block.0,
            formats: dedup(&self.formats),
            heap_sample_bytes: self.heap_sample_bytes,
            leak_age: self.leak_age.0,
            ..RecordConfig::default()
        }
    }
}

/// `--format svg,svg` writes the file once: keep the first of each.
fn dedup(formats: &[Format]) -> Vec<Format> {
    let mut out = Vec::with_capacity(formats.len());
    for f in formats {
        if !out.contains(f) {
            out.push(*f);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::{error::ErrorKind, Parser as _};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("flamewatch").chain(args.iter().copied()))
    }

    fn record(args: &[&str]) -> RecordArgs {
        match parse(args).expect("parses").command {
            Command::Record(r) => r,
            other => panic!("not record: {other:?}"),
        }
    }

    /// Test that the defaults of `record` are exactly `RecordConfig::default()`.
    #[test]
    fn record_defaults_come_from_config() {
        let r = record(&["record", "--pid", "1"]);
        assert_eq!(r.to_config(), RecordConfig::default());
    }

    /// Test that every option of `record` lands in the config.
    #[test]
    fn record_options_are_parsed() {
        let r = record(&[
            "record",
            "--process",
            "a",
            "--process",
            "b",
            "--duration",
            "1m30s",
            "--freq",
            "999",
            "--output",
            "/tmp/x",
            "--label",
            "demo_1",
            "--per-thread",
            "--no-kernel",
            "--max-overhead",
            "2.5%",
            "--no-leaf-fixup",
        ]);
        assert_eq!(r.targets.processes, ["a", "b"]);
        let c = r.to_config();
        assert_eq!(c.duration, Some(Duration::from_secs(90)));
        assert_eq!(c.freq_hz, 999);
        assert_eq!(c.output, PathBuf::from("/tmp/x"));
        assert_eq!(c.label.as_deref(), Some("demo_1"));
        assert!(c.per_thread);
        assert!(!c.kernel_stacks);
        assert_eq!(c.max_overhead_pct, 2.5);
        assert!(!c.leaf_fixup);
    }

    /// Test that durations accept humantime forms, bare seconds and "until Ctrl-C".
    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("10s").ok(),
            Some(DurationArg(Some(Duration::from_secs(10))))
        );
        assert_eq!(
            parse_duration("2.5").ok(),
            Some(DurationArg(Some(Duration::from_millis(2500))))
        );
        assert_eq!(
            parse_duration("500ms").ok(),
            Some(DurationArg(Some(Duration::from_millis(500))))
        );
        assert_eq!(parse_duration("forever").ok(), Some(DurationArg(None)));
        assert_eq!(parse_duration("0").ok(), Some(DurationArg(None)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("-3").is_err());
        assert!(parse_duration("10 parsecs").is_err());
    }

    /// Test that durations too long for the clocks are one-line errors
    /// naming the value, not panics.
    #[test]
    fn endless_durations_are_errors() {
        for text in ["1e20", "1e300", "18446744073709551616", "400d", "1000000000y"] {
            let err = parse_duration(text).expect_err(text).to_string();
            assert!(
                err.contains(&format!("\"{text}\"")) && !err.contains('\n'),
                "{err}"
            );
        }
        assert!(parse_min_block("1000000y").is_err());
        assert_eq!(
            parse_duration("365d").ok(),
            Some(DurationArg(Some(Duration::from_secs(365 * 86400))))
        );
        let err = parse(&["record", "--pid", "1", "--duration", "1e20"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    /// Test that a watch config with a zero interval, a zero or endless
    /// session, or a zero rate is refused at load with one line.
    #[test]
    fn watch_config_values_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("interval = \"0s\"", "interval"),
            ("interval = \"400d\"", "interval"),
            ("[emergency]\nduration = \"0s\"", "emergency.duration"),
            ("[emergency]\nfreq_hz = 0", "emergency.freq_hz"),
            ("max_overhead_pct = 0.0", "max_overhead_pct"),
            (
                "[[target]]\nprocess = \"x\"\n[[target.schedule]]\ncron = \"0 * * * * *\"\nduration = \"0s\"",
                "duration",
            ),
        ];
        for (text, what) in cases {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, text).unwrap();
            let args = ["watch", "--pid", "1", "--config", path.to_str().unwrap()];
            let err = match parse(&args).expect("parses").command {
                Command::Watch(w) => w.to_config().expect_err(text).to_string(),
                other => panic!("not watch: {other:?}"),
            };
            assert!(err.contains(what) && !err.contains('\n'), "{text}: {err}");
        }
    }

    /// Test that bad input is a usage error (clap exits with status 2 for these).
    #[test]
    fn bad_input_is_a_usage_error() {
        let cases: &[&[&str]] = &[
            &["record"],                                        // no target
            &["record", "--pid", "1", "--process", "x"],        // both kinds
            &["record", "--pid", "abc"],                        // not a number
            &["record", "--pid", "0"],                          // not a pid
            &["record", "--pid", "1", "--freq", "0"],           // zero rate
            &["record", "--pid", "1", "--freq", "200000"],      // above the kernel's limit
            &["record", "--pid", "1", "--duration", "soon"],    // malformed duration
            &["record", "--pid", "1", "--label", "../etc"],     // label is a file name
            &["record", "--pid", "1", "--max-overhead", "0"],   // no budget
            &["record", "--pid", "1", "--max-overhead", "150"], // not a share
            &["record", "--pid", "1", "--format", "svg,png"],   // unknown format
            &["record", "--pid", "1", "--format", ""],          // no format
        ];
        for args in cases {
            let err = parse(args).expect_err(&format!("{args:?} must be rejected"));
            assert_ne!(err.kind(), ErrorKind::DisplayHelp, "{args:?}");
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    /// Test that `--format` takes a comma-separated list (repeatable,
    /// duplicates dropped) and defaults to svg, folded and json.
    #[test]
    fn record_formats() {
        use crate::config::Format::*;
        let formats = |args: &[&str]| {
            let mut all = vec!["record", "--pid", "1"];
            all.extend(args);
            record(&all).to_config().formats
        };
        assert_eq!(formats(&[]), [Svg, Folded, Json]);
        assert_eq!(
            formats(&["--format", "svg,folded,json,pprof"]),
            [Svg, Folded, Json, Pprof]
        );
        assert_eq!(
            formats(&["--format", "pprof,json", "--format", "pprof"]),
            [Pprof, Json]
        );
        assert!(record(&["record", "--pid", "1", "--format", "pprof"])
            .to_config()
            .writes(Pprof));
    }

    /// Test that `watch --format` adds files to every session, on top of
    /// the three the daemon always writes, and that without it the config
    /// decides.
    #[test]
    fn watch_formats() {
        use crate::config::Format::*;
        let watch = |args: &[&str]| match parse(args).expect("parses").command {
            Command::Watch(w) => w.to_config().expect("valid"),
            other => panic!("not watch: {other:?}"),
        };
        let plain = watch(&["watch", "--pid", "1"]);
        assert_eq!(plain.session_formats(), [Svg, Folded, Json]);
        let with = watch(&["watch", "--pid", "1", "--format", "pprof"]);
        assert_eq!(with.session_formats(), [Svg, Folded, Json, Pprof]);
        assert!(parse(&["watch", "--pid", "1", "--format", "png"]).is_err());
    }

    /// Test that the memory modes and their settings parse, with sizes in
    /// bytes or KiB/MiB and a positive leak age, and bad values refused.
    #[test]
    fn memory_mode_flags() {
        let record = |args: &[&str]| match parse(args).expect("parses").command {
            Command::Record(r) => r.to_config(),
            other => panic!("not record: {other:?}"),
        };
        let d = record(&["record", "--pid", "1", "--mode", "heap"]);
        assert_eq!(d.mode, Mode::Heap);
        assert_eq!(d.mode.memory(), Some(crate::memory::MemKind::Heap));
        assert!(!d.mode.on_cpu() && !d.mode.off_cpu());
        assert_eq!(d.heap_sample_bytes, 512 * 1024);
        assert_eq!(d.leak_age, Duration::from_secs(30));
        let c = record(&[
            "record",
            "--pid",
            "1",
            "--mode",
            "memory",
            "--heap-sample-bytes",
            "1MiB",
            "--leak-age",
            "5m",
        ]);
        assert_eq!(c.mode.memory(), Some(crate::memory::MemKind::Growth));
        assert_eq!(
            (c.heap_sample_bytes, c.leak_age),
            (1 << 20, Duration::from_secs(300))
        );
        assert_eq!(
            record(&["record", "--pid", "1", "--heap-sample-bytes", "64K"]).heap_sample_bytes,
            65536
        );
        for bad in [
            ["--heap-sample-bytes", "0"],
            ["--heap-sample-bytes", "lots"],
            ["--leak-age", "0s"],
        ] {
            let mut args = vec!["record", "--pid", "1"];
            args.extend(bad);
            assert!(parse(&args).is_err(), "{bad:?}");
        }
    }

    fn tcp(args: &[&str]) -> TcpArgs {
        match parse(args).expect("parses").command {
            Command::Tcp(t) => t,
            other => panic!("not tcp: {other:?}"),
        }
    }

    /// Test that `tcp` takes its defaults from `TcpConfig::default()` and
    /// parses its options.
    #[test]
    fn tcp_arguments() {
        assert_eq!(tcp(&["tcp", "--pid", "1"]).to_config(), TcpConfig::default());
        let t = tcp(&["tcp", "--process", "logcaster", "--duration", "10s", "--events"]);
        assert_eq!(t.targets.processes, ["logcaster"]);
        let c = t.to_config();
        assert_eq!(c.duration, Some(Duration::from_secs(10)));
        assert!(c.events);
    }

    /// Test that bad `tcp` input is a usage error (exit status 2).
    #[test]
    fn tcp_bad_input_is_a_usage_error() {
        let cases: &[&[&str]] = &[
            &["tcp"],
            &["tcp", "--pid", "1", "--process", "x"],
            &["tcp", "--pid", "0"],
            &["tcp", "--pid", "1", "--duration", "soon"],
        ];
        for args in cases {
            let err = parse(args).expect_err(&format!("{args:?} must be rejected"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}

//! `flamewatch latency`: its arguments. Defaults come from
//! [`LatencyConfig::default`]; the checks are the config's.

use std::path::PathBuf;

use clap::Args;

use super::{parse_duration, parse_label, parse_pct, DurationArg, TargetArgs};
use crate::config::{
    latency::{check_function, parse_budget},
    ConfigError, LatencyConfig, MAX_FREQ_HZ,
};

/// `flamewatch latency`.
#[derive(Debug, Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub targets: TargetArgs,
    /// The function: a symbol of the executable (`tick`) or of a shared
    /// library it maps (`libc:malloc`).
    #[arg(long, value_name = "SYMBOL", value_parser = parse_function)]
    pub function: String,
    /// Calls longer than this are over budget (e.g. 16.7ms); CPU samples
    /// taken while a call has run past it make a slow-call flamegraph.
    #[arg(long, value_name = "DURATION", value_parser = parse_budget)]
    pub budget: Option<std::time::Duration>,
    /// How long to measure (e.g. 30s, 2m); `0`/`forever` runs until Ctrl-C.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration,
          default_value_t = DurationArg(LatencyConfig::default().duration))]
    pub duration: DurationArg,
    /// Output folder.
    #[arg(long, value_name = "DIR", default_value_os_t = LatencyConfig::default().output)]
    pub output: PathBuf,
    /// Prefix of the output files (default: the target's name).
    #[arg(long, value_name = "NAME", value_parser = parse_label)]
    pub label: Option<String>,
    /// Sampling rate of the slow-call profile, Hz.
    #[arg(long, value_name = "HZ",
          value_parser = clap::value_parser!(u64).range(1..=MAX_FREQ_HZ),
          default_value_t = LatencyConfig::default().freq_hz)]
    pub freq: u64,
    /// Most probing and sampling may cost the target, percent of its CPU
    /// time; a function called too often for it is refused.
    #[arg(long, value_name = "PCT", value_parser = parse_pct,
          default_value_t = LatencyConfig::default().max_overhead_pct)]
    pub max_overhead: f64,
    /// Do not record kernel stacks in the slow-call profile.
    #[arg(long)]
    pub no_kernel: bool,
    /// Leave blocked time out of the slow-call profile (CPU samples only;
    /// no `sched_switch` tracing).
    #[arg(long)]
    pub no_offcpu: bool,
}

impl LatencyArgs {
    /// The session settings these arguments ask for.
    pub fn to_config(&self) -> LatencyConfig {
        LatencyConfig {
            function: self.function.clone(),
            budget: self.budget,
            duration: self.duration.0,
            output: self.output.clone(),
            label: self.label.clone(),
            freq_hz: self.freq,
            max_overhead_pct: self.max_overhead,
            kernel_stacks: !self.no_kernel,
            off_cpu: !self.no_offcpu,
        }
    }
}

fn parse_function(text: &str) -> Result<String, ConfigError> {
    check_function("function", text)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn latency(args: &[&str]) -> Result<LatencyArgs, clap::Error> {
        let cli = Cli::try_parse_from(["flamewatch", "latency"].into_iter().chain(args.iter().copied()))?;
        match cli.command {
            Command::Latency(l) => Ok(l),
            other => panic!("not latency: {other:?}"),
        }
    }

    /// Test that `latency` takes its defaults from `LatencyConfig::default()`
    /// and parses fractional budgets.
    #[test]
    fn latency_arguments() {
        let l = latency(&["--pid", "1", "--function", "tick"])
            .unwrap()
            .to_config();
        assert_eq!(
            l,
            LatencyConfig {
                function: "tick".into(),
                ..LatencyConfig::default()
            }
        );
        let l = latency(&[
            "--process",
            "game",
            "--function",
            "libc:malloc",
            "--budget",
            "16.7ms",
        ])
        .unwrap();
        assert_eq!(l.budget, Some(std::time::Duration::from_micros(16_700)));
        assert_eq!(
            parse_budget("500us").unwrap(),
            std::time::Duration::from_micros(500)
        );
        assert_eq!(parse_budget("2").unwrap(), std::time::Duration::from_millis(2));
    }

    /// Test that bad `latency` input is a usage error (exit status 2).
    #[test]
    fn latency_bad_input_is_a_usage_error() {
        for args in [
            &["--pid", "1"][..],
            &["--function", "tick"],
            &["--pid", "1", "--function", ""],
            &["--pid", "1", "--function", "tick", "--budget", "0ms"],
            &["--pid", "1", "--function", "tick", "--budget", "2h"],
            &["--pid", "1", "--function", "tick", "--budget", "soon"],
        ] {
            let e = latency(args).expect_err("refused");
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }
}

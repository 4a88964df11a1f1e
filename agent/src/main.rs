//! flamewatch: parse the command line, set up logging, run the command, and
//! map errors to exit codes (2: bad input, 1: failure).

use std::process::ExitCode;

use clap::Parser as _;
use tokio::sync::watch;
use tracing::{debug, error, info};
use tracing_subscriber::EnvFilter;

use flamewatch::{
    alerts, cli,
    cli::{Cli, Command, RecordArgs},
    config, control, daemon, dashboard, doctor, fsafe, render, retention, sampling, session,
    session::SessionKind,
    target, tcp,
};

/// Exit status for bad input (arguments, targets, privileges), as clap uses.
const EXIT_USAGE: u8 = 2;

/// An error with the exit status it deserves.
struct Failure {
    status: u8,
    error: anyhow::Error,
}

impl Failure {
    fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self {
            status: EXIT_USAGE,
            error: error.into(),
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Self {
            status: 1,
            error: error.into(),
        }
    }
}

fn main() -> ExitCode {
    // Symbolization runs on the runtime's blocking threads; glibc would give
    // each its own malloc arena (up to 8 per core), and a daemon's RSS would
    // creep up with every new one. Two arenas are plenty here.
    // SAFETY: mallopt only sets an allocator parameter, before any thread.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version: clap's own output.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("flamewatch: {} (see --help)", one_line(&e.render().to_string()));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    // aya-log records go through the `log` facade; forward them to tracing.
    let _ = tracing_log_bridge();
    // One perf event (a descriptor) per target thread: use all we may.
    match sampling::raise_nofile_limit() {
        Ok(limit) => debug!("RLIMIT_NOFILE {limit}"),
        Err(e) => tracing::warn!("cannot raise RLIMIT_NOFILE: {e}"),
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { status, error }) => {
            // One line for the user; the chain in debug logs.
            eprintln!("flamewatch: {error}");
            debug!("{error:?}");
            ExitCode::from(status)
        }
    }
}

/// A clap error as one line: its text up to the usage block, the
/// "error:" prefix and the line breaks removed.
fn one_line(rendered: &str) -> String {
    rendered
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn tracing_log_bridge() -> Result<(), log::SetLoggerError> {
    struct Bridge;
    impl log::Log for Bridge {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            let target = record.target();
            match record.level() {
                log::Level::Error => tracing::error!(target: "ebpf", "{target}: {}", record.args()),
                log::Level::Warn => tracing::warn!(target: "ebpf", "{target}: {}", record.args()),
                log::Level::Info => tracing::info!(target: "ebpf", "{target}: {}", record.args()),
                log::Level::Debug => tracing::debug!(target: "ebpf", "{target}: {}", record.args()),
                log::Level::Trace => tracing::trace!(target: "ebpf", "{target}: {}", record.args()),
            }
        }
        fn flush(&self) {}
    }
    static BRIDGE: Bridge = Bridge;
    log::set_logger(&BRIDGE)?;
    log::set_max_level(log::LevelFilter::Trace);
    Ok(())
}

/// A stop flag flipped by SIGINT or SIGTERM.
fn stop_on_signals() -> Result<watch::Receiver<bool>, Failure> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => info!("SIGINT received"),
            _ = term.recv() => info!("SIGTERM received"),
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Record(args) => record(args).await,
        Command::Tcp(args) => tcp_live(args).await,
        Command::Watch(args) => watch(args).await,
        Command::Trigger(args) => trigger(args).await,
        Command::Latency(args) => latency(args).await,
        Command::Doctor => {
            print!("{}", doctor::run());
            Ok(())
        }
    }
}

async fn watch(args: cli::WatchArgs) -> Result<(), Failure> {
    let config = args.to_config().map_err(Failure::usage)?;
    let token = dashboard::check_token(&config.metrics_addr, config.dashboard_token.as_deref())
        .map_err(Failure::usage)?;
    if args.check {
        // The config as the daemon would run it; URLs without their secrets.
        let mut shown = config.effective();
        shown.webhook = shown.webhook.as_deref().map(alerts::redact_url);
        shown.alertmanager = shown.alertmanager.as_deref().map(alerts::redact_url);
        print!("{}", toml::to_string(&shown).map_err(Failure::from)?);
        return Ok(());
    }
    let stop = stop_on_signals()?;
    let config_socket = config.control_socket.clone();
    if let Some(missing) = target::missing_privileges() {
        return Err(Failure::usage(anyhow::anyhow!(missing)));
    }
    // Every folder the daemon writes into: made 0755, refused when others
    // could plant links in it.
    let alerts = config.alerts_path();
    for dir in [
        Some(config.output.as_path()),
        alerts.parent(),
        config_socket.parent(),
    ]
    .into_iter()
    .flatten()
    .filter(|d| !d.as_os_str().is_empty())
    {
        fsafe::create_dir(dir).map_err(Failure::usage)?;
    }
    let daemon = daemon::Daemon::new(config)
        .map_err(Failure::usage)?
        .with_dashboard_token(token);
    let socket = config_socket;
    match daemon.run(&socket, stop).await {
        // Another daemon on the socket, or a path that cannot be one.
        Err(daemon::DaemonError::Control(e)) if e.is_usage() => Err(Failure::usage(e)),
        other => Ok(other?),
    }
}

async fn trigger(args: cli::TriggerArgs) -> Result<(), Failure> {
    let duration = args.duration.0.unwrap_or(std::time::Duration::from_secs(30));
    let since = args.since.map(|d| d.as_secs_f64());
    let req = control::Request {
        process: args.targets.processes.first().cloned(),
        pid: args.targets.pids.first().copied(),
        duration_s: duration.as_secs_f64(),
        since_s: since,
        freq_hz: args.freq,
        wait_s: Some(args.wait.as_secs_f64()),
        pprof: false,
    };
    // The wait, the session, its symbolization, and some slack.
    let collect = if since.is_some() {
        std::time::Duration::ZERO
    } else {
        duration
    };
    let timeout = args.wait + collect + std::time::Duration::from_secs(120);
    let reply = control::trigger(&args.control_socket, &req, timeout)
        .await
        .map_err(Failure::usage)?;
    if !reply.ok {
        return Err(Failure::usage(anyhow::anyhow!(reply
            .error
            .unwrap_or_else(|| "the daemon refused".into()))));
    }
    for f in reply.files {
        println!("{f}");
    }
    Ok(())
}

async fn tcp_live(args: cli::TcpArgs) -> Result<(), Failure> {
    let stop = stop_on_signals()?;
    let config = args.to_config();
    let targets = target::resolve(&args.targets.pids, &args.targets.processes).map_err(Failure::usage)?;
    if let Some(missing) = target::missing_privileges() {
        return Err(Failure::usage(anyhow::anyhow!(missing)));
    }
    match tcp::live::run(&config, targets, stop).await {
        // This kernel cannot serve the command: like bad input, one line, 2.
        Err(e @ tcp::TcpError::Unsupported { .. }) => Err(Failure::usage(e)),
        result => Ok(result?),
    }
}

async fn latency(args: cli::LatencyArgs) -> Result<(), Failure> {
    let stop = stop_on_signals()?;
    let config = args.to_config();
    let mut targets = target::resolve(&args.targets.pids, &args.targets.processes).map_err(Failure::usage)?;
    if targets.len() != 1 {
        let pids: Vec<String> = targets.iter().map(|t| t.pid.to_string()).collect();
        return Err(Failure::usage(anyhow::anyhow!(
            "latency probes one process; {} match (pids {}): choose one with --pid",
            targets.len(),
            pids.join(", ")
        )));
    }
    let target = targets.remove(0);
    if let Some(missing) = target::missing_privileges() {
        return Err(Failure::usage(anyhow::anyhow!(missing)));
    }
    // An unknown function or library is bad input: refused before anything loads.
    let location = flamewatch::probes::resolve(target.pid, &config.function).map_err(Failure::usage)?;
    fsafe::create_dir(&config.output).map_err(Failure::usage)?;
    let outcome = match session::latency::latency(&config, target, location, stop).await {
        Ok(o) => o,
        Err(e @ (session::SessionError::Budget(_) | session::SessionError::Refused(_))) => {
            return Err(Failure::usage(e))
        }
        Err(e) => return Err(e.into()),
    };
    print!("{}", outcome.text);
    for f in &outcome.files {
        println!("{f}");
    }
    Ok(())
}

async fn record(args: RecordArgs) -> Result<(), Failure> {
    // Handlers first: a signal during attach must still detach and report.
    let stop = stop_on_signals()?;
    let config = args.to_config();
    let targets = target::resolve(&args.targets.pids, &args.targets.processes).map_err(Failure::usage)?;
    if let Some(missing) = target::missing_privileges() {
        return Err(Failure::usage(anyhow::anyhow!(missing)));
    }
    fsafe::create_dir(&config.output).map_err(Failure::usage)?;
    let reports = match session::record(&config, targets, SessionKind::OnDemand, stop).await {
        Ok(reports) => reports,
        // No room in the target's budget: a refusal, not a failure of ours.
        Err(session::SessionError::Budget(e)) => return Err(Failure::usage(e)),
        Err(e) => return Err(e.into()),
    };
    for report in &reports {
        for path in report.summary.files.written() {
            println!("{path}");
        }
    }
    // Keep the folder within the default retention limits (a daemon's
    // folder keeps its alerts' profiles), off the runtime's workers.
    let (dir, alerts) = (config.output.clone(), config.output.join(render::html::ALERTS));
    let pruned = tokio::task::spawn_blocking(move || {
        let retention = config::RetentionConfig::default();
        retention::prune_and_refresh(&dir, &retention, &alerts, &Default::default())
    })
    .await;
    match pruned {
        Ok(Err(e)) => tracing::warn!("{e}"),
        Err(e) => tracing::warn!("retention: {e}"),
        Ok(Ok(_)) => {}
    }
    Ok(())
}

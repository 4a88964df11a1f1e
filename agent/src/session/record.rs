//! `flamewatch record`: a session whose engine lives only as long as the
//! command. Stages: admit (budget) → attach (engine) → collect (governed
//! intervals until the duration, a signal or every target's exit) →
//! detach → finish each target's window.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::info;

use super::{
    finish::{self, Window},
    progress::Progress,
    Report, SessionError, SessionKind,
};
use crate::{
    config::{Format, Mode, RecordConfig},
    engine::{Engine, EngineOptions, Want},
    render,
    target::Target,
    unwind,
};

/// The engine settings of a `record` session.
pub fn engine_options(config: &RecordConfig, dwarf_ring: bool) -> EngineOptions {
    EngineOptions {
        kernel_stacks: config.kernel_stacks,
        stack_window: config.stack_window,
        min_block_ns: config.min_block.as_nanos() as u64,
        unwind: config.unwind,
        budget_pct: config.max_overhead_pct,
        dwarf_ring,
        leaf_fixup: config.leaf_fixup,
        off_cpu: config.mode.off_cpu(),
        max_hz: Some(config.freq_hz),
        tcp: true,
        // The whole session is one window: keep all of it.
        history: config.duration.unwrap_or(Duration::MAX / 4) + Duration::from_secs(60),
        history_bytes: usize::MAX,
        memory: config.mode.memory().map(|_| crate::memory::MemoryOptions {
            heap_mean: config.heap_sample_bytes,
            ..crate::memory::MemoryOptions::default()
        }),
    }
}

/// What the targets want of the engine in `config`'s mode.
pub fn want_of(config: &RecordConfig) -> Want {
    Want {
        hz: if config.mode.on_cpu() { config.freq_hz } else { 0 },
        off_cpu: config.mode.off_cpu(),
        thread_names: config.per_thread || config.mode == Mode::Wall || config.writes(Format::Pprof),
    }
}

/// Runs one recording session over `targets` until `config.duration`
/// elapses, `stop` turns true, or every target has exited.
pub async fn record(
    config: &RecordConfig,
    targets: Vec<Target>,
    kind: SessionKind,
    stop: watch::Receiver<bool>,
) -> Result<Vec<Report>, SessionError> {
    std::fs::create_dir_all(&config.output).map_err(|source| SessionError::Output {
        path: config.output.clone(),
        source,
    })?;
    let started_at = SystemTime::now();
    // `auto` checks the frame-pointer targets it picks with stack copies.
    let any_dwarf = config.unwind == unwind::UnwindMode::Auto
        || targets.iter().any(|t| unwind::choose(config.unwind, t.pid).dwarf);
    let mut engine = Engine::start(engine_options(config, any_dwarf))?;
    attach(&mut engine, config, targets.clone()).await?;
    collect(&mut engine, config, stop).await?;
    engine.final_tick()?;
    let crashes = engine.take_crashes();
    let now = SystemTime::now();
    let windows: Vec<Window> = targets
        .iter()
        .filter_map(|t| Window::take(&engine, t.pid, started_at, now, config.mode.off_cpu()))
        .collect();
    // Detach before the (CPU-heavy) symbolization: the targets stop paying now.
    engine.shutdown();
    let spec = finish::Spec {
        config,
        kind,
        started_at,
    };
    let reports = tokio::task::block_in_place(|| {
        windows
            .into_iter()
            .map(|w| finish::finish(w, &spec))
            .collect::<Result<Vec<_>, _>>()
    })?;
    report_crashes(&config.output, &crashes);
    // The folder's index.html lists every session in it, this one included.
    // A convenience: failing to write it does not fail the session.
    if let Err(e) = render::html::refresh_off_runtime(&config.output).await {
        tracing::warn!("cannot write the index of {}: {e}", config.output.display());
    }
    Ok(reports)
}

/// Adds every target, refusing the session (before any is sampled) when
/// another session leaves no budget on one of them. Sessions starting now
/// wait until our claims are written.
async fn attach(
    engine: &mut Engine,
    config: &RecordConfig,
    targets: Vec<Target>,
) -> Result<(), SessionError> {
    let admission = engine.admit().await;
    let want = want_of(config);
    let pids: Vec<u32> = targets.iter().map(|t| t.pid).collect();
    for t in targets {
        let pid = t.pid;
        engine.add_target(t, want)?;
        if let Some(kind) = config.mode.memory() {
            engine.want_memory(pid, Some(kind))?;
        }
    }
    drop(admission);
    engine.start_tcp();
    engine.start_crash_capture();
    for pid in pids {
        engine.announce(pid);
    }
    Ok(())
}

/// Prints each crash of a target (headline and stack, on stderr beside the
/// log) and writes its report into `dir` (its paths on stdout, with the
/// session's files).
fn report_crashes(dir: &std::path::Path, crashes: &[crate::crash::Crash]) {
    for c in crashes {
        eprintln!("{}\n{}", c.headline(), crate::crash::report::backtrace(c));
        match crate::crash::report::write(dir, c) {
            Ok(files) => {
                println!("{}", files.json.display());
                println!("{}", files.text.display());
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

/// Ticks the engine every drain interval until the session ends.
async fn collect(
    engine: &mut Engine,
    config: &RecordConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let start = Instant::now();
    let mut progress = Progress::new();
    loop {
        let remaining = config.duration.map(|d| d.saturating_sub(start.elapsed()));
        if remaining.is_some_and(|r| r.is_zero()) {
            break;
        }
        let wait = remaining.map_or(config.drain_interval, |r| r.min(config.drain_interval));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {
                info!("stopping on signal");
                break;
            }
        }
        engine.tick()?;
        let pids = engine.pids();
        let slots: Vec<_> = pids.iter().filter_map(|p| engine.slot(*p)).collect();
        progress.update(
            start.elapsed(),
            config.duration,
            slots.iter().map(|s| s.samples).sum(),
            &slots
                .iter()
                .map(|s| s.hz().to_string())
                .collect::<Vec<_>>()
                .join(","),
            slots.iter().map(|s| s.last_pct).fold(0.0, f64::max),
        );
        if slots.iter().all(|s| s.exited_at.is_some()) {
            break;
        }
    }
    progress.finish();
    Ok(())
}

//! `flamewatch tcp`: the targets' TCP counters, redrawn every second like
//! `top` on a terminal, or printed as `key=value` lines when stdout is not
//! a terminal (scripts, logs). Stops on its duration, on SIGINT/SIGTERM, or
//! when every target has exited.

use std::{
    io::{IsTerminal as _, Write as _},
    time::Instant,
};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    events::TcpEventRecord,
    table::{self, Header, Row},
    TcpError, TcpOptions, TcpTracker,
};
use crate::{bpf, config::TcpConfig, governor::cost::BpfStats, target::Target};

/// Runs `flamewatch tcp` over `targets`.
pub async fn run(
    config: &TcpConfig,
    targets: Vec<Target>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), TcpError> {
    // The programs' run time is shown per event: keep the statistics on.
    let _stats = BpfStats::enable();
    let mut ebpf = bpf::load(false)?;
    let mut tracker = TcpTracker::new(
        &mut ebpf,
        TcpOptions {
            detail: config.events,
            top_ports: config.top_ports,
        },
    )?;
    let mut exited = vec![false; targets.len()];
    for t in &targets {
        tracker.add_target(t.pid)?;
        info!(pid = t.pid, comm = %t.comm, "tracking TCP");
    }
    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    loop {
        let remaining = config.duration.map(|d| d.saturating_sub(start.elapsed()));
        let wait = remaining.map_or(config.refresh, |r| r.min(config.refresh));
        let mut stopping = remaining.is_some_and(|r| r.is_zero());
        if !stopping {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {
                    info!("stopping on signal");
                    stopping = true;
                }
            }
        }
        tokio::task::block_in_place(|| tracker.poll())?;
        for (t, gone) in targets.iter().zip(exited.iter_mut()) {
            if !*gone && !t.is_alive() {
                warn!(
                    pid = t.pid,
                    "target exited; its sockets are still followed until they close"
                );
                *gone = true;
            }
        }
        let events = if config.events {
            tracker.take_events()
        } else {
            Vec::new()
        };
        print(&tracker, &targets, &exited, start, tty, &events);
        let done = config.duration.is_some_and(|d| start.elapsed() >= d);
        if stopping || done || exited.iter().all(|&g| g) {
            break;
        }
    }
    tracker.detach(&mut ebpf);
    Ok(())
}

/// Detail events shown under the table on a terminal.
const EVENTS_ON_SCREEN: usize = 10;

fn print(
    tracker: &TcpTracker,
    targets: &[Target],
    exited: &[bool],
    start: Instant,
    tty: bool,
    events: &[TcpEventRecord],
) {
    let elapsed_s = start.elapsed().as_secs_f64();
    let (programs, missed_runs) = tracker.program_stats();
    let header = Header {
        elapsed_s,
        programs,
        missed_runs,
    };
    let summaries: Vec<_> = targets
        .iter()
        .map(|t| tracker.summary(t.pid).unwrap_or_default())
        .collect();
    let rows: Vec<Row<'_>> = targets
        .iter()
        .zip(&summaries)
        .zip(exited)
        .map(|((t, s), &gone)| Row {
            pid: t.pid,
            comm: &t.comm,
            summary: s,
            rates: tracker.rates(t.pid).unwrap_or_default(),
            exited: gone,
        })
        .collect();
    let mut out = String::new();
    if tty {
        out.push_str(table::CLEAR);
        out.push_str(&table::table(&header, &rows));
        if !events.is_empty() {
            out.push_str("\nlatest events:\n");
            for e in &events[events.len().saturating_sub(EVENTS_ON_SCREEN)..] {
                out.push_str(&e.to_string());
                out.push('\n');
            }
        }
    } else {
        for e in events {
            out.push_str(&e.to_string());
            out.push('\n');
        }
        for r in &rows {
            out.push_str(&table::line(elapsed_s, r));
            out.push('\n');
        }
        out.push_str(&table::programs_line(&header, tracker.transitions_seen()));
        out.push('\n');
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

//! Live progress of `flamewatch record` on the terminal.

use std::{
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use tracing::info;

/// Live progress: a rewritten status line on a terminal, else a log line
/// every few seconds.
pub struct Progress {
    tty: bool,
    last_log: Instant,
}

impl Progress {
    /// A progress line on stderr.
    pub fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last_log: Instant::now(),
        }
    }

    /// Shows the latest interval.
    pub fn update(&mut self, elapsed: Duration, limit: Option<Duration>, samples: u64, hz: &str, pct: f64) {
        let limit = limit.map_or_else(|| "∞".to_owned(), |d| format!("{:.0}s", d.as_secs_f64()));
        let line = format!(
            "recording {:.0}s / {limit}  samples {samples}  rate {hz} Hz  overhead {pct:.2}%",
            elapsed.as_secs_f64()
        );
        if self.tty {
            eprint!("\r\x1b[K{line}");
            let _ = std::io::stderr().flush();
        } else if self.last_log.elapsed() >= Duration::from_secs(5) {
            self.last_log = Instant::now();
            info!("{line}");
        }
    }

    /// Clears the line.
    pub fn finish(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

//! What `flamewatch tcp` prints: a table redrawn each second on a terminal
//! (like `top`), else one `key=value` line per target and second.

use std::fmt::Write as _;

use super::summary::TcpSummary;
use crate::governor::cost::ProgStats;

/// Rates over the last interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Connections opened per second.
    pub opened_per_s: f64,
    /// Connections closed per second.
    pub closed_per_s: f64,
    /// Resets per second.
    pub resets_per_s: f64,
    /// TIME_WAIT entries per second.
    pub time_wait_per_s: f64,
}

/// One target's line.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    /// Its pid.
    pub pid: u32,
    /// Its name.
    pub comm: &'a str,
    /// Counters since tracking started.
    pub summary: &'a TcpSummary,
    /// Last interval.
    pub rates: Rates,
    /// It has exited.
    pub exited: bool,
}

/// Machine-wide facts for the header.
#[derive(Debug, Clone, Copy, Default)]
pub struct Header {
    /// Seconds since tracking started.
    pub elapsed_s: f64,
    /// Run time and count of the TCP programs since tracking started.
    pub programs: ProgStats,
    /// Runs the kernel skipped.
    pub missed_runs: u64,
}

/// Clears the screen and homes the cursor (as `top` redraws).
pub const CLEAR: &str = "\x1b[H\x1b[2J";

fn ports(s: &TcpSummary, n: usize) -> String {
    let mut out: Vec<String> = s
        .top_ports
        .iter()
        .take(n)
        .map(|p| format!("L{}={}", p.local_port, p.time_wait))
        .collect();
    out.extend(
        s.top_remote_ports
            .iter()
            .take(1)
            .map(|p| format!("R{}={}", p.remote_port, p.time_wait)),
    );
    if out.is_empty() {
        "-".to_owned()
    } else {
        out.join(" ")
    }
}

/// The table (without the clear-screen sequence).
pub fn table(header: &Header, rows: &[Row<'_>]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "flamewatch tcp — {:.0} s — TCP programs: {} runs, {:.0} ns/run, {} skipped — Ctrl-C to quit",
        header.elapsed_s,
        header.programs.runs,
        header.programs.mean_ns(),
        header.missed_runs
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>7} {:<15} {:>6} {:>13} {:>7} {:>8} {:>9} {:>9} {:>8} {:>7}  {:<24} {:>5}",
        "PID",
        "COMM",
        "ESTAB",
        "OPENED(a/p)",
        "OPEN/s",
        "CLOSED",
        "RST(s/r)",
        "TW-IN",
        "TW/s",
        "TW-NOW",
        "TOP TIME_WAIT PORTS",
        "LOST"
    );
    for r in rows {
        let s = r.summary;
        let comm: String = if r.exited {
            format!("{} (exited)", r.comm)
        } else {
            r.comm.to_owned()
        };
        let _ = writeln!(
            out,
            "{:>7} {:<15} {:>6} {:>13} {:>7.1} {:>8} {:>9} {:>9} {:>8.1} {:>7}  {:<24} {:>5}",
            r.pid,
            truncate(&comm, 15),
            s.established_now,
            format!("{}/{}", s.connections_opened_active, s.connections_opened_passive),
            r.rates.opened_per_s,
            s.connections_closed,
            format!("{}/{}", s.resets_sent, s.resets_received),
            s.time_wait_entered,
            r.rates.time_wait_per_s,
            s.time_wait_now,
            truncate(&ports(s, 2), 24),
            s.lost_events
        );
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// A name usable as one `key=value` token.
fn token(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| if c.is_whitespace() || c == '=' { '_' } else { c })
        .collect();
    if t.is_empty() {
        "-".to_owned()
    } else {
        t
    }
}

/// One target's plain line.
pub fn line(elapsed_s: f64, r: &Row<'_>) -> String {
    let s = r.summary;
    let port = |p: Option<(u16, u64)>| p.map_or_else(|| "-".to_owned(), |(p, n)| format!("{p}:{n}"));
    format!(
        "tcp t={elapsed_s:.1} pid={} comm={} exited={} transitions={} established={} opened={} opened_active={} \
         opened_passive={} opened_per_s={:.1} closed={} connect_failures={} resets={} resets_sent={} \
         resets_received={} time_wait_entered={} time_wait_recovered={} time_wait_per_s={:.1} time_wait_now={} \
         top_local_port={} top_remote_port={} lost_events={} untracked_sockets={}",
        r.pid,
        token(r.comm),
        r.exited,
        s.transitions.iter().map(|t| t.count).sum::<u64>(),
        s.established_now,
        s.connections_opened,
        s.connections_opened_active,
        s.connections_opened_passive,
        r.rates.opened_per_s,
        s.connections_closed,
        s.connect_failures,
        s.resets,
        s.resets_sent,
        s.resets_received,
        s.time_wait_entered,
        s.time_wait_recovered,
        r.rates.time_wait_per_s,
        s.time_wait_now,
        port(s.top_ports.first().map(|p| (p.local_port, p.time_wait))),
        port(s.top_remote_ports.first().map(|p| (p.remote_port, p.time_wait))),
        s.lost_events,
        s.untracked_sockets,
    )
}

/// The machine-wide plain line: what the TCP programs cost.
pub fn programs_line(header: &Header, transitions: u64) -> String {
    format!(
        "tcp-programs t={:.1} runs={} run_ns={} ns_per_run={:.0} skipped_runs={} transitions={}",
        header.elapsed_s,
        header.programs.runs,
        header.programs.run_ns,
        header.programs.mean_ns(),
        header.missed_runs,
        transitions
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::summary::tests::server_closing_first;

    fn row(s: &TcpSummary) -> Row<'_> {
        Row {
            pid: 4242,
            comm: "log caster",
            summary: s,
            rates: Rates {
                opened_per_s: 100.0,
                closed_per_s: 100.0,
                resets_per_s: 0.0,
                time_wait_per_s: 100.0,
            },
            exited: false,
        }
    }

    /// Test that the plain line is one parseable `key=value` record.
    #[test]
    fn plain_line() {
        let s = server_closing_first();
        let l = line(5.0, &row(&s));
        assert!(l.starts_with("tcp t=5.0 pid=4242 comm=log_caster "), "{l}");
        for kv in [
            "transitions=2500",
            "opened_passive=500",
            "time_wait_entered=500",
            "time_wait_per_s=100.0",
            "time_wait_now=498",
            "top_local_port=9999:498",
            "lost_events=0",
        ] {
            assert!(l.split(' ').any(|t| t == kv), "{kv} in {l}");
        }
        assert!(l.split(' ').all(|t| t.contains('=') || t == "tcp"), "{l}");
    }

    /// Test that the table has a header and one aligned row per target.
    #[test]
    fn live_table() {
        let s = server_closing_first();
        let header = Header {
            elapsed_s: 5.0,
            programs: ProgStats {
                run_ns: 300_000,
                runs: 1000,
            },
            missed_runs: 0,
        };
        let t = table(&header, &[row(&s)]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("1000 runs, 300 ns/run"), "{t}");
        assert!(lines[2].contains("TW-NOW"));
        assert!(lines[3].contains("4242") && lines[3].contains("L9999=498"), "{t}");
        assert!(lines[3].contains("0/500"), "{t}");
        // Columns line up: the row is as wide as the header up to the ports.
        let col = lines[2].find("TOP TIME_WAIT PORTS").unwrap();
        assert_eq!(&lines[3][col..col + 9], "L9999=498");
    }

    /// Test the machine-wide cost line.
    #[test]
    fn cost_line() {
        let header = Header {
            elapsed_s: 2.0,
            programs: ProgStats {
                run_ns: 5000,
                runs: 10,
            },
            missed_runs: 1,
        };
        assert_eq!(
            programs_line(&header, 8),
            "tcp-programs t=2.0 runs=10 run_ns=5000 ns_per_run=500 skipped_runs=1 transitions=8"
        );
    }
}

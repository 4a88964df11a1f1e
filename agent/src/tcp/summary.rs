//! The `tcp` section of a report: what one target's TCP did.

use serde::Serialize;

use super::{
    book::{top_ports, TimeWaitNow},
    state::{Counters, Transition},
};

/// TIME_WAIT sockets on one local port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LocalPort {
    /// The port.
    pub local_port: u16,
    /// TIME_WAIT sockets on it now.
    pub time_wait: u64,
}

/// TIME_WAIT sockets towards one remote port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RemotePort {
    /// The port.
    pub remote_port: u16,
    /// TIME_WAIT sockets towards it now.
    pub time_wait: u64,
}

/// One target's TCP activity since tracking started.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TcpSummary {
    /// State transitions of its sockets (old → new), most frequent first.
    pub transitions: Vec<Transition>,
    /// Connections established (both directions).
    pub connections_opened: u64,
    /// Of which it connected (SYN_SENT → ESTABLISHED).
    pub connections_opened_active: u64,
    /// Of which it accepted (SYN_RECV → ESTABLISHED).
    pub connections_opened_passive: u64,
    /// Established connections that closed.
    pub connections_closed: u64,
    /// Connects that failed (SYN_SENT → CLOSE).
    pub connect_failures: u64,
    /// Resets sent and received.
    pub resets: u64,
    /// Resets sent.
    pub resets_sent: u64,
    /// Resets received.
    pub resets_received: u64,
    /// Its sockets that entered TIME_WAIT (it closed first).
    pub time_wait_entered: u64,
    /// Of those, entries the kernel program missed (its run was skipped)
    /// and sock_diag showed: TIME_WAIT sockets on its listening ports.
    pub time_wait_recovered: u64,
    /// Mean rate of those, per second.
    pub time_wait_entered_per_s: f64,
    /// Highest rate over one interval, per second.
    pub time_wait_entered_max_per_s: f64,
    /// Its TIME_WAIT sockets the kernel lists now (sock_diag, as `ss state
    /// time-wait`), at the end of the session.
    pub time_wait_now: u64,
    /// Its established connections now.
    pub established_now: u64,
    /// Local ports with the most TIME_WAIT sockets now.
    pub top_ports: Vec<LocalPort>,
    /// Remote ports with the most TIME_WAIT sockets now.
    pub top_remote_ports: Vec<RemotePort>,
    /// Events lost on the way to the agent (ring buffer or agent queue
    /// full): TIME_WAIT sockets on ephemeral ports may be missing from
    /// `time_wait_now`.
    pub lost_events: u64,
    /// Sockets the kernel could not remember (socket map full): their
    /// later transitions are missing.
    pub untracked_sockets: u64,
    /// Runs of the TCP programs the kernel skipped machine-wide because
    /// another BPF program was running on that CPU: transitions no target
    /// was credited with.
    pub skipped_program_runs: u64,
}

/// What a summary is made of.
#[derive(Debug, Clone, Copy)]
pub struct SummaryInput<'a> {
    /// The kernel's counters since tracking started.
    pub counters: &'a Counters,
    /// TIME_WAIT entries recovered from sock_diag.
    pub time_wait_recovered: u64,
    /// Seconds of tracking.
    pub seconds: f64,
    /// Highest TIME_WAIT entry rate of one interval.
    pub max_time_wait_per_s: f64,
    /// TIME_WAIT sockets now.
    pub time_wait: &'a TimeWaitNow,
    /// Established connections now.
    pub established_now: u64,
    /// Length of the port lists.
    pub top_n: usize,
    /// Events dropped in the agent.
    pub lost_in_agent: u64,
    /// Skipped program runs (machine-wide).
    pub skipped_program_runs: u64,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl TcpSummary {
    /// Builds the summary.
    pub fn build(input: SummaryInput<'_>) -> Self {
        let c = input.counters;
        let entered = c.time_wait_entered() + input.time_wait_recovered;
        Self {
            transitions: c.transitions(),
            connections_opened: c.opened(),
            connections_opened_active: c.0.active_opens,
            connections_opened_passive: c.0.passive_opens,
            connections_closed: c.0.closed,
            connect_failures: c.0.connect_failures,
            resets: c.resets(),
            resets_sent: c.0.resets_sent,
            resets_received: c.0.resets_received,
            time_wait_entered: entered,
            time_wait_recovered: input.time_wait_recovered,
            time_wait_entered_per_s: if input.seconds > 0.0 {
                round3(entered as f64 / input.seconds)
            } else {
                0.0
            },
            time_wait_entered_max_per_s: round3(input.max_time_wait_per_s),
            time_wait_now: input.time_wait.total,
            established_now: input.established_now,
            top_ports: top_ports(&input.time_wait.local_ports, input.top_n)
                .into_iter()
                .map(|(local_port, time_wait)| LocalPort {
                    local_port,
                    time_wait,
                })
                .collect(),
            top_remote_ports: top_ports(&input.time_wait.remote_ports, input.top_n)
                .into_iter()
                .map(|(remote_port, time_wait)| RemotePort {
                    remote_port,
                    time_wait,
                })
                .collect(),
            lost_events: c.0.lost_events + input.lost_in_agent,
            untracked_sockets: c.0.untracked_sockets,
            skipped_program_runs: input.skipped_program_runs,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use flamewatch_common::tcp::{state, TcpStats, TCP_STATES};

    use super::*;

    /// The summary of a server that closed 500 connections first (used by
    /// the report's golden test too).
    pub fn server_closing_first() -> TcpSummary {
        let mut s = TcpStats::default();
        let cell = |o: u8, n: u8| usize::from(o) * TCP_STATES + usize::from(n);
        s.transitions[cell(state::LISTEN, state::SYN_RECV)] = 500;
        s.transitions[cell(state::SYN_RECV, state::ESTABLISHED)] = 500;
        s.transitions[cell(state::ESTABLISHED, state::FIN_WAIT1)] = 500;
        s.transitions[cell(state::FIN_WAIT1, state::FIN_WAIT2)] = 500;
        s.transitions[cell(state::FIN_WAIT2, state::CLOSE)] = 500;
        s.passive_opens = 500;
        s.closed = 500;
        s.time_wait_closes = 500;
        let tw = TimeWaitNow {
            total: 498,
            local_ports: HashMap::from([(9999, 498)]),
            remote_ports: HashMap::from([(41000, 1), (41002, 1)]),
        };
        TcpSummary::build(SummaryInput {
            counters: &Counters(s),
            time_wait_recovered: 0,
            seconds: 5.0,
            max_time_wait_per_s: 120.0,
            time_wait: &tw,
            established_now: 0,
            top_n: 1,
            lost_in_agent: 0,
            skipped_program_runs: 0,
        })
    }

    /// Test that the summary has the shape of the issue: counts, rates and
    /// the top local port.
    #[test]
    fn summary_of_a_server_closing_first() {
        let s = server_closing_first();
        assert_eq!(s.connections_opened, 500);
        assert_eq!(s.connections_opened_passive, 500);
        assert_eq!(s.time_wait_entered, 500);
        assert_eq!(s.time_wait_entered_per_s, 100.0);
        assert_eq!(s.time_wait_now, 498);
        assert_eq!(
            s.top_ports,
            [LocalPort {
                local_port: 9999,
                time_wait: 498
            }]
        );
        assert_eq!(s.top_remote_ports.len(), 1);
        assert_eq!(s.transitions[0].count, 500);
        let json = serde_json::to_value(&s).unwrap();
        // Ties in state order: ESTABLISHED (1) before LISTEN (10).
        assert_eq!(json["transitions"][0]["from"], "ESTABLISHED");
        assert_eq!(json["transitions"][0]["to"], "FIN_WAIT1");
        assert_eq!(json["top_ports"][0]["local_port"], 9999);
        assert_eq!(json["lost_events"], 0);
    }
}

//! TCP states by name, and the per-target counters the kernel keeps
//! (summed over CPUs) with the quantities derived from them.

use flamewatch_common::tcp::{TcpStats, TCP_STATES};
use serde::Serialize;

/// Names of the kernel's TCP states, indexed by value
/// (include/net/tcp_states.h); 0 is not a state.
const NAMES: [&str; TCP_STATES] = [
    "UNKNOWN",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// The name of a TCP state value (`UNKNOWN` when out of range).
pub fn state_name(state: u8) -> &'static str {
    NAMES.get(usize::from(state)).copied().unwrap_or("UNKNOWN")
}

/// One cell of the transition matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// Old state.
    pub from: &'static str,
    /// New state.
    pub to: &'static str,
    /// How many times.
    pub count: u64,
}

/// A target's counters: the kernel's [`TcpStats`] summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters(pub TcpStats);

impl Counters {
    /// Sums per-CPU values.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a TcpStats>) -> Self {
        let mut total = TcpStats::default();
        for s in per_cpu {
            for (t, v) in total.transitions.iter_mut().zip(s.transitions.iter()) {
                *t += v;
            }
            total.active_opens += s.active_opens;
            total.passive_opens += s.passive_opens;
            total.closed += s.closed;
            total.connect_failures += s.connect_failures;
            total.resets_sent += s.resets_sent;
            total.resets_received += s.resets_received;
            total.time_wait_closes += s.time_wait_closes;
            total.time_wait_reset_after += s.time_wait_reset_after;
            total.events += s.events;
            total.lost_events += s.lost_events;
            total.untracked_sockets += s.untracked_sockets;
        }
        Self(total)
    }

    /// Connections opened (active and passive).
    pub fn opened(&self) -> u64 {
        self.0.active_opens + self.0.passive_opens
    }

    /// Resets sent and received.
    pub fn resets(&self) -> u64 {
        self.0.resets_sent + self.0.resets_received
    }

    /// Sockets that entered TIME_WAIT: FIN_WAIT2/CLOSING → CLOSE without a
    /// reset before, less those a reset followed at once.
    pub fn time_wait_entered(&self) -> u64 {
        self.0
            .time_wait_closes
            .saturating_sub(self.0.time_wait_reset_after)
    }

    /// The non-zero cells of the matrix, most frequent first (ties in state
    /// order, so the output is deterministic).
    pub fn transitions(&self) -> Vec<Transition> {
        let mut out: Vec<(usize, Transition)> = self
            .0
            .transitions
            .iter()
            .enumerate()
            .filter(|(_, &count)| count > 0)
            .map(|(i, &count)| {
                (
                    i,
                    Transition {
                        from: state_name((i / TCP_STATES) as u8),
                        to: state_name((i % TCP_STATES) as u8),
                        count,
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(&b.0)));
        out.into_iter().map(|(_, t)| t).collect()
    }
}

#[cfg(test)]
mod tests {
    use flamewatch_common::tcp::state;

    use super::*;

    /// Test that state values are named as the kernel names them.
    #[test]
    fn names() {
        assert_eq!(state_name(state::ESTABLISHED), "ESTABLISHED");
        assert_eq!(state_name(state::FIN_WAIT2), "FIN_WAIT2");
        assert_eq!(state_name(state::CLOSE), "CLOSE");
        assert_eq!(state_name(state::NEW_SYN_RECV), "NEW_SYN_RECV");
        assert_eq!(state_name(0), "UNKNOWN");
        assert_eq!(state_name(200), "UNKNOWN");
    }

    fn cell(old: u8, new: u8) -> usize {
        usize::from(old) * TCP_STATES + usize::from(new)
    }

    /// Test that per-CPU values are summed and the matrix is listed most
    /// frequent first, in state order on ties.
    #[test]
    fn sum_and_matrix() {
        let mut a = TcpStats::default();
        a.transitions[cell(state::ESTABLISHED, state::FIN_WAIT1)] = 3;
        a.transitions[cell(state::FIN_WAIT2, state::CLOSE)] = 2;
        a.passive_opens = 3;
        a.time_wait_closes = 2;
        let mut b = TcpStats::default();
        b.transitions[cell(state::FIN_WAIT2, state::CLOSE)] = 1;
        b.transitions[cell(state::SYN_RECV, state::ESTABLISHED)] = 3;
        b.time_wait_closes = 1;
        b.time_wait_reset_after = 1;
        b.resets_sent = 1;
        b.resets_received = 2;
        let c = Counters::sum([&a, &b]);
        assert_eq!(c.0.passive_opens, 3);
        assert_eq!(c.opened(), 3);
        assert_eq!(c.resets(), 3);
        assert_eq!(c.time_wait_entered(), 2);
        let t = c.transitions();
        let names: Vec<(&str, &str, u64)> = t.iter().map(|t| (t.from, t.to, t.count)).collect();
        assert_eq!(
            names,
            [
                ("ESTABLISHED", "FIN_WAIT1", 3),
                ("SYN_RECV", "ESTABLISHED", 3),
                ("FIN_WAIT2", "CLOSE", 3),
            ]
        );
    }

    /// Test that a reset counted after more closes than seen never underflows.
    #[test]
    fn time_wait_never_negative() {
        let s = TcpStats {
            time_wait_reset_after: 1,
            ..Default::default()
        };
        assert_eq!(Counters(s).time_wait_entered(), 0);
    }
}

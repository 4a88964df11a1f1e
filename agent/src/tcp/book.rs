//! Whose TIME_WAIT sockets are these? sock_diag lists the TIME_WAIT sockets
//! (the ground truth for "now") but not their owner: a TIME_WAIT socket has
//! no file, inode and uid are 0. The kernel program knows the owner when the
//! socket enters TIME_WAIT and sends its addresses. A TIME_WAIT socket is a
//! target's when its addresses are in that record, or when its local port
//! is one of the target's listening ports (sockets that were already in
//! TIME_WAIT when tracking started included).

use std::collections::{HashMap, HashSet};

use flamewatch_common::tcp::state;

use super::diag::{DiagSocket, Tuple};

/// TIME_WAIT sockets of one target right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimeWaitNow {
    /// How many.
    pub total: u64,
    /// By local port.
    pub local_ports: HashMap<u16, u64>,
    /// By remote port.
    pub remote_ports: HashMap<u16, u64>,
}

/// Addresses of the TIME_WAIT entries the kernel attributed, kept while the
/// kernel still lists them (at most `tcp_max_tw_buckets` entries).
///
/// A sock_diag dump is not a snapshot: it walks the hash table in parts, and
/// sockets inserted or freed in a bucket between two parts can shift another
/// one past the walk. Under connection churn a socket that is still there is
/// missing from one dump now and then, so an entry is forgotten only when two
/// dumps in a row miss it (forgetting it at once made its next sighting look
/// like an entry the kernel never reported, and it was counted twice).
#[derive(Debug, Default)]
pub struct TimeWaitBook {
    /// Tuple → (tgid, generation it was recorded in or last listed in).
    entered: HashMap<Tuple, (u32, u64)>,
    /// Bumped right before each dump: entries of an older generation were
    /// in the kernel's table when that dump started; newer ones (recorded
    /// while it ran) may not be in it yet.
    generation: u64,
}

impl TimeWaitBook {
    /// A target's socket entered TIME_WAIT.
    pub fn entered(&mut self, tuple: Tuple, tgid: u32) {
        self.entered.insert(tuple, (tgid, self.generation));
    }

    /// Call after reading the events and before starting a dump.
    pub fn next_generation(&mut self) {
        self.generation += 1;
    }

    /// The entry was withdrawn (a reset followed the close).
    pub fn cancelled(&mut self, tuple: &Tuple) {
        self.entered.remove(tuple);
    }

    /// Whether the kernel reported this socket entering TIME_WAIT.
    pub fn has(&self, tuple: &Tuple) -> bool {
        self.entered.contains_key(tuple)
    }

    /// Entries kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entered.len()
    }

    /// Counts the TIME_WAIT sockets of each target in a sock_diag dump and
    /// forgets the entries the kernel no longer lists (expired or killed):
    /// those missing from this dump and from the one before it, not counting
    /// a dump that ran while they were recorded.
    /// `listening`: listening port → tgid. Only sockets sock_diag reports in
    /// TIME_WAIT proper are counted, as `ss state time-wait` does; those
    /// still waiting for the peer's FIN (sub-state FIN_WAIT2) are kept.
    pub fn attribute(
        &mut self,
        sockets: &[DiagSocket],
        listening: &HashMap<u16, u32>,
    ) -> HashMap<u32, TimeWaitNow> {
        let mut present = HashSet::new();
        let mut now: HashMap<u32, TimeWaitNow> = HashMap::new();
        for s in sockets {
            // A full socket in FIN_WAIT2 is not in a dump that did not ask
            // for that state: FIN_WAIT2 here is a TIME_WAIT socket's sub-state.
            if s.state != state::TIME_WAIT && s.state != state::FIN_WAIT2 {
                continue;
            }
            present.insert(s.tuple);
            if s.state != state::TIME_WAIT {
                continue;
            }
            let owner = self
                .entered
                .get(&s.tuple)
                .map(|&(tgid, _)| tgid)
                .or_else(|| listening.get(&s.tuple.local_port).copied());
            if let Some(tgid) = owner {
                let n = now.entry(tgid).or_default();
                n.total += 1;
                *n.local_ports.entry(s.tuple.local_port).or_default() += 1;
                *n.remote_ports.entry(s.tuple.remote_port).or_default() += 1;
            }
        }
        // An entry recorded while the previous dump ran has been in one
        // full dump (this one), so it too is kept once when missing.
        let current = self.generation;
        self.entered.retain(|t, (_, generation)| {
            if present.contains(t) {
                *generation = current;
            }
            current - *generation <= 1
        });
        now
    }
}

/// TIME_WAIT entries the kernel program missed, recovered from sock_diag.
///
/// The kernel skips a tracepoint program that fires while another BPF
/// program runs on the same CPU (trace_call_bpf(), kernel/trace/bpf_trace.c):
/// a softirq interrupting one of our own runs is enough, and the skip is only
/// counted (`recursion_misses`). A TIME_WAIT socket lives 60 s, far longer
/// than the 1 s between dumps, so one on a target's listening port whose
/// entry has not come as an event by its second dump was missed (at the
/// first, the event may still be on its way); it is counted here. Only as
/// many as runs were skipped, so an entry the kernel counted but whose event
/// was lost (ring buffer full) is not counted twice. As in [`TimeWaitBook`],
/// a socket is forgotten only when two dumps in a row miss it.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Dumps seen so far.
    dumps: u64,
    /// Every socket of these sets → the last dump that listed it.
    listed: HashMap<Tuple, u64>,
    /// In TIME_WAIT when tracking started: not entered during it.
    preexisting: HashSet<Tuple>,
    /// Counted, by the kernel or here, and still listed.
    accounted: HashSet<Tuple>,
    /// Counted here and still listed.
    recovered: HashSet<Tuple>,
    /// Seen once without an event.
    pending: HashSet<Tuple>,
    /// Entries recovered so far.
    pub count: u64,
}

impl Recovery {
    /// The TIME_WAIT sockets on the target's ports when tracking started.
    pub fn start(&mut self, present: &[Tuple]) {
        self.preexisting = present.iter().copied().collect();
        self.listed = present.iter().map(|&t| (t, self.dumps)).collect();
    }

    /// One dump: `present` are the TIME_WAIT sockets (either sub-state) on
    /// the target's listening ports, `evented` tells which entries the
    /// kernel reported, `budget` holds skipped runs not yet matched.
    pub fn update(&mut self, present: &[Tuple], evented: impl Fn(&Tuple) -> bool, budget: &mut u64) {
        self.dumps += 1;
        for t in present {
            self.listed.insert(*t, self.dumps);
            if self.preexisting.contains(t) {
                continue;
            }
            if evented(t) {
                if self.recovered.remove(t) {
                    // Its event was only late: the kernel counted it.
                    self.count -= 1;
                    *budget += 1;
                }
                self.pending.remove(t);
                self.accounted.insert(*t);
                continue;
            }
            if self.accounted.contains(t) {
                continue;
            }
            if self.pending.insert(*t) {
                // First sighting: its event may still be on its way.
                continue;
            }
            if *budget > 0 {
                self.pending.remove(t);
                *budget -= 1;
                self.count += 1;
                self.recovered.insert(*t);
                self.accounted.insert(*t);
            }
        }
        let dumps = self.dumps;
        self.listed.retain(|_, &mut last| dumps - last <= 1);
        let listed = &self.listed;
        self.preexisting.retain(|t| listed.contains_key(t));
        self.accounted.retain(|t| listed.contains_key(t));
        self.recovered.retain(|t| listed.contains_key(t));
        self.pending.retain(|t| listed.contains_key(t));
    }
}

/// The `n` ports with the most sockets, most first (lower port first on
/// ties, so the output is deterministic).
pub fn top_ports(counts: &HashMap<u16, u64>, n: usize) -> Vec<(u16, u64)> {
    let mut v: Vec<(u16, u64)> = counts.iter().map(|(&p, &c)| (p, c)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(lport: u16, rport: u16) -> Tuple {
        Tuple {
            family: 2,
            local: [0; 16],
            local_port: lport,
            remote: [0; 16],
            remote_port: rport,
        }
    }

    fn tw(lport: u16, rport: u16) -> DiagSocket {
        DiagSocket {
            tuple: tuple(lport, rport),
            state: state::TIME_WAIT,
            inode: 0,
            recv_queue: 0,
        }
    }

    /// Test that TIME_WAIT sockets go to the owner of their listening port
    /// (server closed first) or to the target that entered them (client
    /// closed first), and that others are nobody's.
    #[test]
    fn attribution() {
        let mut book = TimeWaitBook::default();
        book.entered(tuple(40001, 9999), 200); // the client's own TIME_WAIT
        let listening = HashMap::from([(9999, 100)]);
        let sockets = [
            tw(9999, 40000),
            tw(9999, 40002),
            tw(40001, 9999),
            tw(5555, 80), // another process's
            DiagSocket {
                tuple: tuple(8080, 1),
                state: state::ESTABLISHED,
                inode: 7,
                recv_queue: 0,
            },
        ];
        let now = book.attribute(&sockets, &listening);
        assert_eq!(now[&100].total, 2);
        assert_eq!(now[&100].local_ports[&9999], 2);
        assert_eq!(now[&200].total, 1);
        assert_eq!(now[&200].remote_ports[&9999], 1);
        assert_eq!(now.len(), 2);
    }

    /// Test that entries two dumps in a row do not list are forgotten (a dump
    /// that ran while one was recorded does not count), and that those listed
    /// in sub-state FIN_WAIT2 are kept but not counted (as `ss state
    /// time-wait` does not count them).
    #[test]
    fn pruning_and_fin_wait2() {
        let mut book = TimeWaitBook::default();
        book.entered(tuple(1, 2), 10);
        book.entered(tuple(3, 4), 10);
        book.next_generation();
        // Recorded while the dump ran: kept even though the dump misses it.
        book.entered(tuple(5, 6), 10);
        let sockets = [DiagSocket {
            tuple: tuple(3, 4),
            state: state::FIN_WAIT2,
            inode: 0,
            recv_queue: 0,
        }];
        let now = book.attribute(&sockets, &HashMap::new());
        assert!(now.is_empty());
        // One dump missing (1, 2) may be the dump's fault: kept.
        assert!(book.has(&tuple(1, 2)) && book.has(&tuple(3, 4)) && book.has(&tuple(5, 6)));
        book.cancelled(&tuple(3, 4));
        assert_eq!(book.len(), 2);
        // The second dump in a row without (1, 2) forgets it; (5, 6) has
        // been in one full dump now and is kept once more.
        book.next_generation();
        book.attribute(&[], &HashMap::new());
        assert!(!book.has(&tuple(1, 2)) && book.has(&tuple(5, 6)));
        book.next_generation();
        book.attribute(&[], &HashMap::new());
        assert_eq!(book.len(), 0);
    }

    /// Test that a TIME_WAIT socket whose entry has not come as an event by
    /// its second dump is recovered, as many as runs were skipped; that
    /// sockets present at the start, reported by the kernel, or gone before
    /// a second dump are not; and that a late event takes a recovery back.
    #[test]
    fn recovery_of_missed_entries() {
        let t = |n| tuple(9999, n);
        let (old, a, b, c, gone) = (t(1), t(2), t(3), t(4), t(5));
        let mut r = Recovery::default();
        r.start(&[old]);
        let mut budget = 5;
        // First sighting: nothing recovered yet (events may be late).
        r.update(&[old, a, b, gone], |x| *x == a, &mut budget);
        assert_eq!((r.count, budget), (0, 5));
        // `gone` vanished before a second look: never counted. c is new.
        budget = 1;
        r.update(&[old, a, b, c], |x| *x == a, &mut budget);
        assert_eq!((r.count, budget), (1, 0), "b recovered");
        // c's second sighting, but no skipped run left to explain it.
        r.update(&[old, a, b, c], |x| *x == a, &mut budget);
        assert_eq!(r.count, 1);
        budget += 1;
        r.update(&[old, a, b, c], |x| *x == a, &mut budget);
        assert_eq!((r.count, budget), (2, 0), "c recovered");
        // Nothing counted twice on later dumps.
        r.update(&[old, a, b, c], |x| *x == a, &mut budget);
        assert_eq!(r.count, 2);
        // b's event was only late: the recovery is taken back.
        r.update(&[old, a, b, c], |x| *x == a || *x == b, &mut budget);
        assert_eq!((r.count, budget), (1, 1));
        // Sockets gone are forgotten after two dumps without them; the
        // count stays.
        r.update(&[], |_| false, &mut budget);
        assert!(!r.accounted.is_empty());
        r.update(&[], |_| false, &mut budget);
        assert_eq!(r.count, 1);
        assert!(r.accounted.is_empty() && r.recovered.is_empty());
        assert!(r.preexisting.is_empty() && r.pending.is_empty());
    }

    /// Test that a reported socket one dump misses (the dump is not a
    /// snapshot) is neither forgotten nor, when listed again, recovered as
    /// an entry the kernel missed: it is counted once.
    #[test]
    fn socket_missing_from_one_dump_counted_once() {
        let t = tuple(9999, 7);
        let mut book = TimeWaitBook::default();
        let mut r = Recovery::default();
        r.start(&[]);
        book.entered(t, 100);
        let mut budget = 4;
        for listed in [true, false, true, true, true] {
            book.next_generation();
            let sockets = if listed { vec![tw(9999, 7)] } else { vec![] };
            book.attribute(&sockets, &HashMap::new());
            let present: Vec<Tuple> = sockets.iter().map(|s| s.tuple).collect();
            r.update(&present, |x| book.has(x), &mut budget);
        }
        assert!(book.has(&t));
        assert_eq!((r.count, budget), (0, 4));
    }

    /// Test that ports are ranked by count, then by port.
    #[test]
    fn ranking() {
        let counts = HashMap::from([(9999, 5), (80, 5), (443, 9), (22, 1)]);
        assert_eq!(top_ports(&counts, 3), [(443, 9), (80, 5), (9999, 5)]);
        assert!(top_ports(&HashMap::new(), 3).is_empty());
    }
}

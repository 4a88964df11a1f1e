//! TCP state tracking per target process: the kernel counts each target's
//! socket state transitions (see `ebpf/src/tcp.rs` for how sockets are
//! attributed), and [`TcpTracker`] turns them, with the kernel's own list
//! of sockets (sock_diag), into per-target counters: connections opened and
//! closed, resets, TIME_WAIT entered (count and rate) and TIME_WAIT now with
//! its top ports.
//!
//! Used by `flamewatch record` (the `tcp` section of the summary), by
//! `flamewatch tcp` (a live table), and by the `watch` daemon (metrics):
//! create it next to the other users of the [`Ebpf`] object, add targets,
//! [`TcpTracker::poll`] once per interval, read [`TcpTracker::summary`].

pub mod attach;
pub mod book;
pub mod diag;
pub mod events;
pub mod live;
pub mod state;
pub mod summary;
pub mod table;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::fd::{AsFd as _, AsRawFd as _},
    time::Instant,
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{trace_point::TracePointLinkId, ProgramFd},
    util::nr_cpus,
    Ebpf,
};
use flamewatch_common::{
    tcp::{state as tcp_state, tcp_config_index, tcp_events, TcpGlobalStats, TcpStats},
    MAX_TARGETS,
};
use netlink_packet_sock_diag::inet::StateFlags;

use self::{
    book::{Recovery, TimeWaitNow},
    diag::{DiagError, SockDiag},
    events::{EventPump, TcpEventRecord},
    state::Counters,
    summary::{SummaryInput, TcpSummary},
    table::Rates,
};
use crate::{bpf::BpfError, governor::cost::ProgStats};

/// Errors of TCP tracking.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// Loading or finding a part of the BPF object failed.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// A map operation failed.
    #[error("eBPF map operation on {map}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// Cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// tracefs is not mounted and could not be.
    #[error("cannot mount tracefs at /sys/kernel/tracing: {0}")]
    Tracefs(#[source] std::io::Error),
    /// This kernel's TCP state tracepoint cannot be read.
    #[error("TCP state tracking is not supported on kernel {kernel}: {detail}")]
    Unsupported {
        /// Release.
        kernel: String,
        /// Which tracepoint field is missing or different.
        detail: String,
    },
    /// A program is missing from the object.
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    /// sock_diag failed.
    #[error(transparent)]
    Diag(#[from] DiagError),
    /// More targets than slots.
    #[error("too many TCP targets (at most {MAX_TARGETS})")]
    TooManyTargets,
    /// A system call of the agent's side failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> TcpError {
    move |source| TcpError::Io { what, source }
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> TcpError {
    move |source| TcpError::Map { map, source }
}

/// Takes map `name` out of `ebpf` (see [`crate::bpf::take_map`]).
fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, TcpError> {
    Ok(crate::bpf::take_map(ebpf, name)?)
}

/// Tracker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    /// Queue every event of the targets for [`TcpTracker::take_events`].
    pub detail: bool,
    /// Length of the port lists of summaries.
    pub top_ports: usize,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            detail: false,
            top_ports: crate::config::TcpConfig::default().top_ports,
        }
    }
}

/// What the tracker knows of one target.
struct TargetState {
    slot: u32,
    started: Instant,
    last_poll: Instant,
    counters: Counters,
    rates: Rates,
    max_time_wait_per_s: f64,
    time_wait: TimeWaitNow,
    established: u64,
    /// Unread bytes and pending accepts in its TCP sockets, at the last dump.
    recv_queue: u64,
    /// TIME_WAIT entries recovered from sock_diag.
    recovery: Recovery,
    /// Not dumped yet: the next dump gives the pre-existing TIME_WAIT.
    fresh: bool,
}

impl TargetState {
    /// TIME_WAIT entries: counted by the kernel, and recovered.
    fn time_wait_entered(&self) -> u64 {
        self.counters.time_wait_entered() + self.recovery.count
    }
}

/// TCP tracking of a set of target processes (see the module doc).
pub struct TcpTracker {
    links: Vec<(&'static str, TracePointLinkId)>,
    prog_fds: Vec<ProgramFd>,
    target_map: BpfHashMap<MapData, u32, u32>,
    listen_map: BpfHashMap<MapData, u32, u32>,
    stats: PerCpuArray<MapData, TcpStats>,
    global: PerCpuArray<MapData, TcpGlobalStats>,
    config: Array<MapData, u32>,
    pump: EventPump,
    diag: SockDiag,
    targets: BTreeMap<u32, TargetState>,
    free_slots: Vec<u32>,
    ncpus: usize,
    options: TcpOptions,
    /// Skipped program runs not matched by a recovered TIME_WAIT entry.
    skip_budget: u64,
    /// Skipped program runs seen so far.
    skipped_seen: u64,
    /// When sock_diag was last dumped, and the machine's transitions then.
    last_dump: Option<(Instant, u64)>,
}

/// Longest time between two sock_diag dumps while no TCP socket of the
/// machine changes state. A dump walks the kernel's whole established hash
/// (about 2 ms per address family here, however few sockets there are);
/// without transitions only TIME_WAIT expiries and receive queues change.
const QUIET_DUMP_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

impl TcpTracker {
    /// Takes the TCP maps out of `ebpf`, attaches the TCP programs and
    /// starts reading their events. No process is tracked yet.
    pub fn new(ebpf: &mut Ebpf, options: TcpOptions) -> Result<Self, TcpError> {
        let ncpus = nr_cpus().map_err(|(_, e)| io_err("counting CPUs")(e))?;
        let target_map = take(ebpf, "TCP_TARGETS")?;
        let listen_map = take(ebpf, "TCP_LISTEN")?;
        let stats = take(ebpf, "TCP_STATS")?;
        let global = take(ebpf, "TCP_GLOBAL")?;
        let config = take(ebpf, "TCP_CONFIG")?;
        let ring = take(ebpf, "TCP_EVENTS")?;
        let diag = SockDiag::open()?;
        let pump = EventPump::start(ring).map_err(io_err("starting the TCP event thread"))?;
        let mut tracker = Self {
            links: Vec::new(),
            prog_fds: Vec::new(),
            target_map,
            listen_map,
            stats,
            global,
            config,
            pump,
            diag,
            targets: BTreeMap::new(),
            // Lowest slots first.
            free_slots: (0..MAX_TARGETS).rev().collect(),
            ncpus,
            options,
            skip_budget: 0,
            skipped_seen: 0,
            last_dump: None,
        };
        tracker.set_detail(options.detail)?;
        tracker.links = attach::attach(ebpf)?;
        for (name, _, _) in attach::PROGRAMS {
            let prog = ebpf.program(name).ok_or(TcpError::MissingProgram(name))?;
            let fd = prog
                .fd()
                .map_err(|source| BpfError::Program { name, source })?
                .try_clone()
                .map_err(io_err("duplicating a program fd"))?;
            tracker.prog_fds.push(fd);
        }
        Ok(tracker)
    }

    /// Turns detail events (every transition and reset of the targets) on
    /// or off; TIME_WAIT entries are always sent.
    pub fn set_detail(&mut self, detail: bool) -> Result<(), TcpError> {
        let mask = tcp_events::TIME_WAIT | if detail { tcp_events::ALL } else { 0 };
        self.config
            .set(tcp_config_index::EVENTS, mask, 0)
            .map_err(map_err("TCP_CONFIG"))?;
        self.pump.lock().detail = detail;
        self.options.detail = detail;
        Ok(())
    }

    /// Starts tracking `pid`: its new sockets, the connections arriving on
    /// its listening ports, and sockets it closes from now on.
    pub fn add_target(&mut self, pid: u32) -> Result<(), TcpError> {
        if self.targets.contains_key(&pid) {
            return Ok(());
        }
        let slot = self.free_slots.pop().ok_or(TcpError::TooManyTargets)?;
        let zeros = PerCpuValues::try_from(vec![TcpStats::default(); self.ncpus])
            .map_err(io_err("per-CPU values"))?;
        if let Err(e) = self.stats.set(slot, zeros, 0) {
            self.free_slots.push(slot);
            return Err(map_err("TCP_STATS")(e));
        }
        if let Err(e) = self.target_map.insert(pid, slot, 0) {
            self.free_slots.push(slot);
            return Err(map_err("TCP_TARGETS")(e));
        }
        let now = Instant::now();
        self.targets.insert(
            pid,
            TargetState {
                slot,
                started: now,
                last_poll: now,
                counters: Counters::default(),
                rates: Rates::default(),
                max_time_wait_per_s: 0.0,
                time_wait: TimeWaitNow::default(),
                established: 0,
                recv_queue: 0,
                recovery: Recovery::default(),
                fresh: true,
            },
        );
        // Its listening ports now, so connections arriving before the first
        // poll are attributed too.
        self.refresh_sockets()?;
        Ok(())
    }

    /// Stops tracking `pid` and frees its slot (for a long-running caller
    /// whose targets come and go, as `watch`; `record` and `tcp` keep exited
    /// targets to follow their sockets until they close).
    pub fn remove_target(&mut self, pid: u32) {
        let Some(t) = self.targets.remove(&pid) else {
            return;
        };
        let _ = self.target_map.remove(&pid);
        let ports: Vec<u32> = self
            .listen_map
            .iter()
            .filter_map(Result::ok)
            .filter(|&(_, owner)| owner == pid)
            .map(|(port, _)| port)
            .collect();
        for port in ports {
            let _ = self.listen_map.remove(&port);
        }
        self.free_slots.push(t.slot);
    }

    /// Reads the kernel's counters and events, the current sockets
    /// (sock_diag), and updates every target. Call once per interval.
    pub fn poll(&mut self) -> Result<(), TcpError> {
        let now = Instant::now();
        let before: HashMap<u32, (Counters, u64)> = self
            .targets
            .iter()
            .map(|(&pid, t)| (pid, (t.counters, t.time_wait_entered())))
            .collect();
        for t in self.targets.values_mut() {
            let values = self.stats.get(&t.slot, 0).map_err(map_err("TCP_STATS"))?;
            t.counters = Counters::sum(values.iter());
        }
        let transitions = self.transitions_seen();
        let quiet = self
            .last_dump
            .is_some_and(|(at, seen)| seen == transitions && now.duration_since(at) < QUIET_DUMP_EVERY)
            && !self.targets.values().any(|t| t.fresh);
        if !quiet {
            self.refresh_sockets()?;
            self.last_dump = Some((now, transitions));
        }
        for (pid, t) in self.targets.iter_mut() {
            let (was, was_entered) = before[pid];
            let dt = now.duration_since(t.last_poll).as_secs_f64();
            if dt > 0.0 {
                let c = &t.counters;
                let d = |now: u64, before: u64| now.saturating_sub(before) as f64 / dt;
                t.rates = Rates {
                    opened_per_s: d(c.opened(), was.opened()),
                    closed_per_s: d(c.0.closed, was.0.closed),
                    resets_per_s: d(c.resets(), was.resets()),
                    time_wait_per_s: d(t.time_wait_entered(), was_entered),
                };
                t.max_time_wait_per_s = t.max_time_wait_per_s.max(t.rates.time_wait_per_s);
            }
            t.last_poll = now;
        }
        Ok(())
    }

    /// Listening ports, established connections and TIME_WAIT sockets of
    /// the targets, from sock_diag.
    fn refresh_sockets(&mut self) -> Result<(), TcpError> {
        // Events first: every TIME_WAIT entry read here is already in the
        // kernel's table (tcp_time_wait() hashes the TIME_WAIT socket before
        // the CLOSE transition), so the dump below cannot miss it.
        {
            let mut shared = self.pump.lock();
            shared.drain();
            shared.book.next_generation();
        }
        let sockets = self
            .diag
            .dump(StateFlags::ESTABLISHED | StateFlags::LISTEN | StateFlags::TIME_WAIT)?;
        let mut by_inode: HashMap<u32, (u8, u16, u32)> = HashMap::new();
        for s in &sockets {
            if s.inode != 0 && (s.state == tcp_state::LISTEN || s.state == tcp_state::ESTABLISHED) {
                by_inode.insert(s.inode, (s.state, s.tuple.local_port, s.recv_queue));
            }
        }
        for (&pid, t) in self.targets.iter_mut() {
            let inodes: HashSet<u32> = diag::socket_inodes(pid);
            let mut established = 0;
            t.recv_queue = inodes
                .iter()
                .filter_map(|i| by_inode.get(i))
                .map(|&(_, _, q)| u64::from(q))
                .sum();
            for inode in &inodes {
                match by_inode.get(inode).map(|&(s, p, _)| (s, p)) {
                    Some((tcp_state::ESTABLISHED, _)) => established += 1,
                    Some((tcp_state::LISTEN, port)) => {
                        let port = u32::from(port);
                        if self.listen_map.get(&port, 0).ok() != Some(pid) {
                            // A full map is counted by the kernel side's
                            // own inserts too; here it is only logged.
                            if let Err(e) = self.listen_map.insert(port, pid, 0) {
                                tracing::warn!(pid, port, "cannot record a listening port: {e}");
                            }
                        }
                    }
                    _ => {}
                }
            }
            t.established = established;
        }
        let listening: HashMap<u16, u32> = self
            .listen_map
            .iter()
            .filter_map(Result::ok)
            .map(|(port, pid)| (port as u16, pid))
            .collect();
        // Runs the kernel skipped up to now (after the dump: a TIME_WAIT
        // socket is listed before its CLOSE transition runs the program).
        let (_, skipped) = self.program_stats();
        self.skip_budget += skipped.saturating_sub(self.skipped_seen);
        self.skipped_seen = skipped;
        let mut shared = self.pump.lock();
        let mut now = shared.book.attribute(&sockets, &listening);
        for (&pid, t) in self.targets.iter_mut() {
            t.time_wait = now.remove(&pid).unwrap_or_default();
            let present: Vec<diag::Tuple> = sockets
                .iter()
                .filter(|s| s.state == tcp_state::TIME_WAIT || s.state == tcp_state::FIN_WAIT2)
                .filter(|s| listening.get(&s.tuple.local_port) == Some(&pid))
                .map(|s| s.tuple)
                .collect();
            if std::mem::take(&mut t.fresh) {
                t.recovery.start(&present);
            } else {
                let before = t.recovery.count;
                t.recovery
                    .update(&present, |x| shared.book.has(x), &mut self.skip_budget);
                if t.recovery.count != before {
                    tracing::debug!(
                        pid,
                        "TIME_WAIT entries recovered from sock_diag: {} -> {} (skipped runs unmatched: {})",
                        before,
                        t.recovery.count,
                        self.skip_budget
                    );
                }
            }
        }
        Ok(())
    }

    /// Unread bytes and pending accepts in `pid`'s TCP sockets at the last
    /// poll (None if not tracked).
    pub fn recv_queue(&self, pid: u32) -> Option<u64> {
        self.targets.get(&pid).map(|t| t.recv_queue)
    }

    /// What `pid`'s TCP did since it was added (None if not tracked).
    pub fn summary(&self, pid: u32) -> Option<TcpSummary> {
        let t = self.targets.get(&pid)?;
        let lost_in_agent = self.pump.lock().dropped.get(&pid).copied().unwrap_or(0);
        Some(TcpSummary::build(SummaryInput {
            counters: &t.counters,
            time_wait_recovered: t.recovery.count,
            seconds: t.last_poll.duration_since(t.started).as_secs_f64(),
            max_time_wait_per_s: t.max_time_wait_per_s,
            time_wait: &t.time_wait,
            established_now: t.established,
            top_n: self.options.top_ports,
            lost_in_agent,
            skipped_program_runs: self.program_stats().1,
        }))
    }

    /// Rates of the last interval.
    pub fn rates(&self, pid: u32) -> Option<Rates> {
        Some(self.targets.get(&pid)?.rates)
    }

    /// Program runs about `pid` so far (transitions and resets of its
    /// sockets): its share of the TCP programs' cost.
    pub fn events(&self, pid: u32) -> u64 {
        self.targets.get(&pid).map_or(0, |t| t.counters.0.events)
    }

    /// Detail events queued since the last call (detail mode).
    pub fn take_events(&mut self) -> Vec<TcpEventRecord> {
        self.pump.lock().drain();
        self.pump.lock().queue.drain(..).collect()
    }

    /// CPU time the agent spent decoding events, ns (grows with the rate).
    pub fn processing_ns(&self) -> u64 {
        self.pump.cpu_ns()
    }

    /// TCP transitions the kernel saw machine-wide, all processes.
    pub fn transitions_seen(&self) -> u64 {
        self.global
            .get(&0, 0)
            .map(|v| v.iter().map(|g| g.transitions).sum())
            .unwrap_or(0)
    }

    /// Run time and count of the TCP programs (the kernel's BPF run-time
    /// statistics, when enabled), and the runs it skipped.
    pub fn program_stats(&self) -> (ProgStats, u64) {
        let mut total = ProgStats::default();
        let mut skipped = 0;
        for fd in &self.prog_fds {
            let raw = fd.as_fd().as_raw_fd();
            let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")) else {
                continue;
            };
            let field = |key: &str| -> u64 {
                info.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0)
            };
            total.run_ns += field("run_time_ns:");
            total.runs += field("run_cnt:");
            skipped += attach::parse_recursion_misses(&info).unwrap_or(0);
        }
        (total, skipped)
    }

    /// Detaches the programs (dropping the `Ebpf` does it too).
    pub fn detach(mut self, ebpf: &mut Ebpf) {
        attach::detach(ebpf, std::mem::take(&mut self.links));
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read as _,
        net::{TcpListener, TcpStream},
        time::Duration,
    };

    use super::*;

    /// Test, on the real kernel, that a target's listening port is found, a
    /// connection it makes to itself counts as opened both ways, the side
    /// that closed first enters TIME_WAIT, and that a removed target frees
    /// its slot and ports (the slot starts from zero when reused). Needs
    /// root (it loads the BPF object); skipped otherwise.
    #[test]
    fn tracker_on_this_process() {
        if !crate::testutil::privileged("tracker_on_this_process", "needs root to load eBPF programs") {
            return;
        }
        let mut ebpf = crate::bpf::load(false).expect("loading the BPF object");
        let mut tracker = TcpTracker::new(&mut ebpf, TcpOptions::default()).expect("attaching");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id();
        tracker.add_target(me).unwrap();
        assert_eq!(tracker.listen_map.get(&u32::from(port), 0).ok(), Some(me));

        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        drop(server); // the server side closes first...
        client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).unwrap(), 0, "EOF from the server");
        drop(client); // ...so it, not the client, enters TIME_WAIT.
        std::thread::sleep(Duration::from_millis(200));
        tracker.poll().unwrap();
        let s = tracker.summary(me).unwrap();
        assert_eq!(s.connections_opened_active, 1, "{s:#?}");
        assert_eq!(s.connections_opened_passive, 1, "{s:#?}");
        assert_eq!(s.connections_closed, 2, "{s:#?}");
        assert_eq!(s.time_wait_entered, 1, "{s:#?}");
        assert_eq!(s.time_wait_now, 1, "{s:#?}");
        assert_eq!(s.top_ports[0].local_port, port);
        assert!(tracker.events(me) >= 10, "both ends' transitions");

        let slot = tracker.targets[&me].slot;
        tracker.remove_target(me);
        assert!(tracker.summary(me).is_none());
        assert!(tracker.listen_map.get(&u32::from(port), 0).is_err());
        // pid 1 is never a TCP peer here; it reuses the slot from zero.
        tracker.add_target(1).unwrap();
        assert_eq!(tracker.targets[&1].slot, slot);
        tracker.poll().unwrap();
        assert_eq!(tracker.summary(1).unwrap().time_wait_entered, 0);
        tracker.detach(&mut ebpf);
    }
}

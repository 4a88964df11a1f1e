//! The thread that drains the TCP ring buffer: TIME_WAIT entries go to the
//! [`TimeWaitBook`]; in detail mode every event is queued for the caller.
//!
//! The kernel side wakes this thread only when a quarter of the ring is
//! filled; otherwise it reads every [`POLL`].

use std::{
    collections::VecDeque,
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use flamewatch_common::tcp::{event_kind, TcpEvent};

use super::{book::TimeWaitBook, diag::Tuple, state::state_name};
use crate::governor::cost;

/// Longest wait between two reads of the ring.
pub const POLL: Duration = Duration::from_millis(100);

/// Detail events kept for the caller between two `take_events` (one
/// second apart): 256 Ki, ~20 MiB at most, 25 000 connections/s with both
/// ends tracked; beyond that they are dropped and counted (`lost_events`).
pub const DETAIL_QUEUE: usize = 1 << 18;

/// One event of a target's socket, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEventRecord {
    /// CLOCK_MONOTONIC, ns.
    pub ts_ns: u64,
    /// Owner.
    pub pid: u32,
    /// [`event_kind`] value.
    pub kind: u8,
    /// Old state (state changes).
    pub from: u8,
    /// New state (state changes), state at the time (resets).
    pub to: u8,
    /// Local side.
    pub local: SocketAddr,
    /// Remote side.
    pub remote: SocketAddr,
    /// The socket's addresses as the book keys them.
    pub tuple: Tuple,
}

fn socket_addr(addr: [u8; 16], port: u16) -> SocketAddr {
    let v6 = Ipv6Addr::from(addr);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    SocketAddr::new(ip, port)
}

impl TcpEventRecord {
    /// Decodes a ring buffer record (None when too short).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < std::mem::size_of::<TcpEvent>() {
            return None;
        }
        // SAFETY: TcpEvent is plain old data and the slice is long enough;
        // read_unaligned does not need alignment.
        let e: TcpEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        Some(Self {
            ts_ns: e.ts_ns,
            pid: e.tgid,
            kind: e.kind,
            from: e.oldstate,
            to: e.newstate,
            local: socket_addr(e.saddr, e.sport),
            remote: socket_addr(e.daddr, e.dport),
            tuple: Tuple {
                family: e.family,
                local: e.saddr,
                local_port: e.sport,
                remote: e.daddr,
                remote_port: e.dport,
            },
        })
    }

    /// `state`, `time_wait`, `reset_sent`, `reset_received` or
    /// `time_wait_cancelled`.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            event_kind::STATE => "state",
            event_kind::TIME_WAIT => "time_wait",
            event_kind::RESET_SENT => "reset_sent",
            event_kind::RESET_RECEIVED => "reset_received",
            event_kind::TIME_WAIT_CANCELLED => "time_wait_cancelled",
            _ => "unknown",
        }
    }
}

impl fmt::Display for TcpEventRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tcp-event t_ns={} pid={} kind={} local={} remote={}",
            self.ts_ns,
            self.pid,
            self.kind_name(),
            self.local,
            self.remote
        )?;
        match self.kind {
            event_kind::STATE | event_kind::TIME_WAIT => {
                write!(f, " from={} to={}", state_name(self.from), state_name(self.to))
            }
            _ => write!(f, " state={}", state_name(self.to)),
        }
    }
}

/// What the thread and the tracker share.
pub struct Shared {
    /// The ring (the tracker also drains it on demand).
    pub ring: RingBuf<MapData>,
    /// TIME_WAIT entries by address.
    pub book: TimeWaitBook,
    /// Queue detail events for the caller.
    pub detail: bool,
    /// Detail events not taken yet.
    pub queue: VecDeque<TcpEventRecord>,
    /// Detail events dropped because the queue was full, by pid.
    pub dropped: std::collections::HashMap<u32, u64>,
    /// Records too short to decode (never expected).
    pub malformed: u64,
}

impl Shared {
    /// Reads everything the ring holds.
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            n += 1;
            let Some(ev) = TcpEventRecord::decode(&item) else {
                self.malformed += 1;
                continue;
            };
            drop(item);
            match ev.kind {
                event_kind::TIME_WAIT => self.book.entered(ev.tuple, ev.pid),
                event_kind::TIME_WAIT_CANCELLED => self.book.cancelled(&ev.tuple),
                _ => {}
            }
            if self.detail {
                if self.queue.len() >= DETAIL_QUEUE {
                    *self.dropped.entry(ev.pid).or_default() += 1;
                } else {
                    self.queue.push_back(ev);
                }
            }
        }
        n
    }
}

/// The draining thread.
pub struct EventPump {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    cpu_ns: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl EventPump {
    /// Starts draining `ring`.
    pub fn start(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        let fd = ring.as_raw_fd();
        let shared = Arc::new(Mutex::new(Shared {
            ring,
            book: TimeWaitBook::default(),
            detail: false,
            queue: VecDeque::new(),
            dropped: Default::default(),
            malformed: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let cpu_ns = Arc::new(AtomicU64::new(0));
        let (sh, st, cpu) = (shared.clone(), stop.clone(), cpu_ns.clone());
        let handle = std::thread::Builder::new()
            .name("fw-tcp-events".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd; the ring (and its fd) lives
                    // in `sh` for as long as this thread runs.
                    unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as i32) };
                    let mut spent = 0;
                    cost::timed(&mut spent, || lock(&sh).drain());
                    cpu.fetch_add(spent, Ordering::Relaxed);
                }
            })?;
        Ok(Self {
            shared,
            stop,
            cpu_ns,
            handle: Some(handle),
        })
    }

    /// The shared state, locked (the tracker drains it first when it needs
    /// an up-to-date book).
    pub fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// CPU time the thread has spent decoding events, ns.
    pub fn cpu_ns(&self) -> u64 {
        self.cpu_ns.load(Ordering::Relaxed)
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Drop for EventPump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use flamewatch_common::tcp::state;

    use super::*;

    fn mapped_v4(a: [u8; 4]) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[10] = 0xff;
        out[11] = 0xff;
        out[12..].copy_from_slice(&a);
        out
    }

    /// Test that a ring record decodes into addresses and a readable line.
    #[test]
    fn decode_and_print() {
        let e = TcpEvent {
            ts_ns: 42,
            tgid: 7,
            kind: event_kind::TIME_WAIT,
            oldstate: state::FIN_WAIT2,
            newstate: state::CLOSE,
            family: 2,
            sport: 9999,
            dport: 40000,
            _pad: 0,
            saddr: mapped_v4([127, 0, 0, 1]),
            daddr: mapped_v4([127, 0, 0, 2]),
        };
        // SAFETY: TcpEvent is plain old data.
        let bytes: [u8; std::mem::size_of::<TcpEvent>()] = unsafe { std::mem::transmute(e) };
        let r = TcpEventRecord::decode(&bytes).unwrap();
        assert_eq!(r.local, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(r.remote, "127.0.0.2:40000".parse().unwrap());
        assert_eq!(r.tuple.local_port, 9999);
        assert_eq!(
            r.to_string(),
            "tcp-event t_ns=42 pid=7 kind=time_wait local=127.0.0.1:9999 remote=127.0.0.2:40000 \
             from=FIN_WAIT2 to=CLOSE"
        );
        assert!(TcpEventRecord::decode(&bytes[..10]).is_none());
    }
}

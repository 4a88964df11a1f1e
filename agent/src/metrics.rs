//! Per-target metric series with bounded history.
//!
//! One sample per interval per metric; each series keeps the last
//! [`HISTORY`] (an hour) of points, and at most [`MAX_POINTS`] (an hour at
//! the shortest interval), so memory stays flat however long the daemon runs.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

/// How far back each series reaches: rules' windows are at most this.
pub const HISTORY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Points kept per series at most: [`HISTORY`] at the shortest interval
/// ([`crate::config::MIN_INTERVAL`], 100 ms).
pub const MAX_POINTS: usize = 36_000;

/// The metrics collected for each target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// CPU use, percent of one core.
    CpuPct,
    /// Resident memory, bytes.
    RssBytes,
    /// Threads.
    Threads,
    /// Open file descriptors.
    Fds,
    /// Context switches per second (all threads).
    CtxSwitchesPerS,
    /// Established TCP connections on the target's ports.
    TcpEstablished,
    /// Sockets in TIME_WAIT on the target's ports now.
    TimeWait,
    /// Sockets entering TIME_WAIT per second.
    TimeWaitPerS,
    /// TCP resets per second.
    ResetsPerS,
    /// Bytes received but not yet read by the target, all its TCP sockets
    /// together: requests waiting for it.
    RecvQueueBytes,
    /// Median duration of the target's first probed function in the
    /// interval, ms (`[[target.probe]]`; 0 without calls).
    LatencyP50Ms,
    /// 99th percentile of the same, ms.
    LatencyP99Ms,
    /// Longest call of the same in the interval, ms.
    LatencyMaxMs,
    /// Calls of the same per second.
    CallsPerS,
    /// Calls of the same over its budget, percent of the interval's calls
    /// (a frame function's drop rate).
    OverBudgetPct,
}

impl Metric {
    /// Every metric, in the order charts show them.
    pub const ALL: [Metric; 15] = [
        Metric::CpuPct,
        Metric::RssBytes,
        Metric::Threads,
        Metric::Fds,
        Metric::CtxSwitchesPerS,
        Metric::TcpEstablished,
        Metric::TimeWait,
        Metric::TimeWaitPerS,
        Metric::ResetsPerS,
        Metric::RecvQueueBytes,
        Metric::LatencyP50Ms,
        Metric::LatencyP99Ms,
        Metric::LatencyMaxMs,
        Metric::CallsPerS,
        Metric::OverBudgetPct,
    ];

    /// Name in alerts and exports.
    pub fn name(self) -> &'static str {
        match self {
            Metric::CpuPct => "cpu_pct",
            Metric::RssBytes => "rss_bytes",
            Metric::Threads => "threads",
            Metric::Fds => "fds",
            Metric::CtxSwitchesPerS => "ctx_switches_per_s",
            Metric::TcpEstablished => "tcp_established",
            Metric::TimeWait => "time_wait",
            Metric::TimeWaitPerS => "time_wait_per_s",
            Metric::ResetsPerS => "resets_per_s",
            Metric::RecvQueueBytes => "recv_queue_bytes",
            Metric::LatencyP50Ms => "latency_p50_ms",
            Metric::LatencyP99Ms => "latency_p99_ms",
            Metric::LatencyMaxMs => "latency_max_ms",
            Metric::CallsPerS => "calls_per_s",
            Metric::OverBudgetPct => "over_budget_pct",
        }
    }
}

/// One time series: (seconds since the daemon started, value).
#[derive(Debug, Clone, Default)]
pub struct Series {
    points: VecDeque<(f64, f64)>,
}

impl Series {
    /// Appends a point (at `t` seconds), dropping those older than
    /// [`HISTORY`] and the oldest past [`MAX_POINTS`].
    pub fn push(&mut self, t: f64, v: f64) {
        let oldest = t - HISTORY.as_secs_f64();
        while self.points.front().is_some_and(|p| p.0 < oldest) || self.points.len() >= MAX_POINTS {
            self.points.pop_front();
        }
        self.points.push_back((t, v));
    }

    /// Whether the series reaches `seconds` back from its latest point
    /// (within a fifth: sampling jitters): a window of that length is
    /// covered, whatever the interval between points.
    pub fn covers(&self, seconds: f64) -> bool {
        match (self.points.front(), self.points.back()) {
            (Some(first), Some(last)) => last.0 - first.0 >= seconds * 0.8,
            _ => false,
        }
    }

    /// The latest value.
    pub fn last(&self) -> Option<f64> {
        self.points.back().map(|&(_, v)| v)
    }

    /// Points within `seconds` of the latest one.
    pub fn window(&self, seconds: f64) -> impl Iterator<Item = (f64, f64)> + '_ {
        let end = self.points.back().map_or(0.0, |p| p.0);
        self.points
            .iter()
            .copied()
            .filter(move |&(t, _)| end - t < seconds)
    }

    /// Number of points.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Forgets everything (the target restarted: its history is another
    /// process's).
    pub fn clear(&mut self) {
        self.points.clear();
    }
}

/// All series of one target.
#[derive(Debug, Clone, Default)]
pub struct TargetMetrics {
    /// Series by metric.
    pub series: BTreeMap<Metric, Series>,
}

impl TargetMetrics {
    /// Records one second's values.
    pub fn record(&mut self, t: f64, values: &[(Metric, f64)]) {
        for &(m, v) in values {
            self.series.entry(m).or_default().push(t, v);
        }
    }

    /// A series (empty if never recorded).
    pub fn get(&self, m: Metric) -> Option<&Series> {
        self.series.get(&m)
    }

    /// Forgets all history.
    pub fn clear(&mut self) {
        self.series.values_mut().for_each(Series::clear);
    }
}

/// One second of a process, read from /proc.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcSample {
    /// CPU use since the previous sample, percent of one core.
    pub cpu_pct: f64,
    /// Resident memory, bytes.
    pub rss_bytes: f64,
    /// Threads.
    pub threads: usize,
    /// Open file descriptors.
    pub fds: usize,
    /// Context switches per second.
    pub ctx_switches_per_s: f64,
    /// Busiest threads: (tid, name, CPU %), busiest first.
    pub top_threads: Vec<(u32, String, f64)>,
    /// Every thread with how long it has been blocked (s; 0 when running or
    /// runnable): the stuck detector's view.
    pub blocked: Vec<(String, f64)>,
    /// Unread bytes in its UDP sockets, and in its TCP sockets unless the
    /// caller has them from the TCP tracker ([`ProcSampler::tcp_from_proc`]).
    pub recv_queue_bytes: u64,
}

/// Unread bytes in the receive queues of `pid`'s sockets, from
/// /proc/PID/net/{udp,udp6} and, with `tcp`, /proc/PID/net/{tcp,tcp6}
/// (`rx_queue`, matched by socket inode). Reading the TCP files walks the
/// kernel's whole established hash (milliseconds on a large machine, every
/// read): the daemon takes TCP queues from the tracker's sock_diag dump.
pub fn recv_queue_bytes(pid: u32, tcp: bool) -> u64 {
    let inodes = crate::tcp::diag::socket_inodes(pid);
    if inodes.is_empty() {
        return 0;
    }
    let mut total = 0;
    // UDP too: a game server's player input arrives in datagrams.
    let files: &[&str] = if tcp {
        &["tcp", "tcp6", "udp", "udp6"]
    } else {
        &["udp", "udp6"]
    };
    for file in files {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        total += parse_recv_queues(&text, &inodes);
    }
    total
}

/// Sums `rx_queue` of the lines of a /proc/net/tcp file whose inode is in
/// `inodes`.
fn parse_recv_queues(text: &str, inodes: &std::collections::HashSet<u32>) -> u64 {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout inode
            let inode: u32 = f.get(9)?.parse().ok()?;
            if !inodes.contains(&inode) {
                return None;
            }
            let rx = f.get(4)?.split(':').nth(1)?;
            u64::from_str_radix(rx, 16).ok()
        })
        .sum()
}

#[derive(Debug, Default)]
struct Previous {
    at: Option<std::time::Instant>,
    cpu_ticks: u64,
    switches: u64,
    thread_cpu_ns: std::collections::HashMap<u32, u64>,
}

/// Reads /proc each interval and turns counters into rates.
#[derive(Debug, Default)]
pub struct ProcSampler {
    prev: std::collections::HashMap<u32, Previous>,
    /// Leave TCP receive queues out of `recv_queue_bytes` (the caller adds
    /// them from the TCP tracker).
    pub no_tcp_queues: bool,
}

/// Clock ticks per second (for /proc/PID/stat times).
fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

fn page_size() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as f64
}

/// `se.exec_start` (ms) of a task: the scheduler clock when it last ran.
fn exec_start_ms(path: &str) -> Option<f64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with("se.exec_start"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

impl ProcSampler {
    /// A sampler that leaves TCP receive queues out.
    pub fn without_tcp_queues() -> Self {
        Self {
            no_tcp_queues: true,
            ..Self::default()
        }
    }

    /// Forgets a process (it exited or was replaced).
    pub fn forget(&mut self, pid: u32) {
        self.prev.remove(&pid);
    }

    /// Samples `pid`; `None` when it is gone. Rates are 0 on the first call.
    pub fn sample(&mut self, pid: u32) -> Option<ProcSample> {
        let stat = crate::target::ProcStat::read(pid).ok()?;
        let now = std::time::Instant::now();
        let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
        let rss_pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        let tids = crate::target::threads(pid).unwrap_or_default();
        let self_start = exec_start_ms("/proc/thread-self/sched");
        let prev = self.prev.entry(pid).or_default();
        let dt = prev.at.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        let ticks = stat.utime + stat.stime;
        let cpu_pct = if dt > 0.0 {
            100.0 * ticks.saturating_sub(prev.cpu_ticks) as f64 / ticks_per_s() / dt
        } else {
            0.0
        };
        let mut switches = 0;
        let mut thread_cpu = std::collections::HashMap::new();
        let mut top = Vec::new();
        let mut blocked = Vec::new();
        for tid in tids.iter().copied() {
            let base = format!("/proc/{pid}/task/{tid}");
            // schedstat: ns on CPU, ns waiting, times scheduled in.
            let Some(sched) = std::fs::read_to_string(format!("{base}/schedstat")).ok() else {
                continue;
            };
            let mut f = sched.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
            let (run_ns, _, slices) = (f.next().unwrap_or(0), f.next(), f.next().unwrap_or(0));
            switches += slices;
            let Ok(ts) = crate::target::ProcStat::read_path(&format!("{base}/stat")) else {
                continue;
            };
            if dt > 0.0 {
                let was = prev.thread_cpu_ns.get(&tid).copied().unwrap_or(run_ns);
                top.push((
                    tid,
                    ts.comm.clone(),
                    100.0 * run_ns.saturating_sub(was) as f64 / 1e9 / dt,
                ));
            }
            thread_cpu.insert(tid, run_ns);
            let idle_s = if matches!(ts.state, 'S' | 'D') {
                self_start
                    .zip(exec_start_ms(&format!("{base}/sched")))
                    .map_or(0.0, |(n, t)| ((n - t) / 1e3).max(0.0))
            } else {
                0.0
            };
            blocked.push((ts.comm, idle_s));
        }
        let ctx_switches_per_s = if dt > 0.0 {
            switches.saturating_sub(prev.switches) as f64 / dt
        } else {
            0.0
        };
        top.sort_by(|a, b| b.2.total_cmp(&a.2));
        top.truncate(5);
        *prev = Previous {
            at: Some(now),
            cpu_ticks: ticks,
            switches,
            thread_cpu_ns: thread_cpu,
        };
        Some(ProcSample {
            cpu_pct,
            rss_bytes: rss_pages * page_size(),
            threads: tids.len(),
            fds,
            ctx_switches_per_s,
            top_threads: top,
            blocked,
            recv_queue_bytes: recv_queue_bytes(pid, !self.no_tcp_queues),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that our own process samples sensibly: a busy thread shows as
    /// CPU use, and memory, threads and descriptors are there.
    #[test]
    fn samples_self() {
        let pid = std::process::id();
        let mut sampler = ProcSampler::default();
        let first = sampler.sample(pid).expect("self");
        assert_eq!(first.cpu_pct, 0.0, "no rate on the first sample");
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(300) {
            std::hint::black_box(0u64);
        }
        let s = sampler.sample(pid).expect("self");
        assert!(s.cpu_pct > 30.0, "{s:?}");
        assert!(s.rss_bytes > 1e6 && s.threads >= 1 && s.fds >= 3, "{s:?}");
        assert!(!s.top_threads.is_empty() && s.top_threads[0].2 > 30.0, "{s:?}");
        assert!(sampler.sample(4_194_310).is_none(), "no such process");
    }

    /// Test the /proc/net/tcp receive queue parser.
    #[test]
    fn recv_queues() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:270F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0 100 0 0 10 0
   1: 0100007F:270F 0100007F:C350 01 00000000:00000400 00:00000000 00000000     0        0 2222 1 0 20 4 30 10 -1
   2: 0100007F:270F 0100007F:C351 01 00000000:00000010 00:00000000 00000000     0        0 3333 1 0 20 4 30 10 -1
";
        let mine: std::collections::HashSet<u32> = [1111, 2222].into();
        assert_eq!(parse_recv_queues(text, &mine), 0x400);
    }

    /// Test that history is bounded: a day of samples keeps an hour, at
    /// one a second and at ten a second; at one every 5 s, an hour too.
    #[test]
    fn bounded_history() {
        let mut s = Series::default();
        for t in 0..86_400 {
            s.push(f64::from(t), 1.0);
        }
        assert_eq!(s.len(), 3601);
        assert_eq!(s.window(60.0).count(), 60);
        let mut fast = Series::default();
        for t in 0..864_000 {
            fast.push(f64::from(t) / 10.0, 1.0);
        }
        assert_eq!(fast.len(), MAX_POINTS);
        let mut slow = Series::default();
        for t in 0..20_000 {
            slow.push(f64::from(t) * 5.0, 1.0);
        }
        assert_eq!(slow.len(), 721);
        assert!(slow.covers(3600.0) && !Series::default().covers(1.0));
    }
}

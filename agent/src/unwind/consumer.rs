//! The thread that drains DWARF samples from the kernel's ring buffer,
//! unwinds them while the target lives, and aggregates the result.
//!
//! The eBPF side never wakes us (no per-sample wakeup cost on the target):
//! this thread polls every 20 ms, which an 8 MiB buffer absorbs at well
//! over 999 Hz of 16 KiB samples.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use flamewatch_common::{offcpu::OffEnd, sample_flags, StackSampleHeader};
use framehop::x86_64::CacheX86_64;

use super::{
    check::{Checker, FpCheckStats},
    Ending, FileCache, ProcessUnwinder, UnwindStats,
};
use crate::aggregate::{LostReason, RawProfile, RawSampleKey, StackSlot, Weight};

/// How often the ring buffer is drained while samples arrive.
pub const POLL: Duration = Duration::from_millis(20);
/// How often it is drained while only `--unwind auto`'s check copies
/// arrive (see `unwind::check`).
pub const CHECK_POLL: Duration = Duration::from_millis(100);
/// How often it is drained while none do (continuous profiling at a low
/// rate, or only frame-pointer targets): a wakeup costs tens of µs in a VM,
/// and 8 MiB hold over half a second even at 999 Hz of 16 KiB samples.
pub const IDLE_POLL: Duration = Duration::from_millis(200);

/// A stack sample record: its header and the copied user stack (cut at
/// the record's end whatever `stack_len` claims). None when shorter than
/// the header.
pub fn decode_sample(bytes: &[u8]) -> Option<(StackSampleHeader, &[u8])> {
    let header = std::mem::size_of::<StackSampleHeader>();
    if bytes.len() < header {
        return None;
    }
    // SAFETY: the slice holds a StackSampleHeader (plain old data: any bytes
    // are a value); read unaligned: ring buffer records are 8-aligned, but
    // do not rely on it.
    let h: StackSampleHeader = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let end = header.saturating_add(h.stack_len as usize).min(bytes.len());
    Some((h, &bytes[header..end]))
}

/// What the consumer shares with the session while it runs.
#[derive(Default)]
pub struct Shared {
    /// CPU time the thread has used, ns (the governor charges it to the
    /// targets: it grows with the sampling rate).
    pub cpu_ns: AtomicU64,
    /// Part of `cpu_ns` spent loading unwind tables of newly mapped files:
    /// a one-time cost per file, not one that grows with the rate.
    pub setup_ns: AtomicU64,
    /// Per-target unwinding counters.
    pub stats: Mutex<HashMap<u32, UnwindStats>>,
    /// Per-target counters of `--unwind auto`'s check (see `unwind::check`).
    pub checks: Mutex<HashMap<u32, FpCheckStats>>,
    /// Off-CPU begins known to userspace (threads already blocked when the
    /// tracer attached), joined with their ends like the kernel's.
    pub seeded: Mutex<Begins>,
    /// What was aggregated since the engine last took it ([`Consumer::take`]).
    pub fresh: Mutex<Output>,
    /// Processes whose unwinding state can go (they were removed).
    pub forget: Mutex<Vec<u32>>,
    /// New DWARF targets whose unwind tables are loaded before their first
    /// sample: a target that crashes before it was ever sampled is gone by
    /// the time its stack copy is read.
    pub prepare: Mutex<Vec<u32>>,
    /// Rounds of draining done.
    pub rounds: AtomicU64,
    /// Unwound stacks of crashing threads, by (tid, seq) of their crash
    /// event, until the engine joins them ([`MAX_CRASH_STACKS`] at most).
    pub crashes: Mutex<HashMap<(u32, u32), StackSlot>>,
}

/// Crash stacks kept for the engine: crashes are rare, and one the engine
/// has not joined within a few ticks is dropped with its event.
pub const MAX_CRASH_STACKS: usize = 64;

/// The stacks of a DWARF target thread that went off CPU, waiting for the
/// end of its block: (process, user stack, kernel stack), by (tid, seq).
pub type Begins = HashMap<(u32, u32), (u32, StackSlot, StackSlot)>;

/// What the consumer aggregated.
#[derive(Default)]
pub struct Output {
    /// On-CPU samples.
    pub cpu: RawProfile,
    /// Off-CPU blocks (weight: blocks and nanoseconds).
    pub off: RawProfile,
    /// Slow-call samples (also in `cpu`): taken past a probed call's budget.
    pub slow: RawProfile,
    /// The late part of blocks inside a probed call past its budget
    /// (the slow-call profile's off-CPU side; also in `off`).
    pub slow_off: RawProfile,
    /// Memory events of DWARF targets: new anonymous pages (`samples`
    /// pages, `period_ns` bytes).
    pub mem_faults: RawProfile,
    /// Their brk/mmap extensions (`samples` calls, `period_ns` bytes).
    pub mem_extends: RawProfile,
    /// Stacks of sampled allocations of DWARF heap targets, by (process,
    /// id of the copy): the allocations refer to them by that id.
    pub heap_stacks: HashMap<(u32, i32), StackSlot>,
    /// Blocks still in progress.
    pub begins: Begins,
}

impl Output {
    /// Moves the aggregated profiles of `other` into `self` (not the
    /// blocks in progress, which the caller keeps as it sees fit).
    fn merge_profiles(&mut self, other: &mut Output) {
        self.cpu.merge(std::mem::take(&mut other.cpu));
        self.off.merge(std::mem::take(&mut other.off));
        self.slow.merge(std::mem::take(&mut other.slow));
        self.slow_off.merge(std::mem::take(&mut other.slow_off));
        self.mem_faults.merge(std::mem::take(&mut other.mem_faults));
        self.mem_extends.merge(std::mem::take(&mut other.mem_extends));
        self.heap_stacks.extend(other.heap_stacks.drain());
    }
}

/// A running consumer.
pub struct Consumer {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    handle: JoinHandle<Output>,
}

impl Consumer {
    /// Starts draining `ring` (and `ends`, the ends of off-CPU blocks;
    /// blocks shorter than `min_block_ns` are dropped).
    pub fn start(
        ring: RingBuf<MapData>,
        ends: Option<RingBuf<MapData>>,
        min_block_ns: u64,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let (s, sh) = (stop.clone(), shared.clone());
        let handle = std::thread::Builder::new()
            .name("fw-unwind".into())
            .spawn(move || run(ring, ends, min_block_ns, &s, &sh))?;
        Ok(Self { stop, shared, handle })
    }

    /// Counters and CPU time so far.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Wakes the thread and waits until it has drained both rings at least
    /// once since now (at most half a second).
    pub fn sync(&self) {
        let start = self.shared.rounds.load(Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        while self.shared.rounds.load(Ordering::SeqCst) < start + 2 && std::time::Instant::now() < deadline {
            self.handle.thread().unpark();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Takes what was aggregated since the last call: on-CPU samples and
    /// finished off-CPU blocks. Blocks in progress stay with the consumer
    /// (their end has not come yet); a copy of them is returned.
    pub fn take(&self) -> Output {
        let Ok(mut fresh) = self.shared.fresh.lock() else {
            return Output::default();
        };
        let mut out = Output {
            begins: fresh.begins.clone(),
            ..Output::default()
        };
        out.merge_profiles(&mut fresh);
        out
    }

    /// A copy of the off-CPU blocks of DWARF targets still in progress.
    pub fn take_begins(&self) -> Begins {
        self.shared
            .fresh
            .lock()
            .map(|f| f.begins.clone())
            .unwrap_or_default()
    }

    /// Loads `pid`'s unwind tables on the consumer's next round.
    pub fn prepare(&self, pid: u32) {
        if let Ok(mut p) = self.shared.prepare.lock() {
            p.push(pid);
        }
        self.handle.thread().unpark();
    }

    /// Drops the unwinding state and counters of `pid` (it is no longer a
    /// target): the consumer's memory is bounded by the live targets.
    pub fn forget(&self, pid: u32) {
        if let Ok(mut f) = self.shared.forget.lock() {
            f.push(pid);
        }
    }

    /// Drains what is left and returns everything aggregated.
    pub fn finish(self) -> Output {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or_default()
    }
}

/// Compares one check copy's two walks into `st`.
fn check_one(checker: &mut Checker, h: &StackSampleHeader, stack: &[u8], st: &mut FpCheckStats) {
    st.received += 1;
    if h.flags & sample_flags::NO_USER_REGS != 0 || stack.is_empty() {
        return;
    }
    let n = (h.kernel_frames as usize).min(h.kernel_ips.len());
    let fp = &h.kernel_ips[..n];
    if let Some(same) = checker.compare(h.tgid, fp, (h.leaf_ret, h.leaf_offset), (h.ip, h.sp, h.bp), stack) {
        st.compared += 1;
        st.agreed += u64::from(same);
    }
}

/// Adds a memory record (`sample_flags::MEMORY`) to the memory profiles:
/// it weighs `_pad` events (pages or calls) and `period_ns` bytes.
fn add_memory(out: &mut Output, h: &StackSampleHeader, key: RawSampleKey) {
    let weight = Weight {
        samples: u64::from(h._pad.max(1)),
        period_ns: h.period_ns,
    };
    if h.flags & sample_flags::MEM_EXTEND != 0 {
        out.mem_extends.add(key, weight);
    } else {
        out.mem_faults.add(key, weight);
    }
}

fn run(
    mut ring: RingBuf<MapData>,
    mut ends: Option<RingBuf<MapData>>,
    min_block_ns: u64,
    stop: &AtomicBool,
    shared: &Shared,
) -> Output {
    let mut out = Output::default();
    // Ends whose begin was not drained yet (the two rings are read one
    // after the other), retried on the next round.
    let mut early_ends: Vec<(OffEnd, u8)> = Vec::new();
    let mut files = FileCache::default();
    let mut procs: HashMap<u32, ProcessUnwinder> = HashMap::new();
    let mut cache = CacheX86_64::new();
    let mut checker = Checker::default();
    let mut setup_ns = 0;
    let mut poll = POLL;
    loop {
        let mut records = 0usize;
        let mut checks_seen = false;
        // Stop only after a last full drain.
        let stopping = stop.load(Ordering::SeqCst);
        if let Ok(mut seeded) = shared.seeded.lock() {
            out.begins.extend(seeded.drain());
        }
        let prepare = shared
            .prepare
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        for pid in prepare {
            let t0 = crate::governor::cost::thread_cpu_ns();
            procs.entry(pid).or_default().refresh(pid, &mut files);
            setup_ns += crate::governor::cost::thread_cpu_ns().saturating_sub(t0);
        }
        let mut stats: HashMap<u32, UnwindStats> = HashMap::new();
        let mut checks: HashMap<u32, FpCheckStats> = HashMap::new();
        while let Some(item) = ring.next() {
            records += 1;
            let Some((h, stack)) = decode_sample(&item) else {
                continue;
            };
            if h.flags & sample_flags::FP_CHECK != 0 {
                // Not urgent: a check copy needs no fast polling (below).
                records -= 1;
                checks_seen = true;
                // Counted already (the aggregation map has the sample):
                // only compared.
                // Loading a file's tables is a one-time cost, as below.
                let t0 = crate::governor::cost::thread_cpu_ns();
                if checker.prepare(h.tgid, h.ip) {
                    setup_ns += crate::governor::cost::thread_cpu_ns().saturating_sub(t0);
                }
                check_one(&mut checker, &h, stack, checks.entry(h.tgid).or_default());
                continue;
            }
            let st = stats.entry(h.tgid).or_default();
            st.samples += 1;
            let user = if h.flags & sample_flags::NO_USER_REGS != 0 || stack.is_empty() {
                st.no_user_stack += 1;
                StackSlot::Lost(LostReason::NoUserStack)
            } else {
                let proc = procs.entry(h.tgid).or_default();
                if !proc.knows(h.ip) {
                    let t0 = crate::governor::cost::thread_cpu_ns();
                    proc.refresh(h.tgid, &mut files);
                    setup_ns += crate::governor::cost::thread_cpu_ns().saturating_sub(t0);
                }
                let (ips, ending) = proc.unwind(&mut cache, h.ip, h.sp, h.bp, stack);
                match ending {
                    Ending::Complete => {
                        st.complete += 1;
                        StackSlot::Frames(ips.into())
                    }
                    Ending::Window => {
                        st.truncated_window += 1;
                        StackSlot::Truncated(ips.into())
                    }
                    Ending::Error => {
                        st.truncated_error += 1;
                        StackSlot::Truncated(ips.into())
                    }
                }
            };
            let n = (h.kernel_frames as usize).min(h.kernel_ips.len());
            let kernel = if n > 0 {
                StackSlot::Frames(h.kernel_ips[..n].into())
            } else {
                StackSlot::Absent
            };
            if h.flags & sample_flags::CRASH != 0 {
                if let Ok(mut crashes) = shared.crashes.lock() {
                    if crashes.len() < MAX_CRASH_STACKS {
                        crashes.insert((h.tid, h._pad), user);
                    }
                }
                continue;
            }
            if h.flags & sample_flags::OFFCPU_BEGIN != 0 {
                // `_pad` carries the block's sequence number.
                out.begins.insert((h.tid, h._pad), (h.tgid, user, kernel));
                continue;
            }
            let key = RawSampleKey {
                tgid: h.tgid,
                tid: h.tid,
                user,
                kernel,
            };
            if h.flags & sample_flags::MEMORY != 0 {
                add_memory(&mut out, &h, key);
                continue;
            }
            if h.flags & sample_flags::HEAP != 0 {
                // `_pad` carries the allocation's stack id.
                out.heap_stacks.insert((h.tgid, h._pad as i32), key.user);
                continue;
            }
            let weight = Weight {
                samples: 1,
                period_ns: h.period_ns,
            };
            if h.flags & sample_flags::SLOW != 0 {
                out.slow.add(key.clone(), weight);
            }
            out.cpu.add(key, weight);
        }
        if let Some(ends) = ends.as_mut() {
            let mut fresh = Vec::new();
            while let Some(item) = ends.next() {
                records += 1;
                if item.len() >= std::mem::size_of::<OffEnd>() {
                    // SAFETY: the kernel wrote an OffEnd record.
                    fresh.push((
                        unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<OffEnd>()) },
                        0u8,
                    ));
                }
            }
            for (end, tries) in early_ends.drain(..).chain(fresh).collect::<Vec<_>>() {
                match out.begins.remove(&(end.tid, end.seq)) {
                    Some((tgid, user, kernel)) if end.blocked_ns >= min_block_ns => {
                        // A sampled block stands for `weight` blocks.
                        let w = u64::from(end.weight.max(1));
                        let key = RawSampleKey {
                            tgid,
                            tid: end.tid,
                            user,
                            kernel,
                        };
                        if end.slow_ns > 0 {
                            out.slow_off.add(
                                key.clone(),
                                Weight {
                                    samples: w,
                                    period_ns: end.slow_ns * w,
                                },
                            );
                        }
                        out.off.add(
                            key,
                            Weight {
                                samples: w,
                                period_ns: end.blocked_ns * w,
                            },
                        );
                    }
                    Some(_) => {}
                    None if tries < 5 => early_ends.push((end, tries + 1)),
                    None => {}
                }
            }
        }
        if let Ok(mut all) = shared.stats.lock() {
            for (pid, s) in stats {
                let t = all.entry(pid).or_default();
                t.samples += s.samples;
                t.complete += s.complete;
                t.truncated_window += s.truncated_window;
                t.truncated_error += s.truncated_error;
                t.no_user_stack += s.no_user_stack;
            }
        }
        if let Ok(mut all) = shared.checks.lock() {
            for (pid, c) in checks {
                *all.entry(pid).or_default() += c;
            }
        }
        if let Ok(mut forget) = shared.forget.lock() {
            for pid in forget.drain(..) {
                procs.remove(&pid);
                checker.forget(pid);
                if let Ok(mut all) = shared.checks.lock() {
                    all.remove(&pid);
                }
                out.begins.retain(|_, (tgid, _, _)| *tgid != pid);
                if let Ok(mut all) = shared.stats.lock() {
                    all.remove(&pid);
                }
            }
        }
        if let Ok(mut fresh) = shared.fresh.lock() {
            fresh.merge_profiles(&mut out);
            fresh.begins.clone_from(&out.begins);
        }
        shared.setup_ns.store(setup_ns, Ordering::Relaxed);
        shared
            .cpu_ns
            .store(crate::governor::cost::thread_cpu_ns(), Ordering::Relaxed);
        if stopping {
            if let Ok(mut fresh) = shared.fresh.lock() {
                out.merge_profiles(&mut fresh);
            }
            return out;
        }
        // Back off while nothing arrives; fast again as soon as it does.
        // Check copies alone back off to CHECK_POLL: 1 sample in 16 of
        // frame-pointer targets, of which 100 ms fill a quarter of the ring
        // even at 20 kHz, and fast wakeups would cost more than the check.
        poll = if records > 0 {
            POLL
        } else if checks_seen {
            (poll * 2).min(CHECK_POLL)
        } else {
            (poll * 2).min(IDLE_POLL)
        };
        shared.rounds.fetch_add(1, Ordering::SeqCst);
        // Parked, not asleep: `sync` wakes it for a final drain.
        std::thread::park_timeout(poll);
    }
}

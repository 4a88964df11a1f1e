//! On-CPU sampling: per-thread cpu-clock perf events on each target, the BPF
//! program that aggregates stacks in the kernel, and the drain that moves the
//! aggregates into a [`RawProfile`] in userspace.

pub mod perf;

use std::{
    collections::HashMap,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::Arc,
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, StackTraceMap},
    programs::{PerfEvent, ProgramFd},
    util::nr_cpus,
    Ebpf,
};
use flamewatch_common::{
    config_index, target_flags, ForeignStats, SampleKey, SampleValue, TargetInfo, TargetStats, GENERATIONS,
    MAX_TARGETS, NO_STACK,
};
use tracing::{debug, warn};

use crate::{
    aggregate::{LostReason, RawProfile, RawSampleKey, StackSlot, Weight},
    bpf::BpfError,
    target::{self, Target},
    unwind::leaf::{LeafFixer, LeafStats},
};
pub use perf::{period_for, ThreadEvent};

const EEXIST: i32 = 17;
const EFAULT: i32 = 14;

/// Errors of the sampling layer.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    /// Loading or finding a BPF object part failed.
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
    /// perf_event_open or an ioctl on it failed.
    #[error("opening a cpu-clock perf event on thread {tid} of pid {pid}: {source}")]
    PerfEvent {
        /// Target pid.
        pid: u32,
        /// Thread.
        tid: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The target is gone before we could attach.
    #[error("pid {pid} exited before sampling could start")]
    Gone {
        /// Target pid.
        pid: u32,
    },
    /// More targets than slots in the kernel tables.
    #[error("too many targets (at most {MAX_TARGETS})")]
    TooManyTargets,
    /// One perf event per thread: the target has more threads than this
    /// process may open files (RLIMIT_NOFILE, already raised to its hard limit).
    #[error(
        "pid {pid} has {threads} threads, more than the open-file limit of {limit} allows \
         (one perf event per thread; raise the hard RLIMIT_NOFILE, e.g. `ulimit -Hn`)"
    )]
    TooManyThreads {
        /// Target pid.
        pid: u32,
        /// Its threads when the limit was hit.
        threads: usize,
        /// RLIMIT_NOFILE (soft, after raising it).
        limit: u64,
    },
}

/// The open-file limit now in force (soft RLIMIT_NOFILE).
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    lim.rlim_cur
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: a target with
/// thousands of threads needs a perf event (a descriptor) for each.
/// Returns the limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// The error of a failed perf_event_open: out of descriptors becomes
/// [`SamplingError::TooManyThreads`] naming the count and the limit.
fn open_error(pid: u32, tid: u32, threads: usize, source: std::io::Error) -> SamplingError {
    match source.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => SamplingError::TooManyThreads {
            pid,
            threads,
            limit: nofile_limit(),
        },
        _ => SamplingError::PerfEvent { pid, tid, source },
    }
}

/// Opens an event on every thread of `pid`. Threads created later by a
/// thread with an event inherit it; one created meanwhile by a thread not
/// reached yet would not, so the list is read again until it holds no
/// thread without an event (as `perf record -p` does).
fn open_events(
    pid: u32,
    period_ns: u64,
    prog_fd: std::os::fd::RawFd,
) -> Result<Vec<ThreadEvent>, SamplingError> {
    let mut events = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..16 {
        let tids = target::threads(pid).map_err(|_| SamplingError::Gone { pid })?;
        let threads = tids.len();
        let new: Vec<u32> = tids.into_iter().filter(|tid| seen.insert(*tid)).collect();
        if new.is_empty() {
            break;
        }
        for tid in new {
            match ThreadEvent::open(tid, period_ns, prog_fd) {
                Ok(ev) => events.push(ev),
                // The thread exited between listing and opening: nothing to sample.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    debug!(pid, tid, "thread exited before attach")
                }
                Err(source) => return Err(open_error(pid, tid, threads, source)),
            }
        }
    }
    if events.is_empty() {
        return Err(SamplingError::Gone { pid });
    }
    Ok(events)
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> SamplingError {
    move |source| SamplingError::Map { map, source }
}

/// Takes map `name` out of `ebpf` (see [`crate::bpf::take_map`]).
fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, SamplingError> {
    Ok(crate::bpf::take_map(ebpf, name)?)
}

struct AttachedTarget {
    slot: u32,
    events: Vec<ThreadEvent>,
    /// Sampling period of this target's events.
    period_ns: u64,
    /// Events disabled by the governor.
    paused: bool,
    /// CPU time counted by events since closed (re-opened or detached).
    closed_cpu_ns: u64,
}

/// Counts of one drain.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrainStats {
    /// Distinct keys read.
    pub keys: usize,
    /// Stacks read.
    pub stacks: usize,
}

/// The sampling side of a loaded object: owns the perf events and the maps.
pub struct Sampler {
    prog_fd: ProgramFd,
    targets: HashMap<u32, AttachedTarget>,
    target_map: BpfHashMap<MapData, u32, TargetInfo>,
    config: Array<MapData, u32>,
    stats: PerCpuArray<MapData, TargetStats>,
    foreign: PerCpuArray<MapData, ForeignStats>,
    counts: Vec<PerCpuHashMap<MapData, SampleKey, SampleValue>>,
    stacks: Vec<StackTraceMap<MapData>>,
    /// Slow-call samples per generation (keys into the same stack maps).
    slow: Vec<PerCpuHashMap<MapData, SampleKey, SampleValue>>,
    /// Slow-call samples drained, until the engine takes them.
    slow_raw: RawProfile,
    generation: u32,
    ncpus: usize,
    /// Inserts the callers frame-pointer walks skip (see `unwind::leaf`).
    leaf: LeafFixer,
    /// The leaf fix-up is on (`--no-leaf-fixup` turns it off).
    leaf_fixup: bool,
}

impl Sampler {
    /// Loads the sampling program and takes its maps out of `ebpf`.
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, SamplingError> {
        const PROG: &str = "flamewatch_sample";
        let prog: &mut PerfEvent = ebpf
            .program_mut(PROG)
            .ok_or(BpfError::MissingMap(PROG))?
            .try_into()
            .map_err(|source| BpfError::Program { name: PROG, source })?;
        prog.load()
            .map_err(|source| BpfError::Program { name: PROG, source })?;
        let prog_fd = prog
            .fd()
            .and_then(|fd| fd.try_clone().map_err(Into::into))
            .map_err(|source| BpfError::Program { name: PROG, source })?;
        let ncpus = nr_cpus().map_err(|(_, e)| SamplingError::Map {
            map: "TARGET_STATS",
            source: aya::maps::MapError::IoError(e),
        })?;
        let mut sampler = Self {
            prog_fd,
            targets: HashMap::new(),
            target_map: take(ebpf, "TARGETS")?,
            config: take(ebpf, "CONFIG")?,
            stats: take(ebpf, "TARGET_STATS")?,
            foreign: take(ebpf, "FOREIGN")?,
            counts: vec![take(ebpf, "COUNTS_0")?, take(ebpf, "COUNTS_1")?],
            stacks: vec![take(ebpf, "STACKS_0")?, take(ebpf, "STACKS_1")?],
            slow: vec![take(ebpf, "SLOW_COUNTS_0")?, take(ebpf, "SLOW_COUNTS_1")?],
            slow_raw: RawProfile::default(),
            generation: 0,
            ncpus,
            leaf: LeafFixer::default(),
            leaf_fixup: true,
        };
        sampler.set_generation(0)?;
        Ok(sampler)
    }

    fn set_generation(&mut self, generation: u32) -> Result<(), SamplingError> {
        self.config
            .set(config_index::GENERATION, generation, 0)
            .map_err(map_err("CONFIG"))?;
        self.generation = generation;
        Ok(())
    }

    /// Turns the leaf fix-up on or off for the targets added from now on
    /// (off: the kernel keeps no leaf word, the agent inserts nothing).
    pub fn set_leaf_fixup(&mut self, on: bool) {
        self.leaf_fixup = on;
    }

    /// Bytes of user stack copied per DWARF sample.
    pub fn set_stack_window(&mut self, bytes: u32) -> Result<(), SamplingError> {
        self.config
            .set(config_index::STACK_WINDOW, bytes, 0)
            .map_err(map_err("CONFIG"))
    }

    /// The loaded sampling program (for calibration).
    pub fn prog_fd(&self) -> std::os::fd::RawFd {
        self.prog_fd.as_fd().as_raw_fd()
    }

    /// Starts sampling `target` every `period_ns` of its CPU time: registers
    /// it in the kernel's target table and opens an inherited cpu-clock event
    /// on each of its threads. Returns the number of threads attached.
    pub fn add_target(
        &mut self,
        target: &Target,
        kernel_stacks: bool,
        dwarf: bool,
        period_ns: Option<u64>,
    ) -> Result<usize, SamplingError> {
        let pid = target.pid;
        let used: Vec<u32> = self.targets.values().map(|t| t.slot).collect();
        let slot = (0..MAX_TARGETS)
            .find(|s| !used.contains(s))
            .ok_or(SamplingError::TooManyTargets)?;
        let zero = PerCpuValues::try_from(vec![TargetStats::default(); self.ncpus]).map_err(|e| {
            SamplingError::Map {
                map: "TARGET_STATS",
                source: e.into(),
            }
        })?;
        self.stats.set(slot, zero, 0).map_err(map_err("TARGET_STATS"))?;
        let mut flags = 0;
        if kernel_stacks {
            flags |= target_flags::KERNEL_STACKS;
        }
        if dwarf {
            flags |= target_flags::DWARF;
        }
        if !self.leaf_fixup {
            flags |= target_flags::NO_LEAF_FIXUP;
        }
        self.target_map
            .insert(pid, TargetInfo { slot, flags }, 0)
            .map_err(map_err("TARGETS"))?;
        if !dwarf && self.leaf_fixup {
            self.leaf.prepare(pid);
        }

        // Without a period the target is only registered (for the off-CPU
        // tracer, which needs its slot and stack flags): no CPU sampling.
        let Some(period_ns) = period_ns else {
            self.targets.insert(
                pid,
                AttachedTarget {
                    slot,
                    events: Vec::new(),
                    period_ns: 0,
                    paused: true,
                    closed_cpu_ns: 0,
                },
            );
            return Ok(target::threads(pid).map(|t| t.len()).unwrap_or(0));
        };
        let events = match open_events(pid, period_ns, self.prog_fd()) {
            Ok(events) => events,
            Err(e) => {
                let _ = self.target_map.remove(&pid);
                return Err(e);
            }
        };
        let n = events.len();
        self.targets.insert(
            pid,
            AttachedTarget {
                slot,
                events,
                period_ns,
                paused: false,
                closed_cpu_ns: 0,
            },
        );
        Ok(n)
    }

    /// Makes the agent's own process a target of the sampling program while
    /// `f` runs (only threads with an event of their own are sampled: the
    /// calibration thread), so that the calibration pays for the whole
    /// program path a target's sample takes: table lookup, user and kernel
    /// stack walks, map updates. What it sampled is then discarded.
    pub fn as_calibration_target<T>(&mut self, f: impl FnOnce(std::os::fd::RawFd) -> T) -> T {
        let me = std::process::id();
        // The last slot: targets take the lowest free ones, and add_target
        // clears a slot's counters before use.
        let info = TargetInfo {
            slot: MAX_TARGETS - 1,
            flags: target_flags::KERNEL_STACKS,
        };
        let registered = self.target_map.insert(me, info, 0).is_ok();
        let out = f(self.prog_fd());
        if registered {
            let _ = self.target_map.remove(&me);
            let _ = self.drain_all(&mut RawProfile::default());
        }
        out
    }

    /// Changes how `pid`'s user stacks are taken: `dwarf` (stack copies) or
    /// frame pointers, then with `fp_check` the check copies of
    /// `--unwind auto` (see `unwind::check`). Its other flags stay.
    pub fn set_unwinding(&mut self, pid: u32, dwarf: bool, fp_check: bool) -> Result<(), SamplingError> {
        let Ok(mut info) = self.target_map.get(&pid, 0) else {
            return Ok(());
        };
        info.flags &= !(target_flags::DWARF | target_flags::FP_CHECK);
        if dwarf {
            info.flags |= target_flags::DWARF;
        } else if fp_check {
            info.flags |= target_flags::FP_CHECK;
        }
        self.target_map.insert(pid, info, 0).map_err(map_err("TARGETS"))
    }

    /// The target's slot in the kernel's per-target tables.
    pub fn slot(&self, pid: u32) -> Option<u32> {
        self.targets.get(&pid).map(|t| t.slot)
    }

    /// Changes `pid`'s sampling period without detaching it or losing data.
    ///
    /// PERF_EVENT_IOC_PERIOD reaches only the events we opened, not the
    /// copies threads born since then inherited. When such threads exist, the
    /// events are re-opened on every current thread instead (closing an event
    /// frees its inherited copies); the aggregation maps are untouched.
    pub fn set_period(&mut self, pid: u32, period_ns: u64) -> Result<(), SamplingError> {
        let prog_fd = self.prog_fd();
        let Some(t) = self.targets.get_mut(&pid) else {
            return Ok(());
        };
        t.period_ns = period_ns;
        if t.paused || t.events.is_empty() {
            return Ok(());
        }
        let Ok(live) = target::threads(pid) else {
            return Ok(());
        };
        let owned: std::collections::HashSet<u32> = t.events.iter().map(|e| e.tid).collect();
        if live.iter().all(|tid| owned.contains(tid)) {
            for ev in &t.events {
                // A thread that exited keeps its (closed) event: nothing to change.
                if let Err(e) = ev.set_period(period_ns) {
                    debug!(pid, tid = ev.tid, "set period: {e}");
                }
            }
            return Ok(());
        }
        debug!(
            pid,
            "threads born since attach: re-opening events to change the period"
        );
        t.closed_cpu_ns += t.events.iter().filter_map(|e| e.read_count().ok()).sum::<u64>();
        t.events.clear();
        t.events = open_events(pid, period_ns, prog_fd)?;
        Ok(())
    }

    /// Stops sampling `pid` for now (its events stay open).
    pub fn pause(&mut self, pid: u32) {
        if let Some(t) = self.targets.get_mut(&pid) {
            for ev in &t.events {
                let _ = ev.disable();
            }
            t.paused = true;
        }
    }

    /// Resumes sampling `pid` every `period_ns`.
    pub fn resume(&mut self, pid: u32, period_ns: u64) -> Result<(), SamplingError> {
        let Some(t) = self.targets.get_mut(&pid) else {
            return Ok(());
        };
        let was_paused = t.paused;
        t.paused = false;
        self.set_period(pid, period_ns)?;
        if was_paused {
            if let Some(t) = self.targets.get(&pid) {
                for ev in &t.events {
                    let _ = ev.enable();
                }
            }
        }
        Ok(())
    }

    /// CPU time of `pid` counted by our events since it was added, ns (stops
    /// advancing while paused). A target registered without sampling is
    /// measured from /proc instead (at clock-tick resolution).
    pub fn target_cpu_ns(&self, pid: u32) -> u64 {
        self.targets.get(&pid).map_or(0, |t| {
            if t.events.is_empty() && t.period_ns == 0 {
                let ticks = target::ProcStat::read(pid).map_or(0, |s| s.utime + s.stime);
                // SAFETY: sysconf has no preconditions.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
                return ticks * 1_000_000_000 / hz;
            }
            t.closed_cpu_ns + t.events.iter().filter_map(|e| e.read_count().ok()).sum::<u64>()
        })
    }

    /// Stops sampling `pid` (closing its perf events detaches the program
    /// from it and from every thread that inherited the events). Its
    /// counters stay readable until the sampler is dropped.
    pub fn remove_target(&mut self, pid: u32) {
        if let Some(t) = self.targets.get_mut(&pid) {
            t.closed_cpu_ns += t.events.iter().filter_map(|e| e.read_count().ok()).sum::<u64>();
            t.events.clear();
            let _ = self.target_map.remove(&pid);
        }
    }

    /// Forgets `pid` entirely (after [`Self::remove_target`] and a last
    /// read of its counters): its slot is free for another target.
    pub fn forget(&mut self, pid: u32) {
        self.remove_target(pid);
        self.targets.remove(&pid);
        self.leaf.forget(pid);
    }

    /// Starts CPU sampling of a target registered without it, or resumes
    /// a paused one, every `period_ns`.
    pub fn start_sampling(&mut self, pid: u32, period_ns: u64) -> Result<(), SamplingError> {
        let prog_fd = self.prog_fd();
        let Some(t) = self.targets.get_mut(&pid) else {
            return Ok(());
        };
        if !t.events.is_empty() {
            return self.resume(pid, period_ns);
        }
        t.events = open_events(pid, period_ns, prog_fd)?;
        t.period_ns = period_ns;
        t.paused = false;
        Ok(())
    }

    /// Whether `pid` has perf events sampling it (paused or not).
    pub fn is_sampling(&self, pid: u32) -> bool {
        self.targets.get(&pid).is_some_and(|t| !t.events.is_empty())
    }

    /// Counters of one target, summed over CPUs.
    pub fn target_stats(&self, pid: u32) -> Option<TargetStats> {
        let slot = self.targets.get(&pid)?.slot;
        let per_cpu = self.stats.get(&slot, 0).ok()?;
        Some(per_cpu.iter().fold(TargetStats::default(), |mut acc, s| {
            acc.samples += s.samples;
            acc.period_ns += s.period_ns;
            acc.user_stack_collisions += s.user_stack_collisions;
            acc.user_stack_errors += s.user_stack_errors;
            acc.kernel_stack_collisions += s.kernel_stack_collisions;
            acc.kernel_stack_errors += s.kernel_stack_errors;
            acc.map_full += s.map_full;
            acc.dwarf_samples += s.dwarf_samples;
            acc.dwarf_lost += s.dwarf_lost;
            acc.dwarf_stack_unreadable += s.dwarf_stack_unreadable;
            acc.fp_checks += s.fp_checks;
            acc.fp_checks_lost += s.fp_checks_lost;
            acc
        }))
    }

    /// `user`, a frame-pointer stack of `pid` recorded outside the sampler
    /// (a crash's), with the leaf fix-up applied (see `unwind::leaf`).
    pub fn fix_leaf(&mut self, pid: u32, user: StackSlot, leaf_ret: u64, leaf_offset: u32) -> StackSlot {
        self.leaf.fix(pid, user, leaf_ret, leaf_offset, 0)
    }

    /// What the leaf fix-up did to `pid`'s frame-pointer stacks.
    pub fn leaf_stats(&self, pid: u32) -> LeafStats {
        self.leaf.stats(pid)
    }

    /// Samples that hit forked children of targets (not profiled).
    pub fn foreign_samples(&self) -> u64 {
        self.foreign
            .get(&0, 0)
            .map(|v| v.iter().map(|s| s.samples).sum())
            .unwrap_or(0)
    }

    /// Moves what the kernel aggregated into `profile`. The generation that
    /// is read stopped being written one drain ago, so no program is still
    /// writing to it; then the kernel is switched to the freshly emptied one.
    pub fn drain(&mut self, profile: &mut RawProfile) -> Result<DrainStats, SamplingError> {
        let idle = (self.generation + 1) % GENERATIONS;
        let stats = self.drain_generation(idle as usize, profile)?;
        self.set_generation(idle)?;
        Ok(stats)
    }

    /// Final drain: switch generations, let in-flight programs finish, and
    /// read both.
    pub fn drain_all(&mut self, profile: &mut RawProfile) -> Result<DrainStats, SamplingError> {
        let first = self.drain(profile)?;
        // A sampling program runs to completion in the timer interrupt that
        // started it (microseconds); a millisecond is a wide margin.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = self.drain(profile)?;
        Ok(DrainStats {
            keys: first.keys + second.keys,
            stacks: first.stacks + second.stacks,
        })
    }

    /// Sets or clears a [`target_flags`] bit of `pid` in the kernel's table.
    pub fn set_target_flag(&mut self, pid: u32, flag: u32, on: bool) -> Result<(), SamplingError> {
        let mut info = self.target_map.get(&pid, 0).map_err(map_err("TARGETS"))?;
        info.flags = if on { info.flags | flag } else { info.flags & !flag };
        self.target_map.insert(pid, info, 0).map_err(map_err("TARGETS"))
    }

    /// Takes the slow-call samples drained so far.
    pub fn take_slow(&mut self) -> RawProfile {
        std::mem::take(&mut self.slow_raw)
    }

    fn drain_generation(&mut self, g: usize, profile: &mut RawProfile) -> Result<DrainStats, SamplingError> {
        let counts = &mut self.counts[g];
        let stacks = &mut self.stacks[g];
        let (leaf, targets, fixup) = (&mut self.leaf, &self.targets, self.leaf_fixup);
        let entries = summed(counts);
        let slow = &mut self.slow[g];
        let slow_entries = summed(slow);
        let mut cache: HashMap<i32, StackSlot> = HashMap::new();
        let mut read_stack = |id: i32| -> StackSlot {
            if id == NO_STACK {
                return StackSlot::Absent;
            }
            if id < 0 {
                return match -id {
                    EEXIST => StackSlot::Lost(LostReason::Collision),
                    EFAULT => StackSlot::Absent,
                    errno => StackSlot::Lost(LostReason::Error(errno)),
                };
            }
            cache
                .entry(id)
                .or_insert_with(|| match stacks.get(&(id as u32), 0) {
                    Ok(trace) => {
                        let ips: Arc<[u64]> = trace.frames().iter().map(|f| f.ip).collect();
                        StackSlot::Frames(ips)
                    }
                    Err(_) => StackSlot::Lost(LostReason::Error(libc::ENOENT)),
                })
                .clone()
        };
        for (key, weight) in &entries {
            let mut user = read_stack(key.user_stack_id);
            // Not the calibration's own samples: they are discarded.
            if targets.contains_key(&key.tgid) && fixup {
                user = leaf.fix(key.tgid, user, key.leaf_ret, key.leaf_offset, weight.samples);
            }
            let raw = RawSampleKey {
                tgid: key.tgid,
                tid: key.tid,
                user,
                kernel: read_stack(key.kernel_stack_id),
            };
            profile.add(raw, *weight);
        }
        for (key, weight) in &slow_entries {
            let mut user = read_stack(key.user_stack_id);
            if targets.contains_key(&key.tgid) {
                // Counted by the fixer with the whole profile already.
                user = leaf.fix(key.tgid, user, key.leaf_ret, key.leaf_offset, 0);
            }
            let raw = RawSampleKey {
                tgid: key.tgid,
                tid: key.tid,
                user,
                kernel: read_stack(key.kernel_stack_id),
            };
            self.slow_raw.add(raw, *weight);
        }
        for (key, _) in &slow_entries {
            let _ = slow.remove(key);
        }
        let stack_count = cache.len();
        // Empty the generation. Stack ids are listed from the map itself so
        // stacks stored for samples that found the count map full go too.
        for (key, _) in &entries {
            let _ = counts.remove(key);
        }
        let ids: Vec<u32> = stacks.stack_ids().filter_map(Result::ok).collect();
        for id in ids {
            let _ = stacks.remove(&id);
        }
        Ok(DrainStats {
            keys: entries.len(),
            stacks: stack_count,
        })
    }
}

/// A per-CPU count map's entries, summed over the CPUs.
fn summed(counts: &PerCpuHashMap<MapData, SampleKey, SampleValue>) -> Vec<(SampleKey, Weight)> {
    counts
        .iter()
        .filter_map(|r| match r {
            Ok((key, values)) => Some((
                key,
                values.iter().fold(Weight::default(), |w, v| Weight {
                    samples: w.samples + v.count,
                    period_ns: w.period_ns + v.period_ns,
                }),
            )),
            Err(e) => {
                warn!("reading sample counts: {e}");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicBool, AtomicU32, Ordering},
            Arc,
        },
        time::Duration,
    };

    use super::*;

    /// Test that running out of descriptors while opening perf events is
    /// an error naming the thread count and the limit, and that the limit
    /// is raised to the hard one.
    #[test]
    fn emfile_names_threads_and_limit() {
        let limit = raise_nofile_limit().expect("getrlimit");
        assert_eq!(limit, nofile_limit());
        let err = open_error(7, 8, 5000, std::io::Error::from_raw_os_error(libc::EMFILE));
        let text = err.to_string();
        assert!(
            text.contains("5000 threads") && text.contains(&limit.to_string()),
            "{text}"
        );
        let other = open_error(7, 8, 5000, std::io::Error::from_raw_os_error(libc::EACCES));
        assert!(matches!(other, SamplingError::PerfEvent { tid: 8, .. }));
    }

    /// Root runs it for real; without root it is skipped, except in CI.
    fn privileged(test: &str) -> bool {
        crate::testutil::privileged(test, "needs root")
    }

    fn busy_thread(stop: Arc<AtomicBool>) -> (std::thread::JoinHandle<()>, u32) {
        let tid = Arc::new(AtomicU32::new(0));
        let seen = tid.clone();
        let handle = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            seen.store(unsafe { libc::gettid() } as u32, Ordering::SeqCst);
            let mut x = 1u64;
            while !stop.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        });
        while tid.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        (handle, tid.load(Ordering::SeqCst))
    }

    /// Makes the test process a target sampled at `hz` (frame pointers,
    /// no kernel stacks).
    fn attach_self(sampler: &mut Sampler, hz: u64) -> Target {
        let me = Target {
            pid: std::process::id(),
            comm: "test".into(),
            exe: None,
            start_time: 0,
        };
        sampler
            .add_target(&me, false, false, Some(period_for(hz)))
            .expect("attach");
        me
    }

    fn samples_by_tid(raw: &RawProfile, tid: u32) -> u64 {
        raw.samples
            .iter()
            .filter(|(k, _)| k.tid == tid)
            .map(|(_, w)| w.samples)
            .sum()
    }

    /// Test that a rate change reaches a thread born after attach (which
    /// runs an inherited copy of the event; PERF_EVENT_IOC_PERIOD is
    /// documented to reach only the event itself, so the sampler re-opens),
    /// and that CPU time keeps being counted across the re-open.
    #[test]
    fn set_period_reaches_threads_born_after_attach() {
        if !privileged("set_period_reaches_threads_born_after_attach") {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (first, first_tid) = busy_thread(stop.clone());
        let mut ebpf = crate::bpf::load(false).expect("load eBPF");
        let mut sampler = Sampler::new(&mut ebpf).expect("sampler");
        let me = attach_self(&mut sampler, 100);
        let (late, late_tid) = busy_thread(stop.clone());

        // Rates per CPU-second of each thread: other tests may share the cores.
        let cpu = |tid: u32| -> f64 {
            let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap();
            text.split_whitespace().next().unwrap().parse::<f64>().unwrap() / 1e9
        };
        let rate = |samples: u64, cpu_s: f64| samples as f64 / cpu_s.max(1e-3);
        // Enough CPU time for ~50 samples at the slow rate, however busy
        // the machine is.
        let run_for_cpu = |tid: u32, from: f64| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while cpu(tid) - from < 0.5 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        };

        let mut before = RawProfile::default();
        let late0 = cpu(late_tid);
        run_for_cpu(late_tid, late0);
        sampler.drain_all(&mut before).expect("drain");
        let late_slow = rate(samples_by_tid(&before, late_tid), cpu(late_tid) - late0);
        assert!(
            (60.0..=140.0).contains(&late_slow),
            "late thread at ~100 Hz: {late_slow}"
        );

        sampler.set_period(me.pid, period_for(1000)).expect("set period");
        let mut after = before.clone();
        let (late1, first1) = (cpu(late_tid), cpu(first_tid));
        run_for_cpu(late_tid, late1);
        run_for_cpu(first_tid, first1);
        sampler.drain_all(&mut after).expect("drain");
        let late_fast = rate(
            samples_by_tid(&after, late_tid) - samples_by_tid(&before, late_tid),
            cpu(late_tid) - late1,
        );
        let first_fast = rate(
            samples_by_tid(&after, first_tid) - samples_by_tid(&before, first_tid),
            cpu(first_tid) - first1,
        );
        stop.store(true, Ordering::Relaxed);
        first.join().unwrap();
        late.join().unwrap();
        assert!(
            (700.0..=1300.0).contains(&late_fast),
            "late thread now at ~1000 Hz: {late_fast}"
        );
        assert!(
            (700.0..=1300.0).contains(&first_fast),
            "first thread at ~1000 Hz: {first_fast}"
        );
        assert!(
            sampler.target_cpu_ns(me.pid) > 500_000_000,
            "CPU time counted across the re-open"
        );
    }

    /// Test that a warning of the kernel side reaches the agent through
    /// aya-log: with a one-entry aggregation map, a second thread's samples
    /// cannot be stored, which is counted and logged (once a second).
    #[test]
    fn ebpf_warnings_reach_the_log() {
        if !privileged("ebpf_warnings_reach_the_log") {
            return;
        }
        struct Capture(std::sync::Mutex<Vec<String>>);
        impl log::Log for Capture {
            fn enabled(&self, _: &log::Metadata<'_>) -> bool {
                true
            }
            fn log(&self, record: &log::Record<'_>) {
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("{} {}", record.level(), record.args()));
            }
            fn flush(&self) {}
        }
        static CAPTURE: Capture = Capture(std::sync::Mutex::new(Vec::new()));
        let mut ebpf = crate::bpf::load_with_aggregation_entries(1).expect("load eBPF");
        let mut logger =
            aya_log::EbpfLogger::init_with_logger(&mut ebpf, &CAPTURE).expect("aya-log in the object");
        let stop = Arc::new(AtomicBool::new(false));
        let (a, _) = busy_thread(stop.clone());
        let (b, _) = busy_thread(stop.clone());
        let mut sampler = Sampler::new(&mut ebpf).expect("sampler");
        let me = attach_self(&mut sampler, 1000);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let wanted = format!("samples of pid {} are being lost", me.pid);
        while std::time::Instant::now() < deadline
            && !CAPTURE.0.lock().unwrap().iter().any(|m| m.contains(&wanted))
        {
            std::thread::sleep(Duration::from_millis(100));
            logger.flush();
        }
        stop.store(true, Ordering::Relaxed);
        a.join().unwrap();
        b.join().unwrap();
        let lost = sampler.target_stats(me.pid).map_or(0, |s| s.map_full);
        let messages = CAPTURE.0.lock().unwrap().clone();
        assert!(lost > 0, "samples lost to the full map are counted");
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("WARN") && m.contains(&wanted)),
            "{messages:?}"
        );
        // Rate-limited: far fewer messages than lost samples.
        assert!(
            (messages.len() as u64) < lost.max(2),
            "{} messages for {lost} lost",
            messages.len()
        );
    }
}

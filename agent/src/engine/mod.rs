//! The kernel side, held open for the agent's life.
//!
//! One engine per agent process: the eBPF object is loaded once, the
//! sampling, off-CPU and TCP programs are loaded once, calibration runs once
//! (cached per boot), and targets come and go as processes do (their perf
//! events and table entries change; the object stays). Sessions do not load
//! anything: they ask for a rate on a target ([`Engine::want`]), and read the
//! intervals of their time window from the target's flight recorder.
//!
//! Every [`Engine::tick`] drains what the kernel aggregated, splits it by
//! target into one [`Interval`] each, measures what the interval cost each
//! target, lets the governor set the next rate within the target's budget
//! (shared with other agents through the claims registry), and appends the
//! interval to the target's [`Recorder`].

mod crash;
pub mod recorder;

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant, SystemTime},
};

use aya::Ebpf;
use flamewatch_common::{offcpu::OffStats, TargetStats};
use tracing::{debug, info, warn};

pub use recorder::{Collected, Interval, Recorder};

use crate::{
    aggregate::RawProfile,
    bpf,
    governor::{
        budget::{self, Admission, Claim, Registry},
        calibrate::{self, Calibration},
        cost::{self, BpfStats, IntervalInput, ProgStats},
        Decision, Governor, GovernorConfig, Observation,
    },
    memory::{self, LiveAlloc, MemDrain, MemKind, MemTracer},
    offcpu::{self, OffCpuTracer, StillBlocked},
    probes::{Latency, Location, ProbeId, Probes},
    sampling::{period_for, Sampler, SamplingError},
    symbolize::MapsCache,
    target::{self, Target},
    tcp::{summary::TcpSummary, TcpOptions, TcpTracker},
    unwind::{self, check::FpCheckStats, consumer::Consumer, UnwindMode, UnwindStats},
};

/// Name of the sampling program (for its run-time statistics).
const SAMPLE_PROG: &str = "flamewatch_sample";
/// Name of the off-CPU program.
const OFFCPU_PROG: &str = "flamewatch_offcpu";
/// Largest off-CPU sampling divisor.
const MAX_OFFCPU_EVERY: u64 = 1024;
/// Thread names remembered per target (pprof labels, per-thread towers).
const MAX_THREAD_NAMES: usize = 65_536;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The kernel side failed.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// The eBPF object failed to load.
    #[error(transparent)]
    Bpf(#[from] bpf::BpfError),
    /// Off-CPU tracing failed.
    #[error(transparent)]
    OffCpu(#[from] offcpu::OffCpuError),
    /// Other sessions use the target's overhead budget.
    #[error(transparent)]
    Budget(#[from] budget::BudgetError),
    /// Memory profiling failed.
    #[error(transparent)]
    Memory(#[from] memory::MemError),
    /// The unwinder thread could not start.
    #[error("cannot start the unwinder thread: {0}")]
    Unwinder(std::io::Error),
    /// A latency probe failed.
    #[error(transparent)]
    Probe(#[from] crate::probes::ProbeError),
    /// Off-CPU tracing asked of an engine loaded without its tables
    /// (`EngineOptions::off_cpu`): every block would be lost.
    #[error("off-CPU tracing was asked of an engine loaded without off-CPU tables")]
    NoOffCpuTables,
}

/// How the engine samples, for all its targets.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Record kernel stacks too.
    pub kernel_stacks: bool,
    /// Bytes of user stack copied per DWARF sample.
    pub stack_window: u32,
    /// Shortest off-CPU block recorded, ns.
    pub min_block_ns: u64,
    /// How user stacks are unwound.
    pub unwind: UnwindMode,
    /// Overhead budget per target, percent of its CPU time.
    pub budget_pct: f64,
    /// Size the stack-copy ring for DWARF targets and `--unwind auto`'s
    /// check (8 MiB; a page otherwise).
    pub dwarf_ring: bool,
    /// Insert the callers frame-pointer walks skip (see `unwind::leaf`).
    pub leaf_fixup: bool,
    /// Off-CPU tracing may be asked for (its tables are allocated).
    pub off_cpu: bool,
    /// The highest rate any session will ask for, when known (the
    /// aggregation maps are sized for it); the object's maximum otherwise.
    pub max_hz: Option<u64>,
    /// Track TCP state changes of the targets.
    pub tcp: bool,
    /// How much of the past each target's recorder keeps.
    pub history: Duration,
    /// Byte limit of each target's recorder.
    pub history_bytes: usize,
    /// Memory profiles may be asked for (their tables are sized so);
    /// `None`: one-entry tables, [`Engine::want_memory`] refuses.
    pub memory: Option<memory::MemoryOptions>,
}

/// A session's wish for a target: a sampling rate and whether off-CPU time
/// is traced. The engine runs each target at the highest live rate the
/// governor allows within its budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Want {
    /// Sampling rate, Hz (0: no CPU sampling wanted).
    pub hz: u64,
    /// Trace off-CPU time.
    pub off_cpu: bool,
    /// Remember thread names (pprof labels, per-thread towers).
    pub thread_names: bool,
}

/// Handle of a [`Want`], to change or withdraw it.
pub type WantId = u64;

/// One target of the engine.
pub struct Slot {
    /// The process.
    pub target: Target,
    /// How its user stacks are unwound.
    pub choice: unwind::Choice,
    /// Threads when it was added.
    pub threads_at_start: usize,
    /// Names of the threads seen (when a want asks for them).
    pub thread_names: HashMap<u32, String>,
    /// For threads blocked when off-CPU tracing started: ms blocked then.
    pub idle_at_start: HashMap<u32, f64>,
    /// Its executable mappings (for symbolizing its recorder's addresses).
    pub maps: MapsCache,
    /// The flight recorder.
    pub recorder: Recorder,
    /// When it was seen gone.
    pub exited_at: Option<SystemTime>,
    /// Overhead of the latest interval, percent of its CPU.
    pub last_pct: f64,
    /// Samples taken so far.
    pub samples: u64,
    governor: Governor,
    claim: Claim,
    wants: BTreeMap<WantId, Want>,
    off_on: bool,
    last_cpu_ns: u64,
    last_stats: TargetStats,
    last_unwind: UnwindStats,
    last_off: OffStats,
    last_leaf: crate::unwind::leaf::LeafStats,
    /// The check's counters as last read (cumulative).
    last_check: FpCheckStats,
    /// The check's counters behind the switch decision (decayed).
    verdict: FpCheckStats,
    last_tcp_events: u64,
}

impl Slot {
    fn wanted_hz(&self) -> u64 {
        self.wants.values().map(|w| w.hz).max().unwrap_or(0)
    }

    fn wants_off_cpu(&self) -> bool {
        self.wants.values().any(|w| w.off_cpu)
    }

    fn wants_names(&self) -> bool {
        self.wants.values().any(|w| w.thread_names)
    }

    /// Rate in force now (0 when paused or not sampling).
    pub fn hz(&self) -> u64 {
        if self.wanted_hz() == 0 {
            0
        } else {
            self.governor.hz()
        }
    }
}

/// Counters read at the previous tick (the engine's own deltas).
#[derive(Default)]
struct Last {
    at: Option<Instant>,
    wall: Option<SystemTime>,
    prog: ProgStats,
    off_prog: ProgStats,
    agent_cpu: u64,
    unwind_cpu: u64,
    tcp_prog: ProgStats,
    tcp_processing: u64,
}

/// The kernel side held open.
pub struct Engine {
    options: EngineOptions,
    sampler: Sampler,
    tcp: Option<TcpTracker>,
    offcpu: Option<OffCpuTracer>,
    memory: Option<MemTracer>,
    consumer: Consumer,
    calibration: Calibration,
    registry: Registry,
    slots: HashMap<u32, Slot>,
    next_want: WantId,
    off_every: u64,
    last: Last,
    crash: crash::CrashState,
    /// Latency probes (loaded at the first one).
    probes: Option<Probes>,
    /// Calibrated cost of an entry+return probe pair per call, ns.
    probe_cost_ns: Option<f64>,
    _stats: BpfStats,
    // Last: everything above holds descriptors of maps and programs of it.
    ebpf: Ebpf,
}

impl Engine {
    /// Loads the object, loads the sampling program (and the TCP programs
    /// when asked), starts the unwinder and calibrates (cached per boot).
    pub fn start(options: EngineOptions) -> Result<Self, EngineError> {
        let t0 = Instant::now();
        let stats = BpfStats::enable();
        let mut ebpf = bpf::load_with(
            options.dwarf_ring,
            options.off_cpu,
            options.max_hz,
            options.memory.as_ref(),
        )?;
        debug!("object loaded in {:?}", t0.elapsed());
        let mut sampler = Sampler::new(&mut ebpf)?;
        sampler.set_stack_window(options.stack_window)?;
        sampler.set_leaf_fixup(options.leaf_fixup);
        debug!("sampling program loaded at {:?}", t0.elapsed());
        let consumer = start_consumer(&mut ebpf, options.min_block_ns)?;
        let calibration = tokio::task::block_in_place(|| {
            sampler.as_calibration_target(|fd| calibrate::calibration(fd, || prog_stats(&ebpf, SAMPLE_PROG)))
        });
        let mut engine = Self {
            options,
            sampler,
            tcp: None,
            offcpu: None,
            memory: None,
            consumer,
            calibration,
            registry: Registry::system(),
            slots: HashMap::new(),
            next_want: 1,
            off_every: 1,
            last: Last::default(),
            crash: crash::CrashState::default(),
            probes: None,
            probe_cost_ns: None,
            _stats: stats,
            ebpf,
        };
        engine.reset_counters();
        Ok(engine)
    }

    fn reset_counters(&mut self) {
        self.last = Last {
            at: Some(Instant::now()),
            wall: Some(SystemTime::now()),
            prog: prog_stats(&self.ebpf, SAMPLE_PROG),
            off_prog: prog_stats(&self.ebpf, OFFCPU_PROG),
            agent_cpu: cost::process_cpu_ns(),
            unwind_cpu: self.unwinder_cpu_ns(),
            tcp_prog: self
                .tcp
                .as_ref()
                .map_or_else(ProgStats::default, |t| t.program_stats().0),
            tcp_processing: self.tcp.as_ref().map_or(0, TcpTracker::processing_ns),
        };
    }

    /// Attaches TCP state tracking (when the options ask for it) and
    /// tracks the targets added so far. Not essential to a profile: if it
    /// cannot attach, say why and go on without it. Called after the first
    /// targets are sampling, so that `record` starts sampling sooner.
    pub fn start_tcp(&mut self) {
        if !self.options.tcp || self.tcp.is_some() {
            return;
        }
        let t0 = Instant::now();
        match TcpTracker::new(&mut self.ebpf, TcpOptions::default()) {
            Ok(mut tcp) => {
                for &pid in self.slots.keys() {
                    if let Err(e) = tcp.add_target(pid) {
                        warn!(pid, "TCP tracking of this target failed: {e}");
                    }
                }
                self.last.tcp_prog = tcp.program_stats().0;
                self.last.tcp_processing = tcp.processing_ns();
                self.tcp = Some(tcp);
                debug!("TCP programs attached in {:?}", t0.elapsed());
            }
            Err(e) => warn!("TCP tracking unavailable: {e}"),
        }
    }

    /// The calibrated per-sample cost.
    pub fn calibration(&self) -> Calibration {
        self.calibration
    }

    /// Waits for the machine-wide admission turn (see [`Registry::admit`]):
    /// hold it from adding targets until their claims are written.
    pub async fn admit(&self) -> Admission {
        self.registry.admit().await
    }

    /// Adds `target` with a first `want`, within the budget other agents
    /// leave on it. Returns the handle of the want.
    pub fn add_target(&mut self, target: Target, want: Want) -> Result<WantId, EngineError> {
        let pid = target.pid;
        if self.slots.contains_key(&pid) {
            return Ok(self.want(pid, want));
        }
        // A target only registered (no CPU sampling wanted) costs nothing
        // to sample: it is added even when other agents use its budget.
        let budget = match self.registry.available(pid, self.options.budget_pct, None) {
            Ok(b) => b,
            Err(_) if want.hz == 0 => 0.0,
            Err(e) => return Err(e.into()),
        };
        let mut maps = MapsCache::default();
        // Mappings first: a target that exits at once is still symbolized.
        let _ = maps.capture(pid);
        let choice = unwind::choose(self.options.unwind, pid);
        if choice.dwarf {
            self.consumer.prepare(pid);
        }
        let mut governor = Governor::new(GovernorConfig {
            budget_pct: budget,
            ceiling_hz: want.hz.max(1),
            min_hz: 1,
        });
        // The calibration walks frame pointers only: a checked target pays
        // for the check's copies too.
        let per_hz = self.calibration.cost_per_hz_pct()
            * if choice.check {
                unwind::check::COST_FACTOR
            } else {
                1.0
            };
        let hz = governor.start_with_estimate(per_hz);
        if want.hz > 0 && hz < want.hz {
            info!(
                pid,
                "starting at {hz} Hz: {} Hz is predicted over the {budget:.1} % budget", want.hz
            );
        }
        let period = (want.hz > 0).then(|| period_for(hz));
        let threads = self
            .sampler
            .add_target(&target, self.options.kernel_stacks, choice.dwarf, period)?;
        if choice.check {
            self.sampler.set_unwinding(pid, false, true)?;
        }
        if let Some(Err(e)) = self.tcp.as_mut().map(|tcp| tcp.add_target(pid)) {
            warn!(pid, "TCP tracking of this target failed: {e}");
        }
        // Reserved in the claim until the first interval measures it.
        let predicted = if want.hz > 0 {
            (hz as f64 * per_hz).min(budget)
        } else {
            0.0
        };
        let session = format!("engine_{}", std::process::id());
        let slot = Slot {
            claim: self.registry.claim(pid, &session, predicted, hz),
            last_cpu_ns: self.sampler.target_cpu_ns(pid),
            target,
            choice,
            threads_at_start: threads,
            thread_names: HashMap::new(),
            idle_at_start: HashMap::new(),
            maps,
            recorder: Recorder::new(self.options.history, self.options.history_bytes),
            exited_at: None,
            last_pct: 0.0,
            samples: 0,
            governor,
            wants: BTreeMap::new(),
            off_on: false,
            last_stats: TargetStats::default(),
            last_unwind: UnwindStats::default(),
            last_off: OffStats::default(),
            last_leaf: crate::unwind::leaf::LeafStats::default(),
            last_check: FpCheckStats::default(),
            verdict: FpCheckStats::default(),
            last_tcp_events: 0,
        };
        self.slots.insert(pid, slot);
        Ok(self.want(pid, want))
    }

    /// Says what the engine does with `pid` (once everything is attached:
    /// scripts and tests take the line as "the agent is ready").
    pub fn announce(&self, pid: u32) {
        let Some(slot) = self.slots.get(&pid) else { return };
        let hz = slot.hz();
        info!(pid, comm = %slot.target.comm, threads = slot.threads_at_start, "{}, unwinding with {}: {}",
            if hz > 0 { format!("sampling at {hz} Hz") } else { "registered".to_owned() },
            if slot.choice.dwarf { "DWARF" } else { "frame pointers" }, slot.choice.reason);
    }

    /// Registers a want on `pid` and applies it at once.
    pub fn want(&mut self, pid: u32, want: Want) -> WantId {
        let id = self.next_want;
        self.next_want += 1;
        if let Some(slot) = self.slots.get_mut(&pid) {
            slot.wants.insert(id, want);
        }
        if let Err(e) = self.apply_wants(pid) {
            warn!(pid, "applying a sampling request: {e}");
        }
        id
    }

    /// Withdraws a want (a session ended).
    pub fn unwant(&mut self, pid: u32, id: WantId) {
        if let Some(slot) = self.slots.get_mut(&pid) {
            slot.wants.remove(&id);
        }
        if let Err(e) = self.apply_wants(pid) {
            warn!(pid, "withdrawing a sampling request: {e}");
        }
    }

    /// Brings the kernel side of `pid` in line with its wants: rate
    /// (highest wanted, within the budget) and off-CPU tracing.
    fn apply_wants(&mut self, pid: u32) -> Result<(), EngineError> {
        let Some(slot) = self.slots.get_mut(&pid) else {
            return Ok(());
        };
        if slot.exited_at.is_some() {
            return Ok(());
        }
        let hz = slot.wanted_hz();
        if hz == 0 {
            self.sampler.pause(pid);
        } else {
            let was_sampling = self.sampler.is_sampling(pid);
            let changed = slot.governor.set_ceiling(hz);
            let now = slot.governor.hz();
            if !was_sampling && now > 0 {
                self.sampler.start_sampling(pid, period_for(now))?;
                slot.last_cpu_ns = self.sampler.target_cpu_ns(pid);
            } else if let Some(new) = changed {
                debug!(pid, "rate request {hz} Hz: sampling at {new} Hz");
                self.sampler.resume(pid, period_for(new))?;
            } else if now > 0 {
                self.sampler.resume(pid, period_for(now))?;
            }
        }
        let off = slot.wants_off_cpu();
        if off != slot.off_on {
            slot.off_on = off;
            self.set_off_cpu(pid, off)?;
        }
        Ok(())
    }

    /// Starts or stops tracing `pid`'s off-CPU time; the program is attached
    /// while any target needs it.
    fn set_off_cpu(&mut self, pid: u32, on: bool) -> Result<(), EngineError> {
        if on && !self.options.off_cpu {
            return Err(EngineError::NoOffCpuTables);
        }
        if on && self.offcpu.is_none() {
            self.offcpu = Some(OffCpuTracer::attach(&mut self.ebpf, self.options.min_block_ns)?);
            self.last.off_prog = prog_stats(&self.ebpf, OFFCPU_PROG);
        }
        let Some(tracer) = self.offcpu.as_mut() else {
            return Ok(());
        };
        if on {
            tracer.reattach(&mut self.ebpf)?;
            let (begins, idle) = tracer.add_target(pid, self.options.stack_window as usize)?;
            if let Ok(mut seeded) = self.consumer.shared().seeded.lock() {
                seeded.extend(begins);
            }
            if let Some(slot) = self.slots.get_mut(&pid) {
                slot.idle_at_start = idle;
                if let Some(s) = self.sampler.slot(pid) {
                    slot.last_off = tracer.stats(s);
                }
            }
        } else {
            tracer.remove_target(pid)?;
            if !self.slots.values().any(|s| s.off_on) {
                tracer.detach_program(&mut self.ebpf);
            }
        }
        Ok(())
    }

    /// Starts (`Some`) or stops (`None`) a memory profile of `pid`, a
    /// target already added. Its intervals carry the memory records from
    /// the next drain on.
    pub fn want_memory(&mut self, pid: u32, kind: Option<MemKind>) -> Result<(), EngineError> {
        let Some(slot) = self.sampler.slot(pid) else {
            return Ok(());
        };
        if kind.is_some() && self.memory.is_none() {
            let options = self.options.memory.ok_or(memory::MemError::NotEnabled)?;
            self.memory = Some(MemTracer::new(&mut self.ebpf, &options)?);
        }
        let Some(m) = self.memory.as_mut() else {
            return Ok(());
        };
        match kind {
            Some(k) if m.kind(pid) != Some(k) => {
                let budget = self
                    .slots
                    .get(&pid)
                    .map_or(self.options.budget_pct, |s| s.governor.budget_pct());
                m.add(&mut self.ebpf, pid, slot, k, budget)?;
            }
            Some(_) => {}
            None => m.remove(&mut self.ebpf, pid)?,
        }
        Ok(())
    }

    /// The memory tracer, once a memory profile was asked for.
    pub fn memory(&self) -> Option<&MemTracer> {
        self.memory.as_ref()
    }

    /// The sampled allocations of `pid` still live (heap profiles).
    pub fn live_allocations(&self, pid: u32) -> Vec<LiveAlloc> {
        self.memory.as_ref().map_or_else(Vec::new, |m| m.live(pid))
    }

    /// Removes `pid` (its process went away, or nobody watches it).
    pub fn remove_target(&mut self, pid: u32) -> Option<Slot> {
        // Its crash, if that is why it went, needs the slot's mappings.
        self.collect_crashes();
        if let Some(m) = self.memory.as_mut() {
            let _ = m.remove(&mut self.ebpf, pid);
        }
        let mut slot = self.slots.remove(&pid)?;
        self.sampler.forget(pid);
        if slot.off_on {
            slot.off_on = false;
            if let Some(t) = self.offcpu.as_mut() {
                let _ = t.remove_target(pid);
                t.forget(pid);
                if !self.slots.values().any(|s| s.off_on) {
                    t.detach_program(&mut self.ebpf);
                }
            }
        }
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.remove_target(pid);
        }
        self.consumer.forget(pid);
        Some(slot)
    }

    /// A target.
    pub fn slot(&self, pid: u32) -> Option<&Slot> {
        self.slots.get(&pid)
    }

    /// The targets' pids.
    pub fn pids(&self) -> Vec<u32> {
        self.slots.keys().copied().collect()
    }

    /// The TCP tracker, when it attached.
    pub fn tcp(&self) -> Option<&TcpTracker> {
        self.tcp.as_ref()
    }

    /// TCP activity of `pid` since it was added.
    pub fn tcp_summary(&self, pid: u32) -> Option<TcpSummary> {
        self.tcp.as_ref()?.summary(pid)
    }

    /// Samples that hit forked children of targets (not profiled).
    pub fn foreign_samples(&self) -> u64 {
        self.sampler.foreign_samples()
    }

    /// Live sampling counters of `pid` (for Prometheus).
    pub fn lost_samples(&self, pid: u32) -> u64 {
        self.sampler
            .target_stats(pid)
            .map_or(0, |s| s.map_full + s.dwarf_lost)
    }

    fn unwinder_cpu_ns(&self) -> u64 {
        // The unwinder's CPU time grows with the DWARF sampling rate; the
        // one-time loading of unwind tables does not, and is housekeeping.
        let s = self.consumer.shared();
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        s.cpu_ns.load(relaxed).saturating_sub(s.setup_ns.load(relaxed))
    }

    /// One interval: drain, measure, govern, record. Returns the pids that
    /// were found gone (their slots stay until removed, with their record).
    pub fn tick(&mut self) -> Result<Vec<u32>, EngineError> {
        self.drain_and_record(Drain::Tick)
    }

    /// Records a short interval now (a session's window closes between two
    /// ticks): its data and costs count, but it is too short to steer the
    /// governor by or to show in a timeline.
    pub fn flush(&mut self) -> Result<Vec<u32>, EngineError> {
        self.drain_and_record(Drain::Flush)
    }

    /// The last interval: drains both generations of the kernel's maps and
    /// waits for the unwinder to catch up.
    pub fn final_tick(&mut self) -> Result<Vec<u32>, EngineError> {
        self.drain_and_record(Drain::Final)
    }

    /// Drains the kernel (and the unwinder) and records the interval.
    fn drain_and_record(&mut self, how: Drain) -> Result<Vec<u32>, EngineError> {
        let mut raw = RawProfile::default();
        let mut off_raw = RawProfile::default();
        let mut slow_off = RawProfile::default();
        let mut processing_ns = 0;
        if how == Drain::Final {
            cost::timed(&mut processing_ns, || self.sampler.drain_all(&mut raw))?;
        } else {
            cost::timed(&mut processing_ns, || self.sampler.drain(&mut raw))?;
        }
        if let Some(o) = self.offcpu.as_mut() {
            cost::timed(&mut processing_ns, || o.drain(&mut off_raw, &mut slow_off));
        }
        // Between ticks the unwinder drains the rings on its own schedule:
        // a window that closes now gets the stack copies taken up to now.
        if how != Drain::Tick {
            self.consumer.sync();
        }
        // Taken first: the heap drain joins sampled allocations with the
        // stacks the unwinder made of their copies.
        let mut fresh = self.consumer.take();
        let mut mem = HashMap::new();
        if let Some(m) = self.memory.as_mut() {
            let stacks = std::mem::take(&mut fresh.heap_stacks);
            cost::timed(&mut processing_ns, || mem = m.drain(stacks));
        }
        merge_memory_copies(&mut mem, &mut fresh);
        raw.merge(fresh.cpu);
        off_raw.merge(fresh.off);
        let mut slow_raw = self.sampler.take_slow();
        slow_raw.merge(fresh.slow);
        slow_off.merge(fresh.slow_off);
        self.record(
            [raw, off_raw, slow_raw, slow_off],
            mem,
            processing_ns,
            how == Drain::Tick,
        )
    }

    /// Splits a drain into one interval per target, measures what it cost
    /// each, and (`govern`: a full interval) lets the governor steer.
    #[allow(clippy::too_many_lines)]
    fn record(
        &mut self,
        [raw, off_raw, slow_raw, slow_off]: [RawProfile; 4],
        mut mem_by_pid: HashMap<u32, MemDrain>,
        processing_ns: u64,
        govern: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let now = SystemTime::now();
        let from = self.last.wall.unwrap_or(now);
        let shared = self.shared_costs(processing_ns);
        let mut cpu_by_pid = split(raw);
        let mut off_by_pid = split(off_raw);
        let mut slow_by_pid = split(slow_raw);
        let mut slow_off_by_pid = split(slow_off);
        let unwind_now = self
            .consumer
            .shared()
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let check_now = self
            .consumer
            .shared()
            .checks
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        // Samples of each target this interval (for attributing shared costs).
        let pids: Vec<u32> = self.slots.keys().copied().collect();
        let mut per: HashMap<u32, (TargetStats, UnwindStats)> = HashMap::new();
        for &pid in &pids {
            let slot = &self.slots[&pid];
            let st = self.sampler.target_stats(pid).unwrap_or_default();
            let un = unwind_now.get(&pid).copied().unwrap_or_default();
            per.insert(
                pid,
                (
                    recorder::stats_since(&st, &slot.last_stats),
                    recorder::unwind_since(&un, &slot.last_unwind),
                ),
            );
        }
        let all_samples = per.values().map(|(s, _)| s.samples).sum::<u64>().max(1);
        // Stack copies: DWARF samples, the check's copies, and memory
        // events of DWARF targets (unwound by the same thread).
        let mem_copies: HashMap<u32, u64> = mem_by_pid
            .iter()
            .map(|(p, m)| (*p, m.stats.dwarf_copies))
            .collect();
        let copies = |pid: &u32, s: &TargetStats| {
            s.dwarf_samples + s.fp_checks + mem_copies.get(pid).copied().unwrap_or(0)
        };
        let all_dwarf = per.iter().map(|(p, (s, _))| copies(p, s)).sum::<u64>().max(1);
        let all_tcp = shared.tcp_events.values().sum::<u64>().max(1);
        let mut gone = Vec::new();
        let mut worst_off_pct = 0.0f64;
        // (cost, budget) of the growth target paying the most.
        let mut worst_growth = (0.0f64, 0.0f64);
        for pid in pids {
            let (stats, unwind_delta) = per[&pid];
            let hz = self.slots[&pid].hz();
            let cpu = self.sampler.target_cpu_ns(pid);
            let sampler_slot = self.sampler.slot(pid);
            let off_now = match (self.offcpu.as_ref(), sampler_slot) {
                (Some(o), Some(s)) => o.stats(s),
                _ => OffStats::default(),
            };
            let mut leaf_now = self.sampler.leaf_stats(pid);
            if let Some(o) = self.offcpu.as_ref() {
                leaf_now += o.leaf_stats(pid);
            }
            let slot = self.slots.get_mut(&pid).expect("listed above");
            if slot.exited_at.is_some() {
                // What the last drains still found of it (in flight when it
                // exited) belongs to its report.
                let cpu = cpu_by_pid.remove(&pid).unwrap_or_default();
                let off = off_by_pid.remove(&pid).unwrap_or_default();
                let mem = mem_by_pid.remove(&pid).unwrap_or_default();
                let slow = slow_by_pid.remove(&pid).unwrap_or_default();
                let slow_off = slow_off_by_pid.remove(&pid).unwrap_or_default();
                if !cpu.samples.is_empty() || !off.samples.is_empty() || !mem.is_empty() {
                    slot.recorder.push(Interval {
                        from,
                        to: now,
                        cpu,
                        off,
                        mem,
                        slow,
                        slow_off,
                        ..Interval::default()
                    });
                }
                continue;
            }
            let cpu_delta = cpu.saturating_sub(slot.last_cpu_ns);
            slot.last_cpu_ns = cpu;
            slot.last_stats = slot.last_stats_plus(&stats);
            slot.last_unwind = unwind_now.get(&pid).copied().unwrap_or_default();
            let off_delta = recorder::off_since(&off_now, &slot.last_off);
            slot.last_off = off_now;
            let leaf_delta = leaf_now.since(slot.last_leaf);
            slot.last_leaf = leaf_now;
            let check = check_now.get(&pid).copied().unwrap_or_default();
            let check_delta = check.since(slot.last_check);
            slot.last_check = check;
            slot.samples += stats.samples;
            let tcp_delta = shared.tcp_events.get(&pid).copied().unwrap_or(0);
            let mem = mem_by_pid.remove(&pid).unwrap_or_default();
            // The memory programs' run time (DWARF copies included) and the
            // unwinding of the memory copies: what 1-in-N sampling steers.
            let mem_unwind_ns = shared.unwind_ns * mem.stats.dwarf_copies / all_dwarf;
            let mem_cost_ns = mem.cost_ns + mem_unwind_ns as f64;
            let c = cost::overhead(
                IntervalInput {
                    target_cpu_ns: cpu_delta,
                    samples: stats.samples,
                    bpf_ns: (stats.samples as f64 * shared.prog.mean_ns()) as u64
                        + (tcp_delta as f64 * shared.tcp_mean_ns) as u64
                        + off_delta.prog_ns
                        + mem.cost_ns as u64,
                    processing_ns: processing_ns * stats.samples / all_samples
                        + shared.unwind_ns * copies(&pid, &stats) / all_dwarf
                        + shared.tcp_processing_ns * tcp_delta / all_tcp,
                },
                self.calibration.interrupt_ns,
            );
            let mut interval = Interval {
                from,
                to: now,
                cpu: cpu_by_pid.remove(&pid).unwrap_or_default(),
                off: off_by_pid.remove(&pid).unwrap_or_default(),
                slow: slow_by_pid.remove(&pid).unwrap_or_default(),
                slow_off: slow_off_by_pid.remove(&pid).unwrap_or_default(),
                hz,
                cpu_wanted: slot.wanted_hz() > 0,
                cpu_ns: cpu_delta,
                overhead_ns: (c.bpf_ns + c.interrupt_ns + c.processing_ns) as f64,
                overhead_pct: c.overhead_pct,
                stats,
                unwind: unwind_delta,
                off_stats: off_delta,
                off_every: self.off_every,
                off_machine_ns: shared.off_machine_ns,
                housekeeping_ns: shared.housekeeping_ns,
                bpf_run: shared.prog,
                unwinder_ns: shared.unwind_ns * (unwind_delta.samples + check_delta.received)
                    / shared.all_unwound.max(1),
                leaf: leaf_delta,
                fp_check: check_delta,
                tail: !govern,
                bytes: 0,
                mem,
            };
            if !slot.target.is_alive() {
                warn!(pid, "target exited; reporting what was collected");
                slot.exited_at = Some(now);
                slot.recorder.push(std::mem::take(&mut interval));
                gone.push(pid);
                continue;
            }
            slot.last_pct = c.overhead_pct;
            judge_fp(&mut self.sampler, pid, slot, check_delta);
            let _ = slot.maps.capture(pid);
            if slot.wants_names() {
                remember_thread_names(slot);
            }
            slot.recorder.push(interval);
            if !govern {
                continue;
            }
            if cpu_delta >= crate::governor::MIN_SIGNAL_CPU_NS {
                worst_off_pct = worst_off_pct.max(100.0 * off_delta.prog_ns as f64 / cpu_delta as f64);
            }
            let mem_pct = 100.0 * mem_cost_ns / cpu_delta.max(1) as f64;
            // Other agents' sessions on this target may have started or ended.
            let budget = self
                .registry
                .available(pid, self.options.budget_pct, Some(&slot.claim));
            slot.governor.set_budget(budget.unwrap_or(0.0));
            if slot.wanted_hz() > 0 {
                let decision = slot.governor.observe(Observation {
                    hz,
                    overhead_pct: c.overhead_pct,
                    target_cpu_ns: cpu_delta,
                });
                apply(
                    &mut self.sampler,
                    pid,
                    &slot.governor,
                    decision,
                    hz,
                    c.overhead_pct,
                )?;
            }
            slot.claim
                .update((c.overhead_pct * 1000.0).round() / 1000.0, slot.governor.hz());
            let budget_pct = slot.governor.budget_pct();
            if let Some(m) = self.memory.as_mut() {
                match m.kind(pid) {
                    Some(MemKind::Heap) => m.govern_heap(&mut self.ebpf, pid, mem_pct, cpu_delta, budget_pct),
                    Some(MemKind::Growth) if mem_pct >= worst_growth.0 => {
                        worst_growth = (mem_pct, budget_pct);
                    }
                    Some(MemKind::Growth) => {}
                    None => {}
                }
            }
        }
        // With the last interval of a crashed target in its recorder, and
        // its slot (mappings, leaf fix-up tables) still there.
        self.collect_crashes();
        for pid in &gone {
            self.sampler.remove_target(*pid);
            if let Some(o) = self.offcpu.as_mut() {
                // The pid may be reused by an unrelated process.
                let _ = o.remove_target(*pid);
            }
        }
        if govern {
            self.govern_off_cpu(worst_off_pct)?;
            self.govern_growth(worst_growth)?;
        }
        Ok(gone)
    }

    /// Costs shared by the targets this interval, and the counters' deltas.
    fn shared_costs(&mut self, processing_ns: u64) -> SharedCosts {
        let now = Instant::now();
        let _dt = self.last.at.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        self.last.at = Some(now);
        self.last.wall = Some(SystemTime::now());
        let prog = prog_stats(&self.ebpf, SAMPLE_PROG);
        let prog_delta = prog.since(self.last.prog);
        self.last.prog = prog;
        // The sched_switch program runs on every context switch of the
        // machine. Each target pays the run time on its own switches (the
        // program times that path); the rest runs for other processes and
        // is reported as the machine's cost.
        let off_prog = prog_stats(&self.ebpf, OFFCPU_PROG);
        let off_ns = off_prog.since(self.last.off_prog).run_ns;
        self.last.off_prog = off_prog;
        let off_targets_ns: u64 = match self.offcpu.as_ref() {
            Some(o) => self
                .slots
                .iter()
                .filter_map(|(pid, s)| {
                    let slot = self.sampler.slot(*pid)?;
                    Some(o.stats(slot).prog_ns.saturating_sub(s.last_off.prog_ns))
                })
                .sum(),
            None => 0,
        };
        let unwind_cpu = self.unwinder_cpu_ns();
        let unwind_ns = unwind_cpu.saturating_sub(self.last.unwind_cpu);
        self.last.unwind_cpu = unwind_cpu;
        // TCP counters. Each target is charged, for its own TCP events, the
        // TCP programs' mean run time and the agent's event decoding.
        let mut tcp_mean_ns = 0.0;
        let mut tcp_processing_ns = 0;
        let mut tcp_events = HashMap::new();
        if let Some(tcp) = self.tcp.as_mut() {
            if let Err(e) = tokio::task::block_in_place(|| tcp.poll()) {
                warn!("TCP tracking: {e}");
            }
            let (p, _) = tcp.program_stats();
            tcp_mean_ns = p.since(self.last.tcp_prog).mean_ns();
            self.last.tcp_prog = p;
            let processing = tcp.processing_ns();
            tcp_processing_ns = processing.saturating_sub(self.last.tcp_processing);
            self.last.tcp_processing = processing;
            for (pid, slot) in self.slots.iter_mut() {
                let events = tcp.events(*pid);
                tcp_events.insert(*pid, events.saturating_sub(slot.last_tcp_events));
                slot.last_tcp_events = events;
            }
        }
        let agent_cpu = cost::process_cpu_ns();
        // Charged to the targets: not housekeeping as well.
        let housekeeping_ns = agent_cpu
            .saturating_sub(self.last.agent_cpu)
            .saturating_sub(processing_ns + unwind_ns + tcp_processing_ns);
        self.last.agent_cpu = agent_cpu;
        let all_unwound = self
            .consumer
            .shared()
            .stats
            .lock()
            .map(|s| s.values().map(|u| u.samples).sum::<u64>())
            .unwrap_or(0)
            + self
                .consumer
                .shared()
                .checks
                .lock()
                .map(|s| s.values().map(|c| c.received).sum::<u64>())
                .unwrap_or(0);
        SharedCosts {
            prog: prog_delta,
            off_machine_ns: off_ns.saturating_sub(off_targets_ns),
            unwind_ns,
            all_unwound: all_unwound.saturating_sub(
                self.slots
                    .values()
                    .map(|s| s.last_unwind.samples + s.last_check.received)
                    .sum::<u64>(),
            ),
            tcp_mean_ns,
            tcp_processing_ns,
            tcp_events,
            housekeeping_ns,
        }
    }

    /// Off-CPU cost grows with how often the targets block: trace 1
    /// switch-out in N, within the budget's share of the tightest target.
    fn govern_off_cpu(&mut self, worst_off_pct: f64) -> Result<(), EngineError> {
        let Some(o) = self.offcpu.as_mut().filter(|o| o.is_attached()) else {
            return Ok(());
        };
        let tracing: Vec<&Slot> = self.slots.values().filter(|s| s.off_on).collect();
        let budget = tracing
            .iter()
            .map(|s| s.governor.budget_pct())
            .fold(f64::MAX, f64::min);
        if tracing.is_empty() {
            return Ok(());
        }
        // Off-CPU may use the budget alone, or half of it beside CPU sampling.
        let share = if tracing.iter().all(|s| s.wanted_hz() == 0) {
            budget
        } else {
            budget / 2.0
        };
        let next = offcpu_every(self.off_every, worst_off_pct, share);
        if next != self.off_every {
            info!(
                "off-CPU tracing costs {worst_off_pct:.2} % (share of budget {share:.1} %): \
                 recording 1 switch-out in {next}"
            );
            o.set_sample_every(next)?;
            self.off_every = next;
        }
        Ok(())
    }

    /// Page-fault cost grows with the fault rate: record 1 new page in N
    /// (each weighing N), as off-CPU records 1 switch-out in N.
    fn govern_growth(&mut self, (pct, budget): (f64, f64)) -> Result<(), EngineError> {
        let Some(m) = self.memory.as_mut() else {
            return Ok(());
        };
        if budget <= 0.0 {
            return Ok(());
        }
        let every = m.fault_every();
        let next = offcpu_every(every, pct, budget);
        if next != every {
            info!("memory growth tracing costs {pct:.2} % (budget {budget:.1} %): recording 1 new page in {next}");
            m.set_fault_every(next)?;
        }
        Ok(())
    }

    /// The intervals of `pid` overlapping `[from, to]`.
    pub fn window(&self, pid: u32, from: SystemTime, to: SystemTime) -> Vec<Interval> {
        self.slots
            .get(&pid)
            .map_or_else(Vec::new, |s| s.recorder.window(from, to))
    }

    /// Threads of `pid` still blocked now, their time since `since` added to
    /// `off` (see [`offcpu::still_blocked`]).
    pub fn still_blocked(&self, pid: u32, since: SystemTime, off: &mut RawProfile) -> Vec<StillBlocked> {
        let (Some(tracer), Some(slot)) = (self.offcpu.as_ref(), self.slots.get(&pid)) else {
            return Vec::new();
        };
        let mut begins = self.consumer.take_begins();
        let now_mono = cost::monotonic_ns();
        let ago = SystemTime::now().duration_since(since).unwrap_or_default();
        let start_mono = now_mono.saturating_sub(ago.as_nanos() as u64);
        tokio::task::block_in_place(|| {
            offcpu::still_blocked(
                tracer,
                &mut begins,
                &[pid],
                &slot.idle_at_start,
                (start_mono, now_mono),
                self.options.min_block_ns,
                self.options.stack_window as usize,
                off,
            )
        })
    }

    fn probes(&mut self) -> Result<&mut Probes, EngineError> {
        if self.probes.is_none() {
            self.probes = Some(Probes::new(&mut self.ebpf)?);
        }
        Ok(self.probes.as_mut().expect("set above"))
    }

    /// Attaches a latency probe on `location` of target `pid` (added
    /// before). With a budget, samples of its threads taken while their
    /// call has run past it also go to the slow-call profile
    /// ([`Interval::slow`]).
    pub fn add_probe(
        &mut self,
        pid: u32,
        location: &Location,
        budget_ns: u64,
    ) -> Result<ProbeId, EngineError> {
        let t0 = Instant::now();
        self.probes()?;
        let probes = self.probes.as_mut().expect("loaded above");
        let id = probes.add(&mut self.ebpf, pid, location, budget_ns)?;
        debug!("probe on {} attached in {:?}", location.spec, t0.elapsed());
        if budget_ns > 0 {
            self.sampler
                .set_target_flag(pid, flamewatch_common::target_flags::SLOW_CALLS, true)?;
        }
        Ok(id)
    }

    /// Detaches probe `id`.
    pub fn remove_probe(&mut self, id: ProbeId) {
        if let Some(p) = self.probes.as_mut() {
            p.remove(&mut self.ebpf, id);
        }
    }

    /// Probe `id`'s histogram and counters so far.
    pub fn probe_latency(&self, id: ProbeId) -> Option<Latency> {
        self.probes.as_ref()?.read(id).ok()
    }

    /// What an entry+return probe pair costs a call here, ns (calibrated
    /// once, cached per boot).
    pub fn probe_cost_ns(&mut self) -> Result<f64, EngineError> {
        if let Some(c) = self.probe_cost_ns {
            return Ok(c);
        }
        self.probes()?;
        let probes = self.probes.as_mut().expect("loaded above");
        let c = tokio::task::block_in_place(|| crate::probes::calibrate::per_call_ns(probes, &mut self.ebpf));
        self.probe_cost_ns = Some(c);
        Ok(c)
    }

    /// Stops the unwinder and detaches everything (dropping does too).
    pub fn shutdown(self) {
        let Self {
            sampler,
            tcp,
            offcpu,
            memory,
            consumer,
            mut probes,
            mut ebpf,
            ..
        } = self;
        if let Some(mut m) = memory {
            m.shutdown(&mut ebpf);
        }
        if let Some(p) = probes.as_mut() {
            p.remove_all(&mut ebpf);
        }
        drop(probes);
        drop(sampler);
        if let Some(tcp) = tcp {
            tcp.detach(&mut ebpf);
        }
        drop(offcpu);
        let _ = tokio::task::block_in_place(|| consumer.finish());
        drop(ebpf);
    }
}

impl Slot {
    fn last_stats_plus(&self, d: &TargetStats) -> TargetStats {
        let mut s = self.last_stats;
        s.samples += d.samples;
        s.period_ns += d.period_ns;
        s.user_stack_collisions += d.user_stack_collisions;
        s.user_stack_errors += d.user_stack_errors;
        s.kernel_stack_collisions += d.kernel_stack_collisions;
        s.kernel_stack_errors += d.kernel_stack_errors;
        s.map_full += d.map_full;
        s.dwarf_samples += d.dwarf_samples;
        s.dwarf_lost += d.dwarf_lost;
        s.dwarf_stack_unreadable += d.dwarf_stack_unreadable;
        s.fp_checks += d.fp_checks;
        s.fp_checks_lost += d.fp_checks_lost;
        s
    }
}

/// Which kind of interval a drain records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// A full interval: it steers the governor.
    Tick,
    /// A short one, as a window closes.
    Flush,
    /// The last one: both generations, the unwinder caught up.
    Final,
}

/// What the targets share in one interval.
struct SharedCosts {
    prog: ProgStats,
    off_machine_ns: u64,
    unwind_ns: u64,
    all_unwound: u64,
    tcp_mean_ns: f64,
    tcp_processing_ns: u64,
    tcp_events: HashMap<u32, u64>,
    housekeeping_ns: u64,
}

fn prog_stats(ebpf: &Ebpf, name: &str) -> ProgStats {
    cost::program_stats(ebpf).remove(name).unwrap_or_default()
}

/// Starts the thread that unwinds DWARF samples and joins off-CPU begins
/// with their ends, for the engine's life.
fn start_consumer(ebpf: &mut Ebpf, min_block_ns: u64) -> Result<Consumer, EngineError> {
    let samples = bpf::take_map(ebpf, "STACK_SAMPLES")?;
    let ends = bpf::take_map(ebpf, "OFFCPU_ENDS")?;
    Consumer::start(samples, Some(ends), min_block_ns).map_err(EngineError::Unwinder)
}

/// Moves the memory events the unwinder aggregated (DWARF targets) into
/// each target's memory drain of the interval.
fn merge_memory_copies(mem: &mut HashMap<u32, MemDrain>, fresh: &mut crate::unwind::consumer::Output) {
    for (pid, faults) in split(std::mem::take(&mut fresh.mem_faults)) {
        mem.entry(pid).or_default().faults.merge(faults);
    }
    for (pid, extends) in split(std::mem::take(&mut fresh.mem_extends)) {
        mem.entry(pid).or_default().extends.merge(extends);
    }
}

/// Splits a drain by process.
fn split(raw: RawProfile) -> HashMap<u32, RawProfile> {
    let mut out: HashMap<u32, RawProfile> = HashMap::new();
    for (k, w) in raw.samples {
        out.entry(k.tgid).or_default().add(k, w);
    }
    out
}

/// The next 1-in-N off-CPU sampling: over its share of the budget, N grows
/// to the power of two predicted to land at 80 % of it (cost ∝ 1/N); well
/// under (40 %), N halves; in between it holds.
pub fn offcpu_every(every: u64, pct: f64, share: f64) -> u64 {
    if pct > share {
        let factor = (pct / (0.8 * share)).ceil().max(2.0) as u64;
        (every * factor.next_power_of_two()).min(MAX_OFFCPU_EVERY)
    } else if pct < 0.4 * share && every > 1 {
        every / 2
    } else {
        every
    }
}

/// `--unwind auto`'s check of a frame-pointer target: adds the interval's
/// comparisons, and switches the target to DWARF (one log line, with the
/// numbers) when the walks disagree too often.
fn judge_fp(sampler: &mut Sampler, pid: u32, slot: &mut Slot, delta: FpCheckStats) {
    if !slot.choice.check {
        return;
    }
    slot.verdict += delta;
    if !slot.verdict.should_switch() {
        slot.verdict.decay();
        return;
    }
    let v = slot.verdict;
    let pct = v.agreement_pct().unwrap_or(0.0);
    if let Err(e) = sampler.set_unwinding(pid, true, false) {
        warn!(
            pid,
            "cannot switch to DWARF unwinding, staying with frame pointers: {e}"
        );
        slot.choice.check = false;
        return;
    }
    slot.choice.dwarf = true;
    slot.choice.check = false;
    slot.choice.reason = format!(
        "switched to DWARF: frame pointers gave the same stack as DWARF in only {} of {} checked samples \
         ({pct:.0} %, under {:.0} %); first: {}",
        v.agreed,
        v.compared,
        100.0 - unwind::check::MAX_DISAGREE_PCT,
        slot.choice.reason
    );
    warn!(
        pid,
        "unwinding with DWARF from now on: frame-pointer walks matched DWARF in {} of {} checked samples \
         ({pct:.0} %, under {:.0} %)",
        v.agreed,
        v.compared,
        100.0 - unwind::check::MAX_DISAGREE_PCT
    );
}

/// Carries out a governor decision, logging each change of rate.
fn apply(
    sampler: &mut Sampler,
    pid: u32,
    governor: &Governor,
    decision: Decision,
    was: u64,
    pct: f64,
) -> Result<(), SamplingError> {
    let budget = governor.budget_pct();
    match decision {
        Decision::Keep => {}
        Decision::SetRate(hz) => {
            info!(
                pid,
                "sampling rate {was} -> {hz} Hz (overhead {pct:.2} %, budget {budget:.1} %)"
            );
            sampler.set_period(pid, period_for(hz))?;
        }
        Decision::Pause => {
            warn!(
                pid,
                "pausing sampling: even {was} Hz costs {pct:.2} % (budget {budget:.1} %); will probe again"
            );
            sampler.pause(pid);
        }
        Decision::Resume(hz) => {
            info!(pid, "resuming sampling at {hz} Hz to measure the cost again");
            sampler.resume(pid, period_for(hz))?;
        }
    }
    Ok(())
}

fn remember_thread_names(slot: &mut Slot) {
    if slot.thread_names.len() >= MAX_THREAD_NAMES {
        return;
    }
    if let Ok(tids) = target::threads(slot.target.pid) {
        for tid in tids {
            if let std::collections::hash_map::Entry::Vacant(e) = slot.thread_names.entry(tid) {
                if let Some(name) = target::thread_comm(slot.target.pid, tid) {
                    e.insert(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that off-CPU sampling backs off fast over budget, returns
    /// gently, and holds in between.
    #[test]
    fn offcpu_sampling_steps() {
        assert_eq!(offcpu_every(1, 67.0, 5.0), 32);
        assert_eq!(offcpu_every(32, 4.0, 5.0), 32);
        assert_eq!(offcpu_every(32, 1.0, 5.0), 16);
        assert_eq!(offcpu_every(1, 1.0, 5.0), 1);
        assert_eq!(offcpu_every(512, 90.0, 5.0), MAX_OFFCPU_EVERY);
    }
}

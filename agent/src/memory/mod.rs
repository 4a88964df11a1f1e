//! Memory profiles: resident-memory growth by stack (`--mode memory`) and
//! live heap allocations by allocating stack (`--mode heap`).
//!
//! The kernel side is ebpf/src/memory.rs (page faults, brk/mmap) and
//! ebpf/src/heap.rs (allocator uprobes). This module attaches them, keeps
//! the per-target state, drains the in-kernel aggregations each interval
//! into a [`MemDrain`] per target, and lists the sampled allocations still
//! live. The engine owns one [`MemTracer`]; a session (or the daemon's
//! emergency) asks for a [`MemKind`] on a target.

pub mod dwarf;
pub mod heap;
pub mod report;

use std::{collections::HashMap, num::NonZeroU32, time::Instant};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, StackTraceMap},
    programs::{
        trace_point::TracePointLinkId,
        uprobe::{UProbeLinkId, UProbeScope},
        TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use flamewatch_common::{
    memory::{
        kinds, HeapLive, HeapPtr, HeapValue, MemRange, MemStats, MemTarget, CONFIG_FAULT_EVERY,
        CONFIG_HEAP_MEAN, CONFIG_PAGE_SIZE, SHARED_RANGES,
    },
    SampleKey, SampleValue, DWARF_STACK, NO_STACK,
};
use tracing::{debug, info};

use crate::{
    aggregate::{LostReason, RawProfile, RawSampleKey, StackSlot, Weight},
    bpf::BpfError,
    unwind::leaf::{LeafFixer, LeafStats},
};

/// What a memory profile records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemKind {
    /// Resident-memory growth: new anonymous pages, brk/mmap extensions.
    Growth,
    /// Live heap allocations (allocator uprobes, sampled by bytes).
    Heap,
}

/// Load-time sizes of the memory maps (all maps are created when the
/// object loads: they are kept small unless a session may ask for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryOptions {
    /// Sampled live allocations tracked at once (all targets). 64 Ki
    /// entries are ~6 MiB; at the default 512 KiB mean that is 32 GiB of
    /// live heap before the table is full (counted as `live_full`).
    pub live_entries: u32,
    /// Stack map buckets of growth and of heap stacks (1 KiB each).
    pub stack_entries: u32,
    /// Mean of the heap sampling interval, bytes.
    pub heap_mean: u64,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self {
            live_entries: 65_536,
            stack_entries: 4096,
            heap_mean: 512 * 1024,
        }
    }
}

/// Sizes the memory maps on `loader`: `None` shrinks them to one entry.
pub fn size_maps(loader: &mut EbpfLoader<'_>, options: Option<&MemoryOptions>) {
    match options {
        Some(o) => {
            loader.map_max_entries("HEAP_LIVE", o.live_entries);
            loader.map_max_entries("HEAP_STACKS", o.stack_entries);
            loader.map_max_entries("MEM_STACKS", o.stack_entries);
        }
        None => {
            for map in [
                "HEAP_LIVE",
                "HEAP_STACKS",
                "MEM_STACKS",
                "MEM_COUNTS",
                "MEM_EXTENDS",
                "HEAP_ALLOCS",
                "HEAP_PENDING",
            ] {
                loader.map_max_entries(map, 1);
            }
        }
    }
    loader.override_global("MEM_LAYOUT", &crate::layout::layouts().memory, true);
}

/// Errors of the memory layer.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// Loading or attaching failed.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// The engine was started without memory tables.
    #[error("memory profiles were not enabled when the engine started")]
    NotEnabled,
    /// tracefs is needed for the growth tracepoints.
    #[error("{0}")]
    Tracefs(String),
    /// This kernel lacks a tracepoint field the programs read.
    #[error("memory profiles are not supported on kernel {kernel}: {detail}")]
    Unsupported {
        /// Release.
        kernel: String,
        /// What is missing.
        detail: String,
    },
    /// No allocator with malloc and free among the target's mappings.
    #[error(
        "pid {0}: no allocator found in its mappings (glibc, jemalloc or tcmalloc exporting malloc and free)"
    )]
    NoAllocator(u32),
    /// A map operation failed.
    #[error("memory map {map}: {source}")]
    Map {
        /// Map.
        map: &'static str,
        /// Cause.
        #[source]
        source: aya::maps::MapError,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> MemError {
    move |source| MemError::Map { map, source }
}

/// Takes map `name` out of `ebpf` (see [`crate::bpf::take_map`]).
fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, MemError> {
    Ok(crate::bpf::take_map(ebpf, name)?)
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> MemError {
    move |source| BpfError::Program { name, source }.into()
}

/// The growth tracepoints: program, category, name.
const GROWTH_PROGS: [(&str, &str, &str); 3] = [
    ("flamewatch_mem_fault", "exceptions", "page_fault_user"),
    ("flamewatch_mem_mmap", "syscalls", "sys_enter_mmap"),
    ("flamewatch_mem_brk", "syscalls", "sys_enter_brk"),
];

/// Names of every memory program (for their run-time statistics).
pub const PROGRAMS: [&str; 10] = [
    "flamewatch_mem_fault",
    "flamewatch_mem_mmap",
    "flamewatch_mem_brk",
    "flamewatch_heap_malloc",
    "flamewatch_heap_calloc",
    "flamewatch_heap_realloc",
    "flamewatch_heap_memalign",
    "flamewatch_heap_posix_memalign",
    "flamewatch_heap_free",
    "flamewatch_heap_ret",
];

/// One drain interval's memory records of one target.
#[derive(Debug, Clone, Default)]
pub struct MemDrain {
    /// New anonymous pages: `samples` pages, `period_ns` bytes.
    pub faults: RawProfile,
    /// brk/mmap extensions: `samples` calls, `period_ns` bytes.
    pub extends: RawProfile,
    /// Sampled allocations: `samples` thousandths of allocations they
    /// stand for, `period_ns` bytes.
    pub allocs: RawProfile,
    /// Counters of the interval.
    pub stats: MemStats,
    /// What the memory programs cost the target, ns (probe traps included).
    pub cost_ns: f64,
    /// Whether the heap probes were attached during the interval (heap
    /// targets; false while duty-cycled off).
    pub heap_observed: bool,
    /// free() was detached at some point: allocations may be counted in
    /// use although freed.
    pub free_missed: bool,
    /// 1-in-N page sampling in force.
    pub fault_every: u64,
}

impl MemDrain {
    /// Whether it holds no records.
    pub fn is_empty(&self) -> bool {
        self.faults.samples.is_empty() && self.extends.samples.is_empty() && self.allocs.samples.is_empty()
    }
}

/// The memory records of a window of intervals, merged.
#[derive(Debug, Clone, Default)]
pub struct MemCollected {
    /// New anonymous pages.
    pub faults: RawProfile,
    /// brk/mmap extensions.
    pub extends: RawProfile,
    /// Sampled allocations.
    pub allocs: RawProfile,
    /// Counters.
    pub stats: MemStats,
    /// Cost of the memory programs, ns.
    pub cost_ns: f64,
    /// Seconds the heap probes were attached, and seconds they were not
    /// (duty cycle), with the unobserved spans `(from, to)`.
    pub observed_s: f64,
    /// See `observed_s`.
    pub unobserved_s: f64,
    /// Spans the heap probes were detached.
    pub unobserved: Vec<(std::time::SystemTime, std::time::SystemTime)>,
    /// Latest 1-in-N page sampling.
    pub fault_every: u64,
    /// See [`MemDrain::free_missed`].
    pub free_missed: bool,
}

impl MemCollected {
    /// Adds one interval.
    pub fn add(&mut self, i: &crate::engine::Interval) {
        let m = &i.mem;
        self.faults.merge(m.faults.clone());
        self.extends.merge(m.extends.clone());
        self.allocs.merge(m.allocs.clone());
        add_stats(&mut self.stats, &m.stats);
        self.cost_ns += m.cost_ns;
        self.fault_every = self.fault_every.max(m.fault_every);
        self.free_missed |= m.free_missed;
        if m.heap_observed {
            self.observed_s += i.seconds();
        } else if self.observed_s > 0.0 {
            self.unobserved_s += i.seconds();
            match self.unobserved.last_mut() {
                Some(last) if last.1 == i.from => last.1 = i.to,
                _ => self.unobserved.push((i.from, i.to)),
            }
        }
    }
}

/// A sampled allocation still live.
#[derive(Debug, Clone)]
pub struct LiveAlloc {
    /// Its stacks.
    pub key: RawSampleKey,
    /// Bytes asked for.
    pub size: u64,
    /// Bytes it stands for.
    pub weight: u64,
    /// Age, seconds.
    pub age_s: f64,
}

/// Per-hit costs of the probes on this machine, ns: the trap and the
/// program's path for a process that is not a target.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ProbeCosts {
    /// Entry uprobe.
    pub entry_ns: f64,
    /// Return uprobe.
    pub return_ns: f64,
}

/// What the tracer knows of one target.
struct MemPid {
    kind: MemKind,
    slot: u32,
    last: MemStats,
    /// Heap: the allocator and the links while attached.
    allocator: Option<heap::Allocator>,
    links: Vec<(&'static str, UProbeLinkId)>,
    /// Intervals the heap probes stay detached (duty cycle).
    off_for: u32,
    /// Intervals they stayed attached since the last pause.
    observed_in_row: u32,
    /// The latest interval's counters (for the governor).
    last_delta: MemStats,
    /// free() was detached for a while: some sampled allocations may have
    /// been freed unseen.
    free_missed: bool,
}

/// The attached memory programs.
pub struct MemTracer {
    targets: BpfHashMap<MapData, u32, MemTarget>,
    stats: PerCpuArray<MapData, MemStats>,
    config: Array<MapData, u64>,
    shared: Array<MapData, MemRange>,
    counts: PerCpuHashMap<MapData, SampleKey, SampleValue>,
    extends: PerCpuHashMap<MapData, SampleKey, SampleValue>,
    stacks: StackTraceMap<MapData>,
    brk: BpfHashMap<MapData, u32, u64>,
    live: BpfHashMap<MapData, HeapPtr, HeapLive>,
    allocs: PerCpuHashMap<MapData, SampleKey, HeapValue>,
    heap_stacks: StackTraceMap<MapData>,
    /// Stacks of DWARF heap targets' sampled allocations.
    dwarf: dwarf::DwarfStacks,
    growth_links: Vec<(&'static str, TracePointLinkId)>,
    pids: HashMap<u32, MemPid>,
    leaf: std::sync::Mutex<LeafFixer>,
    costs: Option<ProbeCosts>,
    fault_every: u64,
    heap_mean: u64,
}

impl MemTracer {
    /// Takes the memory maps of `ebpf` and loads the programs (attached
    /// per target later).
    pub fn new(ebpf: &mut Ebpf, options: &MemoryOptions) -> Result<Self, MemError> {
        let mut config: Array<MapData, u64> = take(ebpf, "MEM_CONFIG")?;
        let page = page_size();
        config
            .set(CONFIG_PAGE_SIZE, page, 0)
            .map_err(map_err("MEM_CONFIG"))?;
        config
            .set(CONFIG_HEAP_MEAN, options.heap_mean, 0)
            .map_err(map_err("MEM_CONFIG"))?;
        config
            .set(CONFIG_FAULT_EVERY, 1, 0)
            .map_err(map_err("MEM_CONFIG"))?;
        let mut rand: Array<MapData, u64> = take(ebpf, "HEAP_RAND")?;
        for (i, v) in heap::exponential_table(options.heap_mean).into_iter().enumerate() {
            rand.set(i as u32, v, 0).map_err(map_err("HEAP_RAND"))?;
        }
        let mut weights: Array<MapData, u64> = take(ebpf, "HEAP_WEIGHTS")?;
        for (i, v) in heap::weight_table(options.heap_mean).into_iter().enumerate() {
            weights.set(i as u32, v, 0).map_err(map_err("HEAP_WEIGHTS"))?;
        }
        for (name, _, _) in GROWTH_PROGS {
            let p: &mut TracePoint = program(ebpf, name)?;
            p.load().map_err(prog_err(name))?;
        }
        for name in &PROGRAMS[3..] {
            let p: &mut UProbe = program(ebpf, name)?;
            p.load().map_err(prog_err(name))?;
        }
        Ok(Self {
            targets: take(ebpf, "MEM_TARGETS")?,
            stats: take(ebpf, "MEM_STATS")?,
            config,
            shared: take(ebpf, "MEM_SHARED")?,
            counts: take(ebpf, "MEM_COUNTS")?,
            extends: take(ebpf, "MEM_EXTENDS")?,
            stacks: take(ebpf, "MEM_STACKS")?,
            brk: take(ebpf, "MEM_BRK")?,
            live: take(ebpf, "HEAP_LIVE")?,
            allocs: take(ebpf, "HEAP_ALLOCS")?,
            heap_stacks: take(ebpf, "HEAP_STACKS")?,
            // Room for every live allocation and a few drains' worth more.
            dwarf: dwarf::DwarfStacks::new(options.live_entries as usize + 4096),
            growth_links: Vec::new(),
            pids: HashMap::new(),
            leaf: Default::default(),
            costs: None,
            fault_every: 1,
            heap_mean: options.heap_mean,
        })
    }

    /// Mean of the heap sampling, bytes.
    pub fn heap_mean(&self) -> u64 {
        self.heap_mean
    }

    /// The probes' calibrated per-hit costs (heap mode measures them once).
    pub fn probe_costs(&self) -> Option<ProbeCosts> {
        self.costs
    }

    /// The allocator probed in `pid`.
    pub fn allocator(&self, pid: u32) -> Option<&heap::Allocator> {
        self.pids.get(&pid)?.allocator.as_ref()
    }

    /// Starts profiling `pid`'s memory (`slot`: its sampler slot, which
    /// indexes the counters).
    /// Heap targets get a 50 ms trial first: when the probes would cost
    /// more than `budget_pct` of a CPU, the duty cycle starts at once
    /// rather than after a whole interval at that cost.
    pub fn add(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        slot: u32,
        kind: MemKind,
        budget_pct: f64,
    ) -> Result<(), MemError> {
        if self.pids.contains_key(&pid) {
            self.remove(ebpf, pid)?;
        }
        let bits = match kind {
            MemKind::Growth => kinds::GROWTH,
            MemKind::Heap => kinds::HEAP,
        };
        let mut state = MemPid {
            kind,
            slot,
            last: MemStats::default(),
            allocator: None,
            links: Vec::new(),
            off_for: 0,
            observed_in_row: 0,
            last_delta: MemStats::default(),
            free_missed: false,
        };
        match kind {
            MemKind::Growth => {
                self.attach_growth(ebpf)?;
                self.refresh_shared(pid, slot)?;
                if let Some(brk) = heap_end(pid) {
                    self.brk.insert(pid, brk, 0).map_err(map_err("MEM_BRK"))?;
                }
            }
            MemKind::Heap => {
                if self.costs.is_none() {
                    self.costs = Some(tokio::task::block_in_place(|| calibrate(ebpf)));
                }
                let allocator = heap::find_allocator(pid).ok_or(MemError::NoAllocator(pid))?;
                info!(pid, allocator = %allocator.name, path = %allocator.path,
                    "heap profiling: probing {}", allocator.functions.join(", "));
                state.allocator = Some(allocator);
            }
        }
        self.targets
            .insert(pid, MemTarget { slot, kinds: bits }, 0)
            .map_err(map_err("MEM_TARGETS"))?;
        state.last = self.stats(slot);
        if kind == MemKind::Heap {
            attach_heap(ebpf, pid, &mut state)?;
        }
        self.pids.insert(pid, state);
        if kind == MemKind::Heap {
            self.trial(ebpf, pid, budget_pct);
        }
        Ok(())
    }

    /// Stops profiling `pid`'s memory: its probes go, its live allocations
    /// are forgotten.
    pub fn remove(&mut self, ebpf: &mut Ebpf, pid: u32) -> Result<(), MemError> {
        let Some(mut state) = self.pids.remove(&pid) else {
            return Ok(());
        };
        detach_heap(ebpf, &mut state, true);
        let _ = self.targets.remove(&pid);
        let _ = self.brk.remove(&pid);
        let stale: Vec<HeapPtr> = self
            .live
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == pid)
            .collect();
        for k in stale {
            let _ = self.live.remove(&k);
        }
        if let Ok(mut l) = self.leaf.lock() {
            l.forget(pid);
        }
        self.dwarf.forget(pid);
        if !self.pids.values().any(|p| p.kind == MemKind::Growth) {
            self.detach_growth(ebpf);
        }
        Ok(())
    }

    /// The memory kind asked of `pid`.
    pub fn kind(&self, pid: u32) -> Option<MemKind> {
        self.pids.get(&pid).map(|p| p.kind)
    }

    fn attach_growth(&mut self, ebpf: &mut Ebpf) -> Result<(), MemError> {
        if !self.growth_links.is_empty() {
            return Ok(());
        }
        crate::tcp::attach::ensure_tracefs().map_err(|e| MemError::Tracefs(e.to_string()))?;
        if let Some(why) = crate::layout::layouts().missing(crate::layout::Feature::MemoryFaults) {
            return Err(MemError::Unsupported {
                kernel: crate::layout::kernel_release(),
                detail: why.to_owned(),
            });
        }
        for (name, category, tp) in GROWTH_PROGS {
            let p: &mut TracePoint = program(ebpf, name)?;
            match p.attach(category, tp) {
                Ok(link) => self.growth_links.push((name, link)),
                // The syscall views are a second opinion: go on without one.
                Err(e) if name != "flamewatch_mem_fault" => {
                    tracing::warn!("memory growth: {category}/{tp} unavailable: {e}");
                }
                Err(source) => return Err(BpfError::Program { name, source }.into()),
            }
        }
        Ok(())
    }

    fn detach_growth(&mut self, ebpf: &mut Ebpf) {
        for (name, link) in self.growth_links.drain(..) {
            if let Ok(p) = program::<TracePoint>(ebpf, name) {
                if let Err(e) = p.detach(link) {
                    debug!("detaching {name}: {e}");
                }
            }
        }
    }

    /// Writes `pid`'s shared mappings (faults there are file pages).
    fn refresh_shared(&mut self, pid: u32, slot: u32) -> Result<(), MemError> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        let ranges = shared_ranges(&text);
        for i in 0..SHARED_RANGES {
            let r = ranges.get(i as usize).copied().unwrap_or_default();
            self.shared
                .set(slot * SHARED_RANGES + i, r, 0)
                .map_err(map_err("MEM_SHARED"))?;
        }
        Ok(())
    }

    /// Records 1 new page in `every` (each standing for `every`).
    pub fn set_fault_every(&mut self, every: u64) -> Result<(), MemError> {
        self.fault_every = every.max(1);
        self.config
            .set(CONFIG_FAULT_EVERY, self.fault_every, 0)
            .map_err(map_err("MEM_CONFIG"))
    }

    /// 1-in-N page sampling in force.
    pub fn fault_every(&self) -> u64 {
        self.fault_every
    }

    /// Counters of `slot`, summed over CPUs.
    pub fn stats(&self, slot: u32) -> MemStats {
        self.stats.get(&slot, 0).map_or_else(
            |_| MemStats::default(),
            |v| v.iter().fold(MemStats::default(), add),
        )
    }

    /// What the leaf fix-up did to `pid`'s memory stacks.
    pub fn leaf_stats(&self, pid: u32) -> LeafStats {
        self.leaf.lock().map(|l| l.stats(pid)).unwrap_or_default()
    }

    fn stack(map: &StackTraceMap<MapData>, id: i32) -> StackSlot {
        if id == NO_STACK {
            return StackSlot::Absent;
        }
        if id < 0 {
            return match -id {
                17 => StackSlot::Lost(LostReason::Collision),
                14 => StackSlot::Absent,
                e => StackSlot::Lost(LostReason::Error(e)),
            };
        }
        match map.get(&(id as u32), 0) {
            Ok(t) => StackSlot::Frames(t.frames().iter().map(|f| f.ip).collect()),
            Err(_) => StackSlot::Lost(LostReason::Error(libc::ENOENT)),
        }
    }

    fn raw_key(&self, heap: bool, key: &SampleKey, weight: u64) -> RawSampleKey {
        if heap && dwarf::DwarfStacks::is_dwarf(key) {
            return RawSampleKey {
                tgid: key.tgid,
                tid: key.tid,
                user: self.dwarf.get(key.tgid, key.user_stack_id),
                kernel: StackSlot::Absent,
            };
        }
        let map = if heap { &self.heap_stacks } else { &self.stacks };
        let user = Self::stack(map, key.user_stack_id);
        let user = match self.leaf.lock() {
            Ok(mut f) => f.fix(key.tgid, user, key.leaf_ret, key.leaf_offset, weight),
            Err(_) => user,
        };
        RawSampleKey {
            tgid: key.tgid,
            tid: key.tid,
            user,
            kernel: Self::stack(map, key.kernel_stack_id),
        }
    }

    fn drain_counts(&mut self, extends: bool, out: &mut HashMap<u32, MemDrain>) {
        let map = if extends { &self.extends } else { &self.counts };
        let entries: Vec<(SampleKey, Weight)> = map
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| {
                let w = v.iter().fold(Weight::default(), |w, x| Weight {
                    samples: w.samples + x.count,
                    period_ns: w.period_ns + x.period_ns,
                });
                (k, w)
            })
            .collect();
        for (key, w) in &entries {
            let raw = self.raw_key(false, key, w.samples);
            let d = out.entry(key.tgid).or_default();
            if extends {
                d.extends.add(raw, *w);
            } else {
                d.faults.add(raw, *w);
            }
            let map = if extends {
                &mut self.extends
            } else {
                &mut self.counts
            };
            let _ = map.remove(key);
        }
    }

    fn drain_allocs(&mut self, out: &mut HashMap<u32, MemDrain>) {
        let entries: Vec<(SampleKey, Weight)> = self
            .allocs
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| {
                let w = v.iter().fold(Weight::default(), |w, x| Weight {
                    samples: w.samples + x.milli_objects,
                    period_ns: w.period_ns + x.bytes,
                });
                (k, w)
            })
            .collect();
        for (key, w) in &entries {
            if dwarf::DwarfStacks::is_dwarf(key) && self.dwarf.wait_for(key) {
                continue;
            }
            let raw = self.raw_key(true, key, 1);
            out.entry(key.tgid).or_default().allocs.add(raw, *w);
            let _ = self.allocs.remove(key);
        }
        let live = &self.live;
        self.dwarf.prune(|| {
            live.iter()
                .filter_map(Result::ok)
                .filter(|(_, v)| v.kernel_stack_id == DWARF_STACK)
                .map(|(k, v)| (k.tgid, v.user_stack_id))
                .collect()
        });
    }

    /// Drains every target's records of the interval, with its counters
    /// and costs; refreshes the shared mappings of growth targets.
    /// `stacks`: the unwinder's fresh stacks of sampled allocations.
    pub fn drain(&mut self, stacks: HashMap<(u32, i32), StackSlot>) -> HashMap<u32, MemDrain> {
        self.dwarf.add(stacks);
        let mut out: HashMap<u32, MemDrain> = HashMap::new();
        self.drain_counts(false, &mut out);
        self.drain_counts(true, &mut out);
        self.drain_allocs(&mut out);
        let costs = self.costs.unwrap_or_default();
        let pids: Vec<u32> = self.pids.keys().copied().collect();
        for pid in pids {
            let slot = self.pids[&pid].slot;
            let now = self.stats(slot);
            let state = self.pids.get_mut(&pid).expect("listed");
            let delta = since(&now, &state.last);
            state.last = now;
            state.last_delta = delta;
            let state = &self.pids[&pid];
            let d = out.entry(pid).or_default();
            d.cost_ns = delta.prog_ns as f64
                + (delta.calls + delta.frees) as f64 * costs.entry_ns
                + delta.returns as f64 * costs.return_ns
                + delta.heap_prog_ns as f64;
            d.stats = delta;
            d.heap_observed = state.kind == MemKind::Heap && state.off_for == 0 && !state.links.is_empty();
            d.free_missed = state.free_missed;
            d.fault_every = self.fault_every;
            if state.kind == MemKind::Growth {
                let _ = self.refresh_shared(pid, slot);
            }
        }
        out
    }

    /// The sampled allocations of `pid` still live, with their age.
    pub fn live(&self, pid: u32) -> Vec<LiveAlloc> {
        let now = crate::governor::cost::monotonic_ns();
        let entries: Vec<(HeapPtr, HeapLive)> = self
            .live
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.tgid == pid)
            .collect();
        entries
            .into_iter()
            .map(|(k, v)| {
                let key = SampleKey {
                    tgid: k.tgid,
                    tid: v.tid,
                    user_stack_id: v.user_stack_id,
                    kernel_stack_id: v.kernel_stack_id,
                    leaf_ret: v.leaf_ret,
                    leaf_offset: v.leaf_offset,
                    _pad: 0,
                };
                LiveAlloc {
                    key: self.raw_key(true, &key, 0),
                    size: v.size,
                    weight: v.weight,
                    age_s: now.saturating_sub(v.ts_ns) as f64 / 1e9,
                }
            })
            .collect()
    }

    /// Keeps each heap target inside `budget_pct` of its CPU. Over it, the
    /// allocation probes are detached for as many intervals as it takes the
    /// average to come back under (a duty cycle the summary reports), then
    /// attached again. The free probe stays, so that what was sampled is
    /// still removed when freed (`inuse` stays exact for the sampled
    /// allocations); when free alone costs more than half the budget it
    /// goes too. `pct` is the interval's cost of `pid`'s memory programs,
    /// `cpu_ns` the target's CPU time in it.
    pub fn govern_heap(&mut self, ebpf: &mut Ebpf, pid: u32, pct: f64, cpu_ns: u64, budget_pct: f64) {
        let costs = self.costs.unwrap_or_default();
        let Some(state) = self.pids.get_mut(&pid).filter(|s| s.kind == MemKind::Heap) else {
            return;
        };
        if state.off_for > 0 {
            state.off_for -= 1;
            if state.off_for == 0 {
                if let Err(e) = attach_heap(ebpf, pid, state) {
                    tracing::warn!(pid, "re-attaching the heap probes: {e}");
                }
                state.observed_in_row = 0;
            }
            return;
        }
        state.observed_in_row += 1;
        if pct > budget_pct && budget_pct > 0.0 {
            let free_pct = 100.0 * state.last_delta.frees as f64 * costs.entry_ns / cpu_ns.max(1) as f64;
            let all = free_pct > 0.5 * budget_pct;
            if all {
                state.free_missed = true;
            }
            // Observing one interval in k costs pct / k on average.
            let k = (pct / (0.8 * budget_pct)).ceil().clamp(2.0, 600.0) as u32;
            info!(
                pid,
                "heap probes cost {pct:.2} % (budget {budget_pct:.1} %): observing 1 interval in {k}{}",
                if all { ", free() too" } else { "" }
            );
            detach_heap(ebpf, state, all);
            state.off_for = k - 1;
        }
    }

    /// Runs the probes of `pid` for 50 ms and starts the duty cycle when
    /// that cost more than the budget (of one CPU: the target's CPU time is
    /// not known yet; a busy allocator runs a CPU).
    fn trial(&mut self, ebpf: &mut Ebpf, pid: u32, budget_pct: f64) {
        const TRIAL: std::time::Duration = std::time::Duration::from_millis(50);
        let Some(slot) = self.pids.get(&pid).map(|p| p.slot) else {
            return;
        };
        let before = self.stats(slot);
        tokio::task::block_in_place(|| std::thread::sleep(TRIAL));
        let d = since(&self.stats(slot), &before);
        let c = self.costs.unwrap_or_default();
        let cost_ns = (d.calls + d.frees) as f64 * c.entry_ns + d.returns as f64 * c.return_ns;
        let pct = 100.0 * cost_ns / TRIAL.as_nanos() as f64;
        if let Some(state) = self.pids.get_mut(&pid) {
            state.last_delta = d;
        }
        debug!(
            pid,
            "heap probe trial: {} calls, {} frees in 50 ms, {pct:.1} %", d.calls, d.frees
        );
        if pct > budget_pct {
            self.govern_heap(ebpf, pid, pct, TRIAL.as_nanos() as u64, budget_pct);
        }
    }

    /// Whether the heap probes of `pid` are attached now.
    pub fn heap_attached(&self, pid: u32) -> bool {
        self.pids.get(&pid).is_some_and(|s| !s.links.is_empty())
    }

    /// Detaches everything (the engine shutting down).
    pub fn shutdown(&mut self, ebpf: &mut Ebpf) {
        let pids: Vec<u32> = self.pids.keys().copied().collect();
        for pid in pids {
            let _ = self.remove(ebpf, pid);
        }
        self.detach_growth(ebpf);
    }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, MemError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(BpfError::MissingMap(name))?
        .try_into()
        .map_err(prog_err(name))
}

/// Attaches the allocator probes of `state` to `pid` only (free()'s only
/// when it is not attached already: the duty cycle may have kept it).
fn attach_heap(ebpf: &mut Ebpf, pid: u32, state: &mut MemPid) -> Result<(), MemError> {
    let Some(a) = state.allocator.clone() else {
        return Ok(());
    };
    let Some(scope) = NonZeroU32::new(pid).map(UProbeScope::OneProcess) else {
        return Ok(());
    };
    for (function, prog, returns) in heap::FUNCTIONS {
        if !a.functions.contains(function) {
            continue;
        }
        let attached = state.links.iter().any(|(p, _)| *p == FREE_PROG);
        if *prog == FREE_PROG && attached {
            continue;
        }
        let mut targets = vec![(*prog, *function)];
        if *returns {
            targets.push(("flamewatch_heap_ret", *function));
        }
        for (prog, function) in targets {
            let p: &mut UProbe = program(ebpf, prog)?;
            let link = p.attach(function, &a.open_path, scope).map_err(prog_err(prog))?;
            state.links.push((prog, link));
        }
    }
    Ok(())
}

const FREE_PROG: &str = "flamewatch_heap_free";

/// Detaches the allocation probes of `state`, and free()'s with `all`.
fn detach_heap(ebpf: &mut Ebpf, state: &mut MemPid, all: bool) {
    let (gone, kept): (Vec<_>, Vec<_>) = state.links.drain(..).partition(|(p, _)| all || *p != FREE_PROG);
    state.links = kept;
    for (prog, link) in gone {
        if let Ok(p) = program::<UProbe>(ebpf, prog) {
            if let Err(e) = p.detach(link) {
                debug!("detaching {prog}: {e}");
            }
        }
    }
}

/// Measures the per-hit cost of an entry and of a return probe on this
/// machine: a libc function called in a loop in this process, with and
/// without the probe (the program's path for a non-target).
fn calibrate(ebpf: &mut Ebpf) -> ProbeCosts {
    // Each measurement runs ~10 ms: a trap can cost tens of µs on a VM.
    const SLICE: std::time::Duration = std::time::Duration::from_millis(10);
    let libc = match heap::find_allocator(std::process::id()) {
        Some(a) => a.open_path,
        None => return ProbeCosts::default(),
    };
    let run = || {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < SLICE {
            for _ in 0..16 {
                // SAFETY: getppid has no preconditions.
                std::hint::black_box(unsafe { libc::getppid() });
            }
            n += 16;
        }
        t.elapsed().as_nanos() as f64 / n as f64
    };
    let base = (0..3).map(|_| run()).fold(f64::MAX, f64::min);
    let mut probe = |prog: &'static str| -> f64 {
        let Ok(p) = program::<UProbe>(ebpf, prog) else {
            return 0.0;
        };
        let Ok(link) = p.attach("getppid", &libc, UProbeScope::CallingProcess) else {
            return 0.0;
        };
        let with = (0..3).map(|_| run()).fold(f64::MAX, f64::min);
        if let Ok(p) = program::<UProbe>(ebpf, prog) {
            let _ = p.detach(link);
        }
        (with - base).max(0.0)
    };
    let entry_ns = probe("flamewatch_heap_free");
    let return_ns = probe("flamewatch_heap_ret");
    let costs = ProbeCosts {
        entry_ns: entry_ns.round(),
        return_ns: return_ns.round(),
    };
    info!(
        "heap probes cost {} ns per entry hit and {} ns per return hit here",
        costs.entry_ns, costs.return_ns
    );
    costs
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// The end of `pid`'s `[heap]` mapping: its current break.
fn heap_end(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    crate::symbolize::parse_maps(&text)
        .into_iter()
        .find(|l| l.path == "[heap]")
        .map(|l| l.end)
}

/// The shared mappings of a maps text (`s` permission), largest first, at
/// most [`SHARED_RANGES`].
pub fn shared_ranges(maps: &str) -> Vec<MemRange> {
    let mut out: Vec<MemRange> = crate::symbolize::parse_maps(maps)
        .into_iter()
        .filter(|l| l.perms.as_bytes().get(3) == Some(&b's') && l.perms.as_bytes().get(1) == Some(&b'w'))
        .map(|l| MemRange {
            start: l.start,
            end: l.end,
        })
        .collect();
    out.sort_by_key(|r| std::cmp::Reverse(r.end - r.start));
    out.truncate(SHARED_RANGES as usize);
    out
}

fn add(mut a: MemStats, s: &MemStats) -> MemStats {
    a.faults += s.faults;
    a.new_pages += s.new_pages;
    a.unsampled += s.unsampled;
    a.shared += s.shared;
    a.lost += s.lost;
    a.extends += s.extends;
    a.prog_ns += s.prog_ns;
    a.calls += s.calls;
    a.sampled += s.sampled;
    a.frees += s.frees;
    a.sampled_frees += s.sampled_frees;
    a.live_full += s.live_full;
    a.returns += s.returns;
    a.heap_prog_ns += s.heap_prog_ns;
    a.dwarf_copies += s.dwarf_copies;
    a.dwarf_lost += s.dwarf_lost;
    a
}

/// `a - b` of cumulative counters.
pub fn since(a: &MemStats, b: &MemStats) -> MemStats {
    MemStats {
        faults: a.faults.saturating_sub(b.faults),
        new_pages: a.new_pages.saturating_sub(b.new_pages),
        unsampled: a.unsampled.saturating_sub(b.unsampled),
        shared: a.shared.saturating_sub(b.shared),
        lost: a.lost.saturating_sub(b.lost),
        extends: a.extends.saturating_sub(b.extends),
        prog_ns: a.prog_ns.saturating_sub(b.prog_ns),
        calls: a.calls.saturating_sub(b.calls),
        sampled: a.sampled.saturating_sub(b.sampled),
        frees: a.frees.saturating_sub(b.frees),
        sampled_frees: a.sampled_frees.saturating_sub(b.sampled_frees),
        live_full: a.live_full.saturating_sub(b.live_full),
        returns: a.returns.saturating_sub(b.returns),
        heap_prog_ns: a.heap_prog_ns.saturating_sub(b.heap_prog_ns),
        dwarf_copies: a.dwarf_copies.saturating_sub(b.dwarf_copies),
        dwarf_lost: a.dwarf_lost.saturating_sub(b.dwarf_lost),
    }
}

/// Sums interval counters.
pub fn add_stats(a: &mut MemStats, s: &MemStats) {
    *a = add(*a, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that only writable shared mappings are excluded from growth.
    #[test]
    fn shared_mappings_only() {
        let maps = "\
7f0000000000-7f0000100000 rw-s 00000000 00:05 123 /dev/shm/x
7f0000200000-7f0000201000 r--s 00000000 00:05 124 /usr/share/f
7f0000300000-7f0000400000 rw-p 00000000 00:00 0
";
        let r = shared_ranges(maps);
        assert_eq!(
            r,
            [MemRange {
                start: 0x7f00_0000_0000,
                end: 0x7f00_0010_0000
            }]
        );
    }
}

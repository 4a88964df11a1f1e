//! Off-CPU profiling: where target threads wait, and for how long.
//!
//! The `sched_switch` program (ebpf/src/offcpu.rs) records blocks of target
//! threads; this module attaches it, marks targets in its pid bitmap,
//! drains the in-kernel aggregation of frame-pointer targets, and lists the
//! threads still blocked (with when they left the CPU). DWARF targets' blocks
//! arrive through the unwinder's ring buffers (see `unwind::consumer`).

pub mod blocked;

use std::collections::HashMap;

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, StackTraceMap},
    programs::TracePoint,
    Ebpf,
};
use flamewatch_common::{
    offcpu::{OffStart, OffStats, CONFIG_MIN_BLOCK_NS, CONFIG_SAMPLE_EVERY},
    SampleKey, SampleValue, NO_STACK,
};

use crate::{
    aggregate::{LostReason, RawProfile, RawSampleKey, StackSlot, Weight},
    bpf::BpfError,
    unwind::{
        consumer::Begins,
        leaf::{LeafFixer, LeafStats},
    },
};

const PROG: &str = "flamewatch_offcpu";
/// Map update flag: fail if the key exists (include/uapi/linux/bpf.h).
const BPF_NOEXIST: u64 = 1;

/// Errors of the off-CPU layer.
#[derive(Debug, thiserror::Error)]
pub enum OffCpuError {
    /// Loading or attaching failed.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// tracefs is needed to attach tracepoints.
    #[error("{0}")]
    Tracefs(String),
    /// This kernel's sched_switch record lacks a field the program reads.
    #[error("off-CPU profiles are not supported on kernel {kernel}: {detail}")]
    Unsupported {
        /// Release.
        kernel: String,
        /// What is missing.
        detail: String,
    },
    /// A map operation failed.
    #[error("off-CPU map {map}: {source}")]
    Map {
        /// Map.
        map: &'static str,
        /// Cause.
        #[source]
        source: aya::maps::MapError,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> OffCpuError {
    move |source| OffCpuError::Map { map, source }
}

/// Takes map `name` out of `ebpf` (see [`crate::bpf::take_map`]).
fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, OffCpuError> {
    Ok(crate::bpf::take_map(ebpf, name)?)
}

fn program(ebpf: &mut Ebpf) -> Result<&mut TracePoint, OffCpuError> {
    Ok(ebpf
        .program_mut(PROG)
        .ok_or(BpfError::MissingMap(PROG))?
        .try_into()
        .map_err(|source| BpfError::Program { name: PROG, source })?)
}

/// A thread of a target that is off CPU right now, as the kernel saw it
/// leave.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    /// Thread.
    pub tid: u32,
    /// What the kernel recorded.
    pub start: OffStart,
}

/// The attached off-CPU tracer.
pub struct OffCpuTracer {
    config: Array<MapData, u64>,
    tgids: Array<MapData, u64>,
    start: BpfHashMap<MapData, u32, OffStart>,
    counts: PerCpuHashMap<MapData, SampleKey, SampleValue>,
    /// The late part of blocks in probed calls past their budget.
    slow: PerCpuHashMap<MapData, SampleKey, SampleValue>,
    stacks: StackTraceMap<MapData>,
    stats: PerCpuArray<MapData, OffStats>,
    /// The program's link while attached.
    link: Option<aya::programs::trace_point::TracePointLinkId>,
    /// Inserts the syscall wrappers' callers (see `unwind::leaf`); behind a
    /// lock because the pending blocks are read through `&self`.
    leaf: std::sync::Mutex<LeafFixer>,
}

impl OffCpuTracer {
    /// Loads and attaches the `sched_switch` program; blocks shorter than
    /// `min_block_ns` are not recorded.
    pub fn attach(ebpf: &mut Ebpf, min_block_ns: u64) -> Result<Self, OffCpuError> {
        crate::tcp::attach::ensure_tracefs().map_err(|e| OffCpuError::Tracefs(e.to_string()))?;
        if let Some(why) = crate::layout::layouts().missing(crate::layout::Feature::OffCpu) {
            return Err(OffCpuError::Unsupported {
                kernel: crate::layout::kernel_release(),
                detail: why.to_owned(),
            });
        }
        let mut config: Array<MapData, u64> = take(ebpf, "OFFCPU_CONFIG")?;
        config
            .set(CONFIG_MIN_BLOCK_NS, min_block_ns, 0)
            .map_err(map_err("OFFCPU_CONFIG"))?;
        let tracer = Self {
            config,
            tgids: take(ebpf, "OFFCPU_TGIDS")?,
            start: take(ebpf, "OFFCPU_START")?,
            counts: take(ebpf, "OFFCPU_COUNTS")?,
            slow: take(ebpf, "OFFCPU_SLOW")?,
            stacks: take(ebpf, "OFFCPU_STACKS")?,
            stats: take(ebpf, "OFFCPU_STATS")?,
            link: None,
            leaf: Default::default(),
        };
        let program = program(ebpf)?;
        program
            .load()
            .map_err(|source| BpfError::Program { name: PROG, source })?;
        let mut tracer = tracer;
        tracer.reattach(ebpf)?;
        Ok(tracer)
    }

    /// Attaches the loaded program to `sched_switch` again (after
    /// [`Self::detach_program`]).
    pub fn reattach(&mut self, ebpf: &mut Ebpf) -> Result<(), OffCpuError> {
        if self.link.is_none() {
            let link = program(ebpf)?
                .attach("sched", "sched_switch")
                .map_err(|source| BpfError::Program { name: PROG, source })?;
            self.link = Some(link);
        }
        Ok(())
    }

    /// Detaches the program from `sched_switch`, which it would otherwise
    /// run on on every context switch of the machine, while no target needs
    /// it. Maps and the loaded program stay.
    pub fn detach_program(&mut self, ebpf: &mut Ebpf) {
        if let (Some(link), Ok(program)) = (self.link.take(), program(ebpf)) {
            if let Err(e) = program.detach(link) {
                tracing::debug!("detaching the off-CPU program: {e}");
            }
        }
    }

    /// Whether the program runs on context switches now.
    pub fn is_attached(&self) -> bool {
        self.link.is_some()
    }

    fn set_bit(&mut self, pid: u32, on: bool) -> Result<(), OffCpuError> {
        let word = pid / 64;
        let mut value = self.tgids.get(&word, 0).map_err(map_err("OFFCPU_TGIDS"))?;
        if on {
            value |= 1 << (pid % 64);
        } else {
            value &= !(1 << (pid % 64));
        }
        self.tgids.set(word, value, 0).map_err(map_err("OFFCPU_TGIDS"))
    }

    /// Records 1 switch-out in `every` (each standing for `every`).
    pub fn set_sample_every(&mut self, every: u64) -> Result<(), OffCpuError> {
        self.config
            .set(CONFIG_SAMPLE_EVERY, every.max(1), 0)
            .map_err(map_err("OFFCPU_CONFIG"))
    }

    /// Starts recording `pid`'s blocks (it must be in the sampler's target
    /// table, which holds its slot and stack flags).
    ///
    /// Threads blocked right now will never show a switch-out: their block
    /// is started here, with the stacks /proc shows, as a begin the kernel
    /// ends like a DWARF one (the agent joins it). Returns those begins and,
    /// per thread, how long it had already been blocked (ms, estimated).
    pub fn add_target(
        &mut self,
        pid: u32,
        window: usize,
    ) -> Result<(Begins, HashMap<u32, f64>), OffCpuError> {
        self.set_bit(pid, true)?;
        let now = crate::governor::cost::monotonic_ns();
        let mut begins = Begins::new();
        let mut idle = HashMap::new();
        for (i, b) in blocked::snapshot(pid, window).into_iter().enumerate() {
            // Sequence numbers of the kernel's begins are clock bits; ours
            // count down from the top so they cannot meet.
            let seq = u32::MAX - i as u32;
            let start = OffStart {
                ts_ns: now,
                tgid: pid,
                state: 1,
                user_stack_id: NO_STACK,
                kernel_stack_id: NO_STACK,
                seq,
                dwarf: 1,
                weight: 1,
                leaf_offset: 0,
                leaf_ret: 0,
            };
            // BPF_NOEXIST: if the kernel saw it move meanwhile, keep its record.
            if self.start.insert(b.tid, start, BPF_NOEXIST).is_ok() {
                begins.insert((b.tid, seq), (pid, b.user_slot(), b.kernel_slot()));
                if let Some(ms) = b.idle_ms {
                    idle.insert(b.tid, ms);
                }
            }
        }
        Ok((begins, idle))
    }

    /// Stops recording `pid`.
    pub fn remove_target(&mut self, pid: u32) -> Result<(), OffCpuError> {
        self.set_bit(pid, false)
    }

    /// Counters of the target in `slot`, summed over CPUs.
    pub fn stats(&self, slot: u32) -> OffStats {
        self.stats.get(&slot, 0).map_or_else(
            |_| OffStats::default(),
            |v| {
                v.iter().fold(OffStats::default(), |mut a, s| {
                    a.blocks += s.blocks;
                    a.short += s.short;
                    a.unsampled += s.unsampled;
                    a.blocked_ns += s.blocked_ns;
                    a.start_full += s.start_full;
                    a.lost += s.lost;
                    a.prog_ns += s.prog_ns;
                    a
                })
            },
        )
    }

    /// Drops the leaf fix-up's state of `pid` (no longer a target).
    pub fn forget(&self, pid: u32) {
        if let Ok(mut l) = self.leaf.lock() {
            l.forget(pid);
        }
    }

    /// What the leaf fix-up did to `pid`'s frame-pointer blocks.
    pub fn leaf_stats(&self, pid: u32) -> LeafStats {
        self.leaf.lock().map(|l| l.stats(pid)).unwrap_or_default()
    }

    /// The user stack `id` of `tgid`, with the leaf's caller inserted when
    /// the kernel's word (`leaf_ret` at `leaf_offset`) is it.
    fn user_stack(&self, tgid: u32, id: i32, leaf: (u64, u32), weight: u64) -> StackSlot {
        let slot = self.stack(id);
        match self.leaf.lock() {
            Ok(mut fixer) => fixer.fix(tgid, slot, leaf.0, leaf.1, weight),
            Err(_) => slot,
        }
    }

    fn stack(&self, id: i32) -> StackSlot {
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
        match self.stacks.get(&(id as u32), 0) {
            Ok(t) => StackSlot::Frames(t.frames().iter().map(|f| f.ip).collect()),
            Err(_) => StackSlot::Lost(LostReason::Error(libc::ENOENT)),
        }
    }

    /// Moves the recorded blocks of frame-pointer targets into `profile`
    /// (weight: blocks and nanoseconds), and the late part of those inside
    /// a probed call past its budget into `slow`. Stacks stay: blocks still
    /// in progress refer to them.
    pub fn drain(&mut self, profile: &mut RawProfile, slow: &mut RawProfile) {
        for (key, weight) in Self::take_counts(&mut self.counts) {
            profile.add(self.raw_key(&key, weight.samples), weight);
        }
        for (key, weight) in Self::take_counts(&mut self.slow) {
            // Fixed up, but not counted again: the block itself was.
            slow.add(self.raw_key(&key, 0), weight);
        }
    }

    /// The entries of a per-CPU count map, summed over CPUs and removed.
    fn take_counts(map: &mut PerCpuHashMap<MapData, SampleKey, SampleValue>) -> Vec<(SampleKey, Weight)> {
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
        for (key, _) in &entries {
            if let Err(e) = map.remove(key) {
                tracing::debug!("off-CPU count not removed: {e}");
            }
        }
        entries
    }

    fn raw_key(&self, key: &SampleKey, weight: u64) -> RawSampleKey {
        RawSampleKey {
            tgid: key.tgid,
            tid: key.tid,
            user: self.user_stack(
                key.tgid,
                key.user_stack_id,
                (key.leaf_ret, key.leaf_offset),
                weight,
            ),
            kernel: self.stack(key.kernel_stack_id),
        }
    }

    /// Threads of `pids` that are off CPU now, as recorded when they left.
    pub fn pending(&self, pids: &[u32]) -> Vec<Pending> {
        self.start
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, s)| pids.contains(&s.tgid))
            .map(|(tid, start)| Pending { tid, start })
            .collect()
    }

    /// The raw stacks of a pending block of a frame-pointer target.
    pub fn pending_stacks(&self, p: &Pending) -> (StackSlot, StackSlot) {
        (
            self.user_stack(
                p.start.tgid,
                p.start.user_stack_id,
                (p.start.leaf_ret, p.start.leaf_offset),
                u64::from(p.start.weight.max(1)),
            ),
            self.stack(p.start.kernel_stack_id),
        )
    }
}

/// A thread still blocked when the session ended.
#[derive(Debug, Clone)]
pub struct StillBlocked {
    /// Process.
    pub pid: u32,
    /// Thread.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// State letter from /proc (S, D), or `?` when gone.
    pub state: char,
    /// Kernel function it waits in.
    pub wchan: String,
    /// How long it has been blocked, seconds (measured from the switch the
    /// kernel recorded, or estimated from scheduler clocks for a thread
    /// blocked since before the session).
    pub blocked_s: f64,
    /// Blocked since before the session started.
    pub before_session: bool,
    /// Its stacks (for the profile and the summary).
    pub key: RawSampleKey,
}

/// Collects the target threads still blocked at the end of a session (the
/// blocks the kernel saw begin, and those started at attach for threads
/// already blocked), and adds the part of each block inside the session to
/// `off`, weighted as the kernel weights a finished block (1-in-N recorded
/// switches count N). Blocks shorter than `min_block_ns` so far are left
/// out, as the kernel leaves out short finished ones. `idle_at_start` has,
/// for threads blocked at attach, how long they had been blocked then (ms);
/// `clock` is the session's (start, now) on CLOCK_MONOTONIC.
#[allow(clippy::too_many_arguments)]
pub fn still_blocked(
    tracer: &OffCpuTracer,
    begins: &mut Begins,
    pids: &[u32],
    idle_at_start: &HashMap<u32, f64>,
    clock: (u64, u64),
    min_block_ns: u64,
    window: usize,
    off: &mut RawProfile,
) -> Vec<StillBlocked> {
    let (session_start_mono_ns, now_mono_ns) = clock;
    let mut out = Vec::new();
    let pending = tracer.pending(pids);
    // Threads the kernel saw leave the CPU: their block is known, however
    // short so far; the /proc estimate below is only for the others.
    let traced: std::collections::HashSet<u32> = pending.iter().map(|p| p.tid).collect();
    for p in pending {
        // A thread that exited left the CPU one last time and never came back.
        let Ok(stat) =
            crate::target::ProcStat::read_path(&format!("/proc/{}/task/{}/stat", p.start.tgid, p.tid))
        else {
            continue;
        };
        let (user, kernel) = if p.start.dwarf != 0 {
            match begins.remove(&(p.tid, p.start.seq)) {
                Some((_, u, k)) => (u, k),
                None => (StackSlot::Lost(LostReason::NoUserStack), StackSlot::Absent),
            }
        } else {
            tracer.pending_stacks(&p)
        };
        let key = RawSampleKey {
            tgid: p.start.tgid,
            tid: p.tid,
            user,
            kernel,
        };
        let in_session = now_mono_ns.saturating_sub(p.start.ts_ns);
        // Started at attach: it was blocked before, for about this long.
        let before = (p.start.seq > u32::MAX - 65_536)
            .then(|| idle_at_start.get(&p.tid).copied())
            .flatten();
        let blocked_ns = in_session as f64 + before.unwrap_or(0.0) * 1e6;
        if blocked_ns < min_block_ns as f64 {
            continue;
        }
        let weight = u64::from(p.start.weight.max(1));
        off.add(
            key.clone(),
            Weight {
                samples: weight,
                period_ns: in_session * weight,
            },
        );
        out.push(StillBlocked {
            pid: p.start.tgid,
            tid: p.tid,
            comm: stat.comm,
            // R: preempted and waiting for a CPU.
            state: stat.state,
            wchan: std::fs::read_to_string(format!("/proc/{}/task/{}/wchan", p.start.tgid, p.tid))
                .unwrap_or_default(),
            blocked_s: blocked_ns / 1e9,
            before_session: before.is_some(),
            key,
        });
    }
    // With 1-in-N sampling a thread's last switch-out may not have been
    // traced: a thread idle for a second or more is found from /proc.
    let session_ns = now_mono_ns.saturating_sub(session_start_mono_ns);
    for &pid in pids {
        for b in blocked::snapshot(pid, window) {
            let idle_ns = b.idle_ms.map_or(0, |ms| (ms * 1e6) as u64);
            if traced.contains(&b.tid) || idle_ns < 1_000_000_000 {
                continue;
            }
            let key = RawSampleKey {
                tgid: pid,
                tid: b.tid,
                user: b.user_slot(),
                kernel: b.kernel_slot(),
            };
            off.add(
                key.clone(),
                Weight {
                    samples: 1,
                    period_ns: idle_ns.min(session_ns),
                },
            );
            out.push(StillBlocked {
                pid,
                tid: b.tid,
                comm: b.comm.clone(),
                state: b.state,
                wchan: b.wchan.clone(),
                blocked_s: idle_ns as f64 / 1e9,
                before_session: idle_ns > session_ns,
                key,
            });
        }
    }
    out.sort_by(|a, b| b.blocked_s.total_cmp(&a.blocked_s));
    out
}

//! The engine's part of crash capture: attach the crash programs once,
//! and turn their events into symbolized [`Crash`]es while the target's
//! slot — its mappings, leaf fix-up tables, flight recorder — still exists
//! (the events are collected at every drain, once its intervals are
//! recorded, and before a target is removed, so a crashing process that
//! disappears at once is still symbolized from the mappings captured at
//! its last tick, and its report has its last interval).

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use flamewatch_common::crash::{crash_flags, CrashEvent, KIND_SIGNAL};
use tracing::{debug, warn};

use super::Engine;
use crate::{
    aggregate::{frames_for, BuildOptions, Profile, RawProfile, RawSampleKey, StackSlot, Weight},
    crash::{self, report::MAX_PROFILE_STACKS, Crash, CrashKind, CrashTracer, FoldedStack, MAX_PENDING},
    governor::cost,
    symbolize::{symbolize, MapsCache},
};

/// How much of the flight recorder goes into a report.
const PROFILE_BEFORE: Duration = Duration::from_secs(60);
/// How long a DWARF target's crash event waits for its unwound stack.
const DWARF_WAIT: Duration = Duration::from_secs(2);
/// A second fatal signal of the same process this soon after the first (a
/// handler that re-raises, abort's second raise) is the same crash.
const SAME_CRASH: Duration = Duration::from_secs(2);

/// Crash capture state of the engine.
#[derive(Default)]
pub struct CrashState {
    tracer: Option<CrashTracer>,
    /// Events waiting for their DWARF stack, with when they were read.
    pending: Vec<(CrashEvent, Instant)>,
    /// Captured, not yet taken ([`MAX_PENDING`] at most).
    ready: VecDeque<Crash>,
    /// Last crash per process (deduplication), pruned as they age.
    last: HashMap<u32, Instant>,
}

impl Engine {
    /// Attaches the crash, OOM and exit programs (once; filtered by the
    /// targets table in the kernel). Not essential to a profile: if they
    /// cannot attach, say why and go on.
    pub fn start_crash_capture(&mut self) {
        if self.crash.tracer.is_some() {
            return;
        }
        match CrashTracer::attach(&mut self.ebpf) {
            Ok(t) => self.crash.tracer = Some(t),
            Err(e) => warn!("crash capture unavailable: {e}"),
        }
    }

    /// Whether crash capture is attached.
    pub fn crash_capture_on(&self) -> bool {
        self.crash.tracer.is_some()
    }

    /// The crashes, OOM kills and failed exits captured since the last call.
    pub fn take_crashes(&mut self) -> Vec<Crash> {
        self.collect_crashes();
        self.crash.ready.drain(..).collect()
    }

    /// Reads new crash events and symbolizes those that are complete.
    pub(super) fn collect_crashes(&mut self) {
        let Some(tracer) = self.crash.tracer.as_mut() else {
            return;
        };
        let now = Instant::now();
        let fresh = tracer.poll();
        self.crash.pending.extend(fresh.into_iter().map(|e| (e, now)));
        if self.crash.pending.is_empty() {
            return;
        }
        if self
            .crash
            .pending
            .iter()
            .any(|(e, _)| e.flags & crash_flags::DWARF != 0)
        {
            // The stack copy is in the unwinder's ring: have it drained.
            tokio::task::block_in_place(|| self.consumer.sync());
        }
        let pending = std::mem::take(&mut self.crash.pending);
        for (event, read_at) in pending {
            let dwarf = if event.flags & crash_flags::DWARF != 0 {
                let stack = self
                    .consumer
                    .shared()
                    .crashes
                    .lock()
                    .ok()
                    .and_then(|mut c| c.remove(&(event.tid, event.seq)));
                if stack.is_none() && read_at.elapsed() < DWARF_WAIT {
                    self.crash.pending.push((event, read_at));
                    continue;
                }
                stack
            } else {
                None
            };
            if self.is_repeat(&event) {
                continue;
            }
            let crash = tokio::task::block_in_place(|| self.capture(&event, dwarf));
            if self.crash.ready.len() >= MAX_PENDING {
                self.crash.ready.pop_front();
            }
            self.crash.ready.push_back(crash);
        }
    }

    /// Whether `event` is a repeat of the process's last crash.
    fn is_repeat(&mut self, event: &CrashEvent) -> bool {
        let last = &mut self.crash.last;
        last.retain(|_, at| at.elapsed() < SAME_CRASH);
        if event.kind != KIND_SIGNAL {
            return false;
        }
        if last.contains_key(&event.tgid) {
            debug!(pid = event.tgid, "a repeated fatal signal of the same crash");
            return true;
        }
        last.insert(event.tgid, Instant::now());
        false
    }

    /// Symbolizes one event with its slot's mappings and recorder.
    fn capture(&mut self, e: &CrashEvent, dwarf: Option<StackSlot>) -> Crash {
        let kind = CrashKind::of(e.kind).unwrap_or(CrashKind::Crashed);
        let at = wall_time_of(e.ts_ns);
        let pid = e.tgid;
        let (user, unwind) = self.user_stack(e, dwarf);
        let n = (e.kernel_frames as usize).min(e.kernel_ips.len());
        let kernel = if n > 0 {
            StackSlot::Frames(e.kernel_ips[..n].into())
        } else {
            StackSlot::Absent
        };
        let slot = self.slots.get(&pid);
        let comm = slot.map_or_else(|| crash::comm(&e.comm), |s| s.target.comm.clone());
        let maps = slot.map_or_else(MapsCache::default, |s| s.maps.clone());
        let (raw, profile_seconds) = self.last_minute(pid, at);
        // One lookup for the crash's stacks and the profile's.
        let user_key = RawSampleKey {
            tgid: pid,
            tid: e.tid,
            user: user.clone(),
            kernel: StackSlot::Absent,
        };
        let kernel_key = RawSampleKey {
            tgid: pid,
            tid: e.tid,
            user: StackSlot::Absent,
            kernel,
        };
        let mut lookup = raw.clone();
        lookup.add(user_key.clone(), Weight::default());
        lookup.add(kernel_key.clone(), Weight::default());
        let symbols = symbolize(&lookup, &maps, &[pid]);
        let opts = BuildOptions {
            process_name: comm.clone(),
            ..BuildOptions::default()
        };
        // frames_for gives root first, under the process's name.
        let innermost_first = |key: &RawSampleKey| -> Vec<String> {
            frames_for(key, &symbols, &opts)
                .into_iter()
                .skip(1)
                .rev()
                .map(|f| f.to_string())
                .collect()
        };
        let profile = Profile::build(&raw, pid, &symbols, &opts);
        let thread = match crash::comm(&e.comm) {
            name if !name.is_empty() => name,
            _ => slot
                .and_then(|s| s.thread_names.get(&e.tid).cloned())
                .unwrap_or_else(|| comm.clone()),
        };
        let signal = (e.kind == KIND_SIGNAL).then_some(e.signal);
        Crash {
            kind,
            time: humantime::format_rfc3339_millis(at).to_string(),
            at,
            pid,
            comm,
            tid: e.tid,
            thread,
            signal,
            signal_name: signal.map(crash::signal_name),
            code: signal.map(|s| crash::code_name(s, e.code)),
            fault_address: crash::fault_address(e).map(|a| format!("{a:#x}")),
            exit_code: (kind == CrashKind::Exited).then_some(e.exit_code),
            anon_rss_bytes: (kind == CrashKind::OomKilled).then_some(e.anon_rss_kb * 1024),
            unwind,
            stack: if user.has_frames() {
                innermost_first(&user_key)
            } else {
                Vec::new()
            },
            kernel_stack: if kernel_key.kernel.has_frames() {
                innermost_first(&kernel_key)
            } else {
                Vec::new()
            },
            profile_seconds,
            profile_samples: profile.total().samples,
            profile: heaviest(&profile),
            metrics: Default::default(),
        }
    }

    /// The CPU samples of `pid`'s flight recorder in the minute before
    /// `at`, and how many seconds it covers.
    fn last_minute(&self, pid: u32, at: SystemTime) -> (RawProfile, f64) {
        let intervals = self.window(pid, at - PROFILE_BEFORE, at);
        let seconds = intervals
            .first()
            .and_then(|i| at.duration_since(i.from).ok())
            .map_or(0.0, |d| d.as_secs_f64().min(PROFILE_BEFORE.as_secs_f64()));
        let mut raw = RawProfile::default();
        for i in intervals {
            raw.merge(i.cpu);
        }
        (raw, seconds)
    }

    /// The crashing thread's user stack and how it was unwound: the DWARF
    /// unwinder's for DWARF targets, else the frame-pointer walk with the
    /// leaf fix-up (a leaf that set up no frame keeps its caller).
    fn user_stack(&mut self, e: &CrashEvent, dwarf: Option<StackSlot>) -> (StackSlot, String) {
        if e.kind != KIND_SIGNAL {
            return (StackSlot::Absent, "none: not a signal of the thread".into());
        }
        if let Some(stack) = dwarf.filter(StackSlot::has_frames) {
            let how = match stack {
                StackSlot::Truncated(_) => "DWARF (truncated: the unwind stopped early)",
                _ => "DWARF",
            };
            return (stack, how.into());
        }
        let n = (e.user_frames as usize).min(e.user_ips.len());
        if n == 0 {
            return (StackSlot::Absent, "none: the user stack was unreadable".into());
        }
        let fp = StackSlot::Frames(e.user_ips[..n].into());
        let how = if e.flags & crash_flags::DWARF_LOST != 0 {
            "frame pointers (the DWARF stack copy was lost)"
        } else if e.flags & crash_flags::DWARF != 0 {
            "frame pointers (the DWARF unwinder gave no stack)"
        } else {
            "frame pointers"
        };
        let fixed = self.sampler.fix_leaf(e.tgid, fp, e.leaf_ret, e.leaf_offset);
        (fixed, how.into())
    }
}

/// The profile's heaviest stacks, folded.
fn heaviest(profile: &Profile) -> Vec<FoldedStack> {
    let mut stacks: Vec<(&Vec<Arc<str>>, Weight)> = profile.stacks.iter().map(|(k, w)| (k, *w)).collect();
    stacks.sort_by_key(|s| std::cmp::Reverse(s.1.period_ns));
    stacks
        .into_iter()
        .take(MAX_PROFILE_STACKS)
        .map(|(frames, w)| FoldedStack {
            stack: frames.iter().map(|f| f.as_ref()).collect::<Vec<_>>().join(";"),
            samples: w.samples,
        })
        .collect()
}

/// The wall-clock time of a `bpf_ktime_get_ns` reading.
fn wall_time_of(ts_ns: u64) -> SystemTime {
    let ago = cost::monotonic_ns().saturating_sub(ts_ns);
    SystemTime::now() - Duration::from_nanos(ago)
}

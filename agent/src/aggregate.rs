//! From what the kernel aggregated (raw stacks of instruction pointers and
//! their weights) to a [`Profile`]: symbolized stacks, root first, each with
//! its weight, and the per-function shares the summary reports.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ops::AddAssign,
    sync::Arc,
};

use serde::Serialize;

/// How much of the target's time a stack stands for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Weight {
    /// Samples taken.
    pub samples: u64,
    /// Sum of their sampling periods: nanoseconds of CPU time. This is the
    /// time-proportional weight when the sampling rate changes.
    pub period_ns: u64,
}

impl AddAssign for Weight {
    fn add_assign(&mut self, rhs: Self) {
        self.samples += rhs.samples;
        self.period_ns += rhs.period_ns;
    }
}

/// Why a stack is missing from a sample that was nevertheless counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LostReason {
    /// Another stack already held the stack map bucket.
    Collision,
    /// The kernel could not record it (errno).
    Error(i32),
    /// A DWARF sample without readable user registers or stack.
    NoUserStack,
}

/// One half (user or kernel) of a raw sample's stack.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StackSlot {
    /// Instruction pointers, leaf first (as the kernel records them).
    Frames(Arc<[u64]>),
    /// The part of a stack that could be unwound before the walk stopped
    /// short of the outermost frame (leaf first).
    Truncated(Arc<[u64]>),
    /// Frames known only by name, leaf first (a kernel stack read from
    /// /proc/PID/task/TID/stack for a thread blocked before we watched).
    Named(Arc<[FrameName]>),
    /// Counted but not recorded.
    Lost(LostReason),
    /// Not asked for or not applicable (no kernel stack for a user-mode sample).
    Absent,
}

impl StackSlot {
    /// Addresses of a recorded stack (complete or not).
    pub fn ips(&self) -> Option<&[u64]> {
        match self {
            Self::Frames(ips) | Self::Truncated(ips) => Some(ips),
            Self::Named(_) | Self::Lost(_) | Self::Absent => None,
        }
    }

    /// Whether there is a stack (addresses or names).
    pub fn has_frames(&self) -> bool {
        self.ips().is_some() || matches!(self, Self::Named(_))
    }
}

/// Key of a raw sample: thread and its two stacks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawSampleKey {
    /// Process id.
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// User stack.
    pub user: StackSlot,
    /// Kernel stack.
    pub kernel: StackSlot,
}

/// Everything drained from the kernel in a session, before symbolization.
#[derive(Debug, Default, Clone)]
pub struct RawProfile {
    /// Weight per distinct raw sample.
    pub samples: HashMap<RawSampleKey, Weight>,
}

impl RawProfile {
    /// Adds a drained entry.
    pub fn add(&mut self, key: RawSampleKey, weight: Weight) {
        *self.samples.entry(key).or_default() += weight;
    }

    /// Adds everything of `other`.
    pub fn merge(&mut self, other: RawProfile) {
        for (k, w) in other.samples {
            self.add(k, w);
        }
    }
}

/// A symbolized frame, as shown in flamegraphs.
pub type FrameName = Arc<str>;

/// Symbol lookups for the stacks of a profile: each address maps to its
/// function and the functions inlined into it there (outermost first).
pub trait Symbols {
    /// Frames for a user address of process `tgid`. `is_leaf` is false for
    /// return addresses, which the implementation should look up at `ip - 1`
    /// (the call instruction) so that a call at the end of a function is not
    /// attributed to the next one.
    fn user(&self, tgid: u32, ip: u64, is_leaf: bool) -> Vec<FrameName>;
    /// Frames for a kernel address (already suffixed `_[k]`).
    fn kernel(&self, ip: u64, is_leaf: bool) -> Vec<FrameName>;
}

/// How stacks are labelled at their root.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Root frame: the process name.
    pub process_name: String,
    /// Insert a `thread/tid` frame under the root.
    pub per_thread: bool,
    /// Thread names for `per_thread` (tid -> comm).
    pub thread_names: HashMap<u32, String>,
    /// A frame added at the leaf of every stack (e.g. `[off-cpu]` in wall
    /// profiles, where on- and off-CPU time share one graph).
    pub leaf_marker: Option<FrameName>,
}

/// A symbolized profile of one process.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Profile {
    /// Weight per stack; frames root first.
    pub stacks: BTreeMap<Vec<FrameName>, Weight>,
    /// Number of synthetic frames at the root of every stack (process, and
    /// thread with `per_thread`); they are not functions.
    pub synthetic_depth: usize,
}

/// The frame above the outermost frame of a partial user stack.
pub const TRUNCATED_FRAME: &str = "[truncated stack]";

/// The frames of one raw sample, root first: process, thread (with
/// `per_thread`), user frames (under `[truncated stack]` when partial), then
/// kernel frames, then the leaf marker.
pub fn frames_for(key: &RawSampleKey, symbols: &dyn Symbols, opts: &BuildOptions) -> Vec<FrameName> {
    let mut frames = vec![FrameName::from(opts.process_name.as_str())];
    if opts.per_thread {
        let name = opts.thread_names.get(&key.tid).map_or("?", String::as_str);
        frames.push(format!("{name}/{}", key.tid).into());
    }
    match &key.user {
        StackSlot::Frames(ips) | StackSlot::Truncated(ips) => {
            if matches!(key.user, StackSlot::Truncated(_)) {
                // Partial stacks are kept, under a marker instead of
                // pretending their outermost frame is a root.
                frames.push(FrameName::from(TRUNCATED_FRAME));
            }
            for (i, &ip) in ips.iter().enumerate().rev() {
                // The interrupted instruction is the leaf only when the
                // sample hit user mode; in a syscall the first user address
                // is the return point after the syscall.
                let is_leaf = i == 0 && !key.kernel.has_frames();
                frames.extend(symbols.user(key.tgid, ip, is_leaf));
            }
        }
        StackSlot::Named(names) => frames.extend(names.iter().rev().cloned()),
        StackSlot::Lost(reason) => frames.push(lost_frame(*reason, "user")),
        StackSlot::Absent => {}
    }
    match &key.kernel {
        StackSlot::Frames(ips) | StackSlot::Truncated(ips) => {
            for (i, &ip) in ips.iter().enumerate().rev() {
                frames.extend(symbols.kernel(ip, i == 0));
            }
        }
        StackSlot::Named(names) => frames.extend(names.iter().rev().cloned()),
        StackSlot::Lost(reason) => frames.push(lost_frame(*reason, "kernel")),
        StackSlot::Absent => {}
    }
    if let Some(marker) = &opts.leaf_marker {
        frames.push(marker.clone());
    }
    frames
}

/// The frame standing for a stack that was counted but not recorded
/// (`kind`: `user` or `kernel`).
pub(crate) fn lost_frame(reason: LostReason, kind: &str) -> FrameName {
    match reason {
        LostReason::Collision => format!("[lost {kind} stack: stack map collision]").into(),
        LostReason::Error(errno) => format!("[lost {kind} stack: errno {errno}]").into(),
        LostReason::NoUserStack => format!("[lost {kind} stack: unreadable]").into(),
    }
}

impl Profile {
    /// Builds the profile of `tgid` from `raw`, looking frames up in `symbols`.
    pub fn build(raw: &RawProfile, tgid: u32, symbols: &dyn Symbols, opts: &BuildOptions) -> Self {
        let mut profile = Self {
            stacks: BTreeMap::new(),
            synthetic_depth: 1 + usize::from(opts.per_thread),
        };
        profile.add_raw(raw, tgid, symbols, opts);
        profile
    }

    /// Adds the samples of `tgid` in `raw` (another kind of weight for a
    /// wall profile, say) with `opts`' labels.
    pub fn add_raw(&mut self, raw: &RawProfile, tgid: u32, symbols: &dyn Symbols, opts: &BuildOptions) {
        for (key, weight) in raw.samples.iter().filter(|(k, _)| k.tgid == tgid) {
            *self.stacks.entry(frames_for(key, symbols, opts)).or_default() += *weight;
        }
    }

    /// Total weight.
    pub fn total(&self) -> Weight {
        let mut total = Weight::default();
        for w in self.stacks.values() {
            total += *w;
        }
        total
    }

    /// Functions by self time, then total time, as shares of all the
    /// profile's time (period-weighted, so time-proportional).
    pub fn top_functions(&self, n: usize) -> Vec<FunctionShare> {
        let total = self.total().period_ns.max(1) as f64;
        let mut self_ns: HashMap<&FrameName, u64> = HashMap::new();
        let mut total_ns: HashMap<&FrameName, u64> = HashMap::new();
        let mut self_samples: HashMap<&FrameName, u64> = HashMap::new();
        for (stack, w) in &self.stacks {
            let functions = stack.get(self.synthetic_depth..).unwrap_or_default();
            if let Some(leaf) = functions.last() {
                *self_ns.entry(leaf).or_default() += w.period_ns;
                *self_samples.entry(leaf).or_default() += w.samples;
            }
            // Count a function once per stack even when it recurses.
            let mut seen = HashSet::new();
            for f in functions {
                if seen.insert(f) {
                    *total_ns.entry(f).or_default() += w.period_ns;
                }
            }
        }
        let mut shares: Vec<FunctionShare> = total_ns
            .iter()
            .map(|(name, &t)| {
                let s = self_ns.get(name).copied().unwrap_or(0);
                FunctionShare {
                    name: name.to_string(),
                    self_pct: round2(100.0 * s as f64 / total),
                    total_pct: round2(100.0 * t as f64 / total),
                    self_samples: self_samples.get(name).copied().unwrap_or(0),
                    sort_self: s,
                    sort_total: t,
                }
            })
            .collect();
        shares.sort_by(|a, b| {
            b.sort_self
                .cmp(&a.sort_self)
                .then(b.sort_total.cmp(&a.sort_total))
                .then_with(|| a.name.cmp(&b.name))
        });
        shares.truncate(n);
        shares
    }
}

/// One function's share of a profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionShare {
    /// Function (or frame) name.
    pub name: String,
    /// Percent of the time spent in the function itself.
    pub self_pct: f64,
    /// Percent of the time spent in it or its callees.
    pub total_pct: f64,
    /// Samples whose leaf is this function.
    pub self_samples: u64,
    #[serde(skip)]
    sort_self: u64,
    #[serde(skip)]
    sort_total: u64,
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Symbols for tests: `ip` N is function `fN`, kernel `kN_[k]`; ip 7 has
    /// `inl` inlined into `f7`.
    pub struct FakeSymbols;
    impl Symbols for FakeSymbols {
        fn user(&self, _tgid: u32, ip: u64, _leaf: bool) -> Vec<FrameName> {
            if ip == 7 {
                return vec!["f7".into(), "inl".into()];
            }
            vec![format!("f{ip}").into()]
        }
        fn kernel(&self, ip: u64, _leaf: bool) -> Vec<FrameName> {
            vec![format!("k{ip}_[k]").into()]
        }
    }

    pub fn sample(tid: u32, user: &[u64], kernel: Option<&[u64]>, samples: u64) -> (RawSampleKey, Weight) {
        (
            RawSampleKey {
                tgid: 100,
                tid,
                user: StackSlot::Frames(user.into()),
                kernel: kernel.map_or(StackSlot::Absent, |k| StackSlot::Frames(k.into())),
            },
            Weight {
                samples,
                period_ns: samples * 10_000_000,
            },
        )
    }

    pub fn raw() -> RawProfile {
        let mut raw = RawProfile::default();
        // leaf first: main(1) -> a(2) -> hot(3)
        for (k, w) in [
            sample(100, &[3, 2, 1], None, 60),
            sample(101, &[4, 2, 1], None, 20),
            sample(100, &[5, 1], Some(&[9, 8]), 10),
            sample(100, &[7, 1], None, 10),
        ] {
            raw.add(k, w);
        }
        raw.add(
            RawSampleKey {
                tgid: 100,
                tid: 100,
                user: StackSlot::Lost(LostReason::Collision),
                kernel: StackSlot::Absent,
            },
            Weight {
                samples: 1,
                period_ns: 10_000_000,
            },
        );
        // Another process: never in pid 100's profile.
        let (mut k, w) = sample(5, &[3], None, 1000);
        k.tgid = 200;
        raw.add(k, w);
        raw
    }

    fn opts(per_thread: bool) -> BuildOptions {
        BuildOptions {
            process_name: "demo".into(),
            per_thread,
            thread_names: [(100, "demo".to_owned()), (101, "worker".to_owned())].into(),
            leaf_marker: None,
        }
    }

    fn stack(frames: &[&str]) -> Vec<FrameName> {
        frames.iter().map(|f| FrameName::from(*f)).collect()
    }

    /// Test that stacks come out root first, kernel frames after user frames,
    /// inlined functions expanded, and other processes left out.
    #[test]
    fn build_orders_frames() {
        let p = Profile::build(&raw(), 100, &FakeSymbols, &opts(false));
        assert_eq!(p.stacks[&stack(&["demo", "f1", "f2", "f3"])].samples, 60);
        assert_eq!(
            p.stacks[&stack(&["demo", "f1", "f5", "k8_[k]", "k9_[k]"])].samples,
            10
        );
        assert_eq!(p.stacks[&stack(&["demo", "f1", "f7", "inl"])].samples, 10);
        assert_eq!(
            p.stacks[&stack(&["demo", "[lost user stack: stack map collision]"])].samples,
            1
        );
        assert_eq!(p.total().samples, 101);
    }

    /// Test that per-thread profiles get a thread frame under the process.
    #[test]
    fn build_per_thread() {
        let p = Profile::build(&raw(), 100, &FakeSymbols, &opts(true));
        assert_eq!(
            p.stacks[&stack(&["demo", "worker/101", "f1", "f2", "f4"])].samples,
            20
        );
        assert_eq!(p.synthetic_depth, 2);
        let top = p.top_functions(3);
        assert!(
            top.iter().all(|f| !f.name.contains('/')),
            "thread frames are not functions: {top:?}"
        );
    }

    /// Test that self and total shares are time-weighted and counted once per stack.
    #[test]
    fn top_functions_shares() {
        let p = Profile::build(&raw(), 100, &FakeSymbols, &opts(false));
        let top = p.top_functions(20);
        assert_eq!(top[0].name, "f3");
        assert!((top[0].self_pct - 59.41).abs() < 0.01, "{top:?}");
        let f1 = top.iter().find(|f| f.name == "f1").expect("f1");
        assert_eq!(f1.self_pct, 0.0);
        assert!((f1.total_pct - 99.01).abs() < 0.01);
        assert!(
            top.iter().all(|f| f.name != "demo"),
            "the process frame is not a function"
        );
    }

    /// Test that named kernel frames (from /proc) and a leaf marker land in
    /// the right places.
    #[test]
    fn named_frames_and_marker() {
        let mut raw = RawProfile::default();
        raw.add(
            RawSampleKey {
                tgid: 100,
                tid: 100,
                user: StackSlot::Frames([2, 1].into()),
                kernel: StackSlot::Named(["schedule_[k]".into(), "futex_wait_[k]".into()].into()),
            },
            Weight {
                samples: 1,
                period_ns: 5_000_000,
            },
        );
        let o = BuildOptions {
            leaf_marker: Some("[off-cpu]".into()),
            ..opts(false)
        };
        let p = Profile::build(&raw, 100, &FakeSymbols, &o);
        let (stack, w) = p.stacks.iter().next().unwrap();
        assert_eq!(
            stack,
            &stack_of(&["demo", "f1", "f2", "futex_wait_[k]", "schedule_[k]", "[off-cpu]"])
        );
        assert_eq!(w.period_ns, 5_000_000);
    }

    fn stack_of(frames: &[&str]) -> Vec<FrameName> {
        stack(frames)
    }

    /// Test that a lower sampling rate (longer period) weighs more per sample.
    #[test]
    fn weights_follow_periods() {
        let mut raw = RawProfile::default();
        let (k1, _) = sample(1, &[1], None, 0);
        let (k2, _) = sample(1, &[2], None, 0);
        // 100 samples at 1 ms vs 10 samples at 10 ms: the same CPU time.
        raw.add(
            k1,
            Weight {
                samples: 100,
                period_ns: 100 * 1_000_000,
            },
        );
        raw.add(
            k2,
            Weight {
                samples: 10,
                period_ns: 10 * 10_000_000,
            },
        );
        let p = Profile::build(&raw, 100, &FakeSymbols, &opts(false));
        let top = p.top_functions(2);
        assert_eq!(top[0].self_pct, 50.0);
        assert_eq!(top[1].self_pct, 50.0);
    }
}

//! Leaf fix-up of frame-pointer stacks.
//!
//! The kernel walks frame-pointer stacks from `rbp`. When a sample lands in
//! a function that has set up no frame at that instruction — a leaf (gcc
//! keeps none in leaves even with -fno-omit-frame-pointer), anything in
//! libc, or a function's prologue or epilogue — `rbp` still points at the
//! caller's frame, and the walk goes from the leaf straight to the caller's
//! caller. Beside each such stack the kernel keeps the first word above the
//! user `rsp` that looks like a return address, and its offset
//! (`SampleKey::leaf_ret`, see ebpf/src/leaf.rs). Here the leaf's CFA rule
//! is looked up in its file's `.eh_frame`: if the CFA is `rsp + N` (no frame
//! set up) and the return address sits at exactly that word's offset
//! (`N - 8`), the word is the missing caller and goes in after the leaf.
//! Otherwise (the frame is set up: CFA from `rbp`) it is ignored.
//!
//! A function without a frame in the middle of a stack (libc calling back
//! into the program, qsort's comparator) makes the walk skip its caller
//! too, and nothing on the kernel side can recover that cheaply: such
//! stacks are counted (`mid_stack_gaps`), not repaired.

use std::collections::HashMap;

use framehop::{
    x86_64::{CacheX86_64, UnwindRegsX86_64},
    Unwinder as _,
};
use serde::Serialize;

use super::{FileCache, ProcessUnwinder};
use crate::aggregate::StackSlot;

/// What the leaf fix-up did for one target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LeafStats {
    /// Frame-pointer samples (or off-CPU blocks) with a user stack.
    pub checked: u64,
    /// Of those, stacks whose leaf's caller was inserted.
    pub fixups: u64,
    /// Of those, stacks that pass through a function without a frame at
    /// its call site (before their outermost frame, or as the leaf's
    /// inserted caller): the caller of that function is missing.
    pub mid_stack_gaps: u64,
    /// Of the fixed-up stacks, those whose leaf had saved `rbp` to use it
    /// for data (glibc's select()): the kernel's walk beyond the leaf
    /// followed that data, so only the leaf and its caller are kept, under
    /// `[truncated stack]`.
    pub rbp_reused: u64,
}

impl LeafStats {
    /// `self - earlier` of cumulative counters.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            checked: self.checked.saturating_sub(earlier.checked),
            fixups: self.fixups.saturating_sub(earlier.fixups),
            mid_stack_gaps: self.mid_stack_gaps.saturating_sub(earlier.mid_stack_gaps),
            rbp_reused: self.rbp_reused.saturating_sub(earlier.rbp_reused),
        }
    }
}

impl std::ops::AddAssign for LeafStats {
    fn add_assign(&mut self, o: Self) {
        self.checked += o.checked;
        self.fixups += o.fixups;
        self.mid_stack_gaps += o.mid_stack_gaps;
        self.rbp_reused += o.rbp_reused;
    }
}

impl LeafStats {
    /// A warning for the summary when at least 5 % of the stacks have a
    /// known gap (a function without a frame that is not the leaf).
    pub fn warning(&self) -> Option<String> {
        let gaps = self.mid_stack_gaps + self.rbp_reused;
        (self.checked > 0 && gaps * 20 >= self.checked).then(|| {
            format!(
                "{:.0} % of frame-pointer stacks pass through functions without frame pointers \
                 (libc, most distribution libraries): callers above them are missing \
                 (sampling.unwind.mid_stack_gaps, leaf_rbp_reused); --unwind dwarf recovers them",
                100.0 * gaps as f64 / self.checked as f64
            )
        })
    }
}

/// The CFA rule at one instruction, as far as the fix-up cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// No frame set up: the return address is this many bytes above `rsp`;
    /// `rbp_reused` when `rbp` was saved elsewhere than right under it (so
    /// not by a frame setup's `push %rbp`): `rbp` now holds data.
    ReturnAt {
        /// Offset of the return address.
        offset: u32,
        /// `rbp` saved away from the return address.
        rbp_reused: bool,
    },
    /// The frame is set up (CFA from `rbp`), or nothing is known.
    FrameSetUp,
}

/// Rules remembered per (process, address) before the memo is cleared.
const MAX_RULES: usize = 1 << 16;

/// A stack pointer and a frame pointer the probe gives framehop: reads
/// near the fake `rsp` answer a marker that encodes their offset; reads
/// anywhere else (through `rbp`) fail.
const FAKE_SP: u64 = 0x7000_0000_0000;
const FAKE_BP: u64 = 0x1000;
const MARK: u64 = 0x4000_0000_0000;
const PROBE_SPAN: u64 = 4096;

/// Leaf fix-up state of one sampler: the targets' mapped files with their
/// unwind tables, and the rules looked up so far.
#[derive(Default)]
pub struct LeafFixer {
    files: FileCache,
    procs: HashMap<u32, ProcessUnwinder>,
    cache: CacheX86_64,
    rules: HashMap<(u32, u64), Rule>,
    stats: HashMap<u32, LeafStats>,
}

impl LeafFixer {
    /// Loads the unwind tables of `pid`'s mapped files now (before the
    /// session's intervals start, so they are not charged to the first).
    pub fn prepare(&mut self, pid: u32) {
        self.procs.entry(pid).or_default().refresh(pid, &mut self.files);
    }

    /// Drops everything kept for `pid` (it is no longer a target).
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
        self.stats.remove(&pid);
        self.rules.retain(|(p, _), _| *p != pid);
    }

    /// Whether `addr` is in a file of `pid` whose tables are loaded.
    pub fn knows(&self, pid: u32, addr: u64) -> bool {
        self.procs.get(&pid).is_some_and(|p| p.knows(addr))
    }

    /// Unwinds a DWARF copy of `pid`'s stack (registers `(ip, sp, bp)`,
    /// `stack` the bytes at `sp`) with the tables loaded here.
    pub fn unwind_copy(
        &mut self,
        pid: u32,
        regs: (u64, u64, u64),
        stack: &[u8],
    ) -> (Vec<u64>, super::Ending) {
        let proc = self.procs.entry(pid).or_default();
        if !proc.knows(regs.0) {
            proc.refresh(pid, &mut self.files);
        }
        proc.unwind(&mut self.cache, regs.0, regs.1, regs.2, stack)
    }

    /// Counters of `pid` so far.
    pub fn stats(&self, pid: u32) -> LeafStats {
        self.stats.get(&pid).copied().unwrap_or_default()
    }

    /// Returns `user` (a frame-pointer stack of `pid`, leaf first) with the
    /// leaf's caller inserted when the kernel's word is it; `samples` is
    /// what the stack weighs, for the counters.
    pub fn fix(
        &mut self,
        pid: u32,
        user: StackSlot,
        leaf_ret: u64,
        leaf_offset: u32,
        samples: u64,
    ) -> StackSlot {
        let StackSlot::Frames(ips) = &user else {
            return user;
        };
        let Some(&leaf) = ips.first() else {
            return user;
        };
        let proc = self.procs.entry(pid).or_default();
        if !proc.knows(leaf) {
            proc.refresh(pid, &mut self.files);
        }
        if self.rules.len() >= MAX_RULES {
            self.rules.clear();
        }
        let mut rule = |pc: u64| {
            *self
                .rules
                .entry((pid, pc))
                .or_insert_with(|| probe(proc, &mut self.cache, pc))
        };
        let st = self.stats.entry(pid).or_default();
        st.checked += samples;
        // A return address (looked up at the call, ret - 1) in a function
        // with no frame there, with frames still beyond it.
        let gap = ips.len() > 2
            && ips[1..ips.len() - 1]
                .iter()
                .any(|&ra| proc.knows(ra) && matches!(rule(ra - 1), Rule::ReturnAt { .. }));
        let count_gap = |st: &mut LeafStats| {
            if !gap {
                st.mid_stack_gaps += samples;
            }
        };
        if gap {
            st.mid_stack_gaps += samples;
        }
        if leaf_ret == 0 {
            return user;
        }
        let Rule::ReturnAt { offset, rbp_reused } = rule(leaf) else {
            return user;
        };
        if offset != leaf_offset {
            return user;
        }
        st.fixups += samples;
        // The caller has no frame either (libc calling libc): its own
        // caller is missing.
        if matches!(rule(leaf_ret - 1), Rule::ReturnAt { .. }) {
            count_gap(st);
        }
        if rbp_reused {
            st.rbp_reused += samples;
            return StackSlot::Truncated([leaf, leaf_ret].into());
        }
        let mut fixed = Vec::with_capacity(ips.len() + 1);
        fixed.push(leaf);
        fixed.push(leaf_ret);
        fixed.extend_from_slice(&ips[1..]);
        StackSlot::Frames(fixed.into())
    }
}

/// The rule at `pc`: one framehop step from fake registers, where a read
/// near `rsp` returns a marker of its offset and a read through `rbp`
/// fails. The step's return address is then the marker of the return
/// address's offset when the CFA is `rsp`-based.
fn probe(proc: &ProcessUnwinder, cache: &mut CacheX86_64, pc: u64) -> Rule {
    // Offsets read near `rsp`: the return address's, and `rbp`'s if saved.
    let mut offsets = Vec::new();
    let mut read = |addr: u64| -> Result<u64, ()> {
        let off = addr.wrapping_sub(FAKE_SP);
        if off < PROBE_SPAN {
            offsets.push(off);
            Ok(MARK + off)
        } else {
            Err(())
        }
    };
    let regs = UnwindRegsX86_64::new(pc, FAKE_SP, FAKE_BP);
    let mut frames = proc.unwinder.iter_frames(pc, regs, cache, &mut read);
    // The first frame is `pc` itself.
    if !matches!(frames.next(), Ok(Some(_))) {
        return Rule::FrameSetUp;
    }
    let ret = match frames.next() {
        Ok(Some(f)) if f.address().wrapping_sub(MARK) < PROBE_SPAN => f.address() - MARK,
        _ => return Rule::FrameSetUp,
    };
    Rule::ReturnAt {
        offset: ret as u32,
        // A frame setup's `push %rbp` saves it right under the return address.
        rbp_reused: offsets.iter().any(|&o| o != ret && o + 8 != ret),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libc's `getpid`, mapped in this test process: a leaf without a
    /// frame (CFA = rsp + 8 at its entry).
    fn getpid_entry() -> u64 {
        libc::getpid as *const () as u64
    }

    /// Test that the rule probe reads CFA rules from real `.eh_frame` data:
    /// at the entry of libc's `getpid` the return address is at rsp, and an
    /// address in no module gives nothing.
    #[test]
    fn probe_reads_cfa_rules() {
        let pid = std::process::id();
        let mut fixer = LeafFixer::default();
        fixer.prepare(pid);
        let proc = &fixer.procs[&pid];
        assert!(proc.knows(getpid_entry()));
        assert_eq!(
            probe(proc, &mut fixer.cache, getpid_entry()),
            Rule::ReturnAt {
                offset: 0,
                rbp_reused: false
            }
        );
        assert_eq!(probe(proc, &mut fixer.cache, 0x10), Rule::FrameSetUp);
    }

    /// Test that a word matching the leaf's rule is inserted after the
    /// leaf, one that does not match is ignored, and both are counted.
    #[test]
    fn inserts_only_matching_words() {
        let pid = std::process::id();
        let mut fixer = LeafFixer::default();
        fixer.prepare(pid);
        let leaf = getpid_entry();
        let stack = StackSlot::Frames([leaf, 0x1234].into());
        let fixed = fixer.fix(pid, stack.clone(), 0x5678, 0, 3);
        assert_eq!(fixed, StackSlot::Frames([leaf, 0x5678, 0x1234].into()));
        // The return address is at rsp, not rsp + 8: not the caller.
        assert_eq!(fixer.fix(pid, stack.clone(), 0x5678, 8, 2), stack);
        assert_eq!(fixer.fix(pid, stack.clone(), 0, 0, 1), stack);
        let st = fixer.stats(pid);
        assert_eq!((st.checked, st.fixups), (6, 3));
    }

    /// Test that the known-gap warning appears from 5 % of the stacks on.
    #[test]
    fn gap_warning_threshold() {
        let mut st = LeafStats {
            checked: 100,
            mid_stack_gaps: 3,
            rbp_reused: 1,
            ..Default::default()
        };
        assert_eq!(st.warning(), None);
        st.rbp_reused = 2;
        assert!(st
            .warning()
            .is_some_and(|w| w.starts_with("5 % of frame-pointer stacks")));
        assert_eq!(LeafStats::default().warning(), None);
    }
}

//! `--unwind auto` checks its own choice.
//!
//! The executable's prologue count (see [`super::elf`]) says whether its
//! functions set up frame pointers, not whether the code where the samples
//! land does: a binary with a few hundred framed cold functions and a hot
//! path built without them fools it. So for a target auto walks with frame
//! pointers, the kernel also sends 1 sample in
//! [`flamewatch_common::FP_CHECK_EVERY`] as a DWARF copy, with the
//! frame-pointer walk of the same sample beside it
//! (`sample_flags::FP_CHECK`). Here the copy is unwound with `.eh_frame`,
//! the frame-pointer walk gets the leaf fix-up a frame-pointer sample gets,
//! and the two are compared ([`same_stack`]). When they disagree on more than
//! [`MAX_DISAGREE_PCT`] % of at least [`MIN_COMPARED`] samples, the engine
//! switches the target to DWARF.
//!
//! Cost: 1/16 of DWARF mode's extra cost per sample — one stack copy of the
//! DWARF window (16 KiB by default) in the kernel and one unwind in the
//! agent per 16 samples — plus the 8 MiB stack-copy ring, which exists
//! whenever `--unwind auto` runs. `cargo xtask bench overhead` measures it
//! (`--unwind auto` beside `--unwind fp`).

use serde::Serialize;

use super::{leaf::LeafFixer, Ending};
use crate::aggregate::StackSlot;

/// A checked target's cost per Hz, relative to the calibrated frame-pointer
/// cost the governor starts from. Measured on `hotpaths-fp` at 1292 Hz:
/// 4.5 % of its CPU with the check against 4.2 % without (+7 %); 1.1
/// leaves a margin.
pub const COST_FACTOR: f64 = 1.1;
/// Fewest compared samples before the check may switch a target.
pub const MIN_COMPARED: u64 = 50;
/// Switch to DWARF when more than this share of the compared samples
/// disagree, percent.
pub const MAX_DISAGREE_PCT: f64 = 20.0;
/// Outermost frames the frame-pointer walk may miss or get wrong: a
/// thread's start code keeps no frame pointers (`__libc_start_call_main`,
/// `__libc_start_main`, `_start`; `start_thread`, `clone3`), so the walk
/// ends at, or one garbage word past, the first of them.
pub const OUTER_SLACK: usize = 3;
/// Past this many compared samples the counters behind the decision are
/// halved: the decision follows the recent stacks (a hot path that starts
/// late still gets caught), and the counters stay small.
pub const DECAY_AT: u64 = 16 * MIN_COMPARED;

/// Counters of the check for one target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FpCheckStats {
    /// Check copies received.
    pub received: u64,
    /// Of those, compared (the DWARF walk gave a reference: it did not
    /// fail, or it failed no sooner than the frame-pointer walk ended).
    pub compared: u64,
    /// Of those, the same stack both ways.
    pub agreed: u64,
}

impl FpCheckStats {
    /// `self - earlier` of cumulative counters.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            received: self.received.saturating_sub(earlier.received),
            compared: self.compared.saturating_sub(earlier.compared),
            agreed: self.agreed.saturating_sub(earlier.agreed),
        }
    }

    /// Agreement in percent, when anything was compared.
    pub fn agreement_pct(&self) -> Option<f64> {
        (self.compared > 0).then(|| 100.0 * self.agreed as f64 / self.compared as f64)
    }

    /// Whether the walks disagree too often for frame pointers to stay.
    pub fn should_switch(&self) -> bool {
        self.compared >= MIN_COMPARED && self.agreement_pct().is_some_and(|a| 100.0 - a > MAX_DISAGREE_PCT)
    }

    /// Halves the counters once past [`DECAY_AT`] (see there).
    pub fn decay(&mut self) {
        if self.compared >= DECAY_AT {
            self.received /= 2;
            self.compared /= 2;
            self.agreed /= 2;
        }
    }
}

impl std::ops::AddAssign for FpCheckStats {
    fn add_assign(&mut self, o: Self) {
        self.received += o.received;
        self.compared += o.compared;
        self.agreed += o.agreed;
    }
}

/// Whether a frame-pointer walk (after the leaf fix-up) and the DWARF walk
/// of the same sample are "the same stack", both leaf first: the same
/// frames from the leaf on, as far as both reach. What a user would call
/// the same flamegraph tower: every function the program called, in order,
/// down to its entry point. So:
/// - a DWARF walk cut by its stack window (`dwarf_complete` false) is
///   compared as far as it goes;
/// - the frame-pointer walk may miss or get wrong only the
///   [`OUTER_SLACK`] outermost frames of a completed DWARF walk (the
///   frameless start code every thread has);
/// - anything else (a missing caller, a wrong frame, a walk that stops in
///   the middle) is a disagreement.
pub fn same_stack(fp: &[u64], dwarf: &[u64], dwarf_complete: bool) -> bool {
    let common = fp.iter().zip(dwarf).take_while(|(a, b)| a == b).count();
    if common == dwarf.len() {
        // The DWARF walk is a prefix of the frame-pointer one: the walk
        // went on past the window, or added garbage past the outermost frame.
        return !dwarf_complete || fp.len() <= dwarf.len() + 1;
    }
    if !dwarf_complete {
        return false;
    }
    // Diverged (or ended) at `common`, short of DWARF's end: fine only in
    // the start code, with at most one garbage word after it.
    let outer = dwarf.len() - common;
    outer <= OUTER_SLACK && fp.len() <= common + 1 && common > 0
}

/// The check's state in the unwinder thread: the fix-up (and its unwind
/// tables, which the DWARF walk of the copy uses too).
#[derive(Default)]
pub struct Checker {
    fixer: LeafFixer,
}

impl Checker {
    /// Compares the check copy of one sample of `pid`: `fp` the kernel's
    /// frame-pointer walk, `leaf` its fix-up word, the rest the DWARF copy.
    /// None when the DWARF walk gave no reference.
    pub fn compare(
        &mut self,
        pid: u32,
        fp: &[u64],
        leaf: (u64, u32),
        regs: (u64, u64, u64),
        stack: &[u8],
    ) -> Option<bool> {
        let (dwarf, ending) = self.fixer.unwind_copy(pid, regs, stack);
        let fixed = match self
            .fixer
            .fix(pid, StackSlot::Frames(fp.into()), leaf.0, leaf.1, 1)
        {
            StackSlot::Frames(f) | StackSlot::Truncated(f) => f,
            _ => fp.into(),
        };
        if ending == Ending::Error && dwarf.len() < fixed.len() {
            return None;
        }
        let same = same_stack(&fixed, &dwarf, ending == Ending::Complete);
        if !same {
            tracing::trace!(
                pid,
                ?fixed,
                ?dwarf,
                ?ending,
                "frame-pointer and DWARF walks differ"
            );
        }
        Some(same)
    }

    /// Loads the unwind tables `pid`'s sample at `ip` needs, unless they
    /// are: a one-time cost per file. Returns whether it had to.
    pub fn prepare(&mut self, pid: u32, ip: u64) -> bool {
        if self.fixer.knows(pid, ip) {
            return false;
        }
        self.fixer.prepare(pid);
        true
    }

    /// Drops what is kept for `pid`.
    pub fn forget(&mut self, pid: u32) {
        self.fixer.forget(pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that identical walks agree, and that a missing caller, a wrong
    /// frame or a walk stopped mid-stack disagree.
    #[test]
    fn agreement_is_the_same_frames() {
        let dwarf = [1, 2, 3, 4, 5, 6, 7];
        assert!(same_stack(&dwarf, &dwarf, true));
        // The caller of 1 missing (what the leaf fix-up is for).
        assert!(!same_stack(&[1, 3, 4, 5, 6, 7], &dwarf, true));
        assert!(!same_stack(&[1, 2, 9, 4, 5, 6, 7], &dwarf, true));
        // Stopped after two frames: truncated, not the same stack.
        assert!(!same_stack(&[1, 2], &dwarf, true));
        assert!(!same_stack(&[], &dwarf, true));
    }

    /// Test that the frameless start code may be missing or end in one
    /// garbage word, and that a window-cut DWARF walk compares as far as
    /// it goes.
    #[test]
    fn start_code_and_window_are_allowed() {
        let dwarf = [1, 2, 3, 4, 5, 6, 7];
        assert!(same_stack(&[1, 2, 3, 4], &dwarf, true));
        assert!(same_stack(&[1, 2, 3, 4, 0xdead], &dwarf, true));
        assert!(same_stack(&[1, 2, 3, 4, 5, 6, 7, 0xdead], &dwarf, true));
        assert!(!same_stack(&[1, 2, 3, 4, 0xdead, 0xbeef], &dwarf, true));
        assert!(!same_stack(&[1, 2, 3], &dwarf, true));
        assert!(same_stack(&[1, 2, 3, 4, 5, 6, 7, 8, 9], &[1, 2, 3], false));
        assert!(!same_stack(&[1, 2, 9, 4], &[1, 2, 3], false));
    }

    /// Test that the switch needs the minimum count and more than the
    /// threshold's share of disagreements, and that decay halves.
    #[test]
    fn switch_threshold() {
        let mut s = FpCheckStats {
            received: 49,
            compared: 49,
            agreed: 0,
        };
        assert!(!s.should_switch(), "too few compared");
        s = FpCheckStats {
            received: 50,
            compared: 50,
            agreed: 40,
        };
        assert!(!s.should_switch(), "20 % disagree: at the threshold, not over");
        s.agreed = 39;
        assert!(s.should_switch());
        assert_eq!(s.agreement_pct(), Some(78.0));
        let mut big = FpCheckStats {
            received: DECAY_AT,
            compared: DECAY_AT,
            agreed: DECAY_AT - 2,
        };
        big.decay();
        assert_eq!((big.compared, big.agreed), (DECAY_AT / 2, DECAY_AT / 2 - 1));
        assert_eq!(FpCheckStats::default().agreement_pct(), None);
    }
}

//! Stacks of the sampled allocations of DWARF heap targets.
//!
//! For a target without frame pointers the entry probe sends a stack copy
//! with an id of its own (`sample_flags::HEAP`) and keeps that id where a
//! stack map id would be (`kernel_stack_id` = `DWARF_STACK`). The unwinder
//! turns the copies into stacks; this table joins them with the
//! allocations by id. It is bounded: over its limit it keeps only the
//! stacks of allocations still live or not drained yet.

use std::collections::{HashMap, HashSet};

use flamewatch_common::{SampleKey, DWARF_STACK};

use crate::aggregate::{LostReason, StackSlot};

/// Unwound stacks of sampled allocations, by (process, id).
#[derive(Debug, Default)]
pub struct DwarfStacks {
    stacks: HashMap<(u32, i32), StackSlot>,
    /// Allocations drained once before their stack came: they wait one
    /// more drain (the unwinder polls on its own schedule).
    deferred: HashSet<SampleKey>,
    limit: usize,
}

impl DwarfStacks {
    /// A table of at most about `limit` stacks (more only while that many
    /// allocations are live).
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    /// Whether `key` refers to a DWARF stack copy.
    pub fn is_dwarf(key: &SampleKey) -> bool {
        key.kernel_stack_id == DWARF_STACK
    }

    /// Adds the unwinder's fresh stacks.
    pub fn add(&mut self, fresh: HashMap<(u32, i32), StackSlot>) {
        self.stacks.extend(fresh);
    }

    /// The stack of the copy `id` of `tgid` (lost when it never came).
    pub fn get(&self, tgid: u32, id: i32) -> StackSlot {
        if id < 0 {
            return StackSlot::Lost(LostReason::Error(-id));
        }
        self.stacks
            .get(&(tgid, id))
            .cloned()
            .unwrap_or(StackSlot::Lost(LostReason::Error(libc::ENOENT)))
    }

    /// Whether the drain of `key` should wait for its stack: once, when it
    /// has not come yet; never twice.
    pub fn wait_for(&mut self, key: &SampleKey) -> bool {
        if key.user_stack_id < 0 || self.stacks.contains_key(&(key.tgid, key.user_stack_id)) {
            self.deferred.remove(key);
            return false;
        }
        self.deferred.insert(*key)
    }

    /// Over the limit, keeps only the stacks in `keep` and those of
    /// allocations waiting for a drain.
    pub fn prune(&mut self, keep: impl FnOnce() -> HashSet<(u32, i32)>) {
        if self.stacks.len() <= self.limit {
            return;
        }
        let mut keep = keep();
        keep.extend(self.deferred.iter().map(|k| (k.tgid, k.user_stack_id)));
        self.stacks.retain(|k, _| keep.contains(k));
    }

    /// Drops the stacks of `pid` (no longer a target).
    pub fn forget(&mut self, pid: u32) {
        self.stacks.retain(|(p, _), _| *p != pid);
        self.deferred.retain(|k| k.tgid != pid);
    }

    /// Stacks held.
    pub fn len(&self) -> usize {
        self.stacks.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.stacks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: i32) -> SampleKey {
        SampleKey {
            tgid: 7,
            user_stack_id: id,
            kernel_stack_id: DWARF_STACK,
            ..SampleKey::default()
        }
    }

    /// Test that an allocation whose stack has not come waits one drain,
    /// and not a second one; one whose stack came does not wait.
    #[test]
    fn waits_once_for_a_stack() {
        let mut t = DwarfStacks::new(10);
        assert!(t.wait_for(&key(3)));
        assert!(!t.wait_for(&key(3)));
        assert_eq!(t.get(7, 3), StackSlot::Lost(LostReason::Error(libc::ENOENT)));
        t.add(HashMap::from([((7, 4), StackSlot::Frames(vec![1, 2].into()))]));
        assert!(!t.wait_for(&key(4)));
        assert_eq!(t.get(7, 4), StackSlot::Frames(vec![1, 2].into()));
    }

    /// Test that over its limit the table keeps only live and waiting stacks.
    #[test]
    fn prunes_to_live_stacks() {
        let mut t = DwarfStacks::new(2);
        t.add(
            (0..5)
                .map(|i| ((7, i), StackSlot::Frames(vec![i as u64].into())))
                .collect(),
        );
        assert!(t.wait_for(&key(9)));
        t.add(HashMap::from([((7, 9), StackSlot::Absent)]));
        t.prune(|| HashSet::from([(7, 1)]));
        assert_eq!(t.len(), 2, "the live stack and the waiting one");
        assert_eq!(t.get(7, 1), StackSlot::Frames(vec![1].into()));
        t.forget(7);
        assert!(t.is_empty());
    }
}

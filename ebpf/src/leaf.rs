//! The word the leaf fix-up needs beside a frame-pointer stack.
//!
//! A frame-pointer walk starts from `rbp`. A leaf function that set up no
//! frame (gcc's leaves even with -fno-omit-frame-pointer, all of libc) has
//! left `rbp` pointing at its caller's frame, so the walk goes from the
//! leaf straight to its caller's caller: the caller is missing. Its return
//! address is still on the stack, a few words above `rsp`. We keep the
//! first word there that looks like a return address (an address right
//! after a call instruction); the agent inserts it only if the leaf's CFA
//! rule says the frame is not set up at that instruction and the return
//! address is at that very offset.
//!
//! Cost: one 64-byte read of the user stack and, per plausible word, an
//! 8-byte read of the code before it (usually one: the return address is
//! the first word in a leaf that pushed nothing).

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
};
use flamewatch_common::LEAF_WORDS;

/// The user stack pointer of the current thread: `regs` when they are the
/// interrupted user registers, else the ones saved at kernel entry.
#[inline(always)]
pub fn user_sp(regs: Option<&pt_regs>) -> u64 {
    if let Some(r) = regs {
        if r.cs & 3 == 3 {
            return r.rsp;
        }
    }
    // SAFETY: BTF task pointer of the current task, then a checked read of
    // one field of its saved user registers.
    unsafe {
        let task = bpf_get_current_task_btf();
        let saved = bpf_task_pt_regs(task) as *const pt_regs;
        bpf_probe_read_kernel(core::ptr::addr_of!((*saved).rsp)).unwrap_or(0)
    }
}

/// Whether the code right before `addr` ends with a call instruction, as
/// it does before a return address: `call rel32` (e8), `call *disp32(%rip)`
/// (ff 15), `call *%reg` / `call *(%reg)` (ff d0-d7 / ff 10-17, also after
/// a REX prefix), `call *disp8(%reg)` (ff 50-57). Data on the stack (locals,
/// saved registers, heap pointers) rarely passes, which keeps the aggregation
/// keys of leaves that did set up a frame from multiplying.
#[inline(always)]
fn after_call(addr: u64) -> bool {
    // SAFETY: a checked read of user memory.
    let Ok(b) = (unsafe { bpf_probe_read_user((addr - 8) as *const [u8; 8]) }) else {
        return false;
    };
    b[3] == 0xe8
        || (b[2] == 0xff && (b[3] == 0x15 || b[3] & 0xf8 == 0x90))
        || (b[6] == 0xff && (b[7] & 0xf8 == 0xd0 || b[7] & 0xf8 == 0x10))
        || (b[5] == 0xff && b[6] & 0xf8 == 0x50)
}

/// The first of the [`LEAF_WORDS`] words at user `sp` that looks like a
/// return address, and its offset from `sp` in bytes; `(0, 0)` when none.
#[inline(always)]
pub fn leaf_word(sp: u64) -> (u64, u32) {
    if sp == 0 {
        return (0, 0);
    }
    // SAFETY: a checked read of user memory into a stack array.
    let Ok(words) = (unsafe { bpf_probe_read_user(sp as *const [u64; LEAF_WORDS]) }) else {
        return (0, 0);
    };
    for (i, &w) in words.iter().enumerate() {
        // User code lives between the first 64 KiB and the top of the
        // 47-bit user half; a stack address near sp is a saved frame pointer
        // or a pointer to a local.
        let near_sp = w.wrapping_sub(sp) < 64 * 1024 || sp.wrapping_sub(w) < 64 * 1024;
        if w > 0x10000 && w < (1 << 47) && !near_sp && after_call(w) {
            return (w, (i * 8) as u32);
        }
    }
    (0, 0)
}
